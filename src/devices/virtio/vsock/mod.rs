//! virtio-vsock (virtio 1.2 §5.10): stream sockets between the guest and
//! host UNIX sockets, with Firecracker's host-side protocol ([`muxer`]).
//!
//! Three queues: the guest's receive buffers (rx), its packets (tx), and
//! events (the device's TRANSPORT_RESET, sent after a snapshot restore).
//! Packets are parsed out of descriptor chains by the `virtio-vsock`
//! crate; connections and flow control are in [`conn`], the host sockets
//! and the connection table in [`muxer`].

pub mod conn;
pub mod muxer;
pub mod packet;
pub mod uds;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

use event_manager::EventSet;
use log::debug;
use virtio_vsock::packet::VsockPacket;
use vm_memory::{Bytes, GuestMemory as _};

use self::conn::MAX_PKT_DATA;
use self::muxer::Muxer;
use self::packet::{Header, HEADER_SIZE};
use super::queue::{Outcome, MAX_CHAINS_PER_DRAIN};
use super::{device_type, features, read_config_space, Active, Sources, VirtioDevice};

/// §5.10.2: receiveq, transmitq, eventq.
pub const RXQ: usize = 0;
pub const TXQ: usize = 1;
pub const EVQ: usize = 2;
const QUEUE_SIZES: &[u16] = &[256, 256, 16];
/// §5.10.3: stream sockets (implied when no type feature is negotiated).
pub const VIRTIO_VSOCK_F_STREAM: u64 = 1 << 0;
/// §5.10.6.1: event id of a transport reset.
const EVENT_TRANSPORT_RESET: u32 = 0;
/// §5.10.4: `le64 guest_cid`.
const CONFIG_SPACE_SIZE: usize = 8;

pub use self::muxer::Error;

/// How to build the device: the `vsock` config section.
#[derive(Debug, Clone)]
pub struct VsockOptions {
    /// The guest's address (3 or more).
    pub guest_cid: u32,
    /// Where host clients connect; guest connects to port P reach
    /// `<uds_path>_<P>`.
    pub uds_path: PathBuf,
}

pub struct Vsock {
    config: [u8; CONFIG_SPACE_SIZE],
    muxer: Muxer,
    /// A TRANSPORT_RESET event waits for an event buffer.
    reset_event: bool,
    bad_tx_chains: u64,
    bad_rx_chains: u64,
}

impl Vsock {
    /// Listens on `opts.uds_path` (refused if another process does).
    pub fn new(opts: &VsockOptions) -> Result<Self, Error> {
        let cid = u64::from(opts.guest_cid);
        Ok(Self {
            config: cid.to_le_bytes(),
            muxer: Muxer::new(cid, &opts.uds_path)?,
            reset_event: false,
            bad_tx_chains: 0,
            bad_rx_chains: 0,
        })
    }

    /// Drops every connection and tells the guest through the event queue
    /// (§5.10.6.1), as after a snapshot restore: the guest's sockets see a
    /// reset and its listeners stay.
    pub fn reset_transport(&mut self, active: Option<&mut Active>) {
        self.muxer.close_all();
        self.reset_event = true;
        if let Some(active) = active {
            self.fill_events(active);
        }
    }

    pub fn muxer(&self) -> &Muxer {
        &self.muxer
    }

    /// The guest's packets: each goes to the muxer; every chain is
    /// returned with nothing written.
    fn process_tx(&mut self, active: &mut Active) -> bool {
        let muxer = &mut self.muxer;
        let bad = &mut self.bad_tx_chains;
        active.drain(TXQ, |mut chain, mem| {
            match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(pkt) => muxer.guest_packet(&Header::of(&pkt), pkt.data_slice()),
                Err(e) => {
                    *bad += 1;
                    debug!("vsock: bad tx chain: {e}");
                }
            }
            Outcome::Used(0)
        })
    }

    /// Fills receive buffers with what the guest is owed. Returns true
    /// when the budget ran out with work left.
    fn fill_rx(&mut self, active: &mut Active) -> bool {
        let Some(mut rx) = active.queue(RXQ) else {
            return false;
        };
        let mem = rx.mem();
        let mut budget = MAX_CHAINS_PER_DRAIN;
        while self.muxer.has_rx() && budget > 0 {
            let Some(mut chain) = rx.pop() else {
                // Out of buffers: ask to be told when the guest adds some.
                if rx.enable_notification() {
                    continue;
                }
                break;
            };
            budget -= 1;
            let head = chain.head_index();
            // Any buffer size is taken; a packet never carries more than
            // MAX_PKT_DATA.
            let mut pkt = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, u32::MAX) {
                Ok(pkt) => pkt,
                Err(e) => {
                    self.bad_rx_chains += 1;
                    debug!("vsock: bad rx chain: {e}");
                    rx.add_used(head, 0);
                    continue;
                }
            };
            let mut hdr = Header::default();
            let Some(len) = self.muxer.next_rx(&mut hdr, pkt.data_slice()) else {
                rx.undo_pop();
                break;
            };
            hdr.len = len;
            if pkt.set_header_from_raw(&hdr.to_bytes()).is_err() {
                rx.fail();
                break;
            }
            rx.add_used(head, HEADER_SIZE + len);
        }
        budget == 0 && self.muxer.has_rx()
    }

    /// Delivers a pending TRANSPORT_RESET event.
    fn fill_events(&mut self, active: &mut Active) {
        if !self.reset_event {
            return;
        }
        let Some(mut evq) = active.queue(EVQ) else {
            return;
        };
        let Some(chain) = evq.pop() else {
            evq.enable_notification();
            return;
        };
        let head = chain.head_index();
        let mem = evq.mem();
        let written = chain
            .writable()
            .next()
            .filter(|d| d.len() >= 4 && mem.check_range(d.addr(), 4))
            .and_then(|d| mem.write_obj(EVENT_TRANSPORT_RESET, d.addr()).ok())
            .map_or(0, |()| 4);
        evq.add_used(head, written);
        if written == 4 {
            self.reset_event = false;
        }
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let c = self.muxer.counters();
        if c != muxer::Counters::default() || self.bad_tx_chains + self.bad_rx_chains > 0 {
            log::info!(
                "vsock: refused {} guest packets, {} connections at the cap, dropped {} resets \
                 (queue full), {} malformed tx and {} rx chains",
                c.refused_packets,
                c.refused_at_cap,
                c.dropped_control,
                self.bad_tx_chains,
                self.bad_rx_chains
            );
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    /// Connections are not saved (their host sockets belong to the process
    /// that took the snapshot): a restored device tells the guest with
    /// TRANSPORT_RESET (§5.10.6.1), as Firecracker does. Its sockets see a
    /// reset; its listeners stay. The snapshot records the guest's CID, which
    /// a restore must keep.
    fn save_state(&self) -> Result<Option<serde_json::Value>, super::state::Error> {
        Ok(Some(
            serde_json::json!({ "guest_cid": u64::from_le_bytes(self.config) }),
        ))
    }

    fn restore_state(
        &mut self,
        saved: Option<&serde_json::Value>,
    ) -> Result<(), super::state::Error> {
        let saved = saved
            .and_then(|v| v.get("guest_cid"))
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| {
                super::state::Error::Differs(
                    "the snapshot does not give the vsock's guest_cid".into(),
                )
            })?;
        let here = u64::from_le_bytes(self.config);
        if saved != here {
            return Err(super::state::Error::Differs(format!(
                "the snapshot's vsock guest_cid is {saved}, the config's {here}"
            )));
        }
        // Delivered once the restored device is active again.
        self.reset_event = true;
        Ok(())
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        features::COMMON | VIRTIO_VSOCK_F_STREAM
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config, offset, data);
    }

    fn reset(&mut self) {
        self.muxer.set_active(false);
        self.reset_event = false;
    }

    fn process_queue(
        &mut self,
        active: &mut Active,
        index: usize,
        sources: &mut dyn Sources,
    ) -> bool {
        let more = match index {
            TXQ => {
                let more_tx = self.process_tx(active);
                // The packets may have made replies.
                self.fill_rx(active) || more_tx
            }
            RXQ => self.fill_rx(active),
            EVQ => {
                self.fill_events(active);
                false
            }
            _ => false,
        };
        self.muxer.sync(sources);
        more
    }

    fn sync_sources(&mut self, active: Option<&mut Active>, sources: &mut dyn Sources) {
        self.muxer.set_active(active.is_some());
        if let Some(active) = active {
            self.fill_rx(active);
            self.fill_events(active);
        }
        self.muxer.sync(sources);
    }

    fn process_source(
        &mut self,
        active: Option<&mut Active>,
        token: u32,
        events: EventSet,
        sources: &mut dyn Sources,
    ) {
        self.muxer.host_event(token, events);
        if let Some(active) = active {
            if self.fill_rx(active) {
                // Budget out with work left: come back after other sources.
                self.muxer.kick();
            }
        }
        self.muxer.sync(sources);
    }
}
