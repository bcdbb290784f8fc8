//! The little of ELF that kiln reads itself (kernels go through
//! linux-loader): the program headers of a 64-bit little-endian file, with
//! every offset bounds-checked.

/// One program header: its type (`PT_*`) and where its bytes lie in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramHeader {
    pub p_type: u32,
    pub offset: u64,
    pub filesz: u64,
}

/// `PT_INTERP`: the file names a dynamic loader.
pub const PT_INTERP: u32 = 3;

/// The program headers of `bytes`, and where their table ends; None when
/// it is not a 64-bit little-endian ELF or a header lies outside it.
pub fn program_headers(bytes: &[u8]) -> Option<(Vec<ProgramHeader>, u64)> {
    let le = |o: usize, n: usize| -> Option<u64> {
        let s = bytes.get(o..o.checked_add(n)?)?;
        let mut v = [0u8; 8];
        v[..n].copy_from_slice(s);
        Some(u64::from_le_bytes(v))
    };
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return None;
    }
    let (phoff, phentsize, phnum) = (le(0x20, 8)?, le(0x36, 2)?, le(0x38, 2)?);
    let headers = (0..phnum)
        .map(|i| {
            let at = usize::try_from(phoff.checked_add(i * phentsize)?).ok()?;
            Some(ProgramHeader {
                p_type: u32::try_from(le(at, 4)?).ok()?,
                offset: le(at.checked_add(8)?, 8)?,
                filesz: le(at.checked_add(0x20)?, 8)?,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some((headers, phoff.saturating_add(phentsize * phnum)))
}
