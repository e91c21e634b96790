//! Buffered writes of one inode: extents in write order, and their coalescing into the
//! contiguous per-chunk runs that become slices.

use bytes::Bytes;

use crate::intervals::IntervalMap;

/// Bytes written at `offset`, not yet committed.
#[derive(Debug)]
pub(crate) struct Extent {
    pub offset: u64,
    pub data: Vec<u8>,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset + self.data.len() as u64
    }
}

/// A contiguous run of bytes inside one chunk: becomes one slice.
#[derive(Clone, Debug)]
pub(crate) struct Run {
    pub offset: u64,
    pub data: Bytes,
}

impl Run {
    pub fn end(&self) -> u64 {
        self.offset + self.data.len() as u64
    }
}

/// Coalesces extents (in write order; later ones win) into non-overlapping runs in offset order,
/// none crossing a chunk boundary. Pieces are shared, not copied, when a run is a single piece.
pub(crate) fn coalesce<'a>(
    extents: impl IntoIterator<Item = &'a Run>,
    chunk_size: u64,
) -> Vec<Run> {
    let extents: Vec<&Run> = extents.into_iter().collect();
    let mut map = IntervalMap::default();
    for (index, e) in extents.iter().enumerate() {
        map.insert(e.offset, e.end(), index, 0);
    }
    let mut runs = Vec::new();
    let mut current: Option<(u64, Vec<Bytes>)> = None;
    let mut current_end = 0;
    for piece in map.pieces() {
        let mut start = piece.start;
        while start < piece.end {
            let chunk_end = (start / chunk_size + 1) * chunk_size;
            let end = piece.end.min(chunk_end);
            let from = (piece.source_off + (start - piece.start)) as usize;
            let part = extents[piece.source]
                .data
                .slice(from..from + (end - start) as usize);
            match &mut current {
                Some((_, parts)) if current_end == start && start % chunk_size != 0 => {
                    parts.push(part)
                }
                _ => {
                    runs.extend(current.take().map(join_parts));
                    current = Some((start, vec![part]));
                }
            }
            current_end = end;
            start = end;
        }
    }
    runs.extend(current.map(join_parts));
    runs
}

fn join_parts((offset, parts): (u64, Vec<Bytes>)) -> Run {
    let data = match <[Bytes; 1]>::try_from(parts) {
        Ok([single]) => single,
        Err(parts) => Bytes::from(parts.concat()),
    };
    Run { offset, data }
}

/// Copies the part of `data` (at file offset `offset`) that falls inside `out` (at file offset
/// `out_offset`).
pub(crate) fn overlay(out: &mut [u8], out_offset: u64, offset: u64, data: &[u8]) {
    let out_end = out_offset + out.len() as u64;
    let start = offset.max(out_offset);
    let end = (offset + data.len() as u64).min(out_end);
    if start < end {
        let dst = (start - out_offset) as usize;
        let src = (start - offset) as usize;
        let n = (end - start) as usize;
        out[dst..dst + n].copy_from_slice(&data[src..src + n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extent(offset: u64, byte: u8, len: usize) -> Run {
        Run {
            offset,
            data: Bytes::from(vec![byte; len]),
        }
    }

    #[test]
    fn later_writes_win_and_runs_split_at_chunks() {
        let extents = vec![
            extent(0, 1, 10),
            extent(5, 2, 10),
            extent(30, 3, 20),
            extent(16, 4, 4),
        ];
        let runs = coalesce(&extents, 40);
        let got: Vec<_> = runs.iter().map(|r| (r.offset, r.data.to_vec())).collect();
        let mut first = vec![1u8; 5];
        first.extend(vec![2u8; 10]);
        assert_eq!(got[0], (0, first));
        assert_eq!(got[1], (16, vec![4u8; 4]));
        assert_eq!(got[2], (30, vec![3u8; 10]));
        assert_eq!(got[3], (40, vec![3u8; 10]));
        assert_eq!(got.len(), 4);
    }

    #[test]
    fn overlay_copies_only_the_intersection() {
        let mut out = vec![0u8; 10];
        overlay(&mut out, 100, 95, &[7u8; 8]);
        overlay(&mut out, 100, 108, &[9u8; 5]);
        assert_eq!(out, vec![7, 7, 7, 0, 0, 0, 0, 0, 9, 9]);
    }
}
