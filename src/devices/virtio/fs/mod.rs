//! virtio-fs (virtio 1.2 §5.11): a host folder in the guest, served inside
//! kiln by fuse-backend-rs (its passthrough file system in its VFS, behind
//! kiln's [`guard::Guard`] policy).
//!
//! Queues: hiprio (FORGET, INTERRUPT) and one request queue. Requests run on
//! a worker thread of the device's own ([`worker`]), started with the
//! device, given the queues when the driver sets DRIVER_OK and made to let
//! go of them at reset: a slow request (a big read, a slow disk) stalls
//! neither the vCPUs nor the other devices on the event loop. The worker
//! waits on the queues' notification eventfds itself, so a request costs no
//! hop through the event loop.
//!
//! The guest mounts it with `mount -t virtiofs <tag> <dir>`.

pub mod guard;
mod worker;

#[cfg(test)]
mod tests;

use std::io;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::api::{Vfs, VfsOptions};
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use log::{debug, error};
use virtio_queue::DescriptorChain;

use self::guard::{FdBudget, Guard};
use self::worker::{Job, Share, Worker};
use super::{device_type, features, read_config_space, Active, GuestMem, Sources, VirtioDevice};

/// §5.11.2: hiprio, then the request queues.
pub const HIPRIO_QUEUE: usize = 0;
const QUEUE_SIZES: &[u16] = &[256, 256];
/// §5.11.4: `u8 tag[36]; le32 num_request_queues;`.
pub const TAG_MAX: usize = 36;
const CONFIG_SPACE_SIZE: usize = TAG_MAX + 4;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("fs tag {0:?} must be 1 to {TAG_MAX} bytes")]
    Tag(String),
    #[error("cannot serve {}", path.display())]
    Serve {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set up the fs worker's wakeups")]
    Wakeup(#[source] io::Error),
    #[error("cannot start the fs worker thread")]
    Thread(#[source] io::Error),
}

/// How to build the device: one `fs` config entry.
#[derive(Debug, Clone)]
pub struct FsOptions {
    /// What the guest mounts (`mount -t virtiofs TAG ...`), 1 to 36 bytes.
    pub tag: String,
    /// The host folder.
    pub path: PathBuf,
    /// Refuse every change to the folder (EROFS).
    pub read_only: bool,
}

/// The request server for a folder.
pub(crate) type FsServer = Server<Arc<Vfs>>;

/// Builds the server for `path`: the passthrough file system behind the
/// guard, mounted at the root of a VFS.
pub(crate) fn serve(
    path: &Path,
    read_only: bool,
    budget: Arc<FdBudget>,
) -> Result<Arc<FsServer>, Error> {
    let serve_err = |source| Error::Serve {
        path: path.to_path_buf(),
        source,
    };
    let root = path
        .to_str()
        .ok_or_else(|| serve_err(io::Error::other("the path is not UTF-8")))?;
    let cfg = Config {
        root_dir: root.to_string(),
        // The guest kernel caches what it may; kiln never needs to be asked
        // twice for the same attributes within a second.
        cache_policy: CachePolicy::Auto,
        // Extended attributes carry capabilities and security labels:
        // none reach the host.
        xattr: false,
        do_import: false,
        ..Config::default()
    };
    let fs = PassthroughFs::<()>::new(cfg).map_err(serve_err)?;
    fs.import().map_err(serve_err)?;
    let vfs = Vfs::new(VfsOptions {
        no_open: false,
        no_opendir: false,
        // Guest page-cache writeback would write through handles the guest
        // opened read-only.
        no_writeback: true,
        ..VfsOptions::default()
    });
    vfs.mount(Box::new(Guard::new(fs, read_only, budget)), "/")
        .map_err(|e| serve_err(io::Error::other(format!("{e:?}"))))?;
    Ok(Arc::new(Server::new(Arc::new(vfs))))
}

/// Answers one request: the FUSE message in the chain's readable buffers,
/// the reply into its writable ones. Returns the reply length (0 when the
/// chain cannot carry a message or a reply; the guest gets nothing back).
pub fn handle_chain(server: &FsServer, chain: DescriptorChain<&GuestMem>, mem: &GuestMem) -> u32 {
    // virtio-queue ends a chain it cannot follow (a loop, more descriptors
    // than the queue, a next index past it, a bad indirect table) on a
    // descriptor that still has NEXT. A loop hands the same buffers over
    // again and again: the reply would be written over the same bytes and
    // claim more than the guest gave. Such a chain gets no reply.
    if chain.clone().last().is_some_and(|d| d.has_next()) {
        debug!("virtio-fs: descriptor chain cut short (a loop or a bad index)");
        return 0;
    }
    let reader = match Reader::from_descriptor_chain(mem, chain.clone()) {
        Ok(r) => r,
        Err(e) => {
            debug!("virtio-fs: bad request buffers: {e}");
            return 0;
        }
    };
    let writer = match VirtioFsWriter::new(mem, chain) {
        Ok(w) => w,
        Err(e) => {
            debug!("virtio-fs: bad reply buffers: {e}");
            return 0;
        }
    };
    // A panic in the server on some message must not take the device (or
    // kiln) down: the request gets no reply.
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        server.handle_message(reader, writer.into(), None, None)
    }));
    match result {
        Ok(Ok(n)) => u32::try_from(n).unwrap_or(0),
        Ok(Err(e)) => {
            debug!("virtio-fs: request failed: {e}");
            0
        }
        Err(_) => {
            error!("virtio-fs: the FUSE server panicked on a request; it got no reply");
            0
        }
    }
}

pub struct Fs {
    opts: FsOptions,
    config: [u8; CONFIG_SPACE_SIZE],
    worker: Worker,
    /// Set once the guest sent a request (a mount starts with FUSE_INIT):
    /// from then on the server holds state a snapshot cannot.
    used: Arc<AtomicBool>,
}

impl Fs {
    /// Checks the options and starts the worker; the folder is opened at
    /// each activation (a driver reset starts over with a fresh server).
    pub fn new(opts: FsOptions, budget: Arc<FdBudget>) -> Result<Self, Error> {
        let tag = opts.tag.as_bytes();
        if tag.is_empty() || tag.len() > TAG_MAX {
            return Err(Error::Tag(opts.tag));
        }
        let mut config = [0u8; CONFIG_SPACE_SIZE];
        config[..tag.len()].copy_from_slice(tag);
        config[TAG_MAX..].copy_from_slice(&1u32.to_le_bytes());
        // Fail now, with the path in the message, rather than at DRIVER_OK.
        drop(serve(&opts.path, opts.read_only, budget.clone())?);
        let used = Arc::new(AtomicBool::new(false));
        let share = Share {
            path: opts.path.clone(),
            read_only: opts.read_only,
            budget,
            used: used.clone(),
        };
        let worker = Worker::start(share, &opts.tag)?;
        Ok(Self {
            opts,
            config,
            worker,
            used,
        })
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        device_type::FS
    }

    /// A share the guest never used (not mounted: no FUSE request yet) is
    /// saved as its tag; a restore serves whatever folder its config names
    /// under that tag (the folder is chosen per run). A share in use holds
    /// open files and node IDs in this process: it cannot be saved.
    fn save_state(&self) -> Result<Option<serde_json::Value>, super::state::Error> {
        if self.used.load(Ordering::SeqCst) {
            return Err(super::state::Error::InUse(format!(
                "fs {}: the guest has mounted this share, and its open files cannot be saved",
                self.opts.tag
            )));
        }
        Ok(Some(serde_json::json!({ "tag": self.opts.tag })))
    }

    fn restore_state(
        &mut self,
        saved: Option<&serde_json::Value>,
    ) -> Result<(), super::state::Error> {
        let tag = saved
            .and_then(|v| v.get("tag"))
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| {
                super::state::Error::Differs("the snapshot does not give the fs tag".into())
            })?;
        if tag != self.opts.tag {
            return Err(super::state::Error::Differs(format!(
                "the snapshot's fs tag is {tag:?}, the config's {:?}",
                self.opts.tag
            )));
        }
        Ok(())
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        features::COMMON
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config, offset, data);
    }

    fn activate(&mut self, active: &mut Active) {
        self.worker.serve(Job {
            mem: active.mem.clone(),
            interrupt: active.interrupt.clone(),
            queues: active.queues.iter_mut().map(std::mem::take).collect(),
            notify: std::mem::take(&mut active.queue_evts),
        });
    }

    fn reset(&mut self) {
        self.worker.stop();
    }

    fn waits_on_queues(&self) -> bool {
        true
    }

    fn process_queue(&mut self, _: &mut Active, _index: usize, _: &mut dyn Sources) -> bool {
        // Never called: the worker waits on the queues itself.
        false
    }
}
