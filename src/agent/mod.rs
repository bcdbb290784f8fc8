//! kiln's guest agent, PID 1 of the initramfs `kiln run` boots.
//!
//! 1. mounts /proc, /sys and /dev (devtmpfs);
//! 2. connects to the host over vsock ([`crate::protocol`]) and says Hello;
//! 3. on `Prepare`, brings `lo` up, and the network interface a `Network`
//!    message described, if any; builds the command's root: the image's block device
//!    read-only under a tmpfs overlay (what the command writes to / is gone
//!    after the run), with /proc, /sys, /dev, /dev/pts, /dev/shm and /tmp
//!    mounted in it, and moves into it (chroot); says Ready. Here the host
//!    may snapshot the VM as a template; a VM restored from it wakes up
//!    here, connects again and says Hello again;
//! 4. on `Resume`, sets the clock and reseeds the kernel's RNG from the
//!    host; on `Exec` ([`crate::protocol::ExecSpec`]), mounts the shared
//!    folders (virtio-fs) and sets the hostname;
//! 5. starts the command (on a pseudo-terminal or pipes, in its own session
//!    and process group, as the requested user), streams its output, feeds
//!    its stdin, forwards signals and terminal sizes ([`session`]);
//! 6. when the command exits, kills what it left behind, reports the exit
//!    status after all output, and powers the VM off.
//!
//! As PID 1 it also reaps every orphan. Anything that goes wrong is
//! reported to the host (`Failed`) when the connection exists, printed on
//! the console otherwise, and the VM is powered off: the agent never
//! returns.

mod net;
mod session;
mod setup;
mod sys;

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::ExitCode;

use crate::protocol::{self, Msg, NetworkSpec, AGENT_PORT, VERSION};

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

/// How long a restored agent tries to reach the host again.
const RECONNECT_FOR: std::time::Duration = std::time::Duration::from_secs(30);

/// Hello both ways.
fn hello(stream: &mut UnixStream, started_ms: u32) -> Result<(), Error> {
    let hello = Msg::AgentHello {
        version: VERSION,
        started_ms,
        hello_ms: sys::uptime_ms(),
    };
    protocol::write_msg(stream, &hello)?;
    match protocol::read_msg(stream)? {
        Some(Msg::HostHello { version }) if version == VERSION => Ok(()),
        Some(Msg::HostHello { version }) => Err(Error::Version { host: version }),
        Some(m) => Err(Error::Unexpected(format!("{m:?}"), "Hello")),
        None => Err(Error::HostGone),
    }
}

/// Connects again after a restore broke the connection (its vsock
/// transport was reset).
fn reconnect() -> Result<UnixStream, Error> {
    let start = std::time::Instant::now();
    loop {
        match connect() {
            Ok(s) => return Ok(s),
            Err(e) if start.elapsed() > RECONNECT_FOR => return Err(e),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
}

/// Reports a failure to set the run up (exit code 125).
fn fail(stream: &mut UnixStream, e: &Error) -> Result<(), Error> {
    let message = crate::error_chain(e);
    protocol::write_msg(stream, &Msg::Failed { code: 125, message })?;
    Ok(())
}

/// What a template holds: the network, and the command's root entered.
fn prepare(root_device: &str, warm_up: bool, network: Option<&NetworkSpec>) -> Result<(), Error> {
    net::loopback()?;
    if let Some(spec) = network {
        net::configure(spec)?;
    }
    setup::enter_root(root_device, warm_up)?;
    match network {
        Some(spec) => net::resolv_conf(std::path::Path::new("/"), spec),
        None => Ok(()),
    }
}

/// Hello, Prepare, Resume and Exec (see the order in [`crate::protocol`]),
/// then the command's life.
fn serve(mut stream: UnixStream, started_ms: u32) -> Result<(), Error> {
    hello(&mut stream, started_ms)?;
    let mut prepared = false;
    let mut network = None;
    loop {
        let msg = match protocol::read_msg(&mut stream) {
            Ok(Some(m)) => m,
            // Restored from a template: the wait after Ready ends with the
            // connection's reset.
            Ok(None) | Err(protocol::Error::Io(_)) if prepared => {
                stream = reconnect()?;
                hello(&mut stream, started_ms)?;
                continue;
            }
            Ok(None) => return Err(Error::HostGone),
            Err(e) => return Err(e.into()),
        };
        match msg {
            Msg::Network(spec) if !prepared => network = Some(spec),
            Msg::Prepare {
                root_device,
                warm_up,
            } if !prepared => {
                if let Err(e) = prepare(&root_device, warm_up, network.as_deref()) {
                    return fail(&mut stream, &e);
                }
                prepared = true;
                protocol::write_msg(&mut stream, &Msg::Ready)?;
            }
            Msg::Resume { unix_ns, entropy } => {
                let resumed = sys::set_clock(unix_ns)
                    .map_err(|source| Error::Setup {
                        what: "setting the clock".into(),
                        source,
                    })
                    .and_then(|()| {
                        sys::reseed_rng(&entropy).map_err(|source| Error::Setup {
                            what: "reseeding the kernel's random number generator".into(),
                            source,
                        })
                    });
                if let Err(e) = resumed {
                    return fail(&mut stream, &e);
                }
            }
            Msg::Exec(spec) if prepared => {
                if let Err(e) = setup::per_run(&spec) {
                    return fail(&mut stream, &e);
                }
                return session::run(stream, &spec);
            }
            m => {
                return Err(Error::Unexpected(
                    format!("{m:?}"),
                    "Network, Prepare, Resume or Exec",
                ))
            }
        }
    }
}
