//! The `fuser::Filesystem` implementation: every kernel request becomes one `Vfs` call.
//!
//! Requests are served by the session's own thread pool (`Config::n_threads`, one cloned
//! `/dev/fuse` descriptor per thread), so a slow object-store read or upload holds up only its own
//! thread. Blocking lock waits (F_SETLKW, blocking flock) get a thread of their own so they never
//! occupy the pool.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use cellar_vfs::{
    Attr, Ctx, LockRange, LockReply, RenameMode, SetAttrRequest, Vfs, VfsResult, ROOT_INO,
};
use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileHandle, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, Notifier, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyIoctl, ReplyLock, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, TimeOrNow, WriteFlags,
};

use crate::convert::{
    file_attr, file_type, lock_kind, lock_type, nanos, negative_entry, range_end_from_kernel,
    range_end_to_kernel, time_set, KERNEL_OFFSET_MAX,
};
use crate::kernel_cache::KernelCache;
use crate::mount::report_invalidation;

/// Entry and attribute cache lifetime in the kernel, negative entries (names not found)
/// included. Long, because what other mounts and hosts change is pushed: the vfs's change feed
/// invalidates the kernel's entries and attributes as soon as a change commits (a new name by
/// its parent and name). The TTL only bounds staleness when that feed is broken.
pub(crate) const TTL: Duration = Duration::from_secs(60);
/// The volume root's attributes expire quickly: whoever checks that a mount is alive stats its
/// root, and after the daemon died the kernel would answer that from its cache for a whole TTL.
const ROOT_TTL: Duration = Duration::from_secs(1);

fn ttl(attr: &Attr) -> &'static Duration {
    if attr.ino == ROOT_INO {
        &ROOT_TTL
    } else {
        &TTL
    }
}
/// Inode numbers are never reused by the metadata engine, so one generation suffices.
const GENERATION: Generation = Generation(0);
/// Entries asked from the vfs per READDIR / READDIRPLUS request. The kernel's buffer (up to
/// 128 KiB on recent kernels) takes about this many; entries that do not fit are asked again
/// from their offset, so overshooting only costs a little work.
const READDIR_BATCH: usize = 512;
const READDIRPLUS_BATCH: usize = 256;
/// Largest write the kernel may send (`max_pages` follows from it: 256 pages of 4 KiB).
const MAX_WRITE: u32 = 1024 * 1024;
/// Asynchronous requests (read-ahead, background writes) the kernel keeps in flight.
const MAX_BACKGROUND: u16 = 128;
const CONGESTION_THRESHOLD: u16 = 96;

pub(crate) struct CellarFs {
    vfs: Arc<Vfs>,
    kernel: Arc<KernelCache>,
    /// Set once the session exists (it is made from this file system).
    notifier: Arc<OnceLock<Notifier>>,
}

impl CellarFs {
    pub(crate) fn new(
        vfs: Arc<Vfs>,
        kernel: Arc<KernelCache>,
        notifier: Arc<OnceLock<Notifier>>,
    ) -> Self {
        CellarFs {
            vfs,
            kernel,
            notifier,
        }
    }

    /// Answers an entry request, remembering what the kernel now holds.
    /// A node just created has no xattrs: its getxattr (the kernel asks `security.capability`
    /// before writes and chown) needs no transaction. `epoch`: from before the create.
    fn created(&self, epoch: u64, result: &VfsResult<Attr>) {
        if let Ok(attr) = result {
            self.kernel.without_xattrs(epoch, [attr.ino]);
        }
    }

    fn reply_entry(&self, reply: ReplyEntry, parent: u64, name: &[u8], result: VfsResult<Attr>) {
        match result {
            Ok(attr) => {
                self.kernel.entered(parent, name, attr.ino);
                reply.entry(ttl(&attr), &file_attr(&attr), GENERATION)
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    /// Lookup that also answers "." and ".." (asked by the kernel for NFS export support).
    fn lookup_entry(&self, req: &Request, parent: u64, name: &[u8]) -> VfsResult<Attr> {
        match name {
            b"." => self.vfs.getattr(parent),
            b".." => {
                let dir = self.vfs.getattr(parent)?;
                self.vfs.getattr(dir.parent)
            }
            _ => self.vfs.lookup(&ctx(req), parent, name),
        }
    }
}

fn ctx(req: &Request) -> Ctx {
    Ctx {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

fn errno(error: cellar_vfs::Errno) -> Errno {
    Errno::from_i32(error.0)
}

fn reply_attr(reply: ReplyAttr, result: VfsResult<Attr>) {
    match result {
        Ok(attr) => reply.attr(ttl(&attr), &file_attr(&attr)),
        Err(e) => reply.error(errno(e)),
    }
}

fn reply_empty(reply: ReplyEmpty, result: VfsResult<()>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    }
}

/// Answers a granted lock once the kernel dropped what the vfs found stale, so that the holder's
/// next stat and read see what the previous holder wrote on another mount. Sent from this
/// thread, not queued: a request handler's notification only waits for page locks, which the
/// other handler threads release.
fn reply_lock(
    reply: ReplyEmpty,
    ino: INodeNo,
    granted: VfsResult<LockReply>,
    notifier: &OnceLock<Notifier>,
) {
    match granted {
        Ok(LockReply { keep_cache: false }) => {
            if let Some(notifier) = notifier.get() {
                report_invalidation(notifier.inval_inode(ino, 0, 0));
            }
            reply.ok()
        }
        Ok(LockReply { keep_cache: true }) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    }
}

/// getxattr/listxattr protocol: a size-0 request probes the length; a too-small buffer is ERANGE.
fn reply_xattr(reply: ReplyXattr, size: u32, result: VfsResult<Vec<u8>>) {
    let value = match result {
        Ok(value) => value,
        Err(e) => return reply.error(errno(e)),
    };
    let Ok(len) = u32::try_from(value.len()) else {
        return reply.error(Errno::E2BIG);
    };
    if size == 0 {
        reply.size(len);
    } else if len > size {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(&value);
    }
}

fn open_flags(keep_cache: bool) -> FopenFlags {
    if keep_cache {
        FopenFlags::FOPEN_KEEP_CACHE
    } else {
        FopenFlags::empty()
    }
}

fn rename_mode(flags: RenameFlags) -> Result<RenameMode, Errno> {
    if flags.contains(RenameFlags::RENAME_WHITEOUT) {
        Err(Errno::EINVAL)
    } else if flags.contains(RenameFlags::RENAME_EXCHANGE) {
        Ok(RenameMode::Exchange)
    } else if flags.contains(RenameFlags::RENAME_NOREPLACE) {
        Ok(RenameMode::NoReplace)
    } else {
        Ok(RenameMode::Replace)
    }
}

/// Capabilities asked from the kernel when it offers them. No FUSE_WRITEBACK_CACHE: with
/// write-through, `close()` and `fsync()` see every byte, which keeps close-to-open consistency
/// and crash durability simple. No FUSE_ATOMIC_O_TRUNC: the kernel then truncates through setattr,
/// the one place the vfs changes a size.
/// A lock request of the kernel as the vfs takes it (`None` for an unknown lock type).
fn lock_range(start: u64, end: u64, typ: i32, pid: u32) -> Option<LockRange> {
    Some(LockRange {
        start,
        end: range_end_from_kernel(end),
        kind: lock_kind(typ)?,
        pid,
    })
}

fn wanted_capabilities() -> InitFlags {
    InitFlags::FUSE_ASYNC_READ
        | InitFlags::FUSE_BIG_WRITES
        | InitFlags::FUSE_MAX_PAGES
        | InitFlags::FUSE_POSIX_LOCKS
        | InitFlags::FUSE_FLOCK_LOCKS
        | InitFlags::FUSE_EXPORT_SUPPORT
        | InitFlags::FUSE_DO_READDIRPLUS
        | InitFlags::FUSE_READDIRPLUS_AUTO
        | InitFlags::FUSE_PARALLEL_DIROPS
        | InitFlags::FUSE_ASYNC_DIO
        | InitFlags::FUSE_AUTO_INVAL_DATA
        // The kernel then keeps "no setuid bit, no security.capability" per inode (SB_NOSEC)
        // instead of asking getxattr("security.capability") before every write; the vfs clears
        // setuid/setgid on a non-root write itself.
        | InitFlags::FUSE_HANDLE_KILLPRIV_V2
        // A symlink's target never changes (a new target is a new inode).
        | InitFlags::FUSE_CACHE_SYMLINKS
}

impl Filesystem for CellarFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let offered = config.capabilities() & wanted_capabilities();
        if let Err(refused) = config.add_capabilities(offered) {
            tracing::warn!(?refused, "the kernel refused FUSE capabilities it offered");
        }
        // Each setter returns the nearest accepted value when the kernel limits it.
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(CONGESTION_THRESHOLD);
        tracing::debug!(capabilities = ?offered, "FUSE session initialised");
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name.as_bytes();
        match self.lookup_entry(req, parent.0, name) {
            // Inode 0 with a TTL: the kernel keeps the name as missing (a negative entry), so
            // PATH and import searches, `make` and compilers probing files ask once per TTL.
            Err(e) if e.0 == libc::ENOENT && self.kernel.missing(parent.0, name) => {
                reply.entry(&TTL, &negative_entry(), GENERATION)
            }
            result => self.reply_entry(reply, parent.0, name, result),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.kernel.forgot(ino.0, nlookup);
        self.vfs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply_attr(reply, self.vfs.getattr(ino.0));
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let request = SetAttrRequest {
            // The kernel sends the whole i_mode; only the permission bits can change.
            mode: mode.map(|m| m & 0o7777),
            uid,
            gid,
            size,
            atime: atime.map(time_set),
            mtime: mtime.map(time_set),
            ctime: ctime.map(nanos),
            fh: fh.map(|f| f.0),
        };
        reply_attr(reply, self.vfs.setattr(&ctx(req), ino.0, request));
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.vfs.readlink(ino.0) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let epoch = self.kernel.xattr_epoch();
        let result = self
            .vfs
            .mknod(&ctx(req), parent.0, name.as_bytes(), mode, umask, rdev);
        self.created(epoch, &result);
        self.reply_entry(reply, parent.0, name.as_bytes(), result);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let epoch = self.kernel.xattr_epoch();
        let result = self
            .vfs
            .mkdir(&ctx(req), parent.0, name.as_bytes(), mode, umask);
        self.created(epoch, &result);
        self.reply_entry(reply, parent.0, name.as_bytes(), result);
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.vfs.unlink(&ctx(req), parent.0, name.as_bytes()));
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.vfs.rmdir(&ctx(req), parent.0, name.as_bytes()));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let epoch = self.kernel.xattr_epoch();
        let result = self.vfs.symlink(
            &ctx(req),
            parent.0,
            link_name.as_bytes(),
            target.as_os_str().as_bytes(),
        );
        self.created(epoch, &result);
        self.reply_entry(reply, parent.0, link_name.as_bytes(), result);
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mode = match rename_mode(flags) {
            Ok(mode) => mode,
            Err(e) => return reply.error(e),
        };
        let result = self.vfs.rename(
            &ctx(req),
            parent.0,
            name.as_bytes(),
            newparent.0,
            newname.as_bytes(),
            mode,
        );
        reply_empty(reply, result);
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let result = self
            .vfs
            .link(&ctx(req), ino.0, newparent.0, newname.as_bytes());
        self.reply_entry(reply, newparent.0, newname.as_bytes(), result);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.vfs.open(&ctx(req), ino.0, flags.0) {
            Ok(open) => reply.opened(FileHandle(open.fh), open_flags(open.keep_cache)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.vfs.read(ino.0, fh.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.vfs.write(ino.0, fh.0, offset, data) {
            Ok(written) => reply.written(written),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.vfs.flush(ino.0, fh.0, lock_owner.0));
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // The kernel names a lock owner here only to drop the handle's flock locks, which arrive
        // as whole-file POSIX locks of that owner (see `setlk`): the vfs drops them.
        let result = self.vfs.release(ino.0, fh.0, lock_owner.map(|o| o.0));
        reply_empty(reply, result);
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.vfs.fsync(ino.0, fh.0, datasync));
    }

    fn opendir(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.vfs.opendir(&ctx(req), ino.0, flags.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.vfs.readdir(ino.0, fh.0, offset, READDIR_BATCH, false) {
            Ok(entries) => entries,
            Err(e) => return reply.error(errno(e)),
        };
        for entry in entries {
            let name = OsStr::from_bytes(&entry.name);
            if reply.add(
                INodeNo(entry.ino),
                entry.offset,
                file_type(entry.kind),
                name,
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let xattr_epoch = self.kernel.xattr_epoch();
        let entries = match self
            .vfs
            .readdir(ino.0, fh.0, offset, READDIRPLUS_BATCH, true)
        {
            Ok(entries) => entries,
            Err(e) => return reply.error(errno(e)),
        };
        let mut without_xattrs = Vec::new();
        for entry in entries {
            if entry.xattrs == Some(false) {
                without_xattrs.push(entry.ino);
            }
            // "." and ".." may come without attributes; an entry removed meanwhile is skipped.
            let attr = match entry.attr {
                Some(attr) => attr,
                None => match self.vfs.getattr(entry.ino) {
                    Ok(attr) => attr,
                    Err(_) => continue,
                },
            };
            let name = OsStr::from_bytes(&entry.name);
            let full = reply.add(
                INodeNo(entry.ino),
                entry.offset,
                name,
                ttl(&attr),
                &file_attr(&attr),
                GENERATION,
            );
            if full {
                break;
            }
            // The kernel counts a lookup for every entry it took but "." and "..".
            if entry.name != b"." && entry.name != b".." {
                self.kernel.entered(ino.0, &entry.name, entry.ino);
            }
        }
        self.kernel.without_xattrs(xattr_epoch, without_xattrs);
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.vfs.releasedir(ino.0, fh.0));
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.vfs.fsyncdir(ino.0, fh.0));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.vfs.statfs() {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let result = self
            .vfs
            .setxattr(&ctx(req), ino.0, name.as_bytes(), value, flags);
        self.kernel.xattrs_changed(Some(ino.0));
        reply_empty(reply, result);
    }

    /// An inode a directory listing showed without xattrs is answered without a transaction
    /// (the kernel has already refused empty and overlong names).
    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let result = if self.kernel.has_no_xattrs(ino.0) {
            Err(cellar_vfs::Errno(libc::ENODATA))
        } else {
            self.vfs.getxattr(ino.0, name.as_bytes())
        };
        reply_xattr(reply, size, result);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let result = if self.kernel.has_no_xattrs(ino.0) {
            Ok(Vec::new())
        } else {
            self.vfs.listxattr(ino.0)
        };
        reply_xattr(reply, size, result);
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result = self.vfs.removexattr(&ctx(req), ino.0, name.as_bytes());
        self.kernel.xattrs_changed(Some(ino.0));
        reply_empty(reply, result);
    }

    /// Permission checks are the kernel's (`default_permissions`); it does not even send ACCESS
    /// then, but answer consistently if it does.
    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let epoch = self.kernel.xattr_epoch();
        let result = self
            .vfs
            .create(&ctx(req), parent.0, name.as_bytes(), mode, umask, flags);
        match result {
            Ok((attr, open)) => {
                self.kernel.without_xattrs(epoch, [attr.ino]);
                self.kernel.entered(parent.0, name.as_bytes(), attr.ino);
                reply.created(
                    ttl(&attr),
                    &file_attr(&attr),
                    GENERATION,
                    FileHandle(open.fh),
                    open_flags(open.keep_cache),
                )
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn getlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        let Some(range) = lock_range(start, end, typ, pid) else {
            return reply.error(Errno::EINVAL);
        };
        match self.vfs.getlk(ino.0, fh.0, lock_owner.0, range) {
            Ok(Some(held)) => reply.locked(
                held.start,
                range_end_to_kernel(held.end),
                lock_type(held.kind),
                held.pid,
            ),
            Ok(None) => reply.locked(start, end.min(KERNEL_OFFSET_MAX), libc::F_UNLCK, 0),
            Err(e) => reply.error(errno(e)),
        }
    }

    /// POSIX locks, and flock(2) too: fuser 0.18 does not pass the kernel's FUSE_LK_FLOCK flag, so
    /// a flock arrives as a whole-file lock owned by its open file description and is kept as
    /// such (the way Linux NFS emulates flock). Conflicts between handles, upgrades, LOCK_NB and
    /// the release on last close (sent by the kernel asynchronously, as for every FUSE file
    /// system) behave as flock requires; only a flock and a POSIX lock
    /// taken by the same process on one file conflict, which real flock would not.
    fn setlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let Some(range) = lock_range(start, end, typ, pid) else {
            return reply.error(Errno::EINVAL);
        };
        if !sleep {
            let granted = self.vfs.setlk(ino.0, fh.0, lock_owner.0, range, false);
            return reply_lock(reply, ino, granted, &self.notifier);
        }
        let vfs = Arc::clone(&self.vfs);
        let notifier = Arc::clone(&self.notifier);
        let waiter = std::thread::Builder::new()
            .name("cellar-lock-wait".into())
            .spawn(move || {
                let granted = vfs.setlk(ino.0, fh.0, lock_owner.0, range, true);
                reply_lock(reply, ino, granted, &notifier);
            });
        if let Err(e) = waiter {
            // The reply moved into the closure that failed to start: dropping it unanswered
            // fails the request with EIO.
            tracing::error!("cannot start a lock-wait thread: {e}");
        }
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.vfs.fallocate(ino.0, fh.0, offset, length, mode));
    }

    /// SEEK_DATA / SEEK_HOLE (the kernel answers SEEK_SET/CUR/END itself).
    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(Errno::ENXIO);
        };
        match self.vfs.lseek(ino.0, fh.0, offset, whence) {
            Ok(at) => reply.offset(at as i64),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        // The reply carries a 32-bit count: copy at most that much, callers loop on short copies.
        let len = len.min(u64::from(u32::MAX));
        let result = self.vfs.copy_file_range(
            ino_in.0, fh_in.0, offset_in, ino_out.0, fh_out.0, offset_out, len,
        );
        match result {
            Ok(copied) => reply.written(u32::try_from(copied).unwrap_or(u32::MAX)),
            Err(e) => reply.error(errno(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rename_flags_map_to_modes() {
        assert_eq!(rename_mode(RenameFlags::empty()), Ok(RenameMode::Replace));
        assert_eq!(
            rename_mode(RenameFlags::RENAME_NOREPLACE),
            Ok(RenameMode::NoReplace)
        );
        assert_eq!(
            rename_mode(RenameFlags::RENAME_EXCHANGE),
            Ok(RenameMode::Exchange)
        );
        assert_eq!(
            rename_mode(RenameFlags::RENAME_WHITEOUT),
            Err(Errno::EINVAL)
        );
    }

    #[test]
    fn write_through_caching_is_kept() {
        assert!(!wanted_capabilities().contains(InitFlags::FUSE_WRITEBACK_CACHE));
    }
}
