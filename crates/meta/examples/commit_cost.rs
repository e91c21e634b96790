//! What held bytes and a quota cost on the commit path: commits per second of THREADS writers
//! (one file each, appending 4 KiB slices, 64 per chunk) without a quota and with one (far
//! above the usage, so every commit pays the check and none is refused).
//!
//!     cargo run --release -p cellar-meta --example commit_cost -- URL THREADS COMMITS
//!
//! URL: `sqlite:///tmp/bench.db` or `postgres://USER:PASS@HOST:PORT/DB?volume=bench` (the
//! volume is destroyed before each run).

use std::time::Instant;

use cellar_meta::{FileKind, GarbageSlice, NewNode, Slice, VolumeInfo, ROOT_INO};

const SLICE: u32 = 4096;
const PER_CHUNK: u64 = 64;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, threads, commits] = args.as_slice() else {
        eprintln!("usage: commit_cost URL THREADS COMMITS");
        std::process::exit(2);
    };
    let threads: u64 = threads.parse().expect("THREADS");
    let commits: u64 = commits.parse().expect("COMMITS");
    for quota in [None, Some(1u64 << 50)] {
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
        meta.set_quota(quota).unwrap();
        // Files, slice ids and pending-upload rows first: only the commits are timed.
        let writers: Vec<(u64, u64)> = (0..threads)
            .map(|t| {
                let node = NewNode {
                    kind: FileKind::Regular,
                    perm: 0o644,
                    uid: 0,
                    gid: 0,
                    rdev: 0,
                    target: Vec::new(),
                };
                let ino = meta
                    .create_node(ROOT_INO, format!("f{t}").as_bytes(), &node, 1)
                    .unwrap()
                    .ino;
                let first = meta.alloc_slice_ids(commits).unwrap();
                let pending: Vec<GarbageSlice> = (first..first + commits)
                    .map(|id| GarbageSlice { id, size: SLICE })
                    .collect();
                meta.add_garbage(&pending, i64::MAX / 2).unwrap();
                (ino, first)
            })
            .collect();
        let retries_before = cellar_sql::retries();
        let started = Instant::now();
        std::thread::scope(|scope| {
            for &(ino, first) in &writers {
                let meta = &meta;
                scope.spawn(move || {
                    for i in 0..commits {
                        let slice = Slice {
                            id: first + i,
                            size: SLICE,
                            off: 0,
                            len: SLICE,
                            pos: (i % PER_CHUNK) as u32 * SLICE,
                        };
                        let end = (i / PER_CHUNK) * (64 << 20) + u64::from(slice.pos + SLICE);
                        meta.commit_slices(ino, &[(i / PER_CHUNK, slice)], end, None, 1)
                            .unwrap();
                    }
                });
            }
        });
        let secs = started.elapsed().as_secs_f64();
        let total = threads * commits;
        assert_eq!(meta.usage().unwrap().bytes, total * u64::from(SLICE));
        println!(
            "quota {:>5}: {:>7.0} commits/s ({total} in {secs:.2}s, {} transactions re-run)",
            if quota.is_some() { "set" } else { "none" },
            total as f64 / secs,
            cellar_sql::retries() - retries_before
        );
    }
}
