//! Event-loop subscribers that end the run: the VM's exit event, and the
//! host signals that ask kiln to stop (SIGTERM, SIGINT, SIGHUP) or to take
//! a snapshot (SIGUSR1).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;

use super::exit::{ExitReason, ExitSignal};
use super::{Error, Subscriber};

/// Drains the exit event so the loop wakes up and sees the exit reason.
pub struct ExitWatcher(Arc<ExitSignal>);

impl ExitWatcher {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        ExitWatcher(exit)
    }
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.0.event().read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.event(), EventSet::IN)) {
            log::error!("cannot watch the VM exit event: {e:?}");
        }
    }
}

const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t we own.
    unsafe { libc::sigemptyset(&mut set) };
    for &sig in signals {
        // SAFETY: as above; the signals are valid numbers.
        unsafe { libc::sigaddset(&mut set, sig) };
    }
    set
}

/// Blocks the stop signals on the calling thread from here on: one that
/// arrives while the VM is being built waits (kiln neither dies with the
/// default action, exit 143, nor leaves a terminal in raw mode) and stops
/// the VM as soon as [`super::Vmm::run`] watches for it.
pub fn hold_stop_signals() -> Result<(), Error> {
    let set = signal_set(&STOP_SIGNALS);
    // SAFETY: `set` is a valid signal set; a null old-set pointer is allowed.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r == 0 {
        Ok(())
    } else {
        Err(Error::Io {
            what: "the stop signals",
            source: std::io::Error::from_raw_os_error(r),
        })
    }
}

/// Blocks `signals` on the calling thread (and so in threads it starts
/// later) and returns a signalfd that reads them.
fn signal_fd(signals: &[libc::c_int], what: &'static str) -> Result<OwnedFd, Error> {
    let set = signal_set(signals);
    // SAFETY: `set` is a valid signal set; a null old-set pointer is allowed.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(Error::Io {
            what,
            source: std::io::Error::from_raw_os_error(r),
        });
    }
    // SAFETY: -1 asks for a new signalfd; `set` is valid.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::Io {
            what,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: signalfd returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads one signal from a signalfd.
fn read_signal(fd: &OwnedFd) -> Option<libc::c_int> {
    // SAFETY: signalfd_siginfo is plain data.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reads at most `size` bytes into `info`, which is that large.
    let n = unsafe { libc::read(fd.as_raw_fd(), (&raw mut info).cast(), size) };
    if usize::try_from(n).ok() != Some(size) {
        return None;
    }
    libc::c_int::try_from(info.ssi_signo).ok()
}

/// SIGUSR1 asks for a snapshot: the flag is set for [`super::Vmm::run`],
/// which takes it between two rounds of the event loop.
pub struct SnapshotSignal {
    fd: OwnedFd,
    asked: Arc<AtomicBool>,
}

impl SnapshotSignal {
    pub fn install(em: &mut EventManager<Subscriber>) -> Result<Arc<AtomicBool>, Error> {
        let fd = signal_fd(&[libc::SIGUSR1], "the snapshot signal")?;
        let asked = Arc::new(AtomicBool::new(false));
        em.add_subscriber(Arc::new(Mutex::new(SnapshotSignal {
            fd,
            asked: asked.clone(),
        })));
        Ok(asked)
    }
}

impl MutEventSubscriber for SnapshotSignal {
    fn process(&mut self, _: Events, _: &mut EventOps) {
        if read_signal(&self.fd).is_some() {
            log::info!("received SIGUSR1: taking a snapshot");
            self.asked.store(true, Ordering::SeqCst);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            log::error!("cannot watch the snapshot signal: {e:?}");
        }
    }
}

/// Turns the stop signals into an [`ExitReason::Stopped`] through a
/// signalfd, so the VM is torn down in order (terminal restored, vCPUs
/// joined). The signals are blocked on the calling thread, and so in every
/// vCPU thread started after it.
pub struct StopSignals {
    fd: OwnedFd,
    exit: Arc<ExitSignal>,
}

impl StopSignals {
    pub fn install(em: &mut EventManager<Subscriber>, exit: Arc<ExitSignal>) -> Result<(), Error> {
        let fd = signal_fd(&STOP_SIGNALS, "the stop signals")?;
        em.add_subscriber(Arc::new(Mutex::new(StopSignals { fd, exit })));
        Ok(())
    }
}

impl MutEventSubscriber for StopSignals {
    fn process(&mut self, _: Events, _: &mut EventOps) {
        let Some(signo) = read_signal(&self.fd) else {
            return;
        };
        let name = match signo {
            libc::SIGTERM => "SIGTERM",
            libc::SIGINT => "SIGINT",
            libc::SIGHUP => "SIGHUP",
            _ => "a signal",
        };
        log::info!("received {name}, stopping the VM");
        self.exit
            .report(ExitReason::Stopped(format!("kiln received {name}")));
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            log::error!("cannot watch stop signals: {e:?}");
        }
    }
}
