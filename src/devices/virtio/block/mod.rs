//! virtio-blk (virtio 1.2 §5.2) backed by a raw image file or block device.
//!
//! [`request`] holds the request parsing and execution; this module holds
//! the device: features, config space and the queue glue.

pub mod request;

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use log::debug;
use serde::{Deserialize, Serialize};
use virtio_queue::DescriptorChain;
use vm_memory::Bytes;

use self::request::{Disk, ID_BYTES, MAX_REQUEST_BYTES, SECTOR_SIZE};
use super::queue::Outcome;
use super::{
    device_type, features, read_config_space, state, Active, GuestMem, Sources, VirtioDevice,
};
use crate::hostfile::{self, Kind, Quoted};

/// §5.2.3 feature bits.
pub mod feature_bits {
    /// §5.2.3: `size_max` holds the largest size of one data buffer.
    pub const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
    /// §5.2.3: `seg_max` holds the largest number of data buffers.
    pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
    /// §5.2.3: the device is read-only.
    pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
    /// §5.2.3: the device accepts FLUSH (its cache is not writethrough).
    pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
}
use feature_bits::*;

/// §5.2.2: one request queue.
const QUEUE_SIZES: &[u16] = &[256];
/// seg_max: the queue size minus header and status (as Linux expects).
const SEG_MAX: u32 = 126;
/// size_max: 256 KiB, so that SEG_MAX * SIZE_MAX stays within MAX_REQUEST_BYTES.
const SIZE_MAX: u32 = 256 << 10;
const _: () = assert!(SEG_MAX as u64 * SIZE_MAX as u64 <= MAX_REQUEST_BYTES);
/// §5.2.4: capacity (le64) @0, size_max (le32) @8, seg_max (le32) @12,
/// geometry @16, blk_size @20, topology @24, writeback @32, num_queues @34.
const CONFIG_SPACE_SIZE: usize = 36;

/// What the host does with the guest's writes before a FLUSH.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Flushes are ignored and not advertised: fastest, loses data if the
    /// host crashes. Fine for throw-away disks.
    Unsafe,
    /// FLUSH is advertised and does fdatasync.
    #[default]
    Writeback,
}

/// How to build a block device.
#[derive(Debug, Clone)]
pub struct BlockOptions {
    /// Raw image file or block device.
    pub path: PathBuf,
    /// Open read-only and offer VIRTIO_BLK_F_RO.
    pub read_only: bool,
    pub cache: CacheMode,
    /// GET_ID answer, at most 20 bytes.
    pub drive_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open disk image {}", Quoted(path))]
    Open {
        path: PathBuf,
        #[source]
        source: hostfile::Error,
    },
    #[error("cannot get the size of disk image {}", Quoted(path))]
    Size {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "size of disk image {} ({size} bytes) is not a multiple of 512",
        Quoted(path)
    )]
    NotSectorMultiple { path: PathBuf, size: u64 },
    #[error("drive id {0:?} is longer than 20 bytes")]
    DriveIdTooLong(String),
}

/// The virtio-blk device.
pub struct Block {
    disk: Disk,
    /// The image as the config names it (kept in snapshots).
    path: PathBuf,
    avail_features: u64,
    config: [u8; CONFIG_SPACE_SIZE],
}

impl Block {
    /// Opens the image (once) and checks its size.
    pub fn new(opts: BlockOptions) -> Result<Self, Error> {
        let id_bytes = opts.drive_id.as_bytes();
        if id_bytes.len() > ID_BYTES {
            return Err(Error::DriveIdTooLong(opts.drive_id));
        }
        let mut id = [0u8; ID_BYTES];
        id[..id_bytes.len()].copy_from_slice(id_bytes);

        // A regular file or a block device, opened without blocking, and
        // locked (exclusively when writable) for as long as the device
        // lives: another VM asking for a conflicting lock is refused.
        let open_err = |source| Error::Open {
            path: opts.path.clone(),
            source,
        };
        let mut file = hostfile::open(
            &opts.path,
            OpenOptions::new().read(true).write(!opts.read_only),
            Kind::RegularOrBlock,
        )
        .map_err(open_err)?;
        hostfile::lock(&file, !opts.read_only).map_err(open_err)?;
        // Seeking works for block devices too, where metadata().len() is 0.
        let size = file.seek(SeekFrom::End(0)).map_err(|source| Error::Size {
            path: opts.path.clone(),
            source,
        })?;
        if size % SECTOR_SIZE != 0 {
            return Err(Error::NotSectorMultiple {
                path: opts.path,
                size,
            });
        }

        let mut avail_features = features::COMMON | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_SIZE_MAX;
        if opts.read_only {
            avail_features |= VIRTIO_BLK_F_RO;
        }
        if opts.cache == CacheMode::Writeback {
            avail_features |= VIRTIO_BLK_F_FLUSH;
        }
        let mut config = [0u8; CONFIG_SPACE_SIZE];
        config[0..8].copy_from_slice(&(size / SECTOR_SIZE).to_le_bytes());
        config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());

        Ok(Self {
            path: opts.path,
            disk: Disk {
                file,
                size,
                read_only: opts.read_only,
                cache: opts.cache,
                flush_negotiated: false,
                id,
            },
            avail_features,
            config,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.size / SECTOR_SIZE
    }
}

/// Handles one chain: parse, execute, write the status.
fn handle_chain(chain: DescriptorChain<&GuestMem>, mem: &GuestMem, disk: &Disk) -> Outcome {
    let (status, written, status_addr) = match request::parse(chain, mem) {
        Ok(req) => {
            let (status, written) = request::execute(&req, disk, mem);
            (status, written, req.status_addr)
        }
        Err(request::Error::Bad {
            status_addr,
            status,
            reason,
        }) => {
            debug!("virtio-blk: {reason}");
            (status, 0, status_addr)
        }
        Err(e @ request::Error::NoStatus(_)) => {
            debug!("virtio-blk: {e}");
            return Outcome::Fatal;
        }
    };
    // The status address was checked by `parse`; failing here means the
    // memory map changed under us: give up on the device.
    if mem.write_obj(status, status_addr).is_err() {
        return Outcome::Fatal;
    }
    // `written` <= MAX_REQUEST_BYTES, so this does not saturate in practice.
    Outcome::Used(written.saturating_add(1))
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
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

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // VIRTIO_BLK_F_CONFIG_WCE is not offered: every field is read-only.
        debug!(
            "virtio-blk: {}-byte config write at {offset:#x} ignored",
            data.len()
        );
    }

    fn activate(&mut self, active: &mut Active) {
        self.disk.flush_negotiated = active.acked_features & VIRTIO_BLK_F_FLUSH != 0;
    }

    fn reset(&mut self) {
        self.disk.flush_negotiated = false;
    }

    fn process_queue(&mut self, active: &mut Active, index: usize, _: &mut dyn Sources) -> bool {
        let disk = &self.disk;
        active.drain(index, |chain, mem| handle_chain(chain, mem, disk))
    }

    fn save_state(&self) -> Result<Option<serde_json::Value>, state::Error> {
        serde_json::to_value(self.snapshot())
            .map(Some)
            .map_err(state::Error::Encode)
    }

    fn restore_state(&mut self, saved: Option<&serde_json::Value>) -> Result<(), state::Error> {
        let saved: BlockSnapshot = match saved {
            Some(v) => BlockSnapshot::deserialize(v).map_err(state::Error::Decode)?,
            None => {
                return Err(state::Error::Differs(
                    "the snapshot does not describe the disk".into(),
                ))
            }
        };
        let here = self.snapshot();
        if saved != here {
            return Err(state::Error::Differs(format!(
                "the snapshot's disk is {}, the config's {}",
                saved.describe(),
                here.describe()
            )));
        }
        Ok(())
    }
}

/// What a snapshot records of a drive: which disk it was, to check a
/// restore reopens the same one. Not its contents: the disk must stay as
/// it was at the snapshot for the restored guest to find its data.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct BlockSnapshot {
    /// The path's bytes (a path need not be UTF-8).
    path: Vec<u8>,
    size: u64,
    read_only: bool,
}

impl BlockSnapshot {
    fn describe(&self) -> String {
        let path = Path::new(std::ffi::OsStr::from_bytes(&self.path));
        let mode = if self.read_only {
            "read-only"
        } else {
            "writable"
        };
        format!("{} ({} bytes, {mode})", Quoted(path), self.size)
    }
}

impl Block {
    fn snapshot(&self) -> BlockSnapshot {
        BlockSnapshot {
            path: self.path.as_os_str().as_bytes().to_vec(),
            size: self.disk.size,
            read_only: self.disk.read_only,
        }
    }
}

#[cfg(test)]
mod tests;
