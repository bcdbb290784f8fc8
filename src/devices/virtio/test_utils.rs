//! A minimal (and, when asked, hostile) virtio-mmio driver for unit tests:
//! it pokes the transport through `BusDevice` and lays out split rings by
//! hand in guest memory.

use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};

use event_manager::EventSet;

use super::mmio::MmioTransport;
use super::{features, status, GuestMem, Slot, Sources, VirtioDevice};
use crate::devices::bus::BusDevice;

pub const MEM_SIZE: u64 = 0x10_0000;
pub const DESC: u64 = 0x1000;
pub const AVAIL: u64 = 0x2000;
pub const USED: u64 = 0x3000;
/// Guest buffers for requests start here.
pub const DATA: u64 = 0x1_0000;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// A device in its slot, as the transport and the event loop share it.
pub type TestSlot<D> = Arc<Mutex<Slot<D>>>;

pub fn slot<D: VirtioDevice>(device: D) -> TestSlot<D> {
    Arc::new(Mutex::new(Slot::new(device)))
}

/// Event sources for a device with none, or whose registrations a test
/// does not look at: every call succeeds.
pub struct NoSources;

impl Sources for NoSources {
    fn add(&mut self, _: std::os::fd::RawFd, _: u32, _: EventSet) -> std::io::Result<()> {
        Ok(())
    }
    fn modify(&mut self, _: std::os::fd::RawFd, _: u32, _: EventSet) -> std::io::Result<()> {
        Ok(())
    }
    fn remove(&mut self, _: std::os::fd::RawFd) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the event loop does when the driver notifies queue `index`.
pub fn process<D: VirtioDevice>(dev: &TestSlot<D>, index: usize) -> bool {
    dev.lock().unwrap().process_queue(index, &mut NoSources)
}

pub fn guest_mem() -> GuestMem {
    GuestMem::from_ranges(&[(GuestAddress(0), usize::try_from(MEM_SIZE).unwrap())]).unwrap()
}

pub struct Driver {
    pub t: Arc<Mutex<MmioTransport>>,
    pub mem: GuestMem,
    pub qsize: u16,
    avail_idx: u16,
}

impl Driver {
    pub fn new<D: VirtioDevice + 'static>(dev: TestSlot<D>, mem: GuestMem) -> Self {
        let t = MmioTransport::new(dev, mem.clone()).unwrap();
        Self::from_transport(Arc::new(Mutex::new(t)), mem)
    }

    pub fn from_transport(t: Arc<Mutex<MmioTransport>>, mem: GuestMem) -> Self {
        Self {
            t,
            mem,
            qsize: 16,
            avail_idx: 0,
        }
    }

    pub fn read(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.lock().unwrap().read(off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn write(&mut self, off: u64, v: u32) {
        self.t.lock().unwrap().write(off, &v.to_le_bytes());
    }

    pub fn status(&mut self) -> u32 {
        self.read(0x70)
    }

    /// ACKNOWLEDGE, DRIVER, accept `feats`, FEATURES_OK. Returns whether
    /// the device kept FEATURES_OK.
    pub fn negotiate(&mut self, feats: u64) -> bool {
        self.write(0x70, status::ACKNOWLEDGE);
        self.write(0x70, status::ACKNOWLEDGE | status::DRIVER);
        self.write(0x24, 0);
        self.write(0x20, u32::try_from(feats & 0xffff_ffff).unwrap());
        self.write(0x24, 1);
        self.write(0x20, u32::try_from(feats >> 32).unwrap());
        self.write(
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        self.status() & status::FEATURES_OK != 0
    }

    /// Programs queue 0 with `size` at the standard addresses and enables it.
    pub fn setup_queue(&mut self, size: u32) {
        self.write(0x30, 0);
        self.write(0x38, size);
        self.write(0x80, u32::try_from(DESC).unwrap());
        self.write(0x84, 0);
        self.write(0x90, u32::try_from(AVAIL).unwrap());
        self.write(0x94, 0);
        self.write(0xa0, u32::try_from(USED).unwrap());
        self.write(0xa4, 0);
        self.write(0x44, 1);
        if let Ok(s) = u16::try_from(size) {
            self.qsize = s;
        }
    }

    pub fn driver_ok(&mut self) {
        let s = self.status();
        self.write(0x70, s | status::DRIVER_OK);
    }

    /// The whole init sequence with VERSION_1 (+ `extra` features).
    pub fn init(&mut self, extra: u64) {
        assert!(self.negotiate(features::VIRTIO_F_VERSION_1 | extra));
        self.setup_queue(16);
        assert_eq!(self.read(0x44), 1);
        self.driver_ok();
        assert_eq!(self.status() & status::DRIVER_OK, status::DRIVER_OK);
    }

    pub fn set_desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let base = table + u64::from(i) * 16;
        self.mem.write_obj(addr, GuestAddress(base)).unwrap();
        self.mem.write_obj(len, GuestAddress(base + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(base + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(base + 14)).unwrap();
    }

    /// Writes a chain of `(addr, len, writable)` descriptors starting at
    /// descriptor `head` in the main table.
    pub fn chain(&self, head: u16, descs: &[(u64, u32, bool)]) {
        for (k, &(addr, len, w)) in descs.iter().enumerate() {
            let i = head + u16::try_from(k).unwrap();
            let mut flags = if w { F_WRITE } else { 0 };
            if k + 1 < descs.len() {
                flags |= F_NEXT;
            }
            self.set_desc(DESC, i, addr, len, flags, i + 1);
        }
    }

    /// Makes `head` available and returns the new avail idx.
    pub fn push_avail(&mut self, head: u16) -> u16 {
        let slot = u64::from(self.avail_idx % self.qsize);
        self.mem
            .write_obj(head, GuestAddress(AVAIL + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
        self.avail_idx
    }

    /// Overrides the avail idx (hostile drivers).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.mem.write_obj(idx, GuestAddress(AVAIL + 2)).unwrap();
    }

    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// (id, len) of used ring entry `i`.
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let slot = u64::from(i % self.qsize);
        let id = self
            .mem
            .read_obj(GuestAddress(USED + 4 + 8 * slot))
            .unwrap();
        let len = self
            .mem
            .read_obj(GuestAddress(USED + 8 + 8 * slot))
            .unwrap();
        (id, len)
    }

    pub fn needs_reset(&mut self) -> bool {
        self.status() & status::DEVICE_NEEDS_RESET != 0
    }
}
