//! The system calls the agent needs and std does not offer: mounts, chroot,
//! the hostname, vsock, pseudo-terminals, signals, the clock, the kernel
//! RNG, reboot. Each wrapper
//! checks its result and returns an `io::Error`.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cstr(p: &OsStr) -> io::Result<CString> {
    CString::new(p.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// mount(2).
pub fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = cstr(OsStr::new(source))?;
    let target = cstr(target.as_os_str())?;
    let fstype = cstr(OsStr::new(fstype))?;
    let data = data.map(|d| cstr(OsStr::new(d))).transpose()?;
    let data_ptr = data
        .as_ref()
        .map_or(std::ptr::null(), |d| d.as_ptr().cast());
    // SAFETY: every pointer is a valid NUL-terminated string (or null for
    // data) that lives across the call.
    check(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data_ptr,
        )
    })
    .map(drop)
}

/// chroot(2) then chdir("/").
pub fn chroot(dir: &Path) -> io::Result<()> {
    let d = cstr(dir.as_os_str())?;
    // SAFETY: `d` is a valid NUL-terminated path.
    check(unsafe { libc::chroot(d.as_ptr()) })?;
    std::env::set_current_dir("/")
}

/// Sets the wall clock (CLOCK_REALTIME) to `unix_ns`.
pub fn set_clock(unix_ns: u64) -> io::Result<()> {
    let invalid = || io::Error::from(io::ErrorKind::InvalidInput);
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(unix_ns / 1_000_000_000).map_err(|_| invalid())?,
        tv_nsec: libc::c_long::try_from(unix_ns % 1_000_000_000).map_err(|_| invalid())?,
    };
    // SAFETY: `ts` is a valid timespec that lives across the call.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) }).map(drop)
}

/// `RNDADDENTROPY` and `RNDRESEEDCRNG` (linux/random.h).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Mixes `entropy` into the kernel's input pool, credited, and makes the
/// kernel reseed its CRNG from it now: what `/dev/urandom` and
/// `getrandom` return from here on depends on these bytes.
pub fn reseed_rng(entropy: &[u8]) -> io::Result<()> {
    let random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; u32 buf[]; }
    let count = libc::c_int::try_from(entropy.len() * 8)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let size = libc::c_int::try_from(entropy.len())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut info = Vec::with_capacity(8 + entropy.len());
    info.extend_from_slice(&count.to_ne_bytes());
    info.extend_from_slice(&size.to_ne_bytes());
    info.extend_from_slice(entropy);
    // SAFETY: `info` is a rand_pool_info whose buf_size bytes follow its
    // header, alive across the call; the kernel only reads it.
    check(unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) })?;
    // SAFETY: an ioctl without an argument on a valid fd.
    check(unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) }).map(drop)
}

pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }).map(drop)
}

/// A connected vsock stream to `cid`:`port`.
pub fn vsock_connect(cid: u32, port: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked.
    let fd =
        check(unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: socket returned a new fd nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all zeroes is valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::sa_family_t::try_from(libc::AF_VSOCK)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    addr.svm_cid = cid;
    addr.svm_port = port;
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_vm>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `addr` is a valid sockaddr_vm of `len` bytes.
    check(unsafe { libc::connect(fd.as_raw_fd(), (&raw const addr).cast(), len) })?;
    Ok(fd)
}

pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd the caller owns.
    let flags = check(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) }).map(drop)
}

/// A new pseudo-terminal: (master, slave).
pub fn openpty(winsize: Option<(u16, u16)>) -> io::Result<(OwnedFd, OwnedFd)> {
    // SAFETY: posix_openpt returns a new fd or -1.
    let m = check(unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) })?;
    // SAFETY: a new fd nothing else owns.
    let master = unsafe { OwnedFd::from_raw_fd(m) };
    // SAFETY: grantpt/unlockpt on the master we own.
    check(unsafe { libc::grantpt(m) })?;
    // SAFETY: as above.
    check(unsafe { libc::unlockpt(m) })?;
    let mut name = [0u8; 128];
    // SAFETY: ptsname_r writes at most `name.len()` bytes into `name`.
    let r = unsafe { libc::ptsname_r(m, name.as_mut_ptr().cast(), name.len()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    let path =
        CString::new(&name[..end]).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: `path` is a valid NUL-terminated path; the result is checked.
    let s = check(unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: a new fd nothing else owns.
    let slave = unsafe { OwnedFd::from_raw_fd(s) };
    if let Some((rows, cols)) = winsize {
        resize(master.as_raw_fd(), rows, cols)?;
    }
    Ok((master, slave))
}

/// TIOCSWINSZ on a terminal.
pub fn resize(fd: RawFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from the pointer, which is valid.
    check(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) }).map(drop)
}

/// Sends `sig` to the process group `pgid` (the command and what it
/// started); ESRCH (all gone) is not an error.
pub fn kill_group(pgid: libc::pid_t, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: kill(2) has no memory effects.
    match check(unsafe { libc::kill(-pgid, sig) }) {
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
        r => r.map(drop),
    }
}

/// SIGKILL to every process but this one (PID 1).
pub fn kill_everything() {
    // SAFETY: kill(-1) signals every process we may signal but init itself.
    unsafe { libc::kill(-1, libc::SIGKILL) };
}

/// Blocks SIGCHLD and returns a signalfd for it.
pub fn sigchld_fd() -> io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data, initialized by sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset we own.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
    }
    // SAFETY: valid set, null old set.
    check(unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) })?;
    // SAFETY: -1 asks for a new signalfd for the valid set.
    let fd = check(unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) })?;
    // SAFETY: a new fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reaps one exited child without waiting: Some((pid, status)).
pub fn reap() -> Option<(libc::pid_t, libc::c_int)> {
    let mut status = 0;
    // SAFETY: waitpid writes the status into `status`.
    let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
    (pid > 0).then_some((pid, status))
}

/// Flushes file systems and restarts the machine: with `reboot=k` on the
/// kernel command line that pulls the i8042 reset line, which ends kiln.
pub fn power_off() -> ! {
    // SAFETY: sync and reboot have no memory effects; reboot does not
    // return on success.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    // Reboot failed: PID 1 exiting panics the kernel, and panic=1 reboots.
    std::process::exit(1)
}

/// The process's session leader and controlling terminal, in a child
/// before exec.
pub fn new_session(controlling_tty: bool) -> io::Result<()> {
    // SAFETY: setsid has no memory effects.
    check(unsafe { libc::setsid() })?;
    if controlling_tty {
        // SAFETY: TIOCSCTTY on stdin (the pty slave) takes no pointer.
        check(unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) })?;
    }
    Ok(())
}

/// Milliseconds since the guest kernel started (CLOCK_BOOTTIME).
pub fn uptime_ms() -> u32 {
    // SAFETY: timespec is plain data.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: clock_gettime writes a timespec into the valid pointer.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return 0;
    }
    let ms = i128::from(ts.tv_sec) * 1000 + i128::from(ts.tv_nsec) / 1_000_000;
    u32::try_from(ms).unwrap_or(u32::MAX)
}
