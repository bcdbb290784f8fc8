//! `kiln run`'s templates end to end: the first run of a VM boots and saves
//! it, later runs restore it. Each test has a cache of its own (so it sees
//! only its own templates) and boots the guest kernel two or three times
//! (15–30 s each on hosts whose KVM interprets guest kernel code); the
//! restored runs take seconds.

// Tests: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{guest_artifact, require_kvm, scratch, text};

const RUN_TIMEOUT: Duration = Duration::from_secs(300);

struct Sandbox {
    dir: common::Scratch,
}

impl Sandbox {
    fn new(name: &str) -> Self {
        let dir = scratch(name);
        for d in ["cache", "runtime", "share"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        Sandbox { dir }
    }

    fn templates(&self) -> PathBuf {
        self.dir.join("cache/kiln/templates")
    }

    /// The template directories (not locks, not builds).
    fn template_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.templates())
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| {
                        p.is_dir() && !p.file_name().unwrap().to_string_lossy().starts_with('.')
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `kiln run` with the test's kernel, cache and run directory, one
    /// vCPU and 256 MiB, logging its timeline.
    fn kiln_run(&self, args: &[&str]) -> Command {
        require_kvm();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
        cmd.arg("run")
            .arg("--kernel")
            .arg(guest_artifact("vmlinux"))
            .args(["--cpus", "1", "--memory", "256", "--log-level", "info"])
            .args(args)
            .env("XDG_CACHE_HOME", self.dir.join("cache"))
            .env("XDG_RUNTIME_DIR", self.dir.join("runtime"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut child = self.kiln_run(args).spawn().expect("cannot start kiln");
        common::finish(&mut child, RUN_TIMEOUT)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr[out.stderr.len().saturating_sub(6000)..])
    )
}

/// How the run started, from its timeline.
fn start_of(out: &Output) -> &'static str {
    let err = text(&out.stderr);
    if err.contains("timing (ms), warm:") {
        "warm"
    } else if err.contains("timing (ms), cold:") {
        "cold"
    } else {
        panic!("no timeline in kiln's log:\n{}", describe(out))
    }
}

fn ok(out: &Output) {
    assert_eq!(out.status.code(), Some(0), "{}", describe(out));
}

/// Seconds since the epoch on the host.
fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// What the probe command prints: the guest's time, a random uuid and 16
/// random bytes, and the shared file; it writes a file of its own (named
/// by another uuid: PIDs are the same in every sandbox of a template).
struct Probe {
    time: u64,
    uuid: String,
    random: String,
    shared: String,
}

const PROBE: &str = "date +%s; cat /proc/sys/kernel/random/uuid; \
    head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; cat /m/in; \
    echo written > /m/out-$(cat /proc/sys/kernel/random/uuid)";

fn probe(out: &Output) -> Probe {
    ok(out);
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{}", describe(out));
    Probe {
        time: lines[0].parse().expect("date +%s"),
        uuid: lines[1].into(),
        random: lines[2].into(),
        shared: lines[3].into(),
    }
}

/// Two first runs at once build the template once (one boots, the other
/// waits and restores it); restored runs have the host's time (the
/// template is seconds old), randomness of their own, and working vsock
/// (their output) and virtio-fs (a folder chosen per run, both ways).
#[test]
fn first_runs_build_once_and_restored_runs_are_their_own() {
    let sb = Sandbox::new("warm-first");
    let share = sb.dir.join("share");
    std::fs::write(share.join("in"), "from the host\n").unwrap();
    let mount = format!("{}:/m", share.display());
    let args = ["--mount", &mount, "--", "sh", "-c", PROBE];

    let children: Vec<_> = (0..2)
        .map(|_| sb.kiln_run(&args).spawn().unwrap())
        .collect();
    let outs: Vec<Output> = children
        .into_iter()
        .map(|mut c| common::finish(&mut c, RUN_TIMEOUT))
        .collect();
    let mut starts: Vec<&str> = outs.iter().map(start_of).collect();
    starts.sort();
    assert_eq!(starts, ["cold", "warm"], "one builds, one restores");
    let first: Vec<Probe> = outs.iter().map(probe).collect();
    assert_eq!(sb.template_dirs().len(), 1);

    // Old enough that a guest clock left as it was would be off.
    std::thread::sleep(Duration::from_secs(4));
    let before = now();
    let out = sb.run(&args);
    let after = now();
    assert_eq!(start_of(&out), "warm", "{}", describe(&out));
    let p = probe(&out);
    assert!(
        p.time + 2 >= before && p.time <= after + 2,
        "guest clock {} vs host {before}..{after}",
        p.time
    );
    let all: Vec<&Probe> = first.iter().chain([&p]).collect();
    for (i, a) in all.iter().enumerate() {
        assert_eq!(a.shared, "from the host");
        for b in &all[i + 1..] {
            assert_ne!(a.uuid, b.uuid, "two sandboxes shared a uuid");
            assert_ne!(a.random, b.random, "two sandboxes shared /dev/urandom");
        }
    }
    let written = std::fs::read_dir(&share)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("out-")
        })
        .count();
    assert_eq!(written, 3, "every run wrote to the shared folder");
}

/// A template whose memory file was cut short is not trusted: the run
/// boots cold with a warning, rebuilds it, and the next run is warm again.
/// --cold boots even with a template; --prune removes templates.
#[test]
fn broken_templates_are_rebuilt_cold_and_prune_clears_them() {
    let sb = Sandbox::new("warm-broken");
    let echo = ["--", "echo", "hi"];
    let out = sb.run(&echo);
    ok(&out);
    assert_eq!(start_of(&out), "cold");
    let dirs = sb.template_dirs();
    assert_eq!(dirs.len(), 1, "{}", describe(&out));
    let mem = dirs[0].join("vm.mem");
    let size = std::fs::metadata(&mem).unwrap().len();
    assert_eq!(size, 256 << 20);
    for f in ["vm.mem", "vm.state"] {
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dirs[0].join(f)).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    std::fs::File::options()
        .write(true)
        .open(&mem)
        .unwrap()
        .set_len(size / 2)
        .unwrap();

    let out = sb.run(&echo);
    ok(&out);
    assert_eq!(text(&out.stdout), "hi\n");
    assert_eq!(start_of(&out), "cold");
    let err = text(&out.stderr);
    assert!(
        err.contains("WARN") && err.contains("cannot be used") && err.contains("vm.mem"),
        "no warning naming the broken file:\n{err}"
    );
    assert_eq!(std::fs::metadata(&mem).unwrap().len(), size, "rebuilt");

    let out = sb.run(&["--cold", "--", "echo", "cold"]);
    ok(&out);
    assert_eq!(start_of(&out), "cold");
    assert_eq!(text(&out.stdout), "cold\n");

    let out = sb.run(&echo);
    assert_eq!(start_of(&out), "warm", "{}", describe(&out));
    assert_eq!(text(&out.stdout), "hi\n");

    let out = sb.run(&["--prune"]);
    ok(&out);
    assert!(
        text(&out.stderr).contains("removed 1 templates"),
        "{}",
        describe(&out)
    );
    assert!(sb.template_dirs().is_empty());
    assert_no_leftovers(&sb.dir.join("runtime"));
}

fn assert_no_leftovers(runtime: &Path) {
    let left: Vec<_> = std::fs::read_dir(runtime)
        .unwrap()
        .filter_map(Result::ok)
        .flat_map(|e| std::fs::read_dir(e.path()).into_iter().flatten())
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
