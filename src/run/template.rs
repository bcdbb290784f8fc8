//! Templates: a booted VM, paused where its agent has built the command's
//! root and waits (`Ready`), saved once as a snapshot and restored by every
//! later run that would boot the same VM.
//!
//! A template is found by its key: everything that shapes the VM up to that
//! point (kiln and its agent, the kernel, the image, vCPUs, memory, how many
//! shared folders). Files are named by their identity (path, size, inode,
//! modification time), images by their digest; a changed kernel or agent is
//! a new template. The snapshot itself checks kiln's version and the host's
//! CPU, so a template from elsewhere is refused and rebuilt.
//!
//! Layout, under `${XDG_CACHE_HOME:-~/.cache}/kiln/templates/`:
//! ```text
//! <key digest>/vm.state, vm.mem, key.txt   a template (a directory renamed
//!                                          into place whole)
//! <key digest>.lock                        its lock: exclusive while it is
//!                                          built or removed, shared while
//!                                          a run reads it
//! .build-<key digest>-<pid>/               a template being written
//! ```

use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::snapshot::Paths;

/// What makes two runs' VMs the same up to the agent's `Ready`.
pub struct KeyParts<'a> {
    pub kiln: &'a Path,
    pub agent: &'a Path,
    pub kernel: &'a Path,
    /// The image's digest, else its ext4 file.
    pub image_id: Option<&'a str>,
    pub image_file: &'a Path,
    pub cpus: u8,
    pub memory_mib: u32,
    pub shares: usize,
    /// `--net`'s mode.
    pub net: &'a str,
}

/// A file's identity: path, size, inode, modification time.
fn identity(path: &Path) -> io::Result<String> {
    let real = fs::canonicalize(path)?;
    let m = fs::metadata(&real)?;
    Ok(format!(
        "{} size={} dev={} ino={} mtime={}.{:09}",
        real.display(),
        m.len(),
        m.dev(),
        m.ino(),
        m.mtime(),
        m.mtime_nsec()
    ))
}

impl KeyParts<'_> {
    /// The key, one `name: value` line each.
    pub fn text(&self) -> io::Result<String> {
        let image = match self.image_id {
            Some(id) => id.to_string(),
            None => identity(self.image_file)?,
        };
        Ok(format!(
            "kiln-version: {}\nkiln: {}\nagent: {}\nkernel: {}\nimage: {image}\n\
             cpus: {}\nmemory-mib: {}\nshared-folders: {}\nnetwork: {}\n",
            env!("CARGO_PKG_VERSION"),
            identity(self.kiln)?,
            identity(self.agent)?,
            identity(self.kernel)?,
            self.cpus,
            self.memory_mib,
            self.shares,
            self.net,
        ))
    }
}

/// `${XDG_CACHE_HOME:-~/.cache}/kiln/templates`.
pub fn base() -> PathBuf {
    super::cache_dir().join("templates")
}

/// One template's place (it may not exist yet).
pub struct Template {
    key: String,
    digest: String,
    base: PathBuf,
}

/// A lock on a template, held while it is read or built.
pub struct Lock {
    _file: File,
}

fn flock(file: &File, op: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: flock on a valid fd this process owns.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl Template {
    pub fn new(base: PathBuf, key: String) -> Self {
        let digest: String = Sha256::digest(key.as_bytes())
            .iter()
            .take(12)
            .map(|b| format!("{b:02x}"))
            .collect();
        Template { key, digest, base }
    }

    pub fn dir(&self) -> PathBuf {
        self.base.join(&self.digest)
    }

    /// The snapshot's files.
    pub fn paths(&self) -> Paths {
        Paths::new(&self.dir(), "vm")
    }

    pub fn exists(&self) -> bool {
        self.paths().state.is_file()
    }

    fn open_lock(&self) -> io::Result<File> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.base)?;
        fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(self.base.join(format!("{}.lock", self.digest)))
    }

    /// A shared lock: no one builds or removes the template meanwhile.
    pub fn lock_shared(&self) -> io::Result<Lock> {
        let f = self.open_lock()?;
        flock(&f, libc::LOCK_SH)?;
        Ok(Lock { _file: f })
    }

    /// The exclusive lock, to build or remove the template; `waiting` is
    /// called if another kiln holds it.
    pub fn lock_exclusive(&self, waiting: impl FnOnce()) -> io::Result<Lock> {
        let f = self.open_lock()?;
        if flock(&f, libc::LOCK_EX | libc::LOCK_NB).is_err() {
            waiting();
            flock(&f, libc::LOCK_EX)?;
        }
        Ok(Lock { _file: f })
    }

    /// Removes the template (under the exclusive lock).
    pub fn remove(&self, _lock: &Lock) -> io::Result<()> {
        match fs::remove_dir_all(self.dir()) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Where a new template is written before [`Template::commit`].
    pub fn staging(&self) -> io::Result<Staging> {
        let dir = self
            .base
            .join(format!(".build-{}-{}", self.digest, std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        // What killed builds left behind.
        for entry in fs::read_dir(&self.base)?.flatten() {
            remove_dead_build(&entry.path());
        }
        fs::DirBuilder::new().mode(0o700).create(&dir)?;
        Ok(Staging { dir })
    }

    /// Puts a written template in place (under the exclusive lock), then
    /// removes the least recently used templates beyond [`KEEP`].
    pub fn commit(&self, staging: Staging, lock: &Lock) -> io::Result<()> {
        fs::write(staging.dir.join("key.txt"), &self.key)?;
        self.remove(lock)?;
        fs::rename(&staging.dir, self.dir())?;
        // The rename is what makes it visible: make it durable.
        File::open(&self.base)?.sync_all()?;
        evict(&self.base, KEEP);
        Ok(())
    }

    /// Marks the template used now (for [`evict`]).
    pub fn touch(&self) {
        let _ = File::open(self.dir().join("key.txt")).and_then(|f| {
            f.set_times(fs::FileTimes::new().set_modified(std::time::SystemTime::now()))
        });
    }
}

/// A template being written; removed unless committed.
pub struct Staging {
    dir: PathBuf,
}

impl Staging {
    pub fn paths(&self) -> Paths {
        Paths::new(&self.dir, "vm")
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// What `kiln run --prune` removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    pub templates: usize,
    pub bytes: u64,
    /// Templates in use (being built or read), left alone.
    pub busy: usize,
}

/// Disk space a directory's files take (holes excluded).
fn usage(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// Templates kept: a new one evicts the least recently used beyond this
/// (a changed kernel, image or kiln makes new ones; the old ones would
/// stay forever).
pub const KEEP: usize = 8;

/// Removes the least recently used templates beyond `keep` (by their
/// key.txt's modification time, which every restore updates), skipping
/// those in use.
fn evict(base: &Path, keep: usize) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    let mut templates: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .filter(|e| e.path().is_dir() && !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| {
            let used = fs::metadata(e.path().join("key.txt"))
                .and_then(|m| m.modified())
                .ok()?;
            Some((used, e.path()))
        })
        .collect();
    templates.sort();
    let excess = templates.len().saturating_sub(keep);
    for (_, dir) in templates.into_iter().take(excess) {
        let mut lock = dir.clone().into_os_string();
        lock.push(".lock");
        let Ok(f) = File::open(&lock) else { continue };
        if flock(&f, libc::LOCK_EX | libc::LOCK_NB).is_ok() {
            log::info!(
                "removing the least recently used template {}",
                dir.display()
            );
            let _ = fs::remove_dir_all(&dir);
        }
    }
}

/// Removes `path` if it is a `.build-<digest>-<pid>` whose builder is
/// gone; returns the bytes it took.
fn remove_dead_build(path: &Path) -> u64 {
    let Some(rest) = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix(".build-"))
    else {
        return 0;
    };
    let pid = rest.rsplit('-').next().and_then(|p| p.parse::<i32>().ok());
    // SAFETY: kill with signal 0 only checks whether the process exists.
    let alive = pid.is_some_and(|p| p > 0 && unsafe { libc::kill(p, 0) } == 0);
    if alive {
        return 0;
    }
    let bytes = usage(path);
    match fs::remove_dir_all(path) {
        Ok(()) => bytes,
        Err(_) => 0,
    }
}

/// Removes every template under `base` that no kiln is using, and what
/// killed builds left behind. (The empty lock files stay: a kiln may be
/// about to lock one.)
pub fn prune(base: &Path) -> io::Result<Pruned> {
    let mut pruned = Pruned::default();
    let entries = match fs::read_dir(base) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(pruned),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if let Some(lock_of) = name.strip_suffix(".lock") {
            let f = File::open(&path)?;
            if flock(&f, libc::LOCK_EX | libc::LOCK_NB).is_err() {
                pruned.busy += 1;
                continue;
            }
            let dir = base.join(lock_of);
            if dir.is_dir() {
                pruned.bytes += usage(&dir);
                fs::remove_dir_all(&dir)?;
                pruned.templates += 1;
            }
            // The lock file stays: a kiln may have it open to lock it.
        } else {
            pruned.bytes += remove_dead_build(&path);
        }
    }
    Ok(pruned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_digest_names_the_directory_and_prune_removes_unlocked_templates() {
        let base = tempfile::tempdir().unwrap();
        let t = Template::new(base.path().to_path_buf(), "k1".into());
        let other = Template::new(base.path().to_path_buf(), "k2".into());
        assert_ne!(t.dir(), other.dir());
        assert!(!t.exists());

        let lock = t.lock_exclusive(|| panic!("nobody else holds it")).unwrap();
        let staging = t.staging().unwrap();
        fs::write(staging.paths().state, b"state").unwrap();
        fs::write(staging.paths().memory, vec![1u8; 8192]).unwrap();
        t.commit(staging, &lock).unwrap();
        assert!(t.exists());
        assert_eq!(fs::read_to_string(t.dir().join("key.txt")).unwrap(), "k1");
        // In use: left alone.
        assert_eq!(prune(base.path()).unwrap().busy, 1);
        assert!(t.exists());
        drop(lock);
        // A build whose process is gone.
        let dead = base.path().join(format!(".build-x-{}", i32::MAX));
        fs::create_dir(&dead).unwrap();
        let p = prune(base.path()).unwrap();
        assert_eq!((p.templates, p.busy), (1, 0));
        assert!(p.bytes >= 8192);
        assert!(!t.exists() && !dead.exists());
    }

    #[test]
    fn the_least_recently_used_templates_go_beyond_the_limit() {
        let base = tempfile::tempdir().unwrap();
        let make = |key: &str| {
            let t = Template::new(base.path().to_path_buf(), key.into());
            let lock = t.lock_exclusive(|| {}).unwrap();
            let staging = t.staging().unwrap();
            fs::write(staging.paths().state, b"s").unwrap();
            t.commit(staging, &lock).unwrap();
            t
        };
        let old = make("old");
        let used = make("used");
        let past = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for t in [&old, &used] {
            File::options()
                .write(true)
                .open(t.dir().join("key.txt"))
                .unwrap()
                .set_modified(past)
                .unwrap();
        }
        used.touch();
        evict(base.path(), 1);
        assert!(!old.exists(), "the least recently used one stays");
        assert!(used.exists());
    }

    #[test]
    fn an_uncommitted_build_leaves_nothing() {
        let base = tempfile::tempdir().unwrap();
        let t = Template::new(base.path().to_path_buf(), "k".into());
        let staging = t.staging().unwrap();
        fs::write(staging.paths().state, b"x").unwrap();
        drop(staging);
        let left: Vec<_> = fs::read_dir(base.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn the_key_changes_with_the_kernel_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = |n: &str| {
            let p = dir.path().join(n);
            fs::write(&p, n).unwrap();
            p
        };
        let (kiln, agent, kernel, image) = (f("kiln"), f("agent"), f("vmlinux"), f("img"));
        let parts = KeyParts {
            kiln: &kiln,
            agent: &agent,
            kernel: &kernel,
            image_id: None,
            image_file: &image,
            cpus: 2,
            memory_mib: 512,
            shares: 1,
            net: "none",
        };
        let before = parts.text().unwrap();
        assert!(before.contains("cpus: 2\n") && before.contains("shared-folders: 1\n"));
        let with_net = KeyParts {
            net: "passt",
            ..parts
        };
        assert_ne!(with_net.text().unwrap(), before);
        assert!(with_net.text().unwrap().contains("network: passt\n"));
        fs::write(&kernel, "a longer kernel").unwrap();
        assert_ne!(parts.text().unwrap(), before);
        let with_id = KeyParts {
            image_id: Some("sha256:ab"),
            ..parts
        };
        assert!(with_id.text().unwrap().contains("image: sha256:ab\n"));
    }
}
