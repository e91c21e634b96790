//! Versioned schema, per dialect (see [`cellar_sql::Migrations`]): the tables and columns are
//! the same, so one SQL text of each operation serves both. SQLite keeps its history (a database
//! of an older binary is migrated); PostgreSQL starts at the current schema. Differences:
//! SQLite's `INTEGER PRIMARY KEY [AUTOINCREMENT]` row ids are identity columns on PostgreSQL,
//! BLOB is BYTEA, and every PostgreSQL integer is BIGINT (values are bound as 64-bit).

pub const MIGRATIONS: cellar_sql::Migrations<'static> = cellar_sql::Migrations {
    sqlite: &[
        V1_INITIAL,
        V2_VERSIONS_LEASES,
        V3_CHANGE_LOG,
        V4_USAGE_SHARDS,
        V5_HELD_BYTES,
        V6_FORKS,
        V7_CHANGE_KINDS,
    ],
    postgres: &[PG_V1, PG_V2_HELD_BYTES, V6_FORKS, PG_V4_CHANGE_KINDS],
};

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

/// Usage counters spread over 64 rows (see `rows::add_usage`): concurrent writers rarely update
/// the same one.
const V4_USAGE_SHARDS: &str = "
CREATE TABLE usage_shards (
    shard BIGINT PRIMARY KEY,
    bytes BIGINT NOT NULL,
    inodes BIGINT NOT NULL
);
WITH RECURSIVE n (shard) AS (SELECT 0 UNION ALL SELECT shard + 1 FROM n WHERE shard < 63)
INSERT INTO usage_shards (shard, bytes, inodes) SELECT shard, 0, 0 FROM n;
UPDATE usage_shards SET
    bytes = (SELECT value FROM counters WHERE name = 'used_bytes'),
    inodes = (SELECT value FROM counters WHERE name = 'used_inodes')
    WHERE shard = 0;
DELETE FROM counters WHERE name IN ('used_bytes', 'used_inodes');
";

/// Held bytes per inode (the bytes of a file that really hold data: `st_blocks` and usage count
/// them, not the size) and the volume's byte quota (a `counters` row, absent without a quota).
/// Held bytes need the slices' overlaps, which SQL cannot resolve: the `held_recount` row makes
/// the next open compute them and the usage (`data::recount_held`) and deletes itself.
const V5_HELD_BYTES: &str = "
ALTER TABLE inodes ADD COLUMN held BIGINT NOT NULL DEFAULT 0;
INSERT INTO counters (name, value) VALUES ('held_recount', 1);
";

/// Forks and snapshots (see `fork`): the ancestors whose objects hold the slices below each
/// `below`, and the volumes forked from this one, whose slices below `frozen_below` its gc keeps.
/// The same text serves PostgreSQL.
const V6_FORKS: &str = "
CREATE TABLE lineage (
    below BIGINT PRIMARY KEY,
    uuid TEXT NOT NULL,
    volume TEXT NOT NULL
);
CREATE TABLE descendants (
    volume TEXT PRIMARY KEY,
    frozen_below BIGINT NOT NULL,
    created_ns BIGINT NOT NULL
);
";

/// The PostgreSQL schema, one per volume: the tables of SQLite's V1..V4. Changes: `seq` comes
/// from the identity's sequence (never rolled back: no conflict between writers), taken after
/// the volume's lock in the transaction's last statements so that seqs follow commit order.
const PG_V1: &str = "
CREATE TABLE volume (
    id BIGINT PRIMARY KEY CHECK (id = 1),
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
    ('next_ino', 2), ('next_slice', 1), ('trimmed_changes', 0);

CREATE TABLE usage_shards (
    shard BIGINT PRIMARY KEY,
    bytes BIGINT NOT NULL,
    inodes BIGINT NOT NULL
);
INSERT INTO usage_shards (shard, bytes, inodes) SELECT g, 0, 0 FROM generate_series(0, 63) g;

CREATE TABLE inodes (
    ino BIGINT PRIMARY KEY,
    kind BIGINT NOT NULL,
    perm BIGINT NOT NULL,
    uid BIGINT NOT NULL,
    gid BIGINT NOT NULL,
    nlink BIGINT NOT NULL,
    size BIGINT NOT NULL,
    rdev BIGINT NOT NULL,
    atime_ns BIGINT NOT NULL,
    mtime_ns BIGINT NOT NULL,
    ctime_ns BIGINT NOT NULL,
    parent BIGINT NOT NULL,
    inline_data BYTEA NULL,
    target BYTEA NULL,
    data_version BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE dentries (
    cookie BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    parent BIGINT NOT NULL REFERENCES inodes (ino),
    name BYTEA NOT NULL,
    ino BIGINT NOT NULL REFERENCES inodes (ino),
    kind BIGINT NOT NULL,
    UNIQUE (parent, name)
);
CREATE INDEX dentries_by_parent_cookie ON dentries (parent, cookie);
CREATE INDEX dentries_by_ino ON dentries (ino);

CREATE TABLE chunk_slices (
    seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
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
    name BYTEA NOT NULL,
    value BYTEA NOT NULL,
    PRIMARY KEY (ino, name)
);

CREATE TABLE sessions (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    host TEXT NOT NULL,
    pid BIGINT NOT NULL,
    mount_point TEXT NOT NULL,
    started_ns BIGINT NOT NULL,
    heartbeat_ns BIGINT NOT NULL
);

CREATE TABLE open_files (
    session BIGINT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    ino BIGINT NOT NULL REFERENCES inodes (ino) ON DELETE CASCADE,
    PRIMARY KEY (session, ino)
);
CREATE INDEX open_files_by_ino ON open_files (ino);

CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    session BIGINT NOT NULL,
    expires_ns BIGINT NOT NULL
);

CREATE TABLE plocks (
    ino BIGINT NOT NULL REFERENCES inodes (ino) ON DELETE CASCADE,
    session BIGINT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    owner BIGINT NOT NULL,
    range_start BIGINT NOT NULL,
    range_end BIGINT NOT NULL,
    kind BIGINT NOT NULL,
    pid BIGINT NOT NULL
);
CREATE INDEX plocks_by_ino ON plocks (ino);
CREATE INDEX plocks_by_session ON plocks (session);

CREATE TABLE changes (
    seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    origin BIGINT NOT NULL,
    ino BIGINT NOT NULL,
    parent BIGINT NULL,
    name BYTEA NULL,
    at_ns BIGINT NOT NULL DEFAULT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000000 AS BIGINT)
);
CREATE INDEX changes_by_time ON changes (at_ns);
";

/// As SQLite's V5.
const PG_V2_HELD_BYTES: &str = V5_HELD_BYTES;

/// What each change was (see `ChangeKind::code`; 0 for the rows of older binaries), the kind
/// code of the file it concerns, and a rename's source entry: change events name paths and
/// kinds from them (see `changes::path_changes_since`).
const V7_CHANGE_KINDS: &str = "
ALTER TABLE changes ADD COLUMN kind SMALLINT NOT NULL DEFAULT 0;
ALTER TABLE changes ADD COLUMN node SMALLINT NULL;
ALTER TABLE changes ADD COLUMN old_parent BIGINT NULL;
ALTER TABLE changes ADD COLUMN old_name BLOB NULL;
";

/// As SQLite's V7.
const PG_V4_CHANGE_KINDS: &str = "
ALTER TABLE changes ADD COLUMN kind BIGINT NOT NULL DEFAULT 0;
ALTER TABLE changes ADD COLUMN node BIGINT NULL;
ALTER TABLE changes ADD COLUMN old_parent BIGINT NULL;
ALTER TABLE changes ADD COLUMN old_name BYTEA NULL;
";
