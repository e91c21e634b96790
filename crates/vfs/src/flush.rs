//! Turning an inode's buffered writes into committed data: inline bytes for small files, slices
//! uploaded in the background (while the application keeps writing) and committed in write order.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cellar_meta::{Attr, GarbageSlice, Ino, Slice};
use cellar_store::{StoreError, StoreResult};
use tokio::task::JoinHandle;

use crate::backend::now_ns;
use crate::handles::FileState;
use crate::volume::Inner;
use crate::write_buffer::{coalesce, overlay, Extent, Run};
use crate::{Errno, VfsResult};

/// A buffer this large starts uploading in the background.
const SEGMENT_BYTES: u64 = 16 << 20;
/// An extent grown sequentially past this size reserves a whole segment up front.
const SEQUENTIAL_RESERVE_AFTER: usize = 1 << 20;
/// Writers of an inode wait when this much of it is uploading.
const INODE_INFLIGHT_LIMIT: u64 = 64 << 20;
/// Writers flush synchronously when the whole mount buffers this much.
const GLOBAL_DIRTY_LIMIT: u64 = 256 << 20;
/// Buffers untouched this long are flushed by the background flusher.
pub(crate) const IDLE_FLUSH_AFTER: Duration = Duration::from_secs(5);

/// Buffered writes taken by one flush: uploading, then committed as one transaction.
pub(crate) struct Segment {
    /// The buffered extents, in write order (what reads overlay until the commit).
    pub extents: Vec<Run>,
    pub bytes: u64,
    pub end: u64,
    mtime_ns: i64,
    /// The inline bytes were written out with this segment.
    drop_inline: bool,
    slices: Vec<(u64, Slice)>,
    upload: Option<JoinHandle<StoreResult<()>>>,
}

impl Inner {
    /// Buffers a write; may start a background upload, or wait for uploads when too much is
    /// buffered.
    pub(crate) fn buffer_write(&self, file: &FileState, offset: u64, data: &[u8]) -> VfsResult<()> {
        let len = data.len() as u64;
        let buffered = {
            let mut d = file.data.lock();
            match d.buffer.last_mut() {
                Some(last) if last.end() == offset => {
                    // A sequential writer: grow once to a whole segment instead of doubling
                    // (every doubling copies the buffer).
                    let room = last.data.capacity() - last.data.len();
                    if room < data.len() && last.data.len() >= SEQUENTIAL_RESERVE_AFTER {
                        let segment_rest = (SEGMENT_BYTES as usize).saturating_sub(last.data.len());
                        last.data.reserve_exact(segment_rest.max(data.len()));
                    }
                    last.data.extend_from_slice(data)
                }
                _ => d.buffer.push(Extent {
                    offset,
                    data: data.to_vec(),
                }),
            }
            d.buffer_bytes += len;
            d.buffer_end = d.buffer_end.max(offset + len);
            d.mtime_ns = now_ns();
            d.last_write = Some(Instant::now());
            d.buffer_bytes
        };
        let total = self.dirty_bytes.fetch_add(len, Ordering::SeqCst) + len;
        if total > GLOBAL_DIRTY_LIMIT {
            return self.flush_file(file);
        }
        if buffered >= SEGMENT_BYTES {
            let _flushing = file.flush_lock.lock();
            let inline_prefix = self.inline_prefix(file)?;
            self.cut_segment(file, inline_prefix)?;
            while self.commit_front(file, false)? {}
            while file.data.lock().inflight_bytes() > INODE_INFLIGHT_LIMIT {
                self.commit_front(file, true)?;
            }
        }
        Ok(())
    }

    /// Uploads and commits everything buffered for the inode (fsync, close).
    pub(crate) fn flush_file(&self, file: &FileState) -> VfsResult<()> {
        let _flushing = file.flush_lock.lock();
        self.flush_locked(file)
    }

    /// Commits the uploads that already finished, without waiting (background flusher).
    pub(crate) fn commit_finished(&self, file: &FileState) -> VfsResult<()> {
        if let Some(_flushing) = file.flush_lock.try_lock() {
            while self.commit_front(file, false)? {}
        }
        Ok(())
    }

    /// Sets the size of a file: its buffered writes are committed first so none lands past it.
    pub(crate) fn truncate_file(&self, ino: Ino, size: u64) -> VfsResult<Attr> {
        let Some(file) = self.registry.file(ino) else {
            return Ok(self.core.meta.truncate(ino, size, now_ns())?);
        };
        let _flushing = file.flush_lock.lock();
        self.flush_locked(&file)?;
        let attr = self.core.meta.truncate(ino, size, now_ns())?;
        file.data.lock().commit_gen += 1;
        self.note_seen(&attr);
        Ok(attr)
    }

    fn flush_locked(&self, file: &FileState) -> VfsResult<()> {
        while self.commit_front(file, true)? {}
        if file.data.lock().buffer.is_empty() {
            return Ok(());
        }
        let meta = &self.core.meta;
        let attr = meta.getattr(file.ino)?;
        let inline = meta.read_inline(file.ino)?;
        {
            let mut d = file.data.lock();
            let new_size = attr.size.max(d.buffer_end);
            if new_size <= self.core.volume.inline_threshold && (inline.is_some() || attr.size == 0)
            {
                // Small file: store it whole in the metadata, no object store round trip. Done
                // under the data lock (meta never calls back into it), so no write slips between.
                let mut content = inline.unwrap_or_default();
                content.resize(attr.size as usize, 0);
                content.resize(new_size as usize, 0);
                for e in &d.buffer {
                    overlay(&mut content, 0, e.offset, &e.data);
                }
                let attr = meta.write_inline(file.ino, &content, d.mtime_ns)?;
                d.buffer.clear();
                self.dirty_bytes.fetch_sub(d.buffer_bytes, Ordering::SeqCst);
                d.buffer_bytes = 0;
                d.buffer_end = 0;
                d.commit_gen += 1;
                drop(d);
                self.note_seen(&attr);
                return Ok(());
            }
        }
        self.cut_segment(file, inline)?;
        while self.commit_front(file, true)? {}
        Ok(())
    }

    /// The inline bytes a new segment must carry (the file moves from inline to chunks), known
    /// only when nothing is in flight. Caller holds the flush lock.
    fn inline_prefix(&self, file: &FileState) -> VfsResult<Option<Vec<u8>>> {
        if !file.data.lock().inflight.is_empty() {
            return Ok(None);
        }
        Ok(self.core.meta.read_inline(file.ino)?)
    }

    /// Moves the whole buffer into a new segment and starts uploading it. Caller holds the flush
    /// lock. `inline_prefix`: the file's current inline bytes, written out first (lowest priority).
    fn cut_segment(&self, file: &FileState, inline_prefix: Option<Vec<u8>>) -> VfsResult<()> {
        let (extents, index) = {
            let mut d = file.data.lock();
            if d.buffer.is_empty() {
                return Ok(());
            }
            let extents: Vec<Run> = d
                .buffer
                .drain(..)
                .map(|e| Run {
                    offset: e.offset,
                    data: Bytes::from(e.data),
                })
                .collect();
            let segment = Segment {
                extents: extents.clone(),
                bytes: std::mem::take(&mut d.buffer_bytes),
                end: std::mem::take(&mut d.buffer_end),
                mtime_ns: d.mtime_ns,
                drop_inline: inline_prefix.is_some(),
                slices: Vec::new(),
                upload: None,
            };
            d.inflight.push_back(segment);
            (extents, d.inflight.len() - 1)
        };
        let prefix = inline_prefix.map(|blob| Run {
            offset: 0,
            data: Bytes::from(blob),
        });
        let runs = coalesce(prefix.iter().chain(extents.iter()), self.core.chunk_size());
        let first_id = match self.core.meta.alloc_slice_ids(runs.len() as u64) {
            Ok(id) => id,
            Err(e) => {
                self.fail_inflight(file);
                return Err(e.into());
            }
        };
        let cs = self.core.chunk_size();
        let mut slices = Vec::with_capacity(runs.len());
        let mut uploads = Vec::with_capacity(runs.len());
        for (id, run) in (first_id..).zip(runs) {
            let len = run.data.len() as u32;
            slices.push((
                run.offset / cs,
                Slice {
                    id,
                    size: len,
                    off: 0,
                    len,
                    pos: (run.offset % cs) as u32,
                },
            ));
            uploads.push((id, run.data));
        }
        let pending: Vec<GarbageSlice> = slices
            .iter()
            .map(|(_, s)| GarbageSlice {
                id: s.id,
                size: s.size,
            })
            .collect();
        if let Err(e) = self.core.record_pending_uploads(&pending) {
            self.fail_inflight(file);
            return Err(e);
        }
        let store = self.core.store.clone();
        let upload = self.core.runtime.spawn(async move {
            let puts = uploads
                .into_iter()
                .map(|(id, data)| store.put_slice(id, data));
            futures::future::join_all(puts)
                .await
                .into_iter()
                .collect::<StoreResult<Vec<()>>>()
                .map(drop)
        });
        let mut d = file.data.lock();
        let segment = &mut d.inflight[index];
        segment.slices = slices;
        segment.upload = Some(upload);
        Ok(())
    }

    /// Commits the oldest in-flight segment once its upload is done (waiting for it if `wait`).
    /// Returns whether one was committed. Caller holds the flush lock.
    fn commit_front(&self, file: &FileState, wait: bool) -> VfsResult<bool> {
        let upload = {
            let mut d = file.data.lock();
            let Some(front) = d.inflight.front_mut() else {
                return Ok(false);
            };
            if !wait && front.upload.as_ref().is_some_and(|u| !u.is_finished()) {
                return Ok(false);
            }
            front.upload.take()
        };
        let uploaded = match upload.map(|u| self.core.runtime.block_on(u)) {
            Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(Errno::from(e)),
            Some(Err(e)) => Err(Errno::from(StoreError::Io(format!(
                "upload task failed: {e}"
            )))),
            None => Err(Errno::IO),
        };
        if let Err(e) = uploaded {
            self.fail_inflight(file);
            return Err(e);
        }
        let (slices, end, drop_inline, mtime_ns) = {
            let d = file.data.lock();
            let front = d
                .inflight
                .front()
                .expect("front segment is only removed under the flush lock");
            (
                front.slices.clone(),
                front.end,
                front.drop_inline,
                front.mtime_ns,
            )
        };
        let attr = match self
            .core
            .meta
            .commit_slices(file.ino, &slices, end, drop_inline, mtime_ns)
        {
            Ok(attr) => attr,
            Err(e) => {
                self.fail_inflight(file);
                return Err(e.into());
            }
        };
        let mut d = file.data.lock();
        let committed = d
            .inflight
            .pop_front()
            .expect("front segment is only removed under the flush lock");
        d.commit_gen += 1;
        self.dirty_bytes
            .fetch_sub(committed.bytes, Ordering::SeqCst);
        drop(d);
        self.note_seen(&attr);
        Ok(true)
    }

    /// After a failed upload or commit: every in-flight segment goes back to the front of the
    /// buffer (to be retried by the next flush; later segments must not commit before earlier
    /// ones), and their uploaded slices become garbage.
    fn fail_inflight(&self, file: &FileState) {
        let uploads: Vec<_> = file
            .data
            .lock()
            .inflight
            .iter_mut()
            .filter_map(|s| s.upload.take())
            .collect();
        for upload in uploads {
            let _ = self.core.runtime.block_on(upload);
        }
        let mut d = file.data.lock();
        let segments: Vec<Segment> = d.inflight.drain(..).collect();
        let mut garbage = Vec::new();
        let mut requeued = Vec::new();
        for segment in segments {
            garbage.extend(segment.slices.iter().map(|(_, s)| GarbageSlice {
                id: s.id,
                size: s.size,
            }));
            d.buffer_bytes += segment.bytes;
            d.buffer_end = d.buffer_end.max(segment.end);
            requeued.extend(segment.extents.into_iter().map(|r| Extent {
                offset: r.offset,
                data: Vec::from(r.data),
            }));
        }
        requeued.append(&mut d.buffer);
        d.buffer = requeued;
        drop(d);
        tracing::warn!(
            ino = file.ino,
            "flush failed; the data stays buffered for the next flush"
        );
        self.core.discard_slices(&garbage);
    }
}
