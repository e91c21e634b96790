//! Versioned schema. `MIGRATIONS[i]` takes the database from version `i` to `i + 1`; applied
//! versions are recorded in `schema_migrations`. The SQL sticks to types and constraints that
//! PostgreSQL understands too (BIGINT, BLOB → BYTEA, ON CONFLICT), apart from SQLite's
//! `INTEGER PRIMARY KEY [AUTOINCREMENT]` row ids (BIGSERIAL / identity columns there).

use rusqlite::{Connection, TransactionBehavior};

use super::wall_clock_ns;
use crate::{MetaError, Result};

pub const MIGRATIONS: &[&str] = &[V1_INITIAL, V2_VERSIONS_LEASES, V3_CHANGE_LOG];

/// Kind codes stored in `inodes.kind` and `dentries.kind` (see `namespace::kind_code`):
/// 1 regular, 2 directory, 3 symlink, 4 fifo, 5 socket, 6 char device, 7 block device.
const V1_INITIAL: &str = "
CREATE TABLE volume (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    name TEXT NOT NULL,
    uuid TEXT NOT NULL,
    chunk_size BIGINT NOT NULL,
    block_size BIGINT NOT NULL,
    inline_threshold BIGINT NOT NULL,
    created_ns BIGINT NOT NULL
);

CREATE TABLE counters (
    name TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO counters (name, value) VALUES
    ('next_ino', 2), ('next_slice', 1), ('used_bytes', 0), ('used_inodes', 0);

CREATE TABLE inodes (
    ino INTEGER PRIMARY KEY,
    kind SMALLINT NOT NULL,
    perm INTEGER NOT NULL,
    uid BIGINT NOT NULL,
    gid BIGINT NOT NULL,
    nlink BIGINT NOT NULL,
    size BIGINT NOT NULL,
    rdev BIGINT NOT NULL,
    atime_ns BIGINT NOT NULL,
    mtime_ns BIGINT NOT NULL,
    ctime_ns BIGINT NOT NULL,
    parent BIGINT NOT NULL,
    inline_data BLOB NULL,
    target BLOB NULL
);

-- cookie: the readdir offset of the entry (plus 2, for . and ..); AUTOINCREMENT never reuses one.
CREATE TABLE dentries (
    cookie INTEGER PRIMARY KEY AUTOINCREMENT,
    parent BIGINT NOT NULL REFERENCES inodes (ino),
    name BLOB NOT NULL,
    ino BIGINT NOT NULL REFERENCES inodes (ino),
    kind SMALLINT NOT NULL,
    UNIQUE (parent, name)
);
CREATE INDEX dentries_by_parent_cookie ON dentries (parent, cookie);
CREATE INDEX dentries_by_ino ON dentries (ino);

-- seq orders the slices of a chunk by commit.
CREATE TABLE chunk_slices (
    seq INTEGER PRIMARY KEY,
    ino BIGINT NOT NULL REFERENCES inodes (ino),
    chunk BIGINT NOT NULL,
    id BIGINT NOT NULL,
    size BIGINT NOT NULL,
    off BIGINT NOT NULL,
    len BIGINT NOT NULL,
    pos BIGINT NOT NULL
);
CREATE INDEX chunk_slices_by_chunk ON chunk_slices (ino, chunk, seq);
CREATE INDEX chunk_slices_by_id ON chunk_slices (id);

CREATE TABLE garbage (
    id BIGINT PRIMARY KEY,
    size BIGINT NOT NULL,
    since_ns BIGINT NOT NULL
);
CREATE INDEX garbage_by_since ON garbage (since_ns);

CREATE TABLE xattrs (
    ino BIGINT NOT NULL REFERENCES inodes (ino) ON DELETE CASCADE,
    name BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (ino, name)
);

CREATE TABLE sessions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    host TEXT NOT NULL,
    pid BIGINT NOT NULL,
    mount_point TEXT NOT NULL,
    started_ns BIGINT NOT NULL,
    heartbeat_ns BIGINT NOT NULL
);

-- Inodes without links kept alive because a session still has them open.
CREATE TABLE sustained (
    session BIGINT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    ino BIGINT NOT NULL REFERENCES inodes (ino) ON DELETE CASCADE,
    PRIMARY KEY (session, ino)
);
CREATE INDEX sustained_by_ino ON sustained (ino);

-- Lock owners are kernel hashes (u64) stored as their two's complement BIGINT, like range ends.
CREATE TABLE flocks (
    ino BIGINT NOT NULL REFERENCES inodes (ino) ON DELETE CASCADE,
    session BIGINT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    owner BIGINT NOT NULL,
    kind SMALLINT NOT NULL,
    PRIMARY KEY (ino, session, owner)
);
CREATE INDEX flocks_by_session ON flocks (session);

CREATE TABLE plocks (
    ino BIGINT NOT NULL REFERENCES inodes (ino) ON DELETE CASCADE,
    session BIGINT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    owner BIGINT NOT NULL,
    range_start BIGINT NOT NULL,
    range_end BIGINT NOT NULL,
    kind SMALLINT NOT NULL,
    pid BIGINT NOT NULL
);
CREATE INDEX plocks_by_ino ON plocks (ino);
CREATE INDEX plocks_by_session ON plocks (session);
";

/// The per-inode data version (bumped by every content change: layouts and page caches are
/// cached against it), leases of background work, open files of every session (an unlink on any
/// mount keeps an inode another mount has open; the sustained rows of V1 were such opens), and no
/// flock table (flock(2) reaches the engine as whole-file POSIX locks).
const V2_VERSIONS_LEASES: &str = "
ALTER TABLE inodes ADD COLUMN data_version BIGINT NOT NULL DEFAULT 0;

ALTER TABLE sustained RENAME TO open_files;
DROP INDEX sustained_by_ino;
CREATE INDEX open_files_by_ino ON open_files (ino);

CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    session BIGINT NOT NULL,
    expires_ns BIGINT NOT NULL
);

DROP TABLE flocks;
";

/// The change log (see `changes`): seq is assigned in commit order (writers are serialised by
/// `BEGIN IMMEDIATE`; AUTOINCREMENT never reuses a trimmed seq); `trimmed_changes` is the highest
/// seq trimmed, so a watcher that had not read that far learns that it lost changes.
const V3_CHANGE_LOG: &str = "
CREATE TABLE changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    origin BIGINT NOT NULL,
    ino BIGINT NOT NULL,
    parent BIGINT NULL,
    name BLOB NULL,
    at_ns BIGINT NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000000 AS INTEGER))
);
CREATE INDEX changes_by_time ON changes (at_ns);
INSERT INTO counters (name, value) VALUES ('trimmed_changes', 0);
";

/// Brings the database up to `migrations.len()`, in one transaction (concurrent openers queue on
/// `BEGIN IMMEDIATE`, the second one finds nothing left to do). Refuses a database written by a
/// newer binary.
pub fn migrate(conn: &mut Connection, migrations: &[&str]) -> Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_ns BIGINT NOT NULL)",
    )?;
    let current: i64 = tx.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        [],
        |row| row.get(0),
    )?;
    let known = migrations.len() as i64;
    if current > known {
        return Err(MetaError::Engine(format!(
            "metadata schema version {current} is newer than this binary supports ({known}); upgrade cellar"
        )));
    }
    for (index, sql) in migrations.iter().enumerate().skip(current as usize) {
        let version = index as i64 + 1;
        tx.execute_batch(sql)
            .map_err(|e| MetaError::Engine(format!("metadata schema migration {version}: {e}")))?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_ns) VALUES (?1, ?2)",
            (version, wall_clock_ns()),
        )?;
        tracing::info!(version, "applied metadata schema migration");
    }
    tx.commit()?;
    Ok(())
}

/// The schema version recorded in the database.
#[cfg(test)]
pub fn version(conn: &Connection) -> Result<i64> {
    Ok(conn.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        [],
        |row| row.get(0),
    )?)
}
