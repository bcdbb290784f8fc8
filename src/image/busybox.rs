//! kiln's default image: Debian's static busybox with one symlink per applet,
//! a root and a nobody user, as an ext4 file made once and cached.
//!
//! The busybox comes from the host's `busybox-static` package when it is
//! installed (/bin/busybox, statically linked), else from that package's
//! .deb, fetched with `apt-get download` (no root needed) and unpacked with
//! `dpkg-deb -x`. Cached as `images/busybox-<hash>.ext4`, the hash over the
//! busybox binary and [`RECIPE`], built once even when several runs start at
//! once (a lock, then a rename into place).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{symlink, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

/// Bumped when the tree below changes, so old cached images are not reused.
const RECIPE: &str = "busybox-image-1";
const HOST_BUSYBOX: &str = "/bin/busybox";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Tool { command: String, stderr: String },
    #[error("Debian's busybox-static package has no bin/busybox")]
    NoBusybox,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Whether `path` is an ELF executable without an interpreter (static).
fn is_static_elf(path: &Path) -> bool {
    let Ok(bytes) = fs::read(path) else {
        return false;
    };
    crate::elf::program_headers(&bytes)
        .is_some_and(|(headers, _)| headers.iter().all(|h| h.p_type != crate::elf::PT_INTERP))
}

fn run_tool(cmd: &mut Command) -> Result<(), Error> {
    let command = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(io_err(format!("cannot run {command}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Tool {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// The host's static busybox, or one from Debian's package, unpacked in `work`.
fn find_busybox(work: &Path, progress: &mut dyn FnMut(&str)) -> Result<PathBuf, Error> {
    let host = Path::new(HOST_BUSYBOX);
    if is_static_elf(host) {
        return Ok(host.to_path_buf());
    }
    progress("fetching Debian's busybox-static package (apt-get download)");
    let deb_dir = work.join("deb");
    fs::create_dir_all(&deb_dir).map_err(io_err(format!("cannot make {}", deb_dir.display())))?;
    run_tool(
        Command::new("apt-get")
            .args(["download", "busybox-static"])
            .current_dir(&deb_dir),
    )?;
    let deb = fs::read_dir(&deb_dir)
        .map_err(io_err(format!("cannot read {}", deb_dir.display())))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or(Error::NoBusybox)?;
    let unpacked = work.join("pkg");
    run_tool(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    let busybox = unpacked.join("bin/busybox");
    if is_static_elf(&busybox) {
        Ok(busybox)
    } else {
        Err(Error::NoBusybox)
    }
}

/// The default image, built on first use; `progress` hears the long steps.
pub fn image(cache: &Path, progress: &mut dyn FnMut(&str)) -> Result<PathBuf, Error> {
    let images = cache.join("images");
    fs::create_dir_all(&images).map_err(io_err(format!("cannot make {}", images.display())))?;
    let work = images.join(format!("tmp-busybox-{}", std::process::id()));
    let result = build(&images, &work, progress);
    let _ = fs::remove_dir_all(&work);
    result
}

fn build(images: &Path, work: &Path, progress: &mut dyn FnMut(&str)) -> Result<PathBuf, Error> {
    // The host's busybox is checked before the lock: a cache hit costs one
    // read of a 2 MB file.
    let host = Path::new(HOST_BUSYBOX);
    let host_static = is_static_elf(host);
    if host_static {
        let key = key(host)?;
        let out = images.join(format!("busybox-{key}.ext4"));
        if out.is_file() {
            return Ok(out);
        }
    }
    let lock_path = images.join("busybox.lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io_err(format!("cannot open {}", lock_path.display())))?;
    // SAFETY: flock on an fd we own; blocks until a concurrent build ends.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io_err(format!("cannot lock {}", lock_path.display()))(
            io::Error::last_os_error(),
        ));
    }
    let _ = fs::remove_dir_all(work);
    fs::create_dir_all(work).map_err(io_err(format!("cannot make {}", work.display())))?;
    let busybox = find_busybox(work, progress)?;
    let key = key(&busybox)?;
    let out = images.join(format!("busybox-{key}.ext4"));
    if out.is_file() {
        return Ok(out);
    }
    progress("making kiln's default image (busybox) once");
    let root = work.join("root");
    tree(&root, &busybox)?;
    let tmp = work.join("image.ext4");
    // 16 MiB: busybox is ~2 MB; the guest mounts it read-only.
    run_tool(
        Command::new("mke2fs")
            .args([
                "-q",
                "-F",
                "-t",
                "ext4",
                "-L",
                "kiln-busybox",
                "-E",
                "root_owner=0:0",
                "-d",
            ])
            .arg(&root)
            .arg(&tmp)
            .arg("16M"),
    )?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io_err(format!("cannot sync {}", tmp.display())))?;
    fs::rename(&tmp, &out).map_err(io_err(format!(
        "cannot move the image to {}",
        out.display()
    )))?;
    drop(lock);
    Ok(out)
}

/// A hash of the busybox binary and the recipe.
fn key(busybox: &Path) -> Result<String, Error> {
    let mut hash = Sha256::new();
    hash.update(RECIPE);
    let mut f =
        File::open(busybox).map_err(io_err(format!("cannot read {}", busybox.display())))?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(io_err(format!("cannot read {}", busybox.display())))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    Ok(hash
        .finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The image's tree: busybox, its applets, the users, the mount points.
fn tree(root: &Path, busybox: &Path) -> Result<(), Error> {
    let mk =
        |p: &Path| fs::create_dir_all(p).map_err(io_err(format!("cannot make {}", p.display())));
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "tmp", "proc", "sys", "dev", "home",
    ] {
        mk(&root.join(d))?;
    }
    let _ = fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777));
    let bin = root.join("bin/busybox");
    fs::copy(busybox, &bin).map_err(io_err(format!("cannot copy {}", busybox.display())))?;
    let _ = fs::set_permissions(&bin, fs::Permissions::from_mode(0o755));
    let list = Command::new(busybox)
        .arg("--list-full")
        .output()
        .map_err(io_err(format!(
            "cannot run {} --list-full",
            busybox.display()
        )))?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        // Only plain relative paths such as `usr/bin/env`.
        if applet.is_empty()
            || applet.starts_with('/')
            || applet
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            continue;
        }
        let link = root.join(applet);
        if link.symlink_metadata().is_ok() {
            continue;
        }
        if let Some(parent) = link.parent() {
            mk(parent)?;
        }
        symlink("/bin/busybox", &link)
            .map_err(io_err(format!("cannot link {}", link.display())))?;
    }
    let etc = root.join("etc");
    let write = |name: &str, text: &str| {
        fs::write(etc.join(name), text).map_err(io_err(format!("cannot write etc/{name}")))
    };
    write(
        "passwd",
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    write("group", "root:x:0:\nnogroup:x:65534:\n")?;
    write("hostname", "kiln\n")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_elf_detection() {
        let dir = std::env::temp_dir().join(format!("kiln-bbelf-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        // This machine's dynamic `true`.
        assert!(!is_static_elf(Path::new("/bin/true")));
        let junk = dir.join("junk");
        fs::write(&junk, b"\x7fELF\x02\x01 not really").unwrap();
        assert!(!is_static_elf(&junk));
        let mut bad = fs::read("/bin/true").unwrap();
        bad[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        fs::write(&junk, &bad).unwrap();
        // A program header table out of the file: no PT_INTERP seen, and
        // above all no panic.
        let _ = is_static_elf(&junk);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// The image holds busybox and its applets, owned by root, whoever made it.
    #[test]
    fn default_image_has_busybox() {
        if !is_static_elf(Path::new(HOST_BUSYBOX)) {
            panic!("this test needs Debian's busybox-static installed (.ci/run installs it)");
        }
        let cache = std::env::temp_dir().join(format!("kiln-bbimg-{}", std::process::id()));
        let _ = fs::remove_dir_all(&cache);
        let mut said = Vec::new();
        let path = image(&cache, &mut |m| said.push(m.to_string())).unwrap();
        assert!(said.iter().any(|m| m.contains("default image")), "{said:?}");
        let again = image(&cache, &mut |m| panic!("rebuilt: {m}")).unwrap();
        assert_eq!(path, again);
        let ls = Command::new("debugfs")
            .args(["-R", "ls -l /bin"])
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&ls.stdout);
        assert!(text.contains(" busybox"), "{text}");
        assert!(text.contains(" sh"), "{text}");
        let names: Vec<_> = fs::read_dir(cache.join("images"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(!names.iter().any(|n| n.starts_with("tmp-")), "{names:?}");
        fs::remove_dir_all(&cache).unwrap();
    }
}
