//! Config tests: parsing, defaults and every config error. The helpers here
//! (temp files, JSON builders) are shared with `schema_tests`.

use std::error::Error as _;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{json, Value};

use super::*;

/// A file under the temp dir with a unique name, removed on drop.
pub(super) struct TempFile {
    path: PathBuf,
}

impl TempFile {
    pub(super) fn new(contents: &str) -> TempFile {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("kiln-config-test-{}-{n}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        TempFile { path }
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Files a valid config points at: a kernel, an initrd and a rootfs.
pub(super) struct Files {
    pub(super) kernel: TempFile,
    pub(super) initrd: TempFile,
    pub(super) rootfs: TempFile,
}

impl Files {
    pub(super) fn new() -> Files {
        Files {
            kernel: TempFile::new("kernel"),
            initrd: TempFile::new("initrd"),
            rootfs: TempFile::new("rootfs"),
        }
    }

    /// boot-source + machine-config only.
    pub(super) fn minimal(&self) -> Value {
        json!({
            "boot-source": { "kernel_image_path": self.kernel.path() },
            "machine-config": { "vcpu_count": 2, "mem_size_mib": 128 }
        })
    }

    /// Everything kiln supports today.
    pub(super) fn supported(&self) -> Value {
        json!({
            "boot-source": {
                "kernel_image_path": self.kernel.path(),
                "initrd_path": self.initrd.path(),
                "boot_args": "console=ttyS0 reboot=k panic=1 pci=off"
            },
            "machine-config": {
                "vcpu_count": 2,
                "mem_size_mib": 256,
                "smt": false,
                "track_dirty_pages": false,
                "huge_pages": "None"
            },
            "drives": [{
                "drive_id": "rootfs",
                "path_on_host": self.rootfs.path(),
                "is_root_device": true,
                "is_read_only": false
            }],
            "network-interfaces": [],
            "entropy": { "rate_limiter": null },
            "logger": { "level": "debug", "show_level": true }
        })
    }
}

pub(super) fn from_value(value: &Value) -> Result<VmConfig, Error> {
    VmConfig::from_json(&value.to_string())
}

/// The whole error chain (message and causes) of the config's error.
pub(super) fn err_of(value: &Value) -> String {
    match from_value(value) {
        Ok(config) => panic!("expected an error, got {config:?}"),
        Err(err) => crate::error_chain(&err),
    }
}

/// Sets `value[section][field] = new` (or `value[section] = new` when
/// `field` is empty).
pub(super) fn set(mut value: Value, section: &str, field: &str, new: Value) -> Value {
    if field.is_empty() {
        value[section] = new;
    } else {
        value[section][field] = new;
    }
    value
}

#[test]
fn supported_config_validates() {
    let files = Files::new();
    let config = from_value(&files.supported()).unwrap();
    assert_eq!(config.drives[0].drive_id, "rootfs");
    assert_eq!(config.entropy, Some(EntropyConfig::default()));
    let level = config.logger.unwrap().level.unwrap();
    assert_eq!(level, LogLevel::Debug);
    assert_eq!(level.to_level_filter(), log::LevelFilter::Debug);
}

#[test]
fn minimal_config_from_file() {
    let files = Files::new();
    let file = TempFile::new(&files.minimal().to_string());
    let config = VmConfig::from_file(file.path()).unwrap();
    assert_eq!(config.machine_config.vcpu_count, 2);
    assert_eq!(config.machine_config.mem_size_mib, 128);
    assert!(!config.machine_config.smt);
    assert!(!config.machine_config.track_dirty_pages);
    assert_eq!(config.machine_config.huge_pages, HugePages::None);
    assert!(config.drives.is_empty());
    assert!(config.network_interfaces.is_empty());
    assert_eq!(config.entropy, None);
    assert_eq!(config.logger, None);
}

#[test]
fn machine_config_defaults_when_absent_or_null() {
    let files = Files::new();
    let mut value = files.minimal();
    value.as_object_mut().unwrap().remove("machine-config");
    assert_eq!(
        from_value(&value).unwrap().machine_config,
        MachineConfig::default()
    );
    let value = set(value, "machine-config", "", Value::Null);
    assert_eq!(
        from_value(&value).unwrap().machine_config,
        MachineConfig::default()
    );
}

#[test]
fn unreadable_config_file() {
    let path = std::env::temp_dir().join("kiln-config-test-does-not-exist.json");
    let err = VmConfig::from_file(&path).unwrap_err();
    assert_eq!(
        crate::error_chain(&err),
        format!(
            "cannot read config file {:?}: No such file or directory (os error 2)",
            path
        )
    );
    // The OS error is the source, not part of the message.
    assert!(!err.to_string().contains("No such file"), "{err}");
    assert!(err.source().is_some());
}

#[test]
fn parse_error_names_file_and_field() {
    let files = Files::new();
    let value = set(files.minimal(), "machine-config", "vcpus", json!(2));
    let file = TempFile::new(&serde_json::to_string_pretty(&value).unwrap());
    let err = VmConfig::from_file(file.path()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("invalid config file {:?}", file.path())
    );
    let msg = crate::error_chain(&err);
    let expected = format!(
        "invalid config file {:?}: unknown field `vcpus`",
        file.path()
    );
    assert!(msg.starts_with(&expected), "{msg}");
    assert!(msg.contains("line"), "{msg}");
}

#[test]
fn syntax_error() {
    let err = VmConfig::from_json("{\"boot-source\": ").unwrap_err();
    assert_eq!(err.to_string(), "invalid config");
    let msg = crate::error_chain(&err);
    assert!(msg.starts_with("invalid config: "), "{msg}");
    assert!(msg.contains("line 1"), "{msg}");
}

#[test]
fn missing_required_fields() {
    let files = Files::new();
    let mut value = files.minimal();
    value.as_object_mut().unwrap().remove("boot-source");
    assert!(err_of(&value).contains("missing field `boot-source`"));

    let value = set(
        files.minimal(),
        "machine-config",
        "",
        json!({ "vcpu_count": 1 }),
    );
    assert!(err_of(&value).contains("missing field `mem_size_mib`"));

    let value = set(files.minimal(), "drives", "", json!([{ "drive_id": "a" }]));
    assert!(err_of(&value).contains("missing field `is_root_device`"));
}

#[test]
fn vcpu_count_zero_and_too_many() {
    let files = Files::new();
    for count in [0, 33, 255] {
        let value = set(
            files.minimal(),
            "machine-config",
            "vcpu_count",
            json!(count),
        );
        assert_eq!(
            err_of(&value),
            format!("machine-config.vcpu_count must be between 1 and 32, got {count}")
        );
    }
    // Values that do not even fit a u8 still name the field and value.
    for count in [json!(300), json!(-1), json!(1.5)] {
        let value = set(
            files.minimal(),
            "machine-config",
            "vcpu_count",
            count.clone(),
        );
        let msg = err_of(&value);
        assert!(
            msg.contains(&format!(
                "machine-config.vcpu_count must be between 1 and 32, got {count}"
            )),
            "{msg}"
        );
    }
}

#[test]
fn smt_needs_one_or_even_vcpus() {
    let files = Files::new();
    let value = set(files.minimal(), "machine-config", "smt", json!(true));
    from_value(&value).unwrap();
    let value = set(value, "machine-config", "vcpu_count", json!(1));
    from_value(&value).unwrap();
    let value = set(value, "machine-config", "vcpu_count", json!(3));
    let msg = err_of(&value);
    assert!(msg.contains("machine-config.vcpu_count"), "{msg}");
    assert!(msg.contains("machine-config.smt"), "{msg}");
    assert!(msg.ends_with("got 3"), "{msg}");
}

#[test]
fn mem_size_too_small() {
    let files = Files::new();
    let value = set(files.minimal(), "machine-config", "mem_size_mib", json!(8));
    assert_eq!(
        err_of(&value),
        "machine-config.mem_size_mib must be at least 16 MiB, got 8"
    );
    let value = set(files.minimal(), "machine-config", "mem_size_mib", json!(-5));
    let msg = err_of(&value);
    assert!(msg.contains("machine-config.mem_size_mib"), "{msg}");
    assert!(msg.contains("-5"), "{msg}");
}

#[test]
fn mem_size_against_host_limit() {
    let gib = 1u64 << 30;
    check_mem_size(MIN_MEM_SIZE_MIB, gib).unwrap();
    assert!(matches!(
        check_mem_size(MIN_MEM_SIZE_MIB - 1, gib),
        Err(Error::MemTooSmall(15))
    ));
    check_mem_size(1024, gib).unwrap();
    let msg = check_mem_size(1025, gib).unwrap_err().to_string();
    assert!(
        msg.contains("machine-config.mem_size_mib is 1025 MiB"),
        "{msg}"
    );
    assert!(msg.contains("host RAM + swap is 1024 MiB"), "{msg}");
    assert!(
        msg.contains("46-bit guest physical address space holds 67108864 MiB"),
        "{msg}"
    );
}

#[test]
fn mem_size_against_address_space() {
    let limit_mib = usize::try_from(GUEST_PHYS_ADDR_LIMIT / MIB).unwrap();
    check_mem_size(limit_mib, u64::MAX).unwrap();
    let err = check_mem_size(limit_mib + 1, u64::MAX).unwrap_err();
    assert!(matches!(err, Error::MemTooLarge { .. }), "{err}");
    // mem_size_mib * 1 MiB overflows u64: an error, not a panic.
    let err = check_mem_size(usize::MAX, u64::MAX).unwrap_err();
    assert!(err.to_string().contains(&usize::MAX.to_string()), "{err}");
}

#[test]
fn mem_size_too_large_for_host() {
    let files = Files::new();
    // 2^45 MiB is beyond both limits on any host.
    let value = set(
        files.minimal(),
        "machine-config",
        "mem_size_mib",
        json!(1u64 << 45),
    );
    let msg = err_of(&value);
    assert!(
        msg.contains("machine-config.mem_size_mib is 35184372088832 MiB"),
        "{msg}"
    );
    assert!(host_memory_bytes().unwrap() > 0);
}

fn assert_file_error(msg: &str, field: &str, path: &Path, os_error: &str) {
    assert!(msg.starts_with(field), "{msg}");
    assert!(msg.contains(&format!("{path:?}")), "{msg}");
    assert!(msg.contains(os_error), "{msg}");
}

#[test]
fn missing_kernel() {
    let files = Files::new();
    let missing = std::env::temp_dir().join("kiln-config-test-no-kernel");
    let value = set(
        files.minimal(),
        "boot-source",
        "kernel_image_path",
        json!(missing),
    );
    let msg = err_of(&value);
    assert_file_error(
        &msg,
        "boot-source.kernel_image_path",
        &missing,
        "No such file or directory",
    );
    // The message names the field and the file; the OS error is its source.
    let err = from_value(&value).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "boot-source.kernel_image_path: cannot open {:?} for reading",
            missing
        )
    );
    assert_eq!(
        msg,
        format!("{err}: No such file or directory (os error 2)")
    );
}

#[test]
fn kernel_is_a_directory() {
    let files = Files::new();
    let dir = std::env::temp_dir();
    let value = set(
        files.minimal(),
        "boot-source",
        "kernel_image_path",
        json!(dir),
    );
    let msg = err_of(&value);
    assert_file_error(
        &msg,
        "boot-source.kernel_image_path",
        &dir,
        "it is a directory, not a regular file",
    );
}

#[test]
fn missing_initrd() {
    let files = Files::new();
    let missing = std::env::temp_dir().join("kiln-config-test-no-initrd");
    let value = set(
        files.minimal(),
        "boot-source",
        "initrd_path",
        json!(missing),
    );
    let msg = err_of(&value);
    assert_file_error(
        &msg,
        "boot-source.initrd_path",
        &missing,
        "No such file or directory",
    );
}

#[test]
fn missing_drive_file() {
    let files = Files::new();
    let missing = std::env::temp_dir().join("kiln-config-test-no-disk");
    let mut value = files.supported();
    value["drives"][0]["path_on_host"] = json!(missing);
    let msg = err_of(&value);
    assert_file_error(
        &msg,
        "drives[0].path_on_host (drive_id \"rootfs\")",
        &missing,
        "No such file or directory",
    );
    assert!(msg.contains("for reading and writing"), "{msg}");

    value["drives"][0]["is_read_only"] = json!(true);
    let msg = err_of(&value);
    assert!(msg.contains("for reading:"), "{msg}");
}

#[test]
fn drive_without_path() {
    let files = Files::new();
    let mut value = files.supported();
    value["drives"][0]
        .as_object_mut()
        .unwrap()
        .remove("path_on_host");
    assert_eq!(
        err_of(&value),
        "drives[0].path_on_host (drive_id \"rootfs\") is missing or empty"
    );
}

pub(super) fn drive(files: &Files, id: &str, root: bool) -> Value {
    json!({ "drive_id": id, "path_on_host": files.rootfs.path(), "is_root_device": root })
}

#[test]
fn duplicate_drive_ids() {
    let files = Files::new();
    let drives = json!([
        drive(&files, "a", false),
        drive(&files, "b", false),
        drive(&files, "a", false)
    ]);
    let value = set(files.minimal(), "drives", "", drives);
    assert_eq!(
        err_of(&value),
        "drives[2].drive_id \"a\" is already used by drives[0]"
    );
}

#[test]
fn two_root_devices() {
    let files = Files::new();
    let drives = json!([
        drive(&files, "root1", true),
        drive(&files, "data", false),
        drive(&files, "root2", true)
    ]);
    let value = set(files.minimal(), "drives", "", drives);
    let msg = err_of(&value);
    assert!(msg.contains("is_root_device"), "{msg}");
    assert!(
        msg.contains("\"root1\"") && msg.contains("\"root2\""),
        "{msg}"
    );
}

#[test]
fn empty_drive_id() {
    let files = Files::new();
    let value = set(
        files.minimal(),
        "drives",
        "",
        json!([drive(&files, "", false)]),
    );
    assert_eq!(err_of(&value), "drives[0].drive_id must not be empty");
}

#[test]
fn boot_args_with_nul() {
    let files = Files::new();
    let value = set(
        files.minimal(),
        "boot-source",
        "boot_args",
        json!("console=ttyS0\u{0}x"),
    );
    assert_eq!(
        err_of(&value),
        "boot-source.boot_args must not contain a NUL byte, found one at byte 13"
    );
}

#[test]
fn unknown_fields_rejected() {
    let files = Files::new();
    let cases = [
        ("", "kernel"),
        ("boot-source", "kernel_path"),
        ("machine-config", "vcpus"),
        ("logger", "path"),
        ("entropy", "rate"),
    ];
    for (section, field) in cases {
        let mut value = files.supported();
        if section.is_empty() {
            value[field] = json!(1);
        } else {
            value[section][field] = json!(1);
        }
        let msg = err_of(&value);
        assert!(msg.contains(&format!("unknown field `{field}`")), "{msg}");
    }
    let mut value = files.supported();
    value["drives"][0]["readonly"] = json!(true);
    assert!(err_of(&value).contains("unknown field `readonly`"));
}

#[test]
fn wrong_types_rejected() {
    let files = Files::new();
    let value = set(files.minimal(), "machine-config", "vcpu_count", json!("2"));
    let msg = err_of(&value);
    assert!(
        msg.contains("machine-config.vcpu_count must be between 1 and 32, got \"2\""),
        "{msg}"
    );
    let value = set(
        files.minimal(),
        "machine-config",
        "mem_size_mib",
        json!(null),
    );
    let msg = err_of(&value);
    assert!(
        msg.contains("machine-config.mem_size_mib must be a whole number of MiB, got null"),
        "{msg}"
    );
    let value = set(files.minimal(), "machine-config", "smt", json!("yes"));
    assert!(err_of(&value).contains("invalid type: string \"yes\", expected a boolean"));
    let value = set(files.minimal(), "drives", "", json!({ "drive_id": "a" }));
    assert!(err_of(&value).contains("invalid type: map, expected a sequence"));
    let value = set(files.minimal(), "entropy", "rate_limiter", json!(5));
    assert!(err_of(&value).contains("invalid type: integer `5`"));
    let value = set(files.minimal(), "machine-config", "huge_pages", json!("1G"));
    assert!(err_of(&value).contains("unknown variant `1G`"));
    let mut value = files.supported();
    value["drives"][0]["cache_type"] = json!("WriteThrough");
    assert!(err_of(&value).contains("unknown variant `WriteThrough`"));
}

#[test]
fn log_levels_case_insensitive() {
    let files = Files::new();
    let cases = [
        ("ERROR", LogLevel::Error, log::LevelFilter::Error),
        ("warning", LogLevel::Warning, log::LevelFilter::Warn),
        ("WARN", LogLevel::Warning, log::LevelFilter::Warn),
        ("Info", LogLevel::Info, log::LevelFilter::Info),
        ("dEbUg", LogLevel::Debug, log::LevelFilter::Debug),
        ("trace", LogLevel::Trace, log::LevelFilter::Trace),
        ("Off", LogLevel::Off, log::LevelFilter::Off),
    ];
    for (name, level, filter) in cases {
        let value = set(files.minimal(), "logger", "", json!({ "level": name }));
        let config = from_value(&value).unwrap();
        let parsed = config.logger.unwrap().level.unwrap();
        assert_eq!(parsed, level);
        assert_eq!(parsed.to_level_filter(), filter);
    }
    let value = set(files.minimal(), "logger", "", json!({ "level": "verbose" }));
    let msg = err_of(&value);
    assert!(msg.contains("unknown variant `verbose`"), "{msg}");
    assert!(msg.contains("`Warning`"), "{msg}");
}
