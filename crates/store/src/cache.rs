//! The disk cache: a size-bounded directory of cached pages, checksummed, that several
//! processes of one host may share.
//!
//! Pages are immutable like their objects, so a cached copy never goes stale; what can go wrong
//! is the file: truncated, overwritten or bit-rotted. Each file therefore starts with a header
//! (magic, length, CRC-32 of the bytes), and a file that fails it is deleted and reported as a
//! miss, never returned. Files are written under a unique temporary name and renamed into
//! place when complete, so a reader (in any process) sees a whole file or none.

use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A directory of cached pages, one file per page, evicted least-recently-used once the files
/// exceed the byte budget. Several stores (volumes) and processes may share one directory: file
/// names are derived from the store-qualified key; each process evicts by its own view (the files
/// it found at start, wrote or read), so the budget holds approximately when several share it.
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

/// Longest cache file name (most file systems allow 255 bytes, and a temporary name adds to it).
const MAX_FILE_NAME: usize = 200;
/// A temporary file this old is left over by a crash, not being written.
const STALE_PARTIAL: std::time::Duration = std::time::Duration::from_secs(600);
/// Suffix of files being written; they are renamed into place when complete.
const PARTIAL_SUFFIX: &str = ".partial";
/// Start of every cache file; the format's version is its last byte.
const MAGIC: &[u8; 8] = b"CELLARP1";
/// Magic, then the length and the CRC-32 of the bytes (little-endian u32 each).
const HEADER_LEN: usize = 16;

/// The bytes of a cache file holding `data`.
fn encode(data: &[u8]) -> Vec<u8> {
    let mut file = Vec::with_capacity(HEADER_LEN + data.len());
    file.extend_from_slice(MAGIC);
    file.extend_from_slice(&(data.len() as u32).to_le_bytes());
    file.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    file.extend_from_slice(data);
    file
}

/// The bytes a cache file holds, if it is whole, uncorrupted and `expected_len` long.
fn decode(file: Vec<u8>, expected_len: usize) -> Option<Bytes> {
    if file.len() != HEADER_LEN + expected_len || &file[..8] != MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(file[8..12].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(file[12..16].try_into().ok()?);
    if len != expected_len || crc32fast::hash(&file[HEADER_LEN..]) != crc {
        return None;
    }
    Some(Bytes::from(file).slice(HEADER_LEN..))
}

impl DiskCache {
    /// Opens (creating) the directory and indexes the pages already in it, oldest first.
    pub fn open(dir: &Path, budget_bytes: u64) -> std::io::Result<DiskCache> {
        std::fs::create_dir_all(dir)?;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // Another process may delete files meanwhile.
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            if name.ends_with(PARTIAL_SUFFIX) {
                // Left over by a crash mid-write, unless another process is writing it now.
                let stale = meta
                    .modified()
                    .ok()
                    .and_then(|at| at.elapsed().ok())
                    .is_some_and(|age| age > STALE_PARTIAL);
                if stale {
                    let _ = std::fs::remove_file(entry.path());
                }
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

    /// The cached page, if a whole, uncorrupted file of the expected length holds it (a file
    /// that fails the check is deleted). Files other processes wrote are found too.
    pub async fn get(&self, key: &str, expected_len: usize) -> Option<Bytes> {
        let name = Self::file_name(key)?;
        let path = self.dir.join(&name);
        let file = match tokio::fs::read(&path).await {
            Ok(file) => file,
            Err(_) => {
                self.index.lock().remove(&name);
                return None;
            }
        };
        let size = file.len() as u64;
        match decode(file, expected_len) {
            Some(data) => {
                self.index.lock().touch(&name, size);
                Some(data)
            }
            None => {
                tracing::warn!(path = %path.display(), "discarding a corrupt or truncated cache file");
                self.index.lock().remove(&name);
                let _ = tokio::fs::remove_file(&path).await;
                None
            }
        }
    }

    /// Stores a page (best effort: a full or failing disk only costs a future miss). Blocking:
    /// run it on a blocking thread.
    pub fn put(&self, key: &str, data: &[u8]) {
        static SEQUENCE: AtomicU64 = AtomicU64::new(0);
        let Some(name) = Self::file_name(key) else {
            return;
        };
        let file = encode(data);
        if file.len() as u64 > self.budget_bytes {
            return;
        }
        let path = self.dir.join(&name);
        // Unique among processes (pid) and among this process's threads (sequence).
        let partial = self.dir.join(format!(
            "{name}.{}.{}{PARTIAL_SUFFIX}",
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::Relaxed)
        ));
        let written =
            std::fs::write(&partial, &file).and_then(|()| std::fs::rename(&partial, &path));
        if let Err(err) = written {
            tracing::debug!(error = %err, "could not write a page to the disk cache");
            let _ = std::fs::remove_file(&partial);
            return;
        }
        self.index.lock().touch(&name, file.len() as u64);
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

    /// Size on disk of a cached page of `len` bytes.
    fn file_size(len: u64) -> u64 {
        HEADER_LEN as u64 + len
    }

    #[tokio::test]
    async fn disk_cache_evicts_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 2 * file_size(100) + 50).unwrap();
        let page = |b: u8| Bytes::from(vec![b; 100]);
        cache.put("s/a", &page(1));
        cache.put("s/b", &page(2));
        // Using `a` makes `b` the eviction candidate.
        assert_eq!(cache.get("s/a", 100).await, Some(page(1)));
        cache.put("s/c", &page(3));
        assert_eq!(cache.total_bytes(), 2 * file_size(100));
        assert_eq!(cache.get("s/b", 100).await, None);
        assert_eq!(cache.get("s/a", 100).await, Some(page(1)));
        assert_eq!(cache.get("s/c", 100).await, Some(page(3)));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);

        // A reopened cache finds its files again.
        drop(cache);
        let reopened = DiskCache::open(dir.path(), 2 * file_size(100) + 50).unwrap();
        assert_eq!(reopened.total_bytes(), 2 * file_size(100));
        assert_eq!(reopened.get("s/c", 100).await, Some(page(3)));
        // A wrong expected length is a miss and removes the file.
        assert_eq!(reopened.get("s/a", 99).await, None);
        assert_eq!(reopened.total_bytes(), file_size(100));
        reopened.remove("s/c").await;
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn corrupt_or_truncated_files_are_dropped_never_returned() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 253) as u8).collect();
        let path = |key: &str| dir.path().join(DiskCache::file_name(key).unwrap());
        for key in ["s/flipped", "s/truncated", "s/header", "s/empty"] {
            cache.put(key, &data);
            assert_eq!(cache.get(key, data.len()).await.as_deref(), Some(&data[..]));
        }
        // One bit of the bytes, the end of the file, the header, everything.
        let mut file = std::fs::read(path("s/flipped")).unwrap();
        file[HEADER_LEN + 1000] ^= 0x10;
        std::fs::write(path("s/flipped"), &file).unwrap();
        let file = std::fs::read(path("s/truncated")).unwrap();
        std::fs::write(path("s/truncated"), &file[..file.len() - 1]).unwrap();
        let mut file = std::fs::read(path("s/header")).unwrap();
        file[12] ^= 1;
        std::fs::write(path("s/header"), &file).unwrap();
        std::fs::write(path("s/empty"), b"").unwrap();
        for key in ["s/flipped", "s/truncated", "s/header", "s/empty"] {
            assert_eq!(cache.get(key, data.len()).await, None, "{key}");
            assert!(!path(key).exists(), "{key} is deleted");
        }
        assert_eq!(cache.total_bytes(), 0);
    }

    #[tokio::test]
    async fn processes_sharing_a_directory_see_each_others_pages() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            DiskCache::open(dir.path(), 1 << 20).unwrap(),
            DiskCache::open(dir.path(), 1 << 20).unwrap(),
        );
        a.put("s/x", b"from a");
        assert_eq!(b.get("s/x", 6).await.as_deref(), Some(&b"from a"[..]));
        // Both write the same page at once: whichever rename lands last wins, whole.
        std::thread::scope(|scope| {
            for cache in [&a, &b] {
                scope.spawn(move || {
                    for _ in 0..200 {
                        cache.put("s/y", &[7u8; 5000]);
                    }
                });
            }
        });
        assert_eq!(a.get("s/y", 5000).await.as_deref(), Some(&[7u8; 5000][..]));
        let leftovers = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(PARTIAL_SUFFIX)
            })
            .count();
        assert_eq!(leftovers, 0);
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
