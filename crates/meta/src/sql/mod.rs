//! The SQL engine: one implementation of every operation over [`cellar_sql`], for both
//! dialects.
//!
//! - SQLite (the embedded default): one database file per volume, shared by every process of
//!   the host that opens it (the server, each `cellar mount`, `cellar fsck`).
//! - PostgreSQL: one schema per volume in a database shared by many volumes and hosts (see
//!   [`SqlEngine::open_postgres`]); this process's connections to the database are one pool,
//!   whatever the number of volumes.
//!
//! Every method is one transaction (PostgreSQL: SERIALIZABLE, re-run after losing a race, so
//! concurrent renames from different hosts serialise as if one ran after the other and cannot
//! create a loop or detach a directory). Every write transaction ends by appending what it
//! changed to the volume's change log (see `changes`).
//!
//! Open files: the first open of an inode by this engine's caller records it in `open_files`
//! (one row per session), the last close removes it; unlink and rename keep an inode that any
//! session has open, inside their transaction, without calling up.
//!
//! Lock order: `open_files` or `inos` → the database's own locks. None is held while calling out of this
//! crate.

mod changes;
mod check;
mod data;
mod fork;
mod locks;
mod namespace;
mod rows;
mod schema;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use cellar_sql::{Database, PgUrl};
use parking_lot::Mutex;

use changes::Tx;

use crate::{
    Ancestor, Attr, ChangeBatch, Committed, CopiedRange, DirEntry, ForkSpec, ForkStats,
    GarbageSlice, Ino, Layout, Location, LockOwner, LockRange, MetaEngine, MetaError,
    PathChangeBatch, Rename, RenameOutcome, Result, SessionId, SessionInfo, SetAttr, Slice,
    SliceReferences, Usage, VolumeInfo, XattrMode,
};

/// How often a waiter for changes of a SQLite volume polls the database's data version: another
/// process's commit is noticed within this. Every idle mount polls, so this trades a few
/// milliseconds of latency on one host for idle CPU (2 ms cost an idle mount 3% of a core).
const CHANGE_POLL: Duration = Duration::from_millis(10);
/// Inode numbers an engine reserves at a time (see `namespace::reserve_inos`).
const INO_BATCH: u64 = 64;
/// Longest volume id of a PostgreSQL URL (a schema name has at most 63 bytes).
const MAX_VOLUME_ID: usize = 56;

pub struct SqlEngine {
    db: Database,
    /// Format-time parameters, fixed once formatted.
    volume: OnceLock<VolumeInfo>,
    /// Held across the database update of a first open or last close, so that concurrent opens
    /// of one inode see it recorded before they return.
    open_files: Mutex<OpenFiles>,
    /// Stamped on every change this engine commits.
    origin: u64,
    /// The key of the volume's change notifications and of the lock that orders its change log.
    changes_key: String,
    watch: ChangeWatch,
    /// Inode numbers reserved for this engine's creates.
    inos: Mutex<std::ops::Range<Ino>>,
}

/// How a waiter learns that another engine may have committed.
enum ChangeWatch {
    /// `PRAGMA data_version` of a connection of its own.
    Sqlite(cellar_sql::SqliteWatch),
    /// This process's LISTEN connection's signal for the volume.
    Postgres(Arc<cellar_sql::Signal>),
}

/// Opens of inodes by this engine's caller: the first records the open in the database (where
/// every mount's unlink sees it), the last removes it, lazily (see `MetaEngine::commit_closes`).
#[derive(Default)]
struct OpenFiles {
    counts: HashMap<Ino, u32>,
    /// Inodes whose last close is not yet recorded, with the session that holds them: their rows
    /// are still in `open_files`, so an open before `commit_closes` needs no write.
    closing: HashMap<Ino, SessionId>,
}

/// The schema of a volume of a PostgreSQL database.
fn volume_schema(volume: &str) -> Result<String> {
    let valid = !volume.is_empty()
        && volume.len() <= MAX_VOLUME_ID
        && volume
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !valid {
        return Err(MetaError::UnsupportedUrl(format!(
            "volume id {volume:?}: expected 1 to {MAX_VOLUME_ID} letters, digits, '-' or '_'"
        )));
    }
    Ok(format!("vol_{volume}"))
}

fn volume_of(url: &PgUrl) -> Result<&str> {
    url.volume().ok_or_else(|| {
        MetaError::UnsupportedUrl(format!(
            "{}: add ?volume=ID (one database holds many volumes)",
            url.redacted()
        ))
    })
}

/// Drops the metadata of the PostgreSQL volume named by `url` (its schema), if any.
pub fn destroy_postgres(url: &PgUrl) -> Result<()> {
    let schema = volume_schema(volume_of(url)?)?;
    Ok(cellar_sql::destroy_schema(url, &schema)?)
}

impl SqlEngine {
    /// Opens (creating the file and its parent directories if missing) and migrates a SQLite
    /// database.
    pub fn open_sqlite(path: &Path) -> Result<SqlEngine> {
        let db = Database::open_sqlite(path)?;
        db.migrate(&schema::MIGRATIONS)?;
        let watch = db
            .sqlite_watch()
            .expect("a SQLite database has a data version")?;
        SqlEngine::new(db, String::new(), ChangeWatch::Sqlite(watch)).migrated()
    }

    /// Opens the volume `?volume=ID` of a PostgreSQL database (`postgres://USER:PASS@HOST:PORT/DB`)
    /// through this process's pool for that database, creating and migrating its schema
    /// `vol_ID` if needed.
    pub fn open_postgres(url: &PgUrl) -> Result<SqlEngine> {
        let schema = volume_schema(volume_of(url)?)?;
        let db = Database::open_postgres(url, Some(&schema))?;
        db.migrate(&schema::MIGRATIONS)?;
        let listener = db
            .pg_listener()
            .expect("a PostgreSQL database has a listener");
        let signal = listener.subscribe(&schema);
        SqlEngine::new(db, schema, ChangeWatch::Postgres(signal)).migrated()
    }

    /// Finishes what a migration left to the engine (held bytes, computed once).
    fn migrated(self) -> Result<SqlEngine> {
        if self.read(check::needs_held_recount)? {
            self.write(check::recount_held)?;
        }
        Ok(self)
    }

    fn new(db: Database, changes_key: String, watch: ChangeWatch) -> SqlEngine {
        SqlEngine {
            db,
            volume: OnceLock::new(),
            open_files: Mutex::new(OpenFiles::default()),
            origin: rand::random(),
            changes_key,
            watch,
            inos: Mutex::new(0..0),
        }
    }

    /// Runs `f` as one writing transaction that ends by appending what it changed to the change
    /// log; rolls back if it fails (PostgreSQL: re-runs it if it lost a race).
    fn write<T>(&self, f: impl FnMut(&Tx<'_, '_>) -> Result<T>) -> Result<T> {
        self.write_excluding(None, f)
    }

    /// [`Self::write`] that first records the last closes still pending (see
    /// `MetaEngine::commit_closes`): an unlink on this mount right after a close frees the inode
    /// at once. Returns how many it recorded.
    fn write_closing<T>(&self, mut f: impl FnMut(&Tx<'_, '_>) -> Result<T>) -> Result<(usize, T)> {
        // Held across the transaction: an open of one of these inodes meanwhile must not see its
        // row, then lose it to the delete.
        let mut open = self.open_files.lock();
        let done = self.write(|tx| {
            let now_ns = tx.now_ns()?;
            for (&ino, &session) in &open.closing {
                namespace::close_file(tx, session, ino, now_ns)?;
            }
            f(tx)
        })?;
        let closed = open.closing.len();
        open.closing.clear();
        Ok((closed, done))
    }

    /// [`Self::write`], keeping every other writer of `table` out when one is named.
    fn write_excluding<T>(
        &self,
        table: Option<&'static str>,
        mut f: impl FnMut(&Tx<'_, '_>) -> Result<T>,
    ) -> Result<T> {
        let mut run = |tx: &cellar_sql::Tx<'_>| {
            let changes = Tx::new(tx);
            let out = f(&changes)?;
            changes.record(self.origin, &self.changes_key)?;
            Ok(out)
        };
        match table {
            Some(table) => self.db.write_excluding(table, run),
            None => self.db.write(&mut run),
        }
    }

    /// [`Self::write`] with the SQLite file `path` attached as `fork`.
    fn write_attached<T>(
        &self,
        path: &Path,
        mut f: impl FnMut(&Tx<'_, '_>) -> Result<T>,
    ) -> Result<T> {
        self.db
            .write_attached(path, "fork", |tx: &cellar_sql::Tx<'_>| {
                let changes = Tx::new(tx);
                let out = f(&changes)?;
                changes.record(self.origin, &self.changes_key)?;
                Ok(out)
            })
    }

    /// Runs `f` as one read transaction: a consistent snapshot across its statements.
    fn read<T>(&self, mut f: impl FnMut(&Tx<'_, '_>) -> Result<T>) -> Result<T> {
        self.db.read(|tx| f(&Tx::new(tx)))
    }

    /// The volume's parameters (cached: they never change once formatted).
    fn volume_info(&self) -> Result<&VolumeInfo> {
        if let Some(volume) = self.volume.get() {
            return Ok(volume);
        }
        let volume = self.read(namespace::stored_volume)?.ok_or_else(|| {
            MetaError::Engine(format!("{} holds no formatted volume", self.db.describe()))
        })?;
        Ok(self.volume.get_or_init(|| volume))
    }

    /// The number of the next inode this engine creates.
    fn next_ino(&self) -> Result<Ino> {
        let mut inos = self.inos.lock();
        if inos.is_empty() {
            let first = self
                .db
                .write(|tx| namespace::reserve_inos(&Tx::new(tx), INO_BATCH))?;
            *inos = first..first + INO_BATCH;
        }
        Ok(inos.next().expect("refilled"))
    }

    /// Something that tells whether another commit may have happened since.
    fn watch_mark(&self) -> Result<i64> {
        match &self.watch {
            ChangeWatch::Sqlite(watch) => Ok(watch.data_version()?),
            ChangeWatch::Postgres(signal) => Ok(signal.generation() as i64),
        }
    }

    /// Waits until the mark moved past `mark`, or `deadline`.
    fn wait_past(&self, mark: i64, deadline: Instant) -> Result<()> {
        match &self.watch {
            ChangeWatch::Sqlite(watch) => loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || watch.data_version()? != mark {
                    return Ok(());
                }
                std::thread::sleep(left.min(CHANGE_POLL));
            },
            ChangeWatch::Postgres(signal) => {
                signal.wait_past(mark as u64, deadline);
                Ok(())
            }
        }
    }

    /// Runs raw SQL in a write transaction (tests corrupt the metadata with it).
    #[cfg(test)]
    fn raw(&self, sql: &str) -> Result<usize> {
        self.db.write(|tx| Ok(tx.execute(sql, ())?))
    }

    #[cfg(test)]
    fn schema_version(&self) -> Result<i64> {
        Ok(self.db.schema_version()?)
    }
}

impl MetaEngine for SqlEngine {
    fn format(&self, volume: &VolumeInfo) -> Result<VolumeInfo> {
        self.write(|tx| namespace::format(tx, volume))
    }

    fn volume(&self) -> Result<Option<VolumeInfo>> {
        self.read(namespace::stored_volume)
    }

    fn open_session(&self, info: &SessionInfo) -> Result<SessionId> {
        self.write(|tx| namespace::open_session(tx, info, tx.now_ns()?))
    }

    fn heartbeat(&self, session: SessionId) -> Result<()> {
        self.write(|tx| namespace::heartbeat(tx, session, tx.now_ns()?))
    }

    fn live_sessions(&self, max_age_ns: i64) -> Result<Vec<SessionId>> {
        self.read(|tx| namespace::live_sessions(tx, tx.now_ns()?, max_age_ns))
    }

    fn sessions_at(&self, host: &str, mount_point: &str) -> Result<Vec<(SessionId, u32)>> {
        self.read(|tx| namespace::sessions_at(tx, host, mount_point))
    }

    fn try_lease(&self, name: &str, session: SessionId, ttl_ns: i64) -> Result<bool> {
        self.write(|tx| namespace::try_lease(tx, name, session, ttl_ns, tx.now_ns()?))
    }

    fn open_file(&self, session: SessionId, ino: Ino) -> Result<Attr> {
        let mut open = self.open_files.lock();
        let count = open.counts.get(&ino).copied().unwrap_or(0);
        let recorded = count > 0 || open.closing.get(&ino) == Some(&session);
        let attr = if recorded {
            self.read(|tx| rows::get_attr(tx, ino))?
        } else {
            self.write(|tx| namespace::open_file(tx, session, ino))?
        };
        open.closing.remove(&ino);
        open.counts.insert(ino, count + 1);
        Ok(attr)
    }

    fn close_file(&self, session: SessionId, ino: Ino) -> Result<()> {
        let mut open = self.open_files.lock();
        match open.counts.get_mut(&ino) {
            Some(count) if *count > 1 => *count -= 1,
            Some(_) => {
                open.counts.remove(&ino);
                open.closing.insert(ino, session);
            }
            None => {}
        }
        Ok(())
    }

    fn commit_closes(&self) -> Result<usize> {
        if self.open_files.lock().closing.is_empty() {
            return Ok(0);
        }
        self.write_closing(|_| Ok(())).map(|(closed, ())| closed)
    }

    fn close_session(&self, session: SessionId) -> Result<()> {
        let mut open = self.open_files.lock();
        // The session's rows go with it, and so do the inodes only they kept.
        self.write(|tx| namespace::close_session(tx, session, tx.now_ns()?))?;
        open.closing.retain(|_, holder| *holder != session);
        Ok(())
    }

    fn reap_stale_sessions(&self, max_age_ns: i64, exclude: Option<SessionId>) -> Result<usize> {
        self.write(|tx| namespace::reap_stale_sessions(tx, tx.now_ns()?, max_age_ns, exclude))
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
        let ino = self.next_ino()?;
        self.write(|tx| namespace::create_node(tx, ino, parent, name, node, now_ns))
    }

    fn create_open(
        &self,
        session: SessionId,
        parent: Ino,
        name: &[u8],
        node: &crate::NewNode,
        now_ns: i64,
    ) -> Result<Attr> {
        let ino = self.next_ino()?;
        let mut open = self.open_files.lock();
        let attr = self.write(|tx| {
            namespace::create_node(tx, ino, parent, name, node, now_ns)?;
            namespace::open_file(tx, session, ino)
        })?;
        open.counts.insert(ino, 1);
        Ok(attr)
    }

    fn link(&self, ino: Ino, new_parent: Ino, new_name: &[u8], now_ns: i64) -> Result<Attr> {
        self.write(|tx| namespace::link(tx, ino, new_parent, new_name, now_ns))
    }

    fn unlink(&self, parent: Ino, name: &[u8], now_ns: i64) -> Result<Option<Ino>> {
        self.write_closing(|tx| namespace::unlink(tx, parent, name, now_ns))
            .map(|(_, unlinked)| unlinked)
    }

    fn rmdir(&self, parent: Ino, name: &[u8], now_ns: i64) -> Result<Ino> {
        self.write(|tx| namespace::rmdir(tx, parent, name, now_ns))
    }

    fn rename(&self, req: &Rename<'_>, now_ns: i64) -> Result<RenameOutcome> {
        self.write_closing(|tx| namespace::rename(tx, req, now_ns))
            .map(|(_, outcome)| outcome)
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

    fn quota(&self) -> Result<Option<u64>> {
        self.read(namespace::quota)
    }

    fn set_quota(&self, bytes: Option<u64>) -> Result<()> {
        self.write(|tx| namespace::set_quota(tx, bytes))
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
        self.read(|tx| data::read_layout(tx, ino, chunks.clone(), known_version))
    }

    fn read_chunk(&self, ino: Ino, chunk: u64) -> Result<Vec<Slice>> {
        self.read(|tx| data::read_chunk(tx, ino, chunk))
    }

    fn write_inline(
        &self,
        ino: Ino,
        extents: &[(u64, &[u8])],
        then: &SetAttr,
        now_ns: i64,
    ) -> Result<Option<Attr>> {
        let volume = self.volume_info()?;
        self.write(|tx| {
            let written = data::write_inline(tx, volume, ino, extents, now_ns)?;
            match written {
                Some(_) if !then.is_empty() => namespace::setattr(tx, ino, then, now_ns).map(Some),
                written => Ok(written),
            }
        })
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

    fn copy_range(
        &self,
        src: Ino,
        offset: u64,
        dst: Ino,
        dst_offset: u64,
        len: u64,
        now_ns: i64,
    ) -> Result<Option<CopiedRange>> {
        let volume = self.volume_info()?;
        self.write(|tx| data::copy_range(tx, volume, src, offset, dst, dst_offset, len, now_ns))
    }

    fn zero_range(
        &self,
        ino: Ino,
        offset: u64,
        len: u64,
        keep_size: bool,
        now_ns: i64,
    ) -> Result<Committed> {
        let volume = self.volume_info()?;
        self.write(|tx| data::zero_range(tx, volume, ino, offset, len, keep_size, now_ns))
    }

    fn next_data_chunk(&self, ino: Ino, from: u64) -> Result<Option<u64>> {
        self.read(|tx| data::next_data_chunk(tx, ino, from))
    }

    fn lineage(&self) -> Result<Vec<Ancestor>> {
        self.read(fork::lineage)
    }

    fn read_only(&self) -> Result<bool> {
        self.read(fork::read_only)
    }

    fn fork(&self, target_url: &str, spec: &ForkSpec) -> Result<ForkStats> {
        let target = crate::open(target_url)?;
        if let Some(held) = target.volume()? {
            return Err(MetaError::Engine(format!(
                "the fork's metadata already holds volume {:?}",
                held.name
            )));
        }
        let stats = match (Location::parse(target_url)?, self.db.dialect()) {
            (Location::Sqlite(path), cellar_sql::Dialect::Sqlite) => {
                self.write_attached(&path, |tx| fork::copy_into(tx, "fork.", spec))?
            }
            (Location::Postgres(url), cellar_sql::Dialect::Postgres) => {
                let schema = volume_schema(volume_of(&url)?)?;
                self.write(|tx| fork::copy_into(tx, &format!("\"{schema}\"."), spec))?
            }
            _ => {
                return Err(MetaError::UnsupportedUrl(format!(
                    "{}: a fork's metadata uses its origin's engine",
                    cellar_sql::redact(target_url)
                )))
            }
        };
        // Both sides durable before the caller may report the fork made.
        self.sync()?;
        target.sync()?;
        Ok(stats)
    }

    fn release_fork(&self, volume: &str) -> Result<bool> {
        self.write(|tx| fork::release(tx, volume))
    }

    fn forks(&self) -> Result<Vec<String>> {
        self.read(fork::descendants)
    }

    fn exclusive_bytes(&self) -> Result<u64> {
        self.read(fork::exclusive_bytes)
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
        // Writers of the file append slices to this chunk all the time (an SQLite journal):
        // without excluding them the compactor could lose every retry.
        self.write_excluding(Some("chunk_slices"), |tx| {
            data::replace_chunk(tx, ino, chunk, expected, new, tx.now_ns()?)
        })
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

    /// SQLite: fsyncs the WAL (group commit). PostgreSQL: nothing beyond COMMIT, which returns
    /// once the server flushed the commit record (with the server's `synchronous_commit`).
    fn sync(&self) -> Result<()> {
        Ok(self.db.sync()?)
    }

    fn check(&self, repair: bool) -> Result<Vec<String>> {
        if repair {
            self.write(|tx| check::check(tx, true, tx.now_ns()?))
        } else {
            self.read(|tx| check::check(tx, false, tx.now_ns()?))
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

    fn path_changes_since(&self, after: u64, limit: usize) -> Result<PathChangeBatch> {
        self.read(|tx| changes::path_changes_since(tx, after, limit))
    }

    fn wait_for_changes(&self, after: u64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            // The mark before the log: a commit after this read moves the mark.
            let mark = self.watch_mark()?;
            if self.last_change()? > after || Instant::now() >= deadline {
                return Ok(());
            }
            self.wait_past(mark, deadline)?;
        }
    }

    fn trim_changes(&self, older_than_ns: i64) -> Result<u64> {
        self.write(|tx| changes::trim_changes(tx, older_than_ns))
    }
}
