//! `kiln run --net passt` and `--net none`, end to end. The host side is a
//! small HTTP server of the test's own on the host's loopback: passt maps
//! the guest's gateway (10.0.2.2) to it, so nothing leaves this machine.
//! Each test boots the guest kernel or restores a template (see
//! tests/run.rs for the costs).

// Tests: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use common::{guest_artifact, kiln_run_as_a_normal_user, require_kvm, scratch, text};

const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// A file of `len` bytes that repeats no small period.
fn content(len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()[1])
        .collect()
}

/// Serves `body` to every GET on 127.0.0.1 (HTTP/1.0, one request per
/// connection) from a thread; returns the port and the count of requests
/// served.
fn http_server(body: Vec<u8>) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { continue };
            let mut req = Vec::new();
            let mut b = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut b) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&b[..n]),
                }
            }
            let head = format!(
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
                body.len()
            );
            if c.write_all(head.as_bytes()).is_ok() && c.write_all(&body).is_ok() {
                count.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    (port, served)
}

fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout[..out.stdout.len().min(8192)]),
        text(&out.stderr[..out.stderr.len().min(8192)])
    )
}

fn run(mut c: Command) -> Output {
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start kiln");
    common::finish(&mut child, RUN_TIMEOUT)
}

/// The guest's script: its network as it sees it, then the file fetched
/// from the host through passt, as a SHA-256 line.
fn fetch_script(port: u16) -> String {
    format!(
        "ip -o addr show eth0; ip route; cat /etc/resolv.conf; \
         wget -q -O - http://10.0.2.2:{port}/file | sha256sum"
    )
}

/// What the guest printed says it had passt's network and the file.
fn assert_fetched(out: &Output, body: &[u8]) {
    assert_eq!(out.status.code(), Some(0), "{}", describe(out));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("inet 10.0.2.15/24"), "{}", describe(out));
    assert!(
        stdout.contains("default via 10.0.2.2 dev eth0"),
        "{}",
        describe(out)
    );
    assert!(stdout.contains("nameserver 10.0.2.3"), "{}", describe(out));
    let want = format!("{:x}", Sha256::digest(body));
    assert!(
        stdout.contains(&want),
        "the file's SHA-256 {want} is not in the output; {}",
        describe(out)
    );
}

/// The pids of the passts kiln said it started (its info log).
fn passt_pids(out: &Output) -> Vec<u32> {
    text(&out.stderr)
        .lines()
        .filter_map(|l| l.split_once("started passt (pid ")?.1.split_once(')'))
        .filter_map(|(pid, _)| pid.parse().ok())
        .collect()
}

/// Whether process `pid` is a passt (which runs as passt, or re-executes
/// itself as passt.avx2), zombies included.
fn is_passt(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("Name:") && l.contains("passt"))
    })
}

/// The case: a user who is not root (nobody, with /dev/kvm's
/// group, when the test runs as root) fetches a file from a server on the
/// host's loopback, through a passt kiln starts as that user and stops:
/// no passt of that user is left afterwards.
#[test]
fn passt_fetches_from_the_host_as_a_normal_user() {
    require_kvm();
    let body = content(300 * 1024 + 7);
    let (port, served) = http_server(body.clone());
    let dir = scratch("passt-rootless");
    let (mut c, _uid) = kiln_run_as_a_normal_user(&dir);
    c.args(["--net", "passt", "--log-level", "info", "--"])
        .args(["sh", "-c", &fetch_script(port)]);
    let out = run(c);
    assert_fetched(&out, &body);
    assert_eq!(served.load(Ordering::SeqCst), 1);
    // kiln started one passt, and ended and reaped it before it exited.
    let pids = passt_pids(&out);
    assert_eq!(pids.len(), 1, "{}", describe(&out));
    assert!(!is_passt(pids[0]), "passt (pid {}) is still there", pids[0]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `kiln run` with the test's kernel and the shared template cache.
fn kiln_run(args: &[&str]) -> Command {
    require_kvm();
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.arg("run")
        .arg("--kernel")
        .arg(guest_artifact("vmlinux"))
        .args(["--cpus", "1", "--memory", "256"])
        .args(args);
    c
}

/// A VM with passt's network, saved as a template (the first run here, if
/// no test made it before) and restored (the second): the restored guest's
/// network works through a passt of its own.
#[test]
fn passt_works_in_a_restored_template() {
    let body = content(64 * 1024);
    let (port, served) = http_server(body.clone());
    for round in 0..2 {
        let out = run(kiln_run(&[
            "--net",
            "passt",
            "--",
            "sh",
            "-c",
            &fetch_script(port),
        ]));
        assert_fetched(&out, &body);
        assert_eq!(served.load(Ordering::SeqCst), round + 1);
    }
}

/// Without `--net` the guest has a loopback, up, and nothing else.
#[test]
fn no_network_means_only_a_loopback() {
    let out = run(kiln_run(&[
        "--",
        "sh",
        "-c",
        "ls /sys/class/net; ip -o link show lo; ping -c 1 -W 5 127.0.0.1 >/dev/null && echo LO-OK",
    ]));
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let stdout = text(&out.stdout);
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("lo"), "{}", describe(&out));
    assert!(
        lines.next().unwrap_or_default().contains(",UP"),
        "{}",
        describe(&out)
    );
    assert!(stdout.contains("LO-OK"), "{}", describe(&out));
}

/// Without passt in PATH, `--net passt` fails at once (125), saying what
/// to install, before any VM is built or template touched.
#[test]
fn a_missing_passt_is_named_before_anything_starts() {
    let out = run({
        let mut c = kiln_run(&["--net", "passt", "--", "true"]);
        c.env("PATH", "/nonexistent");
        c
    });
    assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("there is no passt in PATH (install Debian's package passt)"),
        "{}",
        describe(&out)
    );
}
