//! The host side of a run's session with the agent: the command's output to
//! kiln's stdout and stderr, kiln's stdin and signals to the command, the
//! timeout, and how it all ended.
//!
//! A reader thread takes frames from the agent and writes the output as it
//! comes (a slow stdout slows the command down: nothing is buffered); the
//! calling thread forwards stdin within the window the agent acknowledges,
//! signals and terminal sizes, and watches the timeout and the VM.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::protocol::{self, ExitStatus, Msg, MAX_DATA, STDIN_WINDOW};

/// How the command ended, from the agent's reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    Exited(ExitStatus),
    /// It could not start: 125, 126 or 127, and why.
    Failed(u8, String),
    /// --timeout fired (the command was killed).
    TimedOut,
    /// kiln was signalled and the command did not end within the grace
    /// period.
    Signalled(i32),
    /// The connection ended before an exit status: the agent or the VM died.
    Lost(String),
}

/// The signals kiln passes on (and SIGWINCH, for the terminal size).
pub const FORWARDED: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGWINCH];

/// Blocks the forwarded signals in this thread (and the threads it starts
/// after this) and returns a signalfd for them.
pub fn signal_fd() -> io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data, initialized by sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset we own; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in FORWARDED {
            libc::sigaddset(&mut set, s);
        }
    }
    // SAFETY: valid set, null old set.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    // SAFETY: -1 asks for a new signalfd for the valid set.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The terminal size of `fd`, if it is a terminal.
pub fn winsize(fd: i32) -> Option<(u16, u16)> {
    // SAFETY: winsize is plain data.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes a winsize into the valid pointer.
    let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0).then_some((ws.ws_row, ws.ws_col))
}

/// What the session watches besides the agent.
pub struct Watch<'a> {
    pub signals: &'a OwnedFd,
    pub timeout: Option<Duration>,
    /// Set when the VM has ended.
    pub vm_ended: &'a AtomicBool,
    /// Forward kiln's stdin.
    pub stdin: bool,
    pub tty: bool,
    /// Set when the agent says the command started.
    pub started: Arc<std::sync::OnceLock<Instant>>,
}

/// How long the command has to end after kiln passed it a stop signal.
const GRACE: Duration = Duration::from_secs(10);

/// Runs the session on a connected, greeted agent until the command ends.
pub fn session(stream: UnixStream, w: Watch) -> Ending {
    let (tx, rx) = mpsc::channel::<Ending>();
    let window = Arc::new(AtomicU32::new(0));
    let reader = {
        let stream = match stream.try_clone() {
            Ok(s) => s,
            Err(e) => return Ending::Lost(format!("cannot read from the agent: {e}")),
        };
        let window = window.clone();
        let started = w.started.clone();
        std::thread::Builder::new()
            .name("kiln-run-output".into())
            .spawn(move || {
                // Started under this thread's filter, which it keeps.
                crate::seccomp::inherited(crate::seccomp::ThreadKind::RunSession);
                let _ = tx.send(read_output(stream, &window, &started));
            })
    };
    if let Err(e) = reader {
        return Ending::Lost(format!("cannot start the output thread: {e}"));
    }
    let mut writer = stream;
    let mut stop_asked: Option<(i32, Instant)> = None;
    let mut stdin_open = w.stdin;
    let mut sent_stdin: u32 = 0;
    let mut buf = vec![0u8; MAX_DATA];
    let stdin_fd = io::stdin().as_raw_fd();
    loop {
        // The output thread's verdict ends the session.
        match rx.try_recv() {
            Ok(ending) => return ending,
            Err(mpsc::TryRecvError::Disconnected) => {
                return Ending::Lost("the output thread ended".into())
            }
            Err(mpsc::TryRecvError::Empty) => {}
        }
        // --timeout bounds the command: it counts from the command's start.
        if let (Some(t), Some(started)) = (w.timeout, w.started.get()) {
            if started.elapsed() >= t {
                let _ = protocol::write_msg(
                    &mut writer,
                    &Msg::Signal {
                        signo: libc::SIGKILL,
                    },
                );
                // The agent reports the kill; the verdict is the timeout.
                let _ = rx.recv_timeout(GRACE);
                return Ending::TimedOut;
            }
        }
        if let Some((sig, at)) = stop_asked {
            if at.elapsed() >= GRACE {
                return Ending::Signalled(sig);
            }
        }
        if w.vm_ended.load(Ordering::SeqCst) {
            // Give the output thread a moment to see the end of stream.
            return rx
                .recv_timeout(Duration::from_secs(2))
                .unwrap_or_else(|_| Ending::Lost("the VM ended".into()));
        }
        // Wait for a signal or stdin (within the window), 100 ms at most.
        let consumed = window.swap(0, Ordering::SeqCst);
        sent_stdin = sent_stdin.saturating_sub(consumed);
        let want_stdin = stdin_open && sent_stdin < STDIN_WINDOW;
        let mut fds = [
            libc::pollfd {
                fd: w.signals.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if want_stdin { stdin_fd } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of 2 pollfd structs.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 100) };
        if n <= 0 {
            continue;
        }
        if fds[0].revents != 0 {
            if let Some(sig) = read_signal(w.signals) {
                if sig == libc::SIGWINCH {
                    if let Some((rows, cols)) = winsize(stdin_fd).filter(|_| w.tty) {
                        let _ = protocol::write_msg(&mut writer, &Msg::Resize { rows, cols });
                    }
                } else {
                    log::info!("passing signal {sig} to the command");
                    let _ = protocol::write_msg(&mut writer, &Msg::Signal { signo: sig });
                    stop_asked.get_or_insert((sig, Instant::now()));
                }
            }
        }
        if fds[1].revents != 0 {
            let room = usize::try_from(STDIN_WINDOW - sent_stdin).unwrap_or(MAX_DATA);
            let n = buf.len().min(room);
            match io::stdin().lock().read(&mut buf[..n]) {
                Ok(0) | Err(_) => {
                    stdin_open = false;
                    let _ = protocol::write_msg(&mut writer, &Msg::StdinEof);
                }
                Ok(k) => {
                    sent_stdin += u32::try_from(k).unwrap_or(0);
                    if protocol::write_msg(&mut writer, &Msg::Stdin(buf[..k].to_vec())).is_err() {
                        stdin_open = false;
                    }
                }
            }
        }
    }
}

fn read_signal(fd: &OwnedFd) -> Option<i32> {
    // SAFETY: signalfd_siginfo is plain data.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reads at most `size` bytes into `info`, which is that large.
    let n = unsafe { libc::read(fd.as_raw_fd(), (&raw mut info).cast(), size) };
    (usize::try_from(n).ok() == Some(size)).then(|| i32::try_from(info.ssi_signo).unwrap_or(0))
}

/// The output thread: frames from the agent until Exited or Failed.
fn read_output(
    mut stream: UnixStream,
    window: &AtomicU32,
    started: &std::sync::OnceLock<Instant>,
) -> Ending {
    let stdout = io::stdout();
    let stderr = io::stderr();
    loop {
        let msg = match protocol::read_msg(&mut stream) {
            Ok(Some(m)) => m,
            Ok(None) => return Ending::Lost("the agent closed the connection".into()),
            Err(e) => return Ending::Lost(crate::error_chain(&e)),
        };
        match msg {
            Msg::Stdout(d) => {
                let mut o = stdout.lock();
                // A closed stdout ends only the output, as on any pipe.
                let _ = o.write_all(&d).and_then(|()| o.flush());
            }
            Msg::Stderr(d) => {
                let mut e = stderr.lock();
                let _ = e.write_all(&d).and_then(|()| e.flush());
            }
            Msg::StdinConsumed { bytes } => {
                window.fetch_add(bytes, Ordering::SeqCst);
            }
            Msg::Started => {
                let _ = started.set(Instant::now());
                log::debug!("the command started");
            }
            Msg::Exited(status) => return Ending::Exited(status),
            Msg::Failed { code, message } => return Ending::Failed(code, message),
            other => {
                return Ending::Lost(format!(
                    "the agent sent {other:?}, which only the host sends"
                ))
            }
        }
    }
}
