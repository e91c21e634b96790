//! A mounted volume: backends, session, open handles, dirty state and background threads.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use cellar_meta::{Attr, Ino, SessionId, SessionInfo};
use parking_lot::{Condvar, Mutex, RwLock};

use crate::backend::{now_ns, Core};
use crate::handles::{FileState, Registry};
use crate::quota::QuotaView;
use crate::{Errno, Invalidation, VfsResult, VolumeConfig};

/// Sessions whose heartbeat is older than this are considered crashed and reaped.
pub(crate) const STALE_SESSION_AGE: Duration = Duration::from_secs(60);
/// A mount whose last successful heartbeat is this old stops acknowledging fsync and close: other
/// mounts may reap its session (dropping its locks and unlinked-open files) any moment now.
const FENCE_AFTER: Duration = Duration::from_secs(45);

/// Who records a session: the host's name, qualified by its boot and PID namespace, so that a
/// session with this host and a pid that no longer runs here certainly belongs to a crashed
/// process (two machines, or containers, may share a host name).
pub(crate) fn host_name() -> String {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let pid_namespace = std::fs::read_link("/proc/self/ns/pid")
        .map(|link| link.display().to_string())
        .unwrap_or_default();
    format!(
        "{} (boot {}, {pid_namespace})",
        read("/proc/sys/kernel/hostname").trim(),
        read("/proc/sys/kernel/random/boot_id").trim()
    )
}

/// Whether `pid` names a live process of this PID namespace (a pid reused since counts as
/// running: its session then expires as usual). A zombie is dead: a killed daemon stays one
/// until its parent (often init) reaps it, and the runner remounts at once.
fn process_runs(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may hold spaces.
        Ok(stat) => !matches!(
            stat.rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next()),
            Some('Z' | 'X')
        ),
        Err(_) => false,
    }
}
type Invalidator = Box<dyn Fn(Invalidation) + Send + Sync>;

const DEFAULT_GC_GRACE: Duration = Duration::from_secs(600);

/// Grace period before garbage objects are deleted: `CELLAR_GC_GRACE_SECS` or 10 minutes.
pub(crate) fn gc_grace() -> Duration {
    std::env::var("CELLAR_GC_GRACE_SECS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_GC_GRACE)
}

/// Wakes background threads early when the volume shuts down.
#[derive(Default)]
pub(crate) struct Stopper {
    stopped: Mutex<bool>,
    wake: Condvar,
}

impl Stopper {
    pub fn stop(&self) {
        *self.stopped.lock() = true;
        self.wake.notify_all();
    }

    /// Sleeps up to `period`; returns true if the volume is stopping.
    pub fn wait(&self, period: Duration) -> bool {
        let mut stopped = self.stopped.lock();
        if !*stopped {
            self.wake.wait_for(&mut stopped, period);
        }
        *stopped
    }
}

pub(crate) struct Inner {
    pub core: Core,
    /// This mount's session (replaced if it was reaped while this mount was unresponsive).
    session: AtomicU64,
    session_info: SessionInfo,
    pub registry: Registry,
    /// The data version of each inode as this mount last saw it: its kernel page cache is valid
    /// while the version is unchanged (mtime and size can be restored by `touch -r`, `rsync -t`).
    seen: Mutex<HashMap<Ino, u64>>,
    /// When the heartbeat last succeeded (see [`FENCE_AFTER`]).
    last_heartbeat: Mutex<Instant>,
    /// Chunks whose commit left them fragmented, for the background compactor.
    pub compaction_requests: Mutex<HashSet<(Ino, u64)>>,
    /// Bytes buffered or uploading across the mount (the `cellar_vfs_dirty_bytes` gauge follows it).
    pub dirty_bytes: cellar_metrics::DirtyBytes,
    pub quota: QuotaView,
    invalidator: RwLock<Option<Invalidator>>,
    pub stopper: Arc<Stopper>,
    pub threads: Mutex<Vec<JoinHandle<()>>>,
    /// Set by the first shutdown (spool.rs).
    pub closed: AtomicBool,
    pub gc_grace: Duration,
}

impl Inner {
    pub fn open_volume(config: &VolumeConfig) -> anyhow::Result<Arc<Inner>> {
        let core = Core::open(config, true)?;
        let session_info = SessionInfo {
            host: host_name(),
            pid: std::process::id(),
            mount_point: config.mount_point.clone(),
            now_ns: now_ns(),
        };
        let session = core
            .meta
            .open_session(&session_info)
            .context("opening a metadata session")?;
        let inner = Arc::new(Inner {
            core,
            session: AtomicU64::new(session),
            session_info,
            registry: Registry::default(),
            seen: Mutex::new(HashMap::new()),
            last_heartbeat: Mutex::new(Instant::now()),
            compaction_requests: Mutex::new(HashSet::new()),
            dirty_bytes: cellar_metrics::DirtyBytes::default(),
            quota: QuotaView::default(),
            invalidator: RwLock::new(None),
            stopper: Arc::new(Stopper::default()),
            threads: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
            gc_grace: gc_grace(),
        });
        inner.close_crashed_sessions_here();
        inner.reap_stale_sessions();
        tracing::info!(volume = %inner.core.volume.name, session, "volume opened");
        Ok(inner)
    }

    /// EROFS on a snapshot.
    pub fn writable(&self) -> VfsResult<()> {
        if self.core.read_only {
            return crate::errno::err(libc::EROFS);
        }
        Ok(())
    }

    pub fn session(&self) -> SessionId {
        self.session.load(Ordering::SeqCst)
    }

    /// Refreshes the session; if it was reaped as stale (its locks and sustained inodes are gone),
    /// opens a new one so locks and unlinked-open files work again.
    pub fn heartbeat(&self) {
        match self.core.meta.heartbeat(self.session()) {
            Ok(()) => *self.last_heartbeat.lock() = Instant::now(),
            Err(e) if e.errno() == libc::ESTALE => {
                let info = SessionInfo {
                    now_ns: now_ns(),
                    ..self.session_info.clone()
                };
                match self.core.meta.open_session(&info) {
                    Ok(session) => {
                        tracing::error!(
                            session,
                            "the session had expired (its locks and unlinked-open files were dropped); opened a new one"
                        );
                        self.session.store(session, Ordering::SeqCst);
                        *self.last_heartbeat.lock() = Instant::now();
                    }
                    Err(e) => tracing::warn!(error = %e, "could not reopen the expired session"),
                }
            }
            Err(e) => tracing::warn!(error = %e, "session heartbeat failed"),
        }
    }

    /// Closes the sessions of earlier mounts at this mount point of this host whose process is
    /// gone (SIGKILL, a crash): their locks and unlinked-open files go now rather than when their
    /// heartbeat expires (a minute), so the mount that replaces them (the runner remounts a dead
    /// daemon at once) can take their locks again: SQLite on a remounted volume works at once.
    fn close_crashed_sessions_here(&self) {
        let info = &self.session_info;
        let sessions = match self.core.meta.sessions_at(&info.host, &info.mount_point) {
            Ok(sessions) => sessions,
            Err(e) => {
                tracing::warn!(error = %e, "could not list the sessions of this mount point");
                return;
            }
        };
        for (session, pid) in sessions {
            if session == self.session() || process_runs(pid) {
                continue;
            }
            match self.core.meta.close_session(session) {
                Ok(()) => tracing::warn!(
                    session,
                    pid,
                    "closed the session of a crashed mount of this mount point (its locks are released)"
                ),
                Err(e) => tracing::warn!(session, error = %e, "could not close the session of a crashed mount"),
            }
        }
    }

    pub fn reap_stale_sessions(&self) {
        match self.core.meta.reap_stale_sessions(
            STALE_SESSION_AGE.as_nanos() as i64,
            // A late heartbeat (stalled store, loaded host) must not make a mount drop its
            // own locks: only other, crashed mounts are reaped.
            Some(self.session()),
        ) {
            Ok(0) => {}
            Ok(n) => tracing::info!(sessions = n, "reaped sessions of crashed mounts"),
            Err(e) => tracing::warn!(error = %e, "could not reap stale sessions"),
        }
    }

    /// EIO once the heartbeat has failed for so long that other mounts may reap this session:
    /// fsync and close must not acknowledge writes of a session that may be gone.
    pub fn check_session(&self) -> VfsResult<()> {
        let since = self.last_heartbeat.lock().elapsed();
        if since > FENCE_AFTER {
            tracing::error!(
                seconds = since.as_secs(),
                "the session heartbeat keeps failing; refusing to acknowledge fsync/close"
            );
            return Err(Errno::IO);
        }
        Ok(())
    }

    /// Makes every metadata commit of this mount so far durable (fsync, close, fsyncdir).
    pub fn sync_metadata(&self) -> VfsResult<()> {
        Ok(self.core.meta.sync()?)
    }

    /// Records what this mount's kernel cache now holds for the inode.
    pub fn note_seen(&self, attr: &Attr) {
        self.seen.lock().insert(attr.ino, attr.data_version);
    }

    /// Whether the inode's content is unchanged since this mount last saw it (and remembers it).
    pub fn unchanged_since_seen(&self, attr: &Attr) -> bool {
        self.seen.lock().insert(attr.ino, attr.data_version) == Some(attr.data_version)
    }

    /// A sync point (an open, a lock granted) given the engine's attributes of an open file:
    /// drops its cached layout if it is of another data version (it would serve older bytes for
    /// up to a second), and tells whether the kernel may keep its pages (see
    /// [`Self::unchanged_since_seen`]; this mount's unflushed writes are newer than the engine).
    pub fn sync_point(&self, file: &FileState, attr: &Attr) -> bool {
        {
            let mut layout = file.layout.lock();
            if layout
                .as_ref()
                .is_some_and(|l| l.attr.data_version != attr.data_version)
            {
                *layout = None;
            }
        }
        file.data.lock().is_dirty() || self.unchanged_since_seen(attr)
    }

    pub fn forget_seen(&self, ino: Ino) {
        self.seen.lock().remove(&ino);
    }

    pub fn forget_all_seen(&self) {
        self.seen.lock().clear();
    }

    /// Attributes as this mount sees them: buffered writes count toward size and mtime, and
    /// attribute changes waiting for them apply.
    /// `attr` came from the engine; for a file open here it is read again between two looks
    /// at the commit generation: a commit of this mount after the engine read moves bytes out
    /// of the buffer that the read lacks, and the size would come out short (readers then see
    /// a false end of file).
    pub fn overlay_attr(&self, attr: Attr) -> VfsResult<Attr> {
        match self.registry.file(attr.ino) {
            Some(file) => self.open_file_attr(&file),
            None => Ok(attr),
        }
    }

    /// The attributes of a file open here, buffered writes included (see [`Self::overlay_attr`]).
    pub fn open_file_attr(&self, file: &FileState) -> VfsResult<Attr> {
        loop {
            let (mut attr, generation) = self.committed_attr(file)?;
            let d = file.data.lock();
            if d.commit_gen == generation {
                d.overlay_attr(&mut attr);
                return Ok(attr);
            }
        }
    }

    /// The committed attributes of a file open here, with the commit generation (of this
    /// mount's commits) they are current at.
    pub fn committed_attr(&self, file: &FileState) -> VfsResult<(Attr, u64)> {
        loop {
            let generation = file.data.lock().commit_gen;
            let attr = self.core.meta.getattr(file.ino)?;
            if file.data.lock().commit_gen == generation {
                return Ok((attr, generation));
            }
        }
    }

    pub fn set_invalidator(&self, f: Invalidator) {
        *self.invalidator.write() = Some(f);
    }

    pub fn invalidate(&self, what: Invalidation) {
        if let Some(f) = self.invalidator.read().as_ref() {
            f(what);
        }
    }
}
