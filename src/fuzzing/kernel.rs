//! Kernel images: the loader ([`load_kernel`]: ELF vmlinux or bzImage,
//! from a file, into a small guest memory) and kiln's own ELF
//! program-header reader ([`elf::program_headers`]).

use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::input::Seed;
use super::Scratch;
use crate::elf;
use crate::loader::{load_kernel, Error};

/// Guest memory for the loader: 4 MiB, room for a kernel above 1 MiB.
const MEM_SIZE: usize = 4 << 20;

/// `kernel`: the fuzzer's bytes as a kernel image file. The loader must
/// refuse or load it without panicking, and agree with kiln's ELF reader
/// on whether an ELF file has a loadable segment.
pub fn run_kernel(data: &[u8]) {
    super::limit_file_size();
    let scratch = Scratch::new("kernel");
    let path = scratch.path("vmlinux");
    if let Err(e) = std::fs::write(&path, data) {
        panic!("cannot write {}: {e}", path.display());
    }
    let mem = match GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) {
        Ok(m) => m,
        Err(e) => panic!("cannot map guest memory: {e}"),
    };
    let loaded = load_kernel(&mem, &path);
    if let Some((headers, _)) = elf::program_headers(data) {
        let has_load = headers.iter().any(|h| h.p_type == 1);
        let refused = matches!(loaded, Err(Error::ElfNoLoad(_)));
        assert_eq!(
            refused, !has_load,
            "the loader and kiln::elf disagree on whether the file has a PT_LOAD segment"
        );
    }
}

/// `elf`: the fuzzer's bytes as an ELF file for [`elf::program_headers`],
/// whose answer must describe the bytes it was given.
pub fn run_elf(data: &[u8]) {
    let Some((headers, end)) = elf::program_headers(data) else {
        return;
    };
    let le = |at: usize, n: usize| -> u64 {
        let mut v = [0u8; 8];
        v[..n].copy_from_slice(&data[at..at + n]);
        u64::from_le_bytes(v)
    };
    let (phoff, phentsize, phnum) = (le(0x20, 8), le(0x36, 2), le(0x38, 2));
    assert_eq!(u64::try_from(headers.len()).ok(), Some(phnum));
    assert_eq!(end, phoff.saturating_add(phentsize * phnum));
    for (i, h) in (0u64..).zip(&headers) {
        let at = phoff + i * phentsize;
        let at = usize::try_from(at).unwrap_or(usize::MAX);
        assert!(
            at.checked_add(0x28).is_some_and(|e| e <= data.len()),
            "header {i} at {at:#x} read past the {} bytes given",
            data.len()
        );
        assert_eq!(u64::from(h.p_type), le(at, 4));
        assert_eq!((h.offset, h.filesz), (le(at + 8, 8), le(at + 0x20, 8)));
    }
}

/// A 64-bit ELF executable with `segments` program headers of type
/// `p_type`, each loading `code` at 1 MiB.
pub fn elf_image(p_type: u32, segments: u16, code: &[u8]) -> Vec<u8> {
    let phoff = 64u64;
    let data_at = phoff + 56 * u64::from(segments);
    let mut s = Seed::default();
    s.raw(b"\x7fELF").u8(2).u8(1).u8(1).raw(&[0; 9]);
    s.u16(2).u16(0x3e).u32(1).u64(0x10_0000).u64(phoff).u64(0);
    s.u32(0).u16(64).u16(56).u16(segments).u16(0).u16(0).u16(0);
    for _ in 0..segments {
        let size = u64::try_from(code.len()).unwrap_or(0);
        s.u32(p_type)
            .u32(7)
            .u64(data_at)
            .u64(0x10_0000)
            .u64(0x10_0000);
        s.u64(size).u64(size).u64(0x1000);
    }
    s.raw(code);
    s.take()
}

/// A bzImage header (boot protocol 2.15) with `setup_sects` and
/// `syssize`, padded to `len` bytes.
pub fn bzimage(setup_sects: u8, syssize: u32, xloadflags: u16, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len.max(0x268)];
    b[0x1f1] = setup_sects;
    b[0x1f4..0x1f8].copy_from_slice(&syssize.to_le_bytes());
    b[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
    b[0x202..0x206].copy_from_slice(b"HdrS");
    b[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
    b[0x211] = 1; // loadflags: LOADED_HIGH
    b[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    b[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
    b.truncate(len.max(0x268));
    b
}

pub fn kernel_seeds() -> Vec<(String, Vec<u8>)> {
    let code = [0xf4u8; 16]; // hlt
    vec![
        ("elf".into(), elf_image(1, 1, &code)),
        ("elf-no-load".into(), elf_image(4, 2, &code)),
        ("bzimage".into(), bzimage(1, 1, 1, 1024 + 16)),
        ("bzimage-truncated".into(), bzimage(4, 0x1000, 1, 1024)),
        ("bzimage-32bit".into(), bzimage(0, 0, 0, 3 * 1024)),
    ]
}

pub fn elf_seeds() -> Vec<(String, Vec<u8>)> {
    let code = [0xf4u8; 16];
    let mut outside = elf_image(1, 2, &code);
    outside[0x20..0x28].copy_from_slice(&0xffff_ff00u64.to_le_bytes());
    vec![
        ("elf".into(), elf_image(1, 1, &code)),
        ("interp".into(), elf_image(3, 3, b"/lib/ld.so\0")),
        ("headers-outside".into(), outside),
    ]
}
