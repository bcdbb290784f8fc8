//! The filters as the kernel applies them: each installed in a thread of
//! its own here, answering EPERM instead of SIGSYS, so that a call can be
//! seen allowed (it fails or succeeds on its own terms) or refused.

use std::os::fd::AsRawFd;

use seccompiler::SeccompAction;

use super::filters::{self, allow_list};
use super::sigsys::{message, syscall_name};
use super::ThreadKind;

const KINDS: [ThreadKind; 5] = [
    ThreadKind::Vmm { snapshots: false },
    ThreadKind::Vmm { snapshots: true },
    ThreadKind::Vcpu,
    ThreadKind::FsWorker,
    ThreadKind::RunSession,
];

/// Runs `f` in a new thread under `kind`'s filters (refused calls fail
/// with EPERM) and returns what it returned.
fn filtered<T: Send + 'static>(kind: ThreadKind, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        for p in filters::programs(kind, SeccompAction::Errno(libc::EPERM.unsigned_abs())).unwrap()
        {
            seccompiler::apply_filter(&p).unwrap();
        }
        f()
    })
    .join()
    .unwrap()
}

/// The errno of a failed call (0 if it succeeded).
fn errno_of(r: libc::c_long) -> i32 {
    if r < 0 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    } else {
        0
    }
}

#[test]
fn every_filter_compiles_and_none_allows_escapes() {
    use libc::*;
    let never = [
        SYS_execve,
        SYS_execveat,
        SYS_fork,
        SYS_vfork,
        SYS_ptrace,
        SYS_process_vm_readv,
        SYS_process_vm_writev,
        SYS_kill,
        SYS_setuid,
        SYS_setresuid,
        SYS_setresgid,
        SYS_capset,
        SYS_mount,
        SYS_unshare,
        SYS_setns,
        SYS_bpf,
        SYS_perf_event_open,
        SYS_init_module,
        SYS_finit_module,
        SYS_seccomp,
        SYS_bind,
        SYS_listen,
        SYS_sendmsg,
        SYS_recvmsg,
        SYS_chroot,
        SYS_pivot_root,
        SYS_keyctl,
        SYS_userfaultfd,
    ];
    for kind in KINDS {
        let list = allow_list(kind).unwrap();
        let calls: Vec<i64> = list.calls().collect();
        for nr in never {
            assert!(
                !calls.contains(&nr),
                "{kind:?} allows {}",
                syscall_name(i32::try_from(nr).unwrap()).unwrap()
            );
        }
        let programs = filters::programs(kind, SeccompAction::Trap).unwrap();
        let instructions: usize = programs.iter().map(Vec::len).sum();
        assert!(instructions > 0);
        println!(
            "{kind:?}: {} system calls, {instructions} BPF instructions",
            calls.len()
        );
    }
    // Only the snapshot writer opens files on the event loop.
    assert!(!allow_list(ThreadKind::Vmm { snapshots: false })
        .unwrap()
        .calls()
        .any(|nr| nr == SYS_openat || nr == SYS_rename));
}

#[test]
fn kvm_ioctl_numbers_are_the_kernels() {
    // include/uapi/linux/kvm.h, as the kernel computes them on x86_64.
    assert_eq!(filters::KVM_RUN(), 0xae80);
    assert_eq!(filters::KVM_GET_REGS(), 0x8090_ae81);
    assert_eq!(filters::KVM_SET_REGS(), 0x4090_ae82);
    assert_eq!(filters::KVM_GET_SREGS(), 0x8138_ae83);
    assert_eq!(filters::KVM_GET_MSRS(), 0xc008_ae88);
    assert_eq!(filters::KVM_GET_FPU(), 0x81a0_ae8c);
    assert_eq!(filters::KVM_GET_LAPIC(), 0x8400_ae8e);
    assert_eq!(filters::KVM_GET_MP_STATE(), 0x8004_ae98);
    assert_eq!(filters::KVM_GET_VCPU_EVENTS(), 0x8040_ae9f);
    assert_eq!(filters::KVM_SET_VCPU_EVENTS(), 0x4040_aea0);
    assert_eq!(filters::KVM_GET_DEBUGREGS(), 0x8080_aea1);
    assert_eq!(filters::KVM_GET_TSC_KHZ(), 0xaea3);
    assert_eq!(filters::KVM_GET_XCRS(), 0x8188_aea6);
    assert_eq!(filters::KVM_GET_MSR_INDEX_LIST(), 0xc004_ae02);
    assert_eq!(filters::KVM_GET_IRQCHIP(), 0xc208_ae62);
    assert_eq!(filters::KVM_GET_CLOCK(), 0x8030_ae7c);
    assert_eq!(filters::KVM_GET_PIT2(), 0x8070_ae9f);
    // _IOW('T', 208, unsigned int).
    let tun = u64::from(b'T');
    assert_eq!(
        filters::TUNSETOFFLOAD,
        (1 << 30) | (4 << 16) | (tun << 8) | 208
    );
}

#[test]
fn syscall_names_by_number() {
    assert_eq!(syscall_name(0), Some("read"));
    assert_eq!(syscall_name(59), Some("execve"));
    assert_eq!(syscall_name(110), Some("getppid"));
    assert_eq!(syscall_name(334), Some("rseq"));
    assert_eq!(syscall_name(335), None);
    assert_eq!(syscall_name(424), Some("pidfd_send_signal"));
    assert_eq!(syscall_name(435), Some("clone3"));
    assert_eq!(syscall_name(462), Some("mseal"));
    assert_eq!(syscall_name(463), None);
    assert_eq!(syscall_name(-1), None);
}

#[test]
fn the_message_names_the_call_and_the_thread() {
    let m = message(Some(ThreadKind::Vcpu), 16, [5, 0x4004_54d0, 0], 159);
    let text = String::from_utf8_lossy(m.as_bytes());
    assert!(
        text.starts_with("kiln: error: the vCPU thread made system call 16 (ioctl; arguments 0x5, 0x400454d0, 0x0), which its seccomp filter forbids: kiln stops (exit 159)."),
        "{text}"
    );
    assert!(text.ends_with("--no-seccomp turns the filters off to debug it.\n"));
    let m = message(None, 999, [u64::MAX, 1, 0], 125);
    let text = String::from_utf8_lossy(m.as_bytes());
    assert!(
        text.contains(
            "the kiln made system call 999 (arguments 0xffffffffffffffff, 0x1, 0x0), which"
        ),
        "{text}"
    );
}

#[test]
fn vcpu_threads_run_kvm_and_nothing_else() {
    let null = std::fs::File::open("/dev/null").unwrap();
    let fd = null.as_raw_fd();
    let got = filtered(ThreadKind::Vcpu, move || {
        // SAFETY: each call is made with valid or harmless arguments; its
        // result is only inspected.
        unsafe {
            [
                // Allowed: KVM_RUN reaches the kernel, which finds no vCPU.
                errno_of(libc::ioctl(fd, filters::KVM_RUN(), 0).into()),
                // Refused: a terminal ioctl, a new process, files.
                errno_of(libc::ioctl(fd, libc::TIOCSTI, c"x".as_ptr()).into()),
                errno_of(libc::syscall(libc::SYS_getppid)),
                errno_of(libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY).into()),
                // Executable memory is refused, plain memory is not.
                errno_of(mmap_errno(libc::PROT_READ | libc::PROT_EXEC)),
                errno_of(mmap_errno(libc::PROT_READ | libc::PROT_WRITE)),
            ]
        }
    });
    assert_eq!(
        got,
        [
            libc::ENOTTY,
            libc::EPERM,
            libc::EPERM,
            libc::EPERM,
            libc::EPERM,
            0
        ]
    );
    drop(null);
}

/// mmap of one anonymous page with `prot` (unmapped again): 0 or -1.
fn mmap_errno(prot: libc::c_int) -> libc::c_long {
    // SAFETY: an anonymous private mapping nobody else knows about.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return -1;
    }
    // SAFETY: the page mapped just above.
    unsafe { libc::munmap(p, 4096) };
    0
}

#[test]
fn the_event_loop_opens_files_only_to_write_snapshots() {
    let probe = || {
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC;
        let dir = std::env::temp_dir();
        let path = std::ffi::CString::new(
            dir.join(format!("kiln-seccomp-{}", std::process::id()))
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        // SAFETY: valid NUL-terminated paths; fds are closed, files removed.
        unsafe {
            let w = libc::open(path.as_ptr(), flags, 0o600);
            let w_errno = errno_of(w.into());
            if w >= 0 {
                libc::close(w);
                libc::unlink(path.as_ptr());
            }
            [
                w_errno,
                errno_of(libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY).into()),
                errno_of(libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0).into()),
                errno_of(libc::syscall(
                    libc::SYS_tgkill,
                    libc::getpid(),
                    libc::syscall(libc::SYS_gettid),
                    0,
                )),
            ]
        }
    };
    let eperm = libc::EPERM;
    assert_eq!(
        filtered(ThreadKind::Vmm { snapshots: false }, probe),
        [eperm, eperm, eperm, eperm]
    );
    assert_eq!(
        filtered(ThreadKind::Vmm { snapshots: true }, probe),
        [0, eperm, eperm, eperm]
    );
}

#[test]
fn the_fs_worker_makes_regular_files_only() {
    let dir = std::env::temp_dir().join(format!("kiln-seccomp-fs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let d = std::fs::File::open(&dir).unwrap();
    let dfd = d.as_raw_fd();
    let got = filtered(ThreadKind::FsWorker, move || {
        // SAFETY: names relative to a directory fd this test holds.
        unsafe {
            [
                errno_of(libc::mknodat(dfd, c"file".as_ptr(), libc::S_IFREG | 0o600, 0).into()),
                errno_of(libc::mknodat(dfd, c"fifo".as_ptr(), libc::S_IFIFO | 0o600, 0).into()),
                errno_of(libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0).into()),
            ]
        }
    });
    assert_eq!(got, [0, libc::EPERM, libc::EPERM]);
    assert!(dir.join("file").is_file());
    assert!(!dir.join("fifo").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_run_session_starts_threads_but_no_process() {
    let got = filtered(ThreadKind::RunSession, || {
        // glibc tries clone3 (ENOSYS here) and falls back to clone.
        let thread = std::thread::spawn(|| 7).join().ok();
        // SAFETY: a child, if the filter let one be made, exits at once.
        let fork = unsafe {
            let pid = libc::fork();
            if pid == 0 {
                libc::_exit(0);
            }
            errno_of(pid.into())
        };
        (thread, fork)
    });
    assert_eq!(got, (Some(7), libc::EPERM));
}
