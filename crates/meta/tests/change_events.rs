//! The change log read as events on paths (`MetaEngine::path_changes_since`), on SQLite and
//! PostgreSQL: kinds, rename sources, paths of directories renamed or removed later in the log
//! (in one batch and across batches), bookkeeping skipped, and `Lost` past the trimmed prefix.

use std::sync::Arc;

use cellar_meta::testing::{fresh_meta_url, Engine};
use cellar_meta::{
    ChangeKind, FileKind, Ino, MetaEngine, NewNode, PathChange, PathChangeBatch, Rename,
    RenameMode, SetAttr, VolumeInfo, ROOT_INO,
};

const NOW: i64 = 1_000;

struct Volume {
    _dir: tempfile::TempDir,
    meta: Arc<dyn MetaEngine>,
}

impl Volume {
    fn new(engine: Engine) -> Volume {
        let dir = tempfile::tempdir().unwrap();
        let meta = cellar_meta::open(&fresh_meta_url(engine, dir.path())).unwrap();
        meta.format(&VolumeInfo {
            name: "events".into(),
            uuid: "00000000-0000-0000-0000-000000000002".into(),
            chunk_size: 1 << 20,
            block_size: 1 << 18,
            inline_threshold: 64,
            created_ns: 1,
        })
        .unwrap();
        Volume { _dir: dir, meta }
    }

    fn mk(&self, parent: Ino, name: &str, kind: FileKind) -> Ino {
        let node = NewNode {
            kind,
            perm: 0o755,
            uid: 0,
            gid: 0,
            rdev: 0,
            target: Vec::new(),
        };
        self.meta
            .create_node(parent, name.as_bytes(), &node, NOW)
            .unwrap()
            .ino
    }

    fn rename(&self, from: (Ino, &str), to: (Ino, &str), mode: RenameMode) {
        self.meta
            .rename(
                &Rename {
                    src_parent: from.0,
                    src_name: from.1.as_bytes(),
                    dst_parent: to.0,
                    dst_name: to.1.as_bytes(),
                    mode,
                },
                NOW,
            )
            .unwrap();
    }

    /// Every event after `after`, read `limit` changes at a time.
    fn events(&self, after: u64, limit: usize) -> Vec<PathChange> {
        let mut position = after;
        let mut all = Vec::new();
        loop {
            match self.meta.path_changes_since(position, limit).unwrap() {
                PathChangeBatch::Changes { upto, events } => {
                    all.extend(events);
                    if upto == position {
                        return all;
                    }
                    position = upto;
                }
                PathChangeBatch::Lost => panic!("lost changes after {position}"),
            }
        }
    }
}

/// (kind, path, old path, is a directory) of each event.
fn summary(events: &[PathChange]) -> Vec<(ChangeKind, String, Option<String>, bool)> {
    let text = |path: &[u8]| String::from_utf8(path.to_vec()).unwrap();
    events
        .iter()
        .map(|event| {
            (
                event.kind,
                text(&event.path),
                event.old_path.as_deref().map(text),
                event.node == Some(FileKind::Directory),
            )
        })
        .collect()
}

fn ev(
    kind: ChangeKind,
    path: &str,
    old: Option<&str>,
    dir: bool,
) -> (ChangeKind, String, Option<String>, bool) {
    (kind, path.to_string(), old.map(str::to_string), dir)
}

fn each_engine(test: impl Fn(Engine)) {
    for engine in [Engine::Sqlite, Engine::Postgres] {
        test(engine);
    }
}

#[test]
fn every_operation_gives_its_kind_and_paths() {
    use ChangeKind::*;
    each_engine(|engine| {
        let v = Volume::new(engine);
        let start = v.meta.last_change().unwrap();
        let dir = v.mk(ROOT_INO, "d", FileKind::Directory);
        let file = v.mk(dir, "f", FileKind::Regular);
        v.meta
            .write_inline(file, &[(0, b"hello")], &SetAttr::default(), NOW)
            .unwrap()
            .expect("inline");
        let chmod = SetAttr {
            perm: Some(0o600),
            ..SetAttr::default()
        };
        v.meta.setattr(file, &chmod, NOW).unwrap();
        v.rename((dir, "f"), (dir, "g"), RenameMode::Replace);
        v.meta.link(file, ROOT_INO, b"hard", NOW).unwrap();
        v.mk(ROOT_INO, "other", FileKind::Regular);
        // Over an existing file: one rename, no removal of the replaced one.
        v.rename((ROOT_INO, "hard"), (ROOT_INO, "other"), RenameMode::Replace);
        v.mk(dir, "x", FileKind::Regular);
        v.rename((dir, "g"), (dir, "x"), RenameMode::Exchange);
        v.meta.unlink(ROOT_INO, b"other", NOW).unwrap();
        v.meta.unlink(dir, b"g", NOW).unwrap();
        v.meta.unlink(dir, b"x", NOW).unwrap();
        v.meta.rmdir(ROOT_INO, b"d", NOW).unwrap();
        let events = v.events(start, 1024);
        let mut got = summary(&events);
        // The two halves of the exchange, in either order.
        got[9..11].sort_by(|x, y| x.1.cmp(&y.1));
        assert_eq!(
            got,
            vec![
                ev(Created, "/d", None, true),
                ev(Created, "/d/f", None, false),
                ev(Modified, "/d/f", None, false),
                ev(Modified, "/d/f", None, false),
                ev(Renamed, "/d/g", Some("/d/f"), false),
                ev(Created, "/hard", None, false),
                ev(Created, "/other", None, false),
                ev(Renamed, "/other", Some("/hard"), false),
                ev(Created, "/d/x", None, false),
                ev(Renamed, "/d/g", Some("/d/x"), false),
                ev(Renamed, "/d/x", Some("/d/g"), false),
                ev(Removed, "/other", None, false),
                ev(Removed, "/d/g", None, false),
                ev(Removed, "/d/x", None, false),
                ev(Removed, "/d", None, true),
            ],
            "{engine:?}"
        );
        assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
        // Everything is gone: no attributes; a removal never has any.
        assert!(events.iter().all(|event| event.attr.is_none()));
    });
}

/// Changes under a directory renamed and then removed later in the log name the directory where
/// it was when they were made, whether the later changes are in the same batch or not.
#[test]
fn paths_are_those_of_the_time_of_the_change() {
    use ChangeKind::*;
    each_engine(|engine| {
        let v = Volume::new(engine);
        let start = v.meta.last_change().unwrap();
        let a = v.mk(ROOT_INO, "a", FileKind::Directory);
        let b = v.mk(a, "b", FileKind::Directory);
        let f = v.mk(b, "f", FileKind::Regular);
        v.meta
            .write_inline(f, &[(0, b"1234")], &SetAttr::default(), NOW)
            .unwrap()
            .expect("inline");
        v.rename((ROOT_INO, "a"), (ROOT_INO, "z"), RenameMode::Replace);
        v.mk(b, "g", FileKind::Regular);
        let kept = v.mk(ROOT_INO, "kept", FileKind::Regular);
        v.meta
            .write_inline(kept, &[(0, b"abc")], &SetAttr::default(), NOW)
            .unwrap()
            .expect("inline");
        v.meta.unlink(b, b"f", NOW).unwrap();
        v.meta.unlink(b, b"g", NOW).unwrap();
        v.meta.rmdir(a, b"b", NOW).unwrap();
        v.meta.rmdir(ROOT_INO, b"z", NOW).unwrap();
        let expected = vec![
            ev(Created, "/a", None, true),
            ev(Created, "/a/b", None, true),
            ev(Created, "/a/b/f", None, false),
            ev(Modified, "/a/b/f", None, false),
            ev(Renamed, "/z", Some("/a"), true),
            ev(Created, "/z/b/g", None, false),
            ev(Created, "/kept", None, false),
            ev(Modified, "/kept", None, false),
            ev(Removed, "/z/b/f", None, false),
            ev(Removed, "/z/b/g", None, false),
            ev(Removed, "/z/b", None, true),
            ev(Removed, "/z", None, true),
        ];
        for limit in [1024, 7, 1] {
            let events = v.events(start, limit);
            assert_eq!(summary(&events), expected, "{engine:?}, {limit} per batch");
            // The file that is still there has its current attributes.
            let kept_events: Vec<_> = events.iter().filter(|e| e.path == b"/kept").collect();
            assert!(kept_events
                .iter()
                .all(|e| e.attr.as_ref().map(|a| a.size) == Some(3)));
        }
    });
}

/// Bookkeeping changes are read (the position moves on) but give no event; a position before
/// the trimmed prefix is `Lost`.
#[test]
fn bookkeeping_is_skipped_and_a_trimmed_position_is_lost() {
    each_engine(|engine| {
        let v = Volume::new(engine);
        let file = v.mk(ROOT_INO, "f", FileKind::Regular);
        let before = v.meta.last_change().unwrap();
        v.meta
            .set_xattr(file, b"user.k", b"v", cellar_meta::XattrMode::Any, NOW)
            .unwrap();
        let end = v.meta.last_change().unwrap();
        assert!(end > before, "{engine:?}: an xattr change is logged");
        match v.meta.path_changes_since(before, 1024).unwrap() {
            PathChangeBatch::Changes { upto, events } => {
                assert_eq!(upto, end, "{engine:?}");
                assert!(events.is_empty(), "{engine:?}: {events:?}");
            }
            PathChangeBatch::Lost => panic!("{engine:?}: lost"),
        }
        v.meta.trim_changes(i64::MAX).unwrap();
        assert_eq!(
            v.meta.path_changes_since(before, 1024).unwrap(),
            PathChangeBatch::Lost,
            "{engine:?}"
        );
        // The end of the log stays a valid position.
        assert_eq!(
            v.meta.path_changes_since(end, 1024).unwrap(),
            PathChangeBatch::Changes {
                upto: end,
                events: Vec::new()
            }
        );
    });
}
