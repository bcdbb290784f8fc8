//! virtio-fs under a hostile guest: FUSE requests (plausible or not) in
//! fuzzer-chosen chains, answered by the device's own request path
//! ([`handle_chain`] through a [`Cursor`], as its worker thread does)
//! against a real folder in a scratch directory, read-write or read-only.
//!
//! The folder starts with a file, a directory, a FIFO and symlinks to
//! beside the folder and to [`TRAP`](super::TRAP). Node IDs and file
//! handles from earlier replies are kept, so later requests can name
//! them. After the run, besides the memory checks: nothing changed beside
//! the folder, and nothing in it is a device node, FIFO or socket kiln
//! made, nor has a set-id bit, nor belongs to another user.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use super::input::{Input, Seed};
use super::virtq::{self, Desc, Rings, F_WRITE};
use super::{memory, Scratch, TRAP};
use crate::devices::virtio::fs::guard::FdBudget;
use crate::devices::virtio::fs::{handle_chain, serve, FsServer};
use crate::devices::virtio::queue::{Cursor, Outcome, QueueConfig};
use crate::devices::virtio::{GuestMem, Interrupt};

const MAX_OPS: usize = 128;
/// Where a FUSE request and its reply go unless the fuzzer says otherwise.
const REQ: u64 = 0x8000;
const RESP: u64 = 0x1_0000;
const RESP_LEN: u32 = 0x8000;
/// FUSE's `struct fuse_entry_out`.
const ENTRY_OUT: u64 = 128;

/// Opcodes (linux/fuse.h) and how many names follow their argument.
const OPCODES: [(u32, u8); 44] = [
    (1, 1),  // LOOKUP
    (2, 0),  // FORGET
    (3, 0),  // GETATTR
    (4, 0),  // SETATTR
    (5, 0),  // READLINK
    (6, 2),  // SYMLINK
    (8, 1),  // MKNOD
    (9, 1),  // MKDIR
    (10, 1), // UNLINK
    (11, 1), // RMDIR
    (12, 2), // RENAME
    (13, 1), // LINK
    (14, 0), // OPEN
    (15, 0), // READ
    (16, 0), // WRITE
    (17, 0), // STATFS
    (18, 0), // RELEASE
    (20, 0), // FSYNC
    (21, 1), // SETXATTR
    (22, 1), // GETXATTR
    (23, 0), // LISTXATTR
    (24, 1), // REMOVEXATTR
    (25, 0), // FLUSH
    (26, 0), // INIT
    (27, 0), // OPENDIR
    (28, 0), // READDIR
    (29, 0), // RELEASEDIR
    (30, 0), // FSYNCDIR
    (31, 0), // GETLK
    (32, 0), // SETLK
    (33, 0), // SETLKW
    (34, 0), // ACCESS
    (35, 1), // CREATE
    (36, 0), // INTERRUPT
    (37, 0), // BMAP
    (38, 0), // DESTROY
    (39, 0), // IOCTL
    (40, 0), // POLL
    (42, 0), // BATCH_FORGET
    (43, 0), // FALLOCATE
    (44, 0), // READDIRPLUS
    (45, 2), // RENAME2
    (46, 0), // LSEEK
    (47, 0), // COPY_FILE_RANGE
];
/// Names a request may carry; the last choice is the fuzzer's own bytes.
const NAMES: [&[u8]; 10] = [
    b"file", b"dir", b"new", b"..", b".", b"link", b"abs", b"fifo", b"a/b", b"",
];

/// The folder as the device serves it, and the driver's two queues.
struct Harness {
    server: Arc<FsServer>,
    mem: GuestMem,
    rings: Rings,
    queues: Vec<virtio_queue::Queue>,
    interrupt: Interrupt,
    nodes: Vec<u64>,
    handles: Vec<u64>,
    unique: u64,
}

const NOTIFY: u8 = 7;
const FUSE: u8 = 8;
const OPS: u8 = 9;

pub fn run(data: &[u8]) {
    super::limit_file_size();
    let mut input = Input::new(data);
    let settings = input.u8();
    let scratch = Scratch::new("fs");
    let share = scratch.path("share");
    let fifo = make_share(&share, &scratch);
    let server = match serve(&share, settings & 1 != 0, Arc::new(FdBudget::new(64))) {
        Ok(s) => s,
        Err(e) => panic!("cannot serve {}: {e}", share.display()),
    };
    let mem = memory::guest_mem();
    let sizes = [0, 1].map(|_| virtq::queue_size(&mut input));
    let mut rings = Rings::new(mem.clone(), &sizes);
    let queues = rings
        .rings
        .iter_mut()
        .map(|r| {
            let mut c = match QueueConfig::new(256) {
                Ok(c) => c,
                Err(e) => panic!("{e}"),
            };
            c.size = u32::from(r.size);
            (c.desc_table, c.avail_ring, c.used_ring) = (r.desc, r.avail, r.used);
            // A size the transport would refuse: the queue stays off.
            let q = c.build(&mem, settings & 2 != 0);
            r.active = q.is_ok();
            q.or_else(|_| c.build_disabled()).unwrap_or_default()
        })
        .collect();
    let interrupt = match Interrupt::new() {
        Ok(i) => i,
        Err(e) => panic!("{e}"),
    };
    let mut h = Harness {
        server,
        mem,
        rings,
        queues,
        interrupt,
        nodes: vec![1],
        handles: vec![0],
        unique: 0,
    };
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        let op = input.u8() % OPS;
        if h.rings.op(op, &mut input) {
            continue;
        }
        match op {
            NOTIFY => {
                let q = usize::from(input.below(2));
                h.serve(q);
            }
            _ => h.fuse(&mut input),
        }
    }
    h.serve(0);
    h.serve(1);
    drop(h);
    scratch.check_untouched(&["share"]);
    check_share(&share, fifo);
}

/// Makes the folder's starting content; returns the FIFO's inode number.
fn make_share(share: &Path, scratch: &Scratch) -> u64 {
    let made = std::fs::create_dir_all(share.join("dir"))
        .and_then(|()| std::fs::write(share.join("file"), "hello\n"))
        .and_then(|()| std::os::unix::fs::symlink("../outside", share.join("link")))
        .and_then(|()| std::os::unix::fs::symlink(TRAP, share.join("abs")))
        .and_then(|()| mkfifo(&share.join("fifo")));
    match made.and_then(|()| std::fs::symlink_metadata(share.join("fifo"))) {
        Ok(m) => m.ino(),
        Err(e) => panic!("cannot make the share in {}: {e}", scratch.root.display()),
    }
}

fn mkfifo(path: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(std::io::Error::other)?;
    // SAFETY: a valid NUL-terminated path; mkfifo reads it only.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The guard's promises about what a guest can make in the folder.
///
/// The FIFO the folder starts with (inode `fifo`) may be anywhere in it
/// under any names: a guest may rename or link it (the fuzzer did) without
/// making a FIFO.
fn check_share(share: &Path, fifo: u64) {
    // SAFETY: geteuid cannot fail and touches no memory.
    let me = unsafe { libc::geteuid() };
    let mut todo = vec![share.to_path_buf()];
    while let Some(dir) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let Ok(m) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            let t = m.file_type();
            let special = t.is_block_device() || t.is_char_device() || t.is_socket();
            let stray_fifo = t.is_fifo() && m.ino() != fifo;
            assert!(!special && !stray_fifo, "the guest made {path:?}, a {t:?}");
            assert!(
                m.mode() & (libc::S_ISUID | libc::S_ISGID) == 0,
                "{path:?} has a set-id bit: {:o}",
                m.mode()
            );
            assert_eq!(m.uid(), me, "{path:?} belongs to uid {}", m.uid());
            if t.is_dir() {
                todo.push(path);
            }
        }
    }
}

impl Harness {
    /// What the worker does when queue `q` is notified, under the checks.
    fn serve(&mut self, q: usize) {
        let Self {
            server,
            mem,
            rings,
            queues,
            interrupt,
            ..
        } = self;
        let Some(queue) = queues.get_mut(q) else {
            return;
        };
        if !virtio_queue::QueueT::ready(queue) || interrupt.needs_reset() {
            return;
        }
        rings.checked(|| {
            for _ in 0..4 {
                let cursor = Cursor::new(queue, mem, interrupt);
                let more =
                    cursor.drain(|chain, mem| Outcome::Used(handle_chain(server, chain, mem)));
                if !more {
                    break;
                }
            }
        });
    }

    /// A FUSE request: a header, an argument, names; in a chain of a
    /// readable and a writable part (or of the fuzzer's making), sent on
    /// the request queue and answered.
    fn fuse(&mut self, input: &mut Input) {
        let pick = input.u8();
        let (opcode, names) = match OPCODES.get(usize::from(pick % 64)) {
            Some(&o) => o,
            None => (input.u32(), input.below(3)),
        };
        let nodeid = match input.u8() {
            0xff => input.u64(),
            k => self.nodes[usize::from(k) % self.nodes.len()],
        };
        let mut arg = input.bytes(256).to_vec();
        if opcode == 26 && arg.is_empty() {
            // INIT, as Linux sends it: 7.31, no flags.
            arg = [7u32, 31, 0, 0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
        }
        let fix = input.u8();
        if fix & 3 != 0 && arg.len() >= 8 {
            // The first field is a file handle (or a node ID: RENAME's
            // newdir, LINK's oldnodeid) in most arguments.
            let v = if fix & 1 != 0 {
                self.handles[usize::from(fix >> 2) % self.handles.len()]
            } else {
                self.nodes[usize::from(fix >> 2) % self.nodes.len()]
            };
            arg[..8].copy_from_slice(&v.to_le_bytes());
        }
        let mut body = arg;
        for _ in 0..names {
            let k = usize::from(input.below(11));
            match NAMES.get(k) {
                Some(n) => body.extend_from_slice(n),
                None => body.extend_from_slice(input.bytes(300)),
            }
            body.push(0);
        }
        self.unique += 1;
        let len = match fix & 0x80 {
            0 => u32::try_from(40 + body.len()).unwrap_or(u32::MAX),
            _ => input.u32(),
        };
        let uid = if fix & 0x40 != 0 { input.u32() } else { 0 };
        let mut msg = Vec::with_capacity(40 + body.len());
        msg.extend_from_slice(&len.to_le_bytes());
        msg.extend_from_slice(&opcode.to_le_bytes());
        msg.extend_from_slice(&self.unique.to_le_bytes());
        msg.extend_from_slice(&nodeid.to_le_bytes());
        msg.extend_from_slice(&uid.to_le_bytes());
        msg.extend_from_slice(&uid.to_le_bytes());
        msg.extend_from_slice(&42u32.to_le_bytes());
        msg.extend_from_slice(&0u32.to_le_bytes());
        msg.extend_from_slice(&body);

        let shape = input.u8();
        let (req, resp) = if shape & 1 != 0 {
            (virtq::addr(input), virtq::addr(input))
        } else {
            (REQ, RESP)
        };
        let _ = self.mem.write(&msg, GuestAddress(req));
        let msg_len = u32::try_from(msg.len()).unwrap_or(u32::MAX);
        let mut descs = Vec::new();
        if shape & 2 != 0 && msg_len > 1 {
            // The request split in two buffers.
            let cut = 1 + u32::from(input.u16()) % (msg_len - 1);
            descs.push(Desc {
                addr: req,
                len: cut,
                flags: 0,
                next: 0,
            });
            descs.push(Desc {
                addr: req.wrapping_add(u64::from(cut)),
                len: msg_len - cut,
                flags: 0,
                next: 0,
            });
        } else {
            descs.push(Desc {
                addr: req,
                len: msg_len,
                flags: 0,
                next: 0,
            });
        }
        let resp_len = if shape & 4 != 0 {
            virtq::len(input)
        } else {
            RESP_LEN
        };
        descs.push(Desc {
            addr: resp,
            len: resp_len,
            flags: F_WRITE,
            next: 0,
        });
        if shape & 8 != 0 {
            descs.push(virtq::desc(input));
        }
        let head = input.u16();
        let _ = self.mem.write_obj(0u128, GuestAddress(resp));
        self.rings.chain(1, head, &descs);
        self.serve(1);
        self.remember(opcode, resp);
    }

    /// Keeps the node ID or file handle a successful reply gave.
    fn remember(&mut self, opcode: u32, resp: u64) {
        let read = |off: u64| {
            let at = resp.checked_add(off)?;
            self.mem.read_obj::<u64>(GuestAddress(at)).ok()
        };
        // OutHeader: le32 len, le32 error, le64 unique.
        let (Some(len_error), Some(unique)) = (read(0), read(8)) else {
            return;
        };
        if len_error >> 32 != 0 || unique != self.unique {
            return;
        }
        match opcode {
            1 | 6 | 8 | 9 | 13 => self.nodes.extend(read(16)),
            14 | 27 => self.handles.extend(read(16)),
            35 => {
                self.nodes.extend(read(16));
                self.handles.extend(read(16 + ENTRY_OUT));
            }
            _ => {}
        }
        self.nodes.truncate(64);
        self.handles.truncate(64);
    }
}

/// The seed corpus: a session as a guest's kernel starts one (INIT, then
/// lookups, create, write, read), escapes through `..` and the symlinks,
/// and malformed requests.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    // pick, node choice, argument, fix, names..., shape, head. A name
    // index of 10 is followed by the fuzzer's own name, `own`.
    let fuse_own = |s: &mut Seed,
                    op: u8,
                    node: u8,
                    arg: &[u8],
                    fix: u8,
                    names: &[u8],
                    own: &[u8],
                    head: u16| {
        s.u8(FUSE).u8(op).u8(node).bytes(arg).u8(fix);
        for &n in names {
            s.u8(n);
            if n == 10 {
                s.bytes(own);
            }
        }
        s.u8(0).u16(head);
    };
    let fuse = |s: &mut Seed, op: u8, node: u8, arg: &[u8], fix: u8, names: &[u8], head: u16| {
        fuse_own(s, op, node, arg, fix, names, b"", head);
    };
    let start = |s: &mut Seed, settings: u8| {
        s.u8(settings).u8(4).u8(4);
        fuse(s, 23, 0, b"", 0, &[], 0);
    };
    let le = |v: &[u64]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let mut out = Vec::new();
    let mut s = Seed::default();
    start(&mut s, 0);
    fuse(&mut s, 0, 0, b"", 0, &[0], 2); // LOOKUP file
    fuse(&mut s, 12, 1, &le(&[2]), 0, &[], 4); // OPEN it, O_RDWR
                                               // READ 100 bytes at 0 from the handle.
    fuse(&mut s, 13, 1, &le(&[0, 0, 100, 0, 0]), 1 | 4, &[], 6);
    // CREATE new (O_RDWR|O_CREAT, 0644), WRITE to it.
    fuse(&mut s, 32, 0, &le(&[0x42 | (0o4755 << 32), 0]), 0, &[2], 8);
    let mut w = le(&[0, 0, 5, 0, 0]);
    w.extend_from_slice(b"hello");
    fuse(&mut s, 14, 2, &w, 1 | 8, &[], 10);
    fuse(&mut s, 24, 0, &[0; 8], 0, &[], 12); // OPENDIR root
    fuse(&mut s, 25, 0, &le(&[0, 0, 4096, 0, 0]), 1 | 12, &[], 14); // READDIR
    fuse(&mut s, 7, 0, &le(&[0o40755]), 0, &[1], 0); // MKDIR dir (exists)
    out.push(("session".into(), s.take()));

    start(&mut s, 0);
    fuse(&mut s, 0, 0, b"", 0, &[3], 2); // LOOKUP ..
    fuse(&mut s, 0, 0, b"", 0, &[5], 4); // LOOKUP link
    fuse(&mut s, 4, 1, b"", 0, &[], 6); // READLINK
    fuse(&mut s, 0, 0, b"", 0, &[7], 8); // LOOKUP fifo
    fuse(&mut s, 12, 3, &le(&[0]), 0, &[], 10); // OPEN the fifo
    fuse(&mut s, 5, 0, b"", 0, &[2, 6], 12); // SYMLINK new -> abs
    fuse(&mut s, 6, 0, &le(&[0o20644, 0]), 0, &[2], 14); // MKNOD a char device
    fuse(&mut s, 10, 0, &le(&[1]), 0, &[0, 2], 0); // RENAME file -> new
    out.push(("escapes".into(), s.take()));

    start(&mut s, 1 | 2);
    fuse(&mut s, 32, 0, &le(&[0x241, 0]), 0, &[2], 2); // CREATE on a read-only share
                                                       // A raw opcode (99, no names), a header length of 7.
    s.u8(FUSE)
        .u8(63)
        .u32(99)
        .u8(0)
        .u8(0)
        .bytes(b"")
        .u8(0x80)
        .u32(7);
    s.u8(0).u16(4);
    fuse(&mut s, 3, 0, &[0xff; 88], 0, &[], 6); // SETATTR everything
                                                // LOOKUP, a name of the fuzzer's, too long.
    fuse_own(&mut s, 0, 0, b"", 0, &[10], &[b'x'; 300], 8);
    out.push(("read-only-and-malformed".into(), s.take()));
    out
}
