//! Volume, sessions, inodes, directory entries and xattrs.

use cellar_sql::{params, OptionalExtension, Row};
use libc::{
    EEXIST, EINVAL, EISDIR, ENAMETOOLONG, ENODATA, ENOENT, ENOTDIR, ENOTEMPTY, EPERM, ERANGE,
    ESTALE,
};

use super::changes::Tx;
use super::data::discard_chunks_from;
use super::rows::{
    add_counter, add_usage, attr_from_row, get_attr, kind_code, kind_from_code, posix, set_usage,
    usage_totals, ATTR_COLUMNS, DIRECTORY_CODE, NEW_INODE_COLUMNS,
};
use crate::{
    invalid_name, Attr, DirEntry, FileKind, Ino, MetaError, NewNode, Rename, RenameMode,
    RenameOutcome, Result, SessionId, SessionInfo, SetAttr, TimeSet, Usage, VolumeInfo, XattrMode,
    MAX_NAME_LEN, MAX_XATTR_NAME_LEN, MAX_XATTR_VALUE_LEN, ROOT_INO,
};

/// The size reported for directories, as most Linux file systems do.
const DIR_SIZE: u64 = 4096;
/// Root directory permissions: sandboxes write as unprivileged users.
const ROOT_PERM: u32 = 0o777;
/// Bound on parent-pointer walks, so a corrupted cycle cannot hang a rename.
const MAX_DEPTH: usize = 1 << 20;

fn require_dir(conn: &Tx<'_, '_>, ino: Ino) -> Result<Attr> {
    let attr = get_attr(conn, ino)?;
    if attr.kind != FileKind::Directory {
        return Err(posix(ENOTDIR));
    }
    Ok(attr)
}

fn check_name(name: &[u8]) -> Result<()> {
    invalid_name(name).map_or(Ok(()), |errno| Err(posix(errno)))
}

fn is_dot_or_dotdot(name: &[u8]) -> bool {
    name == b"." || name == b".."
}

/// A directory entry as stored.
struct Entry {
    cookie: i64,
    ino: Ino,
    kind: FileKind,
}

fn find_entry(conn: &Tx<'_, '_>, parent: Ino, name: &[u8]) -> Result<Option<Entry>> {
    let mut stmt = conn
        .prepare_cached("SELECT cookie, ino, kind FROM dentries WHERE parent = ?1 AND name = ?2")?;
    Ok(stmt
        .query_row(params![parent, name], |row| {
            Ok(Entry {
                cookie: row.get(0)?,
                ino: row.get(1)?,
                kind: kind_from_code(row.get(2)?)?,
            })
        })
        .optional()?)
}

fn has_children(conn: &Tx<'_, '_>, dir: Ino) -> Result<bool> {
    let mut stmt =
        conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM dentries WHERE parent = ?1)")?;
    Ok(stmt.query_row([dir], |row| row.get(0))?)
}

/// Adds `delta` to a counter; returns the new value.
/// A directory gained or lost an entry: adjusts its link count (subdirectories) and times.
fn touch_dir(conn: &Tx<'_, '_>, dir: Ino, nlink_delta: i64, now_ns: i64) -> Result<()> {
    conn.prepare_cached(
        "UPDATE inodes SET nlink = CASE WHEN nlink + ?1 < 0 THEN 0 ELSE nlink + ?1 END, mtime_ns = ?2, ctime_ns = ?2 WHERE ino = ?3",
    )?
    .execute(params![nlink_delta, now_ns, dir])?;
    conn.ino_changed(dir);
    Ok(())
}

fn subdir_delta(kind: FileKind) -> i64 {
    i64::from(kind == FileKind::Directory)
}

/// Deletes an inode and everything hanging off it; its slices become garbage.
pub fn free_inode(conn: &Tx<'_, '_>, ino: Ino, now_ns: i64) -> Result<()> {
    discard_chunks_from(conn, ino, 0, now_ns)?;
    let mut stmt = conn.prepare_cached("DELETE FROM inodes WHERE ino = ?1 RETURNING held")?;
    let freed: Option<i64> = stmt.query_row([ino], |row| row.get(0)).optional()?;
    if let Some(held) = freed {
        conn.ino_changed(ino);
        add_usage(conn, -held, -1)?;
    }
    Ok(())
}

/// Frees an inode without links that no session has open any more.
fn free_if_unreferenced(conn: &Tx<'_, '_>, ino: Ino, now_ns: i64) -> Result<()> {
    let mut stmt = conn.prepare_cached(
        "SELECT nlink = 0 AND NOT EXISTS (SELECT 1 FROM open_files WHERE ino = ?1) FROM inodes WHERE ino = ?1",
    )?;
    let unreferenced: Option<bool> = stmt.query_row([ino], |row| row.get(0)).optional()?;
    if unreferenced == Some(true) {
        free_inode(conn, ino, now_ns)?;
    }
    Ok(())
}

/// One link of a non-directory inode went away. Returns true if it was the last one: the inode is
/// then kept while any session (any mount, any host) has it open, or freed.
fn drop_link(conn: &Tx<'_, '_>, ino: Ino, now_ns: i64) -> Result<bool> {
    let mut stmt = conn.prepare_cached(
        "UPDATE inodes SET nlink = CASE WHEN nlink > 0 THEN nlink - 1 ELSE 0 END, ctime_ns = ?1 WHERE ino = ?2 RETURNING nlink",
    )?;
    let nlink: i64 = stmt.query_row(params![now_ns, ino], |row| row.get(0))?;
    conn.ino_changed(ino);
    if nlink > 0 {
        return Ok(false);
    }
    free_if_unreferenced(conn, ino, now_ns)?;
    Ok(true)
}

// ---- volume and sessions ----

pub fn stored_volume(conn: &Tx<'_, '_>) -> Result<Option<VolumeInfo>> {
    let mut stmt = conn.prepare_cached(
        "SELECT name, uuid, chunk_size, block_size, inline_threshold, created_ns FROM volume WHERE id = 1",
    )?;
    Ok(stmt
        .query_row((), |row| {
            Ok(VolumeInfo {
                name: row.get(0)?,
                uuid: row.get(1)?,
                chunk_size: row.get(2)?,
                block_size: row.get(3)?,
                inline_threshold: row.get(4)?,
                created_ns: row.get(5)?,
            })
        })
        .optional()?)
}

pub fn format(conn: &Tx<'_, '_>, volume: &VolumeInfo) -> Result<VolumeInfo> {
    if let Some(stored) = stored_volume(conn)? {
        if stored.name != volume.name {
            return Err(MetaError::VolumeMismatch {
                found: stored.name,
                wanted: volume.name.clone(),
            });
        }
        return Ok(stored);
    }
    if volume.chunk_size == 0 || volume.chunk_size > u64::from(u32::MAX) || volume.block_size == 0 {
        return Err(MetaError::Engine(format!(
            "invalid volume geometry: chunk size {} (1..=4 GiB), block size {}",
            volume.chunk_size, volume.block_size
        )));
    }
    conn.execute(
        "INSERT INTO volume (id, name, uuid, chunk_size, block_size, inline_threshold, created_ns)
         VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            volume.name,
            volume.uuid,
            volume.chunk_size,
            volume.block_size,
            volume.inline_threshold,
            volume.created_ns
        ],
    )?;
    let now = volume.created_ns;
    conn.execute(
        &format!("INSERT INTO inodes ({NEW_INODE_COLUMNS}) VALUES (?1, ?2, ?3, 0, 0, 2, ?4, 0, ?5, ?5, ?5, ?1)"),
        params![ROOT_INO, DIRECTORY_CODE, ROOT_PERM, DIR_SIZE, now],
    )?;
    set_usage(conn, 0, 1)?;
    Ok(volume.clone())
}

/// Reserves `count` inode numbers for one engine instance; returns the first. Creates then take
/// numbers from the reservation without touching the `next_ino` row that every create would
/// otherwise update (a hot row that serialises concurrent creates on PostgreSQL). Numbers of a
/// reservation left unused (the engine closed) are never taken: gaps are harmless.
pub fn reserve_inos(conn: &Tx<'_, '_>, count: u64) -> Result<Ino> {
    Ok(add_counter(conn, "next_ino", count as i64)? as u64 - count)
}

/// The first heartbeat is `now_ns` by the engine's clock, as every later one: a host whose clock
/// lags must not open a session that others already take for stale.
pub fn open_session(conn: &Tx<'_, '_>, info: &SessionInfo, now_ns: i64) -> Result<SessionId> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO sessions (host, pid, mount_point, started_ns, heartbeat_ns) VALUES (?1, ?2, ?3, ?4, ?5) RETURNING id",
    )?;
    Ok(stmt.query_row(
        params![info.host, info.pid, info.mount_point, info.now_ns, now_ns],
        |row| row.get(0),
    )?)
}

/// Fails with ESTALE when the session is gone (reaped as stale): the caller must open a new one.
pub fn heartbeat(conn: &Tx<'_, '_>, session: SessionId, now_ns: i64) -> Result<()> {
    let updated = conn
        .prepare_cached("UPDATE sessions SET heartbeat_ns = ?1 WHERE id = ?2")?
        .execute(params![now_ns, session])?;
    if updated == 0 {
        return Err(posix(ESTALE));
    }
    Ok(())
}

pub fn close_session(conn: &Tx<'_, '_>, session: SessionId, now_ns: i64) -> Result<()> {
    let open: Vec<Ino> = conn
        .prepare_cached("SELECT ino FROM open_files WHERE session = ?1")?
        .query_map([session], |row| row.get(0))?
        .collect::<cellar_sql::Result<_>>()?;
    // Locks and open files go with the session (ON DELETE CASCADE), and so do its leases.
    conn.prepare_cached("DELETE FROM sessions WHERE id = ?1")?
        .execute([session])?;
    conn.prepare_cached("DELETE FROM leases WHERE session = ?1")?
        .execute([session])?;
    for ino in open {
        free_if_unreferenced(conn, ino, now_ns)?;
    }
    Ok(())
}

pub fn live_sessions(conn: &Tx<'_, '_>, now_ns: i64, max_age_ns: i64) -> Result<Vec<SessionId>> {
    let live = conn
        .prepare_cached("SELECT id FROM sessions WHERE heartbeat_ns >= ?1 ORDER BY id")?
        .query_map([now_ns.saturating_sub(max_age_ns)], |row| row.get(0))?
        .collect::<cellar_sql::Result<_>>()?;
    Ok(live)
}

pub fn sessions_at(
    conn: &Tx<'_, '_>,
    host: &str,
    mount_point: &str,
) -> Result<Vec<(SessionId, u32)>> {
    let sessions = conn
        .prepare_cached(
            "SELECT id, pid FROM sessions WHERE host = ?1 AND mount_point = ?2 ORDER BY id",
        )?
        .query_map(params![host, mount_point], |row| {
            Ok((row.get(0)?, row.get::<_, u32>(1)?))
        })?
        .collect::<cellar_sql::Result<_>>()?;
    Ok(sessions)
}

pub fn try_lease(
    conn: &Tx<'_, '_>,
    name: &str,
    session: SessionId,
    ttl_ns: i64,
    now_ns: i64,
) -> Result<bool> {
    let taken = conn
        .prepare_cached(
            "INSERT INTO leases (name, session, expires_ns) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO UPDATE SET session = excluded.session, expires_ns = excluded.expires_ns
             WHERE leases.session = excluded.session OR leases.expires_ns < ?4",
        )?
        .execute(params![name, session, now_ns.saturating_add(ttl_ns), now_ns])?;
    Ok(taken == 1)
}

pub fn reap_stale_sessions(
    conn: &Tx<'_, '_>,
    now_ns: i64,
    max_age_ns: i64,
    exclude: Option<SessionId>,
) -> Result<usize> {
    let stale: Vec<SessionId> = conn
        .prepare_cached(
            "SELECT id FROM sessions WHERE heartbeat_ns < ?1 AND id IS DISTINCT FROM ?2",
        )?
        .query_map(params![now_ns.saturating_sub(max_age_ns), exclude], |row| {
            row.get(0)
        })?
        .collect::<cellar_sql::Result<_>>()?;
    for &session in &stale {
        tracing::warn!(session, "closing stale metadata session");
        close_session(conn, session, now_ns)?;
    }
    Ok(stale.len())
}

// ---- namespace ----

pub fn lookup(conn: &Tx<'_, '_>, parent: Ino, name: &[u8]) -> Result<Attr> {
    if name.len() > MAX_NAME_LEN {
        return Err(posix(ENAMETOOLONG));
    }
    if is_dot_or_dotdot(name) {
        let dir = require_dir(conn, parent)?;
        return if name == b"." {
            Ok(dir)
        } else {
            get_attr(conn, dir.parent)
        };
    }
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {} FROM dentries d JOIN inodes i ON i.ino = d.ino WHERE d.parent = ?1 AND d.name = ?2",
        prefixed_attr_columns("i")
    ))?;
    match stmt
        .query_row(params![parent, name], |row| attr_from_row(row, 0))
        .optional()?
    {
        Some(attr) => Ok(attr),
        None => {
            require_dir(conn, parent)?;
            Err(posix(ENOENT))
        }
    }
}

fn prefixed_attr_columns(table: &str) -> String {
    ATTR_COLUMNS
        .split(", ")
        .map(|column| format!("{table}.{column}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn setattr(conn: &Tx<'_, '_>, ino: Ino, changes: &SetAttr, now_ns: i64) -> Result<Attr> {
    let mut attr = get_attr(conn, ino)?;
    let resolve = |time: TimeSet| match time {
        TimeSet::Now => now_ns,
        TimeSet::At(ns) => ns,
    };
    if let Some(perm) = changes.perm {
        attr.perm = perm & 0o7777;
    }
    if let Some(uid) = changes.uid {
        attr.uid = uid;
    }
    if let Some(gid) = changes.gid {
        attr.gid = gid;
    }
    if let Some(atime) = changes.atime {
        attr.atime_ns = resolve(atime);
    }
    if let Some(mtime) = changes.mtime {
        attr.mtime_ns = resolve(mtime);
    }
    attr.ctime_ns = changes.ctime.unwrap_or(now_ns);
    conn.prepare_cached(
        "UPDATE inodes SET perm = ?1, uid = ?2, gid = ?3, atime_ns = ?4, mtime_ns = ?5, ctime_ns = ?6 WHERE ino = ?7",
    )?
    .execute(params![attr.perm, attr.uid, attr.gid, attr.atime_ns, attr.mtime_ns, attr.ctime_ns, ino])?;
    conn.modified(ino, attr.kind);
    Ok(attr)
}

/// Creates `node` as inode `ino` (a number the engine reserved: see `reserve_inos`).
pub fn create_node(
    conn: &Tx<'_, '_>,
    ino: Ino,
    parent: Ino,
    name: &[u8],
    node: &NewNode,
    now_ns: i64,
) -> Result<Attr> {
    check_name(name)?;
    require_dir(conn, parent)?;
    if is_dot_or_dotdot(name) || find_entry(conn, parent, name)?.is_some() {
        return Err(posix(EEXIST));
    }
    if node.kind == FileKind::Symlink && node.target.is_empty() {
        return Err(posix(ENOENT));
    }
    let (nlink, size) = match node.kind {
        FileKind::Directory => (2, DIR_SIZE),
        FileKind::Symlink => (1, node.target.len() as u64),
        _ => (1, 0),
    };
    // New regular files start inline (empty): small files never touch the object store.
    let inline: Option<&[u8]> = (node.kind == FileKind::Regular).then_some(&[]);
    let target = (node.kind == FileKind::Symlink).then_some(node.target.as_slice());
    conn.prepare_cached(&format!(
        "INSERT INTO inodes ({NEW_INODE_COLUMNS}, inline_data, target)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9, ?9, ?10, ?11, ?12)"
    ))?
    .execute(params![
        ino,
        kind_code(node.kind),
        node.perm & 0o7777,
        node.uid,
        node.gid,
        nlink,
        size,
        node.rdev,
        now_ns,
        parent,
        inline,
        target
    ])?;
    insert_entry(conn, parent, name, ino, node.kind)?;
    touch_dir(conn, parent, subdir_delta(node.kind), now_ns)?;
    add_usage(conn, 0, 1)?;
    Ok(Attr {
        ino,
        kind: node.kind,
        perm: node.perm & 0o7777,
        uid: node.uid,
        gid: node.gid,
        nlink,
        size,
        rdev: node.rdev,
        atime_ns: now_ns,
        mtime_ns: now_ns,
        ctime_ns: now_ns,
        parent,
        data_version: 0,
        blocks: 0,
    })
}

fn insert_entry(
    conn: &Tx<'_, '_>,
    parent: Ino,
    name: &[u8],
    ino: Ino,
    kind: FileKind,
) -> Result<()> {
    conn.prepare_cached("INSERT INTO dentries (parent, name, ino, kind) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![parent, name, ino, kind_code(kind)])?;
    conn.entry_added(parent, name, ino, kind);
    Ok(())
}

pub fn link(
    conn: &Tx<'_, '_>,
    ino: Ino,
    new_parent: Ino,
    new_name: &[u8],
    now_ns: i64,
) -> Result<Attr> {
    let attr = get_attr(conn, ino)?;
    if attr.kind == FileKind::Directory {
        return Err(posix(EPERM));
    }
    check_name(new_name)?;
    require_dir(conn, new_parent)?;
    if is_dot_or_dotdot(new_name) || find_entry(conn, new_parent, new_name)?.is_some() {
        return Err(posix(EEXIST));
    }
    insert_entry(conn, new_parent, new_name, ino, attr.kind)?;
    conn.prepare_cached("UPDATE inodes SET nlink = nlink + 1, ctime_ns = ?1 WHERE ino = ?2")?
        .execute(params![now_ns, ino])?;
    conn.ino_changed(ino);
    touch_dir(conn, new_parent, 0, now_ns)?;
    Ok(Attr {
        nlink: attr.nlink + 1,
        ctime_ns: now_ns,
        ..attr
    })
}

pub fn unlink(conn: &Tx<'_, '_>, parent: Ino, name: &[u8], now_ns: i64) -> Result<Option<Ino>> {
    check_name(name)?;
    require_dir(conn, parent)?;
    let entry = find_entry(conn, parent, name)?.ok_or_else(|| posix(ENOENT))?;
    if entry.kind == FileKind::Directory {
        return Err(posix(EISDIR));
    }
    delete_entry(conn, parent, name, &entry)?;
    touch_dir(conn, parent, 0, now_ns)?;
    Ok(drop_link(conn, entry.ino, now_ns)?.then_some(entry.ino))
}

fn delete_entry(conn: &Tx<'_, '_>, parent: Ino, name: &[u8], entry: &Entry) -> Result<()> {
    conn.prepare_cached("DELETE FROM dentries WHERE cookie = ?1")?
        .execute([entry.cookie])?;
    conn.entry_removed(parent, name, entry.ino, entry.kind);
    Ok(())
}

pub fn rmdir(conn: &Tx<'_, '_>, parent: Ino, name: &[u8], now_ns: i64) -> Result<Ino> {
    if name == b"." {
        return Err(posix(EINVAL));
    }
    if name == b".." {
        return Err(posix(ENOTEMPTY));
    }
    check_name(name)?;
    require_dir(conn, parent)?;
    let entry = find_entry(conn, parent, name)?.ok_or_else(|| posix(ENOENT))?;
    if entry.kind != FileKind::Directory {
        return Err(posix(ENOTDIR));
    }
    if has_children(conn, entry.ino)? {
        return Err(posix(ENOTEMPTY));
    }
    delete_entry(conn, parent, name, &entry)?;
    touch_dir(conn, parent, -1, now_ns)?;
    free_inode(conn, entry.ino, now_ns)?;
    Ok(entry.ino)
}

/// EINVAL if `dir` is `start` or one of its ancestors (moving `dir` under `start` would detach it).
fn ensure_not_ancestor(conn: &Tx<'_, '_>, dir: Ino, start: Ino) -> Result<()> {
    let mut stmt = conn.prepare_cached("SELECT parent FROM inodes WHERE ino = ?1")?;
    let mut current = start;
    for _ in 0..MAX_DEPTH {
        if current == dir {
            return Err(posix(EINVAL));
        }
        if current == ROOT_INO {
            return Ok(());
        }
        current = stmt.query_row([current], |row| row.get(0))?;
    }
    Err(MetaError::Engine(format!(
        "parent chain of inode {start} does not reach the root"
    )))
}

fn set_parent(conn: &Tx<'_, '_>, ino: Ino, parent: Ino, now_ns: i64) -> Result<()> {
    conn.prepare_cached("UPDATE inodes SET parent = ?1, ctime_ns = ?2 WHERE ino = ?3")?
        .execute(params![parent, now_ns, ino])?;
    conn.ino_changed(ino);
    Ok(())
}

pub fn rename(conn: &Tx<'_, '_>, req: &Rename<'_>, now_ns: i64) -> Result<RenameOutcome> {
    for name in [req.src_name, req.dst_name] {
        check_name(name)?;
        if is_dot_or_dotdot(name) {
            return Err(posix(EINVAL));
        }
    }
    require_dir(conn, req.src_parent)?;
    require_dir(conn, req.dst_parent)?;
    let src = find_entry(conn, req.src_parent, req.src_name)?.ok_or_else(|| posix(ENOENT))?;
    let dst = find_entry(conn, req.dst_parent, req.dst_name)?;
    match (req.mode, &dst) {
        (RenameMode::NoReplace, Some(_)) => return Err(posix(EEXIST)),
        (RenameMode::Exchange, None) => return Err(posix(ENOENT)),
        _ => {}
    }
    // Two names of one inode (or the same name): rename(2) does nothing.
    if dst.as_ref().is_some_and(|dst| dst.ino == src.ino) {
        return Ok(RenameOutcome {
            moved: src.ino,
            replaced: None,
        });
    }
    if src.kind == FileKind::Directory {
        ensure_not_ancestor(conn, src.ino, req.dst_parent)?;
    }
    let cross_dir = req.src_parent != req.dst_parent;

    if let (RenameMode::Exchange, Some(dst)) = (req.mode, &dst) {
        if dst.kind == FileKind::Directory {
            ensure_not_ancestor(conn, dst.ino, req.src_parent)?;
        }
        let mut swap =
            conn.prepare_cached("UPDATE dentries SET ino = ?1, kind = ?2 WHERE cookie = ?3")?;
        swap.execute(params![dst.ino, kind_code(dst.kind), src.cookie])?;
        swap.execute(params![src.ino, kind_code(src.kind), dst.cookie])?;
        let (src_entry, dst_entry) = (
            (req.src_parent, req.src_name),
            (req.dst_parent, req.dst_name),
        );
        conn.entry_renamed(src_entry, dst_entry, src.ino, src.kind);
        conn.entry_renamed(dst_entry, src_entry, dst.ino, dst.kind);
        set_parent(conn, src.ino, req.dst_parent, now_ns)?;
        set_parent(conn, dst.ino, req.src_parent, now_ns)?;
        let moved_subdirs = subdir_delta(dst.kind) - subdir_delta(src.kind);
        if cross_dir {
            touch_dir(conn, req.src_parent, moved_subdirs, now_ns)?;
            touch_dir(conn, req.dst_parent, -moved_subdirs, now_ns)?;
        } else {
            touch_dir(conn, req.src_parent, 0, now_ns)?;
        }
        return Ok(RenameOutcome {
            moved: src.ino,
            replaced: Some(dst.ino),
        });
    }

    let replaced = match dst {
        None => None,
        Some(dst) => {
            match (
                src.kind == FileKind::Directory,
                dst.kind == FileKind::Directory,
            ) {
                (true, false) => return Err(posix(ENOTDIR)),
                (false, true) => return Err(posix(EISDIR)),
                (true, true) if has_children(conn, dst.ino)? => return Err(posix(ENOTEMPTY)),
                _ => {}
            }
            delete_entry(conn, req.dst_parent, req.dst_name, &dst)?;
            if dst.kind == FileKind::Directory {
                touch_dir(conn, req.dst_parent, -1, now_ns)?;
                free_inode(conn, dst.ino, now_ns)?;
            } else {
                drop_link(conn, dst.ino, now_ns)?;
            }
            Some(dst.ino)
        }
    };
    // The entry keeps its cookie: a readdir of the directory in progress neither repeats nor
    // loses it when renamed in place.
    conn.prepare_cached("UPDATE dentries SET parent = ?1, name = ?2 WHERE cookie = ?3")?
        .execute(params![req.dst_parent, req.dst_name, src.cookie])?;
    conn.entry_renamed(
        (req.src_parent, req.src_name),
        (req.dst_parent, req.dst_name),
        src.ino,
        src.kind,
    );
    set_parent(conn, src.ino, req.dst_parent, now_ns)?;
    if cross_dir {
        touch_dir(conn, req.src_parent, -subdir_delta(src.kind), now_ns)?;
        touch_dir(conn, req.dst_parent, subdir_delta(src.kind), now_ns)?;
    } else {
        touch_dir(conn, req.src_parent, 0, now_ns)?;
    }
    Ok(RenameOutcome {
        moved: src.ino,
        replaced,
    })
}

pub fn readlink(conn: &Tx<'_, '_>, ino: Ino) -> Result<Vec<u8>> {
    let mut stmt = conn.prepare_cached("SELECT target FROM inodes WHERE ino = ?1")?;
    let target: Option<Vec<u8>> = stmt
        .query_row([ino], |row| row.get(0))
        .optional()?
        .ok_or_else(|| posix(ENOENT))?;
    target.ok_or_else(|| posix(EINVAL))
}

/// Stored cookies start at 1; callers see them shifted past the reserved 0..=2.
const COOKIE_SHIFT: u64 = 2;

pub fn readdir(
    conn: &Tx<'_, '_>,
    dir: Ino,
    after: u64,
    limit: usize,
    plus: bool,
) -> Result<Vec<DirEntry>> {
    require_dir(conn, dir)?;
    let after_stored = after.saturating_sub(COOKIE_SHIFT) as i64;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let read_entry = |row: &Row| -> cellar_sql::Result<DirEntry> {
        Ok(DirEntry {
            cookie: row.get::<_, u64>(0)? + COOKIE_SHIFT,
            name: row.get(1)?,
            ino: row.get(2)?,
            kind: kind_from_code(row.get(3)?)?,
            attr: if plus {
                Some(attr_from_row(row, 5)?)
            } else {
                None
            },
            xattrs: if plus { Some(row.get(4)?) } else { None },
        })
    };
    let entries = if plus {
        conn.prepare_cached(&format!(
            // Whether each inode has xattrs: `ls -l` asks two of every file it lists.
            "SELECT d.cookie, d.name, d.ino, d.kind,
                    EXISTS (SELECT 1 FROM xattrs x WHERE x.ino = d.ino), {}
             FROM dentries d JOIN inodes i ON i.ino = d.ino
             WHERE d.parent = ?1 AND d.cookie > ?2 ORDER BY d.cookie LIMIT ?3",
            prefixed_attr_columns("i")
        ))?
        .query_map(params![dir, after_stored, limit], read_entry)?
        .collect::<cellar_sql::Result<_>>()?
    } else {
        conn.prepare_cached(
            "SELECT cookie, name, ino, kind FROM dentries WHERE parent = ?1 AND cookie > ?2 ORDER BY cookie LIMIT ?3",
        )?
        .query_map(params![dir, after_stored, limit], read_entry)?
        .collect::<cellar_sql::Result<_>>()?
    };
    Ok(entries)
}

/// Records that `session` has `ino` open (an unlink anywhere then keeps the inode).
pub fn open_file(conn: &Tx<'_, '_>, session: SessionId, ino: Ino) -> Result<Attr> {
    let attr = get_attr(conn, ino)?;
    conn.prepare_cached(
        "INSERT INTO open_files (session, ino) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
    )?
    .execute(params![session, ino])?;
    Ok(attr)
}

/// `session` no longer has `ino` open: an inode without links goes with its last opener.
pub fn close_file(conn: &Tx<'_, '_>, session: SessionId, ino: Ino, now_ns: i64) -> Result<()> {
    conn.prepare_cached("DELETE FROM open_files WHERE session = ?1 AND ino = ?2")?
        .execute(params![session, ino])?;
    free_if_unreferenced(conn, ino, now_ns)
}

/// The counters count the root too; usage does not.
pub fn usage(conn: &Tx<'_, '_>) -> Result<Usage> {
    let (bytes, inodes) = usage_totals(conn)?;
    Ok(Usage {
        bytes: bytes.max(0) as u64,
        inodes: (inodes - 1).max(0) as u64,
    })
}

/// The `counters` row of the volume's byte quota (absent: no quota).
const QUOTA: &str = "quota_bytes";

pub fn quota(conn: &Tx<'_, '_>) -> Result<Option<u64>> {
    let mut stmt = conn.prepare_cached("SELECT value FROM counters WHERE name = ?1")?;
    let value: Option<i64> = stmt.query_row([QUOTA], |row| row.get(0)).optional()?;
    Ok(value.map(|bytes| bytes.max(0) as u64))
}

pub fn set_quota(conn: &Tx<'_, '_>, bytes: Option<u64>) -> Result<()> {
    match bytes {
        Some(bytes) => {
            let bytes = i64::try_from(bytes).map_err(|_| posix(libc::EINVAL))?;
            conn.prepare_cached(
                "INSERT INTO counters (name, value) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            )?
            .execute(params![QUOTA, bytes])?;
        }
        None => {
            conn.prepare_cached("DELETE FROM counters WHERE name = ?1")?
                .execute([QUOTA])?;
        }
    }
    Ok(())
}

// ---- xattrs ----

fn check_xattr_name(name: &[u8]) -> Result<()> {
    if name.is_empty() || name.len() > MAX_XATTR_NAME_LEN {
        return Err(posix(ERANGE));
    }
    Ok(())
}

pub fn get_xattr(conn: &Tx<'_, '_>, ino: Ino, name: &[u8]) -> Result<Vec<u8>> {
    check_xattr_name(name)?;
    let mut stmt = conn.prepare_cached("SELECT value FROM xattrs WHERE ino = ?1 AND name = ?2")?;
    match stmt
        .query_row(params![ino, name], |row| row.get(0))
        .optional()?
    {
        Some(value) => Ok(value),
        None => {
            get_attr(conn, ino)?;
            Err(posix(ENODATA))
        }
    }
}

pub fn list_xattr(conn: &Tx<'_, '_>, ino: Ino) -> Result<Vec<Vec<u8>>> {
    get_attr(conn, ino)?;
    let names = conn
        .prepare_cached("SELECT name FROM xattrs WHERE ino = ?1 ORDER BY name")?
        .query_map([ino], |row| row.get(0))?
        .collect::<cellar_sql::Result<_>>()?;
    Ok(names)
}

pub fn set_xattr(
    conn: &Tx<'_, '_>,
    ino: Ino,
    name: &[u8],
    value: &[u8],
    mode: XattrMode,
    now_ns: i64,
) -> Result<()> {
    check_xattr_name(name)?;
    if value.len() > MAX_XATTR_VALUE_LEN {
        return Err(posix(libc::E2BIG));
    }
    get_attr(conn, ino)?;
    let exists: bool = conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM xattrs WHERE ino = ?1 AND name = ?2)")?
        .query_row(params![ino, name], |row| row.get(0))?;
    match (mode, exists) {
        (XattrMode::Create, true) => return Err(posix(EEXIST)),
        (XattrMode::Replace, false) => return Err(posix(ENODATA)),
        _ => {}
    }
    conn.prepare_cached(
        "INSERT INTO xattrs (ino, name, value) VALUES (?1, ?2, ?3)
         ON CONFLICT (ino, name) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![ino, name, value])?;
    conn.prepare_cached("UPDATE inodes SET ctime_ns = ?1 WHERE ino = ?2")?
        .execute(params![now_ns, ino])?;
    conn.ino_changed(ino);
    Ok(())
}

pub fn remove_xattr(conn: &Tx<'_, '_>, ino: Ino, name: &[u8], now_ns: i64) -> Result<()> {
    check_xattr_name(name)?;
    get_attr(conn, ino)?;
    let removed = conn
        .prepare_cached("DELETE FROM xattrs WHERE ino = ?1 AND name = ?2")?
        .execute(params![ino, name])?;
    if removed == 0 {
        return Err(posix(ENODATA));
    }
    conn.prepare_cached("UPDATE inodes SET ctime_ns = ?1 WHERE ino = ?2")?
        .execute(params![now_ns, ino])?;
    conn.ino_changed(ino);
    Ok(())
}
