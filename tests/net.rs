//! End-to-end virtio-net on a tap, as a Firecracker config uses it: the
//! test makes a network namespace with a tap (`ip netns add`, `ip tuntap`:
//! it needs root, as CI has), runs kiln inside it (`ip netns exec`) with
//! `network-interfaces` naming the tap, and the project's guest, from its
//! kiln.cmd, brings up eth0 with busybox `ip`, pings the host side of the
//! tap, then pipes a TCP stream from a host server back to another with
//! `kiln-vsock tcp pipe` (1 MiB reads and writes): the same bytes both ways
//! at once, checked with SHA-256 on the host.
//!
//! Nothing leaves the namespace, which is deleted on every path (a Drop
//! guard; deleting it removes the tap too).

// Tests: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Test data is built from small constants: truncation is wanted or cannot happen.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use common::*;

const HOST_IP: &str = "10.0.2.1";
const GUEST_IP: &str = "10.0.2.2";
const TAP: &str = "ktap0";
const GUEST_MAC: &str = "06:00:0a:00:02:02";
/// MiB piped through the guest (each way); `KILN_NET_MIB` changes it.
const DEFAULT_MIB: u64 = 64;
/// §5.1.3 features the guest must take on a tap (bit numbers): the
/// offloads CSUM, GUEST_CSUM, GUEST_TSO4, GUEST_TSO6, HOST_TSO4, HOST_TSO6,
/// and MRG_RXBUF.
const OFFLOAD_BITS: [usize; 7] = [0, 1, 7, 8, 11, 12, 15];
/// The host's TCP ports: the source the guest reads, the sink it writes.
const SOURCE_PORT: u16 = 5002;
const SINK_PORT: u16 = 5001;

/// A network namespace of the test's own, deleted (with its tap) on drop.
struct NetNs(String);

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap_or_else(|e| {
        panic!("cannot run ip (Debian's iproute2): {e}");
    });
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        text(&out.stderr)
    );
}

impl NetNs {
    /// The namespace with the tap up at HOST_IP/24, its loopback up.
    fn new(name: &str) -> Self {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", name]);
        let ns = Self(name.to_string());
        ip(&["-n", name, "tuntap", "add", "dev", TAP, "mode", "tap"]);
        ip(&[
            "-n",
            name,
            "addr",
            "add",
            &format!("{HOST_IP}/24"),
            "dev",
            TAP,
        ]);
        ip(&["-n", name, "link", "set", TAP, "up"]);
        ip(&["-n", name, "link", "set", "lo", "up"]);
        ns
    }
}

/// Moves the calling thread into namespace `name` (setns is per thread).
fn enter_netns(name: &str) {
    let f = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
    // SAFETY: setns on an open namespace fd; it changes only this thread's
    // network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Byte `i` of the stream: not periodic in any small power of two.
fn pattern(buf: &mut [u8], offset: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        let x = offset + i as u64;
        *b = (x.wrapping_mul(2_654_435_761) >> 13) as u8 ^ (x >> 20) as u8;
    }
}

fn expected_sha(len: u64) -> String {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        pattern(&mut buf[..n], off);
        h.update(&buf[..n]);
        off += n as u64;
    }
    format!("{:x}", h.finalize())
}

/// In the namespace: a source that sends `len` bytes of the pattern to
/// the first client, and a sink that reads `len` bytes from its first
/// client and reports their count and SHA-256.
/// The sink also reports how long the transfer took from its accept.
fn host_servers(ns: &NetNs, len: u64) -> mpsc::Receiver<Result<(u64, String, Duration), String>> {
    let (tx, rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel();
    let name = ns.0.clone();
    std::thread::spawn(move || {
        enter_netns(&name);
        let source = TcpListener::bind((HOST_IP, SOURCE_PORT)).unwrap();
        let sink = TcpListener::bind((HOST_IP, SINK_PORT)).unwrap();
        ready_tx.send(()).unwrap();
        std::thread::spawn(move || {
            let Ok((mut s, _)) = source.accept() else {
                return;
            };
            let mut buf = vec![0u8; 1 << 16];
            let mut off = 0;
            while off < len {
                let n = (len - off).min(buf.len() as u64) as usize;
                pattern(&mut buf[..n], off);
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
                off += n as u64;
            }
        });
        let res = (|| {
            let (mut s, _) = sink.accept().map_err(|e| e.to_string())?;
            let started = Instant::now();
            s.set_read_timeout(Some(Duration::from_secs(600)))
                .map_err(|e| e.to_string())?;
            let mut h = Sha256::new();
            let mut total = 0u64;
            let mut buf = vec![0u8; 1 << 16];
            while total < len {
                let want = (len - total).min(buf.len() as u64) as usize;
                let n = s.read(&mut buf[..want]).map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                total += n as u64;
            }
            Ok((total, format!("{:x}", h.finalize()), started.elapsed()))
        })();
        let _ = tx.send(res);
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the host servers did not start");
    rx
}

#[test]
fn tap_ping_and_tcp_both_ways() {
    require_kvm();
    let mib: u64 = std::env::var("KILN_NET_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_MIB);
    let len = mib << 20;
    let ns = NetNs::new(&format!("kiln-net-{}", std::process::id()));
    let results = host_servers(&ns, len);
    let dir = scratch("net-e2e");

    let cmd = format!(
        "ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0 && echo NET-UP; \
         cat /sys/class/net/eth0/address; cat /sys/class/net/eth0/mtu; \
         ping -c 3 -W 10 {HOST_IP} && echo PING-OK; \
         kiln-vsock tcp pipe {HOST_IP} {SOURCE_PORT} {HOST_IP} {SINK_PORT} && echo TCP-DONE; \
         echo FEATURES=$(cat /sys/class/net/eth0/device/features); cat /proc/net/snmp"
    );
    let extra = format!(
        r#", "network-interfaces": [{{ "iface_id": "eth0", "host_dev_name": "{TAP}",
              "guest_mac": "{GUEST_MAC}", "rx_rate_limiter": null }}]"#
    );
    let config = dir.join("vm.json");
    std::fs::write(&config, initramfs_config(1, &cmd, &extra)).unwrap();

    let started = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.0, env!("CARGO_BIN_EXE_kiln")])
        .arg("--config-file")
        .arg(&config)
        .args(["--log-level", "info"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = finish(&mut child, BOOT_TIMEOUT + Duration::from_secs(600));
    let (console, log) = (text(&out.stdout), text(&out.stderr));
    eprintln!("net test: {mib} MiB, guest ran {:?}", started.elapsed());
    let ctx = format!("console:\n{console}\nkiln's log:\n{log}");
    // The guest's TCP counters (retransmissions) and the device's drops.
    for line in console.lines().chain(log.lines()) {
        if line.starts_with("Tcp:") || line.starts_with("FEATURES=") || line.contains("net eth0") {
            eprintln!("net test: {line}");
        }
    }
    assert!(out.status.success(), "kiln exited {}; {ctx}", out.status);
    assert!(console.contains("NET-UP"), "{ctx}");
    assert!(console.contains(GUEST_MAC), "{ctx}");
    assert!(console.contains("PING-OK"), "{ctx}");
    assert!(
        console.contains("3 packets transmitted, 3 packets received"),
        "{ctx}"
    );
    assert!(console.contains("TCP-DONE"), "{ctx}");
    // The guest took the tap's offloads (the virtio bus's feature bits,
    // bit 0 first).
    let features = console
        .lines()
        .find_map(|l| l.trim().strip_prefix("FEATURES="))
        .unwrap_or_else(|| panic!("no feature bits; {ctx}"));
    for bit in OFFLOAD_BITS {
        assert_eq!(
            features.as_bytes().get(bit),
            Some(&b'1'),
            "feature bit {bit} not negotiated: {features}"
        );
    }
    let (total, sha, took) = results
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("the sink reported nothing ({e}); {ctx}"))
        .unwrap_or_else(|e| panic!("the sink failed: {e}; {ctx}"));
    eprintln!(
        "net test: {mib} MiB each way through the guest in {took:?} ({:.0} KiB/s)",
        (mib * 1024) as f64 / took.as_secs_f64()
    );
    assert_eq!(total, len, "bytes back through the guest; {ctx}");
    assert_eq!(sha, expected_sha(len), "the guest's stream differs");
    drop(ns);
    let _ = std::fs::remove_dir_all(&dir);
}
