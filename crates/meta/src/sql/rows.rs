//! Rows shared by every part of the engine: inode attributes, kind codes, counters, errors.

use cellar_sql::{params, OptionalExtension, Row};

use crate::{held_blocks, Attr, FileKind, Ino, MetaError, Result};

/// Columns a new inode row sets (its data version starts at 0).
pub const NEW_INODE_COLUMNS: &str =
    "ino, kind, perm, uid, gid, nlink, size, rdev, atime_ns, mtime_ns, ctime_ns, parent";
pub const ATTR_COLUMNS: &str =
    "ino, kind, perm, uid, gid, nlink, size, rdev, atime_ns, mtime_ns, ctime_ns, parent, data_version, held";

pub fn posix(errno: i32) -> MetaError {
    MetaError::posix(errno)
}

pub fn kind_code(kind: FileKind) -> i64 {
    match kind {
        FileKind::Regular => 1,
        FileKind::Directory => 2,
        FileKind::Symlink => 3,
        FileKind::Fifo => 4,
        FileKind::Socket => 5,
        FileKind::CharDevice => 6,
        FileKind::BlockDevice => 7,
    }
}

pub const REGULAR_CODE: i64 = 1;
pub const DIRECTORY_CODE: i64 = 2;

pub fn kind_from_code(code: i64) -> cellar_sql::Result<FileKind> {
    Ok(match code {
        1 => FileKind::Regular,
        2 => FileKind::Directory,
        3 => FileKind::Symlink,
        4 => FileKind::Fifo,
        5 => FileKind::Socket,
        6 => FileKind::CharDevice,
        7 => FileKind::BlockDevice,
        other => {
            return Err(cellar_sql::Error::new(format!(
                "unknown inode kind {other}"
            )))
        }
    })
}

/// Reads [`ATTR_COLUMNS`] starting at column `first`.
pub fn attr_from_row(row: &Row, first: usize) -> cellar_sql::Result<Attr> {
    Ok(Attr {
        ino: row.get(first)?,
        kind: kind_from_code(row.get(first + 1)?)?,
        perm: row.get(first + 2)?,
        uid: row.get(first + 3)?,
        gid: row.get(first + 4)?,
        nlink: row.get(first + 5)?,
        size: row.get(first + 6)?,
        rdev: row.get(first + 7)?,
        atime_ns: row.get(first + 8)?,
        mtime_ns: row.get(first + 9)?,
        ctime_ns: row.get(first + 10)?,
        parent: row.get(first + 11)?,
        data_version: row.get::<_, i64>(first + 12)? as u64,
        blocks: held_blocks(row.get::<_, i64>(first + 13)?.max(0) as u64),
    })
}

pub fn find_attr(conn: &cellar_sql::Tx<'_>, ino: Ino) -> Result<Option<Attr>> {
    let mut stmt =
        conn.prepare_cached(&format!("SELECT {ATTR_COLUMNS} FROM inodes WHERE ino = ?1"))?;
    Ok(stmt
        .query_row([ino], |row| attr_from_row(row, 0))
        .optional()?)
}

pub fn get_attr(conn: &cellar_sql::Tx<'_>, ino: Ino) -> Result<Attr> {
    find_attr(conn, ino)?.ok_or_else(|| posix(libc::ENOENT))
}

pub fn add_counter(conn: &cellar_sql::Tx<'_>, name: &str, delta: i64) -> Result<i64> {
    let mut stmt = conn.prepare_cached(
        "UPDATE counters SET value = CASE WHEN value + ?1 < 0 THEN 0 ELSE value + ?1 END WHERE name = ?2 RETURNING value",
    )?;
    Ok(stmt.query_row(params![delta, name], |row| row.get(0))?)
}

/// Usage (bytes, inodes) is spread over this many rows of `usage_shards` (the sum is the
/// volume's usage), so that concurrent writers (on PostgreSQL) rarely update the same row: each
/// thread writes to a shard of its own, the threads of a process to consecutive shards from a
/// random start.
const USAGE_SHARDS: u64 = 64;

fn usage_shard() -> u64 {
    static FIRST: std::sync::LazyLock<u64> = std::sync::LazyLock::new(rand::random);
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    thread_local! {
        static SHARD: u64 = FIRST
            .wrapping_add(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
            % USAGE_SHARDS;
    }
    SHARD.with(|shard| *shard)
}

pub fn add_usage(conn: &cellar_sql::Tx<'_>, bytes: i64, inodes: i64) -> Result<()> {
    conn.prepare_cached(
        "UPDATE usage_shards SET bytes = bytes + ?1, inodes = inodes + ?2 WHERE shard = ?3",
    )?
    .execute(params![bytes, inodes, usage_shard()])?;
    Ok(())
}

/// (bytes, inodes) of the volume.
pub fn usage_totals(conn: &cellar_sql::Tx<'_>) -> Result<(i64, i64)> {
    Ok(conn
        .prepare_cached(
            "SELECT CAST(COALESCE(SUM(bytes), 0) AS BIGINT), CAST(COALESCE(SUM(inodes), 0) AS BIGINT) FROM usage_shards",
        )?
        .query_row((), |row| Ok((row.get(0)?, row.get(1)?)))?)
}

pub fn set_usage(conn: &cellar_sql::Tx<'_>, bytes: i64, inodes: i64) -> Result<()> {
    conn.prepare_cached(
        "UPDATE usage_shards SET bytes = CASE WHEN shard = 0 THEN ?1 ELSE 0 END, inodes = CASE WHEN shard = 0 THEN ?2 ELSE 0 END",
    )?
    .execute(params![bytes, inodes])?;
    Ok(())
}

pub fn set_counter(conn: &cellar_sql::Tx<'_>, name: &str, value: i64) -> Result<()> {
    conn.prepare_cached("UPDATE counters SET value = ?1 WHERE name = ?2")?
        .execute(params![value, name])?;
    Ok(())
}

pub fn counter(conn: &cellar_sql::Tx<'_>, name: &str) -> Result<i64> {
    let mut stmt = conn.prepare_cached("SELECT value FROM counters WHERE name = ?1")?;
    Ok(stmt.query_row([name], |row| row.get(0))?)
}
