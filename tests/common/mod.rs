//! Shared helpers for kiln's integration tests: tiny guests assembled in the
//! test, packed as an ELF vmlinux, booted by the `kiln` binary through the
//! same path users take (`kiln --config-file`).

// Tests: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use iced_x86::code_asm::CodeAssembler;

/// Guest physical address the test kernels are loaded at and entered.
pub const LOAD_ADDR: u64 = 0x10_0000;

/// Fails the test, loudly, when this machine has no usable /dev/kvm: KVM
/// tests must never pass by skipping.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("these tests need /dev/kvm and cannot open it ({e}); run them on a host with KVM");
    }
}

/// A scratch directory unique to one test, removed when the test is over
/// (the guard is dropped) unless it failed: a failed test's files stay for
/// a look, named in the panic's output by the test itself when it matters.
pub struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for Scratch {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A scratch directory unique to one test (see [`Scratch`]).
pub fn scratch(name: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("kiln-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

/// Packs `code` (assembled for `LOAD_ADDR`) as an ELF64 executable with one
/// PT_LOAD segment, entered at `LOAD_ADDR` through the 64-bit boot protocol.
pub fn elf_image(code: &[u8]) -> Vec<u8> {
    const EHDR: u16 = 64;
    const PHDR: u16 = 56;
    const CODE_OFFSET: usize = 0x1000;
    let mut f = vec![0u8; CODE_OFFSET];
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // ELFCLASS64
    f[5] = 1; // little endian
    f[6] = 1; // EV_CURRENT
    let put16 =
        |f: &mut Vec<u8>, at: usize, v: u16| f[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let put32 =
        |f: &mut Vec<u8>, at: usize, v: u32| f[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let put64 =
        |f: &mut Vec<u8>, at: usize, v: u64| f[at..at + 8].copy_from_slice(&v.to_le_bytes());
    put16(&mut f, 16, 2); // ET_EXEC
    put16(&mut f, 18, 0x3e); // EM_X86_64
    put32(&mut f, 20, 1);
    put64(&mut f, 24, LOAD_ADDR); // e_entry
    put64(&mut f, 32, u64::from(EHDR)); // e_phoff
    put16(&mut f, 52, EHDR); // e_ehsize
    put16(&mut f, 54, PHDR); // e_phentsize
    put16(&mut f, 56, 1); // e_phnum
    put16(&mut f, 58, 64); // e_shentsize
    let p = usize::from(EHDR);
    put32(&mut f, p, 1); // PT_LOAD
    put32(&mut f, p + 4, 7); // RWX
    put64(&mut f, p + 8, CODE_OFFSET as u64);
    put64(&mut f, p + 16, LOAD_ADDR);
    put64(&mut f, p + 24, LOAD_ADDR);
    put64(&mut f, p + 32, code.len() as u64);
    put64(&mut f, p + 40, code.len() as u64);
    put64(&mut f, p + 48, 0x1000);
    f.extend_from_slice(code);
    f
}

/// Assembles 64-bit code placed at `LOAD_ADDR`.
pub fn assemble(build: impl FnOnce(&mut CodeAssembler)) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    build(&mut a);
    a.assemble(LOAD_ADDR).unwrap()
}

/// Writes `kernel` and a config for it into `dir`; returns the config path.
pub fn write_vm(dir: &Path, kernel: &[u8], vcpus: u8, extra: &str) -> PathBuf {
    let kernel_path = dir.join("kernel.elf");
    std::fs::write(&kernel_path, kernel).unwrap();
    let config = format!(
        r#"{{
  "boot-source": {{ "kernel_image_path": "{}", "boot_args": "console=ttyS0" }},
  "machine-config": {{ "vcpu_count": {vcpus}, "mem_size_mib": 64 }}{extra}
}}"#,
        kernel_path.display()
    );
    let config_path = dir.join("vm.json");
    std::fs::write(&config_path, config).unwrap();
    config_path
}

/// Runs `kiln --config-file config` with no stdin, killing it after
/// `timeout`. Its stdout and stderr are read while it runs, as a reader that
/// keeps up would: kiln drops console output nobody reads.
pub fn run_kiln(config: &Path, timeout: Duration) -> Output {
    let mut child = start_kiln(config, &[]);
    finish(&mut child, timeout)
}

/// `kiln --config-file config ARGS`, started with no stdin and its stdout
/// and stderr piped.
pub fn start_kiln(config: &Path, args: &[&str]) -> Child {
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

/// Reads `child`'s piped stdout and stderr while it runs (as a reader that
/// keeps up would) and waits for it, killing it and failing the test after
/// `timeout`.
pub fn finish(child: &mut Child, timeout: Duration) -> Output {
    let stdout = read_all(child.stdout.take().unwrap());
    let stderr = read_all(child.stderr.take().unwrap());
    let Some(status) = wait_timeout(child, timeout) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "kiln did not exit within {timeout:?}\nstdout: {}\nstderr: {}",
            text(&stdout.join().unwrap()),
            text(&stderr.join().unwrap())
        );
    };
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// [`finish`], failing the test (with both outputs) unless kiln exited
/// with `code`; its stdout and stderr as text.
pub fn finish_with(child: &mut Child, timeout: Duration, code: i32) -> (String, String) {
    let out = finish(child, timeout);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    (stdout, stderr)
}

/// Waits for `child` to exit; None if it is still running after `timeout`.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads `r` to its end on a thread of its own.
pub fn read_all(mut r: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        v
    })
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A guest artifact built by tools/build-guest-kernel or tools/build-rootfs
/// (`vmlinux`, `bzImage`, `initramfs.cpio`, `rootfs.ext4`), from
/// `$KILN_GUEST_DIR` or `${XDG_CACHE_HOME:-~/.cache}/kiln`. Fails the test
/// with the command to run when it is missing.
pub fn guest_artifact(name: &str) -> PathBuf {
    let dir = std::env::var_os("KILN_GUEST_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("kiln")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kiln")))
        .expect("neither KILN_GUEST_DIR, XDG_CACHE_HOME nor HOME is set");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "guest artifact {} is missing: build it with tools/build-guest-kernel and tools/build-rootfs (CI does, in .ci/run)",
        path.display()
    );
    path
}

/// A writer the test can read back: the guest's console.
#[derive(Clone, Default)]
pub struct Capture(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // KILN_TEST_CONSOLE=1 shows guest consoles live (to debug a test).
        if std::env::var_os("KILN_TEST_CONSOLE").is_some() {
            let _ = std::io::stderr().write_all(buf);
        }
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    pub fn text(&self) -> String {
        text(&self.0.lock().unwrap())
    }
}

/// `kiln.cmd=` for the guest init: the command, base64-encoded.
pub fn kiln_cmd(cmd: &str) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::from("kiln.cmd=");
    for chunk in cmd.as_bytes().chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The kernel command line of the project's guest in tests (kiln appends
/// its devices and, on kvm_pvm hosts, its workarounds).
pub const BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 i8042.noaux quiet";

/// A boot that takes longer than this is stuck (a boot takes about half a
/// minute here, a few seconds on hardware KVM).
pub const BOOT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(420);

/// Boots `config` (JSON) in-process with its console in `console`, and
/// returns the console output, after checking that the guest ended by
/// itself, that every vCPU thread was joined, and that init started.
pub fn boot_guest(config: &str, vcpus: u8, console: &Capture) -> String {
    use kiln::vmm::exit::ExitReason;
    use kiln::vmm::{ConsoleIo, ConsoleOutput, Vmm};

    require_kvm();
    let config = kiln::config::VmConfig::from_json(config).unwrap();
    let vmm = Vmm::build(
        &config,
        ConsoleIo {
            output: ConsoleOutput::Writer(Box::new(console.clone())),
            input: None,
        },
    )
    .unwrap();
    let exit = vmm.exit_signal();
    std::thread::spawn(move || {
        std::thread::sleep(BOOT_TIMEOUT);
        exit.report(ExitReason::Stopped(format!(
            "test timeout after {BOOT_TIMEOUT:?}"
        )));
    });
    let outcome = vmm.run().unwrap();
    let out = console.text();
    assert_eq!(outcome.reason, ExitReason::Reset, "console:\n{out}");
    assert_eq!(outcome.vcpus_joined, usize::from(vcpus), "console:\n{out}");
    assert_eq!(outcome.vcpus_panicked, 0);
    assert!(
        out.contains("KILN-BOOT-OK"),
        "no boot marker; console:\n{out}"
    );
    out
}

/// The initramfs guest with `vcpus`, 128 MiB, running `cmd`, plus `extra`
/// top-level sections (each starting with a comma).
pub fn initramfs_config(vcpus: u8, cmd: &str, extra: &str) -> String {
    format!(
        r#"{{
  "boot-source": {{
    "kernel_image_path": "{}",
    "initrd_path": "{}",
    "boot_args": "{BOOT_ARGS} {}"
  }},
  "machine-config": {{ "vcpu_count": {vcpus}, "mem_size_mib": 128 }}{extra}
}}"#,
        guest_artifact("vmlinux").display(),
        guest_artifact("initramfs.cpio").display(),
        kiln_cmd(cmd)
    )
}

/// This process's uid (tests keep to std: read from /proc).
pub fn own_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .unwrap()
}

/// `kiln run` as a user who is not root but may open /dev/kvm: as root,
/// nobody with /dev/kvm's group (through setpriv); else this user. kiln,
/// its agent and the kernel are copied into `dir` (bin/, vmlinux) where
/// that user can read them; its cache and run directories are in `dir`.
/// Returns the command (`kiln run --kernel ... --cpus 1 --memory 256`, its
/// environment cleared) and the uid it runs as.
pub fn kiln_run_as_a_normal_user(dir: &Path) -> (Command, u32) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    require_kvm();
    let meta = std::fs::metadata("/dev/kvm").unwrap();
    let mode = meta.permissions().mode();
    let root = own_uid() == 0;
    assert!(
        !root || mode & 0o060 == 0o060,
        "/dev/kvm is mode {mode:o}: a normal user cannot open it; give it a group \
         (.ci/run does: groupadd -r kvm; chgrp kvm /dev/kvm; chmod 660 /dev/kvm)"
    );
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let kiln = Path::new(env!("CARGO_BIN_EXE_kiln"));
    std::fs::copy(kiln, bin.join("kiln")).unwrap();
    std::fs::copy(kiln.with_file_name("kiln-agent"), bin.join("kiln-agent")).unwrap();
    std::fs::copy(guest_artifact("vmlinux"), dir.join("vmlinux")).unwrap();
    for p in [dir, &*bin] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    std::fs::set_permissions(dir.join("vmlinux"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let (uid, mut c) = if root {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            &format!("--groups={}", meta.gid()),
            "--",
        ])
        .arg(bin.join("kiln"));
        (65534, c)
    } else {
        (own_uid(), Command::new(bin.join("kiln")))
    };
    c.arg("run")
        .arg("--kernel")
        .arg(dir.join("vmlinux"))
        .args(["--cpus", "1", "--memory", "256"])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", dir)
        .env("XDG_CACHE_HOME", dir.join("cache"))
        .env("XDG_RUNTIME_DIR", dir);
    (c, uid)
}
