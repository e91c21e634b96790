//! File layouts (inline bytes or chunks of slices), slice ids and garbage.

use cellar_sql::{params, OptionalExtension, ToValue};
use libc::{EINVAL, EISDIR};

use super::changes::Tx;

use super::rows::{add_counter, add_usage, get_attr, posix};
use crate::{
    Attr, Committed, Content, FileKind, GarbageSlice, Ino, Layout, MetaError, Result, Slice,
    SliceReferences, VolumeInfo,
};

/// Moves the slices of chunks `from_chunk..` of `ino` to garbage (unless another chunk still
/// references the same stored slice) and deletes them from the file.
pub fn discard_chunks_from(
    conn: &Tx<'_, '_>,
    ino: Ino,
    from_chunk: u64,
    now_ns: i64,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO garbage (id, size, since_ns)
         SELECT s.id, MAX(s.size), CAST(?3 AS BIGINT) FROM chunk_slices s
         WHERE s.ino = ?1 AND s.chunk >= ?2 AND s.id <> 0
           AND NOT EXISTS (SELECT 1 FROM chunk_slices o
                           WHERE o.id = s.id AND NOT (o.ino = ?1 AND o.chunk >= ?2))
         GROUP BY s.id
         ON CONFLICT (id) DO NOTHING",
    )?
    .execute(params![ino, from_chunk, now_ns])?;
    conn.prepare_cached("DELETE FROM chunk_slices WHERE ino = ?1 AND chunk >= ?2")?
        .execute(params![ino, from_chunk])?;
    Ok(())
}

/// The inode's attributes, which must be those of a regular file.
fn regular_file(conn: &Tx<'_, '_>, ino: Ino) -> Result<Attr> {
    let attr = get_attr(conn, ino)?;
    match attr.kind {
        FileKind::Regular => Ok(attr),
        FileKind::Directory => Err(posix(EISDIR)),
        _ => Err(posix(EINVAL)),
    }
}

fn inline_bytes(conn: &Tx<'_, '_>, ino: Ino) -> Result<Option<Vec<u8>>> {
    let mut stmt = conn.prepare_cached("SELECT inline_data FROM inodes WHERE ino = ?1")?;
    stmt.query_row([ino], |row| row.get(0))
        .optional()?
        .ok_or_else(|| posix(libc::ENOENT))
}

/// Stores the new size, inline bytes and times of a regular file, bumps its data version and
/// accounts the size change.
fn store_content(
    conn: &Tx<'_, '_>,
    attr: &mut Attr,
    size: u64,
    inline: Option<&[u8]>,
    now_ns: i64,
) -> Result<()> {
    conn.prepare_cached("UPDATE inodes SET size = ?1, inline_data = ?2, mtime_ns = ?3, ctime_ns = ?3, data_version = data_version + 1 WHERE ino = ?4")?
        .execute(params![size, inline, now_ns, attr.ino])?;
    conn.ino_changed(attr.ino);
    add_usage(conn, size as i64 - attr.size as i64, 0)?;
    attr.size = size;
    attr.mtime_ns = now_ns;
    attr.ctime_ns = now_ns;
    attr.data_version += 1;
    Ok(())
}

pub fn read_layout(
    conn: &Tx<'_, '_>,
    ino: Ino,
    chunks: std::ops::Range<u64>,
    known_version: Option<u64>,
) -> Result<Layout> {
    let attr = get_attr(conn, ino)?;
    if known_version == Some(attr.data_version) || attr.kind != FileKind::Regular {
        return Ok(Layout {
            attr,
            content: None,
        });
    }
    let content = match inline_bytes(conn, ino)? {
        Some(bytes) => Content::Inline(bytes),
        None => Content::Chunks(
            chunks
                .map(|chunk| Ok((chunk, read_chunk(conn, ino, chunk)?)))
                .collect::<Result<_>>()?,
        ),
    };
    Ok(Layout {
        attr,
        content: Some(content),
    })
}

/// The slices of a chunk with their sequence numbers, in commit order.
fn chunk_rows(conn: &Tx<'_, '_>, ino: Ino, chunk: u64) -> Result<Vec<(i64, Slice)>> {
    let rows = conn
        .prepare_cached("SELECT seq, id, size, off, len, pos FROM chunk_slices WHERE ino = ?1 AND chunk = ?2 ORDER BY seq")?
        .query_map(params![ino, chunk], |row| {
            Ok((
                row.get(0)?,
                Slice {
                    id: row.get::<_, i64>(1)? as u64,
                    size: row.get(2)?,
                    off: row.get(3)?,
                    len: row.get(4)?,
                    pos: row.get(5)?,
                },
            ))
        })?
        .collect::<cellar_sql::Result<_>>()?;
    Ok(rows)
}

pub fn read_chunk(conn: &Tx<'_, '_>, ino: Ino, chunk: u64) -> Result<Vec<Slice>> {
    let slices: Vec<Slice> = chunk_rows(conn, ino, chunk)?
        .into_iter()
        .map(|(_, slice)| slice)
        .collect();
    if slices.is_empty() {
        get_attr(conn, ino)?;
    }
    Ok(slices)
}

pub fn write_inline(
    conn: &Tx<'_, '_>,
    volume: &VolumeInfo,
    ino: Ino,
    extents: &[(u64, &[u8])],
    now_ns: i64,
) -> Result<Option<Attr>> {
    let mut attr = regular_file(conn, ino)?;
    let Some(mut bytes) = inline_bytes(conn, ino)? else {
        return Ok(None);
    };
    let end = extents
        .iter()
        .map(|(offset, data)| offset + data.len() as u64)
        .fold(attr.size, u64::max);
    if end > volume.inline_threshold {
        return Ok(None);
    }
    // The blob may be shorter than the size (a grown truncate): the gap reads as zeros.
    bytes.resize(end as usize, 0);
    for (offset, data) in extents {
        let at = *offset as usize;
        bytes[at..at + data.len()].copy_from_slice(data);
    }
    store_content(conn, &mut attr, end, Some(&bytes), now_ns)?;
    Ok(Some(attr))
}

fn insert_slices(conn: &Tx<'_, '_>, ino: Ino, slices: &[(u64, Slice)]) -> Result<()> {
    for (chunk, slice) in slices {
        insert_slice(conn, None, ino, *chunk, slice)?;
    }
    Ok(())
}

/// Appends a slice to a chunk, or puts it at sequence number `seq` (without one it takes the
/// next: later in commit order than every slice before).
fn insert_slice(
    conn: &Tx<'_, '_>,
    seq: Option<i64>,
    ino: Ino,
    chunk: u64,
    slice: &Slice,
) -> Result<()> {
    // The sequence is the table's own (a generated column on PostgreSQL, which refuses NULL).
    let sql = match seq {
        Some(_) => "INSERT INTO chunk_slices (seq, ino, chunk, id, size, off, len, pos) VALUES (?8, ?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        None => "INSERT INTO chunk_slices (ino, chunk, id, size, off, len, pos) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    };
    let mut values = params![
        ino,
        chunk,
        slice.id as i64,
        slice.size,
        slice.off,
        slice.len,
        slice.pos
    ]
    .to_vec();
    values.extend(seq.map(|seq| seq.to_value()));
    conn.execute(sql, values)?;
    Ok(())
}

/// EINVAL for a slice that does not fit its chunk or reads past its stored object.
fn check_slices<'a>(
    volume: &VolumeInfo,
    slices: impl IntoIterator<Item = &'a Slice>,
) -> Result<()> {
    for slice in slices {
        let in_chunk = u64::from(slice.pos) + u64::from(slice.len) <= volume.chunk_size;
        let in_object =
            slice.id == 0 || u64::from(slice.off) + u64::from(slice.len) <= u64::from(slice.size);
        if !in_chunk || !in_object {
            return Err(posix(EINVAL));
        }
    }
    Ok(())
}

/// Conflict unless every non-hole slice still has its pending-upload row (gc deletes the objects
/// of rows that expired); the rows are dropped, since the slices become live. On a conflict no row
/// is dropped (`replace_chunk` commits its transaction even when it refuses).
fn claim_pending<'a>(
    conn: &Tx<'_, '_>,
    slices: impl IntoIterator<Item = &'a Slice> + Clone,
) -> Result<()> {
    let mut pending = conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM garbage WHERE id = ?1)")?;
    for slice in slices.clone().into_iter().filter(|slice| slice.id != 0) {
        if !pending.query_row([slice.id as i64], |row| row.get::<_, bool>(0))? {
            return Err(MetaError::Conflict(format!(
                "slice {} is no longer a pending upload (it expired and gc may have deleted its objects)",
                slice.id
            )));
        }
    }
    let mut delete = conn.prepare_cached("DELETE FROM garbage WHERE id = ?1")?;
    for slice in slices.into_iter().filter(|slice| slice.id != 0) {
        delete.execute([slice.id as i64])?;
    }
    Ok(())
}

fn chunk_slice_count(conn: &Tx<'_, '_>, ino: Ino, chunk: u64) -> Result<usize> {
    let mut stmt =
        conn.prepare_cached("SELECT COUNT(*) FROM chunk_slices WHERE ino = ?1 AND chunk = ?2")?;
    Ok(stmt.query_row(params![ino, chunk], |row| row.get::<_, i64>(0))? as usize)
}

pub fn commit_slices(
    conn: &Tx<'_, '_>,
    volume: &VolumeInfo,
    ino: Ino,
    slices: &[(u64, Slice)],
    min_size: u64,
    inline_version: Option<u64>,
    now_ns: i64,
) -> Result<Committed> {
    let mut attr = regular_file(conn, ino)?;
    check_slices(volume, slices.iter().map(|(_, slice)| slice))?;
    let inline = inline_bytes(conn, ino)?;
    match inline_version {
        Some(version) if version != attr.data_version => {
            return Err(MetaError::Conflict(format!(
                "inode {ino} changed after its inline bytes were read (version {version}, now {})",
                attr.data_version
            )));
        }
        None if inline.as_ref().is_some_and(|bytes| !bytes.is_empty()) => {
            return Err(MetaError::Conflict(format!(
                "inode {ino} holds inline bytes: write them out with its slices"
            )));
        }
        _ => {}
    }
    claim_pending(conn, slices.iter().map(|(_, slice)| slice))?;
    insert_slices(conn, ino, slices)?;
    let size = attr.size.max(min_size);
    store_content(conn, &mut attr, size, None, now_ns)?;
    let mut chunks: Vec<u64> = slices.iter().map(|(chunk, _)| *chunk).collect();
    chunks.sort_unstable();
    chunks.dedup();
    let chunk_slices = chunks
        .into_iter()
        .map(|chunk| Ok((chunk, chunk_slice_count(conn, ino, chunk)?)))
        .collect::<Result<_>>()?;
    Ok(Committed { attr, chunk_slices })
}

pub fn truncate(
    conn: &Tx<'_, '_>,
    volume: &VolumeInfo,
    ino: Ino,
    size: u64,
    now_ns: i64,
) -> Result<Attr> {
    let mut attr = regular_file(conn, ino)?;
    if let Some(mut bytes) = inline_bytes(conn, ino)? {
        bytes.truncate(size.min(bytes.len() as u64) as usize);
        if size <= volume.inline_threshold {
            bytes.resize(size as usize, 0);
        }
        store_content(conn, &mut attr, size, Some(&bytes), now_ns)?;
        return Ok(attr);
    }
    if size == 0 {
        // An emptied file becomes inline again, so rewriting it small stays off the object store.
        discard_chunks_from(conn, ino, 0, now_ns)?;
        store_content(conn, &mut attr, 0, Some(&[]), now_ns)?;
        return Ok(attr);
    }
    if size < attr.size {
        let chunk_size = volume.chunk_size;
        discard_chunks_from(conn, ino, size.div_ceil(chunk_size), now_ns)?;
        let (last_chunk, tail_pos) = (size / chunk_size, size % chunk_size);
        if tail_pos != 0 && chunk_has_slices(conn, ino, last_chunk)? {
            let hole = Slice {
                id: 0,
                size: 0,
                off: 0,
                len: (chunk_size - tail_pos) as u32,
                pos: tail_pos as u32,
            };
            insert_slices(conn, ino, &[(last_chunk, hole)])?;
        }
    }
    store_content(conn, &mut attr, size, None, now_ns)?;
    Ok(attr)
}

fn chunk_has_slices(conn: &Tx<'_, '_>, ino: Ino, chunk: u64) -> Result<bool> {
    let mut stmt = conn.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM chunk_slices WHERE ino = ?1 AND chunk = ?2)",
    )?;
    Ok(stmt.query_row(params![ino, chunk], |row| row.get(0))?)
}

pub fn alloc_slice_ids(conn: &Tx<'_, '_>, count: u64) -> Result<u64> {
    if count == 0 {
        return Err(posix(EINVAL));
    }
    let next = add_counter(conn, "next_slice", count as i64)?;
    Ok(next as u64 - count)
}

pub fn fragmented_chunks(
    conn: &Tx<'_, '_>,
    min_slices: usize,
    limit: usize,
) -> Result<Vec<(Ino, u64)>> {
    let chunks = conn
        .prepare_cached(
            "SELECT ino, chunk FROM chunk_slices GROUP BY ino, chunk HAVING COUNT(*) >= ?1 ORDER BY ino, chunk LIMIT ?2",
        )?
        .query_map(params![min_slices as i64, i64::try_from(limit).unwrap_or(i64::MAX)], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })?
        .collect::<cellar_sql::Result<_>>()?;
    Ok(chunks)
}

pub fn replace_chunk(
    conn: &Tx<'_, '_>,
    ino: Ino,
    chunk: u64,
    expected: &[Slice],
    new: &[Slice],
    now_ns: i64,
) -> Result<bool> {
    if new.len() > expected.len() {
        return Err(posix(EINVAL));
    }
    // Slices committed after the compactor read the chunk shadow what it rewrote: they stay,
    // after the new ones (which take the sequence numbers of the rows they replace).
    let current = chunk_rows(conn, ino, chunk)?;
    let prefix = &current[..expected.len().min(current.len())];
    if !prefix.iter().map(|(_, slice)| slice).eq(expected.iter()) {
        return Ok(false);
    }
    match claim_pending(conn, new) {
        Ok(()) => {}
        Err(MetaError::Conflict(_)) => return Ok(false),
        Err(e) => return Err(e),
    }
    let mut delete = conn.prepare_cached("DELETE FROM chunk_slices WHERE seq = ?1")?;
    for (seq, _) in prefix {
        delete.execute([seq])?;
    }
    for ((seq, _), slice) in prefix.iter().zip(new) {
        insert_slice(conn, Some(*seq), ino, chunk, slice)?;
    }
    let mut still_used =
        conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM chunk_slices WHERE id = ?1)")?;
    let mut dropped = Vec::new();
    for slice in expected.iter().filter(|slice| slice.id != 0) {
        if !still_used.query_row([slice.id as i64], |row| row.get::<_, bool>(0))? {
            dropped.push(GarbageSlice {
                id: slice.id,
                size: slice.size,
            });
        }
    }
    add_garbage(conn, &dropped, now_ns)?;
    Ok(true)
}

pub fn garbage_slices(
    conn: &Tx<'_, '_>,
    before_ns: i64,
    limit: usize,
) -> Result<Vec<GarbageSlice>> {
    let slices = conn
        .prepare_cached(
            "SELECT id, size FROM garbage WHERE since_ns < ?1 ORDER BY since_ns, id LIMIT ?2",
        )?
        .query_map(
            params![before_ns, i64::try_from(limit).unwrap_or(i64::MAX)],
            |row| {
                Ok(GarbageSlice {
                    id: row.get::<_, i64>(0)? as u64,
                    size: row.get(1)?,
                })
            },
        )?
        .collect::<cellar_sql::Result<_>>()?;
    Ok(slices)
}

pub fn forget_garbage(conn: &Tx<'_, '_>, ids: &[u64]) -> Result<()> {
    let mut delete = conn.prepare_cached("DELETE FROM garbage WHERE id = ?1")?;
    for &id in ids {
        delete.execute([id as i64])?;
    }
    Ok(())
}

/// Records (or re-dates) garbage slices: a writer records its uploads as pending garbage with a
/// future `since` before uploading, and re-dates them to now when their commit fails.
pub fn add_garbage(conn: &Tx<'_, '_>, slices: &[GarbageSlice], now_ns: i64) -> Result<()> {
    let mut insert = conn.prepare_cached(
        "INSERT INTO garbage (id, size, since_ns) VALUES (?1, ?2, ?3) \
         ON CONFLICT (id) DO UPDATE SET size = excluded.size, since_ns = excluded.since_ns",
    )?;
    for slice in slices.iter().filter(|slice| slice.id != 0) {
        insert.execute(params![slice.id as i64, slice.size, now_ns])?;
    }
    Ok(())
}

pub fn slice_references(conn: &Tx<'_, '_>) -> Result<SliceReferences> {
    let live = conn
        .prepare_cached(
            "SELECT id, MAX(size) FROM chunk_slices WHERE id <> 0 GROUP BY id ORDER BY id",
        )?
        .query_map((), |row| Ok((row.get::<_, i64>(0)? as u64, row.get(1)?)))?
        .collect::<cellar_sql::Result<_>>()?;
    let garbage = conn
        .prepare_cached("SELECT id FROM garbage ORDER BY id")?
        .query_map((), |row| Ok(row.get::<_, i64>(0)? as u64))?
        .collect::<cellar_sql::Result<_>>()?;
    Ok(SliceReferences { live, garbage })
}
