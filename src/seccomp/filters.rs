//! The allow-lists: which system calls (and, where it matters, which
//! arguments) each kind of kiln thread may make.
//!
//! Found with `strace -f` on tiny guests, `kiln run -- true`, `kiln run -t`
//! with `--mount`s, snapshots and restores, and from the code each thread
//! runs (glibc's and Rust's included: allocation, locks, thread exit). What
//! none of them needs is left out: no process creation or exec, no ptrace,
//! no new sockets but the vsock device's UNIX stream, no executable memory,
//! and ioctls only by request number (KVM's, and the terminal's where a
//! thread restores it; never TIOCSTI).

use std::collections::BTreeMap;

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_list, kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, KVMIO,
};
use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

use super::ThreadKind;

// The KVM ioctls kiln's threads make once the guest runs
// (include/uapi/linux/kvm.h; kvm-ioctls keeps its own copies private).
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
ioctl_iow_nr!(KVM_SET_VCPU_EVENTS, KVMIO, 0xa0, kvm_vcpu_events);
ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
ioctl_iowr_nr!(KVM_GET_MSR_INDEX_LIST, KVMIO, 0x02, kvm_msr_list);
ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);

/// TUNSETOFFLOAD (include/uapi/linux/if_tun.h): virtio-net's activation
/// and reset, on the vCPU thread that writes the status register, tell the
/// tap which offloads the driver took.
pub(super) const TUNSETOFFLOAD: u64 = 0x4004_54d0;

/// The vCPU ioctls: running, the registers an emulation failure reads and
/// the completed INT3/FWAIT writes, everything a snapshot saves, and a
/// virtio-net activation's or reset's tap offloads.
fn vcpu_ioctls() -> Vec<u64> {
    [
        KVM_RUN(),
        KVM_GET_REGS(),
        KVM_SET_REGS(),
        KVM_GET_SREGS(),
        KVM_GET_FPU(),
        KVM_GET_VCPU_EVENTS(),
        KVM_SET_VCPU_EVENTS(),
        KVM_GET_MSRS(),
        KVM_GET_XCRS(),
        KVM_GET_DEBUGREGS(),
        KVM_GET_LAPIC(),
        KVM_GET_MP_STATE(),
        KVM_GET_TSC_KHZ(),
        TUNSETOFFLOAD,
    ]
    .into()
}

/// The event loop's ioctls: a snapshot's VM state (the MSR list on
/// /dev/kvm, the interrupt controllers, PIT and clock on the VM), a
/// non-blocking vsock client, and the terminal `--config-file` restores
/// on this thread after the run.
fn vmm_ioctls() -> Vec<u64> {
    let kvm = [
        KVM_GET_MSR_INDEX_LIST(),
        KVM_GET_IRQCHIP(),
        KVM_GET_PIT2(),
        KVM_GET_CLOCK(),
    ];
    let tty = [libc::FIONBIO, libc::TCGETS, libc::TCSETS];
    kvm.into_iter().chain(tty).collect()
}

/// An allow-list: each system call, with the rules one of which its
/// arguments must match (`None`: any arguments).
#[derive(Default)]
pub(super) struct AllowList(BTreeMap<i64, Option<Vec<SeccompRule>>>);

impl AllowList {
    /// These calls, with any arguments.
    fn any(&mut self, calls: &[libc::c_long]) -> &mut Self {
        for &nr in calls {
            self.0.insert(nr, None);
        }
        self
    }

    /// `nr` when all of `conditions` hold (or under an earlier rule).
    fn when(
        &mut self,
        nr: libc::c_long,
        conditions: Vec<SeccompCondition>,
    ) -> Result<(), BackendError> {
        let rule = SeccompRule::new(conditions)?;
        // None: already allowed with any arguments.
        if let Some(rules) = self.0.entry(nr).or_insert_with(|| Some(Vec::new())) {
            rules.push(rule);
        }
        Ok(())
    }

    /// `nr` when argument `index` is one of `values`.
    fn arg_in(
        &mut self,
        nr: libc::c_long,
        index: u8,
        values: impl IntoIterator<Item = u64>,
    ) -> Result<&mut Self, BackendError> {
        for v in values {
            self.when(nr, vec![eq(index, v)?])?;
        }
        Ok(self)
    }

    /// The system calls allowed, with or without conditions.
    #[cfg(test)]
    pub(super) fn calls(&self) -> impl Iterator<Item = i64> + '_ {
        self.0.keys().copied()
    }

    fn into_program(self, mismatch: SeccompAction) -> Result<BpfProgram, BackendError> {
        let rules = self
            .0
            .into_iter()
            .map(|(nr, rules)| (nr, rules.unwrap_or_default()))
            .collect();
        SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)?.try_into()
    }
}

/// Argument `index` (as a 32-bit value: ints, flags, ioctl requests)
/// equals `value`.
fn eq(index: u8, value: u64) -> Result<SeccompCondition, BackendError> {
    SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
}

/// The bits `mask` of argument `index` equal `value`.
fn masked(index: u8, mask: u64, value: u64) -> Result<SeccompCondition, BackendError> {
    SeccompCondition::new(
        index,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(mask),
        value,
    )
}

fn as_arg(v: libc::c_int) -> u64 {
    u64::from(v.unsigned_abs())
}

/// What every kiln thread needs: memory (never executable), locks, time,
/// random seeds for hash maps, its own end (thread exit unmaps its signal
/// stack), logging to stderr, closing what it owns, and what the SIGSYS
/// handler itself calls (write, exit_group).
fn common(l: &mut AllowList) -> Result<(), BackendError> {
    use libc::*;
    l.any(&[
        SYS_brk,
        SYS_munmap,
        SYS_mremap,
        SYS_madvise,
        SYS_futex,
        SYS_sched_yield,
        SYS_clock_gettime,
        SYS_gettimeofday,
        SYS_clock_nanosleep,
        SYS_nanosleep,
        SYS_getrandom,
        SYS_gettid,
        SYS_getpid,
        SYS_rt_sigprocmask,
        SYS_rt_sigreturn,
        SYS_restart_syscall,
        SYS_sigaltstack,
        SYS_write,
        SYS_close,
        SYS_exit,
        SYS_exit_group,
    ]);
    // No executable memory: kiln is static and loads no code.
    let no_exec = || masked(2, as_arg(PROT_EXEC), 0);
    l.when(SYS_mmap, vec![no_exec()?])?;
    l.when(SYS_mprotect, vec![no_exec()?])?;
    // Rust's debug builds check an fd is open before closing it.
    l.arg_in(SYS_fcntl, 1, [as_arg(F_GETFD)])?;
    Ok(())
}

/// A vCPU: KVM_RUN and its exits. Device registers are emulated here, so
/// also what a register write can start: a queue notification or
/// interrupt (eventfd writes), a device activation (its queues' eventfds
/// duplicated for the device, a tap's offloads set), a vsock reset
/// (connections shut down).
fn vcpu(l: &mut AllowList) -> Result<(), BackendError> {
    l.arg_in(libc::SYS_ioctl, 1, vcpu_ioctls())?;
    l.arg_in(libc::SYS_fcntl, 1, [as_arg(libc::F_DUPFD_CLOEXEC)])?;
    l.any(&[libc::SYS_shutdown]);
    Ok(())
}

/// The event loop: epoll, the devices' queues (disk reads and writes and
/// their syncs, entropy, vsock's UNIX sockets to and from the host,
/// console output and input), kicking vCPUs out of KVM_RUN, a snapshot's
/// state, and (`snapshots`: `--snapshot-dir`, or `kiln run`'s templates)
/// writing its files.
fn vmm(l: &mut AllowList, snapshots: bool) -> Result<(), BackendError> {
    use libc::*;
    l.any(&[
        SYS_epoll_wait,
        SYS_epoll_pwait,
        SYS_epoll_ctl,
        SYS_read,
        SYS_readv,
        SYS_writev,
        SYS_pread64,
        SYS_pwrite64,
        SYS_lseek,
        SYS_fsync,
        SYS_fdatasync,
        SYS_recvfrom,
        SYS_sendto,
        SYS_poll,
        SYS_ppoll,
        SYS_timerfd_settime,
        SYS_timerfd_gettime,
        SYS_connect,
        SYS_accept4,
        SYS_shutdown,
        // The vsock socket file, checked and removed at the end.
        SYS_newfstatat,
        SYS_statx,
        SYS_unlink,
    ]);
    l.arg_in(SYS_ioctl, 1, vmm_ioctls())?;
    l.arg_in(
        SYS_fcntl,
        1,
        [F_GETFL, F_SETFL, F_DUPFD_CLOEXEC].map(as_arg),
    )?;
    // vsock's connections to host listeners: UNIX stream sockets only.
    l.when(
        SYS_socket,
        vec![
            eq(0, as_arg(AF_UNIX))?,
            eq(1, as_arg(SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC))?,
        ],
    )?;
    // A network device's passt, ended and reaped at the device's end
    // through its pidfd: only processes kiln holds a pidfd for (its own
    // children) can be signalled or waited for this way.
    l.any(&[SYS_pidfd_send_signal]);
    l.arg_in(
        SYS_waitid,
        0,
        [u64::from(crate::devices::virtio::net::passt::P_PIDFD)],
    )?;
    // The kick: a real-time signal to a vCPU thread of this process.
    let pid = u64::from(std::process::id());
    let kick = as_arg(crate::vcpu::kick_signal());
    l.when(SYS_tgkill, vec![eq(0, pid)?, eq(2, kick)?])?;
    if snapshots {
        // vm.mem and vm.state: a new temporary file (vm.mem's zero pages
        // holes, its length set at the end), synced, renamed into place
        // (removed if writing fails).
        let flags = O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC;
        l.when(SYS_openat, vec![eq(2, as_arg(flags))?])?;
        l.any(&[SYS_rename, SYS_ftruncate]);
    }
    Ok(())
}

/// A virtio-fs worker: the passthrough file system's operations inside the
/// shared folder, on fds kiln holds (kiln's guard has already refused what
/// the share does not allow), and its queues' wakeups.
fn fs_worker(l: &mut AllowList) -> Result<(), BackendError> {
    use libc::*;
    l.any(&[
        SYS_epoll_create1,
        SYS_epoll_ctl,
        SYS_epoll_wait,
        SYS_epoll_pwait,
        SYS_read,
        SYS_readv,
        SYS_writev,
        SYS_pread64,
        SYS_pwrite64,
        SYS_preadv,
        SYS_pwritev,
        SYS_lseek,
        SYS_openat,
        SYS_newfstatat,
        SYS_fstat,
        SYS_statx,
        SYS_fstatfs,
        SYS_getdents64,
        SYS_readlinkat,
        SYS_mkdirat,
        SYS_unlinkat,
        SYS_renameat,
        SYS_renameat2,
        SYS_symlinkat,
        SYS_linkat,
        SYS_fchmod,
        SYS_fchmodat,
        SYS_fchownat,
        SYS_utimensat,
        SYS_ftruncate,
        SYS_fallocate,
        SYS_fsync,
        SYS_fdatasync,
        SYS_dup,
        SYS_umask,
        SYS_prlimit64,
    ]);
    l.arg_in(
        SYS_fcntl,
        1,
        [F_GETFL, F_SETFL, F_SETFD, F_DUPFD_CLOEXEC].map(as_arg),
    )?;
    // Regular files only: the guard refuses device nodes, FIFOs and sockets.
    l.when(
        SYS_mknodat,
        vec![masked(2, u64::from(S_IFMT), u64::from(S_IFREG))?],
    )?;
    Ok(())
}

/// `kiln run`'s session: the agent's connection (already made), stdin,
/// signals and the terminal, the output thread it starts, the run
/// directory it removes at the end.
fn run_session(l: &mut AllowList) -> Result<(), BackendError> {
    use libc::*;
    l.any(&[
        SYS_read,
        SYS_recvfrom,
        SYS_sendto,
        SYS_poll,
        SYS_ppoll,
        SYS_accept4,
        // Removing the run directory.
        SYS_openat,
        SYS_newfstatat,
        SYS_statx,
        SYS_getdents64,
        SYS_unlinkat,
        // A new thread's start (glibc's and Rust's).
        SYS_rseq,
        SYS_set_robust_list,
        SYS_sched_getaffinity,
        // clone3 takes its flags in memory, out of a filter's sight: the
        // first filter answers it ENOSYS, and glibc falls back to clone.
        SYS_clone3,
    ]);
    l.arg_in(SYS_ioctl, 1, [FIONBIO, TCGETS, TCSETS, TIOCGWINSZ])?;
    l.arg_in(
        SYS_fcntl,
        1,
        [F_GETFL, F_SETFL, F_SETFD, F_DUPFD_CLOEXEC].map(as_arg),
    )?;
    // Threads only, never a process.
    let thread = u64::try_from(CLONE_THREAD).unwrap_or(u64::MAX);
    l.when(SYS_clone, vec![masked(0, thread, thread)?])?;
    l.arg_in(SYS_prctl, 0, [as_arg(PR_SET_NAME)])?;
    Ok(())
}

/// `kind`'s allow-list.
pub(super) fn allow_list(kind: ThreadKind) -> Result<AllowList, BackendError> {
    let mut l = AllowList::default();
    common(&mut l)?;
    match kind {
        ThreadKind::Vmm { snapshots } => vmm(&mut l, snapshots)?,
        ThreadKind::Vcpu => vcpu(&mut l)?,
        ThreadKind::FsWorker => fs_worker(&mut l)?,
        ThreadKind::RunSession => run_session(&mut l)?,
    }
    Ok(l)
}

/// The filters to install, in order, for `kind`: its allow-list, with
/// `mismatch` for every other call (SIGSYS in kiln; an errno in tests),
/// and for `kiln run`'s session first the one that turns clone3 into
/// ENOSYS (of two filters the stricter answer wins).
pub(super) fn programs(
    kind: ThreadKind,
    mismatch: SeccompAction,
) -> Result<Vec<BpfProgram>, BackendError> {
    let mut programs = Vec::new();
    if kind == ThreadKind::RunSession {
        let rules = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
        let enosys = SeccompAction::Errno(libc::ENOSYS.unsigned_abs());
        programs.push(
            SeccompFilter::new(rules, SeccompAction::Allow, enosys, TargetArch::x86_64)?
                .try_into()?,
        );
    }
    programs.push(allow_list(kind)?.into_program(mismatch)?);
    Ok(programs)
}
