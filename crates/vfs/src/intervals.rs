//! Non-overlapping intervals where later inserts shadow earlier ones: the visible layout of a chunk
//! (slices in commit order) and of a write buffer (extents in write order).

use std::collections::BTreeMap;

/// A visible piece `[start, end)` taken from `source` starting at `source_off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Piece<S> {
    pub start: u64,
    pub end: u64,
    pub source: S,
    pub source_off: u64,
}

#[derive(Debug)]
pub(crate) struct IntervalMap<S: Copy> {
    pieces: BTreeMap<u64, Piece<S>>,
}

impl<S: Copy> Default for IntervalMap<S> {
    fn default() -> Self {
        IntervalMap {
            pieces: BTreeMap::new(),
        }
    }
}

impl<S: Copy> IntervalMap<S> {
    /// Lays `[start, end)` from `source` (at `source_off`) over everything inserted before.
    pub fn insert(&mut self, start: u64, end: u64, source: S, source_off: u64) {
        if start >= end {
            return;
        }
        let overlapping: Vec<u64> = self
            .pieces
            .range(..end)
            .rev()
            .take_while(|(_, p)| p.end > start)
            .map(|(k, _)| *k)
            .collect();
        for key in overlapping {
            let old = self.pieces.remove(&key).expect("key just listed");
            if old.start < start {
                self.pieces.insert(old.start, Piece { end: start, ..old });
            }
            if old.end > end {
                let source_off = old.source_off + (end - old.start);
                self.pieces.insert(
                    end,
                    Piece {
                        start: end,
                        source_off,
                        ..old
                    },
                );
            }
        }
        self.pieces.insert(
            start,
            Piece {
                start,
                end,
                source,
                source_off,
            },
        );
    }

    /// Visible pieces in offset order.
    pub fn pieces(&self) -> impl Iterator<Item = &Piece<S>> {
        self.pieces.values()
    }

    /// Visible pieces clipped to `[start, end)`, in offset order.
    pub fn clipped(&self, start: u64, end: u64) -> impl Iterator<Item = Piece<S>> + '_ {
        let first = self
            .pieces
            .range(..=start)
            .next_back()
            .map(|(k, _)| *k)
            .unwrap_or(start);
        self.pieces.range(first..end).filter_map(move |(_, p)| {
            let s = p.start.max(start);
            let e = p.end.min(end);
            (s < e).then(|| Piece {
                start: s,
                end: e,
                source: p.source,
                source_off: p.source_off + (s - p.start),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_inserts_shadow_earlier_ones() {
        let mut map = IntervalMap::default();
        map.insert(0, 100, 'a', 0);
        map.insert(10, 20, 'b', 0);
        map.insert(15, 30, 'c', 5);
        map.insert(90, 120, 'd', 0);
        let got: Vec<_> = map
            .pieces()
            .map(|p| (p.start, p.end, p.source, p.source_off))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 10, 'a', 0),
                (10, 15, 'b', 0),
                (15, 30, 'c', 5),
                (30, 90, 'a', 30),
                (90, 120, 'd', 0)
            ]
        );
        let clipped: Vec<_> = map
            .clipped(12, 40)
            .map(|p| (p.start, p.end, p.source, p.source_off))
            .collect();
        assert_eq!(
            clipped,
            vec![(12, 15, 'b', 2), (15, 30, 'c', 5), (30, 40, 'a', 30)]
        );
    }

    #[test]
    fn covering_insert_replaces_everything_inside() {
        let mut map = IntervalMap::default();
        map.insert(10, 20, 1, 0);
        map.insert(30, 40, 2, 0);
        map.insert(0, 50, 3, 0);
        let got: Vec<_> = map.pieces().map(|p| (p.start, p.end, p.source)).collect();
        assert_eq!(got, vec![(0, 50, 3)]);
    }
}
