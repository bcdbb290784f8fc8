//! The host side of a virtio-net device: a [`Backend`] moves whole frames,
//! each behind a 12-byte `virtio_net_hdr`, and its fd is the device's event
//! source. Two exist: [`super::tap::Tap`], an existing tap device, and
//! [`super::stream::Stream`], a UNIX stream socket speaking QEMU's stream
//! protocol (passt's).

use std::io;
use std::os::fd::RawFd;

/// The header in front of every frame a backend moves: virtio 1.2 §5.1.6's
/// `virtio_net_hdr` with `num_buffers` (always there with VERSION_1).
pub const VNET_HDR_LEN: usize = 12;

/// Where a virtio-net device's frames go and come from.
pub trait Backend: Send {
    /// Reads one frame, its header first, into `buf`; a frame longer than
    /// `buf` is cut short (the caller sees the buffer filled and drops it).
    /// `WouldBlock` when none is waiting.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame, its header first. `WouldBlock` when the host side
    /// is full: the frame was not taken.
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()>;
    /// The fd the event loop watches: readable when a frame may be waiting,
    /// writable when a backend that [`Backend::backpressure`]s can take
    /// frames again.
    fn fd(&self) -> RawFd;
    /// Whether frames with partial checksums and TCP segmentation left to
    /// do (`virtio_net_hdr` offloads) can go both ways. Without, the device
    /// completes the guest's partial checksums itself and segments nothing.
    fn offloads(&self) -> bool;
    /// Which `TUN_F_*` offloads frames read from the backend may use: what
    /// the guest accepted.
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;
    /// What `WouldBlock` from [`Backend::write_frame`] means: false (a tap)
    /// the frame is dropped, as a full NIC queue would; true (a stream) the
    /// guest's frames wait in its transmit queue until the fd is writable
    /// and [`Backend::flush`] has written what the backend holds.
    fn backpressure(&self) -> bool {
        false
    }
    /// Writes what an earlier [`Backend::write_frame`] left; `WouldBlock`
    /// while some of it is still waiting.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// Why the backend stopped working, in its own words when it has any
    /// (a helper process's last messages), for the warning that says so.
    fn explain_failure(&mut self) -> Option<String> {
        None
    }
}
