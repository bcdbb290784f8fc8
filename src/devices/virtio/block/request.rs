//! virtio-blk requests (virtio 1.2 §5.2.6): parsing a descriptor chain into
//! a [`Request`] and executing it against a [`Disk`].
//!
//! Pure logic over guest memory and a file: no queue, no event loop, so it
//! can be tested on hand-made descriptors. Every guest value is checked
//! before use; every guest memory access goes through vm-memory's checked
//! accessors, so a bad address is an I/O error, never a host access outside
//! guest memory.

use std::fs::File;
use std::io::{Seek, SeekFrom};

use log::debug;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemory as _};

use super::CacheMode;
use crate::devices::virtio::GuestMem;

/// §5.2.6: sectors are always 512 bytes, whatever the block size.
pub const SECTOR_SIZE: u64 = 512;
/// §5.2.6: `le32 type; le32 reserved; le64 sector;`.
pub const HEADER_SIZE: u32 = 16;
/// §5.2.6: GET_ID answers a 20-byte, zero-padded string.
pub const ID_BYTES: usize = 20;

/// §5.2.6 request types.
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

/// §5.2.6 status values.
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Data descriptors we accept per request. We advertise seg_max = 126
/// (§5.2.4), so a conforming driver never sends more.
pub const MAX_DATA_DESCRIPTORS: usize = 256;
/// Largest data payload of one request; covers seg_max * size_max.
pub const MAX_REQUEST_BYTES: u64 = 32 << 20;

/// The operation a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => Self::In,
            VIRTIO_BLK_T_OUT => Self::Out,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            t => Self::Unsupported(t),
        }
    }
}

/// A well-formed request: every buffer is inside guest memory and of the
/// right direction, and the data length is bounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestType,
    pub sector: u64,
    /// The data buffers, in order.
    pub data: Vec<(GuestAddress, u32)>,
    /// Sum of the data buffer lengths, at most [`MAX_REQUEST_BYTES`].
    pub data_len: u32,
    /// Where the status byte goes.
    pub status_addr: GuestAddress,
}

/// Why a chain is not a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// There is no place to put a status: the device cannot answer.
    #[error("request cannot carry a status: {0}")]
    NoStatus(&'static str),
    /// The request is malformed; answer `status` at `status_addr`.
    #[error("bad request: {reason}")]
    Bad {
        status_addr: GuestAddress,
        status: u8,
        reason: &'static str,
    },
}

fn in_memory(mem: &GuestMem, addr: GuestAddress, len: u32) -> bool {
    let Ok(n) = usize::try_from(len) else {
        return false;
    };
    addr.0.checked_add(u64::from(len)).is_some() && mem.check_range(addr, n)
}

/// Turns the descriptors of one chain into a request.
///
/// Layout (§5.2.6): a device-readable header of at least 16 bytes, data
/// buffers, and a device-writable status whose last byte is the status.
/// `descs` is the chain as `virtio_queue` yields it: it ends early (on a
/// descriptor that still has NEXT set) when the chain loops, is longer than
/// the queue, has a bad indirect table or a bad index.
pub fn parse<I: IntoIterator<Item = Descriptor>>(
    descs: I,
    mem: &GuestMem,
) -> Result<Request, Error> {
    let mut first: Option<Descriptor> = None;
    let mut middle: Vec<Descriptor> = Vec::new();
    let mut last: Option<Descriptor> = None;
    let mut too_many = false;
    for d in descs {
        if first.is_none() {
            first = Some(d);
            continue;
        }
        if let Some(prev) = last.replace(d) {
            if middle.len() < MAX_DATA_DESCRIPTORS {
                middle.push(prev);
            } else {
                too_many = true;
            }
        }
    }
    let (Some(header), Some(status)) = (first, last) else {
        return Err(Error::NoStatus("chain shorter than header + status"));
    };
    if status.has_next() {
        return Err(Error::NoStatus(
            "chain truncated (loop, bad index or bad indirect table)",
        ));
    }
    if !status.is_write_only() || status.len() == 0 {
        return Err(Error::NoStatus(
            "status descriptor not device-writable or empty",
        ));
    }
    // The status is the last byte of the last buffer.
    let status_addr = status
        .addr()
        .0
        .checked_add(u64::from(status.len() - 1))
        .map(GuestAddress)
        .filter(|&a| mem.check_range(a, 1))
        .ok_or(Error::NoStatus("status byte outside guest memory"))?;
    let bad = |reason| Error::Bad {
        status_addr,
        status: VIRTIO_BLK_S_IOERR,
        reason,
    };

    if header.is_write_only() || header.len() < HEADER_SIZE {
        return Err(bad("header not device-readable or shorter than 16 bytes"));
    }
    let mut raw = [0u8; 16];
    mem.read_slice(&mut raw, header.addr())
        .map_err(|_| bad("header outside guest memory"))?;
    let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = raw;
    let kind = RequestType::from(u32::from_le_bytes([t0, t1, t2, t3]));
    let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);

    let device_writes = match kind {
        RequestType::In | RequestType::GetId => true,
        RequestType::Out | RequestType::Flush => false,
        RequestType::Unsupported(_) => {
            return Err(Error::Bad {
                status_addr,
                status: VIRTIO_BLK_S_UNSUPP,
                reason: "unsupported type",
            })
        }
    };
    if too_many {
        return Err(bad("too many data descriptors"));
    }
    let mut data_len: u64 = 0;
    let mut data = Vec::with_capacity(middle.len());
    for d in middle {
        if d.is_write_only() != device_writes {
            return Err(bad("data descriptor of the wrong direction"));
        }
        data_len = data_len
            .checked_add(u64::from(d.len()))
            .filter(|&l| l <= MAX_REQUEST_BYTES)
            .ok_or(bad("request too large"))?;
        if !in_memory(mem, d.addr(), d.len()) {
            return Err(bad("data buffer outside guest memory"));
        }
        data.push((d.addr(), d.len()));
    }
    let data_len = u32::try_from(data_len).map_err(|_| bad("request too large"))?;
    Ok(Request {
        kind,
        sector,
        data,
        data_len,
        status_addr,
    })
}

/// The backing file of a block device.
pub struct Disk {
    pub file: File,
    /// Size in bytes, a multiple of [`SECTOR_SIZE`].
    pub size: u64,
    pub read_only: bool,
    pub cache: CacheMode,
    /// The driver negotiated VIRTIO_BLK_F_FLUSH; without it, Writeback
    /// writes are synced one by one (§5.2.6.1: writethrough).
    pub flush_negotiated: bool,
    /// GET_ID answer.
    pub id: [u8; ID_BYTES],
}

impl Disk {
    /// Byte offset of `sector` when `len` bytes from there fit the disk.
    fn range(&self, sector: u64, len: u32) -> Option<u64> {
        let start = sector.checked_mul(SECTOR_SIZE)?;
        let end = start.checked_add(u64::from(len))?;
        (end <= self.size && u64::from(len) % SECTOR_SIZE == 0).then_some(start)
    }

    fn sync(&self) -> std::io::Result<()> {
        match self.cache {
            CacheMode::Writeback => self.file.sync_data(),
            CacheMode::Unsafe => Ok(()),
        }
    }
}

/// Largest piece of one data buffer moved by a single file read or write:
/// bounds the time the event-loop thread spends in one system call.
pub const MAX_CHUNK: usize = 1 << 20;

/// Executes `req`; returns the status and the number of bytes written into
/// guest data buffers. Data moves directly between the file and guest memory
/// (vm-memory's checked volatile accessors), without a bounce buffer.
pub fn execute(req: &Request, disk: &Disk, mem: &GuestMem) -> (u8, u32) {
    execute_chunked(req, disk, mem, MAX_CHUNK)
}

/// [`execute`] with at most `chunk` bytes (non-zero) per file access.
pub(super) fn execute_chunked(
    req: &Request,
    disk: &Disk,
    mem: &GuestMem,
    chunk: usize,
) -> (u8, u32) {
    let chunk = chunk.max(1);
    let res = match req.kind {
        RequestType::In => read(req, disk, mem, chunk).map(|()| req.data_len),
        RequestType::Out if disk.read_only => Err("write to read-only disk"),
        RequestType::Out => write(req, disk, mem, chunk).map(|()| 0),
        RequestType::Flush => disk.sync().map(|()| 0).map_err(|_| "flush failed"),
        RequestType::GetId => get_id(req, disk, mem),
        RequestType::Unsupported(_) => return (VIRTIO_BLK_S_UNSUPP, 0),
    };
    match res {
        Ok(written) => (VIRTIO_BLK_S_OK, written),
        Err(reason) => {
            debug!(
                "virtio-blk: {:?} at sector {}: {reason}",
                req.kind, req.sector
            );
            (VIRTIO_BLK_S_IOERR, 0)
        }
    }
}

/// Walks the data buffers in pieces of at most `chunk` bytes: `f(file
/// offset, guest address, length)`. The whole request is checked against
/// the disk size first.
fn for_each_chunk<F>(req: &Request, disk: &Disk, chunk: usize, mut f: F) -> Result<(), &'static str>
where
    F: FnMut(u64, GuestAddress, usize) -> Result<(), &'static str>,
{
    let mut offset = disk
        .range(req.sector, req.data_len)
        .ok_or("beyond the end of the disk or unaligned")?;
    for &(addr, len) in &req.data {
        let mut done: u32 = 0;
        while done < len {
            let n = usize::try_from(len - done).map_or(chunk, |r| r.min(chunk));
            let n32 = u32::try_from(n).map_err(|_| "chunk too large")?;
            let gaddr = addr
                .0
                .checked_add(u64::from(done))
                .ok_or("address overflow")?;
            f(offset, GuestAddress(gaddr), n)?;
            offset = offset
                .checked_add(u64::from(n32))
                .ok_or("offset overflow")?;
            done += n32;
        }
    }
    Ok(())
}

/// The file positioned at `off`. The file's cursor is only used here, by
/// the device's one event-loop thread, right before each access.
fn file_at(disk: &Disk, off: u64) -> Result<&File, &'static str> {
    let mut f = &disk.file;
    f.seek(SeekFrom::Start(off)).map_err(|_| "seek failed")?;
    Ok(f)
}

fn read(req: &Request, disk: &Disk, mem: &GuestMem, chunk: usize) -> Result<(), &'static str> {
    for_each_chunk(req, disk, chunk, |off, addr, n| {
        let mut f = file_at(disk, off)?;
        // Checked: the whole range must lie in guest memory, else an error.
        mem.read_exact_volatile_from(addr, &mut f, n)
            .map_err(|_| "read failed or guest buffer not writable")
    })
}

fn write(req: &Request, disk: &Disk, mem: &GuestMem, chunk: usize) -> Result<(), &'static str> {
    for_each_chunk(req, disk, chunk, |off, addr, n| {
        let mut f = file_at(disk, off)?;
        mem.write_all_volatile_to(addr, &mut f, n)
            .map_err(|_| "write failed or guest buffer not readable")
    })?;
    if !disk.flush_negotiated {
        disk.sync().map_err(|_| "sync failed")?;
    }
    Ok(())
}

fn get_id(req: &Request, disk: &Disk, mem: &GuestMem) -> Result<u32, &'static str> {
    let mut id: &[u8] = &disk.id;
    let mut written: u32 = 0;
    for &(addr, len) in &req.data {
        let n = usize::try_from(len).map_or(id.len(), |l| l.min(id.len()));
        let (now, rest) = id.split_at(n);
        mem.write_slice(now, addr)
            .map_err(|_| "guest buffer not writable")?;
        written += u32::try_from(n).map_err(|_| "id too long")?;
        id = rest;
    }
    Ok(written)
}
