//! One vsock stream connection: a guest socket on one side, a host UNIX
//! stream on the other, and the credit-based flow control between them
//! (virtio 1.2 §5.10.6.3).
//!
//! Guest→host data is written straight to the host stream; what the host
//! does not take at once waits in a buffer of at most [`CONN_BUF_SIZE`]
//! bytes, which is exactly the credit the guest was given: a guest that
//! sends more than its credit is reset. Host→guest data is read from the
//! host stream straight into the guest's receive buffers, never more than
//! the guest said it has room for. So a slow reader on either side slows
//! the writer, and nothing is buffered without bound.
//!
//! The connection does no I/O registration itself: it says what it wants
//! to be woken for ([`Conn::interest`]) and what it owes the guest
//! ([`Conn::has_rx_work`]); the muxer does the rest.

use std::io::{self, ErrorKind, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use event_manager::EventSet;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};

use super::packet::*;

/// The receive buffer kiln announces for each connection (`buf_alloc`):
/// the most guest data one connection can hold on the host while the host
/// reader is slow.
pub const CONN_BUF_SIZE: u32 = 128 * 1024;
/// How long the guest has to answer a host-initiated REQUEST, and to
/// answer (RST) a SHUTDOWN of both directions, before kiln resets.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest payload kiln puts in one packet for the guest (Linux's
/// VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PKT_DATA: u32 = 64 * 1024;

/// Packets owed to the guest, produced in this order.
mod owed {
    pub const REQUEST: u8 = 1;
    pub const RESPONSE: u8 = 2;
    pub const SHUTDOWN: u8 = 4;
    pub const CREDIT_UPDATE: u8 = 8;
    pub const CREDIT_REQUEST: u8 = 16;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: the guest was (or will be) sent a REQUEST; waiting
    /// for its RESPONSE.
    Connecting,
    Established,
    /// The host is gone; the guest was told both directions are shut and
    /// has [`PEER_TIMEOUT`] to reset.
    Closing,
}

/// What [`Conn::produce`] made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Produced {
    /// A packet with this many payload bytes.
    Packet(u32),
    /// Nothing can be sent now.
    Idle,
    /// The host stream failed: reset the connection.
    Failed,
}

/// What the muxer must do with a connection after a guest packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// End it and send the guest a RST (protocol violation, host failure,
    /// or the normal end after both sides shut down).
    Reset,
    /// End it silently: the guest reset it.
    Drop,
}

/// Guest→host bytes the host stream has not taken yet.
#[derive(Default)]
struct TxBuf {
    data: Vec<u8>,
    start: usize,
}

impl TxBuf {
    fn len(&self) -> usize {
        self.data.len() - self.start
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push_slice<B: BitmapSlice>(&mut self, s: &VolatileSlice<'_, B>) {
        if self.start > 0 && self.start >= self.data.len() / 2 {
            self.data.drain(..self.start);
            self.start = 0;
        }
        let old = self.data.len();
        self.data.resize(old + s.len(), 0);
        let n = s.copy_to(&mut self.data[old..]);
        self.data.truncate(old + n);
    }

    fn push_bytes(&mut self, b: &[u8]) {
        self.data.extend_from_slice(b);
    }

    /// Writes what it can; returns the bytes written.
    fn flush(&mut self, w: &mut impl Write) -> io::Result<usize> {
        let mut total = 0;
        while !self.is_empty() {
            match w.write(&self.data[self.start..]) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.start += n;
                    total += n;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if self.is_empty() {
            self.data.clear();
            self.start = 0;
        }
        Ok(total)
    }
}

fn would_block(e: &VolatileMemoryError) -> bool {
    matches!(e, VolatileMemoryError::IOError(io) if io.kind() == ErrorKind::WouldBlock)
}

pub struct Conn {
    pub stream: UnixStream,
    /// The host end's port (the guest's destination port when the guest
    /// connected; an allocated one when the host did).
    pub local_port: u32,
    /// The guest end's port.
    pub peer_port: u32,
    guest_cid: u64,
    state: State,
    deadline: Option<Instant>,
    /// SHUTDOWN flags the guest sent, ORed (§5.10.6.4: they cannot be undone).
    guest_shut: u32,
    /// The host stream was shut for writing (the guest sends no more).
    host_write_shut: bool,
    /// The host stream reached EOF: the host sends no more.
    host_eof: bool,
    /// The host hung up (EPOLLHUP/ERR): read what is left, write nothing.
    host_hup: bool,
    /// Data may be waiting in the host stream.
    host_readable: bool,
    tx: TxBuf,
    /// Bytes at the front of `tx` that are kiln's own (the `OK <port>`
    /// line), not guest data: they do not count in `fwd_cnt`.
    tx_own: usize,
    /// Guest bytes received (what the guest counts as sent).
    recv_cnt: Wrapping<u32>,
    /// Guest bytes passed on to the host stream (our `fwd_cnt`).
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    fwd_told: Wrapping<u32>,
    /// The guest's receive buffer and how much of what we sent it consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Host bytes sent to the guest.
    sent: Wrapping<u32>,
    /// A CREDIT_REQUEST is out and unanswered: don't ask again.
    credit_requested: bool,
    owed: u8,
    shutdown_flags: u32,
    /// In the muxer's RX queue.
    pub queued: bool,
}

impl Conn {
    fn new(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        guest_cid: u64,
        state: State,
    ) -> Self {
        Self {
            stream,
            local_port,
            peer_port,
            guest_cid,
            state,
            deadline: None,
            guest_shut: 0,
            host_write_shut: false,
            host_eof: false,
            host_hup: false,
            host_readable: false,
            tx: TxBuf::default(),
            tx_own: 0,
            recv_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            fwd_told: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            sent: Wrapping(0),
            credit_requested: false,
            owed: 0,
            shutdown_flags: 0,
            queued: false,
        }
    }

    /// The guest connected (its REQUEST `hdr`) and the host accepted on
    /// `stream`: the guest is owed a RESPONSE.
    pub fn guest_initiated(stream: UnixStream, hdr: &Header, guest_cid: u64) -> Self {
        let mut c = Self::new(
            stream,
            hdr.dst_port,
            hdr.src_port,
            guest_cid,
            State::Established,
        );
        c.update_peer_credit(hdr);
        c.owed = owed::RESPONSE;
        c
    }

    /// A host client asked (CONNECT) for the guest's `peer_port`; the guest
    /// is owed a REQUEST.
    pub fn host_initiated(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        guest_cid: u64,
    ) -> Self {
        let mut c = Self::new(stream, local_port, peer_port, guest_cid, State::Connecting);
        c.owed = owed::REQUEST;
        c.deadline = Some(Instant::now() + PEER_TIMEOUT);
        c
    }

    /// When the peer's time to answer runs out, if it is waited for.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// What the host stream should be watched for; None: not at all (it
    /// hung up, and epoll would report that forever).
    pub fn interest(&self) -> Option<EventSet> {
        if self.host_hup {
            return None;
        }
        let mut set = EventSet::empty();
        if !self.host_readable && self.wants_host_data() && self.peer_credit() > 0 {
            set |= EventSet::IN;
        }
        if !self.tx.is_empty() {
            set |= EventSet::OUT;
        }
        Some(set)
    }

    /// Whether reading the host stream could be useful now.
    fn wants_host_data(&self) -> bool {
        self.state == State::Established && !self.host_eof && self.guest_shut & SHUTDOWN_RCV == 0
    }

    /// Room left in the guest's receive buffer (0 if it claims to have
    /// consumed more than was sent: hostile or confused).
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.sent - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
    }

    /// Whether the guest is owed a packet that can be produced now.
    pub fn has_rx_work(&self) -> bool {
        self.owed != 0 || self.can_send_data()
    }

    fn can_send_data(&self) -> bool {
        self.host_readable
            && self.wants_host_data()
            && (self.peer_credit() > 0 || !self.credit_requested)
    }

    /// The host stream is ready (`events` from epoll).
    pub fn on_host_event(&mut self, events: EventSet) -> Verdict {
        if events.intersects(EventSet::HANG_UP | EventSet::ERROR) && !self.host_hup {
            // Read what is left (until EOF), write nothing more.
            self.host_hup = true;
            self.host_readable = true;
            self.tx = TxBuf::default();
            if self.state != State::Established {
                return Verdict::Reset;
            }
            if self.host_eof {
                // The host had already stopped sending: now it is gone.
                self.close_both();
            }
        }
        if events.contains(EventSet::IN) {
            self.host_readable = true;
        }
        if events.contains(EventSet::OUT) {
            return self.flush_tx();
        }
        Verdict::Keep
    }

    /// The host is gone: tell the guest neither side sends any more, and
    /// give it [`PEER_TIMEOUT`] to reset.
    fn close_both(&mut self) {
        self.state = State::Closing;
        self.deadline = Some(Instant::now() + PEER_TIMEOUT);
        self.shutdown_flags = SHUTDOWN_BOTH;
        self.owed |= owed::SHUTDOWN;
    }

    /// Writes buffered guest data to the host stream.
    fn flush_tx(&mut self) -> Verdict {
        match self.tx.flush(&mut self.stream) {
            Ok(n) => {
                let own = n.min(self.tx_own);
                self.tx_own -= own;
                self.forwarded(n - own);
                self.after_tx_progress()
            }
            Err(_) => Verdict::Reset,
        }
    }

    /// `n` more guest bytes reached the host stream.
    fn forwarded(&mut self, n: usize) {
        self.fwd_cnt += Wrapping(u32::try_from(n).unwrap_or(u32::MAX));
        // Tell the guest about the room once it believes the buffer is more
        // than half full (every packet we send it carries fwd_cnt anyway).
        let believed_used = (self.recv_cnt - self.fwd_told).0;
        if self.fwd_cnt != self.fwd_told && believed_used > CONN_BUF_SIZE / 2 {
            self.owed |= owed::CREDIT_UPDATE;
        }
    }

    /// After the TX buffer drained a little: finish a shutdown that waited
    /// for it.
    fn after_tx_progress(&mut self) -> Verdict {
        if !self.tx.is_empty() {
            return Verdict::Keep;
        }
        if self.guest_shut & SHUTDOWN_SEND != 0 && !self.host_write_shut {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        if self.guest_shut == SHUTDOWN_BOTH {
            // Both directions are done and everything was delivered.
            return Verdict::Reset;
        }
        Verdict::Keep
    }

    /// A packet from the guest for this connection. `data` is the payload
    /// of an RW packet (exactly `hdr.len` bytes).
    pub fn on_guest_packet<B: BitmapSlice>(
        &mut self,
        hdr: &Header,
        data: Option<&VolatileSlice<'_, B>>,
    ) -> Verdict {
        self.update_peer_credit(hdr);
        match (self.state, hdr.op) {
            (_, OP_RST) => Verdict::Drop,
            (State::Connecting, OP_RESPONSE) => {
                self.state = State::Established;
                self.deadline = None;
                // Firecracker's acknowledgement to the host client.
                let ok = format!("OK {}\n", self.local_port);
                self.tx.push_bytes(ok.as_bytes());
                self.tx_own = ok.len();
                self.flush_tx()
            }
            (State::Connecting, _) => Verdict::Reset,
            (_, OP_RW) => self.guest_data(hdr, data),
            (_, OP_SHUTDOWN) => {
                self.guest_shut |= hdr.flags & SHUTDOWN_BOTH;
                if self.guest_shut == SHUTDOWN_BOTH && !self.tx.is_empty() {
                    self.deadline = Some(Instant::now() + PEER_TIMEOUT);
                }
                self.after_tx_progress()
            }
            (_, OP_CREDIT_UPDATE) => Verdict::Keep,
            (_, OP_CREDIT_REQUEST) => {
                self.owed |= owed::CREDIT_UPDATE;
                Verdict::Keep
            }
            // REQUEST or RESPONSE on a connected socket, or an unknown op.
            _ => Verdict::Reset,
        }
    }

    fn guest_data<B: BitmapSlice>(
        &mut self,
        hdr: &Header,
        data: Option<&VolatileSlice<'_, B>>,
    ) -> Verdict {
        if self.guest_shut & SHUTDOWN_SEND != 0 {
            // It promised to send no more.
            return Verdict::Reset;
        }
        let Some(data) = data.filter(|_| hdr.len > 0) else {
            return Verdict::Keep;
        };
        let len = data.len();
        self.recv_cnt += Wrapping(hdr.len);
        if self.tx.len().saturating_add(len) > CONN_BUF_SIZE as usize {
            // More than the credit it was given.
            return Verdict::Reset;
        }
        if self.host_hup || self.state == State::Closing {
            // Nobody will read it: account for it so credit keeps flowing.
            self.forwarded(len);
            return Verdict::Keep;
        }
        let mut written = 0;
        if self.tx.is_empty() {
            match self.stream.write_volatile(data) {
                Ok(n) => written = n,
                Err(e) if would_block(&e) => {}
                Err(_) => return Verdict::Reset,
            }
        }
        if written < len {
            match data.offset(written) {
                Ok(rest) => self.tx.push_slice(&rest),
                Err(_) => return Verdict::Reset,
            }
        }
        self.forwarded(written);
        Verdict::Keep
    }

    /// Fills `hdr` (and `data`, for RW) with the next packet owed to the
    /// guest.
    pub fn produce<B: BitmapSlice>(
        &mut self,
        hdr: &mut Header,
        data: Option<&VolatileSlice<'_, B>>,
    ) -> Produced {
        *hdr = Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            type_: TYPE_STREAM,
            ..Header::default()
        };
        let take = |owed: &mut u8, bit: u8| {
            let had = *owed & bit != 0;
            *owed &= !bit;
            had
        };
        let mut len = 0;
        if take(&mut self.owed, owed::REQUEST) {
            hdr.op = OP_REQUEST;
        } else if take(&mut self.owed, owed::RESPONSE) {
            hdr.op = OP_RESPONSE;
        } else if let Some(n) = match self.produce_data(hdr, data) {
            Ok(n) => n,
            Err(HostFailed) => return Produced::Failed,
        } {
            len = n;
        } else if take(&mut self.owed, owed::SHUTDOWN) {
            hdr.op = OP_SHUTDOWN;
            hdr.flags = self.shutdown_flags;
        } else if take(&mut self.owed, owed::CREDIT_UPDATE) {
            hdr.op = OP_CREDIT_UPDATE;
        } else if take(&mut self.owed, owed::CREDIT_REQUEST) {
            hdr.op = OP_CREDIT_REQUEST;
        } else {
            return Produced::Idle;
        }
        hdr.buf_alloc = CONN_BUF_SIZE;
        hdr.fwd_cnt = self.fwd_cnt.0;
        self.fwd_told = self.fwd_cnt;
        Produced::Packet(len)
    }

    /// An RW packet from the host stream, or the SHUTDOWN/CREDIT_REQUEST
    /// that takes its place. Ok(None): no data now.
    fn produce_data<B: BitmapSlice>(
        &mut self,
        hdr: &mut Header,
        data: Option<&VolatileSlice<'_, B>>,
    ) -> Result<Option<u32>, HostFailed> {
        if !self.can_send_data() {
            return Ok(None);
        }
        let credit = self.peer_credit();
        if credit == 0 {
            self.credit_requested = true;
            self.owed |= owed::CREDIT_REQUEST;
            return Ok(None);
        }
        let Some(buf) = data else {
            return Ok(None);
        };
        let max = buf.len().min(credit as usize).min(MAX_PKT_DATA as usize);
        let Ok(mut dst) = buf.subslice(0, max) else {
            return Ok(None);
        };
        match self.stream.read_volatile(&mut dst) {
            Ok(0) => {
                self.host_eof = true;
                self.host_readable = false;
                // A hang-up ends both directions; EOF alone only the host's.
                if self.host_hup {
                    self.close_both();
                } else {
                    self.shutdown_flags = SHUTDOWN_SEND;
                    self.owed |= owed::SHUTDOWN;
                }
                Ok(None)
            }
            Ok(n) => {
                let n = u32::try_from(n).map_err(|_| HostFailed)?;
                hdr.op = OP_RW;
                hdr.len = n;
                self.sent += Wrapping(n);
                Ok(Some(n))
            }
            Err(e) if would_block(&e) => {
                self.host_readable = false;
                Ok(None)
            }
            Err(_) => Err(HostFailed),
        }
    }
}

/// Reading the host stream failed.
struct HostFailed;
