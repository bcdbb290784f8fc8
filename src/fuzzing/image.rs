//! `kiln run --image` archives, unpacked as kiln unpacks them, into a
//! scratch directory: everything [`prepare`](crate::image::prepare) does
//! with an OCI or docker archive but make the ext4 file (mke2fs).
//!
//! The first byte picks what the fuzzer's bytes are:
//! - 0: tar layers (a count, then each), applied in order to one tree;
//! - 1: a whole archive file (`podman save`'s or `docker save`'s output);
//! - 2: layers (raw, gzip or zstd) that the harness wraps in a valid OCI
//!   or docker archive (right digests, diff_ids and sizes), so the fuzzer
//!   gets past the checksums to the unpacking.
//!
//! After each run: nothing changed beside the tree or in
//! [`TRAP`](super::TRAP); the tree holds only directories, regular files
//! and symlinks; its files hold at most the tree's byte limit.

use std::collections::HashSet;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde_json::json;
use sha2::{Digest as _, Sha256};

use super::input::{Input, Seed};
use super::{Scratch, TRAP};
use crate::image::archive::looks_like_tar;
use crate::image::unpack::Tree;
use crate::image::{open_archive, unpack_layers};

/// The most file data the fuzzed tree may take: small, so that inputs of
/// a few KiB can reach it.
pub const TREE_LIMIT: u64 = 4096;

pub fn run(data: &[u8]) {
    super::limit_file_size();
    let mut input = Input::new(data);
    let scratch = Scratch::new("img");
    let root = scratch.path("root");
    let mut tree = match Tree::with_limit(&root, TREE_LIMIT) {
        Ok(t) => t,
        Err(e) => panic!("cannot make {}: {e}", root.display()),
    };
    match input.u8() % 3 {
        0 => {
            let n = 1 + input.below(3);
            for k in 0..n {
                let layer = if k + 1 == n {
                    input.rest()
                } else {
                    input.bytes(usize::MAX)
                };
                if tree.apply(&mut &layer[..]).is_err() {
                    break;
                }
            }
            let _ = tree.finish();
        }
        1 => {
            let archive = input.rest().to_vec();
            unpack_archive(&scratch, &archive, &mut tree);
        }
        _ => {
            let archive = wrap(&mut input);
            unpack_archive(&scratch, &archive, &mut tree);
        }
    }
    drop(tree);
    scratch.check_untouched(&["root", "image.tar"]);
    check_tree(&root);
}

/// What `prepare` does with an archive file, short of the ext4 image.
fn unpack_archive(scratch: &Scratch, archive: &[u8], tree: &mut Tree) {
    if !looks_like_tar(archive) {
        return;
    }
    let path = scratch.path("image.tar");
    let file = std::fs::write(&path, archive).and_then(|()| std::fs::File::open(&path));
    let file = match file {
        Ok(f) => f,
        Err(e) => panic!("cannot write {}: {e}", path.display()),
    };
    let Ok((source, resolved)) = open_archive(&path, file) else {
        return;
    };
    let _ = unpack_layers(&source, &resolved, tree, &scratch.path("root"), &mut |_| {});
}

/// The tree holds directories, regular files and symlinks only, and file
/// data within [`TREE_LIMIT`] (each file counted once, however many hard
/// links it has).
fn check_tree(root: &Path) {
    let mut todo = vec![root.to_path_buf()];
    let mut seen = HashSet::new();
    let mut bytes = 0u64;
    while let Some(dir) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let Ok(m) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            let t = m.file_type();
            if t.is_dir() {
                todo.push(path);
            } else if t.is_file() {
                if seen.insert(m.ino()) {
                    bytes += m.len();
                }
            } else {
                assert!(t.is_symlink(), "unpacking made {path:?}, a {t:?}");
            }
        }
    }
    assert!(
        bytes <= TREE_LIMIT,
        "unpacking wrote {bytes} bytes of files, over the tree's limit of {TREE_LIMIT}"
    );
}

fn sha(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An OCI or docker archive around the fuzzer's layers: a flavour byte
/// (bit 0: docker; bit 1: the layers' archive members are symlinks to
/// the blobs, as docker writes them), a layer count, then each layer: a
/// compression byte (0: none, 1: gzip, 2: zstd) and its tar bytes.
fn wrap(input: &mut Input) -> Vec<u8> {
    let flavour = input.u8();
    let n = 1 + input.below(3);
    let mut layers = Vec::new();
    for _ in 0..n {
        let how = input.below(3);
        let tar = input.bytes(usize::MAX).to_vec();
        let blob = match how {
            0 => tar.clone(),
            1 => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                let _ = e.write_all(&tar);
                e.finish().unwrap_or_default()
            }
            _ => zstd::encode_all(&tar[..], 1).unwrap_or_default(),
        };
        layers.push((sha(&tar), blob));
    }
    let diff_ids: Vec<String> = layers.iter().map(|(d, _)| format!("sha256:{d}")).collect();
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids}
    })
    .to_string()
    .into_bytes();
    let config_hex = sha(&config);
    let mut files: Vec<(String, Vec<u8>, Option<String>)> = Vec::new();
    let blob_name = |hex: &str| format!("blobs/sha256/{hex}");
    let mut layer_names = Vec::new();
    for (k, (_, blob)) in layers.iter().enumerate() {
        let hex = sha(blob);
        if flavour & 2 != 0 {
            let name = format!("{k}/layer.tar");
            files.push((
                name.clone(),
                Vec::new(),
                Some(format!("../{}", blob_name(&hex))),
            ));
            layer_names.push(name);
        } else {
            layer_names.push(blob_name(&hex));
        }
        files.push((blob_name(&hex), blob.clone(), None));
    }
    files.push((blob_name(&config_hex), config.clone(), None));
    if flavour & 1 != 0 {
        let manifest = json!([{
            "Config": blob_name(&config_hex),
            "RepoTags": ["fuzz:latest"],
            "Layers": layer_names,
        }]);
        files.push((
            "manifest.json".into(),
            manifest.to_string().into_bytes(),
            None,
        ));
    } else {
        let descs: Vec<_> = layers
            .iter()
            .map(|(_, blob)| {
                json!({
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": format!("sha256:{}", sha(blob)),
                    "size": blob.len()
                })
            })
            .collect();
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": format!("sha256:{config_hex}"),
                "size": config.len()
            },
            "layers": descs
        })
        .to_string()
        .into_bytes();
        let manifest_hex = sha(&manifest);
        let index = json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": format!("sha256:{manifest_hex}"),
                "size": manifest.len()
            }]
        });
        files.push((blob_name(&manifest_hex), manifest, None));
        files.push(("index.json".into(), index.to_string().into_bytes(), None));
        files.push((
            "oci-layout".into(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
            None,
        ));
    }
    tar_of(&files)
}

/// A tar archive of `(name, content, symlink target)`.
fn tar_of(files: &[(String, Vec<u8>, Option<String>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data, link) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        let r = match link {
            Some(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, name, target)
            }
            None => {
                h.set_size(u64::try_from(data.len()).unwrap_or(0));
                b.append_data(&mut h, name, &data[..])
            }
        };
        if let Err(e) = r {
            panic!("cannot make the archive: {e}");
        }
    }
    b.into_inner().unwrap_or_default()
}

/// One tar entry for seeds: names and link targets written raw (the tar
/// crate refuses `..` and absolute names, which the seeds need).
pub fn entry(b: &mut Vec<u8>, name: &str, kind: tar::EntryType, link: &str, data: &[u8]) {
    let mut h = tar::Header::new_ustar();
    {
        let old = h.as_old_mut();
        let n = name.len().min(100);
        old.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        let l = link.len().min(100);
        old.linkname[..l].copy_from_slice(&link.as_bytes()[..l]);
    }
    h.set_entry_type(kind);
    h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
    h.set_mtime(1_700_000_000);
    h.set_size(u64::try_from(data.len()).unwrap_or(0));
    h.set_cksum();
    b.extend_from_slice(h.as_bytes());
    b.extend_from_slice(data);
    b.resize(b.len().next_multiple_of(512), 0);
}

/// A PAX extended header (`x`) with `records` (key, value), for the
/// entry that follows it.
pub fn pax(b: &mut Vec<u8>, records: &[(&str, &str)]) {
    let mut data = Vec::new();
    for (k, v) in records {
        // "<len> <key>=<value>\n", the length counting itself.
        let rest = format!(" {k}={v}\n");
        let mut len = rest.len() + 1;
        while format!("{len}").len() + rest.len() > len {
            len += 1;
        }
        data.extend_from_slice(format!("{len}{rest}").as_bytes());
    }
    entry(b, "PaxHeaders/x", tar::EntryType::XHeader, "", &data);
}

/// A tar stream of entries, with its end blocks.
pub fn layer(entries: &[(&str, tar::EntryType, &str, &[u8])]) -> Vec<u8> {
    let mut b = Vec::new();
    for &(name, kind, link, data) in entries {
        entry(&mut b, name, kind, link, data);
    }
    b.extend_from_slice(&[0; 1024]);
    b
}

/// The seed corpus: plain layers with every entry kind, whiteouts and
/// escapes, and wrapped OCI and docker archives.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    use tar::EntryType as T;
    let base = layer(&[
        ("etc/", T::Directory, "", b""),
        ("etc/passwd", T::Regular, "", b"root:x:0:0::/root:/bin/sh\n"),
        ("bin/sh", T::Regular, "", b"\x7fELF"),
        ("bin/ls", T::Link, "bin/sh", b""),
        ("usr/bin", T::Symlink, "../bin", b""),
        ("dev/null", T::Char, "", b""),
    ]);
    let upper = layer(&[
        ("etc/.wh.passwd", T::Regular, "", b""),
        ("bin/.wh..wh..opq", T::Regular, "", b""),
        ("bin/true", T::Regular, "", b"#!/bin/sh\n"),
    ]);
    // The entries with a `..` end the layer: they come last.
    let escapes = layer(&[
        ("/abs", T::Symlink, TRAP, b""),
        ("abs/file", T::Regular, "", b"through a symlink"),
        ("up", T::Symlink, "../outside-dir", b""),
        ("up/file", T::Regular, "", b"through a symlink"),
        ("hard2", T::Link, "/etc/passwd", b""),
        ("fifo", T::Fifo, "", b""),
        ("hard", T::Link, "../outside", b""),
        ("../outside-dir/x", T::Regular, "", b"escaped"),
    ]);
    // Big owners and a fractional mtime, as podman writes them.
    let mut owned = Vec::new();
    pax(
        &mut owned,
        &[
            ("uid", "100000"),
            ("gid", "100000"),
            ("mtime", "1700000000.25"),
        ],
    );
    entry(&mut owned, "home/user/notes", T::Regular, "", b"notes\n");
    owned.extend_from_slice(&[0; 1024]);
    let mut out = Vec::new();
    let mut s = Seed::default();
    s.u8(0).u8(0).raw(&owned);
    out.push(("pax".into(), s.take()));
    s.u8(0).u8(1).bytes(&base).raw(&upper);
    out.push(("layers".into(), s.take()));
    s.u8(0).u8(0).raw(&escapes);
    out.push(("escapes".into(), s.take()));
    for (name, flavour, how) in [("oci", 0u8, 1u8), ("docker", 3, 0), ("oci-zstd", 0, 2)] {
        s.u8(2).u8(flavour).u8(1);
        s.u8(how).bytes(&base).u8(0).bytes(&upper);
        out.push((name.into(), s.take()));
    }
    let mut files = Vec::new();
    entry(
        &mut files,
        "manifest.json",
        T::Regular,
        "",
        b"[{\"Config\":\"c.json\",\"Layers\":[\"l.tar\"]}]",
    );
    entry(&mut files, "c.json", T::Regular, "", br#"{"rootfs":{"type":"layers","diff_ids":["sha256:0000000000000000000000000000000000000000000000000000000000000000"]}}"#);
    entry(&mut files, "l.tar", T::Regular, "", &escapes);
    files.extend_from_slice(&[0; 1024]);
    s.u8(1).raw(&files);
    out.push(("docker-archive-raw".into(), s.take()));
    out
}
