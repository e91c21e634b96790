//! The metadata engine of a volume: inodes, directory entries, file layouts (chunks of slices, or
//! inline bytes), xattrs, locks, sessions and usage counters.
//!
//! Every method of [`MetaEngine`] is one transaction. The trait is engine-neutral: one SQL
//! implementation ([`sql::SqlEngine`]) serves SQLite (the embedded default, one file per volume)
//! and PostgreSQL (one schema per volume in a shared database, for volumes mounted on many
//! hosts). Permission checks are not done here (the kernel does them with
//! `default_permissions`; the vfs does the rest); this layer enforces namespace invariants only.

mod error;
pub mod sql;
pub mod testing;
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
    /// Registers a mount (or other client) session; locks and sustained inodes belong to it. Its
    /// first heartbeat is stamped with the engine's clock (`info.now_ns` is its start time, as the
    /// caller saw it).
    fn open_session(&self, info: &SessionInfo) -> Result<SessionId>;
    /// Refreshes the session's heartbeat, stamped with the engine's clock (never the caller's: the
    /// sessions of many hosts are compared with each other). `MetaError::Posix(ESTALE)` if the
    /// session is gone (it was reaped as stale): its locks and sustained inodes were dropped.
    fn heartbeat(&self, session: SessionId) -> Result<()>;
    /// Ends a session: drops its locks, deletes its sustained inodes that have no links.
    fn close_session(&self, session: SessionId) -> Result<()>;
    /// Closes every session whose heartbeat is older than `max_age_ns` by the engine's clock (a
    /// crashed mount), except `exclude` (the caller's own session: a mount whose heartbeat was
    /// merely delayed must not drop its own locks); returns how many were closed.
    fn reap_stale_sessions(&self, max_age_ns: i64, exclude: Option<SessionId>) -> Result<usize>;
    /// Sessions whose heartbeat is younger than `max_age_ns` (mounts that may be writing).
    fn live_sessions(&self, max_age_ns: i64) -> Result<Vec<SessionId>>;
    /// The sessions recorded with exactly this `host` and `mount_point`, with their pids: a new
    /// mount finds those of earlier mounts at its mount point that crashed, to close them at once
    /// rather than after their heartbeats expire.
    fn sessions_at(&self, host: &str, mount_point: &str) -> Result<Vec<(SessionId, u32)>>;
    /// Takes or renews the lease `name` for `session` for `ttl_ns` (one owner of background work
    /// per volume, such as gc). Returns false while another session holds an unexpired lease.
    fn try_lease(&self, name: &str, session: SessionId, ttl_ns: i64) -> Result<bool>;

    // ---- open files ----
    /// Records that this engine's caller opened `ino` (once per handle) and returns its
    /// attributes. While any session (any mount, on any host) has an inode open, removing its
    /// last link keeps it instead of freeing it: the engine decides "still open" itself and never
    /// asks its caller.
    fn open_file(&self, session: SessionId, ino: Ino) -> Result<Attr>;
    /// Undoes one [`MetaEngine::open_file`]. The last close is recorded lazily, by the next
    /// [`MetaEngine::commit_closes`] (one transaction for all of them; an open before then needs
    /// no write): until then the inode counts as open. The recorded last close, by the last
    /// session that has it open, of an inode that lost its last link frees it.
    fn close_file(&self, session: SessionId, ino: Ino) -> Result<()>;
    /// Records the last closes since the previous call; returns how many. The caller calls it
    /// periodically (an unlinked inode is freed that much later).
    fn commit_closes(&self) -> Result<usize>;

    // ---- namespace ----
    fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr>;
    fn getattr(&self, ino: Ino) -> Result<Attr>;
    /// Changes mode/uid/gid/times (not size: see [`MetaEngine::truncate`]); sets ctime.
    fn setattr(&self, ino: Ino, changes: &SetAttr, now_ns: i64) -> Result<Attr>;
    /// Creates a regular file, directory, symlink, fifo, socket or device node.
    /// `Exists` if the name is taken; `NotDir` if parent is not a directory.
    fn create_node(&self, parent: Ino, name: &[u8], node: &NewNode, now_ns: i64) -> Result<Attr>;
    /// [`MetaEngine::create_node`] and [`MetaEngine::open_file`] of the new inode by `session`,
    /// in one transaction (`open(O_CREAT)`).
    fn create_open(
        &self,
        session: SessionId,
        parent: Ino,
        name: &[u8],
        node: &NewNode,
        now_ns: i64,
    ) -> Result<Attr>;
    /// Hard link; `Perm`-style errors (directories) are `MetaError::Posix(EPERM)`.
    fn link(&self, ino: Ino, new_parent: Ino, new_name: &[u8], now_ns: i64) -> Result<Attr>;
    /// Removes a non-directory entry. When the inode's last link goes while it is open (see
    /// [`MetaEngine::open_file`]), the inode is kept until its last close; otherwise its data is
    /// freed. Returns `Some(ino)` when this removed the inode's last link (it is now freed or
    /// kept for its openers), `None` when other hard links remain.
    fn unlink(&self, parent: Ino, name: &[u8], now_ns: i64) -> Result<Option<Ino>>;
    /// Removes an empty directory (`NotEmpty` otherwise).
    fn rmdir(&self, parent: Ino, name: &[u8], now_ns: i64) -> Result<Ino>;
    /// Atomic rename with RENAME_NOREPLACE / RENAME_EXCHANGE; refuses to move a directory into its
    /// own subtree (EINVAL). A replaced inode that loses its last link is handled as in `unlink`.
    fn rename(&self, req: &Rename<'_>, now_ns: i64) -> Result<RenameOutcome>;
    fn readlink(&self, ino: Ino) -> Result<Vec<u8>>;
    /// Entries of a directory with cookie strictly greater than `after`, in cookie order, at most
    /// `limit`. Cookies are stable: an entry keeps its cookie until removed, new entries get larger
    /// ones. Cookies start above 2 (0..=2 are reserved for the caller's "." and "..").
    /// With `plus`, each entry carries its attributes.
    fn readdir(&self, dir: Ino, after: u64, limit: usize, plus: bool) -> Result<Vec<DirEntry>>;
    /// Held bytes and inodes of the volume (see [`Usage`]), from counters (no tree walk).
    fn usage(&self) -> Result<Usage>;
    /// The volume's byte quota, if any: commits that would take the held bytes past it fail
    /// with `Posix(EDQUOT)` (shrinking and overwriting writes never do).
    fn quota(&self) -> Result<Option<u64>>;
    /// Sets or (`None`) removes the quota. Every engine of the volume enforces it from its
    /// next commit on. A quota below the usage refuses growth until enough is freed.
    fn set_quota(&self, bytes: Option<u64>) -> Result<()>;

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
    /// What a read needs, from one snapshot: the attributes (with the data version) and, unless
    /// the data version still equals `known_version`, the content: the inline bytes, or the
    /// slices of chunks `chunks` (empty chunks included, as empty lists).
    fn read_layout(
        &self,
        ino: Ino,
        chunks: std::ops::Range<u64>,
        known_version: Option<u64>,
    ) -> Result<Layout>;
    /// Slices of one chunk in commit order (later ones shadow earlier ones).
    fn read_chunk(&self, ino: Ino, chunk: u64) -> Result<Vec<Slice>>;
    /// Writes `extents` (in write order, later ones win) into the inline bytes of a small file,
    /// merging them with the stored bytes inside the transaction, and sets mtime, ctime and the
    /// size (at least the end of the last byte written). Returns `None` and changes nothing when
    /// the file's data lives in chunks or the result would pass the inline threshold: the caller
    /// then writes slices. `then` (attribute changes made after the writes, possibly none) is
    /// applied in the same transaction, as [`MetaEngine::setattr`] would.
    fn write_inline(
        &self,
        ino: Ino,
        extents: &[(u64, &[u8])],
        then: &SetAttr,
        now_ns: i64,
    ) -> Result<Option<Attr>>;
    /// Appends slices to chunks and grows the size to at least `min_size`; sets mtime, ctime.
    /// Every non-hole slice must have been recorded as a pending upload (see
    /// [`MetaEngine::add_garbage`]); if one's row is gone (gc deleted its objects after it
    /// expired), the call fails with `MetaError::Conflict` and changes nothing.
    /// `inline_version`: the slices carry the file's inline bytes as they were at that data
    /// version; they are dropped if the version is unchanged, otherwise the call fails with
    /// `MetaError::Conflict` (another writer changed them). Without it, non-empty inline bytes
    /// make the call fail with `Conflict` rather than lose them.
    /// Returns the new attributes and the slice count of each chunk written to.
    fn commit_slices(
        &self,
        ino: Ino,
        slices: &[(u64, Slice)],
        min_size: u64,
        inline_version: Option<u64>,
        now_ns: i64,
    ) -> Result<Committed>;
    /// Sets the size: shrinking frees whole chunks past the end and shadows the tail of the last one
    /// with a hole slice; growing leaves a hole (reads as zeros). Inline files are cut or zero-padded
    /// while they stay at or below the threshold. An inline file truncated to a size above the
    /// threshold stays inline: its blob is cut to at most `size` bytes and the rest reads as zeros
    /// (see [`MetaEngine::read_inline`]); the caller moves it to chunks before writing past the
    /// threshold. Truncating a chunked file to 0 makes it inline (empty) again.
    fn truncate(&self, ino: Ino, size: u64, now_ns: i64) -> Result<Attr>;
    /// Copies `[offset, offset + len)` of `src` (clipped to its size) to `dst_offset` of `dst`
    /// without copying bytes: the destination's chunks reference the source's stored slices
    /// (a slice's objects are deleted only once no chunk of any file references it), and the
    /// source's holes become holes. Grows the destination to at least the end of the copy, sets
    /// its mtime and ctime, bumps its data version and counts the copied data in its held bytes
    /// (EDQUOT past the quota). `None`, changing nothing, when either file keeps inline bytes
    /// (an empty destination does not count): the caller copies those bytes.
    #[allow(clippy::too_many_arguments)]
    fn copy_range(
        &self,
        src: Ino,
        offset: u64,
        dst: Ino,
        dst_offset: u64,
        len: u64,
        now_ns: i64,
    ) -> Result<Option<CopiedRange>>;
    /// Makes `[offset, offset + len)` read as zeros (FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE):
    /// hole slices that hold nothing (inline bytes are zeroed in place), and unless `keep_size`
    /// grows the size to the end of the range. Sets mtime and ctime, bumps the data version.
    fn zero_range(
        &self,
        ino: Ino,
        offset: u64,
        len: u64,
        keep_size: bool,
        now_ns: i64,
    ) -> Result<Committed>;
    /// The first chunk at or after `from` with a slice that stores data (a hint for
    /// SEEK_DATA: that chunk may still read as zeros where holes shadow it).
    fn next_data_chunk(&self, ino: Ino, from: u64) -> Result<Option<u64>>;
    /// Reserves `count` (at least 1) consecutive slice ids; returns the first. Ids start at 1.
    fn alloc_slice_ids(&self, count: u64) -> Result<u64>;

    // ---- maintenance: compaction, garbage collection, fsck ----
    /// Chunks whose slices read from at least `min_slices` stored objects (a hole counting as
    /// one), at most `limit`.
    fn fragmented_chunks(&self, min_slices: usize, limit: usize) -> Result<Vec<(Ino, u64)>>;
    /// Replaces the first `expected.len()` slices of a chunk by `new` (at most as many) if the
    /// chunk's slice list still starts with exactly `expected`; slices committed after them are
    /// kept, after the new ones. The replaced slices become garbage. Returns false (and changes
    /// nothing) if the chunk changed otherwise meanwhile, or a slice of `new` is no longer a
    /// pending upload (as in [`MetaEngine::commit_slices`]).
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
    /// Every slice referenced by a chunk and every garbage slice, from one snapshot (fsck and
    /// leak detection must not see a slice move from one to the other in between).
    fn slice_references(&self) -> Result<SliceReferences>;
    /// Checks internal invariants (link counts, dangling entries, parent pointers, usage counters).
    /// With `repair`, fixes what can be fixed. Returns the problems found.
    fn check(&self, repair: bool) -> Result<Vec<String>>;

    // ---- forks and snapshots (see `sql::fork`) ----
    /// The volumes whose objects hold some of this volume's slices, in ascending order of
    /// bound (empty unless the volume is a fork or a snapshot).
    fn lineage(&self) -> Result<Vec<Ancestor>>;
    /// Whether the volume is a snapshot: every mount of it is read-only.
    fn read_only(&self) -> Result<bool>;
    /// Copies this volume's committed metadata (what writers closed or fsynced; buffered
    /// writes of live mounts are not in it), in one transaction, into the new, empty volume at
    /// `target_url` (the same engine: a SQLite file, or a schema of the same PostgreSQL
    /// database), which then shares every stored object of this volume; no object is copied.
    /// Registers the fork as a descendant: this volume's gc keeps every object the fork may
    /// reference until [`MetaEngine::release_fork`].
    fn fork(&self, target_url: &str, fork: &ForkSpec) -> Result<ForkStats>;
    /// Forgets the descendant named `volume` (it was deleted); true if it was registered.
    fn release_fork(&self, volume: &str) -> Result<bool>;
    /// Names of the volumes forked from this one that are not released.
    fn forks(&self) -> Result<Vec<String>>;
    /// Bytes of the stored objects that only this volume references: its own slices above
    /// every fork's frozen bound (what deleting it frees in the store).
    fn exclusive_bytes(&self) -> Result<u64>;

    /// Makes every transaction committed so far durable (survives a power loss). fsync and close
    /// call it before they return; concurrent callers share one flush of the log.
    fn sync(&self) -> Result<()>;

    // ---- locks (held across mounts: every mount of the volume shares this engine) ----
    /// POSIX byte-range lock test: the first conflicting lock, if any.
    fn getlk(&self, ino: Ino, owner: LockOwner, range: &LockRange) -> Result<Option<LockRange>>;
    /// POSIX byte-range set/unlock (splits and merges ranges as POSIX requires). Returns false if a
    /// conflicting lock is held by another owner.
    fn setlk(&self, ino: Ino, owner: LockOwner, range: &LockRange) -> Result<bool>;
    /// Drops every lock `owner` holds on `ino` (close of a descriptor drops POSIX locks).
    fn unlock_all(&self, ino: Ino, owner: LockOwner) -> Result<()>;

    // ---- change log (every mount of the volume follows it to invalidate its caches) ----
    /// Random per engine instance; stamped on every change its transactions commit.
    fn origin(&self) -> u64;
    /// Highest seq in the log (0 if empty): where a new watcher starts.
    fn last_change(&self) -> Result<u64>;
    /// Committed changes with seq > after, ascending, at most `limit`; `Lost` if changes after
    /// `after` were trimmed (the watcher must then drop all its caches and restart at
    /// [`MetaEngine::last_change`]).
    fn changes_since(&self, after: u64, limit: usize) -> Result<ChangeBatch>;
    /// [`MetaEngine::changes_since`] as events on paths (created, removed, renamed, modified),
    /// resolved in the snapshot that read the log: a path is where the entry was when the change
    /// was made (a directory renamed or removed later in the log is taken where it was then).
    fn path_changes_since(&self, after: u64, limit: usize) -> Result<PathChangeBatch>;
    /// Returns as soon as a change with seq > after may have been committed (by any process or
    /// host), or after `timeout`.
    fn wait_for_changes(&self, after: u64, timeout: std::time::Duration) -> Result<()>;
    /// Drops changes older than `older_than_ns` by the engine's clock; returns how many.
    fn trim_changes(&self, older_than_ns: i64) -> Result<u64>;
}

/// Opens the engine named by a metadata URL:
/// - `sqlite:///abs/path/volume.db` (the file and its parent directories are created if
///   missing);
/// - `postgres://USER:PASS@HOST:PORT/DB?volume=ID` (also `postgresql://`): the volume `ID` of a
///   database that may hold many; its schema is created if missing. Every volume of one database
///   that this process opens shares one connection pool (`&pool_size=N`, default 16).
///
/// Errors never show a password.
pub fn open(url: &str) -> Result<std::sync::Arc<dyn MetaEngine>> {
    Ok(match Location::parse(url)? {
        Location::Sqlite(path) => std::sync::Arc::new(sql::SqlEngine::open_sqlite(&path)?),
        Location::Postgres(url) => std::sync::Arc::new(sql::SqlEngine::open_postgres(&url)?),
    })
}

/// Deletes the metadata of the volume named by `url` (as for [`open`]): the SQLite file with its
/// WAL, shared-memory and journal files, or the volume's PostgreSQL schema. Nothing to delete is no error.
/// No engine may be open on it any more.
pub fn destroy(url: &str) -> Result<()> {
    match Location::parse(url)? {
        Location::Sqlite(path) => {
            for suffix in ["", "-wal", "-shm", "-journal"] {
                let mut file = path.clone().into_os_string();
                file.push(suffix);
                match std::fs::remove_file(&file) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(MetaError::Engine(format!(
                            "cannot remove {}: {e}",
                            std::path::Path::new(&file).display()
                        )))
                    }
                }
            }
            Ok(())
        }
        Location::Postgres(url) => sql::destroy_postgres(&url),
    }
}

pub(crate) enum Location {
    Sqlite(std::path::PathBuf),
    Postgres(cellar_sql::PgUrl),
}

impl Location {
    pub(crate) fn parse(url: &str) -> Result<Location> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            if !path.starts_with('/') {
                return Err(MetaError::UnsupportedUrl(format!(
                    "{url}: expected sqlite:///absolute/path.db"
                )));
            }
            return Ok(Location::Sqlite(path.into()));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let url = cellar_sql::PgUrl::parse(url)
                .map_err(|e| MetaError::UnsupportedUrl(e.to_string()))?;
            return Ok(Location::Postgres(url));
        }
        let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
        Err(MetaError::UnsupportedUrl(format!(
            "{}: scheme {scheme:?} (supported: sqlite, postgres)",
            cellar_sql::redact(url)
        )))
    }
}
