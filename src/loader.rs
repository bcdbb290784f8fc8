//! Loading the guest: kernel (ELF vmlinux or bzImage), initrd, command line.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::boot::initrd_address;
use crate::arch::x86_64::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START};
use crate::arch::x86_64::regs::EntryMode;

/// The 64-bit entry point of a bzImage is 0x200 past its protected-mode
/// code (Documentation/x86/boot.rst, "64-bit boot protocol").
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// setup_header.xloadflags: XLF_KERNEL_64, the kernel has the 64-bit entry.
const XLF_KERNEL_64: u16 = 1 << 0;
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open kernel image {path}")]
    OpenKernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load kernel image {path} as an ELF vmlinux")]
    Elf {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("cannot load kernel image {path} as a bzImage (it is not an ELF file either)")]
    BzImage {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("kernel image {0} is a bzImage without the 64-bit entry point (XLF_KERNEL_64)")]
    Not64Bit(PathBuf),
    #[error("cannot read initrd {path}")]
    ReadInitrd {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("initrd {path} ({size} bytes) does not fit in guest memory above the kernel; raise machine-config.mem_size_mib")]
    InitrdTooLarge { path: PathBuf, size: u64 },
    #[error("cannot copy initrd {path} into guest memory")]
    CopyInitrd {
        path: PathBuf,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("kernel command line is too long ({len} bytes, at most {max}): shorten boot-source.boot_args")]
    CmdlineTooLong { len: usize, max: usize },
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

/// Loads the kernel at `path`: an ELF vmlinux (entered through PVH when it
/// carries the PVH note, through the 64-bit boot protocol otherwise) or a
/// bzImage (64-bit boot protocol).
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, Error> {
    let open_err = |source| Error::OpenKernel {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(open_err)?;
    let highmem = Some(GuestAddress(HIMEM_START));
    if is_elf(&mut file).map_err(open_err)? {
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
    let r = BzImage::load(mem, None, &mut file, highmem).map_err(|source| Error::BzImage {
        path: path.to_owned(),
        source,
    })?;
    let hdr = r.setup_header.unwrap_or_default();
    if hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(Error::Not64Bit(path.to_owned()));
    }
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
    let mut file = File::open(path).map_err(read_err)?;
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
pub fn load_command_line(mem: &GuestMemoryMmap, cmdline: &str) -> Result<usize, Error> {
    let len = cmdline.len() + 1;
    if len > CMDLINE_MAX_SIZE {
        return Err(Error::CmdlineTooLong {
            len,
            max: CMDLINE_MAX_SIZE,
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
        let n = load_command_line(&m, "console=ttyS0 panic=1").unwrap();
        assert_eq!(n, 22);
        let mut buf = [0u8; 22];
        m.read_slice(&mut buf, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&buf, b"console=ttyS0 panic=1\0");
    }

    #[test]
    fn cmdline_too_long() {
        let long = "a".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            load_command_line(&mem(), &long),
            Err(Error::CmdlineTooLong { .. })
        ));
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
