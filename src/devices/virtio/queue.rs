//! Queue configuration as the driver writes it through the transport, and
//! its validation into a `virtio_queue::Queue` (virtio 1.2 §2.7, §4.2.3.2).
//!
//! The transport keeps the raw register values (so reads give back what the
//! driver wrote) and only builds a [`Queue`] when the driver enables the
//! queue; every check happens there, without logging (a guest can retry as
//! often as it likes).

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemory as _};

use super::{GuestMem, Interrupt};

/// §2.7: the descriptor table is 16 bytes per entry, 16-byte aligned.
const DESC_ENTRY_SIZE: u64 = 16;
/// §2.7: the available ring is flags, idx, ring[size] (u16 each), used_event.
const AVAIL_META_SIZE: u64 = 6;
const AVAIL_ENTRY_SIZE: u64 = 2;
/// §2.7: the used ring is flags, idx, ring[size] (8 bytes each), avail_event.
const USED_META_SIZE: u64 = 6;
const USED_ENTRY_SIZE: u64 = 8;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("queue maximum size {0} is not a power of two in 1..=32768")]
    InvalidMaxSize(u16),
    #[error("queue size {size} is not a power of two in 1..={max}")]
    InvalidSize { size: u32, max: u16 },
    #[error("queue {0} address is misaligned")]
    Misaligned(&'static str),
    #[error("queue {0} is not inside guest memory")]
    OutsideMemory(&'static str),
    #[error("a required queue is disabled")]
    Disabled,
}

/// The registers of one queue as last written by the driver.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub max_size: u16,
    /// QueueNum, kept as written (validated when the queue is enabled).
    pub size: u32,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

fn set_lo(v: &mut u64, lo: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(lo);
}

fn set_hi(v: &mut u64, hi: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(hi) << 32);
}

impl QueueConfig {
    pub fn new(max_size: u16) -> Result<Self, Error> {
        if max_size == 0 || max_size > 32768 || !max_size.is_power_of_two() {
            return Err(Error::InvalidMaxSize(max_size));
        }
        Ok(Self {
            max_size,
            size: u32::from(max_size),
            ready: false,
            desc_table: 0,
            avail_ring: 0,
            used_ring: 0,
        })
    }

    /// Back to the reset values (§4.2.2: QueueNum defaults to QueueNumMax).
    pub fn reset(&mut self) {
        *self = Self {
            max_size: self.max_size,
            size: u32::from(self.max_size),
            ready: false,
            desc_table: 0,
            avail_ring: 0,
            used_ring: 0,
        };
    }

    pub fn set_desc_lo(&mut self, v: u32) {
        set_lo(&mut self.desc_table, v)
    }
    pub fn set_desc_hi(&mut self, v: u32) {
        set_hi(&mut self.desc_table, v)
    }
    pub fn set_avail_lo(&mut self, v: u32) {
        set_lo(&mut self.avail_ring, v)
    }
    pub fn set_avail_hi(&mut self, v: u32) {
        set_hi(&mut self.avail_ring, v)
    }
    pub fn set_used_lo(&mut self, v: u32) {
        set_lo(&mut self.used_ring, v)
    }
    pub fn set_used_hi(&mut self, v: u32) {
        set_hi(&mut self.used_ring, v)
    }

    /// Checks the configuration against the spec and guest memory, and
    /// returns a ready queue.
    pub fn build(&self, mem: &GuestMem, event_idx: bool) -> Result<Queue, Error> {
        let max = self.max_size;
        let bad_size = Error::InvalidSize {
            size: self.size,
            max,
        };
        let size = u16::try_from(self.size).map_err(|_| bad_size.clone())?;
        let mut q = Queue::new(max).map_err(|_| Error::InvalidMaxSize(max))?;
        q.try_set_size(size).map_err(|_| bad_size)?;
        q.try_set_desc_table_address(GuestAddress(self.desc_table))
            .map_err(|_| Error::Misaligned("descriptor table"))?;
        q.try_set_avail_ring_address(GuestAddress(self.avail_ring))
            .map_err(|_| Error::Misaligned("available ring"))?;
        q.try_set_used_ring_address(GuestAddress(self.used_ring))
            .map_err(|_| Error::Misaligned("used ring"))?;

        let n = u64::from(size);
        let areas = [
            ("descriptor table", self.desc_table, DESC_ENTRY_SIZE * n),
            (
                "available ring",
                self.avail_ring,
                AVAIL_META_SIZE + AVAIL_ENTRY_SIZE * n,
            ),
            (
                "used ring",
                self.used_ring,
                USED_META_SIZE + USED_ENTRY_SIZE * n,
            ),
        ];
        for (name, addr, len) in areas {
            // `len` is at most 16 * 32768: it fits any usize.
            let len = usize::try_from(len).map_err(|_| Error::OutsideMemory(name))?;
            if addr.checked_add(len as u64).is_none() || !mem.check_range(GuestAddress(addr), len) {
                return Err(Error::OutsideMemory(name));
            }
        }
        q.set_event_idx(event_idx);
        q.set_ready(true);
        // Same checks as ours; they pass here, so the crate logs nothing.
        if !q.is_valid(mem) {
            return Err(Error::OutsideMemory("queue"));
        }
        Ok(q)
    }
}

impl QueueConfig {
    /// A queue the driver left disabled: not ready, never processed.
    pub fn build_disabled(&self) -> Result<Queue, Error> {
        Queue::new(self.max_size).map_err(|_| Error::InvalidMaxSize(self.max_size))
    }
}

/// What a request handler tells [`Cursor::drain`] about one descriptor chain.
pub enum Outcome {
    /// Put the chain in the used ring with this many bytes written.
    Used(u32),
    /// The chain is so malformed the device cannot answer it: the device
    /// marks itself DEVICE_NEEDS_RESET and stops processing.
    Fatal,
}

/// Upper bound on the chains handled per call, so that a driver refilling
/// the ring as fast as it is drained cannot keep the event thread forever.
/// When it runs out, [`Cursor::drain`] returns true and the caller must call
/// again later (the event-loop glue re-signals the queue's eventfd).
pub const MAX_CHAINS_PER_DRAIN: usize = 4096;

/// One pass of a device over one queue: takes available chains, returns
/// them in the used ring, and when dropped interrupts the driver if it
/// wants to be (event index aware). A ring the device cannot read or write
/// marks the device DEVICE_NEEDS_RESET, after which the cursor yields
/// nothing.
pub struct Cursor<'a> {
    q: &'a mut Queue,
    mem: &'a GuestMem,
    interrupt: &'a Interrupt,
    used_any: bool,
    fatal: bool,
}

impl<'a> Cursor<'a> {
    pub fn new(q: &'a mut Queue, mem: &'a GuestMem, interrupt: &'a Interrupt) -> Self {
        let fatal = interrupt.needs_reset();
        Self {
            q,
            mem,
            interrupt,
            used_any: false,
            fatal,
        }
    }

    /// Guest memory, for the chains' buffers.
    pub fn mem(&self) -> &'a GuestMem {
        self.mem
    }

    /// The queue's size, as the driver set it: the most chains it can hold.
    pub fn size(&self) -> u16 {
        self.q.size()
    }

    /// Marks the device DEVICE_NEEDS_RESET (when the cursor is dropped).
    pub fn fail(&mut self) {
        self.fatal = true;
    }

    /// Whether the device gave up on the queue.
    pub fn failed(&self) -> bool {
        self.fatal
    }

    /// The next available chain, or None when the ring is empty or broken.
    pub fn pop(&mut self) -> Option<DescriptorChain<&'a GuestMem>> {
        if self.fatal {
            return None;
        }
        // `iter` checks the avail index is at most a ring ahead of us.
        let chain = match self.q.iter(self.mem) {
            Ok(mut it) => it.next(),
            Err(_) => {
                self.fatal = true;
                return None;
            }
        }?;
        if chain.head_index() >= self.q.size() {
            // virtio-queue would refuse (and log) the used entry.
            self.fatal = true;
            return None;
        }
        Some(chain)
    }

    /// Puts back the chain [`Cursor::pop`] returned last, unused.
    pub fn undo_pop(&mut self) {
        self.q.go_to_previous_position();
    }

    /// Returns the chain with head `head` to the driver, `len` bytes written.
    pub fn add_used(&mut self, head: u16, len: u32) {
        if self.fatal {
            return;
        }
        if self.q.add_used(self.mem, head, len).is_err() {
            self.fatal = true;
        } else {
            self.used_any = true;
        }
    }

    /// Asks the driver to notify the device when it adds chains (with
    /// event index, only from now on). Returns true when chains arrived
    /// meanwhile: pop again.
    pub fn enable_notification(&mut self) -> bool {
        if self.fatal {
            return false;
        }
        match self.q.enable_notification(self.mem) {
            Ok(more) => more,
            Err(_) => {
                self.fatal = true;
                false
            }
        }
    }

    /// Takes every available chain, hands it to `handle`, and returns it in
    /// the used ring. Returns true when chains may be left because the
    /// budget ([`MAX_CHAINS_PER_DRAIN`]) ran out.
    pub fn drain<F>(mut self, mut handle: F) -> bool
    where
        F: FnMut(DescriptorChain<&GuestMem>, &GuestMem) -> Outcome,
    {
        let mut budget = MAX_CHAINS_PER_DRAIN;
        loop {
            if self.q.event_idx_enabled() && self.q.disable_notification(self.mem).is_err() {
                self.fatal = true;
            }
            while budget > 0 {
                let Some(chain) = self.pop() else { break };
                budget -= 1;
                let head = chain.head_index();
                match handle(chain, self.mem) {
                    Outcome::Used(len) => self.add_used(head, len),
                    Outcome::Fatal => self.fatal = true,
                }
            }
            if budget == 0 || self.fatal || !self.q.event_idx_enabled() {
                break;
            }
            // More chains may have arrived while notifications were off.
            if !self.enable_notification() {
                break;
            }
        }
        budget == 0 && !self.fatal
    }
}

impl Drop for Cursor<'_> {
    fn drop(&mut self) {
        if self.used_any && self.q.needs_notification(self.mem).unwrap_or(true) {
            self.interrupt.signal_used_queue();
        }
        if self.fatal {
            self.interrupt.set_needs_reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn cfg(size: u32) -> QueueConfig {
        let mut c = QueueConfig::new(256).unwrap();
        c.size = size;
        c.desc_table = 0x1000;
        c.avail_ring = 0x2000;
        c.used_ring = 0x3000;
        c
    }

    #[test]
    fn valid_queue_builds() {
        let q = cfg(256).build(&mem(), true).unwrap();
        assert_eq!(q.size(), 256);
        assert!(q.ready());
        assert!(q.event_idx_enabled());
    }

    #[test]
    fn bad_sizes_refused() {
        for size in [0, 3, 100, 512, 0x1_0000, u32::MAX] {
            assert!(
                matches!(
                    cfg(size).build(&mem(), false),
                    Err(Error::InvalidSize { .. })
                ),
                "{size}"
            );
        }
        assert!(QueueConfig::new(0).is_err());
        assert!(QueueConfig::new(3).is_err());
    }

    #[test]
    fn misaligned_or_outside_refused() {
        let mut c = cfg(16);
        c.desc_table = 0x1008;
        assert_eq!(
            c.build(&mem(), false).unwrap_err(),
            Error::Misaligned("descriptor table")
        );
        let mut c = cfg(16);
        c.used_ring = 0x3002;
        assert_eq!(
            c.build(&mem(), false).unwrap_err(),
            Error::Misaligned("used ring")
        );
        let mut c = cfg(256);
        c.desc_table = 0xf800; // 4 KiB table runs past the end
        assert_eq!(
            c.build(&mem(), false).unwrap_err(),
            Error::OutsideMemory("descriptor table")
        );
        let mut c = cfg(16);
        c.avail_ring = u64::MAX - 1;
        assert!(c.build(&mem(), false).is_err());
        let mut c = cfg(16);
        c.set_used_hi(1);
        assert_eq!(
            c.build(&mem(), false).unwrap_err(),
            Error::OutsideMemory("used ring")
        );
        assert_eq!(c.used_ring, 0x1_0000_3000);
    }
}
