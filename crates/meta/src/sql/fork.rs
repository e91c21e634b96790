//! Forks and snapshots: a new volume that starts as a copy of this one's metadata and shares
//! its stored objects (slices are immutable, so nothing is copied in the store).
//!
//! - The fork's `lineage` says which ancestor's objects hold which of its slices: ids below the
//!   origin's next slice id at fork time are the origin's (or, below the origin's own bounds,
//!   the origin's ancestors'); the fork continues numbering from there, under its own prefix.
//! - The origin's `descendants` row of the fork keeps the origin's gc from deleting objects of
//!   slices below `frozen_below` (the fork may reference them) until the fork is released.
//! - Both are written in the transaction that copies, so no slice the copy saw can be
//!   collected in between.

use cellar_sql::{params, OptionalExtension};

use super::changes::Tx;
use crate::{Ancestor, ForkSpec, ForkStats, Result};

/// The `counters` row that marks a snapshot (present: mounts are read-only).
const READ_ONLY: &str = "read_only";

/// The tables copied as they are (the fork's inodes that still have links, with their
/// entries, layouts and xattrs). Sessions, open files, locks, leases, garbage and the change
/// log start empty: they belong to the origin's mounts and objects.
const COPIES: &[&str] = &[
    "INSERT INTO {t}inodes SELECT * FROM inodes WHERE nlink > 0",
    "INSERT INTO {t}dentries SELECT * FROM dentries",
    "INSERT INTO {t}chunk_slices SELECT * FROM chunk_slices \
     WHERE ino IN (SELECT ino FROM inodes WHERE nlink > 0)",
    "INSERT INTO {t}xattrs SELECT * FROM xattrs WHERE ino IN (SELECT ino FROM inodes WHERE nlink > 0)",
    "INSERT INTO {t}lineage SELECT * FROM lineage",
    // Counters (next ids, quota) but not the change log's nor the snapshot mark.
    "DELETE FROM {t}counters WHERE name <> 'trimmed_changes'",
    "INSERT INTO {t}counters (name, value) SELECT name, value FROM counters \
     WHERE name NOT IN ('trimmed_changes', 'read_only')",
    "DELETE FROM {t}usage_shards",
    "INSERT INTO {t}usage_shards SELECT * FROM usage_shards",
    // Inodes without links (kept for the origin's openers) are not the fork's.
    "UPDATE {t}usage_shards SET \
       bytes = bytes - (SELECT COALESCE(SUM(held), 0) FROM inodes WHERE nlink = 0), \
       inodes = inodes - (SELECT COUNT(*) FROM inodes WHERE nlink = 0) \
     WHERE shard = 0",
];

/// The ancestors of this volume, in ascending order of bound.
pub fn lineage(conn: &Tx<'_, '_>) -> Result<Vec<Ancestor>> {
    Ok(conn
        .prepare_cached("SELECT below, uuid, volume FROM lineage ORDER BY below")?
        .query_map((), |row| {
            Ok(Ancestor {
                below: row.get::<_, i64>(0)? as u64,
                uuid: row.get(1)?,
                volume: row.get(2)?,
            })
        })?
        .collect::<cellar_sql::Result<_>>()?)
}

pub fn read_only(conn: &Tx<'_, '_>) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM counters WHERE name = ?1")?
        .query_row([READ_ONLY], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Copies this volume into the empty, migrated schema whose tables `target` prefixes
/// (`fork.` for an attached SQLite file, `"vol_x".` for a PostgreSQL schema), and registers it
/// as a descendant. Runs in the origin's write transaction.
pub fn copy_into(conn: &Tx<'_, '_>, target: &str, fork: &ForkSpec) -> Result<ForkStats> {
    let next_slice: i64 = conn
        .prepare_cached("SELECT value FROM counters WHERE name = 'next_slice'")?
        .query_row((), |row| row.get(0))?;
    conn.execute(
        &format!(
            "INSERT INTO {target}volume (id, name, uuid, chunk_size, block_size, inline_threshold, created_ns) \
             SELECT 1, ?1, ?2, chunk_size, block_size, inline_threshold, ?3 FROM volume"
        ),
        params![fork.name, fork.uuid, fork.now_ns],
    )?;
    for statement in COPIES {
        conn.execute(&statement.replace("{t}", target), ())?;
    }
    // The origin's own range, unless it is empty (it allocated nothing since its own fork).
    conn.execute(
        &format!(
            "INSERT INTO {target}lineage (below, uuid, volume) SELECT ?1, uuid, name FROM volume \
             WHERE ?1 > (SELECT COALESCE(MAX(below), 0) FROM lineage)"
        ),
        params![next_slice],
    )?;
    if conn.dialect() == cellar_sql::Dialect::Postgres {
        // Explicit ids leave the identity sequences behind: new rows must not reuse them.
        for (table, column) in [("dentries", "cookie"), ("chunk_slices", "seq")] {
            conn.query_row(
                &format!(
                    "SELECT setval(pg_get_serial_sequence('{target}{table}', '{column}'),                      (SELECT COALESCE(MAX({column}), 0) + 1 FROM {target}{table}), false)"
                ),
                (),
                |_| Ok(()),
            )?;
        }
    }
    if fork.read_only {
        conn.execute(
            &format!("INSERT INTO {target}counters (name, value) VALUES (?1, 1)"),
            [READ_ONLY],
        )?;
    }
    conn.execute(
        "INSERT INTO descendants (volume, frozen_below, created_ns) VALUES (?1, ?2, ?3) \
         ON CONFLICT (volume) DO UPDATE SET frozen_below = excluded.frozen_below",
        params![fork.name, next_slice, fork.now_ns],
    )?;
    let count = |table: &str| -> Result<u64> {
        let n: i64 = conn.query_row(
            &format!("SELECT COUNT(*) FROM {target}{table}"),
            (),
            |row| row.get(0),
        )?;
        Ok(n as u64)
    };
    Ok(ForkStats {
        inodes: count("inodes")?,
        entries: count("dentries")?,
        slices: count("chunk_slices")?,
        frozen_below: next_slice as u64,
    })
}

/// Forgets the descendant `volume` (deleted): the origin's gc may collect what only it kept.
pub fn release(conn: &Tx<'_, '_>, volume: &str) -> Result<bool> {
    Ok(conn.execute("DELETE FROM descendants WHERE volume = ?1", [volume])? > 0)
}

pub fn descendants(conn: &Tx<'_, '_>) -> Result<Vec<String>> {
    Ok(conn
        .prepare_cached("SELECT volume FROM descendants ORDER BY volume")?
        .query_map((), |row| row.get(0))?
        .collect::<cellar_sql::Result<_>>()?)
}

/// Bytes of the stored slices that are this volume's own and shared with no descendant:
/// what deleting the volume frees in the store.
pub fn exclusive_bytes(conn: &Tx<'_, '_>) -> Result<u64> {
    let bytes: i64 = conn
        .prepare_cached(
            "SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM \
               (SELECT id, MAX(size) AS size FROM chunk_slices WHERE id <> 0 AND id >= \
                  (SELECT MAX(bound) FROM (SELECT COALESCE(MAX(below), 0) AS bound FROM lineage \
                     UNION ALL SELECT COALESCE(MAX(frozen_below), 0) FROM descendants) bounds) \
                GROUP BY id) own",
        )?
        .query_row((), |row| row.get(0))?;
    Ok(bytes.max(0) as u64)
}
