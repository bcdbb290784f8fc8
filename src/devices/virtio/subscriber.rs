//! Event-loop glue: runs a device's queue processing on the event-manager
//! thread.
//!
//! The subscriber always watches the transport's activation eventfd. When it
//! fires, the subscriber looks at whether the device is active and starts (or
//! stops) watching the queue eventfds accordingly. A queue eventfd firing
//! makes the device process that queue.

use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, error};
use vmm_sys_util::eventfd::EventFd;

use super::{Error, MmioTransport, VirtioDevice};
use crate::devices::bus::lock;

/// `Events` data of the activation eventfd; queue `i` uses `i + 1`.
const ACTIVATE_DATA: u32 = 0;

/// Watches the eventfds of one device; see the module documentation.
pub struct QueueSubscriber<D: VirtioDevice> {
    device: Arc<Mutex<D>>,
    activate_evt: EventFd,
    queue_evts: Vec<EventFd>,
    watching_queues: bool,
}

impl<D: VirtioDevice> QueueSubscriber<D> {
    /// Shares `device` with `transport` and clones the transport's eventfds.
    pub fn new(device: Arc<Mutex<D>>, transport: &MmioTransport) -> Result<Self, Error> {
        let queue_evts = transport
            .queue_evts()
            .iter()
            .map(|e| e.try_clone().map_err(Error::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            device,
            activate_evt: transport
                .activate_evt()
                .try_clone()
                .map_err(Error::EventFd)?,
            queue_evts,
            watching_queues: false,
        })
    }

    fn sync_watch_list(&mut self, ops: &mut EventOps) {
        let active = lock(&self.device).is_activated();
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
                error!("virtio: cannot (un)watch queue {i} eventfd: {e}");
            }
        }
        self.watching_queues = active;
    }

    /// Processes queue `i`; if work is left, re-signals its eventfd so the
    /// event loop comes back to it after serving other sources.
    fn run_queue(&self, i: usize) {
        let more = lock(&self.device).process_queue(i);
        if more {
            if let Some(evt) = self.queue_evts.get(i) {
                if let Err(e) = evt.write(1) {
                    error!("virtio: cannot re-signal queue {i}: {e}");
                }
            }
        }
    }

    fn process_all(&mut self) {
        for i in 0..self.queue_evts.len() {
            self.run_queue(i);
        }
    }
}

impl<D: VirtioDevice> MutEventSubscriber for QueueSubscriber<D> {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            ACTIVATE_DATA,
            EventSet::IN,
        )) {
            error!("virtio: cannot watch the activation eventfd: {e}");
        }
        // In case the device was activated before the subscriber was added.
        self.sync_watch_list(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            ACTIVATE_DATA => {
                let _ = self.activate_evt.read();
                self.sync_watch_list(ops);
                if self.watching_queues {
                    // Buffers may have been made available before the queue
                    // eventfds were watched.
                    self.process_all();
                }
            }
            data => {
                let i = usize::try_from(data - 1).unwrap_or(usize::MAX);
                match self.queue_evts.get(i) {
                    Some(evt) => {
                        // Drains the counter; a failure means it was already 0.
                        let _ = evt.read();
                        self.run_queue(i);
                    }
                    None => debug!("virtio: event for unknown queue data {data}"),
                }
            }
        }
    }
}
