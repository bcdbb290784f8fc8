//! Load: many short-lived VMs, one after another and 8 at a time (tiny
//! guests: each prints READY, counts for a moment, resets). Not part of
//! `cargo test` (it is `#[ignore]`d: minutes of load); `tools/soak` runs it.
//!
//! Each kiln process is sampled while its guest runs (after READY): its open
//! file descriptors, threads and Rss must not grow from the first VMs to the
//! last (a leak would show as a trend: every kiln runs the same guest), and
//! every VM must end cleanly (exit 0, no process left behind).

// Tests: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Test guests are built from small constants: truncation cannot happen.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::Child;
use std::time::{Duration, Instant};

use common::*;
use iced_x86::code_asm::*;

/// Prints READY, spins for a moment (so kiln can be sampled), resets.
fn soak_guest() -> Vec<u8> {
    assemble(|a| {
        let mut msg = a.create_label();
        let mut next = a.create_label();
        let mut spin = a.create_label();
        a.mov(dx, 0x3f8u32).unwrap();
        a.lea(rsi, ptr(msg)).unwrap();
        a.mov(ecx, 6u32).unwrap();
        a.set_label(&mut next).unwrap();
        a.lodsb().unwrap();
        a.out(dx, al).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(next).unwrap();
        a.mov(ecx, 300_000u32).unwrap();
        a.set_label(&mut spin).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(spin).unwrap();
        a.mov(al, 0xfeu32).unwrap();
        a.out(0x64u32, al).unwrap();
        a.hlt().unwrap();
        a.set_label(&mut msg).unwrap();
        a.db(b"READY\n").unwrap();
    })
}

/// What one kiln process held while its guest ran.
#[derive(Clone, Copy, Debug)]
struct Sample {
    fds: usize,
    threads: usize,
    rss_kib: u64,
}

fn sample(pid: u32) -> Sample {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    Sample {
        fds: std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count(),
        threads: field("Threads:") as usize,
        rss_kib: field("VmRSS:"),
    }
}

/// Waits for READY, samples, waits for a clean end.
fn ready_then_sample(child: &mut Child) -> Sample {
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "READY\n", "the guest did not start");
    let s = sample(child.id());
    let rest = read_all(out.into_inner());
    let status = wait_timeout(child, Duration::from_secs(60)).expect("kiln did not end");
    let err = text(&read_all(child.stderr.take().unwrap()).join().unwrap());
    assert_eq!(status.code(), Some(0), "stderr: {err}");
    rest.join().unwrap();
    s
}

fn report(name: &str, samples: &[Sample], took: Duration) {
    let median = |mut v: Vec<u64>| {
        v.sort_unstable();
        v[v.len() / 2]
    };
    let tenth = samples.len() / 10;
    let first = &samples[..tenth];
    let last = &samples[samples.len() - tenth..];
    let rss = |s: &[Sample]| median(s.iter().map(|x| x.rss_kib).collect());
    let fds: Vec<usize> = samples.iter().map(|s| s.fds).collect();
    let threads: Vec<usize> = samples.iter().map(|s| s.threads).collect();
    println!(
        "{name}: {} VMs in {:.1} s; per kiln: fds {}..{}, threads {}..{}, Rss median {} KiB (first tenth) -> {} KiB (last tenth)",
        samples.len(),
        took.as_secs_f64(),
        fds.iter().min().unwrap(),
        fds.iter().max().unwrap(),
        threads.iter().min().unwrap(),
        threads.iter().max().unwrap(),
        rss(first),
        rss(last)
    );
    assert_eq!(fds.iter().min(), fds.iter().max(), "{name}: open fds vary");
    assert_eq!(
        threads.iter().min(),
        threads.iter().max(),
        "{name}: threads vary"
    );
    assert!(
        rss(last) <= rss(first) + 1024,
        "{name}: Rss grew from {} to {} KiB",
        rss(first),
        rss(last)
    );
}

fn runs() -> usize {
    std::env::var("KILN_SOAK_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

#[test]
#[ignore = "minutes of load: tools/soak runs it"]
fn soak_one_after_another_and_eight_at_a_time() {
    let dir = scratch("soak");
    let config = write_vm(&dir, &elf_image(&soak_guest()), 1, "");
    let n = runs();

    let start_at = Instant::now();
    let samples: Vec<Sample> = (0..n)
        .map(|_| ready_then_sample(&mut start_kiln(&config, &[])))
        .collect();
    report("one after another", &samples, start_at.elapsed());

    let start_at = Instant::now();
    let mut samples = Vec::new();
    for batch in 0..n.div_ceil(8) {
        let count = 8.min(n - batch * 8);
        // Each kiln is read and waited for on a thread of its own.
        let threads: Vec<_> = (0..count)
            .map(|_| {
                let mut child = start_kiln(&config, &[]);
                std::thread::spawn(move || ready_then_sample(&mut child))
            })
            .collect();
        samples.extend(threads.into_iter().map(|t| t.join().unwrap()));
    }
    report("8 at a time", &samples, start_at.elapsed());
    std::fs::remove_dir_all(&dir).unwrap();
}
