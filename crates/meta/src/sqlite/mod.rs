//! The SQLite engine: one database file per volume, shared by every process that opens it (the
//! server, each `cellar mount`, `cellar fsck`).
//!
//! Concurrency: one connection guarded by a mutex runs the writing transactions of this process,
//! each as `BEGIN IMMEDIATE` so writers of different processes queue on the database lock (with a
//! busy timeout) instead of failing with `SQLITE_BUSY` halfway through. Reads run on a small pool
//! of extra connections; in WAL mode they never block the writer nor each other.
//!
//! Durability: WAL with `synchronous=NORMAL`. A committed transaction is in the WAL file (in the OS
//! page cache) before `COMMIT` returns, so it survives a crash or SIGKILL of any process; only a
//! power loss or kernel crash can roll back the last transactions, and even then the database
//! stays consistent. That is the guarantee Cellar promises for metadata; `FULL` would add an fsync
//! to every create of a `git clone`.

mod check;
mod data;
mod locks;
mod namespace;
mod schema;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use parking_lot::Mutex;
use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior};

use crate::{
    Attr, DirEntry, GarbageSlice, Ino, LockKind, LockOwner, LockRange, MetaEngine, MetaError,
    Rename, RenameOutcome, Result, SessionId, SessionInfo, SetAttr, Slice, Usage, VolumeInfo,
    XattrMode,
};

/// How long a transaction waits for another process's write transaction before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle read connections kept open for reuse.
const IDLE_READERS: usize = 4;
/// Prepared statements cached per connection (every statement of the engine fits).
const STATEMENT_CACHE: usize = 128;

impl From<rusqlite::Error> for MetaError {
    fn from(e: rusqlite::Error) -> Self {
        MetaError::Engine(e.to_string())
    }
}

/// Wall-clock time for operations whose caller passes none (session bookkeeping, garbage times).
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
}

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
        Ok(SqliteEngine {
            path: path.to_path_buf(),
            writer: Mutex::new(writer),
            readers: Mutex::new(Vec::new()),
            volume: OnceLock::new(),
        })
    }

    /// Runs `f` as one writing transaction (`BEGIN IMMEDIATE`); rolls back if it fails.
    fn write<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        let mut conn = self.writer.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    /// Runs `f` as one read transaction: a consistent snapshot across its statements.
    fn read<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
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
        let volume = self
            .read(|tx| namespace::stored_volume(tx))?
            .ok_or_else(|| {
                MetaError::Engine(format!("{} holds no formatted volume", self.path.display()))
            })?;
        Ok(self.volume.get_or_init(|| volume))
    }
}

fn run_read<T>(conn: &mut Connection, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred)?;
    let out = f(&tx)?;
    tx.commit()?;
    Ok(out)
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
        self.read(|tx| namespace::stored_volume(tx))
    }

    fn open_session(&self, info: &SessionInfo) -> Result<SessionId> {
        self.write(|tx| namespace::open_session(tx, info))
    }

    fn heartbeat(&self, session: SessionId) -> Result<()> {
        self.write(|tx| namespace::heartbeat(tx, session, wall_clock_ns()))
    }

    fn close_session(&self, session: SessionId) -> Result<()> {
        self.write(|tx| namespace::close_session(tx, session, wall_clock_ns()))
    }

    fn reap_stale_sessions(
        &self,
        now_ns: i64,
        max_age_ns: i64,
        exclude: Option<SessionId>,
    ) -> Result<usize> {
        self.write(|tx| namespace::reap_stale_sessions(tx, now_ns, max_age_ns, exclude))
    }

    fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr> {
        self.read(|tx| namespace::lookup(tx, parent, name))
    }

    fn getattr(&self, ino: Ino) -> Result<Attr> {
        self.read(|tx| namespace::get_attr(tx, ino))
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

    fn unlink(
        &self,
        parent: Ino,
        name: &[u8],
        session: SessionId,
        keep_open: &dyn Fn(Ino) -> bool,
        now_ns: i64,
    ) -> Result<Option<Ino>> {
        self.write(|tx| namespace::unlink(tx, parent, name, session, keep_open, now_ns))
    }

    fn rmdir(&self, parent: Ino, name: &[u8], now_ns: i64) -> Result<Ino> {
        self.write(|tx| namespace::rmdir(tx, parent, name, now_ns))
    }

    fn rename(
        &self,
        req: &Rename<'_>,
        session: SessionId,
        keep_open: &dyn Fn(Ino) -> bool,
        now_ns: i64,
    ) -> Result<RenameOutcome> {
        self.write(|tx| namespace::rename(tx, req, session, keep_open, now_ns))
    }

    fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        self.read(|tx| namespace::readlink(tx, ino))
    }

    fn readdir(&self, dir: Ino, after: u64, limit: usize, plus: bool) -> Result<Vec<DirEntry>> {
        self.read(|tx| namespace::readdir(tx, dir, after, limit, plus))
    }

    fn release_sustained(&self, session: SessionId, ino: Ino) -> Result<()> {
        self.write(|tx| namespace::release_sustained(tx, session, ino, wall_clock_ns()))
    }

    fn usage(&self) -> Result<Usage> {
        self.read(|tx| namespace::usage(tx))
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

    fn read_inline(&self, ino: Ino) -> Result<Option<Vec<u8>>> {
        self.read(|tx| data::read_inline(tx, ino))
    }

    fn read_chunk(&self, ino: Ino, chunk: u64) -> Result<Vec<Slice>> {
        self.read(|tx| data::read_chunk(tx, ino, chunk))
    }

    fn write_inline(&self, ino: Ino, bytes: &[u8], now_ns: i64) -> Result<Attr> {
        let volume = self.volume_info()?;
        self.write(|tx| data::write_inline(tx, volume, ino, bytes, now_ns))
    }

    fn commit_slices(
        &self,
        ino: Ino,
        slices: &[(u64, Slice)],
        min_size: u64,
        drop_inline: bool,
        now_ns: i64,
    ) -> Result<Attr> {
        let volume = self.volume_info()?;
        self.write(|tx| data::commit_slices(tx, volume, ino, slices, min_size, drop_inline, now_ns))
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

    fn live_slices(&self) -> Result<Vec<(u64, u32)>> {
        self.read(|tx| data::live_slices(tx))
    }

    fn check(&self, repair: bool) -> Result<Vec<String>> {
        if repair {
            self.write(|tx| check::check(tx, true, wall_clock_ns()))
        } else {
            self.read(|tx| check::check(tx, false, wall_clock_ns()))
        }
    }

    fn flock(&self, ino: Ino, owner: LockOwner, kind: LockKind) -> Result<bool> {
        self.write(|tx| locks::flock(tx, ino, owner, kind))
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
}
