//! The host side of virtio-vsock, as Firecracker defines it (its
//! docs/vsock.md): guest sockets multiplexed onto host UNIX sockets.
//!
//! - Host-initiated: a client connects to `uds_path`, sends
//!   `CONNECT <port>\n`; the guest is asked to connect from a host port kiln
//!   allocates; when the guest's listener answers, the client reads
//!   `OK <host_port>\n` and then has a byte stream to it. No listener in the
//!   guest: the client's connection is closed.
//! - Guest-initiated: a guest connect to CID 2, port P reaches the UNIX
//!   socket `<uds_path>_<P>`; nothing listening there: the guest gets a RST.
//!
//! Everything the guest sends is hostile input: a packet that is not for a
//! connection kiln knows, not from the guest's CID, of an unknown type or
//! op, or over its credit gets a RST (or is dropped, if it is itself a RST
//! or not from the guest), never a panic. At most [`MAX_CONNECTIONS`]
//! connections (with the host clients still sending their CONNECT line)
//! exist at once; past that a guest connect gets a RST and a host client is
//! closed. RSTs for the guest wait in a queue of at most
//! [`MAX_CONTROL_PACKETS`]. So memory stays bounded whatever the guest does.
//!
//! The muxer registers nothing itself: it keeps what each fd should be
//! watched for, and [`Muxer::sync`] applies the changes through
//! [`Sources`] (tokens are the fds).

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use event_manager::EventSet;
use log::{debug, warn};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::conn::{Conn, Produced, Verdict};
use super::packet::*;
use super::uds::{self, HostListener};
use crate::devices::virtio::Sources;

/// Most connections (and host clients that have not sent their CONNECT
/// line yet) at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Most RSTs waiting for a guest receive buffer; more are dropped.
pub const MAX_CONTROL_PACKETS: usize = 1024;
/// Longest CONNECT line, newline included (Firecracker's limit).
const MAX_CONNECT_LINE: usize = 32;
/// Host ports kiln gives host-initiated connections start here, as in
/// Firecracker.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Host clients accepted per listener event, so a flood of connects does
/// not hold the event loop.
const ACCEPTS_PER_EVENT: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create the vsock timer")]
    Timer(#[source] vmm_sys_util::errno::Error),
    #[error("cannot create the vsock wakeup eventfd")]
    EventFd(#[source] std::io::Error),
    #[error(transparent)]
    Socket(#[from] uds::Error),
}

/// (host port, guest port).
type Key = (u32, u32);

/// A host client that has not sent its `CONNECT <port>\n` yet.
struct Client {
    stream: UnixStream,
    line: Vec<u8>,
}

/// What went wrong with guest packets, for the debug log and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Packets answered with a RST or dropped.
    pub refused_packets: u64,
    /// Connections refused at the cap (guest or host side).
    pub refused_at_cap: u64,
    /// RSTs dropped because the control queue was full.
    pub dropped_control: u64,
}

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: HostListener,
    timer: TimerFd,
    /// Wakes the event loop to go on filling receive buffers when a pass
    /// ran out of budget.
    kick: EventFd,
    /// When the timer fires next, if armed.
    timer_at: Option<Instant>,
    /// The guest driver is running (DRIVER_OK and no reset since).
    active: bool,
    conns: HashMap<Key, Conn>,
    by_fd: HashMap<RawFd, Key>,
    clients: HashMap<RawFd, Client>,
    /// Connections that owe the guest a packet, each once, in turn.
    rx_queue: VecDeque<Key>,
    /// RSTs owed to the guest for packets without a connection.
    control: VecDeque<Header>,
    next_port: u32,
    /// What each registered fd is watched for now.
    registered: HashMap<RawFd, EventSet>,
    /// fds whose wanted interest may differ from `registered`.
    dirty: Vec<RawFd>,
    /// Streams to close once they are out of the event loop.
    retired: Vec<UnixStream>,
    counters: Counters,
    warned_cap: bool,
}

impl Muxer {
    /// Listens at `uds_path` for host clients.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, Error> {
        let listener = HostListener::bind(uds_path)?;
        let timer = TimerFd::new().map_err(Error::Timer)?;
        let kick = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(Error::EventFd)?;
        let fixed = vec![
            listener.listener.as_raw_fd(),
            timer.as_raw_fd(),
            kick.as_raw_fd(),
        ];
        Ok(Self {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            timer,
            kick,
            timer_at: None,
            active: false,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            clients: HashMap::new(),
            rx_queue: VecDeque::new(),
            control: VecDeque::new(),
            next_port: FIRST_LOCAL_PORT,
            registered: HashMap::new(),
            dirty: fixed,
            retired: Vec::new(),
            counters: Counters::default(),
            warned_cap: false,
        })
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Live connections (host clients waiting to send CONNECT included).
    pub fn connection_count(&self) -> usize {
        self.conns.len() + self.clients.len()
    }

    /// Follows the driver: when it stops (reset), every connection ends.
    pub fn set_active(&mut self, active: bool) {
        if self.active && !active {
            self.close_all();
        }
        self.active = active;
    }

    /// Ends every connection without telling the guest (a device reset, or
    /// a transport reset the guest is told about through the event queue).
    pub fn close_all(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            self.retire(key);
        }
        let fds: Vec<RawFd> = self.clients.keys().copied().collect();
        for fd in fds {
            self.retire_client(fd);
        }
        self.rx_queue.clear();
        self.control.clear();
    }

    /// Answers a guest packet that has no connection with a RST (unless
    /// it is a RST itself).
    fn refuse(&mut self, to: &Header) {
        self.counters.refused_packets += 1;
        if to.op != OP_RST {
            self.queue_control(to.reply(OP_RST));
        }
    }

    fn queue_control(&mut self, h: Header) {
        if self.control.len() >= MAX_CONTROL_PACKETS {
            self.counters.dropped_control += 1;
        } else {
            self.control.push_back(h);
        }
    }

    fn at_cap(&mut self) -> bool {
        if self.connection_count() < MAX_CONNECTIONS {
            return false;
        }
        self.counters.refused_at_cap += 1;
        if !self.warned_cap {
            self.warned_cap = true;
            warn!("vsock: {MAX_CONNECTIONS} connections open; refusing more");
        }
        true
    }

    /// A packet the guest sent (TX queue). `data` is the payload of an RW
    /// packet, `hdr.len` bytes.
    pub fn guest_packet<B: BitmapSlice>(
        &mut self,
        hdr: &Header,
        data: Option<&VolatileSlice<'_, B>>,
    ) {
        log::trace!("vsock: from guest {hdr:?}");
        if hdr.src_cid != self.guest_cid {
            // Not from the guest's address: nobody to answer.
            debug!("vsock: packet from CID {} dropped", hdr.src_cid);
            self.counters.refused_packets += 1;
            return;
        }
        if hdr.dst_cid != HOST_CID || hdr.type_ != TYPE_STREAM {
            self.refuse(hdr);
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        let Some(conn) = self.conns.get_mut(&key) else {
            if hdr.op == OP_REQUEST {
                self.guest_connect(hdr);
            } else {
                self.refuse(hdr);
            }
            return;
        };
        match conn.on_guest_packet(hdr, data) {
            Verdict::Keep => self.touch(key),
            Verdict::Drop => self.retire(key),
            Verdict::Reset => self.reset(key),
        }
    }

    /// The guest connects to host port `hdr.dst_port`.
    fn guest_connect(&mut self, hdr: &Header) {
        if self.at_cap() {
            self.refuse(hdr);
            return;
        }
        let path = uds::port_path(&self.uds_path, hdr.dst_port);
        match uds::connect(&path) {
            Ok(stream) => {
                let key = (hdr.dst_port, hdr.src_port);
                let fd = stream.as_raw_fd();
                self.conns
                    .insert(key, Conn::guest_initiated(stream, hdr, self.guest_cid));
                self.by_fd.insert(fd, key);
                self.touch(key);
            }
            Err(e) => {
                debug!("vsock: guest connect to {}: {e}", path.to_string_lossy());
                self.refuse(hdr);
            }
        }
    }

    /// After a connection changed: queue it if it owes the guest a
    /// packet, and have its interest re-checked.
    fn touch(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if !conn.queued && conn.has_rx_work() {
            conn.queued = true;
            self.rx_queue.push_back(key);
        }
        self.dirty.push(conn.stream.as_raw_fd());
    }

    /// Ends a connection and sends the guest a RST.
    fn reset(&mut self, key: Key) {
        if self.conns.contains_key(&key) {
            self.queue_control(Header {
                src_cid: HOST_CID,
                dst_cid: self.guest_cid,
                src_port: key.0,
                dst_port: key.1,
                type_: TYPE_STREAM,
                op: OP_RST,
                ..Header::default()
            });
            self.retire(key);
        }
    }

    /// Ends a connection without telling the guest.
    fn retire(&mut self, key: Key) {
        let Some(conn) = self.conns.remove(&key) else {
            return;
        };
        if conn.queued {
            self.rx_queue.retain(|k| *k != key);
        }
        let fd = conn.stream.as_raw_fd();
        self.by_fd.remove(&fd);
        // The host client sees the end at once, even before the fd closes.
        let _ = conn.stream.shutdown(Shutdown::Both);
        self.retired.push(conn.stream);
        self.dirty.push(fd);
    }

    fn retire_client(&mut self, fd: RawFd) {
        if let Some(c) = self.clients.remove(&fd) {
            let _ = c.stream.shutdown(Shutdown::Both);
            self.retired.push(c.stream);
            self.dirty.push(fd);
        }
    }

    /// Has the event loop come back (to [`Muxer::host_event`]) soon.
    pub fn kick(&self) {
        // Fails only when the counter is saturated: already kicked.
        let _ = self.kick.write(1);
    }

    /// Whether the guest is owed a packet.
    pub fn has_rx(&self) -> bool {
        !self.control.is_empty() || !self.rx_queue.is_empty()
    }

    /// Fills the next packet owed to the guest into `hdr` (and `data`).
    /// Returns its payload length, or None when nothing can be sent now.
    pub fn next_rx<B: BitmapSlice>(
        &mut self,
        hdr: &mut Header,
        data: Option<&VolatileSlice<'_, B>>,
    ) -> Option<u32> {
        if let Some(h) = self.control.pop_front() {
            *hdr = h;
            return Some(0);
        }
        // Connections with nothing to send now go back in line after the
        // pass, so one that cannot make progress is not asked twice.
        let mut idle = Vec::new();
        let mut produced = None;
        while let Some(key) = self.rx_queue.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.queued = false;
            match conn.produce(hdr, data) {
                Produced::Packet(len) => {
                    log::trace!("vsock: to guest {hdr:?}, {len} bytes");
                    self.touch(key);
                    produced = Some(len);
                    break;
                }
                Produced::Idle => idle.push(key),
                Produced::Failed => {
                    self.reset(key);
                    if let Some(h) = self.control.pop_front() {
                        *hdr = h;
                        produced = Some(0);
                        break;
                    }
                }
            }
        }
        for key in idle {
            self.touch(key);
        }
        produced
    }

    /// One of the muxer's fds (`token`) is ready.
    pub fn host_event(&mut self, token: u32, events: EventSet) {
        log::trace!("vsock: fd {token} ready: {events:?}");
        let Ok(fd) = RawFd::try_from(token) else {
            return;
        };
        if fd == self.listener.listener.as_raw_fd() {
            self.accept_clients();
        } else if fd == self.kick.as_raw_fd() {
            // Only a wakeup: the caller fills receive buffers after this.
            let _ = self.kick.read();
        } else if fd == self.timer.as_raw_fd() {
            let _ = self.timer.wait();
            self.timer_at = None;
            self.expire(Instant::now());
        } else if self.clients.contains_key(&fd) {
            self.client_readable(fd);
        } else if let Some(&key) = self.by_fd.get(&fd) {
            let verdict = match self.conns.get_mut(&key) {
                Some(conn) => conn.on_host_event(events),
                None => return,
            };
            match verdict {
                Verdict::Keep => self.touch(key),
                Verdict::Drop => self.retire(key),
                Verdict::Reset => self.reset(key),
            }
        }
    }

    fn accept_clients(&mut self) {
        for _ in 0..ACCEPTS_PER_EVENT {
            let stream = match self.listener.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!("vsock: accept on {}: {e}", self.listener.path().display());
                    return;
                }
            };
            // Dropping the stream closes it: the client sees EOF.
            if !self.active {
                debug!("vsock: host connection refused: the guest driver is not ready");
                continue;
            }
            if self.at_cap() || stream.set_nonblocking(true).is_err() {
                continue;
            }
            let fd = stream.as_raw_fd();
            self.clients.insert(
                fd,
                Client {
                    stream,
                    line: Vec::with_capacity(MAX_CONNECT_LINE),
                },
            );
            self.dirty.push(fd);
        }
        // More may be waiting: the level-triggered listener fires again.
    }

    /// Reads a client's CONNECT line, a byte at a time so nothing after
    /// the newline is taken from the stream.
    fn client_readable(&mut self, fd: RawFd) {
        let Some(client) = self.clients.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8];
        loop {
            match client.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break,
                Ok(1) if client.line.len() + 1 < MAX_CONNECT_LINE => client.line.push(byte[0]),
                Ok(_) => {
                    // EOF, or a line too long.
                    self.retire_client(fd);
                    return;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.retire_client(fd);
                    return;
                }
            }
        }
        let port = parse_connect(&client.line);
        // Out of the client table; its fd keeps its registration and
        // becomes the connection's.
        let Some(client) = self.clients.remove(&fd) else {
            return;
        };
        let Some(port) = port.filter(|_| self.active) else {
            debug!(
                "vsock: bad CONNECT line {:?}",
                String::from_utf8_lossy(&client.line)
            );
            let _ = client.stream.shutdown(Shutdown::Both);
            self.retired.push(client.stream);
            self.dirty.push(fd);
            return;
        };
        let local = self.allocate_port(port);
        let key = (local, port);
        self.conns.insert(
            key,
            Conn::host_initiated(client.stream, local, port, self.guest_cid),
        );
        self.by_fd.insert(fd, key);
        self.touch(key);
    }

    /// A host port no connection to the guest's `peer_port` uses.
    fn allocate_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let p = self.next_port;
            self.next_port = self.next_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(p, peer_port)) {
                return p;
            }
        }
    }

    /// Resets the connections whose peer did not answer in time.
    fn expire(&mut self, now: Instant) {
        let late: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline().is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in late {
            debug!("vsock: connection {key:?} timed out");
            self.reset(key);
        }
    }

    /// Applies registration changes and closes retired streams.
    pub fn sync(&mut self, sources: &mut dyn Sources) {
        let dirty = std::mem::take(&mut self.dirty);
        for fd in dirty {
            let want = self.wanted(fd);
            let have = self.registered.get(&fd).copied();
            if want == have {
                continue;
            }
            let token = u32::try_from(fd).unwrap_or(0);
            let res = match (have, want) {
                (None, Some(set)) => sources.add(fd, token, set),
                (Some(_), Some(set)) => sources.modify(fd, token, set),
                (Some(_), None) => sources.remove(fd),
                (None, None) => Ok(()),
            };
            match res {
                Ok(()) => match want {
                    Some(set) => {
                        self.registered.insert(fd, set);
                    }
                    None => {
                        self.registered.remove(&fd);
                    }
                },
                Err(e) => warn!("vsock: cannot watch fd {fd}: {e}"),
            }
        }
        // Every retired fd was unregistered above (it was dirty): close.
        self.retired.clear();
        self.arm_timer();
    }

    /// What `fd` should be watched for now; None: not at all.
    fn wanted(&self, fd: RawFd) -> Option<EventSet> {
        if fd == self.listener.listener.as_raw_fd()
            || fd == self.timer.as_raw_fd()
            || fd == self.kick.as_raw_fd()
        {
            return Some(EventSet::IN);
        }
        if self.clients.contains_key(&fd) {
            return Some(EventSet::IN);
        }
        let key = self.by_fd.get(&fd)?;
        self.conns.get(key)?.interest()
    }

    fn arm_timer(&mut self) {
        let next = self.conns.values().filter_map(Conn::deadline).min();
        if next == self.timer_at {
            return;
        }
        let res = match next {
            Some(at) => {
                let wait = at
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1));
                self.timer.reset(wait, None)
            }
            None => self.timer.clear(),
        };
        match res {
            Ok(()) => self.timer_at = next,
            Err(e) => warn!("vsock: cannot arm the timer: {e}"),
        }
    }
}

/// `CONNECT <port>` (Firecracker's command; surrounding blanks and a CR
/// before the newline are accepted).
pub(super) fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let mut words = text.split_ascii_whitespace();
    if words.next()? != "CONNECT" {
        return None;
    }
    let port = words.next()?.parse().ok()?;
    words.next().is_none().then_some(port)
}
