//! virtio-blk under a hostile driver: the device behind kiln's mmio
//! transport, a 32 KiB disk image in a scratch directory, and requests
//! (well-formed or not) in fuzzer-chosen descriptor chains.
//!
//! Input: a settings byte (read-only, cache mode), the features the
//! driver accepts (u64), the queue size, then driver actions until the
//! bytes run out: [`Rings::op`]'s, and notify, re-initialize, a register
//! access, a block request.

use super::input::{Input, Seed};
use super::virtq::{self, Desc, Rings, Transported, F_WRITE};
use super::{memory, Scratch};
use crate::devices::virtio::block::request::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use crate::devices::virtio::block::{Block, BlockOptions, CacheMode};
use crate::devices::virtio::features::COMMON;
use crate::devices::virtio::Sources;

const DISK_SECTORS: u64 = 64;
/// Driver actions per run, at most.
const MAX_OPS: usize = 256;

/// Event sources for a device that has none.
struct NoSources;

impl Sources for NoSources {
    fn add(&mut self, _: i32, _: u32, _: event_manager::EventSet) -> std::io::Result<()> {
        Ok(())
    }
    fn modify(&mut self, _: i32, _: u32, _: event_manager::EventSet) -> std::io::Result<()> {
        Ok(())
    }
    fn remove(&mut self, _: i32) -> std::io::Result<()> {
        Ok(())
    }
}

/// Op codes past [`Rings::op`]'s.
const NOTIFY: u8 = 7;
const INIT: u8 = 8;
const MMIO: u8 = 9;
const REQUEST: u8 = 10;
const OPS: u8 = 11;

pub fn run(data: &[u8]) {
    super::limit_file_size();
    let mut input = Input::new(data);
    let settings = input.u8();
    let scratch = Scratch::new("blk");
    let disk = scratch.path("disk.img");
    let image: Vec<u8> = (0..DISK_SECTORS * 512)
        .map(|i| u8::try_from(i % 251).unwrap_or(0))
        .collect();
    if let Err(e) = std::fs::write(&disk, &image) {
        panic!("cannot write {}: {e}", disk.display());
    }
    let device = Block::new(BlockOptions {
        path: disk,
        read_only: settings & 1 != 0,
        cache: if settings & 2 != 0 {
            CacheMode::Unsafe
        } else {
            CacheMode::Writeback
        },
        drive_id: "fuzz".into(),
    });
    let device = match device {
        Ok(d) => d,
        Err(e) => panic!("cannot open the disk image: {e}"),
    };
    let mem = memory::guest_mem();
    let mut dev = Transported::new(device, mem.clone());
    let mut features = input.u64();
    let mut rings = Rings::new(mem, &[virtq::queue_size(&mut input)]);
    dev.init(features, &mut rings);

    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        let op = input.u8() % OPS;
        if rings.op(op, &mut input) {
            continue;
        }
        match op {
            NOTIFY => rings.checked(|| dev.process(0, &mut NoSources)),
            INIT => {
                features = input.u64();
                dev.init(features, &mut rings);
            }
            MMIO => dev.mmio(&mut input),
            _ => request(&mut input, &mut rings),
        }
    }
    // What the driver left in the ring, as a last notification would.
    rings.checked(|| dev.process(0, &mut NoSources));
    scratch.check_untouched(&["disk.img"]);
}

/// A block request header at a fuzzer-chosen place, then a chain of
/// header, data buffers and status made available.
fn request(input: &mut Input, rings: &mut Rings) {
    let kind = match input.u8() % 6 {
        0 => VIRTIO_BLK_T_IN,
        1 => VIRTIO_BLK_T_OUT,
        2 => VIRTIO_BLK_T_FLUSH,
        3 => VIRTIO_BLK_T_GET_ID,
        _ => input.u32(),
    };
    let sector = if input.bool() {
        u64::from(input.u8())
    } else {
        input.u64()
    };
    let hdr = virtq::addr(input);
    let mut raw = [0u8; 16];
    raw[..4].copy_from_slice(&kind.to_le_bytes());
    raw[8..].copy_from_slice(&sector.to_le_bytes());
    rings.write_bytes(hdr, &raw);
    let mut descs = vec![Desc {
        addr: hdr,
        len: 16,
        flags: 0,
        next: 0,
    }];
    let writes = kind == VIRTIO_BLK_T_IN || kind == VIRTIO_BLK_T_GET_ID;
    for _ in 0..input.below(4) {
        let mut d = virtq::desc(input);
        if input.bool() {
            d.flags = if writes { F_WRITE } else { 0 };
        }
        descs.push(d);
    }
    descs.push(Desc {
        addr: virtq::addr(input),
        len: 1,
        flags: F_WRITE,
        next: 0,
    });
    let head = input.u16();
    rings.chain(0, head, &descs);
}

/// The seed corpus: each request type, well-formed, and a few hostile
/// chains.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let start = |s: &mut Seed, settings: u8| {
        s.u8(settings).u64(COMMON).u8(4);
    };
    let req = |s: &mut Seed, kind: u8, sector: u8, data: &[(u64, u32)], status: u64| {
        s.u8(REQUEST).u8(kind).u8(1).u8(sector);
        virtq::seed_addr(s, 0x8000);
        s.u8(u8::try_from(data.len()).unwrap_or(0));
        for &(addr, len) in data {
            virtq::seed_desc(
                s,
                Desc {
                    addr,
                    len,
                    flags: 0,
                    next: 0,
                },
            );
            s.u8(1);
        }
        virtq::seed_addr(s, status);
        s.u16(0);
        s.u8(NOTIFY);
    };
    let mut out = Vec::new();
    let mut s = Seed::default();
    start(&mut s, 0);
    req(&mut s, 0, 2, &[(0x9000, 1024)], 0x8800);
    req(&mut s, 1, 3, &[(0x9000, 512), (0x1_2000, 512)], 0x8800);
    req(&mut s, 2, 0, &[], 0x8800);
    req(&mut s, 3, 0, &[(0x9000, 20)], 0x8800);
    out.push(("each-request".into(), s.take()));

    start(&mut s, 3);
    req(&mut s, 1, 0, &[(0x9000, 512)], 0x8800);
    req(&mut s, 0, 63, &[(0xff00, 512)], 0x1_ffff);
    out.push(("read-only-across-regions".into(), s.take()));

    // A chain whose data runs past guest memory, one looping on itself,
    // an indirect table, and a used ring index far ahead.
    start(&mut s, 0);
    req(&mut s, 0, 0, &[(0x1_ff00, 0x1000)], 0x8800);
    s.u8(0).u8(0).u16(0);
    virtq::seed_desc(
        &mut s,
        Desc {
            addr: 0x8000,
            len: 16,
            flags: 1,
            next: 0,
        },
    );
    s.u8(3).u16(0).u8(NOTIFY);
    s.u8(0).u8(0).u16(1);
    virtq::seed_desc(
        &mut s,
        Desc {
            addr: 0xa000,
            len: 48,
            flags: 4,
            next: 0,
        },
    );
    for (i, d) in [(0x8000u64, 16u32, 1u16), (0x9000, 512, 3), (0x8800, 1, 2)]
        .iter()
        .enumerate()
    {
        s.u8(1);
        virtq::seed_addr(&mut s, 0xa000 + 16 * u64::try_from(i).unwrap_or(0));
        virtq::seed_desc(
            &mut s,
            Desc {
                addr: d.0,
                len: d.1,
                flags: d.2,
                next: u16::try_from(i + 1).unwrap_or(0),
            },
        );
    }
    s.u8(3).u16(1).u8(NOTIFY);
    s.u8(4).u8(0).u16(0x4000).u8(NOTIFY);
    s.u8(INIT).u64(COMMON).u8(MMIO).u16(0x70).u8(2).u8(0).u64(0);
    out.push(("hostile-chains".into(), s.take()));
    out
}
