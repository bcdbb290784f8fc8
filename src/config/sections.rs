//! The sections of a Firecracker-style config file, one struct per section.
//!
//! Field names, types and defaults follow Firecracker's `VmmConfig`
//! (`src/vmm/src/resources.rs` and the section structs in
//! `src/vmm/src/vmm_config/`) so that existing `--config-file` JSON
//! deserializes unchanged; where Firecracker takes `null` for a field, kiln
//! does too. Every struct denies unknown fields: a typo must be an error,
//! not silently ignored. Semantic checks live in
//! [`super::VmConfig::validate`].

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};

/// Highest vCPU count a microVM may have (same limit as Firecracker).
pub const MAX_VCPUS: u8 = 32;

/// Default number of vCPUs when `machine-config` is absent (Firecracker's).
pub const DEFAULT_VCPU_COUNT: u8 = 1;

/// Default memory size when `machine-config` is absent (Firecracker's).
pub const DEFAULT_MEM_SIZE_MIB: usize = 128;

/// A rate limiter as Firecracker describes it (`bandwidth` / `ops` token
/// buckets). kiln accepts any JSON object here and leaves its interpretation
/// to the device that implements rate limiting.
pub type RateLimiterConfig = serde_json::Map<String, serde_json::Value>;

/// `boot-source`: what to boot.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Host path of the guest kernel (ELF vmlinux or bzImage).
    pub kernel_image_path: PathBuf,
    /// Host path of an initrd, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// `machine-config.huge_pages`: how guest memory is backed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum HugePages {
    /// Regular 4 KiB pages.
    #[default]
    None,
    /// Transparent huge pages via `madvise(MADV_HUGEPAGE)` (newer Firecracker).
    Transparent,
    /// Explicit 2 MiB hugetlbfs pages.
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

impl HugePages {
    /// The value as written in the config file.
    pub fn as_str(&self) -> &'static str {
        match self {
            HugePages::None => "None",
            HugePages::Transparent => "Transparent",
            HugePages::Hugetlbfs2M => "2M",
        }
    }
}

/// `machine-config`: vCPUs and memory.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs, 1..=[`MAX_VCPUS`]; 1 or even when `smt` is set.
    #[serde(deserialize_with = "de_vcpu_count")]
    pub vcpu_count: u8,
    /// Guest memory size in MiB.
    #[serde(deserialize_with = "de_mem_size_mib")]
    pub mem_size_mib: usize,
    /// Simultaneous multithreading (two threads per core) in the guest.
    #[serde(default)]
    pub smt: bool,
    /// Track dirty pages (for diff snapshots in Firecracker). kiln takes no
    /// snapshots, so nothing would read the log: only `false` is accepted.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Page size backing guest memory.
    #[serde(default)]
    pub huge_pages: HugePages,
    /// Firecracker's static CPU template (deprecated there). Accepted so that
    /// existing configs load, but ignored by kiln (a warning is logged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// Unix socket for a GDB server (Firecracker built with its `gdb`
    /// feature); not supported by kiln yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gdb_socket_path: Option<PathBuf>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpu_count: DEFAULT_VCPU_COUNT,
            mem_size_mib: DEFAULT_MEM_SIZE_MIB,
            smt: false,
            track_dirty_pages: false,
            huge_pages: HugePages::None,
            cpu_template: None,
            gdb_socket_path: None,
        }
    }
}

/// Reads a JSON value for `field` and converts it to `T`, so that an out of
/// range or mistyped value (negative, fractional, too big, a string) yields a
/// message naming the field and the value, not serde's bare "expected u8".
fn de_number<'de, D, T>(deserializer: D, field: &str, expected: &str) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    let value = serde_json::Value::deserialize(deserializer)?;
    value
        .as_u64()
        .and_then(|v| T::try_from(v).ok())
        .ok_or_else(|| de::Error::custom(format!("{field} must be {expected}, got {value}")))
}

fn de_vcpu_count<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u8, D::Error> {
    de_number(
        deserializer,
        "machine-config.vcpu_count",
        &format!("between 1 and {MAX_VCPUS}"),
    )
}

fn de_mem_size_mib<'de, D: Deserializer<'de>>(deserializer: D) -> Result<usize, D::Error> {
    de_number(
        deserializer,
        "machine-config.mem_size_mib",
        "a whole number of MiB",
    )
}

fn de_guest_cid<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    de_number(
        deserializer,
        "vsock.guest_cid",
        &format!("between 3 and {}", u32::MAX - 1),
    )
}

/// `drives[].cache_type`: whether guest flushes reach the host disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum CacheType {
    /// Flush requests are acknowledged without syncing (Firecracker's default).
    #[default]
    Unsafe,
    /// Flush requests are honoured with fsync/fdatasync.
    Writeback,
}

/// `drives[].io_engine`: how the host performs block I/O.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum IoEngine {
    /// Blocking system calls (Firecracker's default).
    #[default]
    Sync,
    /// io_uring.
    Async,
}

/// One entry of `drives`: a virtio-block device.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BlockDeviceConfig {
    /// Unique, non-empty name of the drive.
    pub drive_id: String,
    /// Host file or block device backing the drive. Firecracker omits it for
    /// vhost-user drives (`socket`, and writes `null` there), hence the
    /// default; validation requires it for every drive kiln supports.
    #[serde(default, deserialize_with = "super::null_as_default")]
    pub path_on_host: PathBuf,
    /// Whether this drive holds the root filesystem (at most one may).
    pub is_root_device: bool,
    /// Open the backing file read-only and advertise the disk as read-only;
    /// absent or `null` means read-write.
    #[serde(default, deserialize_with = "super::null_as_default")]
    pub is_read_only: bool,
    /// Partition UUID of the root partition: the kernel gets
    /// `root=PARTUUID=...` instead of `root=/dev/vdX`. Only meaningful with
    /// `is_root_device`; on another drive it is ignored with a warning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// Flush behaviour.
    #[serde(default)]
    pub cache_type: CacheType,
    /// Host I/O engine; `None` means the default (`Sync`), the only one
    /// kiln has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<IoEngine>,
    /// Rate limiter, accepted as any JSON object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
    /// vhost-user-block backend socket (not supported by kiln yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
}

/// One entry of `network-interfaces`: a virtio-net device on an existing
/// host tap, or (kiln's own) on a passt process kiln starts for the VM (see
/// [`super::net`]).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceConfig {
    /// Unique name of the interface.
    pub iface_id: String,
    /// Host TAP device name; required unless `passt` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_dev_name: Option<String>,
    /// Guest MAC address, e.g. `"06:00:AC:10:00:02"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// MTU advertised to the guest (newer Firecracker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// Receive rate limiter, accepted as any JSON object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Transmit rate limiter, accepted as any JSON object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
    /// kiln: instead of a tap, a passt process kiln starts for this VM
    /// (user-mode networking: outbound TCP, UDP and DNS through the host's
    /// own sockets, no root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passt: Option<PasstConfig>,
}

/// `network-interfaces[].passt`: the guest's side of passt's network. Every
/// field has a default, as QEMU's user networking has them: the guest is
/// 10.0.2.15/24, the host (its loopback, through passt) is the gateway
/// 10.0.2.2, and 10.0.2.3 forwards DNS to the host's resolver.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PasstConfig {
    /// The guest's IPv4 address (passt hands it out by DHCP too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Ipv4Addr>,
    /// Its prefix length, 8 to 30.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_len: Option<u8>,
    /// The gateway; connections to it reach the host's loopback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    /// The DNS server the guest is given; queries to it go to the host's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Ipv4Addr>,
}

impl PasstConfig {
    pub const DEFAULT_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
    pub const DEFAULT_PREFIX_LEN: u8 = 24;
    pub const DEFAULT_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
    pub const DEFAULT_DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);

    pub fn address(&self) -> Ipv4Addr {
        self.address.unwrap_or(Self::DEFAULT_ADDRESS)
    }
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len.unwrap_or(Self::DEFAULT_PREFIX_LEN)
    }
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway.unwrap_or(Self::DEFAULT_GATEWAY)
    }
    pub fn dns(&self) -> Ipv4Addr {
        self.dns.unwrap_or(Self::DEFAULT_DNS)
    }
}

/// `vsock`: a virtio-vsock device backed by Unix sockets (not supported yet).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// Guest context ID (3 or more).
    #[serde(deserialize_with = "de_guest_cid")]
    pub guest_cid: u32,
    /// Host Unix socket path.
    pub uds_path: PathBuf,
    /// Deprecated in Firecracker; accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

/// `entropy`: a virtio-rng device.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyConfig {
    /// Rate limiter, accepted as any JSON object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// `balloon`: a virtio-balloon device (not supported yet).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// Target balloon size in MiB.
    pub amount_mib: u32,
    /// Deflate the balloon when the guest runs out of memory.
    pub deflate_on_oom: bool,
    /// Statistics polling interval in seconds; 0 or absent disables them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats_polling_interval_s: Option<u16>,
    /// Free page hinting (newer Firecracker).
    #[serde(default)]
    pub free_page_hinting: bool,
    /// Free page reporting (newer Firecracker).
    #[serde(default)]
    pub free_page_reporting: bool,
}

/// `logger.level`. Parsed case-insensitively, as Firecracker does, which
/// also takes `Warn` for `Warning`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Errors and warnings.
    Warning,
    /// Up to informational messages.
    Info,
    /// Up to debug messages.
    Debug,
    /// Everything.
    Trace,
    /// Nothing.
    Off,
}

impl LogLevel {
    const NAMES: &'static [&'static str] = &["Error", "Warning", "Info", "Debug", "Trace", "Off"];

    /// The `log` crate filter for this level.
    pub fn to_level_filter(&self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warning => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
            LogLevel::Off => log::LevelFilter::Off,
        }
    }

    /// Parses a level name, ignoring ASCII case.
    pub fn from_name(name: &str) -> Option<LogLevel> {
        let level = match name.to_ascii_lowercase().as_str() {
            "error" => LogLevel::Error,
            "warning" | "warn" => LogLevel::Warning,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            "off" => LogLevel::Off,
            _ => return None,
        };
        Some(level)
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        LogLevel::from_name(&name).ok_or_else(|| de::Error::unknown_variant(&name, Self::NAMES))
    }
}

/// `logger`: where kiln's own log goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoggerConfig {
    /// File or named pipe for the log; absent means stderr.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<PathBuf>,
    /// Maximum level to log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    /// Prefix each line with its level (absent means yes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Prefix each line with its source file and line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only log messages from this module path and the modules inside it,
    /// e.g. `kiln::devices`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `metrics`: where to flush JSON metrics (not supported yet).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// File or named pipe for the metrics.
    pub metrics_path: PathBuf,
    /// Put the microVM's instance id on every metrics line.
    #[serde(default)]
    pub emit_id: bool,
    /// Key-value pairs put on every metrics line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<BTreeMap<String, String>>,
}

/// `mmds-config.version`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum MmdsVersion {
    /// MMDS version 1 (Firecracker's default).
    #[default]
    V1,
    /// MMDS version 2 (session tokens).
    V2,
}

/// `mmds-config`: the microVM metadata service (not supported yet).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MmdsConfig {
    /// Interfaces (by `iface_id`) that may reach the MMDS.
    pub network_interfaces: Vec<String>,
    /// MMDS version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<MmdsVersion>,
    /// Link-local address of the MMDS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_address: Option<Ipv4Addr>,
    /// Answer in EC2 IMDS style.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imds_compat: Option<bool>,
}

/// One entry of `pmem`: a virtio-pmem device (not supported yet).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PmemConfig {
    /// Unique name of the device.
    pub id: String,
    /// Host file mapped into the guest.
    pub path_on_host: PathBuf,
    /// Whether the guest's root filesystem is on this device.
    #[serde(default)]
    pub root_device: bool,
    /// Map the file read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Rate limiter for flushes, accepted as any JSON object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// `memory-hotplug`: a virtio-mem device (not supported yet).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryHotplugConfig {
    /// Memory the guest can have plugged, in MiB.
    pub total_size_mib: u32,
    /// Smallest unit the guest plugs and unplugs, in MiB (Firecracker's
    /// default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size_mib: Option<u32>,
    /// Smallest unit the host attaches, in MiB (Firecracker's default when
    /// absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_size_mib: Option<u32>,
}
