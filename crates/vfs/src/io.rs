//! File handles and data: open/create, read (with read-ahead), write, flush/release/fsync,
//! fallocate, copy_file_range.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cellar_meta::{Attr, FileKind, Ino, SetAttr};
use parking_lot::Mutex;

use crate::backend::now_ns;
use crate::errno::err;
use crate::handles::{FileState, Handle, HandleKind, ReadAhead};
use crate::namespace::new_node;
use crate::read_path::{chunk_range, layout_max_age, FileLayout};
use crate::volume::Inner;
use crate::{Ctx, OpenReply, VfsResult, MAX_FILE_SIZE};

/// First read-ahead window of a sequential reader, doubled on each sequential read up to the cap
/// (what fits well inside the default memory budget: see `cellar_store::StoreOptions`).
const READAHEAD_INITIAL: u64 = (1 << 20) + (128 << 10);
const READAHEAD_MAX: u64 = 64 << 20;
/// copy_file_range moves data through the buffer in pieces of this size.
const COPY_PIECE: u64 = 4 << 20;

impl Inner {
    /// A handle of an inode the engine has recorded as open (see `MetaEngine::open_file`).
    fn new_file_handle(&self, ctx: &Ctx, attr: &Attr, flags: i32) -> (u64, bool) {
        let file = self.registry.open_file(attr.ino);
        // Close-to-open: the kernel may keep its page cache only if nothing changed since this
        // mount last saw the file (or this mount holds newer, unflushed data of its own).
        let keep_cache = self.sync_point(&file, attr);
        let kind = HandleKind::File {
            file,
            readahead: Mutex::new(ReadAhead::default()),
            privileges_dropped: AtomicBool::new(false),
        };
        (
            self.registry.insert_handle(Handle {
                ino: attr.ino,
                flags,
                uid: ctx.uid,
                kind,
            }),
            keep_cache,
        )
    }

    pub(crate) fn open(&self, ctx: &Ctx, ino: Ino, flags: i32) -> VfsResult<OpenReply> {
        let attr = self.core.meta.open_file(self.session(), ino)?;
        if attr.kind == FileKind::Directory && flags & libc::O_ACCMODE != libc::O_RDONLY {
            self.core.meta.close_file(self.session(), ino)?;
            return err(libc::EISDIR);
        }
        let (fh, keep_cache) = self.new_file_handle(ctx, &attr, flags);
        Ok(OpenReply { fh, keep_cache })
    }

    pub(crate) fn create(
        &self,
        ctx: &Ctx,
        parent: Ino,
        name: &[u8],
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> VfsResult<(Attr, OpenReply)> {
        let node = new_node(FileKind::Regular, mode & 0o7777 & !umask, 0, Vec::new());
        let attr = self.create_node(ctx, parent, name, node, true)?;
        let (fh, keep_cache) = self.new_file_handle(ctx, &attr, flags);
        Ok((attr, OpenReply { fh, keep_cache }))
    }

    pub(crate) fn read(&self, fh: u64, offset: u64, size: u32) -> VfsResult<Vec<u8>> {
        let handle = self.registry.handle(fh)?;
        let HandleKind::File {
            file, readahead, ..
        } = &handle.kind
        else {
            return err(libc::EISDIR);
        };
        loop {
            let generation = file.data.lock().commit_gen;
            let layout = self.layout_for(file, generation, offset, u64::from(size))?;
            let committed_size = layout.attr.size;
            let size_now = {
                let d = file.data.lock();
                // A commit since `generation` moved bytes out of the overlay that the layout
                // (read before it) may lack: the size would come out short. Read again.
                if d.commit_gen != generation {
                    continue;
                }
                committed_size.max(d.dirty_end())
            };
            if offset >= size_now {
                return Ok(Vec::new());
            }
            let len = u64::from(size).min(size_now - offset);
            let mut out = self.core.read_layout_bytes(&layout, offset, len as usize)?;
            let d = file.data.lock();
            if d.commit_gen != generation {
                // This mount committed meanwhile: what was read may predate the commit while the
                // overlay no longer holds the committed bytes. Read again.
                continue;
            }
            d.overlay(&mut out, offset);
            drop(d);
            self.read_ahead(file, generation, readahead, offset, len, committed_size);
            return Ok(out);
        }
    }

    /// Detects sequential readers and prefetches ahead of them with a growing window.
    fn read_ahead(
        &self,
        file: &FileState,
        generation: u64,
        readahead: &Mutex<ReadAhead>,
        offset: u64,
        len: u64,
        size: u64,
    ) {
        let mut ra = readahead.lock();
        if offset == ra.next {
            ra.window = if ra.window == 0 {
                READAHEAD_INITIAL
            } else {
                (ra.window * 2).min(READAHEAD_MAX)
            };
        } else {
            ra.window = 0;
            ra.prefetched_until = 0;
        }
        ra.next = offset + len;
        if ra.window == 0 {
            return;
        }
        let from = ra.next.max(ra.prefetched_until);
        let to = (ra.next + ra.window).min(size);
        // Top up once half the window is used (or the file's end is in reach): read-ahead goes
        // out as a few large ranged GETs, not as one small GET per read.
        if from < to && (to - from >= ra.window / 2 || to == size) {
            ra.prefetched_until = to;
            drop(ra);
            self.prefetch(file, generation, from, to);
        }
    }

    pub(crate) fn write(&self, fh: u64, offset: u64, data: &[u8]) -> VfsResult<u32> {
        let handle = self.registry.handle(fh)?;
        let HandleKind::File { file, .. } = &handle.kind else {
            return err(libc::EISDIR);
        };
        if handle.flags & libc::O_ACCMODE == libc::O_RDONLY {
            return err(libc::EBADF);
        }
        if data.is_empty() {
            return Ok(0);
        }
        match offset.checked_add(data.len() as u64) {
            Some(end) if end <= MAX_FILE_SIZE => {}
            _ => return err(libc::EFBIG),
        }
        let dirty = self.dirty_bytes.load(Ordering::SeqCst);
        self.quota
            .check(&*self.core.meta, dirty, data.len() as u64)?;
        self.prepare_write(&handle)?;
        self.buffer_write(file, offset, data)?;
        Ok(data.len() as u32)
    }

    /// The first write through a handle of a non-root opener clears setuid/setgid.
    fn prepare_write(&self, handle: &Handle) -> VfsResult<()> {
        if let HandleKind::File {
            privileges_dropped, ..
        } = &handle.kind
        {
            if handle.uid != 0 && !privileges_dropped.swap(true, Ordering::Relaxed) {
                self.drop_privileges(handle.ino)?;
            }
        }
        Ok(())
    }

    /// A write by a non-root user clears setuid, and setgid when it means "set group id".
    /// A mode set through this mount but not yet committed counts (a pending setuid bit must
    /// not come back at the flush).
    fn drop_privileges(&self, ino: Ino) -> VfsResult<()> {
        let before = self.attr_before_change(ino)?;
        let perm = before.seen.perm;
        let mut cleared = perm & !libc::S_ISUID;
        if perm & libc::S_IXGRP != 0 {
            cleared &= !libc::S_ISGID;
        }
        if cleared != perm {
            let changes = SetAttr {
                perm: Some(cleared),
                ..SetAttr::default()
            };
            self.change_attr(ino, before, changes)?;
        }
        Ok(())
    }

    pub(crate) fn flush(&self, ino: Ino, fh: u64, lock_owner: u64) -> VfsResult<()> {
        let handle = self.registry.handle(fh)?;
        let file = handle.file()?;
        let flushed = self.flush_durably(file, false);
        let unlocked = if file.posix_locked.load(Ordering::SeqCst) {
            self.unlock_posix(ino, lock_owner)
        } else {
            Ok(())
        };
        flushed.and(unlocked)
    }

    pub(crate) fn release(&self, ino: Ino, fh: u64, lock_owner: Option<u64>) -> VfsResult<()> {
        let handle = self.registry.remove_handle(fh)?;
        let file = handle.file()?;
        let unlocked = match lock_owner.filter(|_| file.posix_locked.load(Ordering::SeqCst)) {
            Some(owner) => self.unlock_posix(ino, owner),
            None => Ok(()),
        };
        let last = file.open_count.fetch_sub(1, Ordering::SeqCst) == 1;
        // Last handle of this mount: nothing may stay buffered.
        let flushed = if last {
            self.flush_durably(file, false)
        } else {
            Ok(())
        };
        // An unlinked inode goes with its last close (the engine counts the opens).
        let meta = &self.core.meta;
        let closed = meta.close_file(self.session(), ino).and_then(|()| {
            if last && file.unlinked.load(Ordering::SeqCst) {
                meta.commit_closes()?;
            }
            Ok(())
        });
        if last {
            self.registry.forget_if_idle(ino);
        }
        flushed.and(unlocked).and(closed.map_err(Into::into))
    }

    pub(crate) fn fsync(&self, fh: u64) -> VfsResult<()> {
        let handle = self.registry.handle(fh)?;
        self.flush_durably(handle.file()?, true)
    }

    /// Commits the inode's buffered writes and makes the commits durable: what fsync and close
    /// acknowledge survives a crash and a power loss. A mount whose session may have been reaped
    /// acknowledges nothing. `always_sync`: sync the metadata even if this inode committed
    /// nothing since the last sync (fsync also covers the file's creation).
    fn flush_durably(&self, file: &FileState, always_sync: bool) -> VfsResult<()> {
        // Writes dropped by an earlier flush (the background flusher's) are reported once.
        let flushed = self.flush_file(file);
        if let Some(e) = file.data.lock().lost_writes.take() {
            return Err(flushed.err().unwrap_or(e));
        }
        flushed?;
        let unsynced = std::mem::take(&mut file.data.lock().unsynced);
        if unsynced || always_sync {
            if let Err(e) = self.sync_metadata() {
                file.data.lock().unsynced = true;
                return Err(e);
            }
        }
        self.check_session()
    }

    pub(crate) fn fallocate(
        &self,
        ino: Ino,
        fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> VfsResult<()> {
        let handle = self.registry.handle(fh)?;
        handle.file()?;
        if offset > i64::MAX as u64 || length == 0 || length > i64::MAX as u64 {
            return err(libc::EINVAL);
        }
        let end = offset + length;
        if end > MAX_FILE_SIZE {
            return err(libc::EFBIG);
        }
        const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        const ZERO_RANGE_KEEP_SIZE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let zero = match mode {
            0 | libc::FALLOC_FL_KEEP_SIZE => false,
            PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE | ZERO_RANGE_KEEP_SIZE => true,
            _ => return err(libc::EOPNOTSUPP),
        };
        let size = self.getattr(ino)?.size;
        // Nothing is reserved (space is taken when written), but a request past the end of the
        // file that the quota could not hold fails now, as where fallocate allocates.
        if !(zero && keep_size) {
            let dirty = self.dirty_bytes.load(Ordering::SeqCst);
            self.quota
                .check(&*self.core.meta, dirty, end.saturating_sub(size))?;
        }
        if zero {
            // Holes, after this mount's buffered writes (which they shadow): reads return
            // zeros, the range holds nothing, no byte is uploaded.
            self.zero_file_range(ino, offset, length, keep_size)?;
        } else if !keep_size && end > size {
            self.truncate_file(ino, end)?;
        }
        Ok(())
    }

    /// copy_file_range(2). Where the source's data lives in chunks the copy is one metadata
    /// transaction: the destination references the source's stored slices (holes stay holes,
    /// no byte is read or uploaded), after this mount's buffered writes of the source (so the
    /// copy sees them) and of the destination (so they do not land on top of it later). A copy
    /// that ends within the inline threshold of a file, or from or into a file keeping inline
    /// bytes, moves the bytes instead: small files stay inline.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn copy_file_range(
        &self,
        ino_in: Ino,
        fh_in: u64,
        off_in: u64,
        ino_out: Ino,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> VfsResult<u64> {
        if ino_in == ino_out
            && off_in < off_out.saturating_add(len)
            && off_out < off_in.saturating_add(len)
        {
            return err(libc::EINVAL);
        }
        let (source, target) = (self.registry.handle(fh_in)?, self.registry.handle(fh_out)?);
        if target.flags & libc::O_ACCMODE == libc::O_RDONLY {
            return err(libc::EBADF);
        }
        match off_out.checked_add(len) {
            Some(end) if end <= MAX_FILE_SIZE => {}
            _ => return err(libc::EFBIG),
        }
        if len == 0 {
            return Ok(0);
        }
        if off_out + len > self.core.volume.inline_threshold {
            if let Some(copied) = self.copy_by_reference(&source, off_in, &target, off_out, len)? {
                return Ok(copied);
            }
        }
        let mut copied = 0;
        while copied < len {
            let piece = (len - copied).min(COPY_PIECE) as u32;
            let data = self.read(fh_in, off_in + copied, piece)?;
            if data.is_empty() {
                break;
            }
            let written = self.write(fh_out, off_out + copied, &data)?;
            copied += u64::from(written);
        }
        Ok(copied)
    }

    /// The copy as references to the source's slices (see [`Self::copy_file_range`]); `None`
    /// when a file keeps inline bytes.
    fn copy_by_reference(
        &self,
        source: &Handle,
        off_in: u64,
        target: &Handle,
        off_out: u64,
        len: u64,
    ) -> VfsResult<Option<u64>> {
        self.flush_file(source.file()?)?;
        self.prepare_write(target)?;
        let mut copied = None;
        self.change_committed(target.ino, || {
            let outcome = self.core.meta.copy_range(
                source.ino,
                off_in,
                target.ino,
                off_out,
                len,
                now_ns(),
            )?;
            let attr = match outcome {
                Some(range) => {
                    self.compact_by_need(target.ino, &range.committed.chunk_slices)?;
                    copied = Some(range.len);
                    range.committed.attr
                }
                None => self.core.meta.getattr(target.ino)?,
            };
            Ok(attr)
        })?;
        // Counted like written bytes until the next reading of the usage includes them.
        self.quota.committed(copied.unwrap_or(0));
        Ok(copied)
    }

    /// SEEK_DATA / SEEK_HOLE over the committed chunk maps and this mount's unflushed writes.
    /// ENXIO at or past the end of the file.
    pub(crate) fn lseek(&self, fh: u64, offset: u64, whence: i32) -> VfsResult<u64> {
        let handle = self.registry.handle(fh)?;
        let file = handle.file()?;
        let size = self.open_file_attr(file)?.size;
        if whence != libc::SEEK_DATA && whence != libc::SEEK_HOLE {
            return err(libc::EINVAL);
        }
        if offset >= size {
            return err(libc::ENXIO);
        }
        let generation = file.data.lock().commit_gen;
        if self.layout_for(file, generation, offset, 1)?.is_inline() {
            return Ok(if whence == libc::SEEK_DATA {
                offset
            } else {
                size
            });
        }
        // The unflushed writes, merged into disjoint runs in offset order.
        let dirty = {
            let d = file.data.lock();
            let mut runs: Vec<(u64, u64)> = d
                .inflight
                .iter()
                .flat_map(|s| s.extents.iter().map(|e| (e.offset, e.end())))
                .chain(d.buffer.iter().map(|e| (e.offset, e.end())))
                .collect();
            runs.sort_unstable();
            merge_runs(runs)
        };
        if whence == libc::SEEK_DATA {
            self.seek_data(file, offset, size, &dirty)
        } else {
            self.seek_hole(file, offset, size, &dirty)
        }
    }

    /// The first byte of data at or after `offset` (below `size`): the earliest of the
    /// unflushed writes and the committed data, found chunk by chunk from the chunks the engine
    /// names as holding data.
    fn seek_data(
        &self,
        file: &FileState,
        offset: u64,
        size: u64,
        dirty: &[(u64, u64)],
    ) -> VfsResult<u64> {
        let cs = self.core.chunk_size();
        let in_dirty = dirty
            .iter()
            .find(|(_, end)| *end > offset)
            .map(|(start, _)| (*start).max(offset));
        let mut chunk = offset / cs;
        let mut committed = None;
        while chunk * cs < size && in_dirty.is_none_or(|d| chunk * cs < d) {
            let Some(next) = self.core.meta.next_data_chunk(file.ino, chunk)? else {
                break;
            };
            let (from, to) = (offset.max(next * cs), ((next + 1) * cs).min(size));
            if from < to {
                committed = self.data_runs(file, from, to)?.first().map(|(s, _)| *s);
                if committed.is_some() {
                    break;
                }
            }
            chunk = next + 1;
        }
        match [in_dirty, committed].into_iter().flatten().min() {
            Some(at) if at < size => Ok(at),
            _ => err(libc::ENXIO),
        }
    }

    /// The first byte at or after `offset` that is neither committed data nor unflushed
    /// (`size` if none: the end of a file counts as a hole).
    fn seek_hole(
        &self,
        file: &FileState,
        offset: u64,
        size: u64,
        dirty: &[(u64, u64)],
    ) -> VfsResult<u64> {
        let cs = self.core.chunk_size();
        let mut at = offset;
        while at < size {
            let window_end = ((at / cs + 1) * cs).min(size);
            let mut runs = self.data_runs(file, at, window_end)?;
            runs.extend(
                dirty
                    .iter()
                    .filter(|(s, e)| *e > at && *s < window_end)
                    .map(|(s, e)| ((*s).max(at), (*e).min(window_end))),
            );
            runs.sort_unstable();
            let mut reached = at;
            for (start, end) in merge_runs(runs) {
                if start > reached {
                    break;
                }
                reached = reached.max(end);
            }
            if reached < window_end {
                return Ok(reached);
            }
            at = window_end;
        }
        Ok(size)
    }

    /// The runs of committed data (non-hole pieces) within `[start, end)` of one chunk, in
    /// offset order, adjacent pieces merged.
    fn data_runs(&self, file: &FileState, start: u64, end: u64) -> VfsResult<Vec<(u64, u64)>> {
        let generation = file.data.lock().commit_gen;
        let layout = self.layout_for(file, generation, start, end - start)?;
        let end = end.min(layout.attr.size);
        if start >= end {
            return Ok(Vec::new());
        }
        let cs = self.core.chunk_size();
        let base = start / cs * cs;
        let runs = layout
            .data_pieces(cs, start, end)
            .into_iter()
            .map(|p| (base + p.start, base + p.end))
            .collect();
        Ok(merge_runs(runs))
    }

    /// The layout for reading `[offset, offset + len)` as of commit generation `generation`:
    /// the cached one while it is fresh, else confirmed or reloaded in one read transaction.
    fn layout_for(
        &self,
        file: &FileState,
        generation: u64,
        offset: u64,
        len: u64,
    ) -> VfsResult<Arc<FileLayout>> {
        let chunks = chunk_range(offset, len, self.core.chunk_size());
        let max_age = layout_max_age(self.gc_grace);
        let cached = file.layout.lock().clone();
        if let Some(layout) = FileLayout::fresh(&cached, generation, max_age, &chunks) {
            return Ok(layout);
        }
        let known = FileLayout::known_version(&cached, generation, max_age, &chunks);
        let fetched = self.core.meta.read_layout(file.ino, chunks, known)?;
        let layout = Arc::new(FileLayout::from_engine(
            cached, fetched, generation, max_age,
        ));
        // A commit of this mount since `generation` makes the snapshot stale: keep it out of the
        // cache (the caller sees the generation moved and reads again).
        if file.data.lock().commit_gen == generation {
            *file.layout.lock() = Some(Arc::clone(&layout));
        }
        Ok(layout)
    }

    /// Starts fetching `[start, end)` of the file into the block cache.
    fn prefetch(&self, file: &FileState, generation: u64, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let layout = match self.layout_for(file, generation, start, end - start) {
            Ok(layout) => layout,
            Err(e) => {
                tracing::debug!(ino = file.ino, error = %e, "read-ahead failed");
                return;
            }
        };
        let _in_runtime = self.core.runtime.enter();
        for p in layout.data_pieces(self.core.chunk_size(), start, end) {
            self.core.store.prefetch(
                p.source.id,
                p.source.size,
                p.source_off as u32,
                (p.end - p.start) as u32,
            );
        }
    }
}

/// Sorted `[start, end)` runs with overlapping and adjacent ones merged.
fn merge_runs(runs: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
    for (start, end) in runs {
        match merged.last_mut() {
            Some((_, last_end)) if start <= *last_end => *last_end = (*last_end).max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}
