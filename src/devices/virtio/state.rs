//! What a snapshot keeps of a virtio-mmio device: the transport's registers,
//! each queue's configuration and, while the device is active, where the
//! device stands in the queue's rings; plus what the device type keeps
//! itself ([`VirtioDevice::save_state`](super::VirtioDevice::save_state)).
//!
//! Plain serde structs, versioned by the snapshot format
//! ([`crate::snapshot::FORMAT`]). [`MmioTransport::save_state`] writes them,
//! [`MmioTransport::restore_state`] reads them back into a transport built
//! from the config. A state file comes from the user's disk, not from the
//! guest, but a restore checks it as strictly as a driver's register
//! writes: a value a driver could not have set is refused, never a panic.
//!
//! [`MmioTransport::save_state`]: super::MmioTransport::save_state
//! [`MmioTransport::restore_state`]: super::MmioTransport::restore_state

use serde::{Deserialize, Serialize};

use super::{queue, status};

/// One queue: its registers as the driver wrote them, and where the device
/// is in its rings (`virtio_queue::QueueState`'s `next_avail` and
/// `next_used`; 0 while the device is not active).
///
/// virtio-queue's `num_added` (used entries added since the driver was
/// last notified) is not kept: a snapshot is taken between two passes over
/// the queues, each of which ends by notifying the driver if it must, so it
/// is 0 then.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// QueueNum as written (checked when the queue is ready).
    pub size: u32,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
}

/// The transport's state (virtio 1.2 §4.2.2 registers) and its queues'.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TransportState {
    /// Status as the driver set it (without DEVICE_NEEDS_RESET).
    pub device_status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    /// The driver tried to accept a feature the device does not offer.
    pub acked_unoffered: bool,
    pub queue_sel: u32,
    pub config_generation: u32,
    /// InterruptStatus: bits not yet acknowledged by the driver.
    pub interrupt_status: u32,
    /// The device set DEVICE_NEEDS_RESET.
    pub needs_reset: bool,
    /// One per queue the device declares.
    pub queues: Vec<QueueSnapshot>,
    /// The device type's own state, if it keeps any.
    pub device: Option<serde_json::Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("snapshots of {0} devices are not supported yet")]
    Unsupported(&'static str),
    #[error("device status {0:#x} is not one a driver can set")]
    Status(u32),
    #[error("interrupt status {0:#x} has bits no device raises")]
    InterruptStatus(u32),
    #[error("the snapshot has {found} queues, the device has {expected}")]
    QueueCount { found: usize, expected: usize },
    #[error("queue {0} is ready before FEATURES_OK")]
    ReadyTooEarly(usize),
    #[error("queue {index}")]
    Queue {
        index: usize,
        #[source]
        source: queue::Error,
    },
    #[error("accepted features {acked:#x} are not ones the device offers ({offered:#x}, with VERSION_1)")]
    Features { acked: u64, offered: u64 },
    #[error("the device cannot be started again")]
    Activate(#[source] super::Error),
    #[error("the snapshot holds device state this device type does not keep")]
    UnexpectedDeviceState,
    #[error("the device's own state is malformed")]
    Decode(#[source] serde_json::Error),
    #[error("the device's own state cannot be encoded")]
    Encode(#[source] serde_json::Error),
    #[error("{0}")]
    Differs(String),
    #[error("{0}")]
    InUse(String),
}

/// §3.1.1: the status bits a driver sets, one step at a time and in this
/// order; FAILED may come at any point.
const STEPS: [u32; 5] = [
    0,
    status::ACKNOWLEDGE,
    status::ACKNOWLEDGE | status::DRIVER,
    status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
];

/// Whether a driver can have brought the status register to `s`.
pub(crate) fn reachable_status(s: u32) -> bool {
    STEPS.contains(&(s & !status::FAILED))
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
