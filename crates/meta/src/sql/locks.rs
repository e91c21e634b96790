//! POSIX byte-range locks (flock(2) arrives from the kernel as whole-file POSIX locks). Owners are `(session, owner)` pairs; only different
//! owners conflict. The u64 owner hashes and range ends are stored as their two's complement
//! BIGINT (so `u64::MAX`, "to end of file", is stored as -1) and compared in Rust, never in SQL.

use cellar_sql::params;
use libc::EINVAL;

use super::rows::{get_attr, posix};
use crate::{Ino, LockKind, LockOwner, LockRange, Result};

fn kind_code(kind: LockKind) -> i64 {
    match kind {
        LockKind::Read => 1,
        LockKind::Write => 2,
        LockKind::Unlock => 0,
    }
}

fn kind_from_code(code: i64) -> LockKind {
    match code {
        1 => LockKind::Read,
        2 => LockKind::Write,
        _ => LockKind::Unlock,
    }
}

/// Two locks conflict unless both are read locks.
fn conflicting(a: LockKind, b: LockKind) -> bool {
    a == LockKind::Write || b == LockKind::Write
}

/// Every POSIX lock on `ino` with its owner.
fn posix_locks(conn: &cellar_sql::Tx<'_>, ino: Ino) -> Result<Vec<(LockOwner, LockRange)>> {
    let locks = conn
        .prepare_cached(
            "SELECT session, owner, range_start, range_end, kind, pid FROM plocks WHERE ino = ?1",
        )?
        .query_map([ino], |row| {
            Ok((
                LockOwner {
                    session: row.get(0)?,
                    owner: row.get::<_, i64>(1)? as u64,
                },
                LockRange {
                    start: row.get::<_, i64>(2)? as u64,
                    end: row.get::<_, i64>(3)? as u64,
                    kind: kind_from_code(row.get(4)?),
                    pid: row.get(5)?,
                },
            ))
        })?
        .collect::<cellar_sql::Result<_>>()?;
    Ok(locks)
}

fn overlaps(a: &LockRange, b: &LockRange) -> bool {
    a.start <= b.end && b.start <= a.end
}

/// The lowest conflicting lock of another owner.
fn first_conflict(
    locks: &[(LockOwner, LockRange)],
    owner: LockOwner,
    range: &LockRange,
) -> Option<LockRange> {
    if range.kind == LockKind::Unlock {
        return None;
    }
    locks
        .iter()
        .filter(|(holder, held)| {
            *holder != owner && overlaps(held, range) && conflicting(held.kind, range.kind)
        })
        .map(|(_, held)| *held)
        .min_by_key(|held| held.start)
}

fn check_range(range: &LockRange) -> Result<()> {
    if range.start > range.end {
        return Err(posix(EINVAL));
    }
    Ok(())
}

pub fn getlk(
    conn: &cellar_sql::Tx<'_>,
    ino: Ino,
    owner: LockOwner,
    range: &LockRange,
) -> Result<Option<LockRange>> {
    check_range(range)?;
    get_attr(conn, ino)?;
    Ok(first_conflict(&posix_locks(conn, ino)?, owner, range))
}

pub fn setlk(
    conn: &cellar_sql::Tx<'_>,
    ino: Ino,
    owner: LockOwner,
    range: &LockRange,
) -> Result<bool> {
    check_range(range)?;
    get_attr(conn, ino)?;
    let locks = posix_locks(conn, ino)?;
    if first_conflict(&locks, owner, range).is_some() {
        return Ok(false);
    }
    let mine = locks
        .into_iter()
        .filter(|(holder, _)| *holder == owner)
        .map(|(_, held)| held)
        .collect();
    let updated = apply_range(mine, *range);
    conn.prepare_cached("DELETE FROM plocks WHERE ino = ?1 AND session = ?2 AND owner = ?3")?
        .execute(params![ino, owner.session, owner.owner as i64])?;
    let mut insert = conn.prepare_cached(
        "INSERT INTO plocks (ino, session, owner, range_start, range_end, kind, pid)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    for held in updated {
        insert.execute(params![
            ino,
            owner.session,
            owner.owner as i64,
            held.start as i64,
            held.end as i64,
            kind_code(held.kind),
            held.pid
        ])?;
    }
    Ok(true)
}

/// One owner's ranges after setting (or unlocking) `new` over them: overlapped parts are cut away
/// (splitting a range that spans `new`), then `new` is merged with touching ranges of its kind.
fn apply_range(mine: Vec<LockRange>, new: LockRange) -> Vec<LockRange> {
    let mut kept = Vec::with_capacity(mine.len() + 2);
    for held in mine {
        if !overlaps(&held, &new) {
            kept.push(held);
            continue;
        }
        if held.start < new.start {
            kept.push(LockRange {
                end: new.start - 1,
                ..held
            });
        }
        if held.end > new.end {
            kept.push(LockRange {
                start: new.end + 1,
                ..held
            });
        }
    }
    if new.kind != LockKind::Unlock {
        let mut merged = new;
        kept.retain(|held| {
            let touches = held.start <= merged.end.saturating_add(1)
                && merged.start <= held.end.saturating_add(1);
            if held.kind == merged.kind && touches {
                merged.start = merged.start.min(held.start);
                merged.end = merged.end.max(held.end);
                false
            } else {
                true
            }
        });
        kept.push(merged);
    }
    kept.sort_by_key(|held| held.start);
    kept
}

pub fn unlock_all(conn: &cellar_sql::Tx<'_>, ino: Ino, owner: LockOwner) -> Result<()> {
    conn.prepare_cached("DELETE FROM plocks WHERE ino = ?1 AND session = ?2 AND owner = ?3")?
        .execute(params![ino, owner.session, owner.owner as i64])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(start: u64, end: u64, kind: LockKind) -> LockRange {
        LockRange {
            start,
            end,
            kind,
            pid: 7,
        }
    }

    #[test]
    fn unlock_in_the_middle_splits_a_range() {
        let out = apply_range(
            vec![range(0, 99, LockKind::Write)],
            range(40, 59, LockKind::Unlock),
        );
        assert_eq!(
            out,
            vec![
                range(0, 39, LockKind::Write),
                range(60, 99, LockKind::Write)
            ]
        );
    }

    #[test]
    fn adjacent_ranges_of_one_kind_merge() {
        let out = apply_range(
            vec![range(0, 9, LockKind::Read), range(20, 29, LockKind::Read)],
            range(10, 19, LockKind::Read),
        );
        assert_eq!(out, vec![range(0, 29, LockKind::Read)]);
    }

    #[test]
    fn different_kind_inside_splits_and_does_not_merge() {
        let out = apply_range(
            vec![range(0, u64::MAX, LockKind::Read)],
            range(10, 19, LockKind::Write),
        );
        assert_eq!(
            out,
            vec![
                range(0, 9, LockKind::Read),
                range(10, 19, LockKind::Write),
                range(20, u64::MAX, LockKind::Read)
            ]
        );
    }

    #[test]
    fn lock_to_eof_absorbs_later_ranges() {
        let out = apply_range(
            vec![
                range(5, 9, LockKind::Write),
                range(100, 200, LockKind::Write),
            ],
            range(10, u64::MAX, LockKind::Write),
        );
        assert_eq!(out, vec![range(5, u64::MAX, LockKind::Write)]);
    }
}
