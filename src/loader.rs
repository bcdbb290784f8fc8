//! Loading the guest: kernel (ELF vmlinux or bzImage), initrd, command line.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemory as _, GuestMemoryMmap};

use crate::arch::x86_64::boot::initrd_address;
use crate::arch::x86_64::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START};
use crate::arch::x86_64::regs::EntryMode;
use crate::hostfile::{self, Kind, Quoted};

/// The 64-bit entry point of a bzImage is 0x200 past its protected-mode
/// code (Documentation/x86/boot.rst, "64-bit boot protocol").
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// setup_header.xloadflags: XLF_KERNEL_64, the kernel has the 64-bit entry.
const XLF_KERNEL_64: u16 = 1 << 0;
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
/// ELF64 header: e_phoff (u64) @0x20, e_phentsize (u16) @0x36, e_phnum
/// (u16) @0x38 (System V gABI, "ELF Header").
const ELF64_EHDR_SIZE: usize = 64;
/// Program header p_type value of a loadable segment (gABI, "Program Header").
const PT_LOAD: u32 = 1;
/// Documentation/arch/x86/boot.rst, "The Real-Mode Kernel Header": setup_sects
/// (u8) @0x1f1, syssize (u32, 16-byte units) @0x1f4; the header ends by 0x268.
const BZ_SETUP_SECTS: usize = 0x1f1;
const BZ_SYSSIZE: usize = 0x1f4;
/// The header's magic, "HdrS", @0x202.
const BZ_MAGIC: usize = 0x202;
const BZ_HEADER_END: usize = 0x268;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open kernel image {}", Quoted(path))]
    OpenKernel {
        path: PathBuf,
        #[source]
        source: hostfile::Error,
    },
    #[error("cannot load kernel image {} as an ELF vmlinux", Quoted(path))]
    Elf {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("kernel image {} is an ELF file with no loadable (PT_LOAD) segment", Quoted(.0))]
    ElfNoLoad(PathBuf),
    #[error(
        "cannot load kernel image {} as a bzImage (it is not an ELF file either)",
        Quoted(path)
    )]
    BzImage {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error(
        "kernel image {} is a truncated bzImage: its header says {expected} bytes, \
         the file has {actual}",
        Quoted(path)
    )]
    BzImageTruncated {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error(
        "kernel image {} is a bzImage without the 64-bit entry point (XLF_KERNEL_64)",
        Quoted(.0)
    )]
    Not64Bit(PathBuf),
    #[error(
        "kernel image {} does not fit in guest memory: it needs {need_mib} MiB (up to guest \
         physical address {end:#x}) before it even starts, and machine-config.mem_size_mib gives \
         {mem_mib}; give the guest more (a Linux guest also needs memory to run in)",
        Quoted(path)
    )]
    KernelTooBig {
        path: PathBuf,
        end: u64,
        need_mib: u64,
        mem_mib: u64,
    },
    #[error("cannot open initrd {}", Quoted(path))]
    OpenInitrd {
        path: PathBuf,
        #[source]
        source: hostfile::Error,
    },
    #[error("cannot read initrd {}", Quoted(path))]
    ReadInitrd {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "initrd {} ({size} bytes) does not fit in guest memory above the kernel; \
         raise machine-config.mem_size_mib",
        Quoted(path)
    )]
    InitrdTooLarge { path: PathBuf, size: u64 },
    #[error("cannot copy initrd {} into guest memory", Quoted(path))]
    CopyInitrd {
        path: PathBuf,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("kernel command line is too long: {len} bytes with its NUL, at most {max}; boot-source.boot_args is {given} of them, kiln adds {} (one virtio_mmio.device= per virtio device, root=, this host's options): shorten boot_args", len.saturating_sub(*given + 1))]
    CmdlineTooLong {
        len: usize,
        max: usize,
        given: usize,
    },
    #[error("invalid kernel command line {0:?}")]
    Cmdline(String),
    #[error("cannot write the kernel command line into guest memory")]
    WriteCmdline(#[source] linux_loader::loader::Error),
}

/// Where and how to enter the loaded kernel.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub entry: u64,
    pub mode: EntryMode,
    /// The bzImage's setup header, for the zero page.
    pub setup_header: Option<setup_header>,
    /// First guest address past the kernel image.
    pub end: u64,
}

fn is_elf(file: &mut File) -> std::io::Result<bool> {
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic)?;
    file.seek(SeekFrom::Start(0))?;
    Ok(n == 4 && &magic == ELF_MAGIC)
}

/// Reads up to `buf.len()` bytes at `offset`; returns how many there were.
fn read_at(file: &mut File, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
    file.seek(SeekFrom::Start(offset))?;
    // One read may return less than is there; read on until the end.
    let mut total = 0;
    while total < buf.len() {
        match file.read(&mut buf[total..])? {
            0 => break,
            m => total += m,
        }
    }
    file.seek(SeekFrom::Start(0))?;
    Ok(total)
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// The guest-physical ranges (address, size in memory) of the ELF64 file's
/// PT_LOAD program headers. None of them: nothing would be loaded, and the
/// guest would start in empty memory. A file too short for its headers
/// gives one empty range, so that linux-loader, which checks the header
/// itself and refuses a file shorter than its program headers, says so.
fn elf_load_ranges(file: &mut File) -> std::io::Result<Vec<(u64, u64)>> {
    let mut ehdr = [0u8; ELF64_EHDR_SIZE];
    if read_at(file, 0, &mut ehdr)? < ELF64_EHDR_SIZE {
        // Too short: linux-loader says so.
        return Ok(vec![(0, 0)]);
    }
    let mut phoff = [0u8; 8];
    phoff.copy_from_slice(&ehdr[0x20..0x28]);
    let phoff = u64::from_le_bytes(phoff);
    let phentsize = u64::from(le16(&ehdr, 0x36));
    let phnum = le16(&ehdr, 0x38);
    let mut ranges = Vec::new();
    for i in 0..u64::from(phnum) {
        let Some(at) = i.checked_mul(phentsize).and_then(|o| o.checked_add(phoff)) else {
            break;
        };
        // p_type, then (of a PT_LOAD) p_paddr at 0x18 and p_memsz at 0x28.
        // A header the file cuts short: linux-loader refuses the file and
        // says why (not "no PT_LOAD", which would be wrong).
        let mut ph = [0u8; 0x30];
        let got = read_at(file, at, &mut ph)?;
        if got < 4 {
            return Ok(vec![(0, 0)]);
        }
        if u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) == PT_LOAD {
            if got < ph.len() {
                return Ok(vec![(0, 0)]);
            }
            let word = |o: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&ph[o..o + 8]);
                u64::from_le_bytes(b)
            };
            ranges.push((word(0x18), word(0x28)));
        }
    }
    Ok(ranges)
}

/// Checks that `[start, start + len)` is guest memory: a kernel that does
/// not fit fails here, naming what it needs, rather than in the loader.
fn check_fits(mem: &GuestMemoryMmap, path: &Path, start: u64, len: u64) -> Result<(), Error> {
    let usize_len = usize::try_from(len).unwrap_or(usize::MAX);
    if mem.check_range(GuestAddress(start), usize_len) {
        return Ok(());
    }
    let end = start.saturating_add(len);
    let mib = 1 << 20;
    Err(Error::KernelTooBig {
        path: path.to_owned(),
        end,
        need_mib: end.div_ceil(mib),
        mem_mib: mem.last_addr().0.saturating_add(1) / mib,
    })
}

/// The size a bzImage's header says the file has: the setup sectors plus
/// the boot sector, then `syssize` 16-byte units of protected-mode code.
/// None when the file is too short to hold the header or has no "HdrS"
/// magic: then it is linux-loader's to refuse.
fn bzimage_declared_size(file: &mut File) -> std::io::Result<Option<u64>> {
    let mut hdr = [0u8; BZ_HEADER_END];
    if read_at(file, 0, &mut hdr)? < BZ_HEADER_END || &hdr[BZ_MAGIC..BZ_MAGIC + 4] != b"HdrS" {
        return Ok(None);
    }
    // boot.rst: "If this field is 0, the real value is 4."
    let setup_sects = match hdr[BZ_SETUP_SECTS] {
        0 => 4,
        n => u64::from(n),
    };
    let mut syssize = [0u8; 4];
    syssize.copy_from_slice(&hdr[BZ_SYSSIZE..BZ_SYSSIZE + 4]);
    let syssize = u64::from(u32::from_le_bytes(syssize));
    Ok(Some((setup_sects + 1) * 512 + syssize * 16))
}

/// Loads the kernel at `path`: an ELF vmlinux (entered through PVH when it
/// carries the PVH note, through the 64-bit boot protocol otherwise) or a
/// bzImage (64-bit boot protocol).
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, Error> {
    let open_err = |source| Error::OpenKernel {
        path: path.to_owned(),
        source,
    };
    let mut file = hostfile::open_read(path, Kind::Regular).map_err(open_err)?;
    let read_err = |e: std::io::Error| open_err(e.into());
    let highmem = Some(GuestAddress(HIMEM_START));
    if is_elf(&mut file).map_err(read_err)? {
        let ranges = elf_load_ranges(&mut file).map_err(read_err)?;
        if ranges.is_empty() {
            return Err(Error::ElfNoLoad(path.to_owned()));
        }
        if let Some(&(start, len)) = ranges
            .iter()
            .find(|&&(start, len)| check_fits(mem, path, start, len).is_err())
        {
            // Name the whole need: up to the highest segment's end.
            let end = ranges
                .iter()
                .map(|&(s, l)| s.saturating_add(l))
                .max()
                .unwrap_or(start);
            check_fits(mem, path, start, end.saturating_sub(start).max(len))?;
        }
        let r = Elf::load(mem, None, &mut file, highmem).map_err(|source| Error::Elf {
            path: path.to_owned(),
            source,
        })?;
        let (entry, mode) = match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => (addr.0, EntryMode::Pvh),
            _ => (r.kernel_load.0, EntryMode::Linux64),
        };
        return Ok(LoadedKernel {
            entry,
            mode,
            setup_header: None,
            end: r.kernel_end,
        });
    }
    let actual = file.metadata().map_err(read_err)?.len();
    if let Some(expected) = bzimage_declared_size(&mut file).map_err(read_err)? {
        if actual < expected {
            return Err(Error::BzImageTruncated {
                path: path.to_owned(),
                expected,
                actual,
            });
        }
    }
    let r = BzImage::load(mem, None, &mut file, highmem).map_err(|source| Error::BzImage {
        path: path.to_owned(),
        source,
    })?;
    let hdr = r.setup_header.unwrap_or_default();
    if hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(Error::Not64Bit(path.to_owned()));
    }
    // boot.rst: the kernel decompresses itself to pref_address (at the
    // least) and needs init_size bytes there before it can run.
    check_fits(mem, path, hdr.pref_address, u64::from(hdr.init_size))?;
    Ok(LoadedKernel {
        entry: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
        mode: EntryMode::Linux64,
        setup_header: Some(hdr),
        end: r.kernel_end,
    })
}

/// Copies the initrd at `path` to the top of low memory; returns (address, size).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    path: &Path,
    kernel: &LoadedKernel,
) -> Result<(u64, u64), Error> {
    let read_err = |source| Error::ReadInitrd {
        path: path.to_owned(),
        source,
    };
    let mut file =
        hostfile::open_read(path, Kind::Regular).map_err(|source| Error::OpenInitrd {
            path: path.to_owned(),
            source,
        })?;
    let size = file.metadata().map_err(read_err)?.len();
    let max_addr = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(u64::MAX);
    let addr =
        initrd_address(mem_size, size, max_addr, kernel.end).ok_or(Error::InitrdTooLarge {
            path: path.to_owned(),
            size,
        })?;
    let len = usize::try_from(size).map_err(|_| Error::InitrdTooLarge {
        path: path.to_owned(),
        size,
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|source| Error::CopyInitrd {
            path: path.to_owned(),
            source,
        })?;
    Ok((addr, size))
}

/// Writes `cmdline` to its fixed place; returns its size with the NUL.
/// `given` is how much of it the user wrote (boot_args), for the error.
pub fn load_command_line(
    mem: &GuestMemoryMmap,
    cmdline: &str,
    given: usize,
) -> Result<usize, Error> {
    let len = cmdline.len() + 1;
    if len > CMDLINE_MAX_SIZE {
        return Err(Error::CmdlineTooLong {
            len,
            max: CMDLINE_MAX_SIZE,
            given,
        });
    }
    let mut c = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| Error::Cmdline(e.to_string()))?;
    if !cmdline.trim().is_empty() {
        c.insert_str(cmdline.trim())
            .map_err(|e| Error::Cmdline(format!("{cmdline}: {e}")))?;
    }
    load_cmdline(mem, GuestAddress(CMDLINE_START), &c).map_err(Error::WriteCmdline)?;
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let p = std::env::temp_dir().join(format!("kiln-loader-{}-{name}", std::process::id()));
        File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    #[test]
    fn cmdline_is_written_with_nul() {
        let m = mem();
        let n = load_command_line(&m, "console=ttyS0 panic=1", 21).unwrap();
        assert_eq!(n, 22);
        let mut buf = [0u8; 22];
        m.read_slice(&mut buf, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&buf, b"console=ttyS0 panic=1\0");
    }

    #[test]
    fn cmdline_too_long() {
        let long = "a".repeat(CMDLINE_MAX_SIZE);
        let e = load_command_line(&mem(), &long, CMDLINE_MAX_SIZE - 300).unwrap_err();
        assert!(matches!(e, Error::CmdlineTooLong { .. }));
        // What kiln appended is counted and said.
        let msg = e.to_string();
        assert!(
            msg.contains(&format!(
                "boot_args is {} of them, kiln adds 300",
                CMDLINE_MAX_SIZE - 300
            )),
            "{msg}"
        );
    }

    #[test]
    fn garbage_kernel_is_refused_with_its_path() {
        let p = temp_file("garbage", &[0u8; 4096]);
        let err = load_kernel(&mem(), &p).unwrap_err();
        assert!(matches!(err, Error::BzImage { .. }));
        assert!(err.to_string().contains(p.to_str().unwrap()));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn missing_kernel_names_the_path() {
        let err = load_kernel(&mem(), Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"));
    }

    /// An ELF64 header with one program header of type `p_type`.
    fn elf_with_one_segment(p_type: u32) -> Vec<u8> {
        let mut f = vec![0u8; 0x1000];
        f[0..4].copy_from_slice(ELF_MAGIC);
        f[4] = 2; // ELFCLASS64
        f[5] = 1; // little endian
        f[6] = 1; // EV_CURRENT
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[18..20].copy_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // e_entry
        f[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        f[0x34..0x36].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        f[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        f[64..68].copy_from_slice(&p_type.to_le_bytes());
        f
    }

    #[test]
    fn elf_without_a_load_segment_is_refused() {
        const PT_NOTE: u32 = 4;
        let p = temp_file("no-load", &elf_with_one_segment(PT_NOTE));
        let err = load_kernel(&mem(), &p).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("kernel image {p:?} is an ELF file with no loadable (PT_LOAD) segment")
        );
        std::fs::remove_file(p).unwrap();
    }

    /// A PT_LOAD header the file cuts short is a truncated file, which
    /// linux-loader refuses, not a file without one (the kernel fuzz
    /// target's find: kiln's ELF reader, which needs less of each header,
    /// saw the PT_LOAD the loader said was not there).
    #[test]
    fn elf_cut_inside_its_load_header_is_refused_as_truncated() {
        let f = elf_with_one_segment(PT_LOAD);
        let p = temp_file("cut-load", &f[..64 + 0x2e]);
        let err = load_kernel(&mem(), &p).unwrap_err();
        assert!(matches!(err, Error::Elf { .. }), "{err}");
        assert!(err.to_string().contains(p.to_str().unwrap()), "{err}");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn elf_beyond_guest_memory_is_refused_naming_the_need() {
        // One PT_LOAD of 16 MiB at guest-physical 60 MiB, in 64 MiB.
        let mut f = elf_with_one_segment(PT_LOAD);
        f[64 + 0x18..64 + 0x20].copy_from_slice(&(60u64 << 20).to_le_bytes()); // p_paddr
        f[64 + 0x28..64 + 0x30].copy_from_slice(&(16u64 << 20).to_le_bytes()); // p_memsz
        let p = temp_file("too-big", &f);
        let err = load_kernel(&mem(), &p).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "kernel image {p:?} does not fit in guest memory: it needs 76 MiB (up to guest \
                 physical address 0x4c00000) before it even starts, and machine-config.mem_size_mib \
                 gives 64; give the guest more (a Linux guest also needs memory to run in)"
            )
        );
        std::fs::remove_file(p).unwrap();
    }

    /// A bzImage header (boot.rst) with `setup_sects` and `syssize`, padded
    /// to `len` bytes.
    fn bzimage(setup_sects: u8, syssize: u32, len: usize) -> Vec<u8> {
        let mut f = vec![0u8; len.max(BZ_HEADER_END)];
        f[BZ_SETUP_SECTS] = setup_sects;
        f[BZ_SYSSIZE..BZ_SYSSIZE + 4].copy_from_slice(&syssize.to_le_bytes());
        f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes()); // boot_flag
        f[BZ_MAGIC..BZ_MAGIC + 4].copy_from_slice(b"HdrS");
        f[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // version
        f[0x211] = 1; // loadflags: LOADED_HIGH
        f.truncate(len);
        f
    }

    #[test]
    fn truncated_bzimage_is_refused_with_both_sizes() {
        // The header says 5 sectors of setup and 64 KiB of kernel.
        let p = temp_file("bz-short", &bzimage(4, 0x1000, 5 * 512 + 100));
        let err = load_kernel(&mem(), &p).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "kernel image {p:?} is a truncated bzImage: its header says 68096 bytes, \
                 the file has 2660"
            )
        );
        // Shorter than its own setup sectors (0 means 4, then the boot sector).
        let p2 = temp_file("bz-setup", &bzimage(0, 0, 0x300));
        let err = load_kernel(&mem(), &p2).unwrap_err();
        assert!(matches!(
            err,
            Error::BzImageTruncated {
                expected: 2560,
                actual: 0x300,
                ..
            }
        ));
        // Whole, it gets past the size check (to linux-loader's and kiln's own).
        let p3 = temp_file("bz-whole", &bzimage(4, 0x10, 5 * 512 + 0x100));
        let err = load_kernel(&mem(), &p3).unwrap_err();
        assert!(!matches!(err, Error::BzImageTruncated { .. }), "{err}");
        for p in [p, p2, p3] {
            std::fs::remove_file(p).unwrap();
        }
    }

    #[test]
    fn a_fifo_kernel_or_initrd_is_refused_without_blocking() {
        let p = std::env::temp_dir().join(format!("kiln-loader-{}-fifo", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = load_kernel(&mem(), &p).unwrap_err();
        assert_eq!(
            crate::error_chain(&err),
            format!("cannot open kernel image {p:?}: it is a named pipe, not a regular file")
        );
        let k = LoadedKernel {
            entry: 0,
            mode: EntryMode::Linux64,
            setup_header: None,
            end: 0x20_0000,
        };
        let err = load_initrd(&mem(), 64 << 20, &p, &k).unwrap_err();
        assert!(matches!(err, Error::OpenInitrd { .. }), "{err}");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn initrd_at_top_of_memory() {
        let p = temp_file("initrd", &[0x5a; 5000]);
        let m = mem();
        let k = LoadedKernel {
            entry: 0,
            mode: EntryMode::Linux64,
            setup_header: None,
            end: 0x20_0000,
        };
        let (addr, size) = load_initrd(&m, 64 << 20, &p, &k).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr, (64 << 20) - 0x2000);
        let b: u8 = m.read_obj(GuestAddress(addr + 4999)).unwrap();
        assert_eq!(b, 0x5a);
        let huge = LoadedKernel { end: 64 << 20, ..k };
        assert!(matches!(
            load_initrd(&m, 64 << 20, &p, &huge),
            Err(Error::InitrdTooLarge { .. })
        ));
        std::fs::remove_file(p).unwrap();
    }
}
