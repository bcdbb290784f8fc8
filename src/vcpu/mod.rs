//! vCPUs: one thread each, servicing VM exits.
//!
//! A vCPU thread runs KVM_RUN in a loop and dispatches port I/O and MMIO to
//! the buses. It ends when the guest resets, powers off or fails, or when the
//! VMM kicks it: the kick sets `immediate_exit` (from a signal handler on the
//! vCPU's own thread) so KVM_RUN returns at once wherever the thread is.

pub mod emulation;
pub mod state;
#[cfg(test)]
pub(crate) mod test_guest;

use std::cell::Cell;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{kvm_run, CpuId};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::x86_64::cpuid::{self, Topology};
use crate::arch::x86_64::regs::{self, EntryMode};
use crate::devices::bus::Bus;
use crate::seccomp::{self, ThreadKind};
use crate::vmm::exit::{ExitReason, ExitSignal};
use emulation::Action;

/// KVM_SYSTEM_EVENT_* (include/uapi/linux/kvm.h).
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;
const SYSTEM_EVENT_CRASH: u32 = 3;
/// Exception vectors (Intel SDM vol. 3, 6.3.1).
const BP_VECTOR: u8 = 3;
const MF_VECTOR: u8 = 16;
/// x87 status word: exception summary.
const FSW_ES: u16 = 1 << 7;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("KVM_CREATE_VCPU failed for vCPU {0}")]
    Create(u8, #[source] kvm_ioctls::Error),
    #[error("KVM_SET_CPUID2 failed for vCPU {0}")]
    SetCpuid(u8, #[source] kvm_ioctls::Error),
    #[error("cannot set up the boot state of vCPU {0}")]
    Regs(u8, #[source] regs::Error),
    #[error("cannot register the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    #[error("cannot start the thread of vCPU {0}")]
    Spawn(u8, #[source] std::io::Error),
    #[error("vCPU {0} did not answer {1} within {PAUSE_TIMEOUT:?}")]
    NoAnswer(u8, &'static str),
    #[error("cannot save the state of vCPU {0}")]
    Save(u8, #[source] state::Error),
}

/// How long a vCPU has to answer a request (it is kicked out of KVM_RUN
/// first, so this is only ever reached by a stuck thread).
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the VMM asks of a vCPU thread. A paused vCPU is out of KVM_RUN and
/// waits for the next request; each request is answered.
enum Request {
    Pause,
    Save(Arc<[u32]>),
    Resume,
}

enum Reply {
    Paused,
    State(Box<Result<state::VcpuState, state::Error>>),
    Resumed,
}

/// The signal that kicks a vCPU out of KVM_RUN.
pub fn kick_signal() -> i32 {
    SIGRTMIN() + 1
}

thread_local! {
    /// This thread's kvm_run, for the kick handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's own kvm_run mapping, set
            // by `Vcpu::run_loop` while the VcpuFd (and so the mapping) lives,
            // and cleared before it is dropped; a volatile byte store is
            // async-signal-safe.
            unsafe { std::ptr::write_volatile(&raw mut (*run).immediate_exit, 1) };
        }
    });
    fence(Ordering::SeqCst);
}

fn register_kick_handler() -> Result<(), Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), kick_handler).map_err(Error::Signal);
    });
    result
}

/// Everything a vCPU needs to know at creation.
pub struct VcpuSetup<'a> {
    pub vm: &'a VmFd,
    pub supported_cpuid: &'a CpuId,
    pub topology: Topology,
    pub entry: u64,
    pub mode: EntryMode,
    pub io_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    pub exit: Arc<ExitSignal>,
}

pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    exit: Arc<ExitSignal>,
    stop: Arc<AtomicBool>,
    /// The CPUID the vCPU was given (saved with its state).
    cpuid: CpuId,
    requests: Option<(Receiver<Request>, Sender<Reply>)>,
}

/// Creates the KVM vCPU `id` with its CPUID, MSRs, registers, FPU and LAPIC
/// set for entering the kernel at `entry`.
pub fn create_fd(
    vm: &VmFd,
    supported_cpuid: &CpuId,
    topology: Topology,
    mode: EntryMode,
    entry: u64,
    id: u8,
) -> Result<VcpuFd, Error> {
    let fd = vm
        .create_vcpu(u64::from(id))
        .map_err(|e| Error::Create(id, e))?;
    let mut cpuid = supported_cpuid.clone();
    cpuid::normalize(&mut cpuid, id, topology);
    fd.set_cpuid2(&cpuid).map_err(|e| Error::SetCpuid(id, e))?;
    let r = |e| Error::Regs(id, e);
    regs::setup_msrs(&fd).map_err(r)?;
    regs::setup_regs(&fd, mode, entry).map_err(r)?;
    regs::setup_sregs(&fd, mode).map_err(r)?;
    regs::setup_fpu(&fd).map_err(r)?;
    regs::setup_lint(&fd).map_err(r)?;
    Ok(fd)
}

/// What the loop does after an exit.
enum Next {
    Continue,
    Stop(ExitReason),
    InternalError,
}

impl Vcpu {
    /// Creates vCPU `id` with its CPUID, MSRs, registers, FPU and LAPIC set
    /// for the kernel entry.
    pub fn new(id: u8, s: &VcpuSetup) -> Result<Self, Error> {
        let fd = create_fd(s.vm, s.supported_cpuid, s.topology, s.mode, s.entry, id)?;
        let mut cpuid = s.supported_cpuid.clone();
        cpuid::normalize(&mut cpuid, id, s.topology);
        Ok(Vcpu {
            id,
            fd,
            io_bus: s.io_bus.clone(),
            mmio_bus: s.mmio_bus.clone(),
            exit: s.exit.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            cpuid,
            requests: None,
        })
    }

    pub fn id(&self) -> u8 {
        self.id
    }

    /// Sets a snapshot's state into this vCPU (before it runs).
    pub fn restore_state(&self, s: &state::VcpuState) -> Result<(), state::Error> {
        s.restore(&self.fd)
    }

    /// Starts the vCPU's thread.
    pub fn start(mut self) -> Result<VcpuHandle, Error> {
        register_kick_handler()?;
        let id = self.id;
        let stop = self.stop.clone();
        let (request_tx, request_rx) = mpsc::channel();
        let (reply_tx, reply_rx) = mpsc::channel();
        self.requests = Some((request_rx, reply_tx));
        let thread = std::thread::Builder::new()
            .name(format!("kiln-vcpu{id}"))
            .spawn(move || self.run_loop())
            .map_err(|e| Error::Spawn(id, e))?;
        Ok(VcpuHandle {
            id,
            thread,
            stop,
            requests: request_tx,
            replies: reply_rx,
        })
    }

    fn run_loop(mut self) {
        let _panic_guard = PanicReporter(self.exit.clone(), self.id);
        // Before the first KVM_RUN: from here on the guest runs.
        if let Err(e) = seccomp::enter(ThreadKind::Vcpu) {
            let why = format!("vCPU {}: {}", self.id, crate::error_chain(&e));
            self.exit.report(ExitReason::VmmError(why));
            return;
        }
        KVM_RUN.with(|p| p.set(self.fd.get_kvm_run()));
        while !self.stop.load(Ordering::Acquire) {
            let request = self
                .requests
                .as_ref()
                .and_then(|(rx, _)| rx.try_recv().ok());
            if let Some(request) = request {
                if !self.serve_requests(request) {
                    break;
                }
                continue;
            }
            match self.run_once() {
                Next::Continue => {}
                Next::InternalError => {
                    if let Err(reason) = self.handle_internal_error() {
                        self.exit.report(reason);
                        break;
                    }
                }
                Next::Stop(reason) => {
                    self.exit.report(reason);
                    break;
                }
            }
        }
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
        log::debug!("vCPU {} stopped", self.id);
    }

    /// Serves requests out of KVM_RUN until Resume (true) or a stop
    /// (false).
    fn serve_requests(&mut self, first: Request) -> bool {
        let mut request = first;
        loop {
            let reply = match request {
                Request::Pause => Reply::Paused,
                Request::Save(msrs) => Reply::State(Box::new(state::VcpuState::save(
                    &self.fd,
                    &self.cpuid,
                    &msrs,
                ))),
                Request::Resume => Reply::Resumed,
            };
            let resumed = matches!(reply, Reply::Resumed);
            let Some((rx, tx)) = self.requests.as_ref() else {
                return true;
            };
            if tx.send(reply).is_err() {
                return false;
            }
            if resumed {
                return true;
            }
            request = loop {
                match rx.recv_timeout(Duration::from_millis(50)) {
                    Ok(r) => break r,
                    Err(RecvTimeoutError::Timeout) if !self.stop.load(Ordering::Acquire) => {}
                    Err(_) => return false,
                }
            };
        }
    }

    /// One KVM_RUN and the handling of its exit.
    fn run_once(&mut self) -> Next {
        let id = self.id;
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !self.io_bus.read(u64::from(port), data) {
                    log::trace!("vCPU {id}: read of unhandled port {port:#x}");
                }
                Next::Continue
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if !self.io_bus.write(u64::from(port), data) {
                    log::trace!("vCPU {id}: write to unhandled port {port:#x}");
                }
                Next::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !self.mmio_bus.read(addr, data) {
                    log::trace!("vCPU {id}: read of unhandled MMIO {addr:#x}");
                }
                Next::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !self.mmio_bus.write(addr, data) {
                    log::trace!("vCPU {id}: write to unhandled MMIO {addr:#x}");
                }
                Next::Continue
            }
            Ok(VcpuExit::Hlt) => Next::Stop(ExitReason::PowerOff),
            Ok(VcpuExit::Shutdown) => Next::Stop(ExitReason::GuestError(format!(
                "vCPU {id}: the guest triple-faulted (KVM_EXIT_SHUTDOWN): a crash, or a reboot through reboot=t"
            ))),
            Ok(VcpuExit::SystemEvent(kind, _)) => Next::Stop(match kind {
                SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
                SYSTEM_EVENT_RESET => ExitReason::Reset,
                SYSTEM_EVENT_CRASH => ExitReason::GuestError(format!("vCPU {id}: the guest reported a crash")),
                other => ExitReason::GuestError(format!("vCPU {id}: unknown system event {other}")),
            }),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Next::Stop(ExitReason::GuestError(format!(
                "vCPU {id}: KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x}, host CPU {cpu})"
            ))),
            Ok(VcpuExit::InternalError) => Next::InternalError,
            Ok(VcpuExit::Intr) => Next::Continue,
            Ok(other) => Next::Stop(ExitReason::VmmError(format!(
                "vCPU {id}: unexpected KVM exit {other:?}"
            ))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                Next::Continue
            }
            Err(e) => Next::Stop(ExitReason::VmmError(format!("vCPU {id}: KVM_RUN failed: {e}"))),
        }
    }

    /// KVM_EXIT_INTERNAL_ERROR: completes INT3 and FWAIT, reports the rest.
    fn handle_internal_error(&mut self) -> Result<(), ExitReason> {
        let id = self.id;
        // SAFETY: KVM_EXIT_INTERNAL_ERROR fills the `internal` member of the
        // exit union; it is plain integers, valid for any bit pattern.
        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        let vmm_err = |what: &str, e: kvm_ioctls::Error| {
            ExitReason::VmmError(format!("vCPU {id}: {what} failed: {e}"))
        };
        let mut regs = self.fd.get_regs().map_err(|e| vmm_err("KVM_GET_REGS", e))?;
        let sregs = self
            .fd
            .get_sregs()
            .map_err(|e| vmm_err("KVM_GET_SREGS", e))?;
        let bitness = if sregs.cs.l != 0 {
            64
        } else if sregs.cs.db != 0 {
            32
        } else {
            16
        };
        let Some(bytes) =
            emulation::instruction_bytes(internal.suberror, internal.ndata, &internal.data)
        else {
            return Err(ExitReason::GuestError(format!(
                "vCPU {id}: KVM internal error, suberror {}, at RIP {:#x}; registers: {}",
                internal.suberror,
                regs.rip,
                format_regs(&regs)
            )));
        };
        match emulation::classify(&bytes, bitness, regs.rip) {
            Action::Breakpoint { len } => {
                log::debug!("vCPU {id}: completing INT3 at {:#x} (KVM cannot emulate it)", regs.rip);
                regs.rip = regs.rip.wrapping_add(len);
                self.fd.set_regs(&regs).map_err(|e| vmm_err("KVM_SET_REGS", e))?;
                self.inject_exception(BP_VECTOR)
            }
            Action::Fwait { len } => {
                log::debug!("vCPU {id}: completing FWAIT at {:#x} (KVM cannot emulate it)", regs.rip);
                let fpu = self.fd.get_fpu().map_err(|e| vmm_err("KVM_GET_FPU", e))?;
                if fpu.fsw & FSW_ES != 0 {
                    // An unmasked x87 exception is pending: FWAIT raises #MF.
                    self.inject_exception(MF_VECTOR)
                } else {
                    regs.rip = regs.rip.wrapping_add(len);
                    self.fd.set_regs(&regs).map_err(|e| vmm_err("KVM_SET_REGS", e))
                }
            }
            Action::Fail(failure) => Err(ExitReason::GuestError(format!(
                "vCPU {id}: KVM cannot emulate the guest instruction {failure} at RIP {:#x}{}; registers: {}",
                regs.rip,
                failure.hint(),
                format_regs(&regs)
            ))),
        }
    }

    fn inject_exception(&mut self, vector: u8) -> Result<(), ExitReason> {
        let id = self.id;
        let mut events = self.fd.get_vcpu_events().map_err(|e| {
            ExitReason::VmmError(format!("vCPU {id}: KVM_GET_VCPU_EVENTS failed: {e}"))
        })?;
        events.exception.injected = 1;
        events.exception.nr = vector;
        events.exception.has_error_code = 0;
        events.exception.error_code = 0;
        events.flags = 0;
        self.fd.set_vcpu_events(&events).map_err(|e| {
            ExitReason::VmmError(format!("vCPU {id}: KVM_SET_VCPU_EVENTS failed: {e}"))
        })
    }
}

fn format_regs(r: &kvm_bindings::kvm_regs) -> String {
    format!(
        "rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rsp={:#x} rbp={:#x} \
         r8={:#x} r9={:#x} r10={:#x} r11={:#x} r12={:#x} r13={:#x} r14={:#x} r15={:#x} rflags={:#x}",
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15, r.rflags
    )
}

/// Ends the VM if a vCPU thread panics, instead of leaving it half alive.
struct PanicReporter(Arc<ExitSignal>, u8);

impl Drop for PanicReporter {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.report(ExitReason::VmmError(format!(
                "vCPU {} thread panicked",
                self.1
            )));
        }
    }
}

/// A running vCPU thread.
pub struct VcpuHandle {
    id: u8,
    thread: JoinHandle<()>,
    stop: Arc<AtomicBool>,
    requests: Sender<Request>,
    replies: Receiver<Reply>,
}

impl VcpuHandle {
    fn ask(&self, request: Request, what: &'static str) -> Result<Reply, Error> {
        let kick = matches!(request, Request::Pause);
        self.requests
            .send(request)
            .map_err(|_| Error::NoAnswer(self.id, what))?;
        if kick && !self.thread.is_finished() {
            // Out of KVM_RUN, to the request.
            if let Err(e) = self.thread.kill(kick_signal()) {
                log::debug!("kicking vCPU {}: {e}", self.id);
            }
        }
        self.replies
            .recv_timeout(PAUSE_TIMEOUT)
            .map_err(|_| Error::NoAnswer(self.id, what))
    }

    /// Takes the vCPU out of KVM_RUN and keeps it out until [`Self::resume`].
    pub fn pause(&self) -> Result<(), Error> {
        match self.ask(Request::Pause, "pause")? {
            Reply::Paused => Ok(()),
            _ => Err(Error::NoAnswer(self.id, "pause")),
        }
    }

    /// The state of a paused vCPU, with the MSRs in `msrs`
    /// ([`state::msr_index_list`]).
    pub fn save_state(&self, msrs: Arc<[u32]>) -> Result<state::VcpuState, Error> {
        match self.ask(Request::Save(msrs), "save state")? {
            Reply::State(s) => (*s).map_err(|e| Error::Save(self.id, e)),
            _ => Err(Error::NoAnswer(self.id, "save state")),
        }
    }

    /// Lets a paused vCPU run again.
    pub fn resume(&self) -> Result<(), Error> {
        match self.ask(Request::Resume, "resume")? {
            Reply::Resumed => Ok(()),
            _ => Err(Error::NoAnswer(self.id, "resume")),
        }
    }

    /// Asks the vCPU to stop and kicks it out of KVM_RUN.
    pub fn kick(&self) {
        self.stop.store(true, Ordering::Release);
        if !self.thread.is_finished() {
            if let Err(e) = self.thread.kill(kick_signal()) {
                log::debug!("kicking vCPU {}: {e}", self.id);
            }
        }
    }

    /// Waits for the thread; false if it panicked.
    pub fn join(self) -> bool {
        self.thread.join().is_ok()
    }
}
