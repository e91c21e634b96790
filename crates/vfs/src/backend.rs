//! The backends of a volume: the metadata engine, the block store, and the process's one async
//! runtime that drives store I/O. The data paths that need only them live beside it:
//! [`crate::read_path`] (committed content), [`crate::compaction`], [`crate::gc`].

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;
use cellar_meta::{GarbageSlice, MetaEngine, VolumeInfo};
use cellar_store::{BlockStore, StoreOptions};

use crate::{VfsResult, VolumeConfig};

pub(crate) const CHUNK_SIZE: u64 = 64 << 20;
/// Block size of new volumes: a slice is one object (a slice never spans chunks), so a streaming
/// read is a few large ranged GETs of it. Volumes keep the block size they were formatted with.
pub(crate) const BLOCK_SIZE: u64 = CHUNK_SIZE;
pub(crate) const INLINE_THRESHOLD: u64 = 64 << 10;
/// How far in the future an upload's intent record falls due for gc. A block request gives up
/// after about a minute of retries, so an hour is far beyond any upload still in flight: gc never
/// deletes an object that a live writer may yet write or commit.
const PENDING_UPLOAD_GRACE: std::time::Duration = std::time::Duration::from_secs(3600);
const STORE_MAX_RETRIES: u32 = 4;

pub(crate) fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Opens the metadata engine named by the config and returns its volume, if formatted.
pub(crate) fn open_meta(
    config: &VolumeConfig,
) -> anyhow::Result<(Arc<dyn MetaEngine>, Option<VolumeInfo>)> {
    let meta = cellar_meta::open(&config.meta_url).context("opening the metadata engine")?;
    let volume = meta
        .volume()
        .context("reading the volume from the metadata engine")?;
    if let Some(v) = &volume {
        anyhow::ensure!(
            v.name == config.volume,
            "the metadata engine holds volume {:?}, not {:?}",
            v.name,
            config.volume
        );
    }
    Ok((meta, volume))
}

pub(crate) struct Core {
    pub meta: Arc<dyn MetaEngine>,
    pub store: BlockStore,
    pub volume: VolumeInfo,
    pub runtime: IoRuntime,
    /// A snapshot: every change is refused with EROFS.
    pub read_only: bool,
}

/// The async runtime store I/O runs on: the caller's when there is one (the server calls the vfs
/// from its blocking pool), else one of the vfs's own (a FUSE daemon). Either way one per
/// process, and `block_on` happens only on threads outside it (FUSE and background threads).
pub(crate) struct IoRuntime {
    owned: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl IoRuntime {
    fn current_or_new() -> anyhow::Result<IoRuntime> {
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            return Ok(IoRuntime {
                owned: None,
                handle,
            });
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cellar-store-io")
            .enable_all()
            .build()
            .context("starting the store I/O runtime")?;
        Ok(IoRuntime {
            handle: runtime.handle().clone(),
            owned: Some(runtime),
        })
    }

    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.handle.block_on(future)
    }

    pub fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(future)
    }

    /// Enters the runtime, for store calls that start background tasks (read-ahead).
    pub fn enter(&self) -> tokio::runtime::EnterGuard<'_> {
        self.handle.enter()
    }
}

impl Drop for IoRuntime {
    fn drop(&mut self) {
        // Read-ahead tasks may still run; they hold nothing that must finish.
        if let Some(runtime) = self.owned.take() {
            runtime.shutdown_background();
        }
    }
}

impl Core {
    /// Opens the volume's backends; formats the metadata when `format_if_new`, otherwise the
    /// volume must exist. Probes the store so bad endpoints or credentials fail here, clearly.
    pub fn open(config: &VolumeConfig, format_if_new: bool) -> anyhow::Result<Core> {
        let (meta, volume) = open_meta(config)?;
        let volume = match volume {
            Some(v) => v,
            None if format_if_new => meta
                .format(&VolumeInfo {
                    name: config.volume.clone(),
                    uuid: uuid::Uuid::new_v4().to_string(),
                    chunk_size: CHUNK_SIZE,
                    block_size: BLOCK_SIZE,
                    inline_threshold: INLINE_THRESHOLD,
                    created_ns: now_ns(),
                })
                .context("formatting the volume")?,
            None => anyhow::bail!("volume {:?} is not formatted", config.volume),
        };
        Self::connect(meta, volume, config)
    }

    pub fn connect(
        meta: Arc<dyn MetaEngine>,
        volume: VolumeInfo,
        config: &VolumeConfig,
    ) -> anyhow::Result<Core> {
        let runtime = IoRuntime::current_or_new()?;
        let options = StoreOptions {
            block_size: volume.block_size,
            cache_mem_bytes: config.cache_mem_bytes,
            cache_dir: config.cache_dir.clone(),
            cache_disk_bytes: config.cache_disk_bytes,
            max_retries: STORE_MAX_RETRIES,
            timeouts: config.store_timeouts,
        };
        let ancestors: Vec<(u64, String)> = meta
            .lineage()
            .context("reading the volume's lineage")?
            .into_iter()
            .map(|a| (a.below, a.uuid))
            .collect();
        let read_only = meta.read_only().context("reading the volume's mode")?;
        let store = BlockStore::open(&config.store_url, &volume.uuid, options)
            .and_then(|store| store.inheriting(&ancestors))
            .context("opening the object store")?;
        runtime
            .block_on(store.probe())
            .context("the object store is unreachable or refused the credentials")?;
        Ok(Core {
            meta,
            store,
            volume,
            runtime,
            read_only,
        })
    }

    pub fn chunk_size(&self) -> u64 {
        self.volume.chunk_size
    }

    /// Records slices about to be uploaded as garbage due [`PENDING_UPLOAD_GRACE`] from now: if
    /// this mount dies before committing them, their objects are known garbage (not leaked) and
    /// gc deletes them once no upload can still be writing them. Committing a slice drops its row.
    pub fn record_pending_uploads(&self, slices: &[GarbageSlice]) -> VfsResult<()> {
        let due = now_ns().saturating_add(PENDING_UPLOAD_GRACE.as_nanos() as i64);
        Ok(self.meta.add_garbage(slices, due)?)
    }

    /// Uploads `data` as one new slice and returns its id; on failure the id is recorded as
    /// garbage, since some of its blocks may have landed.
    pub fn put_new_slice(&self, data: Bytes) -> VfsResult<u64> {
        let id = self.meta.alloc_slice_ids(1)?;
        let size = data.len() as u32;
        self.record_pending_uploads(&[GarbageSlice { id, size }])?;
        if let Err(e) = self.runtime.block_on(self.store.put_slice(id, data)) {
            self.discard_slices(&[GarbageSlice { id, size }]);
            return Err(e.into());
        }
        Ok(id)
    }

    /// Records uploaded-but-unreferenced slices as garbage (logged if even that fails: the
    /// objects then show up as leaked in fsck).
    pub fn discard_slices(&self, slices: &[GarbageSlice]) {
        if slices.is_empty() {
            return;
        }
        if let Err(e) = self.meta.add_garbage(slices, now_ns()) {
            tracing::error!(error = %e, count = slices.len(), "could not record uploaded slices as garbage");
        }
    }

    /// Number of block objects a slice of `size` bytes is stored as.
    pub fn block_count(&self, size: u32) -> u64 {
        u64::from(size).div_ceil(self.volume.block_size)
    }
}
