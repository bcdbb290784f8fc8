//! seccomp: every kiln thread that runs while the guest does is confined to
//! the system calls its job needs.
//!
//! One filter per thread kind ([`ThreadKind`]), each an allow-list built with
//! seccompiler ([`filters`]): the event loop, the vCPUs, the virtio-fs
//! workers and `kiln run`'s session threads. A thread installs its own
//! filter ([`enter`]) before it does anything the guest can influence: a
//! vCPU before its first KVM_RUN, the event loop before its first event, an
//! fs worker before its first request, `kiln run`'s main thread once the VM
//! is built. A filter is inherited by the threads its thread starts later
//! (and filters stack), so a thread starts the threads it needs first and
//! then installs its own.
//!
//! A system call outside the list raises SIGSYS (SECCOMP_RET_TRAP); the
//! handler ([`sigsys`]) writes which call and which thread kind to stderr
//! and ends kiln with [`Options::exit_code`]. Nothing in a filter can be
//! turned into a wider one later: seccomp filters only ever narrow.
//!
//! The policy is the process's, set once by `main` ([`init`], like the
//! logger): without it (the library's unit tests) [`enter`] installs
//! nothing.

mod filters;
mod sigsys;

#[cfg(test)]
mod tests;

use std::cell::Cell;
use std::sync::{Once, OnceLock};

/// kiln's exit code (`--config-file`) when a thread makes a forbidden
/// system call: 128 + SIGSYS, what a shell shows for a process SIGSYS
/// killed. `kiln run` exits 125 instead, its code for "kiln failed".
pub const EXIT_FORBIDDEN: u8 = 159;

/// The environment variable of the test-only hook: its value names a thread
/// kind ([`ThreadKind::name`]) whose threads make a forbidden system call
/// ([`FORBIDDEN_FOR_TESTS`]) right after installing their filter.
pub const TEST_HOOK_ENV: &str = "KILN_TEST_FORBIDDEN_SYSCALL";

/// What the test hook calls (with arguments 1, 2, 3): harmless, and in no
/// filter.
pub const FORBIDDEN_FOR_TESTS: libc::c_long = libc::SYS_getppid;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot build the seccomp filter of the {0}")]
    Build(&'static str, #[source] seccompiler::BackendError),
    #[error("cannot install the seccomp filter of the {0}")]
    Install(&'static str, #[source] seccompiler::Error),
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
}

/// The kinds of kiln threads, each with its filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The event loop (`--config-file`: the main thread; `kiln run`: the
    /// thread "kiln-vm"). `snapshots`: it writes snapshots (on SIGUSR1, or
    /// asked by another thread), so it may create, sync and rename files.
    Vmm { snapshots: bool },
    /// A vCPU thread: KVM_RUN and the device registers the guest touches.
    Vcpu,
    /// A virtio-fs worker: file operations inside its shared folder.
    FsWorker,
    /// `kiln run`'s main thread once the VM is built, and its output
    /// thread: the session with the agent, the terminal, the run directory.
    RunSession,
}

impl ThreadKind {
    /// The test hook's name for it.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm { .. } => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::FsWorker => "fs",
            ThreadKind::RunSession => "run",
        }
    }

    /// What messages call it.
    pub fn describe(self) -> &'static str {
        match self {
            ThreadKind::Vmm { .. } => "event-loop thread",
            ThreadKind::Vcpu => "vCPU thread",
            ThreadKind::FsWorker => "virtio-fs worker thread",
            ThreadKind::RunSession => "kiln run session thread",
        }
    }

    /// Its number in the thread-local the SIGSYS handler reads (0: a thread
    /// with no filter of kiln's).
    fn id(self) -> u8 {
        match self {
            ThreadKind::Vmm { .. } => 1,
            ThreadKind::Vcpu => 2,
            ThreadKind::FsWorker => 3,
            ThreadKind::RunSession => 4,
        }
    }

    fn from_id(id: u8) -> Option<Self> {
        match id {
            1 => Some(ThreadKind::Vmm { snapshots: false }),
            2 => Some(ThreadKind::Vcpu),
            3 => Some(ThreadKind::FsWorker),
            4 => Some(ThreadKind::RunSession),
            _ => None,
        }
    }
}

/// The process's policy, given by `main`.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Filters on (the default; `--no-seccomp` turns them off).
    pub enabled: bool,
    /// kiln's exit code when a thread makes a forbidden system call.
    pub exit_code: u8,
}

struct Policy {
    enabled: bool,
    /// The thread kind the test hook applies to ([`TEST_HOOK_ENV`]).
    test_hook: Option<String>,
}

static POLICY: OnceLock<Policy> = OnceLock::new();

thread_local! {
    /// This thread's kind, for the SIGSYS handler (a const-initialized
    /// integer: reading it from a signal handler is safe).
    static KIND: Cell<u8> = const { Cell::new(0) };
}

/// Sets the process's policy (once, first thing, before any thread starts):
/// with filters on, installs the SIGSYS handler. A later call changes
/// nothing.
pub fn init(options: Options) -> Result<(), Error> {
    if options.enabled {
        sigsys::install(options.exit_code).map_err(Error::Handler)?;
    }
    let test_hook = std::env::var(TEST_HOOK_ENV).ok();
    let _ = POLICY.set(Policy {
        enabled: options.enabled,
        test_hook,
    });
    Ok(())
}

/// Confines the calling thread to `kind`'s system calls, for good (when
/// [`init`] turned the filters on; otherwise nothing happens).
pub fn enter(kind: ThreadKind) -> Result<(), Error> {
    let Some(policy) = POLICY.get() else {
        return Ok(());
    };
    if policy.enabled {
        KIND.with(|k| k.set(kind.id()));
        for program in filters::programs(kind, seccompiler::SeccompAction::Trap)
            .map_err(|e| Error::Build(kind.describe(), e))?
        {
            seccompiler::apply_filter(&program).map_err(|e| Error::Install(kind.describe(), e))?;
        }
        log::debug!("seccomp: {} filtered", kind.describe());
    } else {
        static SAID: Once = Once::new();
        SAID.call_once(|| log::warn!("seccomp filters are off (--no-seccomp)"));
    }
    if policy.test_hook.as_deref() == Some(kind.name()) {
        log::warn!(
            "{TEST_HOOK_ENV}={}: this thread makes a forbidden system call (a test)",
            kind.name()
        );
        // SAFETY: getppid has no effect and ignores its arguments, given
        // only so that the message shows them: 0x1, 0x2, 0x3.
        unsafe { libc::syscall(FORBIDDEN_FOR_TESTS, 1, 2, 3) };
    }
    Ok(())
}

/// Records that the calling thread, started by a thread of `kind` after
/// that one's [`enter`], runs under its filter (a thread cannot install
/// the same filter again: installing is not in the list), so that a
/// forbidden call is reported as `kind`'s.
pub fn inherited(kind: ThreadKind) {
    if POLICY.get().is_some_and(|p| p.enabled) {
        KIND.with(|k| k.set(kind.id()));
    }
}

/// The kind of the calling thread's filter (for the SIGSYS handler).
fn current_kind() -> Option<ThreadKind> {
    ThreadKind::from_id(KIND.with(Cell::get))
}
