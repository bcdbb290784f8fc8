//! A hostile virtio driver for the device harnesses: split rings laid out
//! in [`memory`](super::memory)'s fenced guest memory, descriptors,
//! buffers and ring indexes chosen by the fuzzer, and the checks every
//! device must pass whatever the driver did:
//!
//! - it never panics (the harness would abort);
//! - it never touches host memory outside guest memory (guard pages);
//! - it writes guest memory only inside buffers the driver made
//!   device-writable (any descriptor with `VIRTQ_DESC_F_WRITE`, in a ring's
//!   table or in an indirect table one points to) and in the used rings;
//! - every used entry names a descriptor of the ring and says at most as
//!   many bytes written as the chain has device-writable bytes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};

use super::input::{Input, Seed};
use super::memory::{self, MEM_END};
use crate::devices::bus::{lock, BusDevice};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::{status, GuestMem, Slot, Sources, VirtioDevice};

/// Descriptor flags (virtio 1.2 §2.7.5).
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// Each queue's rings take 8 KiB from `0x2000 * index`: the descriptor
/// table (up to 256 entries), the available ring at +0x1000 and the used
/// ring at +0x1800.
const QUEUE_SLOT: u64 = 0x2000;
/// The most descriptors of an indirect table the checks look at.
const MAX_INDIRECT: u64 = 4096;

/// One descriptor as the driver writes it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// One split ring in guest memory.
#[derive(Debug, Clone)]
pub struct Ring {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
    /// Whether the device took the ring (the checks look at no other).
    pub active: bool,
    avail_idx: u16,
    /// Every head made available (valid or not), with the most
    /// device-writable bytes its chain had at the start of any step since:
    /// a device may hold a chain across steps (virtio-net's mergeable
    /// receive buffers) while the driver rewrites its descriptors.
    posted: HashMap<u16, u64>,
}

/// The driver's side of every queue of a device.
pub struct Rings {
    pub mem: GuestMem,
    pub rings: Vec<Ring>,
    /// Every byte device-writable at the start of any step so far (see
    /// [`Ring::posted`]).
    granted: Vec<bool>,
}

/// A guest address: mostly inside guest memory, sometimes at its edges
/// (the region boundary, the end), sometimes anything.
pub fn addr(input: &mut Input) -> u64 {
    match input.u8() % 8 {
        0..=5 => u64::from(input.u32()) % MEM_END,
        6 => {
            let edge = if input.bool() { 0x1_0000 } else { MEM_END };
            edge.wrapping_add(u64::from(input.u8())).wrapping_sub(0x80)
        }
        _ => input.u64(),
    }
}

/// A buffer length: small, medium, up to guest memory's size, or anything.
pub fn len(input: &mut Input) -> u32 {
    match input.u8() % 4 {
        0 => u32::from(input.u8()),
        1 => u32::from(input.u16()),
        2 => input.u32() % 0x2_0000,
        _ => input.u32(),
    }
}

/// Descriptor flags: the three defined ones in any combination, or any
/// 16 bits.
pub fn flags(input: &mut Input) -> u16 {
    let b = input.u8();
    if b & 0x80 == 0 {
        u16::from(b & 7)
    } else {
        input.u16()
    }
}

/// A whole descriptor.
pub fn desc(input: &mut Input) -> Desc {
    Desc {
        addr: addr(input),
        len: len(input),
        flags: flags(input),
        next: input.u16(),
    }
}

/// What [`addr`] reads back as `a` (which must be below [`MEM_END`]).
pub fn seed_addr(s: &mut Seed, a: u64) {
    s.u8(0).u32(u32::try_from(a).unwrap_or(0));
}

/// What [`len`] reads back as `l`.
pub fn seed_len(s: &mut Seed, l: u32) {
    s.u8(3).u32(l);
}

/// What [`desc`] reads back as `d` (`d.addr` below [`MEM_END`]).
pub fn seed_desc(s: &mut Seed, d: Desc) {
    seed_addr(s, d.addr);
    seed_len(s, d.len);
    s.u8(0x80).u16(d.flags).u16(d.next);
}

/// A queue size the driver asks for: a power of two up to 512 (more than
/// any kiln queue takes), or any number.
pub fn queue_size(input: &mut Input) -> u16 {
    match input.u8() {
        b @ 0..=9 => 1 << b,
        0xff => input.u16(),
        _ => 16,
    }
}

impl Rings {
    /// Rings of `sizes` entries (0 for a queue the driver leaves off).
    pub fn new(mem: GuestMem, sizes: &[u16]) -> Self {
        let rings = (0u64..)
            .zip(sizes)
            .map(|(i, &size)| Ring {
                desc: QUEUE_SLOT * i,
                avail: QUEUE_SLOT * i + 0x1000,
                used: QUEUE_SLOT * i + 0x1800,
                size,
                active: false,
                avail_idx: 0,
                posted: HashMap::new(),
            })
            .collect();
        Self {
            mem,
            rings,
            granted: vec![false; to_usize(MEM_END)],
        }
    }

    /// Writes `d` at `at` (ignored where there is no guest memory).
    pub fn write_desc(&self, at: u64, d: Desc) {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&d.addr.to_le_bytes());
        raw[8..12].copy_from_slice(&d.len.to_le_bytes());
        raw[12..14].copy_from_slice(&d.flags.to_le_bytes());
        raw[14..].copy_from_slice(&d.next.to_le_bytes());
        let _ = self.mem.write_slice(&raw, GuestAddress(at));
    }

    /// Writes `bytes` at `at`, as far as guest memory goes.
    pub fn write_bytes(&self, at: u64, bytes: &[u8]) {
        let _ = self.mem.write(bytes, GuestAddress(at));
    }

    fn write_u16(&self, at: u64, v: u16) {
        let _ = self.mem.write_obj(v, GuestAddress(at));
    }

    /// Entry `i` of queue `q`'s descriptor table.
    pub fn set(&self, q: usize, i: u16, d: Desc) {
        if let Some(r) = self.rings.get(q) {
            self.write_desc(r.desc + 16 * u64::from(i % r.size.max(1)), d);
        }
    }

    /// Makes chain `head` of queue `q` available.
    pub fn push(&mut self, q: usize, head: u16) {
        let Some(r) = self.rings.get_mut(q) else {
            return;
        };
        let slot = u64::from(r.avail_idx % r.size.max(1));
        let (avail, idx) = (r.avail, r.avail_idx.wrapping_add(1));
        r.avail_idx = idx;
        r.posted.entry(head).or_insert(0);
        self.write_u16(avail + 4 + 2 * slot, head);
        self.write_u16(avail + 2, idx);
    }

    /// Writes `descs` as one chain from descriptor `head` on (each linked
    /// to the next) and makes it available.
    pub fn chain(&mut self, q: usize, head: u16, descs: &[Desc]) {
        let Some(size) = self.rings.get(q).map(|r| r.size.max(1)) else {
            return;
        };
        let mut i = head % size;
        for (k, d) in descs.iter().enumerate() {
            let next = (i + 1) % size;
            let mut d = *d;
            if k + 1 < descs.len() {
                d.flags |= F_NEXT;
                d.next = next;
            }
            self.set(q, i, d);
            i = next;
        }
        self.push(q, head % size);
    }

    /// One driver action read from `input` (`op` already read), if `op` is
    /// one of the generic ones; false for the device harness's own.
    pub fn op(&mut self, op: u8, input: &mut Input) -> bool {
        let nq = u8::try_from(self.rings.len()).unwrap_or(u8::MAX);
        match op {
            0 => {
                let q = usize::from(input.below(nq));
                let i = input.u16();
                let d = desc(input);
                self.set(q, i, d);
            }
            1 => {
                // An indirect table entry, or any 16 bytes anywhere.
                let at = addr(input);
                let d = desc(input);
                self.write_desc(at, d);
            }
            2 => {
                let at = addr(input);
                let b = input.bytes(1024);
                self.write_bytes(at, b);
            }
            3 => {
                let q = usize::from(input.below(nq));
                let h = input.u16();
                let size = self.rings.get(q).map_or(1, |r| r.size.max(1));
                let head = if h & 0x8000 == 0 { h % size } else { h };
                self.push(q, head);
            }
            4 => {
                let q = usize::from(input.below(nq));
                let idx = input.u16();
                if let Some(r) = self.rings.get_mut(q) {
                    r.avail_idx = idx;
                    let at = r.avail + 2;
                    self.write_u16(at, idx);
                }
            }
            5 => {
                // avail.flags and used_event.
                let q = usize::from(input.below(nq));
                let (flags, event) = (input.u16(), input.u16());
                if let Some(r) = self.rings.get(q) {
                    let (at, event_at) = (r.avail, r.avail + 4 + 2 * u64::from(r.size));
                    self.write_u16(at, flags);
                    self.write_u16(event_at, event);
                }
            }
            6 => {
                let q = usize::from(input.below(nq));
                let head = input.u16();
                let n = 1 + input.below(8);
                let descs: Vec<Desc> = (0..n).map(|_| desc(input)).collect();
                self.chain(q, head, &descs);
            }
            _ => return false,
        }
        true
    }

    /// Runs `f` (the device at work) and checks what it did to guest
    /// memory and the used rings; panics, naming the breach, on any.
    ///
    /// What is device-writable is read from guest memory both before and
    /// after `f`: a device may write into a buffer that covers descriptors
    /// (the driver's mistake), and chains it reads after that are what it
    /// wrote. The used entries checked are those whose bytes changed.
    ///
    /// And what was device-writable at the start of any earlier step: a
    /// device may hold chains across steps (virtio-net's receive side
    /// waits for enough mergeable buffers) and then fill them as they were
    /// when it took them, while the driver has since rewritten their
    /// descriptors or made the same head available again (the driver's
    /// fault; the memory is still what the guest granted). Likewise a used
    /// length may be as long as the chain was at any step's start.
    ///
    /// Two cases are beyond what two snapshots can tell, and are not
    /// checked (each was a false alarm the fuzzer found):
    /// - When the device wrote into a descriptor table (a ring's, or an
    ///   indirect table one names), a chain it read in between may have
    ///   used a descriptor as it was neither before nor after `f`: a
    ///   status written over a descriptor's address, then the same chain
    ///   processed again, writes its next status where the half-changed
    ///   address pointed. Writes and used lengths are then not checked
    ///   for that call (the guard pages still catch any write outside
    ///   guest memory; used entries must still name a descriptor).
    /// - A used entry that lies inside a device-writable buffer may have
    ///   been changed by the data written there, not by the device
    ///   returning a chain: it is not checked.
    pub fn checked<R>(&mut self, f: impl FnOnce() -> R) -> R {
        let before = Snapshot(memory::snapshot(&self.mem));
        let r = f();
        let after = Snapshot(memory::snapshot(&self.mem));
        if before.0 == after.0 {
            return r;
        }
        let (buffers, buffers_after) = (self.buffer_map(&before), self.buffer_map(&after));
        for (g, &b) in self.granted.iter_mut().zip(&buffers) {
            *g |= b;
        }
        for r in self.rings.iter_mut().filter(|r| r.active) {
            let now: Vec<(u16, u64)> = r
                .posted
                .keys()
                .map(|&head| (head, writable_bytes(&before, r, head)))
                .collect();
            for (head, bytes) in now {
                r.posted
                    .entry(head)
                    .and_modify(|most| *most = (*most).max(bytes));
            }
        }
        let buffers = &self.granted;
        let used = self.used_map();
        let tables_written = self.tables_written(&before, &after);
        let (b, a) = (&before.0, &after.0);
        // Compared a block at a time first: this runs for every notify.
        const BLOCK: usize = 256;
        for start in (0..b.len()).step_by(BLOCK).filter(|_| !tables_written) {
            let end = (start + BLOCK).min(b.len());
            if b[start..end] == a[start..end] {
                continue;
            }
            if let Some(at) =
                (start..end).find(|&i| b[i] != a[i] && !buffers[i] && !buffers_after[i] && !used[i])
            {
                panic!(
                    "the device wrote guest memory at {at:#x} ({:#04x} -> {:#04x}), \
                     outside every device-writable buffer and used ring",
                    b[at], a[at]
                );
            }
        }
        for (q, r) in self.rings.iter().enumerate().filter(|(_, r)| r.active) {
            for slot in 0..u64::from(r.size) {
                let at = r.used + 4 + 8 * slot;
                let (Some(old), Some(new)) = (before.bytes(at, 8), after.bytes(at, 8)) else {
                    continue;
                };
                if old == new {
                    continue;
                }
                let in_buffer = (at..at + 8).any(|i| {
                    let i = to_usize(i);
                    buffers.get(i).is_some_and(|&w| w) || buffers_after.get(i).is_some_and(|&w| w)
                });
                if in_buffer {
                    continue;
                }
                let (Some(id), Some(len)) = (after.u32(at), after.u32(at + 4)) else {
                    continue;
                };
                let Some(head) = u16::try_from(id).ok().filter(|&h| h < r.size) else {
                    panic!(
                        "queue {q}: used entry names descriptor {id}, the ring has {}",
                        r.size
                    );
                };
                if tables_written {
                    continue;
                }
                let writable = writable_bytes(&before, r, head)
                    .max(writable_bytes(&after, r, head))
                    .max(r.posted.get(&head).copied().unwrap_or(0));
                assert!(
                    u64::from(len) <= writable,
                    "queue {q}: used entry for chain {head} says {len} bytes written, \
                     the chain has {writable} device-writable bytes"
                );
            }
        }
        r
    }

    /// Guest memory's bytes, true for those in the used rings.
    fn used_map(&self) -> Vec<bool> {
        let mut map = vec![false; to_usize(MEM_END)];
        for r in self.rings.iter().filter(|r| r.active) {
            mark(&mut map, r.used, 6 + 8 * u64::from(r.size));
        }
        map
    }

    /// Guest memory's bytes, true for those in a device-writable buffer
    /// as the descriptors in `mem` say.
    fn buffer_map(&self, mem: &Snapshot) -> Vec<bool> {
        let mut map = vec![false; to_usize(MEM_END)];
        for r in self.rings.iter().filter(|r| r.active) {
            for i in 0..u64::from(r.size) {
                let Some(d) = mem.desc(r.desc + 16 * i) else {
                    continue;
                };
                if d.flags & F_INDIRECT != 0 {
                    for k in 0..(u64::from(d.len) / 16).min(MAX_INDIRECT) {
                        let Some(e) = mem.desc(d.addr.saturating_add(16 * k)) else {
                            break;
                        };
                        if e.flags & F_WRITE != 0 {
                            mark(&mut map, e.addr, u64::from(e.len));
                        }
                    }
                } else if d.flags & F_WRITE != 0 {
                    mark(&mut map, d.addr, u64::from(d.len));
                }
            }
        }
        map
    }

    /// Whether any byte of a descriptor table (an active ring's, or an
    /// indirect table named in it before or after) differs between
    /// `before` and `after`.
    fn tables_written(&self, before: &Snapshot, after: &Snapshot) -> bool {
        let differs = |at: u64, len: u64| {
            let start = to_usize(at.min(MEM_END));
            let end = to_usize(at.saturating_add(len).min(MEM_END));
            before.0[start..end] != after.0[start..end]
        };
        for r in self.rings.iter().filter(|r| r.active) {
            if differs(r.desc, 16 * u64::from(r.size)) {
                return true;
            }
            for mem in [before, after] {
                for i in 0..u64::from(r.size) {
                    match mem.desc(r.desc + 16 * i) {
                        Some(d) if d.flags & F_INDIRECT != 0 => {
                            let n = (u64::from(d.len) / 16).min(MAX_INDIRECT);
                            if differs(d.addr, 16 * n) {
                                return true;
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        false
    }
}

/// Marks `len` bytes from `addr` in `map` (as far as guest memory goes).
fn mark(map: &mut [bool], addr: u64, len: u64) {
    let start = addr.min(MEM_END);
    let end = addr.saturating_add(len).min(MEM_END);
    map[to_usize(start)..to_usize(end)].fill(true);
}

/// Guest memory's bytes at one moment.
struct Snapshot(Vec<u8>);

impl Snapshot {
    fn bytes(&self, at: u64, n: usize) -> Option<&[u8]> {
        let at = usize::try_from(at).ok()?;
        self.0.get(at..at.checked_add(n)?)
    }

    fn u32(&self, at: u64) -> Option<u32> {
        Some(u32::from_le_bytes(self.bytes(at, 4)?.try_into().ok()?))
    }

    fn desc(&self, at: u64) -> Option<Desc> {
        let b = self.bytes(at, 16)?;
        let [a0, a1, a2, a3, a4, a5, a6, a7, l0, l1, l2, l3, f0, f1, n0, n1] = b.try_into().ok()?;
        Some(Desc {
            addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
            len: u32::from_le_bytes([l0, l1, l2, l3]),
            flags: u16::from_le_bytes([f0, f1]),
            next: u16::from_le_bytes([n0, n1]),
        })
    }
}

/// The device-writable bytes of the chain at `head` of `r` in `mem`,
/// counting every descriptor it can reach once (an upper bound for a
/// broken chain).
fn writable_bytes(mem: &Snapshot, r: &Ring, head: u16) -> u64 {
    let mut seen = vec![false; usize::from(r.size)];
    let mut total = 0u64;
    let mut i = head;
    while let Some(s) = seen.get_mut(usize::from(i)).filter(|s| !**s) {
        *s = true;
        let Some(d) = mem.desc(r.desc + 16 * u64::from(i)) else {
            break;
        };
        if d.flags & F_INDIRECT != 0 {
            for k in 0..(u64::from(d.len) / 16).min(MAX_INDIRECT) {
                match mem.desc(d.addr.saturating_add(16 * k)) {
                    Some(e) if e.flags & F_WRITE != 0 => total += u64::from(e.len),
                    Some(_) => {}
                    None => break,
                }
            }
        } else if d.flags & F_WRITE != 0 {
            total += u64::from(d.len);
        }
        if d.flags & F_NEXT == 0 {
            break;
        }
        i = d.next;
    }
    total
}

fn to_usize(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// A device behind kiln's virtio-mmio transport, as the VMM wires it, with
/// the driver's register accesses made here.
pub struct Transported<D: VirtioDevice + 'static> {
    pub slot: Arc<Mutex<Slot<D>>>,
    pub transport: MmioTransport,
}

impl<D: VirtioDevice + 'static> Transported<D> {
    pub fn new(device: D, mem: GuestMem) -> Self {
        let slot = Arc::new(Mutex::new(Slot::new(device)));
        let transport = match MmioTransport::new(slot.clone(), mem) {
            Ok(t) => t,
            Err(e) => panic!("cannot make the transport: {e}"),
        };
        Self { slot, transport }
    }

    pub fn write(&mut self, offset: u64, v: u32) {
        self.transport.write(offset, &v.to_le_bytes());
    }

    /// The driver's initialization (virtio 1.2 §3.1.1): accept `features`
    /// (whatever the device offers), program every ring, DRIVER_OK. Any
    /// step the device refuses leaves it inactive; `rings` learns which
    /// rings the device took.
    pub fn init(&mut self, features: u64, rings: &mut Rings) {
        self.write(0x70, 0);
        self.write(0x70, status::ACKNOWLEDGE);
        self.write(0x70, status::ACKNOWLEDGE | status::DRIVER);
        for (sel, half) in [(0, features), (1, features >> 32)] {
            self.write(0x24, sel);
            self.write(0x20, u32::try_from(half & 0xffff_ffff).unwrap_or(0));
        }
        self.write(
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        for (q, r) in (0u32..).zip(&rings.rings) {
            if r.size == 0 {
                continue;
            }
            self.write(0x30, q);
            self.write(0x38, u32::from(r.size));
            for (reg, v) in [(0x80, r.desc), (0x90, r.avail), (0xa0, r.used)] {
                self.write(reg, u32::try_from(v & 0xffff_ffff).unwrap_or(0));
                self.write(reg + 4, u32::try_from(v >> 32).unwrap_or(0));
            }
            self.write(0x44, 1);
        }
        self.write(
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        for (q, r) in (0u32..).zip(&mut rings.rings) {
            self.write(0x30, q);
            let mut ready = [0u8; 4];
            self.transport.read(0x44, &mut ready);
            r.active = r.size > 0 && ready == [1, 0, 0, 0];
        }
    }

    /// A register access of the fuzzer's: a read or write anywhere in the
    /// window but the queue size, layout and ready registers (a queue must
    /// only ever be enabled where [`Rings`] laid it out, which the checks
    /// rely on; [`Transported::init`] does that).
    pub fn mmio(&mut self, input: &mut Input) {
        let offset = u64::from(input.u16() % 0x200);
        let width = [1usize, 2, 4, 8][usize::from(input.below(4))];
        if input.bool() {
            let mut data = [0u8; 8];
            self.transport.read(offset, &mut data[..width]);
            return;
        }
        let v = input.u64().to_le_bytes();
        if (0x38..0x48).contains(&offset) || (0x80..0xa8).contains(&offset) {
            return;
        }
        self.transport.write(offset, &v[..width]);
    }

    /// What the event loop does when the driver notifies queue `q`: process
    /// it, and again while the device says work is left (a few times).
    pub fn process(&mut self, q: usize, sources: &mut dyn Sources) {
        for _ in 0..4 {
            if !lock(&self.slot).process_queue(q, sources) {
                break;
            }
        }
    }
}
