//! The `kiln` binary's command line and its errors (no KVM needed until a
//! config is valid).

// Tests: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::*;

fn kiln(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("cannot run kiln")
}

#[test]
fn help_explains_every_flag() {
    let out = kiln(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for flag in ["--config-file", "--log-level", "--version", "--help"] {
        assert!(help.contains(flag), "{flag} missing from --help:\n{help}");
    }
    assert!(help.contains("Firecracker"), "{help}");
}

#[test]
fn version_prints_the_crate_version() {
    let out = kiln(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout).trim(),
        format!("kiln {}", env!("CARGO_PKG_VERSION"))
    );
}

/// A bad flag is kiln failing to start (1), never "the guest failed" (2);
/// under `kiln run` it is 125, as `docker run` has it.
#[test]
fn usage_errors_have_their_documented_codes() {
    for args in [&["--no-such-flag"][..], &[][..], &["--config-file"][..]] {
        let out = kiln(args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(!out.stderr.is_empty(), "{args:?}: no message");
    }
    let out = kiln(&["run", "--no-such-flag", "--", "true"]);
    assert_eq!(out.status.code(), Some(125), "{}", text(&out.stderr));
}

#[test]
fn missing_config_file_is_named() {
    let out = kiln(&["--config-file", "/nonexistent/vm.json"]);
    assert_eq!(out.status.code(), Some(1));
    // The path, then the OS error, each once.
    assert_eq!(
        text(&out.stderr),
        "kiln: error: cannot read config file \"/nonexistent/vm.json\": \
         No such file or directory (os error 2)\n"
    );
}

#[test]
fn unopenable_log_path_is_named() {
    let dir = scratch("cli-log-path");
    let path = dir.join("vm.json");
    let log_path = dir.join("no-such-dir/kiln.log");
    let kernel = dir.join("kernel");
    std::fs::write(&kernel, "not booted: the logger fails first").unwrap();
    let config = serde_json::json!({
        "boot-source": { "kernel_image_path": kernel },
        "logger": { "log_path": log_path }
    });
    std::fs::write(&path, config.to_string()).unwrap();
    let out = kiln(&["--config-file", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "kiln: error: cannot open logger.log_path {:?}: No such file or directory (os error 2)\n",
            log_path
        )
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_config_names_the_field() {
    let dir = scratch("cli-bad");
    let path = dir.join("vm.json");
    std::fs::write(
        &path,
        r#"{"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"vcpu_count": 0, "mem_size_mib": 128}}"#,
    )
    .unwrap();
    let out = kiln(&["--config-file", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("vcpu_count") && err.contains('0'), "{err}");

    std::fs::write(
        &path,
        r#"{"boot-source": {"kernel_image_path": "/k", "kernel": 1}}"#,
    )
    .unwrap();
    let out = kiln(&["--config-file", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("unknown field `kernel`"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn kernel_that_is_not_a_kernel_is_named() {
    require_kvm();
    let dir = scratch("cli-garbage-kernel");
    let path = write_vm(&dir, b"this is not a kernel image at all", 1, "");
    let out = kiln(&["--config-file", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("kernel.elf") && err.contains("bzImage"),
        "{err}"
    );
}

/// Runs kiln on a config whose kernel is missing (so it stops after
/// validation) with `machine-config.cpu_template` set, which kiln warns
/// about, and this `logger` section; returns stderr.
fn cpu_template_warning(name: &str, logger: serde_json::Value) -> String {
    let dir = scratch(name);
    let path = dir.join("vm.json");
    let config = serde_json::json!({
        "boot-source": { "kernel_image_path": dir.join("no-kernel") },
        "machine-config": { "vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "C3" },
        "logger": logger
    });
    std::fs::write(&path, config.to_string()).unwrap();
    let out = kiln(&["--config-file", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let _ = std::fs::remove_dir_all(&dir);
    let err = text(&out.stderr);
    assert!(
        err.contains("kiln: error: boot-source.kernel_image_path"),
        "{err}"
    );
    err
}

#[test]
fn validation_warnings_reach_the_log_as_the_logger_section_says() {
    let warning = "machine-config.cpu_template=\"C3\" is ignored by kiln\n";
    let err = cpu_template_warning("cli-warn-default", serde_json::Value::Null);
    assert!(err.starts_with(&format!("[kiln WARN] {warning}")), "{err}");

    let err = cpu_template_warning(
        "cli-warn-no-level",
        serde_json::json!({ "show_level": false }),
    );
    assert!(err.starts_with(&format!("[kiln] {warning}")), "{err}");

    let err = cpu_template_warning(
        "cli-warn-module",
        serde_json::json!({ "module": "kiln::config" }),
    );
    assert!(err.starts_with(&format!("[kiln WARN] {warning}")), "{err}");

    let err = cpu_template_warning(
        "cli-warn-other",
        serde_json::json!({ "module": "kiln::devices" }),
    );
    assert!(!err.contains("cpu_template"), "{err}");
}
