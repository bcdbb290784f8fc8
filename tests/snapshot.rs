//! Snapshots through the command line: SIGUSR1 to a running kiln writes
//! one (the VM goes on), `--restore-from` starts a VM from it where it was.

// Tests: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Test guests are built from small constants: truncation cannot happen.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command};
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

    let mut original = start_kiln(&config, &["--snapshot-dir", snap_arg]);
    let mut lines = BufReader::new(original.stdout.take().unwrap()).lines();
    let before = read_counts(&mut lines, 5);
    assert_eq!(before[0], 1);
    take_snapshot(&original, &snap);
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
        let mut restored = start_kiln(&config, &["--restore-from", snap_arg]);
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
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An fs share the guest never mounted is saved as its tag: the restore
/// serves the folder its own config names (chosen per run); another tag is
/// refused.
#[test]
fn an_unmounted_share_restores_with_another_folder() {
    let dir = scratch("snapshot-fs");
    let snap = dir.join("snap");
    let snap_arg = snap.to_str().unwrap();
    let vm = |name: &str, tag: &str| {
        let d = dir.join(name);
        let share = d.join("share");
        std::fs::create_dir_all(&share).unwrap();
        write_vm(
            &d,
            &elf_image(&counting_guest()),
            1,
            &format!(
                r#", "fs": [{{ "tag": "{tag}", "path_on_host": "{}" }}]"#,
                share.display()
            ),
        )
    };
    let first = snapshot_counting(&vm("a", "src"), &snap);

    let out = run_kiln_args(&vm("c", "data"), &["--restore-from", snap_arg]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("fs src (virtio type 26)") && err.contains("fs data (virtio type 26)"),
        "{err}"
    );

    // Another folder under the same tag.
    restore_goes_on(&vm("b", "src"), &snap, first);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A VM with a vsock device is snapshotted (its connections are not: the
/// restored guest gets a transport reset) and restored with the same
/// guest CID; another CID is refused.
#[test]
fn vsock_snapshots_keep_the_guest_cid() {
    let dir = scratch("snapshot-vsock");
    let snap = dir.join("snap");
    let snap_arg = snap.to_str().unwrap();
    let vm = |cid: u32| {
        let d = dir.join(format!("cid{cid}"));
        std::fs::create_dir_all(&d).unwrap();
        write_vm(
            &d,
            &elf_image(&counting_guest()),
            1,
            &format!(
                r#", "vsock": {{ "guest_cid": {cid}, "uds_path": "{}" }}"#,
                dir.join("v.sock").display()
            ),
        )
    };
    let config = vm(3);
    let first = snapshot_counting(&config, &snap);

    let out = run_kiln_args(&vm(4), &["--restore-from", snap_arg]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("guest_cid is 3, the config's 4"), "{err}");

    restore_goes_on(&config, &snap, first);
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
    let mut original = start_kiln(&config, &["--snapshot-dir", snap_arg]);
    let mut lines = BufReader::new(original.stdout.take().unwrap()).lines();
    read_counts(&mut lines, 3);
    take_snapshot(&original, &snap);
    read_counts(&mut lines, 3);
    drop(lines);
    stop(original);

    let mut restored = start_kiln(&config, &["--restore-from", snap_arg]);
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

/// Runs the counting guest of `config` with `--snapshot-dir snap`, takes a
/// snapshot after its first counts, lets it go on, stops it; returns its
/// first count.
fn snapshot_counting(config: &Path, snap: &Path) -> u32 {
    let mut original = start_kiln(config, &["--snapshot-dir", snap.to_str().unwrap()]);
    let mut lines = BufReader::new(original.stdout.take().unwrap()).lines();
    let before = read_counts(&mut lines, 3);
    take_snapshot(&original, snap);
    read_counts(&mut lines, 2);
    drop(lines);
    stop(original);
    before[0]
}

/// Restores `snap` with `config`: the guest goes on counting, past `first`.
fn restore_goes_on(config: &Path, snap: &Path, first: u32) {
    let mut restored = start_kiln(config, &["--restore-from", snap.to_str().unwrap()]);
    let mut lines = BufReader::new(restored.stdout.take().unwrap()).lines();
    let counts = read_counts(&mut lines, 3);
    consecutive(&counts);
    assert!(
        counts[0] > first,
        "the restored guest started over: {counts:?}"
    );
    drop(lines);
    stop(restored);
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
    start_kiln(config, args).wait_with_output().unwrap()
}

/// Lines of `child`'s stdout, read on a thread, with a deadline per line.
struct Console(std::sync::mpsc::Receiver<String>, Vec<String>);

impl Console {
    fn of(child: &mut Child) -> Self {
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Console(rx, Vec::new())
    }

    /// The next line, within `timeout`.
    fn line(&mut self, timeout: Duration) -> String {
        let line = self.0.recv_timeout(timeout).unwrap_or_else(|e| {
            panic!(
                "no line within {timeout:?} ({e}); console:\n{}",
                self.1.join("\n")
            )
        });
        self.1.push(line.clone());
        line
    }

    /// The next `TICK i b rng disk` line (a restore may start mid-line).
    fn tick(&mut self, timeout: Duration) -> (u32, String, String, String) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.0.recv_timeout(left).unwrap_or_else(|e| {
                panic!(
                    "no tick within {timeout:?} ({e}); console:\n{}",
                    self.1.join("\n")
                )
            });
            self.1.push(line.clone());
            let f: Vec<&str> = line.split_whitespace().collect();
            if let ["TICK", i, b, rng, disk] = f[..] {
                if let Ok(i) = i.parse() {
                    return (i, b.into(), rng.into(), disk.into());
                }
            }
        }
    }

    /// The next tick, checked: 8 bytes from /dev/hwrng, and the label of
    /// the disk block the guest read.
    fn good_tick(&mut self, timeout: Duration) -> u32 {
        let (i, b, rng, disk) = self.tick(timeout);
        let log = self.1.join("\n");
        assert_eq!(b, (i % 64).to_string(), "{log}");
        assert!(
            rng.len() == 16 && rng.chars().all(|c| c.is_ascii_hexdigit()),
            "tick {i}: 8 bytes from /dev/hwrng as hex: {rng:?}; console:\n{log}"
        );
        assert_eq!(
            disk,
            format!("BLK{:04}", i % 64),
            "tick {i}; console:\n{log}"
        );
        i
    }
}

/// The project's Linux guest with an entropy device and a read-only drive,
/// reading both in a loop: snapshotted on SIGUSR1 while it runs, killed,
/// restored; the restored guest goes on from where it was, and its reads
/// of /dev/hwrng and of the disk (a block it never read before, so it
/// comes from the device, not the page cache) keep working.
#[test]
fn snapshot_linux_guest_with_devices() {
    let dir = scratch("snapshot-linux");
    // 64 blocks 256 KiB apart (past the readahead), each labelled.
    let disk = dir.join("disk.img");
    let mut image = vec![0u8; 16 << 20];
    for b in 0..64usize {
        let label = format!("BLK{b:04}");
        image[b << 18..(b << 18) + label.len()].copy_from_slice(label.as_bytes());
    }
    std::fs::write(&disk, image).unwrap();
    let cmd = "i=0; while :; do i=$((i+1)); b=$((i % 64)); \
        r=$(head -c 8 /dev/hwrng | od -An -tx1 | tr -d ' \\n'); \
        d=$(dd if=/dev/vda bs=4096 skip=$((b*64)) count=1 2>/dev/null | head -c 7); \
        echo \"TICK $i $b $r $d\"; done";
    let extra = format!(
        r#", "drives": [{{ "drive_id": "data", "path_on_host": "{}", "is_root_device": false, "is_read_only": true }}],
  "entropy": {{}}"#,
        disk.display()
    );
    let config = dir.join("vm.json");
    std::fs::write(&config, initramfs_config(1, cmd, &extra)).unwrap();
    let snap = dir.join("snap");
    let snap_arg = snap.to_str().unwrap();
    let tick_timeout = Duration::from_secs(120);

    let mut original = start_kiln(&config, &["--snapshot-dir", snap_arg]);
    let mut console = Console::of(&mut original);
    let first = console.good_tick(BOOT_TIMEOUT);
    console.good_tick(tick_timeout);
    take_snapshot(&original, &snap);
    // The snapshotted guest goes on.
    for _ in 0..2 {
        console.good_tick(tick_timeout);
    }
    stop(original);

    let mut restored = start_kiln(&config, &["--restore-from", snap_arg]);
    let mut console = Console::of(&mut restored);
    let mut ticks = Vec::new();
    for _ in 0..3 {
        ticks.push(console.good_tick(tick_timeout));
    }
    consecutive(&ticks);
    // The guest had printed tick `first + 1` when it was snapshotted.
    assert!(
        ticks[0] > first + 1,
        "the restored guest started over: {ticks:?} after {first}"
    );
    stop(restored);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An idle Linux guest (asleep on its LAPIC timer in TSC-deadline mode when
/// the snapshot is taken, nothing else to wake it) wakes after a restore:
/// the armed deadline must survive (KVM drops it if written before the
/// LAPIC state).
#[test]
fn an_idle_linux_guest_wakes_after_restore() {
    require_kvm();
    let dir = scratch("snapshot-idle");
    let config = dir.join("vm.json");
    let cmd = "i=0; while :; do i=$((i+1)); echo TICK $i; sleep 1; done";
    std::fs::write(&config, initramfs_config(1, cmd, "")).unwrap();
    let snap = dir.join("snap");
    let snap_arg = snap.to_str().unwrap();
    let ticks = |child: &mut Child, n: usize, within: Duration| -> Vec<String> {
        let (tx, rx) = std::sync::mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("TICK") && tx.send(line).is_err() {
                    break;
                }
            }
        });
        (0..n)
            .map(|_| {
                rx.recv_timeout(within)
                    .expect("no TICK in time: the guest is asleep")
            })
            .collect()
    };
    let mut original = start_kiln(&config, &["--snapshot-dir", snap_arg]);
    ticks(&mut original, 2, Duration::from_secs(300));
    take_snapshot(&original, &snap);
    stop(original);
    let mut restored = start_kiln(&config, &["--restore-from", snap_arg]);
    let got = ticks(&mut restored, 2, Duration::from_secs(30));
    assert!(got[0].starts_with("TICK "), "{got:?}");
    stop(restored);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A restored guest powers off through ACPI like a booted one: the PM1
/// registers come back with the snapshot, and kiln exits 0.
#[test]
fn a_restored_guest_powers_off_with_exit_0() {
    require_kvm();
    let dir = scratch("snapshot-poweroff");
    let config = dir.join("vm.json");
    let cmd = "i=0; while [ $i -lt 10 ]; do i=$((i+1)); echo TICK $i; sleep 1; done; poweroff -f";
    std::fs::write(&config, initramfs_config(1, cmd, "")).unwrap();
    let snap = dir.join("snap");
    let snap_arg = snap.to_str().unwrap();
    let mut original = start_kiln(&config, &["--snapshot-dir", snap_arg]);
    let mut console = Console::of(&mut original);
    while !console.line(BOOT_TIMEOUT).starts_with("TICK 2") {}
    take_snapshot(&original, &snap);
    stop(original);
    let mut restored = start_kiln(
        &config,
        &["--restore-from", snap_arg, "--log-level", "info"],
    );
    let (stdout, stderr) = finish_with(&mut restored, Duration::from_secs(180), 0);
    assert!(stdout.contains("TICK 10"), "{stdout}");
    assert!(
        stderr.contains("the guest powered off through ACPI"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Where the memory guest keeps its 64 MiB, and what it writes there: every
/// qword the pattern, except the first of each 4 KiB page, its page number.
const BLOCK: u64 = 0x200_0000;
const BLOCK_PAGES: u64 = 16384;
const PATTERN: u64 = 0x5a5a_1234_c3c3_8765;

/// Fills 64 MiB of its memory (BLOCK), says FILLED, then checks three
/// qwords of every page in a loop, saying OK after each whole pass (BAD,
/// and stops, at the first difference).
fn memory_guest() -> Vec<u8> {
    assemble(|a| {
        let mut mark = a.create_label();
        let mut pass = a.create_label();
        let mut check = a.create_label();
        let mut bad = a.create_label();
        let mut delay = a.create_label();
        let mut filled = a.create_label();
        let mut ok = a.create_label();
        let mut bad_msg = a.create_label();
        let mut halt = a.create_label();
        let print = |a: &mut CodeAssembler, msg: CodeLabel| {
            let mut next = a.create_label();
            let mut done = a.create_label();
            a.mov(dx, 0x3f8u32).unwrap();
            a.lea(rsi, ptr(msg)).unwrap();
            a.set_label(&mut next).unwrap();
            a.lodsb().unwrap();
            a.test(al, al).unwrap();
            a.jz(done).unwrap();
            a.out(dx, al).unwrap();
            a.jmp(next).unwrap();
            a.set_label(&mut done).unwrap();
            a.nop().unwrap();
        };
        a.cld().unwrap();
        a.mov(rdi, BLOCK).unwrap();
        a.mov(rcx, BLOCK_PAGES * 512).unwrap();
        a.mov(rax, PATTERN).unwrap();
        a.rep().stosq().unwrap();
        a.xor(ebx, ebx).unwrap();
        a.mov(rdi, BLOCK).unwrap();
        a.set_label(&mut mark).unwrap();
        a.mov(qword_ptr(rdi), rbx).unwrap();
        a.add(rdi, 4096i32).unwrap();
        a.inc(rbx).unwrap();
        a.cmp(rbx, BLOCK_PAGES as i32).unwrap();
        a.jne(mark).unwrap();
        print(a, filled);
        a.set_label(&mut pass).unwrap();
        a.xor(ebx, ebx).unwrap();
        a.mov(rdi, BLOCK).unwrap();
        a.mov(rax, PATTERN).unwrap();
        a.set_label(&mut check).unwrap();
        a.cmp(qword_ptr(rdi), rbx).unwrap();
        a.jne(bad).unwrap();
        a.cmp(qword_ptr(rdi + 8), rax).unwrap();
        a.jne(bad).unwrap();
        a.cmp(qword_ptr(rdi + 4088), rax).unwrap();
        a.jne(bad).unwrap();
        a.add(rdi, 4096i32).unwrap();
        a.inc(rbx).unwrap();
        a.cmp(rbx, BLOCK_PAGES as i32).unwrap();
        a.jne(check).unwrap();
        print(a, ok);
        a.mov(ecx, 200_000u32).unwrap();
        a.set_label(&mut delay).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(delay).unwrap();
        a.jmp(pass).unwrap();
        a.set_label(&mut bad).unwrap();
        print(a, bad_msg);
        a.set_label(&mut halt).unwrap();
        a.hlt().unwrap();
        a.jmp(halt).unwrap();
        a.set_label(&mut filled).unwrap();
        a.db(b"FILLED\n\0").unwrap();
        a.set_label(&mut ok).unwrap();
        a.db(b"OK\n\0").unwrap();
        a.set_label(&mut bad_msg).unwrap();
        a.db(b"BAD\n\0").unwrap();
    })
}

/// 64 MiB the guest wrote before the snapshot are in the memory file,
/// byte for byte, and read back the same in the restored guest.
#[test]
fn sixty_four_mib_written_before_a_snapshot_read_back_after_it() {
    let dir = scratch("snapshot-64mib");
    let kernel = dir.join("kernel.elf");
    std::fs::write(&kernel, elf_image(&memory_guest())).unwrap();
    let config = dir.join("vm.json");
    std::fs::write(
        &config,
        format!(
            r#"{{ "boot-source": {{ "kernel_image_path": "{}" }},
  "machine-config": {{ "vcpu_count": 1, "mem_size_mib": 128 }} }}"#,
            kernel.display()
        ),
    )
    .unwrap();
    let snap = dir.join("snap");
    let snap_arg = snap.to_str().unwrap();
    let wait_for = |console: &mut Console, want: &str, within: Duration| {
        let start = Instant::now();
        loop {
            let line = console.line(within.saturating_sub(start.elapsed()));
            assert!(!line.ends_with("BAD"), "the guest's memory changed");
            if line.ends_with(want) {
                return;
            }
        }
    };

    let mut original = start_kiln(&config, &["--snapshot-dir", snap_arg]);
    let mut console = Console::of(&mut original);
    wait_for(&mut console, "FILLED", Duration::from_secs(300));
    wait_for(&mut console, "OK", Duration::from_secs(60));
    take_snapshot(&original, &snap);
    wait_for(&mut console, "OK", Duration::from_secs(60));
    stop(original);

    let mem = std::fs::read(snap.join("vm.mem")).unwrap();
    assert_eq!(mem.len(), 128 << 20);
    let block = &mem[BLOCK as usize..(BLOCK + BLOCK_PAGES * 4096) as usize];
    for (i, q) in block.chunks_exact(8).enumerate() {
        let want = if i % 512 == 0 {
            i as u64 / 512
        } else {
            PATTERN
        };
        assert_eq!(
            u64::from_le_bytes(q.try_into().unwrap()),
            want,
            "memory file, qword {i} of the block"
        );
    }
    drop(mem);

    let mut restored = start_kiln(&config, &["--restore-from", snap_arg]);
    let mut console = Console::of(&mut restored);
    wait_for(&mut console, "OK", Duration::from_secs(60));
    wait_for(&mut console, "OK", Duration::from_secs(60));
    stop(restored);
    std::fs::remove_dir_all(&dir).unwrap();
}
