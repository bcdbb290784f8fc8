//! `kiln run` end to end: each test boots the guest kernel (15–30 s on hosts
//! whose KVM interprets guest kernel code), so each boot checks several
//! things at once. The kernel comes from tools/build-guest-kernel; the image
//! is kiln's default (busybox), built on first use.

// Tests: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{
    guest_artifact, kiln_run_as_a_normal_user, own_uid, read_all, require_kvm, scratch, text,
    wait_timeout,
};

/// A generous bound for one run: a boot here is up to 30 s, more with the
/// other core busy.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// `kiln run` with the test's kernel, one vCPU and 256 MiB, and a run
/// directory of the test's own (so leftovers can be counted).
fn kiln_run(runtime: &Path) -> Command {
    require_kvm();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.arg("run")
        .arg("--kernel")
        .arg(guest_artifact("vmlinux"))
        .args(["--cpus", "1", "--memory", "256"])
        .env("XDG_RUNTIME_DIR", runtime)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs to the end with no stdin and returns what it printed.
fn output(mut cmd: Command) -> Output {
    let mut child = cmd.spawn().expect("cannot start kiln");
    finish(&mut child)
}

fn finish(child: &mut Child) -> Output {
    common::finish(child, RUN_TIMEOUT)
}

fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout[..out.stdout.len().min(4096)]),
        text(&out.stderr[..out.stderr.len().min(4096)])
    )
}

/// The run directory base is empty: nothing left behind.
fn assert_no_leftovers(runtime: &Path) {
    let base = runtime.join(format!("kiln-{}", own_uid()));
    let left: Vec<_> = std::fs::read_dir(&base)
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Binary stdin in (every byte value, EOF included) comes back on stdout,
/// followed by 4 MiB more; 5 MiB of another pattern on stderr: 10 MiB of
/// output, kept apart and complete, and the command's exit code. (Each MiB
/// a guest moves through pipes costs seconds where KVM interprets guest
/// kernel code, hence not more.)
#[test]
fn streams_stdin_and_exit_code() {
    let dir = scratch("run-streams");
    let input: Vec<u8> = (0..1 << 20)
        .map(|i: u32| i.wrapping_mul(2_654_435_761).to_le_bytes()[1])
        .collect();
    const MIB: usize = 1 << 20;
    let mut cmd = kiln_run(&dir);
    cmd.args(["-i", "--", "sh", "-c"])
        .arg(format!(
            "cat; yes stdout-line | head -c {}; yes stderr-line | head -c {} >&2; exit 42",
            4 * MIB,
            5 * MIB
        ))
        .stdin(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = {
        let input = input.clone();
        std::thread::spawn(move || {
            stdin.write_all(&input).unwrap();
            // Dropped: EOF, which `cat` must see to end.
        })
    };
    let out = finish(&mut child);
    writer.join().unwrap();
    assert_eq!(out.status.code(), Some(42), "{}", describe(&out));
    let pattern =
        |line: &[u8], n: usize| -> Vec<u8> { line.iter().copied().cycle().take(n).collect() };
    let mut expected = input.clone();
    expected.extend(pattern(b"stdout-line\n", 4 * MIB));
    assert!(
        out.stdout == expected,
        "stdout is not stdin + 4 MiB: {} bytes of {}, first difference at {:?}",
        out.stdout.len(),
        expected.len(),
        out.stdout.iter().zip(&expected).position(|(a, b)| a != b)
    );
    assert!(
        out.stderr == pattern(b"stderr-line\n", 5 * MIB),
        "stderr is not the 5 MiB pattern: {} bytes, starting {}",
        out.stderr.len(),
        text(&out.stderr[..out.stderr.len().min(200)])
    );
    assert_no_leftovers(&dir);
}

/// A line the command prints reaches the host while it still runs; SIGTERM
/// to kiln reaches the command, whose exit code kiln returns.
#[test]
fn live_output_and_sigterm() {
    let dir = scratch("run-signal");
    let mut cmd = kiln_run(&dir);
    cmd.args(["--", "sh", "-c"])
        .arg("trap 'echo got-term; exit 3' TERM; echo ready; while :; do sleep 1; done");
    let mut child = cmd.spawn().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let stderr = read_all(child.stderr.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n", "stderr: {}", text(&stderr.join().unwrap()));
    assert!(
        child.try_wait().unwrap().is_none(),
        "kiln ended before the command did"
    );
    // SAFETY-free: `kill` the binary.
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let status = wait_timeout(&mut child, RUN_TIMEOUT).expect("kiln did not end");
    let err = text(&stderr.join().unwrap());
    assert_eq!(rest, "got-term\n", "stderr: {err}");
    assert_eq!(status.code(), Some(3), "stderr: {err}");
    assert_no_leftovers(&dir);
}

/// `-t` runs the command on a terminal; --env, --workdir and --user set its
/// environment, directory and identity.
#[test]
fn tty_env_workdir_user() {
    let dir = scratch("run-tty");
    let mut cmd = kiln_run(&dir);
    cmd.args(["-t", "-e", "GREETING=hello world", "--workdir", "/tmp", "--user", "1000:1001"])
        .args(["--", "sh", "-c"])
        .arg("test -t 0 && test -t 1 && echo tty=yes; echo \"env=$GREETING\"; echo \"pwd=$(pwd)\"; echo \"id=$(id -u):$(id -g)\"");
    let out = output(cmd);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    // A terminal turns "\n" into "\r\n".
    let got = text(&out.stdout).replace("\r\n", "\n");
    for want in [
        "tty=yes\n",
        "env=hello world\n",
        "pwd=/tmp\n",
        "id=1000:1001\n",
    ] {
        assert!(got.contains(want), "{want:?} missing from {got:?}");
    }
    assert_no_leftovers(&dir);
}

/// A read-write mount writes through to the host, a read-only one refuses
/// writes, and what the command writes to / never reaches the image.
#[test]
fn mounts_and_overlay() {
    let dir = scratch("run-mounts");
    let rw = dir.join("rw");
    let ro = dir.join("ro");
    std::fs::create_dir_all(&rw).unwrap();
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::write(ro.join("given"), "from the host\n").unwrap();
    let image = dir.join("image.ext4");
    make_image(&dir, &image);
    let before = std::fs::read(&image).unwrap();
    let mut cmd = kiln_run(&dir);
    cmd.arg("--image")
        .arg(&image)
        .arg("--mount")
        .arg(format!("{}:/work", rw.display()))
        .arg("--mount")
        .arg(format!("{}:/data:ro", ro.display()))
        .args(["--", "sh", "-c"])
        .arg(
            "echo made-in-guest > /work/new; cat /data/given; \
             if echo x > /data/refused; then echo ro-write-worked; fi; \
             echo scribble > /etc/scribble && cat /etc/scribble; exit 1",
        );
    let out = output(cmd);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let got = text(&out.stdout);
    assert_eq!(got, "from the host\nscribble\n", "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("Read-only file system"),
        "{}",
        describe(&out)
    );
    assert_eq!(
        std::fs::read_to_string(rw.join("new")).unwrap(),
        "made-in-guest\n"
    );
    assert!(!ro.join("refused").exists());
    assert!(
        std::fs::read(&image).unwrap() == before,
        "the image changed"
    );
    assert_no_leftovers(&dir);
}

/// An ext4 image of the test's own: busybox as sh (Debian's busybox ash
/// runs its applets without links), made with mke2fs -d.
fn make_image(dir: &Path, to: &Path) {
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::copy("/bin/busybox", tree.join("bin/busybox"))
        .expect("this test needs Debian's busybox-static (.ci/run installs it)");
    std::os::unix::fs::symlink("busybox", tree.join("bin/sh")).unwrap();
    std::fs::write(tree.join("etc/passwd"), "root:x:0:0::/:/bin/sh\n").unwrap();
    let ok = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(&tree)
        .arg(to)
        .arg("16M")
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success(), "mke2fs failed");
}

/// Three runs at once, each with its own outcome: not found (127), not
/// executable (126), killed by SIGKILL (128+9), and none sees another's.
#[test]
fn three_at_once_and_failure_codes() {
    let dir = scratch("run-three");
    let cases: [(&[&str], i32); 3] = [
        (&["no-such-command"], 127),
        (&["/etc/passwd"], 126),
        (&["sh", "-c", "echo $MARK; kill -9 $$"], 137),
    ];
    let children: Vec<_> = cases
        .iter()
        .enumerate()
        .map(|(i, (argv, _))| {
            let mut cmd = kiln_run(&dir);
            cmd.args(["-e", &format!("MARK=run-{i}"), "--"]).args(*argv);
            cmd.spawn().unwrap()
        })
        .collect();
    for ((mut child, (argv, code)), i) in children.into_iter().zip(cases).zip(0..) {
        let out = finish(&mut child);
        assert_eq!(
            out.status.code(),
            Some(code),
            "{argv:?}: {}",
            describe(&out)
        );
        if i == 2 {
            assert_eq!(text(&out.stdout), "run-2\n");
        } else {
            assert!(out.stdout.is_empty(), "{}", describe(&out));
            assert!(text(&out.stderr).contains(argv[0]), "{}", describe(&out));
        }
    }
    assert_no_leftovers(&dir);
}

/// --timeout stops the command and kiln returns 124.
#[test]
fn timeout_is_124() {
    let dir = scratch("run-timeout");
    let mut cmd = kiln_run(&dir);
    cmd.args([
        "--timeout",
        "3s",
        "--",
        "sh",
        "-c",
        "echo started; sleep 600",
    ]);
    let start = Instant::now();
    let out = output(cmd);
    assert_eq!(out.status.code(), Some(124), "{}", describe(&out));
    assert_eq!(text(&out.stdout), "started\n");
    assert!(
        text(&out.stderr).contains("--timeout"),
        "{}",
        describe(&out)
    );
    assert!(
        start.elapsed() < Duration::from_secs(200),
        "took {:?}",
        start.elapsed()
    );
    assert_no_leftovers(&dir);
}

/// Bad flags and missing files end with 125 and a message naming them,
/// before any VM is built.
#[test]
fn usage_errors_are_125() {
    let dir = scratch("run-usage");
    let cases: [(&[&str], &str); 4] = [
        (
            &["--mount", "/nonexistent-kiln-test:/x", "--", "true"],
            "/nonexistent-kiln-test",
        ),
        (&["--cpus", "0", "--", "true"], "--cpus"),
        (&["--timeout", "soon", "--", "true"], "--timeout"),
        (
            &["--image", "/nonexistent-kiln-image", "--", "true"],
            "/nonexistent-kiln-image",
        ),
    ];
    for (args, named) in cases {
        let mut cmd = kiln_run(&dir);
        // Later flags win: the test's --cpus 1 is overridden where asked.
        cmd.args(args);
        let out = output(cmd);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {}", describe(&out));
        assert!(
            text(&out.stderr).contains(named),
            "{args:?}: {}",
            describe(&out)
        );
    }
    assert_no_leftovers(&dir);
}

/// kiln killed with SIGKILL mid-run leaves no process; its run directory is
/// removed by the next run.
#[test]
fn sigkill_leaves_nothing_behind() {
    let dir = scratch("run-sigkill");
    let mut cmd = kiln_run(&dir);
    cmd.args(["--", "sh", "-c", "echo ready; sleep 600"]);
    let mut child = cmd.spawn().unwrap();
    let pid = child.id();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let stderr = read_all(child.stderr.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n", "stderr: {}", text(&stderr.join().unwrap()));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "kiln's process is still there"
    );
    let base = dir.join(format!("kiln-{}", own_uid()));
    let left = std::fs::read_dir(&base).unwrap().count();
    assert_eq!(
        left, 1,
        "the killed run's directory should be there until the next run"
    );
    // The next run (here one that fails before booting) removes it.
    let out = output({
        let mut c = kiln_run(&dir);
        c.args(["--mount", "/nonexistent-kiln-test:/x", "--", "true"]);
        c
    });
    assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
    assert_no_leftovers(&dir);
}

/// Everything above works for a user who is not root but may open
/// /dev/kvm (through its group, as Debian sets it up).
#[test]
fn runs_as_a_normal_user() {
    require_kvm();
    let dir = scratch("run-rootless");
    let (mut c, uid) = kiln_run_as_a_normal_user(&dir);
    let share = dir.join("share");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::set_permissions(&share, std::fs::Permissions::from_mode(0o777)).unwrap();
    // An OCI archive, unpacked by the user: its root-owned files must stay
    // root's in the guest (kiln sets owners inside the ext4 image).
    let archive = dir.join("image.oci.tar");
    oci_archive(&archive);
    std::fs::set_permissions(&archive, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = output({
        c.arg("--mount")
            .arg(format!("{}:/out", share.display()))
            .arg("--image")
            .arg(&archive)
            .args([
                "--",
                "sh",
                "-c",
                "echo from-guest > /out/file; id -u; stat -c %u:%g /bin/busybox /etc/kept",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    });
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    // Root in the guest, the user on the host.
    assert_eq!(text(&out.stdout), "0\n0:0\n0:0\n");
    let file = share.join("file");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "from-guest\n");
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&file.metadata().unwrap()),
        uid
    );
    assert_no_leftovers_of(&dir.join(format!("kiln-{uid}")));
    std::fs::remove_dir_all(&dir).unwrap();
}

fn assert_no_leftovers_of(base: &Path) {
    let left: Vec<_> = std::fs::read_dir(base)
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// A tar archive of `(path, mode, content or symlink target)` entries,
/// owned by root.
fn tar_of<P: AsRef<str>>(entries: &[(P, u32, Entry)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, mode, entry) in entries {
        let path = path.as_ref();
        let mut h = tar::Header::new_ustar();
        h.set_mode(*mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        match entry {
            Entry::File(data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, path, &data[..]).unwrap();
            }
            Entry::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                b.append_data(&mut h, path, std::io::empty()).unwrap();
            }
            Entry::Link(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, path, target).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

enum Entry {
    File(Vec<u8>),
    Dir,
    Link(&'static str),
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An OCI archive (what `podman save --format oci-archive` writes) with
/// two layers: busybox and some files, then (gzip'd) a whiteout of one of
/// them and a new one; the config's Cmd checks all that and exits 7.
fn oci_archive(path: &Path) {
    let busybox = std::fs::read("/bin/busybox")
        .expect("this test needs Debian's busybox-static (.ci/run installs it)");
    let layer1 = tar_of(&[
        ("bin", 0o755, Entry::Dir),
        ("bin/busybox", 0o755, Entry::File(busybox)),
        ("bin/sh", 0o777, Entry::Link("busybox")),
        ("etc", 0o755, Entry::Dir),
        (
            "etc/passwd",
            0o644,
            Entry::File(b"root:x:0:0::/:/bin/sh\n".to_vec()),
        ),
        (
            "etc/removed",
            0o644,
            Entry::File(b"must not be seen\n".to_vec()),
        ),
        ("etc/kept", 0o644, Entry::File(b"kept\n".to_vec())),
    ]);
    let layer2_tar = tar_of(&[
        ("etc/.wh.removed", 0o644, Entry::File(Vec::new())),
        ("etc/added", 0o644, Entry::File(b"added\n".to_vec())),
    ]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&layer2_tar).unwrap();
    let layer2 = gz.finish().unwrap();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin", "FROM_IMAGE=yes"],
            "WorkingDir": "/etc",
            "Cmd": ["/bin/sh", "-c", "test ! -e /etc/removed && cat kept added && echo $FROM_IMAGE; exit 7"],
        },
        "rootfs": {
            "type": "layers",
            "diff_ids": [format!("sha256:{}", sha256_hex(&layer1)), format!("sha256:{}", sha256_hex(&layer2_tar))],
        },
    })
    .to_string()
    .into_bytes();
    let desc = |media: &str, blob: &[u8]| serde_json::json!({ "mediaType": media, "digest": format!("sha256:{}", sha256_hex(blob)), "size": blob.len() });
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": desc("application/vnd.oci.image.config.v1+json", &config),
        "layers": [
            desc("application/vnd.oci.image.layer.v1.tar", &layer1),
            desc("application/vnd.oci.image.layer.v1.tar+gzip", &layer2),
        ],
    })
    .to_string()
    .into_bytes();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [desc("application/vnd.oci.image.manifest.v1+json", &manifest)],
    })
    .to_string()
    .into_bytes();
    let mut files: Vec<(String, u32, Entry)> = vec![
        (
            "oci-layout".into(),
            0o644,
            Entry::File(br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()),
        ),
        ("index.json".into(), 0o644, Entry::File(index)),
    ];
    for blob in [layer1, layer2, config, manifest] {
        files.push((
            format!("blobs/sha256/{}", sha256_hex(&blob)),
            0o644,
            Entry::File(blob),
        ));
    }
    std::fs::write(path, tar_of(&files)).unwrap();
}

/// An OCI archive the test made: layers applied with the whiteout, the
/// image's Env, WorkingDir and Cmd used when no command is given.
#[test]
fn oci_archive_with_whiteout_and_image_cmd() {
    let dir = scratch("run-oci");
    let archive = dir.join("image.oci.tar");
    oci_archive(&archive);
    let mut cmd = kiln_run(&dir);
    // A cache of the test's own: the image is unpacked, not found cached.
    cmd.env("XDG_CACHE_HOME", dir.join("cache"))
        .arg("--image")
        .arg(&archive);
    let out = output(cmd);
    assert_eq!(out.status.code(), Some(7), "{}", describe(&out));
    assert_eq!(
        text(&out.stdout),
        "kept\nadded\nyes\n",
        "{}",
        describe(&out)
    );
    let cached: Vec<_> = std::fs::read_dir(dir.join("cache/kiln/images"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(cached.iter().any(|n| n.ends_with(".ext4")), "{cached:?}");
    assert!(!cached.iter().any(|n| n.starts_with("tmp-")), "{cached:?}");
    assert_no_leftovers(&dir);
}

/// A damaged archive ends with 125 and a message naming it, before any VM.
#[test]
fn malformed_archives_are_125() {
    let dir = scratch("run-bad-oci");
    let good = dir.join("good.tar");
    oci_archive(&good);
    let bytes = std::fs::read(&good).unwrap();
    let truncated = dir.join("truncated.tar");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    // One byte of busybox changed: its layer no longer matches its digest.
    let tampered = dir.join("tampered.tar");
    let mut t = bytes.clone();
    let at = t.windows(4).position(|w| w == b"\x7fELF").unwrap() + 100;
    t[at] ^= 0xff;
    std::fs::write(&tampered, &t).unwrap();
    for (bad, says) in [(&truncated, "truncated"), (&tampered, "digest")] {
        let mut cmd = kiln_run(&dir);
        cmd.env("XDG_CACHE_HOME", dir.join("cache"))
            .arg("--image")
            .arg(bad)
            .args(["--", "true"]);
        let out = output(cmd);
        assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
        let err = text(&out.stderr);
        assert!(err.contains(&bad.display().to_string()), "{err}");
        assert!(err.to_lowercase().contains(says), "{says:?} not in: {err}");
    }
    assert_no_leftovers(&dir);
}

/// The session thread is under its seccomp filter before the command
/// starts: the test-only hook makes it call getppid, which its filter
/// forbids, and kiln fails (125) saying so. (The filter's contents are
/// checked in src/seccomp's tests; every test here runs with it.)
#[test]
fn the_session_thread_is_filtered() {
    let dir = scratch("run-seccomp");
    let mut cmd = kiln_run(&dir);
    cmd.env("KILN_TEST_FORBIDDEN_SYSCALL", "run")
        .args(["-q", "--", "true"]);
    let out = output(cmd);
    assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains(
            "kiln: error: the kiln run session thread made system call 110 \
             (getppid; arguments 0x1, 0x2, 0x3), which its seccomp filter forbids"
        ),
        "{}",
        describe(&out)
    );
}

/// The Debian image tools/build-image makes (an OCI archive) runs Python.
#[test]
fn debian_image_runs_python() {
    let dir = scratch("run-debian");
    let image = Command::new("tools/build-image")
        .args(["debian", "--print-path"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        image.status.success(),
        "the Debian image is not built: run tools/build-image debian (.ci/run does)"
    );
    let image = String::from_utf8(image.stdout).unwrap();
    let mut cmd = kiln_run(&dir);
    cmd.arg("--image").arg(image.trim()).args([
        "--",
        "sh",
        "-c",
        "cat /etc/debian_version; python3 -c 'print(6 * 7)'",
    ]);
    let out = output(cmd);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let got = text(&out.stdout);
    assert!(got.starts_with("12."), "{}", describe(&out));
    assert!(got.ends_with("\n42\n"), "{}", describe(&out));
    assert_no_leftovers(&dir);
}
