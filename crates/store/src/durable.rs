//! Durability of the `file://` backend: a block written to a local directory survives power loss
//! once `put_slice` returns.
//!
//! `object_store`'s `LocalFileSystem` writes a staging file and renames it into place, creating
//! missing directories on the way, but syncs nothing. After the PUTs of a slice, the store syncs:
//!
//! - each block file (one blocking task per block, so the file syncs of a slice run in parallel
//!   and the file system can batch them);
//! - once per `put_slice`, every distinct directory that holds one of its blocks (the new entries);
//! - the parent of every directory on the way up to the store root whose own entry this process
//!   has not already made durable (directories just created by the PUT, or seen for the first time).
//!
//! A directory counts as durable by its identity (device, inode, birth time), not by its path:
//! deleting the last block of a directory removes it (automatic cleanup), and a directory created
//! again at the same path, by this process or another, is synced again. In the steady state a
//! `put_slice` costs one sync per block file plus one of its directory.

use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Directories remembered as durable; beyond that the memory is dropped (costing a few extra
/// directory syncs, never durability).
const MAX_REMEMBERED_DIRS: usize = 1 << 16;

/// What tells a directory apart from one created later at the same path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DirId {
    dev: u64,
    ino: u64,
    /// Birth time, or the change time where the file system has none (a directory's change time
    /// moves when entries come and go: that only costs extra syncs).
    born_ns: i128,
}

impl DirId {
    fn of(dir: &Path) -> io::Result<DirId> {
        let meta = std::fs::metadata(dir)?;
        let born_ns = match meta.created() {
            Ok(born) => match born.duration_since(std::time::UNIX_EPOCH) {
                Ok(after) => after.as_nanos() as i128,
                Err(before) => -(before.duration().as_nanos() as i128),
            },
            Err(_) => i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        };
        Ok(DirId {
            dev: meta.dev(),
            ino: meta.ino(),
            born_ns,
        })
    }
}

/// Syncs blocks of a local directory store. Shared by the tasks of one `BlockStore`.
pub(crate) struct LocalDurability {
    /// The canonical store root, which object paths are resolved against.
    root: PathBuf,
    fs: object_store::local::LocalFileSystem,
    /// Directories whose entry in their parent this process has synced.
    durable_dirs: Mutex<HashMap<PathBuf, DirId>>,
    pub(crate) file_syncs: AtomicU64,
    pub(crate) dir_syncs: AtomicU64,
}

impl LocalDurability {
    pub(crate) fn new(root: PathBuf, fs: object_store::local::LocalFileSystem) -> Self {
        LocalDurability {
            root,
            fs,
            durable_dirs: Mutex::new(HashMap::new()),
            file_syncs: AtomicU64::new(0),
            dir_syncs: AtomicU64::new(0),
        }
    }

    /// The file of an object.
    pub(crate) fn file_path(&self, path: &object_store::path::Path) -> io::Result<PathBuf> {
        self.fs
            .path_to_filesystem(path)
            .map_err(|e| io::Error::other(e.to_string()))
    }

    /// Syncs one written block file. Blocking.
    pub(crate) fn sync_file(&self, file: &Path) -> io::Result<()> {
        std::fs::File::open(file)?.sync_all()?;
        self.file_syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Syncs each of `dirs` (which hold freshly written blocks) and, up to the store root, the
    /// parent of every directory whose entry is not known to be durable yet. Blocking.
    pub(crate) fn sync_dirs(&self, dirs: &BTreeSet<PathBuf>) -> io::Result<()> {
        let mut synced = HashSet::new();
        for dir in dirs {
            self.sync_dir(dir)?;
            synced.insert(dir.clone());
        }
        let mut learned = Vec::new();
        for dir in dirs {
            // The chain cannot change under us: every directory on it holds one of our blocks.
            let mut dir = dir.as_path();
            while dir != self.root && dir.starts_with(&self.root) {
                let id = DirId::of(dir)?;
                if self.durable_dirs.lock().get(dir) == Some(&id) {
                    // Its ancestors were made durable before it was remembered.
                    break;
                }
                let Some(parent) = dir.parent() else { break };
                if !synced.contains(parent) {
                    self.sync_dir(parent)?;
                    synced.insert(parent.to_path_buf());
                }
                learned.push((dir.to_path_buf(), id));
                dir = parent;
            }
        }
        if !learned.is_empty() {
            let mut durable = self.durable_dirs.lock();
            if durable.len() + learned.len() > MAX_REMEMBERED_DIRS {
                durable.clear();
            }
            durable.extend(learned);
        }
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        std::fs::File::open(dir)?.sync_all()?;
        self.dir_syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Creates `dir` and its missing ancestors durably: syncs the parent of each directory created.
pub(crate) fn create_dir_all_durable(dir: &Path) -> io::Result<()> {
    let mut first_existing = dir;
    while !first_existing.exists() {
        match first_existing.parent() {
            Some(parent) => first_existing = parent,
            None => break,
        }
    }
    std::fs::create_dir_all(dir)?;
    let mut created = dir;
    while created != first_existing {
        let Some(parent) = created.parent() else {
            break;
        };
        std::fs::File::open(parent)?.sync_all()?;
        created = parent;
    }
    Ok(())
}
