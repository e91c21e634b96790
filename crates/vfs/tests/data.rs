//! File content through the vfs: random writes against a model, truncates, inline files,
//! compaction, garbage collection, durability.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cellar_meta::TimeSet;
use cellar_store::BlockStore;
use cellar_vfs::{maintenance, SetAttrRequest, ROOT_INO};
use common::*;
use rand::{RngExt, SeedableRng};

const MIB: u64 = 1 << 20;

fn truncate(vfs: &cellar_vfs::Vfs, ino: u64, size: u64) {
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

#[test]
fn random_writes_across_block_and_chunk_boundaries_match_a_model() {
    let volume = TestVolume::new();
    let vfs = volume.mount();
    let (ino, fh) = create_in_root(&vfs, "random");
    let mut model = Model::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // Sparse windows around the interesting boundaries keep the test fast.
    let windows = [0, 4 * MIB, 8 * MIB, 64 * MIB, 68 * MIB, 128 * MIB];
    for step in 0..300u64 {
        let base = windows[rng.random_range(0..windows.len())];
        let offset = (base + rng.random_range(0..2 * 256 * 1024)).saturating_sub(256 * 1024);
        match rng.random_range(0..10) {
            0 => {
                vfs.fsync(ino, fh, false).unwrap();
            }
            1 if step % 5 == 0 => {
                let size = offset + rng.random_range(0..100_000);
                truncate(&vfs, ino, size);
                model.truncate(size);
            }
            2 | 3 => {
                let len = rng.random_range(1..300_000);
                assert_eq!(
                    read_range(&vfs, ino, fh, offset, len),
                    model.read(offset, len),
                    "read at {offset}+{len}, step {step}"
                );
            }
            _ => {
                let data = pattern(step, rng.random_range(1..300_000));
                write_all(&vfs, ino, fh, offset, &data);
                model.write(offset, &data);
            }
        }
        assert_eq!(
            vfs.getattr(ino).unwrap().size,
            model.size,
            "size after step {step}"
        );
    }
    close(&vfs, ino, fh);
    // After the flush, read every window back through a fresh handle.
    let reply = vfs.open(&root(), ino, libc::O_RDONLY).unwrap();
    for base in windows {
        let start = base.saturating_sub(300_000);
        assert_eq!(
            read_range(&vfs, ino, reply.fh, start, 900_000),
            model.read(start, 900_000),
            "window {base}"
        );
    }
    vfs.release(ino, reply.fh, None).unwrap();
    vfs.shutdown().unwrap();
    volume.assert_fsck_clean();
}

#[test]
fn append_and_truncate_shrink_and_grow() {
    let volume = TestVolume::new();
    let vfs = volume.mount();
    let (ino, fh) = create_in_root(&vfs, "log");
    let mut model = Model::default();
    for i in 0..20u64 {
        let data = pattern(i, 50_000);
        write_all(&vfs, ino, fh, model.size, &data);
        model.write(model.size, &data);
        if i % 7 == 6 {
            vfs.fsync(ino, fh, false).unwrap();
        }
    }
    assert_eq!(
        read_range(&vfs, ino, fh, 0, model.size),
        model.read(0, model.size)
    );
    truncate(&vfs, ino, 123_457);
    model.truncate(123_457);
    truncate(&vfs, ino, 5 * MIB + 3);
    model.truncate(5 * MIB + 3);
    assert_eq!(vfs.getattr(ino).unwrap().size, 5 * MIB + 3);
    assert_eq!(
        read_range(&vfs, ino, fh, 0, model.size + 10),
        model.read(0, model.size + 10)
    );
    // Writing past a shrink must not resurrect the old tail.
    write_all(&vfs, ino, fh, 200_000, b"x");
    model.write(200_000, b"x");
    close(&vfs, ino, fh);
    let fh = vfs.open(&root(), ino, libc::O_RDONLY).unwrap().fh;
    assert_eq!(
        read_range(&vfs, ino, fh, 0, model.size),
        model.read(0, model.size)
    );
    vfs.release(ino, fh, None).unwrap();
    vfs.shutdown().unwrap();
    volume.assert_fsck_clean();
}

#[test]
fn small_files_stay_inline_until_they_grow_past_the_threshold() {
    let volume = TestVolume::new();
    let vfs = volume.mount();
    let meta = volume.meta();
    let (ino, fh) = create_in_root(&vfs, "small");
    write_all(&vfs, ino, fh, 0, b"hello world");
    close(&vfs, ino, fh);
    assert_eq!(
        inline_bytes(&*meta, ino).as_deref(),
        Some(&b"hello world"[..])
    );
    assert!(
        volume.objects().is_empty(),
        "a small file must not touch the object store"
    );

    let fh = vfs.open(&root(), ino, libc::O_RDWR).unwrap().fh;
    let big = pattern(1, 100_000);
    write_all(&vfs, ino, fh, 20, &big);
    close(&vfs, ino, fh);
    assert_eq!(inline_bytes(&*meta, ino), None);
    assert!(!volume.objects().is_empty());
    let fh = vfs.open(&root(), ino, libc::O_RDONLY).unwrap().fh;
    let mut expected = b"hello world".to_vec();
    expected.resize(20, 0);
    expected.extend_from_slice(&big);
    assert_eq!(read_range(&vfs, ino, fh, 0, 200_000), expected);
    vfs.release(ino, fh, None).unwrap();

    // Emptied, a file is small again and goes back inline.
    truncate(&vfs, ino, 0);
    let fh = vfs.open(&root(), ino, libc::O_RDWR).unwrap().fh;
    write_all(&vfs, ino, fh, 0, b"again");
    close(&vfs, ino, fh);
    assert_eq!(inline_bytes(&*meta, ino).as_deref(), Some(&b"again"[..]));
    vfs.shutdown().unwrap();
    volume.assert_fsck_clean();
}

#[test]
fn compaction_keeps_content_and_gc_deletes_the_replaced_objects() {
    let volume = TestVolume::new();
    let vfs = volume.mount();
    let meta = volume.meta();
    let (ino, fh) = create_in_root(&vfs, "hot");
    let mut model = Model::default();
    for i in 0..20u64 {
        let data = pattern(i, 100_000);
        let offset = (i * 37_000) % 500_000;
        write_all(&vfs, ino, fh, offset, &data);
        model.write(offset, &data);
        vfs.fsync(ino, fh, false).unwrap();
    }
    assert!(meta.read_chunk(ino, 0).unwrap().len() >= 16);
    let (_, compacted) = maintenance::gc(&volume.config, Duration::from_secs(3600), false).unwrap();
    assert_eq!(compacted, 1);
    assert_eq!(meta.read_chunk(ino, 0).unwrap().len(), 1);
    assert!(
        !meta.garbage_slices(i64::MAX, 100).unwrap().is_empty(),
        "replaced slices become garbage"
    );
    assert_eq!(
        read_range(&vfs, ino, fh, 0, model.size),
        model.read(0, model.size)
    );

    let (deleted, _) = maintenance::gc(&volume.config, Duration::ZERO, false).unwrap();
    assert!(deleted >= 20, "deleted {deleted}");
    let live: Vec<u64> = meta
        .slice_references()
        .unwrap()
        .live
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(volume.stored_slice_ids(), live);
    assert_eq!(
        read_range(&vfs, ino, fh, 0, model.size),
        model.read(0, model.size)
    );
    close(&vfs, ino, fh);
    vfs.shutdown().unwrap();
    volume.assert_fsck_clean();
}

#[test]
fn deleting_a_file_eventually_deletes_its_objects() {
    let volume = TestVolume::new();
    let vfs = volume.mount();
    let (ino, fh) = create_in_root(&vfs, "big");
    write_all(&vfs, ino, fh, 0, &pattern(3, 9 * MIB as usize));
    close(&vfs, ino, fh);
    // New volumes store a slice (at most a chunk) as one object.
    assert_eq!(
        volume.objects().len(),
        1,
        "9 MiB = 1 object: {:?}",
        volume.objects()
    );
    vfs.unlink(&root(), ROOT_INO, b"big").unwrap();
    let (deleted, _) = maintenance::gc(&volume.config, Duration::ZERO, false).unwrap();
    assert_eq!(deleted, 1);
    assert!(volume.objects().is_empty());
    vfs.shutdown().unwrap();
    volume.assert_fsck_clean();
}

#[test]
fn unlinked_open_file_keeps_its_data_until_release() {
    let volume = TestVolume::new();
    let vfs = volume.mount();
    let (ino, fh) = create_in_root(&vfs, "tmp");
    let data = pattern(9, 3 * MIB as usize);
    write_all(&vfs, ino, fh, 0, &data);
    vfs.fsync(ino, fh, false).unwrap();
    vfs.unlink(&root(), ROOT_INO, b"tmp").unwrap();
    assert_eq!(
        vfs.lookup(&root(), ROOT_INO, b"tmp").unwrap_err().0,
        libc::ENOENT
    );
    maintenance::gc(&volume.config, Duration::ZERO, false).unwrap();
    assert_eq!(
        read_range(&vfs, ino, fh, 0, data.len() as u64),
        data,
        "data survives while open"
    );
    write_all(&vfs, ino, fh, 10, b"still writable");
    close(&vfs, ino, fh);
    assert_eq!(vfs.getattr(ino).unwrap_err().0, libc::ENOENT);
    maintenance::gc(&volume.config, Duration::ZERO, false).unwrap();
    assert!(
        volume.objects().is_empty(),
        "objects left: {:?}",
        volume.objects()
    );
    vfs.shutdown().unwrap();
    volume.assert_fsck_clean();
}

#[test]
fn fsynced_data_survives_a_crash() {
    let volume = TestVolume::new();
    let vfs = volume.mount();
    let (big, fh_big) = create_in_root(&vfs, "big");
    let data = pattern(5, 5 * MIB as usize + 17);
    write_all(&vfs, big, fh_big, 0, &data);
    vfs.fsync(big, fh_big, false).unwrap();
    let (small, fh_small) = create_in_root(&vfs, "small");
    write_all(&vfs, small, fh_small, 0, b"tiny");
    vfs.fsync(small, fh_small, true).unwrap();
    drop(vfs); // no shutdown: a crash after fsync

    let vfs = volume.mount();
    let fh = vfs.open(&root(), big, libc::O_RDONLY).unwrap().fh;
    assert_eq!(read_range(&vfs, big, fh, 0, data.len() as u64 + 10), data);
    let fh2 = vfs.open(&root(), small, libc::O_RDONLY).unwrap().fh;
    assert_eq!(vfs.read(small, fh2, 0, 100).unwrap(), b"tiny");
    vfs.release(big, fh, None).unwrap();
    vfs.release(small, fh2, None).unwrap();
    vfs.shutdown().unwrap();
    volume.assert_fsck_clean();
}

#[test]
fn a_failing_store_returns_eio_and_keeps_the_data_dirty() {
    let volume = TestVolume::new();
    let vfs = volume.mount();
    let (ino, fh) = create_in_root(&vfs, "f");
    let data = pattern(11, 2 * MIB as usize);
    write_all(&vfs, ino, fh, 0, &data);
    // Replace the store directory by a file: every upload fails.
    let store_dir = volume.dir.path().join("store");
    let parked = volume.dir.path().join("parked");
    std::fs::rename(&store_dir, &parked).unwrap();
    std::fs::write(&store_dir, b"not a directory").unwrap();
    assert_eq!(vfs.fsync(ino, fh, false).unwrap_err().0, libc::EIO);
    assert_eq!(
        read_range(&vfs, ino, fh, 0, data.len() as u64),
        data,
        "buffered data is still readable"
    );
    std::fs::remove_file(&store_dir).unwrap();
    std::fs::rename(&parked, &store_dir).unwrap();
    vfs.fsync(ino, fh, false).unwrap();
    close(&vfs, ino, fh);
    vfs.shutdown().unwrap();
    let vfs = volume.mount();
    let fh = vfs.open(&root(), ino, libc::O_RDONLY).unwrap().fh;
    assert_eq!(read_range(&vfs, ino, fh, 0, data.len() as u64), data);
    vfs.release(ino, fh, None).unwrap();
    vfs.shutdown().unwrap();
    // The failed attempt's slices are garbage, not leaks.
    maintenance::gc(&volume.config, Duration::ZERO, false).unwrap();
    volume.assert_fsck_clean();
}

#[test]
fn large_sequential_write_reads_back() {
    let volume = TestVolume::new();
    let vfs = volume.mount();
    let (ino, fh) = create_in_root(&vfs, "seq");
    let piece = pattern(2, MIB as usize);
    let total = 80 * MIB;
    let started = std::time::Instant::now();
    for i in 0..total / MIB {
        write_all(&vfs, ino, fh, i * MIB, &piece);
    }
    close(&vfs, ino, fh);
    eprintln!("80 MiB written and committed in {:?}", started.elapsed());
    let fh = vfs.open(&root(), ino, libc::O_RDONLY).unwrap().fh;
    for i in 0..total / MIB {
        assert_eq!(
            vfs.read(ino, fh, i * MIB, MIB as u32).unwrap(),
            piece,
            "MiB {i}"
        );
    }
    vfs.release(ino, fh, None).unwrap();
    assert_eq!(vfs.getattr(ino).unwrap().size, total);
    vfs.shutdown().unwrap();
    volume.assert_fsck_clean();
}

#[test]
fn fallocate_and_copy_file_range() {
    let volume = TestVolume::new();
    let vfs = volume.mount();
    let (ino, fh) = create_in_root(&vfs, "a");
    vfs.fallocate(ino, fh, 0, 1000, 0).unwrap();
    assert_eq!(vfs.getattr(ino).unwrap().size, 1000);
    vfs.fallocate(ino, fh, 0, 5000, libc::FALLOC_FL_KEEP_SIZE)
        .unwrap();
    assert_eq!(vfs.getattr(ino).unwrap().size, 1000);
    assert_eq!(
        vfs.fallocate(ino, fh, 0, 10, libc::FALLOC_FL_COLLAPSE_RANGE)
            .unwrap_err()
            .0,
        libc::EOPNOTSUPP
    );
    assert_eq!(vfs.fallocate(ino, fh, 0, 0, 0).unwrap_err().0, libc::EINVAL);
    assert_eq!(
        vfs.fallocate(ino, fh, 1 << 62, 1 << 62, 0).unwrap_err().0,
        libc::EFBIG
    );
    let data = pattern(4, 300_000);
    write_all(&vfs, ino, fh, 0, &data);
    let (out, fh_out) = create_in_root(&vfs, "b");
    assert_eq!(
        vfs.copy_file_range(ino, fh, 100, out, fh_out, 7, 1_000_000)
            .unwrap(),
        299_900
    );
    let mut expected = vec![0u8; 7];
    expected.extend_from_slice(&data[100..]);
    assert_eq!(read_range(&vfs, out, fh_out, 0, 400_000), expected);
    close(&vfs, ino, fh);
    close(&vfs, out, fh_out);
    vfs.shutdown().unwrap();
    volume.assert_fsck_clean();
}

#[test]
fn destroy_removes_every_object_and_the_metadata() {
    let volume = TestVolume::new();
    let vfs = volume.mount();
    let (ino, fh) = create_in_root(&vfs, "f");
    write_all(&vfs, ino, fh, 0, &pattern(8, 5 * MIB as usize));
    close(&vfs, ino, fh);
    vfs.shutdown().unwrap();
    drop(vfs);
    let uuid = volume.meta().volume().unwrap().unwrap().uuid;
    let volume_dir = volume.dir.path().join("store").join(&uuid);
    assert!(volume_dir.exists());
    maintenance::destroy(&volume.config).unwrap();
    assert!(!volume.dir.path().join("meta.db").exists());
    let leftover: Vec<_> = walk(&volume_dir);
    assert!(leftover.is_empty(), "objects left: {leftover:?}");
    // Destroying twice is harmless.
    maintenance::destroy(&volume.config).unwrap();
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .flat_map(|e| {
            if e.path().is_dir() {
                walk(&e.path())
            } else {
                vec![e.path()]
            }
        })
        .collect()
}

/// The inline bytes of a file, or None if its data lives in chunks.
fn inline_bytes(meta: &dyn cellar_meta::MetaEngine, ino: u64) -> Option<Vec<u8>> {
    match meta.read_layout(ino, 0..0, None).unwrap().content {
        Some(cellar_meta::Content::Inline(bytes)) => Some(bytes),
        _ => None,
    }
}

/// A writer stalled past its uploads' expiry (gc deleted their objects and intent records) must
/// not commit slices whose objects are gone: its commit fails, the data stays buffered and is
/// uploaded again, and nothing is lost.
#[test]
fn an_expired_upload_is_uploaded_again_not_committed() {
    let volume = TestVolume::new();
    let vfs = volume.mount();
    let meta = volume.meta();
    let uuid = meta.volume().unwrap().unwrap().uuid;
    let (ino, fh) = create_in_root(&vfs, "stalled");
    // 16 MiB buffered starts a background upload; its commit waits for the next flush.
    let data = pattern(5, 16 * MIB as usize);
    write_all(&vfs, ino, fh, 0, &data);
    // Play gc on an expired upload: once the objects of the pending slices have landed, delete
    // them and their intent records before the writer commits.
    let pending: Vec<u64> = meta
        .garbage_slices(i64::MAX, 1000)
        .unwrap()
        .iter()
        .map(|g| g.id)
        .collect();
    let pending_objects = || -> Vec<String> {
        volume
            .objects()
            .into_iter()
            .filter(|key| {
                BlockStore::parse_block_key(key).is_some_and(|(id, _, _)| pending.contains(&id))
            })
            .collect()
    };
    let started = std::time::Instant::now();
    while pending_objects().is_empty() && started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    // Intent records first: from then on no commit of these slices can succeed. Then the
    // objects of those that were not committed before (the flusher may have been faster).
    meta.forget_garbage(&pending).unwrap();
    let live_ids = || -> Vec<u64> {
        meta.slice_references()
            .unwrap()
            .live
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    };
    let committed_before = live_ids();
    let expired: Vec<String> = pending_objects()
        .into_iter()
        .filter(|key| {
            BlockStore::parse_block_key(key)
                .is_some_and(|(id, _, _)| !committed_before.contains(&id))
        })
        .collect();
    for key in &expired {
        std::fs::remove_file(volume.dir.path().join("store").join(&uuid).join(key)).unwrap();
    }
    eprintln!("expired {} object(s) of an upload in flight", expired.len());
    vfs.fsync(ino, fh, false).unwrap();
    let live = live_ids();
    assert!(
        pending
            .iter()
            .all(|id| committed_before.contains(id) || !live.contains(id)),
        "an expired slice was committed: live {live:?}, expired {pending:?}"
    );
    assert_eq!(read_range(&vfs, ino, fh, 0, data.len() as u64), data);
    close(&vfs, ino, fh);
    vfs.shutdown().unwrap();
    volume.assert_fsck_clean();
}

/// Whether a mount's kernel keeps its page cache across opens is decided by the data version, not
/// by (mtime, size): a same-size rewrite that restores the mtime (`rsync -t`, `cp -p`) elsewhere
/// must drop it.
#[test]
fn a_same_size_rewrite_with_restored_mtime_drops_the_page_cache() {
    let volume = TestVolume::new();
    let a = volume.mount();
    let b = volume.mount();
    let (ino, fh) = create_in_root(&a, "cached");
    write_all(&a, ino, fh, 0, &[b'a'; 1000]);
    close(&a, ino, fh);
    let reopen = |vfs: &cellar_vfs::Vfs| {
        let reply = vfs.open(&root(), ino, libc::O_RDONLY).unwrap();
        vfs.release(ino, reply.fh, None).unwrap();
        reply.keep_cache
    };
    reopen(&a);
    assert!(reopen(&a), "unchanged: the page cache is kept");
    let mtime = a.getattr(ino).unwrap().mtime_ns;
    // b's changes reach a through its change feed, which may lag (on PostgreSQL it does): the
    // verdicts below are only defined once a has applied all of them.
    let applied = Arc::new(AtomicUsize::new(0));
    let counter = applied.clone();
    a.set_invalidator(Box::new(move |invalidation| {
        if matches!(invalidation, cellar_vfs::Invalidation::Inode(i) if i == ino) {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    }));
    let meta = volume.meta();
    let mark = meta.last_change().unwrap();

    let fh_b = b.open(&root(), ino, libc::O_RDWR).unwrap().fh;
    write_all(&b, ino, fh_b, 0, &[b'b'; 1000]);
    close(&b, ino, fh_b);
    let restore = SetAttrRequest {
        mtime: Some(cellar_meta::TimeSet::At(mtime)),
        ..SetAttrRequest::default()
    };
    b.setattr(&root(), ino, restore).unwrap();
    let cellar_meta::ChangeBatch::Changes(changes) = meta.changes_since(mark, 1000).unwrap() else {
        panic!("the change log was trimmed during the test");
    };
    let made = changes.iter().filter(|change| change.ino == ino).count();
    assert!(made >= 2, "b's write and setattr are in the change log");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while applied.load(Ordering::SeqCst) < made {
        assert!(
            std::time::Instant::now() < deadline,
            "mount a applied {} of b's {made} changes in 20 s",
            applied.load(Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let attr = a.getattr(ino).unwrap();
    assert_eq!((attr.size, attr.mtime_ns), (1000, mtime));
    assert!(
        !reopen(&a),
        "rewritten elsewhere: the page cache must be dropped"
    );
    assert!(reopen(&a), "and kept again once seen");
    a.shutdown().unwrap();
    b.shutdown().unwrap();
}

/// tar's futimens + fchown + fchmod before close wait for the flush and commit with the data:
/// this mount sees them at once, the volume at close, with the explicit mtime kept unless a
/// later write moves it on.
#[test]
fn attribute_changes_of_a_dirty_file_commit_with_its_data() {
    let volume = TestVolume::new();
    let vfs = volume.mount();
    let (ino, fh) = create_in_root(&vfs, "extracted");
    write_all(&vfs, ino, fh, 0, b"archived bytes");
    let archived_mtime = 1_600_000_000_000_000_000;
    let set = |req: SetAttrRequest| vfs.setattr(&root(), ino, req).unwrap();
    set(SetAttrRequest {
        mtime: Some(TimeSet::At(archived_mtime)),
        ..Default::default()
    });
    set(SetAttrRequest {
        uid: Some(1234),
        gid: Some(5678),
        ..Default::default()
    });
    let seen = set(SetAttrRequest {
        mode: Some(0o640),
        ..Default::default()
    });
    assert_eq!(
        (seen.perm, seen.uid, seen.gid, seen.mtime_ns, seen.size),
        (0o640, 1234, 5678, archived_mtime, 14),
        "this mount sees the changes at once"
    );
    let committed = volume.meta().getattr(ino).unwrap();
    assert_eq!(
        (committed.perm, committed.size),
        (0o644, 0),
        "nothing committed before the flush"
    );
    close(&vfs, ino, fh);
    let committed = volume.meta().getattr(ino).unwrap();
    assert_eq!(
        (
            committed.perm,
            committed.uid,
            committed.gid,
            committed.mtime_ns,
            committed.size
        ),
        (0o640, 1234, 5678, archived_mtime, 14),
        "the close commits data and attributes"
    );
    assert_eq!(vfs.getattr(ino).unwrap(), committed);

    // A write after futimens moves mtime on; the mode set before it stays.
    let fh = vfs.open(&root(), ino, libc::O_WRONLY).unwrap().fh;
    write_all(&vfs, ino, fh, 0, b"A");
    set(SetAttrRequest {
        mtime: Some(TimeSet::At(archived_mtime)),
        mode: Some(0o600),
        ..Default::default()
    });
    write_all(&vfs, ino, fh, 1, b"B");
    close(&vfs, ino, fh);
    let committed = volume.meta().getattr(ino).unwrap();
    assert_eq!(committed.perm, 0o600);
    assert!(
        committed.mtime_ns > archived_mtime,
        "the later write set mtime"
    );
    vfs.shutdown().unwrap();
    volume.assert_fsck_clean();
}

/// A setuid bit set while the file was dirty, then cleared by a non-owner's write, stays
/// cleared when the flush commits the pending mode.
#[test]
fn a_write_by_another_user_clears_a_pending_setuid_bit() {
    let volume = TestVolume::new();
    let vfs = volume.mount();
    let (ino, fh) = create_in_root(&vfs, "tool");
    write_all(&vfs, ino, fh, 0, b"#!/bin/sh\n");
    vfs.setattr(
        &root(),
        ino,
        SetAttrRequest {
            mode: Some(0o4777),
            ..Default::default()
        },
    )
    .unwrap();
    let theirs = vfs.open(&user(1000), ino, libc::O_WRONLY).unwrap().fh;
    let written = vfs.write(ino, theirs, 10, b"id\n").unwrap();
    assert_eq!(written, 3);
    assert_eq!(vfs.getattr(ino).unwrap().perm, 0o777, "cleared at once");
    close(&vfs, ino, theirs);
    close(&vfs, ino, fh);
    assert_eq!(volume.meta().getattr(ino).unwrap().perm, 0o777);
    vfs.shutdown().unwrap();
}

/// A dirty file's attribute changes made while its writes were unflushed (chmod, chown,
/// futimens before close) survive a shutdown that cannot reach the store: the spool keeps them
/// with the writes, and the next mount applies both.
#[test]
fn the_spool_keeps_and_replays_pending_attribute_changes() {
    let volume = TestVolume::new();
    let vfs = volume.mount();
    let (ino, fh) = create_in_root(&vfs, "spooled");
    // Past the inline threshold: the data must go to the store.
    let data = pattern(7, 300 << 10);
    write_all(&vfs, ino, fh, 0, &data);
    let mtime_ns = 1_600_000_000_123_456_789;
    vfs.setattr(
        &root(),
        ino,
        SetAttrRequest {
            mode: Some(0o600),
            uid: Some(1234),
            gid: Some(4321),
            mtime: Some(TimeSet::At(mtime_ns)),
            fh: Some(fh),
            ..Default::default()
        },
    )
    .unwrap();
    // The store goes away: its directory is replaced by a file, so every upload fails.
    let store = volume.dir.path().join("store");
    let away = volume.dir.path().join("store.away");
    std::fs::rename(&store, &away).unwrap();
    std::fs::write(&store, b"not a directory").unwrap();
    let spool = volume.dir.path().join("spool");
    let unflushed = vfs
        .shutdown_within(Duration::from_secs(2), Some(&spool))
        .unwrap();
    assert_eq!(unflushed.len(), 1, "{unflushed:?}");
    assert!(unflushed[0].spooled.is_some(), "{unflushed:?}");
    drop(vfs);
    std::fs::remove_file(&store).unwrap();
    std::fs::rename(&away, &store).unwrap();

    let vfs = volume.mount();
    let replayed = vfs.replay_spool(&spool).unwrap();
    assert_eq!(replayed.applied, vec![ino], "{replayed:?}");
    let attr = volume.meta().getattr(ino).unwrap();
    assert_eq!(attr.perm & 0o7777, 0o600);
    assert_eq!((attr.uid, attr.gid), (1234, 4321));
    assert_eq!(attr.mtime_ns, mtime_ns);
    assert_eq!(attr.size, data.len() as u64);
    let fh = vfs.open(&root(), ino, libc::O_RDONLY).unwrap().fh;
    assert_eq!(read_range(&vfs, ino, fh, 0, data.len() as u64), data);
    vfs.release(ino, fh, None).unwrap();
    vfs.shutdown().unwrap();
    volume.assert_fsck_clean();
}
