//! Turning an inode's buffered writes into committed data: inline bytes for small files (merged
//! into the stored bytes inside the metadata transaction), slices uploaded in the background
//! (while the application keeps writing) and committed in write order.
//!
//! Every path here holds the inode's flush lock; the data lock is only taken for memory work.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use cellar_meta::{Attr, Committed, Content, GarbageSlice, Ino, MetaError, SetAttr, Slice};
use cellar_store::StoreError;

use crate::backend::now_ns;
use crate::compaction::{COMPACT_BACKGROUND_SLICES, COMPACT_SYNC_SLICES};
use crate::handles::{runs_of, FileState, Segment};
use crate::volume::Inner;
use crate::write_buffer::{coalesce, Extent, Run};
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
/// Flush attempts that lose a race (another mount changed the inline bytes, an upload's intent
/// record expired) before the flush gives up with EIO. Each retry starts from a fresh read.
const FLUSH_ATTEMPTS: usize = 16;

/// One flush's runs packed into one stored object.
struct Packed {
    /// (chunk, slice) of each run, all slices of the object's id.
    slices: Vec<(u64, Slice)>,
    /// The object to upload, as slice id and bytes (none for an empty flush).
    object: Option<(u64, Bytes)>,
}

/// Why a commit did not happen.
enum Failure {
    /// Lost a compare-and-swap: the data is back in the buffer; flush again from a fresh read.
    Retry,
    Failed(Errno),
}

impl From<Errno> for Failure {
    fn from(e: Errno) -> Self {
        Failure::Failed(e)
    }
}

type Attempt<T> = Result<T, Failure>;

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
            // A write after futimens moves mtime on again.
            d.pending_attr.mtime = None;
            d.last_write = Some(Instant::now());
            d.buffer_bytes
        };
        let total = self.dirty_bytes.fetch_add(len, Ordering::SeqCst) + len;
        if total > GLOBAL_DIRTY_LIMIT {
            return self.flush_file(file);
        }
        if buffered >= SEGMENT_BYTES {
            let _flushing = file.flush_lock.lock();
            // A lost race leaves the data buffered for the next flush: not an error here.
            let outcome = self.upload_buffer(file).and_then(|_| {
                while self.commit_front(file, false)? {}
                while file.data.lock().inflight_bytes() > INODE_INFLIGHT_LIMIT {
                    self.commit_front(file, true)?;
                }
                Ok(())
            });
            if let Err(Failure::Failed(e)) = outcome {
                return Err(flush_failed(file, e));
            }
        }
        Ok(())
    }

    /// Uploads and commits everything buffered for the inode (fsync, close). A flush that
    /// failed while this one waited for the lock (the background flusher's, retrying a dead
    /// store) is this one's outcome too: trying again at once would wait out the same fault
    /// again, doubling the caller's wait.
    pub(crate) fn flush_file(&self, file: &FileState) -> VfsResult<()> {
        let failures = file.data.lock().flush_failures;
        let _flushing = file.flush_lock.lock();
        {
            let d = file.data.lock();
            if d.flush_failures != failures {
                return Err(d.flush_failure.unwrap_or(Errno::IO));
            }
        }
        self.flush_locked(file)
    }

    /// Commits the uploads that already finished, without waiting (background flusher).
    pub(crate) fn commit_finished(&self, file: &FileState) -> VfsResult<()> {
        if let Some(_flushing) = file.flush_lock.try_lock() {
            loop {
                match self.commit_front(file, false) {
                    Ok(true) => {}
                    Ok(false) | Err(Failure::Retry) => return Ok(()),
                    Err(Failure::Failed(e)) => return Err(flush_failed(file, e)),
                }
            }
        }
        Ok(())
    }

    /// Sets the size of a file: its buffered writes are committed first so none lands past it.
    pub(crate) fn truncate_file(&self, ino: Ino, size: u64) -> VfsResult<Attr> {
        self.change_committed(ino, || Ok(self.core.meta.truncate(ino, size, now_ns())?))
    }

    /// Zeroes a range of a file as holes (fallocate's PUNCH_HOLE and ZERO_RANGE), after its
    /// buffered writes, which it must shadow.
    pub(crate) fn zero_file_range(
        &self,
        ino: Ino,
        offset: u64,
        len: u64,
        keep_size: bool,
    ) -> VfsResult<Attr> {
        self.change_committed(ino, || {
            let committed = self
                .core
                .meta
                .zero_range(ino, offset, len, keep_size, now_ns())?;
            self.compact_by_need(ino, &committed.chunk_slices)?;
            Ok(committed.attr)
        })
    }

    /// Runs a metadata change of the file's committed content once this mount's buffered
    /// writes of it are committed (they came first), holding its flush lock so that none
    /// commits in between.
    pub(crate) fn change_committed(
        &self,
        ino: Ino,
        change: impl FnOnce() -> VfsResult<Attr>,
    ) -> VfsResult<Attr> {
        let file = self.registry.file(ino);
        let _flushing = file.as_ref().map(|file| file.flush_lock.lock());
        if let Some(file) = &file {
            self.flush_locked(file)?;
        }
        let attr = change()?;
        self.quota.space_freed();
        if let Some(file) = &file {
            let mut d = file.data.lock();
            d.commit_gen += 1;
            d.unsynced = true;
            drop(d);
            self.note_seen(&attr);
        }
        Ok(attr)
    }

    /// Caller holds the flush lock.
    fn flush_locked(&self, file: &FileState) -> VfsResult<()> {
        for _ in 0..FLUSH_ATTEMPTS {
            match self.try_flush(file) {
                Ok(()) => return Ok(()),
                Err(Failure::Retry) => continue,
                Err(Failure::Failed(e)) => return Err(flush_failed(file, e)),
            }
        }
        tracing::error!(
            ino = file.ino,
            attempts = FLUSH_ATTEMPTS,
            "flush kept losing races with other writers; the data stays buffered"
        );
        Err(flush_failed(file, Errno::IO))
    }

    fn try_flush(&self, file: &FileState) -> Attempt<()> {
        while self.commit_front(file, true)? {}
        // Nothing else in flight: a small file may take the whole segment inline.
        if self.cut_segment(file) && !self.commit_inline(file)? {
            self.start_upload(file)?;
            while self.commit_front(file, true)? {}
        }
        self.commit_pending_attr(file)
    }

    /// Commits the attribute changes still waiting (see `FileData::pending_attr`).
    fn commit_pending_attr(&self, file: &FileState) -> Attempt<()> {
        let (changes, generation) = {
            let d = file.data.lock();
            if d.pending_attr.is_empty() {
                return Ok(());
            }
            (d.pending_attr.clone(), d.pending_attr_gen)
        };
        self.core
            .meta
            .setattr(file.ino, &changes, now_ns())
            .map_err(|e| Failure::Failed(e.into()))?;
        self.pending_attr_committed(file, generation);
        Ok(())
    }

    /// The pending attribute changes as of `generation` are committed: drop them unless newer
    /// ones came meanwhile (those are committed again, with the newer values on top).
    fn pending_attr_committed(&self, file: &FileState, generation: u64) {
        let mut d = file.data.lock();
        if d.pending_attr_gen == generation {
            d.pending_attr = SetAttr::default();
        }
        // Readers of the attributes that raced the commit look again.
        d.commit_gen += 1;
        d.unsynced = true;
    }

    /// Moves the whole buffer into a new in-flight segment (reads keep overlaying it). Returns
    /// false when nothing was buffered.
    fn cut_segment(&self, file: &FileState) -> bool {
        let mut d = file.data.lock();
        if d.buffer.is_empty() {
            return false;
        }
        let extents = runs_of(std::mem::take(&mut d.buffer));
        let bytes = std::mem::take(&mut d.buffer_bytes);
        let end = std::mem::take(&mut d.buffer_end);
        let segment = Segment::new(extents, bytes, end, d.mtime_ns);
        d.inflight.push_back(segment);
        true
    }

    /// Cuts the buffer into a segment and starts uploading it (background upload of a writer).
    fn upload_buffer(&self, file: &FileState) -> Attempt<()> {
        if self.cut_segment(file) {
            self.start_upload(file)?;
        }
        Ok(())
    }

    /// Commits the only in-flight segment as inline bytes if the file is small enough; the
    /// engine merges the extents into the stored bytes in its transaction. Returns false (the
    /// segment stays) when the file's data lives in chunks or would outgrow the threshold.
    fn commit_inline(&self, file: &FileState) -> Attempt<bool> {
        let (extents, mtime_ns, then, generation) = {
            let d = file.data.lock();
            let segment = d.inflight.front().expect("a segment was just cut");
            if d.inflight.len() != 1 || segment.end > self.core.volume.inline_threshold {
                return Ok(false);
            }
            let extents = segment.extents.clone();
            (
                extents,
                segment.mtime_ns,
                d.pending_attr.clone(),
                d.pending_attr_gen,
            )
        };
        let refs: Vec<(u64, &[u8])> = extents.iter().map(|r| (r.offset, &r.data[..])).collect();
        match self
            .core
            .meta
            .write_inline(file.ino, &refs, &then, mtime_ns)
        {
            Ok(Some(attr)) => {
                self.finish_front(file, &attr);
                if !then.is_empty() {
                    self.pending_attr_committed(file, generation);
                }
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(e) => Err(self.commit_failed(file, e)),
        }
    }

    /// Starts uploading the newest in-flight segment. When it is the only one, the file may
    /// still be inline: its inline bytes are written out with it (lowest priority), tagged with
    /// the data version they were read at, so the commit fails if another writer changed them.
    fn start_upload(&self, file: &FileState) -> Attempt<()> {
        let (extents, index) = {
            let d = file.data.lock();
            let index = d.inflight.len() - 1;
            (d.inflight[index].extents.clone(), index)
        };
        let prefix = if index == 0 {
            match self.inline_prefix(file.ino) {
                Ok(prefix) => prefix,
                Err(e) => {
                    self.fail_inflight(file);
                    return Err(e.into());
                }
            }
        } else {
            None
        };
        let inline_version = prefix.as_ref().map(|(_, version)| *version);
        let prefix_run = prefix.map(|(blob, _)| Run {
            offset: 0,
            data: blob.into(),
        });
        let runs = coalesce(
            prefix_run.iter().chain(extents.iter()),
            self.core.chunk_size(),
        );
        let Packed { slices, object } = match self.reserve_object(runs) {
            Ok(reserved) => reserved,
            Err(e) => {
                self.fail_inflight(file);
                return Err(e.into());
            }
        };
        let store = self.core.store.clone();
        let upload = self.core.runtime.spawn(async move {
            match object {
                Some((id, data)) => store.put_slice(id, data).await,
                None => Ok(()),
            }
        });
        let mut d = file.data.lock();
        let segment = &mut d.inflight[index];
        segment.slices = slices;
        segment.inline_version = inline_version;
        segment.upload = Some(upload);
        Ok(())
    }

    /// The inline bytes of an inline file with the data version they belong to (one snapshot).
    fn inline_prefix(&self, ino: Ino) -> VfsResult<Option<(Vec<u8>, u64)>> {
        let layout = self.core.meta.read_layout(ino, 0..0, None)?;
        Ok(match layout.content {
            Some(Content::Inline(blob)) => Some((blob, layout.attr.data_version)),
            _ => None,
        })
    }

    /// Packs the runs of one flush into one stored object (one slice id; each run a slice of
    /// it at its own offset), recorded as a pending upload: random small writes make one object
    /// per flush, not one per extent.
    fn reserve_object(&self, runs: Vec<Run>) -> VfsResult<Packed> {
        if runs.is_empty() {
            return Ok(Packed {
                slices: Vec::new(),
                object: None,
            });
        }
        let total: u64 = runs.iter().map(|run| run.data.len() as u64).sum();
        // A flush holds at most the mount's dirty limit, far below 4 GiB.
        let size = u32::try_from(total).map_err(|_| Errno::IO)?;
        let id = self.core.meta.alloc_slice_ids(1)?;
        let cs = self.core.chunk_size();
        let mut at = 0;
        let slices: Vec<(u64, Slice)> = runs
            .iter()
            .map(|run| {
                let len = run.data.len() as u32;
                let slice = Slice {
                    id,
                    size,
                    off: at,
                    len,
                    pos: (run.offset % cs) as u32,
                };
                at += len;
                (run.offset / cs, slice)
            })
            .collect();
        self.core
            .record_pending_uploads(&[GarbageSlice { id, size }])?;
        let data = match <[Run; 1]>::try_from(runs) {
            Ok([run]) => run.data,
            Err(runs) => {
                let mut data = BytesMut::with_capacity(total as usize);
                for run in runs {
                    data.extend_from_slice(&run.data);
                }
                data.freeze()
            }
        };
        Ok(Packed {
            slices,
            object: Some((id, data)),
        })
    }

    /// Commits the oldest in-flight segment once its upload is done (waiting for it if `wait`).
    /// Returns whether one was committed.
    fn commit_front(&self, file: &FileState, wait: bool) -> Attempt<bool> {
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
            return Err(Failure::Failed(e));
        }
        let (slices, end, inline_version, mtime_ns) = {
            let d = file.data.lock();
            let front = d
                .inflight
                .front()
                .expect("front segment is only removed under the flush lock");
            (
                front.slices.clone(),
                front.end,
                front.inline_version,
                front.mtime_ns,
            )
        };
        let committed =
            self.core
                .meta
                .commit_slices(file.ino, &slices, end, inline_version, mtime_ns);
        match committed {
            Ok(Committed { attr, chunk_slices }) => {
                self.finish_front(file, &attr);
                self.compact_by_need(file.ino, &chunk_slices)?;
                Ok(true)
            }
            Err(MetaError::Conflict(reason)) => {
                tracing::info!(ino = file.ino, %reason, "commit lost a race; flushing again");
                self.fail_inflight(file);
                Err(Failure::Retry)
            }
            Err(e) => Err(self.commit_failed(file, e)),
        }
    }

    /// A commit failed for good. Past the quota, retrying cannot help: the inode's unflushed
    /// writes are dropped (what was committed before stays) and the error is kept for the next
    /// flush or fsync to report. Otherwise they stay buffered for the next flush.
    fn commit_failed(&self, file: &FileState, e: MetaError) -> Failure {
        let errno = Errno::from(e);
        if errno.0 == libc::EDQUOT {
            self.drop_unflushed(file, errno);
        } else {
            self.fail_inflight(file);
        }
        Failure::Failed(errno)
    }

    fn drop_unflushed(&self, file: &FileState, errno: Errno) {
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
        let garbage = garbage_of(segments.iter().flat_map(|segment| &segment.slices));
        let dropped = segments.iter().map(|s| s.bytes).sum::<u64>() + d.buffer_bytes;
        d.buffer.clear();
        d.buffer_bytes = 0;
        d.buffer_end = 0;
        d.lost_writes = Some(errno);
        drop(d);
        self.dirty_bytes.fetch_sub(dropped, Ordering::SeqCst);
        tracing::warn!(
            ino = file.ino,
            bytes = dropped,
            "the volume's quota refused a commit; the file's unflushed writes are dropped"
        );
        self.core.discard_slices(&garbage);
    }

    /// The front segment is committed: drop it from the overlay.
    fn finish_front(&self, file: &FileState, attr: &Attr) {
        let mut d = file.data.lock();
        let committed = d
            .inflight
            .pop_front()
            .expect("front segment is only removed under the flush lock");
        d.commit_gen += 1;
        d.unsynced = true;
        self.dirty_bytes
            .fetch_sub(committed.bytes, Ordering::SeqCst);
        self.quota.committed(committed.bytes);
        drop(d);
        self.note_seen(attr);
    }

    /// Chunks that a commit left fragmented: compacted now past the hard cap, else queued.
    pub(crate) fn compact_by_need(&self, ino: Ino, chunk_slices: &[(u64, usize)]) -> VfsResult<()> {
        for &(chunk, count) in chunk_slices {
            if count >= COMPACT_SYNC_SLICES {
                self.core.compact_chunk(ino, chunk)?;
            } else if count >= COMPACT_BACKGROUND_SLICES {
                self.compaction_requests.lock().insert((ino, chunk));
            }
        }
        Ok(())
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
        let garbage = garbage_of(segments.iter().flat_map(|segment| &segment.slices));
        let mut requeued = Vec::new();
        for segment in segments {
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

/// Records a failed flush of the inode (see `Inner::flush_file`); returns its errno.
fn flush_failed(file: &FileState, e: Errno) -> Errno {
    let mut d = file.data.lock();
    d.flush_failures += 1;
    d.flush_failure = Some(e);
    e
}

/// The stored objects of uploaded slices, each once (a flush's slices share one object).
fn garbage_of<'a>(slices: impl Iterator<Item = &'a (u64, Slice)>) -> Vec<GarbageSlice> {
    let mut garbage: Vec<GarbageSlice> = slices
        .map(|(_, s)| GarbageSlice {
            id: s.id,
            size: s.size,
        })
        .collect();
    garbage.sort_unstable_by_key(|g| g.id);
    garbage.dedup_by_key(|g| g.id);
    garbage
}
