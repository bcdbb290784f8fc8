//! passt for one VM: user-mode networking without root. kiln starts
//! `passt` (Debian package `passt`) as its own child, as the same user,
//! connected through a socket pair (`--fd`), and speaks QEMU's stream
//! protocol with it ([`super::stream::Stream`]). passt terminates the
//! guest's TCP and UDP in host sockets, answers ARP and DHCP, forwards DNS
//! sent to the configured address to the host's resolver, and maps the
//! gateway address to the host's loopback.
//!
//! passt's lifetime is the socket's: it runs with `--one-off`, so it ends
//! when kiln closes its end, at the device's end or when kiln dies however
//! it dies. The device's end reaps it through a pidfd (the only process
//! the event loop's seccomp filter lets it signal or wait for), killing it
//! if it has not ended within [`EXIT_GRACE`].

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::config::PasstConfig;

/// The program started, looked up in PATH.
pub const PROGRAM: &str = "passt";
/// How long passt has to end after kiln closed its socket.
pub const EXIT_GRACE: Duration = Duration::from_secs(1);
/// waitid's id type for a pidfd (include/uapi/linux/wait.h; not in libc).
pub const P_PIDFD: libc::idtype_t = 3;
/// close_range(2)'s flag: mark the range close-on-exec rather than close it
/// (include/uapi/linux/close_range.h).
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
/// How much of passt's messages is kept for a failure's explanation.
const MAX_WORDS: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start {PROGRAM} (install Debian's package passt, or put it in PATH)")]
    Spawn(#[source] io::Error),
    #[error("cannot set up the connection to {PROGRAM}")]
    Socket(#[source] io::Error),
}

/// What passt is told: the guest's addresses and MTU.
#[derive(Debug, Clone)]
pub struct Options {
    pub config: PasstConfig,
    pub mtu: u16,
}

impl Options {
    /// passt's command line, but for `--fd`.
    pub fn args(&self) -> Vec<String> {
        let c = &self.config;
        [
            // Foreground, quiet (errors only), gone when the socket closes,
            // IPv4 only (the project's guest kernel has no IPv6), no ports
            // forwarded into the guest.
            "--foreground",
            "--quiet",
            "--one-off",
            "--ipv4-only",
            "--tcp-ports",
            "none",
            "--udp-ports",
            "none",
        ]
        .into_iter()
        .map(String::from)
        .chain([
            "--address".into(),
            c.address().to_string(),
            "--netmask".into(),
            c.prefix_len().to_string(),
            "--gateway".into(),
            c.gateway().to_string(),
            "--dns-forward".into(),
            c.dns().to_string(),
            "--mtu".into(),
            self.mtu.to_string(),
        ])
        .collect()
    }
}

/// A running passt, kiln's child.
pub struct Passt {
    pid: u32,
    pidfd: OwnedFd,
    /// The read end of its stderr (non-blocking).
    stderr: File,
    /// What it said so far (its last [`MAX_WORDS`] bytes).
    said: Vec<u8>,
}

/// A pipe: (read end, write end), close-on-exec.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two fds into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds are new and owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an fd this process owns.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Starts passt for a VM; returns kiln's end of the connection.
pub fn start(opts: &Options) -> Result<(UnixStream, Passt), Error> {
    let (ours, theirs) = UnixStream::pair().map_err(Error::Socket)?;
    let (err_read, err_write) = pipe().map_err(Error::Socket)?;
    // passt's messages are read only to explain a failure: a passt that
    // says a lot loses what does not fit rather than block.
    set_nonblocking(err_write.as_raw_fd()).map_err(Error::Socket)?;
    set_nonblocking(err_read.as_raw_fd()).map_err(Error::Socket)?;
    let fd = theirs.as_raw_fd();
    let mut cmd = Command::new(PROGRAM);
    cmd.args(opts.args())
        .arg("--fd")
        .arg(fd.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(err_write))
        // Out of kiln's process group: a Ctrl-C at the terminal is for
        // the command (kiln run passes it on), not for its network.
        .process_group(0);
    // SAFETY: the closure makes two system calls, async-signal-safe, on
    // the child's own fds: every fd past stdio is marked close-on-exec
    // (the VM's eventfds and the like are not, and passt must get none of
    // them), then passt's end of the pair is kept.
    unsafe {
        cmd.pre_exec(move || {
            if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC) < 0
                || libc::fcntl(fd, libc::F_SETFD, 0) < 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(Error::Spawn)?;
    drop(cmd);
    drop(theirs);
    let pid = child.id();
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd; the
    // pid is our unreaped child's, so it cannot name another process.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let pidfd = match RawFd::try_from(raw) {
        // SAFETY: a new fd nothing else owns.
        Ok(fd) if fd >= 0 => unsafe { OwnedFd::from_raw_fd(fd) },
        _ => {
            let e = io::Error::last_os_error();
            // Without a pidfd there is no reaping it later: end it now.
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Socket(e));
        }
    };
    log::info!(
        "started {PROGRAM} (pid {pid}) for the guest's network: {}",
        opts.args().join(" ")
    );
    Ok((
        ours,
        Passt {
            pid,
            pidfd,
            stderr: File::from(err_read),
            said: Vec::new(),
        },
    ))
}

impl Passt {
    /// Takes in what passt wrote to its stderr since the last call.
    fn read_stderr(&mut self) {
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            self.said.extend_from_slice(&buf[..n]);
            let excess = self.said.len().saturating_sub(MAX_WORDS);
            self.said.drain(..excess);
        }
    }

    /// Whether passt has ended, waiting up to `timeout`.
    fn ended_within(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd; a pidfd is readable once its process
        // has ended.
        unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
    }
}

/// A line of passt's that explains nothing: an empty one, a host without a
/// syslog daemon, the notice that it runs as nobody rather than root.
fn is_noise(line: &str) -> bool {
    let syslog = line.starts_with("Failed to send") && line.ends_with("to syslog");
    line.is_empty() || syslog || line.starts_with("Don't run as root")
}

impl super::stream::Peer for Passt {
    fn last_words(&mut self) -> Option<String> {
        self.read_stderr();
        let text = String::from_utf8_lossy(&self.said);
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            // Noise of a host without a syslog daemon, and passt's notice
            // that it dropped root for nobody.
            .filter(|l| !is_noise(l))
            .collect();
        let ended = if self.ended_within(Duration::ZERO) {
            format!("{PROGRAM} (pid {}) has ended", self.pid)
        } else {
            format!("{PROGRAM} (pid {}) still runs", self.pid)
        };
        let words = lines.join(" / ");
        Some(if words.is_empty() {
            ended
        } else {
            // passt's text, escaped for the terminal.
            format!("{ended}: {}", words.escape_debug())
        })
    }
}

impl Drop for Passt {
    /// Runs after kiln's end of the socket is closed (the [`Stream`]'s
    /// field order): passt sees it and ends; it is killed if it does not,
    /// and reaped either way.
    ///
    /// [`Stream`]: super::stream::Stream
    fn drop(&mut self) {
        let fd = self.pidfd.as_raw_fd();
        if !self.ended_within(EXIT_GRACE) {
            log::warn!(
                "{PROGRAM} (pid {}) did not end with its VM; killing it",
                self.pid
            );
            // SAFETY: pidfd_send_signal on our own pidfd, no siginfo.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd,
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                );
            }
            self.ended_within(EXIT_GRACE);
        }
        // SAFETY: siginfo_t is plain data; waitid fills it in.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on our own child through its pidfd, into a valid
        // siginfo_t.
        let r = unsafe {
            libc::waitid(
                P_PIDFD,
                libc::id_t::try_from(fd).unwrap_or(0),
                &mut info,
                libc::WEXITED | libc::WNOHANG,
            )
        };
        if r < 0 {
            log::warn!(
                "cannot reap {PROGRAM} (pid {}): {}",
                self.pid,
                io::Error::last_os_error()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::backend::{Backend, VNET_HDR_LEN};
    use super::super::stream::Stream;
    use super::*;

    /// An ARP request from the guest (MAC 02:00:00:00:00:01, 10.0.2.15) for
    /// the gateway, behind an empty virtio-net header.
    fn arp_request() -> Vec<u8> {
        let mac = [2u8, 0, 0, 0, 0, 1];
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[10, 0, 2, 15]);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&[10, 0, 2, 2]);
        f
    }

    fn started() -> (Stream, u32) {
        let opts = Options {
            config: PasstConfig::default(),
            mtu: 65520,
        };
        let (sock, passt) =
            start(&opts).unwrap_or_else(|e| panic!("{e} (this test needs Debian's package passt)"));
        let pid = passt.pid;
        (Stream::new(sock, Some(Box::new(passt))).unwrap(), pid)
    }

    fn alive(pid: u32) -> bool {
        std::path::Path::new(&format!("/proc/{pid}")).exists()
    }

    /// Reads one frame, waiting up to 10 s.
    fn read_one(s: &mut Stream) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; 70_000];
        for _ in 0..1000 {
            match s.read_frame(&mut buf) {
                Ok(n) => return Ok(buf[..n].to_vec()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e),
            }
        }
        panic!("nothing from passt in 10 s");
    }

    #[test]
    fn passt_answers_arp_and_ends_with_its_socket() {
        let (mut s, pid) = started();
        s.write_frame(&arp_request()).unwrap();
        let reply = read_one(&mut s).unwrap();
        // An ARP reply (op 2) for 10.0.2.2, to the guest's MAC.
        let eth = &reply[VNET_HDR_LEN..];
        assert_eq!(&eth[..6], &[2, 0, 0, 0, 0, 1]);
        assert_eq!(&eth[12..14], &[0x08, 0x06]);
        assert_eq!(&eth[20..22], &[0, 2]);
        assert_eq!(&eth[28..32], &[10, 0, 2, 2]);
        assert!(alive(pid));
        drop(s);
        // Dropping the backend closed the socket, and passt was reaped:
        // no process, not even a zombie.
        assert!(!alive(pid), "passt (pid {pid}) is still there");
    }

    #[test]
    fn passt_inherits_no_fd_but_its_socket() {
        // An fd of this process without close-on-exec, as an eventfd of the
        // VM's is.
        // SAFETY: eventfd(2) with constant arguments; the fd is closed below.
        let leaky = unsafe { libc::eventfd(0, 0) };
        assert!(leaky >= 0);
        let (s, pid) = started();
        let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .map(|t| t.display().to_string())
            .collect();
        assert!(
            !fds.iter().any(|t| t.contains("eventfd")),
            "passt got an fd it should not have: {fds:?}"
        );
        drop(s);
        // SAFETY: closing the fd made above.
        unsafe { libc::close(leaky) };
    }

    #[test]
    fn a_dead_passt_is_named_in_the_failure() {
        let (mut s, pid) = started();
        // SAFETY: signalling our own child, which has not been reaped.
        unsafe { libc::kill(libc::pid_t::try_from(pid).unwrap(), libc::SIGKILL) };
        let e = read_one(&mut s).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let why = s.explain_failure().unwrap();
        assert!(
            why.contains(&format!("passt (pid {pid}) has ended")),
            "{why}"
        );
        drop(s);
        assert!(!alive(pid));
    }

    #[test]
    fn passt_is_told_the_addresses_and_mtu() {
        let opts = Options {
            config: PasstConfig {
                address: Some("192.168.5.9".parse().unwrap()),
                ..PasstConfig::default()
            },
            mtu: 1500,
        };
        let args = opts.args().join(" ");
        for want in [
            "--one-off",
            "--address 192.168.5.9",
            "--netmask 24",
            "--gateway 10.0.2.2",
            "--dns-forward 10.0.2.3",
            "--mtu 1500",
        ] {
            assert!(args.contains(want), "{want} missing from {args}");
        }
    }
}
