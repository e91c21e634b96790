//! Object store access for a volume's immutable slice objects.
//!
//! THIS FILE IS THE CONTRACT between `cellar-store` and `cellar-vfs`. The signatures are fixed;
//! the bodies are being written.
//!
//! A slice (an immutable extent of a file, see `cellar-meta`) of `size` bytes is stored as
//! `ceil(size / block_size)` block objects, each at most `block_size` (4 MiB) long, under
//! `{prefix}/chunks/{id / 1_000_000}/{id / 1_000}/{id}_{block_index}_{block_len}` (layout documented in
//! docs/ARCHITECTURE.md). Objects are never rewritten, so any cached copy is always valid.

use bytes::Bytes;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist (a slice the metadata references is missing: EIO upstream).
    #[error("object {0} not found")]
    NotFound(String),
    /// Store URL or options are wrong.
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

#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub block_size: u64,
    pub cache_mem_bytes: u64,
    pub cache_dir: Option<std::path::PathBuf>,
    pub cache_disk_bytes: u64,
    pub max_retries: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
}

/// Block objects of one volume (a prefix of a bucket or of a local directory). Cheap to clone.
#[derive(Clone)]
pub struct BlockStore {
    _private: std::sync::Arc<()>,
}

impl BlockStore {
    /// `file:///abs/dir` or `s3://bucket[/prefix]?endpoint=http://host:port&region=us-east-1`
    /// (path-style; credentials from the URL-independent env AWS_ACCESS_KEY_ID /
    /// AWS_SECRET_ACCESS_KEY or from `creds`). `volume_prefix` is appended to the URL's prefix.
    pub fn open(url: &str, volume_prefix: &str, options: StoreOptions) -> StoreResult<BlockStore> { todo!("{url}{volume_prefix}{options:?}") }
    /// A cheap round trip (list one key) that tells an unreachable store or bad credentials apart.
    pub async fn probe(&self) -> StoreResult<()> { todo!() }
    /// Uploads a slice's blocks in parallel (retrying transient errors).
    pub async fn put_slice(&self, id: u64, data: Bytes) -> StoreResult<()> { todo!("{id}{data:?}") }
    /// Reads `len` bytes at `off` of slice `id` (stored length `size`) through the block cache.
    pub async fn read_slice(&self, id: u64, size: u32, off: u32, len: u32) -> StoreResult<Bytes> { todo!("{id}{size}{off}{len}") }
    /// Starts fetching a range of a slice into the cache without waiting (read-ahead).
    pub fn prefetch(&self, id: u64, size: u32, off: u32, len: u32) { let _ = (id, size, off, len); }
    /// Deletes a slice's blocks (missing blocks are fine).
    pub async fn delete_slice(&self, id: u64, size: u32) -> StoreResult<()> { todo!("{id}{size}") }
    /// Every object under this volume's prefix (for fsck, gc of leaked objects, volume deletion).
    pub async fn list(&self) -> StoreResult<Vec<ObjectInfo>> { todo!() }
    /// Deletes one object by the key `list` returned.
    pub async fn delete_key(&self, key: &str) -> StoreResult<()> { todo!("{key}") }
    /// Parses a block key back into (slice id, block index, block length).
    pub fn parse_block_key(key: &str) -> Option<(u64, u32, u32)> { let _ = key; todo!() }
}
