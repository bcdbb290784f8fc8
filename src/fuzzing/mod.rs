//! Fuzzing harnesses: one `run(data: &[u8])` per target, shared by the
//! cargo-fuzz targets in `fuzz/` and the replay tests in
//! `tests/fuzz_replay.rs`, so that what CI replays is what the fuzzer ran.
//! Not part of kiln's interface.
//!
//! A harness feeds its bytes to one of kiln's parsers or devices and panics,
//! naming the broken promise, when kiln does not keep it: no panic, no
//! host memory touched outside guest memory, no guest memory written
//! outside device-writable buffers, nothing written outside the directory
//! kiln was given, round trips that hold. Each `seeds()` makes the small
//! corpus kept in `fuzz/corpus/<target>/`.
//!
//! Harnesses write only in a scratch directory of their own ([`Scratch`]),
//! on `/dev/shm` when there is one (fast, and nothing reaches a disk), and
//! cap the size of any file this process writes ([`limit_file_size`]): a
//! fuzzed input must not be able to fill the host's disk.

pub mod block;
pub mod config;
pub mod fs;
pub mod image;
pub mod input;
pub mod kernel;
pub mod memory;
pub mod net;
pub mod protocol;
pub mod virtq;
pub mod vsock;

use std::fs as stdfs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

/// The largest file a harness may write (the fuzzing process's
/// `RLIMIT_FSIZE`; writes past it fail with `EFBIG`).
pub const MAX_FILE_SIZE: u64 = 64 << 20;

/// Caps the size of every file this process writes at [`MAX_FILE_SIZE`],
/// with `SIGXFSZ` ignored so that a write past it fails instead of
/// killing the process. Once per process.
pub fn limit_file_size() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: SIG_IGN for SIGXFSZ installs no handler code.
        unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into `lim`, a valid rlimit we own.
        if unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, &mut lim) } == 0 {
            lim.rlim_cur = MAX_FILE_SIZE.min(lim.rlim_max);
            // SAFETY: setrlimit reads `lim`, a valid rlimit.
            unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &lim) };
        }
    });
}

/// Ignores SIGPIPE, as kiln itself runs: Rust's runtime ignores it before
/// `main` (a write to a closed socket fails with EPIPE), but a fuzz
/// target's `main` is libFuzzer's, which leaves the default, and a vsock
/// peer that closes its end mid-write would kill the fuzzer. Once per
/// process.
pub fn ignore_sigpipe() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: SIG_IGN for SIGPIPE installs no handler code.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    });
}

/// Where scratch directories go: `$KILN_FUZZ_TMP`, else `/dev/shm`, else
/// the temporary directory.
fn scratch_base() -> PathBuf {
    if let Some(dir) = std::env::var_os("KILN_FUZZ_TMP") {
        return PathBuf::from(dir);
    }
    let shm = Path::new("/dev/shm");
    if stdfs::metadata(shm).is_ok_and(|m| m.is_dir()) {
        return shm.to_path_buf();
    }
    std::env::temp_dir()
}

/// A directory for one run, removed when dropped, holding what the code
/// under test may change and, beside it, a sentinel file and folder it
/// must never reach: [`Scratch::check_untouched`] says whether they are as
/// they were.
pub struct Scratch {
    pub root: PathBuf,
}

/// The sentinel's content.
const SECRET: &str = "host secret\n";

/// An absolute path the seed corpus aims escapes at (symlinks, paths in
/// requests): it must stay empty. Fuzzed inputs cannot guess a scratch
/// directory's name, so they get this one to try.
pub const TRAP: &str = "/tmp/kiln-fuzz-trap";

impl Scratch {
    pub fn new(what: &str) -> Self {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let root = scratch_base().join(format!("kiln-fuzz-{what}-{}-{n}", std::process::id()));
        let _ = stdfs::remove_dir_all(&root);
        let made = stdfs::create_dir_all(root.join("outside-dir"))
            .and_then(|()| stdfs::write(root.join("outside"), SECRET))
            .and_then(|()| stdfs::create_dir_all(TRAP));
        if let Err(e) = made {
            panic!("cannot make scratch directory {}: {e}", root.display());
        }
        Self { root }
    }

    /// `name` inside the scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Panics unless the sentinel file and folder are as made, the scratch
    /// directory holds nothing but them and `inside` (names), and
    /// [`TRAP`] is empty.
    pub fn check_untouched(&self, inside: &[&str]) {
        let secret = stdfs::read_to_string(self.root.join("outside")).unwrap_or_default();
        assert_eq!(secret, SECRET, "the file beside the scratch area changed");
        let names = |dir: &Path| -> Vec<String> {
            stdfs::read_dir(dir)
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default()
        };
        let extra: Vec<String> = names(&self.root.join("outside-dir"));
        assert!(
            extra.is_empty(),
            "written beside the scratch area: {extra:?}"
        );
        let stray: Vec<String> = names(&self.root)
            .into_iter()
            .filter(|n| n != "outside" && n != "outside-dir" && !inside.contains(&n.as_str()))
            .collect();
        assert!(
            stray.is_empty(),
            "written beside the scratch area: {stray:?}"
        );
        let trapped = names(Path::new(TRAP));
        assert!(trapped.is_empty(), "written in {TRAP}: {trapped:?}");
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = stdfs::remove_dir_all(&self.root);
    }
}
