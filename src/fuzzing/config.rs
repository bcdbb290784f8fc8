//! The config parser: the fuzzer's bytes (as UTF-8, lossily) through
//! [`VmConfig::from_json`], parse and validation; a config that is
//! accepted must also come back the same from its own serialization.
//!
//! Validation opens the files a config names (without reading them, and
//! without blocking). So that fuzzing cannot touch the host's devices, an
//! input naming a path under `dev`, `proc` or `sys` is not run (kiln's
//! handling of those is what `tests/host_files.rs` checks). The seeds
//! name files that exist wherever the harness runs: `Cargo.toml` (the
//! crate's or the fuzz crate's) and `.`.

use std::path::{Component, Path};

use serde_json::Value;

use crate::config::VmConfig;

pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(value) = serde_json::from_str::<Value>(&text) {
        if names_host_devices(&value) {
            return;
        }
    }
    let Ok(config) = VmConfig::from_json(&text) else {
        return;
    };
    let again = match serde_json::to_string(&config) {
        Ok(t) => t,
        Err(e) => panic!("an accepted config does not serialize: {e}"),
    };
    match VmConfig::from_json(&again) {
        Ok(back) => assert_eq!(back, config, "the config changed through its JSON"),
        Err(e) => panic!(
            "an accepted config is refused as kiln writes it: {}\n{again}",
            crate::error_chain(&e)
        ),
    }
}

/// Whether any string in `v` is a path through `dev`, `proc` or `sys`.
fn names_host_devices(v: &Value) -> bool {
    match v {
        Value::String(s) => Path::new(s)
            .components()
            .any(|c| matches!(c, Component::Normal(n) if n == "dev" || n == "proc" || n == "sys")),
        Value::Array(a) => a.iter().any(names_host_devices),
        Value::Object(o) => o.values().any(names_host_devices),
        _ => false,
    }
}

/// The seed corpus: the examples' shapes, every section kiln takes, and
/// a few refusals.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let configs = [
        (
            "minimal",
            r#"{"boot-source":{"kernel_image_path":"Cargo.toml"},"machine-config":{"vcpu_count":2,"mem_size_mib":128}}"#,
        ),
        (
            "example-vm",
            r#"{
  "boot-source": {
    "kernel_image_path": "Cargo.toml",
    "initrd_path": "Cargo.toml",
    "boot_args": "console=ttyS0 reboot=k panic=1 i8042.noaux quiet"
  },
  "machine-config": { "vcpu_count": 2, "mem_size_mib": 128, "smt": false },
  "entropy": {}
}"#,
        ),
        (
            "everything",
            r#"{
  "boot-source": { "kernel_image_path": "Cargo.toml", "boot_args": "console=ttyS0" },
  "machine-config": { "vcpu_count": 1, "mem_size_mib": 256, "smt": false,
                      "track_dirty_pages": false, "huge_pages": "None", "cpu_template": "None" },
  "drives": [
    { "drive_id": "rootfs", "path_on_host": "Cargo.toml", "is_root_device": true,
      "is_read_only": true, "cache_type": "Writeback", "partuuid": null, "io_engine": "Sync",
      "rate_limiter": null },
    { "drive_id": "data", "path_on_host": "Cargo.toml", "is_root_device": false, "is_read_only": true }
  ],
  "network-interfaces": [],
  "vsock": { "guest_cid": 3, "uds_path": "/tmp/kiln-fuzz-v.sock", "vsock_id": "vsock0" },
  "entropy": { "rate_limiter": null },
  "logger": { "level": "Info", "log_path": "/tmp/kiln-fuzz.log", "show_level": true,
              "show_log_origin": false },
  "fs": [ { "tag": "src", "path_on_host": ".", "read_only": true } ]
}"#,
        ),
        (
            "unsupported",
            r#"{"boot-source":{"kernel_image_path":"Cargo.toml"},"balloon":{"amount_mib":1,"deflate_on_oom":false},"network-interfaces":[{"iface_id":"eth0","host_dev_name":"tap0"}],"mmds-config":{"network_interfaces":["eth0"]},"metrics":{"metrics_path":"m"},"cpu-config":{},"pmem":[{}],"memory-hotplug":{}}"#,
        ),
        (
            "bad-values",
            r#"{"boot-source":{"kernel_image_path":"src","boot_args":"a\u0000b"},"machine-config":{"vcpu_count":0,"mem_size_mib":18446744073709551615},"drives":[{"drive_id":"","path_on_host":""},{"drive_id":"","path_on_host":"."}],"vsock":{"guest_cid":2,"uds_path":""},"fs":[{"tag":"","path_on_host":"Cargo.toml"}]}"#,
        ),
        (
            "array",
            r#"[{"boot-source":{"kernel_image_path":"Cargo.toml"}}]"#,
        ),
        (
            "nulls",
            r#"{"boot-source":{"kernel_image_path":"Cargo.toml","initrd_path":null},"machine-config":null,"drives":null,"network-interfaces":null,"fs":null}"#,
        ),
    ];
    configs
        .iter()
        .map(|(name, text)| ((*name).to_string(), text.as_bytes().to_vec()))
        .collect()
}
