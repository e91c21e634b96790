//! The change log: every write transaction appends one row per inode and per directory entry it
//! changed, stamped with the origin of the engine instance that wrote it. Mounts follow the log to
//! invalidate what they cached.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Deref;

use cellar_sql::{params, OptionalExtension, ToValue, Value};

use super::rows::{counter, set_counter};
use crate::{Change, ChangeBatch, Ino, Result};

/// Change rows inserted by one statement.
const ROWS_PER_INSERT: usize = 64;

/// What one write transaction changed (one row per inode / entry is enough).
#[derive(Default)]
pub struct ChangeSet {
    inos: BTreeSet<Ino>,
    /// (parent, name) → the inode the entry names (or named, if removed).
    entries: BTreeMap<(Ino, Vec<u8>), Ino>,
}

/// A transaction plus the changes it made so far.
pub struct Tx<'t, 'a> {
    conn: &'t cellar_sql::Tx<'a>,
    changes: RefCell<ChangeSet>,
}

impl<'t, 'a> Tx<'t, 'a> {
    pub fn new(conn: &'t cellar_sql::Tx<'a>) -> Tx<'t, 'a> {
        Tx {
            conn,
            changes: RefCell::default(),
        }
    }

    /// The inode's row changed (attributes, size, data version, links) or was freed.
    pub fn ino_changed(&self, ino: Ino) {
        self.changes.borrow_mut().inos.insert(ino);
    }

    /// The entry `name` in `parent` (naming `ino`) was added, removed or replaced.
    pub fn entry_changed(&self, parent: Ino, name: &[u8], ino: Ino) {
        self.changes
            .borrow_mut()
            .entries
            .insert((parent, name.to_vec()), ino);
    }

    /// Appends the recorded changes to the log, at the very end of the transaction: under the
    /// volume's lock `key`, so that seqs (taken from the table's sequence) follow commit order
    /// on PostgreSQL too; the commit then notifies the volume's listeners.
    pub fn record(&self, origin: u64, key: &str) -> Result<()> {
        let changes = self.changes.take();
        if changes.inos.is_empty() && changes.entries.is_empty() {
            return Ok(());
        }
        self.conn.publish(key)?;
        let named: BTreeSet<Ino> = changes.entries.values().copied().collect();
        let rows: Vec<[Value; 3]> = changes
            .entries
            .iter()
            .map(|((parent, name), ino)| params![ino, parent, name])
            .chain(
                changes
                    .inos
                    .difference(&named)
                    .map(|ino| params![ino, None::<i64>, None::<Vec<u8>>]),
            )
            .collect();
        // A few rows per statement (one round trip each on PostgreSQL).
        for batch in rows.chunks(ROWS_PER_INSERT) {
            let values: Vec<String> = (0..batch.len())
                .map(|i| format!("(?1, ?{}, ?{}, ?{})", 3 * i + 2, 3 * i + 3, 3 * i + 4))
                .collect();
            let sql = format!(
                "INSERT INTO changes (origin, ino, parent, name) VALUES {}",
                values.join(", ")
            );
            let mut bound = vec![(origin as i64).to_value()];
            bound.extend(batch.iter().flatten().cloned());
            self.conn.execute(&sql, bound)?;
        }
        Ok(())
    }
}

impl<'a> Deref for Tx<'_, 'a> {
    type Target = cellar_sql::Tx<'a>;
    fn deref(&self) -> &cellar_sql::Tx<'a> {
        self.conn
    }
}

/// The newest seq, also when trimming emptied the log.
pub fn last_change(conn: &cellar_sql::Tx<'_>) -> Result<u64> {
    let seq: i64 = conn
        .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM changes")?
        .query_row((), |row| row.get(0))?;
    Ok(seq.max(counter(conn, "trimmed_changes")?) as u64)
}

pub fn changes_since(conn: &cellar_sql::Tx<'_>, after: u64, limit: usize) -> Result<ChangeBatch> {
    if counter(conn, "trimmed_changes")? as u64 > after {
        return Ok(ChangeBatch::Lost);
    }
    let changes = conn
        .prepare_cached(
            "SELECT seq, origin, ino, parent, name FROM changes WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?
        .query_map(
            params![after as i64, i64::try_from(limit).unwrap_or(i64::MAX)],
            |row| {
                let parent: Option<Ino> = row.get(3)?;
                let name: Option<Vec<u8>> = row.get(4)?;
                Ok(Change {
                    seq: row.get::<_, i64>(0)? as u64,
                    origin: row.get::<_, i64>(1)? as u64,
                    ino: row.get(2)?,
                    entry: parent.zip(name),
                })
            },
        )?
        .collect::<cellar_sql::Result<_>>()?;
    Ok(ChangeBatch::Changes(changes))
}

/// Drops the log's prefix up to the newest change older than `older_than_ns`: watchers that had
/// not read that far get `Lost`.
pub fn trim_changes(conn: &cellar_sql::Tx<'_>, older_than_ns: i64) -> Result<u64> {
    let upto: Option<i64> = conn
        .prepare_cached("SELECT MAX(seq) FROM changes WHERE at_ns < ?1")?
        .query_row([older_than_ns], |row| row.get(0))
        .optional()?
        .flatten();
    let Some(upto) = upto else { return Ok(0) };
    let removed = conn
        .prepare_cached("DELETE FROM changes WHERE seq <= ?1")?
        .execute([upto])?;
    if upto > counter(conn, "trimmed_changes")? {
        set_counter(conn, "trimmed_changes", upto)?;
    }
    Ok(removed as u64)
}
