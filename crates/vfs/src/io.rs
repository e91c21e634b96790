//! File handles and data: open/create, read (with read-ahead), write, flush/release/fsync,
//! fallocate, copy_file_range.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cellar_meta::{Attr, FileKind, Ino, SetAttr};
use parking_lot::Mutex;

use crate::backend::now_ns;
use crate::errno::err;
use crate::handles::{FileState, Handle, HandleKind, ReadAhead};
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
        let keep_cache = file.data.lock().is_dirty() || self.unchanged_since_seen(attr);
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
        let created = self.mknod(ctx, parent, name, (mode & 0o7777) | libc::S_IFREG, umask, 0)?;
        let attr = self.core.meta.open_file(self.session(), created.ino)?;
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
        let HandleKind::File {
            file,
            privileges_dropped,
            ..
        } = &handle.kind
        else {
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
        if handle.uid != 0 && !privileges_dropped.swap(true, Ordering::Relaxed) {
            self.drop_privileges(handle.ino)?;
        }
        self.buffer_write(file, offset, data)?;
        Ok(data.len() as u32)
    }

    /// A write by a non-root user clears setuid, and setgid when it means "set group id".
    fn drop_privileges(&self, ino: Ino) -> VfsResult<()> {
        let perm = self.core.meta.getattr(ino)?.perm;
        let mut cleared = perm & !libc::S_ISUID;
        if perm & libc::S_IXGRP != 0 {
            cleared &= !libc::S_ISGID;
        }
        if cleared != perm {
            self.core.meta.setattr(
                ino,
                &SetAttr {
                    perm: Some(cleared),
                    ..SetAttr::default()
                },
                now_ns(),
            )?;
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
        let closed = self.core.meta.close_file(self.session(), ino);
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
        if mode != 0 && mode != libc::FALLOC_FL_KEEP_SIZE {
            return err(libc::EOPNOTSUPP);
        }
        let size = self.getattr(ino)?.size;
        // Nothing is reserved (space is taken when written), but a request past the end of the
        // file that the quota could not hold fails now, as where fallocate allocates.
        let dirty = self.dirty_bytes.load(Ordering::SeqCst);
        self.quota
            .check(&*self.core.meta, dirty, end.saturating_sub(size))?;
        if mode == 0 && end > size {
            self.truncate_file(ino, end)?;
        }
        Ok(())
    }

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
