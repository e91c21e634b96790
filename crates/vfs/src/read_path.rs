//! Reading committed content: a file's layout (attributes plus inline bytes or chunk maps) comes
//! from one metadata read transaction, is cached per open inode (by `io`, in the inode's
//! `FileState`) and reused while neither this mount committed to the file (its commit
//! generation) nor the engine's data version moved.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cellar_meta::{Attr, Content, Slice};

use crate::backend::Core;
use crate::intervals::{IntervalMap, Piece};
use crate::VfsResult;

/// A cached layout is used without asking the engine for this long (the kernel's attribute TTL:
/// another mount's commit is seen after at most this, as a new open sees it at once).
const LAYOUT_TTL: Duration = Duration::from_secs(1);
/// Beyond this age (or half the gc grace, if shorter) the slices are read again even if the data
/// version did not move: compaction replaces slices without changing the content, and gc deletes
/// the replaced ones after its grace period, so a layout must never outlive a fraction of it.
const LAYOUT_MAX_AGE: Duration = Duration::from_secs(60);

/// How long a layout's slices may be used: see [`LAYOUT_MAX_AGE`].
pub(crate) fn layout_max_age(gc_grace: Duration) -> Duration {
    LAYOUT_MAX_AGE.min(gc_grace / 2)
}

/// Where a visible piece of a chunk comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SliceRef {
    pub id: u64,
    pub size: u32,
}

pub(crate) type ChunkMap = IntervalMap<SliceRef>;

/// The visible layout of a chunk: its slices in commit order, later ones shadowing earlier ones.
pub(crate) fn chunk_map(slices: &[Slice]) -> ChunkMap {
    let mut map = IntervalMap::default();
    for s in slices {
        let start = u64::from(s.pos);
        map.insert(
            start,
            start + u64::from(s.len),
            SliceRef {
                id: s.id,
                size: s.size,
            },
            u64::from(s.off),
        );
    }
    map
}

/// One snapshot of a file's committed content.
pub(crate) struct FileLayout {
    /// Committed attributes (size, data version) of the snapshot.
    pub attr: Attr,
    /// This mount's commit generation of the file when the snapshot was taken.
    pub generation: u64,
    /// When the snapshot was last confirmed current, and when its slices were read.
    confirmed: Instant,
    loaded: Instant,
    content: LayoutContent,
}

#[derive(Clone)]
enum LayoutContent {
    Inline(Arc<Vec<u8>>),
    /// Maps of the chunks read so far, each built once.
    Chunks(HashMap<u64, Arc<ChunkMap>>),
}

impl FileLayout {
    fn covers(&self, chunks: &std::ops::Range<u64>) -> bool {
        match &self.content {
            LayoutContent::Inline(_) => true,
            LayoutContent::Chunks(maps) => chunks.clone().all(|c| maps.contains_key(&c)),
        }
    }
}

/// Chunks touched by `[offset, offset + len)` (at least one).
pub(crate) fn chunk_range(offset: u64, len: u64, chunk_size: u64) -> std::ops::Range<u64> {
    let end = offset.saturating_add(len.max(1));
    offset / chunk_size..(end - 1) / chunk_size + 1
}

impl FileLayout {
    /// The cached layout to use for `chunks` at commit generation `generation` without asking
    /// the engine: fresh, of that generation and covering them.
    pub fn fresh(
        cached: &Option<Arc<FileLayout>>,
        generation: u64,
        max_age: Duration,
        chunks: &std::ops::Range<u64>,
    ) -> Option<Arc<FileLayout>> {
        cached
            .as_ref()
            .filter(|l| l.reusable(generation, max_age) && l.confirmed.elapsed() < LAYOUT_TTL)
            .filter(|l| l.covers(chunks))
            .cloned()
    }

    fn reusable(&self, generation: u64, max_age: Duration) -> bool {
        self.generation == generation && self.loaded.elapsed() < max_age
    }

    /// The data version to pass as `known_version` to `MetaEngine::read_layout`.
    pub fn known_version(
        cached: &Option<Arc<FileLayout>>,
        generation: u64,
        max_age: Duration,
        chunks: &std::ops::Range<u64>,
    ) -> Option<u64> {
        cached
            .as_ref()
            .filter(|l| l.reusable(generation, max_age) && l.covers(chunks))
            .map(|l| l.attr.data_version)
    }

    /// The layout an engine answer describes, reusing what the cached one already holds at the
    /// same data version.
    pub fn from_engine(
        cached: Option<Arc<FileLayout>>,
        fetched: cellar_meta::Layout,
        generation: u64,
        max_age: Duration,
    ) -> FileLayout {
        let now = Instant::now();
        let same_version = cached.as_ref().filter(|l| {
            l.reusable(generation, max_age) && l.attr.data_version == fetched.attr.data_version
        });
        let (content, loaded) = match (fetched.content, same_version) {
            (None, Some(layout)) => (layout.content.clone(), layout.loaded),
            (None, None) => (LayoutContent::Chunks(HashMap::new()), now),
            (Some(Content::Inline(bytes)), _) => (LayoutContent::Inline(Arc::new(bytes)), now),
            (Some(Content::Chunks(list)), same) => {
                // Chunks read before at the same version are still valid: keep them.
                let (mut maps, loaded) = match same.map(|l| (&l.content, l.loaded)) {
                    Some((LayoutContent::Chunks(maps), loaded)) => (maps.clone(), loaded),
                    _ => (HashMap::new(), now),
                };
                for (chunk, slices) in list {
                    maps.insert(chunk, Arc::new(chunk_map(&slices)));
                }
                (LayoutContent::Chunks(maps), loaded)
            }
        };
        FileLayout {
            attr: fetched.attr,
            generation,
            confirmed: now,
            loaded,
            content,
        }
    }

    /// Whether the file's bytes are inline (all of it reads as data).
    pub fn is_inline(&self) -> bool {
        matches!(self.content, LayoutContent::Inline(_))
    }

    /// The non-hole pieces visible in `[start, end)`, for read-ahead.
    pub fn data_pieces(&self, chunk_size: u64, start: u64, end: u64) -> Vec<Piece<SliceRef>> {
        visible_pieces(self, chunk_size, start, end)
            .into_iter()
            .map(|(_, p)| p)
            .filter(|p| p.source.id != 0)
            .collect()
    }
}

/// The pieces of chunked `layout` visible in `[offset, end)`, each with its position relative to
/// `offset`.
fn visible_pieces(
    layout: &FileLayout,
    chunk_size: u64,
    offset: u64,
    end: u64,
) -> Vec<(u64, Piece<SliceRef>)> {
    let LayoutContent::Chunks(maps) = &layout.content else {
        return Vec::new();
    };
    let cs = chunk_size;
    let mut pieces = Vec::new();
    for index in chunk_range(offset, end - offset, cs) {
        let Some(map) = maps.get(&index) else {
            continue;
        };
        let chunk_start = index * cs;
        let from = offset.max(chunk_start) - chunk_start;
        let to = end.min(chunk_start + cs) - chunk_start;
        pieces.extend(
            map.clipped(from, to)
                .map(|p| (chunk_start + p.start - offset, p)),
        );
    }
    pieces
}

impl Core {
    /// Committed bytes `[offset, offset + len)` of `layout`; bytes past its size (and holes) are
    /// zeros.
    pub fn read_layout_bytes(
        &self,
        layout: &FileLayout,
        offset: u64,
        len: usize,
    ) -> VfsResult<Vec<u8>> {
        let end = (offset + len as u64).min(layout.attr.size);
        if offset >= end {
            return Ok(vec![0u8; len]);
        }
        if let LayoutContent::Inline(blob) = &layout.content {
            let mut out = vec![0u8; len];
            // Inline bytes hold the start of the file; the rest up to the size reads as zeros.
            let blob_end = end.min(blob.len() as u64);
            if offset < blob_end {
                out[..(blob_end - offset) as usize]
                    .copy_from_slice(&blob[offset as usize..blob_end as usize]);
            }
            return Ok(out);
        }
        let pieces = visible_pieces(layout, self.chunk_size(), offset, end);
        if let [(0, p)] = pieces.as_slice() {
            if p.source.id != 0 && p.end - p.start == len as u64 {
                // One slice covers the whole request: its bytes are the answer, no zeroed
                // buffer to copy them into.
                let data = self.runtime.block_on(self.store.read_slice(
                    p.source.id,
                    p.source.size,
                    p.source_off as u32,
                    len as u32,
                ))?;
                let mut out = Vec::from(data);
                out.resize(len, 0);
                return Ok(out);
            }
        }
        let mut out = vec![0u8; len];
        self.fill_from_store(pieces.into_iter(), &mut out)?;
        Ok(out)
    }

    /// Reads the visible bytes of the given pieces (`(position in out, piece)`) into `out`.
    pub fn fill_from_store(
        &self,
        pieces: impl Iterator<Item = (u64, Piece<SliceRef>)>,
        out: &mut [u8],
    ) -> VfsResult<()> {
        let reads: Vec<_> = pieces
            .filter(|(_, p)| p.source.id != 0)
            .map(|(at, p)| {
                let store = self.store.clone();
                let len = (p.end - p.start) as u32;
                async move {
                    (
                        at,
                        store
                            .read_slice(p.source.id, p.source.size, p.source_off as u32, len)
                            .await,
                    )
                }
            })
            .collect();
        for (at, data) in self.runtime.block_on(futures::future::join_all(reads)) {
            let data = data?;
            let at = at as usize;
            let n = data.len().min(out.len() - at);
            out[at..at + n].copy_from_slice(&data[..n]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_ranges_cover_the_request() {
        assert_eq!(chunk_range(0, 10, 64), 0..1);
        assert_eq!(chunk_range(60, 10, 64), 0..2);
        assert_eq!(chunk_range(64, 64, 64), 1..2);
        assert_eq!(chunk_range(5, 0, 64), 0..1);
    }
}
