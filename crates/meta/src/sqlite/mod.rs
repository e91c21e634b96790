//! The SQLite engine: one database file per volume, shared by every process that opens it (the
//! server, each `cellar mount`, `cellar fsck`).
//!
//! Concurrency: one connection guarded by a mutex runs the writing transactions of this process,
//! each as `BEGIN IMMEDIATE` so writers of different processes queue on the database lock (with a
//! busy timeout) instead of failing with `SQLITE_BUSY` halfway through. Reads run on a small pool
//! of extra connections; in WAL mode they never block the writer nor each other.
//!
//! Durability: WAL with `synchronous=NORMAL`. A committed transaction is in the WAL file (in the OS
//! page cache) before `COMMIT` returns, so it survives a crash or SIGKILL of any process, and the
//! database stays consistent whatever happens. [`MetaEngine::sync`] fsyncs the WAL, which makes
//! every transaction committed before it durable against power loss too: fsync(2) and close(2)
//! call it, and concurrent callers share one fsync (group commit), so a `git clone` pays one
//! fsync per written file rather than one per transaction (`synchronous=FULL`).
//!
//! Open files: the first open of an inode by this engine's caller records it in `open_files`
//! (one row per session), the last close removes it; unlink and rename keep an inode that any
//! session has open, inside their transaction, without calling up.
//!
//! Lock order: `open_files` → `writer` → `sync_lock`; `readers` is taken alone. None is held
//! while calling out of this crate.

mod changes;
mod check;
mod data;
mod locks;
mod namespace;
mod rows;
mod schema;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use parking_lot::Mutex;
use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use changes::Tx;

use crate::{
    Attr, ChangeBatch, Committed, DirEntry, GarbageSlice, Ino, Layout, LockOwner, LockRange,
    MetaEngine, MetaError, Rename, RenameOutcome, Result, SessionId, SessionInfo, SetAttr, Slice,
    SliceReferences, Usage, VolumeInfo, XattrMode,
};

/// How long a transaction waits for another process's write transaction before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle read connections kept open for reuse.
const IDLE_READERS: usize = 4;
/// Prepared statements cached per connection (every statement of the engine fits).
const STATEMENT_CACHE: usize = 128;
/// How often a waiter for changes polls the database's data version: another process's commit
/// is noticed within this.
const CHANGE_POLL: Duration = Duration::from_millis(2);

impl From<rusqlite::Error> for MetaError {
    fn from(e: rusqlite::Error) -> Self {
        MetaError::Engine(e.to_string())
    }
}

/// The engine's clock: session heartbeats, leases and garbage times are all stamped with it, so
/// that they are compared with each other, never with a caller's clock. A SQLite database is only
/// shared by the processes of one host, so that host's wall clock is the engine's clock.
fn wall_clock_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

pub struct SqliteEngine {
    path: PathBuf,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
    /// Format-time parameters, fixed once formatted.
    volume: OnceLock<VolumeInfo>,
    /// Held across the database update of a first open or last close, so that concurrent opens
    /// of one inode see it recorded before they return.
    open_files: Mutex<OpenFiles>,
    /// Write transactions committed, and how many of them the last WAL fsync covered.
    commits: AtomicU64,
    synced: AtomicU64,
    sync_lock: Mutex<()>,
    /// Stamped on every change this engine commits.
    origin: u64,
    /// Only polls `PRAGMA data_version`, which changes when any other connection (this
    /// process's writer included) commits.
    watcher: Mutex<Connection>,
}

/// Opens of inodes by this engine's caller: the first records the open in the database (where
/// every mount's unlink sees it), the last removes it.
type OpenFiles = HashMap<Ino, u32>;

impl SqliteEngine {
    /// Opens (creating the file and its parent directories if missing) and migrates the database.
    pub fn open(path: &Path) -> Result<SqliteEngine> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                MetaError::Engine(format!(
                    "cannot create directory {} for the metadata database: {e}",
                    dir.display()
                ))
            })?;
        }
        let mut writer = connect(path)?;
        schema::migrate(&mut writer, schema::MIGRATIONS)?;
        // The WAL's directory entry must be durable before `sync` relies on fsyncing the WAL.
        if let Some(dir) = path.parent() {
            sync_path(dir)?;
        }
        let watcher = connect(path)?;
        Ok(SqliteEngine {
            origin: uuid::Uuid::new_v4().as_u64_pair().0,
            watcher: Mutex::new(watcher),
            path: path.to_path_buf(),
            writer: Mutex::new(writer),
            readers: Mutex::new(Vec::new()),
            volume: OnceLock::new(),
            open_files: Mutex::new(OpenFiles::new()),
            commits: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            sync_lock: Mutex::new(()),
        })
    }

    /// Runs `f` as one writing transaction (`BEGIN IMMEDIATE`) that ends by appending what it
    /// changed to the change log; rolls back if it fails.
    fn write<T>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T>) -> Result<T> {
        let mut conn = self.writer.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = {
            let changes = Tx::new(&tx);
            let out = f(&changes)?;
            changes.record(self.origin)?;
            out
        };
        tx.commit()?;
        self.commits.fetch_add(1, Ordering::SeqCst);
        Ok(out)
    }

    /// Runs `f` as one read transaction: a consistent snapshot across its statements.
    fn read<T>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T>) -> Result<T> {
        let pooled = self.readers.lock().pop();
        let mut conn = match pooled {
            Some(conn) => conn,
            None => connect(&self.path)?,
        };
        let out = run_read(&mut conn, f);
        let mut idle = self.readers.lock();
        if idle.len() < IDLE_READERS {
            idle.push(conn);
        }
        out
    }

    /// The volume's parameters (cached: they never change once formatted).
    fn volume_info(&self) -> Result<&VolumeInfo> {
        if let Some(volume) = self.volume.get() {
            return Ok(volume);
        }
        let volume = self.read(namespace::stored_volume)?.ok_or_else(|| {
            MetaError::Engine(format!("{} holds no formatted volume", self.path.display()))
        })?;
        Ok(self.volume.get_or_init(|| volume))
    }

    fn data_version(&self) -> Result<i64> {
        Ok(self
            .watcher
            .lock()
            .query_row("PRAGMA data_version", [], |row| row.get(0))?)
    }
}

fn run_read<T>(conn: &mut Connection, f: impl FnOnce(&Tx<'_>) -> Result<T>) -> Result<T> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred)?;
    let out = f(&Tx::new(&tx))?;
    tx.commit()?;
    Ok(out)
}

fn sync_path(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|file| file.sync_all())
        .map_err(|e| MetaError::Engine(format!("cannot fsync {}: {e}", path.display())))
}

fn connect(path: &Path) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| {
        MetaError::Engine(format!(
            "cannot open metadata database {}: {e}",
            path.display()
        ))
    })?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(MetaError::Engine(format!(
            "{} cannot use WAL mode (got {mode})",
            path.display()
        )));
    }
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", true)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

impl MetaEngine for SqliteEngine {
    fn format(&self, volume: &VolumeInfo) -> Result<VolumeInfo> {
        self.write(|tx| namespace::format(tx, volume))
    }

    fn volume(&self) -> Result<Option<VolumeInfo>> {
        self.read(namespace::stored_volume)
    }

    fn open_session(&self, info: &SessionInfo) -> Result<SessionId> {
        self.write(|tx| namespace::open_session(tx, info))
    }

    fn heartbeat(&self, session: SessionId) -> Result<()> {
        self.write(|tx| namespace::heartbeat(tx, session, wall_clock_ns()))
    }

    fn live_sessions(&self, max_age_ns: i64) -> Result<Vec<SessionId>> {
        self.read(|tx| namespace::live_sessions(tx, wall_clock_ns(), max_age_ns))
    }

    fn try_lease(&self, name: &str, session: SessionId, ttl_ns: i64) -> Result<bool> {
        self.write(|tx| namespace::try_lease(tx, name, session, ttl_ns, wall_clock_ns()))
    }

    fn open_file(&self, session: SessionId, ino: Ino) -> Result<Attr> {
        let mut open = self.open_files.lock();
        let count = open.get(&ino).copied().unwrap_or(0);
        let attr = if count == 0 {
            self.write(|tx| namespace::open_file(tx, session, ino))?
        } else {
            self.read(|tx| rows::get_attr(tx, ino))?
        };
        open.insert(ino, count + 1);
        Ok(attr)
    }

    fn close_file(&self, session: SessionId, ino: Ino) -> Result<()> {
        let mut open = self.open_files.lock();
        match open.get_mut(&ino) {
            Some(count) if *count > 1 => {
                *count -= 1;
                Ok(())
            }
            Some(_) => {
                open.remove(&ino);
                self.write(|tx| namespace::close_file(tx, session, ino, wall_clock_ns()))
            }
            None => Ok(()),
        }
    }

    fn close_session(&self, session: SessionId) -> Result<()> {
        self.write(|tx| namespace::close_session(tx, session, wall_clock_ns()))
    }

    fn reap_stale_sessions(&self, max_age_ns: i64, exclude: Option<SessionId>) -> Result<usize> {
        self.write(|tx| namespace::reap_stale_sessions(tx, wall_clock_ns(), max_age_ns, exclude))
    }

    fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr> {
        self.read(|tx| namespace::lookup(tx, parent, name))
    }

    fn getattr(&self, ino: Ino) -> Result<Attr> {
        self.read(|tx| rows::get_attr(tx, ino))
    }

    fn setattr(&self, ino: Ino, changes: &SetAttr, now_ns: i64) -> Result<Attr> {
        self.write(|tx| namespace::setattr(tx, ino, changes, now_ns))
    }

    fn create_node(
        &self,
        parent: Ino,
        name: &[u8],
        node: &crate::NewNode,
        now_ns: i64,
    ) -> Result<Attr> {
        self.write(|tx| namespace::create_node(tx, parent, name, node, now_ns))
    }

    fn link(&self, ino: Ino, new_parent: Ino, new_name: &[u8], now_ns: i64) -> Result<Attr> {
        self.write(|tx| namespace::link(tx, ino, new_parent, new_name, now_ns))
    }

    fn unlink(&self, parent: Ino, name: &[u8], now_ns: i64) -> Result<Option<Ino>> {
        self.write(|tx| namespace::unlink(tx, parent, name, now_ns))
    }

    fn rmdir(&self, parent: Ino, name: &[u8], now_ns: i64) -> Result<Ino> {
        self.write(|tx| namespace::rmdir(tx, parent, name, now_ns))
    }

    fn rename(&self, req: &Rename<'_>, now_ns: i64) -> Result<RenameOutcome> {
        self.write(|tx| namespace::rename(tx, req, now_ns))
    }

    fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        self.read(|tx| namespace::readlink(tx, ino))
    }

    fn readdir(&self, dir: Ino, after: u64, limit: usize, plus: bool) -> Result<Vec<DirEntry>> {
        self.read(|tx| namespace::readdir(tx, dir, after, limit, plus))
    }

    fn usage(&self) -> Result<Usage> {
        self.read(namespace::usage)
    }

    fn get_xattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>> {
        self.read(|tx| namespace::get_xattr(tx, ino, name))
    }

    fn list_xattr(&self, ino: Ino) -> Result<Vec<Vec<u8>>> {
        self.read(|tx| namespace::list_xattr(tx, ino))
    }

    fn set_xattr(
        &self,
        ino: Ino,
        name: &[u8],
        value: &[u8],
        mode: XattrMode,
        now_ns: i64,
    ) -> Result<()> {
        self.write(|tx| namespace::set_xattr(tx, ino, name, value, mode, now_ns))
    }

    fn remove_xattr(&self, ino: Ino, name: &[u8], now_ns: i64) -> Result<()> {
        self.write(|tx| namespace::remove_xattr(tx, ino, name, now_ns))
    }

    fn read_layout(
        &self,
        ino: Ino,
        chunks: std::ops::Range<u64>,
        known_version: Option<u64>,
    ) -> Result<Layout> {
        self.read(|tx| data::read_layout(tx, ino, chunks, known_version))
    }

    fn read_chunk(&self, ino: Ino, chunk: u64) -> Result<Vec<Slice>> {
        self.read(|tx| data::read_chunk(tx, ino, chunk))
    }

    fn write_inline(
        &self,
        ino: Ino,
        extents: &[(u64, &[u8])],
        now_ns: i64,
    ) -> Result<Option<Attr>> {
        let volume = self.volume_info()?;
        self.write(|tx| data::write_inline(tx, volume, ino, extents, now_ns))
    }

    fn commit_slices(
        &self,
        ino: Ino,
        slices: &[(u64, Slice)],
        min_size: u64,
        inline_version: Option<u64>,
        now_ns: i64,
    ) -> Result<Committed> {
        let volume = self.volume_info()?;
        self.write(|tx| {
            data::commit_slices(tx, volume, ino, slices, min_size, inline_version, now_ns)
        })
    }

    fn truncate(&self, ino: Ino, size: u64, now_ns: i64) -> Result<Attr> {
        let volume = self.volume_info()?;
        self.write(|tx| data::truncate(tx, volume, ino, size, now_ns))
    }

    fn alloc_slice_ids(&self, count: u64) -> Result<u64> {
        self.write(|tx| data::alloc_slice_ids(tx, count))
    }

    fn fragmented_chunks(&self, min_slices: usize, limit: usize) -> Result<Vec<(Ino, u64)>> {
        self.read(|tx| data::fragmented_chunks(tx, min_slices, limit))
    }

    fn replace_chunk(
        &self,
        ino: Ino,
        chunk: u64,
        expected: &[Slice],
        new: &[Slice],
    ) -> Result<bool> {
        self.write(|tx| data::replace_chunk(tx, ino, chunk, expected, new, wall_clock_ns()))
    }

    fn garbage_slices(&self, before_ns: i64, limit: usize) -> Result<Vec<GarbageSlice>> {
        self.read(|tx| data::garbage_slices(tx, before_ns, limit))
    }

    fn forget_garbage(&self, ids: &[u64]) -> Result<()> {
        self.write(|tx| data::forget_garbage(tx, ids))
    }

    fn add_garbage(&self, slices: &[GarbageSlice], now_ns: i64) -> Result<()> {
        self.write(|tx| data::add_garbage(tx, slices, now_ns))
    }

    fn slice_references(&self) -> Result<SliceReferences> {
        self.read(data::slice_references)
    }

    fn sync(&self) -> Result<()> {
        let target = self.commits.load(Ordering::SeqCst);
        let _syncing = self.sync_lock.lock();
        if self.synced.load(Ordering::SeqCst) >= target {
            return Ok(()); // another caller's fsync, started after our commit, covered it
        }
        let covered = self.commits.load(Ordering::SeqCst);
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        let wal = PathBuf::from(wal);
        // Without a WAL (never written, or removed at the last close) everything is in the
        // database file itself.
        sync_path(if wal.exists() { &wal } else { &self.path })?;
        self.synced.store(covered, Ordering::SeqCst);
        Ok(())
    }

    fn check(&self, repair: bool) -> Result<Vec<String>> {
        if repair {
            self.write(|tx| check::check(tx, true, wall_clock_ns()))
        } else {
            self.read(|tx| check::check(tx, false, wall_clock_ns()))
        }
    }

    fn getlk(&self, ino: Ino, owner: LockOwner, range: &LockRange) -> Result<Option<LockRange>> {
        self.read(|tx| locks::getlk(tx, ino, owner, range))
    }

    fn setlk(&self, ino: Ino, owner: LockOwner, range: &LockRange) -> Result<bool> {
        self.write(|tx| locks::setlk(tx, ino, owner, range))
    }

    fn unlock_all(&self, ino: Ino, owner: LockOwner) -> Result<()> {
        self.write(|tx| locks::unlock_all(tx, ino, owner))
    }

    fn origin(&self) -> u64 {
        self.origin
    }

    fn last_change(&self) -> Result<u64> {
        self.read(|tx| changes::last_change(tx))
    }

    fn changes_since(&self, after: u64, limit: usize) -> Result<ChangeBatch> {
        self.read(|tx| changes::changes_since(tx, after, limit))
    }

    fn wait_for_changes(&self, after: u64, timeout: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            // Read the version before the log: a commit after this read changes the version.
            let version = self.data_version()?;
            if self.last_change()? > after {
                return Ok(());
            }
            loop {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Ok(());
                }
                std::thread::sleep(left.min(CHANGE_POLL));
                if self.data_version()? != version {
                    break;
                }
            }
        }
    }

    fn trim_changes(&self, older_than_ns: i64) -> Result<u64> {
        self.write(|tx| changes::trim_changes(tx, older_than_ns))
    }
}
