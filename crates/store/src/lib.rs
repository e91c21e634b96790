//! Object store access for a volume's immutable slice objects.
//!
//! THIS FILE IS THE CONTRACT between `cellar-store` and `cellar-vfs`. The signatures are fixed.
//!
//! A slice (an immutable extent of a file, see `cellar-meta`) of `size` bytes is stored as
//! `ceil(size / block_size)` block objects, each at most `block_size` (4 MiB) long, under
//! `{prefix}/chunks/{id / 1_000_000}/{id / 1_000}/{id}_{block_index}_{block_len}` (layout documented in
//! docs/ARCHITECTURE.md). Objects are never rewritten, so any cached copy is always valid.
//!
//! Every operation runs on the store's own small tokio runtime, so callers may drive the async
//! methods from any runtime (or `block_on`), and read-ahead keeps running between their calls.

mod cache;
mod config;
mod layout;
mod retry;

use bytes::{Bytes, BytesMut};
use cache::{DiskCache, MemCache};
pub use config::S3Credentials;
use config::{Backend, StoreLocation};
use futures::{StreamExt, TryStreamExt};
use layout::Block;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Weak};
use tokio::sync::Semaphore;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist (a slice the metadata references is missing: EIO upstream).
    #[error("object {0} not found")]
    NotFound(String),
    /// Store URL or options are wrong (also: the bucket does not exist).
    #[error("invalid store configuration: {0}")]
    Config(String),
    /// Credentials were refused.
    #[error("the object store refused the credentials: {0}")]
    Auth(String),
    /// Retries exhausted, store unreachable, ...
    #[error("object store: {0}")]
    Io(String),
}
pub type StoreResult<T> = std::result::Result<T, StoreError>;

/// The block size of new volumes. It is part of the data format: slices are read back with the
/// block size they were written with.
pub const DEFAULT_BLOCK_SIZE: u64 = 4 << 20;

#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub block_size: u64,
    /// Memory budget of the block cache (0 disables caching and read-ahead).
    pub cache_mem_bytes: u64,
    /// Optional disk cache directory, shared by every store of the process that names it (the
    /// first store to open it sets its budget).
    pub cache_dir: Option<std::path::PathBuf>,
    pub cache_disk_bytes: u64,
    /// Retries of one request after a transient failure (5xx, timeout, connection error).
    pub max_retries: u32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            block_size: DEFAULT_BLOCK_SIZE,
            cache_mem_bytes: 256 << 20,
            cache_dir: None,
            cache_disk_bytes: 10 << 30,
            max_retries: 5,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Key relative to the volume prefix (`chunks/...`), as `delete_key` takes it.
    pub key: String,
    pub size: u64,
}

/// Concurrent block PUTs of one `put_slice`.
const UPLOAD_CONCURRENCY: usize = 16;
/// Concurrent block GETs of one `read_slice` (and DELETEs of one `delete_slice`).
const FETCH_CONCURRENCY: usize = 16;
/// Upper bound of the bytes that read-ahead may have in flight at once.
const MAX_PREFETCH_BYTES: u64 = 256 << 20;
/// Requests (PUT, GET, DELETE) in flight to the store at once, across every caller of one
/// `BlockStore`. Many small flushes (random writes) would otherwise open thousands of requests at
/// once, and S3 servers answer that with 503 SlowDown (Ceph RGW throttles at 1,024).
const MAX_REQUESTS_IN_FLIGHT: usize = 64;

/// Block objects of one volume (a prefix of a bucket or of a local directory). Cheap to clone.
#[derive(Clone)]
pub struct BlockStore {
    inner: Arc<Inner>,
    /// Kept apart from `inner` (which tasks hold) so that the runtime is only ever dropped by a
    /// caller's thread, never by one of its own tasks.
    runtime: Arc<StoreRuntime>,
}

struct Inner {
    store: Arc<dyn ObjectStore>,
    location: StoreLocation,
    /// Secret-free name of the store for messages.
    description: String,
    /// Distinguishes this store's blocks from other stores' in a shared disk cache.
    cache_namespace: String,
    block_size: u64,
    mem: MemCache,
    cache_enabled: bool,
    disk: Option<Arc<DiskCache>>,
    /// One permit per block that read-ahead may be fetching.
    prefetch_permits: Arc<Semaphore>,
    /// One permit per request in flight to the store.
    request_permits: Semaphore,
}

struct StoreRuntime {
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for StoreRuntime {
    fn drop(&mut self) {
        // A plain drop blocks, which panics when the last clone is dropped inside async code.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl StoreRuntime {
    fn handle(&self) -> &tokio::runtime::Handle {
        self.runtime
            .as_ref()
            .expect("runtime lives until drop")
            .handle()
    }
}

impl BlockStore {
    /// `file:///abs/dir` or `s3://bucket[/prefix]?endpoint=http://host:port&region=us-east-1`
    /// (path-style; credentials from the URL-independent env AWS_ACCESS_KEY_ID /
    /// AWS_SECRET_ACCESS_KEY, and AWS_SESSION_TOKEN if set: callers that read keys from their own
    /// configuration put them into these variables). `volume_prefix` is appended to the URL's
    /// prefix.
    pub fn open(url: &str, volume_prefix: &str, options: StoreOptions) -> StoreResult<BlockStore> {
        Self::open_with_credentials(url, volume_prefix, options, S3Credentials::from_env())
    }

    /// Like [`BlockStore::open`], with S3 credentials given explicitly instead of read from the
    /// environment (`None`: none are configured; an `s3://` URL then fails with `Config`).
    pub fn open_with_credentials(
        url: &str,
        volume_prefix: &str,
        options: StoreOptions,
        credentials: Option<S3Credentials>,
    ) -> StoreResult<BlockStore> {
        if options.block_size == 0 || options.block_size > u64::from(u32::MAX) {
            return Err(StoreError::Config(format!(
                "block size {} is outside 1..=4 GiB",
                options.block_size
            )));
        }
        let location = config::parse_location(url, volume_prefix, credentials)?;
        let description = location.describe();
        let (store, cache_namespace) = build_store(&location.backend, options.max_retries)?;
        let disk = match &options.cache_dir {
            Some(dir) => Some(shared_disk_cache(dir, options.cache_disk_bytes)?),
            None => None,
        };
        let prefetch_blocks =
            (options.cache_mem_bytes / 4).min(MAX_PREFETCH_BYTES) / options.block_size;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cellar-store")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Io(format!("cannot start the store runtime: {e}")))?;
        Ok(BlockStore {
            inner: Arc::new(Inner {
                store,
                location,
                description,
                cache_namespace,
                block_size: options.block_size,
                mem: cache::mem_cache(options.cache_mem_bytes),
                cache_enabled: options.cache_mem_bytes > 0,
                disk,
                prefetch_permits: Arc::new(Semaphore::new(prefetch_blocks.max(1) as usize)),
                request_permits: Semaphore::new(MAX_REQUESTS_IN_FLIGHT),
            }),
            runtime: Arc::new(StoreRuntime {
                runtime: Some(runtime),
            }),
        })
    }

    /// A cheap round trip (list one key) that tells an unreachable store or bad credentials apart.
    pub async fn probe(&self) -> StoreResult<()> {
        self.run(|inner| async move {
            let prefix = &inner.location.prefix;
            match inner.store.list(Some(prefix)).next().await {
                Some(Err(err)) => Err(inner.error(&err, "list", &format!("{prefix}/"))),
                Some(Ok(_)) | None => Ok(()),
            }
        })
        .await
    }

    /// Uploads a slice's blocks in parallel (retrying transient errors).
    pub async fn put_slice(&self, id: u64, data: Bytes) -> StoreResult<()> {
        if u32::try_from(data.len()).is_err() {
            return Err(StoreError::Io(format!(
                "slice {id} of {} bytes exceeds the 4 GiB slice limit",
                data.len()
            )));
        }
        self.run(move |inner| async move {
            futures::stream::iter(layout::slice_blocks(data.len() as u64, inner.block_size))
                .map(|block| inner.put_block(id, block, data.clone()))
                .buffer_unordered(UPLOAD_CONCURRENCY)
                .try_collect::<()>()
                .await
        })
        .await
    }

    /// Reads `len` bytes at `off` of slice `id` (stored length `size`) through the block cache.
    /// The range is clipped to the slice: reading past its end returns fewer bytes.
    pub async fn read_slice(&self, id: u64, size: u32, off: u32, len: u32) -> StoreResult<Bytes> {
        let size = u64::from(size);
        let start = u64::from(off).min(size);
        let end = (start + u64::from(len)).min(size);
        if start == end {
            return Ok(Bytes::new());
        }
        self.run(move |inner| async move {
            let parts: Vec<Bytes> =
                futures::stream::iter(layout::blocks_covering(size, inner.block_size, start..end))
                    .map(|(block, range)| {
                        let inner = &inner;
                        async move {
                            Ok::<_, StoreError>(inner.get_block(id, block).await?.slice(range))
                        }
                    })
                    .buffered(FETCH_CONCURRENCY)
                    .try_collect()
                    .await?;
            if let [single] = parts.as_slice() {
                return Ok(single.clone());
            }
            let mut joined = BytesMut::with_capacity((end - start) as usize);
            for part in parts {
                joined.extend_from_slice(&part);
            }
            Ok(joined.freeze())
        })
        .await
    }

    /// Starts fetching a range of a slice into the cache without waiting (read-ahead).
    ///
    /// Blocks already cached are skipped; when read-ahead already has its memory budget in
    /// flight the rest of the range is dropped (reads will fetch it on demand).
    pub fn prefetch(&self, id: u64, size: u32, off: u32, len: u32) {
        if !self.inner.cache_enabled {
            return;
        }
        let size = u64::from(size);
        let start = u64::from(off).min(size);
        let end = (start + u64::from(len)).min(size);
        for (block, _) in layout::blocks_covering(size, self.inner.block_size, start..end) {
            if self
                .inner
                .mem
                .contains_key(&self.inner.cache_key(&self.inner.block_path(id, block)))
            {
                continue;
            }
            let Ok(permit) = Arc::clone(&self.inner.prefetch_permits).try_acquire_owned() else {
                tracing::trace!(id, "read-ahead budget exhausted");
                return;
            };
            let inner = Arc::clone(&self.inner);
            self.runtime.handle().spawn(async move {
                if let Err(err) = inner.get_block(id, block).await {
                    tracing::debug!(id, block = block.index, error = %err, "read-ahead fetch failed");
                }
                drop(permit);
            });
        }
    }

    /// Deletes a slice's blocks (missing blocks are fine).
    pub async fn delete_slice(&self, id: u64, size: u32) -> StoreResult<()> {
        self.run(move |inner| async move {
            futures::stream::iter(layout::slice_blocks(u64::from(size), inner.block_size))
                .map(|block| inner.delete_path(inner.block_path(id, block)))
                .buffer_unordered(FETCH_CONCURRENCY)
                .try_collect::<()>()
                .await
        })
        .await
    }

    /// Every object under this volume's prefix (for fsck, gc of leaked objects, volume deletion).
    /// Keys are relative to the volume prefix.
    pub async fn list(&self) -> StoreResult<Vec<ObjectInfo>> {
        self.run(|inner| async move {
            let prefix = &inner.location.prefix;
            inner
                .store
                .list(Some(prefix))
                .map_err(|err| inner.error(&err, "list", &format!("{prefix}/")))
                .map_ok(|meta| ObjectInfo {
                    key: inner.relative_key(&meta.location),
                    size: meta.size,
                })
                .try_collect()
                .await
        })
        .await
    }

    /// Deletes one object by the key `list` returned (a missing object is fine).
    pub async fn delete_key(&self, key: &str) -> StoreResult<()> {
        let path = self
            .inner
            .path(key)
            .and_then(|p| Path::parse(p).ok())
            .ok_or_else(|| StoreError::Config(format!("invalid object key {key:?}")))?;
        self.run(move |inner| async move { inner.delete_path(path).await })
            .await
    }

    /// Parses a block key back into (slice id, block index, block length).
    pub fn parse_block_key(key: &str) -> Option<(u64, u32, u32)> {
        layout::parse_block_key(key)
    }

    /// Runs an operation on the store runtime, independent of the caller's runtime.
    async fn run<T, F, Fut>(&self, op: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Inner>) -> Fut,
        Fut: Future<Output = StoreResult<T>> + Send + 'static,
    {
        match self
            .runtime
            .handle()
            .spawn(op(Arc::clone(&self.inner)))
            .await
        {
            Ok(result) => result,
            Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
            Err(err) => Err(StoreError::Io(format!("store task cancelled: {err}"))),
        }
    }
}

impl Inner {
    /// The object path of a key relative to the volume prefix (`None` if the key is empty).
    fn path(&self, relative: &str) -> Option<String> {
        let relative = relative.trim_matches('/');
        if relative.is_empty() {
            return None;
        }
        let prefix = self.location.prefix.as_ref();
        Some(if prefix.is_empty() {
            relative.to_string()
        } else {
            format!("{prefix}/{relative}")
        })
    }

    fn block_path(&self, id: u64, block: Block) -> Path {
        let key = layout::block_key(id, block.index, block.len);
        Path::from(self.path(&key).expect("block keys are never empty"))
    }

    fn relative_key(&self, path: &Path) -> String {
        let full = path.as_ref();
        let prefix = self.location.prefix.as_ref();
        full.strip_prefix(prefix)
            .unwrap_or(full)
            .trim_start_matches('/')
            .to_string()
    }

    fn cache_key(&self, path: &Path) -> String {
        format!("{}/{path}", self.cache_namespace)
    }

    fn error(&self, err: &object_store::Error, op: &str, key: &str) -> StoreError {
        retry::to_store_error(err, op, key, &self.description)
    }

    async fn put_block(&self, id: u64, block: Block, slice: Bytes) -> StoreResult<()> {
        let path = self.block_path(id, block);
        let start = block.start as usize;
        let data = slice.slice(start..start + block.len as usize);
        {
            let _permit = self.request_permit().await;
            self.store
                .put(&path, data.clone().into())
                .await
                .map_err(|err| self.error(&err, "put", path.as_ref()))?;
        }
        // Uploaded blocks skip the disk cache (writing it cost more CPU than the upload), and
        // only a block that is its whole slice goes to the memory cache: it is shared, not
        // copied, so a block of a larger slice would pin the caller's whole buffer. Blocks not
        // cached are read back from the store.
        if self.cache_enabled && data.len() == slice.len() {
            self.mem.insert(self.cache_key(&path), data).await;
        }
        Ok(())
    }

    async fn request_permit(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.request_permits
            .acquire()
            .await
            .expect("the request semaphore is never closed")
    }

    /// Writes a block to the disk cache in the background (the caller does not wait for it).
    fn cache_on_disk(&self, cache_key: &str, data: &Bytes) {
        if let Some(disk) = &self.disk {
            let (disk, cache_key, data) = (Arc::clone(disk), cache_key.to_string(), data.clone());
            tokio::task::spawn_blocking(move || disk.put(&cache_key, &data));
        }
    }

    /// A whole block, from memory, disk or the store; concurrent requests share one fetch.
    async fn get_block(&self, id: u64, block: Block) -> StoreResult<Bytes> {
        let path = self.block_path(id, block);
        let cache_key = self.cache_key(&path);
        let fetch = async {
            if let Some(disk) = &self.disk {
                if let Some(data) = disk.get(&cache_key, block.len as usize).await {
                    return Ok(data);
                }
            }
            let permit = self.request_permit().await;
            let data = self
                .store
                .get(&path)
                .await
                .map_err(|err| self.error(&err, "get", path.as_ref()))?
                .bytes()
                .await
                .map_err(|err| self.error(&err, "get", path.as_ref()))?;
            drop(permit);
            if data.len() != block.len as usize {
                return Err(StoreError::Io(format!(
                    "object {path} on {} has {} bytes, its key says {}",
                    self.description,
                    data.len(),
                    block.len
                )));
            }
            self.cache_on_disk(&cache_key, &data);
            Ok(data)
        };
        self.mem
            .try_get_with(cache_key.clone(), fetch)
            .await
            .map_err(Arc::unwrap_or_clone)
    }

    async fn delete_path(&self, path: Path) -> StoreResult<()> {
        let cache_key = self.cache_key(&path);
        self.mem.invalidate(&cache_key).await;
        if let Some(disk) = &self.disk {
            disk.remove(&cache_key).await;
        }
        let _permit = self.request_permit().await;
        match self.store.delete(&path).await {
            Ok(()) => Ok(()),
            Err(err) => match self.error(&err, "delete", path.as_ref()) {
                StoreError::NotFound(_) => Ok(()),
                other => Err(other),
            },
        }
    }
}

/// Builds the object store client and names it for the disk cache.
fn build_store(backend: &Backend, max_retries: u32) -> StoreResult<(Arc<dyn ObjectStore>, String)> {
    match backend {
        Backend::Local { root } => {
            std::fs::create_dir_all(root).map_err(|e| {
                StoreError::Config(format!(
                    "cannot create store directory {}: {e}",
                    root.display()
                ))
            })?;
            let store = object_store::local::LocalFileSystem::new_with_prefix(root)
                .map_err(|e| {
                    StoreError::Config(format!(
                        "cannot use store directory {}: {e}",
                        root.display()
                    ))
                })?
                // Deleting the last block of a directory removes the directory too.
                .with_automatic_cleanup(true);
            Ok((Arc::new(store), format!("file:{}", root.display())))
        }
        Backend::S3(s3) => {
            let mut builder = object_store::aws::AmazonS3Builder::new()
                .with_bucket_name(&s3.bucket)
                .with_region(&s3.region)
                .with_access_key_id(&s3.credentials.access_key_id)
                .with_secret_access_key(&s3.credentials.secret_access_key)
                .with_virtual_hosted_style_request(false)
                .with_allow_http(s3.allow_http())
                .with_retry(retry::retry_config(max_retries))
                .with_client_options(retry::client_options(s3.allow_http()));
            if let Some(endpoint) = &s3.endpoint {
                builder = builder.with_endpoint(endpoint);
            }
            if let Some(token) = &s3.credentials.session_token {
                builder = builder.with_token(token);
            }
            let store = builder
                .build()
                .map_err(|e| StoreError::Config(format!("cannot configure the S3 client: {e}")))?;
            Ok((
                Arc::new(store),
                format!("s3:{}/{}", s3.endpoint_for_messages(), s3.bucket),
            ))
        }
    }
}

/// One `DiskCache` per directory per process, so that volumes sharing a cache directory share
/// one budget and one eviction order.
fn shared_disk_cache(dir: &std::path::Path, budget_bytes: u64) -> StoreResult<Arc<DiskCache>> {
    static OPEN: LazyLock<parking_lot::Mutex<HashMap<PathBuf, Weak<DiskCache>>>> =
        LazyLock::new(Default::default);
    let config_err =
        |e: std::io::Error| StoreError::Config(format!("cache directory {}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(config_err)?;
    let canonical = dir.canonicalize().map_err(config_err)?;
    let mut open = OPEN.lock();
    if let Some(cache) = open.get(&canonical).and_then(Weak::upgrade) {
        return Ok(cache);
    }
    let cache = Arc::new(DiskCache::open(&canonical, budget_bytes).map_err(config_err)?);
    open.retain(|_, cache| cache.strong_count() > 0);
    open.insert(canonical, Arc::downgrade(&cache));
    Ok(cache)
}

#[cfg(test)]
mod tests;
