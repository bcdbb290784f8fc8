//! virtio-blk tests: good round trips against a temporary image, then a
//! hostile driver. In every hostile case the device answers an error status
//! or marks itself DEVICE_NEEDS_RESET, and nothing panics.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use vm_memory::{Bytes, GuestAddress};

use super::request::*;
use super::*;
use crate::devices::bus::BusDevice;
use crate::devices::virtio::test_utils::*;

const HDR: u64 = DATA;
const STATUS: u64 = DATA + 0x100;
const BUF: u64 = DATA + 0x1000;
const BUF2: u64 = DATA + 0x2_0000;
const INDIRECT: u64 = 0x8000;
const DISK_SECTORS: u64 = 64;

/// A temporary image file, removed on drop.
struct TempImage(PathBuf);

impl TempImage {
    fn new(len: u64) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("kiln-blk-test-{}-{n}.img", std::process::id()));
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(len).unwrap();
        Self(path)
    }
    fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn opts(img: &TempImage, read_only: bool, cache: CacheMode) -> BlockOptions {
    BlockOptions {
        path: img.0.clone(),
        read_only,
        cache,
        drive_id: "kiln-disk".into(),
    }
}

struct Setup {
    img: TempImage,
    dev: TestSlot<Block>,
    d: Driver,
}

fn setup_with(read_only: bool, cache: CacheMode) -> Setup {
    let img = TempImage::new(DISK_SECTORS * 512);
    let block = Block::new(opts(&img, read_only, cache)).unwrap();
    let extra = block.avail_features() & !features::VIRTIO_F_VERSION_1;
    let dev = slot(block);
    let mut d = Driver::new(dev.clone(), guest_mem());
    d.init(extra);
    Setup { img, dev, d }
}

fn setup() -> Setup {
    setup_with(false, CacheMode::Writeback)
}

impl Setup {
    fn header(&self, kind: u32, sector: u64) {
        self.d.mem.write_obj(kind, GuestAddress(HDR)).unwrap();
        self.d.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        self.d.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        self.d.mem.write_obj(0xaau8, GuestAddress(STATUS)).unwrap();
    }

    /// Submits a chain (descriptors from 0) and returns (status, used len).
    fn submit(&mut self, descs: &[(u64, u32, bool)]) -> (u8, u32) {
        self.d.chain(0, descs);
        self.run(0)
    }

    /// Makes `head` available, processes the queue, returns (status, used len).
    fn run(&mut self, head: u16) -> (u8, u32) {
        let before = self.d.used_idx();
        self.d.push_avail(head);
        process(&self.dev, 0);
        assert_eq!(
            self.d.used_idx(),
            before.wrapping_add(1),
            "request not completed"
        );
        let (id, len) = self.d.used_elem(before);
        assert_eq!(id, u32::from(head));
        (self.d.mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
    }

    /// Submits a chain that must make the device need a reset.
    fn submit_fatal(&mut self, head: u16) {
        self.d.push_avail(head);
        process(&self.dev, 0);
        assert!(self.d.needs_reset(), "device should need a reset");
        assert_eq!(self.d.used_idx(), 0);
        // And it stays stopped until reset.
        process(&self.dev, 0);
        assert_eq!(self.d.used_idx(), 0);
    }

    fn io(&mut self, kind: u32, sector: u64, buf: u64, len: u32, writable: bool) -> (u8, u32) {
        self.header(kind, sector);
        self.submit(&[(HDR, 16, false), (buf, len, writable), (STATUS, 1, true)])
    }
}

#[test]
fn write_read_flush_get_id_round_trip() {
    let mut s = setup();
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i % 251) as u8).collect();
    s.d.mem.write_slice(&pattern, GuestAddress(BUF)).unwrap();
    assert_eq!(
        s.io(VIRTIO_BLK_T_OUT, 2, BUF, 1024, false),
        (VIRTIO_BLK_S_OK, 1)
    );
    assert_eq!(&s.img.contents()[1024..2048], &pattern[..]);

    // Read back split over two buffers.
    s.header(VIRTIO_BLK_T_IN, 2);
    let r = s.submit(&[
        (HDR, 16, false),
        (BUF2, 512, true),
        (BUF2 + 0x1000, 512, true),
        (STATUS, 1, true),
    ]);
    assert_eq!(r, (VIRTIO_BLK_S_OK, 1025));
    let mut got = vec![0u8; 512];
    s.d.mem
        .read_slice(&mut got, GuestAddress(BUF2 + 0x1000))
        .unwrap();
    assert_eq!(got, pattern[512..]);

    s.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(
        s.submit(&[(HDR, 16, false), (STATUS, 1, true)]),
        (VIRTIO_BLK_S_OK, 1)
    );

    assert_eq!(
        s.io(VIRTIO_BLK_T_GET_ID, 0, BUF, 20, true),
        (VIRTIO_BLK_S_OK, 21)
    );
    let mut id = [0xffu8; 20];
    s.d.mem.read_slice(&mut id, GuestAddress(BUF)).unwrap();
    assert_eq!(&id[..9], b"kiln-disk");
    assert!(id[9..].iter().all(|&b| b == 0));
    // The last sector is reachable.
    assert_eq!(
        s.io(VIRTIO_BLK_T_IN, DISK_SECTORS - 1, BUF, 512, true).0,
        VIRTIO_BLK_S_OK
    );
    assert!(!s.d.needs_reset());
}

#[test]
fn indirect_descriptors_work() {
    let mut s = setup();
    s.header(VIRTIO_BLK_T_GET_ID, 0);
    s.d.set_desc(INDIRECT, 0, HDR, 16, F_NEXT, 1);
    s.d.set_desc(INDIRECT, 1, BUF, 20, F_WRITE | F_NEXT, 2);
    s.d.set_desc(INDIRECT, 2, STATUS, 1, F_WRITE, 0);
    s.d.set_desc(DESC, 0, INDIRECT, 48, F_INDIRECT, 0);
    assert_eq!(s.run(0), (VIRTIO_BLK_S_OK, 21));
}

#[test]
fn config_space_and_features() {
    let s = setup();
    let mut t = s.d.t.lock().unwrap();
    let mut cap = [0u8; 8];
    t.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SECTORS);
    let mut w = [0u8; 4];
    t.read(0x10c, &mut w);
    assert_eq!(u32::from_le_bytes(w), SEG_MAX);
    let mut b = [0u8; 1];
    t.read(0x100, &mut b);
    assert_eq!(b[0], 64);
    t.read(0x100 + 36, &mut b);
    assert_eq!(b[0], 0xff);
    t.read(u64::MAX, &mut w);
    assert_eq!(w, [0xff; 4]);
    t.write(0x100, &[0xff; 8]); // read-only
    t.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SECTORS);
    drop(t);

    let img = TempImage::new(512);
    let ro_unsafe = Block::new(opts(&img, true, CacheMode::Unsafe)).unwrap();
    assert_ne!(ro_unsafe.avail_features() & VIRTIO_BLK_F_RO, 0);
    assert_eq!(ro_unsafe.avail_features() & VIRTIO_BLK_F_FLUSH, 0);
    assert_eq!(
        s.dev.lock().unwrap().device.avail_features() & VIRTIO_BLK_F_RO,
        0
    );
    assert_ne!(
        s.dev.lock().unwrap().device.avail_features() & VIRTIO_BLK_F_FLUSH,
        0
    );
}

#[test]
fn construction_errors() {
    let img = TempImage::new(1000);
    let err = Block::new(opts(&img, false, CacheMode::Writeback))
        .err()
        .unwrap();
    assert!(matches!(
        err,
        super::Error::NotSectorMultiple { size: 1000, .. }
    ));
    assert!(err.to_string().contains(img.0.to_str().unwrap()));
    let missing = BlockOptions {
        path: "/nonexistent/kiln.img".into(),
        ..opts(&img, true, CacheMode::Unsafe)
    };
    let err = Block::new(missing).err().unwrap();
    assert_eq!(
        crate::error_chain(&err),
        "cannot open disk image \"/nonexistent/kiln.img\": No such file or directory (os error 2)"
    );
    let img = TempImage::new(512);
    let long = BlockOptions {
        drive_id: "x".repeat(21),
        ..opts(&img, false, CacheMode::Unsafe)
    };
    assert!(matches!(
        Block::new(long),
        Err(super::Error::DriveIdTooLong(_))
    ));
}

#[test]
fn write_to_read_only_disk_is_ioerr() {
    let mut s = setup_with(true, CacheMode::Unsafe);
    s.d.mem
        .write_slice(&[0x55; 512], GuestAddress(BUF))
        .unwrap();
    assert_eq!(
        s.io(VIRTIO_BLK_T_OUT, 0, BUF, 512, false).0,
        VIRTIO_BLK_S_IOERR
    );
    assert!(s.img.contents().iter().all(|&b| b == 0));
    // Reads and (no-op) flushes still work.
    assert_eq!(s.io(VIRTIO_BLK_T_IN, 0, BUF, 512, true).0, VIRTIO_BLK_S_OK);
    s.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(
        s.submit(&[(HDR, 16, false), (STATUS, 1, true)]).0,
        VIRTIO_BLK_S_OK
    );
}

#[test]
fn out_of_range_requests_are_ioerr() {
    let mut s = setup();
    let cases: &[(u32, u64, u64, u32, bool)] = &[
        (VIRTIO_BLK_T_IN, DISK_SECTORS, BUF, 512, true), // just past the end
        (VIRTIO_BLK_T_IN, DISK_SECTORS - 1, BUF, 1024, true), // straddles the end
        (VIRTIO_BLK_T_OUT, u64::MAX, BUF, 512, false),   // sector * 512 overflows
        (VIRTIO_BLK_T_OUT, u64::MAX / 512, BUF, 512, false), // sector * 512 + len overflows
        (VIRTIO_BLK_T_IN, 0, BUF, 100, true),            // not a whole sector
        (VIRTIO_BLK_T_IN, 0, BUF, u32::MAX - 17, true),  // length near u32::MAX
        (VIRTIO_BLK_T_IN, 0, MEM_SIZE - 256, 512, true), // buffer runs out of memory
        (VIRTIO_BLK_T_IN, 0, MEM_SIZE + 0x1000, 512, true), // buffer outside memory
        (VIRTIO_BLK_T_OUT, 0, u64::MAX - 100, 512, false), // address wraps
        (VIRTIO_BLK_T_IN, 0, BUF, 512, false),           // IN into a device-readable buffer
        (VIRTIO_BLK_T_OUT, 0, BUF, 512, true),           // OUT from a device-writable buffer
        (VIRTIO_BLK_T_GET_ID, 0, u64::MAX - 4, 20, true), // GET_ID outside memory
    ];
    for &(kind, sector, buf, len, w) in cases {
        let r = s.io(kind, sector, buf, len, w);
        assert_eq!(
            r,
            (VIRTIO_BLK_S_IOERR, 1),
            "type {kind} sector {sector:#x} buf {buf:#x} len {len:#x}"
        );
    }
    assert!(s.img.contents().iter().all(|&b| b == 0));
    assert!(!s.d.needs_reset());
}

#[test]
fn chains_longer_than_4_gib_need_reset() {
    // virtio-queue ends a chain whose total length overflows a u32: the
    // status is lost, so the device cannot answer.
    for descs in [
        &[(HDR, 16, false), (BUF, u32::MAX, true), (STATUS, 1, true)][..],
        &[
            (HDR, 16, false),
            (BUF, u32::MAX / 2, true),
            (BUF, u32::MAX / 2, true),
            (STATUS, 1, true),
        ][..],
    ] {
        let mut s = setup();
        s.header(VIRTIO_BLK_T_IN, 0);
        s.d.chain(0, descs);
        s.submit_fatal(0);
    }
}

#[test]
fn bad_headers_are_ioerr_and_unknown_types_unsupp() {
    let mut s = setup();
    s.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        s.submit(&[(HDR, 8, false), (BUF, 512, true), (STATUS, 1, true)])
            .0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        s.submit(&[(HDR, 16, true), (BUF, 512, true), (STATUS, 1, true)])
            .0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        s.submit(&[(MEM_SIZE - 8, 16, false), (STATUS, 1, true)]).0,
        VIRTIO_BLK_S_IOERR
    );
    for kind in [2, 11, 13, 42, u32::MAX] {
        s.header(kind, 0);
        assert_eq!(
            s.submit(&[(HDR, 16, false), (BUF, 512, true), (STATUS, 1, true)])
                .0,
            VIRTIO_BLK_S_UNSUPP
        );
    }
    // A status buffer longer than one byte: the status is its last byte.
    s.header(VIRTIO_BLK_T_FLUSH, 0);
    s.d.mem.write_obj(0xaau8, GuestAddress(STATUS - 3)).unwrap();
    assert_eq!(
        s.submit(&[(HDR, 16, false), (STATUS - 3, 4, true)]),
        (VIRTIO_BLK_S_OK, 1)
    );
    assert_eq!(
        s.d.mem.read_obj::<u8>(GuestAddress(STATUS - 3)).unwrap(),
        0xaa
    );
    assert!(!s.d.needs_reset());
}

#[test]
fn too_many_descriptors_is_ioerr() {
    let mut s = setup();
    s.header(VIRTIO_BLK_T_IN, 0);
    // An indirect table with header, 300 data buffers and a status.
    let n: u16 = 302;
    s.d.set_desc(INDIRECT, 0, HDR, 16, F_NEXT, 1);
    for i in 1..n - 1 {
        s.d.set_desc(INDIRECT, i, BUF, 0, F_WRITE | F_NEXT, i + 1);
    }
    s.d.set_desc(INDIRECT, n - 1, STATUS, 1, F_WRITE, 0);
    s.d.set_desc(DESC, 0, INDIRECT, u32::from(n) * 16, F_INDIRECT, 0);
    assert_eq!(s.run(0), (VIRTIO_BLK_S_IOERR, 1));
}

#[test]
fn descriptor_loop_needs_reset() {
    let mut s = setup();
    s.header(VIRTIO_BLK_T_IN, 0);
    s.d.set_desc(DESC, 0, HDR, 16, F_NEXT, 1);
    s.d.set_desc(DESC, 1, BUF, 512, F_WRITE | F_NEXT, 2);
    s.d.set_desc(DESC, 2, STATUS, 1, F_WRITE | F_NEXT, 1);
    s.submit_fatal(0);
    // A reset and a new initialisation bring the device back.
    s.d.write(0x70, 0);
    assert!(!s.d.needs_reset());
}

#[test]
fn loop_inside_indirect_table_needs_reset() {
    let mut s = setup();
    s.header(VIRTIO_BLK_T_IN, 0);
    s.d.set_desc(INDIRECT, 0, HDR, 16, F_NEXT, 1);
    s.d.set_desc(INDIRECT, 1, STATUS, 1, F_WRITE | F_NEXT, 0);
    s.d.set_desc(DESC, 0, INDIRECT, 32, F_INDIRECT, 0);
    s.submit_fatal(0);
}

#[test]
fn bad_indirect_tables_need_reset() {
    for (addr, len) in [
        (INDIRECT, 20),
        (INDIRECT, 0),
        (MEM_SIZE - 16, 32),
        (u64::MAX - 15, 16),
    ] {
        let mut s = setup();
        s.header(VIRTIO_BLK_T_GET_ID, 0);
        s.d.set_desc(DESC, 0, addr, len, F_INDIRECT, 0);
        s.submit_fatal(0);
    }
}

#[test]
fn chains_without_usable_status_need_reset() {
    let cases: &[&[(u64, u32, bool)]] = &[
        &[(HDR, 16, false), (STATUS, 0, true)],   // empty status
        &[(HDR, 16, false), (STATUS, 1, false)],  // device-readable status
        &[(HDR, 16, false), (MEM_SIZE, 1, true)], // status outside memory
        &[(HDR, 16, false), (u64::MAX, 2, true)], // status address wraps
        &[(HDR, 16, false), (BUF, 512, true), (STATUS, 1, false)],
        &[(STATUS, 1, true)], // no header at all
    ];
    for descs in cases {
        let mut s = setup();
        s.header(VIRTIO_BLK_T_IN, 0);
        s.d.chain(0, descs);
        s.submit_fatal(0);
        assert_eq!(
            s.d.read(0x60) & 2,
            2,
            "config change interrupt for {descs:?}"
        );
    }
}

#[test]
fn bad_ring_contents_need_reset() {
    // Head index beyond the queue.
    let mut s = setup();
    s.submit_fatal(200);
    // Next descriptor index beyond the queue.
    let mut s = setup();
    s.d.set_desc(DESC, 0, HDR, 16, F_NEXT, 999);
    s.submit_fatal(0);
    // Avail index more than a ring ahead.
    let mut s = setup();
    s.d.set_avail_idx(17);
    process(&s.dev, 0);
    assert!(s.d.needs_reset());
}

#[test]
fn parse_is_pure() {
    use virtio_queue::desc::split::Descriptor;
    let mem = guest_mem();
    mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(HDR)).unwrap();
    mem.write_obj(7u64, GuestAddress(HDR + 8)).unwrap();
    let descs = [
        Descriptor::new(HDR, 16, F_NEXT, 1),
        Descriptor::new(BUF, 512, F_WRITE | F_NEXT, 2),
        Descriptor::new(STATUS, 1, F_WRITE, 0),
    ];
    let req = parse(descs, &mem).unwrap();
    assert_eq!(req.kind, RequestType::In);
    assert_eq!(req.sector, 7);
    assert_eq!(req.data, vec![(GuestAddress(BUF), 512)]);
    assert_eq!(req.status_addr, GuestAddress(STATUS));
    assert!(matches!(parse([], &mem), Err(request::Error::NoStatus(_))));
}

#[test]
fn chunked_io_splits_buffers_and_keeps_data() {
    // Small, odd chunks: every piece must land at the right file offset and
    // guest address, across several data buffers.
    let img = TempImage::new(DISK_SECTORS * 512);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img.0)
        .unwrap();
    let disk = Disk {
        file,
        size: DISK_SECTORS * 512,
        read_only: false,
        cache: CacheMode::Unsafe,
        flush_negotiated: true,
        id: [0; ID_BYTES],
    };
    let mem = guest_mem();
    let pattern: Vec<u8> = (0..3072u32).map(|i| (i * 7 % 251) as u8).collect();
    mem.write_slice(&pattern[..1024], GuestAddress(BUF))
        .unwrap();
    mem.write_slice(&pattern[1024..], GuestAddress(BUF2))
        .unwrap();
    let out = Request {
        kind: RequestType::Out,
        sector: 3,
        data: vec![(GuestAddress(BUF), 1024), (GuestAddress(BUF2), 2048)],
        data_len: 3072,
        status_addr: GuestAddress(STATUS),
    };
    assert_eq!(
        execute_chunked(&out, &disk, &mem, 300),
        (VIRTIO_BLK_S_OK, 0)
    );
    assert_eq!(&img.contents()[3 * 512..3 * 512 + 3072], &pattern[..]);

    let back = Request {
        kind: RequestType::In,
        data: vec![(GuestAddress(BUF2), 512), (GuestAddress(BUF), 2560)],
        ..out
    };
    mem.write_slice(&[0u8; 4096], GuestAddress(BUF)).unwrap();
    assert_eq!(
        execute_chunked(&back, &disk, &mem, 7),
        (VIRTIO_BLK_S_OK, 3072)
    );
    let mut got = vec![0u8; 3072];
    mem.read_slice(&mut got[..512], GuestAddress(BUF2)).unwrap();
    mem.read_slice(&mut got[512..], GuestAddress(BUF)).unwrap();
    assert_eq!(got, pattern);

    // Past the end of the disk: an error, nothing read.
    let beyond = Request {
        sector: DISK_SECTORS - 1,
        ..back
    };
    assert_eq!(execute(&beyond, &disk, &mem).0, VIRTIO_BLK_S_IOERR);
}

#[test]
fn the_image_is_locked_for_the_device_life() {
    let img = TempImage::new(DISK_SECTORS * SECTOR_SIZE);
    let writer = Block::new(opts(&img, false, CacheMode::Unsafe)).unwrap();
    // A second writer or reader (another VM) is refused while it lives.
    for read_only in [false, true] {
        let err = Block::new(opts(&img, read_only, CacheMode::Unsafe))
            .err()
            .unwrap();
        assert_eq!(
            crate::error_chain(&err),
            format!(
                "cannot open disk image {:?}: in use by another VM (locked)",
                img.0
            )
        );
    }
    drop(writer);
    // Readers share; a writer waits for them all to end.
    let reader = Block::new(opts(&img, true, CacheMode::Unsafe)).unwrap();
    let reader2 = Block::new(opts(&img, true, CacheMode::Unsafe)).unwrap();
    assert!(Block::new(opts(&img, false, CacheMode::Unsafe)).is_err());
    drop((reader, reader2));
    Block::new(opts(&img, false, CacheMode::Unsafe)).unwrap();
}

/// A snapshot records which disk a drive was: a restore reopens the
/// config's, serves it where the driver was, and refuses another disk.
#[test]
fn restore_reopens_the_same_disk_only() {
    use crate::devices::virtio::mmio::MmioTransport;
    use crate::devices::virtio::state::Error as StateError;

    let mut s = setup_with(true, CacheMode::Writeback);
    std::fs::write(
        &s.img.0,
        vec![0x5a; usize::try_from(DISK_SECTORS * 512).unwrap()],
    )
    .unwrap();
    assert_eq!(s.io(VIRTIO_BLK_T_IN, 0, BUF, 512, true).0, VIRTIO_BLK_S_OK);
    let state = s.d.t.lock().unwrap().save_state().unwrap();
    assert!(state.device.is_some());

    let restore = |path: &TempImage, state: &crate::devices::virtio::state::TransportState| {
        let dev = slot(Block::new(opts(path, true, CacheMode::Writeback)).unwrap());
        let mut t = MmioTransport::new(dev.clone(), s.d.mem.clone()).unwrap();
        t.restore_state(state).map(|()| (dev, t))
    };
    let other = TempImage::new(DISK_SECTORS * 512);
    match restore(&other, &state) {
        Err(StateError::Differs(why)) => {
            assert!(why.contains(&*other.0.to_string_lossy()), "{why}")
        }
        r => panic!("another disk accepted: {:?}", r.err()),
    }
    let mut no_disk = state.clone();
    no_disk.device = None;
    assert!(matches!(
        restore(&s.img, &no_disk),
        Err(StateError::Differs(_))
    ));
    let mut garbage = state.clone();
    garbage.device = Some(serde_json::json!([1, 2]));
    assert!(matches!(
        restore(&s.img, &garbage),
        Err(StateError::Decode(_))
    ));

    let (dev, t) = restore(&s.img, &state).unwrap();
    s.dev = dev;
    s.d = Driver::from_transport(
        std::sync::Arc::new(std::sync::Mutex::new(t)),
        s.d.mem.clone(),
    );
    s.d.set_avail_idx(1);
    s.d.mem.write_slice(&[0u8; 512], GuestAddress(BUF)).unwrap();
    assert_eq!(s.io(VIRTIO_BLK_T_IN, 1, BUF, 512, true).0, VIRTIO_BLK_S_OK);
    let mut back = [0u8; 512];
    s.d.mem.read_slice(&mut back, GuestAddress(BUF)).unwrap();
    assert_eq!(back, [0x5a; 512]);
    assert_eq!(s.d.used_idx(), 2);
}
