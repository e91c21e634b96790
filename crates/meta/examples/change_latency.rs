//! Time from a commit on one engine to the wake-up of `wait_for_changes` on another (a second
//! "host": for PostgreSQL its own pool and LISTEN connection), over COUNT commits.
//!
//!     cargo run --release -p cellar-meta --example change_latency -- URL COUNT
//!
//! URL as for `meta_ops` (the volume is destroyed first).

use std::time::{Duration, Instant};

use cellar_meta::{FileKind, NewNode, VolumeInfo, ROOT_INO};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, count] = args.as_slice() else {
        eprintln!("usage: change_latency URL COUNT");
        std::process::exit(2);
    };
    let count: usize = count.parse().expect("COUNT");
    cellar_meta::destroy(url).expect("destroying the old volume");
    let writer = cellar_meta::open(url).expect("opening the engine");
    writer
        .format(&VolumeInfo {
            name: "latency".into(),
            uuid: "00000000-0000-0000-0000-000000001a7e".into(),
            chunk_size: 64 << 20,
            block_size: 4 << 20,
            inline_threshold: 4096,
            created_ns: 1,
        })
        .unwrap();
    let other_url = if url.starts_with("postgres") {
        format!("{url}&application_name=cellar-latency-watcher")
    } else {
        url.clone()
    };
    let watcher = cellar_meta::open(&other_url).expect("opening the second engine");
    let node = NewNode {
        kind: FileKind::Regular,
        perm: 0o644,
        uid: 0,
        gid: 0,
        rdev: 0,
        target: Vec::new(),
    };
    let mut delays = Vec::with_capacity(count);
    for i in 0..count {
        let after = watcher.last_change().unwrap();
        let committed = std::thread::scope(|scope| {
            let commit = scope.spawn(|| {
                std::thread::sleep(Duration::from_millis(5));
                writer
                    .create_node(ROOT_INO, format!("f{i}").as_bytes(), &node, 1)
                    .unwrap();
                Instant::now()
            });
            watcher
                .wait_for_changes(after, Duration::from_secs(10))
                .unwrap();
            let woke = Instant::now();
            woke.saturating_duration_since(commit.join().unwrap())
        });
        delays.push(committed);
    }
    delays.sort();
    let at = |q: f64| delays[((delays.len() - 1) as f64 * q) as usize];
    println!(
        "commit → wake over {count}: p50 {:?}, p99 {:?}, max {:?}",
        at(0.5),
        at(0.99),
        delays[delays.len() - 1]
    );
}
