//! Virtio devices (virtio 1.2) behind the virtio-mmio transport.
//!
//! The split is the one the spec makes:
//! - a [`VirtioDevice`] (block, net, rng, vsock, fs) knows its queues, features and
//!   config space, and processes requests; it never sees the bus;
//! - a [`Slot`] holds the device and, between DRIVER_OK and reset, its
//!   [`Active`] state (memory, queues, features, interrupt): the activation
//!   and reset bookkeeping every device shares lives there, once;
//! - the [`mmio::MmioTransport`] is what the guest reaches through MMIO exits
//!   (`BusDevice`): it negotiates features, collects the queue layout and
//!   activates the slot at DRIVER_OK;
//! - a [`subscriber::DeviceSubscriber`] runs the device's queue processing,
//!   and the event sources the device brings itself ([`Sources`]: sockets,
//!   connections, timers), on the VMM's event-manager thread, never on a
//!   vCPU thread;
//! - [`queue::Cursor`] walks one queue for a device: chains in, used
//!   entries out, interrupts and DEVICE_NEEDS_RESET on a broken ring.
//! - [`state`] is what a snapshot keeps of a device: the transport's
//!   registers, the queues and the device's place in them, the device's own
//!   state; a restore re-activates an active device without the driver.
//!
//! A new device is one file implementing [`VirtioDevice`]; the builder wraps
//! it with [`VirtioMmioDevice::new`] and wires the result.

pub mod block;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod rng;
pub mod state;
pub mod subscriber;
pub mod vsock;

#[cfg(test)]
pub(crate) mod test_utils;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventSet, MutEventSubscriber};
use log::{debug, warn};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

pub use block::{BlockOptions, CacheMode};
pub use mmio::{MmioTransport, MMIO_REGION_SIZE, QUEUE_NOTIFY_OFFSET};

/// Guest memory as the devices see it. Cloning shares the mapping.
pub type GuestMem = GuestMemoryMmap<()>;

/// Device feature bits common to all device types (virtio 1.2 §6).
pub mod features {
    /// §6: the device supports indirect descriptors (§2.7.5.3).
    pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
    /// §6: used_event / avail_event notification suppression (§2.7.7, §2.7.10).
    pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
    /// §6: the device complies with virtio 1.x (modern interface only).
    pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
    /// Features every kiln device offers on top of its own.
    pub const COMMON: u64 =
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX;
}

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    /// §2.1: the guest has noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// §2.1: the guest knows how to drive the device.
    pub const DRIVER: u32 = 2;
    /// §2.1: the driver is set up and ready to drive the device.
    pub const DRIVER_OK: u32 = 4;
    /// §2.1: the driver has acknowledged the features it understands.
    pub const FEATURES_OK: u32 = 8;
    /// §2.1: the device hit an error it cannot recover from.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// §2.1: the guest gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// Bits of the InterruptStatus register (virtio 1.2 §4.2.2, offset 0x60).
pub mod interrupt_bits {
    /// The device used a buffer in at least one virtqueue.
    pub const USED_BUFFER: u32 = 1;
    /// The configuration of the device has changed.
    pub const CONFIG_CHANGE: u32 = 2;
}

/// Device IDs (virtio 1.2 §5).
pub mod device_type {
    /// §5.1 network device.
    pub const NET: u32 = 1;
    /// §5.2 block device.
    pub const BLOCK: u32 = 2;
    /// §5.4 entropy device.
    pub const RNG: u32 = 4;
    /// §5.10 socket device.
    pub const VSOCK: u32 = 19;
    /// §5.11 file system device.
    pub const FS: u32 = 26;
}

/// Reads `data.len()` bytes of a device's config space `config` at
/// `offset`; bytes outside it read as all ones.
pub(crate) fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    let range = usize::try_from(offset)
        .ok()
        .and_then(|start| Some(start..start.checked_add(data.len())?));
    match range.and_then(|r| config.get(r)) {
        Some(bytes) => data.copy_from_slice(bytes),
        None => data.fill(0xff),
    }
}

/// Low 32 bits of a 64-bit register pair.
pub(crate) fn lo32(v: u64) -> u32 {
    u32::try_from(v & 0xffff_ffff).unwrap_or(u32::MAX)
}

/// High 32 bits of a 64-bit register pair.
pub(crate) fn hi32(v: u64) -> u32 {
    u32::try_from(v >> 32).unwrap_or(u32::MAX)
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("invalid virtio queue")]
    Queue(#[from] queue::Error),
    #[error("queue {index} cannot be used")]
    UnusableQueue {
        index: usize,
        #[source]
        source: queue::Error,
    },
}

/// The interrupt line of one device: the InterruptStatus register, the
/// irqfd the builder registers on the device's GSI, and the device's
/// "needs reset" flag which the transport reports in the status register.
///
/// Cheap to clone; clones share the same state.
#[derive(Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    needs_reset: Arc<AtomicBool>,
    evt: Arc<EventFd>,
    /// How many times the device was marked DEVICE_NEEDS_RESET (for logs).
    warnings: Arc<AtomicU32>,
}

/// Warnings logged per device for DEVICE_NEEDS_RESET; later ones are debug.
const MAX_NEEDS_RESET_WARNINGS: u32 = 4;

impl Interrupt {
    pub(crate) fn new() -> Result<Self, Error> {
        Ok(Self {
            status: Arc::new(AtomicU32::new(0)),
            needs_reset: Arc::new(AtomicBool::new(false)),
            evt: Arc::new(EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(Error::EventFd)?),
            warnings: Arc::new(AtomicU32::new(0)),
        })
    }

    fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            // Only fails if the counter would overflow; the line is already high.
            log::debug!("virtio: cannot signal irqfd: {e}");
        }
    }

    /// Tells the driver that buffers were placed in a used ring.
    pub fn signal_used_queue(&self) {
        self.raise(interrupt_bits::USED_BUFFER);
    }

    /// Tells the driver that the configuration space (or the status) changed.
    pub fn signal_config_change(&self) {
        self.raise(interrupt_bits::CONFIG_CHANGE);
    }

    /// Marks the device DEVICE_NEEDS_RESET and tells the driver (§2.1.2).
    /// The device must stop processing its queues until it is reset.
    pub fn set_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::SeqCst) {
            // A guest can break and reset its device in a loop: only the
            // first few occurrences are worth a warning.
            if self.warnings.fetch_add(1, Ordering::Relaxed) < MAX_NEEDS_RESET_WARNINGS {
                warn!("virtio: guest driver error, device needs reset");
            } else {
                log::debug!("virtio: guest driver error, device needs reset");
            }
            self.signal_config_change();
        }
    }

    /// Whether the device was marked DEVICE_NEEDS_RESET since the last reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    /// Sets InterruptStatus and the "needs reset" flag from a snapshot,
    /// without signalling (see [`MmioTransport::replay_interrupt`]).
    fn restore(&self, status: u32, needs_reset: bool) {
        self.status.store(status, Ordering::SeqCst);
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
    }

    /// The eventfd signalled on every interrupt (the builder's irqfd).
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// What an activated device works with: guest memory, the queues the
/// driver enabled, the negotiated features and the interrupt. The [`Slot`]
/// keeps it from DRIVER_OK to the next reset and lends it to the device.
pub struct Active {
    /// All guest memory; fixed for the VM's life.
    pub mem: GuestMem,
    /// One queue per index the device declares. A queue the driver left
    /// disabled (allowed only where [`VirtioDevice::queue_optional`] says
    /// so) is not ready and is never processed.
    pub queues: Vec<Queue>,
    /// The features the driver accepted (a subset of the offered ones).
    pub acked_features: u64,
    /// Where to signal used buffers, config changes and fatal errors.
    pub interrupt: Interrupt,
    /// For a device that waits for the driver's notifications itself
    /// ([`VirtioDevice::waits_on_queues`]): one eventfd per queue, signalled
    /// on QueueNotify. Empty for the others.
    pub queue_evts: Vec<EventFd>,
}

impl Active {
    /// A cursor over queue `index` if the driver enabled it.
    pub fn queue(&mut self, index: usize) -> Option<queue::Cursor<'_>> {
        let q = self.queues.get_mut(index).filter(|q| q.ready())?;
        Some(queue::Cursor::new(q, &self.mem, &self.interrupt))
    }

    /// Runs [`queue::Cursor::drain`] on queue `index`: hands every available
    /// chain to `handle` and returns it in the used ring. Returns true when
    /// a work budget ran out and chains may be left.
    pub fn drain<F>(&mut self, index: usize, handle: F) -> bool
    where
        F: FnMut(DescriptorChain<&GuestMem>, &GuestMem) -> queue::Outcome,
    {
        self.queue(index).is_some_and(|c| c.drain(handle))
    }
}

/// Event sources a device owns beyond its queue eventfds (a listening
/// socket, its connections, a tap, a timer), registered with the event loop
/// through this interface. Events come back to
/// [`VirtioDevice::process_source`] with the `token` given here.
///
/// An fd must be removed before it is closed: the event loop refuses a new
/// fd with the number of one still registered.
pub trait Sources {
    /// Starts watching `fd` for `events`; `token` must be below 2^31.
    fn add(&mut self, fd: RawFd, token: u32, events: EventSet) -> std::io::Result<()>;
    /// Changes what `fd` is watched for.
    fn modify(&mut self, fd: RawFd, token: u32, events: EventSet) -> std::io::Result<()>;
    /// Stops watching `fd`.
    fn remove(&mut self, fd: RawFd) -> std::io::Result<()>;
}

/// A virtio device, independent of the transport.
///
/// The device sits in a [`Slot`] behind a mutex shared by the transport
/// (register accesses on vCPU threads: identification, config space,
/// activation, reset) and the event-loop glue (queue and source processing
/// on the event-manager thread). The slot does the bookkeeping every device
/// shares: the [`Active`] state between DRIVER_OK and reset, and never
/// processing a queue of an inactive device.
pub trait VirtioDevice: Send {
    /// The virtio device ID (§5).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; the length is the number of queues.
    /// Every size is a power of two, at most 32768.
    fn queue_max_sizes(&self) -> &[u16];
    /// Whether the driver may leave queue `index` disabled, given the
    /// features it accepted (§2.6: e.g. a control queue whose feature was
    /// not negotiated). Every queue is required unless the device says so.
    fn queue_optional(&self, _index: usize, _acked_features: u64) -> bool {
        false
    }
    /// The feature bits the device offers, including [`features::VIRTIO_F_VERSION_1`].
    fn avail_features(&self) -> u64;
    /// Reads `data.len()` bytes of the device-specific config space at
    /// `offset`. Bytes outside the config space read as all ones.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    /// Writes the device-specific config space; read-only fields are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        debug!(
            "virtio: {}-byte config write at {offset:#x} ignored",
            data.len()
        );
    }
    /// Whether the device waits on its queues' notification eventfds
    /// itself, on a thread of its own (they come in [`Active::queue_evts`]),
    /// instead of having the event loop call [`VirtioDevice::process_queue`]:
    /// a notification then costs no hop through the event loop.
    fn waits_on_queues(&self) -> bool {
        false
    }
    /// The driver set DRIVER_OK; `active` holds the validated queues. A
    /// device that processes a queue on its own thread takes it out of
    /// `active` (`std::mem::take`); the slot then keeps a disabled one.
    fn activate(&mut self, _active: &mut Active) {}
    /// The driver reset the device (§2.4): drop what belongs to the
    /// activation. Runs on a vCPU thread: event sources the device must
    /// close are removed in the next [`VirtioDevice::sync_sources`].
    fn reset(&mut self) {}
    /// Processes the available buffers of queue `index` (notified by the
    /// driver). Returns true when buffers may be left because a work budget
    /// ran out: the caller calls again after serving other event sources.
    fn process_queue(
        &mut self,
        active: &mut Active,
        index: usize,
        sources: &mut dyn Sources,
    ) -> bool;
    /// Brings the device's own event sources up to date: called when the
    /// device joins the event loop, after every activation and reset.
    fn sync_sources(&mut self, _active: Option<&mut Active>, _sources: &mut dyn Sources) {}
    /// The device's own state for a snapshot, beyond what the transport
    /// saves (registers, queues and where the device is in them). `None`:
    /// nothing to add. A device that cannot be snapshotted returns
    /// [`state::Error::Unsupported`].
    fn save_state(&self) -> Result<Option<serde_json::Value>, state::Error> {
        Ok(None)
    }
    /// Checks and takes back what [`VirtioDevice::save_state`] returned,
    /// on a device just built from the config, before the transport
    /// activates it again.
    fn restore_state(&mut self, state: Option<&serde_json::Value>) -> Result<(), state::Error> {
        match state {
            None => Ok(()),
            Some(_) => Err(state::Error::UnexpectedDeviceState),
        }
    }
    /// One of the device's own sources (registered with `token`) is ready.
    fn process_source(
        &mut self,
        _active: Option<&mut Active>,
        _token: u32,
        _events: EventSet,
        _sources: &mut dyn Sources,
    ) {
    }
}

/// A device and, while the driver runs it, its [`Active`] state. Shared by
/// the transport and the event-loop glue as `Arc<Mutex<Slot<dyn VirtioDevice>>>`.
pub struct Slot<D: ?Sized> {
    active: Option<Active>,
    pub device: D,
}

impl<D: VirtioDevice> Slot<D> {
    pub fn new(device: D) -> Self {
        Self {
            active: None,
            device,
        }
    }
}

impl<D: VirtioDevice + ?Sized> Slot<D> {
    /// Whether the driver set DRIVER_OK and has not reset the device since.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// The active state, between DRIVER_OK and reset.
    pub(crate) fn active(&self) -> Option<&Active> {
        self.active.as_ref()
    }

    /// The device and its active state, for work that comes from outside
    /// the event loop (e.g. a transport reset after a snapshot restore).
    pub fn parts(&mut self) -> (&mut D, Option<&mut Active>) {
        (&mut self.device, self.active.as_mut())
    }

    pub(crate) fn activate(&mut self, mut active: Active) {
        self.device.activate(&mut active);
        self.active = Some(active);
    }

    pub(crate) fn reset(&mut self) {
        self.active = None;
        self.device.reset();
    }

    /// Processes queue `index` if the device is active and healthy.
    pub(crate) fn process_queue(&mut self, index: usize, sources: &mut dyn Sources) -> bool {
        match self.active.as_mut() {
            Some(active) if !active.interrupt.needs_reset() => {
                self.device.process_queue(active, index, sources)
            }
            _ => false,
        }
    }

    pub(crate) fn sync_sources(&mut self, sources: &mut dyn Sources) {
        self.device.sync_sources(self.active.as_mut(), sources);
    }

    pub(crate) fn process_source(
        &mut self,
        token: u32,
        events: EventSet,
        sources: &mut dyn Sources,
    ) {
        self.device
            .process_source(self.active.as_mut(), token, events, sources);
    }
}

/// A device as the transport and the glue share it.
pub type SharedSlot = Arc<Mutex<Slot<dyn VirtioDevice>>>;

/// Everything the builder needs to wire one virtio-mmio device.
///
/// The builder must:
/// 1. insert `transport` on the MMIO bus at a 4 KiB-aligned `base`, length
///    [`mmio::MMIO_REGION_SIZE`] (0x1000);
/// 2. register `irq_evt` as a KVM irqfd on the device's GSI;
/// 3. register each `queue_evts[i]` as a KVM ioeventfd at guest physical
///    address `base + 0x50` ([`mmio::QUEUE_NOTIFY_OFFSET`]), 4 bytes, with
///    datamatch `i as u32`;
/// 4. add `subscriber` to the event manager;
/// 5. tell the guest kernel: `virtio_mmio.device=4K@0x<base>:<gsi>` on the
///    command line ([`cmdline_param`]) or in a device-tree node.
///
/// No resamplefd is needed (as in Firecracker): the driver reads and acks
/// InterruptStatus, and every new event writes the irqfd again.
///
/// `irq_evt` and `queue_evts` are clones of eventfds the transport and the
/// subscriber keep; dropping them after registration is fine.
pub struct VirtioMmioDevice {
    /// The virtio device ID (§5), for the VMM's device registry.
    pub device_type: u32,
    /// Goes on the MMIO bus (as a `bus::SharedDevice`).
    pub transport: Arc<Mutex<MmioTransport>>,
    /// Goes in the event manager.
    pub subscriber: Arc<Mutex<dyn MutEventSubscriber + Send>>,
    /// KVM irqfd for the device's GSI.
    pub irq_evt: EventFd,
    /// KVM ioeventfds at `base + 0x50`, datamatch = index.
    pub queue_evts: Vec<EventFd>,
}

impl VirtioMmioDevice {
    /// Puts `device` behind a virtio-mmio transport and its event-loop glue.
    pub fn new<D: VirtioDevice + 'static>(device: D, mem: GuestMem) -> Result<Self, Error> {
        let device_type = device.device_type();
        let slot: SharedSlot = Arc::new(Mutex::new(Slot::new(device)));
        let transport = MmioTransport::new(slot.clone(), mem)?;
        let subscriber = subscriber::DeviceSubscriber::new(slot, &transport)?;
        let irq_evt = transport
            .interrupt()
            .eventfd()
            .try_clone()
            .map_err(Error::EventFd)?;
        let queue_evts = transport.clone_queue_evts()?;
        Ok(Self {
            device_type,
            transport: Arc::new(Mutex::new(transport)),
            subscriber: Arc::new(Mutex::new(subscriber)),
            irq_evt,
            queue_evts,
        })
    }
}

/// The kernel command-line parameter announcing a virtio-mmio device at
/// `base` (4 KiB window) raising `gsi`, e.g.
/// `virtio_mmio.device=4K@0xd0000000:5`.
pub fn cmdline_param(base: u64, gsi: u32) -> String {
    format!("virtio_mmio.device=4K@{base:#x}:{gsi}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn cmdline_param_format() {
        assert_eq!(
            super::cmdline_param(0xd000_0000, 5),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
    }
}
