//! One directory per run for everything a run creates on the host (the
//! initramfs, the vsock sockets, images made from host folders), removed
//! when the run ends. A run killed with SIGKILL cannot remove its own: the
//! next run does, once the owner is gone (each run holds an exclusive lock on
//! `lock` in its directory; a lock that can be taken has no owner).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub struct RunDir {
    path: PathBuf,
    /// Held for the run's life: the flock says the owner is alive.
    _lock: File,
}

/// `${XDG_RUNTIME_DIR:-/tmp}/kiln-<uid>`.
pub fn base() -> PathBuf {
    // SAFETY: getuid only reads the process's credentials.
    let uid = unsafe { libc::getuid() };
    let root = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    root.join(format!("kiln-{uid}"))
}

fn try_lock(f: &File) -> bool {
    // SAFETY: flock on an fd we own.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

impl RunDir {
    /// Removes the directories of runs whose owner is gone, then makes a
    /// new one (mode 0700) under `base`.
    pub fn create(base: &Path) -> io::Result<RunDir> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(base)?;
        clean_stale(base);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = base.join(format!("{}-{nanos:09}", std::process::id()));
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(path.join("lock"))?;
        if !try_lock(&lock) {
            return Err(io::Error::other("cannot lock the run directory"));
        }
        Ok(RunDir { path, _lock: lock })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            log::warn!("cannot remove {}: {e}", self.path.display());
        }
    }
}

/// Removes every run directory under `base` whose lock is free.
fn clean_stale(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let dir = e.path();
        let Ok(lock) = File::open(dir.join("lock")) else {
            // A directory without a lock is being created this instant, or
            // a crash left it half made: only remove it when it is old.
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age.as_secs() > 60);
            if old {
                let _ = std::fs::remove_dir_all(&dir);
            }
            continue;
        };
        if try_lock(&lock) {
            log::info!("removing {} (its run is gone)", dir.display());
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_runs_directory_is_removed_a_live_one_kept() {
        let base = std::env::temp_dir().join(format!("kiln-rundir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let live = RunDir::create(&base).unwrap();
        std::fs::write(live.path().join("v.sock"), "x").unwrap();
        // A dead run: its directory and a lock nobody holds.
        let dead = base.join("999999-000000001");
        std::fs::create_dir_all(&dead).unwrap();
        std::fs::write(dead.join("lock"), "").unwrap();
        std::fs::write(dead.join("initramfs.cpio"), "leftover").unwrap();
        let second = RunDir::create(&base).unwrap();
        assert!(!dead.exists(), "the dead run's directory is cleaned");
        assert!(live.path().join("v.sock").exists(), "a live run's is kept");
        let p = live.path().to_path_buf();
        drop(live);
        assert!(!p.exists());
        drop(second);
        std::fs::remove_dir_all(&base).unwrap();
    }
}
