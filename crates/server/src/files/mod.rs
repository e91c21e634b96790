//! The volume file service behind `/api/volumes/{volumeId}/files`: each volume is opened once per
//! server process with the same vfs as the mounts (so a change made here reaches running mounts
//! through the change feed, and a file closed in a sandbox is read here at once), kept while
//! requests use it and shut down after an idle period or before the volume is deleted.
//!
//! Every vfs call blocks: callers run them on the blocking pool.

mod ops;
mod path;
pub mod signing;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellar_vfs::{Ctx, Errno, Vfs, VolumeConfig};

pub use ops::{
    begin_upload, is_upload_name, list, make_dir, open_for_read, remove, rename, set_mode, stat,
    Entry, EntryKind, Reader, MAX_LIST_LIMIT,
};
pub use path::VolumePath;

/// The caller the file API acts as: the user sandboxes run as (`cellar_runner`'s SANDBOX_UID),
/// so what it creates is theirs to change.
pub(crate) const API_CTX: Ctx = Ctx {
    uid: 1000,
    gid: 1000,
    pid: 0,
};
/// For changes the volume's owner may make to any file (its mode), whoever owns it.
pub(crate) const OWNER_CTX: Ctx = Ctx {
    uid: 0,
    gid: 0,
    pid: 0,
};

/// How long a volume stays open without requests.
pub const IDLE_CLOSE_AFTER: Duration = Duration::from_secs(60);
/// How long deleting a volume waits for the requests using it before shutting it down anyway.
const CLOSE_WAIT: Duration = Duration::from_secs(30);

/// What a file operation can fail with; the API maps each kind to one status and code.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0}")]
    InvalidPath(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0} does not exist")]
    NotFound(String),
    #[error("{0}")]
    NotADirectory(String),
    #[error("{0}")]
    IsADirectory(String),
    /// A symlink or a special file where a regular file is needed.
    #[error("{0}")]
    NotAFile(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    NotEmpty(String),
    #[error("{0}")]
    QuotaExceeded(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Forbidden(String),
    /// The volume cannot be used now (being deleted).
    #[error("{0}")]
    Unavailable(String),
    /// Not the client's fault: the store or the metadata engine failed.
    #[error("{0}")]
    Internal(String),
}

pub type FileResult<T> = Result<T, FileError>;

impl FileError {
    /// The one errno → error mapping of the file API; `path` is what the message names.
    pub fn errno(errno: Errno, path: &VolumePath) -> FileError {
        let path = path.as_string();
        match errno.0 {
            libc::ENOENT => FileError::NotFound(path),
            libc::ENOTDIR => FileError::NotADirectory(format!("{path}: not a directory")),
            libc::EISDIR => FileError::IsADirectory(format!("{path} is a directory")),
            libc::EEXIST => FileError::AlreadyExists(path),
            libc::ENOTEMPTY => FileError::NotEmpty(format!(
                "directory {path} is not empty (delete it with recursive=true)"
            )),
            libc::EDQUOT | libc::ENOSPC => FileError::QuotaExceeded(format!(
                "{path}: the volume's quota is exhausted; nothing was changed"
            )),
            libc::ENAMETOOLONG => FileError::InvalidPath(format!("{path}: a name is too long")),
            libc::ELOOP => FileError::InvalidPath(format!("{path}: too many symbolic links")),
            libc::EINVAL => FileError::Invalid(format!("{path}: invalid operation ({errno})")),
            libc::EFBIG => FileError::TooLarge(format!("{path}: the file would be too large")),
            libc::EROFS => FileError::Forbidden(format!(
                "{path}: the volume is a snapshot, which is read-only (fork it to change it)"
            )),
            libc::EPERM | libc::EACCES => {
                FileError::Forbidden(format!("{path}: operation not permitted ({errno})"))
            }
            _ => FileError::Internal(format!("{path}: {errno}")),
        }
    }
}

struct Slot {
    vfs: tokio::sync::OnceCell<Arc<Vfs>>,
    /// Leases held; raised only under the pool's lock, so a slot the reaper sees unused there
    /// cannot be handed out any more.
    users: AtomicUsize,
    last_used: Mutex<Instant>,
}

#[derive(Default)]
struct Slots {
    open: HashMap<String, Arc<Slot>>,
    /// Volumes being deleted: never opened again by this process.
    retired: HashSet<String>,
}

/// The open volumes of this process.
pub struct VolumeFiles {
    slots: Mutex<Slots>,
    idle: Duration,
}

/// A volume in use by one request: derefs to its vfs.
pub struct Lease {
    vfs: Arc<Vfs>,
    _use: Use,
}

impl std::ops::Deref for Lease {
    type Target = Vfs;
    fn deref(&self) -> &Vfs {
        &self.vfs
    }
}

/// Gives a slot's use back (a lease, or an attempt to open that failed).
struct Use(Arc<Slot>);

impl Drop for Use {
    fn drop(&mut self) {
        *self.0.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.0.users.fetch_sub(1, Ordering::SeqCst);
    }
}

impl VolumeFiles {
    pub fn new(idle: Duration) -> VolumeFiles {
        VolumeFiles {
            slots: Mutex::default(),
            idle,
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The volume, opened with `config` unless this process has it open already.
    pub async fn acquire(&self, volume_id: &str, config: VolumeConfig) -> FileResult<Lease> {
        let slot = {
            let mut slots = self.slots();
            if slots.retired.contains(volume_id) {
                return Err(FileError::Unavailable(format!(
                    "volume {volume_id} is being deleted"
                )));
            }
            let slot = slots
                .open
                .entry(volume_id.to_string())
                .or_insert_with(|| {
                    Arc::new(Slot {
                        vfs: tokio::sync::OnceCell::new(),
                        users: AtomicUsize::new(0),
                        last_used: Mutex::new(Instant::now()),
                    })
                })
                .clone();
            slot.users.fetch_add(1, Ordering::SeqCst);
            slot
        };
        let used = Use(Arc::clone(&slot));
        let vfs = slot
            .vfs
            .get_or_try_init(|| async move {
                let volume = config.volume.clone();
                let opened = tokio::task::spawn_blocking(move || Vfs::open_volume(config)).await;
                match opened {
                    Ok(Ok(vfs)) => {
                        tracing::info!(volume = %volume, "volume opened for the file API");
                        Ok(vfs)
                    }
                    Ok(Err(e)) => Err(FileError::Internal(format!(
                        "opening volume {volume}: {e:#}"
                    ))),
                    Err(e) => Err(FileError::Internal(format!("opening volume {volume}: {e}"))),
                }
            })
            .await
            .map_err(|e| {
                tracing::error!("{e}");
                e
            })?
            .clone();
        Ok(Lease { vfs, _use: used })
    }

    /// Shuts down the volumes idle for longer than the idle period, for as long as the server runs.
    pub async fn close_idle_volumes(self: Arc<Self>) {
        let period = (self.idle / 4).max(Duration::from_millis(100));
        let mut ticks = tokio::time::interval(period);
        loop {
            ticks.tick().await;
            let idle: Vec<(String, Arc<Slot>)> = {
                let mut slots = self.slots();
                let expired: Vec<String> = slots
                    .open
                    .iter()
                    .filter(|(_, slot)| {
                        slot.users.load(Ordering::SeqCst) == 0
                            && slot
                                .last_used
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .elapsed()
                                >= self.idle
                    })
                    .map(|(id, _)| id.clone())
                    .collect();
                expired
                    .into_iter()
                    .filter_map(|id| slots.open.remove(&id).map(|slot| (id, slot)))
                    .collect()
            };
            for (id, slot) in idle {
                shut_down(&id, slot, "idle").await;
            }
        }
    }

    /// Before a volume is deleted: refuses new requests, waits (a while) for those running, and
    /// shuts the volume down.
    pub async fn retire(&self, volume_id: &str) {
        let slot = {
            let mut slots = self.slots();
            slots.retired.insert(volume_id.to_string());
            slots.open.remove(volume_id)
        };
        let Some(slot) = slot else { return };
        let deadline = Instant::now() + CLOSE_WAIT;
        while slot.users.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shut_down(volume_id, slot, "deleted").await;
    }

    /// At server shutdown: flushes and closes every open volume.
    pub async fn close_all(&self) {
        let open: Vec<(String, Arc<Slot>)> = self.slots().open.drain().collect();
        for (id, slot) in open {
            shut_down(&id, slot, "server stopping").await;
        }
    }
}

async fn shut_down(volume_id: &str, slot: Arc<Slot>, why: &str) {
    let Some(vfs) = slot.vfs.get().cloned() else {
        return;
    };
    let closed = tokio::task::spawn_blocking(move || vfs.shutdown()).await;
    match closed {
        Ok(Ok(())) => tracing::info!(volume = %volume_id, "file API closed the volume ({why})"),
        Ok(Err(e)) => tracing::error!(volume = %volume_id, "closing the volume: {e:#}"),
        Err(e) => tracing::error!(volume = %volume_id, "closing the volume: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl VolumeFiles {
        fn open_volumes(&self) -> usize {
            self.slots().open.len()
        }
    }

    fn volume_in(dir: &std::path::Path) -> VolumeConfig {
        let store = dir.join("blocks");
        std::fs::create_dir_all(&store).unwrap();
        VolumeConfig {
            meta_url: format!("sqlite://{}", dir.join("meta.db").display()),
            store_url: format!("file://{}", store.display()),
            volume: "v".into(),
            cache_mem_bytes: 1 << 20,
            cache_dir: None,
            cache_disk_bytes: 0,
            mount_point: String::new(),
            store_timeouts: Default::default(),
        }
    }

    /// A volume stays open while leased, closes once idle, and a retired one never reopens.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn volumes_close_when_idle_and_stay_closed_once_retired() {
        let dir = tempfile::tempdir().unwrap();
        let config = volume_in(dir.path());
        let files = Arc::new(VolumeFiles::new(Duration::from_millis(300)));
        let reaper = tokio::spawn(files.clone().close_idle_volumes());

        let lease = files.acquire("v", config.clone()).await.unwrap();
        let again = files.acquire("v", config.clone()).await.unwrap();
        assert!(Arc::ptr_eq(&lease.vfs, &again.vfs), "opened once");
        drop(again);
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(files.open_volumes(), 1, "a leased volume stays open");
        drop(lease);
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(files.open_volumes(), 0, "an idle volume is closed");

        let lease = files.acquire("v", config.clone()).await.unwrap();
        assert_eq!(files.open_volumes(), 1, "reopened on demand");
        drop(lease);
        files.retire("v").await;
        assert_eq!(files.open_volumes(), 0);
        assert!(matches!(
            files.acquire("v", config).await,
            Err(FileError::Unavailable(_))
        ));
        reaper.abort();
    }
}
