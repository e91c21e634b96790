//! A dialect-neutral SQL layer over SQLite and PostgreSQL, so that one implementation of each
//! operation serves both: values and rows, `?N` placeholders (rewritten to `$N` for PostgreSQL),
//! a prepared-statement cache per connection, transactions, versioned migrations per dialect and
//! change notifications.
//!
//! Transactions:
//! - SQLite: writers take `BEGIN IMMEDIATE` on one connection per [`Database`] (writers of other
//!   processes queue on the database lock); readers use a small pool of WAL connections.
//! - PostgreSQL: writers run `SERIALIZABLE` and are retried after a serialization failure or a
//!   deadlock (SQLSTATE 40001 / 40P01), or a connection lost before COMMIT, with a bounded,
//!   jittered backoff, so a transaction's closure must be re-runnable: it may run several times,
//!   only the last run commits. Readers run
//!   `REPEATABLE READ READ ONLY` (one snapshot). Connections come from one pool per process per
//!   database (see [`postgres::PgUrl`]), shared by every [`Database`] opened on it; each
//!   `Database` may name a schema, set as the `search_path` of each of its transactions.
//!
//! Faults (docs/SEMANTICS.md, "Failure behaviour"): a statement waits for a lock that another
//! session holds (PostgreSQL `lock_timeout`, SQLite's busy timeout) at most
//! [`Timeouts::lock`], then fails as [`Condition::LockTimeout`]; a PostgreSQL transaction that
//! cannot reach the server (refused, or its connection lost before COMMIT) is re-run on a new
//! connection until [`Timeouts::outage`] after its first try, then fails as
//! [`Condition::Unavailable`]; a full disk is [`Condition::DiskFull`].

mod postgres_db;
mod sqlite_db;
mod value;

use cellar_metrics::TxKind;
use std::cell::{Cell, RefCell};
use std::path::Path;
use std::time::Duration;

use parking_lot::RwLock;

pub use postgres_db::{destroy_schema, redact, retries, PgListener, PgUrl, Signal, LISTENER_NAME};
pub use sqlite_db::SqliteWatch;
pub use value::{ColumnIndex, FromValue, Params, Row, ToValue, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// What a failure means to the caller, beyond its message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Condition {
    /// Anything else: a constraint, a bug, a refused statement.
    Failed,
    /// A lock held by another session was not granted within [`Timeouts::lock`].
    LockTimeout,
    /// The database has no space left on its disk.
    DiskFull,
    /// The database could not be reached (or its connection broke).
    Unavailable,
}

/// How long transactions wait on faults, for the whole process (see the crate's docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub lock: Duration,
    pub outage: Duration,
}

impl Timeouts {
    /// The defaults (docs/CONFIGURATION.md, "Metadata timeouts").
    pub const DEFAULT: Timeouts = Timeouts {
        lock: Duration::from_secs(30),
        outage: Duration::from_secs(20),
    };
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts::DEFAULT
    }
}

static TIMEOUTS: RwLock<Timeouts> = parking_lot::const_rwlock(Timeouts::DEFAULT);

/// Sets the process's [`Timeouts`]: before opening databases (SQLite connections take the lock
/// timeout when they open; PostgreSQL transactions read both when they begin).
pub fn set_timeouts(timeouts: Timeouts) {
    *TIMEOUTS.write() = timeouts;
}

pub fn timeouts() -> Timeouts {
    *TIMEOUTS.read()
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    message: String,
    condition: Condition,
    /// The transaction lost a race (serialization failure, deadlock) and may succeed if re-run.
    retryable: bool,
    /// The connection broke (the server closed it, restarted...): a transaction that had not
    /// sent its COMMIT yet did not commit and may be re-run on another connection.
    connection_lost: bool,
    /// A query that had to return a row returned none.
    no_rows: bool,
}

impl Error {
    pub fn new(message: impl Into<String>) -> Error {
        Error {
            message: message.into(),
            condition: Condition::Failed,
            retryable: false,
            connection_lost: false,
            no_rows: false,
        }
    }

    fn no_rows() -> Error {
        Error {
            message: "query returned no rows".into(),
            condition: Condition::Failed,
            retryable: false,
            connection_lost: false,
            no_rows: true,
        }
    }

    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    pub fn condition(&self) -> Condition {
        if self.connection_lost {
            Condition::Unavailable
        } else {
            self.condition
        }
    }

    /// The same failure, described in context ("cannot connect to ...: {self}").
    fn context(mut self, context: impl std::fmt::Display) -> Error {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// `query_row(...).optional()`: no row is `None` rather than an error.
pub trait OptionalExtension<T> {
    fn optional(self) -> Result<Option<T>>;
}

impl<T> OptionalExtension<T> for Result<T> {
    fn optional(self) -> Result<Option<T>> {
        match self {
            Ok(value) => Ok(Some(value)),
            Err(e) if e.no_rows => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Builds the parameters of a statement: `params![ino, name, None::<i64>]`.
#[macro_export]
macro_rules! params {
    ($($value:expr),* $(,)?) => {
        [$($crate::ToValue::to_value(&$value)),*]
    };
}

/// Versioned schema of one database, per dialect: `sqlite[i]` / `postgres[i]` take it from
/// version `i` to `i + 1` (the lists may differ in length: a dialect's history is its own).
#[derive(Clone, Copy, Debug)]
pub struct Migrations<'a> {
    pub sqlite: &'a [&'a str],
    pub postgres: &'a [&'a str],
}

impl<'a> Migrations<'a> {
    pub fn for_dialect(&self, dialect: Dialect) -> &'a [&'a str] {
        match dialect {
            Dialect::Sqlite => self.sqlite,
            Dialect::Postgres => self.postgres,
        }
    }
}

/// One database: a SQLite file, or a PostgreSQL database (optionally one schema of it).
pub struct Database {
    backend: Backend,
}

enum Backend {
    Sqlite(sqlite_db::SqliteDb),
    Postgres(postgres_db::PgDb),
}

impl Database {
    /// Opens (creating the file and its parent directories if missing) a SQLite database in WAL
    /// mode.
    pub fn open_sqlite(path: &Path) -> Result<Database> {
        Ok(Database {
            backend: Backend::Sqlite(sqlite_db::SqliteDb::open(path)?),
        })
    }

    /// Opens a PostgreSQL database through this process's pool for it; with `schema`, every
    /// transaction runs with that schema as its `search_path` (the schema is created by
    /// [`Database::migrate`]).
    pub fn open_postgres(url: &PgUrl, schema: Option<&str>) -> Result<Database> {
        Ok(Database {
            backend: Backend::Postgres(postgres_db::PgDb::open(url, schema)?),
        })
    }

    pub fn dialect(&self) -> Dialect {
        match self.backend {
            Backend::Sqlite(_) => Dialect::Sqlite,
            Backend::Postgres(_) => Dialect::Postgres,
        }
    }

    /// A name for messages (the path, or the redacted URL and schema).
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Sqlite(db) => db.path().display().to_string(),
            Backend::Postgres(db) => db.describe(),
        }
    }

    /// Runs `f` as one writing transaction and commits it; rolls back if `f` fails. On
    /// PostgreSQL `f` is run again (after a rollback) when the transaction lost a race.
    pub fn write<T, E: From<Error>>(
        &self,
        mut f: impl FnMut(&Tx<'_>) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        cellar_metrics::meta_transaction(TxKind::Write, || match &self.backend {
            Backend::Sqlite(db) => db.write(&mut f),
            Backend::Postgres(db) => db.transaction(postgres_db::Mode::Write, &mut f),
        })
    }

    /// Like [`Database::write`], with every other writer of `table` kept out for the duration:
    /// for background work that a stream of short writers would otherwise make lose its race
    /// on every try (SQLite's single writer already excludes them).
    pub fn write_excluding<T, E: From<Error>>(
        &self,
        table: &'static str,
        mut f: impl FnMut(&Tx<'_>) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        cellar_metrics::meta_transaction(TxKind::Write, || match &self.backend {
            Backend::Sqlite(db) => db.write(&mut f),
            Backend::Postgres(db) => {
                db.transaction(postgres_db::Mode::WriteExcluding(table), &mut f)
            }
        })
    }

    /// SQLite only: [`Database::write`] with another database file attached as `alias` (one
    /// transaction over both files: a fork copies a volume's metadata into a new file).
    pub fn write_attached<T, E: From<Error>>(
        &self,
        path: &Path,
        alias: &str,
        mut f: impl FnMut(&Tx<'_>) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        cellar_metrics::meta_transaction(TxKind::Write, || match &self.backend {
            Backend::Sqlite(db) => db.write_attached(path, alias, &mut f),
            Backend::Postgres(_) => Err(E::from(Error::new(
                "attaching a database file is a SQLite operation",
            ))),
        })
    }

    /// Runs `f` as one read-only transaction: a consistent snapshot across its statements.
    pub fn read<T, E: From<Error>>(
        &self,
        mut f: impl FnMut(&Tx<'_>) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        cellar_metrics::meta_transaction(TxKind::Read, || match &self.backend {
            Backend::Sqlite(db) => db.read(&mut f),
            Backend::Postgres(db) => db.transaction(postgres_db::Mode::Read, &mut f),
        })
    }

    /// Brings the schema up to the newest version of this dialect's migrations, in one
    /// transaction (concurrent openers wait for each other; the second finds nothing to do).
    /// Refuses a database written by a newer binary.
    pub fn migrate(&self, migrations: &Migrations<'_>) -> Result<()> {
        let list = migrations.for_dialect(self.dialect());
        match &self.backend {
            Backend::Sqlite(db) => db.write(&mut |tx: &Tx<'_>| migrate(tx, list)),
            Backend::Postgres(db) => {
                db.transaction(postgres_db::Mode::Migrate, &mut |tx: &Tx<'_>| {
                    db.prepare_schema(tx)?;
                    migrate(tx, list)
                })
            }
        }
    }

    /// The schema version recorded in the database (0 before any migration).
    pub fn schema_version(&self) -> Result<i64> {
        self.read(|tx| {
            if !tx.table_exists("schema_migrations")? {
                return Ok(0);
            }
            tx.query_row(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                (),
                |row| row.get(0),
            )
        })
    }

    /// Makes every transaction committed so far durable. SQLite (WAL, `synchronous=NORMAL`):
    /// fsyncs the WAL, concurrent callers sharing one fsync. PostgreSQL: nothing to do, COMMIT
    /// returned only once the commit record was flushed (`synchronous_commit`, the server's
    /// setting, decides that).
    pub fn sync(&self) -> Result<()> {
        match &self.backend {
            Backend::Sqlite(db) => db.sync(),
            Backend::Postgres(_) => Ok(()),
        }
    }

    /// A connection of its own that tells when another connection committed (SQLite only).
    pub fn sqlite_watch(&self) -> Option<Result<SqliteWatch>> {
        match &self.backend {
            Backend::Sqlite(db) => Some(SqliteWatch::open(db.path())),
            Backend::Postgres(_) => None,
        }
    }

    /// This process's LISTEN connection for the database (PostgreSQL only).
    pub fn pg_listener(&self) -> Option<std::sync::Arc<PgListener>> {
        match &self.backend {
            Backend::Sqlite(_) => None,
            Backend::Postgres(db) => Some(db.listener()),
        }
    }
}

fn migrate(tx: &Tx<'_>, migrations: &[&str]) -> Result<()> {
    tx.batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_ns BIGINT NOT NULL)",
    )?;
    let current: i64 = tx.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        (),
        |row| row.get(0),
    )?;
    let known = migrations.len() as i64;
    if current > known {
        return Err(Error::new(format!(
            "schema version {current} is newer than this binary supports ({known}); upgrade cellar"
        )));
    }
    for (index, sql) in migrations.iter().enumerate().skip(current as usize) {
        let version = index as i64 + 1;
        tx.batch(sql)
            .map_err(|e| Error::new(format!("schema migration {version}: {e}")))?;
        let now = tx.now_ns()?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_ns) VALUES (?1, ?2)",
            params![version, now],
        )?;
        tracing::info!(version, "applied schema migration");
    }
    Ok(())
}

/// One transaction. Statements are prepared once per connection and cached.
pub struct Tx<'a> {
    conn: TxConn<'a>,
    /// Set when a statement failed because the transaction lost a race or its connection: the
    /// caller's closure then fails (with whatever error it makes of it) and the transaction is
    /// re-run.
    lost_race: Cell<bool>,
    /// Set when a statement failed because the connection broke (a re-run waits out an
    /// outage, see [`Timeouts::outage`]).
    lost_connection: Cell<bool>,
    /// Set when any statement failed (a PostgreSQL transaction is then aborted).
    failed: Cell<bool>,
}

enum TxConn<'a> {
    Sqlite(&'a rusqlite::Connection),
    Postgres(RefCell<&'a mut postgres_db::PgConn>),
}

impl<'a> Tx<'a> {
    fn sqlite(conn: &'a rusqlite::Connection) -> Tx<'a> {
        Tx {
            conn: TxConn::Sqlite(conn),
            lost_race: Cell::new(false),
            lost_connection: Cell::new(false),
            failed: Cell::new(false),
        }
    }

    fn postgres(conn: &'a mut postgres_db::PgConn) -> Tx<'a> {
        Tx {
            conn: TxConn::Postgres(RefCell::new(conn)),
            lost_race: Cell::new(false),
            lost_connection: Cell::new(false),
            failed: Cell::new(false),
        }
    }

    pub fn dialect(&self) -> Dialect {
        match self.conn {
            TxConn::Sqlite(_) => Dialect::Sqlite,
            TxConn::Postgres(_) => Dialect::Postgres,
        }
    }

    fn note<T>(&self, result: Result<T>) -> Result<T> {
        if let Err(e) = &result {
            self.failed.set(true);
            if e.retryable || e.connection_lost {
                self.lost_race.set(true);
            }
            if e.connection_lost {
                self.lost_connection.set(true);
            }
        }
        result
    }

    /// Runs a statement; returns the number of rows it changed.
    pub fn execute(&self, sql: &str, params: impl Params) -> Result<usize> {
        let params = params.into_values();
        self.note(match &self.conn {
            TxConn::Sqlite(conn) => sqlite_db::execute(conn, sql, &params),
            TxConn::Postgres(conn) => conn.borrow_mut().execute(sql, &params),
        })
    }

    /// Every row of a query.
    pub fn query(&self, sql: &str, params: impl Params) -> Result<Vec<Row>> {
        let params = params.into_values();
        self.note(match &self.conn {
            TxConn::Sqlite(conn) => sqlite_db::query(conn, sql, &params),
            TxConn::Postgres(conn) => conn.borrow_mut().query(sql, &params),
        })
    }

    /// The first row of a query, mapped by `f`; an error (see [`OptionalExtension`]) if none.
    pub fn query_row<T>(
        &self,
        sql: &str,
        params: impl Params,
        f: impl FnOnce(&Row) -> Result<T>,
    ) -> Result<T> {
        let rows = self.query(sql, params)?;
        f(rows.first().ok_or_else(Error::no_rows)?)
    }

    /// Every row of a query, mapped by `f` (collect into a `Result<Vec<_>>`).
    pub fn query_map<T>(
        &self,
        sql: &str,
        params: impl Params,
        f: impl FnMut(&Row) -> Result<T>,
    ) -> Result<std::vec::IntoIter<Result<T>>> {
        let rows = self.query(sql, params)?;
        Ok(rows.iter().map(f).collect::<Vec<_>>().into_iter())
    }

    /// A statement to run once or several times. Every statement is prepared once per
    /// connection and cached, so this only names it.
    pub fn prepare_cached(&self, sql: &str) -> Result<Stmt<'_, 'a>> {
        Ok(Stmt {
            tx: self,
            sql: sql.to_string(),
        })
    }

    /// Runs statements separated by `;`, without parameters (schema changes).
    pub fn batch(&self, sql: &str) -> Result<()> {
        self.note(match &self.conn {
            TxConn::Sqlite(conn) => conn.execute_batch(sql).map_err(sqlite_db::error),
            TxConn::Postgres(conn) => conn.borrow_mut().batch(sql),
        })
    }

    /// The database's clock in nanoseconds since the Unix epoch. SQLite is shared only by the
    /// processes of one host, whose wall clock it uses; PostgreSQL's is the server's clock, the
    /// one clock every host of a volume agrees on.
    pub fn now_ns(&self) -> Result<i64> {
        match &self.conn {
            TxConn::Sqlite(_) => Ok(wall_clock_ns()),
            TxConn::Postgres(_) => self.query_row(
                "SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000000 AS BIGINT)",
                (),
                |row| row.get(0),
            ),
        }
    }

    /// Publishes a change of `key`: holds the lock `key` until the transaction ends (publishers
    /// of one key commit one after the other from this point, so what they write next is in
    /// commit order) and notifies the [`PgListener`]s of every process at COMMIT. SQLite's
    /// writers are serialised already, and its waiters watch the data version
    /// ([`SqliteWatch`]) instead of notifications.
    pub fn publish(&self, key: &str) -> Result<()> {
        match self.conn {
            TxConn::Postgres(_) => postgres_db::publish(self, key),
            TxConn::Sqlite(_) => Ok(()),
        }
    }

    fn table_exists(&self, table: &str) -> Result<bool> {
        match self.conn {
            TxConn::Sqlite(_) => self.query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
                params![table],
                |row| row.get(0),
            ),
            TxConn::Postgres(_) => self.query_row(
                "SELECT to_regclass(?1) IS NOT NULL",
                params![table],
                |row| row.get(0),
            ),
        }
    }
}

/// A statement of a transaction (see [`Tx::prepare_cached`]).
pub struct Stmt<'t, 'a> {
    tx: &'t Tx<'a>,
    sql: String,
}

impl Stmt<'_, '_> {
    pub fn execute(&mut self, params: impl Params) -> Result<usize> {
        self.tx.execute(&self.sql, params)
    }

    pub fn query_row<T>(
        &mut self,
        params: impl Params,
        f: impl FnOnce(&Row) -> Result<T>,
    ) -> Result<T> {
        self.tx.query_row(&self.sql, params, f)
    }

    pub fn query_map<T>(
        &mut self,
        params: impl Params,
        f: impl FnMut(&Row) -> Result<T>,
    ) -> Result<std::vec::IntoIter<Result<T>>> {
        self.tx.query_map(&self.sql, params, f)
    }
}

/// This host's wall clock, in nanoseconds since the Unix epoch.
pub fn wall_clock_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}
