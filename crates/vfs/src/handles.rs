//! Open file and directory handles of this mount, and the per-inode state shared by the handles
//! of one inode (open count, write buffer).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use crate::flush::Segment;
use crate::write_buffer::Extent;
use crate::{Errno, Ino, VfsResult};

/// State of one inode opened (or still dirty) in this mount.
pub(crate) struct FileState {
    pub ino: Ino,
    pub open_count: AtomicU32,
    /// The inode lost its last link while open here: release it with the last handle.
    pub sustained: AtomicBool,
    /// Some POSIX lock was taken on it through this mount (close must then drop the owner's).
    pub posix_locked: AtomicBool,
    pub data: Mutex<FileData>,
    /// Serializes flushes of this inode: slices must be committed in write order.
    pub flush_lock: Mutex<()>,
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
    /// Bumped whenever this mount changes the committed content (reads that raced retry).
    pub commit_gen: u64,
}

impl FileData {
    pub fn is_dirty(&self) -> bool {
        !self.buffer.is_empty() || !self.inflight.is_empty()
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
            sustained: AtomicBool::new(false),
            posix_locked: AtomicBool::new(false),
            data: Mutex::new(FileData::default()),
            flush_lock: Mutex::new(()),
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

    /// Whether any handle of this mount has the inode open (answers meta's `keep_open`).
    /// Marks the inode sustained, since meta keeps it only when this returns true.
    pub fn keep_open(&self, ino: Ino) -> bool {
        match self.files.lock().get(&ino) {
            Some(file) if file.open_count.load(Ordering::SeqCst) > 0 => {
                file.sustained.store(true, Ordering::SeqCst);
                true
            }
            _ => false,
        }
    }

    /// Drops the inode's state once nothing has it open and nothing is left to flush.
    pub fn forget_if_idle(&self, ino: Ino) {
        let mut files = self.files.lock();
        if let Some(file) = files.get(&ino) {
            if file.open_count.load(Ordering::SeqCst) == 0 && !file.data.lock().is_dirty() {
                files.remove(&ino);
            }
        }
    }
}
