//! Block caches: memory (moka, weighted by bytes) in front of an optional size-bounded directory.
//!
//! Block objects are immutable, so a cached copy never goes stale and needs no validation.

use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Memory cache of whole blocks, keyed by the block's full object key.
pub(crate) type MemCache = moka::future::Cache<String, Bytes>;

pub(crate) fn mem_cache(budget_bytes: u64) -> MemCache {
    moka::future::Cache::builder()
        .max_capacity(budget_bytes)
        .weigher(|_key: &String, block: &Bytes| u32::try_from(block.len()).unwrap_or(u32::MAX))
        .build()
}

/// A directory of cached blocks, one file per block, evicted least-recently-used once the files
/// exceed the byte budget. Several stores (volumes) may share one directory: file names are
/// derived from the store-qualified key, and eviction only considers this process's view.
pub(crate) struct DiskCache {
    dir: PathBuf,
    budget_bytes: u64,
    index: Mutex<LruIndex>,
}

#[derive(Default)]
struct LruIndex {
    /// file name → (size, last use tick)
    entries: HashMap<String, (u64, u64)>,
    by_tick: BTreeMap<u64, String>,
    total_bytes: u64,
    tick: u64,
}

impl LruIndex {
    fn touch(&mut self, name: &str, size: u64) {
        self.tick += 1;
        if let Some((old_size, old_tick)) = self.entries.insert(name.to_string(), (size, self.tick))
        {
            self.by_tick.remove(&old_tick);
            self.total_bytes -= old_size;
        }
        self.by_tick.insert(self.tick, name.to_string());
        self.total_bytes += size;
    }

    fn remove(&mut self, name: &str) {
        if let Some((size, tick)) = self.entries.remove(name) {
            self.by_tick.remove(&tick);
            self.total_bytes -= size;
        }
    }

    /// Pops least-recently-used names until the total fits `budget`.
    fn evict_to(&mut self, budget: u64) -> Vec<String> {
        let mut evicted = Vec::new();
        while self.total_bytes > budget {
            let Some((_, name)) = self.by_tick.pop_first() else {
                break;
            };
            if let Some((size, _)) = self.entries.remove(&name) {
                self.total_bytes -= size;
            }
            evicted.push(name);
        }
        evicted
    }
}

/// Longest file name we create (most file systems allow 255 bytes).
const MAX_FILE_NAME: usize = 240;
/// Suffix of files being written; they are renamed into place when complete.
const PARTIAL_SUFFIX: &str = ".partial";

impl DiskCache {
    /// Opens (creating) the directory and indexes the blocks already in it, oldest first.
    pub fn open(dir: &Path, budget_bytes: u64) -> std::io::Result<DiskCache> {
        std::fs::create_dir_all(dir)?;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let meta = entry.metadata()?;
            if !meta.is_file() {
                continue;
            }
            if name.ends_with(PARTIAL_SUFFIX) {
                // Left over by a crash mid-write.
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            found.push((meta.modified().ok(), name, meta.len()));
        }
        found.sort();
        let mut index = LruIndex::default();
        for (_, name, size) in found {
            index.touch(&name, size);
        }
        let cache = DiskCache {
            dir: dir.to_path_buf(),
            budget_bytes,
            index: Mutex::new(index),
        };
        cache.evict();
        Ok(cache)
    }

    /// The file name of a key: percent-encoded, so distinct keys never collide.
    fn file_name(key: &str) -> Option<String> {
        let name: String = url::form_urlencoded::byte_serialize(key.as_bytes()).collect();
        (name.len() <= MAX_FILE_NAME && !name.starts_with('.')).then_some(name)
    }

    /// The cached block, if present and of the expected length (anything else is discarded).
    pub async fn get(&self, key: &str, expected_len: usize) -> Option<Bytes> {
        let name = Self::file_name(key)?;
        if !self.index.lock().entries.contains_key(&name) {
            return None;
        }
        let path = self.dir.join(&name);
        match tokio::fs::read(&path).await {
            Ok(data) if data.len() == expected_len => {
                self.index.lock().touch(&name, data.len() as u64);
                Some(Bytes::from(data))
            }
            Ok(_) => {
                tracing::warn!(path = %path.display(), "discarding cached block of wrong length");
                self.index.lock().remove(&name);
                let _ = tokio::fs::remove_file(&path).await;
                None
            }
            Err(_) => {
                self.index.lock().remove(&name);
                None
            }
        }
    }

    /// Stores a block (best effort: a full or failing disk only costs a future miss). Blocking:
    /// run it on a blocking thread (writing from `data` directly avoids tokio::fs's copy).
    pub fn put(&self, key: &str, data: &[u8]) {
        let Some(name) = Self::file_name(key) else {
            return;
        };
        if data.len() as u64 > self.budget_bytes {
            return;
        }
        let path = self.dir.join(&name);
        let partial = self
            .dir
            .join(format!("{name}.{}{PARTIAL_SUFFIX}", std::process::id()));
        let written =
            std::fs::write(&partial, data).and_then(|()| std::fs::rename(&partial, &path));
        if let Err(err) = written {
            tracing::debug!(error = %err, "could not write block to the disk cache");
            let _ = std::fs::remove_file(&partial);
            return;
        }
        self.index.lock().touch(&name, data.len() as u64);
        self.evict();
    }

    pub async fn remove(&self, key: &str) {
        let Some(name) = Self::file_name(key) else {
            return;
        };
        self.index.lock().remove(&name);
        let _ = tokio::fs::remove_file(self.dir.join(name)).await;
    }

    fn evict(&self) {
        let evicted = self.index.lock().evict_to(self.budget_bytes);
        for name in evicted {
            // Small local unlinks; not worth a blocking-pool round trip each.
            let _ = std::fs::remove_file(self.dir.join(name));
        }
    }

    #[cfg(test)]
    pub fn total_bytes(&self) -> u64 {
        self.index.lock().total_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn disk_cache_evicts_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 250).unwrap();
        let block = |b: u8| Bytes::from(vec![b; 100]);
        cache.put("s/a", &block(1));
        cache.put("s/b", &block(2));
        // Using `a` makes `b` the eviction candidate.
        assert_eq!(cache.get("s/a", 100).await, Some(block(1)));
        cache.put("s/c", &block(3));
        assert_eq!(cache.total_bytes(), 200);
        assert_eq!(cache.get("s/b", 100).await, None);
        assert_eq!(cache.get("s/a", 100).await, Some(block(1)));
        assert_eq!(cache.get("s/c", 100).await, Some(block(3)));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);

        // A reopened cache finds its files again.
        drop(cache);
        let reopened = DiskCache::open(dir.path(), 250).unwrap();
        assert_eq!(reopened.total_bytes(), 200);
        assert_eq!(reopened.get("s/c", 100).await, Some(block(3)));
        // A wrong expected length (a corrupt file) is a miss and removes the file.
        assert_eq!(reopened.get("s/a", 99).await, None);
        assert_eq!(reopened.total_bytes(), 100);
        reopened.remove("s/c").await;
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn file_names_are_flat_and_distinct() {
        let a = DiskCache::file_name("x/chunks/0/0/1_0_5").unwrap();
        let b = DiskCache::file_name("x/chunks/0/0_1/0_5").unwrap();
        assert!(!a.contains('/'));
        assert_ne!(a, b);
        assert_eq!(DiskCache::file_name(&"k".repeat(300)), None);
    }
}
