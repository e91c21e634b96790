//! File layouts (inline bytes or chunks of slices), slice ids and garbage.

use cellar_sql::{params, OptionalExtension, ToValue};
use libc::{EINVAL, EISDIR};

use super::changes::Tx;

use std::collections::{BTreeMap, HashSet};

use super::rows::{add_counter, add_usage, get_attr, posix, usage_totals};
use crate::{
    held_blocks, Attr, Committed, Content, CopiedRange, FileKind, GarbageSlice, Ino, Layout,
    MetaError, Result, Slice, SliceReferences, VolumeInfo,
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

/// A file's stored content: its inline bytes (`None` when its data lives in chunks) and the
/// bytes it holds.
struct Stored {
    inline: Option<Vec<u8>>,
    held: u64,
}

fn stored(conn: &Tx<'_, '_>, ino: Ino) -> Result<Stored> {
    let mut stmt = conn.prepare_cached("SELECT inline_data, held FROM inodes WHERE ino = ?1")?;
    stmt.query_row([ino], |row| {
        Ok(Stored {
            inline: row.get(0)?,
            held: row.get::<_, i64>(1)?.max(0) as u64,
        })
    })
    .optional()?
    .ok_or_else(|| posix(libc::ENOENT))
}

/// EDQUOT if the volume has a quota and `growth` more held bytes would pass it. Reads the
/// usage of every shard: on PostgreSQL, concurrent commits that grow a volume with a quota
/// then serialise (one of two racing ones is re-run), so no two of them overshoot it together.
fn check_quota(conn: &Tx<'_, '_>, growth: u64) -> Result<()> {
    if let Some(quota) = super::namespace::quota(conn)? {
        let (used, _) = usage_totals(conn)?;
        if (used.max(0) as u64).saturating_add(growth) > quota {
            return Err(posix(libc::EDQUOT));
        }
    }
    Ok(())
}

/// Stores the new size, inline bytes, held bytes and times of a regular file, bumps its data
/// version and accounts the held bytes (refusing with EDQUOT to grow them past the quota).
fn store_content(
    conn: &Tx<'_, '_>,
    attr: &mut Attr,
    old_held: u64,
    size: u64,
    inline: Option<&[u8]>,
    held: u64,
    now_ns: i64,
) -> Result<()> {
    if held > old_held {
        check_quota(conn, held - old_held)?;
    }
    conn.prepare_cached("UPDATE inodes SET size = ?1, inline_data = ?2, held = ?3, mtime_ns = ?4, ctime_ns = ?4, data_version = data_version + 1 WHERE ino = ?5")?
        .execute(params![size, inline, held, now_ns, attr.ino])?;
    conn.modified(attr.ino, attr.kind);
    if held != old_held {
        add_usage(conn, held as i64 - old_held as i64, 0)?;
    }
    attr.size = size;
    attr.blocks = held_blocks(held);
    attr.mtime_ns = now_ns;
    attr.ctime_ns = now_ns;
    attr.data_version += 1;
    Ok(())
}

/// Bytes of `[0, limit)` of a chunk whose visible slice holds data. `slices` are in commit
/// order: a later slice shadows earlier ones where they overlap; holes (id 0) and ranges no
/// slice covers hold nothing.
pub fn chunk_held<'a>(slices: impl DoubleEndedIterator<Item = &'a Slice>, limit: u64) -> u64 {
    visible_pieces(slices, 0, limit)
        .iter()
        .filter(|piece| piece.id != 0)
        .map(|piece| u64::from(piece.len))
        .sum()
}

/// What a chunk shows in `[from, to)`: its slices (in commit order, later ones shadowing
/// earlier ones) cut to their visible parts, disjoint and in position order. Holes (id 0) are
/// pieces too; ranges no slice covers are left out (both read as zeros).
pub fn visible_pieces<'a>(
    slices: impl DoubleEndedIterator<Item = &'a Slice>,
    from: u64,
    to: u64,
) -> Vec<Slice> {
    // Latest first: each range is decided by the first slice that covers it. `covered` holds
    // the ranges decided so far, disjoint, as start -> end.
    let mut covered: BTreeMap<u64, u64> = BTreeMap::new();
    let mut pieces = Vec::new();
    for slice in slices.rev() {
        let start = u64::from(slice.pos).max(from);
        let end = (u64::from(slice.pos) + u64::from(slice.len)).min(to);
        if start >= end {
            continue;
        }
        let before = covered
            .range(..start)
            .next_back()
            .filter(|(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e));
        let touching: Vec<(u64, u64)> = before
            .into_iter()
            .chain(covered.range(start..=end).map(|(&s, &e)| (s, e)))
            .collect();
        let (mut merged_start, mut merged_end, mut at) = (start, end, start);
        for (s, e) in touching {
            if s > at {
                pieces.push(cut(slice, at, s));
            }
            at = at.max(e);
            merged_start = merged_start.min(s);
            merged_end = merged_end.max(e);
            covered.remove(&s);
        }
        if at < end {
            pieces.push(cut(slice, at, end));
        }
        covered.insert(merged_start, merged_end);
    }
    pieces.sort_unstable_by_key(|piece| piece.pos);
    pieces
}

/// The part `[start, end)` (chunk positions) of a slice that covers it.
fn cut(slice: &Slice, start: u64, end: u64) -> Slice {
    let skip = (start - u64::from(slice.pos)) as u32;
    Slice {
        off: if slice.id == 0 { 0 } else { slice.off + skip },
        len: (end - start) as u32,
        pos: start as u32,
        ..*slice
    }
}

/// How much of chunk `chunk` lies below a file size of `size`.
fn chunk_limit(volume: &VolumeInfo, chunk: u64, size: u64) -> u64 {
    size.saturating_sub(chunk.saturating_mul(volume.chunk_size))
        .min(volume.chunk_size)
}

/// The held bytes of every chunked regular file, computed from its slices: (ino, stored held,
/// computed held), files without slices left out. `only`: of that file only, at that size.
pub fn computed_held(
    conn: &Tx<'_, '_>,
    volume: &VolumeInfo,
    only: Option<(Ino, u64)>,
) -> Result<Vec<(Ino, u64, u64)>> {
    // Two texts, not `?1 IS NULL OR ...`: a generic plan of that would scan every file's slices.
    let sql = match only {
        Some(_) => {
            "SELECT s.ino, s.chunk, i.size, i.held, s.id, s.size, s.off, s.len, s.pos
             FROM chunk_slices s JOIN inodes i ON i.ino = s.ino WHERE s.ino = ?1
             ORDER BY s.chunk, s.seq"
        }
        None => {
            "SELECT s.ino, s.chunk, i.size, i.held, s.id, s.size, s.off, s.len, s.pos
             FROM chunk_slices s JOIN inodes i ON i.ino = s.ino
             ORDER BY s.ino, s.chunk, s.seq"
        }
    };
    let params: Vec<cellar_sql::Value> = only.map(|(ino, _)| ino.to_value()).into_iter().collect();
    let rows: Vec<(Ino, u64, i64, u64, Slice)> = conn
        .prepare_cached(sql)?
        .query_map(params, |row| {
            Ok((
                row.get(0)?,
                row.get::<_, i64>(1)? as u64,
                row.get(3)?,
                row.get::<_, i64>(2)?.max(0) as u64,
                Slice {
                    id: row.get::<_, i64>(4)? as u64,
                    size: row.get(5)?,
                    off: row.get(6)?,
                    len: row.get(7)?,
                    pos: row.get(8)?,
                },
            ))
        })?
        .collect::<cellar_sql::Result<_>>()?;
    let mut files: Vec<(Ino, u64, u64)> = Vec::new();
    for group in rows.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)) {
        let (ino, chunk, stored, size, _) = group[0];
        let size = only.map_or(size, |(_, size)| size);
        let held = chunk_held(
            group.iter().map(|row| &row.4),
            chunk_limit(volume, chunk, size),
        );
        match files.last_mut() {
            Some((last, _, total)) if *last == ino => *total += held,
            _ => files.push((ino, stored.max(0) as u64, held)),
        }
    }
    Ok(files)
}

/// The held bytes of a chunked file of `size` bytes, from its slices.
fn file_held(conn: &Tx<'_, '_>, volume: &VolumeInfo, ino: Ino, size: u64) -> Result<u64> {
    Ok(computed_held(conn, volume, Some((ino, size)))?
        .first()
        .map_or(0, |(_, _, held)| *held))
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
    let content = match stored(conn, ino)?.inline {
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
    let Stored {
        inline: Some(mut bytes),
        held: old_held,
    } = stored(conn, ino)?
    else {
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
    let held = bytes.len() as u64;
    store_content(conn, &mut attr, old_held, end, Some(&bytes), held, now_ns)?;
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

pub fn commit_slices(
    conn: &Tx<'_, '_>,
    volume: &VolumeInfo,
    ino: Ino,
    slices: &[(u64, Slice)],
    min_size: u64,
    inline_version: Option<u64>,
    now_ns: i64,
) -> Result<Committed> {
    let attr = regular_file(conn, ino)?;
    check_slices(volume, slices.iter().map(|(_, slice)| slice))?;
    let Stored {
        inline,
        held: old_held,
    } = stored(conn, ino)?;
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
    append_slices(
        conn,
        volume,
        attr,
        old_held,
        inline.is_some(),
        slices,
        min_size,
        now_ns,
    )
}

/// Appends slices (checked) to the chunks of a regular file whose stored content was read as
/// `old_held` held bytes and `inline` (inline bytes, which the slices replace), grows its size
/// to at least `min_size` and stores the new held bytes, version and times.
#[allow(clippy::too_many_arguments)]
fn append_slices(
    conn: &Tx<'_, '_>,
    volume: &VolumeInfo,
    mut attr: Attr,
    old_held: u64,
    inline: bool,
    slices: &[(u64, Slice)],
    min_size: u64,
    now_ns: i64,
) -> Result<Committed> {
    let size = attr.size.max(min_size);
    // Only the chunks written to change what they hold (bytes past the old size were all
    // shadowed by holes). The inline bytes, if any, go: the slices carry them.
    let mut held = if inline { 0 } else { old_held };
    let mut chunks: Vec<u64> = slices.iter().map(|(chunk, _)| *chunk).collect();
    chunks.sort_unstable();
    chunks.dedup();
    let mut chunk_slices = Vec::with_capacity(chunks.len());
    for chunk in chunks {
        let old: Vec<Slice> = chunk_rows(conn, attr.ino, chunk)?
            .into_iter()
            .map(|(_, slice)| slice)
            .collect();
        let added = slices.iter().filter(|(c, _)| *c == chunk).map(|(_, s)| s);
        let before = chunk_held(old.iter(), chunk_limit(volume, chunk, attr.size));
        let after = chunk_held(
            old.iter().chain(added.clone()),
            chunk_limit(volume, chunk, size),
        );
        held = held.saturating_sub(before) + after;
        let objects: HashSet<u64> = old.iter().chain(added).map(|s| s.id).collect();
        chunk_slices.push((chunk, objects.len()));
    }
    insert_slices(conn, attr.ino, slices)?;
    store_content(conn, &mut attr, old_held, size, None, held, now_ns)?;
    Ok(Committed { attr, chunk_slices })
}

/// `(chunk, slice)` pieces covering file range `[start, end)`, cut at chunk boundaries, from
/// a stored slice whose byte `off` lies at `start` (`id` 0: holes).
fn file_range_slices(
    volume: &VolumeInfo,
    start: u64,
    end: u64,
    id: u64,
    size: u32,
    off: u32,
) -> Vec<(u64, Slice)> {
    let cs = volume.chunk_size;
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        let chunk = at / cs;
        let piece_end = end.min((chunk + 1) * cs);
        out.push((
            chunk,
            Slice {
                id,
                size,
                off: if id == 0 {
                    0
                } else {
                    off + (at - start) as u32
                },
                len: (piece_end - at) as u32,
                pos: (at % cs) as u32,
            },
        ));
        at = piece_end;
    }
    out
}

/// The `[offset, offset + len)` range of `src` (clipped to its size) becomes the range at
/// `dst_offset` of `dst`: the destination's chunks reference the source's stored slices, and
/// the source's holes (and never-written ranges) become holes. `None` (nothing changed) when
/// either file keeps inline bytes: the caller copies those bytes.
#[allow(clippy::too_many_arguments)]
pub fn copy_range(
    conn: &Tx<'_, '_>,
    volume: &VolumeInfo,
    src: Ino,
    offset: u64,
    dst: Ino,
    dst_offset: u64,
    len: u64,
    now_ns: i64,
) -> Result<Option<CopiedRange>> {
    let src_attr = regular_file(conn, src)?;
    let attr = regular_file(conn, dst)?;
    let src_inline = stored(conn, src)?.inline;
    let Stored {
        inline,
        held: old_held,
    } = stored(conn, dst)?;
    if src_inline.is_some() || inline.as_ref().is_some_and(|bytes| !bytes.is_empty()) {
        return Ok(None);
    }
    let len = len.min(src_attr.size.saturating_sub(offset));
    if len == 0 {
        return Ok(Some(CopiedRange {
            len,
            committed: Committed {
                attr,
                chunk_slices: Vec::new(),
            },
        }));
    }
    let cs = volume.chunk_size;
    let (end, shift) = (offset + len, dst_offset as i128 - offset as i128);
    let to_dst = |at: u64| (at as i128 + shift) as u64;
    // Holes go only below the destination's size: past it every byte reads as zero already.
    let hole_limit = attr.size;
    let mut slices = Vec::new();
    let hole = |slices: &mut Vec<(u64, Slice)>, start: u64, stop: u64| {
        let (from, to) = (to_dst(start), to_dst(stop).min(hole_limit));
        if from < to {
            slices.extend(file_range_slices(volume, from, to, 0, 0, 0));
        }
    };
    let mut at = offset;
    for chunk in offset / cs..(end - 1) / cs + 1 {
        let base = chunk * cs;
        let rows = chunk_rows(conn, src, chunk)?;
        let from = offset.max(base) - base;
        let to = end.min(base + cs) - base;
        for piece in visible_pieces(rows.iter().map(|(_, slice)| slice), from, to) {
            let start = base + u64::from(piece.pos);
            let stop = start + u64::from(piece.len);
            hole(&mut slices, at, start);
            if piece.id == 0 {
                hole(&mut slices, start, stop);
            } else {
                slices.extend(file_range_slices(
                    volume,
                    to_dst(start),
                    to_dst(stop),
                    piece.id,
                    piece.size,
                    piece.off,
                ));
            }
            at = stop;
        }
    }
    hole(&mut slices, at, end);
    let committed = append_slices(
        conn,
        volume,
        attr,
        old_held,
        inline.is_some(),
        &slices,
        dst_offset + len,
        now_ns,
    )?;
    Ok(Some(CopiedRange { len, committed }))
}

/// Makes `[offset, offset + len)` of a file read as zeros holding nothing (hole slices; inline
/// bytes are zeroed) and, unless `keep_size`, grows the size to its end.
pub fn zero_range(
    conn: &Tx<'_, '_>,
    volume: &VolumeInfo,
    ino: Ino,
    offset: u64,
    len: u64,
    keep_size: bool,
    now_ns: i64,
) -> Result<Committed> {
    let mut attr = regular_file(conn, ino)?;
    let Stored {
        inline,
        held: old_held,
    } = stored(conn, ino)?;
    let end = offset.saturating_add(len);
    let size = if keep_size {
        attr.size
    } else {
        attr.size.max(end)
    };
    if let Some(mut bytes) = inline {
        let zero_end = end.min(bytes.len() as u64);
        if offset < zero_end {
            bytes[offset as usize..zero_end as usize].fill(0);
        }
        // As `truncate`: a file that stays inline keeps its bytes up to its size.
        if size <= volume.inline_threshold {
            bytes.resize(size as usize, 0);
        }
        let held = bytes.len() as u64;
        store_content(conn, &mut attr, old_held, size, Some(&bytes), held, now_ns)?;
        return Ok(Committed {
            attr,
            chunk_slices: Vec::new(),
        });
    }
    // Past the old size every byte reads as zero already.
    let holes = file_range_slices(volume, offset, end.min(attr.size), 0, 0, 0);
    append_slices(conn, volume, attr, old_held, false, &holes, size, now_ns)
}

/// The first chunk at or after `from` with a slice that stores data.
pub fn next_data_chunk(conn: &Tx<'_, '_>, ino: Ino, from: u64) -> Result<Option<u64>> {
    let chunk: Option<i64> = conn
        .prepare_cached(
            "SELECT MIN(chunk) FROM chunk_slices WHERE ino = ?1 AND chunk >= ?2 AND id <> 0",
        )?
        .query_row(params![ino, from], |row| row.get(0))?;
    Ok(chunk.map(|c| c as u64))
}

pub fn truncate(
    conn: &Tx<'_, '_>,
    volume: &VolumeInfo,
    ino: Ino,
    size: u64,
    now_ns: i64,
) -> Result<Attr> {
    let mut attr = regular_file(conn, ino)?;
    let Stored {
        inline,
        held: old_held,
    } = stored(conn, ino)?;
    if let Some(mut bytes) = inline {
        bytes.truncate(size.min(bytes.len() as u64) as usize);
        if size <= volume.inline_threshold {
            bytes.resize(size as usize, 0);
        }
        let held = bytes.len() as u64;
        store_content(conn, &mut attr, old_held, size, Some(&bytes), held, now_ns)?;
        return Ok(attr);
    }
    if size == 0 {
        // An emptied file becomes inline again, so rewriting it small stays off the object store.
        discard_chunks_from(conn, ino, 0, now_ns)?;
        store_content(conn, &mut attr, old_held, 0, Some(&[]), 0, now_ns)?;
        return Ok(attr);
    }
    let mut held = old_held;
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
        held = file_held(conn, volume, ino, size)?;
    }
    store_content(conn, &mut attr, old_held, size, None, held, now_ns)?;
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
            "SELECT ino, chunk FROM chunk_slices GROUP BY ino, chunk HAVING COUNT(DISTINCT id) >= ?1 ORDER BY ino, chunk LIMIT ?2",
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
            // A slice some chunk references is never due, whatever its row says (one recorded
            // as garbage by a writer that could not tell whether its commit went through).
            // Nor is an own slice that a fork of the volume may reference (below its frozen
            // bound); an inherited one (below the lineage's top bound) is due: the caller
            // forgets it without deleting another volume's objects.
            "SELECT g.id, g.size FROM garbage g WHERE g.since_ns < ?1
               AND NOT EXISTS (SELECT 1 FROM chunk_slices s WHERE s.id = g.id)
               AND (g.id < (SELECT COALESCE(MAX(below), 0) FROM lineage)
                    OR g.id >= (SELECT COALESCE(MAX(frozen_below), 0) FROM descendants))
             ORDER BY g.since_ns, g.id LIMIT ?2",
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
