//! The host side of a config: reading the config file itself (bounded, a
//! regular file, a JSON object), and checking the files it names (kind,
//! access, drive locks, a file attached read-write twice).

use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde_json::Value;

use super::{BlockDeviceConfig, Error};
use crate::hostfile::{self, Kind};

/// The largest config file kiln reads: far above any real config, far
/// below what a mistaken `/dev/zero` or log file would cost.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Top-level sections that are lists of objects.
const LIST_SECTIONS: &[&str] = &["drives", "network-interfaces", "pmem", "fs"];
/// Top-level sections that are one object (or `null`). `cpu-config` is
/// kept as raw JSON and refused as unsupported whatever it holds; unknown
/// names are serde's to refuse.
const OBJECT_SECTIONS: &[&str] = &[
    "boot-source",
    "machine-config",
    "vsock",
    "entropy",
    "balloon",
    "logger",
    "metrics",
    "mmds-config",
    "memory-hotplug",
];

/// The text of the config file at `path`: a regular file of at most
/// [`MAX_CONFIG_BYTES`], opened without blocking.
pub(super) fn read_config(path: &Path) -> Result<String, Error> {
    let read_err = |source| Error::ReadFile {
        path: path.to_path_buf(),
        source,
    };
    let file = hostfile::open_read(path, Kind::Regular).map_err(read_err)?;
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| read_err(e.into()))?;
    if u64::try_from(bytes.len()).map_or(true, |n| n > MAX_CONFIG_BYTES) {
        return Err(Error::ConfigTooLarge {
            path: path.to_path_buf(),
        });
    }
    String::from_utf8(bytes).map_err(|e| {
        read_err(std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error()).into())
    })
}

/// What a JSON value is, for messages.
fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Checks the shape serde's derived structs do not: the top level and each
/// section is a JSON object (serde would also read a struct from an array,
/// by position), and each entry of a list section is one. `origin` names
/// the config in the error (`config file "vm.json"`).
pub(super) fn check_shape(text: &str, origin: impl Fn() -> String) -> Result<(), Error> {
    // Syntax errors are left to the typed parse, which says where.
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        return Ok(());
    };
    let not_an_object = |what: String, found: &Value| Error::NotAnObject {
        origin: origin(),
        what,
        found: json_kind(found),
    };
    let Value::Object(sections) = &value else {
        return Err(not_an_object("the top level".into(), &value));
    };
    for (name, section) in sections {
        match section {
            Value::Null | Value::Object(_) => {}
            Value::Array(entries) if LIST_SECTIONS.contains(&name.as_str()) => {
                if let Some((i, entry)) = entries.iter().enumerate().find(|(_, e)| !e.is_object()) {
                    return Err(not_an_object(format!("{name}[{i}]"), entry));
                }
            }
            other if OBJECT_SECTIONS.contains(&name.as_str()) => {
                return Err(not_an_object(format!("section {name:?}"), other));
            }
            // Anything else is serde's to refuse, with its position.
            _ => {}
        }
    }
    Ok(())
}

/// Checks that `path` opens for reading (and writing if `write`) without
/// blocking and is a kind `kind` accepts; returns the open file, closed by
/// the caller when it is done.
pub(super) fn check_file(
    field: impl Fn() -> String,
    path: &Path,
    write: bool,
    kind: Kind,
) -> Result<std::fs::File, Error> {
    hostfile::open(path, OpenOptions::new().read(true).write(write), kind)
        .map_err(|source| file_error(field(), path, write, source))
}

fn file_error(field: String, path: &Path, write: bool, source: hostfile::Error) -> Error {
    Error::File {
        field,
        path: path.to_path_buf(),
        access: if write {
            "reading and writing"
        } else {
            "reading"
        },
        source,
    }
}

fn drive_field(index: usize, drive: &BlockDeviceConfig) -> String {
    format!(
        "drives[{index}].path_on_host (drive_id {:?})",
        drive.drive_id
    )
}

/// Checks every drive's file: it opens as the drive will (a regular file or
/// a block device), no other VM holds a conflicting lock on it, and no file
/// is two drives of this config when either is read-write. Each file is
/// closed again (and its lock dropped) before this returns; the block device
/// takes its own lock for the VM's life.
pub(super) fn check_drives(drives: &[BlockDeviceConfig]) -> Result<(), Error> {
    // (st_dev, st_ino), or (0, st_rdev) for a block device, whichever node names it.
    let mut seen: Vec<((u64, u64), usize)> = Vec::with_capacity(drives.len());
    for (index, drive) in drives.iter().enumerate() {
        if drive.path_on_host.as_os_str().is_empty() {
            return Err(Error::MissingDrivePath {
                index,
                drive_id: drive.drive_id.clone(),
            });
        }
        let field = || drive_field(index, drive);
        let write = !drive.is_read_only;
        let file = check_file(field, &drive.path_on_host, write, Kind::RegularOrBlock)?;
        let fail = |source| file_error(field(), &drive.path_on_host, write, source);
        let meta = file.metadata().map_err(|e| fail(e.into()))?;
        let key = if meta.file_type().is_file() {
            (meta.dev(), meta.ino())
        } else {
            (0, meta.rdev())
        };
        if let Some(&(_, first)) = seen
            .iter()
            .find(|(k, i)| *k == key && (write || !drives[*i].is_read_only))
        {
            return Err(Error::SameDriveFile {
                first,
                first_id: drives[first].drive_id.clone(),
                second: index,
                second_id: drive.drive_id.clone(),
            });
        }
        seen.push((key, index));
        hostfile::lock(&file, write).map_err(fail)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::ffi::CString;
    use std::os::fd::AsRawFd;
    use std::path::PathBuf;

    use serde_json::json;

    use super::super::tests::{err_of, from_value, set, Files, TempFile};
    use super::super::VmConfig;
    use super::*;

    /// A named pipe nothing writes to or reads from (a blocking open would
    /// wait forever), removed on drop.
    struct Fifo(PathBuf);

    impl Fifo {
        fn new(name: &str) -> Fifo {
            let path = std::env::temp_dir()
                .join(format!("kiln-config-fifo-{}-{name}", std::process::id()));
            let _ = std::fs::remove_file(&path);
            let c = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: a NUL-terminated path that outlives the call.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
            Fifo(path)
        }
    }

    impl Drop for Fifo {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// Takes an OFD lock on `path` the way another VM would, held until the
    /// returned file is dropped.
    fn hold_lock(path: &Path, lock_type: libc::c_int) -> std::fs::File {
        let file = OpenOptions::new()
            .read(true)
            .write(lock_type == libc::F_WRLCK)
            .open(path)
            .unwrap();
        // SAFETY: flock is plain data; zero is valid (l_pid must be 0).
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = i16::try_from(lock_type).unwrap();
        fl.l_whence = i16::try_from(libc::SEEK_SET).unwrap();
        // SAFETY: F_OFD_SETLK reads `fl`, which outlives the call.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        file
    }

    #[test]
    fn a_fifo_config_kernel_initrd_or_drive_is_refused_at_once() {
        let files = Files::new();
        let fifo = Fifo::new("inputs");
        let err = VmConfig::from_file(&fifo.0).unwrap_err();
        assert_eq!(
            crate::error_chain(&err),
            format!(
                "cannot read config file {:?}: it is a named pipe, not a regular file",
                fifo.0
            )
        );
        let cases = [
            (
                "kernel_image_path",
                "boot-source.kernel_image_path",
                "a regular file",
            ),
            ("initrd_path", "boot-source.initrd_path", "a regular file"),
        ];
        for (field, name, wanted) in cases {
            let value = set(files.minimal(), "boot-source", field, json!(fifo.0));
            assert_eq!(
                err_of(&value),
                format!(
                    "{name}: cannot open {:?} for reading: it is a named pipe, not {wanted}",
                    fifo.0
                )
            );
        }
        for read_only in [true, false] {
            let mut value = files.supported();
            value["drives"][0]["path_on_host"] = json!(fifo.0);
            value["drives"][0]["is_read_only"] = json!(read_only);
            let msg = err_of(&value);
            assert!(
                msg.starts_with("drives[0].path_on_host (drive_id \"rootfs\"): cannot open")
                    && msg.ends_with("it is a named pipe, not a regular file or a block device"),
                "{msg}"
            );
        }
        // A character device is no drive either.
        let mut value = files.supported();
        value["drives"][0]["path_on_host"] = json!("/dev/zero");
        value["drives"][0]["is_read_only"] = json!(true);
        assert!(err_of(&value)
            .ends_with("it is a character device, not a regular file or a block device"));
    }

    #[test]
    fn a_config_over_1_mib_is_refused_after_reading_1_mib() {
        let files = Files::new();
        let text = files.minimal().to_string();
        let limit = usize::try_from(MAX_CONFIG_BYTES).unwrap();
        // Exactly 1 MiB, padded with spaces, still loads.
        let fits = TempFile::new(&format!("{text}{}", " ".repeat(limit - text.len())));
        VmConfig::from_file(fits.path()).unwrap();
        let big = TempFile::new(&format!("{text}{}", " ".repeat(limit + 1 - text.len())));
        let err = VmConfig::from_file(big.path()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("config file {:?} is larger than 1 MiB", big.path())
        );
        // /dev/zero never ends: refused as a device before any read.
        let err = VmConfig::from_file(Path::new("/dev/zero")).unwrap_err();
        assert!(
            crate::error_chain(&err).ends_with("it is a character device, not a regular file"),
            "{err}"
        );
    }

    #[test]
    fn the_top_level_and_each_section_must_be_objects() {
        let files = Files::new();
        let array = TempFile::new(r#"[{"kernel_image_path": "/k"}, {}]"#);
        let err = VmConfig::from_file(array.path()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "config file {:?}: the top level must be a JSON object, not an array",
                array.path()
            )
        );
        let kernel = files.kernel.path();
        let cases = [
            (
                set(files.minimal(), "boot-source", "", json!([kernel])),
                "config: section \"boot-source\" must be a JSON object, not an array",
            ),
            (
                set(files.minimal(), "entropy", "", json!([])),
                "config: section \"entropy\" must be a JSON object, not an array",
            ),
            (
                set(files.minimal(), "logger", "", json!("x")),
                "config: section \"logger\" must be a JSON object, not a string",
            ),
            (
                set(files.minimal(), "drives", "", json!([["d", "/x"]])),
                "config: drives[0] must be a JSON object, not an array",
            ),
        ];
        for (value, want) in cases {
            assert_eq!(err_of(&value), want);
        }
        assert_eq!(
            crate::error_chain(&VmConfig::from_json("42").unwrap_err()),
            "config: the top level must be a JSON object, not a number"
        );
        // null and [] still mean absent.
        from_value(&set(files.minimal(), "entropy", "", json!(null))).unwrap();
        from_value(&set(files.minimal(), "drives", "", json!([]))).unwrap();
    }

    #[test]
    fn a_drive_locked_elsewhere_is_refused_naming_file_and_drive() {
        let files = Files::new();
        let rootfs = files.rootfs.path();
        let value = files.supported(); // rootfs read-write
        let mut read_only = files.supported();
        read_only["drives"][0]["is_read_only"] = json!(true);

        let shared = hold_lock(rootfs, libc::F_RDLCK);
        assert_eq!(
            err_of(&value),
            format!(
                "drives[0].path_on_host (drive_id \"rootfs\"): cannot open {rootfs:?} \
                 for reading and writing: in use by another VM (locked)"
            )
        );
        // Readers share.
        from_value(&read_only).unwrap();
        drop(shared);

        let exclusive = hold_lock(rootfs, libc::F_WRLCK);
        assert!(err_of(&read_only).ends_with("in use by another VM (locked)"));
        drop(exclusive);
        // Validation leaves no lock behind.
        from_value(&value).unwrap();
        from_value(&value).unwrap();
    }

    #[test]
    fn one_file_as_two_drives_is_refused_when_either_writes() {
        let files = Files::new();
        let link = std::env::temp_dir().join(format!("kiln-config-link-{}", std::process::id()));
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(files.rootfs.path(), &link).unwrap();
        let with_second = |first_ro: bool, second_ro: bool| {
            let mut value = files.supported();
            value["drives"][0]["is_read_only"] = json!(first_ro);
            let second = json!({
                "drive_id": "again", "path_on_host": link,
                "is_root_device": false, "is_read_only": second_ro
            });
            value["drives"].as_array_mut().unwrap().push(second);
            value
        };
        let want = "drives[1] (drive_id \"again\") is the same file as drives[0] \
                    (drive_id \"rootfs\"): a file can be a drive only once when it is read-write";
        assert_eq!(err_of(&with_second(false, false)), want);
        assert_eq!(err_of(&with_second(true, false)), want);
        assert_eq!(err_of(&with_second(false, true)), want);
        from_value(&with_second(true, true)).unwrap();
        std::fs::remove_file(link).unwrap();
    }
}
