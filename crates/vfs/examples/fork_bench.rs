//! How long a snapshot and a fork take as a volume grows: volumes of each file count (100 files
//! per directory, 100 bytes each) are filled through the metadata engine (many threads, so
//! filling stays short), then snapshotted and forked with `maintenance::fork`, which is what
//! the server runs for `POST /api/volumes/{id}/snapshots` and `/fork`. Prints a Markdown row
//! per count.
//!
//!     cargo run --release -p cellar-vfs --example fork_bench -- DIR [COUNTS] [META]
//!
//! DIR: an empty directory (SQLite files and a file:// store); COUNTS: comma-separated file
//! counts (default 1000,10000,100000); META: a PostgreSQL URL (`postgres://...`) to measure
//! PostgreSQL instead of SQLite.

use std::sync::Arc;
use std::time::Instant;

use cellar_meta::{FileKind, MetaEngine, NewNode, ROOT_INO};
use cellar_vfs::{maintenance, VolumeConfig};

const PER_DIR: usize = 100;
const FILLERS: usize = 8;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(dir) = args.get(1) else {
        eprintln!("usage: fork_bench DIR [COUNTS] [META]");
        std::process::exit(2);
    };
    let counts: Vec<usize> = args
        .get(2)
        .map_or("1000,10000,100000", String::as_str)
        .split(',')
        .map(|n| n.parse().expect("COUNTS: numbers separated by commas"))
        .collect();
    let postgres = args.get(3).cloned();
    let store = format!("{dir}/store");
    std::fs::create_dir_all(&store).unwrap();
    let run = rand::random::<u32>();
    let config = |name: &str| VolumeConfig {
        meta_url: match &postgres {
            Some(url) => {
                let sep = if url.contains('?') { '&' } else { '?' };
                format!("{url}{sep}volume={name}_{run:08x}")
            }
            None => format!("sqlite://{dir}/{name}.db"),
        },
        store_url: format!("file://{store}"),
        volume: name.into(),
        cache_mem_bytes: 16 << 20,
        cache_dir: None,
        cache_disk_bytes: 0,
        mount_point: String::new(),
        store_timeouts: Default::default(),
    };
    let engine = if postgres.is_some() {
        "PostgreSQL"
    } else {
        "SQLite"
    };
    println!("| engine | files | fill s | snapshot s | fork s | fork of the fork s |");
    println!("|---|---:|---:|---:|---:|---:|");
    for files in counts {
        let origin = config(&format!("origin{files}"));
        maintenance::format(&origin).unwrap();
        let filled = Instant::now();
        fill(cellar_meta::open(&origin.meta_url).unwrap(), files);
        let fill_s = filled.elapsed().as_secs_f64();
        let timed = |from: &VolumeConfig, to: &VolumeConfig, read_only: bool| {
            let started = Instant::now();
            let stats = maintenance::fork(from, to, read_only).unwrap();
            assert!(stats.inodes as usize > files, "{stats:?}");
            started.elapsed().as_secs_f64()
        };
        let snapshot = timed(&origin, &config(&format!("snap{files}")), true);
        let fork_config = config(&format!("fork{files}"));
        let fork = timed(&origin, &fork_config, false);
        let fork_of_fork = timed(&fork_config, &config(&format!("forkfork{files}")), false);
        println!(
            "| {engine} | {files} | {fill_s:.1} | {snapshot:.3} | {fork:.3} | {fork_of_fork:.3} |"
        );
    }
}

/// `files` small inline files in directories of `PER_DIR`, written by `FILLERS` threads.
fn fill(meta: Arc<dyn MetaEngine>, files: usize) {
    let dirs = files.div_ceil(PER_DIR);
    std::thread::scope(|scope| {
        for filler in 0..FILLERS {
            let meta = meta.clone();
            scope.spawn(move || {
                for d in (filler..dirs).step_by(FILLERS) {
                    let dir = meta
                        .create_node(
                            ROOT_INO,
                            format!("d{d}").as_bytes(),
                            &node(FileKind::Directory),
                            0,
                        )
                        .unwrap();
                    for f in 0..PER_DIR.min(files - d * PER_DIR) {
                        let file = meta
                            .create_node(
                                dir.ino,
                                format!("f{f}").as_bytes(),
                                &node(FileKind::Regular),
                                0,
                            )
                            .unwrap();
                        meta.write_inline(file.ino, &[(0, &[b'x'; 100])], &Default::default(), 0)
                            .unwrap()
                            .expect("100 bytes stay inline");
                    }
                }
            });
        }
    });
}

fn node(kind: FileKind) -> NewNode {
    NewNode {
        kind,
        perm: if kind == FileKind::Directory {
            0o755
        } else {
            0o644
        },
        uid: 0,
        gid: 0,
        rdev: 0,
        target: Vec::new(),
    }
}
