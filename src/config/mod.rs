//! The VM configuration: Firecracker's JSON schema.
//!
//! A kiln config file is a Firecracker `--config-file`: the same top-level
//! sections (`boot-source`, `machine-config`, `drives`, ...) with the same
//! field names, so existing files load unchanged. Parsing is strict (unknown
//! fields are errors) and [`VmConfig::validate`] refuses what kiln cannot do
//! yet instead of silently ignoring it.

mod files;
mod fs;
mod net;
#[cfg(test)]
mod schema_tests;
mod sections;
#[cfg(test)]
mod tests;

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

pub use files::MAX_CONFIG_BYTES;
pub use fs::{FsConfig, MAX_FS_TAG};
pub use net::{parse_mac, MAX_HOST_DEV_NAME, PASST_MAX_MTU};

use crate::hostfile::{self, Kind, Quoted};
pub use sections::*;

/// Smallest guest memory kiln accepts, in MiB: below this a Linux guest
/// cannot even unpack its kernel.
pub const MIN_MEM_SIZE_MIB: usize = 16;

/// Guest physical address width kiln builds page tables and memory maps for.
pub const GUEST_PHYS_ADDR_BITS: u32 = 46;

/// Largest guest memory the guest physical address space can hold, in bytes.
pub const GUEST_PHYS_ADDR_LIMIT: u64 = 1 << GUEST_PHYS_ADDR_BITS;

const MIB: u64 = 1 << 20;

/// Everything that can be wrong with a config.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config file could not be read.
    #[error("cannot read config file {}", Quoted(path))]
    ReadFile {
        /// The config file.
        path: PathBuf,
        /// Why it could not be read (or is not a regular file).
        #[source]
        source: hostfile::Error,
    },
    /// The config file is longer than [`MAX_CONFIG_BYTES`].
    #[error("config file {} is larger than 1 MiB", Quoted(path))]
    ConfigTooLarge {
        /// The config file.
        path: PathBuf,
    },
    /// The top level, a section or a list entry is valid JSON but not an
    /// object.
    #[error("{origin}: {what} must be a JSON object, not {found}")]
    NotAnObject {
        /// `config file "vm.json"`, or `config` for text.
        origin: String,
        /// `the top level`, `section "boot-source"`, `drives[1]`.
        what: String,
        /// What it is instead: `an array`, `a string`, ...
        found: &'static str,
    },
    /// The config file is not valid JSON for the schema (syntax, unknown
    /// field, wrong type, missing field); serde's message, the source, says
    /// which field and where.
    #[error("invalid config file {}", Quoted(path))]
    ParseFile {
        /// The config file.
        path: PathBuf,
        /// What serde_json found.
        #[source]
        source: serde_json::Error,
    },
    /// Same as [`Error::ParseFile`] for JSON given as text.
    #[error("invalid config")]
    Parse(#[source] serde_json::Error),
    /// The config asks for something kiln does not implement yet; the
    /// message is `not supported yet: <section or field>`.
    #[error("not supported yet: {0}")]
    NotSupported(String),
    /// `machine-config.vcpu_count` out of range.
    #[error("machine-config.vcpu_count must be between 1 and {MAX_VCPUS}, got {0}")]
    VcpuCount(u8),
    /// Odd vCPU count with SMT.
    #[error(
        "machine-config.vcpu_count must be 1 or even when machine-config.smt is true, got {0}"
    )]
    VcpuCountSmt(u8),
    /// `machine-config.mem_size_mib` too small.
    #[error("machine-config.mem_size_mib must be at least {MIN_MEM_SIZE_MIB} MiB, got {0}")]
    MemTooSmall(usize),
    /// `machine-config.mem_size_mib` more than the host can provide.
    #[error(
        "machine-config.mem_size_mib is {requested_mib} MiB, more than the host can map: \
         host RAM + swap is {host_mib} MiB and the {GUEST_PHYS_ADDR_BITS}-bit guest physical \
         address space holds {guest_limit_mib} MiB"
    )]
    MemTooLarge {
        /// What the config asked for.
        requested_mib: usize,
        /// Host RAM plus swap, in MiB.
        host_mib: u64,
        /// Guest physical address space, in MiB.
        guest_limit_mib: u64,
    },
    /// A file named by the config cannot be opened as needed.
    #[error("{field}: cannot open {} for {access}", Quoted(path))]
    File {
        /// The field naming the file, e.g. `drives[0].path_on_host (drive_id "rootfs")`.
        field: String,
        /// The path as written in the config.
        path: PathBuf,
        /// `reading` or `reading and writing`.
        access: &'static str,
        /// The OS error, the wrong kind of file, or a lock held elsewhere.
        #[source]
        source: hostfile::Error,
    },
    /// One file as two drives, at least one of them read-write: the guest
    /// would see two disks whose writes corrupt each other.
    #[error(
        "drives[{second}] (drive_id {second_id:?}) is the same file as drives[{first}] \
         (drive_id {first_id:?}): a file can be a drive only once when it is read-write"
    )]
    SameDriveFile {
        /// Index of the first drive.
        first: usize,
        /// Its id.
        first_id: String,
        /// Index of the second.
        second: usize,
        /// Its id.
        second_id: String,
    },
    /// A drive without `path_on_host` (Firecracker allows that only for
    /// vhost-user drives).
    #[error("drives[{index}].path_on_host (drive_id {drive_id:?}) is missing or empty")]
    MissingDrivePath {
        /// Index in `drives`.
        index: usize,
        /// The drive's id.
        drive_id: String,
    },
    /// A drive with an empty `drive_id`.
    #[error("drives[{index}].drive_id must not be empty")]
    EmptyDriveId {
        /// Index in `drives`.
        index: usize,
    },
    /// Two drives with the same `drive_id`.
    #[error("drives[{second}].drive_id {drive_id:?} is already used by drives[{first}]")]
    DuplicateDriveId {
        /// The repeated id.
        drive_id: String,
        /// Index of its first use.
        first: usize,
        /// Index of the repeat.
        second: usize,
    },
    /// More than one drive with `is_root_device: true`.
    #[error(
        "only one drive may have is_root_device=true, but drives {first:?} and {second:?} both do"
    )]
    MultipleRootDevices {
        /// The first root drive's id.
        first: String,
        /// The second root drive's id.
        second: String,
    },
    /// `vsock.guest_cid` is a reserved address.
    #[error(
        "vsock.guest_cid must be between 3 and {max} (0-2 and {reserved} are reserved), got {cid}",
        max = u32::MAX - 1,
        reserved = u32::MAX
    )]
    VsockCid {
        /// The value given.
        cid: u32,
    },
    /// `vsock.uds_path` cannot be a socket path.
    #[error(
        "vsock.uds_path {path:?} must be non-empty and at most {max} bytes, so that \
         `<uds_path>_<port>` fits a UNIX socket address"
    )]
    VsockPath {
        /// The path given.
        path: PathBuf,
        /// The longest path kiln accepts.
        max: usize,
    },
    /// An `fs` tag that is empty or longer than 36 bytes.
    #[error("fs[{index}].tag {tag:?} must be 1 to {MAX_FS_TAG} bytes")]
    FsTag {
        /// Index in `fs`.
        index: usize,
        /// The tag given.
        tag: String,
    },
    /// Two `fs` entries with the same tag.
    #[error("fs[{second}].tag {tag:?} is already used by fs[{first}]")]
    DuplicateFsTag {
        /// The repeated tag.
        tag: String,
        /// Index of its first use.
        first: usize,
        /// Index of the repeat.
        second: usize,
    },
    /// An `fs` folder that cannot be looked at.
    #[error("{field}: cannot use {}", Quoted(path))]
    FsPath {
        /// `fs[N].path_on_host (tag ...)`.
        field: String,
        /// The path as written.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An `fs` folder that is not a directory.
    #[error("{field}: {} is not a directory", Quoted(path))]
    FsNotADirectory {
        /// `fs[N].path_on_host (tag ...)`.
        field: String,
        /// The path as written.
        path: PathBuf,
    },
    /// A `network-interfaces` entry kiln cannot use.
    #[error("{field}: {reason}")]
    NetInterface {
        /// `network-interfaces[N].<field> (iface_id ...)`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A NUL byte in the kernel command line (it would truncate it).
    #[error("boot-source.boot_args must not contain a NUL byte, found one at byte {offset}")]
    BootArgsNul {
        /// Byte offset of the first NUL.
        offset: usize,
    },
}

/// A whole microVM configuration: the top level of a Firecracker config file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// `boot-source` (required).
    #[serde(rename = "boot-source")]
    pub boot_source: BootSource,
    /// `machine-config`; Firecracker's defaults (1 vCPU, 128 MiB) when absent.
    #[serde(
        rename = "machine-config",
        default,
        deserialize_with = "null_as_default"
    )]
    pub machine_config: MachineConfig,
    /// `drives`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub drives: Vec<BlockDeviceConfig>,
    /// `network-interfaces`: virtio-net devices on host taps.
    #[serde(
        rename = "network-interfaces",
        default,
        deserialize_with = "null_as_default"
    )]
    pub network_interfaces: Vec<NetworkInterfaceConfig>,
    /// `vsock` (not supported yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// `entropy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<EntropyConfig>,
    /// `balloon` (not supported yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonConfig>,
    /// `logger`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<LoggerConfig>,
    /// `metrics` (not supported yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
    /// `cpu-config`, Firecracker's custom CPU template, kept as raw JSON
    /// (not supported yet).
    #[serde(
        rename = "cpu-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cpu_config: Option<serde_json::Value>,
    /// `mmds-config` (not supported yet).
    #[serde(
        rename = "mmds-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub mmds_config: Option<MmdsConfig>,
    /// `pmem` (must be empty for now).
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub pmem: Vec<PmemConfig>,
    /// `memory-hotplug` (not supported yet).
    #[serde(
        rename = "memory-hotplug",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub memory_hotplug: Option<MemoryHotplugConfig>,
    /// `fs`: host folders over virtio-fs (a kiln extension).
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub fs: Vec<FsConfig>,
}

/// Lets a section or field that has a default also be written as `null`
/// (Firecracker writes `null` for absent optional values).
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

impl VmConfig {
    /// Reads, parses and validates the file.
    pub fn from_file(path: &Path) -> Result<VmConfig, Error> {
        let config = VmConfig::parse_file(path)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses the file without validating it, so that the
    /// `logger` section can be set up before [`VmConfig::validate`] logs.
    pub fn parse_file(path: &Path) -> Result<VmConfig, Error> {
        let text = files::read_config(path)?;
        files::check_shape(&text, || format!("config file {}", Quoted(path)))?;
        serde_json::from_str(&text).map_err(|source| Error::ParseFile {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Parses and validates JSON text (no file reads except the
    /// existence/readability checks in validate).
    ///
    /// ```
    /// use kiln::config::VmConfig;
    /// let err = VmConfig::from_json(
    ///     r#"{"boot-source": {"kernel_image_path": "/dev/null"},
    ///         "machine-config": {"vcpu_count": 33, "mem_size_mib": 128}}"#,
    /// )
    /// .unwrap_err();
    /// assert!(err.to_string().contains("vcpu_count"), "{err}");
    /// ```
    pub fn from_json(text: &str) -> Result<VmConfig, Error> {
        files::check_shape(text, || "config".to_string())?;
        let config: VmConfig = serde_json::from_str(text).map_err(Error::Parse)?;
        config.validate()?;
        Ok(config)
    }

    /// All semantic checks; called by from_json.
    ///
    /// Cheap structural checks come first, then refusal of unsupported
    /// features, then the checks that touch the host (memory, files).
    pub fn validate(&self) -> Result<(), Error> {
        self.machine_config.check_vcpus()?;
        self.boot_source.check_boot_args()?;
        check_drive_ids(&self.drives)?;
        net::check(&self.network_interfaces)?;
        self.check_supported()?;
        check_mem_size_on_host(self.machine_config.mem_size_mib)?;
        self.boot_source.check_files()?;
        files::check_drives(&self.drives)?;
        if let Some(vsock) = &self.vsock {
            vsock.check()?;
        }
        fs::check(&self.fs)?;
        Ok(())
    }

    /// Refuses every section and value kiln parses but cannot honour yet.
    fn check_supported(&self) -> Result<(), Error> {
        let unsupported = |what: &str| Err(Error::NotSupported(what.to_string()));
        let machine = &self.machine_config;
        if machine.huge_pages != HugePages::None {
            return unsupported(&format!(
                "machine-config.huge_pages={}",
                machine.huge_pages.as_str()
            ));
        }
        // KVM would log dirty pages, but without diff snapshots nothing reads
        // the log: the cost without the use.
        if machine.track_dirty_pages {
            return unsupported("machine-config.track_dirty_pages=true");
        }
        if machine.gdb_socket_path.is_some() {
            return unsupported("machine-config.gdb_socket_path");
        }
        if let Some(template) = &machine.cpu_template {
            if template != "None" {
                log::warn!("machine-config.cpu_template={template:?} is ignored by kiln");
            }
        }
        for (index, drive) in self.drives.iter().enumerate() {
            if drive.socket.is_some() {
                return unsupported(&format!("drives[{index}].socket"));
            }
            // kiln's block device does blocking I/O only (no io_uring).
            if drive.io_engine == Some(IoEngine::Async) {
                return unsupported(&format!("drives[{index}].io_engine=Async"));
            }
            // As in Firecracker, partuuid only says where the root
            // filesystem is; say so rather than drop it without a word.
            if let (Some(uuid), false) = (&drive.partuuid, drive.is_root_device) {
                log::warn!(
                    "drives[{index}].partuuid={uuid:?} is ignored: drive {:?} is not the root device",
                    drive.drive_id
                );
            }
        }
        if self.balloon.is_some() {
            return unsupported("balloon");
        }
        if self.metrics.is_some() {
            return unsupported("metrics");
        }
        if self.cpu_config.is_some() {
            return unsupported("cpu-config");
        }
        if self.mmds_config.is_some() {
            return unsupported("mmds-config");
        }
        if !self.pmem.is_empty() {
            return unsupported("pmem");
        }
        if self.memory_hotplug.is_some() {
            return unsupported("memory-hotplug");
        }
        Ok(())
    }
}

impl MachineConfig {
    fn check_vcpus(&self) -> Result<(), Error> {
        let count = self.vcpu_count;
        if count == 0 || count > MAX_VCPUS {
            return Err(Error::VcpuCount(count));
        }
        if self.smt && count > 1 && !count.is_multiple_of(2) {
            return Err(Error::VcpuCountSmt(count));
        }
        Ok(())
    }
}

impl BootSource {
    fn check_boot_args(&self) -> Result<(), Error> {
        match self.boot_args.as_deref().and_then(|args| args.find('\0')) {
            Some(offset) => Err(Error::BootArgsNul { offset }),
            None => Ok(()),
        }
    }

    fn check_files(&self) -> Result<(), Error> {
        files::check_file(
            || "boot-source.kernel_image_path".to_string(),
            &self.kernel_image_path,
            false,
            Kind::Regular,
        )?;
        if let Some(initrd) = &self.initrd_path {
            files::check_file(
                || "boot-source.initrd_path".to_string(),
                initrd,
                false,
                Kind::Regular,
            )?;
        }
        Ok(())
    }
}

/// The longest `vsock.uds_path`: `<uds_path>_<port>` (up to 11 bytes more)
/// must fit the 107 bytes of a UNIX socket address.
pub const MAX_VSOCK_PATH: usize = 107 - "_4294967295".len();

impl VsockConfig {
    fn check(&self) -> Result<(), Error> {
        // §5.10.4: 0, 1 and 2 are the hypervisor, local and host; u32::MAX
        // is VMADDR_CID_ANY.
        if self.guest_cid < 3 || self.guest_cid == u32::MAX {
            return Err(Error::VsockCid {
                cid: self.guest_cid,
            });
        }
        let len = self.uds_path.as_os_str().len();
        if len == 0 || len > MAX_VSOCK_PATH {
            return Err(Error::VsockPath {
                path: self.uds_path.clone(),
                max: MAX_VSOCK_PATH,
            });
        }
        if self.vsock_id.is_some() {
            log::warn!("vsock.vsock_id is ignored (Firecracker deprecated it)");
        }
        Ok(())
    }
}

/// Checks drive ids are non-empty and unique, and that at most one drive is
/// the root device.
fn check_drive_ids(drives: &[BlockDeviceConfig]) -> Result<(), Error> {
    let mut root: Option<&str> = None;
    for (index, drive) in drives.iter().enumerate() {
        if drive.drive_id.is_empty() {
            return Err(Error::EmptyDriveId { index });
        }
        if let Some(first) = drives
            .iter()
            .take(index)
            .position(|other| other.drive_id == drive.drive_id)
        {
            return Err(Error::DuplicateDriveId {
                drive_id: drive.drive_id.clone(),
                first,
                second: index,
            });
        }
        if drive.is_root_device {
            if let Some(first) = root {
                return Err(Error::MultipleRootDevices {
                    first: first.to_string(),
                    second: drive.drive_id.clone(),
                });
            }
            root = Some(&drive.drive_id);
        }
    }
    Ok(())
}

/// Checks `mem_size_mib` against the minimum, the guest physical address
/// space and `host_limit_bytes` (the host's RAM plus swap). Pure, so it can
/// be tested with any host size.
pub fn check_mem_size(mem_size_mib: usize, host_limit_bytes: u64) -> Result<(), Error> {
    if mem_size_mib < MIN_MEM_SIZE_MIB {
        return Err(Error::MemTooSmall(mem_size_mib));
    }
    let requested = u64::try_from(mem_size_mib)
        .ok()
        .and_then(|mib| mib.checked_mul(MIB));
    match requested {
        Some(bytes) if bytes <= host_limit_bytes && bytes <= GUEST_PHYS_ADDR_LIMIT => Ok(()),
        _ => Err(Error::MemTooLarge {
            requested_mib: mem_size_mib,
            host_mib: host_limit_bytes / MIB,
            guest_limit_mib: GUEST_PHYS_ADDR_LIMIT / MIB,
        }),
    }
}

/// [`check_mem_size`] against this host's RAM plus swap. When the host size
/// cannot be read, only the address-space limit is enforced.
pub fn check_mem_size_on_host(mem_size_mib: usize) -> Result<(), Error> {
    let host_limit = host_memory_bytes().unwrap_or_else(|err| {
        log::warn!(
            "cannot read host memory size (sysinfo: {err}); not checking mem_size_mib against it"
        );
        u64::MAX
    });
    check_mem_size(mem_size_mib, host_limit)
}

/// The host's total RAM plus total swap, in bytes, from `sysinfo(2)`.
// c_ulong and c_uint are narrower than u64 on some targets, so the
// conversions are not useless everywhere.
#[allow(clippy::useless_conversion)]
pub fn host_memory_bytes() -> io::Result<u64> {
    // SAFETY: sysinfo is plain old data; all-zero bytes is a valid value.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable sysinfo struct that outlives the call.
    let ret = unsafe { libc::sysinfo(&mut info) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    let unit = u64::from(info.mem_unit).max(1);
    let ram = u64::from(info.totalram);
    let swap = u64::from(info.totalswap);
    Ok(ram.saturating_add(swap).saturating_mul(unit))
}
