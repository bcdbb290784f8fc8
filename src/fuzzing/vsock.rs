//! virtio-vsock under a hostile driver and busy host sockets: the device
//! behind kiln's mmio transport, listening in a scratch directory, with
//! host listeners on ports 1024 and 7; the guest's packets (any header,
//! any payload, any chain), its receive buffers, and host clients that
//! connect, send, read, shut down and close, interleaved as the fuzzer
//! says. Host events reach the device as the event loop delivers them
//! (epoll), each under the same guest-memory checks as queue processing.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::RawFd;
use std::os::unix::net::{UnixListener, UnixStream};

use event_manager::EventSet;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent};

use super::input::{Input, Seed};
use super::virtq::{self, Desc, Rings, Transported, F_WRITE};
use super::{memory, Scratch};
use crate::devices::bus::lock;
use crate::devices::virtio::features::COMMON;
use crate::devices::virtio::vsock::packet::{Header, HEADER_SIZE, HOST_CID, TYPE_STREAM};
use crate::devices::virtio::vsock::{uds, Vsock, VsockOptions, EVQ, RXQ, TXQ};
use crate::devices::virtio::Sources;

const GUEST_CID: u64 = 3;
/// Host ports something listens on.
const LISTEN_PORTS: [u32; 2] = [1024, 7];
const MAX_OPS: usize = 256;
/// Host streams kept at once (more connects are dropped at once).
const MAX_STREAMS: usize = 16;

/// [`Sources`] on an epoll, as the event loop registers them.
struct Poll(Epoll);

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

const NOTIFY: u8 = 7;
const INIT: u8 = 8;
const MMIO: u8 = 9;
const PACKET: u8 = 10;
const RX_BUFFERS: u8 = 11;
const HOST_CONNECT: u8 = 12;
const HOST_ACCEPT: u8 = 13;
const HOST_WRITE: u8 = 14;
const HOST_READ: u8 = 15;
const HOST_CLOSE: u8 = 16;
const PUMP: u8 = 17;
const TRANSPORT_RESET: u8 = 18;
const OPS: u8 = 19;

struct Harness {
    dev: Transported<Vsock>,
    rings: Rings,
    poll: Poll,
    listeners: Vec<UnixListener>,
    streams: Vec<UnixStream>,
    uds: std::path::PathBuf,
}

pub fn run(data: &[u8]) {
    super::limit_file_size();
    super::ignore_sigpipe();
    let mut input = Input::new(data);
    let scratch = Scratch::new("vsock");
    let uds = scratch.path("v.sock");
    let device = match Vsock::new(&VsockOptions {
        guest_cid: 3,
        uds_path: uds.clone(),
    }) {
        Ok(d) => d,
        Err(e) => panic!("cannot make the vsock device: {e}"),
    };
    let listeners = LISTEN_PORTS
        .iter()
        .map(|&p| {
            let l = UnixListener::bind(std::path::PathBuf::from(uds::port_path(&uds, p)));
            match l.and_then(|l| l.set_nonblocking(true).map(|()| l)) {
                Ok(l) => l,
                Err(e) => panic!("cannot listen on host port {p}: {e}"),
            }
        })
        .collect();
    let poll = match Epoll::new() {
        Ok(e) => Poll(e),
        Err(e) => panic!("cannot make an epoll: {e}"),
    };
    let mem = memory::guest_mem();
    let sizes = [0, 1, 2].map(|_| virtq::queue_size(&mut input));
    let mut h = Harness {
        dev: Transported::new(device, mem.clone()),
        rings: Rings::new(mem, &sizes),
        poll,
        listeners,
        streams: Vec::new(),
        uds,
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
    h.pump();
    drop(h);
    scratch.check_untouched(&["v.sock", "v.sock_1024", "v.sock_7"]);
}

impl Harness {
    fn init(&mut self, features: u64) {
        let Self {
            dev, rings, poll, ..
        } = self;
        dev.init(features, rings);
        rings.checked(|| lock(&dev.slot).sync_sources(poll));
    }

    fn op(&mut self, op: u8, input: &mut Input) {
        match op {
            NOTIFY => {
                let q = usize::from(input.below(3));
                self.process(q);
            }
            INIT => self.init(input.u64()),
            MMIO => {
                self.dev.mmio(input);
                let Self {
                    dev, rings, poll, ..
                } = self;
                rings.checked(|| lock(&dev.slot).sync_sources(poll));
            }
            PACKET => {
                packet(input, &mut self.rings);
                self.process(TXQ);
            }
            RX_BUFFERS => {
                for _ in 0..=input.below(4) {
                    let hdr = Desc {
                        addr: virtq::addr(input),
                        len: HEADER_SIZE,
                        flags: F_WRITE,
                        next: 0,
                    };
                    let data = Desc {
                        addr: virtq::addr(input),
                        len: virtq::len(input),
                        flags: F_WRITE,
                        next: 0,
                    };
                    let head = input.u16();
                    self.rings.chain(RXQ, head, &[hdr, data]);
                }
                self.process(RXQ);
            }
            HOST_CONNECT => {
                let line: Vec<u8> = match input.u8() % 4 {
                    0 => input.bytes(64).to_vec(),
                    n => format!("CONNECT {}\n", [52, 1024, input.u32()][usize::from(n - 1)])
                        .into_bytes(),
                };
                if self.streams.len() < MAX_STREAMS {
                    if let Ok(mut s) = UnixStream::connect(&self.uds) {
                        let _ = s.set_nonblocking(true);
                        let _ = s.write(&line);
                        self.streams.push(s);
                    }
                }
            }
            HOST_ACCEPT => {
                for l in &self.listeners {
                    while self.streams.len() < MAX_STREAMS {
                        let Ok((s, _)) = l.accept() else { break };
                        let _ = s.set_nonblocking(true);
                        self.streams.push(s);
                    }
                }
            }
            HOST_WRITE => {
                let k = input.u8();
                let data = input.bytes(4096);
                let n = self.streams.len();
                if let Some(s) = k.checked_rem(u8::try_from(n).unwrap_or(u8::MAX)) {
                    let _ = self.streams[usize::from(s)].write(data);
                }
            }
            HOST_READ => {
                let mut buf = [0u8; 4096];
                for s in &mut self.streams {
                    while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
                }
            }
            HOST_CLOSE => {
                let k = input.u8();
                let how = input.below(4);
                let n = u8::try_from(self.streams.len()).unwrap_or(u8::MAX);
                if let Some(i) = k.checked_rem(n).map(usize::from) {
                    match how {
                        0 => drop(self.streams.swap_remove(i)),
                        1 => drop(self.streams[i].shutdown(Shutdown::Write)),
                        2 => drop(self.streams[i].shutdown(Shutdown::Read)),
                        _ => drop(self.streams[i].shutdown(Shutdown::Both)),
                    }
                }
            }
            PUMP => self.pump(),
            _ => {
                let Self { dev, rings, .. } = self;
                rings.checked(|| {
                    let mut slot = lock(&dev.slot);
                    let (vsock, active) = slot.parts();
                    vsock.reset_transport(active);
                });
                if input.bool() {
                    self.process(EVQ);
                }
            }
        }
    }

    fn process(&mut self, q: usize) {
        let Self {
            dev, rings, poll, ..
        } = self;
        rings.checked(|| dev.process(q, poll));
    }

    /// What the event loop does with the host events that are ready (a
    /// few rounds, without waiting).
    fn pump(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        for _ in 0..4 {
            let n = self.poll.0.wait(0, &mut events).unwrap_or(0);
            if n == 0 {
                break;
            }
            for e in &events[..n] {
                let Ok(token) = u32::try_from(e.data()) else {
                    continue;
                };
                let Self {
                    dev, rings, poll, ..
                } = self;
                rings.checked(|| lock(&dev.slot).process_source(token, e.event_set(), poll));
            }
        }
    }
}

/// A packet the guest sends: a header (fields mostly plausible, any
/// value possible) and a payload in guest memory, and a chain over them
/// on the transmit queue.
fn packet(input: &mut Input, rings: &mut Rings) {
    let pick_u32 = |input: &mut Input, usual: &[u32]| -> u32 {
        let b = input.u8();
        match usual.get(usize::from(b & 7)) {
            Some(&v) => v,
            None if b & 0x80 != 0 => input.u32(),
            None => u32::from(b >> 3) + 5000,
        }
    };
    let data = input.bytes(4096);
    let mut h = Header {
        src_cid: if input.bool() { input.u64() } else { GUEST_CID },
        dst_cid: if input.bool() { input.u64() } else { HOST_CID },
        src_port: pick_u32(input, &[5000, 5001]),
        dst_port: pick_u32(input, &[1024, 7, 52, 1 << 30]),
        len: u32::try_from(data.len()).unwrap_or(0),
        type_: TYPE_STREAM,
        op: 1 + u16::from(input.below(7)),
        flags: pick_u32(input, &[0, 1, 2, 3]),
        buf_alloc: pick_u32(input, &[256 << 10, 0, 4096]),
        fwd_cnt: pick_u32(input, &[0]),
    };
    let raw = input.u8();
    if raw & 1 != 0 {
        h.len = input.u32();
    }
    if raw & 2 != 0 {
        h.type_ = input.u16();
        h.op = input.u16();
    }
    let hdr_at = virtq::addr(input);
    let data_at = virtq::addr(input);
    rings.write_bytes(hdr_at, &h.to_bytes());
    rings.write_bytes(data_at, data);
    let mut descs = vec![Desc {
        addr: hdr_at,
        len: HEADER_SIZE,
        flags: 0,
        next: 0,
    }];
    if !data.is_empty() {
        descs.push(Desc {
            addr: data_at,
            len: u32::try_from(data.len()).unwrap_or(0),
            flags: 0,
            next: 0,
        });
    }
    if raw & 4 != 0 {
        descs.push(virtq::desc(input));
    }
    let head = input.u16();
    rings.chain(TXQ, head, &descs);
}

/// The seed corpus: a guest connection to a host listener with data both
/// ways, a host-initiated connection, and hostile packets.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let start = |s: &mut Seed| {
        s.u8(4).u8(4).u8(2).u64(COMMON | 1);
    };
    let rx = |s: &mut Seed, base: u64| {
        s.u8(RX_BUFFERS).u8(1);
        for k in 0..2u64 {
            virtq::seed_addr(s, base + 0x2000 * k);
            virtq::seed_addr(s, base + 0x2000 * k + 0x100);
            s.u8(1).u16(4096);
            s.u16(u16::try_from(2 * k).unwrap_or(0));
        }
    };
    // port choices: 0: first usual value.
    let pkt = |s: &mut Seed, op: u16, dst: u8, data: &[u8], head: u16| {
        s.u8(PACKET).bytes(data).u8(0).u8(0).u8(0).u8(dst);
        s.u8(u8::try_from(op - 1).unwrap_or(0))
            .u8(0)
            .u8(0)
            .u8(0)
            .u8(0);
        virtq::seed_addr(s, 0x1_0000);
        virtq::seed_addr(s, 0x1_1000);
        s.u16(head);
    };
    let mut out = Vec::new();
    let mut s = Seed::default();
    start(&mut s);
    rx(&mut s, 0x1_8000);
    pkt(&mut s, 1, 0, b"", 0);
    s.u8(HOST_ACCEPT);
    pkt(&mut s, 5, 0, b"hello host", 2);
    s.u8(HOST_READ).u8(HOST_WRITE).u8(0).bytes(b"hello guest");
    s.u8(PUMP);
    rx(&mut s, 0x1_c000);
    pkt(&mut s, 4, 0, b"", 4);
    s.u8(HOST_CLOSE).u8(0).u8(0).u8(PUMP);
    out.push(("guest-connects".into(), s.take()));

    start(&mut s);
    rx(&mut s, 0x1_8000);
    s.u8(HOST_CONNECT).u8(1).u8(PUMP);
    s.u8(NOTIFY).u8(u8::try_from(RXQ).unwrap_or(0));
    s.u8(HOST_CONNECT).u8(0).bytes(b"CONNECT 99999999999\n");
    s.u8(PUMP).u8(TRANSPORT_RESET).u8(1);
    out.push(("host-connects".into(), s.take()));

    start(&mut s);
    rx(&mut s, 0x1_8000);
    // Credit requests, unknown ops, huge lengths, a packet to nobody.
    pkt(&mut s, 7, 1, b"", 0);
    pkt(&mut s, 5, 2, &[0xaa; 300], 1);
    s.u8(PACKET)
        .bytes(b"x")
        .u8(1)
        .u64(7)
        .u8(0)
        .u8(0)
        .u8(0)
        .u8(0);
    s.u8(0).u8(0).u8(0).u8(3).u32(1 << 20).u16(9).u16(99);
    virtq::seed_addr(&mut s, 0xfff0);
    virtq::seed_addr(&mut s, 0x1_fff0);
    s.u16(3);
    s.u8(INIT).u64(COMMON);
    out.push(("hostile-packets".into(), s.take()));
    out
}
