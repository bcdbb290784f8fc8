//! Firecracker's whole config schema: every section and field of its
//! `VmmConfig` parses; empty or null sections are absent; what kiln does not
//! implement is refused by name; accepted fields kiln cannot honour are
//! refused, never silently ignored.

use std::net::Ipv4Addr;

use serde_json::{json, Value};

use super::tests::{drive, err_of, from_value, set, Files};
use super::*;

/// Every top-level section of Firecracker's `VmmConfig` except the
/// required `boot-source`.
const OPTIONAL_SECTIONS: &[&str] = &[
    "machine-config",
    "drives",
    "network-interfaces",
    "vsock",
    "entropy",
    "balloon",
    "logger",
    "metrics",
    "cpu-config",
    "mmds-config",
    "pmem",
    "memory-hotplug",
];

/// Sections that are lists: they may also be written `[]`.
const LIST_SECTIONS: &[&str] = &["drives", "network-interfaces", "pmem"];

/// Firecracker's own test config, `tests/framework/vm_config.json`, with
/// its two file names as placeholders.
const FIRECRACKER_VM_CONFIG: &str = r#"{
  "boot-source": {
    "kernel_image_path": "KERNEL",
    "boot_args": "console=ttyS0 reboot=k panic=1",
    "initrd_path": null
  },
  "drives": [
    {
      "drive_id": "rootfs",
      "partuuid": null,
      "is_root_device": true,
      "cache_type": "Unsafe",
      "is_read_only": false,
      "path_on_host": "ROOTFS",
      "io_engine": "Sync",
      "rate_limiter": null,
      "socket": null
    }
  ],
  "machine-config": {
    "vcpu_count": 2,
    "mem_size_mib": 1024,
    "smt": false,
    "track_dirty_pages": false,
    "huge_pages": "None"
  },
  "cpu-config": null,
  "balloon": null,
  "network-interfaces": [],
  "vsock": null,
  "logger": null,
  "metrics": null,
  "mmds-config": null,
  "entropy": null,
  "pmem": [],
  "memory-hotplug": null
}"#;

#[test]
fn firecracker_test_config_loads() {
    let files = Files::new();
    let quoted = |path: &Path| serde_json::to_string(path).unwrap();
    let text = FIRECRACKER_VM_CONFIG
        .replace("\"KERNEL\"", &quoted(files.kernel.path()))
        .replace("\"ROOTFS\"", &quoted(files.rootfs.path()));
    let config = VmConfig::from_json(&text).unwrap();
    assert_eq!(config.machine_config.vcpu_count, 2);
    assert_eq!(config.machine_config.mem_size_mib, 1024);
    assert_eq!(config.drives.len(), 1);
    let root = &config.drives[0];
    assert!(root.is_root_device && !root.is_read_only);
    assert_eq!(root.path_on_host, files.rootfs.path());
    assert_eq!(root.io_engine, Some(IoEngine::Sync));
    assert_eq!(root.socket, None);
    assert!(config.network_interfaces.is_empty() && config.pmem.is_empty());
    assert_eq!(config.memory_hotplug, None);
    assert_eq!(config.logger, None);
    assert_eq!(config.entropy, None);
}

#[test]
fn full_firecracker_example_parses() {
    let files = Files::new();
    // Every section of Firecracker's VmmConfig, each with a value.
    let text = json!({
        "boot-source": {
            "kernel_image_path": files.kernel.path(),
            "boot_args": "console=ttyS0 reboot=k panic=1 pci=off",
            "initrd_path": null
        },
        "drives": [
            {
                "drive_id": "rootfs",
                "partuuid": null,
                "is_root_device": true,
                "cache_type": "Unsafe",
                "is_read_only": false,
                "path_on_host": files.rootfs.path(),
                "io_engine": "Sync",
                "rate_limiter": null,
                "socket": null
            },
            {
                "drive_id": "data",
                "is_root_device": false,
                "cache_type": "Writeback",
                "is_read_only": true,
                "path_on_host": files.initrd.path(),
                "io_engine": "Async",
                "rate_limiter": {
                    "bandwidth": { "size": 1000, "one_time_burst": 0, "refill_time": 100 },
                    "ops": { "size": 10, "refill_time": 100 }
                }
            }
        ],
        "machine-config": {
            "vcpu_count": 2,
            "mem_size_mib": 1024,
            "smt": false,
            "track_dirty_pages": false,
            "huge_pages": "None",
            "cpu_template": "T2"
        },
        "cpu-config": { "cpuid_modifiers": [], "msr_modifiers": [] },
        "balloon": {
            "amount_mib": 0,
            "deflate_on_oom": false,
            "stats_polling_interval_s": 1
        },
        "network-interfaces": [{
            "iface_id": "eth0",
            "host_dev_name": "tap0",
            "guest_mac": "06:00:AC:10:00:02",
            "rx_rate_limiter": null,
            "tx_rate_limiter": null
        }],
        "vsock": { "guest_cid": 3, "uds_path": "./v.sock", "vsock_id": "vsock0" },
        "logger": {
            "log_path": "/tmp/fc.log",
            "level": "Info",
            "show_level": false,
            "show_log_origin": false,
            "module": "api_server::request"
        },
        "metrics": {
            "metrics_path": "/tmp/fc-metrics",
            "emit_id": true,
            "properties": { "team": "ci" }
        },
        "mmds-config": {
            "version": "V2",
            "network_interfaces": ["eth0"],
            "ipv4_address": "169.254.169.254",
            "imds_compat": true
        },
        "entropy": { "rate_limiter": null },
        "pmem": [{
            "id": "pmem0",
            "path_on_host": files.rootfs.path(),
            "root_device": false,
            "read_only": true,
            "rate_limiter": null
        }],
        "memory-hotplug": { "total_size_mib": 1024, "block_size_mib": 2, "slot_size_mib": 128 }
    })
    .to_string();

    let config: VmConfig = serde_json::from_str(&text).unwrap();
    assert_eq!(config.boot_source.kernel_image_path, files.kernel.path());
    assert_eq!(config.boot_source.initrd_path, None);
    assert_eq!(config.machine_config.vcpu_count, 2);
    assert_eq!(config.machine_config.mem_size_mib, 1024);
    assert_eq!(config.machine_config.cpu_template.as_deref(), Some("T2"));
    assert_eq!(config.drives.len(), 2);
    assert_eq!(config.drives[0].cache_type, CacheType::Unsafe);
    assert_eq!(config.drives[1].cache_type, CacheType::Writeback);
    assert_eq!(config.drives[1].io_engine, Some(IoEngine::Async));
    assert!(config.drives[1].is_read_only);
    assert!(config.drives[1].rate_limiter.is_some());
    assert_eq!(
        config.network_interfaces[0].host_dev_name.as_deref(),
        Some("tap0")
    );
    assert_eq!(config.vsock.as_ref().unwrap().guest_cid, 3);
    assert_eq!(
        config.balloon.as_ref().unwrap().stats_polling_interval_s,
        Some(1)
    );
    let logger = config.logger.as_ref().unwrap();
    assert_eq!(logger.level, Some(LogLevel::Info));
    assert_eq!(logger.module.as_deref(), Some("api_server::request"));
    assert_eq!(
        config.metrics.as_ref().unwrap().metrics_path,
        Path::new("/tmp/fc-metrics")
    );
    let mmds = config.mmds_config.as_ref().unwrap();
    assert_eq!(mmds.version, Some(MmdsVersion::V2));
    assert_eq!(mmds.ipv4_address, Some(Ipv4Addr::new(169, 254, 169, 254)));
    assert!(config.cpu_config.is_some());
    assert!(config.metrics.as_ref().unwrap().emit_id);
    assert_eq!(config.pmem[0].id, "pmem0");
    assert!(config.pmem[0].read_only);
    let hotplug = config.memory_hotplug.as_ref().unwrap();
    assert_eq!(hotplug.total_size_mib, 1024);
    assert_eq!(hotplug.slot_size_mib, Some(128));

    // Everything parses, but kiln refuses what it cannot run yet.
    let err = config.validate().unwrap_err();
    assert!(matches!(err, Error::NotSupported(_)), "{err}");

    // Serializing and parsing again gives the same config.
    let again: VmConfig = serde_json::from_str(&serde_json::to_string(&config).unwrap()).unwrap();
    assert_eq!(again, config);
}

#[test]
fn every_section_null_or_empty_is_absent() {
    let files = Files::new();
    let mut nulls = files.minimal();
    let mut empties = files.minimal();
    for &section in OPTIONAL_SECTIONS {
        nulls[section] = Value::Null;
        empties[section] = if LIST_SECTIONS.contains(&section) {
            json!([])
        } else {
            Value::Null
        };
    }
    for value in [nulls, empties] {
        let config = from_value(&value).unwrap();
        assert_eq!(config.machine_config, MachineConfig::default());
        assert!(config.drives.is_empty());
        assert!(config.network_interfaces.is_empty());
        assert!(config.pmem.is_empty());
        assert_eq!(config.vsock, None);
        assert_eq!(config.entropy, None);
        assert_eq!(config.balloon, None);
        assert_eq!(config.logger, None);
        assert_eq!(config.metrics, None);
        assert_eq!(config.cpu_config, None);
        assert_eq!(config.mmds_config, None);
        assert_eq!(config.memory_hotplug, None);
    }
}

#[test]
fn unsupported_sections() {
    let files = Files::new();
    let cases = [
        (
            "balloon",
            json!({ "amount_mib": 0, "deflate_on_oom": true }),
        ),
        (
            "metrics",
            json!({ "metrics_path": "/tmp/m", "emit_id": false, "properties": null }),
        ),
        ("cpu-config", json!({ "cpuid_modifiers": [] })),
        ("cpu-config", json!("/tmp/template.json")),
        ("mmds-config", json!({ "network_interfaces": ["eth0"] })),
        (
            "pmem",
            json!([{ "id": "pmem0", "path_on_host": "/tmp/pmem.img" }]),
        ),
        ("memory-hotplug", json!({ "total_size_mib": 1024 })),
    ];
    for (section, body) in cases {
        let value = set(files.minimal(), section, "", body);
        assert_eq!(err_of(&value), format!("not supported yet: {section}"));
    }
}

#[test]
fn unknown_fields_in_every_section_rejected() {
    let files = Files::new();
    let cases = [
        (
            "pmem",
            json!([{ "id": "p", "path_on_host": "/p", "size": 1 }]),
            "size",
        ),
        (
            "memory-hotplug",
            json!({ "total_size_mib": 1024, "total": 1 }),
            "total",
        ),
        (
            "metrics",
            json!({ "metrics_path": "/m", "emit": true }),
            "emit",
        ),
        (
            "vsock",
            json!({ "guest_cid": 3, "uds_path": "/v", "cid": 3 }),
            "cid",
        ),
        (
            "balloon",
            json!({ "amount_mib": 0, "deflate_on_oom": true, "size": 1 }),
            "size",
        ),
        (
            "mmds-config",
            json!({ "network_interfaces": [], "ip": "1.2.3.4" }),
            "ip",
        ),
    ];
    for (section, body, field) in cases {
        let value = set(files.minimal(), section, "", body);
        let msg = err_of(&value);
        assert!(msg.contains(&format!("unknown field `{field}`")), "{msg}");
    }
}

#[test]
fn drives_with_firecracker_nulls_load() {
    let files = Files::new();
    let mut value = files.supported();
    for field in [
        "socket",
        "partuuid",
        "io_engine",
        "rate_limiter",
        "is_read_only",
    ] {
        value["drives"][0][field] = Value::Null;
    }
    let config = from_value(&value).unwrap();
    let root = &config.drives[0];
    assert_eq!(root.socket, None);
    assert_eq!(root.io_engine, None);
    assert!(!root.is_read_only, "null is_read_only means read-write");

    // A null path_on_host (what Firecracker writes for a vhost-user drive)
    // parses, and validation says it is missing.
    value["drives"][0]["path_on_host"] = Value::Null;
    assert_eq!(
        err_of(&value),
        "drives[0].path_on_host (drive_id \"rootfs\") is missing or empty"
    );
}

#[test]
fn unsupported_huge_pages_and_vhost_user() {
    let files = Files::new();
    let value = set(files.minimal(), "machine-config", "huge_pages", json!("2M"));
    assert_eq!(
        err_of(&value),
        "not supported yet: machine-config.huge_pages=2M"
    );

    let mut value = files.supported();
    value["drives"][0]["socket"] = json!("/tmp/vhost.sock");
    assert_eq!(err_of(&value), "not supported yet: drives[0].socket");
}

#[test]
fn io_engine_async_refused() {
    let files = Files::new();
    let mut value = files.supported();
    value["drives"][0]["io_engine"] = json!("Sync");
    from_value(&value).unwrap();
    let mut data = drive(&files, "data", false);
    data["io_engine"] = json!("Async");
    value["drives"] = json!([value["drives"][0].clone(), data]);
    assert_eq!(
        err_of(&value),
        "not supported yet: drives[1].io_engine=Async"
    );
}

#[test]
fn track_dirty_pages_true_refused() {
    let files = Files::new();
    let value = set(
        files.minimal(),
        "machine-config",
        "track_dirty_pages",
        json!(false),
    );
    from_value(&value).unwrap();
    let value = set(value, "machine-config", "track_dirty_pages", json!(true));
    assert_eq!(
        err_of(&value),
        "not supported yet: machine-config.track_dirty_pages=true"
    );
}

#[test]
fn gdb_socket_path_refused() {
    let files = Files::new();
    let value = set(
        files.minimal(),
        "machine-config",
        "gdb_socket_path",
        Value::Null,
    );
    assert_eq!(
        from_value(&value).unwrap().machine_config.gdb_socket_path,
        None
    );
    let value = set(
        value,
        "machine-config",
        "gdb_socket_path",
        json!("/tmp/gdb.sock"),
    );
    assert_eq!(
        err_of(&value),
        "not supported yet: machine-config.gdb_socket_path"
    );
}

#[test]
fn partuuid_on_a_data_drive_is_accepted() {
    // Firecracker ignores it there; kiln does too, with a warning.
    let files = Files::new();
    let mut data = drive(&files, "data", false);
    data["partuuid"] = json!("0eaa91a0-01");
    let value = set(files.supported(), "drives", "", json!([data]));
    let config = from_value(&value).unwrap();
    assert_eq!(config.drives[0].partuuid.as_deref(), Some("0eaa91a0-01"));
}

#[test]
fn cpu_template_is_accepted() {
    let files = Files::new();
    let value = set(
        files.minimal(),
        "machine-config",
        "cpu_template",
        json!("C3"),
    );
    let config = from_value(&value).unwrap();
    assert_eq!(config.machine_config.cpu_template.as_deref(), Some("C3"));
}

#[test]
fn vsock_section_is_checked() {
    let files = Files::new();
    let ok = set(
        files.minimal(),
        "vsock",
        "",
        json!({ "guest_cid": 3, "uds_path": "/tmp/v.sock" }),
    );
    let config = from_value(&ok).unwrap();
    assert_eq!(config.vsock.unwrap().guest_cid, 3);
    for cid in [0u64, 1, 2, u64::from(u32::MAX)] {
        let v = set(ok.clone(), "vsock", "guest_cid", json!(cid));
        let msg = err_of(&v);
        assert!(
            msg.starts_with("vsock.guest_cid must be between 3 and")
                && msg.ends_with(&format!("got {cid}")),
            "{msg}"
        );
    }
    let v = set(ok.clone(), "vsock", "guest_cid", json!(-1));
    assert!(err_of(&v).contains("guest_cid"), "{}", err_of(&v));
    for path in [String::new(), format!("/{}", "x".repeat(MAX_VSOCK_PATH))] {
        let v = set(ok.clone(), "vsock", "uds_path", json!(path));
        let msg = err_of(&v);
        assert!(
            msg.starts_with("vsock.uds_path") && msg.contains("at most 96 bytes"),
            "{msg}"
        );
    }
    let longest = format!("/{}", "x".repeat(MAX_VSOCK_PATH - 1));
    assert!(from_value(&set(ok, "vsock", "uds_path", json!(longest))).is_ok());
}
