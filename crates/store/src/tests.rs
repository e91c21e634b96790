//! Behaviour of `BlockStore` over a local directory (`file://`). The S3 backend is exercised
//! against a real server in `tests/s3.rs`.

use super::*;
use std::time::Duration;

const MIB: usize = 1 << 20;

fn patterned(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| (i % 251) as u8 ^ seed)
        .collect::<Vec<u8>>()
        .into()
}

fn options(cache_mem_bytes: u64) -> StoreOptions {
    StoreOptions {
        cache_mem_bytes,
        ..StoreOptions::default()
    }
}

fn open(dir: &std::path::Path, volume: &str, options: StoreOptions) -> BlockStore {
    BlockStore::open(&format!("file://{}", dir.display()), volume, options).unwrap()
}

/// Files under `dir`, relative, with sizes.
fn files(dir: &std::path::Path) -> Vec<(String, u64)> {
    fn walk(root: &std::path::Path, dir: &std::path::Path, out: &mut Vec<(String, u64)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.push((rel, path.metadata().unwrap().len()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[tokio::test]
async fn open_creates_the_directory_and_probe_succeeds() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a/b");
    let store = open(&dir, "vol", options(0));
    assert!(dir.is_dir());
    store.probe().await.unwrap();
    assert_eq!(store.list().await.unwrap(), vec![]);
}

#[tokio::test]
async fn slices_are_split_into_4_mib_blocks_under_the_documented_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path(), "vols/v1", options(0));
    let data = patterned(10 * MIB + 3, 1);
    store.put_slice(1_234_567, data.clone()).await.unwrap();
    let block = 4 * MIB as u64;
    assert_eq!(
        files(tmp.path()),
        vec![
            ("vols/v1/chunks/1/1234/1234567_0_4194304".to_string(), block),
            ("vols/v1/chunks/1/1234/1234567_1_4194304".to_string(), block),
            (
                "vols/v1/chunks/1/1234/1234567_2_2097155".to_string(),
                2 * MIB as u64 + 3
            ),
        ]
    );
    let on_disk =
        std::fs::read(tmp.path().join("vols/v1/chunks/1/1234/1234567_1_4194304")).unwrap();
    assert_eq!(on_disk, data[4 * MIB..8 * MIB]);
}

#[tokio::test]
async fn reads_across_block_boundaries_return_the_written_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path(), "v", options(0));
    let data = patterned(10 * MIB, 7);
    let size = data.len() as u32;
    store.put_slice(42, data.clone()).await.unwrap();
    let cases = [
        (0, 1),
        (0, size as usize),
        (4 * MIB - 1, 2),
        (4 * MIB, 4 * MIB),
        (3 * MIB, 6 * MIB),
        (10 * MIB - 5, 5),
        (123_457, 9 * MIB),
    ];
    for (off, len) in cases {
        let (off, len) = (off as u32, len as u32);
        let got = store.read_slice(42, size, off, len).await.unwrap();
        assert_eq!(
            got,
            data[off as usize..(off + len) as usize],
            "off {off} len {len}"
        );
    }
    // Reads are clipped at the end of the slice.
    assert_eq!(
        store.read_slice(42, size, size - 3, 100).await.unwrap(),
        data[size as usize - 3..]
    );
    assert!(store
        .read_slice(42, size, size, 100)
        .await
        .unwrap()
        .is_empty());
    assert!(store.read_slice(42, size, 5, 0).await.unwrap().is_empty());
}

#[tokio::test]
async fn empty_slices_store_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path(), "v", options(0));
    store.put_slice(1, Bytes::new()).await.unwrap();
    assert!(store.list().await.unwrap().is_empty());
    assert!(store.read_slice(1, 0, 0, 10).await.unwrap().is_empty());
    store.delete_slice(1, 0).await.unwrap();
}

#[tokio::test]
async fn missing_blocks_are_not_found_without_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path(), "v", options(0));
    let data = patterned(5 * MIB, 3);
    store.put_slice(9, data.clone()).await.unwrap();
    std::fs::remove_file(tmp.path().join("v/chunks/0/0/9_1_1048576")).unwrap();
    // The first block is still readable; the range touching the second is not.
    assert_eq!(
        store.read_slice(9, 5 * MIB as u32, 0, 10).await.unwrap(),
        data[..10]
    );
    let err = store
        .read_slice(9, 5 * MIB as u32, 0, 5 * MIB as u32)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound(ref k) if k.ends_with("9_1_1048576")),
        "{err}"
    );
}

#[tokio::test]
async fn read_blocks_are_served_from_memory_afterwards() {
    let tmp = tempfile::tempdir().unwrap();
    let writer = open(tmp.path(), "v", options(0));
    let data = patterned(6 * MIB, 5);
    writer.put_slice(3, data.clone()).await.unwrap();

    let reader = open(tmp.path(), "v", options(64 << 20));
    let size = data.len() as u32;
    assert_eq!(reader.read_slice(3, size, 0, size).await.unwrap(), data);
    // Remove the objects behind the store's back: only a cache can still answer.
    std::fs::remove_dir_all(tmp.path().join("v")).unwrap();
    assert_eq!(
        reader
            .read_slice(3, size, MIB as u32, 4 * MIB as u32)
            .await
            .unwrap(),
        data[MIB..5 * MIB]
    );
}

#[tokio::test]
async fn written_small_slices_populate_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path(), "v", options(64 << 20));
    let small = patterned(3 * MIB, 11);
    let large = patterned(9 * MIB, 12);
    store.put_slice(77, small.clone()).await.unwrap();
    store.put_slice(78, large.clone()).await.unwrap();
    std::fs::remove_dir_all(tmp.path().join("v")).unwrap();
    let size = small.len() as u32;
    assert_eq!(store.read_slice(77, size, 0, size).await.unwrap(), small);
    // Large slices are not cached on upload (they would push read data out).
    let size = large.len() as u32;
    assert!(matches!(
        store.read_slice(78, size, 0, size).await,
        Err(StoreError::NotFound(_))
    ));
}

/// Waits until `dir` holds `count` complete cache files (disk cache writes happen in the
/// background, through temporary files).
async fn wait_for_files(dir: &std::path::Path, count: usize) {
    let complete = || {
        std::fs::read_dir(dir).map_or(0, |entries| {
            entries
                .filter(|e| {
                    !e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .ends_with(".partial")
                })
                .count()
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while complete() != count {
        assert!(
            std::time::Instant::now() < deadline,
            "disk cache never held {count} files"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn disk_cache_keeps_written_and_read_blocks_across_stores() {
    let tmp = tempfile::tempdir().unwrap();
    let (objects, cache_dir) = (tmp.path().join("objects"), tmp.path().join("cache"));
    let disk_options = StoreOptions {
        cache_dir: Some(cache_dir.clone()),
        cache_disk_bytes: 64 << 20,
        ..options(1 << 20)
    };
    let data = patterned(5 * MIB, 13);
    let size = data.len() as u32;

    // Written pages skip the disk cache...
    let writer = open(&objects, "v", disk_options.clone());
    writer.put_slice(5, data.clone()).await.unwrap();
    writer.put_slice(6, data.clone()).await.unwrap();
    assert_eq!(std::fs::read_dir(&cache_dir).unwrap().count(), 0);
    drop(writer);
    // ...read pages go to it (5 MiB: 5 pages per slice).
    let reader = open(&objects, "v", disk_options.clone());
    assert_eq!(reader.read_slice(5, size, 0, size).await.unwrap(), data);
    assert_eq!(reader.read_slice(6, size, 0, size).await.unwrap(), data);
    wait_for_files(&cache_dir, 10).await;
    drop(reader);

    std::fs::remove_dir_all(objects.join("v")).unwrap();
    let store = open(&objects, "v", disk_options);
    assert_eq!(store.read_slice(5, size, 0, size).await.unwrap(), data);
    assert_eq!(store.read_slice(6, size, 0, size).await.unwrap(), data);

    store.delete_slice(5, size).await.unwrap();
    store.delete_slice(6, size).await.unwrap();
    assert_eq!(
        std::fs::read_dir(&cache_dir).unwrap().count(),
        0,
        "delete evicts cached copies"
    );
}

#[tokio::test]
async fn prefetch_fills_the_cache_in_the_background() {
    let tmp = tempfile::tempdir().unwrap();
    let writer = open(tmp.path(), "v", options(0));
    let data = patterned(10 * MIB, 17);
    let size = data.len() as u32;
    writer.put_slice(8, data.clone()).await.unwrap();

    let reader = open(tmp.path(), "v", options(128 << 20));
    reader.prefetch(8, size, 2 * MIB as u32, 8 * MIB as u32);
    // Pages 2..10 (8 MiB over blocks 0..3).
    wait_for_pages(&reader, 8).await;
    std::fs::remove_dir_all(tmp.path().join("v")).unwrap();
    assert_eq!(
        reader
            .read_slice(8, size, 2 * MIB as u32, 8 * MIB as u32)
            .await
            .unwrap(),
        data[2 * MIB..10 * MIB]
    );
}

/// Waits until `store` has `count` pages in the memory cache.
async fn wait_for_pages(store: &BlockStore, count: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.cached_pages() != count {
        assert!(
            std::time::Instant::now() < deadline,
            "the cache never held {count} pages (it holds {})",
            store.cached_pages()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn prefetch_is_a_no_op_without_a_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path(), "v", options(0));
    store.put_slice(1, patterned(MIB, 1)).await.unwrap();
    store.prefetch(1, MIB as u32, 0, MIB as u32);
    assert!(store.inner.pages.is_none());
    tokio::time::sleep(Duration::from_millis(50)).await;
    std::fs::remove_dir_all(tmp.path().join("v")).unwrap();
    assert!(store.read_slice(1, MIB as u32, 0, 1).await.is_err());
}

#[tokio::test]
async fn delete_slice_removes_every_block_and_tolerates_missing_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path(), "v", options(64 << 20));
    let data = patterned(9 * MIB, 19);
    let size = data.len() as u32;
    store.put_slice(4, data.clone()).await.unwrap();
    store.put_slice(6, patterned(10, 0)).await.unwrap();
    std::fs::remove_file(tmp.path().join("v/chunks/0/0/4_0_4194304")).unwrap();
    store.delete_slice(4, size).await.unwrap();
    store.delete_slice(4, size).await.unwrap();
    let keys: Vec<String> = store
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(keys, vec!["chunks/0/0/6_0_10".to_string()]);
    // The cached copies went with the objects.
    let err = store.read_slice(4, size, 0, 10).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err}");
}

#[tokio::test]
async fn list_is_scoped_to_the_volume_and_keys_parse_back() {
    let tmp = tempfile::tempdir().unwrap();
    let a = open(tmp.path(), "vols/a", options(0));
    let b = open(tmp.path(), "vols/b", options(0));
    a.put_slice(1_000_001, patterned(5 * MIB, 1)).await.unwrap();
    b.put_slice(2, patterned(100, 2)).await.unwrap();
    let mut listed = a.list().await.unwrap();
    listed.sort_by(|x, y| x.key.cmp(&y.key));
    let keys: Vec<(&str, u64)> = listed.iter().map(|o| (o.key.as_str(), o.size)).collect();
    assert_eq!(
        keys,
        vec![
            ("chunks/1/1000/1000001_0_4194304", 4 * MIB as u64),
            ("chunks/1/1000/1000001_1_1048576", MIB as u64),
        ]
    );
    let parsed: Vec<_> = listed
        .iter()
        .map(|o| BlockStore::parse_block_key(&o.key))
        .collect();
    assert_eq!(
        parsed,
        vec![Some((1_000_001, 0, 4 << 20)), Some((1_000_001, 1, 1 << 20))]
    );

    for object in &listed {
        a.delete_key(&object.key).await.unwrap();
    }
    a.delete_key(&listed[0].key).await.unwrap();
    assert!(a.list().await.unwrap().is_empty());
    assert_eq!(b.list().await.unwrap().len(), 1);
    // Keys cannot escape the volume prefix.
    for bad in ["", "/", "../b/chunks/0/0/2_0_100", "chunks/../../b"] {
        assert!(
            matches!(a.delete_key(bad).await, Err(StoreError::Config(_))),
            "{bad:?}"
        );
    }
    assert_eq!(b.list().await.unwrap().len(), 1);
}

fn unix_now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

#[tokio::test]
async fn list_reports_when_each_object_was_written() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path(), "v", options(0));
    let before = unix_now_ns();
    store.put_slice(1, patterned(100, 1)).await.unwrap();
    let after = unix_now_ns();
    // File times come from the kernel's coarse clock: allow it to lag a little.
    let slack = 2_000_000_000;
    let listed = store.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    let written = listed[0].last_modified_ns;
    assert!(
        (before - slack..=after + slack).contains(&written),
        "{written} outside {before}..={after}"
    );

    // An old object reads as old: what lets gc spare only young "leaked" objects.
    let file = tmp.path().join("v/chunks/0/0/1_0_100");
    let long_ago = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(long_ago)
        .unwrap();
    let listed = store.list().await.unwrap();
    assert_eq!(listed[0].last_modified_ns, 1_000_000_000 * 1_000_000_000);
}

#[tokio::test]
async fn local_blocks_and_their_directories_are_synced_once_per_put() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path(), "v", options(0));
    let local = Arc::clone(store.inner.local.as_ref().unwrap());
    let syncs = || {
        (
            local.file_syncs.load(std::sync::atomic::Ordering::Relaxed),
            local.dir_syncs.load(std::sync::atomic::Ordering::Relaxed),
        )
    };
    let data = patterned(9 * MIB, 3);
    let size = data.len() as u32;

    // A first slice: its 3 block files, their directory v/chunks/0/0, and the parents of the
    // directories just created (v/chunks/0, v/chunks, v and the store root).
    store.put_slice(5, data.clone()).await.unwrap();
    assert_eq!(syncs(), (3, 5));
    // The next slice of that directory: its files and the directory only.
    store.put_slice(6, data.clone()).await.unwrap();
    assert_eq!(syncs(), (6, 6));
    // Empty slices write nothing and sync nothing.
    store.put_slice(7, Bytes::new()).await.unwrap();
    assert_eq!(syncs(), (6, 6));
    assert_eq!(store.read_slice(5, size, 0, size).await.unwrap(), data);
    assert_eq!(store.read_slice(6, size, 0, size).await.unwrap(), data);

    // Deleting the last blocks removes the directories; created again at the same paths, they
    // are synced again.
    store.delete_slice(5, size).await.unwrap();
    store.delete_slice(6, size).await.unwrap();
    assert!(!tmp.path().join("v").exists());
    store.put_slice(5, patterned(10, 1)).await.unwrap();
    assert_eq!(syncs(), (7, 11));
    assert_eq!(
        store.read_slice(5, 10, 0, 10).await.unwrap(),
        patterned(10, 1)
    );

    // Another store (another process) knows nothing durable yet: it syncs the whole chain once.
    let other = open(tmp.path(), "v", options(0));
    other.put_slice(8, patterned(10, 2)).await.unwrap();
    let other_local = other.inner.local.as_ref().unwrap();
    assert_eq!(
        other_local
            .dir_syncs
            .load(std::sync::atomic::Ordering::Relaxed),
        5
    );
    assert_eq!(
        store.read_slice(8, 10, 0, 10).await.unwrap(),
        patterned(10, 2)
    );
}

#[tokio::test]
async fn open_creates_missing_store_directories_durably() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("x/y/z");
    let store = open(&dir, "v", options(0));
    assert!(dir.is_dir());
    store.put_slice(1, patterned(10, 0)).await.unwrap();
    assert_eq!(files(&dir), vec![("v/chunks/0/0/1_0_10".to_string(), 10)]);
}

/// Store calls run on the caller's runtime, which may be multi-threaded: their futures must be
/// `Send`.
#[test]
fn store_futures_are_send() {
    fn send<T: Send>(_: T) {}
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path(), "v", options(1 << 20));
    send(store.probe());
    send(store.put_slice(1, Bytes::new()));
    send(store.read_slice(1, 1, 0, 1));
    send(store.delete_slice(1, 1));
    send(store.list());
    send(store.delete_key("chunks/0/0/1_0_1"));
}

#[test]
fn prefetch_outside_a_runtime_does_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let writer = open(tmp.path(), "v", options(0));
    runtime
        .block_on(writer.put_slice(1, patterned(MIB, 1)))
        .unwrap();
    let reader = open(tmp.path(), "v", options(64 << 20));
    reader.prefetch(1, MIB as u32, 0, MIB as u32);
    runtime.block_on(async { tokio::time::sleep(Duration::from_millis(50)).await });
    assert_eq!(reader.cached_pages(), 0);

    // From a thread that entered the runtime, the same call fetches the block.
    let _entered = runtime.enter();
    reader.prefetch(1, MIB as u32, 0, MIB as u32);
    runtime.block_on(async {
        wait_for_pages(&reader, 1).await;
        std::fs::remove_dir_all(tmp.path().join("v")).unwrap();
        assert_eq!(
            reader
                .read_slice(1, MIB as u32, 0, MIB as u32)
                .await
                .unwrap(),
            patterned(MIB, 1)
        );
    });
}

#[tokio::test]
async fn concurrent_reads_of_one_page_share_it() {
    let tmp = tempfile::tempdir().unwrap();
    let writer = open(tmp.path(), "v", options(0));
    let data = patterned(4 * MIB, 23);
    writer.put_slice(12, data.clone()).await.unwrap();
    let reader = open(tmp.path(), "v", options(64 << 20));
    let reads = (0..8).map(|i| reader.read_slice(12, data.len() as u32, i * 1000, 1000));
    for (i, got) in futures::future::join_all(reads)
        .await
        .into_iter()
        .enumerate()
    {
        assert_eq!(got.unwrap(), data[i * 1000..(i + 1) * 1000]);
    }
    assert_eq!(reader.cached_pages(), 1);
}

#[test]
fn works_from_a_current_thread_runtime_and_drops_inside_async_code() {
    let tmp = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = open(tmp.path(), "v", options(1 << 20));
        store.put_slice(1, patterned(10, 0)).await.unwrap();
        store.prefetch(1, 10, 0, 10);
        assert_eq!(
            store.read_slice(1, 10, 0, 10).await.unwrap(),
            patterned(10, 0)
        );
        drop(store);
    });
}

#[test]
fn invalid_options_are_config_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("file://{}", tmp.path().display());
    for block_size in [0, 1 << 33] {
        let err = BlockStore::open(
            &url,
            "v",
            StoreOptions {
                block_size,
                ..options(0)
            },
        )
        .err()
        .unwrap();
        assert!(matches!(err, StoreError::Config(_)), "{err}");
    }
    let err = BlockStore::open("file://relative/dir", "v", options(0))
        .err()
        .unwrap();
    assert!(matches!(err, StoreError::Config(_)), "{err}");
}

fn large_blocks(cache_mem_bytes: u64) -> StoreOptions {
    StoreOptions {
        block_size: 64 << 20,
        ..options(cache_mem_bytes)
    }
}

#[tokio::test]
async fn a_slice_is_one_object_with_large_blocks_and_reads_fetch_only_their_pages() {
    let tmp = tempfile::tempdir().unwrap();
    let writer = open(tmp.path(), "v", large_blocks(0));
    let data = patterned(20 * MIB + 5, 29);
    let size = data.len() as u32;
    writer.put_slice(31, data.clone()).await.unwrap();
    assert_eq!(
        files(tmp.path()),
        vec![(format!("v/chunks/0/0/31_0_{size}"), u64::from(size))]
    );
    let reader = open(tmp.path(), "v", large_blocks(64 << 20));
    // A small read fetches its page only; one across a page boundary its two pages.
    let got = reader
        .read_slice(31, size, 5 * MIB as u32 + 7, 10)
        .await
        .unwrap();
    assert_eq!(got, data[5 * MIB + 7..5 * MIB + 17]);
    assert_eq!(reader.cached_pages(), 1);
    let got = reader
        .read_slice(31, size, 7 * MIB as u32 - 3, 6)
        .await
        .unwrap();
    assert_eq!(got, data[7 * MIB - 3..7 * MIB + 3]);
    assert_eq!(reader.cached_pages(), 3);
    // The short last page, and a long read (several ranged GETs).
    let got = reader.read_slice(31, size, size - 9, 100).await.unwrap();
    assert_eq!(got, data[size as usize - 9..]);
    assert_eq!(reader.read_slice(31, size, 0, size).await.unwrap(), data);
    assert_eq!(reader.cached_pages(), 21);
    // Without a cache a read fetches exactly its bytes.
    let uncached = open(tmp.path(), "v", large_blocks(0));
    let got = uncached
        .read_slice(31, size, 3, 2 * MIB as u32)
        .await
        .unwrap();
    assert_eq!(got, data[3..2 * MIB + 3]);
}

#[tokio::test]
async fn streaming_through_a_small_budget_keeps_the_cache_within_it() {
    let tmp = tempfile::tempdir().unwrap();
    let writer = open(tmp.path(), "v", large_blocks(0));
    let data = patterned(40 * MIB, 37);
    let size = data.len() as u32;
    writer.put_slice(41, data.clone()).await.unwrap();
    // An odd budget: a cache of its own.
    let budget = 6 * MIB as u64 + 12_345;
    let reader = open(tmp.path(), "v", large_blocks(budget));
    let pages = reader.inner.pages.clone().unwrap();
    let step = 256 << 10;
    for off in (0..size).step_by(step) {
        reader.prefetch(41, size, off + step as u32, 8 * MIB as u32);
        let got = reader.read_slice(41, size, off, step as u32).await.unwrap();
        assert_eq!(got, data[off as usize..off as usize + step], "at {off}");
        let (cached, reserved) = pages.usage();
        assert!(
            cached + reserved <= budget,
            "{cached} + {reserved} at {off}"
        );
    }
}

#[tokio::test]
async fn a_corrupt_disk_cache_file_is_refetched_not_returned() {
    let tmp = tempfile::tempdir().unwrap();
    let (objects, cache_dir) = (tmp.path().join("objects"), tmp.path().join("cache"));
    // Each reader gets a memory cache of its own (a budget of its own): only the disk is shared.
    let disk_options = |budget_extra: u64| StoreOptions {
        cache_dir: Some(cache_dir.clone()),
        cache_disk_bytes: 64 << 20,
        ..large_blocks(2 * MIB as u64 + budget_extra)
    };
    let data = patterned(2 * MIB, 43);
    let size = data.len() as u32;
    open(&objects, "v", large_blocks(0))
        .put_slice(2, data.clone())
        .await
        .unwrap();
    let reader = open(&objects, "v", disk_options(1));
    assert_eq!(reader.read_slice(2, size, 0, size).await.unwrap(), data);
    wait_for_files(&cache_dir, 2).await;
    // Flip a byte in the middle of each cached page.
    for entry in std::fs::read_dir(&cache_dir).unwrap() {
        let path = entry.unwrap().path();
        let mut file = std::fs::read(&path).unwrap();
        let middle = file.len() / 2;
        file[middle] ^= 0xff;
        std::fs::write(&path, file).unwrap();
    }
    let reader = open(&objects, "v", disk_options(2));
    assert_eq!(reader.read_slice(2, size, 0, size).await.unwrap(), data);
    // The corrupt files were replaced by good ones: with the objects gone, a fresh memory cache
    // is served from disk.
    wait_for_files(&cache_dir, 2).await;
    std::fs::remove_dir_all(objects.join("v")).unwrap();
    let reader = open(&objects, "v", disk_options(3));
    assert_eq!(reader.read_slice(2, size, 0, size).await.unwrap(), data);
}

/// A store that accepts connections and never answers fails uploads and reads within the
/// operation timeout (never hangs), and a refused connection fails faster still.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_or_refusing_store_fails_within_the_operation_timeout() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    // Accept and hold every connection, answering nothing.
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let credentials = Some(S3Credentials {
        access_key_id: "AKIDTEST".into(),
        secret_access_key: "secret".into(),
        session_token: None,
    });
    let timeouts = StoreTimeouts {
        connect: Duration::from_millis(500),
        request: Duration::from_secs(1),
        retry: Duration::from_secs(2),
        operation: Duration::from_secs(4),
    };
    let options = StoreOptions {
        cache_mem_bytes: 0,
        timeouts,
        ..StoreOptions::default()
    };
    let url = format!("s3://b?endpoint=http://127.0.0.1:{port}");
    let store =
        BlockStore::open_with_credentials(&url, "v", options.clone(), credentials.clone()).unwrap();
    let started = std::time::Instant::now();
    let err = store.put_slice(1, Bytes::from(vec![7u8; 1000])).await;
    let took = started.elapsed();
    assert!(matches!(err, Err(StoreError::Io(_))), "{err:?}");
    assert!(
        took >= timeouts.request && took <= timeouts.operation + Duration::from_secs(1),
        "{took:?}"
    );
    let started = std::time::Instant::now();
    let err = store.read_slice(1, 1000, 0, 1000).await;
    assert!(matches!(err, Err(StoreError::Io(_))), "{err:?}");
    assert!(started.elapsed() <= timeouts.operation + Duration::from_secs(1));
    holder.abort();

    // Nothing listens on the port any more: connections are refused, and retried briefly.
    let _ = holder.await;
    let store = BlockStore::open_with_credentials(&url, "v", options, credentials).unwrap();
    let started = std::time::Instant::now();
    assert!(store
        .put_slice(1, Bytes::from(vec![7u8; 1000]))
        .await
        .is_err());
    assert!(started.elapsed() < timeouts.retry + Duration::from_secs(1));
}
