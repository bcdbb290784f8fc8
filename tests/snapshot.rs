//! Snapshots through the command line: SIGUSR1 to a running kiln writes
//! one (the VM goes on), `--restore-from` starts a VM from it where it was.

// Test guests are built from small constants: truncation cannot happen.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use iced_x86::code_asm::*;

/// Above the kernel image, clear of the boot page tables (0x9000...).
const COUNTER: u64 = 0x80_0000;

/// Prints a counter kept in guest memory, one 8-digit hex line at a time,
/// with a pause between lines.
fn counting_guest() -> Vec<u8> {
    assemble(|a| {
        let mut top = a.create_label();
        let mut digit = a.create_label();
        let mut delay = a.create_label();
        let mut hex = a.create_label();
        a.set_label(&mut top).unwrap();
        a.mov(eax, dword_ptr(COUNTER)).unwrap();
        a.inc(eax).unwrap();
        a.mov(dword_ptr(COUNTER), eax).unwrap();
        a.mov(edi, eax).unwrap();
        a.mov(ecx, 8u32).unwrap();
        a.mov(dx, 0x3f8u32).unwrap();
        a.lea(rsi, ptr(hex)).unwrap();
        a.set_label(&mut digit).unwrap();
        a.rol(edi, 4u32).unwrap();
        a.mov(ebx, edi).unwrap();
        a.and(ebx, 0xfu32).unwrap();
        a.mov(al, byte_ptr(rsi + rbx)).unwrap();
        a.out(dx, al).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(digit).unwrap();
        a.mov(al, 10u32).unwrap();
        a.out(dx, al).unwrap();
        a.mov(ecx, 20_000u32).unwrap();
        a.set_label(&mut delay).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(delay).unwrap();
        a.jmp(top).unwrap();
        a.set_label(&mut hex).unwrap();
        a.db(b"0123456789abcdef").unwrap();
    })
}

fn kiln(config: &Path, args: &[&str]) -> Child {
    require_kvm();
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--config-file")
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start kiln")
}

/// Reads counter lines from `lines` until `n` more full ones came.
fn read_counts(lines: &mut impl Iterator<Item = std::io::Result<String>>, n: usize) -> Vec<u32> {
    let mut got = Vec::new();
    while got.len() < n {
        let line = lines.next().expect("kiln's output ended").unwrap();
        // A restore may start in the middle of a line.
        if line.len() == 8 {
            got.push(u32::from_str_radix(&line, 16).unwrap());
        }
    }
    got
}

fn stop(mut child: Child) -> String {
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let status = wait_timeout(&mut child, Duration::from_secs(10)).expect("kiln did not stop");
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
    assert_eq!(status.code(), Some(130), "stderr: {err}");
    err
}

fn consecutive(counts: &[u32]) {
    for w in counts.windows(2) {
        assert_eq!(w[1], w[0] + 1, "not consecutive: {counts:?}");
    }
}

#[test]
fn snapshot_on_sigusr1_then_restore_goes_on() {
    let dir = scratch("snapshot");
    let config = write_vm(&dir, &elf_image(&counting_guest()), 1, "");
    let snap = dir.join("snap");
    let snap_arg = snap.to_str().unwrap();

    let mut original = kiln(&config, &["--snapshot-dir", snap_arg]);
    let mut lines = BufReader::new(original.stdout.take().unwrap()).lines();
    let before = read_counts(&mut lines, 5);
    assert_eq!(before[0], 1);
    let ok = Command::new("kill")
        .args(["-USR1", &original.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let start = Instant::now();
    while !snap.join("vm.state").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no snapshot written"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The snapshotted VM goes on.
    let after = read_counts(&mut lines, 5);
    let mut seen = before.clone();
    seen.extend(&after);
    consecutive(&seen);
    drop(lines);
    stop(original);

    let mem = std::fs::metadata(snap.join("vm.mem")).unwrap();
    assert_eq!(mem.len(), 64 << 20);
    for f in ["vm.state", "vm.mem"] {
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(snap.join(f)).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }

    // Two restores of the one snapshot: both go on from where it was.
    let mut firsts = Vec::new();
    for _ in 0..2 {
        let mut restored = kiln(&config, &["--restore-from", snap_arg]);
        let mut lines = BufReader::new(restored.stdout.take().unwrap()).lines();
        let counts = read_counts(&mut lines, 5);
        consecutive(&counts);
        assert!(counts[0] > 1, "the restored guest started over: {counts:?}");
        assert!(
            seen.contains(&(counts[0] - 1)),
            "the restored guest did not go on from a count the original printed: {counts:?} after {seen:?}"
        );
        firsts.push(counts[0]);
        drop(lines);
        stop(restored);
    }
    assert_eq!(firsts[0], firsts[1], "two restores of one snapshot differ");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn restores_that_cannot_work_are_refused() {
    let dir = scratch("snapshot-refused");
    let config = write_vm(&dir, &elf_image(&counting_guest()), 1, "");
    let snap = dir.join("snap");
    let snap_arg = snap.to_str().unwrap();
    // No snapshot there.
    let out = run_kiln_args(&config, &["--restore-from", snap_arg]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("vm.state"),
        "{}",
        text(&out.stderr)
    );
    // vsock and fs devices cannot be snapshotted yet: refused up front.
    let uds = dir.join("v.sock");
    let with_vsock = write_vm(
        &dir,
        &elf_image(&counting_guest()),
        1,
        &format!(
            r#", "vsock": {{ "guest_cid": 3, "uds_path": "{}" }}"#,
            uds.display()
        ),
    );
    for flag in ["--snapshot-dir", "--restore-from"] {
        let out = run_kiln_args(&with_vsock, &[flag, snap_arg]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flag}: {err}");
        assert!(
            err.contains("vsock devices are not supported yet"),
            "{flag}: {err}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A snapshot of a VM with an entropy device and a drive (the tiny guest
/// leaves them alone: `snapshot_linux_guest_with_devices` drives them)
/// restores with the same devices, and is refused, naming the first
/// difference, with others.
#[test]
fn snapshots_hold_the_device_list() {
    let dir = scratch("snapshot-devices");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let other_disk = dir.join("other.img");
    std::fs::write(&other_disk, vec![0u8; 1 << 20]).unwrap();
    let drive = |path: &Path| {
        format!(
            r#", "drives": [{{ "drive_id": "data", "path_on_host": "{}", "is_root_device": false, "is_read_only": true }}]"#,
            path.display()
        )
    };
    let guest = elf_image(&counting_guest());
    let config = write_vm(
        &dir,
        &guest,
        1,
        &format!(r#"{}, "entropy": {{}}"#, drive(&disk)),
    );
    let snap = dir.join("snap");
    let snap_arg = snap.to_str().unwrap();
    let mut original = kiln(&config, &["--snapshot-dir", snap_arg]);
    let mut lines = BufReader::new(original.stdout.take().unwrap()).lines();
    read_counts(&mut lines, 3);
    take_snapshot(&original, &snap);
    read_counts(&mut lines, 3);
    drop(lines);
    stop(original);

    let mut restored = kiln(&config, &["--restore-from", snap_arg]);
    let mut lines = BufReader::new(restored.stdout.take().unwrap()).lines();
    let counts = read_counts(&mut lines, 3);
    consecutive(&counts);
    assert!(counts[0] > 1, "the restored guest started over: {counts:?}");
    drop(lines);
    stop(restored);

    let refused = |extra: &str, expected: &str| {
        let other = write_vm(&dir, &guest, 1, extra);
        let out = run_kiln_args(&other, &["--restore-from", snap_arg]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra}: {err}");
        assert!(err.contains(expected), "{extra}: {err}");
    };
    // No entropy device: the snapshot has one more.
    refused(
        &drive(&disk),
        "the first missing is entropy (virtio type 4) at 0xc0001000, IRQ 6",
    );
    // No drive: entropy comes first, where the snapshot has the drive.
    refused(
        r#", "entropy": {}"#,
        "device 0 is drive data (virtio type 2) at 0xc0000000, IRQ 5 in the snapshot, entropy (virtio type 4) at 0xc0000000, IRQ 5 in the config",
    );
    // Another disk.
    refused(
        &format!(r#"{}, "entropy": {{}}"#, drive(&other_disk)),
        "other.img",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Sends SIGUSR1 and waits for the snapshot in `snap`.
fn take_snapshot(kiln: &Child, snap: &Path) {
    let ok = Command::new("kill")
        .args(["-USR1", &kiln.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let start = Instant::now();
    while !snap.join("vm.state").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no snapshot written"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `kiln --config-file config ARGS` to its end (these end at once).
fn run_kiln_args(config: &Path, args: &[&str]) -> std::process::Output {
    kiln(config, args).wait_with_output().unwrap()
}
