//! The host side's UNIX sockets: the listening socket at `uds_path`
//! (refused if another process serves it, removed when kiln ends), and
//! non-blocking connects to `<uds_path>_<port>`.

use std::ffi::{OsStr, OsString};
use std::io::{self, ErrorKind};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// `sun_path` holds 108 bytes including the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("vsock.uds_path {0:?} is in use: another process listens on it")]
    InUse(PathBuf),
    #[error("vsock.uds_path {0:?} exists and is not a socket; kiln will not replace it")]
    NotASocket(PathBuf),
    #[error("cannot remove the stale socket vsock.uds_path {path:?}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on vsock.uds_path {path:?}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The listening socket at `uds_path`; the socket file is removed when
/// this is dropped, if it is still the one kiln made.
pub struct HostListener {
    pub listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file kiln bound.
    id: (u64, u64),
}

impl HostListener {
    /// Listens at `path`, non-blocking. A socket file already there is
    /// replaced only when nobody listens on it (a kiln that was killed);
    /// anything else there is refused.
    pub fn bind(path: &Path) -> Result<Self, Error> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                if is_live(path) {
                    return Err(Error::InUse(path.to_path_buf()));
                }
                log::info!("removing stale vsock socket {}", path.display());
                std::fs::remove_file(path).map_err(|source| Error::RemoveStale {
                    path: path.to_path_buf(),
                    source,
                })?;
            }
            Ok(_) => return Err(Error::NotASocket(path.to_path_buf())),
            Err(_) => {}
        }
        let bind_err = |source| Error::Bind {
            path: path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let m = std::fs::symlink_metadata(path).map_err(bind_err)?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            id: (m.dev(), m.ino()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for HostListener {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .map(|m| (m.dev(), m.ino()) == self.id)
            .unwrap_or(false);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                log::warn!("cannot remove vsock socket {}: {e}", self.path.display());
            }
        }
    }
}

/// Whether a process accepts (or queues) connections at `path`.
fn is_live(path: &Path) -> bool {
    match connect(path.as_os_str()) {
        Ok(_) => true,
        Err(e) => e.kind() == ErrorKind::WouldBlock,
    }
}

/// `<uds_path>_<port>`, where guest connections to host port `port` go.
pub fn port_path(uds_path: &Path, port: u32) -> OsString {
    let mut p = uds_path.as_os_str().to_os_string();
    p.push(format!("_{port}"));
    p
}

/// Connects to the UNIX stream socket at `path` without blocking: a
/// listener whose backlog is full gives WouldBlock instead of stalling the
/// event loop. The stream is non-blocking.
pub fn connect(path: &OsStr) -> io::Result<UnixStream> {
    let bytes = path.as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() > MAX_SOCKET_PATH || bytes.contains(&0) {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            "socket path too long or contains NUL",
        ));
    }
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX)
        .map_err(|_| io::Error::from(ErrorKind::InvalidInput))?;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = libc::c_char::from_ne_bytes([src]);
    }
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    let len =
        libc::socklen_t::try_from(len).map_err(|_| io::Error::from(ErrorKind::InvalidInput))?;
    // SAFETY: `addr` is a valid sockaddr_un and `len` covers its family and
    // the NUL-terminated path inside it.
    let r = unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&raw const addr).cast(),
            len,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        // EAGAIN: the listener's backlog is full (a UNIX stream connect
        // never completes asynchronously).
        return Err(e);
    }
    Ok(UnixStream::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kiln-uds-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn live_socket_refused_stale_replaced_file_kept() {
        let d = dir("bind");
        let p = d.join("v.sock");
        let first = HostListener::bind(&p).unwrap();
        assert!(matches!(HostListener::bind(&p), Err(Error::InUse(_))));
        drop(first);
        assert!(!p.exists(), "the socket file is removed on drop");
        // A kiln killed without cleanup leaves a socket nobody listens on.
        drop(UnixListener::bind(&p).unwrap());
        assert!(p.exists());
        let second = HostListener::bind(&p).unwrap();
        drop(second);
        assert!(!p.exists(), "the socket file is removed on drop");

        std::fs::write(&p, "user data").unwrap();
        assert!(matches!(HostListener::bind(&p), Err(Error::NotASocket(_))));
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "user data");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn drop_leaves_a_replaced_socket_alone() {
        let d = dir("replaced");
        let p = d.join("v.sock");
        let l = HostListener::bind(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        let other = UnixListener::bind(&p).unwrap();
        drop(l);
        assert!(p.exists(), "someone else's socket must stay");
        drop(other);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn connect_reaches_a_listener_and_reports_absence() {
        let d = dir("connect");
        let base = d.join("v.sock");
        let path = port_path(&base, 52);
        assert!(path.to_string_lossy().ends_with("v.sock_52"));
        assert!(connect(&path).is_err());
        let l = UnixListener::bind(&path).unwrap();
        let s = connect(&path).unwrap();
        let (mut peer, _) = l.accept().unwrap();
        use std::io::{Read, Write};
        (&s).write_all(b"hi").unwrap();
        let mut b = [0u8; 2];
        peer.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hi");
        let long = OsString::from("x".repeat(200));
        assert_eq!(connect(&long).unwrap_err().kind(), ErrorKind::InvalidInput);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
