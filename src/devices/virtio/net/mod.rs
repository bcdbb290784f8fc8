//! virtio-net (virtio 1.2 §5.1): an Ethernet interface whose frames go to
//! and come from a host [`tap::Backend`] (a tap device).
//!
//! Two queues, receiveq and transmitq, both served on the event loop, and
//! the backend's fd as the device's event source:
//! - **transmit**: each chain from the guest is a 12-byte `virtio_net_hdr`
//!   and a frame; it is gathered into one buffer (at most the header plus
//!   MTU + Ethernet + VLAN headers), checked and written to the backend
//!   behind a header of kiln's own. A chain longer than that, one too short
//!   for the header and an Ethernet header, a header asking for offloads
//!   that were not negotiated, a device-writable buffer in the chain, or a
//!   backend that is full: the frame is dropped and counted, the chain
//!   returned. Nothing is queued on the host side.
//! - **receive**: frames are read from the backend only when the guest has
//!   posted a buffer for them, one at a time, straight into it; with no
//!   buffer the backend is not watched (its own queue holds, then drops,
//!   what arrives) until the guest posts some. A frame larger than the
//!   buffer is dropped and counted.
//!
//! Offloads (§5.1.6.2, §5.1.6.4): when the tap takes them, the device
//! offers checksum offload and TCP segmentation (v4, v6) both ways (no
//! ECN, UFO, mergeable buffers); the tap is told to hand over what the
//! guest accepted (`TUNSETOFFLOAD`), and nothing before the guest has
//! accepted it or after a reset. Headers are checked against the accepted
//! features both ways: a segmented frame may be 64 KiB, an unsegmented
//! one no longer than the MTU allows.
//!
//! The drop counters are logged when the device goes away (at exit).
//!
//! Snapshots keep the device: its MAC and MTU (a restore must give the
//! same), the queues (the transport's part). Frames in flight are not kept,
//! as a network may lose them; the tap is opened again from the config.

mod header;
pub mod tap;

#[cfg(test)]
mod tests;

use std::io;

use event_manager::EventSet;
use log::{debug, warn};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory as _};

use self::header::{
    check_tx_header, fix_rx_header, tun_offloads, TxCheck, HDR_F_NEEDS_CSUM, HDR_GSO_NONE,
    HDR_NUM_BUFFERS,
};
use self::tap::{Backend, VNET_HDR_LEN};
use super::queue::{Outcome, MAX_CHAINS_PER_DRAIN};
use super::{device_type, features, read_config_space, Active, GuestMem, Sources, VirtioDevice};
use crate::config::{parse_mac, NetworkInterfaceConfig};

/// §5.1.2: receiveq1, transmitq1 (no multiqueue, no control queue).
pub const RXQ: usize = 0;
pub const TXQ: usize = 1;
const QUEUE_SIZES: &[u16] = &[256, 256];

/// §5.1.3: the device takes frames with a partial checksum.
pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
/// §5.1.3: the driver takes frames with a partial checksum.
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
/// §5.1.3: the driver takes TCPv4 and TCPv6 frames still to be segmented.
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
/// §5.1.3: the device takes TCPv4 and TCPv6 frames still to be segmented.
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
/// The offloads offered when the backend has them (no ECN, UFO, USO).
pub const OFFLOADS: u64 = VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_GUEST_TSO6
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6;
/// §5.1.3: the device reports its maximum MTU in the config space.
pub const VIRTIO_NET_F_MTU: u64 = 1 << 3;
/// §5.1.3: the device has given a MAC address in the config space.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;

/// §5.1.4: `mac[6]`, `le16 status`, `le16 max_virtqueue_pairs`, `le16 mtu`.
const CONFIG_SPACE_SIZE: usize = 12;
const CONFIG_MTU_OFFSET: usize = 10;

/// The largest frame to be segmented: a 64 KiB IP packet.
const MAX_GSO_FRAME: usize = ETH_HLEN + VLAN_HLEN + 65535;

/// An Ethernet header: the shortest frame kiln forwards.
const ETH_HLEN: usize = 14;
/// An 802.1Q tag, allowed on top of the MTU.
const VLAN_HLEN: usize = 4;
/// The MTU announced when the config gives none (and the guest's default).
pub const DEFAULT_MTU: u16 = 1500;
/// Largest frame a backend is read into, header included; one more byte
/// tells a frame that did not fit.
const MAX_RX_FRAME: usize = VNET_HDR_LEN + MAX_GSO_FRAME;

/// The backend's token as an event source.
const BACKEND_TOKEN: u32 = 0;

/// Why a network device cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot {op} tap {name:?}")]
    Tap {
        name: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("guest_mac {0:?} is not a MAC address")]
    Mac(String),
}

/// How to build the device: one `network-interfaces` entry.
#[derive(Debug, Clone)]
pub struct NetOptions {
    /// The config's name for the interface (for logs).
    pub iface_id: String,
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// The MTU announced to the guest (`VIRTIO_NET_F_MTU`), if any.
    pub mtu: Option<u16>,
}

/// The device for one `network-interfaces` entry, on its tap.
pub fn from_config(iface: &NetworkInterfaceConfig) -> Result<Net, Error> {
    let mac = match &iface.guest_mac {
        Some(text) => parse_mac(text).ok_or_else(|| Error::Mac(text.clone()))?,
        None => derived_mac(&iface.host_dev_name, &iface.iface_id),
    };
    let tap = tap::Tap::open(&iface.host_dev_name)?;
    let opts = NetOptions {
        iface_id: iface.iface_id.clone(),
        mac,
        mtu: iface.mtu,
    };
    Ok(Net::new(&opts, Box::new(tap)))
}

/// A stable, locally administered unicast MAC for an interface the config
/// gives none: from a hash of the tap's name and the interface's id.
pub fn derived_mac(host_dev_name: &str, iface_id: &str) -> [u8; 6] {
    use sha2::{Digest, Sha256};
    let h = Sha256::new()
        .chain_update(b"kiln virtio-net\0")
        .chain_update(host_dev_name.as_bytes())
        .chain_update(b"\0")
        .chain_update(iface_id.as_bytes())
        .finalize();
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&h[..6]);
    // Locally administered (bit 1), unicast (bit 0 clear).
    mac[0] = (mac[0] & 0xfc) | 0x02;
    mac
}

/// What the device dropped or refused, logged at exit.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counters {
    pub tx_frames: u64,
    pub rx_frames: u64,
    /// Guest frames over the MTU (+ Ethernet and VLAN headers).
    pub tx_oversized: u64,
    /// Chains too short for the header and an Ethernet header.
    pub tx_short: u64,
    /// Headers asking for offloads that were not negotiated.
    pub tx_bad_header: u64,
    /// Chains with a device-writable buffer or outside guest memory.
    pub tx_bad_chain: u64,
    /// Frames the backend had no room for.
    pub tx_backend_full: u64,
    /// Frames the backend refused otherwise.
    pub tx_backend_error: u64,
    /// Host frames larger than the guest's buffer (or than any frame).
    pub rx_too_big: u64,
    /// Host frames too short or with a header the guest cannot take.
    pub rx_bad_frame: u64,
    /// Receive chains with a device-readable buffer, too short for the
    /// header, or outside guest memory.
    pub rx_bad_chain: u64,
}

impl Counters {
    fn dropped(&self) -> u64 {
        let Self {
            tx_frames: _,
            rx_frames: _,
            tx_oversized,
            tx_short,
            tx_bad_header,
            tx_bad_chain,
            tx_backend_full,
            tx_backend_error,
            rx_too_big,
            rx_bad_frame,
            rx_bad_chain,
        } = self;
        [
            tx_oversized,
            tx_short,
            tx_bad_header,
            tx_bad_chain,
            tx_backend_full,
            tx_backend_error,
            rx_too_big,
            rx_bad_frame,
            rx_bad_chain,
        ]
        .into_iter()
        .fold(0u64, |a, b| a.saturating_add(*b))
    }
}

/// A guest buffer to receive into: where and how long.
type Buffer = (GuestAddress, usize);

pub struct Net {
    iface_id: String,
    config: [u8; CONFIG_SPACE_SIZE],
    avail_features: u64,
    /// The longest frame the guest may send unsegmented, Ethernet header
    /// included.
    max_tx_frame: usize,
    /// The features the driver accepted (offloads), 0 while inactive.
    acked: u64,
    backend: Box<dyn Backend>,
    /// One frame at a time, either way.
    buf: Vec<u8>,
    /// The receive chain being filled (reused).
    rx_buffers: Vec<Buffer>,
    /// Whether the backend's fd is registered with the event loop.
    watching: bool,
    /// The guest has no receive buffer: the backend waits for one.
    rx_starved: bool,
    /// The backend failed (e.g. the tap was deleted): never watched again.
    broken: bool,
    counters: Counters,
}

impl Net {
    pub fn new(opts: &NetOptions, backend: Box<dyn Backend>) -> Self {
        let mtu = opts.mtu.unwrap_or(DEFAULT_MTU);
        let mut config = [0u8; CONFIG_SPACE_SIZE];
        config[..6].copy_from_slice(&opts.mac);
        // max_virtqueue_pairs: 1 (only read with VIRTIO_NET_F_MQ).
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[CONFIG_MTU_OFFSET..].copy_from_slice(&mtu.to_le_bytes());
        let mut avail_features = features::COMMON | VIRTIO_NET_F_MAC;
        if backend.offloads() {
            avail_features |= OFFLOADS;
        }
        if opts.mtu.is_some() {
            avail_features |= VIRTIO_NET_F_MTU;
        }
        Self {
            iface_id: opts.iface_id.clone(),
            config,
            avail_features,
            max_tx_frame: usize::from(mtu) + ETH_HLEN + VLAN_HLEN,
            acked: 0,
            backend,
            buf: vec![0; MAX_RX_FRAME + 1],
            rx_buffers: Vec::new(),
            watching: false,
            rx_starved: false,
            broken: false,
            counters: Counters::default(),
        }
    }

    /// What a snapshot records and a restore must match: the MAC, the MTU
    /// and whether it is announced.
    fn identity(&self) -> serde_json::Value {
        serde_json::json!({
            "mac": self.config[..6],
            "mtu": self.config[CONFIG_MTU_OFFSET..],
            "features": self.avail_features,
        })
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Watches the backend exactly while the device is active, the guest
    /// has receive buffers and the backend works.
    fn update_watch(&mut self, active: bool, sources: &mut dyn Sources) {
        let want = active && !self.rx_starved && !self.broken;
        if want == self.watching {
            return;
        }
        let fd = self.backend.fd();
        let res = if want {
            sources.add(fd, BACKEND_TOKEN, EventSet::IN)
        } else {
            sources.remove(fd)
        };
        match res {
            Ok(()) => self.watching = want,
            Err(e) => warn!("net {}: cannot (un)watch the tap: {e}", self.iface_id),
        }
    }

    fn backend_failed(&mut self, e: &io::Error) {
        if !self.broken {
            warn!(
                "net {}: the tap failed ({e}); the guest receives nothing more",
                self.iface_id
            );
            self.broken = true;
        }
    }

    /// The guest's frames: each chain is sent (or dropped) and returned.
    fn process_tx(&mut self, active: &mut Active) -> bool {
        active.drain(TXQ, |chain, mem| {
            self.transmit(chain, mem);
            Outcome::Used(0)
        })
    }

    /// Gathers, checks and sends one frame.
    fn transmit(&mut self, chain: DescriptorChain<&GuestMem>, mem: &GuestMem) {
        let tso = VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_HOST_TSO6;
        let limit = VNET_HDR_LEN
            + if self.acked & tso != 0 {
                MAX_GSO_FRAME.max(self.max_tx_frame)
            } else {
                self.max_tx_frame
            };
        let c = &mut self.counters;
        let mut len = 0usize;
        let mut cut_short = false;
        for desc in chain {
            cut_short = desc.has_next();
            if desc.is_write_only() {
                c.tx_bad_chain += 1;
                debug!(
                    "net {}: device-writable buffer in a tx chain",
                    self.iface_id
                );
                return;
            }
            let dlen = usize::try_from(desc.len()).unwrap_or(usize::MAX);
            let Some(end) = len.checked_add(dlen).filter(|&end| end <= limit) else {
                c.tx_oversized += 1;
                debug!("net {}: tx frame over {limit} bytes", self.iface_id);
                return;
            };
            let Some(dst) = self.buf.get_mut(len..end) else {
                c.tx_oversized += 1;
                return;
            };
            if mem.read_slice(dst, desc.addr()).is_err() {
                c.tx_bad_chain += 1;
                debug!("net {}: tx buffer outside guest memory", self.iface_id);
                return;
            }
            len = end;
        }
        // virtio-queue ends a chain that loops or names a descriptor past
        // the queue early, on a descriptor that still has NEXT.
        if cut_short {
            c.tx_bad_chain += 1;
            debug!("net {}: tx chain cut short (a loop?)", self.iface_id);
            return;
        }
        if len < VNET_HDR_LEN + ETH_HLEN {
            c.tx_short += 1;
            debug!("net {}: tx chain of {len} bytes", self.iface_id);
            return;
        }
        match check_tx_header(&self.buf[..len], self.acked, self.max_tx_frame) {
            TxCheck::Ok => {}
            TxCheck::Oversized => {
                c.tx_oversized += 1;
                debug!("net {}: unsegmented tx frame over the MTU", self.iface_id);
                return;
            }
            TxCheck::Bad(why) => {
                c.tx_bad_header += 1;
                debug!("net {}: bad tx header: {why}", self.iface_id);
                return;
            }
        }
        // The backend gets the checked fields only: checksum fields only
        // with NEEDS_CSUM, GSO fields only with a GSO type, num_buffers 0.
        if self.buf[0] & HDR_F_NEEDS_CSUM == 0 {
            self.buf[6..10].fill(0);
        }
        if self.buf[1] == HDR_GSO_NONE {
            self.buf[2..6].fill(0);
        }
        self.buf[HDR_NUM_BUFFERS..VNET_HDR_LEN].fill(0);
        match self.backend.write_frame(&self.buf[..len]) {
            Ok(()) => c.tx_frames += 1,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                c.tx_backend_full += 1;
                debug!("net {}: tap full, tx frame dropped", self.iface_id);
            }
            Err(e) => {
                c.tx_backend_error += 1;
                debug!("net {}: tap refused a frame: {e}", self.iface_id);
            }
        }
    }

    /// Collects the receive chain's buffers into `rx_buffers`; false when
    /// the chain cannot take a frame (a device-readable buffer, one outside
    /// guest memory, less room than the header, or a chain virtio-queue cut
    /// short: a loop would count one buffer many times).
    fn rx_chain(&mut self, chain: DescriptorChain<&GuestMem>, mem: &GuestMem) -> bool {
        self.rx_buffers.clear();
        let mut room = 0usize;
        let mut cut_short = false;
        for desc in chain {
            cut_short = desc.has_next();
            let len = usize::try_from(desc.len()).unwrap_or(usize::MAX);
            if !desc.is_write_only() || !mem.check_range(desc.addr(), len) {
                return false;
            }
            room = room.saturating_add(len);
            self.rx_buffers.push((desc.addr(), len));
        }
        !cut_short && room >= VNET_HDR_LEN
    }

    /// Fills the guest's receive buffers with frames from the backend, one
    /// frame per chain. Returns true when the budget ran out.
    fn fill_rx(&mut self, active: &mut Active) -> bool {
        if self.broken {
            return false;
        }
        let Some(mut rx) = active.queue(RXQ) else {
            return false;
        };
        let mem = rx.mem();
        let mut budget = MAX_CHAINS_PER_DRAIN;
        while budget > 0 {
            let Some(chain) = rx.pop() else {
                // Out of buffers: ask to be told when the guest adds some,
                // and leave the backend alone until then.
                if rx.enable_notification() {
                    continue;
                }
                self.rx_starved = true;
                break;
            };
            budget -= 1;
            let head = chain.head_index();
            if !self.rx_chain(chain, mem) {
                self.counters.rx_bad_chain += 1;
                debug!("net {}: unusable rx chain", self.iface_id);
                rx.add_used(head, 0);
                continue;
            }
            let n = match self.backend.read_frame(&mut self.buf) {
                Ok(n) => n,
                Err(e) => {
                    rx.undo_pop();
                    match e.kind() {
                        io::ErrorKind::WouldBlock => {}
                        io::ErrorKind::Interrupted => continue,
                        _ => self.backend_failed(&e),
                    }
                    break;
                }
            };
            // The chain stays available for the next frame when this one
            // is dropped.
            match self.deliver(n, mem) {
                Some(written) => rx.add_used(head, written),
                None => rx.undo_pop(),
            }
        }
        budget == 0
    }

    /// Checks the `n`-byte frame in `buf` and copies it into `rx_buffers`.
    /// Returns the bytes written, or None when the frame is dropped.
    fn deliver(&mut self, n: usize, mem: &GuestMem) -> Option<u32> {
        let c = &mut self.counters;
        if n >= self.buf.len() {
            c.rx_too_big += 1;
            debug!("net {}: rx frame over {MAX_RX_FRAME} bytes", self.iface_id);
            return None;
        }
        if n < VNET_HDR_LEN + ETH_HLEN {
            c.rx_bad_frame += 1;
            debug!("net {}: rx frame of {n} bytes", self.iface_id);
            return None;
        }
        if let Err(why) = fix_rx_header(&mut self.buf[..n], self.acked) {
            c.rx_bad_frame += 1;
            debug!("net {}: rx frame dropped: {why}", self.iface_id);
            return None;
        }
        // §5.1.6.4: num_buffers is 1 without VIRTIO_NET_F_MRG_RXBUF.
        self.buf[HDR_NUM_BUFFERS..VNET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
        let room = self
            .rx_buffers
            .iter()
            .fold(0usize, |a, &(_, len)| a.saturating_add(len));
        if n > room {
            c.rx_too_big += 1;
            debug!(
                "net {}: rx frame of {n} bytes, guest buffer of {room}",
                self.iface_id
            );
            return None;
        }
        let mut done = 0usize;
        for &(addr, len) in &self.rx_buffers {
            let take = len.min(n - done);
            if take == 0 {
                break;
            }
            // Checked in rx_chain: inside guest memory.
            if mem.write_slice(&self.buf[done..done + take], addr).is_err() {
                c.rx_bad_chain += 1;
                return Some(0);
            }
            done += take;
        }
        c.rx_frames += 1;
        // n <= MAX_RX_FRAME, which fits a u32.
        Some(u32::try_from(n).unwrap_or(0))
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let c = &self.counters;
        if c.dropped() > 0 {
            log::info!(
                "net {}: sent {} and received {} frames; dropped: tx {} over the MTU, {} too \
                 short, {} bad headers, {} bad chains, {} tap full, {} tap errors; rx {} too \
                 big, {} bad frames, {} bad chains",
                self.iface_id,
                c.tx_frames,
                c.rx_frames,
                c.tx_oversized,
                c.tx_short,
                c.tx_bad_header,
                c.tx_bad_chain,
                c.tx_backend_full,
                c.tx_backend_error,
                c.rx_too_big,
                c.rx_bad_frame,
                c.rx_bad_chain
            );
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config, offset, data);
    }

    fn activate(&mut self, active: &mut Active) {
        self.acked = active.acked_features;
        let flags = tun_offloads(self.acked);
        if let Err(e) = self.backend.set_offload(flags) {
            // The tap then hands over only complete frames: slower, correct.
            warn!(
                "net {}: cannot set the tap's offloads to {flags:#x}: {e}",
                self.iface_id
            );
        }
    }

    fn reset(&mut self) {
        self.rx_starved = false;
        self.acked = 0;
        if let Err(e) = self.backend.set_offload(0) {
            warn!(
                "net {}: cannot turn the tap's offloads off: {e}",
                self.iface_id
            );
        }
    }

    fn process_queue(
        &mut self,
        active: &mut Active,
        index: usize,
        sources: &mut dyn Sources,
    ) -> bool {
        let more = match index {
            TXQ => self.process_tx(active),
            RXQ => {
                // The guest posted buffers.
                self.rx_starved = false;
                self.fill_rx(active)
            }
            _ => false,
        };
        self.update_watch(true, sources);
        more
    }

    fn sync_sources(&mut self, active: Option<&mut Active>, sources: &mut dyn Sources) {
        let is_active = active.is_some();
        if let Some(active) = active {
            self.fill_rx(active);
        }
        self.update_watch(is_active, sources);
    }

    fn process_source(
        &mut self,
        active: Option<&mut Active>,
        _token: u32,
        events: EventSet,
        sources: &mut dyn Sources,
    ) {
        if events.intersects(EventSet::ERROR | EventSet::HANG_UP) {
            self.backend_failed(&io::Error::other("error or hang-up on its fd"));
        }
        let is_active = active.is_some();
        if let Some(active) = active {
            // A budget that ran out leaves the fd readable: the event loop
            // (level-triggered) comes back after serving the others.
            self.fill_rx(active);
        }
        self.update_watch(is_active, sources);
    }

    fn save_state(&self) -> Result<Option<serde_json::Value>, super::state::Error> {
        Ok(Some(self.identity()))
    }

    fn restore_state(
        &mut self,
        saved: Option<&serde_json::Value>,
    ) -> Result<(), super::state::Error> {
        let here = self.identity();
        match saved {
            Some(saved) if *saved == here => Ok(()),
            _ => Err(super::state::Error::Differs(format!(
                "network interface {:?}: the snapshot's MAC or MTU is not the config's",
                self.iface_id
            ))),
        }
    }
}
