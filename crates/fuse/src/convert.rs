//! Conversions between the vfs types and the `fuser` wire types.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cellar_meta::TimeSet;
use cellar_vfs::{Attr, FileKind, LockKind};
use fuser::{FileAttr, FileType, INodeNo, TimeOrNow};

/// `st_blksize`: the I/O size tools such as `cp` and stdio use for their buffers; large requests
/// are cheaper over FUSE and the object store.
const BLOCK_SIZE_HINT: u32 = 128 * 1024;

/// The kernel's `OFFSET_MAX`: "to the end of the file" in lock ranges on the wire.
pub(crate) const KERNEL_OFFSET_MAX: u64 = i64::MAX as u64;

pub(crate) fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::Regular => FileType::RegularFile,
        FileKind::Directory => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
    }
}

pub(crate) fn file_attr(attr: &Attr) -> FileAttr {
    let ctime = system_time(attr.ctime_ns);
    FileAttr {
        ino: INodeNo(attr.ino),
        size: attr.size,
        blocks: attr.blocks,
        atime: system_time(attr.atime_ns),
        mtime: system_time(attr.mtime_ns),
        ctime,
        crtime: ctime,
        kind: file_type(attr.kind),
        perm: (attr.perm & 0o7777) as u16,
        nlink: attr.nlink,
        uid: attr.uid,
        gid: attr.gid,
        rdev: attr.rdev,
        blksize: BLOCK_SIZE_HINT,
        flags: 0,
    }
}

/// The attributes of a negative entry reply: inode 0 tells the kernel the name does not exist.
pub(crate) fn negative_entry() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: BLOCK_SIZE_HINT,
        flags: 0,
    }
}

/// Nanoseconds since the epoch (negative before it) to a `SystemTime`.
pub(crate) fn system_time(ns: i64) -> SystemTime {
    let magnitude = Duration::from_nanos(ns.unsigned_abs());
    if ns >= 0 {
        UNIX_EPOCH + magnitude
    } else {
        UNIX_EPOCH - magnitude
    }
}

/// A `SystemTime` to nanoseconds since the epoch, saturating far outside the representable range.
pub(crate) fn nanos(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_nanos()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_nanos()).map_or(i64::MIN, |n| -n),
    }
}

pub(crate) fn time_set(time: TimeOrNow) -> TimeSet {
    match time {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(at) => TimeSet::At(nanos(at)),
    }
}

/// `F_RDLCK` / `F_WRLCK` / `F_UNLCK` to a lock kind; `None` for anything else.
pub(crate) fn lock_kind(typ: i32) -> Option<LockKind> {
    match typ {
        libc::F_RDLCK => Some(LockKind::Read),
        libc::F_WRLCK => Some(LockKind::Write),
        libc::F_UNLCK => Some(LockKind::Unlock),
        _ => None,
    }
}

pub(crate) fn lock_type(kind: LockKind) -> i32 {
    match kind {
        LockKind::Read => libc::F_RDLCK,
        LockKind::Write => libc::F_WRLCK,
        LockKind::Unlock => libc::F_UNLCK,
    }
}

/// A lock range end from the kernel (`OFFSET_MAX` = to end of file) to the vfs (`u64::MAX`).
pub(crate) fn range_end_from_kernel(end: u64) -> u64 {
    if end >= KERNEL_OFFSET_MAX {
        u64::MAX
    } else {
        end
    }
}

/// The inverse of [`range_end_from_kernel`]: the kernel rejects ends above `OFFSET_MAX` with EIO.
pub(crate) fn range_end_to_kernel(end: u64) -> u64 {
    end.min(KERNEL_OFFSET_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_including_before_the_epoch() {
        for ns in [0, 1, 1_700_000_000_123_456_789, -1, -86_400_000_000_001] {
            assert_eq!(nanos(system_time(ns)), ns);
        }
    }

    #[test]
    fn lock_range_ends_map_offset_max_both_ways() {
        assert_eq!(range_end_from_kernel(KERNEL_OFFSET_MAX), u64::MAX);
        assert_eq!(range_end_from_kernel(99), 99);
        assert_eq!(range_end_to_kernel(u64::MAX), KERNEL_OFFSET_MAX);
        assert_eq!(range_end_to_kernel(99), 99);
    }

    #[test]
    fn lock_types_round_trip() {
        for kind in [LockKind::Read, LockKind::Write, LockKind::Unlock] {
            assert_eq!(lock_kind(lock_type(kind)), Some(kind));
        }
        assert_eq!(lock_kind(42), None);
    }
}
