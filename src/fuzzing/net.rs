//! virtio-net under a hostile driver and a hostile host: the device behind
//! kiln's mmio transport on a fake backend ([`Host`]) that hands it
//! fuzzer-made frames (any header, any length, errors when told) and
//! records what it sends, and may push back on writes as a stream socket
//! does (`WouldBlock`: the frame waits in the guest's queue until the fd
//! is writable and what the backend holds is flushed); the guest's frames in fuzzer-chosen transmit
//! chains, its receive buffers, and backend readiness events as the event
//! loop delivers them (only while the device watches the backend).
//!
//! Beyond the guest-memory checks every device harness makes
//! ([`Rings::checked`]), the device must keep its promises to the host:
//! every frame it hands the backend is at least a header and an Ethernet
//! header long, no longer than the MTU allows (or 64 KiB when segmentation
//! was accepted), with a header the accepted features allow (virtio 1.2
//! §5.1.6.2) and the fields it does not use cleared; the offloads it sets
//! on the backend are ones the guest accepted, none while inactive; it
//! adds its fd to the event loop at most once and removes only what it
//! added.
//!
//! Only the device's public surface is used: [`Net::new`], the [`Backend`]
//! trait and [`VirtioDevice`](crate::devices::virtio::VirtioDevice).

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use event_manager::EventSet;

use super::input::{Input, Seed};
use super::memory;
use super::virtq::{self, Desc, Rings, Transported, F_WRITE};
use crate::devices::bus::lock;
use crate::devices::virtio::features::COMMON;
use crate::devices::virtio::net::backend::{Backend, VNET_HDR_LEN};
use crate::devices::virtio::net::tap::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};
use crate::devices::virtio::net::{
    Net, NetOptions, OFFLOADS, RXQ, TXQ, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU,
};
use crate::devices::virtio::Sources;

const MAX_OPS: usize = 256;
/// Frames the fake backend holds for the guest, at most.
const MAX_INCOMING: usize = 64;
/// The backend's fd: never a real one (the event loop here is [`Watch`]).
const BACKEND_FD: RawFd = 1 << 20;
/// An Ethernet header, and an 802.1Q tag on top of the MTU.
const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
/// The largest segmented frame: a 64 KiB IP packet behind the headers.
const MAX_GSO_FRAME: usize = ETH_HLEN + VLAN_HLEN + 65535;
/// §5.1.6 `virtio_net_hdr`: `flags` and `gso_type` values.
const NEEDS_CSUM: u8 = 1;
const DATA_VALID: u8 = 2;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;

/// The host side of the fake backend, shared with the harness.
#[derive(Default)]
struct Host {
    /// Frames waiting for the guest, each behind its header.
    incoming: VecDeque<Vec<u8>>,
    /// The next read, write, offload change fails so (once each).
    read_error: Option<io::ErrorKind>,
    write_error: Option<io::ErrorKind>,
    flush_error: Option<io::ErrorKind>,
    offload_error: bool,
    /// Frames the device wrote, checked and cleared after each step.
    sent: Vec<Vec<u8>>,
    /// The offloads last set, and whether a change failed since (the
    /// backend keeps what it had: the device cannot be held to it).
    offload: u32,
    offload_stale: bool,
}

struct FakeBackend {
    host: Arc<Mutex<Host>>,
    offloads: bool,
    backpressure: bool,
}

fn host(h: &Mutex<Host>) -> MutexGuard<'_, Host> {
    h.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Backend for FakeBackend {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut h = host(&self.host);
        if let Some(kind) = h.read_error.take() {
            return Err(kind.into());
        }
        let Some(frame) = h.incoming.pop_front() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        let mut h = host(&self.host);
        h.sent.push(frame.to_vec());
        match h.write_error.take() {
            Some(kind) => Err(kind.into()),
            None => Ok(()),
        }
    }

    fn fd(&self) -> RawFd {
        BACKEND_FD
    }

    fn offloads(&self) -> bool {
        self.offloads
    }

    fn backpressure(&self) -> bool {
        self.backpressure
    }

    fn flush(&mut self) -> io::Result<()> {
        match host(&self.host).flush_error.take() {
            Some(kind) => Err(kind.into()),
            None => Ok(()),
        }
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        let mut h = host(&self.host);
        if std::mem::take(&mut h.offload_error) {
            h.offload_stale = true;
            return Err(io::ErrorKind::InvalidInput.into());
        }
        h.offload = flags;
        h.offload_stale = false;
        Ok(())
    }
}

/// The event loop's registrations: whether the backend's fd is watched,
/// and the next call fails when told.
#[derive(Default)]
struct Watch {
    watched: bool,
    fail_next: bool,
}

impl Watch {
    fn call(&mut self, fd: RawFd, what: &str) -> io::Result<()> {
        assert_eq!(fd, BACKEND_FD, "{what} an fd that is not the backend's");
        if std::mem::take(&mut self.fail_next) {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        Ok(())
    }
}

impl Sources for Watch {
    fn add(&mut self, fd: RawFd, _: u32, _: EventSet) -> io::Result<()> {
        assert!(!self.watched, "the backend's fd added twice");
        self.call(fd, "added")?;
        self.watched = true;
        Ok(())
    }
    fn modify(&mut self, fd: RawFd, _: u32, _: EventSet) -> io::Result<()> {
        assert!(self.watched, "the backend's fd modified but not added");
        self.call(fd, "modified")
    }
    fn remove(&mut self, fd: RawFd) -> io::Result<()> {
        assert!(self.watched, "the backend's fd removed but not added");
        self.call(fd, "removed")?;
        self.watched = false;
        Ok(())
    }
}

const NOTIFY: u8 = 7;
const INIT: u8 = 8;
const MMIO: u8 = 9;
const TX_FRAME: u8 = 10;
const RX_BUFFERS: u8 = 11;
const HOST_FRAME: u8 = 12;
const HOST_EVENT: u8 = 13;
const HOST_FAULTS: u8 = 14;
const OPS: u8 = 15;

struct Harness {
    dev: Transported<Net>,
    rings: Rings,
    host: Arc<Mutex<Host>>,
    watch: Watch,
    offloads: bool,
    /// The longest unsegmented frame, Ethernet header included.
    max_frame: usize,
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let settings = input.u8();
    let offloads = settings & 1 != 0;
    let backpressure = settings & 8 != 0;
    let mtu = match (settings >> 1) & 3 {
        0 => None,
        1 => Some(1500),
        2 => Some(input.u16()),
        _ => Some(u16::from(input.u8())),
    };
    let shared = Arc::new(Mutex::new(Host::default()));
    let backend = FakeBackend {
        host: shared.clone(),
        offloads,
        backpressure,
    };
    let opts = NetOptions {
        iface_id: "fuzz".into(),
        mac: [0x06, 0, 0xac, 0x10, 0, 2],
        mtu,
    };
    let device = Net::new(&opts, Box::new(backend));
    let mem = memory::guest_mem();
    let sizes = [0, 1].map(|_| virtq::queue_size(&mut input));
    let mut h = Harness {
        dev: Transported::new(device, mem.clone()),
        rings: Rings::new(mem, &sizes),
        host: shared,
        watch: Watch::default(),
        offloads,
        max_frame: usize::from(mtu.unwrap_or(1500)) + ETH_HLEN + VLAN_HLEN,
    };
    let features = input.u64();
    h.init(features);

    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        let op = input.u8() % OPS;
        if !h.rings.op(op, &mut input) {
            h.op(op, &mut input);
        }
    }
    // What the driver and the host left, as the event loop would see it.
    h.process(TXQ);
    h.process(RXQ);
    h.pump(EventSet::IN);
}

impl Harness {
    fn init(&mut self, features: u64) {
        let Self {
            dev, rings, watch, ..
        } = self;
        dev.init(features, rings);
        rings.checked(|| lock(&dev.slot).sync_sources(watch));
        self.check_host();
    }

    fn op(&mut self, op: u8, input: &mut Input) {
        match op {
            NOTIFY => self.process(if input.bool() { TXQ } else { RXQ }),
            INIT => self.init(input.u64()),
            MMIO => {
                self.dev.mmio(input);
                let Self {
                    dev, rings, watch, ..
                } = self;
                rings.checked(|| lock(&dev.slot).sync_sources(watch));
                self.check_host();
            }
            TX_FRAME => {
                tx_frame(input, &mut self.rings);
                self.process(TXQ);
            }
            RX_BUFFERS => {
                for _ in 0..=input.below(4) {
                    let n = 1 + input.below(3);
                    let descs: Vec<Desc> = (0..n)
                        .map(|_| Desc {
                            addr: virtq::addr(input),
                            len: rx_len(input),
                            flags: if input.u8() == 0xff {
                                virtq::flags(input)
                            } else {
                                F_WRITE
                            },
                            next: 0,
                        })
                        .collect();
                    let head = input.u16();
                    self.rings.chain(RXQ, head, &descs);
                }
                self.process(RXQ);
            }
            HOST_FRAME => {
                let frame = host_frame(input);
                let mut h = host(&self.host);
                if h.incoming.len() < MAX_INCOMING {
                    h.incoming.push_back(frame);
                }
                drop(h);
                self.pump(EventSet::IN);
            }
            HOST_EVENT => {
                let events = match input.below(6) {
                    0 => EventSet::IN | EventSet::ERROR,
                    1 => EventSet::HANG_UP,
                    4 => EventSet::OUT,
                    5 => EventSet::IN | EventSet::OUT,
                    _ => EventSet::IN,
                };
                self.pump(events);
            }
            _ => {
                let b = input.u8();
                let kinds = [
                    io::ErrorKind::WouldBlock,
                    io::ErrorKind::Interrupted,
                    io::ErrorKind::BrokenPipe,
                ];
                let mut h = host(&self.host);
                h.read_error = kinds.get(usize::from(b & 3)).copied();
                h.write_error = kinds.get(usize::from((b >> 2) & 3)).copied();
                h.offload_error = b & 0x10 != 0;
                self.watch.fail_next = b & 0x20 != 0;
                h.flush_error = kinds.get(usize::from(b >> 6)).copied();
            }
        }
    }

    /// What the event loop does when the driver notifies queue `q`.
    fn process(&mut self, q: usize) {
        let Self {
            dev, rings, watch, ..
        } = self;
        rings.checked(|| dev.process(q, watch));
        self.check_host();
    }

    /// What the event loop does while the backend's fd is watched and
    /// `events` are on it: a few rounds (a real readable fd stays so
    /// while frames wait).
    fn pump(&mut self, events: EventSet) {
        for _ in 0..4 {
            if !self.watch.watched {
                break;
            }
            let Self {
                dev, rings, watch, ..
            } = self;
            rings.checked(|| lock(&dev.slot).process_source(0, events, watch));
            self.check_host();
            if host(&self.host).incoming.is_empty() {
                break;
            }
        }
    }

    /// The features the driver accepted, while the device is active.
    fn acked(&self) -> Option<u64> {
        lock(&self.dev.slot).active().map(|a| a.acked_features)
    }

    /// Panics unless every frame sent since the last call, and the
    /// backend's offloads, are what the accepted features allow.
    fn check_host(&mut self) {
        let acked = self.acked();
        let sent = std::mem::take(&mut host(&self.host).sent);
        let (offload, stale) = {
            let h = host(&self.host);
            (h.offload, h.offload_stale)
        };
        let Some(acked) = acked else {
            assert!(sent.is_empty(), "an inactive device sent frames");
            assert!(offload == 0 || stale, "an inactive device left offloads on");
            return;
        };
        for frame in &sent {
            check_sent(frame, acked, self.max_frame);
            // A backend without offloads gets complete frames: kiln
            // finished the guest's partial checksum itself.
            assert!(
                self.offloads || frame[..VNET_HDR_LEN] == [0; VNET_HDR_LEN],
                "a header asking for offloads sent to a backend without them"
            );
        }
        if stale {
            return;
        }
        let mut allowed = 0;
        if acked & VIRTIO_NET_F_GUEST_CSUM != 0 {
            allowed |= TUN_F_CSUM;
            if acked & VIRTIO_NET_F_GUEST_TSO4 != 0 {
                allowed |= TUN_F_TSO4;
            }
            if acked & VIRTIO_NET_F_GUEST_TSO6 != 0 {
                allowed |= TUN_F_TSO6;
            }
        }
        assert!(
            offload & !allowed == 0,
            "offloads {offload:#x} set, the guest accepted {acked:#x}"
        );
        // Without the backend's offloads the device offers checksums both
        // ways (it completes them itself), never segmentation.
        let checksums = VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM;
        assert!(
            self.offloads || acked & OFFLOADS & !checksums == 0,
            "segmentation accepted from a device on a backend without it"
        );
    }
}

/// The little-endian u16 at `at` of a header.
fn le16(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// Panics unless `frame`, written to the backend, is one the device may
/// send given the accepted features.
fn check_sent(frame: &[u8], acked: u64, max_frame: usize) {
    assert!(
        frame.len() >= VNET_HDR_LEN + ETH_HLEN,
        "a frame of {} bytes sent, shorter than the headers",
        frame.len()
    );
    let body = frame.len() - VNET_HDR_LEN;
    let (flags, gso) = (frame[0], frame[1]);
    assert!(flags & !NEEDS_CSUM == 0, "flags {flags:#x} sent");
    if flags & NEEDS_CSUM != 0 {
        assert!(
            acked & VIRTIO_NET_F_CSUM != 0,
            "NEEDS_CSUM sent, not accepted"
        );
        assert!(
            le16(frame, 6) + le16(frame, 8) + 2 <= body,
            "a checksum outside the frame sent"
        );
    } else {
        assert_eq!(frame[6..10], [0; 4], "checksum fields without NEEDS_CSUM");
    }
    match gso {
        0 => {
            assert_eq!(frame[2..6], [0; 4], "GSO fields without a GSO type");
            assert!(
                body <= max_frame,
                "an unsegmented frame of {body} bytes sent, over {max_frame}"
            );
        }
        GSO_TCPV4 | GSO_TCPV6 => {
            let feature = if gso == GSO_TCPV4 {
                VIRTIO_NET_F_HOST_TSO4
            } else {
                VIRTIO_NET_F_HOST_TSO6
            };
            assert!(acked & feature != 0, "GSO type {gso} sent, not accepted");
            assert!(
                flags & NEEDS_CSUM != 0 && le16(frame, 4) != 0,
                "GSO without NEEDS_CSUM or a size sent"
            );
            assert!(
                body <= MAX_GSO_FRAME.max(max_frame),
                "a segmented frame of {body} bytes sent"
            );
        }
        _ => panic!("GSO type {gso} sent"),
    }
    assert_eq!(frame[10..12], [0; 2], "num_buffers sent");
}

/// A `virtio_net_hdr`: fields mostly plausible, any value possible.
fn header(input: &mut Input) -> [u8; VNET_HDR_LEN] {
    let b = input.u8();
    let flags = match b & 3 {
        0 => 0,
        1 => NEEDS_CSUM,
        2 => DATA_VALID,
        _ => input.u8(),
    };
    let gso = match (b >> 2) & 3 {
        0 => 0,
        1 => GSO_TCPV4,
        2 => GSO_TCPV6,
        _ => input.u8(),
    };
    let mut h = [0u8; VNET_HDR_LEN];
    h[0] = flags;
    h[1] = gso;
    if b & 0x10 != 0 {
        // hdr_len, gso_size, csum_start, csum_offset, num_buffers.
        for at in (2..VNET_HDR_LEN).step_by(2) {
            h[at..at + 2].copy_from_slice(&input.u16().to_le_bytes());
        }
    } else {
        // A TCP segment's usual offsets.
        h[2..4].copy_from_slice(&54u16.to_le_bytes());
        h[4..6].copy_from_slice(&1448u16.to_le_bytes());
        h[6..8].copy_from_slice(&34u16.to_le_bytes());
        h[8..10].copy_from_slice(&16u16.to_le_bytes());
    }
    h
}

/// A frame behind its header: bytes from the input, or a made-up body
/// of a chosen length (up to past the largest segmented frame).
fn frame(input: &mut Input) -> Vec<u8> {
    let mut f = header(input).to_vec();
    match input.u8() % 4 {
        0 => f.extend_from_slice(input.bytes(2048)),
        1 => f.resize(VNET_HDR_LEN + usize::from(input.u16()), 0x5a),
        2 => {
            // Around the limits: the MTU's, and a segmented frame's.
            let edge = if input.bool() { MAX_GSO_FRAME } else { 1518 };
            let len = (edge + usize::from(input.u8() % 16)).saturating_sub(8);
            f.resize(VNET_HDR_LEN + len, 0xa5);
        }
        _ => f.resize(usize::from(input.u8() % 40), 0),
    }
    f
}

/// A frame the host sends.
fn host_frame(input: &mut Input) -> Vec<u8> {
    frame(input)
}

/// A receive buffer's length: the usual ones, or any.
fn rx_len(input: &mut Input) -> u32 {
    match input.u8() % 4 {
        0 => 1526,
        1 => 65562,
        _ => virtq::len(input),
    }
}

/// A frame the guest sends: written at a fuzzer-chosen place, in one to
/// four descriptors (cut at fuzzer-chosen points), sometimes with one
/// more descriptor of any kind, made available on the transmit queue.
fn tx_frame(input: &mut Input, rings: &mut Rings) {
    let f = frame(input);
    let at = virtq::addr(input);
    rings.write_bytes(at, &f);
    let total = u32::try_from(f.len()).unwrap_or(u32::MAX);
    let mut cuts: Vec<u32> = (0..input.below(4))
        .map(|_| u32::from(input.u16()) % total.max(1))
        .collect();
    cuts.push(0);
    cuts.push(total);
    cuts.sort_unstable();
    cuts.dedup();
    let mut descs: Vec<Desc> = cuts
        .windows(2)
        .map(|w| Desc {
            addr: at.wrapping_add(u64::from(w[0])),
            len: w[1] - w[0],
            flags: 0,
            next: 0,
        })
        .collect();
    if descs.is_empty() {
        descs.push(Desc {
            addr: at,
            len: 0,
            flags: 0,
            next: 0,
        });
    }
    if input.u8() == 0xff {
        descs.push(virtq::desc(input));
    }
    let head = input.u16();
    rings.chain(TXQ, head, &descs);
}

/// The seed corpus: frames both ways without and with offloads, and a
/// few hostile ones.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let all = COMMON | VIRTIO_NET_F_MAC | VIRTIO_NET_F_MTU | OFFLOADS;
    // settings, queue sizes (16, 16), features.
    let start = |s: &mut Seed, settings: u8, features: u64| {
        s.u8(settings).u8(4).u8(4).u64(features);
    };
    // A TX frame of `len` bytes of body, header `hdr` (the byte
    // `header` reads: flags and GSO type), at `at`, in `parts`.
    let tx = |s: &mut Seed, hdr: u8, len: u16, at: u64, parts: &[u16]| {
        s.u8(TX_FRAME).u8(hdr).u8(1).u16(len);
        virtq::seed_addr(s, at);
        s.u8(u8::try_from(parts.len()).unwrap_or(0));
        for &p in parts {
            s.u16(p);
        }
        s.u8(0).u16(0);
    };
    // Receive chains of one buffer each, from descriptor `head` on.
    let rx_buffers = |s: &mut Seed, head: u16, bufs: &[(u64, u32)]| {
        s.u8(RX_BUFFERS)
            .u8(u8::try_from(bufs.len() - 1).unwrap_or(0));
        for (i, &(at, len)) in (0u16..).zip(bufs) {
            s.u8(0);
            virtq::seed_addr(s, at);
            s.u8(2).u8(3).u32(len).u8(0).u16(head + i);
        }
    };
    let host_frame = |s: &mut Seed, hdr: u8, len: u16| {
        s.u8(HOST_FRAME).u8(hdr).u8(1).u16(len);
    };
    let mut out = Vec::new();
    let mut s = Seed::default();
    start(&mut s, 0, COMMON | VIRTIO_NET_F_MAC);
    rx_buffers(&mut s, 0, &[(0x8000, 1526), (0x9000, 1526)]);
    tx(&mut s, 0, 60, 0xa000, &[]);
    tx(&mut s, 0, 1514, 0xb000, &[12]);
    host_frame(&mut s, 0, 60);
    host_frame(&mut s, 0, 1514);
    host_frame(&mut s, 0, 1515);
    rx_buffers(&mut s, 2, &[(0x8000, 1526)]);
    s.u8(NOTIFY).u8(1);
    out.push(("plain".into(), s.take()));

    start(&mut s, 3, all);
    rx_buffers(&mut s, 0, &[(0x8000, 0x1_0000), (0x1_8000, 0x100)]);
    // NEEDS_CSUM, TCPv4 and TCPv6 segmentation, both ways.
    tx(&mut s, 0x05, 9000, 0xa000, &[12, 100]);
    tx(&mut s, 0x09, 60000, 0x1_0000, &[54]);
    host_frame(&mut s, 0x05, 30000);
    host_frame(&mut s, 0x02, 100);
    s.u8(HOST_EVENT).u8(2);
    out.push(("offloads".into(), s.take()));

    // No offloads accepted, then headers that ask for them; a reset
    // with frames waiting; failing host calls; a hang-up.
    start(&mut s, 1, COMMON);
    rx_buffers(&mut s, 0, &[(0x8000, 4), (0x9000, 1526)]);
    tx(&mut s, 0x05, 60, 0xa000, &[]);
    tx(&mut s, 0x00, 4, 0xa000, &[]);
    tx(&mut s, 0x02, 60, 0xa000, &[]);
    host_frame(&mut s, 0x05, 60);
    host_frame(&mut s, 0x08, 60);
    s.u8(HOST_FAULTS).u8(0x35);
    host_frame(&mut s, 0x00, 60);
    s.u8(INIT).u64(all);
    s.u8(HOST_EVENT).u8(1);
    out.push(("hostile".into(), s.take()));

    // A stream backend that pushes back: a frame refused and held, a
    // writable event whose flush fails, one whose flush works (the frame
    // goes again), then a frame held across a reset.
    start(&mut s, 8, COMMON | VIRTIO_NET_F_MAC | VIRTIO_NET_F_CSUM);
    s.u8(HOST_FAULTS).u8(0x00);
    tx(&mut s, 0x00, 60, 0xa000, &[]);
    s.u8(HOST_EVENT).u8(4);
    s.u8(HOST_EVENT).u8(4);
    s.u8(HOST_FAULTS).u8(0xc3);
    tx(&mut s, 0x01, 100, 0xb000, &[12]);
    s.u8(INIT).u64(COMMON);
    s.u8(HOST_EVENT).u8(5);
    out.push(("backpressure".into(), s.take()));
    out
}
