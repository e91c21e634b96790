//! Namespace, attributes, xattrs and locks through the vfs.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cellar_meta::TimeSet;
use cellar_vfs::{Ctx, FileKind, LockKind, LockRange, RenameMode, SetAttrRequest, Vfs, ROOT_INO};
use common::*;

fn names(vfs: &Vfs, dir: u64) -> Vec<String> {
    let fh = vfs.opendir(&root(), dir, 0).unwrap();
    let entries = vfs.readdir(dir, fh, 0, 1000, false).unwrap();
    vfs.releasedir(dir, fh).unwrap();
    entries
        .into_iter()
        .map(|e| String::from_utf8(e.name).unwrap())
        .collect()
}

#[test]
fn rename_variants() {
    let volume = TestVolume::new();
    let vfs = volume.mount();
    let (a, fh_a) = create_in_root(&vfs, "a");
    write_all(&vfs, a, fh_a, 0, b"content of a");
    close(&vfs, a, fh_a);
    let (b, fh_b) = create_in_root(&vfs, "b");
    write_all(&vfs, b, fh_b, 0, &pattern(1, 200_000));
    vfs.fsync(b, fh_b, false).unwrap();

    assert_eq!(
        vfs.rename(
            &root(),
            ROOT_INO,
            b"a",
            ROOT_INO,
            b"b",
            RenameMode::NoReplace
        )
        .unwrap_err()
        .0,
        libc::EEXIST
    );
    vfs.rename(
        &root(),
        ROOT_INO,
        b"a",
        ROOT_INO,
        b"b",
        RenameMode::Exchange,
    )
    .unwrap();
    assert_eq!(vfs.lookup(&root(), ROOT_INO, b"b").unwrap().ino, a);
    assert_eq!(vfs.lookup(&root(), ROOT_INO, b"a").unwrap().ino, b);
    // Replacing a file that is still open keeps its data readable through the handle.
    vfs.rename(&root(), ROOT_INO, b"b", ROOT_INO, b"a", RenameMode::Replace)
        .unwrap();
    assert_eq!(vfs.lookup(&root(), ROOT_INO, b"a").unwrap().ino, a);
    assert_eq!(read_range(&vfs, b, fh_b, 0, 200_000), pattern(1, 200_000));
    close(&vfs, b, fh_b);
    assert_eq!(vfs.getattr(b).unwrap_err().0, libc::ENOENT);

    let d1 = vfs.mkdir(&root(), ROOT_INO, b"d1", 0o755, 0).unwrap().ino;
    let d2 = vfs.mkdir(&root(), d1, b"d2", 0o755, 0).unwrap().ino;
    assert_eq!(
        vfs.rename(&root(), ROOT_INO, b"d1", d2, b"x", RenameMode::Replace)
            .unwrap_err()
            .0,
        libc::EINVAL
    );
    vfs.rename(&root(), ROOT_INO, b"a", d2, b"moved", RenameMode::Replace)
        .unwrap();
    assert_eq!(vfs.lookup(&root(), d2, b"moved").unwrap().ino, a);
    vfs.rename(
        &root(),
        ROOT_INO,
        b"d1",
        ROOT_INO,
        b"renamed",
        RenameMode::Replace,
    )
    .unwrap();
    assert_eq!(vfs.getattr(d2).unwrap().parent, d1);
    let fh = vfs.open(&root(), a, libc::O_RDONLY).unwrap().fh;
    assert_eq!(vfs.read(a, fh, 0, 100).unwrap(), b"content of a");
    vfs.release(a, fh, None).unwrap();
    assert_eq!(names(&vfs, ROOT_INO), vec![".", "..", "renamed"]);
    vfs.shutdown().unwrap();
    volume.assert_fsck_clean();
}

#[test]
fn readdir_offsets_stay_valid_while_the_directory_changes() {
    let volume = TestVolume::new();
    let vfs = volume.mount();
    let dir = vfs.mkdir(&root(), ROOT_INO, b"dir", 0o755, 0).unwrap().ino;
    for i in 0..10 {
        vfs.mknod(
            &root(),
            dir,
            format!("f{i}").as_bytes(),
            libc::S_IFREG | 0o644,
            0,
            0,
        )
        .unwrap();
    }
    let fh = vfs.opendir(&root(), dir, 0).unwrap();
    let first = vfs.readdir(dir, fh, 0, 6, true).unwrap();
    let first_names: Vec<_> = first
        .iter()
        .map(|e| String::from_utf8(e.name.clone()).unwrap())
        .collect();
    assert_eq!(first_names, vec![".", "..", "f0", "f1", "f2", "f3"]);
    assert_eq!(first[1].ino, ROOT_INO);
    assert!(first.iter().all(|e| e.attr.is_some()));
    // Remove one already returned and one not yet returned; add a new one.
    vfs.unlink(&root(), dir, b"f1").unwrap();
    vfs.unlink(&root(), dir, b"f5").unwrap();
    vfs.mknod(&root(), dir, b"new", libc::S_IFREG | 0o644, 0, 0)
        .unwrap();
    let mut rest = Vec::new();
    let mut offset = first.last().unwrap().offset;
    loop {
        let page = vfs.readdir(dir, fh, offset, 3, false).unwrap();
        let Some(last) = page.last() else { break };
        offset = last.offset;
        rest.extend(page.into_iter().map(|e| String::from_utf8(e.name).unwrap()));
    }
    assert_eq!(rest, vec!["f4", "f6", "f7", "f8", "f9", "new"]);
    vfs.releasedir(dir, fh).unwrap();
    vfs.shutdown().unwrap();
    volume.assert_fsck_clean();
}

#[test]
fn xattr_flags_and_limits() {
    let volume = TestVolume::new();
    let vfs = volume.mount();
    let (ino, fh) = create_in_root(&vfs, "x");
    close(&vfs, ino, fh);
    let c = root();
    vfs.setxattr(&c, ino, b"user.a", b"1", libc::XATTR_CREATE)
        .unwrap();
    assert_eq!(
        vfs.setxattr(&c, ino, b"user.a", b"2", libc::XATTR_CREATE)
            .unwrap_err()
            .0,
        libc::EEXIST
    );
    assert_eq!(
        vfs.setxattr(&c, ino, b"user.b", b"2", libc::XATTR_REPLACE)
            .unwrap_err()
            .0,
        libc::ENODATA
    );
    vfs.setxattr(&c, ino, b"user.a", b"3", libc::XATTR_REPLACE)
        .unwrap();
    vfs.setxattr(&c, ino, b"user.b", b"", 0).unwrap();
    assert_eq!(vfs.getxattr(ino, b"user.a").unwrap(), b"3");
    assert_eq!(vfs.getxattr(ino, b"user.b").unwrap(), b"");
    assert_eq!(
        vfs.getxattr(ino, b"user.none").unwrap_err().0,
        libc::ENODATA
    );
    let mut list = vfs.listxattr(ino).unwrap();
    list.sort();
    let mut expected = b"user.a\0user.b\0".to_vec();
    expected.sort();
    assert_eq!(list, expected);
    assert_eq!(
        vfs.setxattr(&c, ino, &[b'u'; 256], b"v", 0).unwrap_err().0,
        libc::ERANGE
    );
    assert_eq!(
        vfs.setxattr(&c, ino, b"user.big", &vec![0u8; 65537], 0)
            .unwrap_err()
            .0,
        libc::E2BIG
    );
    vfs.setxattr(&c, ino, b"user.max", &vec![7u8; 65536], 0)
        .unwrap();
    vfs.removexattr(&c, ino, b"user.a").unwrap();
    assert_eq!(
        vfs.removexattr(&c, ino, b"user.a").unwrap_err().0,
        libc::ENODATA
    );
    vfs.shutdown().unwrap();
    volume.assert_fsck_clean();
}

fn range(start: u64, end: u64, kind: LockKind) -> LockRange {
    LockRange {
        start,
        end,
        kind,
        pid: 10,
    }
}

#[test]
fn locks_conflict_between_two_mounts() {
    let volume = TestVolume::new();
    let a = volume.mount();
    let b = volume.mount();
    let (ino, fh_a) = create_in_root(&a, "locked");
    let fh_b = b.open(&root(), ino, libc::O_RDWR).unwrap().fh;

    a.setlk(ino, fh_a, 1, range(0, 99, LockKind::Write), false)
        .unwrap();
    assert_eq!(
        b.setlk(ino, fh_b, 1, range(50, 60, LockKind::Read), false)
            .unwrap_err()
            .0,
        libc::EAGAIN
    );
    assert!(b
        .getlk(ino, fh_b, 1, range(50, 60, LockKind::Read))
        .unwrap()
        .is_some());
    b.setlk(ino, fh_b, 1, range(100, 200, LockKind::Write), false)
        .unwrap();

    // A sleeping lock in mount B is granted once A's owner closes its descriptor.
    let waiter = {
        let b: Arc<Vfs> = b.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            b.setlk(ino, fh_b, 1, range(0, 10, LockKind::Write), true)
                .unwrap();
            started.elapsed()
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    a.flush(ino, fh_a, 1).unwrap();
    assert!(waiter.join().unwrap() >= Duration::from_millis(150));
    assert!(a
        .getlk(ino, fh_a, 1, range(0, 10, LockKind::Read))
        .unwrap()
        .is_some());

    // flock(2) reaches the vfs as a whole-file lock owned by the open file description, and
    // its last close (release naming that owner) drops it.
    b.flush(ino, fh_b, 1).unwrap(); // drops B's POSIX locks (owner 1)
    b.release(ino, fh_b, None).unwrap();
    let fh_b = b.open(&root(), ino, libc::O_RDWR).unwrap().fh;
    a.setlk(ino, fh_a, 77, range(0, u64::MAX, LockKind::Write), false)
        .unwrap();
    assert_eq!(
        b.setlk(ino, fh_b, 88, range(0, u64::MAX, LockKind::Read), false)
            .unwrap_err()
            .0,
        libc::EAGAIN
    );
    a.release(ino, fh_a, Some(77)).unwrap();
    b.setlk(ino, fh_b, 88, range(0, u64::MAX, LockKind::Read), false)
        .unwrap();
    close(&b, ino, fh_b);
    a.shutdown().unwrap();
    b.shutdown().unwrap();
    volume.assert_fsck_clean();
}

#[test]
fn setattr_enforces_ownership_rules() {
    let volume = TestVolume::new();
    let vfs = volume.mount();
    let alice = user(1000);
    let (attr, reply) = vfs
        .create(&alice, ROOT_INO, b"f", 0o4755, 0o022, libc::O_RDWR)
        .unwrap();
    let ino = attr.ino;
    assert_eq!((attr.uid, attr.gid, attr.perm), (1000, 1000, 0o4755));
    let req = |f: fn(&mut SetAttrRequest)| {
        let mut r = SetAttrRequest::default();
        f(&mut r);
        r
    };
    assert_eq!(
        vfs.setattr(&alice, ino, req(|r| r.uid = Some(0)))
            .unwrap_err()
            .0,
        libc::EPERM
    );
    assert_eq!(
        vfs.setattr(&user(1001), ino, req(|r| r.mode = Some(0o777)))
            .unwrap_err()
            .0,
        libc::EPERM
    );
    assert_eq!(
        vfs.setattr(&user(1001), ino, req(|r| r.mtime = Some(TimeSet::At(5))))
            .unwrap_err()
            .0,
        libc::EPERM
    );
    vfs.setattr(&user(1001), ino, req(|r| r.mtime = Some(TimeSet::Now)))
        .unwrap();
    assert_eq!(
        vfs.setattr(&alice, ino, req(|r| r.gid = Some(5)))
            .unwrap_err()
            .0,
        libc::EPERM
    );
    // A write by a non-root user clears setuid.
    write_all(&vfs, ino, reply.fh, 0, b"x");
    assert_eq!(vfs.getattr(ino).unwrap().perm, 0o755);
    // Setting setgid on a file of a group the owner is not in is silently dropped.
    vfs.setattr(&root(), ino, req(|r| r.gid = Some(7))).unwrap();
    assert_eq!(
        vfs.setattr(&alice, ino, req(|r| r.mode = Some(0o2755)))
            .unwrap()
            .perm,
        0o755
    );
    // chown clears setuid/setgid.
    vfs.setattr(&root(), ino, req(|r| r.mode = Some(0o6755)))
        .unwrap();
    assert_eq!(
        vfs.setattr(&root(), ino, req(|r| r.uid = Some(1001)))
            .unwrap()
            .perm,
        0o755
    );
    close(&vfs, ino, reply.fh);

    // setgid directories pass their group (and, to subdirectories, the bit) on.
    let dir = vfs.mkdir(&root(), ROOT_INO, b"shared", 0o2777, 0).unwrap();
    vfs.setattr(&root(), dir.ino, req(|r| r.gid = Some(50)))
        .unwrap();
    let sub = vfs.mkdir(&alice, dir.ino, b"sub", 0o777, 0o022).unwrap();
    assert_eq!((sub.gid, sub.perm), (50, 0o2755));
    let file = vfs
        .mknod(&alice, dir.ino, b"file", libc::S_IFREG | 0o666, 0o022, 0)
        .unwrap();
    assert_eq!(
        (file.gid, file.perm, file.kind),
        (50, 0o644, FileKind::Regular)
    );
    vfs.shutdown().unwrap();
    volume.assert_fsck_clean();
}

#[test]
fn attributes_reflect_buffered_writes_and_keep_cache_follows_changes() {
    let volume = TestVolume::new();
    let a = volume.mount();
    let b = volume.mount();
    let (ino, fh) = create_in_root(&a, "f");
    write_all(&a, ino, fh, 0, &pattern(1, 1000));
    assert_eq!(
        a.getattr(ino).unwrap().size,
        1000,
        "dirty size is visible in this mount"
    );
    close(&a, ino, fh);
    assert_eq!(
        b.getattr(ino).unwrap().size,
        1000,
        "close publishes to other mounts"
    );

    let first = a.open(&root(), ino, libc::O_RDONLY).unwrap();
    assert!(first.keep_cache, "unchanged since this mount wrote it");
    a.release(ino, first.fh, None).unwrap();
    let fh_b = b.open(&root(), ino, libc::O_RDWR).unwrap().fh;
    write_all(&b, ino, fh_b, 0, b"changed");
    close(&b, ino, fh_b);
    let again = a.open(&root(), ino, libc::O_RDONLY).unwrap();
    assert!(!again.keep_cache, "changed by another mount");
    assert_eq!(a.read(ino, again.fh, 0, 7).unwrap(), b"changed");
    a.release(ino, again.fh, None).unwrap();
    let stat = a.statfs().unwrap();
    assert!(stat.bfree < stat.blocks && stat.ffree < stat.files);
    a.shutdown().unwrap();
    b.shutdown().unwrap();
    volume.assert_fsck_clean();
}

/// Linux lets an owner chgrp to any group it belongs to, supplementary ones included; the FUSE
/// request carries only the primary gid, so the vfs reads the caller's groups.
#[test]
fn owner_may_chgrp_to_a_supplementary_group() {
    let volume = TestVolume::new();
    let vfs = volume.mount();
    let mut caller = std::process::Command::new("setpriv")
        .args([
            "--reuid=1000",
            "--regid=1000",
            "--groups=4242,4343",
            "sleep",
            "30",
        ])
        .spawn()
        .expect("setpriv (util-linux) starts a process with supplementary groups");
    // setpriv changes its credentials before it execs sleep: wait until they show.
    let status = format!("/proc/{}/status", caller.id());
    let started = Instant::now();
    while !std::fs::read_to_string(&status)
        .unwrap()
        .contains("\nGroups:\t4242 4343")
    {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "groups never set"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let alice = Ctx {
        uid: 1000,
        gid: 1000,
        pid: caller.id(),
    };
    let (attr, reply) = vfs
        .create(&alice, ROOT_INO, b"g", 0o644, 0o022, libc::O_RDWR)
        .unwrap();
    let chgrp = |gid| SetAttrRequest {
        gid: Some(gid),
        ..SetAttrRequest::default()
    };
    assert_eq!(
        vfs.setattr(&alice, attr.ino, chgrp(4343)).unwrap().gid,
        4343
    );
    assert_eq!(
        vfs.setattr(&alice, attr.ino, chgrp(5555)).unwrap_err().0,
        libc::EPERM,
        "a group the caller does not hold"
    );
    caller.kill().unwrap();
    caller.wait().unwrap();
    vfs.release(attr.ino, reply.fh, None).unwrap();
    vfs.shutdown().unwrap();
}

/// A write by a non-owner to a setuid/setgid file makes the kernel clear those bits through
/// setattr: that succeeds (as on ext4), while any other mode change by a non-owner does not.
#[test]
fn a_non_owner_may_only_drop_setuid_and_setgid() {
    let volume = TestVolume::new();
    let vfs = volume.mount();
    let (attr, reply) = vfs
        .create(&user(1000), ROOT_INO, b"s", 0o6777, 0, libc::O_RDWR)
        .unwrap();
    assert_eq!(attr.perm, 0o6777);
    let chmod = |mode| SetAttrRequest {
        mode: Some(mode),
        ..SetAttrRequest::default()
    };
    assert_eq!(
        vfs.setattr(&user(1001), attr.ino, chmod(0o6666))
            .unwrap_err()
            .0,
        libc::EPERM
    );
    assert_eq!(
        vfs.setattr(&user(1001), attr.ino, chmod(0o0777))
            .unwrap()
            .perm,
        0o777
    );
    vfs.release(attr.ino, reply.fh, None).unwrap();
    vfs.shutdown().unwrap();
}
