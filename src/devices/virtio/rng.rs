//! virtio-rng, the entropy device (virtio 1.2 §5.4).
//!
//! One request queue; every device-writable buffer is filled with bytes from
//! the host's `getrandom(2)`, at most [`MAX_BYTES_PER_REQUEST`] per chain.

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes};

use super::queue::Outcome;
use super::{device_type, features, Active, GuestMem, Sources, VirtioDevice};

/// §5.4.2: a single queue, "requestq".
const QUEUE_SIZES: &[u16] = &[256];
/// Cap on the bytes given for one chain, so one request cannot make the
/// event thread spin on getrandom for long.
pub const MAX_BYTES_PER_REQUEST: u32 = 64 * 1024;
const CHUNK: usize = 4096;

/// The entropy device. It has no config space and no device features.
pub struct Rng {
    buf: Vec<u8>,
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl Rng {
    pub fn new() -> Self {
        Self {
            buf: vec![0; CHUNK],
        }
    }
}

/// Fills `buf` from the host's entropy pool. Returns false on failure.
fn getrandom(buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes
        // that outlives the call; getrandom writes at most that many bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(n) => done += n,
            Err(_) if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {
            }
            Err(_) => return false,
        }
    }
    true
}

/// Fills the chain's device-writable buffers; returns the bytes written.
/// Device-readable buffers are skipped (§5.4.6.1 says there are none); a
/// buffer outside guest memory ends the request.
fn fill_chain(chain: DescriptorChain<&GuestMem>, mem: &GuestMem, buf: &mut [u8]) -> u32 {
    let mut written: u32 = 0;
    for desc in chain.filter(|d| d.is_write_only()) {
        let mut remaining = desc.len().min(MAX_BYTES_PER_REQUEST - written);
        let mut addr = desc.addr();
        while remaining > 0 {
            let n = usize::try_from(remaining).map_or(buf.len(), |r| r.min(buf.len()));
            let chunk = &mut buf[..n];
            if !getrandom(chunk) || mem.write_slice(chunk, addr).is_err() {
                return written;
            }
            // `n` <= CHUNK, so it fits a u32.
            let n32 = u32::try_from(n).unwrap_or(0);
            written += n32;
            remaining -= n32;
            match addr.checked_add(u64::from(n32)) {
                Some(a) => addr = a,
                None => return written,
            }
        }
        if written >= MAX_BYTES_PER_REQUEST {
            break;
        }
    }
    written
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        features::COMMON
    }

    fn process_queue(&mut self, active: &mut Active, index: usize, _: &mut dyn Sources) -> bool {
        let buf = &mut self.buf;
        active.drain(index, |chain, mem| {
            Outcome::Used(fill_chain(chain, mem, buf))
        })
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;
    use crate::devices::virtio::test_utils::*;

    fn setup() -> (TestSlot<Rng>, Driver) {
        let dev = slot(Rng::new());
        let mut d = Driver::new(dev.clone(), guest_mem());
        d.init(0);
        (dev, d)
    }

    #[test]
    fn fills_writable_buffers() {
        let (dev, mut d) = setup();
        assert_eq!(d.read(0x8), device_type::RNG);
        d.chain(0, &[(DATA, 100, true), (DATA + 0x1000, 200, true)]);
        d.push_avail(0);
        d.write(0x50, 0);
        process(&dev, 0);
        assert_eq!(d.used_idx(), 1);
        assert_eq!(d.used_elem(0), (0, 300));
        let mut got = [0u8; 200];
        d.mem
            .read_slice(&mut got, GuestAddress(DATA + 0x1000))
            .unwrap();
        assert!(got.iter().any(|&b| b != 0));
        assert_eq!(d.read(0x60) & 1, 1);
    }

    #[test]
    fn caps_bytes_and_survives_bad_buffers() {
        let (dev, mut d) = setup();
        // Huge buffer: capped. Then a buffer outside memory, a readable
        // buffer and a looping chain: none panics, all complete.
        d.chain(0, &[(DATA, 0x8_0000, true)]);
        d.push_avail(0);
        d.chain(1, &[(MEM_SIZE - 16, 64, true)]);
        d.push_avail(1);
        d.chain(2, &[(u64::MAX - 8, u32::MAX, true)]);
        d.push_avail(2);
        d.chain(3, &[(DATA, 64, false)]);
        d.push_avail(3);
        d.set_desc(DESC, 4, DATA, 8, F_WRITE | F_NEXT, 5);
        d.set_desc(DESC, 5, DATA, 8, F_WRITE | F_NEXT, 4);
        d.push_avail(4);
        process(&dev, 0);
        assert_eq!(d.used_idx(), 5);
        assert_eq!(d.used_elem(0), (0, MAX_BYTES_PER_REQUEST));
        assert_eq!(d.used_elem(1).1, 0);
        assert_eq!(d.used_elem(2).1, 0);
        assert_eq!(d.used_elem(3).1, 0);
        assert_eq!(d.used_elem(4).0, 4);
        assert!(!d.needs_reset());
    }

    #[test]
    fn head_index_beyond_queue_needs_reset() {
        let (dev, mut d) = setup();
        d.push_avail(16);
        process(&dev, 0);
        assert!(d.needs_reset());
        assert_eq!(d.used_idx(), 0);
    }

    #[test]
    fn avail_index_too_far_ahead_needs_reset() {
        let (dev, mut d) = setup();
        d.set_avail_idx(100); // queue size is 16
        process(&dev, 0);
        assert!(d.needs_reset());
        assert_eq!(d.read(0x60) & 2, 2);
        // A reset brings it back.
        d.write(0x70, 0);
        assert!(!d.needs_reset());
        assert!(!dev.lock().unwrap().is_active());
    }
}
