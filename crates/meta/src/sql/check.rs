//! fsck of the metadata: link counts, dangling entries, parent pointers, orphans, held bytes,
//! counters.
//! Repairs run in the same transaction as the checks. Removing a dangling entry can orphan
//! what it pointed to; a second `check(true)` then frees it.

use cellar_sql::params;

use super::changes::Tx;

use super::data::computed_held;
use super::namespace::{free_inode, stored_volume};
use super::rows::{counter, set_counter, set_usage, usage_totals, DIRECTORY_CODE, REGULAR_CODE};
use std::collections::{HashMap, HashSet};

use crate::{Ino, Result, ROOT_INO};

pub fn check(conn: &Tx<'_, '_>, repair: bool, now_ns: i64) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    dangling_entries(conn, repair, &mut problems)?;
    directory_parents(conn, repair, &mut problems)?;
    loops(conn, &mut problems)?;
    link_counts(conn, repair, &mut problems)?;
    orphans(conn, repair, now_ns, &mut problems)?;
    layouts(conn, &mut problems)?;
    let held = held_bytes(conn, repair, &mut problems)?;
    counters(conn, repair, held, &mut problems)?;
    Ok(problems)
}

/// Whether the migration that added held bytes (see `schema::V5_HELD_BYTES`) left them to be
/// computed.
pub fn needs_held_recount(conn: &Tx<'_, '_>) -> Result<bool> {
    Ok(conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM counters WHERE name = 'held_recount')",
        (),
        |row| row.get(0),
    )?)
}

/// Computes every file's held bytes and the volume's usage from them, once.
pub fn recount_held(conn: &Tx<'_, '_>) -> Result<()> {
    if !needs_held_recount(conn)? {
        return Ok(());
    }
    let held = held_bytes(conn, true, &mut Vec::new())?;
    let (_, inodes) = usage_totals(conn)?;
    set_usage(conn, held, inodes)?;
    conn.execute("DELETE FROM counters WHERE name = 'held_recount'", ())?;
    Ok(())
}

/// Checks each file's held bytes against its slices (inline files: their stored bytes);
/// returns the volume's total.
fn held_bytes(conn: &Tx<'_, '_>, repair: bool, problems: &mut Vec<String>) -> Result<i64> {
    let Some(volume) = stored_volume(conn)? else {
        return Ok(0);
    };
    let chunked: HashMap<Ino, u64> = computed_held(conn, &volume, None)?
        .into_iter()
        .map(|(ino, _, held)| (ino, held))
        .collect();
    let files: Vec<(Ino, i64, i64, Option<i64>)> = conn
        .prepare_cached("SELECT ino, kind, held, length(inline_data) FROM inodes")?
        .query_map((), |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })?
        .collect::<cellar_sql::Result<_>>()?;
    let mut total = 0;
    for (ino, kind, stored, inline_len) in files {
        let expected = match inline_len {
            _ if kind != REGULAR_CODE => 0,
            Some(len) => len,
            None => chunked.get(&ino).copied().unwrap_or(0) as i64,
        };
        total += expected;
        if stored != expected {
            problems.push(format!(
                "inode {ino} records {stored} held bytes, its data holds {expected}"
            ));
            if repair {
                conn.execute(
                    "UPDATE inodes SET held = ?1 WHERE ino = ?2",
                    params![expected, ino],
                )?;
                conn.ino_changed(ino);
            }
        }
    }
    Ok(total)
}

fn dangling_entries(conn: &Tx<'_, '_>, repair: bool, problems: &mut Vec<String>) -> Result<()> {
    let dangling: Vec<(i64, Ino, Vec<u8>, Ino)> = conn
        .prepare_cached(
            "SELECT d.cookie, d.parent, d.name, d.ino FROM dentries d
             LEFT JOIN inodes p ON p.ino = d.parent LEFT JOIN inodes i ON i.ino = d.ino
             WHERE p.ino IS NULL OR i.ino IS NULL OR p.kind <> ?1",
        )?
        .query_map([DIRECTORY_CODE], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })?
        .collect::<cellar_sql::Result<_>>()?;
    for (cookie, parent, name, ino) in dangling {
        problems.push(format!(
            "entry {:?} in {parent} points to inode {ino}, but the inode or its parent directory is missing",
            String::from_utf8_lossy(&name)
        ));
        if repair {
            conn.execute("DELETE FROM dentries WHERE cookie = ?1", [cookie])?;
            conn.entry_changed(parent, &name, ino);
        }
    }
    let mistyped: Vec<(i64, Ino, Vec<u8>, Ino)> = conn
        .prepare_cached(
            "SELECT d.cookie, d.parent, d.name, d.ino FROM dentries d JOIN inodes i ON i.ino = d.ino WHERE d.kind <> i.kind",
        )?
        .query_map((), |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)))?
        .collect::<cellar_sql::Result<_>>()?;
    for (cookie, parent, name, ino) in mistyped {
        problems.push(format!(
            "entry with cookie {cookie} records a kind different from its inode's"
        ));
        if repair {
            conn.execute(
                "UPDATE dentries SET kind = (SELECT kind FROM inodes WHERE inodes.ino = dentries.ino) WHERE cookie = ?1",
                [cookie],
            )?;
            conn.entry_changed(parent, &name, ino);
        }
    }
    Ok(())
}

fn directory_parents(conn: &Tx<'_, '_>, repair: bool, problems: &mut Vec<String>) -> Result<()> {
    let wrong: Vec<(Ino, Ino, Ino)> = conn
        .prepare_cached(
            "SELECT i.ino, i.parent, d.parent FROM inodes i JOIN dentries d ON d.ino = i.ino
             WHERE i.kind = ?1 AND i.parent <> d.parent",
        )?
        .query_map([DIRECTORY_CODE], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })?
        .collect::<cellar_sql::Result<_>>()?;
    for (ino, recorded, actual) in wrong {
        problems.push(format!(
            "directory {ino} records parent {recorded} but its entry is in {actual}"
        ));
        if repair {
            conn.execute(
                "UPDATE inodes SET parent = ?1 WHERE ino = ?2",
                params![actual, ino],
            )?;
            conn.ino_changed(ino);
        }
    }
    Ok(())
}

/// Directories whose parent chain does not lead to the root: a loop (two renames that each moved
/// a directory under the other's subtree) detaches them with everything below.
fn loops(conn: &Tx<'_, '_>, problems: &mut Vec<String>) -> Result<()> {
    let parents: HashMap<Ino, Ino> = conn
        .prepare_cached("SELECT ino, parent FROM inodes WHERE kind = ?1")?
        .query_map([DIRECTORY_CODE], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<cellar_sql::Result<_>>()?;
    let mut rooted: HashSet<Ino> = HashSet::from([ROOT_INO]);
    let mut detached: Vec<Ino> = Vec::new();
    for &dir in parents.keys() {
        let mut chain = vec![dir];
        let mut current = dir;
        let reaches_root = loop {
            if rooted.contains(&current) {
                break true;
            }
            match parents.get(&current) {
                Some(&parent) if !chain.contains(&parent) && chain.len() <= parents.len() => {
                    chain.push(parent);
                    current = parent;
                }
                _ => break false,
            }
        };
        if reaches_root {
            rooted.extend(chain);
        } else {
            detached.push(dir);
        }
    }
    detached.sort_unstable();
    for dir in detached {
        problems.push(format!(
            "directory {dir} is detached from the root (its parents form a loop or end nowhere)"
        ));
    }
    Ok(())
}

fn link_counts(conn: &Tx<'_, '_>, repair: bool, problems: &mut Vec<String>) -> Result<()> {
    // Directories: "." plus the entry in the parent plus each subdirectory's "..".
    let counts: Vec<(Ino, i64, i64, i64, i64)> = conn
        .prepare_cached(
            "SELECT i.ino, i.kind, i.nlink,
                    (SELECT COUNT(*) FROM dentries d WHERE d.ino = i.ino),
                    (SELECT COUNT(*) FROM dentries c WHERE c.parent = i.ino AND c.kind = ?1)
             FROM inodes i",
        )?
        .query_map([DIRECTORY_CODE], |row| {
            Ok((
                row.get(0)?,
                row.get(1)?,
                row.get(2)?,
                row.get(3)?,
                row.get(4)?,
            ))
        })?
        .collect::<cellar_sql::Result<_>>()?;
    for (ino, kind, nlink, entries, subdirs) in counts {
        let expected = if kind == DIRECTORY_CODE {
            if ino != ROOT_INO && entries == 0 {
                problems.push(format!("directory {ino} is not reachable from the root"));
                continue;
            }
            2 + subdirs
        } else {
            entries
        };
        if nlink != expected {
            problems.push(format!(
                "inode {ino} has link count {nlink}, expected {expected}"
            ));
            if repair {
                conn.execute(
                    "UPDATE inodes SET nlink = ?1 WHERE ino = ?2",
                    params![expected, ino],
                )?;
                conn.ino_changed(ino);
            }
        }
    }
    Ok(())
}

fn orphans(conn: &Tx<'_, '_>, repair: bool, now_ns: i64, problems: &mut Vec<String>) -> Result<()> {
    let orphaned: Vec<Ino> = conn
        .prepare_cached(
            "SELECT i.ino FROM inodes i
             WHERE i.nlink = 0 AND i.kind <> ?1
               AND NOT EXISTS (SELECT 1 FROM open_files s JOIN sessions ss ON ss.id = s.session WHERE s.ino = i.ino)",
        )?
        .query_map([DIRECTORY_CODE], |row| row.get(0))?
        .collect::<cellar_sql::Result<_>>()?;
    for ino in orphaned {
        problems.push(format!(
            "inode {ino} has no links and no session keeps it open"
        ));
        if repair {
            conn.execute("DELETE FROM open_files WHERE ino = ?1", [ino])?;
            free_inode(conn, ino, now_ns)?;
        }
    }
    Ok(())
}

fn layouts(conn: &Tx<'_, '_>, problems: &mut Vec<String>) -> Result<()> {
    let mixed: Vec<Ino> = conn
        .prepare_cached(
            "SELECT i.ino FROM inodes i
             WHERE i.inline_data IS NOT NULL AND EXISTS (SELECT 1 FROM chunk_slices s WHERE s.ino = i.ino)",
        )?
        .query_map((), |row| row.get(0))?
        .collect::<cellar_sql::Result<_>>()?;
    for ino in mixed {
        problems.push(format!("file {ino} has both inline bytes and chunk slices"));
    }
    Ok(())
}

/// `bytes`: the volume's held bytes, as counted from the files.
fn counters(conn: &Tx<'_, '_>, repair: bool, bytes: i64, problems: &mut Vec<String>) -> Result<()> {
    let (inodes, max_ino): (i64, i64) = conn.query_row(
        "SELECT COUNT(*), COALESCE(MAX(ino), 0) FROM inodes",
        (),
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    let max_slice: i64 = conn.query_row(
        "SELECT COALESCE((SELECT MAX(id) FROM chunk_slices), 0), COALESCE((SELECT MAX(id) FROM garbage), 0)",
        (),
        |row| Ok(row.get::<_, i64>(0)?.max(row.get(1)?)),
    )?;
    let (used_bytes, used_inodes) = usage_totals(conn)?;
    if (used_bytes, used_inodes) != (bytes, inodes) {
        problems.push(format!(
            "usage is {used_bytes} bytes in {used_inodes} inodes, expected {bytes} bytes in {inodes} inodes"
        ));
        if repair {
            set_usage(conn, bytes, inodes)?;
        }
    }
    let expectations = [
        (
            "next_ino",
            max_ino + 1,
            counter(conn, "next_ino")? > max_ino,
        ),
        (
            "next_slice",
            max_slice + 1,
            counter(conn, "next_slice")? > max_slice,
        ),
    ];
    for (name, value, ok) in expectations {
        if !ok {
            problems.push(format!(
                "counter {name} is {}, expected {value}",
                counter(conn, name)?
            ));
            if repair {
                set_counter(conn, name, value)?;
            }
        }
    }
    Ok(())
}
