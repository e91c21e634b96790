//! Object keys of a slice's blocks and the arithmetic that maps byte ranges onto blocks.
//!
//! A slice of `size` bytes is stored as `ceil(size / block_size)` objects; block `i` holds bytes
//! `[i * block_size, min((i + 1) * block_size, size))` under
//! `{prefix}/chunks/{id / 1_000_000}/{id / 1_000}/{id}_{i}_{block_len}` (the same layout as
//! JuiceFS). The two directory levels keep any one listing level small; the length in the name
//! lets fsck check an object without reading it.

use std::ops::Range;

/// The top-level directory of block objects inside a volume's prefix.
pub(crate) const CHUNKS_DIR: &str = "chunks";

/// The key of one block, relative to the volume prefix.
pub(crate) fn block_key(id: u64, index: u32, block_len: u32) -> String {
    format!(
        "{CHUNKS_DIR}/{}/{}/{id}_{index}_{block_len}",
        id / 1_000_000,
        id / 1_000
    )
}

/// Parses `[...prefix/]chunks/{id/1e6}/{id/1e3}/{id}_{index}_{len}` into `(id, index, len)`.
///
/// Accepts keys with or without the volume prefix; the directory levels must match the id so
/// that a stray object that merely looks similar is not mistaken for a block.
pub(crate) fn parse_block_key(key: &str) -> Option<(u64, u32, u32)> {
    let mut segments = key.rsplit('/');
    let name = segments.next()?;
    let thousands: u64 = segments.next()?.parse().ok()?;
    let millions: u64 = segments.next()?.parse().ok()?;
    if segments.next()? != CHUNKS_DIR {
        return None;
    }
    let mut fields = name.split('_');
    let id: u64 = fields.next()?.parse().ok()?;
    let index: u32 = fields.next()?.parse().ok()?;
    let len: u32 = fields.next()?.parse().ok()?;
    let canonical = fields.next().is_none()
        && thousands == id / 1_000
        && millions == id / 1_000_000
        && name == format!("{id}_{index}_{len}");
    canonical.then_some((id, index, len))
}

/// One block of a slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Block {
    pub index: u32,
    /// Offset of the block's first byte within the slice.
    pub start: u64,
    pub len: u32,
}

/// Every block of a slice of `size` bytes.
pub(crate) fn slice_blocks(size: u64, block_size: u64) -> impl Iterator<Item = Block> {
    let count = size.div_ceil(block_size);
    (0..count).map(move |i| {
        let start = i * block_size;
        Block {
            index: u32::try_from(i).expect("block count fits u32 because slices are < 4 GiB"),
            start,
            len: u32::try_from(block_size.min(size - start)).expect("block_size fits u32"),
        }
    })
}

/// The blocks overlapping `range` of a slice of `size` bytes, each with the part of the block
/// (block-relative) that falls inside the range. `range` must lie within `0..size`.
pub(crate) fn blocks_covering(
    size: u64,
    block_size: u64,
    range: Range<u64>,
) -> impl Iterator<Item = (Block, Range<usize>)> {
    slice_blocks(size, block_size)
        .skip_while(move |b| b.start + u64::from(b.len) <= range.start)
        .take_while(move |b| b.start < range.end && range.start < range.end)
        .map(move |b| {
            let from = range.start.saturating_sub(b.start);
            let to = (range.end - b.start).min(u64::from(b.len));
            // Both bounds are at most `b.len`, a u32.
            (b, from as usize..to as usize)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const BLOCK: u64 = 4 * MIB;

    #[test]
    fn key_layout_matches_the_documented_scheme() {
        assert_eq!(block_key(5, 0, 100), "chunks/0/0/5_0_100");
        assert_eq!(
            block_key(1_234_567, 3, 4_194_304),
            "chunks/1/1234/1234567_3_4194304"
        );
    }

    #[test]
    fn parse_block_key_round_trips_with_and_without_prefix() {
        for (id, index, len) in [
            (0, 0, 1),
            (999, 7, 4_194_304),
            (u64::MAX, u32::MAX, u32::MAX),
        ] {
            let key = block_key(id, index, len);
            assert_eq!(parse_block_key(&key), Some((id, index, len)));
            assert_eq!(
                parse_block_key(&format!("vols/v1/{key}")),
                Some((id, index, len))
            );
        }
    }

    #[test]
    fn parse_block_key_rejects_lookalikes() {
        for key in [
            "",
            "5_0_100",
            "chunks/0/0/5_0",
            "chunks/0/0/5_0_100_1",
            "chunks/0/1/5_0_100",
            "other/0/0/5_0_100",
            "chunks/0/0/05_0_100",
            "chunks/0/0/5_-1_100",
            "chunks/0/0/x_0_100",
        ] {
            assert_eq!(parse_block_key(key), None, "{key}");
        }
    }

    #[test]
    fn slices_split_at_block_boundaries() {
        let lens = |size| {
            slice_blocks(size, BLOCK)
                .map(|b| b.len as u64)
                .collect::<Vec<_>>()
        };
        assert!(lens(0).is_empty());
        assert_eq!(lens(1), vec![1]);
        assert_eq!(lens(BLOCK), vec![BLOCK]);
        assert_eq!(lens(BLOCK + 1), vec![BLOCK, 1]);
        assert_eq!(lens(10 * MIB), vec![BLOCK, BLOCK, 2 * MIB]);
        let starts: Vec<u64> = slice_blocks(10 * MIB, BLOCK).map(|b| b.start).collect();
        assert_eq!(starts, vec![0, BLOCK, 2 * BLOCK]);
    }

    #[test]
    fn covering_blocks_of_ranges() {
        let size = 10 * MIB;
        let cover = |range: Range<u64>| {
            blocks_covering(size, BLOCK, range)
                .map(|(b, r)| (b.index, r))
                .collect::<Vec<_>>()
        };
        assert_eq!(cover(0..10), vec![(0, 0..10)]);
        assert_eq!(
            cover(BLOCK - 1..BLOCK + 1),
            vec![(0, BLOCK as usize - 1..BLOCK as usize), (1, 0..1)]
        );
        assert_eq!(cover(BLOCK..2 * BLOCK), vec![(1, 0..BLOCK as usize)]);
        assert_eq!(
            cover(1..size),
            vec![
                (0, 1..BLOCK as usize),
                (1, 0..BLOCK as usize),
                (2, 0..2 * MIB as usize)
            ]
        );
        assert!(cover(5..5).is_empty());
    }
}
