//! The protocol between `kiln run` (the host) and its guest agent, over one
//! virtio-vsock stream. Both sides use this module; it does no I/O of its
//! own beyond reading and writing frames, so it is tested (and fuzzed)
//! without a VM.
//!
//! # Connection
//! The agent, once it has mounted what it needs, connects to the host (CID
//! 2) at [`AGENT_PORT`]; with kiln's vsock device that reaches the UNIX
//! socket `<uds_path>_1024` the host listens on. The agent speaks first.
//!
//! # Frames
//! ```text
//! le32 len | u8 kind | payload (len - 1 bytes)
//! ```
//! `len` counts the kind byte and the payload: 1 to [`MAX_FRAME`]. A frame
//! longer than that, a kind this version does not know, or a payload that
//! does not parse is a protocol error: the receiver drops the connection.
//! Nothing is buffered beyond one frame.
//!
//! # Messages
//! Agent to host:
//! - `Hello { version, started_ms, hello_ms }` (1): first frame; le32
//!   version, then (this version) le32 guest uptime in ms when the agent
//!   started as PID 1 and le32 uptime when it sent Hello: where the boot
//!   time went. A receiver reads the version first, so a Hello of another
//!   version is still reported as such.
//! - `Started` (2): the command runs.
//! - `Stdout(bytes)` (3), `Stderr(bytes)` (4): the command's output, at most
//!   [`MAX_DATA`] per frame, in order; with a terminal (`tty`) everything is
//!   `Stdout`.
//! - `StdinConsumed { bytes }` (5): le32, stdin bytes the agent passed on to
//!   the command (the host's send window, see below).
//! - `Exited(status)` (6): u8 0 + le32 exit code, or u8 1 + le32 signal
//!   number. The last frame: all output came before it.
//! - `Failed { code, message }` (7): the command could not start; u8 code
//!   (126: not executable, 127: not found, 125: anything else) and UTF-8
//!   text.
//! - `Ready` (8): the answer to `Prepare`: the command's root is built; the
//!   agent waits for `Resume`. Empty.
//!
//! Host to agent:
//! - `Hello { version }` (16): the answer to the agent's.
//! - `Exec(spec)` (17): what to run, [`ExecSpec`] as JSON; after `Resume`.
//! - `Stdin(bytes)` (18): for the command's stdin, at most [`MAX_DATA`].
//! - `StdinEof` (19): close the command's stdin.
//! - `Signal { signo }` (20): le32; the agent signals the command's process
//!   group.
//! - `Resize { rows, cols }` (21): le16 rows, le16 cols of the terminal.
//! - `Prepare { root_device, warm_up }` (22): u8 flags (bit 0: warm up),
//!   then a block device (UTF-8, 1 to [`MAX_NAME`] bytes): build the
//!   command's root from the image on it and answer `Ready`; with warm up,
//!   first run the image's `/bin/sh -c true` once, so the shell and its
//!   libraries are in the page cache of a template. Only on a freshly
//!   booted guest.
//! - `Resume { unix_ns, entropy }` (23): le64 host wall-clock time in ns
//!   since the epoch, then [`ENTROPY_MIN`] to [`ENTROPY_MAX`] bytes of host
//!   entropy: the agent sets the guest's clock and reseeds its kernel RNG
//!   before anything of the run's starts.
//! - `Network(spec)` (24): [`NetworkSpec`] as JSON; before `Prepare`, for a
//!   VM with a network interface: the agent configures it (address, default
//!   route) and the root's `/etc/resolv.conf` as part of `Prepare`, so a
//!   template holds it too. Without it the guest has only `lo` (which
//!   `Prepare` brings up either way).
//!
//! # Order and warm starts
//! ```text
//! agent: Hello          host: Hello, [Network,] Prepare
//! agent: Ready          (the host may snapshot the VM here: a template)
//!                       host: Resume, Exec
//! ```
//! A VM restored from a template resumes inside the agent's wait after
//! `Ready`; its vsock transport is reset, which breaks the connection. An
//! agent that has sent `Ready` and loses its connection before `Exec`
//! connects again and says Hello again; the host answers Hello, Resume,
//! Exec. So the clock and the RNG of every restored guest are its own.
//!
//! # Flow control
//! Output: the agent reads the command's output only as fast as the host
//! takes frames (vsock's credit does the rest), so a command printing
//! faster than the host's stdout drains is slowed, not buffered. Input: the
//! host keeps at most [`STDIN_WINDOW`] bytes of `Stdin` sent and not yet
//! acknowledged by `StdinConsumed`, so the agent never holds more, and a
//! command that does not read its stdin never blocks the agent's loop (it
//! still receives `Signal`).
//!
//! # Versions
//! [`VERSION`] is 3 (2 had no Network, 1 no Prepare, Ready or Resume). Each side sends its version in `Hello`; a host and an
//! agent with different versions refuse each other, naming both.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks.
pub const VERSION: u32 = 3;
/// The vsock port the agent connects to on the host.
pub const AGENT_PORT: u32 = 1024;
/// Largest frame (`len`): an `Exec` with a big environment fits.
pub const MAX_FRAME: u32 = 1 << 20;
/// Largest payload of a data frame (`Stdout`, `Stderr`, `Stdin`).
pub const MAX_DATA: usize = 64 * 1024;
/// Stdin bytes the host may have in flight.
pub const STDIN_WINDOW: u32 = 256 * 1024;
/// Longest `Prepare` device name.
pub const MAX_NAME: usize = 256;
/// Most name servers in a `Network` (what the C library reads).
pub const MAX_DNS: usize = 3;
/// Bounds on `Resume`'s entropy.
pub const ENTROPY_MIN: usize = 32;
pub const ENTROPY_MAX: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connection failed")]
    Io(#[from] io::Error),
    #[error("frame of {0} bytes (at most {MAX_FRAME})")]
    FrameLength(u32),
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("malformed {0} message")]
    Malformed(&'static str),
    #[error("malformed {0} message")]
    Json(&'static str, #[source] serde_json::Error),
}

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

/// A mount of a shared folder (virtio-fs) in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    /// The virtio-fs tag.
    pub tag: String,
    /// Absolute path in the guest.
    pub path: String,
    pub read_only: bool,
}

/// What the agent runs.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecSpec {
    /// The command and its arguments; `argv[0]` is looked up in PATH.
    pub argv: Vec<String>,
    /// `K=V` entries: the whole environment.
    pub env: Vec<String>,
    /// Working directory (created if missing).
    pub cwd: String,
    /// `uid[:gid]` or a user name from the image's /etc/passwd; None: root.
    pub user: Option<String>,
    pub hostname: String,
    /// Run on a pseudo-terminal.
    pub tty: bool,
    /// Initial terminal size (rows, cols) with `tty`.
    pub winsize: Option<(u16, u16)>,
    /// Forward stdin (else the command's stdin is /dev/null).
    pub stdin: bool,
    pub mounts: Vec<Mount>,
}

/// A guest network interface the agent configures: the one with this MAC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// The interface's MAC address (how the agent finds it).
    pub mac: [u8; 6],
    pub address: std::net::Ipv4Addr,
    /// 1 to 32.
    pub prefix_len: u8,
    /// The default route's gateway.
    pub gateway: std::net::Ipv4Addr,
    /// Name servers for the root's `/etc/resolv.conf` (at most 3, as the C
    /// library reads).
    pub dns: Vec<std::net::Ipv4Addr>,
}

/// One message, either way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    AgentHello {
        version: u32,
        started_ms: u32,
        hello_ms: u32,
    },
    Started,
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    StdinConsumed {
        bytes: u32,
    },
    Exited(ExitStatus),
    Failed {
        code: u8,
        message: String,
    },
    Ready,
    HostHello {
        version: u32,
    },
    Exec(Box<ExecSpec>),
    Stdin(Vec<u8>),
    StdinEof,
    Signal {
        signo: i32,
    },
    Resize {
        rows: u16,
        cols: u16,
    },
    /// The root: the block device holding the image (read-only, under a
    /// tmpfs overlay).
    Prepare {
        root_device: String,
        warm_up: bool,
    },
    Resume {
        unix_ns: u64,
        entropy: Vec<u8>,
    },
    Network(Box<NetworkSpec>),
}

mod kind {
    pub const AGENT_HELLO: u8 = 1;
    pub const STARTED: u8 = 2;
    pub const STDOUT: u8 = 3;
    pub const STDERR: u8 = 4;
    pub const STDIN_CONSUMED: u8 = 5;
    pub const EXITED: u8 = 6;
    pub const FAILED: u8 = 7;
    pub const READY: u8 = 8;
    pub const HOST_HELLO: u8 = 16;
    pub const EXEC: u8 = 17;
    pub const STDIN: u8 = 18;
    pub const STDIN_EOF: u8 = 19;
    pub const SIGNAL: u8 = 20;
    pub const RESIZE: u8 = 21;
    pub const PREPARE: u8 = 22;
    pub const RESUME: u8 = 23;
    pub const NETWORK: u8 = 24;
}

fn le32(p: &[u8], what: &'static str) -> Result<u32, Error> {
    let b: [u8; 4] = p.try_into().map_err(|_| Error::Malformed(what))?;
    Ok(u32::from_le_bytes(b))
}

fn i32_of(v: u32, what: &'static str) -> Result<i32, Error> {
    i32::try_from(v).map_err(|_| Error::Malformed(what))
}

impl Msg {
    /// The frame for this message, header included.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, payload): (u8, Vec<u8>) = match self {
            Msg::AgentHello {
                version,
                started_ms,
                hello_ms,
            } => {
                let mut p = version.to_le_bytes().to_vec();
                p.extend_from_slice(&started_ms.to_le_bytes());
                p.extend_from_slice(&hello_ms.to_le_bytes());
                (kind::AGENT_HELLO, p)
            }
            Msg::Started => (kind::STARTED, Vec::new()),
            Msg::Stdout(d) => (kind::STDOUT, d.clone()),
            Msg::Stderr(d) => (kind::STDERR, d.clone()),
            Msg::StdinConsumed { bytes } => (kind::STDIN_CONSUMED, bytes.to_le_bytes().to_vec()),
            Msg::Exited(status) => {
                let (tag, v) = match *status {
                    ExitStatus::Code(c) => (0u8, c),
                    ExitStatus::Signal(s) => (1u8, s),
                };
                let mut p = vec![tag];
                p.extend_from_slice(&v.to_le_bytes());
                (kind::EXITED, p)
            }
            Msg::Failed { code, message } => {
                let mut p = vec![*code];
                p.extend_from_slice(message.as_bytes());
                (kind::FAILED, p)
            }
            Msg::Ready => (kind::READY, Vec::new()),
            Msg::HostHello { version } => (kind::HOST_HELLO, version.to_le_bytes().to_vec()),
            Msg::Exec(spec) => (
                kind::EXEC,
                // Serializing plain strings and numbers cannot fail.
                serde_json::to_vec(spec).unwrap_or_default(),
            ),
            Msg::Stdin(d) => (kind::STDIN, d.clone()),
            Msg::StdinEof => (kind::STDIN_EOF, Vec::new()),
            Msg::Signal { signo } => (kind::SIGNAL, signo.to_le_bytes().to_vec()),
            Msg::Resize { rows, cols } => {
                let mut p = rows.to_le_bytes().to_vec();
                p.extend_from_slice(&cols.to_le_bytes());
                (kind::RESIZE, p)
            }
            Msg::Prepare {
                root_device,
                warm_up,
            } => {
                let mut p = vec![u8::from(*warm_up)];
                p.extend_from_slice(root_device.as_bytes());
                (kind::PREPARE, p)
            }
            Msg::Resume { unix_ns, entropy } => {
                let mut p = unix_ns.to_le_bytes().to_vec();
                p.extend_from_slice(entropy);
                (kind::RESUME, p)
            }
            Msg::Network(spec) => (
                kind::NETWORK,
                // Serializing addresses and numbers cannot fail.
                serde_json::to_vec(spec).unwrap_or_default(),
            ),
        };
        let len = u32::try_from(payload.len() + 1).unwrap_or(u32::MAX);
        let mut frame = Vec::with_capacity(payload.len() + 5);
        frame.extend_from_slice(&len.to_le_bytes());
        frame.push(kind);
        frame.extend_from_slice(&payload);
        frame
    }

    /// Parses one frame's kind and payload.
    pub fn decode(kind: u8, p: &[u8]) -> Result<Msg, Error> {
        let empty = |m: Msg, what| {
            if p.is_empty() {
                Ok(m)
            } else {
                Err(Error::Malformed(what))
            }
        };
        Ok(match kind {
            kind::AGENT_HELLO => {
                let version = le32(p.get(..4).unwrap_or(p), "Hello")?;
                let (started_ms, hello_ms) = match p.get(4..) {
                    Some(rest) if rest.len() == 8 => {
                        (le32(&rest[..4], "Hello")?, le32(&rest[4..], "Hello")?)
                    }
                    // Another version's Hello: its version is what matters.
                    _ if version != VERSION => (0, 0),
                    _ => return Err(Error::Malformed("Hello")),
                };
                Msg::AgentHello {
                    version,
                    started_ms,
                    hello_ms,
                }
            }
            kind::STARTED => return empty(Msg::Started, "Started"),
            kind::STDOUT => Msg::Stdout(data(p, "Stdout")?),
            kind::STDERR => Msg::Stderr(data(p, "Stderr")?),
            kind::STDIN_CONSUMED => Msg::StdinConsumed {
                bytes: le32(p, "StdinConsumed")?,
            },
            kind::EXITED => {
                let (&tag, rest) = p.split_first().ok_or(Error::Malformed("Exited"))?;
                let v = i32_of(le32(rest, "Exited")?, "Exited")?;
                match tag {
                    0 => Msg::Exited(ExitStatus::Code(v)),
                    1 => Msg::Exited(ExitStatus::Signal(v)),
                    _ => return Err(Error::Malformed("Exited")),
                }
            }
            kind::FAILED => {
                let (&code, rest) = p.split_first().ok_or(Error::Malformed("Failed"))?;
                Msg::Failed {
                    code,
                    message: String::from_utf8_lossy(rest).into_owned(),
                }
            }
            kind::READY => return empty(Msg::Ready, "Ready"),
            kind::HOST_HELLO => Msg::HostHello {
                version: le32(p, "Hello")?,
            },
            kind::EXEC => Msg::Exec(Box::new(
                serde_json::from_slice(p).map_err(|e| Error::Json("Exec", e))?,
            )),
            kind::STDIN => Msg::Stdin(data(p, "Stdin")?),
            kind::STDIN_EOF => return empty(Msg::StdinEof, "StdinEof"),
            kind::SIGNAL => Msg::Signal {
                signo: i32_of(le32(p, "Signal")?, "Signal")?,
            },
            kind::RESIZE => {
                let b: [u8; 4] = p.try_into().map_err(|_| Error::Malformed("Resize"))?;
                Msg::Resize {
                    rows: u16::from_le_bytes([b[0], b[1]]),
                    cols: u16::from_le_bytes([b[2], b[3]]),
                }
            }
            kind::PREPARE => {
                let (&flags, name) = p.split_first().ok_or(Error::Malformed("Prepare"))?;
                if flags > 1 || name.is_empty() || name.len() > MAX_NAME {
                    return Err(Error::Malformed("Prepare"));
                }
                let root_device = std::str::from_utf8(name)
                    .map_err(|_| Error::Malformed("Prepare"))?
                    .to_string();
                Msg::Prepare {
                    root_device,
                    warm_up: flags == 1,
                }
            }
            kind::RESUME => {
                let (time, entropy) = p.split_at_checked(8).ok_or(Error::Malformed("Resume"))?;
                if !(ENTROPY_MIN..=ENTROPY_MAX).contains(&entropy.len()) {
                    return Err(Error::Malformed("Resume"));
                }
                let b: [u8; 8] = time.try_into().map_err(|_| Error::Malformed("Resume"))?;
                Msg::Resume {
                    unix_ns: u64::from_le_bytes(b),
                    entropy: entropy.to_vec(),
                }
            }
            kind::NETWORK => {
                let spec: NetworkSpec =
                    serde_json::from_slice(p).map_err(|e| Error::Json("Network", e))?;
                if !(1..=32).contains(&spec.prefix_len) || spec.dns.len() > MAX_DNS {
                    return Err(Error::Malformed("Network"));
                }
                Msg::Network(Box::new(spec))
            }
            k => return Err(Error::UnknownKind(k)),
        })
    }
}

fn data(p: &[u8], what: &'static str) -> Result<Vec<u8>, Error> {
    if p.is_empty() || p.len() > MAX_DATA {
        return Err(Error::Malformed(what));
    }
    Ok(p.to_vec())
}

/// Reads one frame, blocking. `Ok(None)` at a clean end of stream between
/// frames.
pub fn read_msg(r: &mut impl Read) -> Result<Option<Msg>, Error> {
    let mut head = [0u8; 4];
    match read_full(r, &mut head)? {
        0 => return Ok(None),
        4 => {}
        _ => return Err(Error::Io(io::ErrorKind::UnexpectedEof.into())),
    }
    let len = u32::from_le_bytes(head);
    if len == 0 || len > MAX_FRAME {
        return Err(Error::FrameLength(len));
    }
    let mut frame = vec![0u8; usize::try_from(len).map_err(|_| Error::FrameLength(len))?];
    if read_full(r, &mut frame)? != frame.len() {
        return Err(Error::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    Msg::decode(frame[0], &frame[1..]).map(Some)
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Writes one frame, blocking.
pub fn write_msg(w: &mut impl Write, msg: &Msg) -> Result<(), Error> {
    w.write_all(&msg.encode())?;
    Ok(())
}

/// Splits a byte stream into frames as it arrives, for non-blocking
/// readers: push what was read, take whole messages out. Holds at most one
/// frame.
#[derive(Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    /// How many more bytes the decoder wants before it can yield a frame.
    pub fn wants(&self) -> usize {
        if self.buf.len() < 4 {
            return 4 - self.buf.len();
        }
        let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        let total = usize::try_from(len).unwrap_or(usize::MAX).saturating_add(4);
        total.saturating_sub(self.buf.len()).max(1)
    }

    /// Adds bytes; at most [`Decoder::wants`] should be given at a time.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole message, if one is buffered.
    pub fn next_msg(&mut self) -> Result<Option<Msg>, Error> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        if len == 0 || len > MAX_FRAME {
            return Err(Error::FrameLength(len));
        }
        let total = usize::try_from(len).map_err(|_| Error::FrameLength(len))? + 4;
        if self.buf.len() < total {
            return Ok(None);
        }
        let msg = Msg::decode(self.buf[4], &self.buf[5..total]);
        self.buf.drain(..total);
        msg.map(Some)
    }
}

#[cfg(test)]
mod tests;
