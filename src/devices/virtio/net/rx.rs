//! The receive side of [`Net`]: frames from the backend into the guest's
//! receive chains (virtio 1.2 §5.1.6.4).
//!
//! A frame is read from the backend only when the guest has posted a chain,
//! checked, then placed:
//! - without `VIRTIO_NET_F_MRG_RXBUF`, in one chain; a frame larger than
//!   the chain is dropped and the chain kept for the next one;
//! - with it, across as many chains as it needs (`num_buffers` in the
//!   header says how many). When the guest has posted too few, the chains
//!   taken so far and the frame wait for more (one frame and at most a
//!   queue of chains: bounded); when the device holds the whole queue and
//!   still has too little room, the chains go back empty and the frame is
//!   dropped (the guest would never post more).
//!
//! Chains with a device-readable buffer, a buffer outside guest memory or
//! less room than the header go back empty and are counted.

use std::io;

use log::debug;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemory as _};

use super::backend::VNET_HDR_LEN;
use super::header::{fix_rx_header, HDR_NUM_BUFFERS};
use super::{Active, GuestMem, Net, ETH_HLEN, MAX_RX_FRAME, RXQ, VIRTIO_NET_F_MRG_RXBUF};
use crate::devices::virtio::queue::{Cursor, MAX_CHAINS_PER_DRAIN};

/// What became of the frame held.
enum Placed {
    /// In the guest's chains.
    Delivered,
    /// Dropped (counted); chains taken for it were returned or kept.
    Dropped,
    /// It waits for more chains.
    Starved,
}

impl Net {
    /// Fills the guest's receive chains with frames from the backend.
    /// Returns true when the budget ran out.
    pub(super) fn fill_rx(&mut self, active: &mut Active) -> bool {
        if self.broken {
            return false;
        }
        let Some(mut rx) = active.queue(RXQ) else {
            return false;
        };
        let mut budget = MAX_CHAINS_PER_DRAIN;
        while budget > 0 {
            if self.rx_held.is_none() {
                // Read a frame only for a guest that has a chain for it.
                if !self.has_chain(&mut rx, &mut budget) {
                    // Out of chains (not of budget): leave the backend
                    // alone until the guest posts some.
                    self.rx_starved = budget > 0;
                    break;
                }
                match self.backend.read_frame(&mut self.rx_buf) {
                    Ok(n) => {
                        if self.check_frame(n) {
                            self.rx_held = Some(n);
                        }
                        continue;
                    }
                    Err(e) => match e.kind() {
                        io::ErrorKind::WouldBlock => break,
                        io::ErrorKind::Interrupted => continue,
                        _ => {
                            self.backend_failed(&e);
                            break;
                        }
                    },
                }
            }
            match self.place(&mut rx, &mut budget) {
                Placed::Delivered => {
                    self.counters.rx_frames += 1;
                    self.rx_held = None;
                }
                Placed::Dropped => self.rx_held = None,
                Placed::Starved => {
                    self.rx_starved = true;
                    break;
                }
            }
        }
        budget == 0
    }

    /// Whether a usable chain is available, asking to be told when one is
    /// if not; unusable chains on the way go back empty.
    fn has_chain(&mut self, rx: &mut Cursor, budget: &mut usize) -> bool {
        let mem = rx.mem();
        while *budget > 0 {
            let Some(chain) = rx.pop() else {
                if rx.enable_notification() {
                    continue;
                }
                return false;
            };
            let head = chain.head_index();
            let held = self.rx_buffers.len();
            let usable = self.take_chain(chain, mem).is_some();
            self.rx_buffers.truncate(held);
            if usable {
                rx.undo_pop();
                return true;
            }
            *budget -= 1;
            self.counters.rx_bad_chain += 1;
            debug!("net {}: unusable rx chain", self.iface_id);
            rx.add_used(head, 0);
        }
        false
    }

    /// Checks the `n`-byte frame in `rx_buf` (header first) and makes its
    /// header one the guest may get; false when it is dropped.
    fn check_frame(&mut self, n: usize) -> bool {
        let c = &mut self.counters;
        if n >= self.rx_buf.len() {
            c.rx_too_big += 1;
            debug!("net {}: rx frame over {MAX_RX_FRAME} bytes", self.iface_id);
            return false;
        }
        if n < VNET_HDR_LEN + ETH_HLEN {
            c.rx_bad_frame += 1;
            debug!("net {}: rx frame of {n} bytes", self.iface_id);
            return false;
        }
        if let Err(why) = fix_rx_header(&mut self.rx_buf[..n], self.acked) {
            c.rx_bad_frame += 1;
            debug!("net {}: rx frame dropped: {why}", self.iface_id);
            return false;
        }
        true
    }

    /// Takes chains for the held frame until they have room for it, then
    /// writes it into them.
    fn place(&mut self, rx: &mut Cursor, budget: &mut usize) -> Placed {
        let Some(n) = self.rx_held else {
            return Placed::Dropped;
        };
        let mergeable = self.acked & VIRTIO_NET_F_MRG_RXBUF != 0;
        let mem = rx.mem();
        let mut room: usize = self.rx_chains.iter().map(|&(_, _, r)| r).sum();
        let most = usize::from(rx.size());
        while room < n {
            if self.rx_chains.len() >= most {
                self.counters.rx_too_big += 1;
                debug!(
                    "net {}: rx frame of {n} bytes, {room} bytes in {} chains",
                    self.iface_id,
                    self.rx_chains.len()
                );
                self.return_chains(rx);
                return Placed::Dropped;
            }
            let Some(chain) = rx.pop() else {
                if rx.enable_notification() {
                    continue;
                }
                return Placed::Starved;
            };
            *budget = budget.saturating_sub(1);
            let head = chain.head_index();
            let Some(chain_room) = self.take_chain(chain, mem) else {
                self.counters.rx_bad_chain += 1;
                debug!("net {}: unusable rx chain", self.iface_id);
                rx.add_used(head, 0);
                continue;
            };
            if !mergeable && chain_room < n {
                // One chain per frame: this one stays for the next frame.
                self.counters.rx_too_big += 1;
                debug!(
                    "net {}: rx frame of {n} bytes, guest buffer of {chain_room}",
                    self.iface_id
                );
                self.rx_buffers.clear();
                rx.undo_pop();
                return Placed::Dropped;
            }
            self.rx_chains
                .push((head, self.rx_buffers.len(), chain_room));
            room = room.saturating_add(chain_room);
        }
        self.write_out(rx, n)
    }

    /// Adds the chain's buffers to `rx_buffers`; its room, or None when it
    /// cannot take a frame's part (a device-readable buffer, one outside
    /// guest memory, less room than the header, or a chain virtio-queue cut
    /// short: a loop would count one buffer many times).
    fn take_chain(&mut self, chain: DescriptorChain<&GuestMem>, mem: &GuestMem) -> Option<usize> {
        let start = self.rx_buffers.len();
        let mut room = 0usize;
        let mut cut_short = false;
        for desc in chain {
            // virtio-queue ends a chain that loops, or names a descriptor
            // past the queue, early: on a descriptor that still has NEXT.
            cut_short = desc.has_next();
            let len = usize::try_from(desc.len()).unwrap_or(usize::MAX);
            if !desc.is_write_only() || !mem.check_range(desc.addr(), len) {
                self.rx_buffers.truncate(start);
                return None;
            }
            room = room.saturating_add(len);
            self.rx_buffers.push((desc.addr(), len));
        }
        if cut_short || room < VNET_HDR_LEN {
            self.rx_buffers.truncate(start);
            return None;
        }
        Some(room)
    }

    /// Writes the held `n`-byte frame across the chains taken and returns
    /// them to the guest.
    fn write_out(&mut self, rx: &mut Cursor, n: usize) -> Placed {
        let mem = rx.mem();
        // §5.1.6.4: how many chains the frame fills (1 without mergeable
        // buffers); at most a queue's size, so it fits.
        let count = u16::try_from(self.rx_chains.len()).unwrap_or(u16::MAX);
        self.rx_buf[HDR_NUM_BUFFERS..VNET_HDR_LEN].copy_from_slice(&count.to_le_bytes());
        let mut done = 0usize;
        let mut failed = false;
        let mut first = 0usize;
        for &(head, end, _) in &self.rx_chains {
            let mut written = 0usize;
            for &(addr, len) in &self.rx_buffers[first..end] {
                let take = len.min(n - done);
                if take == 0 || failed {
                    break;
                }
                // Checked in take_chain: inside guest memory.
                if mem
                    .write_slice(&self.rx_buf[done..done + take], addr)
                    .is_err()
                {
                    failed = true;
                    break;
                }
                done += take;
                written += take;
            }
            first = end;
            // At most a frame, which fits a u32.
            rx.add_used(head, u32::try_from(written).unwrap_or(0));
        }
        self.rx_chains.clear();
        self.rx_buffers.clear();
        if failed {
            self.counters.rx_bad_chain += 1;
            return Placed::Dropped;
        }
        Placed::Delivered
    }

    /// Gives the chains taken back to the guest, empty.
    fn return_chains(&mut self, rx: &mut Cursor) {
        for &(head, _, _) in &self.rx_chains {
            rx.add_used(head, 0);
        }
        self.rx_chains.clear();
        self.rx_buffers.clear();
    }
}
