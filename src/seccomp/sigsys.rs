//! The SIGSYS handler: names the forbidden system call and the thread kind
//! on stderr, then ends kiln. It runs under the filter that raised it, so
//! it makes only the calls every filter allows (write, exit_group), and
//! only async-signal-safe ones: no allocation, no locks, no formatting
//! machinery.

use std::io;
use std::sync::atomic::{AtomicU8, Ordering};

use super::ThreadKind;

/// kiln's exit code after a forbidden system call.
static EXIT_CODE: AtomicU8 = AtomicU8::new(1);

/// `si_code` of a SIGSYS raised by seccomp (SYS_SECCOMP,
/// include/uapi/asm-generic/siginfo.h).
const SYS_SECCOMP: libc::c_int = 1;

/// The start of a `siginfo_t` holding a SIGSYS: its header and the
/// `_sigsys` member of its union (include/uapi/asm-generic/siginfo.h; on
/// x86_64 the union starts at byte 16).
#[repr(C)]
struct SigsysInfo {
    _signo: libc::c_int,
    _errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    _call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    _arch: libc::c_uint,
}

/// x86_64's system call names by number: 0 to 334, then 424 to 462
/// (arch/x86/entry/syscalls/syscall_64.tbl, Linux 6.12).
const LOW: &str = include_str!("syscalls_low.txt");
const HIGH: &str = include_str!("syscalls_high.txt");
const HIGH_START: usize = 424;

/// The name of system call `nr` on x86_64, if kiln knows it.
pub(super) fn syscall_name(nr: libc::c_int) -> Option<&'static str> {
    let nr = usize::try_from(nr).ok()?;
    let (names, index) = if nr >= HIGH_START {
        (HIGH, nr - HIGH_START)
    } else {
        (LOW, nr)
    };
    names.split_ascii_whitespace().nth(index)
}

/// A message built without allocating.
pub(super) struct Message {
    buf: [u8; 512],
    len: usize,
}

impl Message {
    fn new() -> Self {
        Message {
            buf: [0; 512],
            len: 0,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        let room = self.buf.len() - self.len;
        let n = bytes.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_number(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + u8::try_from(n % 10).unwrap_or(0);
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }

    fn push_hex(&mut self, mut n: u64) {
        let mut digits = [0u8; 16];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b"0123456789abcdef"[usize::try_from(n & 0xf).unwrap_or(0)];
            n >>= 4;
            if n == 0 {
                break;
            }
        }
        self.push(b"0x");
        self.push(&digits[i..]);
    }

    pub(super) fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// What kiln says when a thread of `kind` made system call `nr` with
/// `args` first (which ioctl, fcntl or socket it was).
pub(super) fn message(
    kind: Option<ThreadKind>,
    nr: libc::c_int,
    args: [u64; 3],
    exit_code: u8,
) -> Message {
    let mut m = Message::new();
    m.push(b"kiln: error: the ");
    m.push(kind.map_or("kiln", ThreadKind::describe).as_bytes());
    m.push(b" made system call ");
    m.push_number(u64::from(nr.unsigned_abs()));
    m.push(b" (");
    if let Some(name) = syscall_name(nr) {
        m.push(name.as_bytes());
        m.push(b"; ");
    }
    m.push(b"arguments ");
    for (i, a) in args.into_iter().enumerate() {
        if i > 0 {
            m.push(b", ");
        }
        m.push_hex(a);
    }
    m.push(b"), which its seccomp filter forbids: kiln stops (exit ");
    m.push_number(u64::from(exit_code));
    m.push(b"). This is a bug in kiln, or an attack on it; --no-seccomp turns the filters off to debug it.\n");
    m
}

/// The first three arguments of the system call that raised the signal, in
/// the registers the kernel saved (rdi, rsi, rdx).
fn arguments(context: &libc::ucontext_t) -> [u64; 3] {
    let gregs = &context.uc_mcontext.gregs;
    let reg = |r: libc::c_int| {
        usize::try_from(r)
            .ok()
            .and_then(|i| gregs.get(i))
            .map_or(0, |&v| u64::from_ne_bytes(v.to_ne_bytes()))
    };
    [reg(libc::REG_RDI), reg(libc::REG_RSI), reg(libc::REG_RDX)]
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: an SA_SIGINFO handler gets a valid siginfo_t, whose first
    // bytes for a SIGSYS are laid out as SigsysInfo, and a valid
    // ucontext_t: the interrupted thread's registers.
    let (info, context) = unsafe {
        (
            &*info.cast::<SigsysInfo>(),
            &*context.cast::<libc::ucontext_t>(),
        )
    };
    let code = EXIT_CODE.load(Ordering::Relaxed);
    let msg = if info.code == SYS_SECCOMP {
        message(
            super::current_kind(),
            info.syscall,
            arguments(context),
            code,
        )
    } else {
        let mut m = Message::new();
        m.push(b"kiln: error: SIGSYS not raised by seccomp\n");
        m
    };
    let bytes = msg.as_bytes();
    // SAFETY: write and _exit are async-signal-safe; `bytes` is valid for
    // its length. The write's result does not matter: kiln ends either way.
    unsafe {
        libc::write(libc::STDERR_FILENO, bytes.as_ptr().cast(), bytes.len());
        libc::_exit(libc::c_int::from(code));
    }
}

/// Installs the handler for the whole process; kiln then exits with
/// `exit_code` after a forbidden system call.
pub(super) fn install(exit_code: u8) -> io::Result<()> {
    EXIT_CODE.store(exit_code, Ordering::Relaxed);
    // SAFETY: sigaction is plain data; all zeroes is a valid start.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
    act.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `act.sa_mask` is a valid sigset_t: every signal waits while
    // the handler runs.
    unsafe { libc::sigfillset(&mut act.sa_mask) };
    // SAFETY: `act` is a valid sigaction whose handler has the SA_SIGINFO
    // signature; the old action is not asked for.
    if unsafe { libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
