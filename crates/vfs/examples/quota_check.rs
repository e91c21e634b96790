//! What the quota check costs a write: the time of small sequential writes that stay in the
//! mount's buffer (no upload, no commit: the write path's own cost), without and with a quota.
//!
//!     cargo run --release -p cellar-vfs --example quota_check -- DIR [WRITES]
//!
//! DIR: an empty directory for the volume (SQLite metadata and a file:// store).

use std::time::Instant;

use cellar_vfs::{maintenance, Ctx, Vfs, VolumeConfig, ROOT_INO};

/// 8-byte writes: a million of them stay below the size that starts a background upload.
const WRITE: usize = 8;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (dir, writes) = match args.as_slice() {
        [_, dir] => (dir.clone(), 1_000_000),
        [_, dir, writes] => (dir.clone(), writes.parse().expect("WRITES")),
        _ => {
            eprintln!("usage: quota_check DIR [WRITES]");
            std::process::exit(2);
        }
    };
    let store = format!("{dir}/store");
    std::fs::create_dir_all(&store).unwrap();
    let config = VolumeConfig {
        meta_url: format!("sqlite://{dir}/meta.db"),
        store_url: format!("file://{store}"),
        volume: "bench".into(),
        cache_mem_bytes: 64 << 20,
        cache_dir: None,
        cache_disk_bytes: 0,
        mount_point: "/bench".into(),
        store_timeouts: Default::default(),
    };
    let ctx = Ctx {
        uid: 0,
        gid: 0,
        pid: 1,
    };
    let vfs = Vfs::open_volume(config.clone()).unwrap();
    let data = [7u8; WRITE];
    for (round, quota) in [None, Some(1u64 << 40), None, Some(1 << 40)]
        .into_iter()
        .enumerate()
    {
        maintenance::set_quota(&config, quota).unwrap();
        let name = format!("f{round}");
        let (attr, reply) = vfs
            .create(&ctx, ROOT_INO, name.as_bytes(), 0o644, 0, libc::O_RDWR)
            .unwrap();
        // The first write reads the quota; the rest use the reading (re-read each second).
        vfs.write(attr.ino, reply.fh, 0, &data).unwrap();
        let started = Instant::now();
        for i in 1..writes {
            vfs.write(attr.ino, reply.fh, (i * WRITE) as u64, &data)
                .unwrap();
        }
        let ns = started.elapsed().as_nanos() as f64 / (writes - 1) as f64;
        println!(
            "quota {:>4}: {ns:>6.0} ns per {WRITE}-byte write",
            if quota.is_some() { "set" } else { "none" }
        );
        vfs.flush(attr.ino, reply.fh, 0).unwrap();
        vfs.release(attr.ino, reply.fh, None).unwrap();
    }
    vfs.shutdown().unwrap();
}
