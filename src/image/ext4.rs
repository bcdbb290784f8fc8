//! Making an ext4 image of a directory with `mke2fs -d`, and giving its
//! files the owners and modes an image asks for with `debugfs`.
//!
//! mke2fs copies each file's owner and mode from the host, where an
//! ordinary user owns everything and setuid bits were not set. One
//! `debugfs -w -f SCRIPT` run then sets, with `sif PATH uid|gid|mode N`,
//! what differs from the image's tar headers. debugfs takes a path in
//! double quotes with `""` for a quote; a name with a newline cannot be
//! written in its scripts and keeps the host's owner and mode (a warning
//! says how many).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::unpack::Meta;
use super::Error;

const BLOCK: u64 = 4096;
const INODE_SIZE: u64 = 256;

/// What a directory tree needs in an ext4 file system.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Usage {
    /// File, directory and symlink data in whole blocks.
    pub bytes: u64,
    /// Files, directories and symlinks.
    pub inodes: u64,
}

/// Walks `dir` (never following symlinks).
pub(crate) fn measure(dir: &Path) -> io::Result<Usage> {
    let mut usage = Usage::default();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        usage.inodes += 1;
        usage.bytes += BLOCK;
        for e in fs::read_dir(&d)? {
            let e = e?;
            let m = e.metadata()?;
            if m.is_dir() {
                todo.push(e.path());
                continue;
            }
            usage.inodes += 1;
            // Symlinks up to 59 bytes live in the inode.
            if !(m.file_type().is_symlink() && m.len() < 60) {
                usage.bytes += m.len().div_ceil(BLOCK) * BLOCK;
            }
        }
    }
    Ok(usage)
}

fn run(tool: &'static str, cmd: &mut Command) -> Result<Output, Error> {
    log::debug!("running {cmd:?}");
    cmd.output().map_err(|source| Error::Spawn { tool, source })
}

/// Makes the ext4 file `out` of `dir`, sized for `usage`. `from` is the
/// image it is made for (for messages).
pub(crate) fn make(dir: &Path, out: &Path, usage: &Usage, from: &Path) -> Result<(), Error> {
    let data = usage.bytes + usage.inodes * INODE_SIZE;
    let size = (data + data / 5 + (32 << 20))
        .max(64 << 20)
        .div_ceil(1 << 20)
        << 20;
    let inodes = usage.inodes + usage.inodes / 5 + 1024;
    File::create(out)
        .and_then(|f| f.set_len(size))
        .map_err(|source| Error::Write {
            path: out.to_path_buf(),
            source,
        })?;
    let output = run(
        "mke2fs",
        Command::new("mke2fs")
            .args([
                "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-I", "256",
            ])
            .args(["-N", &inodes.to_string()])
            .args([
                "-O",
                "^has_journal",
                "-L",
                "kiln-image",
                "-E",
                "root_owner=0:0",
                "-d",
            ])
            .arg(dir)
            .arg(out),
    )?;
    if !output.status.success() {
        return Err(Error::Tool {
            tool: "mke2fs",
            path: out.to_path_buf(),
            from: from.to_path_buf(),
            detail: format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    Ok(())
}

/// `rel` as a debugfs path argument, if debugfs can take it.
fn quote(rel: &Path) -> Option<Vec<u8>> {
    let bytes = rel.as_os_str().as_bytes();
    if bytes.iter().any(|&b| b == b'\n' || b == b'\r') {
        return None;
    }
    let mut q = Vec::with_capacity(bytes.len() + 4);
    q.extend_from_slice(b"\"/");
    for &b in bytes {
        if b == b'"' {
            q.push(b'"');
        }
        q.push(b);
    }
    q.push(b'"');
    Some(q)
}

/// The debugfs script setting in the image what `entries` say and `root`
/// (the tree mke2fs read) does not have; and how many files it changes
/// and how many it cannot name.
fn script(root: &Path, entries: &BTreeMap<PathBuf, Meta>) -> (Vec<u8>, usize, usize) {
    let mut out = Vec::new();
    let (mut changed, mut unnamed) = (0, 0);
    for (rel, meta) in entries {
        // The root's owner and mode are mke2fs's, not the host's.
        let (uid, gid, mode) = if rel.as_os_str().is_empty() {
            (u32::MAX, u32::MAX, u32::MAX)
        } else {
            match fs::symlink_metadata(root.join(rel)) {
                Ok(m) => (m.uid(), m.gid(), m.mode()),
                Err(_) => continue,
            }
        };
        if (uid, gid, mode) == (meta.uid, meta.gid, meta.mode) {
            continue;
        }
        let Some(path) = quote(rel) else {
            unnamed += 1;
            continue;
        };
        changed += 1;
        let mut sif = |field: &str, value: String| {
            out.extend_from_slice(b"sif ");
            out.extend_from_slice(&path);
            out.extend_from_slice(format!(" {field} {value}\n").as_bytes());
        };
        if uid != meta.uid {
            sif("uid", meta.uid.to_string());
        }
        if gid != meta.gid {
            sif("gid", meta.gid.to_string());
        }
        if mode != meta.mode {
            sif("mode", format!("0{:o}", meta.mode));
        }
    }
    (out, changed, unnamed)
}

/// Sets in `image` (made of `root`) the owners and modes `entries` give
/// where they differ from the host's. Returns how many files changed.
pub(crate) fn fix_metadata(
    root: &Path,
    image: &Path,
    entries: &BTreeMap<PathBuf, Meta>,
    from: &Path,
) -> Result<usize, Error> {
    let (text, changed, unnamed) = script(root, entries);
    if unnamed > 0 {
        log::warn!(
            "{}: {unnamed} files have a newline in their name; they keep the owner and mode of the user running kiln",
            from.display()
        );
    }
    if text.is_empty() {
        return Ok(0);
    }
    let path = image.with_extension("debugfs");
    File::create(&path)
        .and_then(|mut f| f.write_all(&text))
        .map_err(|source| Error::Write {
            path: path.clone(),
            source,
        })?;
    let output = run(
        "debugfs",
        Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(&path)
            .arg(image),
    )?;
    // debugfs exits 0 whatever its commands did; their errors are on stderr,
    // after the version banner.
    let stderr = String::from_utf8_lossy(&output.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| {
            !l.trim().is_empty()
                && !l
                    .strip_prefix("debugfs ")
                    .is_some_and(|v| v.starts_with(|c: char| c.is_ascii_digit()))
        })
        .collect();
    let _ = fs::remove_file(&path);
    if !output.status.success() || !errors.is_empty() {
        return Err(Error::Tool {
            tool: "debugfs",
            path: image.to_path_buf(),
            from: from.to_path_buf(),
            detail: format!("{}: {}", output.status, errors.join("; ")),
        });
    }
    Ok(changed)
}
