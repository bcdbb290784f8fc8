//! Virtio devices (virtio 1.2) behind the virtio-mmio transport.
//!
//! The split is the one the spec makes:
//! - a [`VirtioDevice`] (block, rng) knows its queues, features and config
//!   space, and processes requests; it never sees the bus;
//! - the [`mmio::MmioTransport`] is what the guest reaches through MMIO exits
//!   (`BusDevice`): it negotiates features, collects the queue layout and
//!   activates the device at DRIVER_OK;
//! - a [`subscriber::QueueSubscriber`] runs the device's queue processing on
//!   the VMM's event-manager thread, never on a vCPU thread.
//!
//! The builder creates a device with [`new_block`] or [`new_rng`] and wires
//! the returned [`VirtioMmioDevice`] (see its documentation).

pub mod block;
pub mod mmio;
pub mod queue;
pub mod rng;
pub mod subscriber;

#[cfg(test)]
pub(crate) mod test_utils;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;
use log::warn;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

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
    /// §5.2 block device.
    pub const BLOCK: u32 = 2;
    /// §5.4 entropy device.
    pub const RNG: u32 = 4;
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
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("virtio-blk: {0}")]
    Block(#[from] block::Error),
    #[error("virtio queue: {0}")]
    Queue(#[from] queue::Error),
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
            evt: Arc::new(EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?),
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

    /// The eventfd signalled on every interrupt (the builder's irqfd).
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct ActivateContext {
    /// All guest memory; fixed for the VM's life.
    pub mem: GuestMem,
    /// The queues, validated, in index order, with event index set if negotiated.
    pub queues: Vec<Queue>,
    /// The features the driver accepted (a subset of the offered ones).
    pub acked_features: u64,
    /// Where to signal used buffers, config changes and fatal errors.
    pub interrupt: Interrupt,
}

/// A virtio device, independent of the transport.
///
/// All methods may be called from a vCPU thread (through the transport) or
/// from the event-manager thread ([`VirtioDevice::process_queue`]); the device
/// sits behind a mutex shared by both.
pub trait VirtioDevice: Send {
    /// The virtio device ID (§5).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; the length is the number of queues.
    /// Every size is a power of two, at most 32768.
    fn queue_max_sizes(&self) -> &[u16];
    /// The feature bits the device offers, including [`features::VIRTIO_F_VERSION_1`].
    fn avail_features(&self) -> u64;
    /// Reads `data.len()` bytes of the device-specific config space at `offset`.
    /// Bytes outside the config space read as all ones.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific config space; read-only fields are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device once the driver set DRIVER_OK.
    fn activate(&mut self, ctx: ActivateContext);
    /// Whether the device is activated (and not reset since).
    fn is_activated(&self) -> bool;
    /// Returns the device to its initial state: drops queues and memory.
    fn reset(&mut self);
    /// Processes the available buffers of queue `index`. Called on the
    /// event-manager thread when the queue is notified. Does nothing when the
    /// device is not activated or needs a reset. Returns true when buffers
    /// may be left (a work budget ran out): the caller must call it again
    /// later, after letting other event sources run.
    fn process_queue(&mut self, index: usize) -> bool;
}

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
    /// Goes on the MMIO bus (as a `bus::SharedDevice`).
    pub transport: Arc<Mutex<MmioTransport>>,
    /// Goes in the event manager.
    pub subscriber: Arc<Mutex<dyn MutEventSubscriber + Send>>,
    /// KVM irqfd for the device's GSI.
    pub irq_evt: EventFd,
    /// KVM ioeventfds at `base + 0x50`, datamatch = index.
    pub queue_evts: Vec<EventFd>,
}

fn assemble<D: VirtioDevice + 'static>(
    device: D,
    mem: GuestMem,
) -> Result<VirtioMmioDevice, Error> {
    let device = Arc::new(Mutex::new(device));
    let transport = MmioTransport::new(device.clone(), mem)?;
    let subscriber = subscriber::QueueSubscriber::new(device, &transport)?;
    let irq_evt = transport
        .interrupt()
        .eventfd()
        .try_clone()
        .map_err(Error::EventFd)?;
    let queue_evts = transport
        .queue_evts()
        .iter()
        .map(|e| e.try_clone().map_err(Error::EventFd))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(VirtioMmioDevice {
        transport: Arc::new(Mutex::new(transport)),
        subscriber: Arc::new(Mutex::new(subscriber)),
        irq_evt,
        queue_evts,
    })
}

/// The kernel command-line parameter announcing a virtio-mmio device at
/// `base` (4 KiB window) raising `gsi`, e.g.
/// `virtio_mmio.device=4K@0xd0000000:5`.
pub fn cmdline_param(base: u64, gsi: u32) -> String {
    format!("virtio_mmio.device=4K@{base:#x}:{gsi}")
}

/// Creates a virtio-blk device backed by `opts.path`.
pub fn new_block(opts: BlockOptions, mem: GuestMem) -> Result<VirtioMmioDevice, Error> {
    assemble(block::Block::new(opts)?, mem)
}

/// Creates a virtio-rng device fed by the host's `getrandom`.
pub fn new_rng(mem: GuestMem) -> Result<VirtioMmioDevice, Error> {
    assemble(rng::Rng::new(), mem)
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
