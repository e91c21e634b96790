use libc::{
    EEXIST, EINVAL, EISDIR, ENAMETOOLONG, ENODATA, ENOENT, ENOTDIR, ENOTEMPTY, EPERM, ESTALE,
};
use tempfile::TempDir;

use super::{schema, SqliteEngine};
use crate::{
    Attr, FileKind, GarbageSlice, Ino, LockKind, LockOwner, LockRange, MetaEngine, MetaError,
    NewNode, Rename, RenameMode, SessionId, SessionInfo, SetAttr, Slice, TimeSet, VolumeInfo,
    XattrMode, ROOT_INO,
};

const CHUNK: u64 = 1 << 20;
const INLINE: u64 = 64;
const NOW: i64 = 1_000;

fn volume(name: &str) -> VolumeInfo {
    VolumeInfo {
        name: name.into(),
        uuid: "00000000-0000-0000-0000-000000000001".into(),
        chunk_size: CHUNK,
        block_size: 1 << 18,
        inline_threshold: INLINE,
        created_ns: 1,
    }
}

struct Fixture {
    dir: TempDir,
    meta: SqliteEngine,
    session: SessionId,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let meta = SqliteEngine::open(&dir.path().join("meta.db")).unwrap();
        meta.format(&volume("vol")).unwrap();
        let session = open_session(&meta, NOW);
        Fixture { dir, meta, session }
    }

    /// A second engine on the same file, as another process would open it.
    fn reopen(&self) -> SqliteEngine {
        SqliteEngine::open(&self.dir.path().join("meta.db")).unwrap()
    }

    fn raw(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.dir.path().join("meta.db")).unwrap()
    }

    fn mk(&self, parent: Ino, name: &str, kind: FileKind) -> Attr {
        self.meta
            .create_node(parent, name.as_bytes(), &node(kind), NOW)
            .unwrap()
    }

    fn unlink(&self, parent: Ino, name: &str, keep_open: bool) -> crate::Result<Option<Ino>> {
        self.meta.unlink(
            parent,
            name.as_bytes(),
            self.session,
            &|_| keep_open,
            NOW + 1,
        )
    }

    fn rename(
        &self,
        src: (Ino, &str),
        dst: (Ino, &str),
        mode: RenameMode,
    ) -> crate::Result<crate::RenameOutcome> {
        let req = Rename {
            src_parent: src.0,
            src_name: src.1.as_bytes(),
            dst_parent: dst.0,
            dst_name: dst.1.as_bytes(),
            mode,
        };
        self.meta.rename(&req, self.session, &|_| false, NOW + 5)
    }

    fn nlink(&self, ino: Ino) -> u32 {
        self.meta.getattr(ino).unwrap().nlink
    }

    fn names(&self, dir: Ino) -> Vec<String> {
        let entries = self.meta.readdir(dir, 0, 1000, false).unwrap();
        entries
            .into_iter()
            .map(|entry| String::from_utf8(entry.name).unwrap())
            .collect()
    }
}

fn open_session(meta: &SqliteEngine, now_ns: i64) -> SessionId {
    let info = SessionInfo {
        host: "host".into(),
        pid: 42,
        mount_point: "/mnt".into(),
        now_ns,
    };
    meta.open_session(&info).unwrap()
}

fn node(kind: FileKind) -> NewNode {
    NewNode {
        kind,
        perm: 0o644,
        uid: 1000,
        gid: 1000,
        rdev: 0,
        target: b"target".to_vec(),
    }
}

fn errno<T: std::fmt::Debug>(result: crate::Result<T>) -> i32 {
    match result {
        Err(MetaError::Posix(errno)) => errno.0,
        other => panic!("expected a POSIX error, got {other:?}"),
    }
}

fn slice(id: u64, len: u32, pos: u32) -> Slice {
    Slice {
        id,
        size: len,
        off: 0,
        len,
        pos,
    }
}

#[test]
fn migrations_apply_from_empty_and_refuse_newer_databases() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/deeper/meta.db");
    let meta = SqliteEngine::open(&path).unwrap();
    assert_eq!(
        schema::version(&meta.writer.lock()).unwrap(),
        schema::MIGRATIONS.len() as i64
    );
    assert_eq!(meta.volume().unwrap(), None);
    drop(meta);

    // An older database gets the missing migrations on open.
    let mut conn = rusqlite::Connection::open(&path).unwrap();
    let mut newer = schema::MIGRATIONS.to_vec();
    newer.push("CREATE TABLE later_feature (id BIGINT PRIMARY KEY)");
    schema::migrate(&mut conn, &newer).unwrap();
    assert_eq!(schema::version(&conn).unwrap(), newer.len() as i64);
    conn.execute("INSERT INTO later_feature (id) VALUES (1)", [])
        .unwrap();
    drop(conn);

    // This binary knows fewer migrations than the database has.
    let err = SqliteEngine::open(&path)
        .err()
        .expect("newer schema must be refused");
    assert!(err.to_string().contains("newer than this binary"), "{err}");
}

#[test]
fn open_by_url() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/a/b/volume.db", dir.path().display());
    let meta = crate::open(&url).unwrap();
    meta.format(&volume("v")).unwrap();
    assert!(dir.path().join("a/b/volume.db").exists());
    assert!(matches!(
        crate::open("sqlite://relative.db"),
        Err(MetaError::UnsupportedUrl(_))
    ));
    assert!(matches!(
        crate::open("postgres://db/x"),
        Err(MetaError::UnsupportedUrl(_))
    ));
    let blocked = dir.path().join("file");
    std::fs::write(&blocked, b"x").unwrap();
    let err = crate::open(&format!("sqlite://{}/sub/volume.db", blocked.display()))
        .err()
        .unwrap();
    assert!(err.to_string().contains("cannot create directory"), "{err}");
}

#[test]
fn format_is_idempotent_and_refuses_another_volume() {
    let f = Fixture::new();
    assert_eq!(f.meta.format(&volume("vol")).unwrap(), volume("vol"));
    assert!(matches!(
        f.meta.format(&volume("other")),
        Err(MetaError::VolumeMismatch { .. })
    ));
    let root = f.meta.getattr(ROOT_INO).unwrap();
    assert_eq!(
        (root.kind, root.nlink, root.parent),
        (FileKind::Directory, 2, ROOT_INO)
    );
    assert_eq!(f.meta.usage().unwrap().inodes, 1);
}

#[test]
fn create_lookup_and_their_errors() {
    let f = Fixture::new();
    let dir = f.mk(ROOT_INO, "dir", FileKind::Directory);
    assert_eq!(dir.nlink, 2);
    assert_eq!(f.nlink(ROOT_INO), 3);
    let root = f.meta.getattr(ROOT_INO).unwrap();
    assert_eq!((root.mtime_ns, root.ctime_ns), (NOW, NOW));
    let file = f.mk(dir.ino, "file", FileKind::Regular);
    assert_eq!(f.meta.lookup(dir.ino, b"file").unwrap(), file);
    assert_eq!(f.meta.lookup(dir.ino, b"..").unwrap().ino, ROOT_INO);
    assert_eq!(
        f.nlink(dir.ino),
        2,
        "a file does not add a link to its directory"
    );

    assert_eq!(errno(f.meta.lookup(dir.ino, b"missing")), ENOENT);
    assert_eq!(errno(f.meta.lookup(file.ino, b"x")), ENOTDIR);
    assert_eq!(
        errno(
            f.meta
                .create_node(dir.ino, b"file", &node(FileKind::Regular), NOW)
        ),
        EEXIST
    );
    assert_eq!(
        errno(
            f.meta
                .create_node(file.ino, b"x", &node(FileKind::Regular), NOW)
        ),
        ENOTDIR
    );
    assert_eq!(
        errno(f.meta.create_node(999, b"x", &node(FileKind::Regular), NOW)),
        ENOENT
    );
    let long = vec![b'n'; 256];
    assert_eq!(
        errno(
            f.meta
                .create_node(dir.ino, &long, &node(FileKind::Regular), NOW)
        ),
        ENAMETOOLONG
    );
    assert_eq!(errno(f.meta.lookup(dir.ino, &long)), ENAMETOOLONG);
    assert!(f
        .meta
        .create_node(dir.ino, &long[..255], &node(FileKind::Regular), NOW)
        .is_ok());

    let link = f.mk(ROOT_INO, "sym", FileKind::Symlink);
    assert_eq!(
        (link.size, f.meta.readlink(link.ino).unwrap()),
        (6, b"target".to_vec())
    );
    assert_eq!(errno(f.meta.readlink(file.ino)), EINVAL);
    assert_eq!(f.meta.usage().unwrap().inodes, 5);
}

#[test]
fn setattr_changes_mode_owner_and_times() {
    let f = Fixture::new();
    let file = f.mk(ROOT_INO, "f", FileKind::Regular);
    let changes = SetAttr {
        perm: Some(0o104755),
        uid: Some(7),
        atime: Some(TimeSet::At(5)),
        mtime: Some(TimeSet::Now),
        ..SetAttr::default()
    };
    let attr = f.meta.setattr(file.ino, &changes, 2_000).unwrap();
    assert_eq!((attr.perm, attr.uid, attr.gid), (0o4755, 7, 1000));
    assert_eq!(
        (attr.atime_ns, attr.mtime_ns, attr.ctime_ns),
        (5, 2_000, 2_000)
    );
    assert_eq!(f.meta.getattr(file.ino).unwrap(), attr);
    assert_eq!(errno(f.meta.setattr(999, &changes, 1)), ENOENT);
}

#[test]
fn unlink_rmdir_and_link_rules() {
    let f = Fixture::new();
    let dir = f.mk(ROOT_INO, "dir", FileKind::Directory);
    let file = f.mk(dir.ino, "file", FileKind::Regular);
    assert_eq!(errno(f.unlink(ROOT_INO, "dir", false)), EISDIR);
    assert_eq!(errno(f.unlink(ROOT_INO, "missing", false)), ENOENT);
    assert_eq!(errno(f.meta.rmdir(ROOT_INO, b"dir", NOW)), ENOTEMPTY);
    assert_eq!(errno(f.meta.rmdir(dir.ino, b"file", NOW)), ENOTDIR);
    assert_eq!(
        errno(f.meta.link(dir.ino, ROOT_INO, b"dirlink", NOW)),
        EPERM
    );
    assert_eq!(errno(f.meta.link(file.ino, dir.ino, b"file", NOW)), EEXIST);

    let linked = f.meta.link(file.ino, ROOT_INO, b"hard", NOW + 3).unwrap();
    assert_eq!((linked.nlink, linked.ctime_ns), (2, NOW + 3));
    assert_eq!(
        f.unlink(dir.ino, "file", false).unwrap(),
        None,
        "another link remains"
    );
    assert_eq!(f.nlink(file.ino), 1);
    assert_eq!(f.unlink(ROOT_INO, "hard", false).unwrap(), Some(file.ino));
    assert_eq!(errno(f.meta.getattr(file.ino)), ENOENT);

    assert_eq!(f.meta.rmdir(ROOT_INO, b"dir", NOW).unwrap(), dir.ino);
    assert_eq!(f.nlink(ROOT_INO), 2);
    assert_eq!(errno(f.meta.getattr(dir.ino)), ENOENT);
    assert_eq!(f.meta.usage().unwrap().inodes, 1);
    assert!(f.meta.check(false).unwrap().is_empty());
}

#[test]
fn rename_moves_and_replaces() {
    let f = Fixture::new();
    let a = f.mk(ROOT_INO, "a", FileKind::Directory);
    let b = f.mk(ROOT_INO, "b", FileKind::Directory);
    let sub = f.mk(a.ino, "sub", FileKind::Directory);
    let file = f.mk(a.ino, "file", FileKind::Regular);

    // A directory moves with its link counts.
    let outcome = f
        .rename((a.ino, "sub"), (b.ino, "sub2"), RenameMode::Replace)
        .unwrap();
    assert_eq!((outcome.moved, outcome.replaced), (sub.ino, None));
    assert_eq!((f.nlink(a.ino), f.nlink(b.ino)), (2, 3));
    let moved = f.meta.lookup(b.ino, b"sub2").unwrap();
    assert_eq!((moved.parent, moved.ctime_ns), (b.ino, NOW + 5));
    assert_eq!(f.meta.getattr(a.ino).unwrap().mtime_ns, NOW + 5);
    assert_eq!(errno(f.meta.lookup(a.ino, b"sub")), ENOENT);

    // Replacing a file frees it.
    let victim = f.mk(b.ino, "victim", FileKind::Regular);
    let outcome = f
        .rename((a.ino, "file"), (b.ino, "victim"), RenameMode::Replace)
        .unwrap();
    assert_eq!(outcome.replaced, Some(victim.ino));
    assert_eq!(errno(f.meta.getattr(victim.ino)), ENOENT);
    assert_eq!(f.meta.lookup(b.ino, b"victim").unwrap().ino, file.ino);

    // Errors.
    f.mk(b.ino, "other", FileKind::Regular);
    assert_eq!(
        errno(f.rename((b.ino, "victim"), (b.ino, "other"), RenameMode::NoReplace)),
        EEXIST
    );
    assert_eq!(
        errno(f.rename((b.ino, "victim"), (b.ino, "nothing"), RenameMode::Exchange)),
        ENOENT
    );
    assert_eq!(
        errno(f.rename((b.ino, "missing"), (b.ino, "x"), RenameMode::Replace)),
        ENOENT
    );
    assert_eq!(
        errno(f.rename((b.ino, "sub2"), (b.ino, "other"), RenameMode::Replace)),
        ENOTDIR
    );
    assert_eq!(
        errno(f.rename((b.ino, "other"), (b.ino, "sub2"), RenameMode::Replace)),
        EISDIR
    );
    f.mk(moved.ino, "inside", FileKind::Regular);
    let empty = f.mk(ROOT_INO, "empty", FileKind::Directory);
    assert_eq!(
        errno(f.rename((ROOT_INO, "empty"), (b.ino, "sub2"), RenameMode::Replace)),
        ENOTEMPTY
    );
    assert_eq!(
        errno(f.rename((b.ino, "other"), (file.ino, "x"), RenameMode::Replace)),
        ENOTDIR
    );

    // A directory over an empty directory replaces it.
    let outcome = f
        .rename((b.ino, "sub2"), (ROOT_INO, "empty"), RenameMode::Replace)
        .unwrap();
    assert_eq!(outcome.replaced, Some(empty.ino));
    assert_eq!(errno(f.meta.getattr(empty.ino)), ENOENT);
    assert_eq!((f.nlink(ROOT_INO), f.nlink(b.ino)), (5, 2));
    assert!(
        f.meta.check(false).unwrap().is_empty(),
        "{:?}",
        f.meta.check(false)
    );
}

#[test]
fn rename_refuses_moving_a_directory_into_its_own_subtree() {
    let f = Fixture::new();
    let a = f.mk(ROOT_INO, "a", FileKind::Directory);
    let b = f.mk(a.ino, "b", FileKind::Directory);
    let c = f.mk(b.ino, "c", FileKind::Directory);
    assert_eq!(
        errno(f.rename((ROOT_INO, "a"), (c.ino, "a"), RenameMode::Replace)),
        EINVAL
    );
    assert_eq!(
        errno(f.rename((ROOT_INO, "a"), (a.ino, "self"), RenameMode::Replace)),
        EINVAL
    );
    assert_eq!(
        errno(f.rename((a.ino, "b"), (ROOT_INO, "a"), RenameMode::Exchange)),
        EINVAL
    );
    // Moving up is fine.
    f.rename((b.ino, "c"), (ROOT_INO, "c"), RenameMode::Replace)
        .unwrap();
    assert_eq!((f.nlink(ROOT_INO), f.nlink(b.ino)), (4, 2));
    assert!(f.meta.check(false).unwrap().is_empty());
}

#[test]
fn rename_exchange_swaps_entries_and_link_counts() {
    let f = Fixture::new();
    let a = f.mk(ROOT_INO, "a", FileKind::Directory);
    let b = f.mk(ROOT_INO, "b", FileKind::Directory);
    let dir = f.mk(a.ino, "x", FileKind::Directory);
    let file = f.mk(b.ino, "y", FileKind::Regular);
    let outcome = f
        .rename((a.ino, "x"), (b.ino, "y"), RenameMode::Exchange)
        .unwrap();
    assert_eq!((outcome.moved, outcome.replaced), (dir.ino, Some(file.ino)));
    assert_eq!(f.meta.lookup(a.ino, b"x").unwrap().ino, file.ino);
    let dir_now = f.meta.lookup(b.ino, b"y").unwrap();
    assert_eq!((dir_now.ino, dir_now.parent), (dir.ino, b.ino));
    assert_eq!((f.nlink(a.ino), f.nlink(b.ino)), (2, 3));
    assert_eq!(
        f.meta.readdir(a.ino, 0, 10, false).unwrap()[0].kind,
        FileKind::Regular
    );
    assert!(f.meta.check(false).unwrap().is_empty());
}

#[test]
fn rename_between_hard_links_of_one_inode_does_nothing() {
    let f = Fixture::new();
    let file = f.mk(ROOT_INO, "one", FileKind::Regular);
    f.meta.link(file.ino, ROOT_INO, b"two", NOW).unwrap();
    let outcome = f
        .rename((ROOT_INO, "one"), (ROOT_INO, "two"), RenameMode::Replace)
        .unwrap();
    assert_eq!((outcome.moved, outcome.replaced), (file.ino, None));
    assert_eq!(f.names(ROOT_INO), ["one", "two"]);
    assert_eq!(f.nlink(file.ino), 2);
    // Renaming a name onto itself is also a no-op.
    f.rename((ROOT_INO, "one"), (ROOT_INO, "one"), RenameMode::Replace)
        .unwrap();
    assert_eq!(f.names(ROOT_INO), ["one", "two"]);
}

#[test]
fn readdir_cookies_stay_stable_while_the_directory_changes() {
    let f = Fixture::new();
    for name in ["a", "b", "c"] {
        f.mk(ROOT_INO, name, FileKind::Regular);
    }
    let first = f.meta.readdir(ROOT_INO, 0, 2, true).unwrap();
    assert_eq!(first.len(), 2);
    assert!(first[0].cookie > 2 && first[1].cookie > first[0].cookie);
    assert_eq!(first[0].attr.as_ref().unwrap().ino, first[0].ino);
    // The entry already returned goes away, a new one arrives: continuing yields c then d.
    f.unlink(ROOT_INO, "a", false).unwrap();
    f.mk(ROOT_INO, "d", FileKind::Regular);
    f.rename((ROOT_INO, "c"), (ROOT_INO, "c2"), RenameMode::Replace)
        .unwrap();
    let rest = f
        .meta
        .readdir(ROOT_INO, first[1].cookie, 10, false)
        .unwrap();
    let names: Vec<&[u8]> = rest.iter().map(|entry| entry.name.as_slice()).collect();
    assert_eq!(names, [b"c2".as_slice(), b"d"]);
    assert!(rest[0].attr.is_none());
    // Offsets 0..=2 all mean "from the start".
    assert_eq!(f.meta.readdir(ROOT_INO, 2, 10, false).unwrap().len(), 3);
    assert_eq!(
        f.meta.readdir(ROOT_INO, rest[1].cookie, 10, false).unwrap(),
        vec![]
    );
    let file = f.meta.lookup(ROOT_INO, b"d").unwrap();
    assert_eq!(errno(f.meta.readdir(file.ino, 0, 10, false)), ENOTDIR);
}

#[test]
fn unlinked_open_files_are_sustained_until_released() {
    let f = Fixture::new();
    let file = f.mk(ROOT_INO, "open", FileKind::Regular);
    let id = f.meta.alloc_slice_ids(1).unwrap();
    f.meta
        .commit_slices(file.ino, &[(0, slice(id, 100, 0))], 100, true, NOW)
        .unwrap();
    assert_eq!(f.unlink(ROOT_INO, "open", true).unwrap(), Some(file.ino));
    assert_eq!(f.nlink(file.ino), 0);
    assert_eq!(
        f.meta.read_chunk(file.ino, 0).unwrap().len(),
        1,
        "data stays readable"
    );
    assert!(
        f.meta.check(false).unwrap().is_empty(),
        "a sustained inode is no orphan"
    );
    f.meta.release_sustained(f.session, file.ino).unwrap();
    assert_eq!(errno(f.meta.getattr(file.ino)), ENOENT);
    assert_eq!(
        f.meta.garbage_slices(i64::MAX, 10).unwrap(),
        vec![GarbageSlice { id, size: 100 }]
    );

    // Closing the session frees what it sustained; so does reaping a stale session.
    let other = f.mk(ROOT_INO, "other", FileKind::Regular);
    f.unlink(ROOT_INO, "other", true).unwrap();
    f.meta.close_session(f.session).unwrap();
    assert_eq!(errno(f.meta.getattr(other.ino)), ENOENT);

    let stale = open_session(&f.meta, 10);
    let fresh = open_session(&f.meta, 500);
    let third = f.mk(ROOT_INO, "third", FileKind::Regular);
    f.meta
        .unlink(ROOT_INO, b"third", stale, &|_| true, NOW)
        .unwrap();
    // A session never reaps itself, however late its heartbeat.
    assert_eq!(
        f.meta.reap_stale_sessions(600, 200, Some(stale)).unwrap(),
        0
    );
    assert_eq!(
        f.meta.reap_stale_sessions(600, 200, Some(fresh)).unwrap(),
        1
    );
    assert_eq!(errno(f.meta.getattr(third.ino)), ENOENT);
    assert_eq!(errno(f.meta.heartbeat(stale)), ESTALE);
    f.meta.heartbeat(fresh).unwrap();
    assert_eq!(f.meta.usage().unwrap().inodes, 1);
}

#[test]
fn commit_read_truncate_and_garbage() {
    let f = Fixture::new();
    let file = f.mk(ROOT_INO, "big", FileKind::Regular);
    let first = f.meta.alloc_slice_ids(3).unwrap();
    assert!(first >= 1);
    assert_eq!(f.meta.alloc_slice_ids(1).unwrap(), first + 3);
    let (s1, s2, s3) = (
        slice(first, 1000, 0),
        slice(first + 1, 500, 200),
        slice(first + 2, 4096, 0),
    );
    let attr = f
        .meta
        .commit_slices(file.ino, &[(0, s1), (0, s2)], 1000, true, NOW + 7)
        .unwrap();
    assert_eq!(
        (attr.size, attr.mtime_ns, attr.ctime_ns),
        (1000, NOW + 7, NOW + 7)
    );
    assert_eq!(f.meta.read_inline(file.ino).unwrap(), None);
    let attr = f
        .meta
        .commit_slices(file.ino, &[(2, s3)], 2 * CHUNK + 4096, false, NOW)
        .unwrap();
    assert_eq!(attr.size, 2 * CHUNK + 4096);
    assert_eq!(f.meta.read_chunk(file.ino, 0).unwrap(), vec![s1, s2]);
    assert_eq!(f.meta.read_chunk(file.ino, 1).unwrap(), vec![]);
    assert_eq!(f.meta.usage().unwrap().bytes, 2 * CHUNK + 4096);
    // A smaller min_size never shrinks the file.
    assert_eq!(
        f.meta
            .commit_slices(file.ino, &[], 10, false, NOW)
            .unwrap()
            .size,
        2 * CHUNK + 4096
    );
    assert_eq!(
        errno(
            f.meta
                .commit_slices(file.ino, &[(0, slice(9, 10, CHUNK as u32))], 0, false, NOW)
        ),
        EINVAL
    );

    // Shrinking frees chunk 2 and shadows the tail of chunk 0.
    let attr = f.meta.truncate(file.ino, 600, NOW + 9).unwrap();
    assert_eq!((attr.size, attr.mtime_ns), (600, NOW + 9));
    assert_eq!(f.meta.read_chunk(file.ino, 2).unwrap(), vec![]);
    let hole = Slice {
        id: 0,
        size: 0,
        off: 0,
        len: (CHUNK - 600) as u32,
        pos: 600,
    };
    assert_eq!(f.meta.read_chunk(file.ino, 0).unwrap(), vec![s1, s2, hole]);
    let garbage = f.meta.garbage_slices(i64::MAX, 10).unwrap();
    assert_eq!(
        garbage,
        vec![GarbageSlice {
            id: s3.id,
            size: 4096
        }]
    );
    assert_eq!(
        f.meta.garbage_slices(0, 10).unwrap(),
        vec![],
        "garbage is newer than the cutoff"
    );
    assert_eq!(f.meta.usage().unwrap().bytes, 600);
    assert_eq!(
        f.meta.live_slices().unwrap(),
        vec![(s1.id, 1000), (s2.id, 500)]
    );

    // Growing only sets the size.
    assert_eq!(
        f.meta.truncate(file.ino, 5 * CHUNK, NOW).unwrap().size,
        5 * CHUNK
    );
    assert_eq!(f.meta.read_chunk(file.ino, 0).unwrap().len(), 3);

    // Compaction: compare-and-swap on the exact slice list.
    assert_eq!(
        f.meta.fragmented_chunks(3, 10).unwrap(),
        vec![(file.ino, 0)]
    );
    assert_eq!(f.meta.fragmented_chunks(4, 10).unwrap(), vec![]);
    let merged = slice(f.meta.alloc_slice_ids(1).unwrap(), 600, 0);
    assert!(!f
        .meta
        .replace_chunk(file.ino, 0, &[s1, s2], &[merged])
        .unwrap());
    assert!(f
        .meta
        .replace_chunk(file.ino, 0, &[s1, s2, hole], &[merged])
        .unwrap());
    assert_eq!(f.meta.read_chunk(file.ino, 0).unwrap(), vec![merged]);
    let mut ids: Vec<u64> = f
        .meta
        .garbage_slices(i64::MAX, 10)
        .unwrap()
        .iter()
        .map(|g| g.id)
        .collect();
    ids.sort();
    assert_eq!(ids, vec![s1.id, s2.id, s3.id]);
    f.meta.forget_garbage(&ids).unwrap();
    assert_eq!(f.meta.garbage_slices(i64::MAX, 10).unwrap(), vec![]);
    let failed_upload = f.meta.alloc_slice_ids(1).unwrap();
    f.meta
        .add_garbage(
            &[GarbageSlice {
                id: failed_upload,
                size: 5,
            }],
            NOW,
        )
        .unwrap();
    assert_eq!(
        f.meta.garbage_slices(NOW + 1, 10).unwrap(),
        vec![GarbageSlice {
            id: failed_upload,
            size: 5
        }]
    );

    // Deleting the file turns its slices into garbage; truncating to 0 makes a file inline again.
    let other = f.mk(ROOT_INO, "other", FileKind::Regular);
    let last = f.meta.alloc_slice_ids(1).unwrap();
    f.meta
        .commit_slices(other.ino, &[(0, slice(last, 10, 0))], 10, false, NOW)
        .unwrap();
    f.meta.truncate(other.ino, 0, NOW).unwrap();
    assert_eq!(f.meta.read_inline(other.ino).unwrap(), Some(vec![]));
    f.unlink(ROOT_INO, "big", false).unwrap();
    let mut ids: Vec<u64> = f
        .meta
        .garbage_slices(i64::MAX, 10)
        .unwrap()
        .iter()
        .map(|g| g.id)
        .collect();
    ids.sort();
    let mut expected = vec![failed_upload, last, merged.id];
    expected.sort();
    assert_eq!(ids, expected);
    assert_eq!(f.meta.usage().unwrap().bytes, 0);
    assert!(f.meta.check(false).unwrap().is_empty());
}

#[test]
fn committing_a_pending_upload_removes_its_garbage_row() {
    let f = Fixture::new();
    let file = f.mk(ROOT_INO, "f", FileKind::Regular);
    let first = f.meta.alloc_slice_ids(3).unwrap();
    let (committed, compacted, crashed) = (first, first + 1, first + 2);
    let pending_until = NOW + 1_000;
    let pending: Vec<GarbageSlice> = (first..first + 3)
        .map(|id| GarbageSlice { id, size: 10 })
        .collect();
    f.meta.add_garbage(&pending, pending_until).unwrap();
    assert_eq!(
        f.meta.garbage_slices(NOW, 10).unwrap(),
        vec![],
        "not due yet"
    );

    f.meta
        .commit_slices(file.ino, &[(0, slice(committed, 10, 0))], 10, false, NOW)
        .unwrap();
    let listed = |before| -> Vec<u64> {
        let mut ids: Vec<u64> = f
            .meta
            .garbage_slices(before, 10)
            .unwrap()
            .iter()
            .map(|g| g.id)
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(listed(i64::MAX), vec![compacted, crashed]);

    // Compaction commits its slice through replace_chunk: its row goes too, the replaced one
    // becomes garbage (dated by the engine's clock).
    assert!(f
        .meta
        .replace_chunk(
            file.ino,
            0,
            &[slice(committed, 10, 0)],
            &[slice(compacted, 10, 0)]
        )
        .unwrap());
    assert_eq!(listed(i64::MAX), vec![committed, crashed]);

    // A failed commit re-dates its pending row to now.
    f.meta
        .add_garbage(
            &[GarbageSlice {
                id: crashed,
                size: 10,
            }],
            NOW,
        )
        .unwrap();
    assert_eq!(listed(NOW + 1), vec![crashed]);
}

#[test]
fn inline_files() {
    let f = Fixture::new();
    let file = f.mk(ROOT_INO, "small", FileKind::Regular);
    assert_eq!(f.meta.read_inline(file.ino).unwrap(), Some(vec![]));
    let attr = f
        .meta
        .write_inline(file.ino, b"hello world", NOW + 1)
        .unwrap();
    assert_eq!((attr.size, attr.mtime_ns), (11, NOW + 1));
    assert_eq!(f.meta.usage().unwrap().bytes, 11);
    assert_eq!(
        errno(
            f.meta
                .write_inline(file.ino, &[0; INLINE as usize + 1], NOW)
        ),
        EINVAL
    );
    let dir = f.mk(ROOT_INO, "d", FileKind::Directory);
    assert_eq!(errno(f.meta.write_inline(dir.ino, b"x", NOW)), EISDIR);

    f.meta.truncate(file.ino, 5, NOW).unwrap();
    assert_eq!(
        f.meta.read_inline(file.ino).unwrap(),
        Some(b"hello".to_vec())
    );
    f.meta.truncate(file.ino, 8, NOW).unwrap();
    assert_eq!(
        f.meta.read_inline(file.ino).unwrap(),
        Some(b"hello\0\0\0".to_vec())
    );
    // Past the threshold the blob stays as is; the bytes beyond it read as zeros.
    assert_eq!(f.meta.truncate(file.ino, 1000, NOW).unwrap().size, 1000);
    assert_eq!(
        f.meta.read_inline(file.ino).unwrap(),
        Some(b"hello\0\0\0".to_vec())
    );
    assert_eq!(f.meta.truncate(file.ino, 3, NOW).unwrap().size, 3);
    assert_eq!(f.meta.read_inline(file.ino).unwrap(), Some(b"hel".to_vec()));

    // Committing slices must say the inline bytes were written out.
    let s = slice(f.meta.alloc_slice_ids(1).unwrap(), 100, 0);
    assert!(matches!(
        f.meta.commit_slices(file.ino, &[(0, s)], 100, false, NOW),
        Err(MetaError::Engine(_))
    ));
    assert_eq!(
        f.meta
            .commit_slices(file.ino, &[(0, s)], 100, true, NOW)
            .unwrap()
            .size,
        100
    );
    assert_eq!(f.meta.read_inline(file.ino).unwrap(), None);

    // Writing inline again frees the chunks.
    f.meta.write_inline(file.ino, b"again", NOW).unwrap();
    assert_eq!(f.meta.read_chunk(file.ino, 0).unwrap(), vec![]);
    assert_eq!(
        f.meta.garbage_slices(i64::MAX, 10).unwrap(),
        vec![GarbageSlice {
            id: s.id,
            size: 100
        }]
    );
    assert_eq!(f.meta.usage().unwrap().bytes, 5);
}

#[test]
fn xattrs() {
    let f = Fixture::new();
    let file = f.mk(ROOT_INO, "f", FileKind::Regular);
    assert_eq!(errno(f.meta.get_xattr(file.ino, b"user.a")), ENODATA);
    assert_eq!(
        errno(
            f.meta
                .set_xattr(file.ino, b"user.a", b"1", XattrMode::Replace, NOW)
        ),
        ENODATA
    );
    f.meta
        .set_xattr(file.ino, b"user.a", b"1", XattrMode::Create, NOW + 4)
        .unwrap();
    assert_eq!(f.meta.getattr(file.ino).unwrap().ctime_ns, NOW + 4);
    assert_eq!(
        errno(
            f.meta
                .set_xattr(file.ino, b"user.a", b"2", XattrMode::Create, NOW)
        ),
        EEXIST
    );
    f.meta
        .set_xattr(file.ino, b"user.a", b"2", XattrMode::Replace, NOW)
        .unwrap();
    f.meta
        .set_xattr(file.ino, b"user.b", b"", XattrMode::Any, NOW)
        .unwrap();
    assert_eq!(f.meta.get_xattr(file.ino, b"user.a").unwrap(), b"2");
    assert_eq!(
        f.meta.list_xattr(file.ino).unwrap(),
        vec![b"user.a".to_vec(), b"user.b".to_vec()]
    );
    f.meta.remove_xattr(file.ino, b"user.a", NOW).unwrap();
    assert_eq!(
        errno(f.meta.remove_xattr(file.ino, b"user.a", NOW)),
        ENODATA
    );
    assert_eq!(errno(f.meta.list_xattr(999)), ENOENT);
}

#[test]
fn flock_conflicts_and_conversion() {
    let f = Fixture::new();
    let file = f.mk(ROOT_INO, "f", FileKind::Regular);
    let other_session = open_session(&f.meta, NOW);
    let a = LockOwner {
        session: f.session,
        owner: u64::MAX - 1,
    };
    let b = LockOwner {
        session: other_session,
        owner: 1,
    };
    assert!(f.meta.flock(file.ino, a, LockKind::Read).unwrap());
    assert!(
        f.meta.flock(file.ino, b, LockKind::Read).unwrap(),
        "shared locks coexist"
    );
    assert!(
        !f.meta.flock(file.ino, a, LockKind::Write).unwrap(),
        "upgrade blocked by the other reader"
    );
    assert!(f.meta.flock(file.ino, b, LockKind::Unlock).unwrap());
    assert!(
        f.meta.flock(file.ino, a, LockKind::Write).unwrap(),
        "conversion to exclusive"
    );
    assert!(!f.meta.flock(file.ino, b, LockKind::Read).unwrap());
    assert!(
        f.meta.flock(file.ino, a, LockKind::Read).unwrap(),
        "downgrade"
    );
    assert!(f.meta.flock(file.ino, b, LockKind::Read).unwrap());
    f.meta.unlock_all(file.ino, b).unwrap();
    f.meta.close_session(f.session).unwrap();
    assert!(
        f.meta.flock(file.ino, b, LockKind::Write).unwrap(),
        "locks of a closed session are gone"
    );
}

#[test]
fn posix_locks_split_merge_and_conflict() {
    let f = Fixture::new();
    let file = f.mk(ROOT_INO, "f", FileKind::Regular);
    let a = LockOwner {
        session: f.session,
        owner: 10,
    };
    let b = LockOwner {
        session: f.session,
        owner: 11,
    };
    let range = |start, end, kind, pid| LockRange {
        start,
        end,
        kind,
        pid,
    };
    assert!(f
        .meta
        .setlk(file.ino, a, &range(0, u64::MAX, LockKind::Write, 100))
        .unwrap());
    assert!(f
        .meta
        .setlk(file.ino, a, &range(100, 199, LockKind::Unlock, 100))
        .unwrap());
    // b may take exactly the hole a left.
    assert_eq!(
        f.meta
            .getlk(file.ino, b, &range(100, 199, LockKind::Write, 200))
            .unwrap(),
        None
    );
    let conflict = f
        .meta
        .getlk(file.ino, b, &range(150, 250, LockKind::Read, 200))
        .unwrap();
    assert_eq!(conflict, Some(range(200, u64::MAX, LockKind::Write, 100)));
    assert!(!f
        .meta
        .setlk(file.ino, b, &range(150, 250, LockKind::Read, 200))
        .unwrap());
    assert!(f
        .meta
        .setlk(file.ino, b, &range(100, 199, LockKind::Read, 200))
        .unwrap());
    // a's own locks never conflict with a.
    assert_eq!(
        f.meta
            .getlk(file.ino, a, &range(0, 99, LockKind::Write, 100))
            .unwrap(),
        None
    );
    assert_eq!(
        f.meta
            .getlk(file.ino, a, &range(0, 150, LockKind::Write, 100))
            .unwrap(),
        Some(range(100, 199, LockKind::Read, 200))
    );
    // Read locks share.
    assert!(!f
        .meta
        .setlk(file.ino, a, &range(100, 100, LockKind::Write, 100))
        .unwrap());
    assert!(f
        .meta
        .setlk(file.ino, a, &range(0, u64::MAX, LockKind::Unlock, 100))
        .unwrap());
    assert!(f
        .meta
        .setlk(file.ino, a, &range(150, 300, LockKind::Read, 100))
        .unwrap());
    assert_eq!(
        errno(f.meta.setlk(file.ino, a, &range(5, 4, LockKind::Read, 1))),
        EINVAL
    );
    f.meta.unlock_all(file.ino, b).unwrap();
    assert!(f
        .meta
        .setlk(file.ino, a, &range(0, 1000, LockKind::Write, 100))
        .unwrap());
    // Reaping the session drops its locks.
    let c = LockOwner {
        session: open_session(&f.meta, i64::MAX),
        owner: 10,
    };
    assert!(!f
        .meta
        .setlk(file.ino, c, &range(0, 0, LockKind::Read, 1))
        .unwrap());
    assert_eq!(f.meta.reap_stale_sessions(NOW + 100, 50, None).unwrap(), 1);
    assert!(f
        .meta
        .setlk(file.ino, c, &range(0, 0, LockKind::Read, 1))
        .unwrap());
}

#[test]
fn two_engines_on_one_file_see_each_others_commits() {
    let f = Fixture::new();
    let second = f.reopen();
    assert_eq!(second.volume().unwrap(), Some(volume("vol")));
    let file = f.mk(ROOT_INO, "from-first", FileKind::Regular);
    f.meta.write_inline(file.ino, b"data", NOW).unwrap();
    assert_eq!(
        second
            .read_inline(second.lookup(ROOT_INO, b"from-first").unwrap().ino)
            .unwrap(),
        Some(b"data".to_vec())
    );
    let other = second
        .create_node(ROOT_INO, b"from-second", &node(FileKind::Directory), NOW)
        .unwrap();
    assert_eq!(f.meta.lookup(ROOT_INO, b"from-second").unwrap(), other);

    // Concurrent writers in two "processes" queue instead of failing with SQLITE_BUSY.
    std::thread::scope(|scope| {
        for (engine, prefix) in [(&f.meta, "x"), (&second, "y")] {
            scope.spawn(move || {
                for i in 0..200 {
                    engine
                        .create_node(
                            other.ino,
                            format!("{prefix}{i}").as_bytes(),
                            &node(FileKind::Regular),
                            NOW,
                        )
                        .unwrap();
                }
            });
        }
    });
    assert_eq!(
        f.meta.readdir(other.ino, 0, 1000, false).unwrap().len(),
        400
    );
    assert_eq!(second.usage().unwrap().inodes, 403);
    assert!(f.meta.check(false).unwrap().is_empty());
}

#[test]
fn check_finds_and_repairs_damage() {
    let f = Fixture::new();
    let dir = f.mk(ROOT_INO, "dir", FileKind::Directory);
    let file = f.mk(dir.ino, "file", FileKind::Regular);
    let orphan = f.mk(ROOT_INO, "orphan", FileKind::Regular);
    f.meta.write_inline(file.ino, b"abc", NOW).unwrap();
    assert_eq!(f.meta.check(false).unwrap(), Vec::<String>::new());

    let raw = f.raw();
    raw.execute("UPDATE inodes SET nlink = 7 WHERE ino = ?1", [dir.ino])
        .unwrap();
    raw.execute("DELETE FROM dentries WHERE ino = ?1", [orphan.ino])
        .unwrap();
    raw.execute(
        "UPDATE counters SET value = 99 WHERE name = 'used_bytes'",
        [],
    )
    .unwrap();
    let problems = f.meta.check(false).unwrap();
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert_eq!(
        f.meta.check(false).unwrap(),
        problems,
        "checking alone repairs nothing"
    );

    let repaired = f.meta.check(true).unwrap();
    assert!(repaired.len() >= 3, "{repaired:?}");
    assert_eq!(f.meta.check(false).unwrap(), Vec::<String>::new());
    assert_eq!(f.nlink(dir.ino), 2);
    assert_eq!(errno(f.meta.getattr(orphan.ino)), ENOENT);
    assert_eq!(f.meta.usage().unwrap().bytes, 3);
    assert_eq!(f.meta.usage().unwrap().inodes, 3);
}
