//! Opening the host files a config names (kernel, initrd, drives, log,
//! the config itself) without ever blocking, checked on the opened
//! descriptor, and locking drive images.
//!
//! A path is opened once with `O_NONBLOCK` (so a named pipe with no writer
//! or reader cannot hang kiln in `open`), its kind is checked with `fstat`
//! on that descriptor (so a file swapped in after a check by path is still
//! seen), then `O_NONBLOCK` is cleared for the reads and writes that follow.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Why a host file cannot be used. The messages leave out the path: the
/// caller's error names it, with the config field it came from.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `open` or `fstat` failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The path names something other than what is wanted.
    #[error("it is {found}, not {wanted}")]
    Kind {
        /// What the path is: `a named pipe`, `a directory`, ...
        found: &'static str,
        /// What the caller accepts.
        wanted: &'static str,
    },
    /// A named pipe opened for writing that nothing reads from.
    #[error("it is a named pipe that nothing reads from")]
    NoReader,
    /// Another open file (another VM, or the same one) holds a conflicting lock.
    #[error("in use by another VM (locked)")]
    Locked,
    /// The lock could not be taken for another reason.
    #[error("cannot lock it")]
    Lock(#[source] io::Error),
}

/// What a caller accepts at a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file only (kernel, initrd, config).
    Regular,
    /// A regular file or a block device (a drive).
    RegularOrBlock,
    /// A regular file or a named pipe (the log, as Firecracker allows).
    RegularOrFifo,
}

impl Kind {
    fn accepts(self, t: std::fs::FileType) -> bool {
        t.is_file()
            || (self == Kind::RegularOrBlock && t.is_block_device())
            || (self == Kind::RegularOrFifo && t.is_fifo())
    }

    fn wanted(self) -> &'static str {
        match self {
            Kind::Regular => "a regular file",
            Kind::RegularOrBlock => "a regular file or a block device",
            Kind::RegularOrFifo => "a regular file or a named pipe",
        }
    }
}

/// What a file type is, for messages.
fn describe(t: std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a named pipe"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_file() {
        "a regular file"
    } else {
        "not a file"
    }
}

/// Opens `path` with `options` (plus `O_NONBLOCK`; std adds `O_CLOEXEC`),
/// refuses it unless `kind` accepts what it is, and returns it blocking.
///
/// A named pipe opened for writing with no reader fails at once with
/// `ENXIO` instead of waiting for one.
pub fn open(path: &Path, options: &mut OpenOptions, kind: Kind) -> Result<File, Error> {
    let file = match options.custom_flags(libc::O_NONBLOCK).open(path) {
        Ok(file) => file,
        // ENXIO is what a non-blocking open for writing of a pipe without
        // a reader returns; say it in those words. (A stat by path cannot block.)
        Err(e)
            if e.raw_os_error() == Some(libc::ENXIO)
                && std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo()) =>
        {
            return Err(Error::NoReader)
        }
        Err(e) => return Err(e.into()),
    };
    let file_type = file.metadata()?.file_type();
    if !kind.accepts(file_type) {
        return Err(Error::Kind {
            found: describe(file_type),
            wanted: kind.wanted(),
        });
    }
    set_blocking(&file)?;
    Ok(file)
}

/// Opens `path` read-only; see [`open`].
pub fn open_read(path: &Path, kind: Kind) -> Result<File, Error> {
    open(path, OpenOptions::new().read(true), kind)
}

fn set_blocking(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL on a descriptor this function borrows; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL with an int argument on the same descriptor.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Takes an open-file-description lock on the whole of `file`: exclusive
/// (`F_WRLCK`, `file` must be open for writing) or shared (`F_RDLCK`).
///
/// OFD locks (as QEMU takes on its images) belong to the open file, not the
/// process: they conflict with every other open of the same file, in this
/// process too, and go away when `file` is closed. They are advisory: they
/// keep out other VMs (kiln, QEMU), not a plain `dd`.
pub fn lock(file: &File, exclusive: bool) -> Result<(), Error> {
    let lock_type = if exclusive {
        libc::F_WRLCK
    } else {
        libc::F_RDLCK
    };
    // SAFETY: flock is plain data; all zeroes is a valid value (l_pid must
    // be 0 for OFD locks).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    // The constants are small and fit the (short) fields.
    #[allow(clippy::cast_possible_truncation)]
    {
        fl.l_type = lock_type as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
    }
    fl.l_start = 0;
    fl.l_len = 0; // to the end of the file, however it grows
                  // SAFETY: F_OFD_SETLK reads the flock struct, which outlives the call.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EAGAIN | libc::EACCES) => Error::Locked,
            _ => Error::Lock(e),
        });
    }
    Ok(())
}

/// A user-given path as kiln echoes it in messages: quoted, with control
/// characters, escape sequences, CR and bidi controls escaped (Rust's
/// `Debug`), so a file name cannot rewrite the terminal it is printed on.
pub struct Quoted<'a>(pub &'a Path);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-hostfile-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn mkfifo(path: &Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = scratch("fifo");
        let fifo = dir.join("fifo");
        mkfifo(&fifo);
        // No writer: a blocking open would wait forever.
        let err = open_read(&fifo, Kind::Regular).unwrap_err();
        assert_eq!(err.to_string(), "it is a named pipe, not a regular file");
        let err = open_read(&fifo, Kind::RegularOrBlock).unwrap_err();
        assert!(matches!(err, Error::Kind { .. }), "{err}");
        // For writing, with no reader: ENXIO at once, said plainly.
        let err = open(&fifo, OpenOptions::new().append(true), Kind::RegularOrFifo).unwrap_err();
        assert_eq!(
            err.to_string(),
            "it is a named pipe that nothing reads from"
        );
        // With a reader, a pipe is a log.
        let reader = open_read(&fifo, Kind::RegularOrFifo).unwrap();
        open(&fifo, OpenOptions::new().append(true), Kind::RegularOrFifo).unwrap();
        drop(reader);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn devices_and_directories_are_refused_by_kind() {
        let err = open_read(Path::new("/dev/zero"), Kind::Regular).unwrap_err();
        assert_eq!(
            err.to_string(),
            "it is a character device, not a regular file"
        );
        let err = open_read(Path::new("/"), Kind::RegularOrBlock).unwrap_err();
        assert_eq!(
            err.to_string(),
            "it is a directory, not a regular file or a block device"
        );
    }

    #[test]
    fn a_regular_file_opens_blocking() {
        let dir = scratch("regular");
        let path = dir.join("f");
        std::fs::write(&path, b"x").unwrap();
        let file = open_read(&path, Kind::Regular).unwrap();
        // SAFETY: F_GETFL on an open descriptor.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0);
        // SAFETY: F_GETFD on an open descriptor.
        let fd_flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFD) };
        assert_ne!(fd_flags & libc::FD_CLOEXEC, 0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn exclusive_locks_conflict_and_shared_ones_do_not() {
        let dir = scratch("lock");
        let path = dir.join("disk");
        std::fs::write(&path, [0u8; 512]).unwrap();
        let rw = || {
            open(
                &path,
                OpenOptions::new().read(true).write(true),
                Kind::Regular,
            )
            .unwrap()
        };
        let ro = || open_read(&path, Kind::Regular).unwrap();

        let first = rw();
        lock(&first, true).unwrap();
        assert!(matches!(lock(&rw(), true), Err(Error::Locked)));
        assert!(matches!(lock(&ro(), false), Err(Error::Locked)));
        // The lock lives as long as the open file.
        drop(first);
        let shared = ro();
        lock(&shared, false).unwrap();
        lock(&ro(), false).unwrap();
        let err = lock(&rw(), true).unwrap_err();
        assert_eq!(err.to_string(), "in use by another VM (locked)");
        drop(shared);
        lock(&rw(), true).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn quoted_paths_escape_what_a_terminal_would_act_on() {
        let path = Path::new("a\u{1b}[2J\r\u{202e}b\n");
        assert_eq!(Quoted(path).to_string(), r#""a\u{1b}[2J\r\u{202e}b\n""#);
    }
}
