//! End-to-end: boot the project's own Linux guest (tools/build-guest-kernel,
//! tools/build-rootfs) to its init, run a command in it, power off.
//!
//! Each boot takes about a minute on hosts whose KVM interprets guest kernel
//! code (kvm_pvm, see README); cargo runs these tests two at a time.

// Tests: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Test guests are built from small constants: truncation cannot happen.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::path::Path;

use common::*;

/// Boots `config` in-process and returns the console output, after checking
/// that the guest ended by itself and that every vCPU thread was joined.
fn boot(config: &str, vcpus: u8) -> String {
    boot_guest(config, vcpus, &Capture::default())
}

fn rootfs_config(vcpus: u8, image: &Path, read_only: bool, cmd: &str) -> String {
    format!(
        r#"{{
  "boot-source": {{
    "kernel_image_path": "{}",
    "boot_args": "{BOOT_ARGS} {}"
  }},
  "machine-config": {{ "vcpu_count": {vcpus}, "mem_size_mib": 128 }},
  "drives": [{{
    "drive_id": "rootfs",
    "path_on_host": "{}",
    "is_root_device": true,
    "is_read_only": {read_only}
  }}],
  "entropy": {{}}
}}"#,
        guest_artifact("vmlinux").display(),
        kiln_cmd(cmd),
        image.display()
    )
}

fn initramfs_boot_runs_a_command(vcpus: u8) {
    let out = boot(
        &initramfs_config(
            vcpus,
            // Shell builtins only: every exec costs a second of interpreted
            // kernel code on kvm_pvm hosts.
            "echo hello-from-the-guest; n=0; while read -r k rest; do \
             [ \"$k\" = processor ] && n=$((n+1)); done < /proc/cpuinfo; echo CPUS=$n",
            "",
        ),
        vcpus,
    );
    assert!(out.contains("hello-from-the-guest"), "console:\n{out}");
    assert!(
        out.lines().any(|l| l.trim() == format!("CPUS={vcpus}")),
        "guest does not see {vcpus} CPUs; console:\n{out}"
    );
    assert!(out.contains("KILN-EXIT=0"), "console:\n{out}");
}

#[test]
fn initramfs_boot_1_vcpu() {
    initramfs_boot_runs_a_command(1);
}

#[test]
fn initramfs_boot_2_vcpus() {
    initramfs_boot_runs_a_command(2);
}

/// A private copy of the ext4 image (tests write into it), in a scratch
/// directory that goes with the guard.
fn rootfs_copy(name: &str) -> (Scratch, std::path::PathBuf) {
    let dir = scratch(name);
    let image = dir.join("rootfs.ext4");
    std::fs::copy(guest_artifact("rootfs.ext4"), &image).unwrap();
    (dir, image)
}

#[test]
fn ext4_root_disk_read_write_and_hwrng() {
    let (_dir, image) = rootfs_copy("rootfs-rw");
    let out = boot(
        &rootfs_config(
            1,
            &image,
            false,
            "echo kiln-was-here > /root/proof && sync && echo WROTE; \
             echo RNG=$(head -c 16 /dev/hwrng | od -An -tx1 | tr -d ' \\n')",
        ),
        1,
    );
    assert!(out.contains("WROTE"), "console:\n{out}");
    let rng = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("RNG="))
        .unwrap_or_else(|| panic!("no RNG line; console:\n{out}"));
    assert_eq!(rng.len(), 32, "16 bytes from /dev/hwrng as hex: {rng:?}");
    assert!(rng.chars().all(|c| c.is_ascii_hexdigit()), "{rng:?}");
    // The file is in the image on the host.
    let cat = std::process::Command::new("debugfs")
        .args(["-R", "cat /root/proof"])
        .arg(&image)
        .output()
        .expect("debugfs (e2fsprogs) is needed to read the image");
    assert_eq!(
        text(&cat.stdout).trim(),
        "kiln-was-here",
        "debugfs: {}",
        text(&cat.stderr)
    );
    // Kept for inspection when the test fails; 64 MiB each otherwise.
}

#[test]
fn ext4_root_disk_read_only_refuses_writes() {
    let (_dir, image) = rootfs_copy("rootfs-ro");
    let before = std::fs::read(&image).unwrap();
    let out = boot(
        &rootfs_config(
            2,
            &image,
            true,
            "echo x > /root/nope; echo FS-WRITE=$?; \
             dd if=/dev/zero of=/dev/vda bs=512 count=1 2>/dev/null; echo DEV-WRITE=$?",
        ),
        2,
    );
    assert!(
        out.contains("FS-WRITE=") && !out.contains("FS-WRITE=0"),
        "console:\n{out}"
    );
    assert!(
        out.contains("DEV-WRITE=") && !out.contains("DEV-WRITE=0"),
        "console:\n{out}"
    );
    assert!(
        std::fs::read(&image).unwrap() == before,
        "the read-only image changed"
    );
}

/// A guest whose kernel panics (here: no init to run) makes kiln exit with
/// 3 and say so; a clean reboot stays 0 (the other tests). `pvpanic=`
/// picks the signal: the project's kernel reports through pvpanic (ACPI);
/// booted with `acpi=off` (as a kernel without ACPI: the MP table
/// describes the machine) it resets after `panic=1` with the reset flagged
/// warm.
fn kernel_panic_exits_3(name: &str, extra_args: &str, signal: &str) {
    require_kvm();
    let dir = scratch(name);
    let config = dir.join("vm.json");
    let json = initramfs_config(1, "true", "").replace(
        BOOT_ARGS,
        &format!("{BOOT_ARGS} rdinit=/nonexistent init=/nonexistent {extra_args}"),
    );
    std::fs::write(&config, json).unwrap();
    let mut child = start_kiln(&config, &["--log-level", "info"]);
    let (stdout, stderr) = finish_with(&mut child, BOOT_TIMEOUT, 3);
    assert!(stdout.contains("Kernel panic"), "{stdout}");
    assert!(stderr.contains("the guest kernel panicked"), "{stderr}");
    assert!(stderr.contains(signal), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_guest_kernel_panic_exits_3_through_pvpanic() {
    kernel_panic_exits_3("panic", "", "reported a panic (pvpanic)");
}

#[test]
fn a_guest_kernel_panic_without_acpi_exits_3_through_the_warm_reset() {
    kernel_panic_exits_3("panic-reset", "acpi=off", "guest reset the machine");
}

/// `poweroff -f` in the guest ends kiln with 0, through ACPI: the kernel
/// writes S5 to the PM1a control register kiln describes in its FADT
/// (without ACPI it would halt every CPU and kiln would wait forever).
#[test]
fn a_guest_poweroff_exits_0() {
    require_kvm();
    let dir = scratch("poweroff");
    let config = dir.join("vm.json");
    let json = initramfs_config(
        1,
        "echo before-poweroff; poweroff -f; echo after-poweroff",
        "",
    );
    std::fs::write(&config, json).unwrap();
    let mut child = start_kiln(&config, &["--log-level", "info"]);
    let (stdout, stderr) = finish_with(&mut child, BOOT_TIMEOUT, 0);
    assert!(stdout.contains("before-poweroff"), "{stdout}");
    assert!(!stdout.contains("after-poweroff"), "{stdout}");
    assert!(!stdout.contains("KILN-EXIT"), "{stdout}");
    assert!(
        stderr.contains("the guest powered off through ACPI"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
