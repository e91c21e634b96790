//! Forks and snapshots through the vfs: a fork reads its origin's data without a copied object,
//! each side's writes stay its own, gc never deletes an object a fork may still read, and a
//! snapshot refuses every change.

mod common;

use std::time::Duration;

use cellar_meta::testing::Engine;
use cellar_vfs::{maintenance, Errno, Vfs, VolumeConfig, ROOT_INO};
use common::*;

const MIB: usize = 1 << 20;

/// A new volume's configuration next to `origin`'s (same store, same engine).
fn sibling(origin: &TestVolume, name: &str) -> VolumeConfig {
    let engine = if origin.config.meta_url.starts_with("sqlite://") {
        Engine::Sqlite
    } else {
        Engine::Postgres
    };
    let dir = origin.dir.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    VolumeConfig {
        meta_url: cellar_meta::testing::fresh_meta_url(engine, &dir),
        volume: name.into(),
        ..origin.config.clone()
    }
}

fn write_file(vfs: &Vfs, parent: u64, name: &str, data: &[u8]) -> u64 {
    let (attr, fh) = create(vfs, parent, name);
    write_all(vfs, attr.ino, fh, 0, data);
    close(vfs, attr.ino, fh);
    attr.ino
}

fn read_file(vfs: &Vfs, parent: u64, name: &str) -> Result<Vec<u8>, Errno> {
    let ino = vfs.lookup(&root(), parent, name.as_bytes())?.ino;
    let fh = vfs.open(&root(), ino, libc::O_RDONLY)?.fh;
    let size = vfs.getattr(ino)?.size;
    let data = read_range(vfs, ino, fh, 0, size);
    vfs.release(ino, fh, None)?;
    Ok(data)
}

fn overwrite(vfs: &Vfs, parent: u64, name: &str, offset: u64, data: &[u8]) {
    let ino = vfs.lookup(&root(), parent, name.as_bytes()).unwrap().ino;
    let fh = vfs.open(&root(), ino, libc::O_RDWR).unwrap().fh;
    write_all(vfs, ino, fh, offset, data);
    close(vfs, ino, fh);
}

fn fsck_clean(config: &VolumeConfig) {
    let problems = maintenance::fsck(config, false, false).unwrap();
    assert!(
        problems.is_empty(),
        "fsck of {}: {problems:#?}",
        config.volume
    );
}

fn gc_now(config: &VolumeConfig) -> u64 {
    maintenance::gc(config, Duration::ZERO, true).unwrap().0
}

#[test]
fn a_fork_shares_every_object_and_each_side_keeps_its_own_writes() {
    let origin = TestVolume::new();
    let vfs = origin.mount();
    let big = pattern(1, 9 * MIB);
    write_file(&vfs, ROOT_INO, "big", &big);
    write_file(&vfs, ROOT_INO, "small", b"inline bytes");
    let dir = vfs.mkdir(&root(), ROOT_INO, b"dir", 0o755, 0).unwrap().ino;
    write_file(&vfs, dir, "nested", &pattern(2, 3 * MIB));
    vfs.symlink(&root(), dir, b"link", b"../small").unwrap();
    // Unlinked while open: the origin keeps it for its opener, the fork never sees it.
    let (open_ino, open_fh) = create_in_root(&vfs, "doomed");
    write_all(&vfs, open_ino, open_fh, 0, &pattern(3, MIB));
    vfs.fsync(open_ino, open_fh, false).unwrap();
    vfs.unlink(&root(), ROOT_INO, b"doomed").unwrap();
    let objects_before = origin.objects();

    let fork = sibling(&origin, "fork");
    let stats = maintenance::fork(&origin.config, &fork, false).unwrap();
    assert_eq!(
        stats.inodes, 6,
        "root, big, small, dir, nested, link: {stats:?}"
    );
    assert_eq!(origin.objects(), objects_before, "a fork copies no object");
    assert_eq!(maintenance::forks(&origin.config).unwrap(), vec!["fork"]);
    vfs.release(open_ino, open_fh, None).unwrap();

    let forked = Vfs::open_volume(fork.clone()).unwrap();
    assert!(!forked.is_snapshot());
    assert_eq!(read_file(&forked, ROOT_INO, "big").unwrap(), big);
    assert_eq!(
        read_file(&forked, ROOT_INO, "small").unwrap(),
        b"inline bytes"
    );
    let fork_dir = forked.lookup(&root(), ROOT_INO, b"dir").unwrap().ino;
    assert_eq!(
        read_file(&forked, fork_dir, "nested").unwrap(),
        pattern(2, 3 * MIB)
    );
    let link = forked.lookup(&root(), fork_dir, b"link").unwrap().ino;
    assert_eq!(forked.readlink(link).unwrap(), b"../small");
    assert_eq!(
        forked.lookup(&root(), ROOT_INO, b"doomed"),
        Err(Errno(libc::ENOENT))
    );

    // Writes on either side never show on the other.
    overwrite(&forked, ROOT_INO, "big", 4 * MIB as u64, b"fork was here");
    write_file(&forked, ROOT_INO, "only-in-fork", b"f");
    overwrite(&vfs, ROOT_INO, "small", 0, b"ORIGIN");
    write_file(&vfs, ROOT_INO, "only-in-origin", b"o");
    let mut fork_big = big.clone();
    fork_big[4 * MIB..4 * MIB + 13].copy_from_slice(b"fork was here");
    assert_eq!(read_file(&forked, ROOT_INO, "big").unwrap(), fork_big);
    assert_eq!(read_file(&vfs, ROOT_INO, "big").unwrap(), big);
    assert_eq!(read_file(&vfs, ROOT_INO, "small").unwrap(), b"ORIGIN bytes");
    assert_eq!(
        read_file(&forked, ROOT_INO, "small").unwrap(),
        b"inline bytes"
    );
    assert_eq!(
        vfs.lookup(&root(), ROOT_INO, b"only-in-fork"),
        Err(Errno(libc::ENOENT))
    );
    assert_eq!(
        forked.lookup(&root(), ROOT_INO, b"only-in-origin"),
        Err(Errno(libc::ENOENT))
    );
    vfs.shutdown().unwrap();
    forked.shutdown().unwrap();
    fsck_clean(&origin.config);
    fsck_clean(&fork);
}

#[test]
fn gc_keeps_what_a_fork_references_until_the_fork_is_deleted() {
    let origin = TestVolume::new();
    let vfs = origin.mount();
    let data = pattern(7, 5 * MIB);
    write_file(&vfs, ROOT_INO, "shared", &data);
    vfs.shutdown().unwrap();
    let shared_ids = origin.stored_slice_ids();
    assert!(!shared_ids.is_empty());

    let fork = sibling(&origin, "fork");
    maintenance::fork(&origin.config, &fork, false).unwrap();
    let before = maintenance::usage(&origin.config).unwrap();
    assert_eq!(before.exclusive_bytes, 0, "every object is shared now");

    // The origin deletes the file: its objects stay, the fork still reads them.
    let vfs = origin.mount();
    vfs.unlink(&root(), ROOT_INO, b"shared").unwrap();
    vfs.shutdown().unwrap();
    assert_eq!(gc_now(&origin.config), 0);
    assert_eq!(origin.stored_slice_ids(), shared_ids);
    let forked = Vfs::open_volume(fork.clone()).unwrap();
    assert_eq!(read_file(&forked, ROOT_INO, "shared").unwrap(), data);
    // The fork's own data is its own: exclusive bytes count it.
    write_file(&forked, ROOT_INO, "mine", &pattern(8, 2 * MIB));
    assert_eq!(
        maintenance::usage(&fork).unwrap().exclusive_bytes,
        2 * MIB as u64
    );
    // The fork deletes its reference too: an inherited object is forgotten, never deleted.
    forked.unlink(&root(), ROOT_INO, b"shared").unwrap();
    forked.shutdown().unwrap();
    gc_now(&fork);
    assert_eq!(origin.stored_slice_ids(), shared_ids);
    fsck_clean(&origin.config);
    fsck_clean(&fork);

    // A volume with forks cannot be destroyed; once the fork is gone, gc frees the objects.
    assert!(maintenance::destroy(&origin.config).is_err());
    maintenance::release_fork(&origin.config, "fork").unwrap();
    maintenance::destroy(&fork).unwrap();
    assert!(gc_now(&origin.config) > 0);
    assert_eq!(origin.stored_slice_ids(), Vec::<u64>::new());
    fsck_clean(&origin.config);
}

#[test]
fn deleting_the_origin_keeps_its_fork_whole() {
    let origin = TestVolume::new();
    let vfs = origin.mount();
    let data = pattern(9, 6 * MIB);
    write_file(&vfs, ROOT_INO, "kept", &data);
    vfs.shutdown().unwrap();
    let fork = sibling(&origin, "fork");
    maintenance::fork(&origin.config, &fork, false).unwrap();
    // The origin's files go (its metadata is kept while the fork exists: see the server).
    let vfs = origin.mount();
    vfs.unlink(&root(), ROOT_INO, b"kept").unwrap();
    vfs.shutdown().unwrap();
    gc_now(&origin.config);
    let forked = Vfs::open_volume(fork.clone()).unwrap();
    assert_eq!(read_file(&forked, ROOT_INO, "kept").unwrap(), data);
    forked.shutdown().unwrap();
    fsck_clean(&fork);
}

#[test]
fn a_snapshot_refuses_changes_and_a_fork_of_it_is_writable() {
    let origin = TestVolume::new();
    let vfs = origin.mount();
    write_file(&vfs, ROOT_INO, "f", &pattern(4, 2 * MIB));
    let snapshot = sibling(&origin, "snap");
    maintenance::fork(&origin.config, &snapshot, true).unwrap();
    // The origin goes on writing; the snapshot keeps the moment it was taken.
    overwrite(&vfs, ROOT_INO, "f", 0, b"later");
    vfs.shutdown().unwrap();

    let snap = Vfs::open_volume(snapshot.clone()).unwrap();
    assert!(snap.is_snapshot());
    assert_eq!(
        read_file(&snap, ROOT_INO, "f").unwrap(),
        pattern(4, 2 * MIB)
    );
    let f = snap.lookup(&root(), ROOT_INO, b"f").unwrap().ino;
    let erofs = Err(Errno(libc::EROFS));
    assert_eq!(
        snap.create(&root(), ROOT_INO, b"new", 0o644, 0, libc::O_RDWR)
            .map(|_| ()),
        erofs
    );
    assert_eq!(snap.open(&root(), f, libc::O_WRONLY).map(|_| ()), erofs);
    assert_eq!(snap.unlink(&root(), ROOT_INO, b"f"), erofs);
    assert_eq!(
        snap.mkdir(&root(), ROOT_INO, b"d", 0o755, 0).map(|_| ()),
        erofs
    );
    assert_eq!(snap.setxattr(&root(), f, b"user.x", b"1", 0), erofs);
    snap.shutdown().unwrap();

    // A fork of the snapshot is writable.
    let branch = sibling(&origin, "branch");
    maintenance::fork(&snapshot, &branch, false).unwrap();
    let branched = Vfs::open_volume(branch.clone()).unwrap();
    assert!(!branched.is_snapshot());
    assert_eq!(
        read_file(&branched, ROOT_INO, "f").unwrap(),
        pattern(4, 2 * MIB)
    );
    overwrite(&branched, ROOT_INO, "f", 0, b"branch");
    let mut expected = pattern(4, 2 * MIB);
    expected[..6].copy_from_slice(b"branch");
    assert_eq!(read_file(&branched, ROOT_INO, "f").unwrap(), expected);
    branched.shutdown().unwrap();

    // A fork of that fork reads through two ancestors: the branch's write, the origin's rest.
    let leaf = sibling(&origin, "leaf");
    maintenance::fork(&branch, &leaf, false).unwrap();
    let leafed = Vfs::open_volume(leaf.clone()).unwrap();
    assert_eq!(read_file(&leafed, ROOT_INO, "f").unwrap(), expected);
    leafed.shutdown().unwrap();
    fsck_clean(&leaf);
    fsck_clean(&snapshot);
    fsck_clean(&branch);
    fsck_clean(&origin.config);
}
