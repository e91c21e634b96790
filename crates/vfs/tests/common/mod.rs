//! Shared fixtures: a volume with a file:// store in a temp dir and its metadata on SQLite (a
//! file in the temp dir) or, with `CELLAR_TEST_META=postgres`, on PostgreSQL (a volume of its
//! own in `CELLAR_TEST_POSTGRES_URL`, or in a server the test process starts itself).
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Arc;

use cellar_meta::testing::Engine;
use cellar_meta::MetaEngine;
use cellar_store::{BlockStore, StoreOptions};
use cellar_vfs::{Attr, Ctx, Ino, Vfs, VolumeConfig, ROOT_INO};

pub struct TestVolume {
    pub dir: tempfile::TempDir,
    pub config: VolumeConfig,
}

impl TestVolume {
    /// A volume on the engine `CELLAR_TEST_META` names (`sqlite`, the default, or `postgres`).
    pub fn new() -> TestVolume {
        let engine = match std::env::var("CELLAR_TEST_META").as_deref() {
            Ok("postgres") => Engine::Postgres,
            Ok("sqlite") | Err(_) => Engine::Sqlite,
            Ok(other) => panic!("CELLAR_TEST_META={other}: expected sqlite or postgres"),
        };
        TestVolume::new_on(engine)
    }

    pub fn new_on(engine: Engine) -> TestVolume {
        let dir = tempfile::tempdir().unwrap();
        let store_dir = dir.path().join("store");
        std::fs::create_dir_all(&store_dir).unwrap();
        let config = VolumeConfig {
            meta_url: cellar_meta::testing::fresh_meta_url(engine, dir.path()),
            store_url: format!("file://{}", store_dir.display()),
            volume: "test".into(),
            cache_mem_bytes: 64 << 20,
            cache_dir: None,
            cache_disk_bytes: 0,
            mount_point: "/test".into(),
            store_timeouts: Default::default(),
        };
        TestVolume { dir, config }
    }

    pub fn mount(&self) -> Arc<Vfs> {
        Vfs::open_volume(self.config.clone()).unwrap()
    }

    /// A second connection to the metadata, to inspect what the vfs committed.
    pub fn meta(&self) -> Arc<dyn MetaEngine> {
        cellar_meta::open(&self.config.meta_url).unwrap()
    }

    /// Every object key in the volume's store.
    pub fn objects(&self) -> Vec<String> {
        let uuid = self.meta().volume().unwrap().unwrap().uuid;
        let options = StoreOptions {
            block_size: 4 << 20,
            cache_mem_bytes: 0,
            cache_dir: None,
            cache_disk_bytes: 0,
            max_retries: 0,
            timeouts: Default::default(),
        };
        let store = BlockStore::open(&self.config.store_url, &uuid, options).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut keys: Vec<String> = rt
            .block_on(store.list())
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        keys.sort();
        keys
    }

    /// Slice ids that have objects in the store.
    pub fn stored_slice_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .objects()
            .iter()
            .filter_map(|k| BlockStore::parse_block_key(k))
            .map(|(id, _, _)| id)
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    pub fn assert_fsck_clean(&self) {
        let problems = cellar_vfs::maintenance::fsck(&self.config, false, false).unwrap();
        assert!(problems.is_empty(), "fsck found problems: {problems:#?}");
    }
}

pub fn root() -> Ctx {
    Ctx {
        uid: 0,
        gid: 0,
        pid: 1,
    }
}

pub fn user(uid: u32) -> Ctx {
    Ctx {
        uid,
        gid: uid,
        pid: 2,
    }
}

/// Creates a file and returns (attr, read-write handle).
pub fn create(vfs: &Vfs, parent: Ino, name: &str) -> (Attr, u64) {
    let (attr, reply) = vfs
        .create(&root(), parent, name.as_bytes(), 0o644, 0o022, libc::O_RDWR)
        .unwrap();
    (attr, reply.fh)
}

pub fn create_in_root(vfs: &Vfs, name: &str) -> (Ino, u64) {
    let (attr, fh) = create(vfs, ROOT_INO, name);
    (attr.ino, fh)
}

pub fn close(vfs: &Vfs, ino: Ino, fh: u64) {
    vfs.flush(ino, fh, 42).unwrap();
    vfs.release(ino, fh, None).unwrap();
}

pub fn write_all(vfs: &Vfs, ino: Ino, fh: u64, offset: u64, data: &[u8]) {
    assert_eq!(
        vfs.write(ino, fh, offset, data).unwrap() as usize,
        data.len()
    );
}

/// Reads `len` bytes (or up to EOF) in pieces of at most 1 MiB, as the kernel would.
pub fn read_range(vfs: &Vfs, ino: Ino, fh: u64, offset: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::new();
    while (out.len() as u64) < len {
        let want = (len - out.len() as u64).min(1 << 20) as u32;
        let piece = vfs.read(ino, fh, offset + out.len() as u64, want).unwrap();
        if piece.is_empty() {
            break;
        }
        out.extend_from_slice(&piece);
    }
    out
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A sparse in-memory model of a file's content.
#[derive(Default)]
pub struct Model {
    pages: HashMap<u64, Vec<u8>>,
    pub size: u64,
}

const PAGE: u64 = 64 << 10;

impl Model {
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let at = offset + i as u64;
            self.pages
                .entry(at / PAGE)
                .or_insert_with(|| vec![0; PAGE as usize])[(at % PAGE) as usize] = *b;
        }
        self.size = self.size.max(offset + data.len() as u64);
    }

    pub fn truncate(&mut self, size: u64) {
        if size < self.size {
            for at in size..self.size.min((size / PAGE + 1) * PAGE) {
                if let Some(page) = self.pages.get_mut(&(at / PAGE)) {
                    page[(at % PAGE) as usize] = 0;
                }
            }
            self.pages.retain(|p, _| p * PAGE < size);
        }
        self.size = size;
    }

    pub fn read(&self, offset: u64, len: u64) -> Vec<u8> {
        let end = (offset + len).min(self.size);
        (offset..end.max(offset))
            .map(|at| {
                self.pages
                    .get(&(at / PAGE))
                    .map_or(0, |p| p[(at % PAGE) as usize])
            })
            .collect()
    }
}
