//! Compaction: a chunk whose slices pile up (random writes, appends) is rewritten as one object
//! (one slice per run of data, so holes stay holes).
//! Writers ask for it by need, from the slice count each commit returns: in the background past
//! [`COMPACT_BACKGROUND_SLICES`], synchronously past [`COMPACT_SYNC_SLICES`] (so no chunk grows
//! without bound while the background falls behind). The periodic sweep for chunks left
//! fragmented (a writer that crashed before compacting) runs under the volume's maintenance lease.

use bytes::Bytes;
use cellar_meta::{Content, GarbageSlice, Ino, Slice};

use crate::backend::Core;
use crate::read_path::chunk_map;
use crate::VfsResult;

/// A chunk with this many slices is queued for background compaction.
pub(crate) const COMPACT_BACKGROUND_SLICES: usize = 100;
/// A commit leaving a chunk with this many slices compacts it before returning.
pub(crate) const COMPACT_SYNC_SLICES: usize = 2500;

impl Core {
    /// Rewrites one fragmented chunk as a single object. Returns whether the chunk was replaced
    /// (false when it changed meanwhile or is not fragmented).
    pub fn compact_chunk(&self, ino: Ino, index: u64) -> VfsResult<bool> {
        if self.read_only {
            // A snapshot never changes, not even its layout (it would upload copies of
            // objects it shares with its origin).
            return Ok(false);
        }
        // Size and slices from one snapshot: the rewrite must not resurrect truncated bytes.
        let layout = match self.meta.read_layout(ino, index..index + 1, None) {
            Ok(layout) => layout,
            Err(e) if e.errno() == libc::ENOENT => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let Some(Content::Chunks(mut chunks)) = layout.content else {
            return Ok(false);
        };
        let Some((_, slices)) = chunks.pop() else {
            return Ok(false);
        };
        let objects: std::collections::HashSet<u64> = slices.iter().map(|s| s.id).collect();
        if objects.len() < 2 {
            return Ok(false);
        }
        let cs = self.chunk_size();
        let chunk_start = index * cs;
        let visible_end = layout.attr.size.saturating_sub(chunk_start).min(cs);
        let map = chunk_map(&slices);
        // The runs of visible data, holes between them left out: what the chunk holds (its
        // `st_blocks`, the volume's usage) must not change.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for p in map.clipped(0, visible_end).filter(|p| p.source.id != 0) {
            match runs.last_mut() {
                Some((_, end)) if *end == p.start => *end = p.end,
                _ => runs.push((p.start, p.end)),
            }
        }
        if runs.len() > slices.len() {
            return Ok(false);
        }
        let new = if runs.is_empty() {
            Vec::new()
        } else {
            // One object with the runs back to back, one slice per run.
            let offsets: Vec<u64> = runs
                .iter()
                .scan(0, |at, (start, end)| {
                    let here = *at;
                    *at += end - start;
                    Some(here)
                })
                .collect();
            let total: u64 = runs.iter().map(|(start, end)| end - start).sum();
            let mut data = vec![0u8; total as usize];
            self.fill_from_store(
                runs.iter().zip(&offsets).flat_map(|(&(start, end), &at)| {
                    map.clipped(start, end)
                        .map(move |p| (at + p.start - start, p))
                }),
                &mut data,
            )?;
            let id = self.put_new_slice(Bytes::from(data))?;
            runs.iter()
                .zip(&offsets)
                .map(|(&(start, end), &at)| Slice {
                    id,
                    size: total as u32,
                    off: at as u32,
                    len: (end - start) as u32,
                    pos: start as u32,
                })
                .collect()
        };
        let replaced = self.meta.replace_chunk(ino, index, &slices, &new)?;
        if !replaced {
            let garbage: Vec<_> = new
                .iter()
                .map(|s| GarbageSlice {
                    id: s.id,
                    size: s.size,
                })
                .collect();
            self.discard_slices(&garbage);
        }
        Ok(replaced)
    }

    /// One sweep over at most `limit` chunks with at least `min_slices` slices; returns how many
    /// were rewritten.
    pub fn compact_pass(&self, min_slices: usize, limit: usize) -> VfsResult<u64> {
        let mut compacted = 0;
        for (ino, index) in self.meta.fragmented_chunks(min_slices, limit)? {
            match self.compact_chunk(ino, index) {
                Ok(true) => compacted += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(ino, chunk = index, error = %e, "compaction of a chunk failed")
                }
            }
        }
        Ok(compacted)
    }
}
