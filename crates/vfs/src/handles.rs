//! Open file and directory handles of this mount, and the per-inode state shared by the handles
//! of one inode (open count, write buffer, cached layout).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use cellar_meta::{Attr, SetAttr, Slice, TimeSet};
use parking_lot::Mutex;
use tokio::task::JoinHandle;

use crate::read_path::FileLayout;
use crate::write_buffer::{Extent, Run};
use crate::{Errno, Ino, VfsResult};

/// State of one inode opened (or still dirty) in this mount.
pub(crate) struct FileState {
    pub ino: Ino,
    pub open_count: AtomicU32,
    /// Some POSIX lock was taken on it through this mount (close must then drop the owner's).
    pub posix_locked: AtomicBool,
    /// This mount removed its last link while it was open: its last close is recorded at once
    /// (which frees it), not lazily (see `MetaEngine::close_file`).
    pub unlinked: AtomicBool,
    pub data: Mutex<FileData>,
    /// Serializes flushes of this inode: slices must be committed in write order. Held across
    /// metadata and store calls (that is its purpose); see the lock order in lib.rs.
    pub flush_lock: Mutex<()>,
    /// The layout reads use, valid while `FileData::commit_gen` equals its `generation`.
    pub layout: Mutex<Option<Arc<FileLayout>>>,
}

/// Buffered writes taken by one flush: uploading, then committed as one transaction.
pub(crate) struct Segment {
    /// The buffered extents, in write order (what reads overlay until the commit).
    pub extents: Vec<Run>,
    pub bytes: u64,
    pub end: u64,
    pub mtime_ns: i64,
    /// The segment also carries the file's inline bytes as of this data version.
    pub inline_version: Option<u64>,
    pub slices: Vec<(u64, Slice)>,
    pub upload: Option<JoinHandle<cellar_store::StoreResult<()>>>,
}

impl Segment {
    pub fn new(extents: Vec<Run>, bytes: u64, end: u64, mtime_ns: i64) -> Segment {
        Segment {
            extents,
            bytes,
            end,
            mtime_ns,
            inline_version: None,
            slices: Vec::new(),
            upload: None,
        }
    }
}

/// Converts buffered extents into shareable runs.
pub(crate) fn runs_of(extents: Vec<Extent>) -> Vec<Run> {
    extents
        .into_iter()
        .map(|e| Run {
            offset: e.offset,
            data: Bytes::from(e.data),
        })
        .collect()
}

/// Buffered and in-flight data of one inode.
#[derive(Default)]
pub(crate) struct FileData {
    /// Writes not yet taken by a flush, in write order.
    pub buffer: Vec<Extent>,
    pub buffer_bytes: u64,
    pub buffer_end: u64,
    /// Time of the latest buffered write (reported as mtime while dirty; committed as mtime).
    pub mtime_ns: i64,
    pub last_write: Option<Instant>,
    /// Flushes being uploaded, in write order; each is committed after the ones before it.
    pub inflight: VecDeque<Segment>,
    /// Bumped whenever this mount changes the committed content (reads that raced retry, cached
    /// layouts of an older generation are stale).
    pub commit_gen: u64,
    /// A commit since the last metadata sync: close must make it durable.
    pub unsynced: bool,
    /// Why buffered writes were dropped (a commit past the quota), until a flush reports it.
    pub lost_writes: Option<Errno>,
    /// Flushes of this inode that failed so far, and the errno of the latest: a caller that
    /// waited for the flush lock while another flush ran gets that flush's failure rather than
    /// waiting out the same fault a second time.
    pub flush_failures: u64,
    pub flush_failure: Option<Errno>,
    /// Attribute changes made here while the file had unflushed writes (tar's futimens, fchown,
    /// fchmod before close): committed with them by the next flush, in its transaction when the
    /// file is inline, instead of one transaction (and an early flush) each.
    pub pending_attr: SetAttr,
    /// Bumped by every change of `pending_attr`: a flush clears only what it committed.
    pub pending_attr_gen: u64,
}

impl FileData {
    pub fn is_dirty(&self) -> bool {
        !self.buffer.is_empty() || !self.inflight.is_empty() || !self.pending_attr.is_empty()
    }

    /// Attributes as this mount sees them: `attr` (committed) with the unflushed writes and
    /// attribute changes on top.
    pub fn overlay_attr(&self, attr: &mut Attr) {
        if !self.buffer.is_empty() || !self.inflight.is_empty() {
            attr.size = attr.size.max(self.dirty_end());
            attr.mtime_ns = attr.mtime_ns.max(self.mtime_ns);
            attr.ctime_ns = attr.ctime_ns.max(self.mtime_ns);
        }
        let p = &self.pending_attr;
        attr.perm = p.perm.unwrap_or(attr.perm);
        attr.uid = p.uid.unwrap_or(attr.uid);
        attr.gid = p.gid.unwrap_or(attr.gid);
        if let Some(TimeSet::At(ns)) = p.atime {
            attr.atime_ns = ns;
        }
        if let Some(TimeSet::At(ns)) = p.mtime {
            attr.mtime_ns = ns;
        }
        attr.ctime_ns = p.ctime.unwrap_or(attr.ctime_ns);
    }

    /// End of the furthest uncommitted byte (0 when clean).
    pub fn dirty_end(&self) -> u64 {
        self.inflight
            .iter()
            .map(|s| s.end)
            .fold(self.buffer_end, u64::max)
    }

    pub fn inflight_bytes(&self) -> u64 {
        self.inflight.iter().map(|s| s.bytes).sum()
    }

    /// Copies every uncommitted byte inside `out` (at file offset `offset`) over it, oldest first.
    pub fn overlay(&self, out: &mut [u8], offset: u64) {
        for segment in &self.inflight {
            for e in &segment.extents {
                crate::write_buffer::overlay(out, offset, e.offset, &e.data);
            }
        }
        for e in &self.buffer {
            crate::write_buffer::overlay(out, offset, e.offset, &e.data);
        }
    }
}

impl FileState {
    fn new(ino: Ino) -> FileState {
        FileState {
            ino,
            open_count: AtomicU32::new(0),
            posix_locked: AtomicBool::new(false),
            unlinked: AtomicBool::new(false),
            data: Mutex::new(FileData::default()),
            flush_lock: Mutex::new(()),
            layout: Mutex::new(None),
        }
    }
}

/// Sequential-read detection of one handle.
#[derive(Default)]
pub(crate) struct ReadAhead {
    /// Where the next read starts if the reader is sequential.
    pub next: u64,
    pub window: u64,
    /// Everything before this offset was already prefetched.
    pub prefetched_until: u64,
}

pub(crate) enum HandleKind {
    File {
        file: Arc<FileState>,
        readahead: Mutex<ReadAhead>,
        /// Set once the first write through this handle has cleared setuid/setgid.
        privileges_dropped: AtomicBool,
    },
    Dir,
}

pub(crate) struct Handle {
    pub ino: Ino,
    pub flags: i32,
    /// Opener's uid (writes by non-root clear setuid/setgid).
    pub uid: u32,
    pub kind: HandleKind,
}

impl Handle {
    pub fn file(&self) -> VfsResult<&Arc<FileState>> {
        match &self.kind {
            HandleKind::File { file, .. } => Ok(file),
            HandleKind::Dir => Err(Errno(libc::EISDIR)),
        }
    }
}

#[derive(Default)]
pub(crate) struct Registry {
    next_fh: AtomicU64,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    files: Mutex<HashMap<Ino, Arc<FileState>>>,
}

impl Registry {
    pub fn insert_handle(&self, handle: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed) + 1;
        self.handles.lock().insert(fh, Arc::new(handle));
        fh
    }

    pub fn handle(&self, fh: u64) -> VfsResult<Arc<Handle>> {
        self.handles
            .lock()
            .get(&fh)
            .cloned()
            .ok_or(Errno(libc::EBADF))
    }

    pub fn remove_handle(&self, fh: u64) -> VfsResult<Arc<Handle>> {
        self.handles.lock().remove(&fh).ok_or(Errno(libc::EBADF))
    }

    /// The inode's state with its open count raised by one.
    pub fn open_file(&self, ino: Ino) -> Arc<FileState> {
        let mut files = self.files.lock();
        let file = files
            .entry(ino)
            .or_insert_with(|| Arc::new(FileState::new(ino)))
            .clone();
        file.open_count.fetch_add(1, Ordering::SeqCst);
        file
    }

    pub fn file(&self, ino: Ino) -> Option<Arc<FileState>> {
        self.files.lock().get(&ino).cloned()
    }

    pub fn all_files(&self) -> Vec<Arc<FileState>> {
        self.files.lock().values().cloned().collect()
    }

    /// Drops the inode's state once nothing has it open and nothing is left to flush.
    /// Lock order: registry, then the file's data lock (a leaf).
    pub fn forget_if_idle(&self, ino: Ino) {
        let mut files = self.files.lock();
        if let Some(file) = files.get(&ino) {
            if file.open_count.load(Ordering::SeqCst) == 0 && !file.data.lock().is_dirty() {
                files.remove(&ino);
            }
        }
    }
}
