//! kiln's guest agent, PID 1 of the initramfs `kiln run` boots.
//!
//! 1. mounts /proc, /sys and /dev (devtmpfs);
//! 2. connects to the host over vsock ([`crate::protocol`]), says Hello and
//!    receives what to run ([`ExecSpec`]);
//! 3. builds the command's root: the image's block device read-only under a
//!    tmpfs overlay (what the command writes to / is gone after the run),
//!    with /proc, /sys, /dev, /dev/pts, /dev/shm, /tmp and the shared folders
//!    (virtio-fs) mounted in it; sets the hostname; moves into it (chroot);
//! 4. starts the command (on a pseudo-terminal or pipes, in its own session
//!    and process group, as the requested user), streams its output, feeds
//!    its stdin, forwards signals and terminal sizes ([`session`]);
//! 5. when the command exits, kills what it left behind, reports the exit
//!    status after all output, and powers the VM off.
//!
//! As PID 1 it also reaps every orphan. Anything that goes wrong is
//! reported to the host (`Failed`) when the connection exists, printed on
//! the console otherwise, and the VM is powered off: the agent never
//! returns.

mod session;
mod setup;
mod sys;

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::ExitCode;

use crate::protocol::{self, ExecSpec, Msg, AGENT_PORT, VERSION};

/// The host's vsock address.
const HOST_CID: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot mount {what}")]
    Mount {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot reach the host over vsock")]
    Connect(#[source] io::Error),
    #[error("talking to the host")]
    Protocol(#[from] protocol::Error),
    #[error("the host speaks protocol version {host}, this agent {VERSION}")]
    Version { host: u32 },
    #[error("the host sent {0} instead of {1}")]
    Unexpected(String, &'static str),
    #[error("the host closed the connection")]
    HostGone,
    #[error("cannot set up the command's environment: {what}")]
    Setup {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    User(String),
}

/// The agent's entry point (the `kiln-agent` binary's `main`). Never
/// returns when running as PID 1.
pub fn main() -> ExitCode {
    if std::process::id() != 1 {
        eprintln!("kiln-agent: this is the init of `kiln run` VMs; it runs only as PID 1");
        return ExitCode::from(2);
    }
    let started_ms = sys::uptime_ms();
    if let Err(e) = setup::early_mounts() {
        eprintln!("kiln-agent: {}", crate::error_chain(&e));
        sys::power_off();
    }
    match connect() {
        Ok(stream) => {
            if let Err(e) = serve(stream, started_ms) {
                eprintln!("kiln-agent: {}", crate::error_chain(&e));
            }
        }
        Err(e) => eprintln!("kiln-agent: {}", crate::error_chain(&e)),
    }
    sys::kill_everything();
    sys::power_off()
}

fn connect() -> Result<UnixStream, Error> {
    let fd: OwnedFd = sys::vsock_connect(HOST_CID, AGENT_PORT).map_err(Error::Connect)?;
    // A vsock stream is a socket: UnixStream gives it Read/Write (the
    // address family never matters for read/write).
    Ok(UnixStream::from(fd))
}

/// Hello, Exec, the command's life.
fn serve(mut stream: UnixStream, started_ms: u32) -> Result<(), Error> {
    let hello = Msg::AgentHello {
        version: VERSION,
        started_ms,
        hello_ms: sys::uptime_ms(),
    };
    protocol::write_msg(&mut stream, &hello)?;
    match protocol::read_msg(&mut stream)? {
        Some(Msg::HostHello { version }) if version == VERSION => {}
        Some(Msg::HostHello { version }) => return Err(Error::Version { host: version }),
        Some(m) => return Err(Error::Unexpected(format!("{m:?}"), "Hello")),
        None => return Err(Error::HostGone),
    }
    let spec: ExecSpec = match protocol::read_msg(&mut stream)? {
        Some(Msg::Exec(spec)) => *spec,
        Some(m) => return Err(Error::Unexpected(format!("{m:?}"), "Exec")),
        None => return Err(Error::HostGone),
    };
    if let Err(e) = setup::enter_root(&spec) {
        let message = crate::error_chain(&e);
        protocol::write_msg(&mut stream, &Msg::Failed { code: 125, message })?;
        return Ok(());
    }
    session::run(stream, &spec)
}
