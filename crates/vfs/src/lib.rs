//! POSIX semantics of a volume over the metadata engine and the block store, independent of FUSE.
//!
//! THIS FILE IS THE CONTRACT between `cellar-vfs` and its callers (`cellar-fuse`, `cellar-cli`).
//! The signatures below are fixed; the work happens in the modules.
//!
//! Layout: [`backend`] holds the backends and the committed-data paths (read, compaction, gc);
//! [`volume`] a mounted volume (session, registry of handles and dirty inodes, background
//! threads in [`background`]); [`flush`] turns buffered writes into inline bytes or slices;
//! [`namespace`], [`io`] and [`locks`] implement the operations; [`maintenance`] fsck/gc/destroy.

use std::sync::Arc;

mod backend;
mod background;
mod errno;
mod flush;
mod handles;
mod intervals;
mod io;
mod locks;
mod maintenance_impl;
mod namespace;
mod volume;
mod write_buffer;

/// Largest file size (1 PiB); larger writes and truncates fail with EFBIG.
pub(crate) const MAX_FILE_SIZE: u64 = 1 << 50;

pub use cellar_meta::{Attr, FileKind, Ino, LockKind, LockRange, RenameMode, ROOT_INO};

/// A POSIX errno returned to the kernel (`libc::ENOENT`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);
pub type VfsResult<T> = std::result::Result<T, Errno>;

/// The caller of an operation (from the FUSE request header).
#[derive(Clone, Copy, Debug)]
pub struct Ctx {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// Everything needed to open a volume.
#[derive(Clone, Debug)]
pub struct VolumeConfig {
    /// `sqlite:///path/volume.db`
    pub meta_url: String,
    /// `file:///dir` or `s3://bucket/prefix?endpoint=http://127.0.0.1:7480&region=us-east-1`
    pub store_url: String,
    /// Volume name; formats the metadata on first use, must match afterwards.
    pub volume: String,
    /// Memory budget of the block cache, bytes.
    pub cache_mem_bytes: u64,
    /// Optional on-disk block cache directory and budget.
    pub cache_dir: Option<std::path::PathBuf>,
    pub cache_disk_bytes: u64,
    /// Mount point, recorded in the session for `fsck`/diagnostics.
    pub mount_point: String,
}

/// Attribute changes of a setattr call (`size` truncates).
#[derive(Clone, Debug, Default)]
pub struct SetAttrRequest {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<cellar_meta::TimeSet>,
    pub mtime: Option<cellar_meta::TimeSet>,
    pub ctime: Option<i64>,
    pub fh: Option<u64>,
}

pub struct OpenReply {
    pub fh: u64,
    /// The file is unchanged since the kernel last cached it: keep its page cache.
    pub keep_cache: bool,
}

pub struct DirEntryPlus {
    pub ino: Ino,
    /// Offset to pass back to continue after this entry (stable while the directory changes).
    pub offset: u64,
    pub kind: FileKind,
    pub name: Vec<u8>,
    pub attr: Option<Attr>,
}

pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// Kinds of change a mount must drop from the kernel caches (pushed by the vfs to its adapter).
pub enum Invalidation {
    Inode(Ino),
    Entry { parent: Ino, name: Vec<u8> },
}

pub struct Vfs {
    inner: Arc<volume::Inner>,
}

impl Drop for Vfs {
    /// Without `shutdown` (a crash, or a caller that forgot): background threads stop, nothing is
    /// flushed, and the session stays until another mount reaps it.
    fn drop(&mut self) {
        self.inner.stopper.stop();
    }
}

impl Vfs {
    /// Opens (formatting if new) a volume; checks the store is reachable with the credentials.
    pub fn open_volume(config: VolumeConfig) -> anyhow::Result<Arc<Vfs>> {
        Ok(Arc::new(Vfs {
            inner: volume::Inner::open_volume(&config)?,
        }))
    }
    /// Flushes everything, ends the session.
    pub fn shutdown(&self) -> anyhow::Result<()> {
        self.inner.shutdown()
    }

    pub fn lookup(&self, _ctx: &Ctx, parent: Ino, name: &[u8]) -> VfsResult<Attr> {
        self.inner.lookup(parent, name)
    }
    /// Drop kernel references (lets the vfs forget cached state).
    pub fn forget(&self, ino: Ino, _nlookup: u64) {
        self.inner.forget_seen(ino)
    }
    pub fn getattr(&self, ino: Ino) -> VfsResult<Attr> {
        self.inner.getattr(ino)
    }
    pub fn setattr(&self, ctx: &Ctx, ino: Ino, req: SetAttrRequest) -> VfsResult<Attr> {
        self.inner.setattr(ctx, ino, req)
    }
    pub fn readlink(&self, ino: Ino) -> VfsResult<Vec<u8>> {
        self.inner.readlink(ino)
    }
    /// Regular files, fifos, sockets, devices; `mode` includes the file type bits.
    pub fn mknod(
        &self,
        ctx: &Ctx,
        parent: Ino,
        name: &[u8],
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> VfsResult<Attr> {
        self.inner.mknod(ctx, parent, name, mode, umask, rdev)
    }
    pub fn mkdir(
        &self,
        ctx: &Ctx,
        parent: Ino,
        name: &[u8],
        mode: u32,
        umask: u32,
    ) -> VfsResult<Attr> {
        self.inner.mkdir(ctx, parent, name, mode, umask)
    }
    pub fn unlink(&self, _ctx: &Ctx, parent: Ino, name: &[u8]) -> VfsResult<()> {
        self.inner.unlink(parent, name)
    }
    pub fn rmdir(&self, _ctx: &Ctx, parent: Ino, name: &[u8]) -> VfsResult<()> {
        self.inner.rmdir(parent, name)
    }
    pub fn symlink(&self, ctx: &Ctx, parent: Ino, name: &[u8], target: &[u8]) -> VfsResult<Attr> {
        self.inner.symlink(ctx, parent, name, target)
    }
    pub fn rename(
        &self,
        _ctx: &Ctx,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        mode: RenameMode,
    ) -> VfsResult<()> {
        self.inner.rename(parent, name, new_parent, new_name, mode)
    }
    pub fn link(&self, _ctx: &Ctx, ino: Ino, new_parent: Ino, new_name: &[u8]) -> VfsResult<Attr> {
        self.inner.link(ino, new_parent, new_name)
    }

    /// `flags` are the open(2) flags (O_TRUNC already handled by the kernel via setattr).
    pub fn open(&self, ctx: &Ctx, ino: Ino, flags: i32) -> VfsResult<OpenReply> {
        self.inner.open(ctx, ino, flags)
    }
    pub fn create(
        &self,
        ctx: &Ctx,
        parent: Ino,
        name: &[u8],
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> VfsResult<(Attr, OpenReply)> {
        self.inner.create(ctx, parent, name, mode, umask, flags)
    }
    pub fn read(&self, ino: Ino, fh: u64, offset: u64, size: u32) -> VfsResult<Vec<u8>> {
        self.inner.read(ino, fh, offset, size)
    }
    pub fn write(&self, _ino: Ino, fh: u64, offset: u64, data: &[u8]) -> VfsResult<u32> {
        self.inner.write(fh, offset, data)
    }
    /// close(2) of one descriptor: uploads and commits this inode's buffered data; drops the
    /// POSIX locks of `lock_owner`.
    pub fn flush(&self, ino: Ino, fh: u64, lock_owner: u64) -> VfsResult<()> {
        self.inner.flush(ino, fh, lock_owner)
    }
    /// Last close of a handle; drops flock locks of the handle when `flock_release`.
    pub fn release(
        &self,
        ino: Ino,
        fh: u64,
        lock_owner: Option<u64>,
        flock_release: bool,
    ) -> VfsResult<()> {
        self.inner.release(ino, fh, lock_owner, flock_release)
    }
    pub fn fsync(&self, _ino: Ino, fh: u64, _datasync: bool) -> VfsResult<()> {
        self.inner.fsync(fh)
    }
    /// Modes 0 and FALLOC_FL_KEEP_SIZE (others: EOPNOTSUPP).
    pub fn fallocate(
        &self,
        ino: Ino,
        fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> VfsResult<()> {
        self.inner.fallocate(ino, fh, offset, length, mode)
    }
    #[allow(clippy::too_many_arguments)]
    pub fn copy_file_range(
        &self,
        ino_in: Ino,
        fh_in: u64,
        off_in: u64,
        ino_out: Ino,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> VfsResult<u64> {
        self.inner
            .copy_file_range(ino_in, fh_in, off_in, ino_out, fh_out, off_out, len)
    }

    pub fn opendir(&self, ctx: &Ctx, ino: Ino, flags: i32) -> VfsResult<u64> {
        self.inner.opendir(ctx, ino, flags)
    }
    /// Entries after `offset` (0 = from the start, including "." and ".."), at most `limit`.
    pub fn readdir(
        &self,
        ino: Ino,
        fh: u64,
        offset: u64,
        limit: usize,
        plus: bool,
    ) -> VfsResult<Vec<DirEntryPlus>> {
        self.inner.readdir(ino, fh, offset, limit, plus)
    }
    pub fn releasedir(&self, _ino: Ino, fh: u64) -> VfsResult<()> {
        self.inner.releasedir(fh)
    }
    /// Directory changes are committed by each operation already: nothing to do.
    pub fn fsyncdir(&self, _ino: Ino, fh: u64) -> VfsResult<()> {
        self.inner.registry.handle(fh).map(drop)
    }
    pub fn statfs(&self) -> VfsResult<StatFs> {
        self.inner.statfs()
    }

    pub fn setxattr(
        &self,
        _ctx: &Ctx,
        ino: Ino,
        name: &[u8],
        value: &[u8],
        flags: i32,
    ) -> VfsResult<()> {
        self.inner.setxattr(ino, name, value, flags)
    }
    pub fn getxattr(&self, ino: Ino, name: &[u8]) -> VfsResult<Vec<u8>> {
        self.inner.getxattr(ino, name)
    }
    pub fn listxattr(&self, ino: Ino) -> VfsResult<Vec<u8>> {
        self.inner.listxattr(ino)
    }
    pub fn removexattr(&self, _ctx: &Ctx, ino: Ino, name: &[u8]) -> VfsResult<()> {
        self.inner.removexattr(ino, name)
    }

    pub fn getlk(
        &self,
        ino: Ino,
        _fh: u64,
        lock_owner: u64,
        range: LockRange,
    ) -> VfsResult<Option<LockRange>> {
        self.inner.getlk(ino, lock_owner, range)
    }
    /// `sleep`: wait until the lock can be taken (F_SETLKW); EAGAIN otherwise.
    pub fn setlk(
        &self,
        ino: Ino,
        fh: u64,
        lock_owner: u64,
        range: LockRange,
        sleep: bool,
    ) -> VfsResult<()> {
        self.inner.setlk(ino, fh, lock_owner, range, sleep)
    }
    /// flock(2) (LOCK_SH/EX/UN as Read/Write/Unlock); `sleep` unless LOCK_NB.
    pub fn flock(
        &self,
        ino: Ino,
        fh: u64,
        _lock_owner: u64,
        kind: LockKind,
        sleep: bool,
    ) -> VfsResult<()> {
        self.inner.flock(ino, fh, kind, sleep)
    }

    /// Registers the adapter's callback for kernel cache invalidations (changes made by other
    /// mounts of the volume, or by this mount's background work).
    pub fn set_invalidator(&self, f: Box<dyn Fn(Invalidation) + Send + Sync>) {
        self.inner.set_invalidator(f)
    }
}

/// Offline maintenance on a volume that may or may not be mounted elsewhere.
pub mod maintenance {
    /// `cellar fsck`: metadata invariants plus metadata ↔ objects consistency (missing objects of
    /// live slices; leaked objects that no slice references). With `repair`, fixes what it can.
    pub fn fsck(config: &super::VolumeConfig, repair: bool) -> anyhow::Result<Vec<String>> {
        crate::maintenance_impl::fsck(config, repair)
    }
    /// `cellar gc`: compacts fragmented chunks and deletes garbage objects older than the grace
    /// period (and, with `delete_leaked`, objects no slice references). Returns (deleted objects,
    /// compacted chunks).
    pub fn gc(
        config: &super::VolumeConfig,
        grace: std::time::Duration,
        delete_leaked: bool,
    ) -> anyhow::Result<(u64, u64)> {
        crate::maintenance_impl::gc(config, grace, delete_leaked)
    }
    /// Formats a new volume (metadata + store probe) without mounting it; idempotent.
    pub fn format(config: &super::VolumeConfig) -> anyhow::Result<()> {
        crate::maintenance_impl::format(config)
    }
    /// Deletes every object and all metadata of a volume (volume deletion by the server).
    pub fn destroy(config: &super::VolumeConfig) -> anyhow::Result<()> {
        crate::maintenance_impl::destroy(config)
    }
}
