//! Event-loop glue: runs a device's queue processing, and the event sources
//! the device brings itself, on the event-manager thread.
//!
//! The subscriber always watches the transport's activation eventfd. When it
//! fires (the driver set DRIVER_OK, or reset the device), the subscriber
//! starts or stops watching the queue eventfds and lets the device bring its
//! own sources up to date. A queue eventfd firing makes the device process
//! that queue; one of the device's sources firing goes to
//! [`VirtioDevice::process_source`](super::VirtioDevice::process_source).

use std::os::fd::RawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, error};
use vmm_sys_util::eventfd::EventFd;

use super::{Error, MmioTransport, SharedSlot, Sources};
use crate::devices::bus::lock;

/// `Events` data of the activation eventfd; queue `i` uses `i + 1`.
const ACTIVATE_DATA: u32 = 0;
/// `Events` data of a device's own source: its token with this bit set.
const SOURCE_BIT: u32 = 1 << 31;

/// [`Sources`] over the event manager's operations, tagging tokens so
/// they come back to the device.
struct LoopSources<'a, 'b>(&'a mut EventOps<'b>);

fn source_data(token: u32) -> std::io::Result<u32> {
    if token & SOURCE_BIT != 0 {
        return Err(std::io::Error::other(format!(
            "event source token {token:#x} is not below 2^31"
        )));
    }
    Ok(token | SOURCE_BIT)
}

fn io_error(e: event_manager::Error) -> std::io::Error {
    std::io::Error::other(format!("{e:?}"))
}

impl Sources for LoopSources<'_, '_> {
    fn add(&mut self, fd: RawFd, token: u32, events: EventSet) -> std::io::Result<()> {
        let data = source_data(token)?;
        self.0
            .add(Events::with_data_raw(fd, data, events))
            .map_err(io_error)
    }

    fn modify(&mut self, fd: RawFd, token: u32, events: EventSet) -> std::io::Result<()> {
        let data = source_data(token)?;
        self.0
            .modify(Events::with_data_raw(fd, data, events))
            .map_err(io_error)
    }

    fn remove(&mut self, fd: RawFd) -> std::io::Result<()> {
        self.0.remove(Events::empty_raw(fd)).map_err(io_error)
    }
}

/// Watches the eventfds and sources of one device; see the module
/// documentation.
pub struct DeviceSubscriber {
    slot: SharedSlot,
    activate_evt: EventFd,
    queue_evts: Vec<EventFd>,
    watching_queues: bool,
}

impl DeviceSubscriber {
    /// Shares `slot` with `transport` and clones the transport's eventfds.
    pub fn new(slot: SharedSlot, transport: &MmioTransport) -> Result<Self, Error> {
        let queue_evts = transport.clone_queue_evts()?;
        Ok(Self {
            slot,
            activate_evt: transport
                .activate_evt()
                .try_clone()
                .map_err(Error::EventFd)?,
            queue_evts,
            watching_queues: false,
        })
    }

    /// Follows the device's activation: queue eventfds watched while it is
    /// active, and the device's own sources brought up to date.
    fn sync(&mut self, ops: &mut EventOps) {
        let active = {
            let mut slot = lock(&self.slot);
            slot.sync_sources(&mut LoopSources(ops));
            // A device that waits on its queues itself gets no queue events.
            slot.is_active() && !slot.device.waits_on_queues()
        };
        if active == self.watching_queues {
            return;
        }
        for (i, evt) in self.queue_evts.iter().enumerate() {
            let res = if active {
                let Ok(data) = u32::try_from(i + 1) else {
                    continue;
                };
                ops.add(Events::with_data(evt, data, EventSet::IN))
            } else {
                ops.remove(Events::new(evt, EventSet::IN))
            };
            if let Err(e) = res {
                error!("virtio: cannot (un)watch queue {i} eventfd: {e:?}");
            }
        }
        self.watching_queues = active;
    }

    /// Processes queue `i`; if work is left, re-signals its eventfd so the
    /// event loop comes back to it after serving other sources.
    fn run_queue(&self, i: usize, ops: &mut EventOps) {
        let more = lock(&self.slot).process_queue(i, &mut LoopSources(ops));
        if more {
            if let Some(evt) = self.queue_evts.get(i) {
                if let Err(e) = evt.write(1) {
                    error!("virtio: cannot re-signal queue {i}: {e}");
                }
            }
        }
    }
}

impl MutEventSubscriber for DeviceSubscriber {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            ACTIVATE_DATA,
            EventSet::IN,
        )) {
            error!("virtio: cannot watch the activation eventfd: {e:?}");
        }
        // Also covers a device activated before the subscriber was added.
        self.sync(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            ACTIVATE_DATA => {
                let _ = self.activate_evt.read();
                self.sync(ops);
                if self.watching_queues {
                    // Buffers may have been made available before the queue
                    // eventfds were watched.
                    for i in 0..self.queue_evts.len() {
                        self.run_queue(i, ops);
                    }
                }
            }
            data if data & SOURCE_BIT != 0 => {
                lock(&self.slot).process_source(
                    data & !SOURCE_BIT,
                    events.event_set(),
                    &mut LoopSources(ops),
                );
            }
            data => {
                let i = usize::try_from(data - 1).unwrap_or(usize::MAX);
                match self.queue_evts.get(i) {
                    Some(evt) => {
                        // Drains the counter; a failure means it was already 0.
                        let _ = evt.read();
                        self.run_queue(i, ops);
                    }
                    None => debug!("virtio: event for unknown queue data {data}"),
                }
            }
        }
    }
}
