//! virtio-mmio transport tests: a driver (sometimes hostile) pokes the
//! registers through `BusDevice`.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventSet, MutEventSubscriber, SubscriberOps};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::test_utils::*;
use crate::devices::virtio::{
    device_type, interrupt_bits, Sources, VirtioDevice, VirtioMmioDevice,
};

const ALL: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;

fn driver() -> (TestSlot<Rng>, Driver) {
    let dev = slot(Rng::new());
    let d = Driver::new(dev.clone(), guest_mem());
    (dev, d)
}

#[test]
fn identification_registers() {
    let (_, mut d) = driver();
    assert_eq!(d.read(0x0), 0x7472_6976);
    assert_eq!(d.read(0x4), 2);
    assert_eq!(d.read(0x8), device_type::RNG);
    assert_eq!(d.read(0xc), VENDOR_ID);
    d.write(0x14, 0);
    assert_eq!(d.read(0x10), lo32(features::COMMON));
    d.write(0x14, 1);
    assert_eq!(d.read(0x10), 1); // VIRTIO_F_VERSION_1 is bit 32
    d.write(0x14, 7);
    assert_eq!(d.read(0x10), 0);
    assert_eq!(d.read(0x34), 256);
    d.write(0x30, 1); // no such queue
    assert_eq!(d.read(0x34), 0);
    assert_eq!(d.read(0x44), 0);
    for off in [0xb0, 0xb4, 0xb8, 0xbc] {
        assert_eq!(d.read(off), u32::MAX, "shm register {off:#x}");
    }
    assert_eq!(d.read(0xfc), 0);
    assert_eq!(d.read(0xc0), 0);
}

#[test]
fn bad_accesses_are_ignored() {
    let (_, mut d) = driver();
    let mut t = d.t.lock().unwrap();
    for len in [0usize, 1, 2, 3, 8] {
        let mut b = vec![0u8; len];
        t.read(0x0, &mut b);
        assert!(b.iter().all(|&x| x == 0xff), "{len}-byte read");
        t.write(0x70, &vec![1u8; len]);
    }
    let mut b = [0u8; 4];
    for off in [
        0x1,
        0x2,
        0x3,
        0x71,
        0xff,
        0x20,
        0x50,
        0x64,
        0xfff,
        0x1000,
        u64::MAX - 3,
        u64::MAX,
    ] {
        t.read(off, &mut b);
        assert_eq!(b, [0xff; 4], "read at {off:#x}");
        t.write(off, &[1, 0, 0, 0]);
    }
    // Writes to read-only registers change nothing.
    t.write(0x0, &[0; 4]);
    t.write(0x4, &[9, 0, 0, 0]);
    t.write(0x34, &[1, 0, 0, 0]);
    t.write(0x60, &[3, 0, 0, 0]);
    t.write(0xfc, &[5, 0, 0, 0]);
    drop(t);
    assert_eq!(d.read(0x0), 0x7472_6976);
    assert_eq!(d.read(0x4), 2);
    assert_eq!(d.read(0x34), 256);
    assert_eq!(d.read(0x60), 0);
    assert_eq!(d.read(0xfc), 0);
    assert_eq!(d.status(), 0);
}

#[test]
fn status_transitions_in_order_only() {
    let (dev, mut d) = driver();
    d.write(0x70, status::DRIVER_OK);
    assert_eq!(d.status(), 0);
    d.write(0x70, status::ACKNOWLEDGE);
    d.write(0x70, status::ACKNOWLEDGE | status::FEATURES_OK); // skips DRIVER
    assert_eq!(d.status(), status::ACKNOWLEDGE);
    d.write(0x70, status::ACKNOWLEDGE | status::DRIVER);
    d.write(0x70, status::DRIVER); // clears a bit
    assert_eq!(d.status(), status::ACKNOWLEDGE | status::DRIVER);
    d.write(
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::DEVICE_NEEDS_RESET,
    );
    assert_eq!(d.status(), status::ACKNOWLEDGE | status::DRIVER);
    d.write(0x70, status::ACKNOWLEDGE | status::DRIVER | status::FAILED);
    assert_eq!(
        d.status(),
        status::ACKNOWLEDGE | status::DRIVER | status::FAILED
    );
    d.write(0x70, 0);
    assert_eq!(d.status(), 0);
    assert!(!dev.lock().unwrap().is_active());
}

#[test]
fn features_ok_refused_for_unoffered_or_missing_version_1() {
    let (_, mut d) = driver();
    assert!(!d.negotiate(features::VIRTIO_F_VERSION_1 | 1 << 40));
    d.write(0x70, 0);
    assert!(!d.negotiate(features::VIRTIO_RING_F_EVENT_IDX)); // no VERSION_1
    d.write(0x70, 0);
    // A bit beyond 63 (feature select 2).
    d.write(0x70, status::ACKNOWLEDGE);
    d.write(0x70, status::ACKNOWLEDGE | status::DRIVER);
    d.write(0x24, 1);
    d.write(0x20, 1);
    d.write(0x24, 2);
    d.write(0x20, 1);
    d.write(0x70, ALL);
    assert_eq!(d.status() & status::FEATURES_OK, 0);
    d.write(0x70, 0);
    assert!(d.negotiate(features::COMMON));
    // Features are frozen after FEATURES_OK.
    d.write(0x24, 1);
    d.write(0x20, 0xffff_ffff);
    assert!(d.t.lock().unwrap().features_acceptable());
}

#[test]
fn bad_queue_configs_refused() {
    let (dev, mut d) = driver();
    d.setup_queue(16); // before FEATURES_OK: not enabled
    assert_eq!(d.read(0x44), 0);
    assert!(d.negotiate(features::VIRTIO_F_VERSION_1));
    for size in [0, 3, 100, 512, u32::MAX] {
        d.setup_queue(size);
        assert_eq!(d.read(0x44), 0, "size {size}");
    }
    // Misaligned descriptor table, then rings outside memory.
    d.write(0x38, 16);
    d.write(0x80, 0x1004);
    d.write(0x44, 1);
    assert_eq!(d.read(0x44), 0);
    d.write(0x80, 0x1000);
    d.write(0xa4, 0x10);
    d.write(0x44, 1);
    assert_eq!(d.read(0x44), 0);
    d.write(0xa4, 0);
    d.write(0x44, 7);
    assert_eq!(d.read(0x44), 0);
    // DRIVER_OK without a usable queue: the device needs a reset.
    d.driver_ok();
    assert!(d.needs_reset());
    assert_eq!(
        d.read(0x60) & interrupt_bits::CONFIG_CHANGE,
        interrupt_bits::CONFIG_CHANGE
    );
    assert!(!dev.lock().unwrap().is_active());
    d.write(0x64, interrupt_bits::CONFIG_CHANGE);
    assert_eq!(d.read(0x60), 0);
    d.write(0x70, 0);
    assert!(!d.needs_reset());
    d.init(0);
    assert!(dev.lock().unwrap().is_active());
}

#[test]
fn queue_registers_frozen_after_driver_ok() {
    let (_, mut d) = driver();
    d.init(0);
    d.write(0x38, 4);
    d.write(0x80, 0x5000);
    d.write(0x44, 0);
    assert_eq!(d.read(0x44), 1);
    let t = d.t.lock().unwrap();
    assert_eq!(t.queues[0].size, 16);
    assert_eq!(t.queues[0].desc_table, DESC);
}

#[test]
fn notify_signals_the_queue_eventfd() {
    let (_, mut d) = driver();
    d.write(0x50, 0);
    d.write(0x50, 0);
    d.write(0x50, 1); // no such queue
    d.write(0x50, u32::MAX);
    assert_eq!(d.t.lock().unwrap().queue_evts()[0].read().unwrap(), 2);
}

#[test]
fn reset_clears_everything() {
    let (dev, mut d) = driver();
    d.init(features::VIRTIO_RING_F_EVENT_IDX);
    d.t.lock().unwrap().interrupt().signal_used_queue();
    d.write(0x70, 0);
    assert_eq!(d.status(), 0);
    assert_eq!(d.read(0x60), 0);
    assert_eq!(d.read(0x44), 0);
    assert!(!dev.lock().unwrap().is_active());
    let t = d.t.lock().unwrap();
    assert_eq!(t.acked_features, 0);
    assert_eq!(t.queues[0].size, 256);
    assert_eq!(t.queues[0].desc_table, 0);
}

/// The whole path the builder wires: constructor, event manager, irqfd.
#[test]
fn event_loop_processes_notified_queues() {
    let mem = guest_mem();
    let dev = VirtioMmioDevice::new(Rng::new(), mem.clone()).unwrap();
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    em.add_subscriber(dev.subscriber.clone());
    let mut d = Driver::from_transport(dev.transport.clone(), mem.clone());
    assert_eq!(dev.queue_evts.len(), 1);

    // Notifications before activation are not processed.
    d.chain(0, &[(DATA, 32, true)]);
    d.push_avail(0);
    em.run_with_timeout(0).unwrap();
    assert_eq!(d.used_idx(), 0);

    d.init(features::VIRTIO_RING_F_EVENT_IDX);
    em.run_with_timeout(100).unwrap(); // activation: processes what is pending
    assert_eq!(d.used_idx(), 1);
    assert_eq!(dev.irq_evt.read().unwrap(), 1);

    // With event index, used_event = 1 asks for an interrupt after the next one.
    mem.write_obj(1u16, GuestAddress(AVAIL + 4 + 2 * 16))
        .unwrap();
    d.chain(1, &[(DATA, 32, true)]);
    d.push_avail(1);
    dev.queue_evts[0].write(1).unwrap(); // what KVM's ioeventfd does
    em.run_with_timeout(100).unwrap();
    assert_eq!(d.used_idx(), 2);
    assert_eq!(d.used_elem(1), (1, 32));
    assert_eq!(dev.irq_evt.read().unwrap(), 1);

    // After a reset, notifications are ignored again.
    d.write(0x70, 0);
    em.run_with_timeout(100).unwrap();
    d.push_avail(1);
    d.write(0x50, 0);
    em.run_with_timeout(0).unwrap();
    assert_eq!(d.used_idx(), 2);
}

/// A device with two queues, the second optional, and an eventfd of its own
/// that it watches while active: the parts of the device contract block and
/// rng do not use.
struct Probe {
    own: EventFd,
    watched: bool,
    source_events: Arc<std::sync::atomic::AtomicU32>,
}

impl Probe {
    fn new() -> Self {
        Self {
            own: EventFd::new(EFD_NONBLOCK).unwrap(),
            watched: false,
            source_events: Arc::default(),
        }
    }
}

impl VirtioDevice for Probe {
    fn device_type(&self) -> u32 {
        0x7e57
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 16]
    }
    fn queue_optional(&self, index: usize, _: u64) -> bool {
        index == 1
    }
    fn avail_features(&self) -> u64 {
        features::COMMON
    }
    fn process_queue(&mut self, active: &mut Active, index: usize, _: &mut dyn Sources) -> bool {
        active.drain(index, |_, _| {
            crate::devices::virtio::queue::Outcome::Used(0)
        })
    }
    fn sync_sources(&mut self, active: Option<&mut Active>, sources: &mut dyn Sources) {
        use std::os::fd::AsRawFd;
        let want = active.is_some();
        if want != self.watched {
            let fd = self.own.as_raw_fd();
            if want {
                sources.add(fd, 7, EventSet::IN).unwrap();
            } else {
                sources.remove(fd).unwrap();
            }
            self.watched = want;
        }
    }
    fn process_source(
        &mut self,
        active: Option<&mut Active>,
        token: u32,
        events: EventSet,
        _: &mut dyn Sources,
    ) {
        assert_eq!(token, 7);
        assert!(events.contains(EventSet::IN));
        assert!(active.is_some());
        let _ = self.own.read();
        self.source_events
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn optional_queue_may_stay_disabled_required_may_not() {
    let dev = slot(Probe::new());
    let mut d = Driver::new(dev.clone(), guest_mem());
    // Queue 0 only: queue 1 is optional.
    d.init(0);
    assert!(dev.lock().unwrap().is_active());
    assert!(!d.needs_reset());
    // Notifying the disabled queue processes nothing and breaks nothing.
    assert!(!process(&dev, 1));
    assert!(!d.needs_reset());

    // Queue 1 only: queue 0 is required.
    d.write(0x70, 0);
    assert!(d.negotiate(features::VIRTIO_F_VERSION_1));
    d.write(0x30, 1);
    d.write(0x38, 16);
    d.write(0x80, 0x4000);
    d.write(0x90, 0x5000);
    d.write(0xa0, 0x6000);
    d.write(0x44, 1);
    d.driver_ok();
    assert!(d.needs_reset());
    assert!(!dev.lock().unwrap().is_active());
}

#[test]
fn device_sources_reach_the_device_while_active() {
    let mem = guest_mem();
    let probe = Probe::new();
    let own = probe.own.try_clone().unwrap();
    let count = probe.source_events.clone();
    let events = move || count.load(std::sync::atomic::Ordering::SeqCst);
    let dev = VirtioMmioDevice::new(probe, mem.clone()).unwrap();
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    em.add_subscriber(dev.subscriber.clone());
    let mut d = Driver::from_transport(dev.transport.clone(), mem);
    d.init(0);
    em.run_with_timeout(100).unwrap(); // activation: the device adds its source
    own.write(1).unwrap();
    em.run_with_timeout(100).unwrap();
    own.write(1).unwrap();
    em.run_with_timeout(100).unwrap();
    assert_eq!(events(), 2);
    // After a reset the device removed its source: nothing more arrives.
    d.write(0x70, 0);
    em.run_with_timeout(100).unwrap();
    own.write(1).unwrap();
    assert_eq!(em.run_with_timeout(50).unwrap(), 0);
    assert_eq!(events(), 2);
}

/// A device that waits on its queues itself: it gets their eventfds at
/// activation, and the event loop never calls its process_queue.
struct SelfServed {
    got_evts: Arc<std::sync::atomic::AtomicUsize>,
    processed: Arc<std::sync::atomic::AtomicUsize>,
}

impl VirtioDevice for SelfServed {
    fn device_type(&self) -> u32 {
        0x7e58
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn avail_features(&self) -> u64 {
        features::COMMON
    }
    fn waits_on_queues(&self) -> bool {
        true
    }
    fn activate(&mut self, active: &mut Active) {
        self.got_evts
            .store(active.queue_evts.len(), std::sync::atomic::Ordering::SeqCst);
    }
    fn process_queue(&mut self, _: &mut Active, _: usize, _: &mut dyn Sources) -> bool {
        self.processed
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        false
    }
}

#[test]
fn a_device_that_waits_on_its_queues_gets_their_eventfds_not_the_event_loop() {
    let mem = guest_mem();
    let got_evts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let processed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let dev = VirtioMmioDevice::new(
        SelfServed {
            got_evts: got_evts.clone(),
            processed: processed.clone(),
        },
        mem.clone(),
    )
    .unwrap();
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    em.add_subscriber(dev.subscriber.clone());
    let mut d = Driver::from_transport(dev.transport.clone(), mem);
    d.init(0);
    em.run_with_timeout(100).unwrap();
    assert_eq!(got_evts.load(std::sync::atomic::Ordering::SeqCst), 1);
    dev.queue_evts[0].write(1).unwrap();
    assert_eq!(
        em.run_with_timeout(50).unwrap(),
        0,
        "the event loop does not watch it"
    );
    assert_eq!(processed.load(std::sync::atomic::Ordering::SeqCst), 0);
}
