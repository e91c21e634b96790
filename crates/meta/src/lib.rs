//! The metadata engine of a volume: inodes, directory entries, file layouts (chunks of slices, or
//! inline bytes), xattrs, locks, sessions and usage counters.
//!
//! Every method of [`MetaEngine`] is one transaction. The trait is engine-neutral: the SQLite engine
//! ([`sqlite::SqliteEngine`], the embedded default) implements it, and a PostgreSQL engine can
//! implement it without changing it. Permission checks are not done here (the kernel does them with
//! `default_permissions`; the vfs does the rest); this layer enforces namespace invariants only.

mod error;
pub mod sqlite;
mod types;

pub use error::{Errno, MetaError, Result};
pub use types::*;

/// One volume's metadata. Implementations are `Send + Sync` and safe to call from many threads.
pub trait MetaEngine: Send + Sync {
    // ---- volume and sessions ----
    /// Formats an empty engine for `volume` (creates the root directory), or returns the stored
    /// volume if it was formatted before. Fails with `MetaError::VolumeMismatch` when the engine
    /// holds another volume (different name).
    fn format(&self, volume: &VolumeInfo) -> Result<VolumeInfo>;
    /// The stored volume, if formatted.
    fn volume(&self) -> Result<Option<VolumeInfo>>;
    /// Registers a mount (or other client) session; locks and sustained inodes belong to it.
    fn open_session(&self, info: &SessionInfo) -> Result<SessionId>;
    /// Refreshes the session's heartbeat. `MetaError::Posix(ESTALE)` if the session is gone (it was
    /// reaped as stale): its locks and sustained inodes were dropped; open a new session.
    fn heartbeat(&self, session: SessionId) -> Result<()>;
    /// Ends a session: drops its locks, deletes its sustained inodes that have no links.
    fn close_session(&self, session: SessionId) -> Result<()>;
    /// Closes every session whose heartbeat is older than `max_age_ns` (a crashed mount), except
    /// `exclude` (the caller's own session: a mount whose heartbeat was merely delayed must not
    /// drop its own locks); returns how many were closed.
    fn reap_stale_sessions(
        &self,
        now_ns: i64,
        max_age_ns: i64,
        exclude: Option<SessionId>,
    ) -> Result<usize>;

    // ---- namespace ----
    fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr>;
    fn getattr(&self, ino: Ino) -> Result<Attr>;
    /// Changes mode/uid/gid/times (not size: see [`MetaEngine::truncate`]); sets ctime.
    fn setattr(&self, ino: Ino, changes: &SetAttr, now_ns: i64) -> Result<Attr>;
    /// Creates a regular file, directory, symlink, fifo, socket or device node.
    /// `Exists` if the name is taken; `NotDir` if parent is not a directory.
    fn create_node(&self, parent: Ino, name: &[u8], node: &NewNode, now_ns: i64) -> Result<Attr>;
    /// Hard link; `Perm`-style errors (directories) are `MetaError::Posix(EPERM)`.
    fn link(&self, ino: Ino, new_parent: Ino, new_name: &[u8], now_ns: i64) -> Result<Attr>;
    /// Removes a non-directory entry. When the inode's last link goes and `keep_open` is true
    /// (the caller still has it open), the inode is kept as sustained by `session` until
    /// [`MetaEngine::release_sustained`]; otherwise its data is freed.
    /// Returns `Some(ino)` when this removed the inode's last link (it is now freed or sustained),
    /// `None` when other hard links remain.
    fn unlink(
        &self,
        parent: Ino,
        name: &[u8],
        session: SessionId,
        keep_open: &dyn Fn(Ino) -> bool,
        now_ns: i64,
    ) -> Result<Option<Ino>>;
    /// Removes an empty directory (`NotEmpty` otherwise).
    fn rmdir(&self, parent: Ino, name: &[u8], now_ns: i64) -> Result<Ino>;
    /// Atomic rename with RENAME_NOREPLACE / RENAME_EXCHANGE; refuses to move a directory into its
    /// own subtree (EINVAL). A replaced inode that loses its last link is handled as in `unlink`.
    fn rename(
        &self,
        req: &Rename<'_>,
        session: SessionId,
        keep_open: &dyn Fn(Ino) -> bool,
        now_ns: i64,
    ) -> Result<RenameOutcome>;
    fn readlink(&self, ino: Ino) -> Result<Vec<u8>>;
    /// Entries of a directory with cookie strictly greater than `after`, in cookie order, at most
    /// `limit`. Cookies are stable: an entry keeps its cookie until removed, new entries get larger
    /// ones. Cookies start above 2 (0..=2 are reserved for the caller's "." and "..").
    /// With `plus`, each entry carries its attributes.
    fn readdir(&self, dir: Ino, after: u64, limit: usize, plus: bool) -> Result<Vec<DirEntry>>;
    /// Releases an inode sustained by `session`; frees it if it has no links left.
    fn release_sustained(&self, session: SessionId, ino: Ino) -> Result<()>;
    /// Used bytes and inodes of the volume.
    fn usage(&self) -> Result<Usage>;

    // ---- xattrs ----
    fn get_xattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>>;
    fn list_xattr(&self, ino: Ino) -> Result<Vec<Vec<u8>>>;
    fn set_xattr(
        &self,
        ino: Ino,
        name: &[u8],
        value: &[u8],
        mode: XattrMode,
        now_ns: i64,
    ) -> Result<()>;
    fn remove_xattr(&self, ino: Ino, name: &[u8], now_ns: i64) -> Result<()>;

    // ---- file data layout ----
    /// The file's inline bytes, or `None` if its data lives in chunks. New regular files start
    /// inline with an empty blob. The blob may be shorter than the file's size (after a truncate
    /// that grew an inline file past the inline threshold): bytes past the blob read as zeros.
    fn read_inline(&self, ino: Ino) -> Result<Option<Vec<u8>>>;
    /// Slices of one chunk in commit order (later ones shadow earlier ones).
    fn read_chunk(&self, ino: Ino, chunk: u64) -> Result<Vec<Slice>>;
    /// Replaces the whole content with inline bytes (the file must be a regular file whose size
    /// stays at or below the inline threshold); frees any chunks; sets size, mtime, ctime.
    fn write_inline(&self, ino: Ino, data: &[u8], now_ns: i64) -> Result<Attr>;
    /// Appends slices to chunks and grows the size to at least `min_size`; sets mtime, ctime.
    /// With `drop_inline`, the inline bytes are discarded (the caller wrote them out as slices).
    /// Without it, an empty inline blob is dropped silently, but non-empty inline bytes make the
    /// call fail (`MetaError::Engine`) rather than lose them.
    fn commit_slices(
        &self,
        ino: Ino,
        slices: &[(u64, Slice)],
        min_size: u64,
        drop_inline: bool,
        now_ns: i64,
    ) -> Result<Attr>;
    /// Sets the size: shrinking frees whole chunks past the end and shadows the tail of the last one
    /// with a hole slice; growing leaves a hole (reads as zeros). Inline files are cut or zero-padded
    /// while they stay at or below the threshold. An inline file truncated to a size above the
    /// threshold stays inline: its blob is cut to at most `size` bytes and the rest reads as zeros
    /// (see [`MetaEngine::read_inline`]); the caller moves it to chunks before writing past the
    /// threshold. Truncating a chunked file to 0 makes it inline (empty) again.
    fn truncate(&self, ino: Ino, size: u64, now_ns: i64) -> Result<Attr>;
    /// Reserves `count` (at least 1) consecutive slice ids; returns the first. Ids start at 1.
    fn alloc_slice_ids(&self, count: u64) -> Result<u64>;

    // ---- maintenance: compaction, garbage collection, fsck ----
    /// Chunks holding at least `min_slices` slices, at most `limit`.
    fn fragmented_chunks(&self, min_slices: usize, limit: usize) -> Result<Vec<(Ino, u64)>>;
    /// Replaces a chunk's slice list by `new` if it is still exactly `expected`; the replaced slices
    /// become garbage. Returns false (and changes nothing) if the chunk changed meanwhile.
    fn replace_chunk(
        &self,
        ino: Ino,
        chunk: u64,
        expected: &[Slice],
        new: &[Slice],
    ) -> Result<bool>;
    /// Slices no chunk references any more that became garbage before `before_ns`.
    fn garbage_slices(&self, before_ns: i64, limit: usize) -> Result<Vec<GarbageSlice>>;
    /// Forgets garbage slices whose objects were deleted.
    fn forget_garbage(&self, ids: &[u64]) -> Result<()>;
    /// Marks slices as garbage from `now_ns` on (an upload whose commit failed or lost a race),
    /// re-dating a slice already listed. Writers also record each upload *before* it starts with
    /// a `now_ns` in the future (an intent record): if the writer crashes before committing, the
    /// object is known garbage rather than leaked. [`MetaEngine::commit_slices`] and
    /// [`MetaEngine::replace_chunk`] drop the garbage rows of the slices they commit.
    fn add_garbage(&self, slices: &[GarbageSlice], now_ns: i64) -> Result<()>;
    /// Every slice referenced by a chunk (id, stored size), for fsck and leak detection.
    fn live_slices(&self) -> Result<Vec<(u64, u32)>>;
    /// Checks internal invariants (link counts, dangling entries, parent pointers, usage counters).
    /// With `repair`, fixes what can be fixed. Returns the problems found.
    fn check(&self, repair: bool) -> Result<Vec<String>>;

    // ---- locks (held across mounts: every mount of the volume shares this engine) ----
    /// BSD flock: returns false if a conflicting lock is held by another owner.
    fn flock(&self, ino: Ino, owner: LockOwner, kind: LockKind) -> Result<bool>;
    /// POSIX byte-range lock test: the first conflicting lock, if any.
    fn getlk(&self, ino: Ino, owner: LockOwner, range: &LockRange) -> Result<Option<LockRange>>;
    /// POSIX byte-range set/unlock (splits and merges ranges as POSIX requires). Returns false if a
    /// conflicting lock is held by another owner.
    fn setlk(&self, ino: Ino, owner: LockOwner, range: &LockRange) -> Result<bool>;
    /// Drops every lock `owner` holds on `ino` (close of a descriptor drops POSIX locks).
    fn unlock_all(&self, ino: Ino, owner: LockOwner) -> Result<()>;
}

/// Opens the engine named by a metadata URL: `sqlite:///abs/path/volume.db` (the file and its
/// parent directories are created if missing). Other schemes (for example `postgres://`) are
/// answered with `MetaError::UnsupportedUrl`.
pub fn open(url: &str) -> Result<std::sync::Arc<dyn MetaEngine>> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        if !path.starts_with('/') {
            return Err(MetaError::UnsupportedUrl(format!(
                "{url}: expected sqlite:///absolute/path.db"
            )));
        }
        return Ok(std::sync::Arc::new(sqlite::SqliteEngine::open(
            std::path::Path::new(path),
        )?));
    }
    let parsed =
        url::Url::parse(url).map_err(|e| MetaError::UnsupportedUrl(format!("{url}: {e}")))?;
    Err(MetaError::UnsupportedUrl(format!(
        "scheme {:?} (supported: sqlite)",
        parsed.scheme()
    )))
}
