//! Object store access for a volume's immutable slice objects.
//!
//! THIS FILE IS THE CONTRACT between `cellar-store` and `cellar-vfs`. The signatures are fixed.
//!
//! A slice (an immutable extent of a file, see `cellar-meta`) of `size` bytes is stored as
//! `ceil(size / block_size)` block objects, each at most `block_size` (4 MiB) long, under
//! `{prefix}/chunks/{id / 1_000_000}/{id / 1_000}/{id}_{block_index}_{block_len}` (layout documented in
//! docs/ARCHITECTURE.md). Objects are never rewritten, so any cached copy is always valid.
//!
//! # Runtime
//!
//! The store has no runtime of its own: every async method runs on the runtime that polls it, and
//! a process has one (the vfs owns it, DESIGN.md "one async runtime per process"). Callers drive
//! a `BlockStore` from that one runtime only: the S3 client's pooled connections and the
//! read-ahead tasks belong to the runtime they were started on. [`BlockStore::prefetch`] is the one
//! synchronous method that starts background work: it spawns onto the current runtime
//! ([`tokio::runtime::Handle::try_current`]), so call it from a task or from a thread that entered
//! the runtime (`Runtime::enter`); outside any runtime it does nothing.
//!
//! # Durability
//!
//! When `put_slice` returns, the slice's blocks are durable: S3 acknowledges a PUT once it is
//! stored; in a local directory (`file://`) each block file, the directory that holds it and every
//! directory created for it up to the store root are synced first (see `durable.rs`).

mod cache;
mod config;
mod durable;
mod integrity;
mod layout;
mod metered;
mod page_buffers;
mod pages;
mod retry;

use bytes::{Bytes, BytesMut};
use cache::DiskCache;
pub use config::S3Credentials;
use config::{Backend, StoreLocation};
use durable::LocalDurability;
use futures::{StreamExt, TryStreamExt};
use layout::Block;
use object_store::path::Path;
use object_store::{
    GetOptions, GetResultPayload, ObjectStore, ObjectStoreExt, PutMultipartOptions, PutOptions,
};
use pages::{Demand, PageCache, PageClaim, PageKey, PAGE_SIZE};
pub use retry::StoreTimeouts;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::ops::Range;
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

/// The block size `StoreOptions` defaults to (volumes choose their own: see `cellar-vfs`). It is
/// part of the data format: slices are read back with the block size they were written with.
pub const DEFAULT_BLOCK_SIZE: u64 = 4 << 20;

/// The default memory budget of a process's page cache and read-ahead.
pub const DEFAULT_CACHE_MEM_BYTES: u64 = 512 << 20;

#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub block_size: u64,
    /// Memory budget of the page cache and the read-ahead in flight (0 disables caching and
    /// read-ahead). Stores of one process opened with the same budget share one cache.
    pub cache_mem_bytes: u64,
    /// Optional disk cache directory, shared by every store of the process that names it (the
    /// first store to open it sets its budget).
    pub cache_dir: Option<std::path::PathBuf>,
    pub cache_disk_bytes: u64,
    /// Retries of one request after a transient failure (5xx, timeout, connection error).
    pub max_retries: u32,
    /// Bounds of every request and operation (docs/CONFIGURATION.md, "Object store timeouts").
    pub timeouts: StoreTimeouts,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            block_size: DEFAULT_BLOCK_SIZE,
            cache_mem_bytes: DEFAULT_CACHE_MEM_BYTES,
            cache_dir: None,
            cache_disk_bytes: 10 << 30,
            max_retries: 5,
            timeouts: StoreTimeouts::default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Key relative to the volume prefix (`chunks/...`), as `delete_key` takes it.
    pub key: String,
    pub size: u64,
    /// When the object was written, in nanoseconds since the Unix epoch (saturated outside
    /// 1677..2262): gc and fsck leave "leaked" objects younger than their grace alone, since they
    /// may belong to an upload whose commit is still to come.
    pub last_modified_ns: i64,
}

/// Concurrent block PUTs of one `put_slice`.
const UPLOAD_CONCURRENCY: usize = 16;
/// Objects larger than this are uploaded in parts of `PART_BYTES`, `PARTS_IN_PARALLEL` at once.
const MULTIPART_ABOVE: u64 = 16 << 20;
const PART_BYTES: usize = 8 << 20;
const PARTS_IN_PARALLEL: usize = 8;
/// Concurrent blocks of one `read_slice` (and DELETEs of one `delete_slice`).
const FETCH_CONCURRENCY: usize = 16;
/// The largest ranged GET: a longer run of missing pages is fetched as several GETs of this
/// size in parallel (large enough that a request's round trip is small beside its transfer).
const SPAN_BYTES: u64 = 8 << 20;
/// Slices up to this size are cached (copied) as they are uploaded: small files are often read
/// back soon, and a copy of a large slice would only push read data out of the cache.
const CACHE_UPLOADS_UP_TO: u64 = 4 << 20;
/// Requests (PUT, GET, DELETE) in flight to the store at once, across every caller of one
/// `BlockStore`. Many small flushes (random writes) would otherwise open thousands of requests at
/// once, and S3 servers answer that with 503 SlowDown (Ceph RGW throttles at 1,024).
const MAX_REQUESTS_IN_FLIGHT: usize = 64;
/// Re-reads of a range whose answer failed its integrity check (short, checksum mismatch,
/// broken stream) before the read fails: a flip in transit must not fail a read, a corrupt
/// object must fail it, never reach the caller.
const INTEGRITY_RETRIES: usize = 2;

/// Block objects of one volume (a prefix of a bucket or of a local directory). Cheap to clone.
#[derive(Clone)]
pub struct BlockStore {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn ObjectStore>,
    location: StoreLocation,
    /// Secret-free name of the store for messages.
    description: String,
    /// Distinguishes this store's blocks from other stores' in a shared disk cache.
    cache_namespace: String,
    block_size: u64,
    /// `None` when the memory budget is 0: reads then fetch exactly what they ask for.
    pages: Option<Arc<PageCache>>,
    disk: Option<Arc<DiskCache>>,
    /// One permit per request in flight to the store.
    request_permits: Semaphore,
    /// `file://` only: syncs written blocks and their directories.
    local: Option<Arc<LocalDurability>>,
    /// The bound of one operation (see [`StoreTimeouts::operation`]).
    operation_timeout: std::time::Duration,
    /// A fork's inherited slices: ids below each bound (ascending) live under that ancestor's
    /// prefix, from the previous bound up; ids from the last bound up are the volume's own.
    inherited: Vec<(u64, Path)>,
}

impl BlockStore {
    /// Pages of this store in the memory cache (the cache may be shared with other stores).
    #[cfg(test)]
    fn cached_pages(&self) -> usize {
        self.inner
            .pages
            .as_ref()
            .map_or(0, |p| p.count_prefix(&self.inner.cache_namespace))
    }

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
        let (store, cache_namespace, local) = build_store(&location.backend, &options)?;
        let store: Arc<dyn ObjectStore> = Arc::new(metered::Metered(store));
        let disk = match &options.cache_dir {
            Some(dir) => Some(shared_disk_cache(dir, options.cache_disk_bytes)?),
            None => None,
        };
        Ok(BlockStore {
            inner: Arc::new(Inner {
                store,
                location,
                description,
                cache_namespace,
                block_size: options.block_size,
                pages: (options.cache_mem_bytes > 0)
                    .then(|| PageCache::shared(options.cache_mem_bytes)),
                disk,
                request_permits: Semaphore::new(MAX_REQUESTS_IN_FLIGHT),
                local,
                operation_timeout: options.timeouts.operation,
                inherited: Vec::new(),
            }),
        })
    }

    /// Makes slices with ids below an ancestor's bound read from that ancestor's prefix (a fork
    /// shares its origin's objects, never copies them). `ancestors` are (bound, volume prefix)
    /// pairs in ascending order of bound; must be called before the store is cloned.
    pub fn inheriting(mut self, ancestors: &[(u64, String)]) -> StoreResult<BlockStore> {
        let base = self.inner.location.base.clone();
        let mut inherited = Vec::with_capacity(ancestors.len());
        for (below, prefix) in ancestors {
            if inherited.last().is_some_and(|(last, _)| last >= below) {
                return Err(StoreError::Config(format!(
                    "ancestor bounds must ascend (found {below} after a larger one)"
                )));
            }
            inherited.push((*below, config::join_prefix(&[base.as_ref(), prefix])?));
        }
        let inner = Arc::get_mut(&mut self.inner).ok_or_else(|| {
            StoreError::Config("a store's ancestors are set before it is shared".into())
        })?;
        inner.inherited = inherited;
        Ok(self)
    }

    /// Whether the slice's objects are this volume's own (not inherited from an ancestor):
    /// only those may be deleted by its gc.
    pub fn owns(&self, id: u64) -> bool {
        self.inner
            .inherited
            .last()
            .is_none_or(|(below, _)| id >= *below)
    }

    /// A cheap round trip (list one key) that tells an unreachable store or bad credentials apart.
    pub async fn probe(&self) -> StoreResult<()> {
        let inner = &*self.inner;
        let prefix = &inner.location.prefix;
        match inner.store.list(Some(prefix)).next().await {
            Some(Err(err)) => Err(inner.error(&err, "list", &format!("{prefix}/"))),
            Some(Ok(_)) | None => Ok(()),
        }
    }

    /// Uploads a slice's blocks in parallel (retrying transient errors). When it returns, the
    /// blocks are durable.
    pub async fn put_slice(&self, id: u64, data: Bytes) -> StoreResult<()> {
        if u32::try_from(data.len()).is_err() {
            return Err(StoreError::Io(format!(
                "slice {id} of {} bytes exceeds the 4 GiB slice limit",
                data.len()
            )));
        }
        let inner = &*self.inner;
        let _in_flight = cellar_metrics::slice_upload();
        futures::stream::iter(layout::slice_blocks(data.len() as u64, inner.block_size))
            .map(|block| {
                let path = inner.block_path(id, block);
                inner.bounded("put", path, inner.put_block(id, block, data.clone()))
            })
            .buffer_unordered(UPLOAD_CONCURRENCY)
            .try_collect::<()>()
            .await?;
        inner.sync_slice_dirs(id, data.len() as u64).await
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
        let inner = &self.inner;
        let parts: Vec<Bytes> =
            futures::stream::iter(layout::blocks_covering(size, inner.block_size, start..end))
                .map(|(block, range)| inner.read_block(id, block, range))
                .buffered(FETCH_CONCURRENCY)
                .try_collect()
                .await?;
        Ok(concat(parts, (end - start) as usize))
    }

    /// Starts fetching a range of a slice into the cache without waiting (read-ahead), as
    /// ranged GETs of up to [`SPAN_BYTES`] in parallel.
    ///
    /// The fetches are tasks of the current runtime: outside a runtime this does nothing. Pages
    /// already cached or in flight are skipped; once read-ahead would not fit the memory budget
    /// the rest of the range is dropped (reads will fetch it on demand).
    pub fn prefetch(&self, id: u64, size: u32, off: u32, len: u32) {
        let Some(pages) = &self.inner.pages else {
            return;
        };
        if let Err(err) = tokio::runtime::Handle::try_current() {
            tracing::debug!(id, error = %err, "read-ahead skipped: called outside the runtime");
            return;
        }
        let size = u64::from(size);
        let start = u64::from(off).min(size);
        let end = (start + u64::from(len)).min(size);
        let span_pages = (SPAN_BYTES / PAGE_SIZE) as u32;
        for (block, range) in layout::blocks_covering(size, self.inner.block_size, start..end) {
            let object = self.inner.object_key(id, block);
            let indexes = page_range(&range);
            let mut first = indexes.start;
            while first < indexes.end {
                let span = first..(first + span_pages).min(indexes.end);
                first = span.end;
                let page_len = |index| page_len(block.len, index);
                let Some((_, claims)) = pages.pages(&object, span, page_len, Demand::Ahead) else {
                    tracing::trace!(id, "read-ahead dropped: memory budget in use");
                    return;
                };
                self.inner.spawn_fetches(id, block, claims);
            }
        }
    }

    /// Deletes a slice's blocks (missing blocks are fine).
    pub async fn delete_slice(&self, id: u64, size: u32) -> StoreResult<()> {
        if !self.owns(id) {
            // Another volume's object that this fork merely references.
            return Err(StoreError::Config(format!(
                "slice {id} is inherited from an ancestor volume: it is never deleted here"
            )));
        }
        let inner = &*self.inner;
        futures::stream::iter(layout::slice_blocks(u64::from(size), inner.block_size))
            .map(|block| {
                let path = inner.block_path(id, block);
                inner.bounded(
                    "delete",
                    path.clone(),
                    inner.delete_path(path, Some(block.len)),
                )
            })
            .buffer_unordered(FETCH_CONCURRENCY)
            .try_collect::<()>()
            .await
    }

    /// Every object under this volume's prefix (for fsck, gc of leaked objects, volume deletion).
    /// Keys are relative to the volume prefix.
    pub async fn list(&self) -> StoreResult<Vec<ObjectInfo>> {
        let inner = &*self.inner;
        let prefix = &inner.location.prefix;
        inner
            .store
            .list(Some(prefix))
            .map_err(|err| inner.error(&err, "list", &format!("{prefix}/")))
            .map_ok(|meta| ObjectInfo {
                key: inner.relative_key(&meta.location),
                size: meta.size,
                last_modified_ns: last_modified_ns(&meta),
            })
            .try_collect()
            .await
    }

    /// The blocks (slice id, block index, block length) of the ancestors' objects that this
    /// volume may read: each ancestor's, within its range of ids (for fsck of a fork).
    pub async fn inherited_blocks(
        &self,
    ) -> StoreResult<std::collections::HashSet<(u64, u32, u32)>> {
        let inner = &*self.inner;
        let mut blocks = std::collections::HashSet::new();
        let mut from = 0;
        for (below, prefix) in &inner.inherited {
            let range = from..*below;
            from = *below;
            let mut listing = inner.store.list(Some(prefix));
            while let Some(meta) = listing
                .try_next()
                .await
                .map_err(|err| inner.error(&err, "list", &format!("{prefix}/")))?
            {
                if let Some(block) = layout::parse_block_key(meta.location.as_ref()) {
                    if range.contains(&block.0) {
                        blocks.insert(block);
                    }
                }
            }
        }
        Ok(blocks)
    }

    /// Deletes one object by the key `list` returned (a missing object is fine).
    pub async fn delete_key(&self, key: &str) -> StoreResult<()> {
        let path = self
            .inner
            .path(key)
            .and_then(|p| Path::parse(p).ok())
            .ok_or_else(|| StoreError::Config(format!("invalid object key {key:?}")))?;
        let len = layout::parse_block_key(key).map(|(_, _, len)| len);
        let inner = &self.inner;
        inner
            .bounded("delete", path.clone(), inner.delete_path(path, len))
            .await
    }

    /// Parses a block key back into (slice id, block index, block length).
    pub fn parse_block_key(key: &str) -> Option<(u64, u32, u32)> {
        layout::parse_block_key(key)
    }
}

/// When an object was written, in nanoseconds since the Unix epoch (saturated where `i64` ends).
fn last_modified_ns(meta: &object_store::ObjectMeta) -> i64 {
    let at = &meta.last_modified;
    at.timestamp_nanos_opt().unwrap_or(if at.timestamp() < 0 {
        i64::MIN
    } else {
        i64::MAX
    })
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
        match self.inherited.iter().find(|(below, _)| id < *below) {
            Some((_, ancestor)) if ancestor.as_ref().is_empty() => Path::from(key),
            Some((_, ancestor)) => Path::from(format!("{ancestor}/{key}")),
            None => Path::from(self.path(&key).expect("block keys are never empty")),
        }
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

    /// Runs one store operation within the operation timeout.
    async fn bounded<T>(
        &self,
        op: &str,
        path: Path,
        work: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        match tokio::time::timeout(self.operation_timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(self.timed_out(op, &path)),
        }
    }

    fn timed_out(&self, op: &str, path: &Path) -> StoreError {
        StoreError::Io(format!(
            "{op} {path} on {}: no answer within the {} s operation timeout",
            self.description,
            self.operation_timeout.as_secs_f64()
        ))
    }

    async fn put_block(&self, id: u64, block: Block, slice: Bytes) -> StoreResult<()> {
        let path = self.block_path(id, block);
        let start = block.start as usize;
        let data = slice.slice(start..start + block.len as usize);
        {
            // A local directory keeps no attributes (and needs no checksums: see integrity.rs).
            let attributes = match self.local {
                Some(_) => object_store::Attributes::new(),
                None => integrity::attributes_for(&data),
            };
            if data.len() as u64 > MULTIPART_ABOVE {
                self.put_multipart(&path, &data, attributes).await?;
            } else {
                let _permit = self.request_permit().await;
                let options = PutOptions {
                    attributes,
                    ..PutOptions::default()
                };
                self.store
                    .put_opts(&path, data.clone().into(), options)
                    .await
                    .map_err(|err| self.error(&err, "put", path.as_ref()))?;
            }
            let _permit = self.request_permit().await;
            if let Some(local) = &self.local {
                let file = local
                    .file_path(&path)
                    .map_err(|err| self.sync_error(&err, "block"))?;
                let local = Arc::clone(local);
                blocking(move || local.sync_file(&file))
                    .await
                    .map_err(|err| self.sync_error(&err, "block"))?;
            }
        }
        // Uploads skip the disk cache (writing it cost more CPU than the upload); pages of
        // small slices go to the memory cache as copies (a shared slice would pin the caller's
        // whole buffer). Pages not cached are read back from the store.
        if let Some(pages) = self.pages.as_ref() {
            if slice.len() as u64 <= CACHE_UPLOADS_UP_TO {
                let object = self.object_key(id, block);
                for index in 0..block.len.div_ceil(PAGE_SIZE as u32) {
                    let at = index as usize * PAGE_SIZE as usize;
                    let len = page_len(block.len, index) as usize;
                    let key = PageKey {
                        object: Arc::clone(&object),
                        index,
                    };
                    pages.insert(key, Bytes::copy_from_slice(&data[at..at + len]));
                }
            }
        }
        Ok(())
    }

    /// Uploads one large object as parts in parallel: one PUT stream is slower than several.
    async fn put_multipart(
        &self,
        path: &Path,
        data: &Bytes,
        attributes: object_store::Attributes,
    ) -> StoreResult<()> {
        let error = |err: object_store::Error| self.error(&err, "put", path.as_ref());
        let mut upload = {
            let _permit = self.request_permit().await;
            let options = PutMultipartOptions {
                attributes,
                ..PutMultipartOptions::default()
            };
            self.store
                .put_multipart_opts(path, options)
                .await
                .map_err(error)?
        };
        // The futures are made up front (in part order, as the upload requires); keeping the
        // closure out of the stream's type keeps the future `Send`.
        let parts: Vec<_> = (0..data.len())
            .step_by(PART_BYTES)
            .map(|at| {
                let part =
                    upload.put_part(data.slice(at..(at + PART_BYTES).min(data.len())).into());
                self.send_part(part)
            })
            .collect();
        let sent = futures::stream::iter(parts)
            .buffer_unordered(PARTS_IN_PARALLEL)
            .try_collect::<()>()
            .await;
        let _permit = self.request_permit().await;
        match sent {
            Ok(()) => upload.complete().await.map(drop).map_err(error),
            Err(err) => {
                if let Err(abort) = upload.abort().await {
                    tracing::debug!(path = %path, error = %abort, "could not abort an upload");
                }
                Err(error(err))
            }
        }
    }

    async fn send_part(&self, part: object_store::UploadPart) -> object_store::Result<()> {
        let _permit = self.request_permit().await;
        part.await
    }

    /// `file://`: syncs the directories of a slice's (synced) block files, once each.
    async fn sync_slice_dirs(&self, id: u64, size: u64) -> StoreResult<()> {
        let Some(local) = &self.local else {
            return Ok(());
        };
        let mut dirs = BTreeSet::new();
        for block in layout::slice_blocks(size, self.block_size) {
            let file = local
                .file_path(&self.block_path(id, block))
                .map_err(|err| self.sync_error(&err, "block"))?;
            if let Some(dir) = file.parent() {
                dirs.insert(dir.to_path_buf());
            }
        }
        if dirs.is_empty() {
            return Ok(());
        }
        let local = Arc::clone(local);
        blocking(move || local.sync_dirs(&dirs))
            .await
            .map_err(|err| self.sync_error(&err, "directory"))
    }

    fn sync_error(&self, err: &std::io::Error, what: &str) -> StoreError {
        StoreError::Io(format!(
            "cannot sync a {what} written to {}: {err}",
            self.description
        ))
    }

    async fn request_permit(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.request_permits
            .acquire()
            .await
            .expect("the request semaphore is never closed")
    }

    /// The cache name of a block object (distinct across stores sharing a cache).
    fn object_key(&self, id: u64, block: Block) -> Arc<str> {
        Arc::from(self.cache_key(&self.block_path(id, block)))
    }

    /// Bytes `range` of a block: through the page cache, or (no cache) exactly those bytes.
    async fn read_block(
        self: &Arc<Self>,
        id: u64,
        block: Block,
        range: Range<usize>,
    ) -> StoreResult<Bytes> {
        let Some(pages) = &self.pages else {
            // Whole pages, so that each is verified against its checksum.
            let indexes = page_range(&range);
            let mut parts = Vec::with_capacity(indexes.len());
            let mut deliver = |_, page| parts.push(page);
            let path = self.block_path(id, block);
            let fetch = self.fetch_pages(id, block, indexes.clone(), &mut deliver);
            self.bounded("get", path, fetch).await?;
            let from = range.start - indexes.start as usize * PAGE_SIZE as usize;
            let pages_len = parts.iter().map(Bytes::len).sum();
            return Ok(concat(parts, pages_len).slice(from..from + range.len()));
        };
        let object = self.object_key(id, block);
        let indexes = page_range(&range);
        let page_len = |index| page_len(block.len, index);
        let (waits, claims) = pages
            .pages(&object, indexes.clone(), page_len, Demand::Read)
            .expect("demand reads are always granted");
        let missed = claims.len() as u64;
        cellar_metrics::cache_lookups(
            cellar_metrics::Cache::Memory,
            waits.len() as u64 - missed,
            missed,
        );
        // Split into spans so that a long read is several GETs in parallel.
        for span in claims_by_span(claims, true) {
            self.spawn_fetches(id, block, span);
        }
        let mut parts = Vec::with_capacity(waits.len());
        for (index, page) in indexes.zip(waits) {
            let data = page.bytes().await?;
            let page_start = index as usize * PAGE_SIZE as usize;
            let from = range.start.max(page_start) - page_start;
            let to = range.end.min(page_start + data.len()) - page_start;
            parts.push(data.slice(from..to));
        }
        Ok(concat(parts, range.len()))
    }

    /// Fetches claimed pages of one block in a task of its own, so that a reader that gives up
    /// does not cancel the fetch other readers wait for.
    fn spawn_fetches(self: &Arc<Self>, id: u64, block: Block, claims: Vec<PageClaim>) {
        if claims.is_empty() {
            return;
        }
        let inner = Arc::clone(self);
        tokio::spawn(async move {
            let claims = inner.read_disk_cache(claims).await;
            for run in claims_by_span(claims, false) {
                inner.fetch_run(id, block, run).await;
            }
        });
    }

    /// Completes the claims the disk cache holds; returns the others.
    async fn read_disk_cache(&self, claims: Vec<PageClaim>) -> Vec<PageClaim> {
        let Some(disk) = &self.disk else {
            return claims;
        };
        let mut missing = Vec::new();
        for claim in claims {
            let cached = disk.get(&disk_key(&claim.key), claim.len as usize).await;
            cellar_metrics::cache_lookup(cellar_metrics::Cache::Disk, cached.is_some());
            match cached {
                Some(data) => claim.complete(data),
                None => missing.push(claim),
            }
        }
        missing
    }

    /// Fetches a run of consecutive claimed pages, each page completed (and handed to its
    /// waiters) as soon as its bytes have arrived and proved intact; what is left when the
    /// fetch fails or runs out of time fails.
    async fn fetch_run(&self, id: u64, block: Block, run: Vec<PageClaim>) {
        let pages = run[0].key.index..run[0].key.index + run.len() as u32;
        let mut claims: VecDeque<PageClaim> = run.into();
        let mut deliver = |_, data: Bytes| {
            let claim = claims.pop_front().expect("one claim per fetched page");
            self.cache_on_disk(&claim.key, &data);
            claim.complete(data);
        };
        let path = self.block_path(id, block);
        let fetch = self.fetch_pages(id, block, pages, &mut deliver);
        let fetched = self.bounded("get", path, fetch).await;
        if let Err(err) = fetched {
            claims.into_iter().for_each(|claim| claim.fail(err.clone()));
        }
    }

    /// Pages `pages` of a block, each verified and handed to `deliver` in order; answers that
    /// fail their integrity check are read again (from the first page not delivered yet).
    async fn fetch_pages(
        &self,
        id: u64,
        block: Block,
        pages: Range<u32>,
        deliver: &mut (impl FnMut(u32, Bytes) + Send),
    ) -> StoreResult<()> {
        let path = self.block_path(id, block);
        let mut next = pages.start;
        let mut retries = 0;
        loop {
            match self
                .get_pages(&path, block, &mut next, pages.end, deliver)
                .await
            {
                Ok(()) => return Ok(()),
                Err(Fetch::Integrity(err)) if retries < INTEGRITY_RETRIES => {
                    retries += 1;
                    cellar_metrics::store_integrity_failure();
                    tracing::warn!(%path, error = %err, retries, "a read failed its integrity check; reading it again");
                }
                Err(Fetch::Integrity(err)) => {
                    cellar_metrics::store_integrity_failure();
                    tracing::error!(%path, error = %err, "a read kept failing its integrity check");
                    return Err(err);
                }
                Err(Fetch::Store(err)) => return Err(err),
            }
        }
    }

    /// One ranged GET of pages `*next..end` of a block. Each page is checked (its length, and
    /// its checksum when the object has them) and delivered as soon as its bytes are in;
    /// `*next` moves past it.
    async fn get_pages(
        &self,
        path: &Path,
        block: Block,
        next: &mut u32,
        end: u32,
        deliver: &mut (impl FnMut(u32, Bytes) + Send),
    ) -> Result<(), Fetch> {
        let start = u64::from(*next) * PAGE_SIZE;
        let stop = (u64::from(end) * PAGE_SIZE).min(u64::from(block.len));
        let _permit = self.request_permit().await;
        let options = GetOptions {
            range: Some((start..stop).into()),
            ..GetOptions::default()
        };
        let got = match self.store.get_opts(path, options).await {
            Ok(got) => got,
            Err(err) => {
                let unverifiable = matches!(
                    retry::classify(&err),
                    retry::Failure::Other { status: None, .. }
                );
                let err = self.error(&err, "get", path.as_ref());
                // A store that answered with a status (or not at all) was retried already;
                // an answer that did not match the request (wrong range, undecodable) is read
                // again like a corrupt one.
                return Err(if unverifiable {
                    Fetch::Integrity(err)
                } else {
                    Fetch::Store(err)
                });
            }
        };
        let checksums = integrity::checksums_in(&got.attributes).map_err(|_| {
            Fetch::Integrity(self.corrupt_object(path, *next, "a garbled checksum header"))
        })?;
        let mut stream = match got.payload {
            // A local file is read whole: its stream would read it in 8 KiB pieces.
            GetResultPayload::File(..) => futures::stream::once(got.bytes()).boxed(),
            _ => got.into_stream(),
        };
        let mut page = page_buffers::take(page_len(block.len, *next) as usize);
        while let Some(chunk) = stream.next().await {
            let mut chunk =
                chunk.map_err(|err| Fetch::Integrity(self.error(&err, "get", path.as_ref())))?;
            while !chunk.is_empty() && *next < end {
                let want = page_len(block.len, *next) as usize;
                let take = (want - page.len()).min(chunk.len());
                page.extend_from_slice(&chunk.split_to(take));
                if page.len() < want {
                    break;
                }
                let following = if *next + 1 < end {
                    page_len(block.len, *next + 1) as usize
                } else {
                    0
                };
                let data = page_buffers::freeze(std::mem::replace(
                    &mut page,
                    page_buffers::take(following),
                ));
                if let Some(crcs) = &checksums {
                    if !integrity::page_intact(crcs, *next, &data) {
                        let what = "bytes that do not match their checksum";
                        return Err(Fetch::Integrity(self.corrupt_object(path, *next, what)));
                    }
                }
                deliver(*next, data);
                *next += 1;
            }
        }
        if *next < end {
            return Err(Fetch::Integrity(self.short_object(path, block)));
        }
        Ok(())
    }

    fn corrupt_object(&self, path: &Path, page: u32, what: &str) -> StoreError {
        StoreError::Io(format!(
            "object {path} on {} returned {what} (page {page})",
            self.description
        ))
    }

    fn short_object(&self, path: &Path, block: Block) -> StoreError {
        StoreError::Io(format!(
            "object {path} on {} is shorter than the {} bytes its key says",
            self.description, block.len
        ))
    }

    /// Writes a fetched page to the disk cache in the background (the reader does not wait).
    fn cache_on_disk(&self, key: &PageKey, data: &Bytes) {
        if let Some(disk) = &self.disk {
            let (disk, name, data) = (Arc::clone(disk), disk_key(key), data.clone());
            tokio::task::spawn_blocking(move || disk.put(&name, &data));
        }
    }

    /// Deletes an object; a block object of known length `len` also leaves the caches.
    async fn delete_path(&self, path: Path, len: Option<u32>) -> StoreResult<()> {
        if let Some(len) = len {
            let object: Arc<str> = Arc::from(self.cache_key(&path));
            let indexes = 0..len.div_ceil(PAGE_SIZE as u32);
            if let Some(pages) = &self.pages {
                pages.invalidate(&object, indexes.clone());
            }
            if let Some(disk) = &self.disk {
                for index in indexes {
                    let key = PageKey {
                        object: Arc::clone(&object),
                        index,
                    };
                    disk.remove(&disk_key(&key)).await;
                }
            }
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

/// Why a ranged GET failed.
enum Fetch {
    /// The store failed (after its own retries): reading again now would not help.
    Store(StoreError),
    /// The answer was short, corrupt or did not match the request: worth reading again.
    Integrity(StoreError),
}

/// The pages covering a byte range of an object.
fn page_range(range: &Range<usize>) -> Range<u32> {
    let page = PAGE_SIZE as usize;
    (range.start / page) as u32..range.end.div_ceil(page) as u32
}

/// Length of page `index` of an object of `object_len` bytes.
fn page_len(object_len: u32, index: u32) -> u64 {
    (u64::from(object_len) - u64::from(index) * PAGE_SIZE).min(PAGE_SIZE)
}

/// The disk cache's name of a page.
fn disk_key(key: &PageKey) -> String {
    format!("{}#{}", key.object, key.index)
}

/// Groups claims (in page order) into runs of consecutive pages, each one ranged GET; with
/// `split`, no run is longer than [`SPAN_BYTES`].
fn claims_by_span(claims: Vec<PageClaim>, split: bool) -> Vec<Vec<PageClaim>> {
    let mut runs: Vec<Vec<PageClaim>> = Vec::new();
    for claim in claims {
        let joins = runs.last().is_some_and(|run| {
            let last = run.last().expect("runs are never empty");
            last.key.index + 1 == claim.key.index
                && (!split || run.iter().map(|c| c.len).sum::<u64>() + claim.len <= SPAN_BYTES)
        });
        match runs.last_mut() {
            Some(run) if joins => run.push(claim),
            _ => runs.push(vec![claim]),
        }
    }
    runs
}

/// The parts joined (no copy when there is one).
fn concat(parts: Vec<Bytes>, len: usize) -> Bytes {
    if let [single] = parts.as_slice() {
        return single.clone();
    }
    let mut joined = BytesMut::with_capacity(len);
    for part in parts {
        joined.extend_from_slice(&part);
    }
    joined.freeze()
}

/// Runs blocking file system work on tokio's blocking threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
        Err(err) => Err(std::io::Error::other(err)),
    }
}

/// What `build_store` makes: the client, its name for the disk cache and, for a local directory,
/// what syncs its writes.
type BuiltStore = (Arc<dyn ObjectStore>, String, Option<Arc<LocalDurability>>);

/// Builds the object store client and names it for the disk cache.
fn build_store(backend: &Backend, options: &StoreOptions) -> StoreResult<BuiltStore> {
    match backend {
        Backend::Local { root } => {
            durable::create_dir_all_durable(root).map_err(|e| {
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
            let canonical = root.canonicalize().map_err(|e| {
                StoreError::Config(format!(
                    "cannot use store directory {}: {e}",
                    root.display()
                ))
            })?;
            let local = LocalDurability::new(canonical, store.clone());
            Ok((
                Arc::new(store),
                format!("file:{}", root.display()),
                Some(Arc::new(local)),
            ))
        }
        Backend::S3(s3) => {
            let mut builder = object_store::aws::AmazonS3Builder::new()
                .with_bucket_name(&s3.bucket)
                .with_region(&s3.region)
                .with_access_key_id(&s3.credentials.access_key_id)
                .with_secret_access_key(&s3.credentials.secret_access_key)
                .with_virtual_hosted_style_request(false)
                .with_allow_http(s3.allow_http())
                .with_retry(retry::retry_config(options.max_retries, &options.timeouts))
                .with_http_connector(metered::CountingConnector::default())
                .with_client_options(retry::client_options(s3.allow_http(), &options.timeouts));
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
                None,
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
