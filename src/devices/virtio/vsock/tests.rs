//! vsock tests. The muxer is driven with packet headers and payloads in
//! guest memory, its fds watched by a real epoll, against real host UNIX
//! sockets: the protocol both ways, flow control, and every hostile case.
//! `device_tests` drives the whole device through its virtio queues.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use event_manager::EventSet;
use vm_memory::{Bytes, GuestAddress, GuestMemory as _};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent};

use super::conn::{CONN_BUF_SIZE, MAX_PKT_DATA};
use super::muxer::{parse_connect, Muxer, MAX_CONNECTIONS, MAX_CONTROL_PACKETS};
use super::packet::*;
use crate::devices::virtio::test_utils::guest_mem;
use crate::devices::virtio::{GuestMem, Sources};

#[path = "device_tests.rs"]
mod device_tests;

pub const GUEST_CID: u64 = 3;
const TX_DATA: u64 = 0x4_0000;
const RX_DATA: u64 = 0x8_0000;
/// A guest receive buffer, as Linux 6.1 posts them.
const RX_BUF: usize = 4096;

/// A scratch directory for sockets, removed on drop.
pub struct Dir(pub PathBuf);

impl Dir {
    pub fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("kiln-vsock-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }
    pub fn sock(&self) -> PathBuf {
        self.0.join("v.sock")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// [`Sources`] on a real epoll.
pub struct Poll(pub Epoll);

impl Sources for Poll {
    fn add(&mut self, fd: RawFd, token: u32, events: EventSet) -> std::io::Result<()> {
        self.0.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(events, u64::from(token)),
        )
    }
    fn modify(&mut self, fd: RawFd, token: u32, events: EventSet) -> std::io::Result<()> {
        self.0.ctl(
            ControlOperation::Modify,
            fd,
            EpollEvent::new(events, u64::from(token)),
        )
    }
    fn remove(&mut self, fd: RawFd) -> std::io::Result<()> {
        self.0
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }
}

struct Harness {
    mux: Muxer,
    poll: Poll,
    mem: GuestMem,
    dir: Dir,
}

fn guest_hdr(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 256 * 1024,
        ..Header::default()
    }
}

impl Harness {
    fn new(name: &str) -> Self {
        let dir = Dir::new(name);
        let mut mux = Muxer::new(GUEST_CID, &dir.sock()).unwrap();
        mux.set_active(true);
        let mut h = Self {
            mux,
            poll: Poll(Epoll::new().unwrap()),
            mem: guest_mem(),
            dir,
        };
        h.mux.sync(&mut h.poll);
        h
    }

    /// The guest sends `hdr` with `data` as its payload.
    fn send(&mut self, mut hdr: Header, data: &[u8]) {
        hdr.len = u32::try_from(data.len()).unwrap();
        self.mem.write_slice(data, GuestAddress(TX_DATA)).unwrap();
        let slice = self
            .mem
            .get_slice(GuestAddress(TX_DATA), data.len())
            .unwrap();
        let data = (!data.is_empty()).then_some(&slice);
        self.mux.guest_packet(&hdr, data);
        self.mux.sync(&mut self.poll);
    }

    /// The next packet for the guest, into a receive buffer of `RX_BUF`.
    fn recv(&mut self) -> Option<(Header, Vec<u8>)> {
        let slice = self.mem.get_slice(GuestAddress(RX_DATA), RX_BUF).unwrap();
        let mut hdr = Header::default();
        let len = self.mux.next_rx(&mut hdr, Some(&slice))?;
        hdr.len = len;
        let mut data = vec![0u8; len as usize];
        self.mem
            .read_slice(&mut data, GuestAddress(RX_DATA))
            .unwrap();
        self.mux.sync(&mut self.poll);
        Some((hdr, data))
    }

    /// Dispatches what epoll reports, for up to `ms` milliseconds at first.
    fn pump(&mut self, ms: i32) -> usize {
        let mut events = [EpollEvent::default(); 32];
        let n = self.poll.0.wait(ms, &mut events).unwrap();
        for e in &events[..n] {
            let token = u32::try_from(e.data()).unwrap();
            self.mux.host_event(token, e.event_set());
        }
        self.mux.sync(&mut self.poll);
        n
    }

    /// Pumps until the guest is owed a packet, and returns it.
    fn expect_rx(&mut self) -> (Header, Vec<u8>) {
        for _ in 0..100 {
            if let Some(p) = self.recv() {
                return p;
            }
            self.pump(20);
        }
        panic!("no packet for the guest");
    }

    fn no_rx(&mut self) {
        self.pump(20);
        assert_eq!(self.recv().map(|(h, _)| h), None);
    }

    /// A host listener at `<uds_path>_<port>`.
    fn host_listener(&self, port: u32) -> UnixListener {
        let mut p = self.dir.sock().into_os_string();
        p.push(format!("_{port}"));
        UnixListener::bind(PathBuf::from(p)).unwrap()
    }

    /// A host client that connected with `CONNECT <port>`, and the guest's
    /// view: the REQUEST it received.
    fn host_connect(&mut self, port: u32) -> (UnixStream, Header) {
        let mut c = UnixStream::connect(self.dir.sock()).unwrap();
        c.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        let (req, _) = self.expect_rx();
        assert_eq!(req.op, OP_REQUEST);
        (c, req)
    }

    /// A guest-initiated connection from guest port `gport` to host port
    /// `port`, accepted on the host.
    fn guest_connect(&mut self, l: &UnixListener, gport: u32, port: u32) -> UnixStream {
        self.send(guest_hdr(OP_REQUEST, gport, port), &[]);
        let (resp, _) = self.expect_rx();
        assert_eq!(
            (resp.op, resp.src_port, resp.dst_port, resp.dst_cid),
            (OP_RESPONSE, port, gport, GUEST_CID)
        );
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }
}

/// Whether the peer closed `s`: EOF, or a reset when it dropped unread data.
fn closed(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    match s.read(&mut [0u8; 8]) {
        Ok(0) => true,
        Err(e) => e.kind() == ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| {
            u8::try_from(i & 0xff)
                .unwrap()
                .wrapping_mul(31)
                .wrapping_add(seed)
        })
        .collect()
}

#[test]
fn connect_line_parsing() {
    assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
    assert_eq!(parse_connect(b"CONNECT 4294967295\r"), Some(u32::MAX));
    for bad in [
        &b"connect 52"[..],
        b"CONNECT",
        b"CONNECT x",
        b"CONNECT 52 53",
        b"CONNECT -1",
        b"\xff",
    ] {
        assert_eq!(parse_connect(bad), None, "{bad:?}");
    }
}

#[test]
fn host_initiated_connection_carries_data_both_ways() {
    let mut h = Harness::new("host-init");
    let (mut client, req) = h.host_connect(52);
    assert_eq!(
        (req.src_cid, req.dst_cid, req.dst_port),
        (HOST_CID, GUEST_CID, 52)
    );
    assert!(req.src_port >= 1 << 30);
    assert_eq!(req.buf_alloc, CONN_BUF_SIZE);
    // The guest's listener accepts.
    h.send(guest_hdr(OP_RESPONSE, 52, req.src_port), &[]);
    let mut ok = [0u8; 32];
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let n = client.read(&mut ok).unwrap();
    assert_eq!(&ok[..n], format!("OK {}\n", req.src_port).as_bytes());
    // guest -> host
    h.send(guest_hdr(OP_RW, 52, req.src_port), b"from the guest");
    let mut got = [0u8; 14];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"from the guest");
    // host -> guest; fwd_cnt counts the guest's bytes only (not the OK
    // line, or the guest would believe it has negative credit).
    client.write_all(b"from the host").unwrap();
    let (rw, data) = h.expect_rx();
    assert_eq!((rw.op, rw.src_port, rw.dst_port), (OP_RW, req.src_port, 52));
    assert_eq!(data, b"from the host");
    assert_eq!(rw.fwd_cnt, 14);
}

#[test]
fn host_connect_without_guest_listener_is_closed() {
    let mut h = Harness::new("host-nolisten");
    let (mut client, req) = h.host_connect(52);
    // Linux answers a REQUEST to a port nobody listens on with a RST.
    h.send(guest_hdr(OP_RST, 52, req.src_port), &[]);
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(client.read(&mut [0u8; 8]).unwrap(), 0, "closed: EOF");
    assert_eq!(h.mux.connection_count(), 0);
    h.no_rx();
}

#[test]
fn unanswered_host_connect_times_out() {
    let mut h = Harness::new("host-timeout");
    let (mut client, req) = h.host_connect(52);
    // The guest never answers: after PEER_TIMEOUT the muxer gives up.
    let start = std::time::Instant::now();
    let (rst, _) = h.expect_rx_within(Duration::from_secs(5));
    assert!(
        start.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(
        (rst.op, rst.src_port, rst.dst_port),
        (OP_RST, req.src_port, 52)
    );
    client
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    assert_eq!(client.read(&mut [0u8; 8]).unwrap(), 0);
}

impl Harness {
    fn expect_rx_within(&mut self, limit: Duration) -> (Header, Vec<u8>) {
        let start = std::time::Instant::now();
        while start.elapsed() < limit {
            if let Some(p) = self.recv() {
                return p;
            }
            self.pump(100);
        }
        panic!("no packet for the guest within {limit:?}");
    }
}

#[test]
fn bad_connect_lines_close_the_client() {
    let mut h = Harness::new("bad-lines");
    for line in [
        &b"HELLO\n"[..],
        b"CONNECT abc\n",
        &[b'x'; 40][..],
        b"CONNECT 5",
    ] {
        let mut c = UnixStream::connect(h.dir.sock()).unwrap();
        c.write_all(line).unwrap();
        if !line.ends_with(b"\n") && line.len() < 32 {
            // An unfinished line then EOF.
            c.shutdown(std::net::Shutdown::Write).unwrap();
        }
        for _ in 0..5 {
            h.pump(20);
        }
        assert!(closed(&mut c), "{line:?}");
    }
    assert_eq!(h.mux.connection_count(), 0);
    h.no_rx();
}

#[test]
fn guest_initiated_connection_and_absent_host_socket() {
    let mut h = Harness::new("guest-init");
    let l = h.host_listener(1234);
    let mut host = h.guest_connect(&l, 5000, 1234);
    h.send(guest_hdr(OP_RW, 5000, 1234), b"ping");
    let mut b = [0u8; 4];
    host.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
    host.write_all(b"pong").unwrap();
    let (rw, data) = h.expect_rx();
    assert_eq!((rw.op, data.as_slice()), (OP_RW, &b"pong"[..]));

    // Nothing listens at <uds_path>_99: the guest gets a RST.
    h.send(guest_hdr(OP_REQUEST, 5001, 99), &[]);
    let (rst, _) = h.expect_rx();
    assert_eq!((rst.op, rst.src_port, rst.dst_port), (OP_RST, 99, 5001));
    assert_eq!(h.mux.connection_count(), 1);
}

#[test]
fn slow_host_reader_bounds_the_buffer_and_credit_overflow_resets() {
    let mut h = Harness::new("credit-tx");
    let l = h.host_listener(7);
    let mut host = h.guest_connect(&l, 5000, 7);
    // The host does not read. The socket takes what it can, then kiln
    // buffers up to the guest's credit; a guest sending on regardless
    // (ignoring credit) is reset.
    let chunk = pattern(MAX_PKT_DATA as usize, 1);
    let mut sent = 0usize;
    while h.mux.connection_count() == 1 && sent < 16 << 20 {
        h.send(guest_hdr(OP_RW, 5000, 7), &chunk);
        sent += chunk.len();
    }
    // Either way the muxer never held more than the credit, and a guest
    // over its credit was reset.
    assert_eq!(h.mux.connection_count(), 0, "credit overflow must reset");
    let (rst, _) = h.expect_rx();
    assert_eq!(rst.op, OP_RST);
    // What the host can read is at most what fit in the credit + socket.
    host.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut total = 0;
    let mut buf = vec![0u8; 65536];
    while let Ok(n) = host.read(&mut buf) {
        if n == 0 {
            break;
        }
        total += n;
    }
    assert!(total < sent, "{total} < {sent}");
}

#[test]
fn buffered_guest_data_drains_when_the_host_reads_and_credit_is_updated() {
    let mut h = Harness::new("credit-drain");
    let l = h.host_listener(7);
    let mut host = h.guest_connect(&l, 5000, 7);
    // Fill the socket and part of kiln's buffer without overflowing.
    let data = pattern(600 * 1024, 9);
    let mut offset = 0;
    let mut received = Vec::new();
    let mut fwd_seen = 0u32;
    let mut buf = vec![0u8; 65536];
    host.set_nonblocking(true).unwrap();
    while received.len() < data.len() {
        // The guest sends what its view of the credit allows.
        let in_flight = u32::try_from(offset).unwrap() - fwd_seen;
        let credit = CONN_BUF_SIZE - in_flight.min(CONN_BUF_SIZE);
        let n = (credit as usize)
            .min(MAX_PKT_DATA as usize)
            .min(data.len() - offset);
        if n > 0 {
            h.send(guest_hdr(OP_RW, 5000, 7), &data[offset..offset + n]);
            offset += n;
        }
        // The host reads a little; kiln flushes and tells the guest.
        match host.read(&mut buf) {
            Ok(k) => received.extend_from_slice(&buf[..k]),
            Err(e) => assert_eq!(e.kind(), ErrorKind::WouldBlock),
        }
        h.pump(5);
        while let Some((p, _)) = h.recv() {
            assert!(matches!(p.op, OP_CREDIT_UPDATE), "{p:?}");
            fwd_seen = p.fwd_cnt;
        }
        assert_eq!(
            h.mux.connection_count(),
            1,
            "a conforming guest is never reset"
        );
    }
    assert!(received == data, "data arrives intact and in order");
    assert!(fwd_seen > 0);
}

#[test]
fn host_writer_is_held_to_the_guest_credit() {
    let mut h = Harness::new("credit-rx");
    let l = h.host_listener(7);
    // The guest has 8 KiB of receive buffer.
    let mut req = guest_hdr(OP_REQUEST, 5000, 7);
    req.buf_alloc = 8192;
    h.send(req, &[]);
    assert_eq!(h.expect_rx().0.op, OP_RESPONSE);
    let (mut host, _) = l.accept().unwrap();
    host.write_all(&pattern(64 * 1024, 3)).unwrap();
    let mut got = 0;
    loop {
        let (p, data) = h.expect_rx();
        if p.op == OP_CREDIT_REQUEST {
            break;
        }
        assert_eq!(p.op, OP_RW);
        got += data.len();
    }
    assert_eq!(got, 8192, "never more than the guest's credit");
    h.no_rx();
    // The guest consumed 4 KiB and says so: 4 KiB more flow.
    let mut upd = guest_hdr(OP_CREDIT_UPDATE, 5000, 7);
    upd.buf_alloc = 8192;
    upd.fwd_cnt = 4096;
    h.send(upd, &[]);
    let mut more = 0;
    while let Some((p, data)) = h.recv() {
        if p.op == OP_RW {
            more += data.len();
        }
    }
    assert_eq!(more, 4096);
}

#[test]
fn shutdowns_both_ways() {
    let mut h = Harness::new("shutdown");
    let l = h.host_listener(7);
    let mut host = h.guest_connect(&l, 5000, 7);
    // The guest shuts its sending side: the host reads EOF, can still write.
    let mut shut = guest_hdr(OP_SHUTDOWN, 5000, 7);
    shut.flags = SHUTDOWN_SEND;
    h.send(shut, &[]);
    assert_eq!(host.read(&mut [0u8; 4]).unwrap(), 0);
    host.write_all(b"reply").unwrap();
    let (p, data) = h.expect_rx();
    assert_eq!((p.op, data.as_slice()), (OP_RW, &b"reply"[..]));
    // Data after its own SHUTDOWN_SEND is a violation.
    h.send(guest_hdr(OP_RW, 5000, 7), b"late");
    assert_eq!(h.expect_rx().0.op, OP_RST);
    assert_eq!(h.mux.connection_count(), 0);

    // The host half-closes: the guest is told the host sends no more, and
    // its own data still reaches the host.
    let mut host = h.guest_connect(&l, 5001, 7);
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let (p, _) = h.expect_rx();
    assert_eq!((p.op, p.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
    h.send(guest_hdr(OP_RW, 5001, 7), b"answer");
    let mut b = [0u8; 6];
    host.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"answer");
    // The guest closes: both flags, kiln answers RST and closes the host.
    let mut close = guest_hdr(OP_SHUTDOWN, 5001, 7);
    close.flags = SHUTDOWN_BOTH;
    h.send(close, &[]);
    assert_eq!(h.expect_rx().0.op, OP_RST);
    assert_eq!(host.read(&mut [0u8; 4]).unwrap(), 0);

    // The host closes: the guest is told both directions are shut.
    let host = h.guest_connect(&l, 5002, 7);
    drop(host);
    let (p, _) = h.expect_rx();
    assert_eq!((p.op, p.flags), (OP_SHUTDOWN, SHUTDOWN_BOTH));
    h.send(guest_hdr(OP_RST, 5002, 7), &[]);
    assert_eq!(h.mux.connection_count(), 0);
}

#[test]
fn hostile_packets_get_resets_or_nothing() {
    let mut h = Harness::new("hostile");
    let l = h.host_listener(7);
    let _host = h.guest_connect(&l, 5000, 7);

    // No connection: RW, SHUTDOWN, CREDIT_*, RESPONSE, unknown ops -> RST.
    for op in [
        OP_RW,
        OP_SHUTDOWN,
        OP_CREDIT_UPDATE,
        OP_CREDIT_REQUEST,
        OP_RESPONSE,
        0,
        8,
        0xffff,
    ] {
        h.send(guest_hdr(op, 6000, 7), &[]);
        let (p, _) = h.expect_rx();
        assert_eq!((p.op, p.dst_port, p.src_port), (OP_RST, 6000, 7), "op {op}");
    }
    // A RST for no connection: nothing.
    h.send(guest_hdr(OP_RST, 6000, 7), &[]);
    h.no_rx();
    // Not from the guest's CID: dropped without an answer.
    let mut spoofed = guest_hdr(OP_REQUEST, 6000, 7);
    spoofed.src_cid = 4;
    h.send(spoofed, &[]);
    h.no_rx();
    // To another CID, or not a stream: RST.
    let mut other = guest_hdr(OP_REQUEST, 6000, 7);
    other.dst_cid = 5;
    h.send(other, &[]);
    assert_eq!(h.expect_rx().0.op, OP_RST);
    let mut seq = guest_hdr(OP_REQUEST, 6000, 7);
    seq.type_ = 2;
    h.send(seq, &[]);
    assert_eq!(h.expect_rx().0.op, OP_RST);
    assert_eq!(h.mux.connection_count(), 1);

    // On the live connection, an unknown op, a second REQUEST or a
    // RESPONSE each end it with a RST.
    for op in [9u16, OP_REQUEST, OP_RESPONSE] {
        let _host = if h.mux.connection_count() == 0 {
            Some(h.guest_connect(&l, 5000, 7))
        } else {
            None
        };
        h.send(guest_hdr(op, 5000, 7), &[]);
        assert_eq!(h.expect_rx().0.op, OP_RST, "op {op}");
        assert_eq!(h.mux.connection_count(), 0, "op {op}");
    }
    // A guest claiming it consumed more than was sent gets no data, and
    // nothing breaks; a sane update restores the flow.
    let mut host = h.guest_connect(&l, 5000, 7);
    let mut upd = guest_hdr(OP_CREDIT_UPDATE, 5000, 7);
    upd.fwd_cnt = 1000;
    h.send(upd, &[]);
    host.write_all(b"x").unwrap();
    h.no_rx();
    h.send(guest_hdr(OP_CREDIT_UPDATE, 5000, 7), &[]);
    let (p, data) = h.expect_rx();
    assert_eq!((p.op, data.as_slice()), (OP_RW, &b"x"[..]));
    assert!(h.mux.counters().refused_packets >= 10);
}

#[test]
fn thousands_of_connections_are_capped() {
    let mut h = Harness::new("cap");
    let _l = h.host_listener(7);
    let (mut responses, mut resets) = (0, 0);
    for port in 0..2000u32 {
        h.send(guest_hdr(OP_REQUEST, 10_000 + port, 7), &[]);
        while let Some((p, _)) = h.recv() {
            match p.op {
                OP_RESPONSE => responses += 1,
                OP_RST => resets += 1,
                op => panic!("unexpected op {op}"),
            }
        }
    }
    assert_eq!(h.mux.connection_count(), MAX_CONNECTIONS);
    assert_eq!(responses, MAX_CONNECTIONS);
    assert_eq!(resets, 2000 - MAX_CONNECTIONS);
    // Host clients past the cap are closed at once.
    let mut c = UnixStream::connect(h.dir.sock()).unwrap();
    h.pump(20);
    assert!(closed(&mut c));
    assert!(h.mux.counters().refused_at_cap > 0);
}

#[test]
fn a_guest_that_never_reads_cannot_grow_the_reset_queue() {
    let mut h = Harness::new("flood");
    for port in 0..3 * u32::try_from(MAX_CONTROL_PACKETS).unwrap() {
        h.send(guest_hdr(OP_RW, port, 7), b"junk");
    }
    let c = h.mux.counters();
    assert_eq!(c.dropped_control, 2 * MAX_CONTROL_PACKETS as u64);
    let mut n = 0;
    while h.recv().is_some() {
        n += 1;
    }
    assert_eq!(n, MAX_CONTROL_PACKETS);
}

#[test]
fn inactive_device_refuses_host_clients_and_reset_closes_everything() {
    let mut h = Harness::new("reset");
    let l = h.host_listener(7);
    let mut a = h.guest_connect(&l, 5000, 7);
    let (mut b, _) = h.host_connect(52);
    assert_eq!(h.mux.connection_count(), 2);
    h.mux.set_active(false);
    h.mux.sync(&mut h.poll);
    for s in [&mut a, &mut b] {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        assert_eq!(s.read(&mut [0u8; 1]).unwrap(), 0);
    }
    assert_eq!(h.mux.connection_count(), 0);
    h.no_rx();
    // While inactive, a host client is closed at once.
    let mut c = UnixStream::connect(h.dir.sock()).unwrap();
    h.pump(20);
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert_eq!(c.read(&mut [0u8; 1]).unwrap(), 0);
}

#[test]
fn socket_file_is_removed_when_the_muxer_goes() {
    let h = Harness::new("cleanup");
    let sock = h.dir.sock();
    assert!(sock.exists());
    drop(h.mux);
    assert!(!Path::new(&sock).exists());
}
