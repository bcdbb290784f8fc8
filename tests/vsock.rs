//! End-to-end virtio-vsock: the project's guest (its /bin/kiln-vsock, from
//! resources/guest/kiln-vsock.c) and host sockets speaking Firecracker's
//! protocol, in one boot:
//! - guest→host: a connect to an absent host socket gets a reset; an echo
//!   through a host listener; 64 MiB sent to the host arrive intact;
//! - host→guest: CONNECT to a port nobody listens on is closed; an echo
//!   through the guest's listener; 64 MiB sent to the guest arrive intact
//!   (the guest reports count and checksum).
//!
//! The guest kernel's vsock and virtio code is interpreted on kvm_pvm
//! hosts (about 1 MiB/s each way), so this test takes a few minutes there.

// Tests: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Test data is built from small constants: truncation cannot happen.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

const BIG: u64 = 64 << 20;
const ECHO_BYTES: u64 = 1 << 20;
/// Seeds of the two big transfers' patterns.
const TO_HOST_SEED: u8 = 5;
const TO_GUEST_SEED: u8 = 9;

/// Byte `i` of the pattern with `seed`, as kiln-vsock makes it.
fn pattern(buf: &mut [u8], offset: u64, seed: u8) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = ((offset + i as u64) * 31 + u64::from(seed)) as u8;
    }
}

/// FNV-1a 64, as kiln-vsock computes it.
fn fnv1a(mut h: u64, data: &[u8]) -> u64 {
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}
const FNV_INIT: u64 = 0xcbf2_9ce4_8422_2325;

fn expected_hash(len: u64, seed: u8) -> u64 {
    let mut h = FNV_INIT;
    let mut buf = vec![0u8; 1 << 16];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        pattern(&mut buf[..n], off, seed);
        h = fnv1a(h, &buf[..n]);
        off += n as u64;
    }
    h
}

fn port_path(uds: &Path, port: u32) -> PathBuf {
    PathBuf::from(format!("{}_{port}", uds.display()))
}

/// Host side of guest-initiated connections: an echo server at
/// `<uds>_53` and a sink at `<uds>_54` that checks the data and answers
/// `<bytes> <hash>`. Each serves one connection.
fn host_servers(uds: &Path) -> Vec<JoinHandle<Result<(), String>>> {
    let echo = UnixListener::bind(port_path(uds, 53)).unwrap();
    let sink = UnixListener::bind(port_path(uds, 54)).unwrap();
    let echo = std::thread::spawn(move || {
        let (mut s, _) = echo.accept().map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = s.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                return Ok(());
            }
            s.write_all(&buf[..n]).map_err(|e| e.to_string())?;
        }
    });
    let sink = std::thread::spawn(move || {
        let (mut s, _) = sink.accept().map_err(|e| e.to_string())?;
        let (mut total, mut h) = (0u64, FNV_INIT);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = s.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            h = fnv1a(h, &buf[..n]);
            total += n as u64;
        }
        writeln!(s, "{total} {h:016x}").map_err(|e| e.to_string())?;
        let want = expected_hash(BIG, TO_HOST_SEED);
        if (total, h) != (BIG, want) {
            return Err(format!(
                "guest->host: got {total} bytes hash {h:016x}, want {BIG} {want:016x}"
            ));
        }
        Ok(())
    });
    vec![echo, sink]
}

/// `CONNECT port` on the device's socket; the acknowledgement line, or
/// None when kiln closed the connection.
fn host_connect(uds: &Path, port: u32) -> (UnixStream, Option<String>) {
    let mut s = UnixStream::connect(uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8];
    while s.read(&mut byte).unwrap_or(0) == 1 {
        line.push(byte[0]);
        if byte[0] == b'\n' {
            return (s, Some(String::from_utf8_lossy(&line).into_owned()));
        }
    }
    (s, None)
}

/// Host-initiated connections, once the guest listens on port 52.
fn host_client(uds: PathBuf, console: Capture) -> JoinHandle<Result<(), String>> {
    std::thread::spawn(move || {
        let start = Instant::now();
        while !console.text().contains("LISTENING 52") {
            if start.elapsed() > BOOT_TIMEOUT {
                return Err("the guest never listened on port 52".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Nobody listens on 77: kiln closes the connection.
        if let (_, Some(line)) = host_connect(&uds, 77) {
            return Err(format!("CONNECT 77 answered {line:?}, want a close"));
        }
        // Echo through the guest's listener.
        let (mut s, ok) = host_connect(&uds, 52);
        let ok = ok.ok_or("CONNECT 52 (echo) was closed")?;
        if !ok.starts_with("OK ") {
            return Err(format!("CONNECT 52 answered {ok:?}"));
        }
        let mut data = vec![0u8; ECHO_BYTES as usize];
        pattern(&mut data, 0, 3);
        let writer = {
            let mut s = s.try_clone().unwrap();
            let data = data.clone();
            std::thread::spawn(move || {
                s.write_all(b"ECHO\n")?;
                s.write_all(&data)?;
                s.shutdown(std::net::Shutdown::Write)
            })
        };
        let mut back = Vec::new();
        s.read_to_end(&mut back).map_err(|e| e.to_string())?;
        writer.join().unwrap().map_err(|e| e.to_string())?;
        if back != data {
            return Err(format!(
                "echo came back with {} bytes, differing",
                back.len()
            ));
        }
        // 64 MiB to the guest; it answers count and checksum.
        let (mut s, ok) = host_connect(&uds, 52);
        ok.ok_or("CONNECT 52 (sink) was closed")?;
        s.write_all(b"SINK\n").unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let mut off = 0;
        while off < BIG {
            pattern(&mut buf, off, TO_GUEST_SEED);
            s.write_all(&buf).map_err(|e| e.to_string())?;
            off += buf.len() as u64;
        }
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        BufReader::new(s)
            .read_line(&mut answer)
            .map_err(|e| e.to_string())?;
        let want = format!("{BIG} {:016x}", expected_hash(BIG, TO_GUEST_SEED));
        if answer.trim() != want {
            return Err(format!(
                "host->guest: guest counted {answer:?}, want {want:?}"
            ));
        }
        Ok(())
    })
}

#[test]
fn vsock_both_directions_with_64_mib_each_way() {
    require_kvm();
    let dir = scratch("vsock-e2e");
    let uds = dir.join("v.sock");
    let servers = host_servers(&uds);
    let console = Capture::default();
    let client = host_client(uds.clone(), console.clone());
    let cmd = format!(
        "kiln-vsock connect 99 probe; \
         kiln-vsock serve 52 2 & \
         kiln-vsock connect 53 echo {ECHO_BYTES}; \
         kiln-vsock connect 54 send {BIG} {TO_HOST_SEED}; \
         wait; echo VSOCK-DONE"
    );
    let extra = format!(
        r#", "vsock": {{ "guest_cid": 3, "uds_path": "{}" }}"#,
        uds.display()
    );
    let started = Instant::now();
    let out = boot_guest(&initramfs_config(2, &cmd, &extra), 2, &console);
    eprintln!("vsock test: guest ran {:?}", started.elapsed());
    assert!(out.contains("CONNECT-ERR=ECONNRESET"), "console:\n{out}");
    assert!(
        out.contains(&format!("ECHO-OK {ECHO_BYTES}")),
        "console:\n{out}"
    );
    let reply = format!("REPLY {BIG} {:016x}", expected_hash(BIG, TO_HOST_SEED));
    assert!(out.contains(&reply), "want {reply:?}; console:\n{out}");
    assert!(out.contains("VSOCK-DONE"), "console:\n{out}");
    for t in servers {
        t.join().unwrap().unwrap();
    }
    client.join().unwrap().unwrap();
    assert!(!uds.exists(), "kiln removes its socket when it ends");
    let _ = std::fs::remove_dir_all(&dir);
}
