//! kiln's stdout as the console's output: written without blocking, and
//! without changing a file description kiln shares with other processes.
//!
//! O_NONBLOCK is a property of the open file description, and kiln shares
//! its stdout's description with whoever gave it: the user's shell and every
//! other program on the same terminal, the other commands of a pipeline.
//! Setting the flag there makes their writes fail with EAGAIN while kiln
//! runs, and for good if kiln is killed before it can clear it. So:
//!
//! - a pipe, FIFO or terminal (any character device) is opened again through
//!   `/proc/self/fd/N`: Linux gives kiln a new file description of the same
//!   pipe or terminal, and O_NONBLOCK on it is kiln's alone, gone with kiln
//!   however it ends;
//! - a regular file or block device is written as it is: its writes never
//!   wait for a reader (O_NONBLOCK does not apply to them);
//! - when opening again fails (no /proc, a pipe or terminal owned by another
//!   user, a socket): a terminal gets blocking writes, since the user's
//!   shell reads from it after kiln and a terminal's reader seldom stops;
//!   anything else gets O_NONBLOCK on the shared description, put back as it
//!   was when kiln is done with it.

use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::time::Duration;

/// How writes to the output avoid blocking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// kiln's own non-blocking file description.
    Own,
    /// O_NONBLOCK set on the shared description; `flags` are put back on drop.
    Shared { flags: libc::c_int },
    /// Plain writes: a file, or a terminal kiln could not open again.
    Blocking,
}

/// A console output fd the drainer writes to from the event loop.
#[derive(Debug)]
pub struct OutputFd {
    file: File,
    mode: Mode,
}

impl OutputFd {
    /// kiln's stdout (fd 1).
    pub fn stdout() -> io::Result<OutputFd> {
        Self::new(io::stdout().as_fd())
    }

    /// `fd`, set up as the module documentation says; `fd` itself is not
    /// changed unless kiln cannot open it again.
    pub fn new(fd: BorrowedFd<'_>) -> io::Result<OutputFd> {
        Self::with_reopen(fd, true)
    }

    fn with_reopen(fd: BorrowedFd<'_>, reopen: bool) -> io::Result<OutputFd> {
        let dup = File::from(fd.try_clone_to_owned()?);
        let meta = dup.metadata()?;
        let kind = meta.file_type();
        if kind.is_file() || kind.is_block_device() {
            return Ok(OutputFd {
                file: dup,
                mode: Mode::Blocking,
            });
        }
        if reopen && (kind.is_fifo() || kind.is_char_device()) {
            let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
            match OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
                .open(&path)
            {
                // The same pipe or terminal, not whatever else the path names.
                Ok(own)
                    if own
                        .metadata()
                        .is_ok_and(|m| (m.dev(), m.ino()) == (meta.dev(), meta.ino())) =>
                {
                    return Ok(OutputFd {
                        file: own,
                        mode: Mode::Own,
                    });
                }
                Ok(_) => log::debug!("{path} opens another file than the console output"),
                Err(e) => log::debug!("cannot open the console output again through {path}: {e}"),
            }
        }
        if dup.is_terminal() {
            log::debug!("console output: blocking writes to the terminal");
            return Ok(OutputFd {
                file: dup,
                mode: Mode::Blocking,
            });
        }
        let raw = dup.as_raw_fd();
        // SAFETY: F_GETFL only reads the flags of a descriptor we own.
        let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: F_SETFL on a descriptor we own, with its own flags plus O_NONBLOCK.
        if unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        log::debug!("console output: O_NONBLOCK on the shared description until kiln exits");
        Ok(OutputFd {
            file: dup,
            mode: Mode::Shared { flags },
        })
    }

    /// The fd to wait on for EPOLLOUT after a write returned WouldBlock;
    /// None when writes block instead.
    pub fn poll_fd(&self) -> Option<RawFd> {
        (self.mode != Mode::Blocking).then(|| self.file.as_raw_fd())
    }

    /// Waits until the output can take more bytes, an error or hangup is
    /// pending (the next write reports it), or `timeout` passes; false on
    /// timeout.
    pub fn wait_writable(&self, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `pfd` is one valid pollfd, and we pass a count of 1.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        match n {
            n if n < 0 => Err(io::Error::last_os_error()),
            0 => Ok(false),
            _ => Ok(true),
        }
    }
}

impl Write for OutputFd {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for OutputFd {
    fn drop(&mut self) {
        if let Mode::Shared { flags } = self.mode {
            // SAFETY: F_SETFL on a descriptor we own, back to the flags it had.
            unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_SETFL, flags) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn nonblocking(fd: BorrowedFd<'_>) -> bool {
        // SAFETY: F_GETFL only reads the flags of a valid descriptor.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        assert!(flags >= 0);
        flags & libc::O_NONBLOCK != 0
    }

    /// Fills `out` until a write would block; returns how much it took.
    fn fill(out: &mut OutputFd) -> usize {
        let block = [b'x'; 4096];
        let mut total = 0;
        loop {
            match out.write(&block) {
                Ok(n) => total += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return total,
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn a_pipe_gets_its_own_nonblocking_description() {
        let (mut reader, writer) = io::pipe().unwrap();
        let mut out = OutputFd::new(writer.as_fd()).unwrap();
        assert_eq!(out.mode, Mode::Own);
        assert!(out.poll_fd().is_some());
        let filled = fill(&mut out);
        assert!(filled >= 4096, "{filled}");
        // The description the caller holds is untouched.
        assert!(!nonblocking(writer.as_fd()));
        assert!(!out.wait_writable(Duration::from_millis(10)).unwrap());
        let mut buf = vec![0u8; filled];
        reader.read_exact(&mut buf).unwrap();
        assert!(out.wait_writable(Duration::from_millis(10)).unwrap());
        drop(reader);
        let e = out.write(b"x").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn a_regular_file_is_written_as_it_is() {
        let path = std::env::temp_dir().join(format!("kiln-output-fd-{}", std::process::id()));
        let file = File::create(&path).unwrap();
        let mut out = OutputFd::new(file.as_fd()).unwrap();
        assert_eq!(out.mode, Mode::Blocking);
        assert_eq!(out.poll_fd(), None);
        out.write_all(b"abc").unwrap();
        drop(out);
        assert_eq!(std::fs::read(&path).unwrap(), b"abc");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn the_shared_fallback_puts_the_flags_back() {
        let (_reader, writer) = io::pipe().unwrap();
        let mut out = OutputFd::with_reopen(writer.as_fd(), false).unwrap();
        assert!(matches!(out.mode, Mode::Shared { .. }));
        assert!(nonblocking(writer.as_fd()));
        fill(&mut out);
        drop(out);
        assert!(!nonblocking(writer.as_fd()));
    }
}
