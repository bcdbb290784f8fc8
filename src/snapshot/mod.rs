//! Snapshot files: a VM's state and its guest memory, written atomically
//! and read back only when they are whole and from a compatible kiln and
//! host.
//!
//! Two files, both mode 0600:
//! - `<name>.mem`: guest memory, its regions one after another (the layout
//!   [`crate::memory`] gives `mem_size_mib`); restored by mapping it
//!   MAP_PRIVATE ([`crate::memory::from_file`]).
//! - `<name>.state`:
//!   ```text
//!   "KILNSNAP" | le32 header length | header (JSON) | payload (JSON)
//!   ```
//!   The header names the snapshot format, the kiln version, the host's CPU
//!   (a digest of the CPUID KVM supports: a snapshot restored on other CPU
//!   features could fault on the first instruction that needs one), the
//!   payload's length and SHA-256, and the memory file's length. The
//!   payload is the [`MachineState`].
//!
//! Each file is written under a temporary name, synced and renamed into
//! place; the memory file first, so a state file never points at a memory
//! file that is not complete.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use kvm_bindings::CpuId;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use crate::vcpu::state::VcpuState;
use crate::vm::VmState;

/// The snapshot format this kiln writes and reads. 2: virtio devices.
pub const FORMAT: u32 = 2;
const MAGIC: &[u8; 8] = b"KILNSNAP";
/// Caps on what a state file may make kiln read.
const MAX_HEADER: u32 = 64 * 1024;
const MAX_PAYLOAD: u64 = 64 << 20;
/// The unit of the memory file's holes.
const PAGE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot {what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a kiln snapshot state file", .0.display())]
    NotSnapshot(PathBuf),
    #[error("{} is damaged: {why}", path.display())]
    Damaged { path: PathBuf, why: String },
    #[error("{} is snapshot format {found}, this kiln reads format {FORMAT}", path.display())]
    Format { path: PathBuf, found: u32 },
    #[error("{} was written by kiln {found}, this is kiln {}", path.display(), env!("CARGO_PKG_VERSION"))]
    Version { path: PathBuf, found: String },
    #[error("{} was taken on a host with other CPU features (CPUID digest {found}, this host {here})", path.display())]
    HostCpu {
        path: PathBuf,
        found: String,
        here: String,
    },
    #[error("{} holds {found} bytes, its snapshot says {expected}", path.display())]
    MemorySize {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("cannot map {} as guest memory", .0.display())]
    Map(PathBuf, #[source] crate::memory::Error),
    #[error("the snapshot's state cannot be encoded")]
    Encode(#[source] serde_json::Error),
}

/// Everything a restore needs besides guest memory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MachineState {
    pub mem_size_mib: usize,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: crate::devices::legacy::serial::SerialSnapshot,
    /// The ACPI PM1 registers (absent from snapshots older than them).
    #[serde(default)]
    pub acpi_pm: crate::devices::legacy::acpi_pm::AcpiPmState,
    /// The virtio devices, in the order they were attached.
    pub devices: Vec<DeviceState>,
}

/// One virtio device: where it sat ([`crate::vmm::AttachedDevice`]) and
/// its state. A restore attaches the config's devices in the same order
/// and refuses a list that differs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    /// The config's name for it (`drive rootfs`, `entropy`).
    pub id: String,
    /// The virtio device ID (§5).
    pub device_type: u32,
    pub mmio_base: u64,
    pub irq: u32,
    pub transport: crate::devices::virtio::state::TransportState,
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    format: u32,
    kiln_version: String,
    host_cpu: String,
    payload_len: u64,
    payload_sha256: String,
    memory_len: u64,
}

/// A snapshot's two files.
#[derive(Clone, Debug)]
pub struct Paths {
    pub state: PathBuf,
    pub memory: PathBuf,
}

impl Paths {
    /// `<dir>/<name>.state` and `<dir>/<name>.mem`.
    pub fn new(dir: &Path, name: &str) -> Self {
        Paths {
            state: dir.join(format!("{name}.state")),
            memory: dir.join(format!("{name}.mem")),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A digest of the CPU features KVM offers guests on this host: the vendor
/// and the feature leaves (1, 7, 0xd.1, 0x80000001, 0x80000008), not the
/// leaves that change from call to call or CPU to CPU (APIC IDs, OSXSAVE).
pub fn host_cpu_digest(supported: &CpuId) -> String {
    let mut h = Sha256::new();
    for e in supported.as_slice() {
        let regs: &[u32] = match (e.function, e.index) {
            (0, _) => &[e.ebx, e.ecx, e.edx],
            // OSXSAVE (bit 27) follows the guest's CR4.
            (1, _) => &[e.ecx & !(1 << 27), e.edx],
            (7, 0) => &[e.ebx, e.ecx, e.edx],
            (7, 1) | (0xd, 1) | (0x8000_0008, _) => &[e.eax],
            (0x8000_0001, _) => &[e.ecx, e.edx],
            _ => continue,
        };
        h.update(e.function.to_le_bytes());
        h.update(e.index.to_le_bytes());
        for v in regs {
            h.update(v.to_le_bytes());
        }
    }
    hex(&h.finalize()[..16])
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `path` through a temporary file beside it: synced, mode 0600,
/// renamed into place.
fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>,
) -> Result<(), Error> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let result = (|| {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        fill(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io_err("write", path))
}

/// Writes a snapshot of a paused VM: its guest memory and `state`.
pub fn write(
    paths: &Paths,
    state: &MachineState,
    mem: &GuestMemoryMmap,
    supported: &CpuId,
) -> Result<(), Error> {
    let mut memory_len = 0u64;
    // Pages of zeroes are holes: a guest's untouched memory costs neither
    // disk nor time, and reads back as zeroes.
    write_atomically(&paths.memory, |w| {
        let mut buf = vec![0u8; 1 << 20];
        let mut zeroes = 0u64;
        for region in mem.iter() {
            let mut at = 0u64;
            while at < region.len() {
                let n = usize::try_from((region.len() - at).min(buf.len() as u64)).unwrap_or(0);
                mem.read_slice(&mut buf[..n], GuestAddress(region.start_addr().0 + at))
                    .map_err(io::Error::other)?;
                for page in buf[..n].chunks(PAGE) {
                    if page.iter().all(|&b| b == 0) {
                        zeroes += page.len() as u64;
                        continue;
                    }
                    if zeroes > 0 {
                        let skip = i64::try_from(zeroes).map_err(io::Error::other)?;
                        w.seek(io::SeekFrom::Current(skip))?;
                        zeroes = 0;
                    }
                    w.write_all(page)?;
                }
                at += n as u64;
            }
            memory_len += region.len();
        }
        w.flush()?;
        w.get_ref().set_len(memory_len)
    })?;
    let payload = serde_json::to_vec(state).map_err(Error::Encode)?;
    let header = Header {
        format: FORMAT,
        kiln_version: env!("CARGO_PKG_VERSION").to_string(),
        host_cpu: host_cpu_digest(supported),
        payload_len: payload.len() as u64,
        payload_sha256: hex(&Sha256::digest(&payload)),
        memory_len,
    };
    let header = serde_json::to_vec(&header).map_err(Error::Encode)?;
    let header_len = u32::try_from(header.len()).map_err(|_| {
        Error::Encode(serde::ser::Error::custom(
            "the snapshot header is over 4 GiB",
        ))
    })?;
    write_atomically(&paths.state, |w| {
        w.write_all(MAGIC)?;
        w.write_all(&header_len.to_le_bytes())?;
        w.write_all(&header)?;
        w.write_all(&payload)
    })
}

/// Reads and checks a snapshot: the state, and its memory mapped
/// copy-on-write. Refuses, naming what differs, a snapshot of another
/// format, kiln version or host CPU, a damaged state file, and a memory file
/// of the wrong size.
pub fn read(paths: &Paths, supported: &CpuId) -> Result<(MachineState, GuestMemoryMmap), Error> {
    let path = &paths.state;
    let damaged = |why: &str| Error::Damaged {
        path: path.clone(),
        why: why.to_string(),
    };
    let mut f = File::open(path).map_err(io_err("open", path))?;
    let mut magic = [0u8; 12];
    f.read_exact(&mut magic)
        .map_err(|_| Error::NotSnapshot(path.clone()))?;
    if &magic[..8] != MAGIC {
        return Err(Error::NotSnapshot(path.clone()));
    }
    let header_len = u32::from_le_bytes([magic[8], magic[9], magic[10], magic[11]]);
    if header_len > MAX_HEADER {
        return Err(damaged("its header is too long"));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header)
        .map_err(|_| damaged("it ends in its header"))?;
    let header: Header =
        serde_json::from_slice(&header).map_err(|e| damaged(&format!("its header: {e}")))?;
    if header.format != FORMAT {
        return Err(Error::Format {
            path: path.clone(),
            found: header.format,
        });
    }
    if header.kiln_version != env!("CARGO_PKG_VERSION") {
        return Err(Error::Version {
            path: path.clone(),
            found: header.kiln_version,
        });
    }
    let here = host_cpu_digest(supported);
    if header.host_cpu != here {
        return Err(Error::HostCpu {
            path: path.clone(),
            found: header.host_cpu,
            here,
        });
    }
    if header.payload_len > MAX_PAYLOAD {
        return Err(damaged("its state is too large"));
    }
    let mut payload = Vec::new();
    (&mut f)
        .take(header.payload_len + 1)
        .read_to_end(&mut payload)
        .map_err(io_err("read", path))?;
    if payload.len() as u64 != header.payload_len {
        return Err(damaged(&format!(
            "its state is {} bytes, its header says {}",
            payload.len(),
            header.payload_len
        )));
    }
    if hex(&Sha256::digest(&payload)) != header.payload_sha256 {
        return Err(damaged("its state does not match its checksum"));
    }
    let state: MachineState =
        serde_json::from_slice(&payload).map_err(|e| damaged(&format!("its state: {e}")))?;
    let memory = File::open(&paths.memory).map_err(io_err("open", &paths.memory))?;
    let found = memory
        .metadata()
        .map_err(io_err("read", &paths.memory))?
        .len();
    let expected = (state.mem_size_mib as u64) << 20;
    if found != header.memory_len || found != expected {
        return Err(Error::MemorySize {
            path: paths.memory.clone(),
            found,
            expected: header.memory_len,
        });
    }
    let mem = crate::memory::from_file(&memory, state.mem_size_mib)
        .map_err(|e| Error::Map(paths.memory.clone(), e))?;
    Ok((state, mem))
}

#[cfg(test)]
mod tests;
