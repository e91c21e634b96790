//! SQLite: one file shared by every process that opens it.
//!
//! One connection guarded by a mutex runs this process's writing transactions, each as
//! `BEGIN IMMEDIATE`, so writers of different processes queue on the database lock (with a busy
//! timeout) instead of failing with `SQLITE_BUSY` halfway through. Reads run on a small pool of
//! extra connections; in WAL mode they never block the writer nor each other.
//!
//! Durability: WAL with `synchronous=NORMAL`. A committed transaction is in the WAL (in the OS
//! page cache) before `COMMIT` returns, so it survives a crash or SIGKILL of any process, and the
//! database stays consistent whatever happens; [`SqliteDb::sync`] fsyncs the WAL, which makes
//! every transaction committed before it durable against power loss too (concurrent callers share
//! one fsync: group commit).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rusqlite::types::Value as SqliteValue;
use rusqlite::{Connection, ErrorCode, OpenFlags, TransactionBehavior};

use crate::{Condition, Error, Result, Row, Tx, Value};

/// Idle read connections kept open for reuse.
const IDLE_READERS: usize = 4;
/// Prepared statements cached per connection (every statement of a caller should fit).
const STATEMENT_CACHE: usize = 128;

pub(crate) fn error(e: rusqlite::Error) -> Error {
    let condition = match e.sqlite_error_code() {
        // Another process held the database lock past the busy timeout.
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => Condition::LockTimeout,
        Some(ErrorCode::DiskFull) => Condition::DiskFull,
        _ => Condition::Failed,
    };
    let message = match condition {
        Condition::LockTimeout => format!(
            "{e} (another process held the database lock for over {:?})",
            crate::timeouts().lock
        ),
        _ => e.to_string(),
    };
    Error {
        condition,
        ..Error::new(message)
    }
}

pub(crate) struct SqliteDb {
    path: PathBuf,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
    /// Write transactions committed, and how many of them the last WAL fsync covered.
    commits: AtomicU64,
    synced: AtomicU64,
    sync_lock: Mutex<()>,
}

impl SqliteDb {
    pub(crate) fn open(path: &Path) -> Result<SqliteDb> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                Error::new(format!(
                    "cannot create directory {} for the database: {e}",
                    dir.display()
                ))
            })?;
        }
        let writer = connect(path)?;
        // The WAL's directory entry must be durable before `sync` relies on fsyncing the WAL.
        if let Some(dir) = path.parent() {
            sync_path(dir)?;
        }
        Ok(SqliteDb {
            path: path.to_path_buf(),
            writer: Mutex::new(writer),
            readers: Mutex::new(Vec::new()),
            commits: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            sync_lock: Mutex::new(()),
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn write<T, E: From<Error>>(
        &self,
        f: &mut dyn FnMut(&Tx<'_>) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        // The lock timeout bounds the whole wait: for this process's other writers, then for
        // the database lock (other processes).
        let bound = crate::timeouts().lock;
        let deadline = Instant::now() + bound;
        let Some(mut conn) = self.writer.try_lock_for(bound) else {
            return Err(Error {
                condition: Condition::LockTimeout,
                ..Error::new(format!(
                    "{}: this process's other transactions held the database for over {bound:?}",
                    self.path.display()
                ))
            }
            .into());
        };
        let left = deadline.saturating_duration_since(Instant::now());
        // Zero would turn the busy handler off (fail at once): wait a little at least.
        conn.busy_timeout(left.max(Duration::from_millis(1)))
            .map_err(error)?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(error)?;
        let out = f(&Tx::sqlite(&tx))?;
        tx.commit().map_err(error)?;
        self.commits.fetch_add(1, Ordering::SeqCst);
        Ok(out)
    }

    /// [`SqliteDb::write`] with the database file `path` attached as `alias` for the duration
    /// (ATTACH cannot run inside a transaction; DETACH runs whatever the outcome).
    pub(crate) fn write_attached<T, E: From<Error>>(
        &self,
        path: &Path,
        alias: &str,
        f: &mut dyn FnMut(&Tx<'_>) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let mut conn = self.writer.lock();
        let file = path
            .to_str()
            .ok_or_else(|| Error::new(format!("database path {} is not UTF-8", path.display())))?;
        conn.execute(&format!("ATTACH DATABASE ?1 AS {alias}"), [file])
            .map_err(error)?;
        let out = (|| -> std::result::Result<T, E> {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(error)?;
            let out = f(&Tx::sqlite(&tx))?;
            tx.commit().map_err(error)?;
            Ok(out)
        })();
        let detached = conn.execute(&format!("DETACH DATABASE {alias}"), []);
        let out = out?;
        detached.map_err(error)?;
        self.commits.fetch_add(1, Ordering::SeqCst);
        Ok(out)
    }

    pub(crate) fn read<T, E: From<Error>>(
        &self,
        f: &mut dyn FnMut(&Tx<'_>) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let pooled = self.readers.lock().pop();
        let mut conn = match pooled {
            Some(conn) => conn,
            None => connect(&self.path)?,
        };
        let out = (|| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Deferred)
                .map_err(error)?;
            let out = f(&Tx::sqlite(&tx))?;
            tx.commit().map_err(error)?;
            Ok(out)
        })();
        let mut idle = self.readers.lock();
        if idle.len() < IDLE_READERS {
            idle.push(conn);
        }
        out
    }

    pub(crate) fn sync(&self) -> Result<()> {
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
}

/// A connection of its own, only asking `PRAGMA data_version`: it changes whenever another
/// connection (of any process, this one's writer included) commits.
pub struct SqliteWatch {
    conn: Mutex<Connection>,
}

impl SqliteWatch {
    pub(crate) fn open(path: &Path) -> Result<SqliteWatch> {
        Ok(SqliteWatch {
            conn: Mutex::new(connect(path)?),
        })
    }

    pub fn data_version(&self) -> Result<i64> {
        self.conn
            .lock()
            .query_row("PRAGMA data_version", [], |row| row.get(0))
            .map_err(error)
    }
}

fn sync_path(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|file| file.sync_all())
        .map_err(|e| {
            let condition = if e.kind() == std::io::ErrorKind::StorageFull {
                Condition::DiskFull
            } else {
                Condition::Failed
            };
            Error {
                condition,
                ..Error::new(format!("cannot fsync {}: {e}", path.display()))
            }
        })
}

fn connect(path: &Path) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| Error::new(format!("cannot open database {}: {e}", path.display())))?;
    conn.busy_timeout(crate::timeouts().lock).map_err(error)?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(error)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::new(format!(
            "{} cannot use WAL mode (got {mode})",
            path.display()
        )));
    }
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(error)?;
    conn.pragma_update(None, "foreign_keys", true)
        .map_err(error)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

fn bind(params: &[Value]) -> Result<Vec<SqliteValue>> {
    params
        .iter()
        .map(|value| {
            Ok(match value {
                Value::Null => SqliteValue::Null,
                Value::Text(s) => SqliteValue::Text(s.clone()),
                Value::Blob(b) => SqliteValue::Blob(b.clone()),
                other => SqliteValue::Integer(other.int()?.unwrap_or_default()),
            })
        })
        .collect()
}

pub(crate) fn execute(conn: &Connection, sql: &str, params: &[Value]) -> Result<usize> {
    let params = bind(params)?;
    let mut stmt = conn.prepare_cached(sql).map_err(error)?;
    stmt.execute(rusqlite::params_from_iter(params))
        .map_err(error)
}

pub(crate) fn query(conn: &Connection, sql: &str, params: &[Value]) -> Result<Vec<Row>> {
    let params = bind(params)?;
    let mut stmt = conn.prepare_cached(sql).map_err(error)?;
    let columns = stmt.column_count();
    let mut rows = stmt
        .query(rusqlite::params_from_iter(params))
        .map_err(error)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(error)? {
        let values = (0..columns)
            .map(|i| {
                Ok(match row.get_ref(i).map_err(error)? {
                    rusqlite::types::ValueRef::Null => Value::Null,
                    rusqlite::types::ValueRef::Integer(v) => Value::Int(v),
                    rusqlite::types::ValueRef::Text(t) => {
                        Value::Text(String::from_utf8_lossy(t).into_owned())
                    }
                    rusqlite::types::ValueRef::Blob(b) => Value::Blob(b.to_vec()),
                    rusqlite::types::ValueRef::Real(r) => {
                        return Err(Error::new(format!(
                            "column {i} holds a floating point value {r}"
                        )))
                    }
                })
            })
            .collect::<Result<_>>()?;
        out.push(Row { values });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{params, Database, Migrations};

    const SCHEMA: Migrations<'static> = Migrations {
        sqlite: &["CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL UNIQUE)"],
        postgres: &[],
    };

    fn insert(db: &SqliteDb, v: &str) -> Result<usize> {
        db.write(&mut |tx: &Tx<'_>| tx.execute("INSERT INTO t (v) VALUES (?1)", params![v]))
    }

    #[test]
    fn sync_flushes_only_what_was_committed() {
        let dir = tempfile::tempdir().unwrap();
        let database = Database::open_sqlite(&dir.path().join("db")).unwrap();
        database.sync().unwrap();
        database.migrate(&SCHEMA).unwrap();
        let crate::Backend::Sqlite(mut db) = database.backend else {
            unreachable!()
        };
        db.sync().unwrap();
        db.sync().unwrap();
        // Concurrent committers share flushes; each sync returns once its commit is durable.
        std::thread::scope(|scope| {
            for i in 0..8 {
                let db = &db;
                scope.spawn(move || {
                    for j in 0..10 {
                        insert(db, &format!("{i}-{j}")).unwrap();
                        db.sync().unwrap();
                    }
                });
            }
        });
        let count = |db: &SqliteDb| -> i64 {
            db.read(&mut |tx: &Tx<'_>| tx.query_row("SELECT COUNT(*) FROM t", (), |row| row.get(0)))
                .unwrap()
        };
        assert_eq!(count(&db), 80);

        // Cheap when nothing was committed: no fsync at all. With the database's path pointing
        // nowhere an fsync would fail; reads and failed writes commit nothing, so sync succeeds...
        db.path = dir.path().join("missing/db");
        assert_eq!(count(&db), 80);
        assert!(insert(&db, "0-0").is_err(), "a duplicate fails");
        db.sync().unwrap();
        db.sync().unwrap();
        // ...while a commit makes the next sync flush.
        insert(&db, "after").unwrap();
        let err = db.sync().unwrap_err();
        assert!(err.to_string().contains("cannot fsync"), "{err}");
    }

    #[test]
    fn a_write_waits_for_another_process_lock_at_most_the_lock_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let database = Database::open_sqlite(&path).unwrap();
        database.migrate(&SCHEMA).unwrap();
        let crate::Backend::Sqlite(db) = &database.backend else {
            unreachable!()
        };
        // Another process's write lock (as `sqlite3` with `BEGIN EXCLUSIVE`).
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN EXCLUSIVE").unwrap();
        let lock = Duration::from_millis(300);
        crate::set_timeouts(crate::Timeouts {
            lock,
            ..crate::Timeouts::DEFAULT
        });
        let started = Instant::now();
        let err = insert(db, "blocked").unwrap_err();
        let waited = started.elapsed();
        crate::set_timeouts(crate::Timeouts::DEFAULT);
        assert_eq!(err.condition(), Condition::LockTimeout, "{err}");
        assert!(
            waited >= lock.mul_f64(0.9) && waited < lock * 10,
            "waited {waited:?} for a lock timeout of {lock:?}"
        );
        // Readers are not blocked, and once the lock is released writes work again.
        let count = |db: &SqliteDb| -> i64 {
            db.read(&mut |tx: &Tx<'_>| tx.query_row("SELECT COUNT(*) FROM t", (), |row| row.get(0)))
                .unwrap()
        };
        assert_eq!(count(db), 0);
        other.execute_batch("COMMIT").unwrap();
        insert(db, "after").unwrap();
        assert_eq!(count(db), 1);
    }

    #[test]
    fn migrations_refuse_a_database_of_a_newer_binary() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open_sqlite(&dir.path().join("db")).unwrap();
        assert_eq!(db.schema_version().unwrap(), 0);
        db.migrate(&SCHEMA).unwrap();
        db.migrate(&SCHEMA).unwrap();
        assert_eq!(db.schema_version().unwrap(), 1);
        let older = Migrations {
            sqlite: &[],
            postgres: &[],
        };
        let err = db.migrate(&older).unwrap_err();
        assert!(err.to_string().contains("newer than this binary"), "{err}");
    }

    #[test]
    fn data_version_moves_when_another_connection_commits() {
        let dir = tempfile::tempdir().unwrap();
        let database = Database::open_sqlite(&dir.path().join("db")).unwrap();
        database.migrate(&SCHEMA).unwrap();
        let watch = database.sqlite_watch().unwrap().unwrap();
        let before = watch.data_version().unwrap();
        assert_eq!(watch.data_version().unwrap(), before);
        let crate::Backend::Sqlite(db) = &database.backend else {
            unreachable!()
        };
        insert(db, "x").unwrap();
        assert_ne!(watch.data_version().unwrap(), before);
    }
}
