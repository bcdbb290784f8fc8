//! `fs`: host folders shared with the guest over virtio-fs. A kiln
//! extension of Firecracker's schema (Firecracker has no file sharing).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Error;

/// virtio 1.2 §5.11.4: the tag is at most 36 bytes.
pub const MAX_FS_TAG: usize = 36;

/// One entry of `fs`: a host folder the guest mounts with
/// `mount -t virtiofs <tag> <dir>`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// What the guest mounts: unique, 1 to 36 bytes.
    pub tag: String,
    /// The host folder; it must exist and be a directory.
    pub path_on_host: PathBuf,
    /// Refuse every change to the folder (enforced by kiln, not only by
    /// the guest's mount options).
    #[serde(default)]
    pub read_only: bool,
}

/// Checks tags (non-empty, at most 36 bytes, unique) and folders (exist,
/// are directories).
pub fn check(shares: &[FsConfig]) -> Result<(), Error> {
    for (index, share) in shares.iter().enumerate() {
        if share.tag.is_empty() || share.tag.len() > MAX_FS_TAG {
            return Err(Error::FsTag {
                index,
                tag: share.tag.clone(),
            });
        }
        if let Some(first) = shares[..index].iter().position(|s| s.tag == share.tag) {
            return Err(Error::DuplicateFsTag {
                tag: share.tag.clone(),
                first,
                second: index,
            });
        }
        let field = format!("fs[{index}].path_on_host (tag {:?})", share.tag);
        let path = share.path_on_host.clone();
        match std::fs::metadata(&share.path_on_host) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(Error::FsNotADirectory { field, path }),
            Err(source) => {
                return Err(Error::FsPath {
                    field,
                    path,
                    source,
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::tests::{err_of, from_value, set, Files};

    fn with_fs(files: &Files, fs: serde_json::Value) -> serde_json::Value {
        set(files.minimal(), "fs", "", fs)
    }

    #[test]
    fn shares_load_and_are_checked() {
        let files = Files::new();
        let dir = std::env::temp_dir();
        let dir = dir.to_str().unwrap();
        let ok = with_fs(
            &files,
            json!([
                { "tag": "work", "path_on_host": dir },
                { "tag": "x".repeat(36), "path_on_host": dir, "read_only": true }
            ]),
        );
        let config = from_value(&ok).unwrap();
        assert_eq!(config.fs.len(), 2);
        assert!(!config.fs[0].read_only && config.fs[1].read_only);
        // null and [] mean no shares.
        for empty in [json!(null), json!([])] {
            assert!(from_value(&with_fs(&files, empty)).unwrap().fs.is_empty());
        }

        let cases = [
            (
                json!([{ "tag": "", "path_on_host": dir }]),
                "fs[0].tag \"\" must be 1 to 36 bytes".to_string(),
            ),
            (
                json!([{ "tag": "y".repeat(37), "path_on_host": dir }]),
                format!("fs[0].tag {:?} must be 1 to 36 bytes", "y".repeat(37)),
            ),
            (
                json!([{ "tag": "a", "path_on_host": dir }, { "tag": "a", "path_on_host": dir }]),
                "fs[1].tag \"a\" is already used by fs[0]".to_string(),
            ),
            (
                json!([{ "tag": "a", "path_on_host": "/nonexistent/kiln" }]),
                "fs[0].path_on_host (tag \"a\"): cannot use \"/nonexistent/kiln\": \
                 No such file or directory (os error 2)"
                    .to_string(),
            ),
            (
                json!([{ "tag": "a", "path_on_host": files.kernel.path() }]),
                format!(
                    "fs[0].path_on_host (tag \"a\"): {:?} is not a directory",
                    files.kernel.path()
                ),
            ),
        ];
        for (fs, want) in cases {
            assert_eq!(err_of(&with_fs(&files, fs)), want);
        }
        let typo = with_fs(&files, json!([{ "tag": "a", "path": dir }]));
        assert!(
            err_of(&typo).contains("unknown field `path`"),
            "{}",
            err_of(&typo)
        );
    }
}
