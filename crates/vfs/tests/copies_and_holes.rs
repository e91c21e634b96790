//! Copies without bytes (copy_file_range as references to the source's slices), holes
//! (fallocate PUNCH_HOLE / ZERO_RANGE), SEEK_DATA / SEEK_HOLE, and one object per flush.

mod common;

use std::time::Duration;

use cellar_vfs::{maintenance, ROOT_INO};
use common::*;

const MIB: u64 = 1 << 20;
const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

fn seek(vfs: &cellar_vfs::Vfs, ino: u64, fh: u64, offset: u64, whence: i32) -> Result<u64, i32> {
    vfs.lseek(ino, fh, offset, whence).map_err(|e| e.0)
}

#[test]
fn a_copy_references_the_source_uploads_nothing_and_outlives_it() {
    let volume = TestVolume::new();
    let vfs = volume.mount();
    let (src, fh) = create_in_root(&vfs, "src");
    // Two chunks' worth is too much for a test: 70 MiB spans chunk 0 and 1 (64 MiB chunks).
    let data = pattern(1, 70 * MIB as usize);
    write_all(&vfs, src, fh, 0, &data);
    close(&vfs, src, fh);
    let objects = volume.objects();
    let fh = vfs.open(&root(), src, libc::O_RDONLY).unwrap().fh;
    let (dst, out) = create_in_root(&vfs, "dst");
    // Unaligned on both sides: the destination's chunks cut the source's slices elsewhere.
    let copied = vfs
        .copy_file_range(src, fh, 12_345, dst, out, 777, u64::MAX >> 20)
        .unwrap();
    assert_eq!(copied, data.len() as u64 - 12_345);
    assert_eq!(volume.objects(), objects, "no object uploaded");
    close(&vfs, dst, out);
    close(&vfs, src, fh);
    let attr = vfs.getattr(dst).unwrap();
    assert_eq!(attr.size, 777 + copied);
    assert_eq!(attr.blocks, copied.div_ceil(512));

    // The source goes; gc with no grace keeps every object the copy references.
    vfs.unlink(&root(), ROOT_INO, b"src").unwrap();
    maintenance::gc(&volume.config, Duration::ZERO, false).unwrap();
    vfs.shutdown().unwrap();
    volume.assert_fsck_clean();
    let vfs = volume.mount();
    let fh = vfs.open(&root(), dst, libc::O_RDONLY).unwrap().fh;
    let got = read_range(&vfs, dst, fh, 0, attr.size);
    assert!(got[..777].iter().all(|&b| b == 0));
    assert!(
        got[777..] == data[12_345..],
        "the copy reads the source's bytes"
    );
    close(&vfs, dst, fh);
    // The last reference gone, gc deletes the objects.
    vfs.unlink(&root(), ROOT_INO, b"dst").unwrap();
    maintenance::gc(&volume.config, Duration::ZERO, false).unwrap();
    assert_eq!(volume.objects(), Vec::<String>::new());
    vfs.shutdown().unwrap();
    volume.assert_fsck_clean();
}

#[test]
fn a_copy_sees_unflushed_writes_and_keeps_write_order() {
    let volume = TestVolume::new();
    let vfs = volume.mount();
    let (src, fh) = create_in_root(&vfs, "src");
    let (dst, out) = create_in_root(&vfs, "dst");
    let mut model = Model::default();
    let first = pattern(2, 300_000);
    write_all(&vfs, src, fh, 0, &first);
    // Buffered in the destination before the copy: the copy lands on top of it.
    write_all(&vfs, dst, out, 0, &pattern(3, 400_000));
    model.write(0, &pattern(3, 400_000));
    assert_eq!(
        vfs.copy_file_range(src, fh, 0, dst, out, 50_000, 300_000)
            .unwrap(),
        300_000
    );
    model.write(50_000, &first);
    // Written after the copy: lands on top of the copy.
    write_all(&vfs, dst, out, 100_000, &pattern(4, 1000));
    model.write(100_000, &pattern(4, 1000));
    assert_eq!(
        read_range(&vfs, dst, out, 0, 1 << 20),
        model.read(0, model.size)
    );
    close(&vfs, dst, out);
    close(&vfs, src, fh);
    let fh = vfs.open(&root(), dst, libc::O_RDONLY).unwrap().fh;
    assert_eq!(
        read_range(&vfs, dst, fh, 0, 1 << 20),
        model.read(0, model.size)
    );
    close(&vfs, dst, fh);
    vfs.shutdown().unwrap();
    volume.assert_fsck_clean();
}

#[test]
fn a_copy_of_a_sparse_file_uploads_nothing_and_keeps_its_holes() {
    let volume = TestVolume::new();
    let vfs = volume.mount();
    let (src, fh) = create_in_root(&vfs, "sparse");
    write_all(&vfs, src, fh, 150 * MIB, b"ten bytes!");
    vfs.fallocate(src, fh, 0, 300 * MIB, 0).unwrap();
    close(&vfs, src, fh);
    let objects = volume.objects();
    let fh = vfs.open(&root(), src, libc::O_RDONLY).unwrap().fh;
    let (dst, out) = create_in_root(&vfs, "copy");
    assert_eq!(
        vfs.copy_file_range(src, fh, 0, dst, out, 0, 300 * MIB)
            .unwrap(),
        300 * MIB
    );
    close(&vfs, dst, out);
    assert_eq!(volume.objects(), objects, "no zeros uploaded");
    let attr = vfs.getattr(dst).unwrap();
    assert_eq!((attr.size, attr.blocks), (300 * MIB, 1));
    let out = vfs.open(&root(), dst, libc::O_RDONLY).unwrap().fh;
    assert_eq!(seek(&vfs, dst, out, 0, libc::SEEK_DATA), Ok(150 * MIB));
    assert_eq!(
        seek(&vfs, dst, out, 150 * MIB, libc::SEEK_HOLE),
        Ok(150 * MIB + 10)
    );
    assert_eq!(
        vfs.read(dst, out, 150 * MIB - 2, 14).unwrap(),
        b"\0\0ten bytes!\0\0"
    );
    close(&vfs, dst, out);
    close(&vfs, src, fh);
    vfs.shutdown().unwrap();
    volume.assert_fsck_clean();
}

#[test]
fn punched_and_zeroed_ranges_read_zeros_hold_nothing_and_seek_as_holes() {
    let volume = TestVolume::new();
    let vfs = volume.mount();
    let (ino, fh) = create_in_root(&vfs, "f");
    let mut model = Model::default();
    let data = pattern(5, 8 * MIB as usize);
    write_all(&vfs, ino, fh, 0, &data);
    model.write(0, &data);
    // Written but unflushed, then punched: the hole shadows it.
    write_all(&vfs, ino, fh, MIB, &pattern(6, 1000));
    vfs.fallocate(ino, fh, MIB - 10, 2 * MIB, PUNCH).unwrap();
    model.write(MIB - 10, &vec![0; 2 * MIB as usize]);
    let objects = volume.objects();
    vfs.fallocate(ino, fh, 5 * MIB, MIB, libc::FALLOC_FL_ZERO_RANGE)
        .unwrap();
    model.write(5 * MIB, &vec![0; MIB as usize]);
    // Zeroing past the end grows the file (a hole); with KEEP_SIZE it does not.
    vfs.fallocate(ino, fh, 8 * MIB - 100, MIB, libc::FALLOC_FL_ZERO_RANGE)
        .unwrap();
    model.write(8 * MIB - 100, &vec![0; MIB as usize]);
    vfs.fallocate(
        ino,
        fh,
        20 * MIB,
        MIB,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
    )
    .unwrap();
    assert_eq!(vfs.getattr(ino).unwrap().size, 9 * MIB - 100);
    assert_eq!(
        volume.objects().len(),
        objects.len(),
        "holes upload nothing"
    );
    let held = 8 * MIB - 2 * MIB - MIB - 100;
    assert_eq!(vfs.getattr(ino).unwrap().blocks, held.div_ceil(512));
    assert_eq!(
        read_range(&vfs, ino, fh, 0, 10 * MIB),
        model.read(0, model.size)
    );

    // Unflushed data inside a hole is data for SEEK_DATA / SEEK_HOLE.
    write_all(&vfs, ino, fh, 2 * MIB, b"x");
    let s = |offset, whence| seek(&vfs, ino, fh, offset, whence);
    assert_eq!(s(0, libc::SEEK_DATA), Ok(0));
    assert_eq!(s(0, libc::SEEK_HOLE), Ok(MIB - 10));
    assert_eq!(s(MIB, libc::SEEK_DATA), Ok(2 * MIB));
    assert_eq!(s(2 * MIB, libc::SEEK_HOLE), Ok(2 * MIB + 1));
    assert_eq!(s(2 * MIB + 1, libc::SEEK_DATA), Ok(3 * MIB - 10));
    assert_eq!(s(3 * MIB, libc::SEEK_HOLE), Ok(5 * MIB));
    assert_eq!(s(5 * MIB, libc::SEEK_DATA), Ok(6 * MIB));
    assert_eq!(s(6 * MIB, libc::SEEK_HOLE), Ok(8 * MIB - 100));
    assert_eq!(s(8 * MIB - 100, libc::SEEK_DATA), Err(libc::ENXIO));
    assert_eq!(s(8 * MIB, libc::SEEK_HOLE), Ok(8 * MIB));
    assert_eq!(s(9 * MIB - 100, libc::SEEK_HOLE), Err(libc::ENXIO));
    assert_eq!(s(0, libc::SEEK_CUR), Err(libc::EINVAL));
    close(&vfs, ino, fh);
    // A small file kept inline is all data.
    let (small, sfh) = create_in_root(&vfs, "small");
    write_all(&vfs, small, sfh, 0, b"inline");
    close(&vfs, small, sfh);
    let sfh = vfs.open(&root(), small, libc::O_RDONLY).unwrap().fh;
    assert_eq!(seek(&vfs, small, sfh, 2, libc::SEEK_DATA), Ok(2));
    assert_eq!(seek(&vfs, small, sfh, 2, libc::SEEK_HOLE), Ok(6));
    close(&vfs, small, sfh);
    // The same answers from the committed maps alone.
    let fh = vfs.open(&root(), ino, libc::O_RDONLY).unwrap().fh;
    assert_eq!(seek(&vfs, ino, fh, MIB, libc::SEEK_DATA), Ok(2 * MIB));
    assert_eq!(
        seek(&vfs, ino, fh, 2 * MIB, libc::SEEK_HOLE),
        Ok(2 * MIB + 1)
    );
    close(&vfs, ino, fh);
    vfs.shutdown().unwrap();
    volume.assert_fsck_clean();
}

#[test]
fn random_small_writes_make_one_object_per_flush() {
    let volume = TestVolume::new();
    let vfs = volume.mount();
    let (ino, fh) = create_in_root(&vfs, "fsx");
    let mut model = Model::default();
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for flush in 0..3 {
        for i in 0..500u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let offset = x % (256 << 10);
            let data = pattern(flush * 1000 + i, 1 + (x >> 40) as usize % 700);
            write_all(&vfs, ino, fh, offset, &data);
            model.write(offset, &data);
        }
        vfs.fsync(ino, fh, false).unwrap();
        assert_eq!(
            volume.objects().len(),
            flush as usize + 1,
            "one object per flush: {:?}",
            volume.objects()
        );
    }
    assert_eq!(
        read_range(&vfs, ino, fh, 0, 1 << 20),
        model.read(0, model.size)
    );
    close(&vfs, ino, fh);
    vfs.shutdown().unwrap();
    volume.assert_fsck_clean();
    let vfs = volume.mount();
    let fh = vfs.open(&root(), ino, libc::O_RDONLY).unwrap().fh;
    assert_eq!(
        read_range(&vfs, ino, fh, 0, 1 << 20),
        model.read(0, model.size)
    );
    close(&vfs, ino, fh);
    vfs.shutdown().unwrap();
}
