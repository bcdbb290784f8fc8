//! Images built here with the `tar` crate, prepared, and the resulting
//! ext4 files read back with debugfs.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use serde_json::json;
use sha2::{Digest as _, Sha256};
use tar::{EntryType, Header};

use super::*;

fn sha(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One entry of a test layer.
struct Ent {
    path: &'static str,
    kind: EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    data: &'static [u8],
    link: &'static str,
}

fn dir(path: &'static str, mode: u32, uid: u64) -> Ent {
    Ent {
        path,
        kind: EntryType::Directory,
        mode,
        uid,
        gid: uid,
        data: b"",
        link: "",
    }
}

fn file(path: &'static str, mode: u32, uid: u64, data: &'static [u8]) -> Ent {
    Ent {
        path,
        kind: EntryType::Regular,
        mode,
        uid,
        gid: uid,
        data,
        link: "",
    }
}

fn link(path: &'static str, kind: EntryType, target: &'static str) -> Ent {
    Ent {
        path,
        kind,
        mode: 0o777,
        uid: 0,
        gid: 0,
        data: b"",
        link: target,
    }
}

/// A tar stream of `ents`, names written raw (the tar crate's setters
/// refuse `..` and absolute paths, which these tests need).
fn layer(ents: &[Ent]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in ents {
        let mut h = Header::new_ustar();
        {
            let old = h.as_old_mut();
            old.name[..e.path.len()].copy_from_slice(e.path.as_bytes());
            old.linkname[..e.link.len()].copy_from_slice(e.link.as_bytes());
        }
        h.set_entry_type(e.kind);
        h.set_mode(e.mode);
        h.set_uid(e.uid);
        h.set_gid(e.gid);
        h.set_mtime(1_700_000_000);
        h.set_size(e.data.len() as u64);
        if e.kind == EntryType::Char {
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
        }
        h.set_cksum();
        b.append(&h, e.data).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn config_json(diff_ids: &[String]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/bin:/bin", "A=1"],
            "WorkingDir": "/work",
            "User": "1000:1000",
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo hi"],
            "ExposedPorts": {"80/tcp": {}}
        },
        "rootfs": {
            "type": "layers",
            "diff_ids": diff_ids.iter().map(|d| format!("sha256:{d}")).collect::<Vec<_>>()
        }
    }))
    .unwrap()
}

fn expected_config() -> ImageConfig {
    ImageConfig {
        env: vec!["PATH=/usr/bin:/bin".into(), "A=1".into()],
        working_dir: Some("/work".into()),
        user: Some("1000:1000".into()),
        entrypoint: vec!["/bin/sh".into(), "-c".into()],
        cmd: vec!["echo hi".into()],
    }
}

/// The files of an OCI image layout: `(path, content)`. `layers` are
/// `(blob, media type, uncompressed tar)`. Returns them and the manifest's
/// digest.
fn oci_files(layers: &[(Vec<u8>, &str, Vec<u8>)]) -> (Vec<(String, Vec<u8>)>, String) {
    let mut files = Vec::new();
    let diff_ids: Vec<String> = layers.iter().map(|(_, _, tar)| sha(tar)).collect();
    let config = config_json(&diff_ids);
    let config_hex = sha(&config);
    let mut descs = Vec::new();
    for (blob, media, _) in layers {
        let hex = sha(blob);
        descs.push(
            json!({"mediaType": media, "digest": format!("sha256:{hex}"), "size": blob.len()}),
        );
        files.push((format!("blobs/sha256/{hex}"), blob.clone()));
    }
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{config_hex}"),
            "size": config.len()
        },
        "layers": descs
    }))
    .unwrap();
    let manifest_hex = sha(&manifest);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": format!("sha256:{}", "0".repeat(64)),
                "size": 10,
                "platform": {"architecture": "arm64", "os": "linux"}
            },
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": format!("sha256:{manifest_hex}"),
                "size": manifest.len(),
                "platform": {"architecture": "amd64", "os": "linux"}
            }
        ]
    }))
    .unwrap();
    files.push((format!("blobs/sha256/{config_hex}"), config));
    files.push((format!("blobs/sha256/{manifest_hex}"), manifest));
    files.push(("index.json".into(), index));
    files.push((
        "oci-layout".into(),
        br#"{"imageLayoutVersion": "1.0.0"}"#.to_vec(),
    ));
    (files, manifest_hex)
}

/// A tar archive of `files` (with directory entries, as podman writes).
fn archive(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dirs = std::collections::BTreeSet::new();
    for (name, _) in files {
        let mut p = Path::new(name);
        while let Some(parent) = p.parent().filter(|p| !p.as_os_str().is_empty()) {
            dirs.insert(parent.to_path_buf());
            p = parent;
        }
    }
    for d in dirs {
        let mut h = Header::new_ustar();
        h.set_entry_type(EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, d, &b""[..]).unwrap();
    }
    for (name, data) in files {
        let mut h = Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

/// A test's directories: the image file(s), the cache, the scratch.
struct Env {
    tmp: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            tmp: tempfile::tempdir().unwrap(),
        }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }
    fn cache(&self) -> PathBuf {
        self.path("cache")
    }
    fn write(&self, name: &str, data: &[u8]) -> PathBuf {
        let p = self.path(name);
        fs::write(&p, data).unwrap();
        p
    }
    fn prepare(&self, spec: &Path) -> (Result<Prepared, Error>, Vec<String>) {
        let mut msgs = Vec::new();
        let r = prepare(spec, &self.cache(), &self.path("scratch"), &mut |m| {
            msgs.push(m.to_string())
        });
        (r, msgs)
    }
    /// Asserts the cache holds no `tmp-*` directory.
    fn assert_clean(&self) {
        let images = self.cache().join("images");
        if let Ok(dir) = fs::read_dir(&images) {
            for e in dir {
                let name = e.unwrap().file_name();
                assert!(
                    !name.to_string_lossy().starts_with("tmp-"),
                    "left behind: {name:?}"
                );
            }
        }
    }
}

fn debugfs(img: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(img)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// `(type, permission bits, uid, gid)` of `path` in `img`, None if absent.
fn stat(img: &Path, path: &str) -> Option<(String, u32, u32, u32)> {
    let out = debugfs(img, &format!("stat \"{path}\""));
    let word_after = |key: &str| -> Option<String> {
        let i = out.find(key)? + key.len();
        out[i..].split_whitespace().next().map(str::to_string)
    };
    let kind = word_after("Type:")?;
    let mode = u32::from_str_radix(&word_after("Mode:")?, 8).ok()?;
    let uid = word_after("User:")?.parse().ok()?;
    let gid = word_after("Group:")?.parse().ok()?;
    Some((kind, mode, uid, gid))
}

fn cat(img: &Path, path: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat \"{path}\""))
        .arg(img)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn two_layers() -> (Vec<u8>, Vec<u8>) {
    let l1 = layer(&[
        dir("./", 0o755, 0),
        dir("./etc/", 0o755, 0),
        file("./etc/gone", 0o644, 0, b"old"),
        file("./etc/keep", 0o644, 0, b"v1"),
        link("./etc/keep2", EntryType::Link, "./etc/keep"),
        dir("./opq/", 0o755, 0),
        file("./opq/old", 0o644, 0, b"old"),
        dir("./opq/sub/", 0o755, 0),
        file("./opq/sub/old", 0o644, 0, b"old"),
        dir("./bin/", 0o755, 0),
        file("./bin/su", 0o4755, 0, b"#!su"),
        dir("./home/user/", 0o700, 1000),
        file("./home/user/f", 0o640, 1000, b"mine"),
        dir("./secret/", 0o000, 0),
        link("./lnk", EntryType::Symlink, "/etc/keep"),
        file("/abs", 0o644, 0, b"abs"),
        file("name with \"quote\" and space", 0o600, 5, b"q"),
    ]);
    let l2 = layer(&[
        file("etc/.wh.gone", 0o644, 0, b""),
        file("opq/.wh..wh..opq", 0o644, 0, b""),
        file("opq/new", 0o644, 0, b"new"),
        file("etc/keep", 0o644, 0, b"v2"),
    ]);
    (l1, l2)
}

#[test]
fn oci_archive_with_two_layers_and_whiteouts() {
    let env = Env::new();
    let (l1, l2) = two_layers();
    let (files, manifest_hex) = oci_files(&[
        (l1.clone(), "application/vnd.oci.image.layer.v1.tar", l1),
        (gzip(&l2), "application/vnd.oci.image.layer.v1.tar+gzip", l2),
    ]);
    let spec = env.write("img.tar", &archive(&files));
    let (r, msgs) = env.prepare(&spec);
    let p = r.unwrap();
    assert_eq!(p.id.as_deref(), Some(&*format!("sha256:{manifest_hex}")));
    assert_eq!(p.config, expected_config());
    assert_eq!(
        p.ext4,
        env.cache().join(format!("images/{manifest_hex}.ext4"))
    );
    assert!(msgs.iter().any(|m| m.starts_with("unpacking layer 2/2")));
    let img = &p.ext4;
    assert_eq!(stat(img, "/etc/gone"), None);
    assert_eq!(stat(img, "/opq/old"), None);
    assert_eq!(stat(img, "/opq/sub"), None);
    assert_eq!(cat(img, "/opq/new"), "new");
    assert_eq!(cat(img, "/etc/keep"), "v2");
    assert_eq!(cat(img, "/etc/keep2"), "v1");
    assert_eq!(cat(img, "/abs"), "abs");
    assert_eq!(stat(img, "/"), Some(("directory".into(), 0o755, 0, 0)));
    assert_eq!(stat(img, "/bin/su"), Some(("regular".into(), 0o4755, 0, 0)));
    assert_eq!(
        stat(img, "/home/user"),
        Some(("directory".into(), 0o700, 1000, 1000))
    );
    assert_eq!(
        stat(img, "/home/user/f"),
        Some(("regular".into(), 0o640, 1000, 1000))
    );
    assert_eq!(stat(img, "/secret"), Some(("directory".into(), 0, 0, 0)));
    assert_eq!(stat(img, "/lnk").map(|s| s.0), Some("symlink".into()));
    assert_eq!(
        stat(img, "/name with \"\"quote\"\" and space"),
        Some(("regular".into(), 0o600, 5, 5))
    );
    assert!(
        debugfs(img, "stat /etc/keep").contains("2023"),
        "mtime kept"
    );
    env.assert_clean();

    // A second run finds it in the cache.
    let mtime = fs::metadata(img).unwrap().modified().unwrap();
    let (r, msgs) = env.prepare(&spec);
    let q = r.unwrap();
    assert_eq!(q.ext4, p.ext4);
    assert_eq!(q.config, p.config);
    assert!(msgs.is_empty(), "{msgs:?}");
    assert_eq!(fs::metadata(img).unwrap().modified().unwrap(), mtime);
}

#[test]
fn oci_layout_dir_with_zstd_layer() {
    let env = Env::new();
    let l1 = layer(&[dir("usr/", 0o755, 0), file("usr/hello", 0o755, 0, b"hello")]);
    let blob = zstd::encode_all(&l1[..], 3).unwrap();
    let (mut files, manifest_hex) =
        oci_files(&[(blob, "application/vnd.oci.image.layer.v1.tar+zstd", l1)]);
    // index.json → a nested index → the manifests.
    let i = files.iter().position(|(n, _)| n == "index.json").unwrap();
    let inner = files[i].1.clone();
    let inner_hex = sha(&inner);
    files[i].1 = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": format!("sha256:{inner_hex}"),
            "size": inner.len()
        }]
    }))
    .unwrap();
    files.push((format!("blobs/sha256/{inner_hex}"), inner));
    let dir = env.path("layout");
    for (name, data) in &files {
        let p = dir.join(name);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, data).unwrap();
    }
    let p = env.prepare(&dir).0.unwrap();
    assert_eq!(p.id, Some(format!("sha256:{manifest_hex}")));
    assert_eq!(cat(&p.ext4, "/usr/hello"), "hello");
    assert_eq!(p.config, expected_config());
}

/// `docker save`'s layout: manifest.json, `<config hex>.json`, `<id>/layer.tar`.
fn docker_archive(layers: &[Vec<u8>]) -> (Vec<u8>, String) {
    let diff_ids: Vec<String> = layers.iter().map(|l| sha(l)).collect();
    let config = config_json(&diff_ids);
    let config_hex = sha(&config);
    let mut files = vec![(format!("{config_hex}.json"), config)];
    let mut names = Vec::new();
    for (l, id) in layers.iter().zip(&diff_ids) {
        names.push(format!("{id}/layer.tar"));
        files.push((format!("{id}/layer.tar"), l.clone()));
    }
    let manifest = json!([{
        "Config": format!("{config_hex}.json"),
        "RepoTags": ["test:latest"],
        "Layers": names
    }]);
    files.push((
        "manifest.json".into(),
        serde_json::to_vec(&manifest).unwrap(),
    ));
    (archive(&files), config_hex)
}

#[test]
fn docker_archive_is_unpacked() {
    let env = Env::new();
    let l1 = layer(&[dir("etc/", 0o755, 0), file("etc/a", 0o644, 0, b"a1")]);
    let mut pax = file("PaxHeaders/etc/big", 0o644, 0, b"15 uid=3000000\n");
    pax.kind = EntryType::XHeader;
    let l2 = layer(&[
        file("etc/b", 0o600, 33, b"b2"),
        pax,
        file("etc/big", 0o644, 7, b"big"),
    ]);
    let (tar, config_hex) = docker_archive(&[l1, l2]);
    let spec = env.write("docker.tar", &tar);
    let p = env.prepare(&spec).0.unwrap();
    assert_eq!(p.id, Some(format!("sha256:{config_hex}")));
    assert_eq!(p.config, expected_config());
    assert_eq!(cat(&p.ext4, "/etc/a"), "a1");
    assert_eq!(
        stat(&p.ext4, "/etc/b"),
        Some(("regular".into(), 0o600, 33, 33))
    );
    // A PAX header's uid wins over the ustar field.
    assert_eq!(
        stat(&p.ext4, "/etc/big"),
        Some(("regular".into(), 0o644, 3_000_000, 7))
    );
    env.assert_clean();
}

#[test]
fn concurrent_prepares_build_once() {
    let env = Arc::new(Env::new());
    let l1 = layer(&[file("f", 0o644, 0, b"x")]);
    let (tar, _) = docker_archive(&[l1]);
    let spec = env.write("docker.tar", &tar);
    let msgs = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..3)
        .map(|_| {
            let (env, spec, msgs) = (env.clone(), spec.clone(), msgs.clone());
            std::thread::spawn(move || {
                let (r, m) = env.prepare(&spec);
                msgs.lock().unwrap().extend(m);
                r.unwrap().ext4
            })
        })
        .collect();
    let paths: Vec<PathBuf> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(paths.iter().all(|p| *p == paths[0]));
    let msgs = msgs.lock().unwrap();
    let builds = msgs
        .iter()
        .filter(|m| m.starts_with("making the ext4"))
        .count();
    assert_eq!(builds, 1, "{msgs:?}");
    env.assert_clean();
}

/// Prepares an OCI archive of `layers` (plain tar) and returns the result.
fn prepare_layers(env: &Env, layers: Vec<Vec<u8>>) -> Result<Prepared, Error> {
    let layers: Vec<_> = layers
        .into_iter()
        .map(|l| (l.clone(), "application/vnd.oci.image.layer.v1.tar", l))
        .collect();
    let (files, _) = oci_files(&layers);
    let spec = env.write("img.tar", &archive(&files));
    let r = env.prepare(&spec).0;
    env.assert_clean();
    r
}

#[test]
fn dotdot_entry_is_refused() {
    let env = Env::new();
    let l = layer(&[file("a/../../escape", 0o644, 0, b"x")]);
    let e = prepare_layers(&env, vec![l]).unwrap_err();
    assert!(matches!(e, Error::Layer { index: 1, .. }), "{e:?}");
    let msg = crate::error_chain(&e);
    assert!(
        msg.contains("img.tar") && msg.contains("a/../../escape"),
        "{msg}"
    );
    assert!(!env.cache().join("escape").exists());
    assert!(!env.path("escape").exists());
}

/// A layer declaring a file larger than the disk (a "bomb": a few bytes
/// that claim terabytes) is refused before anything is written.
#[test]
fn a_layer_larger_than_the_disk_is_refused() {
    let env = Env::new();
    let mut h = Header::new_ustar();
    h.set_path("bomb").unwrap();
    h.set_entry_type(EntryType::Regular);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_size(1 << 40);
    h.set_cksum();
    // The header alone: the archive ends where the terabyte would start.
    let l = h.as_bytes().to_vec();
    let e = prepare_layers(&env, vec![l]).unwrap_err();
    let msg = crate::error_chain(&e);
    assert!(
        msg.contains("bomb") && msg.contains("unpacks to more than"),
        "{msg}"
    );
}

/// Names from an image reach messages escaped: a hostile entry name cannot
/// write escape sequences to the user's terminal.
#[test]
fn entry_names_in_messages_are_escaped() {
    let env = Env::new();
    let l = layer(&[file("a/../\u{1b}]0;owned\u{7}", 0o644, 0, b"x")]);
    let msg = crate::error_chain(&prepare_layers(&env, vec![l]).unwrap_err());
    assert!(!msg.contains('\u{1b}') && !msg.contains('\u{7}'), "{msg:?}");
    assert!(msg.contains("\\u{1b}]0;owned\\u{7}"), "{msg}");
}

#[test]
fn hard_link_outside_is_refused() {
    let env = Env::new();
    let l = layer(&[link("passwd", EntryType::Link, "../../etc/passwd")]);
    let e = prepare_layers(&env, vec![l]).unwrap_err();
    assert!(matches!(e, Error::Layer { .. }), "{e:?}");
    assert!(crate::error_chain(&e).contains("../../etc/passwd"));
}

#[test]
fn nothing_is_written_through_a_symlink() {
    let env = Env::new();
    let outside = env.path("outside");
    fs::create_dir(&outside).unwrap();
    let target: &'static str = Box::leak(outside.to_str().unwrap().to_string().into_boxed_str());
    let l1 = layer(&[
        link("a", EntryType::Symlink, target),
        file("a/x", 0o644, 0, b"x"),
    ]);
    let l2 = layer(&[file("a/y", 0o644, 0, b"y"), file("a/.wh.z", 0o644, 0, b"")]);
    fs::write(outside.join("z"), "keep").unwrap();
    let p = prepare_layers(&env, vec![l1, l2]).unwrap();
    assert!(!outside.join("x").exists());
    assert!(!outside.join("y").exists());
    assert!(outside.join("z").exists());
    assert_eq!(stat(&p.ext4, "/a").map(|s| s.0), Some("symlink".into()));
}

#[test]
fn device_nodes_are_skipped() {
    let env = Env::new();
    let mut null = file("dev/null", 0o666, 0, b"");
    null.kind = EntryType::Char;
    let mut fifo = file("dev/fifo", 0o666, 0, b"");
    fifo.kind = EntryType::Fifo;
    let l = layer(&[
        dir("dev/", 0o755, 0),
        null,
        fifo,
        file("ok", 0o644, 0, b"ok"),
    ]);
    let p = prepare_layers(&env, vec![l]).unwrap();
    assert_eq!(stat(&p.ext4, "/dev/null"), None);
    assert_eq!(stat(&p.ext4, "/dev/fifo"), None);
    assert_eq!(cat(&p.ext4, "/ok"), "ok");
}

#[test]
fn digest_mismatch_is_an_error() {
    let env = Env::new();
    let l = layer(&[file("f", 0o644, 0, b"good")]);
    let (mut files, _) = oci_files(&[(l.clone(), "application/vnd.oci.image.layer.v1.tar", l)]);
    let (name, blob) = &mut files[0];
    let name = name.clone();
    let pos = blob.windows(4).position(|w| w == b"good").unwrap();
    blob[pos..pos + 4].copy_from_slice(b"evil");
    let spec = env.write("img.tar", &archive(&files));
    let e = env.prepare(&spec).0.unwrap_err();
    let Error::Digest { member, .. } = &e else {
        panic!("{e:?}");
    };
    assert_eq!(*member, name);
    assert!(crate::error_chain(&e).contains("img.tar"));
    env.assert_clean();
    assert!(!env
        .cache()
        .join("images")
        .read_dir()
        .unwrap()
        .any(|e| { e.unwrap().file_name().to_string_lossy().ends_with(".ext4") }));
}

#[test]
fn truncated_archive_is_an_error() {
    let env = Env::new();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let data: &'static [u8] = Box::leak(data.into_boxed_slice());
    let l = layer(&[file("big", 0o644, 0, data)]);
    let (files, _) = oci_files(&[(l.clone(), "application/vnd.oci.image.layer.v1.tar", l)]);
    let full = archive(&files);
    // Cut inside the layer blob (the first file after the directories).
    let spec = env.write("img.tar", &full[..100_000]);
    let e = env.prepare(&spec).0.unwrap_err();
    let msg = crate::error_chain(&e);
    assert!(msg.contains("img.tar"), "{msg}");
    assert!(
        matches!(e, Error::Member { .. } | Error::Missing { .. }),
        "{e:?}"
    );
    env.assert_clean();

    // Cut at a header: the member list cannot be read.
    let spec = env.write("img.tar", &full[..full.len() - 1536 - 200]);
    let e = env.prepare(&spec).0.unwrap_err();
    assert!(
        matches!(
            e,
            Error::List { .. } | Error::Member { .. } | Error::Missing { .. }
        ),
        "{e:?}"
    );
}

#[test]
fn oversized_json_is_refused() {
    let env = Env::new();
    let big = vec![b' '; 5 << 20];
    let spec = env.write("docker.tar", &archive(&[("manifest.json".into(), big)]));
    let e = env.prepare(&spec).0.unwrap_err();
    assert!(
        matches!(&e, Error::TooLarge { member, .. } if member == "manifest.json"),
        "{e:?}"
    );
}

#[test]
fn stale_tmp_dirs_are_removed_unless_locked() {
    let env = Env::new();
    let images = env.cache().join("images");
    let stale = images.join(format!("tmp-{}-1-0", "a".repeat(64)));
    let busy = images.join(format!("tmp-{}-2-0", "b".repeat(64)));
    fs::create_dir_all(stale.join("root/x")).unwrap();
    fs::create_dir_all(&busy).unwrap();
    let lock = fs::File::create(images.join(format!("{}.lock", "b".repeat(64)))).unwrap();
    lock.lock().unwrap();
    let (tar, _) = docker_archive(&[layer(&[file("f", 0o644, 0, b"x")])]);
    let spec = env.write("docker.tar", &tar);
    env.prepare(&spec).0.unwrap();
    assert!(!stale.exists());
    assert!(busy.exists());
    drop(lock);
}

#[test]
fn bad_manifest_json_is_an_error() {
    let env = Env::new();
    let spec = env.write(
        "docker.tar",
        &archive(&[("manifest.json".into(), b"{not json".to_vec())]),
    );
    let e = env.prepare(&spec).0.unwrap_err();
    assert!(
        matches!(&e, Error::Json { member, .. } if member == "manifest.json"),
        "{e:?}"
    );
    let msg = crate::error_chain(&e);
    assert!(
        msg.contains("manifest.json in ") && msg.contains("docker.tar"),
        "{msg}"
    );
}

#[test]
fn missing_blob_is_an_error() {
    let env = Env::new();
    let l = layer(&[file("f", 0o644, 0, b"x")]);
    let (mut files, _) = oci_files(&[(l.clone(), "application/vnd.oci.image.layer.v1.tar", l)]);
    let (name, _) = files.remove(0);
    let spec = env.write("img.tar", &archive(&files));
    let e = env.prepare(&spec).0.unwrap_err();
    assert!(
        matches!(&e, Error::Missing { member, .. } if *member == name),
        "{e:?}"
    );
    env.assert_clean();
}

#[test]
fn ext4_file_is_used_as_is() {
    let env = Env::new();
    let img = env.path("disk.img");
    fs::File::create(&img).unwrap().set_len(8 << 20).unwrap();
    let ok = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4"])
        .arg(&img)
        .status()
        .unwrap();
    assert!(ok.success());
    let p = env.prepare(&img).0.unwrap();
    assert_eq!(p.ext4, img);
    assert_eq!(p.id, None);
    assert_eq!(p.config, ImageConfig::default());
}

#[test]
fn host_directory_becomes_an_ext4_in_scratch() {
    let env = Env::new();
    let dir = env.path("tree");
    fs::create_dir_all(dir.join("sub")).unwrap();
    fs::write(dir.join("sub/file"), "content").unwrap();
    let p = env.prepare(&dir).0.unwrap();
    assert!(p.ext4.starts_with(env.path("scratch")));
    assert_eq!(p.id, None);
    assert_eq!(cat(&p.ext4, "/sub/file"), "content");
}

#[test]
fn other_files_are_refused() {
    let env = Env::new();
    let spec = env.write("notes.txt", &b"hello\n".repeat(200));
    let e = env.prepare(&spec).0.unwrap_err();
    assert!(matches!(e, Error::Unknown { .. }), "{e:?}");
    let msg = crate::error_chain(&e);
    assert!(msg.contains("notes.txt") && msg.contains("OCI"), "{msg}");
    let spec = env.write("other.tar", &archive(&[("x".into(), b"x".to_vec())]));
    assert!(matches!(env.prepare(&spec).0, Err(Error::Unknown { .. })));
}

/// What the debugfs fix-up costs for many files that all need one
/// (`cargo test --lib image::tests::fixup_cost -- --ignored --nocapture`).
#[test]
#[ignore]
fn fixup_cost() {
    let env = Env::new();
    let mut b = tar::Builder::new(Vec::new());
    for d in 0..50 {
        for f in 0..100 {
            let mut h = Header::new_ustar();
            h.set_mode(0o4755);
            h.set_uid(1000);
            h.set_gid(1000);
            h.set_size(3);
            b.append_data(&mut h, format!("d{d}/f{f}"), &b"abc"[..])
                .unwrap();
        }
    }
    let l = b.into_inner().unwrap();
    let (tar, _) = docker_archive(&[l]);
    let spec = env.write("docker.tar", &tar);
    let (r, msgs) = env.prepare(&spec);
    r.unwrap();
    for m in msgs {
        println!("{m}");
    }
}
