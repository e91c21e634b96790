//! Held bytes (`st_blocks`), the volume's usage counters and its byte quota, through the vfs.

mod common;

use std::time::Duration;

use cellar_vfs::maintenance::{self, VolumeUsage};
use cellar_vfs::{Errno, SetAttrRequest, Vfs, ROOT_INO};
use common::*;

const KIB: u64 = 1 << 10;
const GIB: u64 = 1 << 30;

fn truncate(vfs: &Vfs, ino: u64, size: u64) {
    vfs.setattr(
        &root(),
        ino,
        SetAttrRequest {
            size: Some(size),
            ..Default::default()
        },
    )
    .unwrap();
}

/// Held bytes, files and quota (exclusive bytes, which count stored objects, are tested with
/// forks in forks.rs).
fn usage(volume: &TestVolume) -> VolumeUsage {
    VolumeUsage {
        exclusive_bytes: 0,
        ..maintenance::usage(&volume.config).unwrap()
    }
}

fn blocks(vfs: &Vfs, ino: u64) -> u64 {
    vfs.getattr(ino).unwrap().blocks
}

#[test]
fn usage_counts_held_bytes_through_writes_overwrites_holes_truncates_and_deletes() {
    let volume = TestVolume::new();
    // Before the volume is ever mounted (formatted): nothing.
    let empty = VolumeUsage {
        bytes: 0,
        files: 0,
        quota_bytes: None,
        exclusive_bytes: 0,
    };
    assert_eq!(usage(&volume), empty);
    let vfs = volume.mount();
    assert_eq!(usage(&volume), empty);

    // A 10 GiB sparse file with 200 KiB of data holds 200 KiB.
    let (sparse, fh) = create_in_root(&vfs, "sparse");
    truncate(&vfs, sparse, 10 * GIB);
    write_all(&vfs, sparse, fh, 5 * GIB, &pattern(1, 200 * KIB as usize));
    vfs.fsync(sparse, fh, false).unwrap();
    assert_eq!(vfs.getattr(sparse).unwrap().size, 10 * GIB);
    assert_eq!(blocks(&vfs, sparse), 200 * KIB / 512);
    assert_eq!(usage(&volume).bytes, 200 * KIB);
    assert_eq!(usage(&volume).files, 1);

    // Overwriting holds nothing more; writing past the data's end holds what is new.
    write_all(&vfs, sparse, fh, 5 * GIB, &pattern(2, 200 * KIB as usize));
    vfs.fsync(sparse, fh, false).unwrap();
    assert_eq!(usage(&volume).bytes, 200 * KIB);
    write_all(
        &vfs,
        sparse,
        fh,
        5 * GIB + 150 * KIB,
        &pattern(3, 100 * KIB as usize),
    );
    close(&vfs, sparse, fh);
    assert_eq!(usage(&volume).bytes, 250 * KIB);
    assert_eq!(blocks(&vfs, sparse), 250 * KIB / 512);

    // An inline file holds its bytes; a directory and a symlink hold none.
    let (small, fh) = create_in_root(&vfs, "small");
    write_all(&vfs, small, fh, 0, &[7u8; 1000]);
    close(&vfs, small, fh);
    assert_eq!(blocks(&vfs, small), 2);
    vfs.mkdir(&root(), ROOT_INO, b"dir", 0o755, 0).unwrap();
    vfs.symlink(&root(), ROOT_INO, b"link", b"small").unwrap();
    assert_eq!(
        usage(&volume),
        VolumeUsage {
            bytes: 250 * KIB + 1000,
            files: 4,
            quota_bytes: None,
            exclusive_bytes: 0,
        }
    );

    // Truncating into the data frees the cut part; growing again adds a hole.
    truncate(&vfs, sparse, 5 * GIB + 100 * KIB);
    assert_eq!(blocks(&vfs, sparse), 100 * KIB / 512);
    truncate(&vfs, sparse, 20 * GIB);
    assert_eq!(usage(&volume).bytes, 100 * KIB + 1000);

    // An unlinked file still open holds its bytes until its last close.
    let fh = vfs.open(&root(), small, libc::O_RDONLY).unwrap().fh;
    vfs.unlink(&root(), ROOT_INO, b"small").unwrap();
    assert_eq!(usage(&volume).bytes, 100 * KIB + 1000);
    assert_eq!(usage(&volume).files, 4);
    vfs.release(small, fh, None).unwrap();
    assert_eq!(usage(&volume).bytes, 100 * KIB);
    assert_eq!(usage(&volume).files, 3);

    vfs.unlink(&root(), ROOT_INO, b"sparse").unwrap();
    assert_eq!(usage(&volume).bytes, 0);
    vfs.shutdown().unwrap();
    volume.assert_fsck_clean();
}

#[test]
fn compaction_keeps_what_a_file_holds() {
    let volume = TestVolume::new();
    let vfs = volume.mount();
    let (ino, fh) = create_in_root(&vfs, "holes");
    // 40 commits of 4 KiB every 8 KiB, past the inline threshold (an inline file's zeros are
    // stored bytes): one fragmented chunk with gaps between its slices.
    const BASE: u64 = 128 * KIB;
    let mut expected = vec![0u8; (BASE + 320 * KIB) as usize];
    for i in 0..40u64 {
        let data = pattern(i, 4 * KIB as usize);
        write_all(&vfs, ino, fh, BASE + i * 8 * KIB, &data);
        vfs.fsync(ino, fh, false).unwrap();
        let at = (BASE + i * 8 * KIB) as usize;
        expected[at..at + data.len()].copy_from_slice(&data);
    }
    let held = 40 * 4 * KIB;
    assert_eq!(usage(&volume).bytes, held);
    close(&vfs, ino, fh);
    vfs.shutdown().unwrap();

    let (_, compacted) = maintenance::gc(&volume.config, Duration::from_secs(600), false).unwrap();
    assert_eq!(compacted, 1);
    volume.assert_fsck_clean();
    assert_eq!(usage(&volume).bytes, held);
    let vfs = volume.mount();
    assert_eq!(blocks(&vfs, ino), held / 512);
    let fh = vfs.open(&root(), ino, libc::O_RDONLY).unwrap().fh;
    assert_eq!(
        read_range(&vfs, ino, fh, 0, expected.len() as u64),
        expected[..(BASE + 316 * KIB) as usize],
        "the file ends with its last write"
    );
    vfs.release(ino, fh, None).unwrap();
    vfs.shutdown().unwrap();
}

#[test]
fn writes_past_the_quota_fail_with_edquot_and_leave_earlier_data_intact() {
    let volume = TestVolume::new();
    // Set before the volume is formatted; the mount picks it up.
    maintenance::set_quota(&volume.config, Some(1024 * KIB)).unwrap();
    let vfs = volume.mount();
    let fs = vfs.statfs().unwrap();
    assert_eq!(
        fs.blocks * u64::from(fs.bsize),
        1024 * KIB,
        "df shows the quota"
    );
    assert_eq!(fs.bfree, fs.blocks);

    let first = pattern(1, 600 * KIB as usize);
    let (a, fh) = create_in_root(&vfs, "a");
    write_all(&vfs, a, fh, 0, &first);
    close(&vfs, a, fh);
    let (b, fh) = create_in_root(&vfs, "b");
    write_all(&vfs, b, fh, 0, &pattern(2, 300 * KIB as usize));
    assert_eq!(
        vfs.write(b, fh, 300 * KIB, &pattern(3, 200 * KIB as usize)),
        Err(Errno(libc::EDQUOT))
    );
    close(&vfs, b, fh);
    assert_eq!(vfs.getattr(b).unwrap().size, 300 * KIB);
    let fs = vfs.statfs().unwrap();
    assert_eq!(fs.bfree * u64::from(fs.bsize), 124 * KIB);
    assert_eq!(usage(&volume).bytes, 900 * KIB);
    assert_eq!(usage(&volume).quota_bytes, Some(1024 * KIB));

    // What was written before is intact.
    let fh = vfs.open(&root(), a, libc::O_RDONLY).unwrap().fh;
    assert_eq!(read_range(&vfs, a, fh, 0, 600 * KIB), first);
    vfs.release(a, fh, None).unwrap();

    // Deleting frees the space at once.
    vfs.unlink(&root(), ROOT_INO, b"a").unwrap();
    let fh = vfs.open(&root(), b, libc::O_RDWR).unwrap().fh;
    write_all(&vfs, b, fh, 300 * KIB, &pattern(3, 200 * KIB as usize));
    close(&vfs, b, fh);
    assert_eq!(usage(&volume).bytes, 500 * KIB);

    // fallocate reserves nothing, but past the end of a file it fails where the quota could not
    // hold what it asks for.
    let (r, fh) = create_in_root(&vfs, "reserved");
    assert_eq!(
        vfs.fallocate(r, fh, 0, 600 * KIB, 0),
        Err(Errno(libc::EDQUOT))
    );
    vfs.fallocate(r, fh, 0, 100 * KIB, 0).unwrap();
    assert_eq!(vfs.getattr(r).unwrap().size, 100 * KIB);
    assert_eq!(blocks(&vfs, r), 0);
    close(&vfs, r, fh);

    // Raising the quota is seen by the mount within about a second, without remounting.
    let (c, fh) = create_in_root(&vfs, "c");
    assert_eq!(
        vfs.write(c, fh, 0, &pattern(4, 600 * KIB as usize)),
        Err(Errno(libc::EDQUOT))
    );
    maintenance::set_quota(&volume.config, Some(2048 * KIB)).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    write_all(&vfs, c, fh, 0, &pattern(4, 600 * KIB as usize));
    close(&vfs, c, fh);
    maintenance::set_quota(&volume.config, None).unwrap();
    assert_eq!(usage(&volume).quota_bytes, None);
    vfs.shutdown().unwrap();
    volume.assert_fsck_clean();
}

/// Two mounts each see room for their own writes; the commit of the later one is refused.
#[test]
fn a_commit_that_a_racing_mount_took_past_the_quota_fails_and_keeps_the_winner() {
    let volume = TestVolume::new();
    maintenance::set_quota(&volume.config, Some(1024 * KIB)).unwrap();
    let one = volume.mount();
    let two = volume.mount();
    let (x, fh_x) = create_in_root(&one, "x");
    write_all(&one, x, fh_x, 0, &pattern(1, 800 * KIB as usize));
    let winner = pattern(2, 800 * KIB as usize);
    let (y, fh_y) = create_in_root(&two, "y");
    write_all(&two, y, fh_y, 0, &winner);
    close(&two, y, fh_y);

    assert_eq!(one.flush(x, fh_x, 42), Err(Errno(libc::EDQUOT)));
    one.release(x, fh_x, None).unwrap();
    assert_eq!(one.getattr(x).unwrap().size, 0);
    assert_eq!(
        usage(&volume),
        VolumeUsage {
            bytes: 800 * KIB,
            files: 2,
            quota_bytes: Some(1024 * KIB),
            exclusive_bytes: 0,
        }
    );
    let fh = one.open(&root(), y, libc::O_RDONLY).unwrap().fh;
    assert_eq!(read_range(&one, y, fh, 0, 800 * KIB), winner);
    one.release(y, fh, None).unwrap();
    one.shutdown().unwrap();
    two.shutdown().unwrap();
    volume.assert_fsck_clean();
}
