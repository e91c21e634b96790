//! Checksums of block objects, so that a read never returns bytes the store mangled.
//!
//! At upload every S3 block object gets the CRC-32 of each of its pages ([`PAGE_SIZE`] aligned
//! bytes, the unit that reads fetch and cache) as user metadata, `x-amz-meta-cellar-crc32:
//! {page_size}:{crc},{crc},...` (hex). Why there, rather than in the object or in the metadata
//! engine: S3 returns an object's user metadata with every GET, ranged ones included, so each
//! ranged read verifies its pages with no extra request; the object's bytes and key stay as they
//! were (fsck's length check, gc and volumes written before this change read unchanged: objects
//! without the header are checked for length only); and the metadata schema does not change. A
//! 4 MiB block carries 4 checksums (44 bytes), far under S3's 2 KiB metadata limit; blocks of
//! more than [`MAX_PAGES`] pages carry none. `file://` stores keep no attributes and no
//! checksums (the local file system is trusted).

use object_store::{Attribute, Attributes};

use crate::pages::PAGE_SIZE;

/// The user metadata key (S3: `x-amz-meta-cellar-crc32`).
const ATTRIBUTE: &str = "cellar-crc32";
/// Blocks of more pages than this carry no checksums (the header would near S3's limit).
const MAX_PAGES: usize = 128;

/// The attributes that record the page checksums of a block's bytes.
pub(crate) fn attributes_for(block: &[u8]) -> Attributes {
    let mut attributes = Attributes::new();
    if block.len().div_ceil(PAGE_SIZE as usize) <= MAX_PAGES {
        let crcs: Vec<String> = block
            .chunks(PAGE_SIZE as usize)
            .map(|page| format!("{:08x}", crc32fast::hash(page)))
            .collect();
        attributes.insert(
            Attribute::Metadata(ATTRIBUTE.into()),
            format!("{PAGE_SIZE}:{}", crcs.join(",")).into(),
        );
    }
    attributes
}

/// A checksum header that does not parse: the answer was mangled.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Garbled;

/// The page checksums a GET returned: `None` if the object has none (or in another page size).
pub(crate) fn checksums_in(attributes: &Attributes) -> Result<Option<Vec<u32>>, Garbled> {
    let Some(value) = attributes.get(&Attribute::Metadata(ATTRIBUTE.into())) else {
        return Ok(None);
    };
    let (page_size, crcs) = value.as_ref().split_once(':').ok_or(Garbled)?;
    if page_size.parse::<u64>().map_err(|_| Garbled)? != PAGE_SIZE {
        return Ok(None);
    }
    crcs.split(',')
        .map(|crc| u32::from_str_radix(crc, 16).map_err(|_| Garbled))
        .collect::<Result<_, _>>()
        .map(Some)
}

/// Whether page `index` has the bytes it was stored with.
pub(crate) fn page_intact(checksums: &[u32], index: u32, page: &[u8]) -> bool {
    checksums.get(index as usize) == Some(&crc32fast::hash(page))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_round_trip_and_catch_a_flipped_bit() {
        let block: Vec<u8> = (0..(2 * PAGE_SIZE as usize + 10))
            .map(|i| i as u8)
            .collect();
        let crcs = checksums_in(&attributes_for(&block))
            .unwrap()
            .expect("checksums recorded");
        assert_eq!(crcs.len(), 3);
        let pages: Vec<&[u8]> = block.chunks(PAGE_SIZE as usize).collect();
        for (index, page) in pages.iter().enumerate() {
            assert!(page_intact(&crcs, index as u32, page));
        }
        let mut flipped = pages[1].to_vec();
        flipped[77] ^= 1;
        assert!(!page_intact(&crcs, 1, &flipped));
        assert!(!page_intact(&crcs, 1, &pages[1][..100]), "a short page");
        assert!(!page_intact(&crcs, 3, pages[0]), "a page past the end");
    }

    #[test]
    fn missing_foreign_and_garbled_checksums() {
        assert_eq!(checksums_in(&Attributes::new()), Ok(None));
        let mut other = Attributes::new();
        other.insert(
            Attribute::Metadata(ATTRIBUTE.into()),
            "4096:0000abcd".into(),
        );
        assert_eq!(checksums_in(&other), Ok(None), "another page size");
        let mut garbled = Attributes::new();
        garbled.insert(
            Attribute::Metadata(ATTRIBUTE.into()),
            format!("{PAGE_SIZE}:zz").into(),
        );
        assert_eq!(checksums_in(&garbled), Err(Garbled));
        let huge = vec![0u8; (MAX_PAGES + 1) * PAGE_SIZE as usize];
        assert!(attributes_for(&huge).is_empty());
    }
}
