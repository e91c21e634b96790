//! The change log: every write transaction appends one row per inode and per directory entry it
//! changed, stamped with the origin of the engine instance that wrote it and with what the change
//! was (see [`ChangeKind`]). Mounts follow the log to invalidate what they cached; change events
//! read it as changes of paths ([`path_changes_since`]).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::ops::Deref;

use cellar_sql::{params, OptionalExtension, ToValue, Value};

use super::rows::{counter, find_attr, kind_code, kind_from_code, set_counter};
use crate::{
    Change, ChangeBatch, ChangeKind, FileKind, Ino, PathChange, PathChangeBatch, Result, ROOT_INO,
};

/// Change rows inserted by one statement.
const ROWS_PER_INSERT: usize = 64;
/// Values bound per change row (after the origin).
const ROW_VALUES: usize = 7;
/// Bound on the directories above a path, so a corrupted parent cycle cannot hang a reader.
const MAX_PATH_DEPTH: usize = 4096;

/// What happened to one entry in one transaction (the last thing that did, see
/// [`ChangeSet::entry`]).
struct EntryChange {
    ino: Ino,
    kind: ChangeKind,
    node: Option<FileKind>,
    from: Option<(Ino, Vec<u8>)>,
}

/// What one write transaction changed (one row per inode / entry is enough).
#[derive(Default)]
pub struct ChangeSet {
    /// Changed inodes, with the file kind of those whose change users see (Modified).
    inos: BTreeMap<Ino, Option<FileKind>>,
    /// (parent, name) → what happened to the entry.
    entries: BTreeMap<(Ino, Vec<u8>), EntryChange>,
}

impl ChangeSet {
    fn entry(&mut self, parent: Ino, name: &[u8], change: EntryChange) {
        let key = (parent, name.to_vec());
        // An exchange renames each entry onto the other's source: the rename wins.
        if change.kind == ChangeKind::MovedAway
            && self
                .entries
                .get(&key)
                .is_some_and(|known| known.kind == ChangeKind::Renamed)
        {
            return;
        }
        self.entries.insert(key, change);
    }
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

    /// The inode's row changed (link count, times, parent) or was freed: bookkeeping that
    /// caches must drop, not a change users see (see [`Tx::modified`]).
    pub fn ino_changed(&self, ino: Ino) {
        self.changes.borrow_mut().inos.entry(ino).or_insert(None);
    }

    /// The content or attributes of `ino` (a file of kind `node`) changed.
    pub fn modified(&self, ino: Ino, node: FileKind) {
        self.changes.borrow_mut().inos.insert(ino, Some(node));
    }

    /// The entry `name` in `parent` (naming `ino`) changed as a repair does it.
    pub fn entry_changed(&self, parent: Ino, name: &[u8], ino: Ino) {
        self.record_entry(parent, name, ino, ChangeKind::Other, None);
    }

    /// The entry `name` in `parent` now names `ino`, a new link.
    pub fn entry_added(&self, parent: Ino, name: &[u8], ino: Ino, node: FileKind) {
        self.record_entry(parent, name, ino, ChangeKind::Created, Some(node));
    }

    /// The entry `name` in `parent`, which named `ino`, was removed.
    pub fn entry_removed(&self, parent: Ino, name: &[u8], ino: Ino, node: FileKind) {
        self.record_entry(parent, name, ino, ChangeKind::Removed, Some(node));
    }

    /// `ino` moved from entry `from` to entry `to` (a rename; an exchange is two of them).
    pub fn entry_renamed(&self, from: (Ino, &[u8]), to: (Ino, &[u8]), ino: Ino, node: FileKind) {
        self.record_entry(from.0, from.1, ino, ChangeKind::MovedAway, Some(node));
        self.changes.borrow_mut().entry(
            to.0,
            to.1,
            EntryChange {
                ino,
                kind: ChangeKind::Renamed,
                node: Some(node),
                from: Some((from.0, from.1.to_vec())),
            },
        );
    }

    fn record_entry(
        &self,
        parent: Ino,
        name: &[u8],
        ino: Ino,
        kind: ChangeKind,
        node: Option<FileKind>,
    ) {
        self.changes.borrow_mut().entry(
            parent,
            name,
            EntryChange {
                ino,
                kind,
                node,
                from: None,
            },
        );
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
        let node_code = |node: Option<FileKind>| node.map(kind_code);
        let named: std::collections::BTreeSet<Ino> =
            changes.entries.values().map(|entry| entry.ino).collect();
        let rows: Vec<[Value; ROW_VALUES]> = changes
            .entries
            .iter()
            .map(|((parent, name), entry)| {
                let (old_parent, old_name) = entry.from.clone().unzip();
                params![
                    entry.ino,
                    parent,
                    name,
                    entry.kind.code(),
                    node_code(entry.node),
                    old_parent,
                    old_name
                ]
            })
            .chain(
                changes
                    .inos
                    .iter()
                    .filter(|(ino, _)| !named.contains(ino))
                    .map(|(ino, node)| {
                        let kind = match node {
                            Some(_) => ChangeKind::Modified,
                            None => ChangeKind::Other,
                        };
                        params![
                            ino,
                            None::<i64>,
                            None::<Vec<u8>>,
                            kind.code(),
                            node_code(*node),
                            None::<i64>,
                            None::<Vec<u8>>
                        ]
                    }),
            )
            .collect();
        // A few rows per statement (one round trip each on PostgreSQL).
        for batch in rows.chunks(ROWS_PER_INSERT) {
            let values: Vec<String> = (0..batch.len())
                .map(|i| {
                    let first = ROW_VALUES * i + 2;
                    let params: Vec<String> = (first..first + ROW_VALUES)
                        .map(|n| format!("?{n}"))
                        .collect();
                    format!("(?1, {})", params.join(", "))
                })
                .collect();
            let sql = format!(
                "INSERT INTO changes (origin, ino, parent, name, kind, node, old_parent, old_name) VALUES {}",
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
            "SELECT seq, origin, ino, parent, name, kind, node, old_parent, old_name FROM changes
             WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?
        .query_map(
            params![after as i64, i64::try_from(limit).unwrap_or(i64::MAX)],
            |row| {
                let parent: Option<Ino> = row.get(3)?;
                let name: Option<Vec<u8>> = row.get(4)?;
                let old_parent: Option<Ino> = row.get(7)?;
                let old_name: Option<Vec<u8>> = row.get(8)?;
                Ok(Change {
                    seq: row.get::<_, i64>(0)? as u64,
                    origin: row.get::<_, i64>(1)? as u64,
                    ino: row.get(2)?,
                    entry: parent.zip(name),
                    kind: ChangeKind::from_code(row.get(5)?),
                    node: row
                        .get::<_, Option<i64>>(6)?
                        .map(kind_from_code)
                        .transpose()?,
                    renamed_from: old_parent.zip(old_name),
                })
            },
        )?
        .collect::<cellar_sql::Result<_>>()?;
    Ok(ChangeBatch::Changes(changes))
}

/// Where an entry or inode left a place: before the change, `ino` was at `(parent, name)`.
fn departure(change: &Change) -> Option<Place> {
    match change.kind {
        ChangeKind::Removed | ChangeKind::MovedAway => change.entry.clone(),
        // An exchange has no MovedAway row: the renamed entry's source tells it.
        ChangeKind::Renamed => change.renamed_from.clone(),
        _ => None,
    }
}

/// A directory entry: (parent, name).
type Place = (Ino, Vec<u8>);
/// Per inode, the (batch index, place before) of each change that moved or removed it.
type Departures = HashMap<Ino, Vec<(usize, Place)>>;

/// Resolves the paths of a batch of changes in the snapshot that read them: where an inode was
/// when change `i` was made is where the first later change that moved or removed it found it,
/// or, if none did, where it is now.
struct Resolver<'c, 't> {
    conn: &'c cellar_sql::Tx<'t>,
    departures: Departures,
    /// Whether changes after the batch exist (a departure may be among them).
    more_after: Option<u64>,
    /// Places looked up in the snapshot (None: the inode has no name any more).
    places: HashMap<Ino, Option<Place>>,
}

impl Resolver<'_, '_> {
    /// Where `ino` was when change `i` was made.
    fn place(&mut self, ino: Ino, i: usize) -> Result<Option<Place>> {
        if let Some(list) = self.departures.get(&ino) {
            let first_after = list.partition_point(|(at, _)| *at <= i);
            if let Some((_, place)) = list.get(first_after) {
                return Ok(Some(place.clone()));
            }
        }
        if let Some(place) = self.places.get(&ino) {
            return Ok(place.clone());
        }
        let mut place = self
            .conn
            .prepare_cached(
                "SELECT parent, name FROM dentries WHERE ino = ?1 ORDER BY cookie LIMIT 1",
            )?
            .query_row([ino], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?;
        if let (None, Some(end)) = (&place, self.more_after) {
            // Removed or moved by a change past the batch (a scan of the log's tail: rare).
            place = self
                .conn
                .prepare_cached(
                    "SELECT parent, name, old_parent, old_name, kind FROM changes
                     WHERE seq > ?1 AND ino = ?2 AND kind IN (?3, ?4, ?5) ORDER BY seq LIMIT 1",
                )?
                .query_row(
                    params![
                        end as i64,
                        ino,
                        ChangeKind::Removed.code(),
                        ChangeKind::MovedAway.code(),
                        ChangeKind::Renamed.code()
                    ],
                    |row| {
                        let kind = ChangeKind::from_code(row.get(4)?);
                        let (parent, name) = if kind == ChangeKind::Renamed {
                            (row.get(2)?, row.get(3)?)
                        } else {
                            (row.get(0)?, row.get(1)?)
                        };
                        Ok(Option::<Ino>::zip(parent, name))
                    },
                )
                .optional()?
                .flatten();
        }
        self.places.insert(ino, place.clone());
        Ok(place)
    }

    /// The path of directory `dir` when change `i` was made ("" for the root).
    fn dir_path(&mut self, mut dir: Ino, i: usize) -> Result<Option<Vec<u8>>> {
        let mut names = Vec::new();
        while dir != ROOT_INO {
            if names.len() > MAX_PATH_DEPTH {
                return Ok(None);
            }
            let Some((parent, name)) = self.place(dir, i)? else {
                return Ok(None);
            };
            names.push(name);
            dir = parent;
        }
        let mut path = Vec::new();
        for name in names.iter().rev() {
            path.push(b'/');
            path.extend_from_slice(name);
        }
        Ok(Some(path))
    }

    /// The path of entry `name` of `parent` when change `i` was made.
    fn entry_path(&mut self, parent: Ino, name: &[u8], i: usize) -> Result<Option<Vec<u8>>> {
        Ok(self.dir_path(parent, i)?.map(|mut path| {
            path.push(b'/');
            path.extend_from_slice(name);
            path
        }))
    }
}

/// [`changes_since`] as events on paths: changes users do not see (bookkeeping, the source
/// entry of a rename) and changes of inodes without a name (open after their last unlink)
/// are read but give no event.
pub fn path_changes_since(
    conn: &cellar_sql::Tx<'_>,
    after: u64,
    limit: usize,
) -> Result<PathChangeBatch> {
    let changes = match changes_since(conn, after, limit)? {
        ChangeBatch::Lost => return Ok(PathChangeBatch::Lost),
        ChangeBatch::Changes(changes) => changes,
    };
    let upto = changes.last().map_or(after, |change| change.seq);
    let mut departures = Departures::new();
    for (i, change) in changes.iter().enumerate() {
        if let Some(place) = departure(change) {
            departures.entry(change.ino).or_default().push((i, place));
        }
    }
    let mut resolver = Resolver {
        conn,
        departures,
        more_after: (changes.len() >= limit).then_some(upto),
        places: HashMap::new(),
    };
    let mut events = Vec::new();
    for (i, change) in changes.iter().enumerate() {
        let (path, old_path) = match (change.kind, &change.entry) {
            (ChangeKind::Created | ChangeKind::Removed, Some((parent, name))) => {
                (resolver.entry_path(*parent, name, i)?, None)
            }
            (ChangeKind::Renamed, Some((parent, name))) => {
                let old_path = match &change.renamed_from {
                    Some((old_parent, old_name)) => {
                        resolver.entry_path(*old_parent, old_name, i)?
                    }
                    None => None,
                };
                (resolver.entry_path(*parent, name, i)?, old_path)
            }
            (ChangeKind::Modified, _) if change.ino == ROOT_INO => (Some(b"/".to_vec()), None),
            (ChangeKind::Modified, _) => match resolver.place(change.ino, i)? {
                Some((parent, name)) => (resolver.entry_path(parent, &name, i)?, None),
                None => (None, None),
            },
            _ => continue,
        };
        let Some(path) = path else { continue };
        let attr = match change.kind {
            ChangeKind::Removed => None,
            _ => find_attr(conn, change.ino)?,
        };
        events.push(PathChange {
            seq: change.seq,
            kind: change.kind,
            path,
            old_path,
            node: change.node.or(attr.as_ref().map(|attr| attr.kind)),
            attr,
        });
    }
    Ok(PathChangeBatch::Changes { upto, events })
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
