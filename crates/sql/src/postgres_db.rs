//! PostgreSQL: one connection pool per process per database, shared by every [`PgDb`] (every
//! volume) opened on it, and one LISTEN connection per process per database.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use parking_lot::{Condvar, Mutex};
use postgres::error::SqlState;
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use postgres::{Client, NoTls, Statement};

use crate::{Condition, Error, Result, Row, Tx, Value};

/// Connections per pool unless the URL says `pool_size=N`.
const DEFAULT_POOL_SIZE: usize = 16;
/// How long a transaction waits for a free connection of a full pool.
const POOL_WAIT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Runs of a transaction that keeps losing races before its last error is returned.
const MAX_ATTEMPTS: u32 = 64;
/// Upper bound of the random pause before a re-run (it grows from 1 ms with each attempt).
const MAX_BACKOFF: Duration = Duration::from_millis(50);
/// The channel every change notification goes to; the payload names what changed.
const CHANNEL: &str = "cellar_changes";
/// The listener checks that its quiet connection still works this often.
const LISTENER_PING: Duration = Duration::from_secs(2);
/// The listener's `application_name` (operators find it in `pg_stat_activity`).
pub const LISTENER_NAME: &str = "cellar-listen";
/// `subscribe` waits this long for the listener's first connection.
const LISTENER_START: Duration = Duration::from_secs(10);

/// A PostgreSQL URL, `postgres://USER:PASS@HOST:PORT/DB?volume=ID&pool_size=N`: Cellar's own
/// parameters (`volume`, `pool_size`) are taken out; the rest is the database's address, which
/// keys this process's pool for it. Never shown with its password ([`PgUrl::redacted`]).
#[derive(Clone)]
pub struct PgUrl {
    /// The URL without Cellar's parameters: the pool's key and connection string.
    database: String,
    redacted: String,
    volume: Option<String>,
    pool_size: usize,
}

impl std::fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl PgUrl {
    /// Parses a `postgres://` or `postgresql://` URL. Errors never quote the URL (it may hold a
    /// password).
    pub fn parse(url: &str) -> Result<PgUrl> {
        let mut parsed = url::Url::parse(url)
            .map_err(|e| Error::new(format!("invalid PostgreSQL URL {}: {e}", redact(url))))?;
        if !matches!(parsed.scheme(), "postgres" | "postgresql") {
            return Err(Error::new(format!(
                "{} is not a postgres:// URL",
                redact(url)
            )));
        }
        let mut volume = None;
        let mut pool_size = DEFAULT_POOL_SIZE;
        let mut rest = Vec::new();
        for (key, value) in parsed.query_pairs() {
            match key.as_ref() {
                "volume" => volume = Some(value.into_owned()),
                "pool_size" => {
                    pool_size = value.parse().ok().filter(|size| *size > 0).ok_or_else(|| {
                        Error::new(format!("pool_size={value}: expected a positive number"))
                    })?
                }
                _ => rest.push((key.into_owned(), value.into_owned())),
            }
        }
        if rest.is_empty() {
            parsed.set_query(None);
        } else {
            parsed.query_pairs_mut().clear().extend_pairs(rest);
        }
        let database = parsed.to_string();
        Ok(PgUrl {
            redacted: redact(&database),
            database,
            volume,
            pool_size,
        })
    }

    /// The `volume` parameter, if any.
    pub fn volume(&self) -> Option<&str> {
        self.volume.as_deref()
    }

    /// The database's URL with the password replaced by `***`, for messages and logs.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }
}

/// `postgres://user:***@host/db`: the URL without its password (or unchanged if it has none or
/// is no URL at all; an unparsable one is cut at its `@`).
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => match url.rfind('@') {
            Some(at) => format!("***{}", &url[at..]),
            None => url.to_string(),
        },
    }
}

fn error(e: postgres::Error) -> Error {
    let retryable = matches!(
        e.code(),
        Some(&SqlState::T_R_SERIALIZATION_FAILURE) | Some(&SqlState::T_R_DEADLOCK_DETECTED)
    );
    // Class 08 (connection exception), 57P01..57P03 (the server shutting down or restarting),
    // or no answer at all.
    let connection_lost = e.is_closed()
        || std::error::Error::source(&e).is_some_and(|source| source.is::<std::io::Error>())
        || e.code().is_some_and(|code| {
            code.code().starts_with("08")
                || [
                    SqlState::ADMIN_SHUTDOWN,
                    SqlState::CRASH_SHUTDOWN,
                    SqlState::CANNOT_CONNECT_NOW,
                ]
                .contains(code)
        });
    let condition = match e.code() {
        // lock_timeout: another session held a lock this long.
        Some(&SqlState::LOCK_NOT_AVAILABLE) => Condition::LockTimeout,
        Some(&SqlState::DISK_FULL) => Condition::DiskFull,
        _ => Condition::Failed,
    };
    let message = match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => match std::error::Error::source(&e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    };
    Error {
        message,
        condition,
        retryable,
        connection_lost,
        no_rows: false,
    }
}

/// One connection with its prepared statements (by the caller's SQL text).
pub(crate) struct PgConn {
    client: Client,
    statements: HashMap<String, Statement>,
}

impl PgConn {
    fn prepare(&mut self, sql: &str) -> Result<Statement> {
        if let Some(stmt) = self.statements.get(sql) {
            return Ok(stmt.clone());
        }
        let stmt = self.client.prepare(&placeholders(sql)).map_err(error)?;
        self.statements.insert(sql.to_string(), stmt.clone());
        Ok(stmt)
    }

    pub(crate) fn execute(&mut self, sql: &str, params: &[Value]) -> Result<usize> {
        let stmt = self.prepare(sql)?;
        let bound = bind(params)?;
        let refs: Vec<&(dyn ToSql + Sync)> =
            bound.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        Ok(self.client.execute(&stmt, &refs).map_err(error)? as usize)
    }

    pub(crate) fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>> {
        let stmt = self.prepare(sql)?;
        let bound = bind(params)?;
        let refs: Vec<&(dyn ToSql + Sync)> =
            bound.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        let rows = self.client.query(&stmt, &refs).map_err(error)?;
        rows.iter().map(row_values).collect()
    }

    pub(crate) fn batch(&mut self, sql: &str) -> Result<()> {
        self.client.batch_execute(sql).map_err(error)
    }
}

/// `?N` → `$N` (outside quoted strings and identifiers).
fn placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quote = None;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), _) if q == c => quote = None,
            (None, '?') if chars.peek().is_some_and(char::is_ascii_digit) => {
                out.push('$');
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
    out
}

/// A [`Value`] bound to a PostgreSQL parameter of whatever integer width the statement wants.
#[derive(Debug)]
struct Bound(Value);

fn bind(params: &[Value]) -> Result<Vec<Bound>> {
    params
        .iter()
        .map(|value| {
            value.int()?; // refuses unsigned values out of range
            Ok(Bound(value.clone()))
        })
        .collect()
}

impl ToSql for Bound {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match &self.0 {
            Value::Null => Ok(IsNull::Yes),
            Value::Text(s) => s.to_sql(ty, out),
            Value::Blob(b) => b.to_sql(ty, out),
            Value::Bool(b) if *ty == Type::BOOL => b.to_sql(ty, out),
            value => {
                let v = value.int()?.unwrap_or_default();
                match *ty {
                    Type::INT8 => v.to_sql(ty, out),
                    Type::INT4 => i32::try_from(v)?.to_sql(ty, out),
                    Type::INT2 => i16::try_from(v)?.to_sql(ty, out),
                    Type::BOOL => (v != 0).to_sql(ty, out),
                    _ => Err(format!("cannot bind an integer to a {ty} parameter").into()),
                }
            }
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

fn row_values(row: &postgres::Row) -> Result<Row> {
    let values = row
        .columns()
        .iter()
        .enumerate()
        .map(|(i, column)| {
            let ty = column.type_();
            let convert = |e: postgres::Error| error(e);
            Ok(match *ty {
                Type::INT8 => row
                    .try_get::<_, Option<i64>>(i)
                    .map_err(convert)?
                    .map(Value::Int),
                Type::INT4 => row
                    .try_get::<_, Option<i32>>(i)
                    .map_err(convert)?
                    .map(|v| Value::Int(v.into())),
                Type::INT2 => row
                    .try_get::<_, Option<i16>>(i)
                    .map_err(convert)?
                    .map(|v| Value::Int(v.into())),
                Type::BOOL => row
                    .try_get::<_, Option<bool>>(i)
                    .map_err(convert)?
                    .map(Value::Bool),
                Type::BYTEA => row
                    .try_get::<_, Option<Vec<u8>>>(i)
                    .map_err(convert)?
                    .map(Value::Blob),
                Type::TEXT | Type::VARCHAR | Type::NAME | Type::BPCHAR => row
                    .try_get::<_, Option<String>>(i)
                    .map_err(convert)?
                    .map(Value::Text),
                _ => {
                    return Err(Error::new(format!(
                        "column {} has type {ty}, which the SQL layer does not read (cast it)",
                        column.name()
                    )))
                }
            }
            .unwrap_or(Value::Null))
        })
        .collect::<Result<_>>()?;
    Ok(Row { values })
}

struct PgPool {
    config: postgres::Config,
    redacted: String,
    max: usize,
    state: Mutex<PoolState>,
    freed: Condvar,
    listener: OnceLock<Arc<PgListener>>,
}

#[derive(Default)]
struct PoolState {
    idle: Vec<PgConn>,
    /// Connections open, idle or in use.
    total: usize,
}

/// This process's pools, by database URL (without Cellar's parameters): 10,000 volumes of one
/// database share one pool.
static POOLS: LazyLock<Mutex<HashMap<String, Arc<PgPool>>>> = LazyLock::new(Default::default);

fn pool_for(url: &PgUrl) -> Result<Arc<PgPool>> {
    let mut pools = POOLS.lock();
    if let Some(pool) = pools.get(&url.database) {
        return Ok(pool.clone());
    }
    let mut config: postgres::Config = url
        .database
        .parse()
        .map_err(|e| Error::new(format!("{}: {}", url.redacted, error(e))))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("cellar");
    }
    let pool = Arc::new(PgPool {
        config,
        redacted: url.redacted.clone(),
        max: url.pool_size,
        state: Mutex::default(),
        freed: Condvar::new(),
        listener: OnceLock::new(),
    });
    pools.insert(url.database.clone(), pool.clone());
    Ok(pool)
}

impl PgPool {
    fn connect(&self) -> Result<Client> {
        self.config
            .connect(NoTls)
            .map_err(|e| error(e).context(format_args!("cannot connect to {}", self.redacted)))
    }

    fn get(&self) -> Result<Pooled<'_>> {
        let deadline = Instant::now() + POOL_WAIT;
        let mut state = self.state.lock();
        loop {
            if let Some(conn) = state.idle.pop() {
                return Ok(Pooled {
                    pool: self,
                    conn: Some(conn),
                    fresh: false,
                });
            }
            if state.total < self.max {
                state.total += 1;
                drop(state);
                return match self.connect() {
                    Ok(client) => Ok(Pooled {
                        pool: self,
                        conn: Some(PgConn {
                            client,
                            statements: HashMap::new(),
                        }),
                        fresh: true,
                    }),
                    Err(e) => {
                        self.state.lock().total -= 1;
                        self.freed.notify_one();
                        Err(e)
                    }
                };
            }
            if self.freed.wait_until(&mut state, deadline).timed_out() {
                return Err(Error::new(format!(
                    "no free connection to {} within {POOL_WAIT:?} ({} in use; raise pool_size)",
                    self.redacted, self.max
                )));
            }
        }
    }
}

/// A connection taken from the pool; goes back when dropped, unless it broke.
struct Pooled<'a> {
    pool: &'a PgPool,
    conn: Option<PgConn>,
    /// Connected for this transaction (not taken idle from the pool).
    fresh: bool,
}

impl Pooled<'_> {
    fn conn(&mut self) -> &mut PgConn {
        self.conn.as_mut().expect("taken until dropped")
    }

    /// Drops a connection whose state is unknown (a failed ROLLBACK).
    fn discard(&mut self) {
        self.conn = None;
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        let mut state = self.pool.state.lock();
        match self.conn.take() {
            Some(conn) if !conn.client.is_closed() => state.idle.push(conn),
            _ => state.total -= 1,
        }
        self.pool.freed.notify_one();
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Write,
    /// A write that first locks out every other writer of one table (`LOCK TABLE` runs before
    /// the transaction's snapshot is taken, so no writer that commits first can make it lose).
    WriteExcluding(&'static str),
    Read,
    /// READ COMMITTED, behind a lock on the schema: each statement sees what the migrator before
    /// it committed.
    Migrate,
}

pub(crate) struct PgDb {
    pool: Arc<PgPool>,
    /// The schema (quoted) set as `search_path` of every transaction, and its name.
    schema: Option<(String, String)>,
}

pub(crate) fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl PgDb {
    pub(crate) fn open(url: &PgUrl, schema: Option<&str>) -> Result<PgDb> {
        Ok(PgDb {
            pool: pool_for(url)?,
            schema: schema.map(|name| (quote_identifier(name), name.to_string())),
        })
    }

    pub(crate) fn describe(&self) -> String {
        match &self.schema {
            Some((_, name)) => format!("{} (schema {name})", self.pool.redacted),
            None => self.pool.redacted.clone(),
        }
    }

    pub(crate) fn listener(&self) -> Arc<PgListener> {
        self.pool
            .listener
            .get_or_init(|| PgListener::start(self.pool.config.clone(), self.pool.redacted.clone()))
            .clone()
    }

    /// Creates the schema (if any) under a lock that orders concurrent migrators.
    pub(crate) fn prepare_schema(&self, tx: &Tx<'_>) -> Result<()> {
        let key = self.schema.as_ref().map_or("", |(_, name)| name.as_str());
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext(?1))",
            crate::params![format!("cellar-migrate:{key}")],
        )?;
        if let Some((quoted, _)) = &self.schema {
            tx.batch(&format!("CREATE SCHEMA IF NOT EXISTS {quoted}"))?;
        }
        Ok(())
    }

    pub(crate) fn transaction<T, E: From<Error>>(
        &self,
        mode: Mode,
        f: &mut dyn FnMut(&Tx<'_>) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let timeouts = crate::timeouts();
        let isolation = match mode {
            Mode::Write | Mode::WriteExcluding(_) => "BEGIN ISOLATION LEVEL SERIALIZABLE",
            Mode::Read => "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
            Mode::Migrate => "BEGIN ISOLATION LEVEL READ COMMITTED",
        };
        let mut begin = match &self.schema {
            Some((quoted, _)) => format!("{isolation}; SET LOCAL search_path TO {quoted}"),
            None => isolation.to_string(),
        };
        // Bounds every lock wait of the transaction (rows, tables, advisory locks).
        begin.push_str(&format!(
            "; SET LOCAL lock_timeout = {}",
            timeouts.lock.as_millis().clamp(1, i32::MAX as u128)
        ));
        if let Mode::WriteExcluding(table) = mode {
            begin.push_str(&format!("; LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE"));
        }
        let mut outage = Outage::new(timeouts.outage);
        let mut races = 0;
        loop {
            let mut pooled = match self.pool.get() {
                Ok(pooled) => pooled,
                Err(e) if e.connection_lost && outage.pause() => continue,
                Err(e) => return Err(outage.describe(e).into()),
            };
            if let Err(e) = pooled.conn().batch(&begin) {
                if e.connection_lost {
                    // An idle connection the server dropped (a restart): nothing was done yet,
                    // so take another one at once (at most the pool's worth); a new one that
                    // broke waits out the outage.
                    let fresh = pooled.fresh;
                    pooled.discard();
                    if !fresh || outage.pause() {
                        continue;
                    }
                    return Err(outage.describe(e).into());
                }
                // BEGIN may have opened a transaction that a later statement of the batch aborted.
                if pooled.conn().batch("ROLLBACK").is_err() {
                    pooled.discard();
                }
                return Err(e.into());
            }
            let (result, lost_race, lost_connection, failed) = {
                let tx = Tx::postgres(pooled.conn());
                let result = f(&tx);
                (
                    result,
                    tx.lost_race.get(),
                    tx.lost_connection.get(),
                    tx.failed.get(),
                )
            };
            // The error to return if the transaction is not re-run.
            let last: E = match result {
                // A statement that failed aborted the transaction (COMMIT would roll it back
                // without an error), even when the closure handled its error: roll back, and
                // re-run it if that statement lost a serialization race or its connection.
                Ok(_) if failed => {
                    if pooled.conn().batch("ROLLBACK").is_err() {
                        pooled.discard();
                    }
                    let e = Error {
                        connection_lost: lost_connection,
                        ..Error::new("a statement failed inside the transaction")
                    };
                    if !lost_race {
                        return Err(e.into());
                    }
                    e.into()
                }
                Ok(value) => match pooled.conn().batch("COMMIT") {
                    Ok(()) => return Ok(value),
                    // Whether a COMMIT whose connection broke committed is unknown: not re-run.
                    Err(e) if e.connection_lost || !e.retryable => return Err(e.into()),
                    Err(e) => e.into(),
                },
                Err(e) => {
                    if pooled.conn().batch("ROLLBACK").is_err() {
                        pooled.discard();
                    }
                    if !lost_race {
                        return Err(e);
                    }
                    e
                }
            };
            drop(pooled);
            if lost_connection {
                if !outage.pause() {
                    return Err(last);
                }
                continue;
            }
            races += 1;
            if races >= MAX_ATTEMPTS {
                return Err(last);
            }
            RETRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            cellar_metrics::meta_retry();
            let cap = Duration::from_millis(1 << races.min(16)).min(MAX_BACKOFF);
            std::thread::sleep(cap.mul_f64(rand::random::<f64>()));
        }
    }
}

/// The outage bound of one transaction: re-runs after a lost or refused connection stop
/// [`crate::Timeouts::outage`] after its first try.
struct Outage {
    bound: Duration,
    deadline: Instant,
    pauses: u32,
}

impl Outage {
    fn new(bound: Duration) -> Outage {
        Outage {
            bound,
            deadline: Instant::now() + bound,
            pauses: 0,
        }
    }

    /// Waits before the next try (0.1 s, doubling up to 1 s); false once the bound is spent.
    fn pause(&mut self) -> bool {
        let Some(left) = self.deadline.checked_duration_since(Instant::now()) else {
            return false;
        };
        self.pauses += 1;
        std::thread::sleep(Duration::from_millis(50 << self.pauses.min(5)).min(left));
        true
    }

    /// The error of a transaction that gave up on an outage.
    fn describe(&self, e: Error) -> Error {
        if self.pauses == 0 {
            return e;
        }
        e.context(format_args!(
            "the database stayed unreachable for {:?}",
            self.bound
        ))
    }
}

/// Drops `schema` and everything in it, if it exists.
pub fn destroy_schema(url: &PgUrl, schema: &str) -> Result<()> {
    let db = PgDb::open(url, None)?;
    db.transaction(Mode::Migrate, &mut |tx: &Tx<'_>| {
        tx.batch(&format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            quote_identifier(schema)
        ))
    })
}

/// Notifications of one key (a volume): a generation bumped by each notification of it and by
/// each reconnection of the listener (which may have missed some).
pub struct Signal {
    generation: Mutex<u64>,
    changed: Condvar,
}

impl Signal {
    pub fn generation(&self) -> u64 {
        *self.generation.lock()
    }

    /// Waits until the generation is past `seen`, or `deadline`.
    pub fn wait_past(&self, seen: u64, deadline: Instant) {
        let mut generation = self.generation.lock();
        while *generation == seen {
            if self
                .changed
                .wait_until(&mut generation, deadline)
                .timed_out()
            {
                return;
            }
        }
    }

    fn bump(&self) {
        *self.generation.lock() += 1;
        self.changed.notify_all();
    }
}

/// This process's LISTEN connection to one database (a thread): it wakes the waiters of the key
/// each notification names, and every waiter when it reconnects after losing its connection.
pub struct PgListener {
    signals: Mutex<HashMap<String, Arc<Signal>>>,
    connected: Mutex<bool>,
    connected_changed: Condvar,
}

impl PgListener {
    fn start(mut config: postgres::Config, redacted: String) -> Arc<PgListener> {
        config.application_name(LISTENER_NAME);
        let listener = Arc::new(PgListener {
            signals: Mutex::default(),
            connected: Mutex::new(false),
            connected_changed: Condvar::new(),
        });
        let weak = Arc::downgrade(&listener);
        std::thread::Builder::new()
            .name("cellar-pg-listen".into())
            .spawn(move || listen_loop(&config, &redacted, &weak))
            .expect("spawning the PostgreSQL listener thread");
        listener
    }

    /// The signal of `key`, once the listener is connected (or after a bounded wait, so a
    /// database that is down does not hang the caller; its waiters then time out or are woken at
    /// the reconnection).
    pub fn subscribe(&self, key: &str) -> Arc<Signal> {
        let signal = self
            .signals
            .lock()
            .entry(key.to_string())
            .or_insert_with(|| {
                Arc::new(Signal {
                    generation: Mutex::new(0),
                    changed: Condvar::new(),
                })
            })
            .clone();
        let deadline = Instant::now() + LISTENER_START;
        let mut connected = self.connected.lock();
        while !*connected {
            if self
                .connected_changed
                .wait_until(&mut connected, deadline)
                .timed_out()
            {
                break;
            }
        }
        signal
    }

    fn wake(&self, key: &str) {
        if let Some(signal) = self.signals.lock().get(key) {
            signal.bump();
        }
    }

    fn wake_all(&self) {
        for signal in self.signals.lock().values() {
            signal.bump();
        }
    }

    fn set_connected(&self, connected: bool) {
        *self.connected.lock() = connected;
        self.connected_changed.notify_all();
    }
}

/// See [`Tx::publish`]: one statement, the lock and the notification (sent at COMMIT).
pub(crate) fn publish(tx: &Tx<'_>, key: &str) -> Result<()> {
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext(?1)), pg_notify(?2, ?1)",
        crate::params![key, CHANNEL],
    )?;
    Ok(())
}

/// Transactions of this process re-run after losing a race (serialization failure, deadlock).
pub fn retries() -> u64 {
    RETRIES.load(std::sync::atomic::Ordering::Relaxed)
}

static RETRIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn listen_loop(config: &postgres::Config, redacted: &str, listener: &std::sync::Weak<PgListener>) {
    let mut failures = 0u32;
    loop {
        let session = config.connect(NoTls).and_then(|mut client| {
            client
                .batch_execute(&format!("LISTEN {CHANNEL}"))
                .map(|()| client)
        });
        match session {
            Ok(mut client) => {
                failures = 0;
                let Some(strong) = listener.upgrade() else {
                    return;
                };
                strong.set_connected(true);
                // Whatever was committed while not listening: waiters re-read the log.
                strong.wake_all();
                drop(strong);
                let reason = listen(&mut client, listener);
                match reason {
                    None => return, // nobody left to wake
                    Some(e) => {
                        tracing::warn!(database = %redacted, error = %e, "PostgreSQL listener lost its connection; reconnecting")
                    }
                }
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(30) {
                    tracing::warn!(database = %redacted, error = %error(e), "PostgreSQL listener cannot connect; retrying");
                }
            }
        }
        let Some(strong) = listener.upgrade() else {
            return;
        };
        strong.set_connected(false);
        strong.wake_all();
        drop(strong);
        std::thread::sleep(Duration::from_millis(100 * u64::from(failures.min(10))));
    }
}

/// Delivers notifications until the connection fails (returns why) or the listener is gone
/// (returns `None`).
fn listen(client: &mut Client, listener: &std::sync::Weak<PgListener>) -> Option<Error> {
    loop {
        {
            let mut notifications = client.notifications();
            let mut iter = notifications.timeout_iter(LISTENER_PING);
            loop {
                match iter.next() {
                    Ok(Some(notification)) => listener.upgrade()?.wake(notification.payload()),
                    Ok(None) => break,
                    Err(e) => return Some(error(e)),
                }
            }
        }
        listener.upgrade()?;
        // Quiet for a while: make sure the connection is still there (a dead peer shows no
        // error until we send something).
        if let Err(e) = client.simple_query("SELECT 1") {
            return Some(error(e));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_dollar_numbers_outside_quotes() {
        assert_eq!(
            placeholders("SELECT ?1, '?2', \"a?3\" WHERE x = ?12"),
            "SELECT $1, '?2', \"a?3\" WHERE x = $12"
        );
    }

    #[test]
    fn urls_lose_cellar_parameters_and_passwords_in_messages() {
        let url = PgUrl::parse(
            "postgres://cellar:s3cret@db.example:5433/meta?volume=v1&pool_size=4&sslmode=disable",
        )
        .unwrap();
        assert_eq!(url.volume(), Some("v1"));
        assert_eq!(url.pool_size, 4);
        assert_eq!(
            url.database,
            "postgres://cellar:s3cret@db.example:5433/meta?sslmode=disable"
        );
        assert_eq!(
            url.redacted(),
            "postgres://cellar:***@db.example:5433/meta?sslmode=disable"
        );
        assert!(!format!("{url:?}").contains("s3cret"));
        let bad = PgUrl::parse("postgres://u:pw@h/db?pool_size=0")
            .err()
            .unwrap();
        assert!(!bad.to_string().contains("pw@"), "{bad}");
        let bad = PgUrl::parse("mysql://u:pw@h/db").err().unwrap();
        assert!(!bad.to_string().contains(":pw"), "{bad}");
        assert_eq!(redact("not a url u:pw@host"), "***@host");
    }
}
