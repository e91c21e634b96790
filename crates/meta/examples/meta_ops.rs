//! Metadata operations per second through the engine: create, stat (lookup), rename and unlink
//! of small files, by THREADS threads sharing one engine (as a mount's threads do), each in a
//! directory of its own (or all in one with `same-dir`).
//!
//!     cargo run --release -p cellar-meta --example meta_ops -- URL THREADS FILES [same-dir]
//!
//! URL: `sqlite:///tmp/bench.db` or `postgres://USER:PASS@HOST:PORT/DB?volume=bench` (the
//! volume is destroyed first, so every run starts empty).

use std::time::Instant;

use cellar_meta::{FileKind, MetaEngine, NewNode, Rename, RenameMode, VolumeInfo, ROOT_INO};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, threads, files, rest @ ..] = args.as_slice() else {
        eprintln!("usage: meta_ops URL THREADS FILES [same-dir]");
        std::process::exit(2);
    };
    let threads: usize = threads.parse().expect("THREADS");
    let files: usize = files.parse().expect("FILES");
    let same_dir = rest.first().is_some_and(|a| a == "same-dir");
    cellar_meta::destroy(url).expect("destroying the old volume");
    let meta = cellar_meta::open(url).expect("opening the engine");
    meta.format(&VolumeInfo {
        name: "bench".into(),
        uuid: "00000000-0000-0000-0000-00000000b0b0".into(),
        chunk_size: 64 << 20,
        block_size: 4 << 20,
        inline_threshold: 4096,
        created_ns: 1,
    })
    .unwrap();
    let node = NewNode {
        kind: FileKind::Regular,
        perm: 0o644,
        uid: 0,
        gid: 0,
        rdev: 0,
        target: Vec::new(),
    };
    let dir_node = NewNode {
        kind: FileKind::Directory,
        perm: 0o755,
        ..node.clone()
    };
    let dirs: Vec<u64> = (0..threads)
        .map(|t| {
            if same_dir && t > 0 {
                return 0;
            }
            meta.create_node(ROOT_INO, format!("d{t}").as_bytes(), &dir_node, 1)
                .unwrap()
                .ino
        })
        .collect();
    let dirs: Vec<u64> = dirs
        .iter()
        .map(|&d| if d == 0 { dirs[0] } else { d })
        .collect();
    let phase = |name: &str, op: &(dyn Fn(&dyn MetaEngine, u64, usize, usize) + Sync)| {
        let started = Instant::now();
        let retries_before = cellar_sql::retries();
        std::thread::scope(|scope| {
            for (t, &dir) in dirs.iter().enumerate() {
                let meta = &meta;
                scope.spawn(move || {
                    for i in 0..files {
                        op(meta.as_ref(), dir, t, i);
                    }
                });
            }
        });
        let secs = started.elapsed().as_secs_f64();
        let ops = (threads * files) as f64;
        let retries = cellar_sql::retries() - retries_before;
        println!(
            "{name:>7}: {:>8.0} ops/s ({ops} in {secs:.2}s, {retries} transactions re-run)",
            ops / secs
        );
    };
    phase("create", &|meta, dir, t, i| {
        meta.create_node(dir, format!("f{t}-{i}").as_bytes(), &node, 2)
            .unwrap();
    });
    phase("stat", &|meta, dir, t, i| {
        meta.lookup(dir, format!("f{t}-{i}").as_bytes()).unwrap();
    });
    phase("rename", &|meta, dir, t, i| {
        let (from, to) = (format!("f{t}-{i}"), format!("g{t}-{i}"));
        let req = Rename {
            src_parent: dir,
            src_name: from.as_bytes(),
            dst_parent: dir,
            dst_name: to.as_bytes(),
            mode: RenameMode::Replace,
        };
        meta.rename(&req, 3).unwrap();
    });
    phase("unlink", &|meta, dir, t, i| {
        meta.unlink(dir, format!("g{t}-{i}").as_bytes(), 4).unwrap();
    });
    assert_eq!(meta.check(false).unwrap(), Vec::<String>::new());
}
