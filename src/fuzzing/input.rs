//! Reading a harness's decisions out of fuzzer bytes ([`Input`]), and
//! writing them back as bytes ([`Seed`]) for the seed corpus.
//!
//! Every read succeeds: past the end of the data, numbers are 0 and byte
//! strings empty, so any input is a complete (if short) run. Numbers are
//! little endian.

/// Fuzzer bytes, consumed from the front.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// Whether every byte was read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let n = N.min(self.data.len());
        let (now, rest) = self.data.split_at(n);
        a[..n].copy_from_slice(now);
        self.data = rest;
        a
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    /// A number below `n` (0 when `n` is 0), from one byte.
    pub fn below(&mut self, n: u8) -> u8 {
        self.u8().checked_rem(n).unwrap_or(0)
    }

    /// A byte string: a u16 length (at most `max`), then that many bytes
    /// (fewer at the end of the data).
    pub fn bytes(&mut self, max: usize) -> &'a [u8] {
        let n = usize::from(self.u16()).min(max).min(self.data.len());
        let (now, rest) = self.data.split_at(n);
        self.data = rest;
        now
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}

/// The bytes an [`Input`] reads back as the same decisions: how seed
/// corpus files are made.
#[derive(Default)]
pub struct Seed(pub Vec<u8>);

impl Seed {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// What [`Input::bytes`] reads back (at most 65535 bytes).
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        let n = u16::try_from(b.len()).unwrap_or(u16::MAX);
        self.u16(n);
        self.0.extend_from_slice(&b[..usize::from(n)]);
        self
    }

    pub fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }

    pub fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_read_back() {
        let mut s = Seed::default();
        s.u8(7)
            .u16(0x1234)
            .u32(5)
            .u64(u64::MAX)
            .bytes(b"abc")
            .raw(b"xy");
        let data = s.take();
        let mut i = Input::new(&data);
        assert_eq!(i.u8(), 7);
        assert_eq!(i.u16(), 0x1234);
        assert_eq!(i.u32(), 5);
        assert_eq!(i.u64(), u64::MAX);
        assert_eq!(i.bytes(100), b"abc");
        assert_eq!(i.rest(), b"xy");
        assert!(i.is_empty());
        // Past the end: zeros and nothing.
        assert_eq!((i.u32(), i.bytes(10)), (0, &b""[..]));
        let mut short = Input::new(&[1]);
        assert_eq!(short.u32(), 1);
    }
}
