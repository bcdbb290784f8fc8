//! kiln's seccomp filters end to end, with tiny guests (no Linux boot).
//!
//! The test-only hook `KILN_TEST_FORBIDDEN_SYSCALL=<kind>` makes the
//! threads of one kind call getppid, which no filter allows, right after
//! installing their filter: kiln must end at once with its code for a
//! forbidden call, naming the call and the kind of thread. (`kiln run`'s
//! session thread is filtered once its agent is ready, which takes a Linux
//! guest: tests/run.rs checks it.)

// Tests: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Test guests are built from small constants: truncation cannot happen.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use iced_x86::code_asm::*;

const TIMEOUT: Duration = Duration::from_secs(60);
const HOOK: &str = "KILN_TEST_FORBIDDEN_SYSCALL";
/// `--config-file`'s exit code for a forbidden call (128 + SIGSYS).
const FORBIDDEN: i32 = 159;

/// A guest that prints `up` and resets through the i8042.
fn guest() -> Vec<u8> {
    elf_image(&assemble(|a| {
        let msg = b"up\n";
        let mut data = a.create_label();
        a.mov(dx, 0x3f8u32).unwrap();
        a.lea(rsi, ptr(data)).unwrap();
        a.mov(ecx, msg.len() as u32).unwrap();
        a.rep().outsb().unwrap();
        a.mov(al, 0xfeu32).unwrap();
        a.out(0x64u32, al).unwrap();
        a.hlt().unwrap();
        a.set_label(&mut data).unwrap();
        a.db(msg).unwrap();
    }))
}

/// kiln with `args`, the hook set to `hook` (if any), no stdin.
fn kiln(args: &[&std::ffi::OsStr], hook: Option<&str>) -> Output {
    require_kvm();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match hook {
        Some(kind) => cmd.env(HOOK, kind),
        None => cmd.env_remove(HOOK),
    };
    let mut child = cmd.spawn().expect("cannot start kiln");
    finish(&mut child, TIMEOUT)
}

fn boot(config: &Path, extra: &[&str], hook: Option<&str>) -> Output {
    let mut args: Vec<&std::ffi::OsStr> = extra.iter().map(|a| a.as_ref()).collect();
    args.push("--config-file".as_ref());
    args.push(config.as_os_str());
    kiln(&args, hook)
}

/// Asserts kiln ended with `code`, saying that a `thread` made getppid.
fn assert_stopped(out: &Output, code: i32, thread: &str) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    // The hook passes getppid (which ignores them) the arguments 1, 2, 3.
    let said = format!(
        "kiln: error: the {thread} made system call 110 (getppid; arguments 0x1, 0x2, 0x3), \
         which its seccomp filter forbids: kiln stops (exit {code})"
    );
    assert!(stderr.contains(&said), "expected {said:?} in: {stderr}");
}

fn config(dir: &Path, extra: &str) -> PathBuf {
    write_vm(dir, &guest(), 2, extra)
}

/// A forbidden call on a vCPU thread (its filter is on before its first
/// KVM_RUN: the guest never runs) ends kiln with 159, naming it.
#[test]
fn a_forbidden_call_on_a_vcpu_thread_ends_kiln_naming_it() {
    let dir = scratch("seccomp-vcpu");
    let vm = config(&dir, "");
    let clean = boot(&vm, &[], None);
    assert_eq!(clean.status.code(), Some(0), "{}", text(&clean.stderr));
    assert_eq!(text(&clean.stdout), "up\n");

    let out = boot(&vm, &[], Some("vcpu"));
    assert_stopped(&out, FORBIDDEN, "vCPU thread");
    assert_eq!(text(&out.stdout), "", "the guest never ran");
}

/// The event loop and the virtio-fs workers are filtered too.
#[test]
fn the_event_loop_and_fs_workers_are_filtered_too() {
    let dir = scratch("seccomp-threads");
    let share = dir.join("share");
    std::fs::create_dir_all(&share).unwrap();
    let shares = format!(
        r#", "fs": [{{ "tag": "src", "path_on_host": "{}" }}]"#,
        share.display()
    );
    let vm = config(&dir, &shares);
    assert_stopped(&boot(&vm, &[], Some("vmm")), FORBIDDEN, "event-loop thread");
    assert_stopped(
        &boot(&vm, &[], Some("fs")),
        FORBIDDEN,
        "virtio-fs worker thread",
    );
    // Snapshots widen the event loop's list, not its being filtered.
    let snap = dir.join("snap");
    let args = ["--snapshot-dir", snap.to_str().unwrap()];
    assert_stopped(
        &boot(&vm, &args, Some("vmm")),
        FORBIDDEN,
        "event-loop thread",
    );
}

/// --no-seccomp turns the filters off: the same call is then harmless.
#[test]
fn no_seccomp_turns_the_filters_off() {
    let dir = scratch("seccomp-off");
    let vm = config(&dir, "");
    let out = boot(&vm, &["--no-seccomp"], Some("vcpu"));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    assert_eq!(text(&out.stdout), "up\n");
    assert!(stderr.contains("seccomp filters are off"), "{stderr}");
    assert!(!stderr.contains("system call 110"), "{stderr}");
}
