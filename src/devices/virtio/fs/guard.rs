//! The policy between the guest and the host folder, as a [`FileSystem`]
//! wrapped around fuse-backend-rs's passthrough file system.
//!
//! It sees each request after the FUSE server copied its arguments out of
//! guest memory, so what it checks is what runs (no window for the guest to
//! change a request between check and use). It enforces:
//! - **read-only** shares: every operation that would change the folder
//!   (write, create, mknod, mkdir, symlink, link, unlink, rmdir, rename,
//!   setattr, setxattr, removexattr, fallocate, and opening for writing or
//!   truncation) fails with EROFS, whatever the guest mounted it as;
//! - **no set-id files, no special files**: setuid/setgid bits are stripped
//!   from every mode the guest sets (create, mkdir, mknod, setattr); mknod
//!   of anything but a regular file (device nodes, FIFOs, sockets) fails
//!   with EPERM; a rename may not create whiteouts;
//! - **ownership**: requests run with kiln's own credentials, whatever uid
//!   the guest process has (so the files it creates belong to the user
//!   running kiln, and kiln never switches uid, even as root), and changing
//!   a file's owner or group to anything else fails with EPERM;
//! - **open flags**: O_PATH and O_TMPFILE, which a guest kernel never
//!   sends in an open or create request, are refused (EINVAL); reads and
//!   writes reach the passthrough with the flags their handle was opened
//!   with, whatever the request says. fuse-backend-rs 0.14 sets a request's
//!   differing flags on the handle's fd with `fcntl(F_SETFL)`, and when that
//!   fails (an O_PATH fd; O_DIRECT where the host file system has none) it
//!   closes the fd the handle still owns: the number would be reused by the
//!   next file kiln opens, and the handle would read, write and finally
//!   close that one (the fs fuzz target found it);
//! - **bounded file descriptors**: the passthrough file system holds one fd
//!   per inode the guest knows and one per open file; both count against an
//!   [`FdBudget`] shared by every shared folder, and past it lookups and
//!   opens fail with ENFILE while kiln keeps running.
//!
//! Escapes are the passthrough's own business and tests check it: every
//! lookup is one path component relative to an fd kiln holds, opened with
//! O_NOFOLLOW; `..` of the root is the root; only regular files and
//! directories are ever opened; no file handles (open_by_handle_at) are used.

use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, FsOptions, GetxattrReply, ListxattrReply,
    OpenOptions, SetattrValid, ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::api::BackendFileSystem;

use crate::devices::bus::lock;

/// File descriptors the shared folders may hold, all together.
#[derive(Debug)]
pub struct FdBudget {
    max: usize,
    used: AtomicUsize,
}

impl FdBudget {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            used: AtomicUsize::new(0),
        }
    }

    /// What this process can spend on shared folders: its fd limit (raised
    /// to the hard limit) minus what the rest of kiln may need.
    pub fn for_this_process() -> Self {
        /// fds kept for everything else (vsock connections, eventfds...).
        const RESERVE: usize = 1024;
        Self::new(raise_nofile_limit().saturating_sub(RESERVE).max(64))
    }

    fn take(&self) -> io::Result<()> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u < self.max).then_some(u + 1)
            })
            .map(drop)
            .map_err(|_| io::Error::from_raw_os_error(libc::ENFILE))
    }

    fn give(&self, n: usize) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(n))
            });
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the soft limit.
fn raise_nofile_limit() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into `lim`, a valid rlimit we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads `raised`, a valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        }
    }
    usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
}

fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// §: set-user-ID and set-group-ID mode bits.
const SET_ID_BITS: u32 = libc::S_ISUID | libc::S_ISGID;
/// Open flags refused: see the module documentation (O_TMPFILE includes
/// O_DIRECTORY, which is allowed).
const REFUSED_OPEN_FLAGS: u32 = (libc::O_PATH | (libc::O_TMPFILE & !libc::O_DIRECTORY)) as u32;
/// renameat2 flags a guest may pass (not RENAME_WHITEOUT: a device node).
const RENAME_ALLOWED: u32 = libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE;

/// The policy wrapper; see the module documentation.
pub struct Guard<F> {
    inner: F,
    read_only: bool,
    budget: Arc<FdBudget>,
    /// How many times the guest was told about each inode (its FUSE
    /// lookup count), for the inodes this wrapper charged to the budget.
    known: Mutex<HashMap<u64, u64>>,
    /// Open files and directories charged to the budget.
    handles: AtomicUsize,
    /// The flags each open handle was opened with (as many as `handles`).
    open_flags: Mutex<HashMap<u64, u32>>,
}

impl<F: FileSystem<Inode = u64, Handle = u64>> Guard<F> {
    pub fn new(inner: F, read_only: bool, budget: Arc<FdBudget>) -> Self {
        Self {
            inner,
            read_only,
            budget,
            known: Mutex::new(HashMap::new()),
            handles: AtomicUsize::new(0),
            open_flags: Mutex::new(HashMap::new()),
        }
    }

    /// EINVAL for open flags no guest kernel sends (see the module doc).
    fn check_open_flags(flags: u32) -> io::Result<()> {
        if flags & REFUSED_OPEN_FLAGS != 0 {
            return Err(err(libc::EINVAL));
        }
        Ok(())
    }

    /// The flags `handle` was opened with, which reads and writes pass on
    /// in place of the request's; EBADF for a handle not open.
    fn handle_flags(&self, handle: u64) -> io::Result<u32> {
        lock(&self.open_flags)
            .get(&handle)
            .copied()
            .ok_or_else(|| err(libc::EBADF))
    }

    fn writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(err(libc::EROFS))
        } else {
            Ok(())
        }
    }

    /// Requests run as kiln itself: uid/gid 0 tells the passthrough file
    /// system not to switch credentials.
    fn own(ctx: &Context) -> Context {
        Context {
            uid: 0,
            gid: 0,
            pid: ctx.pid,
        }
    }

    /// Counts one more reference the guest holds to `entry`'s inode, or
    /// gives the reference back when that would exceed the fd budget.
    fn admit(&self, ctx: &Context, entry: Entry) -> io::Result<Entry> {
        if entry.inode == 0 {
            return Ok(entry);
        }
        let mut known = lock(&self.known);
        if let Some(n) = known.get_mut(&entry.inode) {
            *n = n.saturating_add(1);
            return Ok(entry);
        }
        match self.budget.take() {
            Ok(()) => {
                known.insert(entry.inode, 1);
                Ok(entry)
            }
            Err(e) => {
                drop(known);
                self.inner.forget(&Self::own(ctx), entry.inode, 1);
                Err(e)
            }
        }
    }

    /// Would a new reference to `inode` fit the budget?
    fn can_admit(&self, inode: u64) -> bool {
        inode == 0 || lock(&self.known).contains_key(&inode) || self.budget.used() < self.budget.max
    }

    fn forgotten(&self, inode: u64, count: u64) {
        let mut known = lock(&self.known);
        if let Some(n) = known.get_mut(&inode) {
            *n = n.saturating_sub(count);
            if *n == 0 {
                known.remove(&inode);
                self.budget.give(1);
            }
        }
    }

    /// Charges an open handle to the budget, or closes it again.
    fn admit_handle(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
        dir: bool,
        flags: u32,
    ) -> io::Result<()> {
        let Some(h) = handle else {
            return Ok(());
        };
        if let Err(e) = self.budget.take() {
            let ctx = Self::own(ctx);
            let _ = if dir {
                self.inner.releasedir(&ctx, inode, 0, h)
            } else {
                self.inner.release(&ctx, inode, 0, h, false, false, None)
            };
            return Err(e);
        }
        self.handles.fetch_add(1, Ordering::AcqRel);
        lock(&self.open_flags).insert(h, flags);
        Ok(())
    }

    fn released(&self, handle: u64) {
        lock(&self.open_flags).remove(&handle);
        let had = self
            .handles
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| h.checked_sub(1));
        if had.is_ok() {
            self.budget.give(1);
        }
    }
}

impl<F> Drop for Guard<F> {
    fn drop(&mut self) {
        let inodes = lock(&self.known).len();
        self.budget
            .give(inodes + self.handles.load(Ordering::Acquire));
    }
}

impl<F: FileSystem<Inode = u64, Handle = u64>> FileSystem for Guard<F> {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        self.inner.init(capable)
    }

    fn destroy(&self) {
        self.inner.destroy()
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let entry = self.inner.lookup(&Self::own(ctx), parent, name)?;
        self.admit(ctx, entry)
    }

    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        self.forgotten(inode, count);
        self.inner.forget(&Self::own(ctx), inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        for &(inode, count) in &requests {
            self.forgotten(inode, count);
        }
        self.inner.batch_forget(&Self::own(ctx), requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.getattr(&Self::own(ctx), inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: u64,
        mut attr: stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.writable()?;
        let ctx = Self::own(ctx);
        if valid.intersects(SetattrValid::UID | SetattrValid::GID) {
            // Only a change to what the owner already is may pass.
            let (now, _) = self.inner.getattr(&ctx, inode, handle)?;
            if (valid.contains(SetattrValid::UID) && attr.st_uid != now.st_uid)
                || (valid.contains(SetattrValid::GID) && attr.st_gid != now.st_gid)
            {
                return Err(err(libc::EPERM));
            }
        }
        attr.st_mode &= !SET_ID_BITS;
        self.inner.setattr(&ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        self.inner.readlink(&Self::own(ctx), inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.writable()?;
        let entry = self
            .inner
            .symlink(&Self::own(ctx), linkname, parent, name)?;
        self.admit(ctx, entry)
    }

    fn mknod(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.writable()?;
        if mode & libc::S_IFMT != libc::S_IFREG {
            return Err(err(libc::EPERM));
        }
        let entry = self.inner.mknod(
            &Self::own(ctx),
            parent,
            name,
            mode & !SET_ID_BITS,
            rdev,
            umask,
        )?;
        self.admit(ctx, entry)
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.writable()?;
        let entry = self
            .inner
            .mkdir(&Self::own(ctx), parent, name, mode & !SET_ID_BITS, umask)?;
        self.admit(ctx, entry)
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        self.inner.unlink(&Self::own(ctx), parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        self.inner.rmdir(&Self::own(ctx), parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.writable()?;
        if flags & !RENAME_ALLOWED != 0 {
            return Err(err(libc::EINVAL));
        }
        self.inner
            .rename(&Self::own(ctx), olddir, oldname, newdir, newname, flags)
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        self.writable()?;
        let entry = self
            .inner
            .link(&Self::own(ctx), inode, newparent, newname)?;
        self.admit(ctx, entry)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        let o_flags = i32::try_from(flags).map_err(|_| err(libc::EINVAL))?;
        Self::check_open_flags(flags)?;
        if self.read_only
            && (o_flags & libc::O_ACCMODE != libc::O_RDONLY
                || o_flags & (libc::O_TRUNC | libc::O_APPEND | libc::O_CREAT) != 0)
        {
            return Err(err(libc::EROFS));
        }
        if self.budget.used() >= self.budget.max {
            return Err(err(libc::ENFILE));
        }
        let opened = self.inner.open(&Self::own(ctx), inode, flags, fuse_flags)?;
        self.admit_handle(ctx, inode, opened.0, false, flags)?;
        Ok(opened)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mut args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        self.writable()?;
        Self::check_open_flags(args.flags)?;
        if self.budget.used().saturating_add(2) > self.budget.max {
            return Err(err(libc::ENFILE));
        }
        args.mode &= !SET_ID_BITS;
        let (entry, handle, opts, passthrough) =
            self.inner.create(&Self::own(ctx), parent, name, args)?;
        let entry = match self.admit(ctx, entry) {
            Ok(entry) => entry,
            Err(e) => {
                if let Some(h) = handle {
                    let _ =
                        self.inner
                            .release(&Self::own(ctx), entry.inode, 0, h, false, false, None);
                }
                return Err(e);
            }
        };
        self.admit_handle(ctx, entry.inode, handle, false, args.flags)?;
        Ok((entry, handle, opts, passthrough))
    }

    fn read(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        _flags: u32,
    ) -> io::Result<usize> {
        let flags = self.handle_flags(handle)?;
        self.inner.read(
            &Self::own(ctx),
            inode,
            handle,
            w,
            size,
            offset,
            lock_owner,
            flags,
        )
    }

    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        _flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.writable()?;
        let flags = self.handle_flags(handle)?;
        self.inner.write(
            &Self::own(ctx),
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(&self, ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()> {
        self.inner.flush(&Self::own(ctx), inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsync(&Self::own(ctx), inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.writable()?;
        self.inner
            .fallocate(&Self::own(ctx), inode, handle, mode, offset, length)
    }

    fn release(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        handle: u64,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        let r = self.inner.release(
            &Self::own(ctx),
            inode,
            flags,
            handle,
            flush,
            flock_release,
            lock_owner,
        );
        if r.is_ok() {
            self.released(handle);
        }
        r
    }

    fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        let mut st = self.inner.statfs(&Self::own(ctx), inode)?;
        if self.read_only {
            st.f_flag |= libc::ST_RDONLY;
        }
        Ok(st)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        self.writable()?;
        self.inner
            .setxattr(&Self::own(ctx), inode, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.inner.getxattr(&Self::own(ctx), inode, name, size)
    }

    fn listxattr(&self, ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        self.inner.listxattr(&Self::own(ctx), inode, size)
    }

    fn removexattr(&self, ctx: &Context, inode: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        self.inner.removexattr(&Self::own(ctx), inode, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        Self::check_open_flags(flags)?;
        if self.budget.used() >= self.budget.max {
            return Err(err(libc::ENFILE));
        }
        let opened = self.inner.opendir(&Self::own(ctx), inode, flags)?;
        // As the passthrough keeps them for a directory.
        let dir_flags = flags | libc::O_DIRECTORY as u32;
        self.admit_handle(ctx, inode, opened.0, true, dir_flags)?;
        Ok(opened)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdir(&Self::own(ctx), inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        // Each entry handed to the guest is a lookup: count it, and refuse
        // (before the guest sees it) one the budget has no room for.
        self.inner.readdirplus(
            &Self::own(ctx),
            inode,
            handle,
            size,
            offset,
            &mut |dir_entry, entry| {
                if !self.can_admit(entry.inode) {
                    return Err(err(libc::ENFILE));
                }
                let ino = entry.inode;
                let added = add_entry(dir_entry, entry)?;
                if added > 0 && ino != 0 {
                    let mut known = lock(&self.known);
                    match known.get_mut(&ino) {
                        Some(n) => *n = n.saturating_add(1),
                        None => {
                            // Checked by can_admit; a race with another
                            // request can only overshoot by one.
                            let _ = self.budget.take();
                            known.insert(ino, 1);
                        }
                    }
                }
                Ok(added)
            },
        )
    }

    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner
            .fsyncdir(&Self::own(ctx), inode, datasync, handle)
    }

    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        let r = self.inner.releasedir(&Self::own(ctx), inode, flags, handle);
        if r.is_ok() {
            self.released(handle);
        }
        r
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        if self.read_only && mask & libc::W_OK as u32 != 0 {
            return Err(err(libc::EROFS));
        }
        self.inner.access(&Self::own(ctx), inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner
            .lseek(&Self::own(ctx), inode, handle, offset, whence)
    }

    fn getlk(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<FileLock> {
        self.inner
            .getlk(&Self::own(ctx), inode, handle, owner, lock, flags)
    }

    fn setlk(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.inner
            .setlk(&Self::own(ctx), inode, handle, owner, lock, flags)
    }

    // setlkw (it would block the worker), ioctl, bmap, poll, DAX mappings:
    // left to the trait's ENOSYS.

    fn id_remap(&self, ctx: &mut Context) -> io::Result<()> {
        *ctx = Self::own(ctx);
        Ok(())
    }
}

impl<F> BackendFileSystem for Guard<F>
where
    F: BackendFileSystem<Inode = u64, Handle = u64> + 'static,
{
    fn mount(&self) -> io::Result<(Entry, u64)> {
        self.inner.mount()
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
