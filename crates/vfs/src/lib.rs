//! POSIX semantics of a volume over the metadata engine and the block store, independent of FUSE.
//!
//! THIS FILE IS THE CONTRACT between `cellar-vfs` and its callers (`cellar-fuse`, `cellar-cli`).
//! The signatures below are fixed; the work happens in the modules.
//!
//! Layout: [`backend`] holds the backends (metadata engine, block store, the one async runtime);
//! [`read_path`], [`compaction`] and [`gc`] the paths over committed data that need only them;
//! [`volume`] a mounted volume (session, registry of handles and dirty inodes), run by the
//! threads of [`background`]; [`flush`] turns buffered writes into inline bytes or slices;
//! [`namespace`], [`io`] and [`locks`] implement the operations; [`maintenance`] is offline
//! fsck/gc/destroy.
//!
//! # Lock order
//! Every path takes locks in this order and never the other way:
//! 1. `FileState::flush_lock` (one inode's flushes, in write order). The only lock held across
//!    metadata transactions and store requests; a FUSE request that waits on it (fsync, close)
//!    waits for exactly that flush. Never taken while holding any lock below.
//! 2. `Registry` maps (handles, files), then
//! 3. `FileState::data`, `FileState::layout`, `Inner::seen` — leaves: held for memory work only,
//!    never across a metadata or store call, never while taking another lock.
//!
//! The metadata engine and the store never call back into this crate: what the engine must know
//! ("is this inode still open here?") it keeps itself (`MetaEngine::open_file`).

use cellar_metrics::{fs_request, FsOp};
use std::sync::Arc;

mod backend;
mod background;
mod change_feed;
mod compaction;
mod errno;
mod flush;
mod gc;
mod handles;
mod intervals;
mod io;
mod locks;
pub mod maintenance;
mod namespace;
mod quota;
mod read_path;
mod spool;
mod volume;
mod write_buffer;

/// Largest file size (1 PiB); larger writes and truncates fail with EFBIG.
pub(crate) const MAX_FILE_SIZE: u64 = 1 << 50;

pub use cellar_meta::{Attr, FileKind, Ino, LockKind, LockRange, RenameMode, ROOT_INO};
pub use cellar_store::StoreTimeouts;
pub use spool::{Replayed, Unflushed};

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
    /// Bounds of the object store's requests and operations.
    pub store_timeouts: StoreTimeouts,
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

/// A granted lock (or an unlock).
#[derive(Debug, PartialEq, Eq)]
pub struct LockReply {
    /// False when the kernel's attributes and pages of the file may predate a change another
    /// mount committed before it released the lock (its push may not have arrived yet): the
    /// caller must drop them before the lock holder reads. Lock-then-read is a sync point, as
    /// open is.
    pub keep_cache: bool,
}

pub struct DirEntryPlus {
    pub ino: Ino,
    /// Offset to pass back to continue after this entry (stable while the directory changes).
    pub offset: u64,
    pub kind: FileKind,
    pub name: Vec<u8>,
    pub attr: Option<Attr>,
    /// Whether the inode has extended attributes, when read with its attributes.
    pub xattrs: Option<bool>,
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
    /// Attributes and page cache of one inode.
    Inode(Ino),
    /// One directory entry (a name added, removed or replaced).
    Entry { parent: Ino, name: Vec<u8> },
    /// Everything the kernel caches: this mount missed changes it cannot name.
    All,
}

/// The contract. A facade over [`volume::Inner`] because the background threads hold the volume
/// by a weak reference: dropping the last `Vfs` stops them even though they share the state.
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
        let inner = volume::Inner::open_volume(&config)?;
        background::start(&inner)?;
        Ok(Arc::new(Vfs { inner }))
    }
    /// Whether the volume is a snapshot: every change is refused with EROFS (mounts of it are
    /// read-only).
    pub fn is_snapshot(&self) -> bool {
        self.inner.core.read_only
    }

    /// Flushes everything, ends the session; fails if anything could not be flushed.
    pub fn shutdown(&self) -> anyhow::Result<()> {
        let unflushed = self.inner.shutdown_within(std::time::Duration::MAX, None)?;
        anyhow::ensure!(
            unflushed.is_empty(),
            "{} file(s) could not be flushed; their last writes are lost",
            unflushed.len()
        );
        Ok(())
    }

    /// Flushes what it can within `bound` (plus one store operation under way), keeps the rest
    /// in `spool_dir` (replayed by the next mount, see [`Vfs::replay_spool`]) and ends the
    /// session. Returns what could not be flushed.
    pub fn shutdown_within(
        &self,
        bound: std::time::Duration,
        spool_dir: Option<&std::path::Path>,
    ) -> anyhow::Result<Vec<Unflushed>> {
        self.inner.shutdown_within(bound, spool_dir)
    }

    /// Applies the writes an earlier mount of this volume spooled under `spool_dir` at its
    /// shutdown (before serving anything).
    pub fn replay_spool(&self, spool_dir: &std::path::Path) -> anyhow::Result<Replayed> {
        self.inner.replay_spool(spool_dir)
    }

    pub fn lookup(&self, _ctx: &Ctx, parent: Ino, name: &[u8]) -> VfsResult<Attr> {
        fs_request(FsOp::Lookup, || self.inner.lookup(parent, name))
    }
    /// Drop kernel references (lets the vfs forget cached state).
    pub fn forget(&self, ino: Ino, _nlookup: u64) {
        let _ = fs_request(FsOp::Forget, || {
            self.inner.forget_seen(ino);
            Ok::<_, Errno>(())
        });
    }
    pub fn getattr(&self, ino: Ino) -> VfsResult<Attr> {
        fs_request(FsOp::Getattr, || self.inner.getattr(ino))
    }
    pub fn setattr(&self, ctx: &Ctx, ino: Ino, req: SetAttrRequest) -> VfsResult<Attr> {
        fs_request(FsOp::Setattr, || {
            self.inner.writable()?;
            self.inner.setattr(ctx, ino, req)
        })
    }
    pub fn readlink(&self, ino: Ino) -> VfsResult<Vec<u8>> {
        fs_request(FsOp::Readlink, || self.inner.readlink(ino))
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
        fs_request(FsOp::Mknod, || {
            self.inner.writable()?;
            self.inner.mknod(ctx, parent, name, mode, umask, rdev)
        })
    }
    pub fn mkdir(
        &self,
        ctx: &Ctx,
        parent: Ino,
        name: &[u8],
        mode: u32,
        umask: u32,
    ) -> VfsResult<Attr> {
        fs_request(FsOp::Mkdir, || {
            self.inner.writable()?;
            self.inner.mkdir(ctx, parent, name, mode, umask)
        })
    }
    pub fn unlink(&self, _ctx: &Ctx, parent: Ino, name: &[u8]) -> VfsResult<()> {
        fs_request(FsOp::Unlink, || {
            self.inner.writable()?;
            self.inner.unlink(parent, name)
        })
    }
    pub fn rmdir(&self, _ctx: &Ctx, parent: Ino, name: &[u8]) -> VfsResult<()> {
        fs_request(FsOp::Rmdir, || {
            self.inner.writable()?;
            self.inner.rmdir(parent, name)
        })
    }
    pub fn symlink(&self, ctx: &Ctx, parent: Ino, name: &[u8], target: &[u8]) -> VfsResult<Attr> {
        fs_request(FsOp::Symlink, || {
            self.inner.writable()?;
            self.inner.symlink(ctx, parent, name, target)
        })
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
        fs_request(FsOp::Rename, || {
            self.inner.writable()?;
            self.inner.rename(parent, name, new_parent, new_name, mode)
        })
    }
    pub fn link(&self, _ctx: &Ctx, ino: Ino, new_parent: Ino, new_name: &[u8]) -> VfsResult<Attr> {
        fs_request(FsOp::Link, || {
            self.inner.writable()?;
            self.inner.link(ino, new_parent, new_name)
        })
    }

    /// `flags` are the open(2) flags (O_TRUNC already handled by the kernel via setattr).
    pub fn open(&self, ctx: &Ctx, ino: Ino, flags: i32) -> VfsResult<OpenReply> {
        fs_request(FsOp::Open, || {
            if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
                self.inner.writable()?;
            }
            self.inner.open(ctx, ino, flags)
        })
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
        fs_request(FsOp::Create, || {
            self.inner.writable()?;
            self.inner.create(ctx, parent, name, mode, umask, flags)
        })
    }
    pub fn read(&self, _ino: Ino, fh: u64, offset: u64, size: u32) -> VfsResult<Vec<u8>> {
        fs_request(FsOp::Read, || self.inner.read(fh, offset, size))
            .inspect(|data| cellar_metrics::fs_read_bytes(data.len()))
    }
    pub fn write(&self, _ino: Ino, fh: u64, offset: u64, data: &[u8]) -> VfsResult<u32> {
        fs_request(FsOp::Write, || {
            self.inner.writable()?;
            self.inner.write(fh, offset, data)
        })
        .inspect(|written| cellar_metrics::fs_written_bytes(*written))
    }
    /// close(2) of one descriptor: uploads and commits this inode's buffered data; drops the
    /// POSIX locks of `lock_owner`.
    pub fn flush(&self, ino: Ino, fh: u64, lock_owner: u64) -> VfsResult<()> {
        fs_request(FsOp::Flush, || self.inner.flush(ino, fh, lock_owner))
    }
    /// Last close of a handle; drops the POSIX locks of `lock_owner` (the kernel names one to
    /// drop the handle's flock locks, which reach the vfs as whole-file POSIX locks).
    pub fn release(&self, ino: Ino, fh: u64, lock_owner: Option<u64>) -> VfsResult<()> {
        fs_request(FsOp::Release, || self.inner.release(ino, fh, lock_owner))
    }
    pub fn fsync(&self, _ino: Ino, fh: u64, _datasync: bool) -> VfsResult<()> {
        fs_request(FsOp::Fsync, || self.inner.fsync(fh))
    }
    /// Modes 0 and FALLOC_FL_KEEP_SIZE; FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE and
    /// FALLOC_FL_ZERO_RANGE (with or without KEEP_SIZE) make holes (others: EOPNOTSUPP).
    pub fn fallocate(
        &self,
        ino: Ino,
        fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> VfsResult<()> {
        fs_request(FsOp::Fallocate, || {
            self.inner.writable()?;
            self.inner.fallocate(ino, fh, offset, length, mode)
        })
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
        fs_request(FsOp::CopyFileRange, || {
            self.inner.writable()?;
            self.inner
                .copy_file_range(ino_in, fh_in, off_in, ino_out, fh_out, off_out, len)
        })
    }

    /// SEEK_DATA / SEEK_HOLE (`whence`): the next data or hole at or after `offset`, from the
    /// chunk maps and this mount's unflushed writes; ENXIO at or past the end of the file.
    pub fn lseek(&self, _ino: Ino, fh: u64, offset: u64, whence: i32) -> VfsResult<u64> {
        fs_request(FsOp::Lseek, || self.inner.lseek(fh, offset, whence))
    }

    pub fn opendir(&self, ctx: &Ctx, ino: Ino, flags: i32) -> VfsResult<u64> {
        fs_request(FsOp::Opendir, || self.inner.opendir(ctx, ino, flags))
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
        fs_request(FsOp::Readdir, || {
            self.inner.readdir(ino, fh, offset, limit, plus)
        })
    }
    pub fn releasedir(&self, _ino: Ino, fh: u64) -> VfsResult<()> {
        fs_request(FsOp::Releasedir, || self.inner.releasedir(fh))
    }
    /// Directory changes are committed by each operation already: makes them durable.
    pub fn fsyncdir(&self, _ino: Ino, fh: u64) -> VfsResult<()> {
        fs_request(FsOp::Fsyncdir, || {
            self.inner.registry.handle(fh)?;
            self.inner.sync_metadata()
        })
    }
    pub fn statfs(&self) -> VfsResult<StatFs> {
        fs_request(FsOp::Statfs, || self.inner.statfs())
    }

    pub fn setxattr(
        &self,
        _ctx: &Ctx,
        ino: Ino,
        name: &[u8],
        value: &[u8],
        flags: i32,
    ) -> VfsResult<()> {
        fs_request(FsOp::Setxattr, || {
            self.inner.writable()?;
            self.inner.setxattr(ino, name, value, flags)
        })
    }
    pub fn getxattr(&self, ino: Ino, name: &[u8]) -> VfsResult<Vec<u8>> {
        fs_request(FsOp::Getxattr, || self.inner.getxattr(ino, name))
    }
    pub fn listxattr(&self, ino: Ino) -> VfsResult<Vec<u8>> {
        fs_request(FsOp::Listxattr, || self.inner.listxattr(ino))
    }
    pub fn removexattr(&self, _ctx: &Ctx, ino: Ino, name: &[u8]) -> VfsResult<()> {
        fs_request(FsOp::Removexattr, || {
            self.inner.writable()?;
            self.inner.removexattr(ino, name)
        })
    }

    pub fn getlk(
        &self,
        ino: Ino,
        _fh: u64,
        lock_owner: u64,
        range: LockRange,
    ) -> VfsResult<Option<LockRange>> {
        fs_request(FsOp::Getlk, || self.inner.getlk(ino, lock_owner, range))
    }
    /// `sleep`: wait until the lock can be taken (F_SETLKW); EAGAIN otherwise.
    pub fn setlk(
        &self,
        ino: Ino,
        fh: u64,
        lock_owner: u64,
        range: LockRange,
        sleep: bool,
    ) -> VfsResult<LockReply> {
        fs_request(FsOp::Setlk, || {
            self.inner.setlk(ino, fh, lock_owner, range, sleep)
        })
    }
    /// Registers the adapter's callback for kernel cache invalidations. Today only this mount's
    /// own background work (the idle flusher's commits) uses it; changes made by other mounts
    /// are seen through the kernel's TTLs and revalidation at open (close-to-open).
    pub fn set_invalidator(&self, f: Box<dyn Fn(Invalidation) + Send + Sync>) {
        self.inner.set_invalidator(f)
    }
}
