//! Applying image layers (tar streams) to a directory, without ever
//! writing outside it.
//!
//! Entry paths are made relative (a leading `/` or `./` is dropped) and an
//! entry with a `..` component is an error. Nothing is written through a
//! symlink: every parent of an entry must be a real directory of the tree
//! (checked with `symlink_metadata`; the tree is written by this process
//! alone), files are created with `O_EXCL` after removing what was there,
//! and hard links may only point at files already in the tree. Device
//! nodes, FIFOs and sockets are skipped.
//!
//! Owners and modes are not applied on the host (kiln may not be root, and
//! the tree must stay readable by mke2fs): each entry's intended uid, gid
//! and mode are kept in [`Tree::entries`] and set inside the ext4 image.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::ops::Bound;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use filetime::FileTime;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

/// What the image says about a file: its owner, full `st_mode` (type and
/// permission bits) and modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Meta {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    pub mtime: i64,
}

/// Entries of a layer that were not applied.
#[derive(Debug, Default)]
pub(crate) struct Skipped {
    /// Device nodes, FIFOs, sockets.
    pub devices: usize,
    /// Entries under a symlink or a file, links to nothing in the tree.
    pub unsafe_paths: usize,
}

/// A directory layers are applied to.
pub(crate) struct Tree {
    root: PathBuf,
    meta: BTreeMap<PathBuf, Meta>,
    /// File bytes written so far, and how many may be: an image is
    /// untrusted, and a small compressed layer can declare terabytes.
    written: u64,
    limit: u64,
}

/// The most an image may unpack to, whatever the disk holds.
const MAX_UNPACKED: u64 = 64 << 30;
/// What unpacking leaves free on the cache's file system.
const KEEP_FREE: u64 = 1 << 30;
/// The most entries an image may have (each costs memory here).
const MAX_ENTRIES: usize = 4_000_000;

/// Bytes free for an unprivileged user on the file system of `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs is plain data.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a pointer to a statvfs we own.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// An I/O error about one entry of a layer.
#[derive(Debug, thiserror::Error)]
#[error("entry {entry}")]
struct EntryError {
    entry: String,
    #[source]
    source: io::Error,
}

fn at(entry: &str) -> impl Fn(io::Error) -> io::Error + '_ {
    move |source| {
        io::Error::other(EntryError {
            entry: entry.to_string(),
            source,
        })
    }
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// `raw` as a path relative to the tree: `None` if it has a `..` component.
/// The root is the empty path.
fn clean(raw: &[u8]) -> Option<PathBuf> {
    let mut rel = PathBuf::new();
    for c in Path::new(OsStr::from_bytes(raw)).components() {
        match c {
            Component::Normal(c) => rel.push(c),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(rel)
}

/// The mode a file has on the host: the image's permission bits (no
/// setuid, setgid or sticky) with the owner always able to read it, and to
/// search and change it if it is a directory.
fn host_mode(mode: u32, dir: bool) -> u32 {
    (mode & 0o777) | if dir { 0o700 } else { 0o400 }
}

fn set_mtime(path: &Path, mtime: i64) -> io::Result<()> {
    let t = FileTime::from_unix_time(mtime, 0);
    filetime::set_symlink_file_times(path, t, t)
}

impl Tree {
    /// An empty tree at `root`, which must not exist yet.
    pub fn new(root: &Path) -> io::Result<Tree> {
        fs::create_dir(root)?;
        let limit = free_bytes(root)
            .map_or(MAX_UNPACKED, |free| free.saturating_sub(KEEP_FREE))
            .min(MAX_UNPACKED);
        Self::made(root, limit)
    }

    /// An empty tree at `root` (which must not exist yet) taking at most
    /// `limit` bytes of file data.
    pub fn with_limit(root: &Path, limit: u64) -> io::Result<Tree> {
        fs::create_dir(root)?;
        Self::made(root, limit)
    }

    fn made(root: &Path, limit: u64) -> io::Result<Tree> {
        fs::set_permissions(root, fs::Permissions::from_mode(0o755))?;
        let mut meta = BTreeMap::new();
        meta.insert(PathBuf::new(), Meta::dir(0o755, 0));
        Ok(Tree {
            root: root.to_path_buf(),
            meta,
            written: 0,
            limit,
        })
    }

    /// Each path of the tree (relative, the root empty) and what the image
    /// says it is, in path order.
    pub fn entries(&self) -> &BTreeMap<PathBuf, Meta> {
        &self.meta
    }

    /// Gives the directories their modification times (the layers' entries
    /// changed them as they were written).
    pub fn finish(&mut self) -> io::Result<()> {
        for (rel, meta) in &self.meta {
            if meta.mode & 0o170000 == S_IFDIR {
                set_mtime(&self.root.join(rel), meta.mtime)?;
            }
        }
        Ok(())
    }

    /// Applies one layer, read as a tar stream from `r`.
    pub fn apply(&mut self, r: &mut dyn Read) -> io::Result<Skipped> {
        let mut skipped = Skipped::default();
        let mut layer: HashSet<PathBuf> = HashSet::new();
        let mut archive = tar::Archive::new(r);
        for entry in archive.entries()? {
            let mut entry = entry?;
            let raw = entry.path_bytes().into_owned();
            // Entry names come from the image: escaped before they reach a
            // terminal in a message.
            let shown = String::from_utf8_lossy(&raw).escape_debug().to_string();
            let rel =
                clean(&raw).ok_or_else(|| bad(format!("entry {shown} has a .. component")))?;
            let pax = pax_overrides(&mut entry);
            let header = entry.header();
            let kind = header.entry_type();
            let mut meta = Meta {
                uid: header
                    .uid()
                    .and_then(|v| u32::try_from(v).map_err(|_| bad(format!("uid {v}"))))
                    .map_err(at(&shown))?,
                gid: header
                    .gid()
                    .and_then(|v| u32::try_from(v).map_err(|_| bad(format!("gid {v}"))))
                    .map_err(at(&shown))?,
                mode: header.mode().map_err(at(&shown))? & 0o7777,
                mtime: header
                    .mtime()
                    .map(|t| i64::try_from(t).unwrap_or(0))
                    .unwrap_or(0),
            };
            meta.uid = pax.uid.unwrap_or(meta.uid);
            meta.gid = pax.gid.unwrap_or(meta.gid);
            meta.mtime = pax.mtime.unwrap_or(meta.mtime);

            if let Some(name) = rel
                .file_name()
                .and_then(|n| n.as_bytes().strip_prefix(b".wh."))
            {
                let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
                if !self.make_parents(&rel, &mut layer).map_err(at(&shown))? {
                    skipped.unsafe_paths += 1;
                } else if name == b".wh..opq" {
                    self.opaque(&parent, &layer).map_err(at(&shown))?;
                } else if name.starts_with(b".wh.") {
                    log::debug!("ignoring whiteout metadata {shown}");
                } else if name.is_empty() || name == b"." || name == b".." {
                    return Err(bad(format!("whiteout {shown} names no file")));
                } else {
                    self.clear(&parent.join(OsStr::from_bytes(name)))
                        .map_err(at(&shown))?;
                }
                continue;
            }

            if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
                skipped.devices += 1;
                continue;
            }
            if rel.as_os_str().is_empty() {
                if kind.is_dir() {
                    self.meta
                        .insert(rel, Meta::dir(meta.mode, meta.mtime).owned(&meta));
                }
                continue;
            }
            if !(kind.is_dir()
                || kind.is_file()
                || kind.is_symlink()
                || kind.is_hard_link()
                || kind.is_gnu_sparse())
            {
                log::debug!("skipping {shown}: tar entry type {:?}", kind.as_byte());
                continue;
            }
            if !self.make_parents(&rel, &mut layer).map_err(at(&shown))? {
                skipped.unsafe_paths += 1;
                continue;
            }
            let host = self.root.join(&rel);
            if kind.is_dir() {
                let existing = fs::symlink_metadata(&host);
                if !existing.as_ref().is_ok_and(|m| m.is_dir()) {
                    self.clear(&rel).map_err(at(&shown))?;
                    fs::create_dir(&host).map_err(at(&shown))?;
                }
                fs::set_permissions(
                    &host,
                    fs::Permissions::from_mode(host_mode(meta.mode, true)),
                )
                .map_err(at(&shown))?;
                self.meta.insert(
                    rel.clone(),
                    Meta {
                        mode: S_IFDIR | meta.mode,
                        ..meta
                    },
                );
            } else if kind.is_symlink() {
                let target = entry.link_name_bytes().unwrap_or_default().into_owned();
                self.clear(&rel).map_err(at(&shown))?;
                if target.is_empty() {
                    skipped.unsafe_paths += 1;
                    continue;
                }
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &host)
                    .map_err(at(&shown))?;
                set_mtime(&host, meta.mtime).map_err(at(&shown))?;
                self.meta.insert(
                    rel.clone(),
                    Meta {
                        mode: S_IFLNK | 0o777,
                        ..meta
                    },
                );
            } else if kind.is_hard_link() {
                let raw_target = entry.link_name_bytes().unwrap_or_default().into_owned();
                let target = clean(&raw_target).ok_or_else(|| {
                    bad(format!(
                        "hard link {shown} points to {}, which has a .. component",
                        String::from_utf8_lossy(&raw_target)
                    ))
                })?;
                if target.as_os_str().is_empty() || target == rel || !self.is_plain(&target) {
                    skipped.unsafe_paths += 1;
                    continue;
                }
                self.clear(&rel).map_err(at(&shown))?;
                match fs::hard_link(self.root.join(&target), &host) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        skipped.unsafe_paths += 1;
                        continue;
                    }
                    Err(e) => return Err(at(&shown)(e)),
                }
                let m = self.meta.get(&target).copied().unwrap_or(Meta {
                    mode: S_IFREG | meta.mode,
                    ..meta
                });
                self.meta.insert(rel.clone(), m);
            } else {
                // What the reader yields: a PAX `size` record overrides the
                // header's field (which may say 0), and a GNU sparse file
                // has its real size.
                let size = entry.size();
                self.written = self.written.saturating_add(size);
                if self.written > self.limit {
                    return Err(at(&shown)(bad(format!(
                        "the image unpacks to more than {} MiB, all this disk can take (at most {} GiB, leaving 1 GiB free)",
                        self.limit >> 20,
                        MAX_UNPACKED >> 30
                    ))));
                }
                if self.meta.len() >= MAX_ENTRIES {
                    return Err(at(&shown)(bad(format!(
                        "the image has more than {MAX_ENTRIES} files"
                    ))));
                }
                self.clear(&rel).map_err(at(&shown))?;
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&host)
                    .map_err(at(&shown))?;
                io::copy(&mut (&mut entry).take(size), &mut f).map_err(at(&shown))?;
                f.set_permissions(fs::Permissions::from_mode(host_mode(meta.mode, false)))
                    .map_err(at(&shown))?;
                let t = FileTime::from_unix_time(meta.mtime, 0);
                filetime::set_file_handle_times(&f, Some(t), Some(t)).map_err(at(&shown))?;
                self.meta.insert(
                    rel.clone(),
                    Meta {
                        mode: S_IFREG | meta.mode,
                        ..meta
                    },
                );
            }
            layer.insert(rel);
        }
        Ok(skipped)
    }

    /// Makes the missing parent directories of `rel` (owned by root, 0755,
    /// as tar does). False if a parent is a symlink or not a directory: the
    /// entry is not applied.
    fn make_parents(&mut self, rel: &Path, layer: &mut HashSet<PathBuf>) -> io::Result<bool> {
        let Some(parent) = rel.parent() else {
            return Ok(true);
        };
        let mut prefix = PathBuf::new();
        for c in parent.components() {
            prefix.push(c);
            let host = self.root.join(&prefix);
            match fs::symlink_metadata(&host) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&host)?;
                    fs::set_permissions(&host, fs::Permissions::from_mode(0o755))?;
                    self.meta.insert(prefix.clone(), Meta::dir(0o755, 0));
                    layer.insert(prefix.clone());
                }
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Whether `rel` is in the tree as something other than a directory,
    /// reached through real directories only.
    fn is_plain(&self, rel: &Path) -> bool {
        let mut prefix = PathBuf::new();
        let mut comps = rel.components().peekable();
        while let Some(c) = comps.next() {
            prefix.push(c);
            let Ok(m) = fs::symlink_metadata(self.root.join(&prefix)) else {
                return false;
            };
            let last = comps.peek().is_none();
            if last == m.is_dir() {
                return false;
            }
        }
        true
    }

    /// Removes `rel` (a directory with all in it) from the tree, if there.
    fn clear(&mut self, rel: &Path) -> io::Result<()> {
        if rel.as_os_str().is_empty() {
            return Ok(());
        }
        let host = self.root.join(rel);
        let removed = match fs::symlink_metadata(&host) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&host),
            Ok(_) => fs::remove_file(&host),
            Err(e) => Err(e),
        };
        match removed {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let gone: Vec<PathBuf> = self
            .meta
            .range::<Path, _>((Bound::Included(rel), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(rel))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            self.meta.remove(&k);
        }
        Ok(())
    }

    /// `.wh..wh..opq` in `dir`: removes what earlier layers put in it (what
    /// this layer wrote stays).
    fn opaque(&mut self, dir: &Path, layer: &HashSet<PathBuf>) -> io::Result<()> {
        let mut todo = vec![dir.to_path_buf()];
        while let Some(dir) = todo.pop() {
            for e in fs::read_dir(self.root.join(&dir))? {
                let e = e?;
                let rel = dir.join(e.file_name());
                if !layer.contains(&rel) {
                    self.clear(&rel)?;
                } else if e.file_type()?.is_dir() {
                    todo.push(rel);
                }
            }
        }
        Ok(())
    }
}

/// Owner and mtime from an entry's PAX header, which win over the tar
/// header's (ustar fields are too small for big ids).
#[derive(Default)]
struct Pax {
    uid: Option<u32>,
    gid: Option<u32>,
    mtime: Option<i64>,
}

fn pax_overrides<R: Read>(entry: &mut tar::Entry<'_, R>) -> Pax {
    let mut pax = Pax::default();
    let Ok(Some(exts)) = entry.pax_extensions() else {
        return pax;
    };
    for ext in exts.flatten() {
        let (Ok(key), Ok(value)) = (ext.key(), ext.value()) else {
            continue;
        };
        match key {
            "uid" => pax.uid = value.parse().ok(),
            "gid" => pax.gid = value.parse().ok(),
            "mtime" => {
                let secs = value.split('.').next().unwrap_or("");
                pax.mtime = secs.parse().ok();
            }
            _ => {}
        }
    }
    pax
}

impl Meta {
    /// A root-owned directory.
    fn dir(mode: u32, mtime: i64) -> Meta {
        Meta {
            uid: 0,
            gid: 0,
            mode: S_IFDIR | (mode & 0o7777),
            mtime,
        }
    }

    /// `self` with the owner of `other`.
    fn owned(self, other: &Meta) -> Meta {
        Meta {
            uid: other.uid,
            gid: other.gid,
            ..self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `records` as a PAX extended header block, then a ustar header for a
    /// regular file `name` whose size field says `size`.
    fn pax_then_file(records: &str, name: &str, size: u64) -> Vec<u8> {
        let mut out = Vec::new();
        let mut x = tar::Header::new_ustar();
        x.set_path("PaxHeaders/f").unwrap();
        x.set_entry_type(tar::EntryType::XHeader);
        x.set_size(records.len() as u64);
        x.set_cksum();
        out.extend_from_slice(x.as_bytes());
        out.extend_from_slice(records.as_bytes());
        out.resize(out.len().next_multiple_of(512), 0);
        let mut h = tar::Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(size);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out
    }

    /// A PAX `size` record overrides the header's size field, and is what
    /// counts against the limit: with the header's field (0 here) counted,
    /// any amount of data, a small compressed layer's worth, was written
    /// past it. Found writing the `image` fuzz harness, whose tree-limit
    /// check catches it (`fuzz/corpus/image/crash-pax-size`).
    #[test]
    fn pax_sizes_count_against_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut tree = Tree::with_limit(&dir.path().join("root"), 4096).unwrap();
        let mut layer = pax_then_file("15 size=100000\n", "big", 0);
        layer.extend_from_slice(&vec![0x5a; 100_000]);
        layer.resize(layer.len().next_multiple_of(512) + 1024, 0);
        let e = tree.apply(&mut &layer[..]).unwrap_err();
        assert!(
            crate::error_chain(&e).contains("unpacks to more than"),
            "{e:?}"
        );
        assert!(!dir.path().join("root/big").exists());

        // Within the limit, the PAX size is the file's.
        let mut tree = Tree::with_limit(&dir.path().join("ok"), 4096).unwrap();
        let mut layer = pax_then_file("13 size=3000\n", "f", 0);
        layer.extend_from_slice(&[7; 3000]);
        layer.resize(layer.len().next_multiple_of(512) + 1024, 0);
        tree.apply(&mut &layer[..]).unwrap();
        assert_eq!(std::fs::read(dir.path().join("ok/f")).unwrap(), [7; 3000]);
    }
}
