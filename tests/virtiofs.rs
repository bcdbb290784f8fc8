//! End-to-end virtio-fs: the project's guest mounts two host folders (one
//! read-write, one read-only) with `mount -t virtiofs` and uses them.
//! One boot; its commands are shell builtins where possible, since every
//! exec costs up to a second of interpreted kernel code on kvm_pvm hosts.

// Tests: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::*;

#[test]
fn guest_reads_and_writes_a_shared_folder_and_cannot_escape_it() {
    require_kvm();
    let dir = scratch("virtiofs-e2e");
    let rw = dir.join("rw");
    let ro = dir.join("ro");
    let outside = dir.join("outside");
    for d in [&rw, &ro, &outside] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(rw.join("host-wrote.txt"), "written on the host\n").unwrap();
    std::fs::write(ro.join("file.txt"), "read-only content\n").unwrap();
    std::fs::write(outside.join("host-only-marker"), "secret").unwrap();
    assert!(
        Path::new("/etc/os-release").exists(),
        "the host check needs /etc/os-release"
    );
    std::os::unix::fs::symlink("/etc", rw.join("etc-link")).unwrap();
    std::os::unix::fs::symlink(&outside, rw.join("out-link")).unwrap();
    std::os::unix::fs::symlink("../outside", rw.join("rel-link")).unwrap();

    let cmd = "mkdir -p /mnt/rw /mnt/ro; \
        mount -t virtiofs rw /mnt/rw && mount -t virtiofs ro /mnt/ro && echo MOUNTED; \
        read -r line < /mnt/rw/host-wrote.txt; echo \"READ=$line\"; \
        echo guest-wrote-this > /mnt/rw/guest-wrote.txt && echo WROTE; \
        echo nope > /mnt/ro/new.txt; echo RO-CREATE=$?; \
        echo nope >> /mnt/ro/file.txt; echo RO-APPEND=$?; \
        read -r line < /mnt/ro/file.txt; echo \"RO-READ=$line\"; \
        for p in etc-link/os-release out-link/host-only-marker rel-link/host-only-marker; do \
          if [ -e /mnt/rw/$p ]; then echo \"EXPOSED=$p\"; else echo \"HIDDEN=$p\"; fi; \
        done";
    let extra = format!(
        r#", "fs": [
          {{ "tag": "rw", "path_on_host": "{}" }},
          {{ "tag": "ro", "path_on_host": "{}", "read_only": true }}
        ]"#,
        rw.display(),
        ro.display()
    );
    let out = boot_guest(&initramfs_config(1, cmd, &extra), 1, &Capture::default());
    let has = |s: &str| out.lines().any(|l| l.trim() == s);
    assert!(has("MOUNTED"), "console:\n{out}");
    assert!(has("READ=written on the host"), "console:\n{out}");
    assert!(has("WROTE"), "console:\n{out}");
    assert_eq!(
        std::fs::read_to_string(rw.join("guest-wrote.txt")).unwrap(),
        "guest-wrote-this\n"
    );
    // The read-only share refused both writes; the host folder is as it was.
    assert!(out.contains("RO-CREATE=1"), "console:\n{out}");
    assert!(out.contains("RO-APPEND=1"), "console:\n{out}");
    assert!(has("RO-READ=read-only content"), "console:\n{out}");
    assert!(!ro.join("new.txt").exists());
    assert_eq!(
        std::fs::read_to_string(ro.join("file.txt")).unwrap(),
        "read-only content\n"
    );
    // Symlinks resolve in the guest's own namespace: the host's /etc and
    // the folder beside the share stay out of reach.
    for p in [
        "etc-link/os-release",
        "out-link/host-only-marker",
        "rel-link/host-only-marker",
    ] {
        assert!(has(&format!("HIDDEN={p}")), "{p}; console:\n{out}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
