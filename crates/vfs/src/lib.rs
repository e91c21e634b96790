//! POSIX semantics of a volume over the metadata engine and the block store, independent of FUSE.
//!
//! THIS FILE IS THE CONTRACT between `cellar-vfs` and its callers (`cellar-fuse`, `cellar-cli`).
//! The signatures below are fixed; the bodies are being written.

use std::sync::Arc;

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
    _private: Arc<()>,
}

impl Vfs {
    /// Opens (formatting if new) a volume; checks the store is reachable with the credentials.
    pub fn open_volume(config: VolumeConfig) -> anyhow::Result<Arc<Vfs>> { todo!("{config:?}") }
    /// Flushes everything, ends the session.
    pub fn shutdown(&self) -> anyhow::Result<()> { todo!() }

    pub fn lookup(&self, ctx: &Ctx, parent: Ino, name: &[u8]) -> VfsResult<Attr> { todo!("{ctx:?}{parent}{name:?}") }
    /// Drop kernel references (lets the vfs forget cached state).
    pub fn forget(&self, ino: Ino, nlookup: u64) { let _ = (ino, nlookup); }
    pub fn getattr(&self, ino: Ino) -> VfsResult<Attr> { todo!("{ino}") }
    pub fn setattr(&self, ctx: &Ctx, ino: Ino, req: SetAttrRequest) -> VfsResult<Attr> { todo!("{ctx:?}{ino}{req:?}") }
    pub fn readlink(&self, ino: Ino) -> VfsResult<Vec<u8>> { todo!("{ino}") }
    /// Regular files, fifos, sockets, devices; `mode` includes the file type bits.
    pub fn mknod(&self, ctx: &Ctx, parent: Ino, name: &[u8], mode: u32, umask: u32, rdev: u32) -> VfsResult<Attr> { todo!("{ctx:?}{parent}{name:?}{mode}{umask}{rdev}") }
    pub fn mkdir(&self, ctx: &Ctx, parent: Ino, name: &[u8], mode: u32, umask: u32) -> VfsResult<Attr> { todo!("{ctx:?}{parent}{name:?}{mode}{umask}") }
    pub fn unlink(&self, ctx: &Ctx, parent: Ino, name: &[u8]) -> VfsResult<()> { todo!("{ctx:?}{parent}{name:?}") }
    pub fn rmdir(&self, ctx: &Ctx, parent: Ino, name: &[u8]) -> VfsResult<()> { todo!("{ctx:?}{parent}{name:?}") }
    pub fn symlink(&self, ctx: &Ctx, parent: Ino, name: &[u8], target: &[u8]) -> VfsResult<Attr> { todo!("{ctx:?}{parent}{name:?}{target:?}") }
    pub fn rename(&self, ctx: &Ctx, parent: Ino, name: &[u8], new_parent: Ino, new_name: &[u8], mode: RenameMode) -> VfsResult<()> { todo!("{ctx:?}{parent}{name:?}{new_parent}{new_name:?}{mode:?}") }
    pub fn link(&self, ctx: &Ctx, ino: Ino, new_parent: Ino, new_name: &[u8]) -> VfsResult<Attr> { todo!("{ctx:?}{ino}{new_parent}{new_name:?}") }

    /// `flags` are the open(2) flags (O_TRUNC already handled by the kernel via setattr).
    pub fn open(&self, ctx: &Ctx, ino: Ino, flags: i32) -> VfsResult<OpenReply> { todo!("{ctx:?}{ino}{flags}") }
    pub fn create(&self, ctx: &Ctx, parent: Ino, name: &[u8], mode: u32, umask: u32, flags: i32) -> VfsResult<(Attr, OpenReply)> { todo!("{ctx:?}{parent}{name:?}{mode}{umask}{flags}") }
    pub fn read(&self, ino: Ino, fh: u64, offset: u64, size: u32) -> VfsResult<Vec<u8>> { todo!("{ino}{fh}{offset}{size}") }
    pub fn write(&self, ino: Ino, fh: u64, offset: u64, data: &[u8]) -> VfsResult<u32> { todo!("{ino}{fh}{offset}{data:?}") }
    /// close(2) of one descriptor: uploads and commits this inode's buffered data; drops the
    /// POSIX locks of `lock_owner`.
    pub fn flush(&self, ino: Ino, fh: u64, lock_owner: u64) -> VfsResult<()> { todo!("{ino}{fh}{lock_owner}") }
    /// Last close of a handle; drops flock locks of the handle when `flock_release`.
    pub fn release(&self, ino: Ino, fh: u64, lock_owner: Option<u64>, flock_release: bool) -> VfsResult<()> { todo!("{ino}{fh}{lock_owner:?}{flock_release}") }
    pub fn fsync(&self, ino: Ino, fh: u64, datasync: bool) -> VfsResult<()> { todo!("{ino}{fh}{datasync}") }
    /// Modes 0 and FALLOC_FL_KEEP_SIZE (others: EOPNOTSUPP).
    pub fn fallocate(&self, ino: Ino, fh: u64, offset: u64, length: u64, mode: i32) -> VfsResult<()> { todo!("{ino}{fh}{offset}{length}{mode}") }
    pub fn copy_file_range(&self, ino_in: Ino, fh_in: u64, off_in: u64, ino_out: Ino, fh_out: u64, off_out: u64, len: u64) -> VfsResult<u64> { todo!("{ino_in}{fh_in}{off_in}{ino_out}{fh_out}{off_out}{len}") }

    pub fn opendir(&self, ctx: &Ctx, ino: Ino, flags: i32) -> VfsResult<u64> { todo!("{ctx:?}{ino}{flags}") }
    /// Entries after `offset` (0 = from the start, including "." and ".."), at most `limit`.
    pub fn readdir(&self, ino: Ino, fh: u64, offset: u64, limit: usize, plus: bool) -> VfsResult<Vec<DirEntryPlus>> { todo!("{ino}{fh}{offset}{limit}{plus}") }
    pub fn releasedir(&self, ino: Ino, fh: u64) -> VfsResult<()> { todo!("{ino}{fh}") }
    pub fn fsyncdir(&self, ino: Ino, fh: u64) -> VfsResult<()> { todo!("{ino}{fh}") }
    pub fn statfs(&self) -> VfsResult<StatFs> { todo!() }

    pub fn setxattr(&self, ctx: &Ctx, ino: Ino, name: &[u8], value: &[u8], flags: i32) -> VfsResult<()> { todo!("{ctx:?}{ino}{name:?}{value:?}{flags}") }
    pub fn getxattr(&self, ino: Ino, name: &[u8]) -> VfsResult<Vec<u8>> { todo!("{ino}{name:?}") }
    pub fn listxattr(&self, ino: Ino) -> VfsResult<Vec<u8>> { todo!("{ino}") }
    pub fn removexattr(&self, ctx: &Ctx, ino: Ino, name: &[u8]) -> VfsResult<()> { todo!("{ctx:?}{ino}{name:?}") }

    pub fn getlk(&self, ino: Ino, fh: u64, lock_owner: u64, range: LockRange) -> VfsResult<Option<LockRange>> { todo!("{ino}{fh}{lock_owner}{range:?}") }
    /// `sleep`: wait until the lock can be taken (F_SETLKW); EAGAIN otherwise.
    pub fn setlk(&self, ino: Ino, fh: u64, lock_owner: u64, range: LockRange, sleep: bool) -> VfsResult<()> { todo!("{ino}{fh}{lock_owner}{range:?}{sleep}") }
    /// flock(2) (LOCK_SH/EX/UN as Read/Write/Unlock); `sleep` unless LOCK_NB.
    pub fn flock(&self, ino: Ino, fh: u64, lock_owner: u64, kind: LockKind, sleep: bool) -> VfsResult<()> { todo!("{ino}{fh}{lock_owner}{kind:?}{sleep}") }

    /// Registers the adapter's callback for kernel cache invalidations (changes made by other
    /// mounts of the volume, or by this mount's background work).
    pub fn set_invalidator(&self, f: Box<dyn Fn(Invalidation) + Send + Sync>) { let _ = f; }
}

/// Offline maintenance on a volume that may or may not be mounted elsewhere.
pub mod maintenance {
    /// `cellar fsck`: metadata invariants plus metadata ↔ objects consistency (missing objects of
    /// live slices; leaked objects that no slice references). With `repair`, fixes what it can.
    pub fn fsck(config: &super::VolumeConfig, repair: bool) -> anyhow::Result<Vec<String>> { todo!("{config:?}{repair}") }
    /// `cellar gc`: compacts fragmented chunks and deletes garbage objects older than the grace
    /// period (and, with `delete_leaked`, objects no slice references). Returns (deleted objects,
    /// compacted chunks).
    pub fn gc(config: &super::VolumeConfig, grace: std::time::Duration, delete_leaked: bool) -> anyhow::Result<(u64, u64)> { todo!("{config:?}{grace:?}{delete_leaked}") }
    /// Formats a new volume (metadata + store probe) without mounting it; idempotent.
    pub fn format(config: &super::VolumeConfig) -> anyhow::Result<()> { todo!("{config:?}") }
    /// Deletes every object and all metadata of a volume (volume deletion by the server).
    pub fn destroy(config: &super::VolumeConfig) -> anyhow::Result<()> { todo!("{config:?}") }
}
