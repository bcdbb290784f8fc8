//! The agent's mounts and the command's root.

use std::path::Path;

use super::{sys, Error};
use crate::protocol::ExecSpec;

/// Where the image, the writable layer and the command's root go (in the
/// initramfs).
const LOWER: &str = "/kiln/lower";
const RW: &str = "/kiln/rw";
const ROOT: &str = "/kiln/root";

fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), Error> {
    sys::mount(source, target, fstype, flags, data).map_err(|source| Error::Mount {
        what: format!("{fstype} at {}", target.display()),
        source,
    })
}

fn mkdir_p(path: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(path).map_err(|source| Error::Setup {
        what: format!("creating {}", path.display()),
        source,
    })
}

const NOSUID_NODEV_NOEXEC: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

/// /proc, /sys and /dev for the agent itself.
pub fn early_mounts() -> Result<(), Error> {
    for (fs, dir) in [("proc", "/proc"), ("sysfs", "/sys"), ("devtmpfs", "/dev")] {
        mkdir_p(Path::new(dir))?;
        let flags = if fs == "devtmpfs" {
            libc::MS_NOSUID
        } else {
            NOSUID_NODEV_NOEXEC
        };
        match sys::mount(fs, Path::new(dir), fs, flags, None) {
            Ok(()) => {}
            // The kernel may have mounted devtmpfs already.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(source) => {
                return Err(Error::Mount {
                    what: format!("{fs} at {dir}"),
                    source,
                })
            }
        }
    }
    Ok(())
}

/// `path` as an absolute path without `..`.
fn checked(path: &str) -> Result<&Path, Error> {
    let p = Path::new(path);
    if !p.is_absolute() || p.components().any(|c| c == std::path::Component::ParentDir) {
        return Err(Error::User(format!(
            "{path:?} is not an absolute path without .."
        )));
    }
    Ok(p)
}

/// Builds the command's root from the image on `root_device` and moves into
/// it: what every run shares, so a template holds it. `warm_up`: see
/// [`warm_up`].
pub fn enter_root(root_device: &str, warm_up: bool) -> Result<(), Error> {
    let (lower, rw, root) = (Path::new(LOWER), Path::new(RW), Path::new(ROOT));
    for d in [lower, rw, root] {
        mkdir_p(d)?;
    }
    mount(root_device, lower, "ext4", libc::MS_RDONLY, None)?;
    mount(
        "tmpfs",
        rw,
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=0755"),
    )?;
    let (upper, work) = (rw.join("upper"), rw.join("work"));
    mkdir_p(&upper)?;
    mkdir_p(&work)?;
    let opts = format!(
        "lowerdir={LOWER},upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    mount("overlay", root, "overlay", 0, Some(&opts))?;

    let under = |p: &str| root.join(p);
    for (fs, dir, flags, data) in [
        ("proc", "proc", NOSUID_NODEV_NOEXEC, None),
        ("sysfs", "sys", NOSUID_NODEV_NOEXEC, None),
        ("devtmpfs", "dev", libc::MS_NOSUID, None),
        (
            "devpts",
            "dev/pts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620"),
        ),
        (
            "tmpfs",
            "dev/shm",
            libc::MS_NOSUID | libc::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "tmpfs",
            "tmp",
            libc::MS_NOSUID | libc::MS_NODEV,
            Some("mode=1777"),
        ),
    ] {
        let target = under(dir);
        mkdir_p(&target)?;
        mount(fs, &target, fs, flags, data)?;
    }
    // The pty multiplexer of the new devpts instance.
    let ptmx = under("dev/ptmx");
    let _ = std::fs::remove_file(&ptmx);
    std::os::unix::fs::symlink("pts/ptmx", &ptmx).map_err(|source| Error::Setup {
        what: "linking /dev/ptmx".into(),
        source,
    })?;
    sys::chroot(root).map_err(|source| Error::Setup {
        what: "entering the image's root".into(),
        source,
    })?;
    if warm_up {
        self::warm_up();
    }
    Ok(())
}

/// Runs the image's shell once, so that it, its libraries and the
/// directories on the way are in the page cache: in a template, every run
/// restored from it then starts commands without reading them from the
/// disk. An image without /bin/sh is left as it is.
fn warm_up() {
    let _ = std::process::Command::new("/bin/sh")
        .args(["-c", "true"])
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

/// What is the run's own, in the root [`enter_root`] entered: the shared
/// folders (virtio-fs) and the hostname.
pub fn per_run(spec: &ExecSpec) -> Result<(), Error> {
    for m in &spec.mounts {
        let target = checked(&m.path)?;
        mkdir_p(target)?;
        let flags = if m.read_only { libc::MS_RDONLY } else { 0 };
        mount(
            &m.tag,
            target,
            "virtiofs",
            flags | libc::MS_NOSUID | libc::MS_NODEV,
            None,
        )?;
    }
    sys::sethostname(&spec.hostname).map_err(|source| Error::Setup {
        what: "setting the hostname".into(),
        source,
    })
}

/// `uid[:gid]`, or a name (with an optional `:group`) looked up in the
/// image's /etc/passwd and /etc/group (the agent runs in the new root).
pub fn resolve_user(spec: &str) -> Result<(u32, u32), Error> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let (uid, primary) = match user.parse::<u32>() {
        Ok(uid) => {
            let primary = find(&passwd, |f| f.get(2) == Some(&user))
                .and_then(|f| f.get(3)?.parse().ok())
                .unwrap_or(uid);
            (uid, primary)
        }
        Err(_) => {
            let f = find(&passwd, |f| f.first() == Some(&user)).ok_or_else(|| {
                Error::User(format!("unknown user {user:?} in the image's /etc/passwd"))
            })?;
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<u32>().ok());
            match (num(2), num(3)) {
                (Some(u), Some(g)) => (u, g),
                _ => {
                    return Err(Error::User(format!(
                        "malformed /etc/passwd entry for {user:?}"
                    )))
                }
            }
        }
    };
    let gid = match group {
        None => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
                find(&groups, |f| f.first() == Some(&g))
                    .and_then(|f| f.get(2)?.parse().ok())
                    .ok_or_else(|| {
                        Error::User(format!("unknown group {g:?} in the image's /etc/group"))
                    })?
            }
        },
    };
    Ok((uid, gid))
}

/// The fields of the first `name:...` line `pred` accepts.
fn find<'a>(file: &'a str, pred: impl Fn(&Vec<&'a str>) -> bool) -> Option<Vec<&'a str>> {
    file.lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| pred(f))
}

/// The user's home directory from /etc/passwd, for HOME.
pub fn home_of(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let uid = uid.to_string();
    find(&passwd, |f| f.get(2) == Some(&uid.as_str())).and_then(|f| f.get(5).map(|h| h.to_string()))
}
