//! The thread that serves a virtio-fs device's queues.
//!
//! It starts with the device, while the VM is being built, and lives as
//! long as the device: an activation (DRIVER_OK) hands it the queues, a
//! reset takes them back, and between the two it waits for work on the
//! queues' notification eventfds itself (no hop through the event loop).
//! Starting it with the device, not at DRIVER_OK, keeps thread creation and
//! the folder's file operations off the vCPU thread that activates the
//! device: the worker installs its own seccomp filter
//! ([`crate::seccomp::ThreadKind::FsWorker`]) and the vCPU's filter allows
//! neither.

use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvError, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;

use log::error;
use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use super::guard::FdBudget;
use super::{handle_chain, serve, Error, FsServer};
use crate::devices::virtio::queue::{Cursor, Outcome};
use crate::devices::virtio::{GuestMem, Interrupt};
use crate::seccomp::{self, ThreadKind};

/// What an activation hands the worker: guest memory, the interrupt, the
/// queues and the eventfds the driver's notifications arrive on.
pub(super) struct Job {
    pub mem: GuestMem,
    pub interrupt: Interrupt,
    pub queues: Vec<Queue>,
    pub notify: Vec<EventFd>,
}

/// The folder the worker serves (a new server at each activation: a
/// driver reset starts over).
pub(super) struct Share {
    pub path: PathBuf,
    pub read_only: bool,
    pub budget: Arc<FdBudget>,
    /// Set on the guest's first request (see [`super::Fs`]'s snapshots).
    pub used: Arc<AtomicBool>,
}

enum Command {
    /// Serve these queues (instead of any served before).
    Serve(Job),
    /// Let go of the queues; answered on `stopped`.
    Stop,
}

/// The device's handle on its worker.
pub(super) struct Worker {
    commands: Option<Sender<Command>>,
    stopped: Receiver<()>,
    /// Written with each command: the worker watches it while it serves.
    wake: EventFd,
    thread: Option<JoinHandle<()>>,
}

/// epoll data of the wake eventfd; queue `i` uses `i`.
const WAKE_TOKEN: u64 = u64::MAX;

impl Worker {
    pub(super) fn start(share: Share, tag: &str) -> Result<Self, Error> {
        let wake = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(Error::Wakeup)?;
        let worker_wake = wake.try_clone().map_err(Error::Wakeup)?;
        let (commands, rx) = mpsc::channel();
        let (stopped_tx, stopped) = mpsc::channel();
        let thread = without_signals(|| {
            std::thread::Builder::new()
                .name(format!("kiln-fs-{tag}"))
                .spawn(move || run(&share, &rx, &stopped_tx, &worker_wake))
        })
        .map_err(Error::Thread)?;
        Ok(Worker {
            commands: Some(commands),
            stopped,
            wake,
            thread: Some(thread),
        })
    }

    fn send(&self, command: Command) -> bool {
        let sent = self
            .commands
            .as_ref()
            .is_some_and(|c| c.send(command).is_ok());
        if sent {
            // Fails only when the counter is saturated: already woken.
            let _ = self.wake.write(1);
        }
        sent
    }

    /// Starts serving `job`'s queues.
    pub(super) fn serve(&self, job: Job) {
        if !self.send(Command::Serve(job)) {
            error!("virtio-fs worker is gone: the device cannot start");
        }
    }

    /// Returns once the worker has let go of the queues.
    pub(super) fn stop(&self) {
        if self.send(Command::Stop) {
            let _ = self.stopped.recv();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // A closed channel ends the thread.
        self.commands = None;
        let _ = self.wake.write(1);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                error!("virtio-fs worker panicked");
            }
        }
    }
}

/// Runs `spawn` with every asynchronous signal blocked, so that the thread
/// it starts takes none: the worker starts while the VM is built, before
/// the threads that watch for SIGTERM, SIGUSR1 and the like block them (the
/// threads started after that inherit the block), and a process signal it
/// took would end kiln with the signal's default action. Faults and
/// seccomp's SIGSYS still reach it.
fn without_signals<T>(spawn: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    // SAFETY: sigset_t is plain data, initialized by sigfillset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset we own; the signals are valid.
    unsafe {
        libc::sigfillset(&mut set);
        for sync in [
            libc::SIGSYS,
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGILL,
            libc::SIGFPE,
            libc::SIGTRAP,
        ] {
            libc::sigdelset(&mut set, sync);
        }
    }
    // SAFETY: valid sets; `old` receives this thread's mask.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    let spawned = spawn();
    // SAFETY: puts back the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    spawned
}

/// The worker thread: filtered first, then each command in turn until the
/// device is gone.
fn run(share: &Share, commands: &Receiver<Command>, stopped: &Sender<()>, wake: &EventFd) {
    let filtered = match seccomp::enter(ThreadKind::FsWorker) {
        Ok(()) => true,
        Err(e) => {
            error!("virtio-fs worker: {}", crate::error_chain(&e));
            false
        }
    };
    let mut next = commands.recv();
    while let Ok(command) = next {
        next = match command {
            Command::Stop => {
                let _ = stopped.send(());
                commands.recv()
            }
            // Never unfiltered: the device fails instead.
            Command::Serve(job) if !filtered => {
                job.interrupt.set_needs_reset();
                commands.recv()
            }
            Command::Serve(job) => serve_job(share, job, commands, wake),
        };
    }
}

/// What the worker holds while it serves.
struct Queues {
    used: Arc<AtomicBool>,
    server: Arc<FsServer>,
    mem: GuestMem,
    interrupt: Interrupt,
    queues: Vec<Queue>,
    notify: Vec<EventFd>,
}

impl Queues {
    /// Serves every queue until none has work left. Returns whether the
    /// per-pass budget ran out with work left.
    fn serve_all(&mut self) -> bool {
        let mut more = false;
        for q in &mut self.queues {
            if !virtio_queue::QueueT::ready(q) {
                continue;
            }
            let server = &self.server;
            let used = &self.used;
            let cursor = Cursor::new(q, &self.mem, &self.interrupt);
            more |= cursor.drain(|chain, mem| {
                used.store(true, Ordering::SeqCst);
                Outcome::Used(handle_chain(server, chain, mem))
            });
        }
        more
    }
}

/// Serves `job` until the next command (returned), or until the device is
/// gone (an error).
fn serve_job(
    share: &Share,
    job: Job,
    commands: &Receiver<Command>,
    wake: &EventFd,
) -> Result<Command, RecvError> {
    let server = match serve(&share.path, share.read_only, share.budget.clone()) {
        Ok(s) => s,
        Err(e) => {
            error!("virtio-fs: {}", crate::error_chain(&e));
            job.interrupt.set_needs_reset();
            return commands.recv();
        }
    };
    let epoll = match watch(wake, &job.notify) {
        Ok(e) => e,
        Err(e) => {
            error!("virtio-fs: {}", crate::error_chain(&e));
            job.interrupt.set_needs_reset();
            return commands.recv();
        }
    };
    let mut queues = Queues {
        used: share.used.clone(),
        server,
        mem: job.mem,
        interrupt: job.interrupt,
        queues: job.queues,
        notify: job.notify,
    };
    let mut events = [EpollEvent::default(); 4];
    // Requests made before the worker had the queues.
    let mut more = true;
    loop {
        if more {
            more = queues.serve_all();
        }
        // With work left, only look for a command and go on.
        let timeout = if more { 0 } else { -1 };
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                error!("virtio-fs worker: cannot wait for work: {e}");
                return commands.recv();
            }
        };
        for e in &events[..n] {
            if e.data() == WAKE_TOKEN {
                let _ = wake.read();
                match commands.try_recv() {
                    Ok(command) => return Ok(command),
                    Err(TryRecvError::Empty) => continue,
                    Err(TryRecvError::Disconnected) => return Err(RecvError),
                }
            }
            // Drains the counter; a failure means it was 0.
            let i = usize::try_from(e.data()).unwrap_or(usize::MAX);
            if let Some(evt) = queues.notify.get(i) {
                let _ = evt.read();
            }
            more = true;
        }
    }
}

/// An epoll set with the wake eventfd and each queue's notification.
fn watch(wake: &EventFd, notify: &[EventFd]) -> Result<Epoll, Error> {
    let epoll = Epoll::new().map_err(Error::Wakeup)?;
    let add = |fd: &EventFd, token: u64| {
        epoll
            .ctl(
                ControlOperation::Add,
                fd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token),
            )
            .map_err(Error::Wakeup)
    };
    add(wake, WAKE_TOKEN)?;
    for (i, evt) in notify.iter().enumerate() {
        add(evt, u64::try_from(i).unwrap_or(WAKE_TOKEN - 1))?;
    }
    Ok(epoll)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use fuse_backend_rs::abi::fuse_abi::{
        InHeader, InitIn, Opcode, OutHeader, KERNEL_MINOR_VERSION, KERNEL_VERSION,
    };
    use virtio_queue::QueueT;
    use vm_memory::{ByteValued, Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::queue::QueueConfig;
    use crate::devices::virtio::test_utils::{guest_mem, AVAIL, DESC, USED};

    const REQ: u64 = 0x1_0000;
    const RESP: u64 = 0x2_0000;
    const QSIZE: u16 = 16;

    /// A FUSE_INIT request in descriptors 2n (readable) and 2n+1
    /// (writable), made available as the driver's `n`-th chain.
    fn request_init(mem: &GuestMem, n: u16) {
        let init = InitIn {
            major: KERNEL_VERSION,
            minor: KERNEL_MINOR_VERSION,
            max_readahead: 0,
            flags: 0,
        };
        let header = InHeader {
            len: u32::try_from(std::mem::size_of::<InHeader>() + std::mem::size_of::<InitIn>())
                .unwrap(),
            opcode: Opcode::Init as u32,
            unique: u64::from(n) + 1,
            ..InHeader::default()
        };
        let mut msg = header.as_slice().to_vec();
        msg.extend_from_slice(init.as_slice());
        let (req, resp) = (REQ + u64::from(n) * 0x100, RESP + u64::from(n) * 0x1000);
        mem.write_slice(&msg, GuestAddress(req)).unwrap();
        let head = 2 * n;
        for (i, addr, len, flags, next) in [
            (head, req, u32::try_from(msg.len()).unwrap(), 1u16, head + 1),
            (head + 1, resp, 0x1000, 2, 0),
        ] {
            let at = DESC + u64::from(i) * 16;
            mem.write_obj(addr, GuestAddress(at)).unwrap();
            mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            mem.write_obj(next, GuestAddress(at + 14)).unwrap();
        }
        mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * u64::from(n)))
            .unwrap();
        mem.write_obj(n + 1, GuestAddress(AVAIL + 2)).unwrap();
    }

    fn used_idx(mem: &GuestMem) -> u16 {
        mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// Waits (a few seconds at most) for the used index to reach `idx`.
    fn wait_used(mem: &GuestMem, idx: u16) -> bool {
        let start = Instant::now();
        while used_idx(mem) < idx {
            if start.elapsed() > Duration::from_secs(5) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// The queues of an activation, the request queue at the standard
    /// addresses, its driver already `served` chains ahead.
    fn job(mem: &GuestMem, served: u16) -> (Job, EventFd) {
        let mut cfg = QueueConfig::new(QSIZE).unwrap();
        cfg.desc_table = DESC;
        cfg.avail_ring = AVAIL;
        cfg.used_ring = USED;
        let mut queue = cfg.build(mem, false).unwrap();
        queue.set_next_avail(served);
        queue.set_next_used(served);
        let notify = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).unwrap();
        let job = Job {
            mem: mem.clone(),
            interrupt: Interrupt::new().unwrap(),
            queues: vec![queue],
            notify: vec![notify.try_clone().unwrap()],
        };
        (job, notify)
    }

    /// One worker for the device's life: it serves an activation's queue,
    /// lets go of it at a reset (a request then waits), and serves the next
    /// activation's, starting with what waited.
    #[test]
    fn one_worker_serves_each_activation_until_its_reset() {
        let dir = std::env::temp_dir().join(format!("kiln-fs-worker-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let used = Arc::new(AtomicBool::new(false));
        let share = Share {
            path: dir.clone(),
            read_only: true,
            budget: Arc::new(FdBudget::new(100)),
            used: used.clone(),
        };
        let worker = Worker::start(share, "t").unwrap();
        let mem = guest_mem();

        let (first, notify) = job(&mem, 0);
        worker.serve(first);
        request_init(&mem, 0);
        notify.write(1).unwrap();
        assert!(wait_used(&mem, 1), "the first request is answered");
        assert!(used.load(Ordering::SeqCst));
        let reply: OutHeader = mem.read_obj(GuestAddress(RESP)).unwrap();
        assert_eq!((reply.error, reply.unique), (0, 1));

        worker.stop();
        request_init(&mem, 1);
        notify.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(used_idx(&mem), 1, "no queue is served after a reset");

        let (second, _notify) = job(&mem, 1);
        worker.serve(second);
        assert!(wait_used(&mem, 2), "the next activation serves what waited");
        drop(worker);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
