use libc::{
    EEXIST, EINVAL, EISDIR, ENAMETOOLONG, ENODATA, ENOENT, ENOTDIR, ENOTEMPTY, EPERM, ESTALE,
};
use tempfile::TempDir;

use cellar_sql::wall_clock_ns;

use super::{schema, SqlEngine};
use crate::testing::{fresh_meta_url, Engine};
use crate::{
    Attr, Committed, Content, FileKind, GarbageSlice, Ino, Layout, LockKind, LockOwner, LockRange,
    MetaEngine, MetaError, NewNode, Rename, RenameMode, SessionId, SessionInfo, SetAttr, Slice,
    SliceReferences, TimeSet, VolumeInfo, XattrMode, ROOT_INO,
};

const CHUNK: u64 = 1 << 20;
const INLINE: u64 = 64;
/// Caller timestamps (mtime, ctime, ...). Sessions opened at `NOW` are ancient by the engine's
/// clock (the wall clock), so they count as stale.
const NOW: i64 = 1_000;
/// Heartbeat age past which a session is stale, in the tests.
const MAX_AGE: i64 = 60_000_000_000;
/// `since` of pending-upload garbage rows: far in the future, as a writer records them.
const PENDING_UNTIL: i64 = 1 << 62;

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

/// Opens the engine of a URL of [`fresh_meta_url`].
fn open_engine(url: &str) -> SqlEngine {
    match url.strip_prefix("sqlite://") {
        Some(path) => SqlEngine::open_sqlite(std::path::Path::new(path)).unwrap(),
        None => SqlEngine::open_postgres(&cellar_sql::PgUrl::parse(url).unwrap()).unwrap(),
    }
}

/// A formatted volume of its own on `engine`, with a session.
struct Fixture {
    _dir: TempDir,
    url: String,
    meta: SqlEngine,
    session: SessionId,
}

impl Fixture {
    fn new(engine: Engine) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let url = fresh_meta_url(engine, dir.path());
        let meta = open_engine(&url);
        meta.format(&volume("vol")).unwrap();
        let session = open_session(&meta, NOW);
        Fixture {
            _dir: dir,
            url,
            meta,
            session,
        }
    }

    /// A second engine on the same volume, as another process (or host) would open it.
    fn reopen(&self) -> SqlEngine {
        open_engine(&self.url)
    }

    fn mk(&self, parent: Ino, name: &str, kind: FileKind) -> Attr {
        self.meta
            .create_node(parent, name.as_bytes(), &node(kind), NOW)
            .unwrap()
    }

    fn unlink(&self, parent: Ino, name: &str) -> crate::Result<Option<Ino>> {
        self.meta.unlink(parent, name.as_bytes(), NOW + 1)
    }

    /// Records `slices` as pending uploads, as a writer does before uploading them.
    fn pending(&self, slices: &[Slice]) {
        let rows: Vec<GarbageSlice> = slices
            .iter()
            .map(|slice| GarbageSlice {
                id: slice.id,
                size: slice.size,
            })
            .collect();
        self.meta.add_garbage(&rows, PENDING_UNTIL).unwrap();
    }

    /// A new slice of `len` bytes at `pos`, recorded as a pending upload.
    fn upload(&self, len: u32, pos: u32) -> Slice {
        let s = slice(self.meta.alloc_slice_ids(1).unwrap(), len, pos);
        self.pending(&[s]);
        s
    }

    /// Ids of every garbage row (due or pending), sorted.
    fn garbage_ids(&self) -> Vec<u64> {
        self.meta.slice_references().unwrap().garbage
    }

    fn content(&self, ino: Ino, chunks: std::ops::Range<u64>) -> Option<Content> {
        self.meta.read_layout(ino, chunks, None).unwrap().content
    }

    fn inline(&self, ino: Ino) -> Option<Vec<u8>> {
        match self.content(ino, 0..0) {
            Some(Content::Inline(bytes)) => Some(bytes),
            _ => None,
        }
    }

    fn version(&self, ino: Ino) -> u64 {
        self.meta.getattr(ino).unwrap().data_version
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
        self.meta.rename(&req, NOW + 5)
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

/// A session whose last heartbeat was at `now_ns` (the engine stamps the first one with its own
/// clock; the tests set it back to make a session stale).
fn open_session(meta: &SqlEngine, now_ns: i64) -> SessionId {
    let info = SessionInfo {
        host: "host".into(),
        pid: 42,
        mount_point: "/mnt".into(),
        now_ns,
    };
    let session = meta.open_session(&info).unwrap();
    if now_ns < wall_clock_ns() - MAX_AGE {
        meta.raw(&format!(
            "UPDATE sessions SET heartbeat_ns = {now_ns} WHERE id = {session}"
        ))
        .unwrap();
    }
    session
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

fn is_conflict<T: std::fmt::Debug>(result: crate::Result<T>) -> bool {
    match result {
        Err(MetaError::Conflict(_)) => true,
        other => panic!("expected a conflict, got {other:?}"),
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

fn migrations_apply_from_empty_and_refuse_newer_databases(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_meta_url(engine, &dir.path().join("nested/deeper"));
    let meta = open_engine(&url);
    let dialect = meta.db.dialect();
    let known = schema::MIGRATIONS.for_dialect(dialect);
    assert_eq!(meta.schema_version().unwrap(), known.len() as i64);
    assert_eq!(meta.volume().unwrap(), None);

    // An older database gets the missing migrations on open.
    let mut newer = known.to_vec();
    newer.push("CREATE TABLE later_feature (id BIGINT PRIMARY KEY)");
    let migrations = cellar_sql::Migrations {
        sqlite: &newer,
        postgres: &newer,
    };
    meta.db.migrate(&migrations).unwrap();
    assert_eq!(meta.schema_version().unwrap(), newer.len() as i64);
    meta.raw("INSERT INTO later_feature (id) VALUES (1)")
        .unwrap();
    drop(meta);

    // This binary knows fewer migrations than the database has.
    let err = match url.strip_prefix("sqlite://") {
        Some(path) => SqlEngine::open_sqlite(std::path::Path::new(path)),
        None => SqlEngine::open_postgres(&cellar_sql::PgUrl::parse(&url).unwrap()),
    }
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
    // A PostgreSQL URL must name its volume, by a valid id; no error shows the password.
    for url in [
        "postgres://user:s3cret@127.0.0.1:1/db",
        "postgres://user:s3cret@127.0.0.1:1/db?volume=a/b",
        "mysql://user:s3cret@127.0.0.1:1/db",
    ] {
        let err = crate::open(url).err().unwrap();
        assert!(matches!(err, MetaError::UnsupportedUrl(_)), "{err}");
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }
    let err = crate::open("postgres://user:s3cret@127.0.0.1:1/db?volume=v")
        .err()
        .unwrap();
    assert!(err.to_string().contains("user:***@127.0.0.1:1"), "{err}");
    assert!(!err.to_string().contains("s3cret"), "{err}");
    let blocked = dir.path().join("file");
    std::fs::write(&blocked, b"x").unwrap();
    let err = crate::open(&format!("sqlite://{}/sub/volume.db", blocked.display()))
        .err()
        .unwrap();
    assert!(err.to_string().contains("cannot create directory"), "{err}");
}

fn format_is_idempotent_and_refuses_another_volume(engine: Engine) {
    let f = Fixture::new(engine);
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
    assert_eq!(f.meta.usage().unwrap().inodes, 0);
}

fn create_lookup_and_their_errors(engine: Engine) {
    let f = Fixture::new(engine);
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
    assert_eq!(f.meta.usage().unwrap().inodes, 4);
}

fn setattr_changes_mode_owner_and_times(engine: Engine) {
    let f = Fixture::new(engine);
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

fn unlink_rmdir_and_link_rules(engine: Engine) {
    let f = Fixture::new(engine);
    let dir = f.mk(ROOT_INO, "dir", FileKind::Directory);
    let file = f.mk(dir.ino, "file", FileKind::Regular);
    assert_eq!(errno(f.unlink(ROOT_INO, "dir")), EISDIR);
    assert_eq!(errno(f.unlink(ROOT_INO, "missing")), ENOENT);
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
        f.unlink(dir.ino, "file").unwrap(),
        None,
        "another link remains"
    );
    assert_eq!(f.nlink(file.ino), 1);
    assert_eq!(f.unlink(ROOT_INO, "hard").unwrap(), Some(file.ino));
    assert_eq!(errno(f.meta.getattr(file.ino)), ENOENT);

    assert_eq!(f.meta.rmdir(ROOT_INO, b"dir", NOW).unwrap(), dir.ino);
    assert_eq!(f.nlink(ROOT_INO), 2);
    assert_eq!(errno(f.meta.getattr(dir.ino)), ENOENT);
    assert_eq!(f.meta.usage().unwrap().inodes, 0);
    assert!(f.meta.check(false).unwrap().is_empty());
}

fn rename_moves_and_replaces(engine: Engine) {
    let f = Fixture::new(engine);
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

fn rename_refuses_moving_a_directory_into_its_own_subtree(engine: Engine) {
    let f = Fixture::new(engine);
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

fn rename_exchange_swaps_entries_and_link_counts(engine: Engine) {
    let f = Fixture::new(engine);
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

fn rename_between_hard_links_of_one_inode_does_nothing(engine: Engine) {
    let f = Fixture::new(engine);
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

fn readdir_cookies_stay_stable_while_the_directory_changes(engine: Engine) {
    let f = Fixture::new(engine);
    for name in ["a", "b", "c"] {
        f.mk(ROOT_INO, name, FileKind::Regular);
    }
    let first = f.meta.readdir(ROOT_INO, 0, 2, true).unwrap();
    assert_eq!(first.len(), 2);
    assert!(first[0].cookie > 2 && first[1].cookie > first[0].cookie);
    assert_eq!(first[0].attr.as_ref().unwrap().ino, first[0].ino);
    // The entry already returned goes away, a new one arrives: continuing yields c then d.
    f.unlink(ROOT_INO, "a").unwrap();
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

fn unlinked_open_files_are_sustained_until_their_last_close(engine: Engine) {
    let f = Fixture::new(engine);
    let file = f.mk(ROOT_INO, "open", FileKind::Regular);
    let s = f.upload(100, 0);
    f.meta
        .commit_slices(file.ino, &[(0, s)], 100, None, NOW)
        .unwrap();
    let before = f.meta.usage().unwrap();
    assert_eq!((before.bytes, before.inodes), (100, 1));

    // Two handles: open_file returns the attributes.
    let opened = f.meta.open_file(f.session, file.ino).unwrap();
    assert_eq!(opened, f.meta.getattr(file.ino).unwrap());
    f.meta.open_file(f.session, file.ino).unwrap();
    assert_eq!(f.unlink(ROOT_INO, "open").unwrap(), Some(file.ino));
    assert_eq!(f.nlink(file.ino), 0);
    assert_eq!(
        f.meta.read_chunk(file.ino, 0).unwrap(),
        vec![s],
        "data stays readable"
    );
    assert_eq!(
        f.meta.usage().unwrap(),
        before,
        "a sustained inode still counts"
    );
    assert!(
        f.meta.check(false).unwrap().is_empty(),
        "a sustained inode is no orphan"
    );
    f.meta.close_file(f.session, file.ino).unwrap();
    assert_eq!(f.nlink(file.ino), 0, "one handle is still open");
    assert_eq!(f.garbage_ids(), Vec::<u64>::new());
    f.meta.close_file(f.session, file.ino).unwrap();
    assert_eq!(f.nlink(file.ino), 0, "the last close is recorded lazily");
    // An open before the record needs no write and keeps the inode.
    f.meta.open_file(f.session, file.ino).unwrap();
    assert_eq!(f.meta.commit_closes().unwrap(), 0);
    assert_eq!(f.nlink(file.ino), 0, "open again");
    f.meta.close_file(f.session, file.ino).unwrap();
    assert_eq!(f.meta.commit_closes().unwrap(), 1);
    assert_eq!(
        errno(f.meta.getattr(file.ino)),
        ENOENT,
        "freed at the last close"
    );
    assert_eq!(
        f.meta.garbage_slices(i64::MAX, 10).unwrap(),
        vec![GarbageSlice {
            id: s.id,
            size: 100
        }]
    );
    let after = f.meta.usage().unwrap();
    assert_eq!(
        (after.bytes, after.inodes),
        (0, 0),
        "usage counters are back"
    );
    assert!(f.meta.check(false).unwrap().is_empty());
    // A close of something not open (or already freed) is harmless.
    f.meta.close_file(f.session, file.ino).unwrap();
    f.meta.commit_closes().unwrap();
    assert_eq!(errno(f.meta.open_file(f.session, 999)), ENOENT);

    // A file closed before its unlink is freed at once.
    let closed = f.mk(ROOT_INO, "closed", FileKind::Regular);
    f.meta.open_file(f.session, closed.ino).unwrap();
    f.meta.close_file(f.session, closed.ino).unwrap();
    f.meta.commit_closes().unwrap();
    assert_eq!(f.unlink(ROOT_INO, "closed").unwrap(), Some(closed.ino));
    assert_eq!(errno(f.meta.getattr(closed.ino)), ENOENT);

    // Closing the session frees what it sustained; so does reaping a stale session.
    let other = f.mk(ROOT_INO, "other", FileKind::Regular);
    f.meta.open_file(f.session, other.ino).unwrap();
    f.unlink(ROOT_INO, "other").unwrap();
    assert_eq!(f.nlink(other.ino), 0);
    f.meta.close_session(f.session).unwrap();
    assert_eq!(errno(f.meta.getattr(other.ino)), ENOENT);
    f.meta.close_file(f.session, other.ino).unwrap();
    f.meta.commit_closes().unwrap();

    let stale = open_session(&f.meta, 10);
    let fresh = open_session(&f.meta, wall_clock_ns());
    let third = f.mk(ROOT_INO, "third", FileKind::Regular);
    f.meta.open_file(stale, third.ino).unwrap();
    f.meta.unlink(ROOT_INO, b"third", NOW).unwrap();
    assert_eq!(f.nlink(third.ino), 0);
    // A session never reaps itself, however late its heartbeat.
    assert_eq!(f.meta.reap_stale_sessions(MAX_AGE, Some(stale)).unwrap(), 0);
    assert_eq!(f.meta.reap_stale_sessions(MAX_AGE, Some(fresh)).unwrap(), 1);
    assert_eq!(errno(f.meta.getattr(third.ino)), ENOENT);
    assert_eq!(errno(f.meta.heartbeat(stale)), ESTALE);
    f.meta.heartbeat(fresh).unwrap();
    assert_eq!(f.meta.usage().unwrap().inodes, 0);
}

fn an_open_file_replaced_by_rename_is_sustained_until_its_last_close(engine: Engine) {
    let f = Fixture::new(engine);
    let victim = f.mk(ROOT_INO, "victim", FileKind::Regular);
    f.meta
        .write_inline(victim.ino, &[(0, b"old bytes")], &SetAttr::default(), NOW)
        .unwrap()
        .unwrap();
    let newer = f.mk(ROOT_INO, "newer", FileKind::Regular);
    f.meta
        .write_inline(newer.ino, &[(0, b"new")], &SetAttr::default(), NOW)
        .unwrap()
        .unwrap();
    let before = f.meta.usage().unwrap();
    assert_eq!((before.bytes, before.inodes), (12, 2));

    f.meta.open_file(f.session, victim.ino).unwrap();
    let outcome = f
        .rename(
            (ROOT_INO, "newer"),
            (ROOT_INO, "victim"),
            RenameMode::Replace,
        )
        .unwrap();
    assert_eq!(
        (outcome.moved, outcome.replaced),
        (newer.ino, Some(victim.ino))
    );
    assert_eq!(f.meta.lookup(ROOT_INO, b"victim").unwrap().ino, newer.ino);
    assert_eq!(f.nlink(victim.ino), 0);
    assert_eq!(f.inline(victim.ino), Some(b"old bytes".to_vec()));
    assert_eq!(f.meta.usage().unwrap(), before);
    assert!(f.meta.check(false).unwrap().is_empty());

    f.meta.close_file(f.session, victim.ino).unwrap();

    f.meta.commit_closes().unwrap();
    assert_eq!(errno(f.meta.getattr(victim.ino)), ENOENT);
    let after = f.meta.usage().unwrap();
    assert_eq!(
        (after.bytes, after.inodes),
        (3, 1),
        "usage counters are back"
    );
    assert!(f.meta.check(false).unwrap().is_empty());

    // Not open: replacing frees at once.
    let third = f.mk(ROOT_INO, "third", FileKind::Regular);
    let outcome = f
        .rename(
            (ROOT_INO, "third"),
            (ROOT_INO, "victim"),
            RenameMode::Replace,
        )
        .unwrap();
    assert_eq!(outcome.replaced, Some(newer.ino));
    assert_eq!(errno(f.meta.getattr(newer.ino)), ENOENT);
    assert_eq!(f.meta.lookup(ROOT_INO, b"victim").unwrap().ino, third.ino);
    assert_eq!(f.meta.usage().unwrap().bytes, 0);
}

fn commit_read_truncate_and_garbage(engine: Engine) {
    let f = Fixture::new(engine);
    let file = f.mk(ROOT_INO, "big", FileKind::Regular);
    let first = f.meta.alloc_slice_ids(3).unwrap();
    assert!(first >= 1);
    assert_eq!(f.meta.alloc_slice_ids(1).unwrap(), first + 3);
    let (s1, s2, s3) = (
        slice(first, 1000, 0),
        slice(first + 1, 500, 200),
        slice(first + 2, 4096, 0),
    );
    f.pending(&[s1, s2, s3]);
    let attr = f
        .meta
        .commit_slices(file.ino, &[(0, s1), (0, s2)], 1000, None, NOW + 7)
        .unwrap()
        .attr;
    assert_eq!(
        (attr.size, attr.mtime_ns, attr.ctime_ns),
        (1000, NOW + 7, NOW + 7)
    );
    assert!(matches!(
        f.content(file.ino, 0..0),
        Some(Content::Chunks(_))
    ));
    let attr = f
        .meta
        .commit_slices(file.ino, &[(2, s3)], 2 * CHUNK + 4096, None, NOW)
        .unwrap()
        .attr;
    assert_eq!(attr.size, 2 * CHUNK + 4096);
    assert_eq!(f.meta.read_chunk(file.ino, 0).unwrap(), vec![s1, s2]);
    assert_eq!(f.meta.read_chunk(file.ino, 1).unwrap(), vec![]);
    // Held: chunk 0's 1000 bytes (s2 lies inside s1) and chunk 2's 4096, not the size.
    assert_eq!(f.meta.usage().unwrap().bytes, 1000 + 4096);
    assert_eq!(attr.blocks, (1000u64 + 4096).div_ceil(512));
    // A smaller min_size never shrinks the file.
    assert_eq!(
        f.meta
            .commit_slices(file.ino, &[], 10, None, NOW)
            .unwrap()
            .attr
            .size,
        2 * CHUNK + 4096
    );
    assert_eq!(
        errno(
            f.meta
                .commit_slices(file.ino, &[(0, slice(9, 10, CHUNK as u32))], 0, None, NOW)
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
        f.meta.slice_references().unwrap().live,
        vec![(s1.id, 1000), (s2.id, 500)]
    );

    // Growing only sets the size.
    assert_eq!(
        f.meta.truncate(file.ino, 5 * CHUNK, NOW).unwrap().size,
        5 * CHUNK
    );
    assert_eq!(f.meta.read_chunk(file.ino, 0).unwrap().len(), 3);

    // Compaction: compare-and-swap on a prefix of the slice list (slices committed after the
    // compactor read the chunk stay, after the replacement).
    assert_eq!(
        f.meta.fragmented_chunks(3, 10).unwrap(),
        vec![(file.ino, 0)]
    );
    assert_eq!(f.meta.fragmented_chunks(4, 10).unwrap(), vec![]);
    let merged = f.upload(600, 0);
    assert!(!f
        .meta
        .replace_chunk(file.ino, 0, &[s2, s1], &[merged])
        .unwrap());
    assert!(!f
        .meta
        .replace_chunk(file.ino, 0, &[s1, s2, hole, hole], &[merged])
        .unwrap());
    assert!(
        f.garbage_ids().contains(&merged.id),
        "a refused replace keeps the pending row"
    );
    assert!(f
        .meta
        .replace_chunk(file.ino, 0, &[s1, s2], &[merged])
        .unwrap());
    assert_eq!(
        f.meta.read_chunk(file.ino, 0).unwrap(),
        vec![merged, hole],
        "the later hole still shadows the replacement"
    );
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
    let last = f.upload(10, 0);
    f.meta
        .commit_slices(other.ino, &[(0, last)], 10, None, NOW)
        .unwrap();
    f.meta.truncate(other.ino, 0, NOW).unwrap();
    assert_eq!(f.inline(other.ino), Some(vec![]));
    f.unlink(ROOT_INO, "big").unwrap();
    let mut ids: Vec<u64> = f
        .meta
        .garbage_slices(i64::MAX, 10)
        .unwrap()
        .iter()
        .map(|g| g.id)
        .collect();
    ids.sort();
    let mut expected = vec![failed_upload, last.id, merged.id];
    expected.sort();
    assert_eq!(ids, expected);
    assert_eq!(f.meta.usage().unwrap().bytes, 0);
    assert!(f.meta.check(false).unwrap().is_empty());
}

fn committing_a_pending_upload_removes_its_garbage_row(engine: Engine) {
    let f = Fixture::new(engine);
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
        .commit_slices(file.ino, &[(0, slice(committed, 10, 0))], 10, None, NOW)
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

fn inline_write_applies_later_attribute_changes_in_its_transaction(engine: Engine) {
    let f = Fixture::new(engine);
    let file = f.mk(ROOT_INO, "untarred", FileKind::Regular);
    let then = SetAttr {
        perm: Some(0o640),
        uid: Some(7),
        gid: Some(8),
        mtime: Some(TimeSet::At(NOW - 1_000)),
        ctime: Some(NOW + 2),
        ..SetAttr::default()
    };
    let attr = f
        .meta
        .write_inline(file.ino, &[(0, b"archived")], &then, NOW + 1)
        .unwrap()
        .unwrap();
    assert_eq!((attr.size, attr.perm, attr.uid, attr.gid), (8, 0o640, 7, 8));
    assert_eq!((attr.mtime_ns, attr.ctime_ns), (NOW - 1_000, NOW + 2));
    assert_eq!(f.meta.getattr(file.ino).unwrap(), attr);
    assert_eq!(f.inline(file.ino), Some(b"archived".to_vec()));
}

fn inline_files(engine: Engine) {
    let f = Fixture::new(engine);
    let file = f.mk(ROOT_INO, "small", FileKind::Regular);
    assert_eq!(f.inline(file.ino), Some(vec![]));
    let attr = f
        .meta
        .write_inline(
            file.ino,
            &[(0, b"hello world")],
            &SetAttr::default(),
            NOW + 1,
        )
        .unwrap()
        .unwrap();
    assert_eq!(
        (attr.size, attr.mtime_ns, attr.ctime_ns),
        (11, NOW + 1, NOW + 1)
    );
    assert_eq!(f.meta.getattr(file.ino).unwrap(), attr);
    assert_eq!(f.meta.usage().unwrap().bytes, 11);
    assert_eq!(
        f.meta
            .write_inline(
                file.ino,
                &[(0, &[0; INLINE as usize + 1])],
                &SetAttr::default(),
                NOW
            )
            .unwrap(),
        None,
        "past the threshold the caller writes slices"
    );
    let dir = f.mk(ROOT_INO, "d", FileKind::Directory);
    assert_eq!(
        errno(
            f.meta
                .write_inline(dir.ino, &[(0, b"x")], &SetAttr::default(), NOW)
        ),
        EISDIR
    );

    f.meta.truncate(file.ino, 5, NOW).unwrap();
    assert_eq!(f.inline(file.ino), Some(b"hello".to_vec()));
    f.meta.truncate(file.ino, 8, NOW).unwrap();
    assert_eq!(f.inline(file.ino), Some(b"hello\0\0\0".to_vec()));
    // Past the threshold the blob stays as is; the bytes beyond it read as zeros.
    assert_eq!(f.meta.truncate(file.ino, 1000, NOW).unwrap().size, 1000);
    assert_eq!(f.inline(file.ino), Some(b"hello\0\0\0".to_vec()));
    assert_eq!(f.meta.truncate(file.ino, 3, NOW).unwrap().size, 3);
    assert_eq!(f.inline(file.ino), Some(b"hel".to_vec()));

    // Committing slices must name the inline version the slices carry.
    let s = f.upload(100, 0);
    assert!(is_conflict(f.meta.commit_slices(
        file.ino,
        &[(0, s)],
        100,
        None,
        NOW
    )));
    assert_eq!(f.inline(file.ino), Some(b"hel".to_vec()));
    let version = f.version(file.ino);
    assert_eq!(
        f.meta
            .commit_slices(file.ino, &[(0, s)], 100, Some(version), NOW)
            .unwrap()
            .attr
            .size,
        100
    );
    assert_eq!(
        f.content(file.ino, 0..1),
        Some(Content::Chunks(vec![(0, vec![s])]))
    );

    // A chunked file is not written inline; emptying it makes it inline again and frees the
    // chunks.
    assert_eq!(
        f.meta
            .write_inline(file.ino, &[(0, b"again")], &SetAttr::default(), NOW)
            .unwrap(),
        None
    );
    f.meta.truncate(file.ino, 0, NOW).unwrap();
    f.meta
        .write_inline(file.ino, &[(0, b"again")], &SetAttr::default(), NOW)
        .unwrap()
        .unwrap();
    assert_eq!(f.inline(file.ino), Some(b"again".to_vec()));
    assert_eq!(f.meta.read_chunk(file.ino, 0).unwrap(), vec![]);
    assert_eq!(
        f.meta.garbage_slices(i64::MAX, 10).unwrap(),
        vec![GarbageSlice {
            id: s.id,
            size: 100
        }]
    );
    assert_eq!(f.meta.usage().unwrap().bytes, 5);
    assert!(f.meta.check(false).unwrap().is_empty());
}

fn xattrs(engine: Engine) {
    let f = Fixture::new(engine);
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

fn posix_locks_split_merge_and_conflict(engine: Engine) {
    let f = Fixture::new(engine);
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
    // Reaping the session (stale by the engine's clock) drops its locks.
    let c = LockOwner {
        session: open_session(&f.meta, wall_clock_ns()),
        owner: 10,
    };
    assert!(!f
        .meta
        .setlk(file.ino, c, &range(0, 0, LockKind::Read, 1))
        .unwrap());
    assert_eq!(f.meta.reap_stale_sessions(MAX_AGE, None).unwrap(), 1);
    assert!(f
        .meta
        .setlk(file.ino, c, &range(0, 0, LockKind::Read, 1))
        .unwrap());
}

fn two_engines_on_one_file_see_each_others_commits(engine: Engine) {
    let f = Fixture::new(engine);
    let second = f.reopen();
    assert_eq!(second.volume().unwrap(), Some(volume("vol")));
    let file = f.mk(ROOT_INO, "from-first", FileKind::Regular);
    f.meta
        .write_inline(file.ino, &[(0, b"data")], &SetAttr::default(), NOW)
        .unwrap()
        .unwrap();
    let seen = second
        .read_layout(
            second.lookup(ROOT_INO, b"from-first").unwrap().ino,
            0..0,
            None,
        )
        .unwrap();
    assert_eq!(seen.content, Some(Content::Inline(b"data".to_vec())));
    assert_eq!(seen.attr, f.meta.getattr(file.ino).unwrap());
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
    assert_eq!(second.usage().unwrap().inodes, 402);
    assert!(f.meta.check(false).unwrap().is_empty());
}

fn check_finds_and_repairs_damage(engine: Engine) {
    let f = Fixture::new(engine);
    let dir = f.mk(ROOT_INO, "dir", FileKind::Directory);
    let file = f.mk(dir.ino, "file", FileKind::Regular);
    let orphan = f.mk(ROOT_INO, "orphan", FileKind::Regular);
    f.meta
        .write_inline(file.ino, &[(0, b"abc")], &SetAttr::default(), NOW)
        .unwrap()
        .unwrap();
    assert_eq!(f.meta.check(false).unwrap(), Vec::<String>::new());

    f.meta
        .raw(&format!(
            "UPDATE inodes SET nlink = 7 WHERE ino = {}",
            dir.ino
        ))
        .unwrap();
    f.meta
        .raw(&format!("DELETE FROM dentries WHERE ino = {}", orphan.ino))
        .unwrap();
    f.meta
        .raw("UPDATE usage_shards SET bytes = bytes + 99 WHERE shard = 3")
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
    assert_eq!(f.meta.usage().unwrap().inodes, 2);
}

fn write_inline_merges_the_extents_of_writers_without_losing_bytes(engine: Engine) {
    let f = Fixture::new(engine);
    let file = f.mk(ROOT_INO, "shared", FileKind::Regular);
    let a = f
        .meta
        .write_inline(file.ino, &[(0, b"aaaa")], &SetAttr::default(), NOW + 1)
        .unwrap()
        .unwrap();
    assert_eq!((a.size, a.mtime_ns), (4, NOW + 1));
    // A second writer that never saw the first one's bytes writes past them: both survive, the
    // gap reads as zeros.
    let b = f
        .meta
        .write_inline(file.ino, &[(8, b"bbbb")], &SetAttr::default(), NOW + 2)
        .unwrap()
        .unwrap();
    assert_eq!((b.size, b.mtime_ns, b.ctime_ns), (12, NOW + 2, NOW + 2));
    assert_eq!(f.inline(file.ino), Some(b"aaaa\0\0\0\0bbbb".to_vec()));
    // Extents apply in write order (later ones win); writing inside never shrinks the file.
    let c = f
        .meta
        .write_inline(
            file.ino,
            &[(2, b"XY"), (3, b"Z"), (5, b"c")],
            &SetAttr::default(),
            NOW + 3,
        )
        .unwrap()
        .unwrap();
    assert_eq!(c.size, 12);
    assert_eq!(f.inline(file.ino), Some(b"aaXZ\0c\0\0bbbb".to_vec()));
    assert_eq!(f.meta.usage().unwrap().bytes, 12);

    // Two processes writing interleaved bytes at the same time: each write merges with the
    // stored bytes inside its transaction, so no write is lost.
    f.meta.truncate(file.ino, 0, NOW).unwrap();
    let second = f.reopen();
    std::thread::scope(|scope| {
        for (engine, parity, tag) in [(&f.meta, 0, b'x'), (&second, 1, b'y')] {
            scope.spawn(move || {
                for at in (parity..INLINE).step_by(2) {
                    let attr = engine
                        .write_inline(file.ino, &[(at, &[tag])], &SetAttr::default(), NOW)
                        .unwrap()
                        .expect("stays inline");
                    assert!(attr.size > at);
                }
            });
        }
    });
    let expected: Vec<u8> = (0..INLINE)
        .map(|at| if at % 2 == 0 { b'x' } else { b'y' })
        .collect();
    assert_eq!(f.inline(file.ino), Some(expected));
    assert_eq!(f.meta.getattr(file.ino).unwrap().size, INLINE);
    assert_eq!(f.meta.usage().unwrap().bytes, INLINE);
    assert!(f.meta.check(false).unwrap().is_empty());
}

fn write_inline_declines_past_the_threshold_and_for_chunked_files(engine: Engine) {
    let f = Fixture::new(engine);
    let file = f.mk(ROOT_INO, "small", FileKind::Regular);
    let sixty = [b's'; 60];
    let attr = f
        .meta
        .write_inline(file.ino, &[(0, &sixty)], &SetAttr::default(), NOW)
        .unwrap()
        .unwrap();
    assert_eq!(attr.size, 60);
    // Past the threshold: None, and nothing changed (size, bytes, times, version).
    assert_eq!(
        f.meta
            .write_inline(file.ino, &[(60, b"12345")], &SetAttr::default(), NOW + 1)
            .unwrap(),
        None
    );
    assert_eq!(
        f.meta
            .write_inline(
                file.ino,
                &[(0, b"x"), (INLINE, b"y")],
                &SetAttr::default(),
                NOW + 1
            )
            .unwrap(),
        None,
        "one extent past the threshold is enough"
    );
    assert_eq!(f.meta.getattr(file.ino).unwrap(), attr);
    assert_eq!(f.inline(file.ino), Some(sixty.to_vec()));
    assert_eq!(f.meta.usage().unwrap().bytes, 60);
    // Up to the threshold itself stays inline.
    let full = f
        .meta
        .write_inline(file.ino, &[(60, b"1234")], &SetAttr::default(), NOW + 2)
        .unwrap()
        .unwrap();
    assert_eq!(full.size, INLINE);
    // A truncate past the threshold keeps the blob, but the file is too large to write inline.
    f.meta.truncate(file.ino, 1000, NOW).unwrap();
    let grown = f.meta.getattr(file.ino).unwrap();
    assert_eq!(
        f.meta
            .write_inline(file.ino, &[(0, b"z")], &SetAttr::default(), NOW + 3)
            .unwrap(),
        None
    );
    assert_eq!(f.meta.getattr(file.ino).unwrap(), grown);

    // A chunked file: None, chunks, size and version untouched.
    let big = f.mk(ROOT_INO, "big", FileKind::Regular);
    let s = f.upload(10, 0);
    let committed = f
        .meta
        .commit_slices(big.ino, &[(0, s)], 10, None, NOW)
        .unwrap()
        .attr;
    assert_eq!(
        f.meta
            .write_inline(big.ino, &[(0, b"q")], &SetAttr::default(), NOW + 4)
            .unwrap(),
        None
    );
    assert_eq!(f.meta.getattr(big.ino).unwrap(), committed);
    assert_eq!(f.meta.read_chunk(big.ino, 0).unwrap(), vec![s]);
    assert_eq!(
        f.content(big.ino, 0..1),
        Some(Content::Chunks(vec![(0, vec![s])]))
    );

    let link = f.mk(ROOT_INO, "sym", FileKind::Symlink);
    assert_eq!(
        errno(
            f.meta
                .write_inline(link.ino, &[(0, b"x")], &SetAttr::default(), NOW)
        ),
        EINVAL
    );
    assert_eq!(
        errno(
            f.meta
                .write_inline(999, &[(0, b"x")], &SetAttr::default(), NOW)
        ),
        ENOENT
    );
}

fn commit_without_a_pending_row_conflicts_and_changes_nothing(engine: Engine) {
    let f = Fixture::new(engine);
    let file = f.mk(ROOT_INO, "f", FileKind::Regular);
    let a = f.upload(100, 0);
    f.meta
        .commit_slices(file.ino, &[(0, a)], 100, None, NOW)
        .unwrap();
    let before = f.meta.getattr(file.ino).unwrap();

    // The writer forgot to record `forgotten`; `recorded` is fine: the whole commit fails.
    let recorded = f.upload(50, 100);
    let forgotten = slice(f.meta.alloc_slice_ids(1).unwrap(), 50, 150);
    assert!(is_conflict(f.meta.commit_slices(
        file.ino,
        &[(0, recorded), (0, forgotten)],
        200,
        None,
        NOW + 5
    )));
    assert_eq!(
        f.meta.getattr(file.ino).unwrap(),
        before,
        "size, times, version"
    );
    assert_eq!(f.meta.read_chunk(file.ino, 0).unwrap(), vec![a]);
    assert_eq!(
        f.garbage_ids(),
        vec![recorded.id],
        "the pending row is intact"
    );
    assert_eq!(f.meta.usage().unwrap().bytes, 100);

    // A pending row that expired and that gc already processed counts as forgotten.
    f.pending(&[forgotten]);
    f.meta
        .add_garbage(
            &[GarbageSlice {
                id: forgotten.id,
                size: forgotten.size,
            }],
            NOW,
        )
        .unwrap();
    let due: Vec<u64> = f
        .meta
        .garbage_slices(NOW + 1, 10)
        .unwrap()
        .iter()
        .map(|g| g.id)
        .collect();
    assert_eq!(due, vec![forgotten.id]);
    f.meta.forget_garbage(&due).unwrap();
    assert!(is_conflict(f.meta.commit_slices(
        file.ino,
        &[(0, forgotten)],
        200,
        None,
        NOW
    )));
    assert_eq!(f.meta.getattr(file.ino).unwrap(), before);

    // Holes have no object, hence no row; the recorded slice commits and its row goes.
    let hole = Slice {
        id: 0,
        size: 0,
        off: 0,
        len: 10,
        pos: 300,
    };
    f.meta
        .commit_slices(file.ino, &[(0, recorded), (0, hole)], 310, None, NOW)
        .unwrap();
    assert_eq!(
        f.meta.read_chunk(file.ino, 0).unwrap(),
        vec![a, recorded, hole]
    );
    assert_eq!(f.garbage_ids(), Vec::<u64>::new());
    assert!(f.meta.check(false).unwrap().is_empty());
}

fn replace_chunk_refuses_a_slice_without_pending_row_and_changes_nothing(engine: Engine) {
    let f = Fixture::new(engine);
    let file = f.mk(ROOT_INO, "f", FileKind::Regular);
    let (a, b) = (f.upload(100, 0), f.upload(100, 100));
    f.meta
        .commit_slices(file.ino, &[(0, a), (0, b)], 200, None, NOW)
        .unwrap();
    let version = f.version(file.ino);
    let recorded = f.upload(100, 0);
    let forgotten = slice(f.meta.alloc_slice_ids(1).unwrap(), 100, 100);
    assert!(!f
        .meta
        .replace_chunk(file.ino, 0, &[a, b], &[recorded, forgotten])
        .unwrap());
    assert_eq!(f.meta.read_chunk(file.ino, 0).unwrap(), vec![a, b]);
    assert_eq!(
        f.garbage_ids(),
        vec![recorded.id],
        "the recorded slice is still pending, not leaked"
    );
    assert!(!f
        .meta
        .replace_chunk(file.ino, 0, &[a, b], &[forgotten])
        .unwrap());
    assert_eq!(f.meta.read_chunk(file.ino, 0).unwrap(), vec![a, b]);

    f.pending(&[forgotten]);
    assert!(f
        .meta
        .replace_chunk(file.ino, 0, &[a, b], &[recorded, forgotten])
        .unwrap());
    assert_eq!(
        f.meta.read_chunk(file.ino, 0).unwrap(),
        vec![recorded, forgotten]
    );
    assert_eq!(f.garbage_ids(), vec![a.id, b.id]);
    assert_eq!(f.version(file.ino), version);
    assert!(f.meta.check(false).unwrap().is_empty());
}

fn commit_drops_inline_bytes_only_at_the_version_it_read(engine: Engine) {
    let f = Fixture::new(engine);
    let file = f.mk(ROOT_INO, "f", FileKind::Regular);
    let read = f
        .meta
        .write_inline(file.ino, &[(0, b"hello")], &SetAttr::default(), NOW)
        .unwrap()
        .unwrap()
        .data_version;
    // The writer read "hello" at `read` and writes it out with its own bytes as one slice...
    let s = f.upload(8, 0);
    // ...but another writer changed the inline bytes meanwhile.
    let changed = f
        .meta
        .write_inline(file.ino, &[(0, b"J")], &SetAttr::default(), NOW)
        .unwrap()
        .unwrap();
    assert!(changed.data_version > read);
    assert!(is_conflict(f.meta.commit_slices(
        file.ino,
        &[(0, s)],
        8,
        Some(read),
        NOW + 1
    )));
    assert!(is_conflict(f.meta.commit_slices(
        file.ino,
        &[(0, s)],
        8,
        None,
        NOW + 1
    )));
    assert_eq!(f.meta.getattr(file.ino).unwrap(), changed);
    assert_eq!(f.inline(file.ino), Some(b"Jello".to_vec()));
    assert_eq!(f.garbage_ids(), vec![s.id], "the upload is still pending");

    // At the right version the slices replace the inline bytes.
    let committed = f
        .meta
        .commit_slices(file.ino, &[(0, s)], 8, Some(changed.data_version), NOW + 1)
        .unwrap();
    assert_eq!(committed.attr.data_version, changed.data_version + 1);
    assert_eq!((committed.attr.size, committed.attr.mtime_ns), (8, NOW + 1));
    assert_eq!(committed.chunk_slices, vec![(0, 1)]);
    assert_eq!(f.meta.getattr(file.ino).unwrap(), committed.attr);
    assert_eq!(
        f.content(file.ino, 0..1),
        Some(Content::Chunks(vec![(0, vec![s])])),
        "the inline bytes are gone"
    );
    assert_eq!(f.garbage_ids(), Vec::<u64>::new());
    assert_eq!(f.meta.usage().unwrap().bytes, 8);
    // The version applies to chunked files too.
    let t = f.upload(8, 8);
    assert!(is_conflict(f.meta.commit_slices(
        file.ino,
        &[(0, t)],
        16,
        Some(changed.data_version),
        NOW
    )));
    assert!(f.meta.check(false).unwrap().is_empty());
}

fn commit_reports_the_slice_count_of_each_chunk_written(engine: Engine) {
    let f = Fixture::new(engine);
    let file = f.mk(ROOT_INO, "f", FileKind::Regular);
    let (a, b, c) = (f.upload(10, 0), f.upload(10, 10), f.upload(100, 0));
    let committed = f
        .meta
        .commit_slices(
            file.ino,
            &[(0, a), (0, b), (2, c)],
            2 * CHUNK + 100,
            None,
            NOW,
        )
        .unwrap();
    assert_eq!(committed.chunk_slices, vec![(0, 2), (2, 1)]);
    let d = f.upload(10, 20);
    let Committed { chunk_slices, .. } = f
        .meta
        .commit_slices(file.ino, &[(0, d)], 0, None, NOW)
        .unwrap();
    assert_eq!(
        chunk_slices,
        vec![(0, 3)],
        "counts what the chunk holds now"
    );
    // The hole a shrinking truncate leaves counts too.
    f.meta.truncate(file.ino, 2 * CHUNK + 50, NOW).unwrap();
    let e = f.upload(10, 0);
    let committed = f
        .meta
        .commit_slices(file.ino, &[(2, e)], 0, None, NOW)
        .unwrap();
    assert_eq!(committed.chunk_slices, vec![(2, 3)]);
    // Each chunk once, whatever the order of the slices.
    let (g, h, i) = (f.upload(10, 0), f.upload(10, 30), f.upload(10, 40));
    let committed = f
        .meta
        .commit_slices(file.ino, &[(1, g), (0, h), (1, i)], 0, None, NOW)
        .unwrap();
    assert_eq!(committed.chunk_slices, vec![(0, 4), (1, 2)]);
    assert_eq!(
        f.meta
            .commit_slices(file.ino, &[], 0, None, NOW)
            .unwrap()
            .chunk_slices,
        vec![]
    );
    assert_eq!(
        f.meta.fragmented_chunks(4, 10).unwrap(),
        vec![(file.ino, 0)]
    );
}

fn data_version_counts_content_changes_but_not_compaction(engine: Engine) {
    let f = Fixture::new(engine);
    let file = f.mk(ROOT_INO, "f", FileKind::Regular);
    assert_eq!(file.data_version, 0);
    assert_eq!(f.version(file.ino), 0);
    let expected = std::cell::Cell::new(0);
    let bumped = |attr: Attr| {
        expected.set(expected.get() + 1);
        assert_eq!(attr.data_version, expected.get());
        assert_eq!(f.version(file.ino), expected.get());
    };
    bumped(
        f.meta
            .write_inline(file.ino, &[(0, b"abc")], &SetAttr::default(), NOW)
            .unwrap()
            .unwrap(),
    );
    bumped(
        f.meta
            .write_inline(file.ino, &[(1, b"B")], &SetAttr::default(), NOW)
            .unwrap()
            .unwrap(),
    );
    bumped(f.meta.truncate(file.ino, 2, NOW).unwrap());
    bumped(f.meta.truncate(file.ino, 2, NOW).unwrap());
    let a = f.upload(10, 0);
    bumped(
        f.meta
            .commit_slices(file.ino, &[(0, a)], 10, Some(4), NOW)
            .unwrap()
            .attr,
    );
    let b = f.upload(10, 10);
    bumped(
        f.meta
            .commit_slices(file.ino, &[(0, b)], 20, None, NOW)
            .unwrap()
            .attr,
    );
    assert_eq!(expected.get(), 6);

    // Neither metadata changes, refused writes nor failed commits change the content.
    let perm = SetAttr {
        perm: Some(0o600),
        ..SetAttr::default()
    };
    assert_eq!(
        f.meta.setattr(file.ino, &perm, NOW).unwrap().data_version,
        6
    );
    f.meta
        .set_xattr(file.ino, b"user.x", b"1", XattrMode::Any, NOW)
        .unwrap();
    f.meta.link(file.ino, ROOT_INO, b"g", NOW).unwrap();
    f.rename((ROOT_INO, "g"), (ROOT_INO, "h"), RenameMode::Replace)
        .unwrap();
    assert_eq!(
        f.meta
            .write_inline(file.ino, &[(0, b"x")], &SetAttr::default(), NOW)
            .unwrap(),
        None
    );
    let forgotten = slice(f.meta.alloc_slice_ids(1).unwrap(), 10, 20);
    assert!(is_conflict(f.meta.commit_slices(
        file.ino,
        &[(0, forgotten)],
        30,
        None,
        NOW
    )));
    assert_eq!(f.version(file.ino), 6);

    // Compaction keeps the content, so caches of it stay valid.
    let merged = f.upload(20, 0);
    assert!(f
        .meta
        .replace_chunk(file.ino, 0, &[a, b], &[merged])
        .unwrap());
    assert_eq!(f.version(file.ino), 6);

    bumped(f.meta.truncate(file.ino, 3 * CHUNK, NOW).unwrap());
    bumped(f.meta.truncate(file.ino, 5, NOW).unwrap());
    bumped(f.meta.truncate(file.ino, 0, NOW).unwrap());
    assert_eq!(expected.get(), 9);
    // Every way of reading attributes reports it, in every process.
    assert_eq!(f.meta.lookup(ROOT_INO, b"f").unwrap().data_version, 9);
    let listed = f.meta.readdir(ROOT_INO, 0, 10, true).unwrap();
    assert!(listed
        .iter()
        .all(|entry| entry.attr.as_ref().unwrap().data_version == 9));
    assert_eq!(
        f.meta.open_file(f.session, file.ino).unwrap().data_version,
        9
    );
    assert_eq!(f.reopen().getattr(file.ino).unwrap().data_version, 9);
    // Each file has its own.
    assert_eq!(f.mk(ROOT_INO, "other", FileKind::Regular).data_version, 0);
}

fn read_layout_returns_content_unless_the_version_is_known(engine: Engine) {
    let f = Fixture::new(engine);
    let file = f.mk(ROOT_INO, "f", FileKind::Regular);
    let empty = f.meta.read_layout(file.ino, 0..0, None).unwrap();
    assert_eq!(
        empty,
        Layout {
            attr: f.meta.getattr(file.ino).unwrap(),
            content: Some(Content::Inline(vec![])),
        }
    );
    f.meta
        .write_inline(file.ino, &[(0, b"abc")], &SetAttr::default(), NOW)
        .unwrap()
        .unwrap();
    let inline = f
        .meta
        .read_layout(file.ino, 0..4, Some(empty.attr.data_version))
        .unwrap();
    assert_eq!(inline.content, Some(Content::Inline(b"abc".to_vec())));
    assert_eq!(inline.attr, f.meta.getattr(file.ino).unwrap());
    assert_eq!(inline.attr.size, 3);
    let unchanged = f
        .meta
        .read_layout(file.ino, 0..4, Some(inline.attr.data_version))
        .unwrap();
    assert_eq!(
        unchanged,
        Layout {
            attr: inline.attr.clone(),
            content: None
        }
    );

    // Chunks: the requested range, empty chunks as empty lists.
    f.meta.truncate(file.ino, 0, NOW).unwrap();
    let (a, c) = (f.upload(1000, 0), f.upload(100, 0));
    f.meta
        .commit_slices(file.ino, &[(0, a), (2, c)], 2 * CHUNK + 100, None, NOW)
        .unwrap();
    let chunked = f
        .meta
        .read_layout(file.ino, 0..3, Some(inline.attr.data_version))
        .unwrap();
    assert_eq!(
        chunked.content,
        Some(Content::Chunks(vec![
            (0, vec![a]),
            (1, vec![]),
            (2, vec![c])
        ]))
    );
    assert_eq!(chunked.attr.size, 2 * CHUNK + 100);
    assert_eq!(
        f.content(file.ino, 1..2),
        Some(Content::Chunks(vec![(1, vec![])]))
    );
    assert_eq!(
        f.content(file.ino, 2..5),
        Some(Content::Chunks(vec![
            (2, vec![c]),
            (3, vec![]),
            (4, vec![])
        ]))
    );
    assert_eq!(
        f.meta
            .read_layout(file.ino, 0..3, Some(chunked.attr.data_version))
            .unwrap()
            .content,
        None
    );

    // A truncate between two layouts: the next one sees the new size and slices together.
    f.meta.truncate(file.ino, 600, NOW + 1).unwrap();
    let truncated = f
        .meta
        .read_layout(file.ino, 0..3, Some(chunked.attr.data_version))
        .unwrap();
    let hole = Slice {
        id: 0,
        size: 0,
        off: 0,
        len: (CHUNK - 600) as u32,
        pos: 600,
    };
    assert_eq!(
        truncated.content,
        Some(Content::Chunks(vec![
            (0, vec![a, hole]),
            (1, vec![]),
            (2, vec![])
        ]))
    );
    assert_eq!(truncated.attr.size, 600);
    assert_eq!(truncated.attr.data_version, chunked.attr.data_version + 1);
    assert_eq!(truncated.attr.mtime_ns, NOW + 1);
    f.meta.truncate(file.ino, 0, NOW).unwrap();
    assert_eq!(
        f.meta
            .read_layout(file.ino, 0..3, Some(truncated.attr.data_version))
            .unwrap()
            .content,
        Some(Content::Inline(vec![]))
    );

    // Other kinds have no content; a missing inode is an error.
    let root = f.meta.read_layout(ROOT_INO, 0..1, None).unwrap();
    assert_eq!((root.attr.kind, root.content), (FileKind::Directory, None));
    assert_eq!(errno(f.meta.read_layout(999, 0..1, None)), ENOENT);
}

fn leases_are_exclusive_renewable_and_taken_over_after_expiry(engine: Engine) {
    let f = Fixture::new(engine);
    let other = open_session(&f.meta, NOW);
    let long = MAX_AGE;
    let short = 200_000_000; // 200 ms
    assert!(f.meta.try_lease("gc", f.session, short).unwrap());
    assert!(!f.meta.try_lease("gc", other, long).unwrap(), "exclusive");
    assert!(
        !f.reopen().try_lease("gc", other, long).unwrap(),
        "in every process"
    );
    assert!(
        f.meta.try_lease("compact", other, long).unwrap(),
        "leases are independent"
    );
    // The holder renews before its short lease ends: it still holds it after the first expiry.
    assert!(f.meta.try_lease("gc", f.session, long).unwrap(), "renewal");
    std::thread::sleep(std::time::Duration::from_nanos(2 * short as u64));
    assert!(!f.meta.try_lease("gc", other, long).unwrap(), "renewed");
    assert!(!f.meta.try_lease("compact", f.session, long).unwrap());

    // A lease that ran out is taken over; its old holder then loses it.
    assert!(f.meta.try_lease("gc", f.session, 1).unwrap());
    std::thread::sleep(std::time::Duration::from_millis(5));
    assert!(f.meta.try_lease("gc", other, long).unwrap(), "takeover");
    assert!(!f.meta.try_lease("gc", f.session, long).unwrap());
    assert!(f.meta.try_lease("gc", other, long).unwrap());
}

fn live_sessions_are_those_with_a_recent_heartbeat(engine: Engine) {
    let f = Fixture::new(engine);
    // The fixture's session was opened at NOW, ancient by the engine's clock.
    let fresh = open_session(&f.meta, wall_clock_ns());
    assert_eq!(f.meta.live_sessions(MAX_AGE).unwrap(), vec![fresh]);
    // A heartbeat is stamped with the engine's clock.
    f.meta.heartbeat(f.session).unwrap();
    assert_eq!(
        f.meta.live_sessions(MAX_AGE).unwrap(),
        vec![f.session, fresh]
    );
    assert_eq!(f.meta.reap_stale_sessions(MAX_AGE, None).unwrap(), 0);
    let stale = open_session(&f.meta, 10);
    assert_eq!(
        f.reopen().live_sessions(MAX_AGE).unwrap(),
        vec![f.session, fresh]
    );
    f.meta.close_session(fresh).unwrap();
    assert_eq!(f.meta.live_sessions(MAX_AGE).unwrap(), vec![f.session]);
    assert_eq!(f.meta.reap_stale_sessions(MAX_AGE, None).unwrap(), 1);
    assert_eq!(errno(f.meta.heartbeat(stale)), ESTALE);
    assert_eq!(f.meta.live_sessions(MAX_AGE).unwrap(), vec![f.session]);
}

fn sessions_are_found_by_host_and_mount_point(engine: Engine) {
    let f = Fixture::new(engine);
    let here = open_session(&f.meta, wall_clock_ns());
    let elsewhere = f
        .meta
        .open_session(&SessionInfo {
            host: "host".into(),
            pid: 7,
            mount_point: "/other".into(),
            now_ns: wall_clock_ns(),
        })
        .unwrap();
    let found = f.meta.sessions_at("host", "/mnt").unwrap();
    assert!(found.contains(&(here, 42)), "{found:?}");
    assert!(found.iter().all(|(id, _)| *id != elsewhere), "{found:?}");
    assert_eq!(
        f.meta.sessions_at("host", "/other").unwrap(),
        vec![(elsewhere, 7)]
    );
    assert!(f
        .meta
        .sessions_at("another host", "/mnt")
        .unwrap()
        .is_empty());
}

fn slice_references_hold_live_and_pending_slices(engine: Engine) {
    let f = Fixture::new(engine);
    assert_eq!(
        f.meta.slice_references().unwrap(),
        SliceReferences::default()
    );
    let file = f.mk(ROOT_INO, "f", FileKind::Regular);
    let (a, b) = (f.upload(100, 0), f.upload(200, 0));
    let uploading = f.upload(300, 0);
    f.meta
        .commit_slices(file.ino, &[(0, a), (1, b)], CHUNK + 200, None, NOW)
        .unwrap();
    assert_eq!(
        f.meta.slice_references().unwrap(),
        SliceReferences {
            live: vec![(a.id, 100), (b.id, 200)],
            garbage: vec![uploading.id],
        }
    );
    // Truncating moves b from live to garbage; the hole it leaves in chunk 0 is no slice.
    f.meta.truncate(file.ino, 50, NOW).unwrap();
    assert_eq!(
        f.meta.slice_references().unwrap(),
        SliceReferences {
            live: vec![(a.id, 100)],
            garbage: vec![b.id, uploading.id],
        }
    );
    f.unlink(ROOT_INO, "f").unwrap();
    assert_eq!(
        f.meta.slice_references().unwrap(),
        SliceReferences {
            live: vec![],
            garbage: vec![a.id, b.id, uploading.id],
        }
    );
}

#[test]
fn migrating_a_v1_database_keeps_its_data_and_starts_data_versions_at_zero() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.db");
    let db = cellar_sql::Database::open_sqlite(&path).unwrap();
    let v1 = cellar_sql::Migrations {
        sqlite: &schema::MIGRATIONS.sqlite[..1],
        postgres: &[],
    };
    db.migrate(&v1).unwrap();
    assert_eq!(db.schema_version().unwrap(), 1);
    // A volume as version 1 stored it: the root, one inline file, a session holding a flock.
    db.write(|tx| {
        tx.batch(
        "INSERT INTO volume (id, name, uuid, chunk_size, block_size, inline_threshold, created_ns)
             VALUES (1, 'vol', '00000000-0000-0000-0000-000000000001', 1048576, 262144, 64, 1);
         INSERT INTO inodes (ino, kind, perm, uid, gid, nlink, size, rdev, atime_ns, mtime_ns, ctime_ns, parent)
             VALUES (1, 2, 511, 0, 0, 2, 4096, 0, 1, 1, 1, 1);
         INSERT INTO inodes (ino, kind, perm, uid, gid, nlink, size, rdev, atime_ns, mtime_ns, ctime_ns, parent, inline_data)
             VALUES (2, 1, 420, 1000, 1000, 1, 5, 0, 7, 7, 7, 1, x'68656c6c6f');
         INSERT INTO dentries (parent, name, ino, kind) VALUES (1, x'6f6c64', 2, 1);
         INSERT INTO sessions (host, pid, mount_point, started_ns, heartbeat_ns)
             VALUES ('host', 1, '/mnt', 1, 1);
         INSERT INTO flocks (ino, session, owner, kind) VALUES (2, 1, 7, 2);
         UPDATE counters SET value = 3 WHERE name = 'next_ino';
         UPDATE counters SET value = 5 WHERE name = 'used_bytes';
         UPDATE counters SET value = 2 WHERE name = 'used_inodes';",
        )
    })
    .unwrap();
    drop(db);

    let meta = SqlEngine::open_sqlite(&path).unwrap();
    assert_eq!(
        meta.schema_version().unwrap(),
        schema::MIGRATIONS.sqlite.len() as i64
    );
    assert_eq!(meta.volume().unwrap(), Some(volume("vol")));
    let old = meta.lookup(ROOT_INO, b"old").unwrap();
    assert_eq!(
        (old.ino, old.size, old.perm, old.mtime_ns, old.data_version),
        (2, 5, 0o644, 7, 0)
    );
    assert_eq!(meta.getattr(ROOT_INO).unwrap().data_version, 0);
    assert_eq!(
        meta.read_layout(old.ino, 0..0, None).unwrap().content,
        Some(Content::Inline(b"hello".to_vec()))
    );
    assert_eq!(meta.check(false).unwrap(), Vec::<String>::new());
    let usage = meta.usage().unwrap();
    assert_eq!((usage.bytes, usage.inodes), (5, 1));
    let tables = |name: &str| -> i64 {
        meta.db
            .read(|tx| {
                tx.query_row(
                    "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
                    [name],
                    |row| row.get(0),
                )
            })
            .unwrap()
    };
    assert_eq!((tables("flocks"), tables("leases")), (0, 1));

    // The migrated volume works as a new one.
    let attr = meta
        .write_inline(old.ino, &[(5, b" world")], &SetAttr::default(), NOW)
        .unwrap()
        .unwrap();
    assert_eq!((attr.size, attr.data_version), (11, 1));
    let new = meta
        .create_node(ROOT_INO, b"new", &node(FileKind::Regular), NOW)
        .unwrap();
    assert_eq!((new.ino, new.data_version), (3, 0));
    let session = open_session(&meta, NOW);
    assert!(meta.try_lease("gc", session, MAX_AGE).unwrap());
    let owner = LockOwner {
        session: 1,
        owner: 7,
    };
    meta.unlock_all(old.ino, owner).unwrap();
    assert_eq!(meta.check(false).unwrap(), Vec::<String>::new());
    drop(meta);
    // Opening again applies nothing more.
    let meta = SqlEngine::open_sqlite(&path).unwrap();
    assert_eq!(meta.getattr(old.ino).unwrap().data_version, 1);
}

// ---- change log ----

/// The changes committed after `after`, as (ino, entry) pairs, each checked for its origin.
fn changes_after(meta: &SqlEngine, after: u64, origin: u64) -> Vec<(Ino, Option<(Ino, String)>)> {
    let crate::ChangeBatch::Changes(changes) = meta.changes_since(after, 1000).unwrap() else {
        panic!("changes after {after} were lost");
    };
    let mut out: Vec<_> = changes
        .into_iter()
        .map(|change| {
            assert!(change.seq > after);
            assert_eq!(change.origin, origin, "origin of {change:?}");
            let entry = change
                .entry
                .map(|(parent, name)| (parent, String::from_utf8(name).unwrap()));
            (change.ino, entry)
        })
        .collect();
    out.sort();
    out
}

fn entry(parent: Ino, name: &str) -> Option<(Ino, String)> {
    Some((parent, name.to_string()))
}

fn every_write_records_its_changed_inodes_and_entries(engine: Engine) {
    let f = Fixture::new(engine);
    let origin = f.meta.origin();
    let step = |f: &Fixture, op: &dyn Fn(&Fixture)| {
        let before = f.meta.last_change().unwrap();
        op(f);
        changes_after(&f.meta, before, origin)
    };
    assert_eq!(
        step(&f, &|f| {
            f.mk(ROOT_INO, "d", FileKind::Directory);
        }),
        vec![(ROOT_INO, None), (2, entry(ROOT_INO, "d"))]
    );
    let dir = f.meta.lookup(ROOT_INO, b"d").unwrap().ino;
    let created = step(&f, &|f| {
        f.mk(dir, "a", FileKind::Regular);
    });
    let file = f.meta.lookup(dir, b"a").unwrap().ino;
    assert_eq!(created, vec![(dir, None), (file, entry(dir, "a"))]);
    // Reads record nothing.
    assert_eq!(
        step(&f, &|f| {
            f.meta.lookup(dir, b"a").unwrap();
            f.meta.readdir(dir, 0, 10, true).unwrap();
        }),
        vec![]
    );
    let setattr = SetAttr {
        perm: Some(0o600),
        ..SetAttr::default()
    };
    assert_eq!(
        step(&f, &|f| {
            f.meta.setattr(file, &setattr, NOW).unwrap();
        }),
        vec![(file, None)]
    );
    assert_eq!(
        step(&f, &|f| {
            f.meta
                .write_inline(file, &[(0, b"hello")], &SetAttr::default(), NOW)
                .unwrap();
        }),
        vec![(file, None)]
    );
    assert_eq!(
        step(&f, &|f| {
            f.meta.truncate(file, 2, NOW).unwrap();
        }),
        vec![(file, None)]
    );
    assert_eq!(
        step(&f, &|f| {
            f.meta
                .set_xattr(file, b"user.k", b"v", XattrMode::Any, NOW)
                .unwrap();
            f.meta.remove_xattr(file, b"user.k", NOW).unwrap();
        }),
        vec![(file, None), (file, None)],
        "one change per transaction"
    );
    assert_eq!(
        step(&f, &|f| {
            f.meta.link(file, ROOT_INO, b"hard", NOW).unwrap();
        }),
        vec![(ROOT_INO, None), (file, entry(ROOT_INO, "hard"))]
    );
    // A rename that replaces a target: both names, the replaced inode, both directories.
    let victim = f.mk(ROOT_INO, "victim", FileKind::Regular).ino;
    assert_eq!(
        step(&f, &|f| {
            f.rename((dir, "a"), (ROOT_INO, "victim"), RenameMode::Replace)
                .unwrap();
        }),
        vec![
            (ROOT_INO, None),
            (dir, None),
            (file, entry(ROOT_INO, "victim")),
            (file, entry(dir, "a")),
            (victim, None),
        ]
    );
    assert_eq!(f.meta.getattr(victim).map_err(|e| e.errno()), Err(ENOENT));
    let chunked = f.mk(ROOT_INO, "big", FileKind::Regular).ino;
    let s = f.upload(100, 0);
    assert_eq!(
        step(&f, &|f| {
            f.meta
                .commit_slices(chunked, &[(0, s)], 100, None, NOW)
                .unwrap();
        }),
        vec![(chunked, None)]
    );
    // The last link of an unopened file: the entry and the freed inode.
    assert_eq!(
        step(&f, &|f| {
            f.unlink(ROOT_INO, "big").unwrap();
        }),
        vec![(ROOT_INO, None), (chunked, entry(ROOT_INO, "big"))]
    );
    assert_eq!(
        step(&f, &|f| {
            f.meta.rmdir(ROOT_INO, b"d", NOW).unwrap();
        }),
        vec![(ROOT_INO, None), (dir, entry(ROOT_INO, "d"))]
    );
    // A file freed at its last close by another session's engine.
    let other = f.reopen();
    let session = open_session(&other, wall_clock_ns());
    other.open_file(session, file).unwrap();
    f.unlink(ROOT_INO, "hard").unwrap();
    f.unlink(ROOT_INO, "victim").unwrap();
    let before = f.meta.last_change().unwrap();
    other.close_file(session, file).unwrap();
    other.commit_closes().unwrap();
    assert_eq!(
        changes_after(&f.meta, before, other.origin()),
        vec![(file, None)]
    );
    assert_ne!(other.origin(), f.meta.origin());
}

fn another_engine_sees_the_changes_and_its_wait_returns_at_the_commit(engine: Engine) {
    let f = Fixture::new(engine);
    let second = f.reopen();
    let after = second.last_change().unwrap();
    // Nothing committed: the wait runs out its timeout.
    let started = std::time::Instant::now();
    second
        .wait_for_changes(after, std::time::Duration::from_millis(50))
        .unwrap();
    assert!(started.elapsed() >= std::time::Duration::from_millis(50));

    let writer = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            std::thread::sleep(std::time::Duration::from_millis(200));
            let committed = std::time::Instant::now();
            f.mk(ROOT_INO, "new", FileKind::Regular);
            committed
        });
        second
            .wait_for_changes(after, std::time::Duration::from_secs(20))
            .unwrap();
        let woke = std::time::Instant::now();
        let committed = writer.join().unwrap();
        woke.saturating_duration_since(committed)
    });
    assert!(
        writer < std::time::Duration::from_secs(1),
        "woke {writer:?} after the commit"
    );
    let ino = f.meta.lookup(ROOT_INO, b"new").unwrap().ino;
    assert_eq!(
        changes_after(&second, after, f.meta.origin()),
        vec![(ROOT_INO, None), (ino, entry(ROOT_INO, "new"))]
    );
    // Changes already past `after`: no wait at all.
    let started = std::time::Instant::now();
    second
        .wait_for_changes(after, std::time::Duration::from_secs(20))
        .unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
}

fn seqs_follow_commit_order_across_engines(engine: Engine) {
    let f = Fixture::new(engine);
    let engines = [f.reopen(), f.reopen()];
    let done = std::sync::atomic::AtomicUsize::new(0);
    let seen = std::thread::scope(|scope| {
        for (e, meta) in engines.iter().enumerate() {
            let done = &done;
            scope.spawn(move || {
                for i in 0..100 {
                    let name = format!("e{e}-{i}");
                    meta.create_node(ROOT_INO, name.as_bytes(), &node(FileKind::Regular), NOW)
                        .unwrap();
                }
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
        // A watcher reading while they commit never finds a seq below one it has seen.
        let mut seen = Vec::new();
        let mut last = 0;
        loop {
            let finished = done.load(std::sync::atomic::Ordering::SeqCst) == engines.len();
            let crate::ChangeBatch::Changes(batch) = f.meta.changes_since(last, 37).unwrap() else {
                panic!("lost changes");
            };
            for change in batch {
                assert!(change.seq > last);
                last = change.seq;
                seen.push(change);
            }
            if finished && f.meta.last_change().unwrap() == last {
                break seen;
            }
        }
    });
    let crate::ChangeBatch::Changes(all) = f.meta.changes_since(0, 10_000).unwrap() else {
        panic!("lost changes");
    };
    assert!(
        seen == all,
        "the watcher saw {} of {} changes",
        seen.len(),
        all.len()
    );
    // Both engines' creates: one entry and one root row each.
    assert_eq!(all.len(), 2 * 2 * 100);
    let origins: std::collections::BTreeSet<u64> = all.iter().map(|c| c.origin).collect();
    assert_eq!(
        origins,
        engines
            .iter()
            .map(|e| e.origin())
            .collect::<std::collections::BTreeSet<_>>()
    );
}

fn trimmed_changes_are_reported_lost_to_watchers_behind_them(engine: Engine) {
    let f = Fixture::new(engine);
    f.mk(ROOT_INO, "a", FileKind::Regular);
    let behind = f.meta.last_change().unwrap();
    f.mk(ROOT_INO, "b", FileKind::Regular);
    let caught_up = f.meta.last_change().unwrap();
    assert_eq!(f.meta.trim_changes(0).unwrap(), 0, "nothing is that old");
    // Everything up to now is older than a second from now.
    assert_eq!(
        f.meta
            .trim_changes(wall_clock_ns() + 1_000_000_000)
            .unwrap(),
        4
    );
    assert_eq!(
        f.meta.changes_since(0, 10).unwrap(),
        crate::ChangeBatch::Lost
    );
    assert_eq!(
        f.meta.changes_since(behind, 10).unwrap(),
        crate::ChangeBatch::Lost
    );
    assert_eq!(
        f.meta.changes_since(caught_up, 10).unwrap(),
        crate::ChangeBatch::Changes(vec![])
    );
    // The log goes on after the trimmed seqs (never reusing them).
    assert_eq!(f.meta.last_change().unwrap(), caught_up);
    let c = f.mk(ROOT_INO, "c", FileKind::Regular).ino;
    assert_eq!(
        changes_after(&f.meta, caught_up, f.meta.origin()),
        vec![(ROOT_INO, None), (c, entry(ROOT_INO, "c"))]
    );
    assert!(f.meta.last_change().unwrap() > caught_up);
}

fn concurrent_cross_directory_renames_never_create_a_loop_or_lose_a_directory(engine: Engine) {
    let f = Fixture::new(engine);
    // A tree of directories, renamed into each other by four "hosts" at once: each rename that
    // would put a directory under itself must fail, whatever the others do meanwhile.
    let mut dirs = vec![ROOT_INO];
    for i in 0..12 {
        let parent = dirs[i / 3];
        dirs.push(f.mk(parent, &format!("d{i}"), FileKind::Directory).ino);
    }
    let engines: Vec<SqlEngine> = (0..4).map(|_| f.reopen()).collect();
    let moved = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for meta in &engines {
            let (dirs, moved) = (&dirs, &moved);
            scope.spawn(move || {
                for _ in 0..60 {
                    let pick = |n: usize| (rand::random::<u64>() % n as u64) as usize;
                    let dir = dirs[1 + pick(dirs.len() - 1)];
                    let target = dirs[pick(dirs.len())];
                    let Ok(attr) = meta.getattr(dir) else {
                        continue;
                    };
                    let Ok(entries) = meta.readdir(attr.parent, 0, 1000, false) else {
                        continue;
                    };
                    let Some(entry) = entries.into_iter().find(|e| e.ino == dir) else {
                        continue;
                    };
                    let name = format!("m{}", rand::random::<u32>());
                    let req = Rename {
                        src_parent: attr.parent,
                        src_name: &entry.name,
                        dst_parent: target,
                        dst_name: name.as_bytes(),
                        mode: RenameMode::NoReplace,
                    };
                    match meta.rename(&req, NOW) {
                        Ok(_) => {
                            moved.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        // Moved meanwhile by another host, or under itself: refused.
                        Err(e) if [EINVAL, ENOENT].contains(&e.errno()) => {}
                        Err(e) => panic!("rename: {e}"),
                    }
                }
            });
        }
    });
    assert!(moved.load(std::sync::atomic::Ordering::SeqCst) > 20);
    assert_eq!(f.meta.check(false).unwrap(), Vec::<String>::new());
    // Every directory is still reachable from the root.
    let mut reachable = vec![ROOT_INO];
    let mut next = 0;
    while next < reachable.len() {
        let dir = reachable[next];
        next += 1;
        for entry in f.meta.readdir(dir, 0, 1000, false).unwrap() {
            reachable.push(entry.ino);
        }
    }
    reachable.sort_unstable();
    let mut all = dirs.clone();
    all.sort_unstable();
    assert_eq!(reachable, all);
}

fn renames_that_together_would_close_a_loop_cannot_both_commit(engine: Engine) {
    let f = Fixture::new(engine);
    let (one, two) = (f.reopen(), f.reopen());
    for round in 0..20 {
        // root/pa/a/a1/a2 and root/pb/b/b1/b2: moving a under b2 and b under a2 at once writes
        // disjoint rows; only the ancestor walks of each read what the other writes.
        let chain = |prefix: &str| {
            let mut parent = f
                .mk(ROOT_INO, &format!("p{prefix}{round}"), FileKind::Directory)
                .ino;
            let mut inos = Vec::new();
            for level in 0..3 {
                parent = f
                    .mk(parent, &format!("{prefix}{level}"), FileKind::Directory)
                    .ino;
                inos.push(parent);
            }
            inos
        };
        let (a, b) = (chain("a"), chain("b"));
        let barrier = std::sync::Barrier::new(2);
        let results: Vec<bool> = std::thread::scope(|scope| {
            let moves = [(&one, &a, &b, "a"), (&two, &b, &a, "b")];
            let handles: Vec<_> = moves
                .into_iter()
                .map(|(meta, mine, theirs, prefix)| {
                    let barrier = &barrier;
                    scope.spawn(move || {
                        let parent = meta.getattr(mine[0]).unwrap().parent;
                        let name = format!("{prefix}0");
                        let req = Rename {
                            src_parent: parent,
                            src_name: name.as_bytes(),
                            dst_parent: theirs[2],
                            dst_name: b"moved",
                            mode: RenameMode::NoReplace,
                        };
                        barrier.wait();
                        match meta.rename(&req, NOW) {
                            Ok(_) => true,
                            Err(e) if e.errno() == EINVAL => false,
                            Err(e) => panic!("rename: {e}"),
                        }
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(
            results.iter().filter(|moved| **moved).count(),
            1,
            "round {round}: exactly one of the two renames may commit"
        );
    }
    assert_eq!(f.meta.check(false).unwrap(), Vec::<String>::new());
}

#[test]
fn postgres_waiters_are_woken_after_the_listener_reconnects() {
    let f = Fixture::new(Engine::Postgres);
    let writer = f.reopen();
    let wait_for_a_commit = |name: &str| {
        let after = f.meta.last_change().unwrap();
        std::thread::scope(|scope| {
            let waiter = scope.spawn(|| {
                f.meta
                    .wait_for_changes(after, std::time::Duration::from_secs(30))
                    .unwrap();
                std::time::Instant::now()
            });
            std::thread::sleep(std::time::Duration::from_millis(300));
            writer
                .create_node(ROOT_INO, name.as_bytes(), &node(FileKind::Regular), NOW)
                .unwrap();
            let committed = std::time::Instant::now();
            let woke = waiter.join().unwrap();
            woke.saturating_duration_since(committed)
        })
    };
    assert!(wait_for_a_commit("before") < std::time::Duration::from_secs(1));
    // Cut the listener's connection: it reconnects, and notifications reach waiters again.
    let killed = f
        .meta
        .db
        .write(|tx| {
            tx.query_row(
                "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = ?1",
                cellar_sql::params![cellar_sql::LISTENER_NAME],
                |row| row.get::<_, i64>(0),
            )
        })
        .unwrap();
    assert!(killed >= 1);
    let delay = wait_for_a_commit("after");
    assert!(
        delay < std::time::Duration::from_secs(3),
        "woke {delay:?} after the commit"
    );
    assert!(wait_for_a_commit("again") < std::time::Duration::from_secs(1));
}

fn destroy_deletes_the_volume_metadata(engine: Engine) {
    let f = Fixture::new(engine);
    f.mk(ROOT_INO, "file", FileKind::Regular);
    let other = Fixture::new(engine);
    other.mk(ROOT_INO, "kept", FileKind::Regular);
    crate::destroy(&f.url).unwrap();
    crate::destroy(&f.url).unwrap();
    // Opened again, the volume is new; another volume of the database is untouched.
    let reopened = f.reopen();
    assert_eq!(reopened.volume().unwrap(), None);
    assert_eq!(other.meta.lookup(ROOT_INO, b"kept").unwrap().nlink, 1);
}

fn locks_hold_across_engines_until_the_holders_session_is_reaped(engine: Engine) {
    let f = Fixture::new(engine);
    let file = f.mk(ROOT_INO, "locked", FileKind::Regular);
    let other_host = f.reopen();
    // The holder's session (its heartbeat is from long ago by the engine's clock) and a live one.
    let holder = LockOwner {
        session: f.session,
        owner: 1,
    };
    let waiter = LockOwner {
        session: open_session(&other_host, wall_clock_ns()),
        owner: 2,
    };
    let whole = |kind| LockRange {
        start: 0,
        end: u64::MAX,
        kind,
        pid: 9,
    };
    assert!(f
        .meta
        .setlk(file.ino, holder, &whole(LockKind::Write))
        .unwrap());
    assert!(!other_host
        .setlk(file.ino, waiter, &whole(LockKind::Read))
        .unwrap());
    assert_eq!(
        other_host
            .getlk(file.ino, waiter, &whole(LockKind::Read))
            .unwrap(),
        Some(whole(LockKind::Write))
    );
    assert_eq!(
        other_host
            .reap_stale_sessions(MAX_AGE, Some(waiter.session))
            .unwrap(),
        1
    );
    assert!(other_host
        .setlk(file.ino, waiter, &whole(LockKind::Read))
        .unwrap());
    assert_eq!(errno(f.meta.heartbeat(holder.session)), ESTALE);
}

#[test]
fn postgres_transactions_survive_the_server_closing_idle_connections() {
    // A pool of its own (the URL differs), whose connections alone are cut.
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "{}&application_name=cellar-restart-test",
        fresh_meta_url(Engine::Postgres, dir.path())
    );
    let meta = open_engine(&url);
    meta.format(&volume("vol")).unwrap();
    let mk = |name: &str| {
        meta.create_node(ROOT_INO, name.as_bytes(), &node(FileKind::Regular), NOW)
            .unwrap()
    };
    mk("before");
    // As a restart of the server would, with the pool holding idle connections.
    std::thread::scope(|scope| {
        for i in 0..4 {
            let mk = &mk;
            scope.spawn(move || mk(&format!("busy{i}")));
        }
    });
    let cut: i64 = meta
        .db
        .write(|tx| {
            tx.query_row(
                "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND application_name = 'cellar-restart-test'",
                (),
                |row| row.get(0),
            )
        })
        .unwrap();
    assert!(cut >= 1, "no idle connection to cut");
    // Concurrent transactions take the cut connections out of the pool too (the cut is
    // asynchronous: some find out at BEGIN, some in the middle of their transaction).
    std::thread::scope(|scope| {
        for i in 0..4 {
            let mk = &mk;
            scope.spawn(move || {
                for j in 0..5 {
                    mk(&format!("after{i}-{j}"));
                }
            });
        }
    });
    assert_eq!(meta.readdir(ROOT_INO, 0, 100, false).unwrap().len(), 25);
    crate::destroy(&url).unwrap();
}

#[test]
fn postgres_commits_wake_the_waiters_of_another_host() {
    // Two "hosts": the URLs differ, so each has its own pool and LISTEN connection.
    let f = Fixture::new(Engine::Postgres);
    let other_host = open_engine(&format!("{}&application_name=cellar-other-host", f.url));
    let after = other_host.last_change().unwrap();
    let delay = std::thread::scope(|scope| {
        let waiter = scope.spawn(|| {
            other_host
                .wait_for_changes(after, std::time::Duration::from_secs(30))
                .unwrap();
            std::time::Instant::now()
        });
        std::thread::sleep(std::time::Duration::from_millis(300));
        let file = f.mk(ROOT_INO, "pushed", FileKind::Regular);
        let committed = std::time::Instant::now();
        (
            waiter.join().unwrap().saturating_duration_since(committed),
            file,
        )
    });
    assert!(
        delay.0 < std::time::Duration::from_secs(1),
        "woke {:?} after the commit",
        delay.0
    );
    assert_eq!(
        changes_after(&other_host, after, f.meta.origin()),
        vec![(ROOT_INO, None), (delay.1.ino, entry(ROOT_INO, "pushed"))]
    );
}

fn a_session_opened_by_a_host_whose_clock_lags_is_live(engine: Engine) {
    let f = Fixture::new(engine);
    let lagging = SessionInfo {
        host: "behind".into(),
        pid: 1,
        mount_point: "/mnt".into(),
        now_ns: wall_clock_ns() - 10 * MAX_AGE,
    };
    let session = f.meta.open_session(&lagging).unwrap();
    assert_eq!(f.meta.live_sessions(MAX_AGE).unwrap(), vec![session]);
    assert_eq!(
        f.reopen().reap_stale_sessions(MAX_AGE, None).unwrap(),
        1,
        "only the fixture's stale session"
    );
    f.meta.heartbeat(session).unwrap();
}

// ---- held bytes, usage and quota ----

/// Usage bytes and `st_blocks` of `ino`, checked against each other where they must agree.
fn held(f: &Fixture, ino: Ino) -> u64 {
    let blocks = f.meta.getattr(ino).unwrap().blocks;
    let bytes = f.meta.usage().unwrap().bytes;
    assert_eq!(
        blocks,
        bytes.div_ceil(512),
        "the only file holds all the volume's bytes"
    );
    bytes
}

fn hole(len: u32, pos: u32) -> Slice {
    Slice {
        id: 0,
        size: 0,
        off: 0,
        len,
        pos,
    }
}

fn held_bytes_follow_writes_overwrites_holes_truncates_and_compaction(engine: Engine) {
    let f = Fixture::new(engine);
    let file = f.mk(ROOT_INO, "f", FileKind::Regular);
    let commit = |slices: &[(u64, Slice)], min_size: u64| {
        f.meta
            .commit_slices(file.ino, slices, min_size, None, NOW)
            .unwrap()
            .attr
    };
    let a = f.upload(1000, 0);
    commit(&[(0, a)], 1000);
    assert_eq!(held(&f, file.ino), 1000);
    // An overwrite inside the data holds nothing more; data past a gap adds only itself.
    let (b, c) = (f.upload(500, 500), f.upload(1000, 1500));
    commit(&[(0, b), (0, c)], 2500);
    assert_eq!(held(&f, file.ino), 2000);
    // A hole shadows what it covers; a later write over the hole holds again.
    commit(&[(0, hole(200, 100))], 0);
    assert_eq!(held(&f, file.ino), 1800);
    let d = f.upload(50, 150);
    commit(&[(0, d)], 0);
    assert_eq!(held(&f, file.ino), 1850);
    // Far away, in another chunk: the size grows by three chunks, the held bytes by 4096.
    let e = f.upload(4096, 0);
    let attr = commit(&[(3, e)], 3 * CHUNK + 4096);
    assert_eq!(attr.size, 3 * CHUNK + 4096);
    assert_eq!(attr.blocks, (1850u64 + 4096).div_ceil(512));
    assert_eq!(held(&f, file.ino), 1850 + 4096);

    // Truncating into chunk 0 frees chunk 3 and the cut tail; growing again adds nothing.
    f.meta.truncate(file.ino, 1700, NOW).unwrap();
    // Visible data below 1700: a 0..100, d 150..200, a 300..500, b 500..1000, c 1500..1700.
    assert_eq!(held(&f, file.ino), 100 + 50 + 700 + 200);
    f.meta.truncate(file.ino, 10 * CHUNK, NOW).unwrap();
    assert_eq!(held(&f, file.ino), 1050);
    assert_eq!(f.meta.check(false).unwrap(), Vec::<String>::new());

    // Compaction (one object, a slice per run of data) changes nothing.
    let slices = f.meta.read_chunk(file.ino, 0).unwrap();
    let object = f.upload(1050, 0);
    let run = |off: u32, len: u32, pos: u32| Slice {
        id: object.id,
        size: 1050,
        off,
        len,
        pos,
    };
    let runs = [
        run(0, 100, 0),
        run(100, 50, 150),
        run(150, 700, 300),
        run(850, 200, 1500),
    ];
    assert!(f.meta.replace_chunk(file.ino, 0, &slices, &runs).unwrap());
    assert_eq!(f.meta.read_chunk(file.ino, 0).unwrap(), runs.to_vec());
    assert_eq!(held(&f, file.ino), 1050);
    assert_eq!(f.meta.check(false).unwrap(), Vec::<String>::new());

    // Emptied, the file is inline again: it holds its bytes.
    f.meta.truncate(file.ino, 0, NOW).unwrap();
    assert_eq!(held(&f, file.ino), 0);
    f.meta
        .write_inline(file.ino, &[(0, b"0123456789")], &SetAttr::default(), NOW)
        .unwrap()
        .unwrap();
    assert_eq!(held(&f, file.ino), 10);
    // Grown past the inline threshold by truncate, it holds only its stored bytes.
    f.meta.truncate(file.ino, 1 << 30, NOW).unwrap();
    assert_eq!(held(&f, file.ino), 10);
    assert_eq!(f.meta.check(false).unwrap(), Vec::<String>::new());
}

/// Held bytes against a byte map (in cells of 256 bytes) through random commits of data and
/// holes over three chunks, overlapping each other, and random truncates.
fn held_bytes_match_a_model_through_random_commits_holes_and_truncates(engine: Engine) {
    const CELL: u64 = 256;
    const PER_CHUNK: u64 = CHUNK / CELL;
    let f = Fixture::new(engine);
    let file = f.mk(ROOT_INO, "f", FileKind::Regular);
    let mut model = vec![false; (3 * PER_CHUNK) as usize];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    for step in 0..400 {
        if next(10) == 0 {
            let size = next(3 * PER_CHUNK + 1) * CELL;
            f.meta.truncate(file.ino, size, NOW).unwrap();
            model[(size / CELL) as usize..].fill(false);
        } else {
            let chunk = next(3);
            let start = next(PER_CHUNK);
            let len = 1 + next((PER_CHUNK - start).min(256));
            let is_hole = next(4) == 0;
            let (pos, bytes) = ((start * CELL) as u32, (len * CELL) as u32);
            let piece = if is_hole {
                hole(bytes, pos)
            } else {
                f.upload(bytes, pos)
            };
            let end = chunk * CHUNK + (start + len) * CELL;
            f.meta
                .commit_slices(file.ino, &[(chunk, piece)], end, None, NOW)
                .unwrap();
            let first = (chunk * PER_CHUNK + start) as usize;
            model[first..first + len as usize].fill(!is_hole);
        }
        let expected = model.iter().filter(|&&held| held).count() as u64 * CELL;
        assert_eq!(held(&f, file.ino), expected, "step {step}");
    }
    assert_eq!(f.meta.check(false).unwrap(), Vec::<String>::new());
}

fn quota_refuses_growth_past_it_and_keeps_what_was_committed(engine: Engine) {
    let f = Fixture::new(engine);
    assert_eq!(f.meta.quota().unwrap(), None);
    f.meta.set_quota(Some(3000)).unwrap();
    assert_eq!(
        f.reopen().quota().unwrap(),
        Some(3000),
        "another engine sees it"
    );
    let a = f.mk(ROOT_INO, "a", FileKind::Regular);
    let b = f.mk(ROOT_INO, "b", FileKind::Regular);
    let first = f.upload(2000, 0);
    f.meta
        .commit_slices(a.ino, &[(0, first)], 2000, None, NOW)
        .unwrap();

    // Past the quota: refused, and nothing of the commit happened.
    let refused = f.upload(1500, 0);
    assert_eq!(
        errno(
            f.meta
                .commit_slices(b.ino, &[(0, refused)], 1500, None, NOW)
        ),
        libc::EDQUOT
    );
    assert_eq!(f.meta.getattr(b.ino).unwrap().size, 0);
    assert_eq!(f.meta.read_chunk(b.ino, 0).unwrap(), vec![]);
    assert!(
        f.garbage_ids().contains(&refused.id),
        "the refused upload stays a pending upload (garbage later)"
    );
    assert_eq!(f.meta.usage().unwrap().bytes, 2000);
    assert_eq!(f.meta.read_chunk(a.ino, 0).unwrap(), vec![first]);

    // Overwrites do not grow the volume; small files count too.
    let rewrite = f.upload(2000, 0);
    f.meta
        .commit_slices(a.ino, &[(0, rewrite)], 2000, None, NOW)
        .unwrap();
    f.meta
        .write_inline(b.ino, &[(0, &[1u8; 32])], &SetAttr::default(), NOW)
        .unwrap();
    assert_eq!(f.meta.usage().unwrap().bytes, 2032);

    // A quota below the usage refuses growth but not rewrites or frees.
    f.meta.set_quota(Some(1000)).unwrap();
    assert_eq!(
        errno(
            f.meta
                .write_inline(b.ino, &[(32, b"x")], &SetAttr::default(), NOW)
        ),
        libc::EDQUOT
    );
    assert_eq!(f.inline(b.ino), Some(vec![1u8; 32]));
    f.meta
        .write_inline(b.ino, &[(0, b"y")], &SetAttr::default(), NOW)
        .unwrap();
    f.meta.truncate(a.ino, 500, NOW).unwrap();
    assert_eq!(f.meta.usage().unwrap().bytes, 532);
    let more = f.upload(400, 500);
    f.meta
        .commit_slices(a.ino, &[(0, more)], 900, None, NOW)
        .unwrap();
    assert_eq!(f.meta.usage().unwrap().bytes, 932);

    f.meta.set_quota(None).unwrap();
    assert_eq!(f.meta.quota().unwrap(), None);
    let big = f.upload(5000, 900);
    f.meta
        .commit_slices(a.ino, &[(0, big)], 5900, None, NOW)
        .unwrap();
    assert_eq!(errno(f.meta.set_quota(Some(u64::MAX))), EINVAL);
    assert_eq!(f.meta.check(false).unwrap(), Vec::<String>::new());
}

fn check_repairs_held_bytes_and_usage(engine: Engine) {
    let f = Fixture::new(engine);
    let file = f.mk(ROOT_INO, "f", FileKind::Regular);
    let s = f.upload(3000, 0);
    f.meta
        .commit_slices(file.ino, &[(0, s)], 3000, None, NOW)
        .unwrap();
    f.meta
        .raw(&format!(
            "UPDATE inodes SET held = 7 WHERE ino = {}",
            file.ino
        ))
        .unwrap();
    f.meta
        .raw("UPDATE usage_shards SET bytes = bytes + 5, inodes = inodes + 2 WHERE shard = 9")
        .unwrap();
    let problems = f.meta.check(false).unwrap();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].contains("7 held bytes"), "{problems:?}");
    f.meta.check(true).unwrap();
    assert_eq!(f.meta.check(false).unwrap(), Vec::<String>::new());
    assert_eq!(
        f.meta.getattr(file.ino).unwrap().blocks,
        3000u64.div_ceil(512)
    );
    let usage = f.meta.usage().unwrap();
    assert_eq!((usage.bytes, usage.inodes), (3000, 1));
}

/// A volume written before held bytes existed gets them, and its usage, when first opened.
fn a_volume_from_before_held_bytes_gets_them_on_open(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_meta_url(engine, dir.path());
    let db = match url.strip_prefix("sqlite://") {
        Some(path) => cellar_sql::Database::open_sqlite(std::path::Path::new(path)).unwrap(),
        None => {
            let pg = cellar_sql::PgUrl::parse(&url).unwrap();
            let schema = super::volume_schema(super::volume_of(&pg).unwrap()).unwrap();
            cellar_sql::Database::open_postgres(&pg, Some(&schema)).unwrap()
        }
    };
    let all = schema::MIGRATIONS.for_dialect(db.dialect());
    let before = &all[..all.len() - 1];
    db.migrate(&cellar_sql::Migrations {
        sqlite: before,
        postgres: before,
    })
    .unwrap();
    // The root; a chunked file of 3000 bytes holding 800 + 1000 (a hole in its first slice, a
    // gap before its second); an inline file of 5. The usage counted sizes (and the root).
    db.write(|tx| {
        tx.execute(
            "INSERT INTO volume (id, name, uuid, chunk_size, block_size, inline_threshold, created_ns)
             VALUES (1, 'vol', '00000000-0000-0000-0000-000000000001', 1048576, 262144, 64, 1)",
            (),
        )?;
        for (ino, kind, size, inline) in [
            (1i64, 2i64, 4096i64, None),
            (2, 1, 3000, None),
            (3, 1, 5, Some(b"hello".to_vec())),
        ] {
            tx.execute(
                "INSERT INTO inodes (ino, kind, perm, uid, gid, nlink, size, rdev, atime_ns, mtime_ns, ctime_ns, parent, inline_data)
                 VALUES (?1, ?2, 420, 0, 0, ?3, ?4, 0, 1, 1, 1, 1, ?5)",
                cellar_sql::params![ino, kind, if kind == 2 { 2i64 } else { 1 }, size, inline],
            )?;
        }
        for (name, ino) in [(b"chunked".to_vec(), 2i64), (b"inline".to_vec(), 3)] {
            tx.execute(
                "INSERT INTO dentries (parent, name, ino, kind) VALUES (1, ?1, ?2, 1)",
                cellar_sql::params![name, ino],
            )?;
        }
        for (id, size, len, pos) in [(5i64, 1000i64, 1000i64, 0i64), (0, 0, 200, 100), (6, 1000, 1000, 2000)] {
            tx.execute(
                "INSERT INTO chunk_slices (ino, chunk, id, size, off, len, pos) VALUES (2, 0, ?1, ?2, 0, ?3, ?4)",
                cellar_sql::params![id, size, len, pos],
            )?;
        }
        tx.batch(
            "UPDATE counters SET value = 4 WHERE name = 'next_ino';
             UPDATE counters SET value = 7 WHERE name = 'next_slice';
             UPDATE usage_shards SET bytes = 3005, inodes = 3 WHERE shard = 0;",
        )
    })
    .unwrap();
    drop(db);

    let meta = open_engine(&url);
    assert_eq!(meta.schema_version().unwrap(), all.len() as i64);
    assert_eq!(meta.getattr(2).unwrap().blocks, 1800u64.div_ceil(512));
    assert_eq!(meta.getattr(3).unwrap().blocks, 1);
    let usage = meta.usage().unwrap();
    assert_eq!((usage.bytes, usage.inodes), (1805, 2));
    assert_eq!(meta.check(false).unwrap(), Vec::<String>::new());
    assert_eq!(
        meta.raw("UPDATE counters SET value = 1 WHERE name = 'held_recount'")
            .unwrap(),
        0,
        "the recount is done once"
    );
}

// ---- copies by reference, holes ----

/// What `ino` reads as over `[0, end)`, as (id, off) per byte (id 0: zeros), from its chunk maps.
fn bytes_of(f: &Fixture, ino: Ino, end: u64) -> Vec<(u64, u32)> {
    let size = f.meta.getattr(ino).unwrap().size;
    let mut out = vec![(0, 0); end as usize];
    for chunk in 0..end.div_ceil(CHUNK) {
        for s in f.meta.read_chunk(ino, chunk).unwrap() {
            for i in 0..s.len {
                let at = chunk * CHUNK + u64::from(s.pos + i);
                if at < end.min(size) {
                    out[at as usize] = if s.id == 0 { (0, 0) } else { (s.id, s.off + i) };
                }
            }
        }
    }
    out
}

fn copy_range_references_the_source_slices_and_keeps_holes(engine: Engine) {
    let f = Fixture::new(engine);
    let src = f.mk(ROOT_INO, "src", FileKind::Regular);
    let dst = f.mk(ROOT_INO, "dst", FileKind::Regular);
    // Source: data 0..3000 (two slices, the second over the first), a hole 1000..1200, nothing
    // 3000..CHUNK+100, data CHUNK+100..CHUNK+600.
    let (a, b, c) = (f.upload(2000, 0), f.upload(2000, 1000), f.upload(500, 100));
    f.meta
        .commit_slices(
            src.ino,
            &[(0, a), (0, b), (0, hole(200, 1000)), (1, c)],
            CHUNK + 600,
            None,
            NOW,
        )
        .unwrap();
    let garbage_before = f.garbage_ids();
    // Copied at a shifted, unaligned offset: across the chunk boundary of the destination.
    let shift = CHUNK - 1500;
    let copied = f
        .meta
        .copy_range(src.ino, 500, dst.ino, shift + 500, CHUNK + 1000, NOW + 5)
        .unwrap()
        .unwrap();
    assert_eq!(copied.len, CHUNK + 100, "clipped to the source's size");
    let attr = copied.committed.attr;
    assert_eq!(attr.size, shift + CHUNK + 600);
    assert_eq!(attr.mtime_ns, NOW + 5);
    let want = bytes_of(&f, src.ino, CHUNK + 600);
    let got = bytes_of(&f, dst.ino, shift + CHUNK + 600);
    assert_eq!(&got[shift as usize + 500..], &want[500..]);
    assert!(got[..shift as usize + 500].iter().all(|b| b.0 == 0));
    // Held bytes: the copied data only (2800 below 3000 minus the 200-byte hole, plus 500).
    assert_eq!(
        f.meta.getattr(dst.ino).unwrap().blocks,
        (2300u64 + 500).div_ceil(512)
    );
    assert_eq!(f.meta.usage().unwrap().bytes, 3300 + 2800);
    assert_eq!(f.garbage_ids(), garbage_before, "nothing became garbage");
    assert_eq!(f.meta.check(false).unwrap(), Vec::<String>::new());

    // Deleting the source keeps every slice the copy references out of garbage.
    f.unlink(ROOT_INO, "src").unwrap();
    let references = f.meta.slice_references().unwrap();
    let live: Vec<u64> = references.live.iter().map(|(id, _)| *id).collect();
    for id in [a.id, b.id, c.id] {
        assert!(
            live.contains(&id),
            "slice {id} still referenced by the copy"
        );
        assert!(!references.garbage.contains(&id));
    }
    assert_eq!(bytes_of(&f, dst.ino, shift + CHUNK + 600), got);
    assert_eq!(f.meta.check(false).unwrap(), Vec::<String>::new());
    // Deleting the copy too makes them garbage, once each.
    f.unlink(ROOT_INO, "dst").unwrap();
    let garbage = f.garbage_ids();
    for id in [a.id, b.id, c.id] {
        assert!(garbage.contains(&id));
    }
    assert_eq!(f.meta.check(false).unwrap(), Vec::<String>::new());
}

fn copy_range_over_old_data_punches_the_source_holes_and_leaves_inline_files(engine: Engine) {
    let f = Fixture::new(engine);
    let src = f.mk(ROOT_INO, "src", FileKind::Regular);
    let dst = f.mk(ROOT_INO, "dst", FileKind::Regular);
    let a = f.upload(100, 0);
    // Source: 100 bytes of data then 900 never written.
    f.meta
        .commit_slices(src.ino, &[(0, a)], 1000, None, NOW)
        .unwrap();
    let old = f.upload(1000, 0);
    f.meta
        .commit_slices(dst.ino, &[(0, old)], 1000, None, NOW)
        .unwrap();
    f.meta
        .copy_range(src.ino, 0, dst.ino, 0, 1000, NOW)
        .unwrap()
        .unwrap();
    let got = bytes_of(&f, dst.ino, 1000);
    assert!(got[..100]
        .iter()
        .enumerate()
        .all(|(i, b)| *b == (a.id, i as u32)));
    assert!(
        got[100..].iter().all(|b| b.0 == 0),
        "the source's gap reads as zeros"
    );
    assert_eq!(f.meta.getattr(dst.ino).unwrap().blocks, 1);
    // The overwritten slice is shadowed, not dropped: it stays referenced.
    assert!(!f.garbage_ids().contains(&old.id));

    // Inline files on either side are the caller's to copy.
    let small = f.mk(ROOT_INO, "small", FileKind::Regular);
    f.meta
        .write_inline(small.ino, &[(0, b"abc")], &SetAttr::default(), NOW)
        .unwrap()
        .unwrap();
    assert_eq!(
        f.meta.copy_range(small.ino, 0, dst.ino, 0, 3, NOW).unwrap(),
        None
    );
    assert_eq!(
        f.meta
            .copy_range(src.ino, 0, small.ino, 0, 100, NOW)
            .unwrap(),
        None
    );
    assert_eq!(f.inline(small.ino).unwrap(), b"abc");
    // An empty destination (inline, no bytes) takes the slices; past the end copies nothing.
    let empty = f.mk(ROOT_INO, "empty", FileKind::Regular);
    assert_eq!(
        f.meta
            .copy_range(src.ino, 1000, empty.ino, 0, 10, NOW)
            .unwrap()
            .unwrap()
            .len,
        0
    );
    let copied = f
        .meta
        .copy_range(src.ino, 0, empty.ino, 0, 1 << 20, NOW)
        .unwrap()
        .unwrap();
    assert_eq!((copied.len, copied.committed.attr.size), (1000, 1000));
    assert_eq!(f.inline(empty.ino), None);
    // Within one file, to a range after the source.
    f.meta
        .copy_range(src.ino, 0, src.ino, 2000, 1000, NOW)
        .unwrap()
        .unwrap();
    let whole = bytes_of(&f, src.ino, 3000);
    assert_eq!(whole[2000..], whole[..1000]);
    assert_eq!(f.meta.check(false).unwrap(), Vec::<String>::new());
    // Directories refuse.
    let dir = f.mk(ROOT_INO, "d", FileKind::Directory);
    assert_eq!(
        errno(f.meta.copy_range(src.ino, 0, dir.ino, 0, 10, NOW)),
        EISDIR
    );
}

fn copy_range_counts_against_the_quota(engine: Engine) {
    let f = Fixture::new(engine);
    let src = f.mk(ROOT_INO, "src", FileKind::Regular);
    let dst = f.mk(ROOT_INO, "dst", FileKind::Regular);
    let a = f.upload(2000, 0);
    f.meta
        .commit_slices(src.ino, &[(0, a)], 2000, None, NOW)
        .unwrap();
    f.meta.set_quota(Some(3000)).unwrap();
    assert_eq!(
        errno(f.meta.copy_range(src.ino, 0, dst.ino, 0, 2000, NOW)),
        libc::EDQUOT
    );
    assert_eq!(
        f.meta.getattr(dst.ino).unwrap().size,
        0,
        "a refused copy changes nothing"
    );
    f.meta
        .copy_range(src.ino, 0, dst.ino, 0, 1000, NOW)
        .unwrap()
        .unwrap();
    assert_eq!(f.meta.usage().unwrap().bytes, 3000);
}

/// Garbage rows of slices a chunk still references are never due (a writer that could not
/// tell whether its commit went through re-dates its slices as garbage).
fn gc_never_lists_a_referenced_slice(engine: Engine) {
    let f = Fixture::new(engine);
    let file = f.mk(ROOT_INO, "f", FileKind::Regular);
    let a = f.upload(100, 0);
    f.meta
        .commit_slices(file.ino, &[(0, a)], 100, None, NOW)
        .unwrap();
    f.meta
        .add_garbage(
            &[GarbageSlice {
                id: a.id,
                size: 100,
            }],
            NOW,
        )
        .unwrap();
    assert_eq!(f.meta.garbage_slices(i64::MAX, 10).unwrap(), vec![]);
    f.unlink(ROOT_INO, "f").unwrap();
    assert_eq!(
        f.meta.garbage_slices(i64::MAX, 10).unwrap(),
        vec![GarbageSlice {
            id: a.id,
            size: 100
        }]
    );
}

fn zero_range_makes_holes_that_hold_nothing(engine: Engine) {
    let f = Fixture::new(engine);
    let file = f.mk(ROOT_INO, "f", FileKind::Regular);
    let a = f.upload(3000, 0);
    let b = f.upload(1000, 0);
    f.meta
        .commit_slices(file.ino, &[(0, a), (1, b)], CHUNK + 1000, None, NOW)
        .unwrap();
    let version = f.version(file.ino);
    // A punched hole across the chunk boundary, the size kept.
    let attr = f
        .meta
        .zero_range(file.ino, 2000, CHUNK - 1500, true, NOW + 7)
        .unwrap()
        .attr;
    assert_eq!(attr.size, CHUNK + 1000);
    assert_eq!(attr.mtime_ns, NOW + 7);
    assert_eq!(attr.data_version, version + 1);
    assert_eq!(held(&f, file.ino), 2000 + 500);
    let bytes = bytes_of(&f, file.ino, CHUNK + 1000);
    assert!(bytes[2000..CHUNK as usize + 500].iter().all(|b| b.0 == 0));
    assert_eq!(bytes[1999], (a.id, 1999));
    assert_eq!(bytes[CHUNK as usize + 500], (b.id, 500));
    // Zeroing past the end grows the file without holding more; keep_size past it is a no-op.
    let attr = f
        .meta
        .zero_range(file.ino, 0, 4 * CHUNK, false, NOW)
        .unwrap()
        .attr;
    assert_eq!((attr.size, held(&f, file.ino)), (4 * CHUNK, 0));
    let attr = f
        .meta
        .zero_range(file.ino, 5 * CHUNK, 10, true, NOW)
        .unwrap()
        .attr;
    assert_eq!(attr.size, 4 * CHUNK);
    assert_eq!(
        f.meta.next_data_chunk(file.ino, 0).unwrap(),
        Some(0),
        "a hint only"
    );
    assert_eq!(f.meta.next_data_chunk(file.ino, 2).unwrap(), None);
    // The shadowed slices stay referenced until the file goes.
    assert!(!f.garbage_ids().contains(&a.id));
    assert_eq!(f.meta.check(false).unwrap(), Vec::<String>::new());

    // Inline bytes are zeroed in place (an inline file holds its bytes, zeros included).
    let small = f.mk(ROOT_INO, "small", FileKind::Regular);
    f.meta
        .write_inline(small.ino, &[(0, b"0123456789")], &SetAttr::default(), NOW)
        .unwrap()
        .unwrap();
    f.meta.zero_range(small.ino, 2, 3, true, NOW).unwrap();
    assert_eq!(f.inline(small.ino).unwrap(), b"01\x00\x00\x0056789");
    let attr = f
        .meta
        .zero_range(small.ino, 8, 10, false, NOW)
        .unwrap()
        .attr;
    assert_eq!(attr.size, 18);
    assert_eq!(
        f.inline(small.ino).unwrap(),
        b"01\x00\x00\x00567\0\0\0\0\0\0\0\0\0\0"
    );
    assert_eq!(f.meta.check(false).unwrap(), Vec::<String>::new());
}

/// Every test above that takes an engine, once per engine.
macro_rules! on_every_engine {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[test]
            fn $name() {
                super::$name(crate::testing::Engine::Sqlite)
            })*
        }
        mod postgres {
            $(#[test]
            fn $name() {
                super::$name(crate::testing::Engine::Postgres)
            })*
        }
    };
}

on_every_engine!(
    copy_range_references_the_source_slices_and_keeps_holes,
    copy_range_over_old_data_punches_the_source_holes_and_leaves_inline_files,
    copy_range_counts_against_the_quota,
    gc_never_lists_a_referenced_slice,
    zero_range_makes_holes_that_hold_nothing,
    held_bytes_follow_writes_overwrites_holes_truncates_and_compaction,
    held_bytes_match_a_model_through_random_commits_holes_and_truncates,
    quota_refuses_growth_past_it_and_keeps_what_was_committed,
    check_repairs_held_bytes_and_usage,
    a_volume_from_before_held_bytes_gets_them_on_open,
    a_session_opened_by_a_host_whose_clock_lags_is_live,
    locks_hold_across_engines_until_the_holders_session_is_reaped,
    destroy_deletes_the_volume_metadata,
    renames_that_together_would_close_a_loop_cannot_both_commit,
    concurrent_cross_directory_renames_never_create_a_loop_or_lose_a_directory,
    migrations_apply_from_empty_and_refuse_newer_databases,
    format_is_idempotent_and_refuses_another_volume,
    create_lookup_and_their_errors,
    setattr_changes_mode_owner_and_times,
    unlink_rmdir_and_link_rules,
    rename_moves_and_replaces,
    rename_refuses_moving_a_directory_into_its_own_subtree,
    rename_exchange_swaps_entries_and_link_counts,
    rename_between_hard_links_of_one_inode_does_nothing,
    readdir_cookies_stay_stable_while_the_directory_changes,
    unlinked_open_files_are_sustained_until_their_last_close,
    an_open_file_replaced_by_rename_is_sustained_until_its_last_close,
    commit_read_truncate_and_garbage,
    committing_a_pending_upload_removes_its_garbage_row,
    inline_files,
    inline_write_applies_later_attribute_changes_in_its_transaction,
    xattrs,
    posix_locks_split_merge_and_conflict,
    two_engines_on_one_file_see_each_others_commits,
    check_finds_and_repairs_damage,
    write_inline_merges_the_extents_of_writers_without_losing_bytes,
    write_inline_declines_past_the_threshold_and_for_chunked_files,
    commit_without_a_pending_row_conflicts_and_changes_nothing,
    replace_chunk_refuses_a_slice_without_pending_row_and_changes_nothing,
    commit_drops_inline_bytes_only_at_the_version_it_read,
    commit_reports_the_slice_count_of_each_chunk_written,
    data_version_counts_content_changes_but_not_compaction,
    read_layout_returns_content_unless_the_version_is_known,
    leases_are_exclusive_renewable_and_taken_over_after_expiry,
    live_sessions_are_those_with_a_recent_heartbeat,
    sessions_are_found_by_host_and_mount_point,
    slice_references_hold_live_and_pending_slices,
    every_write_records_its_changed_inodes_and_entries,
    another_engine_sees_the_changes_and_its_wait_returns_at_the_commit,
    seqs_follow_commit_order_across_engines,
    trimmed_changes_are_reported_lost_to_watchers_behind_them,
);
