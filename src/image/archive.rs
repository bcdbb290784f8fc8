//! Reading OCI image layout directories and OCI and docker archives.
//!
//! An archive is read in place: its member list is read once (seeking over
//! the data), and each member is then read with positioned reads of its
//! byte range, so nothing is extracted to disk but the layers' contents.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};

use oci_spec::image::{
    Arch, ImageConfiguration, ImageIndex, ImageManifest, MediaType, OciLayout, Os,
};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::unpack::Tree;
use super::{read_capped, Error, ImageConfig};

/// The most kiln reads of a JSON member.
const JSON_LIMIT: u64 = 4 << 20;

/// Symlinks followed between members of an archive before giving up.
const MAX_MEMBER_LINKS: usize = 8;

/// Where an image's files come from.
pub(crate) enum Source {
    /// An OCI image layout directory.
    Dir { path: PathBuf },
    /// A tar archive, read in place.
    Tar {
        path: PathBuf,
        file: File,
        members: HashMap<String, Member>,
    },
}

/// A member of a tar archive.
pub(crate) enum Member {
    /// A regular file: where its data is.
    File { offset: u64, size: u64 },
    /// A symlink or hard link to another member (archive-relative).
    Link(String),
}

/// An image to build: its cache key, config and layers.
pub(crate) struct Resolved {
    /// "sha256:<hex>": the manifest's digest (OCI) or the config's (docker).
    pub id: String,
    pub config: ImageConfig,
    pub layers: Vec<Layer>,
}

impl Resolved {
    /// The hex part of `id`.
    pub fn hex(&self) -> &str {
        self.id.strip_prefix("sha256:").unwrap_or(&self.id)
    }
}

/// One layer blob and what it must hash to.
pub(crate) struct Layer {
    pub member: String,
    /// sha256 hex of the blob as stored (OCI descriptors).
    pub digest: Option<(String, u64)>,
    /// sha256 hex of the uncompressed tar (the config's `rootfs.diff_ids`).
    pub diff_id: String,
}

/// Whether `head` (the start of a file) is a tar header block: the ustar
/// magic, or a valid checksum for old-style archives.
pub(crate) fn looks_like_tar(head: &[u8]) -> bool {
    let Some(block) = head.get(..512) else {
        return false;
    };
    if &block[257..262] == b"ustar" {
        return true;
    }
    let field = &block[148..156];
    let text: String = field
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| b as char)
        .collect();
    let Ok(stored) = u32::from_str_radix(text.trim(), 8) else {
        return false;
    };
    let sum: u32 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(b)
            }
        })
        .sum();
    sum == stored && block.iter().any(|&b| b != 0)
}

/// `raw` as an archive-relative member name: no `.` components, no leading
/// `/`; `..` is resolved lexically, never above the root.
fn member_name(raw: &[u8]) -> String {
    let mut parts: Vec<&[u8]> = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    String::from_utf8_lossy(&parts.join(&b'/')).into_owned()
}

/// "blobs/sha256/<hex>" for a sha256 digest.
fn blob_member(digest: &oci_spec::image::Digest) -> Option<String> {
    if digest.algorithm().to_string() != "sha256" {
        return None;
    }
    Some(format!("blobs/sha256/{}", digest.digest()))
}

/// A reader that hashes what passes through it.
pub(crate) struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> Hashing<R> {
    pub fn new(inner: R) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// Reads the rest of the input, and returns its sha256 (hex) and length.
    pub fn finish(mut self) -> io::Result<(String, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((hex(&self.hasher.finalize()), self.bytes))
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A byte range of a file, read with positioned reads.
struct Range<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for Range<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end.saturating_sub(self.pos);
        if left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the archive ends inside this member",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// docker's `manifest.json`: one entry per image.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerImage {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

impl Source {
    pub fn layout_dir(path: &Path) -> Source {
        Source::Dir {
            path: path.to_path_buf(),
        }
    }

    /// Reads the member list of the tar archive `file` (at `path`).
    pub fn tar(path: &Path, file: File) -> Result<Source, Error> {
        let err = |source| Error::List {
            archive: path.to_path_buf(),
            source,
        };
        let len = file.metadata().map_err(err)?.len();
        let mut members = HashMap::new();
        {
            let mut archive = tar::Archive::new(&file);
            for entry in archive.entries_with_seek().map_err(err)? {
                let entry = entry.map_err(err)?;
                let name = member_name(&entry.path_bytes());
                let kind = entry.header().entry_type();
                let member = if kind.is_file() {
                    let offset = entry.raw_file_position();
                    let size = entry.size();
                    if offset.checked_add(size).is_none_or(|end| end > len) {
                        return Err(Error::Member {
                            archive: path.to_path_buf(),
                            member: name,
                            source: io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the archive is truncated inside this member",
                            ),
                        });
                    }
                    Member::File { offset, size }
                } else if kind.is_symlink() || kind.is_hard_link() {
                    let Some(target) = entry.link_name_bytes() else {
                        continue;
                    };
                    let target = if kind.is_symlink() && !target.starts_with(b"/") {
                        let dir = name.rsplit_once('/').map_or("", |(d, _)| d);
                        member_name(&[dir.as_bytes(), b"/", &target].concat())
                    } else {
                        member_name(&target)
                    };
                    Member::Link(target)
                } else {
                    continue;
                };
                members.insert(name, member);
            }
        }
        Ok(Source::Tar {
            path: path.to_path_buf(),
            file,
            members,
        })
    }

    /// The archive or directory.
    pub fn path(&self) -> &Path {
        match self {
            Source::Dir { path } | Source::Tar { path, .. } => path,
        }
    }

    fn missing(&self, member: &str) -> Error {
        Error::Missing {
            archive: self.path().to_path_buf(),
            member: member.to_string(),
        }
    }

    fn member_err(&self, member: &str) -> impl FnOnce(io::Error) -> Error + '_ {
        let member = member.to_string();
        move |source| Error::Member {
            archive: self.path().to_path_buf(),
            member,
            source,
        }
    }

    fn invalid(&self, member: &str, what: impl Into<String>) -> Error {
        Error::Invalid {
            archive: self.path().to_path_buf(),
            member: member.to_string(),
            what: what.into(),
        }
    }

    /// Whether the archive has a member `name`.
    pub fn has(&self, name: &str) -> bool {
        match self {
            Source::Dir { path } => path.join(name).exists(),
            Source::Tar { members, .. } => members.contains_key(name),
        }
    }

    /// A path under a layout directory for `name`, which must stay inside.
    fn dir_path(dir: &Path, name: &str) -> Option<PathBuf> {
        let rel = Path::new(name);
        if rel.components().all(|c| matches!(c, Component::Normal(_))) {
            Some(dir.join(rel))
        } else {
            None
        }
    }

    /// The data range of member `name`, following links between members.
    fn locate(&self, name: &str) -> Result<(u64, u64), Error> {
        let Source::Tar { members, .. } = self else {
            return Err(self.missing(name));
        };
        let mut current = name;
        for _ in 0..=MAX_MEMBER_LINKS {
            match members.get(current) {
                Some(Member::File { offset, size }) => return Ok((*offset, *size)),
                Some(Member::Link(target)) => current = target,
                None => return Err(self.missing(name)),
            }
        }
        Err(self.invalid(name, "too many links between members"))
    }

    /// The size of member `name`.
    pub fn size(&self, name: &str) -> Result<u64, Error> {
        match self {
            Source::Dir { path } => {
                let p = Self::dir_path(path, name).ok_or_else(|| self.missing(name))?;
                match p.metadata() {
                    Ok(m) => Ok(m.len()),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Err(self.missing(name)),
                    Err(e) => Err(self.member_err(name)(e)),
                }
            }
            Source::Tar { .. } => Ok(self.locate(name)?.1),
        }
    }

    /// A reader of member `name`.
    pub fn open(&self, name: &str) -> Result<Box<dyn Read + '_>, Error> {
        match self {
            Source::Dir { path } => {
                let p = Self::dir_path(path, name).ok_or_else(|| self.missing(name))?;
                match File::open(p) {
                    Ok(f) => Ok(Box::new(f)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Err(self.missing(name)),
                    Err(e) => Err(self.member_err(name)(e)),
                }
            }
            Source::Tar { file, .. } => {
                let (offset, size) = self.locate(name)?;
                Ok(Box::new(Range {
                    file,
                    pos: offset,
                    end: offset + size,
                }))
            }
        }
    }

    /// Member `name`, at most [`JSON_LIMIT`] bytes of it.
    fn read_small(&self, name: &str) -> Result<Vec<u8>, Error> {
        let r = self.open(name)?;
        read_capped(r, JSON_LIMIT)
            .map_err(self.member_err(name))?
            .ok_or_else(|| Error::TooLarge {
                archive: self.path().to_path_buf(),
                member: name.to_string(),
                limit: JSON_LIMIT,
            })
    }

    fn parse<T: for<'de> Deserialize<'de>>(
        &self,
        name: &str,
        data: &[u8],
        what: &'static str,
    ) -> Result<T, Error> {
        serde_json::from_slice(data).map_err(|source| Error::Json {
            archive: self.path().to_path_buf(),
            member: name.to_string(),
            what,
            source,
        })
    }

    /// The blob a descriptor points to, checked against its size and digest.
    fn read_blob(
        &self,
        desc: &oci_spec::image::Descriptor,
        what: &'static str,
    ) -> Result<(String, Vec<u8>), Error> {
        let name = blob_member(desc.digest()).ok_or_else(|| {
            self.invalid(desc.digest().as_ref(), "kiln verifies sha256 digests only")
        })?;
        let data = self.read_small(&name)?;
        self.check(&name, desc.digest().digest(), &hex(&Sha256::digest(&data)))?;
        if data.len() as u64 != desc.size() {
            return Err(self.invalid(
                &name,
                format!(
                    "the {what} is {} bytes, its descriptor says {}",
                    data.len(),
                    desc.size()
                ),
            ));
        }
        Ok((name, data))
    }

    fn check(&self, name: &str, expected: &str, actual: &str) -> Result<(), Error> {
        if expected == actual {
            Ok(())
        } else {
            Err(Error::Digest {
                archive: self.path().to_path_buf(),
                member: name.to_string(),
                expected: format!("sha256:{expected}"),
                actual: format!("sha256:{actual}"),
            })
        }
    }

    /// index.json → manifest → config and layers.
    pub fn resolve_oci(&self) -> Result<Resolved, Error> {
        let data = self.read_small("oci-layout")?;
        let layout: OciLayout = self.parse("oci-layout", &data, "OCI layout file")?;
        if !layout.image_layout_version().starts_with("1.") {
            return Err(self.invalid(
                "oci-layout",
                format!(
                    "unknown imageLayoutVersion {}",
                    layout.image_layout_version()
                ),
            ));
        }
        let data = self.read_small("index.json")?;
        let mut index: ImageIndex = self.parse("index.json", &data, "OCI image index")?;
        let mut index_name = "index.json".to_string();
        let mut desc = self.pick(&index, &index_name)?;
        if *desc.media_type() == MediaType::ImageIndex
            || desc.media_type().to_string()
                == "application/vnd.docker.distribution.manifest.list.v2+json"
        {
            let (name, data) = self.read_blob(&desc, "image index")?;
            index = self.parse(&name, &data, "OCI image index")?;
            index_name = name;
            desc = self.pick(&index, &index_name)?;
        }
        let (manifest_name, data) = self.read_blob(&desc, "image manifest")?;
        let manifest: ImageManifest = self.parse(&manifest_name, &data, "OCI image manifest")?;
        let (config_name, data) = self.read_blob(manifest.config(), "image config")?;
        let config: ImageConfiguration = self.parse(&config_name, &data, "OCI image config")?;
        let diff_ids = self.diff_ids(&config, &config_name, manifest.layers().len())?;
        let mut layers = Vec::new();
        for (d, diff_id) in manifest.layers().iter().zip(diff_ids) {
            let member = blob_member(d.digest()).ok_or_else(|| {
                self.invalid(
                    &manifest_name,
                    format!("layer {} is not a sha256 digest", d.digest()),
                )
            })?;
            layers.push(Layer {
                member,
                digest: Some((d.digest().digest().to_string(), d.size())),
                diff_id,
            });
        }
        Ok(Resolved {
            id: desc.digest().to_string(),
            config: image_config(&config),
            layers,
        })
    }

    /// The manifest of `index` for linux/amd64, or its only one.
    fn pick(&self, index: &ImageIndex, name: &str) -> Result<oci_spec::image::Descriptor, Error> {
        let all = index.manifests();
        if let [only] = all.as_slice() {
            if let Some(p) = only.platform() {
                if *p.os() != Os::Linux || *p.architecture() != Arch::Amd64 {
                    log::warn!(
                        "{}: the image is for {}/{}, not linux/amd64",
                        self.path().display(),
                        p.os(),
                        p.architecture()
                    );
                }
            }
            return Ok(only.clone());
        }
        all.iter()
            .find(|d| {
                d.platform()
                    .as_ref()
                    .is_some_and(|p| *p.os() == Os::Linux && *p.architecture() == Arch::Amd64)
            })
            .cloned()
            .ok_or_else(|| {
                self.invalid(
                    name,
                    format!("none of its {} manifests is for linux/amd64", all.len()),
                )
            })
    }

    /// The config's `rootfs.diff_ids` as hex, one per layer.
    fn diff_ids(
        &self,
        config: &ImageConfiguration,
        name: &str,
        layers: usize,
    ) -> Result<Vec<String>, Error> {
        let ids = config.rootfs().diff_ids();
        if ids.len() != layers {
            return Err(self.invalid(
                name,
                format!(
                    "rootfs.diff_ids lists {} layers, the manifest {layers}",
                    ids.len()
                ),
            ));
        }
        ids.iter()
            .map(|id| match id.strip_prefix("sha256:") {
                Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    Ok(h.to_ascii_lowercase())
                }
                _ => Err(self.invalid(name, format!("diff_id {id} is not a sha256 digest"))),
            })
            .collect()
    }

    /// docker's manifest.json → config and layers.
    pub fn resolve_docker(&self) -> Result<Resolved, Error> {
        let data = self.read_small("manifest.json")?;
        let images: Vec<DockerImage> =
            self.parse("manifest.json", &data, "docker archive manifest")?;
        let image = match images.as_slice() {
            [only] => only,
            [] => return Err(self.invalid("manifest.json", "it lists no image")),
            many => {
                let tags: Vec<String> = many
                    .iter()
                    .flat_map(|i| i.repo_tags.clone().unwrap_or_default())
                    .collect();
                return Err(self.invalid(
                    "manifest.json",
                    format!(
                        "it lists {} images ({}); kiln takes an archive of one",
                        many.len(),
                        tags.join(", ")
                    ),
                ));
            }
        };
        let config_name = member_name(image.config.as_bytes());
        let data = self.read_small(&config_name)?;
        let actual = hex(&Sha256::digest(&data));
        // The config is named by its digest: "<hex>.json" or "blobs/sha256/<hex>".
        let base = config_name.rsplit('/').next().unwrap_or("");
        let base = base.strip_suffix(".json").unwrap_or(base);
        if base.len() == 64 && base.bytes().all(|b| b.is_ascii_hexdigit()) {
            self.check(&config_name, base, &actual)?;
        }
        let config: ImageConfiguration = self.parse(&config_name, &data, "docker image config")?;
        let diff_ids = self.diff_ids(&config, &config_name, image.layers.len())?;
        let layers = image
            .layers
            .iter()
            .zip(diff_ids)
            .map(|(l, diff_id)| Layer {
                member: member_name(l.as_bytes()),
                digest: None,
                diff_id,
            })
            .collect();
        Ok(Resolved {
            id: format!("sha256:{actual}"),
            config: image_config(&config),
            layers,
        })
    }

    /// Applies `layer` to `tree`, checking its digests.
    pub fn apply_layer(
        &self,
        layer: &Layer,
        tree: &mut Tree,
        index: usize,
        count: usize,
    ) -> Result<(), Error> {
        let layer_err = |source| Error::Layer {
            archive: self.path().to_path_buf(),
            member: layer.member.clone(),
            index,
            count,
            source,
        };
        if let Some((_, size)) = &layer.digest {
            let actual = self.size(&layer.member)?;
            if actual != *size {
                return Err(self.invalid(
                    &layer.member,
                    format!("the layer is {actual} bytes, the manifest says {size}"),
                ));
            }
        }
        let mut blob = Hashing::new(self.open(&layer.member)?);
        let diff = {
            let mut buf = BufReader::with_capacity(256 << 10, &mut blob);
            let head = buf.fill_buf().map_err(layer_err)?;
            let decoded: Box<dyn Read + '_> = if head.starts_with(&[0x1f, 0x8b]) {
                Box::new(flate2::bufread::MultiGzDecoder::new(&mut buf))
            } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
                Box::new(zstd::stream::read::Decoder::with_buffer(&mut buf).map_err(layer_err)?)
            } else {
                Box::new(&mut buf)
            };
            let mut diff = Hashing::new(decoded);
            let skipped = tree.apply(&mut diff).map_err(layer_err)?;
            if skipped.devices > 0 {
                log::warn!(
                    "layer {index}/{count} ({}) of {}: skipped {} device nodes, FIFOs and sockets",
                    layer.member,
                    self.path().display(),
                    skipped.devices
                );
            }
            if skipped.unsafe_paths > 0 {
                log::warn!(
                    "layer {index}/{count} ({}) of {}: skipped {} entries under a symlink or with a bad link target",
                    layer.member,
                    self.path().display(),
                    skipped.unsafe_paths
                );
            }
            let diff = diff.finish().map_err(layer_err)?;
            drop(buf);
            diff
        };
        let (blob_hex, _) = blob.finish().map_err(layer_err)?;
        if let Some((digest, _)) = &layer.digest {
            self.check(&layer.member, digest, &blob_hex)?;
        }
        if diff.0 != layer.diff_id {
            return Err(self.invalid(
                &layer.member,
                format!(
                    "the uncompressed layer's sha256 is {}, the config's diff_id is sha256:{}",
                    diff.0, layer.diff_id
                ),
            ));
        }
        Ok(())
    }
}

/// The run defaults of an image config.
fn image_config(config: &ImageConfiguration) -> ImageConfig {
    let Some(c) = config.config() else {
        return ImageConfig::default();
    };
    let non_empty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
    ImageConfig {
        env: c.env().clone().unwrap_or_default(),
        working_dir: non_empty(c.working_dir()),
        user: non_empty(c.user()),
        entrypoint: c.entrypoint().clone().unwrap_or_default(),
        cmd: c.cmd().clone().unwrap_or_default(),
    }
}
