//! The backends of a volume (metadata engine, block store, the runtime that drives store I/O) and
//! the data paths that need only them: reading committed content, compaction, garbage collection.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;
use cellar_meta::{GarbageSlice, Ino, MetaEngine, Slice, VolumeInfo};
use cellar_store::{BlockStore, StoreOptions};
use futures::StreamExt;

use crate::intervals::IntervalMap;
use crate::{VfsResult, VolumeConfig};

pub(crate) const CHUNK_SIZE: u64 = 64 << 20;
pub(crate) const BLOCK_SIZE: u64 = 4 << 20;
pub(crate) const INLINE_THRESHOLD: u64 = 64 << 10;
/// Chunks with at least this many slices are rewritten as one slice.
pub(crate) const COMPACT_MIN_SLICES: usize = 16;
/// How many store deletions run at once during garbage collection.
const DELETE_CONCURRENCY: usize = 32;
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

/// Where a visible piece of a chunk comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SliceRef {
    pub id: u64,
    pub size: u32,
}

/// The visible layout of a chunk: its slices in commit order, later ones shadowing earlier ones.
pub(crate) fn chunk_map(slices: &[Slice]) -> IntervalMap<SliceRef> {
    let mut map = IntervalMap::default();
    for s in slices {
        let start = u64::from(s.pos);
        map.insert(
            start,
            start + u64::from(s.len),
            SliceRef {
                id: s.id,
                size: s.size,
            },
            u64::from(s.off),
        );
    }
    map
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
    pub runtime: tokio::runtime::Runtime,
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
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cellar-store-io")
            .enable_all()
            .build()
            .context("starting the store I/O runtime")?;
        let options = StoreOptions {
            block_size: volume.block_size,
            cache_mem_bytes: config.cache_mem_bytes,
            cache_dir: config.cache_dir.clone(),
            cache_disk_bytes: config.cache_disk_bytes,
            max_retries: STORE_MAX_RETRIES,
        };
        let store = BlockStore::open(&config.store_url, &volume.uuid, options)
            .context("opening the object store")?;
        runtime
            .block_on(store.probe())
            .context("the object store is unreachable or refused the credentials")?;
        Ok(Core {
            meta,
            store,
            volume,
            runtime,
        })
    }

    pub fn chunk_size(&self) -> u64 {
        self.volume.chunk_size
    }

    /// Committed bytes `[offset, offset + len)` of a file whose committed size is `size`; bytes
    /// past `size` (and holes) are zeros.
    pub fn read_committed(
        &self,
        ino: Ino,
        offset: u64,
        len: usize,
        size: u64,
    ) -> VfsResult<Vec<u8>> {
        let end = (offset + len as u64).min(size);
        if offset >= end {
            return Ok(vec![0u8; len]);
        }
        if let Some(blob) = self.meta.read_inline(ino)? {
            let mut out = vec![0u8; len];
            // Inline bytes hold the start of the file; the rest up to the size reads as zeros.
            let blob_end = end.min(blob.len() as u64);
            if offset < blob_end {
                out[..(blob_end - offset) as usize]
                    .copy_from_slice(&blob[offset as usize..blob_end as usize]);
            }
            return Ok(out);
        }
        let cs = self.chunk_size();
        let mut maps = Vec::new();
        for index in offset / cs..=(end - 1) / cs {
            let slices = self.meta.read_chunk(ino, index)?;
            maps.push((index * cs, chunk_map(&slices)));
        }
        let pieces: Vec<_> = maps
            .iter()
            .flat_map(|(chunk_start, map)| {
                let from = offset.max(*chunk_start) - chunk_start;
                let to = end.min(chunk_start + cs) - chunk_start;
                map.clipped(from, to)
                    .map(move |p| (chunk_start + p.start - offset, p))
            })
            .collect();
        if let [(0, p)] = pieces.as_slice() {
            if p.source.id != 0 && p.end - p.start == len as u64 {
                // One slice covers the whole request: its bytes are the answer, no zeroed
                // buffer to copy them into.
                let data = self.runtime.block_on(self.store.read_slice(
                    p.source.id,
                    p.source.size,
                    p.source_off as u32,
                    len as u32,
                ))?;
                let mut out = Vec::from(data);
                out.resize(len, 0);
                return Ok(out);
            }
        }
        let mut out = vec![0u8; len];
        self.fill_from_store(pieces.into_iter(), &mut out)?;
        Ok(out)
    }

    /// Reads the visible bytes of the given pieces (`(position in out, piece)`) into `out`.
    fn fill_from_store(
        &self,
        pieces: impl Iterator<Item = (u64, crate::intervals::Piece<SliceRef>)>,
        out: &mut [u8],
    ) -> VfsResult<()> {
        let reads: Vec<_> = pieces
            .filter(|(_, p)| p.source.id != 0)
            .map(|(at, p)| {
                let store = self.store.clone();
                let len = (p.end - p.start) as u32;
                async move {
                    (
                        at,
                        store
                            .read_slice(p.source.id, p.source.size, p.source_off as u32, len)
                            .await,
                    )
                }
            })
            .collect();
        for (at, data) in self.runtime.block_on(futures::future::join_all(reads)) {
            let data = data?;
            let at = at as usize;
            let n = data.len().min(out.len() - at);
            out[at..at + n].copy_from_slice(&data[..n]);
        }
        Ok(())
    }

    /// Starts fetching `[start, end)` of a chunked file into the block cache.
    pub fn prefetch(&self, ino: Ino, start: u64, end: u64) -> VfsResult<()> {
        if start >= end {
            return Ok(());
        }
        let cs = self.chunk_size();
        for index in start / cs..=(end - 1) / cs {
            let chunk_start = index * cs;
            let slices = self.meta.read_chunk(ino, index)?;
            let map = chunk_map(&slices);
            for p in map.clipped(
                start.max(chunk_start) - chunk_start,
                end.min(chunk_start + cs) - chunk_start,
            ) {
                if p.source.id != 0 {
                    self.store.prefetch(
                        p.source.id,
                        p.source.size,
                        p.source_off as u32,
                        (p.end - p.start) as u32,
                    );
                }
            }
        }
        Ok(())
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

    /// Rewrites one fragmented chunk as a single slice. Returns whether the chunk was replaced
    /// (false when it changed meanwhile or is not fragmented).
    pub fn compact_chunk(&self, ino: Ino, index: u64) -> VfsResult<bool> {
        let slices = self.meta.read_chunk(ino, index)?;
        if slices.len() < 2 {
            return Ok(false);
        }
        let size = match self.meta.getattr(ino) {
            Ok(attr) => attr.size,
            Err(e) if e.errno() == libc::ENOENT => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let cs = self.chunk_size();
        let chunk_start = index * cs;
        let visible_end = size.saturating_sub(chunk_start).min(cs);
        let map = chunk_map(&slices);
        let data_pieces: Vec<_> = map
            .clipped(0, visible_end)
            .filter(|p| p.source.id != 0)
            .collect();
        let new = match (data_pieces.first(), data_pieces.last()) {
            (Some(first), Some(last)) => {
                let (start, end) = (first.start, last.end);
                let mut data = vec![0u8; (end - start) as usize];
                self.fill_from_store(
                    map.clipped(start, end).map(|p| (p.start - start, p)),
                    &mut data,
                )?;
                let len = data.len() as u32;
                let id = self.put_new_slice(Bytes::from(data))?;
                vec![Slice {
                    id,
                    size: len,
                    off: 0,
                    len,
                    pos: start as u32,
                }]
            }
            _ => Vec::new(),
        };
        let replaced = self.meta.replace_chunk(ino, index, &slices, &new)?;
        if !replaced {
            let garbage: Vec<_> = new
                .iter()
                .map(|s| GarbageSlice {
                    id: s.id,
                    size: s.size,
                })
                .collect();
            self.discard_slices(&garbage);
        }
        Ok(replaced)
    }

    /// One compaction pass over at most `limit` fragmented chunks; returns how many were rewritten.
    pub fn compact_pass(&self, limit: usize) -> VfsResult<u64> {
        let mut compacted = 0;
        for (ino, index) in self.meta.fragmented_chunks(COMPACT_MIN_SLICES, limit)? {
            match self.compact_chunk(ino, index) {
                Ok(true) => compacted += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(ino, chunk = index, error = %e, "compaction of a chunk failed")
                }
            }
        }
        Ok(compacted)
    }

    /// Deletes the objects of garbage slices older than `before_ns` and forgets them; returns how
    /// many objects (blocks) were deleted.
    pub fn collect_garbage(&self, before_ns: i64) -> VfsResult<u64> {
        let mut deleted_blocks = 0;
        loop {
            let batch = self.meta.garbage_slices(before_ns, 512)?;
            if batch.is_empty() {
                return Ok(deleted_blocks);
            }
            let store = &self.store;
            let results: Vec<(GarbageSlice, bool)> = self.runtime.block_on(
                futures::stream::iter(batch.iter().copied())
                    .map(|g| async move {
                        let outcome = store.delete_slice(g.id, g.size).await;
                        if let Err(e) = &outcome {
                            tracing::warn!(slice = g.id, error = %e, "could not delete a garbage slice");
                        }
                        (g, outcome.is_ok())
                    })
                    .buffer_unordered(DELETE_CONCURRENCY)
                    .collect(),
            );
            let forgotten: Vec<u64> = results
                .iter()
                .filter(|(_, ok)| *ok)
                .map(|(g, _)| g.id)
                .collect();
            deleted_blocks += results
                .iter()
                .filter(|(_, ok)| *ok)
                .map(|(g, _)| self.block_count(g.size))
                .sum::<u64>();
            self.meta.forget_garbage(&forgotten)?;
            if forgotten.len() < batch.len() {
                // Some deletions failed: retry them on the next pass rather than spin here.
                return Ok(deleted_blocks);
            }
        }
    }

    /// Number of block objects a slice of `size` bytes is stored as.
    pub fn block_count(&self, size: u32) -> u64 {
        u64::from(size).div_ceil(self.volume.block_size)
    }
}
