//! Transport snapshots: a driver runs an rng device, the transport's state
//! is saved, a new transport is built from it, and the driver goes on where
//! it was. Then hostile states: each refused, naming what is wrong, never a
//! panic.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::test_utils::*;
use crate::devices::virtio::{features, interrupt_bits, status, GuestMem, VirtioMmioDevice};

const ALL: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;

/// Fills `len` bytes at `addr` with zeroes and makes descriptor `head` a
/// one-buffer, device-writable chain over them.
fn offer(d: &mut Driver, head: u16, addr: u64, len: u32) -> u16 {
    d.mem
        .write_slice(&vec![0u8; len as usize], GuestAddress(addr))
        .unwrap();
    d.chain(head, &[(addr, len, true)]);
    d.push_avail(head)
}

fn filled(mem: &GuestMem, addr: u64, len: usize) -> bool {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf.iter().any(|&b| b != 0)
}

/// An active rng that served one request.
fn running_rng() -> (TestSlot<Rng>, Driver) {
    let dev = slot(Rng::new());
    let mut d = Driver::new(dev.clone(), guest_mem());
    d.init(features::VIRTIO_RING_F_EVENT_IDX);
    offer(&mut d, 0, DATA, 64);
    process(&dev, 0);
    assert_eq!(d.used_idx(), 1);
    (dev, d)
}

fn saved(d: &Driver) -> TransportState {
    let s = d.t.lock().unwrap().save_state().unwrap();
    // Through the encoding a snapshot file uses.
    serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap()
}

fn restore(s: &TransportState, mem: &GuestMem) -> Result<(TestSlot<Rng>, Driver), Error> {
    let dev = slot(Rng::new());
    let mut t = MmioTransport::new(dev.clone(), mem.clone()).unwrap();
    t.restore_state(s)?;
    Ok((
        dev,
        Driver::from_transport(Arc::new(Mutex::new(t)), mem.clone()),
    ))
}

#[test]
fn rng_goes_on_after_restore() {
    let (_, d) = running_rng();
    let s = saved(&d);
    assert_eq!(s.device_status, ALL | status::DRIVER_OK);
    assert_eq!(s.interrupt_status, interrupt_bits::USED_BUFFER);
    assert_eq!((s.queues[0].next_avail, s.queues[0].next_used), (1, 1));
    assert!(s.queues[0].ready);
    assert_eq!(s.queues[0].size, 16);
    assert_eq!(s.device, None);

    // The new transport shares the memory, as a restore maps the snapshot's.
    let (dev, mut d2) = restore(&s, &d.mem).unwrap();
    assert!(dev.lock().unwrap().is_active(), "not active again");
    assert_eq!(d2.status(), ALL | status::DRIVER_OK);
    assert_eq!(d2.read(0x60), interrupt_bits::USED_BUFFER);
    assert_eq!(d2.read(0x44), 1);
    // The event loop was told, as after a DRIVER_OK.
    let t = d2.t.lock().unwrap();
    assert_eq!(t.activate_evt().read().unwrap(), 1);
    drop(t);

    // The driver goes on: the next chain is the next one, not head 0 again.
    d2.set_avail_idx(1);
    assert_eq!(offer(&mut d2, 1, DATA + 0x100, 64), 2);
    process(&dev, 0);
    assert_eq!(d2.used_idx(), 2);
    assert_eq!(d2.used_elem(1), (1, 64));
    assert!(filled(&d2.mem, DATA + 0x100, 64));
    assert!(!d2.needs_reset());
    let again = saved(&d2);
    assert_eq!(
        (again.queues[0].next_avail, again.queues[0].next_used),
        (2, 2)
    );
    assert_eq!(again.acked_features, s.acked_features);
}

/// The path the builder wires: a new device restored before its subscriber
/// joins the event loop, which then serves what the driver left pending.
#[test]
fn event_loop_serves_a_restored_device() {
    let (_, mut d) = running_rng();
    // Offered before the snapshot, not served yet.
    offer(&mut d, 1, DATA + 0x200, 32);
    let s = saved(&d);
    let dev = VirtioMmioDevice::new(Rng::new(), d.mem.clone()).unwrap();
    dev.transport.lock().unwrap().restore_state(&s).unwrap();
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    em.add_subscriber(dev.subscriber.clone());
    em.run_with_timeout(100).unwrap();
    assert_eq!(d.used_idx(), 2);
    assert!(filled(&d.mem, DATA + 0x200, 32));
    // Queue notifications reach it too.
    let mut d2 = Driver::from_transport(dev.transport.clone(), d.mem.clone());
    d2.set_avail_idx(2);
    offer(&mut d2, 2, DATA + 0x300, 32);
    dev.queue_evts[0].write(1).unwrap();
    em.run_with_timeout(100).unwrap();
    assert_eq!(d2.used_idx(), 3);
    // The interrupt still pending at the snapshot is raised again.
    while dev.irq_evt.read().is_ok() {}
    dev.transport.lock().unwrap().replay_interrupt();
    assert_eq!(dev.irq_evt.read().unwrap(), 1);
}

#[test]
fn a_device_in_setup_stays_in_setup() {
    let dev = slot(Rng::new());
    let mut d = Driver::new(dev, guest_mem());
    assert!(d.negotiate(features::VIRTIO_F_VERSION_1));
    d.setup_queue(16);
    d.write(0x30, 5); // a queue selector past the last queue
    let s = saved(&d);
    let (dev2, mut d2) = restore(&s, &d.mem).unwrap();
    assert!(!dev2.lock().unwrap().is_active());
    assert_eq!(d2.status(), ALL);
    d2.write(0x30, 0);
    assert_eq!(d2.read(0x44), 1);
    d2.driver_ok();
    assert!(dev2.lock().unwrap().is_active());
    // A device that was never touched restores as new.
    let fresh = saved(&Driver::new(slot(Rng::new()), guest_mem()));
    let (dev3, mut d3) = restore(&fresh, &d.mem).unwrap();
    assert!(!dev3.lock().unwrap().is_active());
    assert_eq!(d3.status(), 0);
}

#[test]
fn a_device_that_needs_reset_is_not_restarted() {
    let (_, d) = running_rng();
    d.t.lock().unwrap().interrupt().set_needs_reset();
    let s = saved(&d);
    assert!(s.needs_reset);
    let (dev, mut d2) = restore(&s, &d.mem).unwrap();
    assert!(!dev.lock().unwrap().is_active());
    assert!(d2.needs_reset());
    d2.write(0x70, 0);
    assert_eq!(d2.status(), 0);
}

/// Each hostile change to a good state is refused with its own error.
#[test]
fn states_no_driver_could_reach_are_refused() {
    let (_, d) = running_rng();
    let good = saved(&d);
    type Change = fn(&mut TransportState);
    type Expected = fn(&Error) -> bool;
    let cases: &[(&str, Change, Expected)] = &[
        (
            "DRIVER_OK alone",
            |s| s.device_status = status::DRIVER_OK,
            |e| matches!(e, Error::Status(4)),
        ),
        (
            "NEEDS_RESET as status",
            |s| s.device_status |= status::DEVICE_NEEDS_RESET,
            |e| matches!(e, Error::Status(_)),
        ),
        (
            "unknown interrupt bit",
            |s| s.interrupt_status = 0x80,
            |e| matches!(e, Error::InterruptStatus(0x80)),
        ),
        (
            "two queues",
            |s| s.queues.push(s.queues[0].clone()),
            |e| {
                matches!(
                    e,
                    Error::QueueCount {
                        found: 2,
                        expected: 1
                    }
                )
            },
        ),
        (
            "no queue",
            |s| s.queues.clear(),
            |e| matches!(e, Error::QueueCount { found: 0, .. }),
        ),
        (
            "size 3",
            |s| s.queues[0].size = 3,
            |e| {
                matches!(
                    e,
                    Error::Queue {
                        index: 0,
                        source: queue::Error::InvalidSize { .. }
                    }
                )
            },
        ),
        (
            "size over the max",
            |s| s.queues[0].size = 512,
            |e| {
                matches!(
                    e,
                    Error::Queue {
                        source: queue::Error::InvalidSize { .. },
                        ..
                    }
                )
            },
        ),
        (
            "size 0",
            |s| s.queues[0].size = 0,
            |e| matches!(e, Error::Queue { .. }),
        ),
        (
            "table outside memory",
            |s| s.queues[0].desc_table = MEM_SIZE,
            |e| {
                matches!(
                    e,
                    Error::Queue {
                        source: queue::Error::OutsideMemory(_),
                        ..
                    }
                )
            },
        ),
        (
            "ring past u64",
            |s| s.queues[0].used_ring = u64::MAX - 3,
            |e| matches!(e, Error::Queue { .. }),
        ),
        (
            "misaligned ring",
            |s| s.queues[0].avail_ring = AVAIL + 1,
            |e| {
                matches!(
                    e,
                    Error::Queue {
                        source: queue::Error::Misaligned(_),
                        ..
                    }
                )
            },
        ),
        (
            "ready before FEATURES_OK",
            |s| s.device_status = status::ACKNOWLEDGE | status::DRIVER,
            |e| matches!(e, Error::ReadyTooEarly(0)),
        ),
        (
            "unoffered feature",
            |s| s.acked_features |= 1 << 40,
            |e| matches!(e, Error::Features { .. }),
        ),
        (
            "no VERSION_1",
            |s| s.acked_features &= !features::VIRTIO_F_VERSION_1,
            |e| matches!(e, Error::Features { .. }),
        ),
        (
            "unoffered attempt",
            |s| s.acked_unoffered = true,
            |e| matches!(e, Error::Features { .. }),
        ),
        (
            "required queue disabled",
            |s| s.queues[0].ready = false,
            |e| matches!(e, Error::Activate(_)),
        ),
        (
            "device state for rng",
            |s| s.device = Some(serde_json::json!({"x": 1})),
            |e| matches!(e, Error::UnexpectedDeviceState),
        ),
    ];
    for (name, change, expected) in cases {
        let mut s = good.clone();
        change(&mut s);
        let dev = slot(Rng::new());
        let mut t = MmioTransport::new(dev.clone(), d.mem.clone()).unwrap();
        match t.restore_state(&s) {
            Err(e) => assert!(expected(&e), "{name}: {e:?}"),
            Ok(()) => panic!("{name}: accepted"),
        }
        assert!(!dev.lock().unwrap().is_active(), "{name}: activated");
    }
}

/// Ring positions are not checked on restore (any u16 is one a device can
/// reach); a wrong one makes the device fail like a driver's broken ring.
#[test]
fn wild_ring_positions_fail_like_a_broken_ring() {
    let (_, d) = running_rng();
    let mut s = saved(&d);
    s.queues[0].next_avail = 1000;
    s.queues[0].next_used = u16::MAX;
    let (dev, mut d2) = restore(&s, &d.mem).unwrap();
    d2.set_avail_idx(1);
    offer(&mut d2, 1, DATA, 16);
    process(&dev, 0);
    assert!(d2.needs_reset());
    assert_eq!(d2.used_idx(), 1);
}
