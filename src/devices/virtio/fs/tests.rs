//! virtio-fs against a hostile guest: FUSE requests crafted here, put in a
//! virtqueue in guest memory and answered by the device's own request path
//! ([`handle_chain`]), against a real folder. One test per escape route and
//! per policy rule; every reply is checked, and so is the host folder.

use std::ffi::CString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::*;
use fuse_backend_rs::api::filesystem::SetattrValid;
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::guard::FdBudget;
use super::{handle_chain, serve, FsServer};
use crate::devices::virtio::queue::{Cursor, QueueConfig};
use crate::devices::virtio::test_utils::guest_mem;
use crate::devices::virtio::{GuestMem, Interrupt};

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const REQ: u64 = 0x1_0000;
const RESP: u64 = 0x4_0000;
const RESP_LEN: u32 = 0x2_0000;
const QSIZE: u16 = 16;

/// A share in a scratch directory: `root/share` is what the guest sees,
/// `root/outside` is a host file it must never reach.
struct Share {
    root: PathBuf,
}

impl Share {
    fn new(name: &str) -> Self {
        let root = std::env::temp_dir().join(format!("kiln-fs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("share")).unwrap();
        std::fs::write(root.join("outside"), "host secret").unwrap();
        Self { root }
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.root.join("share").join(rel)
    }
    fn dir(&self) -> PathBuf {
        self.root.join("share")
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A guest FUSE client speaking through a one-chain-at-a-time virtqueue.
struct Client {
    server: Arc<FsServer>,
    mem: GuestMem,
    queue: virtio_queue::Queue,
    interrupt: Interrupt,
    avail_idx: u16,
    unique: u64,
    /// The uid/gid the guest process claims.
    uid: u32,
}

type Reply = Result<Vec<u8>, i32>;

impl Client {
    fn new(share: &Share, read_only: bool, budget: Arc<FdBudget>) -> Self {
        let mem = guest_mem();
        let mut cfg = QueueConfig::new(QSIZE).unwrap();
        cfg.desc_table = DESC;
        cfg.avail_ring = AVAIL;
        cfg.used_ring = USED;
        let queue = cfg.build(&mem, false).unwrap();
        let mut c = Self {
            server: serve(&share.dir(), read_only, budget).unwrap(),
            mem,
            queue,
            interrupt: Interrupt::new().unwrap(),
            avail_idx: 0,
            unique: 0,
            uid: 0,
        };
        let init = InitIn {
            major: KERNEL_VERSION,
            minor: KERNEL_MINOR_VERSION,
            max_readahead: 0,
            flags: 0,
        };
        c.call(Opcode::Init as u32, 0, &[init.as_slice()]).unwrap();
        c
    }

    /// Sends one raw request (header made here) and returns the reply body,
    /// or the error the server answered.
    fn call(&mut self, opcode: u32, nodeid: u64, parts: &[&[u8]]) -> Reply {
        let body: Vec<u8> = parts.concat();
        self.unique += 1;
        let header = InHeader {
            len: u32::try_from(std::mem::size_of::<InHeader>() + body.len()).unwrap(),
            opcode,
            unique: self.unique,
            nodeid,
            uid: self.uid,
            gid: self.uid,
            pid: 42,
            padding: 0,
        };
        let mut msg = header.as_slice().to_vec();
        msg.extend_from_slice(&body);
        let (len, out) = self.raw(&msg);
        if len == 0 {
            return Err(0);
        }
        let oh = OutHeader::from_slice(&out[..16]).copied().unwrap();
        assert_eq!(oh.unique, self.unique);
        if oh.error != 0 {
            return Err(-oh.error);
        }
        Ok(out[16..len as usize].to_vec())
    }

    /// Puts `msg` in a chain (one readable, one writable buffer) and lets
    /// the device answer it. Returns the used length and the reply buffer.
    fn raw(&mut self, msg: &[u8]) -> (u32, Vec<u8>) {
        let len = u32::try_from(msg.len()).unwrap();
        let used = self.chain(msg, &[(REQ, len, 1, 1), (RESP, RESP_LEN, 2, 0)]);
        let mut out = vec![0u8; RESP_LEN as usize];
        self.mem.read_slice(&mut out, GuestAddress(RESP)).unwrap();
        (used, out)
    }

    /// Puts `msg` at REQ, `descs` (addr, len, flags, next) in the table
    /// from entry 0 and the chain at 0 in the ring, and lets the device
    /// answer it. Returns the used length.
    fn chain(&mut self, msg: &[u8], descs: &[(u64, u32, u16, u16)]) -> u32 {
        self.mem.write_slice(msg, GuestAddress(REQ)).unwrap();
        for (i, &(addr, len, flags, next)) in (0u64..).zip(descs) {
            let at = DESC + i * 16;
            self.mem.write_obj(addr, GuestAddress(at)).unwrap();
            self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
        }
        self.mem
            .write_obj(
                0u16,
                GuestAddress(AVAIL + 4 + 2 * u64::from(self.avail_idx % QSIZE)),
            )
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
        let mut cursor = Cursor::new(&mut self.queue, &self.mem, &self.interrupt);
        let chain = cursor.pop().expect("a chain");
        let len = handle_chain(&self.server, chain, &self.mem);
        cursor.add_used(0, len);
        len
    }

    fn entry(r: Reply) -> Result<EntryOut, i32> {
        r.map(|b| *EntryOut::from_slice(&b[..std::mem::size_of::<EntryOut>()]).unwrap())
    }

    fn lookup(&mut self, parent: u64, name: &str) -> Result<EntryOut, i32> {
        let r = self.call(Opcode::Lookup as u32, parent, &[&cstr(name)]);
        Self::entry(r)
    }

    fn mkdir(&mut self, parent: u64, name: &str, mode: u32) -> Result<EntryOut, i32> {
        let arg = MkdirIn { mode, umask: 0 };
        let r = self.call(Opcode::Mkdir as u32, parent, &[arg.as_slice(), &cstr(name)]);
        Self::entry(r)
    }

    fn mknod(&mut self, parent: u64, name: &str, mode: u32) -> Result<EntryOut, i32> {
        let arg = MknodIn {
            mode,
            rdev: 0,
            umask: 0,
            padding: 0,
        };
        let r = self.call(Opcode::Mknod as u32, parent, &[arg.as_slice(), &cstr(name)]);
        Self::entry(r)
    }

    fn create(&mut self, parent: u64, name: &str, mode: u32) -> Result<(EntryOut, u64), i32> {
        let arg = CreateIn {
            flags: u32::try_from(libc::O_RDWR | libc::O_CREAT).unwrap(),
            mode,
            umask: 0,
            fuse_flags: 0,
        };
        let b = self.call(
            Opcode::Create as u32,
            parent,
            &[arg.as_slice(), &cstr(name)],
        )?;
        let e = *EntryOut::from_slice(&b[..std::mem::size_of::<EntryOut>()]).unwrap();
        let o = OpenOut::from_slice(&b[std::mem::size_of::<EntryOut>()..][..16])
            .copied()
            .unwrap();
        Ok((e, o.fh))
    }

    fn open(&mut self, node: u64, flags: i32) -> Result<u64, i32> {
        let arg = OpenIn {
            flags: u32::try_from(flags).unwrap(),
            fuse_flags: 0,
        };
        let b = self.call(Opcode::Open as u32, node, &[arg.as_slice()])?;
        Ok(OpenOut::from_slice(&b[..16]).unwrap().fh)
    }

    fn read(&mut self, node: u64, fh: u64, size: u32) -> Result<Vec<u8>, i32> {
        self.read_with_flags(node, fh, size, 0)
    }

    fn read_with_flags(
        &mut self,
        node: u64,
        fh: u64,
        size: u32,
        flags: i32,
    ) -> Result<Vec<u8>, i32> {
        let arg = ReadIn {
            fh,
            offset: 0,
            size,
            flags: flags.cast_unsigned(),
            ..ReadIn::default()
        };
        self.call(Opcode::Read as u32, node, &[arg.as_slice()])
    }

    fn write(&mut self, node: u64, fh: u64, data: &[u8]) -> Result<u32, i32> {
        let arg = WriteIn {
            fh,
            offset: 0,
            size: u32::try_from(data.len()).unwrap(),
            ..WriteIn::default()
        };
        let b = self.call(Opcode::Write as u32, node, &[arg.as_slice(), data])?;
        Ok(WriteOut::from_slice(&b[..8]).unwrap().size)
    }

    fn release(&mut self, node: u64, fh: u64) -> Reply {
        let arg = ReleaseIn {
            fh,
            ..ReleaseIn::default()
        };
        self.call(Opcode::Release as u32, node, &[arg.as_slice()])
    }

    fn setattr(&mut self, node: u64, arg: SetattrIn) -> Result<AttrOut, i32> {
        let b = self.call(Opcode::Setattr as u32, node, &[arg.as_slice()])?;
        Ok(*AttrOut::from_slice(&b[..std::mem::size_of::<AttrOut>()]).unwrap())
    }

    fn symlink(&mut self, parent: u64, name: &str, target: &str) -> Result<EntryOut, i32> {
        let r = self.call(
            Opcode::Symlink as u32,
            parent,
            &[&cstr(name), &cstr(target)],
        );
        Self::entry(r)
    }

    fn readlink(&mut self, node: u64) -> Result<Vec<u8>, i32> {
        self.call(Opcode::Readlink as u32, node, &[])
    }

    fn rename(&mut self, old: u64, oldname: &str, new: u64, newname: &str, flags: u32) -> Reply {
        let arg = Rename2In {
            newdir: new,
            flags,
            padding: 0,
        };
        let parts: [&[u8]; 3] = [arg.as_slice(), &cstr(oldname), &cstr(newname)];
        self.call(Opcode::Rename2 as u32, old, &parts)
    }

    fn link(&mut self, node: u64, parent: u64, name: &str) -> Result<EntryOut, i32> {
        let arg = LinkIn { oldnodeid: node };
        let r = self.call(Opcode::Link as u32, parent, &[arg.as_slice(), &cstr(name)]);
        Self::entry(r)
    }

    fn forget(&mut self, node: u64, n: u64) {
        let arg = ForgetIn { nlookup: n };
        let _ = self.call(Opcode::Forget as u32, node, &[arg.as_slice()]);
    }
}

fn cstr(s: &str) -> Vec<u8> {
    CString::new(s).unwrap().into_bytes_with_nul()
}

fn budget() -> Arc<FdBudget> {
    Arc::new(FdBudget::new(10_000))
}

#[test]
fn dotdot_never_leaves_the_share() {
    let share = Share::new("dotdot");
    std::fs::create_dir(share.path("sub")).unwrap();
    let mut c = Client::new(&share, false, budget());
    // A directory is the share's root when it holds `sub` and not the
    // `outside` file next to the share.
    let is_root = |c: &mut Client, node: u64| {
        c.lookup(node, "sub").is_ok() && c.lookup(node, "outside").err() == Some(libc::ENOENT)
    };
    let up = c.lookup(ROOT_ID, "..").unwrap();
    assert!(is_root(&mut c, up.nodeid), "the root's .. is the root");
    let sub = c.lookup(ROOT_ID, "sub").unwrap();
    let back = c.lookup(sub.nodeid, "..").unwrap();
    assert!(is_root(&mut c, back.nodeid));
    let again = c.lookup(back.nodeid, "..").unwrap();
    assert!(is_root(&mut c, again.nodeid), "no way above the root");
    assert_eq!(again.attr.ino, up.attr.ino);
    // A name with a slash is not one component.
    assert!(c.lookup(ROOT_ID, "../outside").is_err());
    assert!(c.lookup(ROOT_ID, "sub/../../outside").is_err());
}

#[test]
fn symlinks_in_the_share_are_never_followed() {
    let share = Share::new("symlinks");
    std::os::unix::fs::symlink("/etc", share.path("etc")).unwrap();
    std::os::unix::fs::symlink("../outside", share.path("rel")).unwrap();
    let mut c = Client::new(&share, false, budget());
    for (name, target) in [("etc", "/etc"), ("rel", "../outside")] {
        let e = c.lookup(ROOT_ID, name).unwrap();
        assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFLNK, "{name}");
        assert_eq!(c.readlink(e.nodeid).unwrap(), target.as_bytes());
        assert!(
            c.open(e.nodeid, libc::O_RDONLY).is_err(),
            "{name}: a symlink is never opened"
        );
        assert!(
            c.lookup(e.nodeid, "passwd").is_err(),
            "{name}: not a directory here"
        );
    }
    // The guest's own symlinks: the same.
    let s = c.symlink(ROOT_ID, "mine", "/etc/passwd").unwrap();
    assert!(c.open(s.nodeid, libc::O_RDONLY).is_err());
    assert!(c.open(s.nodeid, libc::O_RDWR | libc::O_TRUNC).is_err());
    assert_eq!(
        std::fs::read_link(share.path("mine")).unwrap(),
        Path::new("/etc/passwd")
    );
    // A hard link to a symlink is another symlink, not the file.
    let l = c.link(s.nodeid, ROOT_ID, "mine2").unwrap();
    assert_eq!(l.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert!(c.open(l.nodeid, libc::O_RDONLY).is_err());
}

#[test]
fn a_directory_swapped_for_a_symlink_does_not_redirect() {
    let share = Share::new("swap");
    std::fs::create_dir(share.path("d")).unwrap();
    std::fs::write(share.path("d/f"), "inside").unwrap();
    let mut c = Client::new(&share, false, budget());
    let d = c.lookup(ROOT_ID, "d").unwrap();
    // Between the guest's lookup and its next use, the directory becomes
    // a symlink to a host directory.
    std::fs::rename(share.path("d"), share.path("moved")).unwrap();
    std::os::unix::fs::symlink(&share.root, share.path("d")).unwrap();
    // The guest's handle still means the directory it looked up.
    assert_eq!(c.lookup(d.nodeid, "outside").err(), Some(libc::ENOENT));
    let f = c.lookup(d.nodeid, "f").unwrap();
    let fh = c.open(f.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(c.read(f.nodeid, fh, 100).unwrap(), b"inside");
    // Looking it up again finds the symlink, which leads nowhere.
    let s = c.lookup(ROOT_ID, "d").unwrap();
    assert_eq!(s.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert!(c.lookup(s.nodeid, "outside").is_err());
}

#[test]
fn made_up_node_ids_and_renames_out_get_errors() {
    let share = Share::new("nodes");
    std::fs::write(share.path("f"), "x").unwrap();
    let mut c = Client::new(&share, false, budget());
    // Node ids the guest was never given (open_by_handle-style guessing).
    // Small numbers may name the share's root in the VFS's numbering (an
    // alias, not an escape); none reaches above it.
    for node in 0..16u64 {
        assert!(c.lookup(node, "outside").is_err(), "{node}");
    }
    for node in [12_345u64, u64::MAX, 1 << 56, (1 << 56) + 7] {
        assert!(c.lookup(node, "outside").is_err(), "{node}");
        assert!(c.lookup(node, "f").is_err(), "{node}");
        // The VFS's own (empty) root answers an open without a file
        // behind it: nothing can be read through it.
        if let Ok(fh) = c.open(node, libc::O_RDONLY) {
            assert!(c.read(node, fh, 16).is_err(), "{node}");
        }
        let getattr = GetattrIn::default();
        assert!(c
            .call(Opcode::Getattr as u32, node, &[getattr.as_slice()])
            .is_err());
    }
    // Renames and links cannot name anything outside.
    for newname in ["../escaped", "..", "/tmp/escaped", "a/b"] {
        assert!(
            c.rename(ROOT_ID, "f", ROOT_ID, newname, 0).is_err(),
            "{newname}"
        );
    }
    let f = c.lookup(ROOT_ID, "f").unwrap();
    assert!(c.link(f.nodeid, ROOT_ID, "../escaped").is_err());
    assert!(!share.root.join("escaped").exists());
    assert_eq!(std::fs::read(share.path("f")).unwrap(), b"x");
    assert_eq!(
        std::fs::read(share.root.join("outside")).unwrap(),
        b"host secret"
    );
}

#[test]
fn read_only_share_refuses_every_change() {
    let share = Share::new("ro");
    std::fs::write(share.path("f"), "original").unwrap();
    std::fs::create_dir(share.path("d")).unwrap();
    let mut c = Client::new(&share, true, budget());
    let f = c.lookup(ROOT_ID, "f").unwrap();
    let d = c.lookup(ROOT_ID, "d").unwrap();
    assert_eq!(c.open(f.nodeid, libc::O_WRONLY).err(), Some(libc::EROFS));
    assert_eq!(c.open(f.nodeid, libc::O_RDWR).err(), Some(libc::EROFS));
    assert_eq!(
        c.open(f.nodeid, libc::O_RDONLY | libc::O_TRUNC).err(),
        Some(libc::EROFS)
    );
    assert_eq!(
        c.open(f.nodeid, libc::O_RDONLY | libc::O_APPEND).err(),
        Some(libc::EROFS)
    );
    // Reading is fine; writing through a read handle is not.
    let fh = c.open(f.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(c.read(f.nodeid, fh, 100).unwrap(), b"original");
    assert_eq!(c.write(f.nodeid, fh, b"changed").err(), Some(libc::EROFS));
    assert_eq!(c.create(ROOT_ID, "new", 0o644).err(), Some(libc::EROFS));
    assert_eq!(c.mkdir(ROOT_ID, "nd", 0o755).err(), Some(libc::EROFS));
    assert_eq!(
        c.mknod(ROOT_ID, "n", libc::S_IFREG | 0o644).err(),
        Some(libc::EROFS)
    );
    assert_eq!(c.symlink(ROOT_ID, "s", "f").err(), Some(libc::EROFS));
    assert_eq!(c.link(f.nodeid, ROOT_ID, "l").err(), Some(libc::EROFS));
    assert_eq!(
        c.call(Opcode::Unlink as u32, ROOT_ID, &[&cstr("f")]).err(),
        Some(libc::EROFS)
    );
    assert_eq!(
        c.call(Opcode::Rmdir as u32, ROOT_ID, &[&cstr("d")]).err(),
        Some(libc::EROFS)
    );
    assert_eq!(
        c.rename(ROOT_ID, "f", ROOT_ID, "g", 0).err(),
        Some(libc::EROFS)
    );
    let trunc = SetattrIn {
        valid: SetattrValid::SIZE.bits(),
        size: 0,
        ..SetattrIn::default()
    };
    assert_eq!(c.setattr(f.nodeid, trunc).err(), Some(libc::EROFS));
    let chmod = SetattrIn {
        valid: SetattrValid::MODE.bits(),
        mode: 0o777,
        ..SetattrIn::default()
    };
    assert_eq!(c.setattr(d.nodeid, chmod).err(), Some(libc::EROFS));
    let xattr = SetxattrIn { size: 1, flags: 0 };
    let parts: [&[u8]; 3] = [xattr.as_slice(), &cstr("user.x"), b"v"];
    assert!(c.call(Opcode::Setxattr as u32, f.nodeid, &parts).is_err());
    let access = AccessIn {
        mask: libc::W_OK as u32,
        padding: 0,
    };
    assert_eq!(
        c.call(Opcode::Access as u32, f.nodeid, &[access.as_slice()])
            .err(),
        Some(libc::EROFS)
    );
    // The folder is as it was.
    assert_eq!(std::fs::read(share.path("f")).unwrap(), b"original");
    let mut names: Vec<_> = std::fs::read_dir(share.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["d", "f"]);
}

#[test]
fn no_set_id_bits_device_nodes_fifos_or_whiteouts() {
    let share = Share::new("modes");
    let mut c = Client::new(&share, false, budget());
    let mode = |p: &str| {
        std::fs::metadata(share.path(p))
            .unwrap()
            .permissions()
            .mode()
    };
    c.create(ROOT_ID, "suid", 0o4755).unwrap();
    assert_eq!(mode("suid") & 0o7777, 0o755);
    c.mkdir(ROOT_ID, "sgid", 0o2775).unwrap();
    assert_eq!(mode("sgid") & 0o7000, 0);
    let f = c.mknod(ROOT_ID, "plain", libc::S_IFREG | 0o6644).unwrap();
    assert_eq!(mode("plain") & 0o7777, 0o644);
    let chmod = SetattrIn {
        valid: SetattrValid::MODE.bits(),
        mode: 0o6777,
        ..SetattrIn::default()
    };
    c.setattr(f.nodeid, chmod).unwrap();
    assert_eq!(mode("plain") & 0o7000, 0, "setattr strips set-id bits");
    for (name, kind) in [
        ("chr", libc::S_IFCHR),
        ("blk", libc::S_IFBLK),
        ("fifo", libc::S_IFIFO),
        ("sock", libc::S_IFSOCK),
    ] {
        assert_eq!(
            c.mknod(ROOT_ID, name, kind | 0o666).err(),
            Some(libc::EPERM),
            "{name}"
        );
        assert!(!share.path(name).exists());
    }
    // RENAME_WHITEOUT would leave a character device behind.
    assert_eq!(
        c.rename(ROOT_ID, "plain", ROOT_ID, "p2", libc::RENAME_WHITEOUT),
        Err(libc::EINVAL)
    );
    assert!(share.path("plain").exists());
}

#[test]
fn files_belong_to_kiln_and_owners_do_not_change() {
    let share = Share::new("owners");
    let mut c = Client::new(&share, false, budget());
    // The guest process claims uid/gid 1234.
    c.uid = 1234;
    let (e, _) = c.create(ROOT_ID, "f", 0o644).unwrap();
    c.mkdir(ROOT_ID, "d", 0o755).unwrap();
    // SAFETY: geteuid/getegid only read the process's credentials.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    for p in ["f", "d"] {
        let m = std::fs::metadata(share.path(p)).unwrap();
        assert_eq!((m.uid(), m.gid()), (uid, gid), "{p} belongs to kiln's user");
    }
    let chown = SetattrIn {
        valid: SetattrValid::UID.bits() | SetattrValid::GID.bits(),
        uid: 4321,
        gid: 4321,
        ..SetattrIn::default()
    };
    assert_eq!(c.setattr(e.nodeid, chown).err(), Some(libc::EPERM));
    let m = std::fs::metadata(share.path("f")).unwrap();
    assert_eq!((m.uid(), m.gid()), (uid, gid));
    // Setting what the owner already is, is fine.
    let same = SetattrIn {
        valid: SetattrValid::UID.bits(),
        uid,
        ..SetattrIn::default()
    };
    c.setattr(e.nodeid, same).unwrap();
}

#[test]
fn file_descriptors_are_bounded() {
    let share = Share::new("fds");
    for i in 0..300 {
        std::fs::write(share.path(&format!("f{i}")), "x").unwrap();
    }
    let budget = Arc::new(FdBudget::new(100));
    let mut c = Client::new(&share, false, budget.clone());
    let mut nodes = Vec::new();
    let mut handles = Vec::new();
    let mut refused = 0;
    for i in 0..300 {
        match c.lookup(ROOT_ID, &format!("f{i}")) {
            Ok(e) => match c.open(e.nodeid, libc::O_RDONLY) {
                Ok(fh) => {
                    nodes.push(e.nodeid);
                    handles.push((e.nodeid, fh));
                }
                Err(e) => {
                    assert_eq!(e, libc::ENFILE);
                    refused += 1;
                }
            },
            Err(e) => {
                assert_eq!(e, libc::ENFILE);
                refused += 1;
            }
        }
        assert!(budget.used() <= 100, "{}", budget.used());
    }
    assert!(refused > 150, "{refused}");
    // The server keeps answering.
    assert!(c.lookup(ROOT_ID, "..").is_ok() || budget.used() == 100);
    // Releasing and forgetting gives the budget back.
    for (node, fh) in handles {
        c.release(node, fh).unwrap();
    }
    for node in nodes {
        c.forget(node, 1);
    }
    assert!(budget.used() <= 1, "{}", budget.used());
    let e = c.lookup(ROOT_ID, "f299").unwrap();
    c.open(e.nodeid, libc::O_RDONLY).unwrap();
}

/// O_PATH and O_TMPFILE opens (which no guest kernel sends) are refused;
/// a read carrying other flags than its handle's is served with the
/// handle's. fuse-backend-rs would set the request's flags on the fd and,
/// when that failed (as on an O_PATH fd), close the fd its handle still
/// owns: the fs fuzz target found the handle later reading and closing
/// whatever file took the number.
#[test]
fn open_flags_are_checked_and_reads_keep_the_handles() {
    let share = Share::new("open-flags");
    std::fs::write(share.path("f"), "hello").unwrap();
    let mut c = Client::new(&share, false, budget());
    let f = c.lookup(ROOT_ID, "f").unwrap().nodeid;
    assert_eq!(c.open(f, libc::O_RDONLY | libc::O_PATH), Err(libc::EINVAL));
    assert_eq!(c.open(f, libc::O_RDWR | libc::O_TMPFILE), Err(libc::EINVAL));
    let fh = c.open(f, libc::O_RDONLY).unwrap();
    for flags in [
        libc::O_PATH,
        libc::O_DIRECT,
        libc::O_APPEND | libc::O_NONBLOCK,
        -1,
    ] {
        assert_eq!(
            c.read_with_flags(f, fh, 16, flags).as_deref(),
            Ok(&b"hello"[..]),
            "read with flags {flags:#x}"
        );
    }
    c.release(f, fh).unwrap();
    assert_eq!(c.read(f, fh, 16), Err(libc::EBADF));
}

#[test]
fn extended_attributes_do_not_reach_the_host() {
    let share = Share::new("xattr");
    std::fs::write(share.path("f"), "x").unwrap();
    let mut c = Client::new(&share, false, budget());
    let f = c.lookup(ROOT_ID, "f").unwrap();
    let xattr = SetxattrIn { size: 4, flags: 0 };
    let parts: [&[u8]; 3] = [
        xattr.as_slice(),
        &cstr("security.capability"),
        b"\x01\x02\x03\x04",
    ];
    assert!(c.call(Opcode::Setxattr as u32, f.nodeid, &parts).is_err());
}

#[test]
fn malformed_requests_get_errors_never_a_panic() {
    let share = Share::new("junk");
    std::fs::write(share.path("f"), "x").unwrap();
    let mut c = Client::new(&share, false, budget());
    // Unknown and unassigned opcodes.
    for op in [0u32, 7, 19, 50, 1000, u32::MAX] {
        let r = c.call(op, ROOT_ID, &[b"junk"]);
        assert!(r.is_err(), "opcode {op}");
    }
    // Arguments shorter than the opcode needs, names without a NUL.
    for op in [
        Opcode::Lookup,
        Opcode::Mkdir,
        Opcode::Create,
        Opcode::Write,
        Opcode::Rename2,
        Opcode::Setxattr,
    ] {
        let _ = c.call(op as u32, ROOT_ID, &[b"ab"]);
        let _ = c.call(op as u32, ROOT_ID, &[]);
    }
    // A header whose len lies, a header cut short, random bytes.
    let mut h = InHeader {
        len: u32::MAX,
        opcode: Opcode::Lookup as u32,
        unique: 1,
        nodeid: ROOT_ID,
        ..InHeader::default()
    };
    let _ = c.raw(h.as_slice());
    h.len = 10;
    let _ = c.raw(h.as_slice());
    let _ = c.raw(&h.as_slice()[..20]);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..200 {
        let mut junk = vec![0u8; 128];
        for b in junk.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x.to_le_bytes()[0];
        }
        let _ = c.raw(&junk);
    }
    // Still serving.
    assert!(c.lookup(ROOT_ID, "f").is_ok());
}

/// A chain that loops (its reply buffer's next is itself) is cut short by
/// virtio-queue after yielding that buffer again and again: it gets no
/// reply, rather than one written over the same bytes and claiming more
/// than the guest gave (found by the `fs` fuzz target).
#[test]
fn a_looping_chain_gets_no_reply() {
    let share = Share::new("loop");
    let mut c = Client::new(&share, false, budget());
    let h = InHeader {
        len: 56,
        opcode: Opcode::Getattr as u32,
        unique: 7,
        nodeid: ROOT_ID,
        ..InHeader::default()
    };
    let mut msg = h.as_slice().to_vec();
    msg.extend_from_slice(&[0; 16]);
    c.mem.write_slice(&[0xaa; 16], GuestAddress(RESP)).unwrap();
    let used = c.chain(&msg, &[(REQ, 56, 1, 1), (RESP, 8, 3, 1)]);
    assert_eq!(used, 0);
    let mut out = [0u8; 16];
    c.mem.read_slice(&mut out, GuestAddress(RESP)).unwrap();
    assert_eq!(out, [0xaa; 16], "nothing written");
    // A chain whose next index is past the queue: the same.
    assert_eq!(c.chain(&msg, &[(REQ, 56, 1, QSIZE)]), 0);
    // And a good one still gets its reply.
    assert!(c.call(Opcode::Getattr as u32, ROOT_ID, &[&[0; 16]]).is_ok());
}

/// The checks of [`served_as_an_ordinary_user`], run by a process that is
/// not root, on a folder it owns.
fn unprivileged_checks(dir: &Path) {
    // SAFETY: geteuid/getegid only read the process's credentials.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    assert_ne!(uid, 0, "must run as an ordinary user");
    let share = Share {
        root: dir.to_path_buf(),
    };
    let mut c = Client::new(&share, false, budget());
    // Guest root, and a guest user kiln's user is not: both create files
    // as kiln's user, and nothing needs a capability.
    for (guest_uid, name) in [(0, "by-root"), (4321, "by-user")] {
        c.uid = guest_uid;
        let (e, fh) = c.create(ROOT_ID, name, 0o4755).unwrap();
        assert_eq!(c.write(e.nodeid, fh, b"data").unwrap(), 4);
        let m = std::fs::metadata(share.path(name)).unwrap();
        assert_eq!(
            (m.uid(), m.gid(), m.mode() & 0o7777),
            (uid, gid, 0o755),
            "{name}"
        );
    }
    let d = c.mkdir(ROOT_ID, "dir", 0o755).unwrap();
    let chown = SetattrIn {
        valid: SetattrValid::UID.bits(),
        uid: 0,
        ..SetattrIn::default()
    };
    assert_eq!(c.setattr(d.nodeid, chown).err(), Some(libc::EPERM));
    std::mem::forget(share); // the parent removes the folder
}

#[test]
#[ignore = "run by served_as_an_ordinary_user in a process that is not root"]
fn unprivileged_child() {
    let dir = std::env::var_os("KILN_FS_TEST_DIR").expect("KILN_FS_TEST_DIR");
    unprivileged_checks(Path::new(&dir));
}

/// kiln serves a folder without root or capabilities: as root, the checks
/// run in a child process under `setpriv` as nobody.
#[test]
fn served_as_an_ordinary_user() {
    let share = Share::new("unprivileged");
    // SAFETY: geteuid only reads the process's credentials.
    if unsafe { libc::geteuid() } != 0 {
        unprivileged_checks(&share.root);
        return;
    }
    const NOBODY: u32 = 65534;
    std::os::unix::fs::chown(&share.root, Some(NOBODY), Some(NOBODY)).unwrap();
    std::os::unix::fs::chown(share.dir(), Some(NOBODY), Some(NOBODY)).unwrap();
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--",
        ])
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "devices::virtio::fs::tests::unprivileged_child",
            "--ignored",
        ])
        .env("KILN_FS_TEST_DIR", &share.root)
        .output()
        .expect("setpriv (util-linux) runs the checks as nobody");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("1 passed"),
        "as nobody:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A share the guest never used is saved as its tag and restores under the
/// same tag (whatever folder the restore's config names); a share in use
/// cannot be saved, saying why.
#[test]
fn only_an_unused_share_is_saved() {
    use crate::devices::virtio::VirtioDevice;
    use std::sync::atomic::Ordering;
    let dir = std::env::temp_dir().join(format!("kiln-fs-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let opts = |tag: &str| super::FsOptions {
        tag: tag.into(),
        path: dir.clone(),
        read_only: false,
    };
    let fs = super::Fs::new(opts("src"), budget()).unwrap();
    let saved = fs.save_state().unwrap();
    assert_eq!(saved, Some(serde_json::json!({ "tag": "src" })));
    let mut same = super::Fs::new(opts("src"), budget()).unwrap();
    same.restore_state(saved.as_ref()).unwrap();
    let mut other = super::Fs::new(opts("data"), budget()).unwrap();
    let e = other.restore_state(saved.as_ref()).unwrap_err();
    assert!(
        e.to_string()
            .contains(r#"fs tag is "src", the config's "data""#),
        "{e}"
    );
    assert!(other.restore_state(None).is_err());

    // What the worker sets on the guest's first request (its mount).
    fs.used.store(true, Ordering::SeqCst);
    let e = fs.save_state().unwrap_err();
    assert!(
        e.to_string()
            .contains("fs src: the guest has mounted this share"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
