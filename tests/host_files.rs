//! The host files a config names, as a hostile or careless user gives them:
//! named pipes, devices, huge files and disks another VM is using. kiln
//! must refuse each at once with a message naming the file (and the drive),
//! never hang in `open`.

// Tests: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;

use common::*;

/// Long enough for kiln to fail validation on a loaded machine; a kiln
/// blocked in `open` never ends, and `run_kiln` then fails the test.
const QUICK: Duration = Duration::from_secs(20);

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// Writes `config` as `dir/vm.json` and runs kiln on it; returns (exit
/// code, stderr).
fn kiln_on(dir: &Path, config: &serde_json::Value) -> (Option<i32>, String) {
    let path = dir.join("vm.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let out = run_kiln(&path, QUICK);
    (out.status.code(), text(&out.stderr))
}

/// A directory with a kernel file (never booted: these configs fail
/// before), a 1 MiB disk and a named pipe.
fn setup(name: &str) -> (Scratch, serde_json::Value) {
    let dir = scratch(name);
    std::fs::write(dir.join("kernel"), b"not booted").unwrap();
    std::fs::File::create(dir.join("disk"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    mkfifo(&dir.join("fifo"));
    let config = serde_json::json!({
        "boot-source": { "kernel_image_path": dir.join("kernel") },
        "machine-config": { "vcpu_count": 1, "mem_size_mib": 64 },
        "drives": [{ "drive_id": "data", "path_on_host": dir.join("disk"),
                     "is_root_device": false, "is_read_only": false }]
    });
    (dir, config)
}

#[test]
fn a_named_pipe_anywhere_in_a_config_is_refused_at_once() {
    let (dir, base) = setup("hf-fifo");
    let fifo = dir.join("fifo");
    let start = Instant::now();

    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--config-file")
        .arg(&fifo)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!("kiln: error: cannot read config file {fifo:?}: it is a named pipe, not a regular file\n")
    );

    let mut cases: Vec<(serde_json::Value, String)> = Vec::new();
    let mut c = base.clone();
    c["boot-source"]["kernel_image_path"] = serde_json::json!(fifo);
    cases.push((c, "boot-source.kernel_image_path".into()));
    let mut c = base.clone();
    c["boot-source"]["initrd_path"] = serde_json::json!(fifo);
    cases.push((c, "boot-source.initrd_path".into()));
    for read_only in [true, false] {
        let mut c = base.clone();
        c["drives"][0]["path_on_host"] = serde_json::json!(fifo);
        c["drives"][0]["is_read_only"] = serde_json::json!(read_only);
        cases.push((c, "drives[0].path_on_host (drive_id \"data\")".into()));
    }
    let mut c = base.clone();
    c["logger"] = serde_json::json!({ "log_path": fifo });
    cases.push((c, "logger.log_path".into()));
    for (config, field) in cases {
        let (code, err) = kiln_on(&dir, &config);
        assert_eq!(code, Some(1), "{field}: {err}");
        assert!(
            err.contains(&field) && err.contains(&format!("{fifo:?}")),
            "{field}: {err}"
        );
        assert!(err.contains("named pipe"), "{field}: {err}");
    }
    assert!(start.elapsed() < QUICK, "{:?}", start.elapsed());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_config_file_over_1_mib_or_not_an_object_is_refused() {
    let (dir, base) = setup("hf-size");
    let path = dir.join("vm.json");
    std::fs::write(&path, format!("{base}{}", " ".repeat(1 << 20))).unwrap();
    let out = run_kiln(&path, QUICK);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!("kiln: error: config file {path:?} is larger than 1 MiB\n")
    );
    std::fs::write(&path, format!("[{}]", base["boot-source"])).unwrap();
    let out = run_kiln(&path, QUICK);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "kiln: error: config file {path:?}: the top level must be a JSON object, not an array\n"
        )
    );
    let out = run_kiln(Path::new("/dev/zero"), QUICK);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("a character device, not a regular file"),
        "{}",
        text(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// An OFD lock on `path`, as another VM (QEMU, kiln) takes it; held until
/// the file is dropped.
fn hold_lock(path: &Path, exclusive: bool) -> std::fs::File {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(exclusive)
        .open(path)
        .unwrap();
    // SAFETY: flock is plain data; zero is valid (l_pid must be 0).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    let lock_type = if exclusive {
        libc::F_WRLCK
    } else {
        libc::F_RDLCK
    };
    fl.l_type = i16::try_from(lock_type).unwrap();
    fl.l_whence = i16::try_from(libc::SEEK_SET).unwrap();
    // SAFETY: F_OFD_SETLK reads `fl`, which outlives the call.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    file
}

#[test]
fn a_drive_another_process_holds_locked_is_refused() {
    let (dir, config) = setup("hf-held");
    let disk = dir.join("disk");
    let lock = hold_lock(&disk, false);
    let (code, err) = kiln_on(&dir, &config);
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(
        err,
        format!(
            "kiln: error: drives[0].path_on_host (drive_id \"data\"): cannot open {disk:?} \
             for reading and writing: in use by another VM (locked)\n"
        )
    );
    drop(lock);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_second_vm_on_a_writable_drive_is_refused_while_the_first_runs() {
    require_kvm();
    let dir = scratch("hf-two-vms");
    let disk = dir.join("disk");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    // Prints R, then spins until kiln is stopped.
    let code = assemble(|a| {
        let mut spin = a.create_label();
        a.mov(dx, 0x3f8u32).unwrap();
        a.mov(al, u32::from(b'R')).unwrap();
        a.out(dx, al).unwrap();
        a.set_label(&mut spin).unwrap();
        a.jmp(spin).unwrap();
    });
    let drive = format!(
        r#", "drives": [{{ "drive_id": "shared", "path_on_host": "{}", "is_root_device": false, "is_read_only": false }}]"#,
        disk.display()
    );
    let config = write_vm(&dir, &elf_image(&code), 1, &drive);
    let mut first = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--config-file")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut r = [0u8; 1];
    let read = first.stdout.take().unwrap().read_exact(&mut r);
    if read.is_err() {
        let _ = first.kill();
        let out = first.wait_with_output().unwrap();
        panic!("the first VM did not start: {}", text(&out.stderr));
    }

    let second = run_kiln(&config, QUICK);
    // The first VM is done with before any assertion can fail.
    let pid = i32::try_from(first.id()).unwrap();
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let first_status = wait_timeout(&mut first, QUICK);
    if first_status.is_none() {
        let _ = first.kill();
        let _ = first.wait();
    }
    let err = text(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert_eq!(
        err,
        format!(
            "kiln: error: drives[0].path_on_host (drive_id \"shared\"): cannot open {disk:?} \
             for reading and writing: in use by another VM (locked)\n"
        )
    );
    assert_eq!(first_status.and_then(|s| s.code()), Some(130));
    // The lock ended with the first VM.
    drop(hold_lock(&disk, true));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The project's kernel in less memory than it loads into (it is linked at
/// 16 MiB and ends past 24 MiB): refused before the guest runs, saying how
/// much it needs, for the ELF vmlinux and the bzImage alike (the bzImage
/// used to triple-fault in its decompressor, the vmlinux to fail with
/// linux-loader's "Unable to read kernel image").
#[test]
fn a_kernel_larger_than_guest_memory_is_refused_naming_its_need() {
    require_kvm();
    let dir = scratch("kernel-too-big");
    for kernel in ["vmlinux", "bzImage"] {
        let config = serde_json::json!({
            "boot-source": { "kernel_image_path": guest_artifact(kernel) },
            "machine-config": { "vcpu_count": 1, "mem_size_mib": 24 },
        });
        let (code, stderr) = kiln_on(&dir, &config);
        assert_eq!(code, Some(1), "{kernel}: {stderr}");
        assert!(
            stderr.contains("does not fit in guest memory: it needs")
                && stderr.contains("machine-config.mem_size_mib gives 24"),
            "{kernel}: {stderr}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
