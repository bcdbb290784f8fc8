//! Raw mode for the console when stdin is a terminal, restored on drop.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Puts a terminal in raw mode (keys go to the guest as typed, Ctrl-C
/// included) and restores its previous settings when dropped.
pub struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    /// Raw mode on `fd` if it is a terminal; None otherwise.
    pub fn enable(fd: BorrowedFd<'_>) -> io::Result<Option<RawMode>> {
        let fd = fd.as_raw_fd();
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return Ok(None);
        }
        // SAFETY: termios is plain data, filled by tcgetattr below.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios to write into.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: `raw` is a valid termios.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so host-side logs still start lines.
        raw.c_oflag = saved.c_oflag;
        // SAFETY: `raw` is a valid termios for this terminal.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Some(RawMode { fd, saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the settings read from this same terminal.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}
