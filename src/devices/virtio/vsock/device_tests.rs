//! The whole vsock device through its three virtio queues, as a guest
//! driver (sometimes a hostile one) uses them.

use std::io::Read;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::super::{Vsock, VsockOptions, EVQ, RXQ, TXQ};
use super::*;
use crate::devices::bus::BusDevice;
use crate::devices::virtio::device_type;
use crate::devices::virtio::test_utils::*;
use crate::devices::virtio::VirtioDevice;

const QSIZE: u16 = 16;
const HDR_BUF: u64 = 0x2_0000;
const PAYLOAD: u64 = 0x3_0000;
const RX_BASE: u64 = 0x5_0000;

/// One split ring laid out by hand.
struct Ring {
    index: u32,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Ring {
    fn new(index: u32) -> Self {
        let base = 0x1000 * u64::from(index);
        Self {
            index,
            desc: 0x1000 + base,
            avail: 0x5000 + base,
            used: 0x9000 + base,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    fn program(&self, d: &mut Driver) {
        d.write(0x30, self.index);
        d.write(0x38, u32::from(QSIZE));
        d.write(0x80, u32::try_from(self.desc).unwrap());
        d.write(0x84, 0);
        d.write(0x90, u32::try_from(self.avail).unwrap());
        d.write(0x94, 0);
        d.write(0xa0, u32::try_from(self.used).unwrap());
        d.write(0xa4, 0);
        d.write(0x44, 1);
    }

    /// Makes a chain of `(addr, len, device_writes)` available.
    fn push(&mut self, mem: &GuestMem, descs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (k, &(addr, len, w)) in descs.iter().enumerate() {
            let i = self.next_desc;
            let next = (i + 1) % QSIZE;
            let mut flags = if w { F_WRITE } else { 0 };
            if k + 1 < descs.len() {
                flags |= F_NEXT;
            }
            let at = self.desc + u64::from(i) * 16;
            mem.write_obj(addr, GuestAddress(at)).unwrap();
            mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            mem.write_obj(next, GuestAddress(at + 14)).unwrap();
            self.next_desc = next;
        }
        let slot = u64::from(self.avail_idx % QSIZE);
        mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        head
    }

    /// Used entries (id, len) not seen yet.
    fn take_used(&mut self, mem: &GuestMem) -> Vec<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = u64::from(self.used_seen % QSIZE);
            let id = mem
                .read_obj(GuestAddress(self.used + 4 + 8 * slot))
                .unwrap();
            let len = mem
                .read_obj(GuestAddress(self.used + 8 + 8 * slot))
                .unwrap();
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

struct Guest {
    dev: TestSlot<Vsock>,
    d: Driver,
    mem: GuestMem,
    rings: [Ring; 3],
    poll: Poll,
    dir: Dir,
}

impl Guest {
    fn new(name: &str) -> Self {
        let dir = Dir::new(name);
        let vsock = Vsock::new(&VsockOptions {
            guest_cid: 3,
            uds_path: dir.sock(),
        })
        .unwrap();
        let dev = slot(vsock);
        let mem = guest_mem();
        let mut d = Driver::new(dev.clone(), mem.clone());
        assert!(d.negotiate(crate::devices::virtio::features::VIRTIO_F_VERSION_1));
        let rings = [Ring::new(0), Ring::new(1), Ring::new(2)];
        for r in &rings {
            r.program(&mut d);
        }
        d.driver_ok();
        assert!(dev.lock().unwrap().is_active());
        let mut g = Self {
            dev,
            d,
            mem,
            rings,
            poll: Poll(vmm_sys_util::epoll::Epoll::new().unwrap()),
            dir,
        };
        g.dev.lock().unwrap().sync_sources(&mut g.poll);
        g
    }

    fn process(&mut self, q: usize) {
        self.dev.lock().unwrap().process_queue(q, &mut self.poll);
    }

    /// The guest sends `hdr` + `data` as header and data descriptors.
    fn send(&mut self, mut hdr: Header, data: &[u8]) {
        hdr.len = u32::try_from(data.len()).unwrap();
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(HDR_BUF))
            .unwrap();
        self.mem.write_slice(data, GuestAddress(PAYLOAD)).unwrap();
        let mut descs = vec![(HDR_BUF, HEADER_SIZE, false)];
        if !data.is_empty() {
            descs.push((PAYLOAD, hdr.len, false));
        }
        self.rings[TXQ].push(&self.mem, &descs);
        self.process(TXQ);
        assert_eq!(self.rings[TXQ].take_used(&self.mem).len(), 1);
    }

    /// Posts `n` receive buffers (header + 4 KiB, as Linux 6.1 does).
    fn post_rx(&mut self, n: u64) {
        for i in 0..n {
            let base = RX_BASE + i * 0x2000;
            self.rings[RXQ].push(
                &self.mem,
                &[(base, HEADER_SIZE, true), (base + 0x100, 4096, true)],
            );
        }
        self.process(RXQ);
    }

    /// The packets the device put in receive buffers.
    fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        let used = self.rings[RXQ].take_used(&self.mem);
        used.into_iter()
            .map(|(id, len)| {
                let at = self.rings[RXQ].desc + u64::from(id) * 16;
                let base: u64 = self.mem.read_obj(GuestAddress(at)).unwrap();
                let mut raw = [0u8; 44];
                self.mem.read_slice(&mut raw, GuestAddress(base)).unwrap();
                let h = parse(&raw);
                assert_eq!(len, HEADER_SIZE + h.len);
                let mut data = vec![0u8; h.len as usize];
                self.mem
                    .read_slice(&mut data, GuestAddress(base + 0x100))
                    .unwrap();
                (h, data)
            })
            .collect()
    }

    fn needs_reset(&mut self) -> bool {
        self.d.needs_reset()
    }
}

fn parse(b: &[u8; 44]) -> Header {
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
    let u16_at = |i: usize| u16::from_le_bytes(b[i..i + 2].try_into().unwrap());
    Header {
        src_cid: u64::from_le_bytes(b[0..8].try_into().unwrap()),
        dst_cid: u64::from_le_bytes(b[8..16].try_into().unwrap()),
        src_port: u32_at(16),
        dst_port: u32_at(20),
        len: u32_at(24),
        type_: u16_at(28),
        op: u16_at(30),
        flags: u32_at(32),
        buf_alloc: u32_at(36),
        fwd_cnt: u32_at(40),
    }
}

#[test]
fn identification_and_config_space() {
    let mut g = Guest::new("dev-id");
    assert_eq!(g.d.read(0x8), device_type::VSOCK);
    assert_eq!(g.d.read(0x100), 3);
    assert_eq!(g.d.read(0x104), 0);
    let mut b = [0u8; 8];
    g.d.t.lock().unwrap().read(0x100, &mut b);
    assert_eq!(u64::from_le_bytes(b), 3);
    assert_eq!(g.d.read(0x108), u32::MAX);
}

#[test]
fn connection_through_the_queues() {
    let mut g = Guest::new("dev-flow");
    let l = {
        let mut p = g.dir.sock().into_os_string();
        p.push("_7");
        std::os::unix::net::UnixListener::bind(std::path::PathBuf::from(p)).unwrap()
    };
    g.post_rx(4);
    g.send(guest_hdr(OP_REQUEST, 5000, 7), &[]);
    let got = g.received();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].0.op, got[0].0.dst_port), (OP_RESPONSE, 5000));
    let (mut host, _) = l.accept().unwrap();
    g.send(guest_hdr(OP_RW, 5000, 7), b"through the ring");
    let mut b = [0u8; 16];
    host.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"through the ring");
    assert!(!g.needs_reset());
}

#[test]
fn malformed_chains_are_consumed_and_nothing_breaks() {
    let mut g = Guest::new("dev-bad");
    let hdr = guest_hdr(OP_RW, 5000, 7);
    let mut raw = hdr;
    raw.len = 100;
    g.mem
        .write_slice(&raw.to_bytes(), GuestAddress(HDR_BUF))
        .unwrap();
    let cases: Vec<Vec<(u64, u32, bool)>> = vec![
        // Device-writable header.
        vec![(HDR_BUF, HEADER_SIZE, true)],
        // Header shorter than 44 bytes.
        vec![(HDR_BUF, 20, false)],
        // len 100, data buffer of 50.
        vec![(HDR_BUF, HEADER_SIZE, false), (PAYLOAD, 50, false)],
        // len 100 with no data buffer.
        vec![(HDR_BUF, HEADER_SIZE, false)],
        // Header outside guest memory.
        vec![(MEM_SIZE - 8, HEADER_SIZE, false)],
        vec![(u64::MAX - 4, HEADER_SIZE, false)],
    ];
    for descs in &cases {
        g.rings[TXQ].push(&g.mem, descs);
    }
    // A header claiming more than a packet can carry.
    let mut huge = hdr;
    huge.len = 1 << 20;
    g.mem
        .write_slice(&huge.to_bytes(), GuestAddress(HDR_BUF + 0x100))
        .unwrap();
    g.rings[TXQ].push(
        &g.mem,
        &[
            (HDR_BUF + 0x100, HEADER_SIZE, false),
            (PAYLOAD, 1 << 20, false),
        ],
    );
    g.process(TXQ);
    let used = g.rings[TXQ].take_used(&g.mem);
    assert_eq!(used.len(), cases.len() + 1);
    assert!(used.iter().all(|&(_, len)| len == 0));
    assert!(!g.needs_reset());
    assert_eq!(g.dev.lock().unwrap().device.bad_tx_chains, 7);

    // Receive buffers the device cannot write into: given back empty.
    g.rings[RXQ].push(&g.mem, &[(RX_BASE, HEADER_SIZE, false)]);
    g.rings[RXQ].push(&g.mem, &[(RX_BASE, 10, true)]);
    // Make the device owe the guest something (a RST).
    g.send(guest_hdr(OP_RW, 6000, 7), b"x");
    let used = g.rings[RXQ].take_used(&g.mem);
    assert_eq!(used, vec![(0, 0), (1, 0)]);
    assert_eq!(g.dev.lock().unwrap().device.bad_rx_chains, 2);
    // A good buffer gets the RST.
    g.post_rx(1);
    let got = g.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, OP_RST);
    assert!(!g.needs_reset());
}

#[test]
fn transport_reset_event_and_driver_reset_end_connections() {
    let mut g = Guest::new("dev-reset");
    let (mut client, req) = {
        let mut c = std::os::unix::net::UnixStream::connect(g.dir.sock()).unwrap();
        std::io::Write::write_all(&mut c, b"CONNECT 52\n").unwrap();
        g.post_rx(2);
        let mut req = None;
        for _ in 0..50 {
            let mut events = [vmm_sys_util::epoll::EpollEvent::default(); 8];
            let n = g.poll.0.wait(20, &mut events).unwrap();
            for e in &events[..n] {
                let token = u32::try_from(e.data()).unwrap();
                g.dev
                    .lock()
                    .unwrap()
                    .process_source(token, e.event_set(), &mut g.poll);
            }
            if let Some(p) = g.received().pop() {
                req = Some(p.0);
                break;
            }
        }
        (c, req.expect("a REQUEST for the guest"))
    };
    assert_eq!(req.op, OP_REQUEST);
    g.send(guest_hdr(OP_RESPONSE, 52, req.src_port), &[]);
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut ok = [0u8; 32];
    assert!(client.read(&mut ok).unwrap() > 0);

    // After a snapshot restore: every connection ends and the guest is
    // told through the event queue.
    g.mem
        .write_obj(0xdead_beefu32, GuestAddress(0x7_0000))
        .unwrap();
    g.rings[EVQ].push(&g.mem, &[(0x7_0000, 8, true)]);
    {
        let mut slot = g.dev.lock().unwrap();
        let (dev, active) = slot.parts();
        dev.reset_transport(active);
    }
    assert_eq!(g.rings[EVQ].take_used(&g.mem), vec![(0, 4)]);
    assert_eq!(g.mem.read_obj::<u32>(GuestAddress(0x7_0000)).unwrap(), 0);
    assert!(closed(&mut client));
    assert_eq!(g.dev.lock().unwrap().device.muxer().connection_count(), 0);

    // A driver reset ends connections too.
    let l = {
        let mut p = g.dir.sock().into_os_string();
        p.push("_7");
        std::os::unix::net::UnixListener::bind(std::path::PathBuf::from(p)).unwrap()
    };
    g.send(guest_hdr(OP_REQUEST, 5000, 7), &[]);
    let (mut host, _) = l.accept().unwrap();
    assert_eq!(g.dev.lock().unwrap().device.muxer().connection_count(), 1);
    g.d.write(0x70, 0);
    assert!(!g.dev.lock().unwrap().is_active());
    g.dev.lock().unwrap().sync_sources(&mut g.poll);
    assert!(closed(&mut host));
    assert_eq!(g.dev.lock().unwrap().device.muxer().connection_count(), 0);
}

/// A restored vsock keeps its guest CID (another is refused) and tells the
/// guest its connections are gone once it is active again.
#[test]
fn restored_device_sends_a_transport_reset() {
    let mut g = Guest::new("dev-restore");
    let saved = g.dev.lock().unwrap().device.save_state().unwrap();
    assert_eq!(saved, Some(serde_json::json!({ "guest_cid": 3 })));

    let dir = Dir::new("dev-restore-other");
    let mut other = Vsock::new(&VsockOptions {
        guest_cid: 4,
        uds_path: dir.sock(),
    })
    .unwrap();
    let e = other.restore_state(saved.as_ref()).unwrap_err();
    assert!(
        e.to_string().contains("guest_cid is 3, the config's 4"),
        "{e}"
    );
    assert!(other.restore_state(None).is_err());

    g.mem
        .write_obj(0xdead_beefu32, GuestAddress(0x7_0000))
        .unwrap();
    g.rings[EVQ].push(&g.mem, &[(0x7_0000, 8, true)]);
    g.dev
        .lock()
        .unwrap()
        .device
        .restore_state(saved.as_ref())
        .unwrap();
    // What the event loop does once the restored device is active.
    g.dev.lock().unwrap().sync_sources(&mut g.poll);
    assert_eq!(g.rings[EVQ].take_used(&g.mem), vec![(0, 4)]);
    assert_eq!(g.mem.read_obj::<u32>(GuestAddress(0x7_0000)).unwrap(), 0);
}
