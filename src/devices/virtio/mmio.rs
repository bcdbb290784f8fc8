//! The virtio-mmio transport, version 2 (virtio 1.2 §4.2.2), modern only.
//!
//! Register accesses below the config space must be 32 bits wide and
//! aligned; other accesses are ignored (reads give all ones). The config
//! space at 0x100 accepts any width.

use log::debug;
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use virtio_queue::QueueT;

use super::queue::{Error as QueueError, QueueConfig};
use super::state::{self, Error as StateError, QueueSnapshot, TransportState};
use super::{
    features, hi32, interrupt_bits, lo32, status, Active, Error, GuestMem, Interrupt, SharedSlot,
    Slot, VirtioDevice,
};
use crate::devices::bus::{lock, BusDevice};

/// Size of the MMIO window of one device (the `4K` of `virtio_mmio.device=`).
pub const MMIO_REGION_SIZE: u64 = 0x1000;
/// Offset of QueueNotify, where the builder puts the queues' ioeventfds.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

/// §4.2.2: "virt" in little endian.
const MAGIC_VALUE: u32 = 0x7472_6976;
/// §4.2.2: version 2 is the modern (non-legacy) interface.
const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the guest ("KILN" is not a PCI vendor; any value works).
const VENDOR_ID: u32 = 0x4e4c_494b;

// Register offsets, §4.2.2 table "MMIO Device Register Layout".
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = QUEUE_NOTIFY_OFFSET;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_SHM_SEL: u64 = 0x0ac;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_LEN_HIGH: u64 = 0x0b4;
const REG_SHM_BASE_LOW: u64 = 0x0b8;
const REG_SHM_BASE_HIGH: u64 = 0x0bc;
const REG_QUEUE_RESET: u64 = 0x0c0;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
/// §4.2.2: the device-specific configuration space starts here.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

/// The virtio-mmio register file of one device.
pub struct MmioTransport {
    device: SharedSlot,
    mem: GuestMem,
    interrupt: Interrupt,
    /// Signalled on every queue notification (the builder's ioeventfds).
    queue_evts: Vec<EventFd>,
    /// Signalled when the device is activated or reset, so that the event
    /// loop starts or stops watching the queue eventfds.
    activate_evt: EventFd,
    queues: Vec<QueueConfig>,
    device_status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    /// The driver tried to accept a feature the device does not offer.
    acked_unoffered: bool,
    queue_sel: u32,
    config_generation: u32,
}

impl MmioTransport {
    /// Wraps `device`; `mem` is handed to it at activation.
    pub fn new(device: SharedSlot, mem: GuestMem) -> Result<Self, Error> {
        let max_sizes = lock(&device).device.queue_max_sizes().to_vec();
        let queues = max_sizes
            .iter()
            .map(|&m| QueueConfig::new(m))
            .collect::<Result<Vec<_>, _>>()?;
        let queue_evts = max_sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(Error::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            device,
            mem,
            interrupt: Interrupt::new()?,
            queue_evts,
            activate_evt: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(Error::EventFd)?,
            queues,
            device_status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            acked_unoffered: false,
            queue_sel: 0,
            config_generation: 0,
        })
    }

    /// The device's interrupt (its eventfd is the irqfd).
    pub fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }

    /// One eventfd per queue, signalled on QueueNotify.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// Clones of the queue eventfds, for KVM's ioeventfds and the event loop.
    pub fn clone_queue_evts(&self) -> Result<Vec<EventFd>, Error> {
        self.queue_evts
            .iter()
            .map(|e| e.try_clone().map_err(Error::EventFd))
            .collect()
    }

    /// Signalled whenever the device is activated or reset.
    pub fn activate_evt(&self) -> &EventFd {
        &self.activate_evt
    }

    /// The status register as the driver reads it.
    pub fn device_status(&self) -> u32 {
        let mut s = self.device_status;
        if self.interrupt.needs_reset() {
            s |= status::DEVICE_NEEDS_RESET;
        }
        s
    }

    fn selected_queue(&mut self) -> Option<&mut QueueConfig> {
        let i = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(i)
    }

    /// Queue registers are writable only before DRIVER_OK (§4.2.3.2), and
    /// only while the selected queue is disabled (except QueueReady itself).
    fn queue_writable(&self) -> bool {
        self.device_status & status::DRIVER_OK == 0 && !self.interrupt.needs_reset()
    }

    fn offered_features(&self) -> u64 {
        lock(&self.device).device.avail_features()
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => lock(&self.device).device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => {
                let f = self.offered_features();
                match self.device_features_sel {
                    0 => lo32(f),
                    1 => hi32(f),
                    _ => 0,
                }
            }
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.device_status(),
            // §4.2.2: a non-existent shared memory region has length -1.
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH | REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            // VIRTIO_F_RING_RESET is not offered: no queue is ever being reset.
            REG_QUEUE_RESET => 0,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                debug!("virtio-mmio: read of write-only or unknown register {offset:#x}");
                u32::MAX
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES => self.write_driver_features(v),
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM
            | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => self.write_queue_reg(offset, v),
            REG_QUEUE_READY => self.write_queue_ready(v),
            REG_QUEUE_NOTIFY => self.notify(v),
            REG_INTERRUPT_ACK => self.interrupt.ack(v),
            REG_STATUS => self.write_status(v),
            REG_SHM_SEL => {}
            _ => debug!("virtio-mmio: write to read-only or unknown register {offset:#x}"),
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        // §3.1.1: features are accepted between DRIVER and FEATURES_OK.
        let s = self.device_status;
        if s & status::DRIVER == 0 || s & status::FEATURES_OK != 0 {
            debug!("virtio-mmio: driver features written in status {s:#x}, ignored");
            return;
        }
        let offered = self.offered_features();
        let (shift, mask) = match self.driver_features_sel {
            0 => (0, 0xffff_ffffu64),
            1 => (32, 0xffff_ffff_0000_0000u64),
            _ => {
                // No feature exists past bit 63.
                if v != 0 {
                    self.acked_unoffered = true;
                }
                return;
            }
        };
        let value = u64::from(v) << shift;
        // Remember the attempt; FEATURES_OK will be refused.
        if value & !offered != 0 {
            self.acked_unoffered = true;
        }
        self.acked_features = (self.acked_features & !mask) | value;
    }

    fn write_queue_reg(&mut self, offset: u64, v: u32) {
        if !self.queue_writable() {
            debug!("virtio-mmio: queue register {offset:#x} written after DRIVER_OK, ignored");
            return;
        }
        let Some(q) = self.selected_queue() else {
            return;
        };
        if q.ready {
            debug!("virtio-mmio: queue register {offset:#x} written while queue enabled, ignored");
            return;
        }
        match offset {
            REG_QUEUE_NUM => q.size = v,
            REG_QUEUE_DESC_LOW => q.set_desc_lo(v),
            REG_QUEUE_DESC_HIGH => q.set_desc_hi(v),
            REG_QUEUE_DRIVER_LOW => q.set_avail_lo(v),
            REG_QUEUE_DRIVER_HIGH => q.set_avail_hi(v),
            REG_QUEUE_DEVICE_LOW => q.set_used_lo(v),
            REG_QUEUE_DEVICE_HIGH => q.set_used_hi(v),
            _ => {}
        }
    }

    fn write_queue_ready(&mut self, v: u32) {
        if !self.queue_writable() {
            debug!("virtio-mmio: QueueReady written after DRIVER_OK, ignored");
            return;
        }
        let features_ok = self.device_status & status::FEATURES_OK != 0;
        let mem = self.mem.clone();
        let Some(q) = self.selected_queue() else {
            return;
        };
        match v {
            0 => q.ready = false,
            1 if features_ok => match q.build(&mem, false) {
                Ok(_) => q.ready = true,
                // The queue stays disabled; the driver reads QueueReady back.
                Err(e) => debug!("virtio-mmio: queue refused: {e}"),
            },
            _ => debug!("virtio-mmio: QueueReady {v:#x} refused"),
        }
    }

    fn notify(&mut self, v: u32) {
        // Normally an ioeventfd catches this write before it exits to us.
        let evt = usize::try_from(v).ok().and_then(|i| self.queue_evts.get(i));
        match evt {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    debug!("virtio-mmio: cannot signal queue {v}: {e}");
                }
            }
            None => debug!("virtio-mmio: notify of unknown queue {v}"),
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.device_status;
        // §2.1.2: the driver never clears bits other than by a reset; the
        // device sets DEVICE_NEEDS_RESET itself.
        if v & old != old || v & status::DEVICE_NEEDS_RESET != 0 {
            debug!("virtio-mmio: status {old:#x} -> {v:#x} refused");
            return;
        }
        let new_bits = v & !old;
        if new_bits == status::FAILED {
            self.device_status = v;
            return;
        }
        // §3.1.1: one step at a time, in this order.
        let expected = match old & !status::FAILED {
            0 => status::ACKNOWLEDGE,
            s if s == status::ACKNOWLEDGE => status::DRIVER,
            s if s == status::ACKNOWLEDGE | status::DRIVER => status::FEATURES_OK,
            s if s == status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK => {
                status::DRIVER_OK
            }
            _ => 0,
        };
        if new_bits & !status::FAILED != expected {
            debug!("virtio-mmio: status {old:#x} -> {v:#x} out of order, refused");
            return;
        }
        match expected {
            status::FEATURES_OK => {
                if !self.features_acceptable() {
                    // §3.1.1: the driver reads back and sees FEATURES_OK unset.
                    debug!(
                        "virtio-mmio: driver features {:#x} refused",
                        self.acked_features
                    );
                    return;
                }
                self.device_status = v;
            }
            status::DRIVER_OK => {
                self.device_status = v;
                self.activate();
            }
            _ => self.device_status = v,
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.offered_features();
        !self.acked_unoffered
            && self.acked_features & !offered == 0
            && self.acked_features & features::VIRTIO_F_VERSION_1 != 0
    }

    fn activate(&mut self) {
        let mut slot = lock(&self.device);
        match self.build_active(&slot, &[]) {
            Ok(active) => {
                slot.activate(active);
                drop(slot);
                self.kick_event_loop();
            }
            Err(e) => {
                match &e {
                    Error::UnusableQueue { .. } => {
                        debug!("virtio-mmio: DRIVER_OK refused: {}", crate::error_chain(&e))
                    }
                    _ => log::warn!(
                        "virtio-mmio: device not started: {}",
                        crate::error_chain(&e)
                    ),
                }
                drop(slot);
                self.interrupt.set_needs_reset();
            }
        }
    }

    /// What the device works with once active: its queues built from
    /// their configuration (queue `i` placed at `positions[i]`, as
    /// `(next_avail, next_used)`, when given), the features, the interrupt.
    fn build_active(
        &self,
        slot: &Slot<dyn VirtioDevice>,
        positions: &[(u16, u16)],
    ) -> Result<Active, Error> {
        let event_idx = self.acked_features & features::VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            let mut built = if q.ready {
                q.build(&self.mem, event_idx)
            } else if slot.device.queue_optional(i, self.acked_features) {
                // Left disabled, as the device type allows: never processed.
                q.build_disabled()
            } else {
                Err(QueueError::Disabled)
            }
            .map_err(|source| Error::UnusableQueue { index: i, source })?;
            if let Some(&(next_avail, next_used)) = positions.get(i) {
                built.set_next_avail(next_avail);
                built.set_next_used(next_used);
            }
            queues.push(built);
        }
        let queue_evts = if slot.device.waits_on_queues() {
            self.clone_queue_evts()?
        } else {
            Vec::new()
        };
        Ok(Active {
            mem: self.mem.clone(),
            queues,
            acked_features: self.acked_features,
            interrupt: self.interrupt.clone(),
            queue_evts,
        })
    }

    fn kick_event_loop(&self) {
        if let Err(e) = self.activate_evt.write(1) {
            debug!("virtio-mmio: cannot signal activation: {e}");
        }
    }

    /// §2.4 device reset: back to the initial state.
    fn reset(&mut self) {
        let was_active = {
            let mut slot = lock(&self.device);
            let active = slot.is_active();
            slot.reset();
            active
        };
        for q in &mut self.queues {
            q.reset();
        }
        self.device_status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.acked_unoffered = false;
        self.queue_sel = 0;
        self.interrupt.clear();
        if was_active {
            self.kick_event_loop();
        }
    }
}

/// Snapshots: see [`super::state`].
impl MmioTransport {
    /// The transport's state, its queues' and the device's own, for a
    /// snapshot. The VM must be paused and the event loop standing still,
    /// so that no queue is being processed.
    pub fn save_state(&self) -> Result<TransportState, StateError> {
        let slot = lock(&self.device);
        let device = slot.device.save_state()?;
        let running = slot.active().map(|a| a.queues.as_slice()).unwrap_or(&[]);
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| QueueSnapshot {
                size: q.size,
                ready: q.ready,
                desc_table: q.desc_table,
                avail_ring: q.avail_ring,
                used_ring: q.used_ring,
                next_avail: running.get(i).map_or(0, QueueT::next_avail),
                next_used: running.get(i).map_or(0, QueueT::next_used),
            })
            .collect();
        Ok(TransportState {
            device_status: self.device_status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            acked_unoffered: self.acked_unoffered,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            needs_reset: self.interrupt.needs_reset(),
            queues,
            device,
        })
    }

    /// Puts a saved state back into this transport, fresh from
    /// [`MmioTransport::new`] and before the guest runs. A device that was
    /// active (DRIVER_OK, not DEVICE_NEEDS_RESET) is activated again with
    /// its queues where they were, without the driver writing DRIVER_OK,
    /// and the event loop is told. Everything is checked as a driver's
    /// writes are first; a state no driver could have reached is refused.
    pub fn restore_state(&mut self, s: &TransportState) -> Result<(), StateError> {
        if !state::reachable_status(s.device_status) {
            return Err(StateError::Status(s.device_status));
        }
        let known = interrupt_bits::USED_BUFFER | interrupt_bits::CONFIG_CHANGE;
        if s.interrupt_status & !known != 0 {
            return Err(StateError::InterruptStatus(s.interrupt_status));
        }
        if s.queues.len() != self.queues.len() {
            return Err(StateError::QueueCount {
                found: s.queues.len(),
                expected: self.queues.len(),
            });
        }
        let features_ok = s.device_status & status::FEATURES_OK != 0;
        let offered = self.offered_features();
        if features_ok
            && (s.acked_unoffered
                || s.acked_features & !offered != 0
                || s.acked_features & features::VIRTIO_F_VERSION_1 == 0)
        {
            return Err(StateError::Features {
                acked: s.acked_features,
                offered,
            });
        }
        let mut queues = self.queues.clone();
        for (index, (q, saved)) in queues.iter_mut().zip(&s.queues).enumerate() {
            q.size = saved.size;
            q.ready = saved.ready;
            q.desc_table = saved.desc_table;
            q.avail_ring = saved.avail_ring;
            q.used_ring = saved.used_ring;
            // As QueueReady: only after FEATURES_OK, only a valid queue.
            if q.ready {
                if !features_ok {
                    return Err(StateError::ReadyTooEarly(index));
                }
                q.build(&self.mem, false)
                    .map_err(|source| StateError::Queue { index, source })?;
            }
        }
        lock(&self.device).device.restore_state(s.device.as_ref())?;

        self.queues = queues;
        self.device_status = s.device_status;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.acked_features = s.acked_features;
        self.acked_unoffered = s.acked_unoffered;
        self.queue_sel = s.queue_sel;
        self.config_generation = s.config_generation;
        self.interrupt.restore(s.interrupt_status, s.needs_reset);

        if s.device_status & status::DRIVER_OK != 0 && !s.needs_reset {
            let positions: Vec<(u16, u16)> = s
                .queues
                .iter()
                .map(|q| (q.next_avail, q.next_used))
                .collect();
            let mut slot = lock(&self.device);
            let active = self
                .build_active(&slot, &positions)
                .map_err(StateError::Activate)?;
            slot.activate(active);
            drop(slot);
            self.kick_event_loop();
        }
        Ok(())
    }

    /// Raises the interrupt again if the driver had not acknowledged it
    /// when the snapshot was taken: called once the restored VM's
    /// interrupt controllers are in place, so that an interrupt on its way
    /// at the snapshot is not lost. A driver that already saw it finds
    /// nothing new (virtio-mmio drivers check InterruptStatus).
    pub fn replay_interrupt(&self) {
        if self.interrupt.status() != 0 {
            if let Err(e) = self.interrupt.eventfd().write(1) {
                debug!("virtio-mmio: cannot signal irqfd: {e}");
            }
        }
    }
}

fn register_access(offset: u64, len: usize) -> bool {
    len == 4 && offset.is_multiple_of(4)
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            let off = offset - CONFIG_SPACE_OFFSET;
            lock(&self.device).device.read_config(off, data);
        } else if register_access(offset, data.len()) {
            let v = self.read_reg(offset);
            data.copy_from_slice(&v.to_le_bytes());
        } else {
            debug!(
                "virtio-mmio: {}-byte read at {offset:#x} ignored",
                data.len()
            );
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            let off = offset - CONFIG_SPACE_OFFSET;
            lock(&self.device).device.write_config(off, data);
        } else if let (true, Ok(bytes)) = (
            register_access(offset, data.len()),
            <[u8; 4]>::try_from(data),
        ) {
            self.write_reg(offset, u32::from_le_bytes(bytes));
        } else {
            debug!(
                "virtio-mmio: {}-byte write at {offset:#x} ignored",
                data.len()
            );
        }
    }
}

#[cfg(test)]
#[path = "mmio_tests.rs"]
mod tests;
