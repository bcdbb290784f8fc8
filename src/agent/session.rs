//! The command's life: started on pipes or a pseudo-terminal, its output
//! streamed to the host and its input fed from it, in one poll(2) loop that
//! never blocks on either side (see the flow control in
//! [`crate::protocol`]).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};

use super::{setup, sys, Error};
use crate::protocol::{self, Decoder, ExecSpec, ExitStatus, Msg, MAX_DATA};

/// Bytes of frames waiting for the host before the agent stops reading
/// the command's output.
const OUT_HIGH_WATER: usize = 256 * 1024;

/// One output of the command: a pipe (stdout or stderr) or the terminal.
struct Output {
    file: File,
    stderr: bool,
    open: bool,
}

struct Session {
    host: UnixStream,
    decoder: Decoder,
    out: VecDeque<u8>,
    outputs: Vec<Output>,
    /// The command's stdin (a pipe, or the terminal's master).
    stdin: Option<File>,
    stdin_buf: VecDeque<u8>,
    stdin_eof: bool,
    /// The terminal master, for Resize.
    tty: Option<RawFd>,
    pid: libc::pid_t,
    status: Option<ExitStatus>,
    sigchld: File,
    host_open: bool,
}

fn failed_code(e: &io::Error) -> u8 {
    match e.kind() {
        ErrorKind::NotFound => 127,
        ErrorKind::PermissionDenied => 126,
        _ if e.raw_os_error() == Some(libc::ENOEXEC) => 126,
        _ => 125,
    }
}

/// Starts the command and serves it until it exits and its output is out.
pub fn run(mut host: UnixStream, spec: &ExecSpec) -> Result<(), Error> {
    let sigchld = sys::sigchld_fd().map_err(|source| Error::Setup {
        what: "watching child processes".into(),
        source,
    })?;
    let (child, outputs, stdin, tty) = match spawn(spec) {
        Ok(s) => s,
        Err(e) => {
            let (code, message) = match &e {
                Spawn::User(m) => (125, m.clone()),
                Spawn::Io(what, e) => (failed_code(e), what.clone()),
            };
            protocol::write_msg(&mut host, &Msg::Failed { code, message })?;
            return Ok(());
        }
    };
    protocol::write_msg(&mut host, &Msg::Started)?;
    host.set_nonblocking(true)
        .map_err(|e| Error::Protocol(e.into()))?;
    let mut s = Session {
        host,
        decoder: Decoder::default(),
        out: VecDeque::new(),
        outputs,
        stdin,
        stdin_buf: VecDeque::new(),
        stdin_eof: !spec.stdin,
        tty,
        pid: libc::pid_t::try_from(child.id()).unwrap_or(-1),
        status: None,
        sigchld: File::from(sigchld),
        host_open: true,
    };
    // The Child handle is not used to wait: PID 1 reaps everything itself.
    drop(child);
    s.serve()
}

enum Spawn {
    User(String),
    /// A complete message, and the error (for the exit code).
    Io(String, io::Error),
}

type Spawned = (
    std::process::Child,
    Vec<Output>,
    Option<File>,
    Option<RawFd>,
);

/// A command that cannot start, said as a shell would.
fn start_error(argv0: &str) -> impl FnOnce(io::Error) -> Spawn + '_ {
    move |e| {
        let why = match e.kind() {
            ErrorKind::NotFound => "command not found".to_string(),
            ErrorKind::PermissionDenied => "permission denied (not executable?)".to_string(),
            _ => e.to_string(),
        };
        Spawn::Io(format!("{argv0}: {why}"), e)
    }
}

/// `name` looked up as execvp(3) does: with a slash, as it is; else the
/// first executable regular file of that name in `path`'s directories
/// (PermissionDenied if only non-executable ones exist).
fn find_program(name: &str, path: Option<&str>) -> io::Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if name.contains('/') {
        return Ok(name.into());
    }
    if name.is_empty() {
        return Err(ErrorKind::NotFound.into());
    }
    let mut denied = false;
    for dir in path.unwrap_or("/usr/local/bin:/usr/bin:/bin").split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = std::path::Path::new(dir).join(name);
        match std::fs::metadata(&candidate) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => return Ok(candidate),
            Ok(m) if m.is_file() => denied = true,
            _ => {}
        }
    }
    Err(if denied {
        ErrorKind::PermissionDenied
    } else {
        ErrorKind::NotFound
    }
    .into())
}

fn spawn(spec: &ExecSpec) -> Result<Spawned, Spawn> {
    let (argv0, args) = spec
        .argv
        .split_first()
        .ok_or_else(|| Spawn::User("no command to run".into()))?;
    // As `docker run --workdir`: made if missing (in the overlay).
    std::fs::create_dir_all(&spec.cwd)
        .map_err(|e| Spawn::User(format!("working directory {}: {e}", spec.cwd)))?;
    let mut env: Vec<(String, String)> = spec
        .env
        .iter()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    // Keep guest glibc off AVX on hosts that need it (kiln passes the
    // tunable to init's environment there), unless the command's own says.
    if let Ok(t) = std::env::var("GLIBC_TUNABLES") {
        if !env.iter().any(|(k, _)| k == "GLIBC_TUNABLES") {
            env.push(("GLIBC_TUNABLES".into(), t));
        }
    }
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str());
    let program = find_program(argv0, path).map_err(start_error(argv0))?;
    let mut cmd = Command::new(program);
    // The agent moves to the working directory itself: the command
    // inherits it (std's own chdir for the child needs a glibc function
    // a static agent cannot find, and then falls back to fork).
    std::env::set_current_dir(&spec.cwd)
        .map_err(|e| Spawn::User(format!("working directory {}: {e}", spec.cwd)))?;
    cmd.arg0(argv0).args(args).env_clear();
    let mut uid = 0;
    if let Some(user) = &spec.user {
        let (u, g) = setup::resolve_user(user).map_err(|e| Spawn::User(e.to_string()))?;
        // Root needs no change (and without one the command is started
        // with vfork, not fork: see below).
        if (u, g) != (0, 0) {
            cmd.uid(u).gid(g);
        }
        uid = u;
    }
    if !env.iter().any(|(k, _)| k == "HOME") {
        let home = setup::home_of(uid).unwrap_or_else(|| "/".into());
        env.push(("HOME".into(), home));
    }
    cmd.envs(env);

    let io_err = |what: &str| {
        let what = what.to_string();
        move |e: io::Error| Spawn::Io(format!("{what}: {e}"), e)
    };
    let tty = spec.tty;
    let (outputs, stdin, tty_fd) = if tty {
        let (master, slave) = sys::openpty(spec.winsize).map_err(io_err("opening a terminal"))?;
        let slave_out = slave.try_clone().map_err(io_err("opening a terminal"))?;
        let slave_err = slave.try_clone().map_err(io_err("opening a terminal"))?;
        cmd.stdin(Stdio::from(slave))
            .stdout(Stdio::from(slave_out))
            .stderr(Stdio::from(slave_err));
        let fd = master.as_raw_fd();
        let master = File::from(master);
        let input = master.try_clone().map_err(io_err("opening a terminal"))?;
        (
            vec![Output {
                file: master,
                stderr: false,
                open: true,
            }],
            Some(input),
            Some(fd),
        )
    } else {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.stdin(if spec.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        (Vec::new(), None, None)
    };
    if tty {
        // SAFETY: the closure only makes async-signal-safe system calls
        // (setsid, ioctl) between fork and exec.
        unsafe {
            cmd.pre_exec(move || sys::new_session(tty));
        }
    } else {
        // Its own process group (for signals). Without a closure, a uid
        // change or a PATH search left to it, std starts the command with
        // posix_spawn (vfork): no copy of the agent's page tables, which
        // costs most of a start where guest kernel code is slow.
        cmd.process_group(0);
    }
    let mut child = cmd.spawn().map_err(start_error(argv0))?;
    let mut outputs = outputs;
    let mut stdin = stdin;
    if !tty {
        if let Some(out) = child.stdout.take() {
            outputs.push(Output {
                file: File::from(OwnedFd::from(out)),
                stderr: false,
                open: true,
            });
        }
        if let Some(err) = child.stderr.take() {
            outputs.push(Output {
                file: File::from(OwnedFd::from(err)),
                stderr: true,
                open: true,
            });
        }
        stdin = child.stdin.take().map(|s| File::from(OwnedFd::from(s)));
    }
    for o in &outputs {
        sys::set_nonblocking(o.file.as_raw_fd()).map_err(io_err("setting up output"))?;
    }
    if let Some(i) = &stdin {
        sys::set_nonblocking(i.as_raw_fd()).map_err(io_err("setting up input"))?;
    }
    Ok((child, outputs, stdin, tty_fd))
}

fn status_of(raw: libc::c_int) -> ExitStatus {
    let st = std::process::ExitStatus::from_raw(raw);
    match (st.code(), st.signal()) {
        (Some(c), _) => ExitStatus::Code(c),
        (None, Some(s)) => ExitStatus::Signal(s),
        (None, None) => ExitStatus::Code(125),
    }
}

impl Session {
    fn queue(&mut self, msg: &Msg) {
        self.out.extend(msg.encode());
    }

    fn serve(&mut self) -> Result<(), Error> {
        loop {
            let outputs_open = self.outputs.iter().any(|o| o.open);
            if self.status.is_some() && !outputs_open {
                break;
            }
            if !self.host_open {
                return Err(Error::HostGone);
            }
            self.poll_once()?;
        }
        let status = self.status.unwrap_or(ExitStatus::Code(125));
        self.queue(&Msg::Exited(status));
        // Everything out before powering off (blocking now: nothing else
        // is left to do).
        self.host
            .set_nonblocking(false)
            .map_err(|e| Error::Protocol(e.into()))?;
        let (a, b) = self.out.as_slices();
        self.host
            .write_all(a)
            .map_err(|e| Error::Protocol(e.into()))?;
        self.host
            .write_all(b)
            .map_err(|e| Error::Protocol(e.into()))?;
        let _ = self.host.shutdown(std::net::Shutdown::Write);
        // Wait (briefly) for the host to close: it has read everything.
        let _ = self
            .host
            .set_read_timeout(Some(std::time::Duration::from_secs(5)));
        let _ = self.host.read(&mut [0u8; 1]);
        Ok(())
    }

    fn poll_once(&mut self) -> Result<(), Error> {
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(5);
        let pfd = |fd: RawFd, events: libc::c_short| libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        let mut host_ev = libc::POLLIN;
        if !self.out.is_empty() {
            host_ev |= libc::POLLOUT;
        }
        fds.push(pfd(self.host.as_raw_fd(), host_ev));
        fds.push(pfd(self.sigchld.as_raw_fd(), libc::POLLIN));
        let room = self.out.len() < OUT_HIGH_WATER;
        for o in &self.outputs {
            // A negative fd is ignored by poll.
            let fd = if o.open && room {
                o.file.as_raw_fd()
            } else {
                -1
            };
            fds.push(pfd(fd, libc::POLLIN));
        }
        let stdin_fd = match &self.stdin {
            Some(f) if !self.stdin_buf.is_empty() => f.as_raw_fd(),
            _ => -1,
        };
        fds.push(pfd(stdin_fd, libc::POLLOUT));
        let nfds = libc::nfds_t::try_from(fds.len()).unwrap_or(0);
        // SAFETY: `fds` is a valid array of `nfds` pollfd structs.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), nfds, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(Error::Setup {
                what: "waiting for events".into(),
                source: e,
            });
        }
        let ready = |i: usize| fds[i].revents != 0;
        if ready(1) {
            self.reap();
        }
        for i in 0..self.outputs.len() {
            if ready(2 + i) {
                self.read_output(i);
            }
        }
        if ready(2 + self.outputs.len()) {
            self.write_stdin();
        }
        if ready(0) {
            self.host_io(fds[0].revents)?;
        }
        Ok(())
    }

    fn reap(&mut self) {
        // signalfd_siginfo is 128 bytes. Drain it; which child does not
        // matter: every exited one is reaped below.
        let mut info = [0u8; 128];
        while let Ok(n) = (&self.sigchld).read(&mut info) {
            if n == 0 {
                break;
            }
        }
        while let Some((pid, raw)) = sys::reap() {
            if pid == self.pid {
                self.status = Some(status_of(raw));
                // Like a container: the command's end ends the sandbox; what
                // it left running would hold its output open.
                sys::kill_everything();
            }
        }
    }

    fn read_output(&mut self, i: usize) {
        let mut buf = vec![0u8; MAX_DATA];
        let o = &mut self.outputs[i];
        match o.file.read(&mut buf) {
            Ok(0) => o.open = false,
            Ok(n) => {
                buf.truncate(n);
                let msg = if o.stderr {
                    Msg::Stderr(buf)
                } else {
                    Msg::Stdout(buf)
                };
                self.queue(&msg);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
            // EIO: the terminal's last writer is gone.
            Err(_) => o.open = false,
        }
    }

    fn write_stdin(&mut self) {
        let Some(f) = self.stdin.as_mut() else {
            return;
        };
        let (a, _) = self.stdin_buf.as_slices();
        match f.write(a) {
            Ok(n) => {
                self.stdin_buf.drain(..n);
                let bytes = u32::try_from(n).unwrap_or(u32::MAX);
                self.queue(&Msg::StdinConsumed { bytes });
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
            Err(_) => {
                // The command closed its stdin: drop what is left, still
                // acknowledging it so the host's window stays honest.
                let bytes = u32::try_from(self.stdin_buf.len()).unwrap_or(u32::MAX);
                self.stdin_buf.clear();
                self.stdin = None;
                self.queue(&Msg::StdinConsumed { bytes });
            }
        }
        self.maybe_close_stdin();
    }

    fn maybe_close_stdin(&mut self) {
        // With a terminal, EOF is the terminal's ^D, not a closed master.
        if self.stdin_eof && self.stdin_buf.is_empty() && self.tty.is_none() {
            self.stdin = None;
        }
    }

    fn host_io(&mut self, revents: libc::c_short) -> Result<(), Error> {
        if revents & libc::POLLOUT != 0 {
            // One write for all that is queued (the socket is non-blocking).
            let a = self.out.make_contiguous();
            match self.host.write(a) {
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e)
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
                Err(_) => self.host_open = false,
            }
        }
        if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            let mut buf = vec![0u8; 64 * 1024];
            let want = self.decoder.wants().min(buf.len());
            match self.host.read(&mut buf[..want]) {
                Ok(0) => self.host_open = false,
                Ok(n) => {
                    self.decoder.push(&buf[..n]);
                    while let Some(msg) = self.decoder.next_msg()? {
                        self.handle_host_msg(msg)?;
                    }
                }
                Err(e)
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
                Err(_) => self.host_open = false,
            }
        }
        Ok(())
    }

    fn handle_host_msg(&mut self, msg: Msg) -> Result<(), Error> {
        match msg {
            Msg::Stdin(data) => {
                if self.stdin.is_some() && !self.stdin_eof {
                    self.stdin_buf.extend(data);
                } else {
                    let bytes = u32::try_from(data.len()).unwrap_or(u32::MAX);
                    self.queue(&Msg::StdinConsumed { bytes });
                }
            }
            Msg::StdinEof => {
                self.stdin_eof = true;
                self.maybe_close_stdin();
            }
            Msg::Signal { signo } => {
                let _ = sys::kill_group(self.pid, signo);
            }
            Msg::Resize { rows, cols } => {
                if let Some(fd) = self.tty {
                    let _ = sys::resize(fd, rows, cols);
                    let _ = sys::kill_group(self.pid, libc::SIGWINCH);
                }
            }
            m => {
                return Err(Error::Unexpected(
                    format!("{m:?}"),
                    "Stdin, StdinEof, Signal or Resize",
                ))
            }
        }
        Ok(())
    }
}
