//! `kiln run --image X`: what X is, and the ext4 file the VM attaches for it.
//!
//! X may be an ext4 file (used as is), a host directory (made into an ext4
//! image in the run's scratch directory), an OCI image layout directory, or
//! an OCI or docker archive (what `podman save`, `skopeo copy` and `docker
//! save` write). The format is told by content, never by the file name.
//!
//! OCI images are unpacked layer by layer (`unpack.rs`) into a directory of
//! the cache and made into an ext4 image with `mke2fs -d`, then the owners
//! and modes the layers asked for are set inside the image with `debugfs`
//! (`ext4.rs`): kiln runs as an ordinary user, whose files on the host all
//! belong to that user. The result is cached as
//! `images/<manifest digest>.ext4` beside `<digest>.json` (the image's
//! [`ImageConfig`]); one process builds it while concurrent ones wait on
//! `images/<digest>.lock`, and it appears by rename only when complete.
//!
//! Everything read from an image is untrusted: blobs are checked against
//! their sha256 digests, JSON members are size-capped before parsing, and
//! no layer entry can write outside the unpack directory.

pub(crate) mod archive;
pub mod busybox;
mod ext4;
pub(crate) mod unpack;

#[cfg(test)]
mod tests;

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use archive::{Resolved, Source};

/// The defaults an image gives a run: `kiln run` flags override them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `K=V` entries (`config.Env`).
    pub env: Vec<String>,
    /// `config.WorkingDir`, when set and not empty.
    pub working_dir: Option<String>,
    /// `config.User`, when set and not empty.
    pub user: Option<String>,
    /// `config.Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `config.Cmd`.
    pub cmd: Vec<String>,
}

/// An image ready to attach.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The ext4 file to attach read-only.
    pub ext4: PathBuf,
    /// The image's defaults.
    pub config: ImageConfig,
    /// cache key, e.g. "sha256:…" of the manifest, or None for ext4/dir.
    /// For a docker archive (which has no manifest blob) it is the config's
    /// digest, the image ID; its layers are checked against the config's
    /// diff_ids, so it names the content as firmly.
    pub id: Option<String>,
}

/// Why an image cannot be prepared. Each message names the file (and the
/// member or blob inside it) and what is wrong with it; the cause, if any,
/// is in `source()`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The `--image` path cannot be read.
    #[error("cannot read image {}", path.display())]
    Open {
        /// The `--image` path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The `--image` path is none of the formats kiln takes.
    #[error(
        "{} is not an image kiln can use ({why}); --image takes an ext4 file, a directory, \
         an OCI image layout directory, or an OCI or docker archive (tar)",
        path.display()
    )]
    Unknown {
        /// The `--image` path.
        path: PathBuf,
        /// What it is instead.
        why: &'static str,
    },
    /// A member of an archive (or a file of a layout directory) cannot be read.
    #[error("cannot read {} in {}", member.escape_debug(), archive.display())]
    Member {
        /// The archive or layout directory.
        archive: PathBuf,
        /// The member.
        member: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A member the image refers to is not there.
    #[error("{} is missing from {}", member.escape_debug(), archive.display())]
    Missing {
        /// The archive or layout directory.
        archive: PathBuf,
        /// The member.
        member: String,
    },
    /// The archive's member list cannot be read.
    #[error("cannot read the member list of {} (a truncated or corrupt tar archive)", archive.display())]
    List {
        /// The archive.
        archive: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A JSON member is larger than kiln reads.
    #[error("{} in {} is larger than {limit} bytes", member.escape_debug(), archive.display())]
    TooLarge {
        /// The archive or layout directory.
        archive: PathBuf,
        /// The member.
        member: String,
        /// The cap.
        limit: u64,
    },
    /// A JSON member does not parse.
    #[error("{} in {} is not a valid {what}", member.escape_debug(), archive.display())]
    Json {
        /// The archive or layout directory.
        archive: PathBuf,
        /// The member.
        member: String,
        /// What it should be (e.g. "OCI image manifest").
        what: &'static str,
        /// The parser's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// A blob's content does not match its digest (which names it).
    #[error(
        "{} in {} does not match its digest: its content's sha256 is {actual}",
        member.escape_debug(),
        archive.display()
    )]
    Digest {
        /// The archive or layout directory.
        archive: PathBuf,
        /// The blob.
        member: String,
        /// The digest the image claims.
        expected: String,
        /// What the content hashes to.
        actual: String,
    },
    /// The image is inconsistent in a way described by `what`.
    #[error("{} in {}: {}", member.escape_debug(), archive.display(), what.escape_debug())]
    Invalid {
        /// The archive or layout directory.
        archive: PathBuf,
        /// The member at fault.
        member: String,
        /// What is wrong.
        what: String,
    },
    /// A layer cannot be applied (a corrupt stream, an entry escaping the
    /// image, a host I/O error).
    #[error("cannot unpack layer {index}/{count} ({}) of {}", member.escape_debug(), archive.display())]
    Layer {
        /// The archive or layout directory.
        archive: PathBuf,
        /// The layer's member.
        member: String,
        /// 1-based.
        index: usize,
        /// Layers in the image.
        count: usize,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// kiln's own files (cache, scratch) cannot be written.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// mke2fs or debugfs cannot be started.
    #[error("cannot run {tool} (it comes with e2fsprogs)")]
    Spawn {
        /// The program.
        tool: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// mke2fs or debugfs failed.
    #[error("{tool} failed making {} from {}: {detail}", path.display(), from.display())]
    Tool {
        /// The program.
        tool: &'static str,
        /// The ext4 file being made.
        path: PathBuf,
        /// The image it is made from.
        from: PathBuf,
        /// Its exit status and stderr.
        detail: String,
    },
}

/// Turns `spec` (the `--image` argument) into an ext4 file and the image's
/// defaults. See the module documentation for the formats.
///
/// `cache` is kiln's cache directory (`images/` is made under it);
/// `scratch` a per-run directory deleted after the run; `progress` is given
/// one-line messages for the long steps.
pub fn prepare(
    spec: &Path,
    cache: &Path,
    scratch: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Prepared, Error> {
    let open_err = |source| Error::Open {
        path: spec.to_path_buf(),
        source,
    };
    let meta = fs::metadata(spec).map_err(open_err)?;
    if meta.is_dir() {
        if fs::symlink_metadata(spec.join("oci-layout")).is_ok() {
            let source = Source::layout_dir(spec);
            return from_oci(&source, cache, progress);
        }
        return from_host_dir(spec, scratch, progress);
    }
    if !meta.is_file() {
        return Err(Error::Unknown {
            path: spec.to_path_buf(),
            why: "neither a regular file nor a directory",
        });
    }
    let file = File::open(spec).map_err(open_err)?;
    let mut head = [0u8; 1536];
    let n = read_at_most(&file, &mut head).map_err(open_err)?;
    let head = &head[..n];
    if head.get(1080..1082) == Some(&[0x53, 0xef][..]) {
        log::info!("image {} is an ext4 file", spec.display());
        return Ok(Prepared {
            ext4: spec.to_path_buf(),
            config: ImageConfig::default(),
            id: None,
        });
    }
    if !archive::looks_like_tar(head) {
        return Err(Error::Unknown {
            path: spec.to_path_buf(),
            why: "neither an ext4 file system nor a tar archive",
        });
    }
    let (source, resolved) = open_archive(spec, file)?;
    build_cached(&source, &resolved, cache, progress)
}

/// The OCI or docker archive `file` (at `spec`): its members, and the
/// image they hold.
pub(crate) fn open_archive(spec: &Path, file: File) -> Result<(Source, Resolved), Error> {
    let source = Source::tar(spec, file)?;
    let resolved = if source.has("oci-layout") && source.has("index.json") {
        source.resolve_oci()?
    } else if source.has("manifest.json") {
        source.resolve_docker()?
    } else {
        return Err(Error::Unknown {
            path: spec.to_path_buf(),
            why: "a tar archive with neither oci-layout and index.json nor manifest.json",
        });
    };
    Ok((source, resolved))
}

fn from_oci(
    source: &Source,
    cache: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Prepared, Error> {
    let resolved = source.resolve_oci()?;
    build_cached(source, &resolved, cache, progress)
}

/// Reads up to `buf.len()` bytes from the start of `file`.
fn read_at_most(file: &File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn from_host_dir(
    dir: &Path,
    scratch: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Prepared, Error> {
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Write { path, source }
    };
    fs::create_dir_all(scratch).map_err(write_err(scratch))?;
    let mut out = scratch.join("image.ext4");
    let mut n = 1;
    while fs::symlink_metadata(&out).is_ok() {
        out = scratch.join(format!("image-{n}.ext4"));
        n += 1;
    }
    let start = Instant::now();
    let usage = ext4::measure(dir).map_err(|source| Error::Open {
        path: dir.to_path_buf(),
        source,
    })?;
    progress(&format!(
        "making an ext4 image of {} ({}, {} files)",
        dir.display(),
        mib(usage.bytes),
        usage.inodes
    ));
    ext4::make(dir, &out, &usage, dir)?;
    progress(&format!(
        "made the ext4 image in {:.1} s",
        start.elapsed().as_secs_f64()
    ));
    Ok(Prepared {
        ext4: out,
        config: ImageConfig::default(),
        id: None,
    })
}

/// `n` bytes as "12.3 MiB".
fn mib(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0))
}

/// The cached image for `resolved` if it is complete.
fn cached(ext4: &Path, json: &Path, id: &str) -> Option<Prepared> {
    if !fs::metadata(ext4).ok()?.is_file() {
        return None;
    }
    let text = fs::read(json).ok()?;
    match serde_json::from_slice::<ImageConfig>(&text) {
        Ok(config) => Some(Prepared {
            ext4: ext4.to_path_buf(),
            config,
            id: Some(id.to_string()),
        }),
        Err(e) => {
            log::warn!("ignoring the cached {}: {e}", json.display());
            None
        }
    }
}

fn build_cached(
    source: &Source,
    resolved: &Resolved,
    cache: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Prepared, Error> {
    let images = cache.join("images");
    let hex = resolved.hex();
    let ext4_path = images.join(format!("{hex}.ext4"));
    let json_path = images.join(format!("{hex}.json"));
    if let Some(p) = cached(&ext4_path, &json_path, &resolved.id) {
        log::info!("image {} from the cache: {}", resolved.id, p.ext4.display());
        return Ok(p);
    }
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Write { path, source }
    };
    fs::create_dir_all(&images).map_err(write_err(&images))?;
    let lock_path = images.join(format!("{hex}.lock"));
    let lock = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(write_err(&lock_path))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            progress(&format!(
                "waiting for another kiln to build image {}",
                resolved.id
            ));
            lock.lock().map_err(write_err(&lock_path))?;
        }
        Err(fs::TryLockError::Error(e)) => return Err(write_err(&lock_path)(e)),
    }
    if let Some(p) = cached(&ext4_path, &json_path, &resolved.id) {
        return Ok(p);
    }
    clean_stale(&images, hex);
    let tmp = TmpDir::create(&images, hex)?;
    let result = build(source, resolved, &tmp.path, progress).and_then(|()| {
        let config_tmp = tmp.path.join("config.json");
        let text = serde_json::to_vec_pretty(&resolved.config).map_err(|e| Error::Write {
            path: config_tmp.clone(),
            source: io::Error::other(e),
        })?;
        write_synced(&config_tmp, &text).map_err(write_err(&config_tmp))?;
        fs::rename(&config_tmp, &json_path).map_err(write_err(&json_path))?;
        let image_tmp = tmp.path.join("image.ext4");
        File::open(&image_tmp)
            .and_then(|f| f.sync_all())
            .map_err(write_err(&image_tmp))?;
        fs::rename(&image_tmp, &ext4_path).map_err(write_err(&ext4_path))?;
        File::open(&images)
            .and_then(|d| d.sync_all())
            .map_err(write_err(&images))
    });
    drop(tmp);
    drop(lock);
    result?;
    Ok(Prepared {
        ext4: ext4_path,
        config: resolved.config.clone(),
        id: Some(resolved.id.clone()),
    })
}

fn write_synced(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// Unpacks the layers into `tmp/root` and makes `tmp/image.ext4` of them.
fn build(
    source: &Source,
    resolved: &Resolved,
    tmp: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(), Error> {
    let start = Instant::now();
    let root = tmp.join("root");
    let mut tree = unpack::Tree::new(&root).map_err(|source| Error::Write {
        path: root.clone(),
        source,
    })?;
    unpack_layers(source, resolved, &mut tree, &root, progress)?;
    let unpacked = start.elapsed();
    let usage = ext4::measure(&root).map_err(|source| Error::Write {
        path: root.clone(),
        source,
    })?;
    progress(&format!(
        "making the ext4 image ({}, {} files)",
        mib(usage.bytes),
        usage.inodes
    ));
    let image = tmp.join("image.ext4");
    let t = Instant::now();
    ext4::make(&root, &image, &usage, source.path())?;
    let made = t.elapsed();
    let t = Instant::now();
    let fixes = ext4::fix_metadata(&root, &image, tree.entries(), source.path())?;
    progress(&format!(
        "image {} ready in {:.1} s (unpack {:.1} s, mke2fs {:.1} s, {fixes} owner/mode fixes {:.1} s)",
        resolved.id,
        start.elapsed().as_secs_f64(),
        unpacked.as_secs_f64(),
        made.as_secs_f64(),
        t.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Applies every layer of `resolved` to `tree` (at `root`), in order.
pub(crate) fn unpack_layers(
    source: &Source,
    resolved: &Resolved,
    tree: &mut unpack::Tree,
    root: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(), Error> {
    let count = resolved.layers.len();
    for (i, layer) in resolved.layers.iter().enumerate() {
        let size = source.size(&layer.member)?;
        progress(&format!(
            "unpacking layer {}/{count} ({})",
            i + 1,
            mib(size)
        ));
        source.apply_layer(layer, tree, i + 1, count)?;
    }
    tree.finish().map_err(|source| Error::Write {
        path: root.to_path_buf(),
        source,
    })
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// `images/tmp-<hex>-<pid>-<n>`, removed with everything in it when dropped.
struct TmpDir {
    path: PathBuf,
}

impl TmpDir {
    fn create(images: &Path, hex: &str) -> Result<TmpDir, Error> {
        loop {
            let n = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
            let path = images.join(format!("tmp-{hex}-{}-{n}", std::process::id()));
            match fs::create_dir(&path) {
                Ok(()) => return Ok(TmpDir { path }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(source) => return Err(Error::Write { path, source }),
            }
        }
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            log::warn!("cannot remove {}: {e}", self.path.display());
        }
    }
}

/// Removes `images/tmp-*` directories left by killed processes: those of
/// `hex` (whose lock we hold) and those whose image's lock nobody holds.
fn clean_stale(images: &Path, hex: &str) {
    let Ok(dir) = fs::read_dir(images) else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("tmp-")) else {
            continue;
        };
        let Some((other, _)) = rest.split_once('-') else {
            continue;
        };
        let stale = other == hex
            || match File::open(images.join(format!("{other}.lock"))) {
                Ok(f) => f.try_lock().is_ok(),
                Err(e) => e.kind() == io::ErrorKind::NotFound,
            };
        if stale {
            log::info!("removing {}, left by a killed kiln", entry.path().display());
            match fs::remove_dir_all(entry.path()) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    log::warn!("cannot remove {}: {e}", entry.path().display());
                }
                _ => {}
            }
        }
    }
}

/// Reads all of `r` into memory, refusing more than `limit` bytes.
fn read_capped(mut r: impl Read, limit: u64) -> io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::new();
    r.by_ref().take(limit + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > limit {
        return Ok(None);
    }
    Ok(Some(buf))
}
