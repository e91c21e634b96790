//! cellar-runner: the per-host runner. Runs sandboxes with bubblewrap, keeps one FUSE mount per
//! volume per host (ref-counted across sandboxes and restarts) and implements the toolbox
//! operations (exec, upload, download).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod cgroup;
mod mounts;
mod network;
mod process;
mod sandbox;
mod seccomp;
mod toolbox;

use mounts::MountManager;
use sandbox::{SandboxPaths, SandboxRecord, VolumeBind};
pub use toolbox::{FileStream, EXEC_OUTPUT_LIMIT, EXEC_TIMEOUT_EXIT_CODE};

/// Where the runner keeps its state and which binary it uses for mount daemons.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// `sandboxes/` and `mounts/` live here.
    pub state_dir: PathBuf,
    /// Path of the `cellar` binary used to spawn mount daemons (`cellar mount`, `cellar umount`).
    pub cellar_bin: PathBuf,
}

/// Everything needed to mount one volume on this host.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSource {
    pub volume_id: String,
    pub meta_url: String,
    pub store_url: String,
    pub volume_name: String,
    /// E.g. AWS_ACCESS_KEY_ID: passed ONLY to the mount daemon, never into a sandbox.
    pub store_env: Vec<(String, String)>,
}

/// Credentials must never reach logs, so Debug shows only names.
impl std::fmt::Debug for VolumeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeSource")
            .field("volume_id", &self.volume_id)
            .field("volume_name", &self.volume_name)
            .finish_non_exhaustive()
    }
}

/// One volume mounted into a sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeMountSpec {
    pub volume: VolumeSource,
    /// Absolute path inside the sandbox, validated by the caller.
    pub mount_path: String,
    /// Relative path inside the volume, validated by the caller.
    pub subpath: Option<String>,
    pub read_only: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// Letters, digits, `-`, `_`, `.`; names the sandbox's files and cgroup.
    pub id: String,
    /// The environment of every process in the sandbox (plus HOME, PATH, USER).
    pub env: BTreeMap<String, String>,
    pub mounts: Vec<VolumeMountSpec>,
    /// CPU limit in cores; 0 = unlimited.
    pub cpu: u32,
    /// Memory limit in GiB; 0 = unlimited.
    pub memory_gib: u32,
    /// What the sandbox's own network namespace can reach.
    pub network: NetworkPolicy,
}

/// How a sandbox reaches the network. Every sandbox has its own network namespace, so it never
/// sees the host's interfaces or another sandbox's ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetworkPolicy {
    /// Only the sandbox's own loopback interface.
    Isolated,
    /// Outbound connections through a user-mode network stack, to the networks in `allow` only
    /// when it is not empty. The host's loopback and own addresses and link-local addresses
    /// (cloud metadata services) are never reachable.
    Outbound { allow: Vec<ipnet::IpNet> },
}

/// The host directories a sandbox's read-only system is built from; a volume mounted on one of
/// them, or below one, would hide or shadow the sandbox's own programs and configuration.
pub const SANDBOX_SYSTEM_DIRS: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/proc", "/dev",
    "/sys", "/boot",
];

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExecRequest {
    /// A shell line, run with `/bin/sh -c`.
    pub command: String,
    /// The shell's positional parameters (`$1`, `$2`, ...): how fixed scripts take paths and
    /// patterns without quoting them into the command line.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Working directory inside the sandbox; default `/home/daytona`.
    pub cwd: Option<String>,
    pub env: BTreeMap<String, String>,
    /// On expiry the command and everything it started are killed, and the result carries
    /// [`EXEC_TIMEOUT_EXIT_CODE`] with the output so far.
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    pub exit_code: i32,
    /// stdout and stderr interleaved (one pipe), capped at [`EXEC_OUTPUT_LIMIT`] bytes.
    pub output: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// Sandbox or file not found.
    #[error("not found: {0}")]
    NotFound(String),
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// bwrap missing, mount failed, ...
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// In use (a mount a process of the sandbox uses; a mount path already taken).
    #[error("busy: {0}")]
    Busy(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs the sandboxes of one host. Send + Sync; share it behind an `Arc`.
pub struct Runner {
    sandboxes_dir: PathBuf,
    /// Running sandboxes by id.
    sandboxes: Arc<Mutex<HashMap<String, Arc<SandboxRecord>>>>,
    /// Serialises sandbox creation and destruction, and with them the mount reference counts
    /// (shared with the thread that replaces dead mounts).
    lifecycle: Arc<tokio::sync::Mutex<()>>,
    mounts: Arc<MountManager>,
    cgroups: cgroup::Cgroups,
}

impl Runner {
    /// Opens the runner's state: sandboxes still running (from before a restart) are adopted,
    /// dead ones cleaned up, their mount references released, and dead mounts remounted.
    pub fn new(config: RunnerConfig) -> Result<Runner, RunnerError> {
        create_private_dir(&config.state_dir)?;
        let state_dir = config.state_dir.canonicalize()?;
        let sandboxes_dir = state_dir.join("sandboxes");
        let mounts_dir = state_dir.join("mounts");
        create_private_dir(&sandboxes_dir)?;
        create_private_dir(&mounts_dir)?;
        let runner = Runner {
            sandboxes_dir,
            sandboxes: Arc::new(Mutex::new(HashMap::new())),
            lifecycle: Arc::new(tokio::sync::Mutex::new(())),
            mounts: Arc::new(MountManager::new(mounts_dir, config.cellar_bin)),
            cgroups: cgroup::Cgroups::detect(),
        };
        runner.recover()?;
        watch_host_addresses(
            runner.sandboxes_dir.clone(),
            Arc::downgrade(&runner.sandboxes),
        );
        watch_mounts(
            Arc::downgrade(&runner.lifecycle),
            Arc::downgrade(&runner.mounts),
            Arc::downgrade(&runner.sandboxes),
        );
        Ok(runner)
    }

    fn recover(&self) -> Result<(), RunnerError> {
        let mut running = HashMap::new();
        for entry in std::fs::read_dir(&self.sandboxes_dir)? {
            let path = entry?.path();
            if path.extension().and_then(|ext| ext.to_str()) != Some("json") {
                continue;
            }
            let record: SandboxRecord = match std::fs::read(&path)
                .map_err(|err| err.to_string())
                .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|err| err.to_string()))
            {
                Ok(record) => record,
                Err(err) => {
                    tracing::warn!(path = %path.display(), "dropping unreadable sandbox record: {err}");
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
            };
            if record.is_alive() {
                tracing::info!(sandbox = %record.id, "adopted running sandbox");
                self.reconnect(&record);
                running.insert(record.id.clone(), Arc::new(record));
            } else {
                tracing::info!(sandbox = %record.id, "cleaning up sandbox that stopped");
                self.cgroups.remove(&record.id);
                SandboxPaths::new(&self.sandboxes_dir, &record.id).remove();
            }
        }
        // Directories of sandboxes whose creation was interrupted before their record was saved.
        for entry in std::fs::read_dir(&self.sandboxes_dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type()?.is_dir() && !running.contains_key(&name) {
                let paths = SandboxPaths::new(&self.sandboxes_dir, &name);
                // Launched before the runner died, record unsaved: nothing else would ever stop
                // it (and its bind would keep the volume's mount busy). Its bubblewrap processes
                // name the sandbox's home; the init among them takes the rest with it.
                for pid in process::with_argument("bwrap", &paths.home().to_string_lossy()) {
                    tracing::warn!(sandbox = %name, pid, "ending a sandbox whose creation was interrupted");
                    process::kill(pid, libc::SIGKILL);
                }
                paths.remove();
            }
            // A network namespace bound before its sandbox's record was saved.
            if let Some(id) = name.strip_suffix(".netns") {
                if !running.contains_key(id) {
                    SandboxPaths::new(&self.sandboxes_dir, id).remove();
                }
            }
        }
        let running_ids: HashSet<String> = running.keys().cloned().collect();
        let remounted = self.mounts.recover(&running_ids)?;
        let records: Vec<Arc<SandboxRecord>> = running.values().cloned().collect();
        *self.sandboxes.lock().expect("sandbox table poisoned") = running;
        for volume_id in remounted {
            rebind_volume(&self.mounts, &records, &volume_id);
        }
        Ok(())
    }

    /// Gives an adopted outbound sandbox whose pasta died (a crash, a host-wide kill) its
    /// network back: a new pasta and the routes of its policy.
    fn reconnect(&self, record: &SandboxRecord) {
        let NetworkPolicy::Outbound { allow } = &record.network else {
            return;
        };
        let paths = SandboxPaths::new(&self.sandboxes_dir, &record.id);
        if network::is_connected(&paths.netns) {
            return;
        }
        network::forget_allow_list(&paths.netns);
        match network::connect(&paths.netns, allow, &paths.network_log()) {
            Ok(()) => tracing::info!(sandbox = %record.id, "reconnected the sandbox's network"),
            Err(err) => {
                tracing::error!(sandbox = %record.id, "cannot reconnect the sandbox's network: {err}")
            }
        }
    }

    /// Starts a sandbox and returns once it runs. Creating a sandbox that already runs is a
    /// no-op.
    pub async fn create_sandbox(&self, spec: SandboxSpec) -> Result<(), RunnerError> {
        validate_spec(&spec)?;
        let _lifecycle = self.lifecycle.lock().await;
        if self.is_running(&spec.id) {
            return Ok(());
        }
        // A sandbox of that id that died on its own: release what it held first.
        self.teardown(&spec.id).await?;
        let paths = SandboxPaths::new(&self.sandboxes_dir, &spec.id);
        let mut acquired: Vec<String> = Vec::new();
        let started = self.start(&spec, &paths, &mut acquired).await;
        match started {
            Ok(record) => {
                self.sandboxes
                    .lock()
                    .expect("sandbox table poisoned")
                    .insert(spec.id.clone(), Arc::new(record));
                Ok(())
            }
            Err(err) => {
                self.release_mounts(&spec.id, &acquired).await;
                self.cgroups.remove(&spec.id);
                paths.remove();
                Err(err)
            }
        }
    }

    /// Creates the network namespace (pasta connects it meanwhile), mounts the volumes,
    /// launches bubblewrap and persists the record; `acquired` collects the volumes referenced
    /// so far, for the caller to release on failure.
    async fn start(
        &self,
        spec: &SandboxSpec,
        paths: &SandboxPaths,
        acquired: &mut Vec<String>,
    ) -> Result<SandboxRecord, RunnerError> {
        paths.remove();
        // pasta logs there from its start on.
        std::fs::create_dir_all(&paths.dir)?;
        let (netns, connecting) = match &spec.network {
            NetworkPolicy::Isolated => (None, None),
            NetworkPolicy::Outbound { allow } => {
                let netns = network::create(&paths.netns)?;
                let (file, log, allow) = (paths.netns.clone(), paths.network_log(), allow.clone());
                let connecting =
                    tokio::task::spawn_blocking(move || network::connect(&file, &allow, &log));
                (Some(netns), Some(connecting))
            }
        };
        let launched = self.mount_and_launch(spec, paths, acquired, netns).await;
        let connected = match connecting {
            Some(task) => task
                .await
                .map_err(|err| RunnerError::Io(std::io::Error::other(err)))
                .and_then(|connected| connected),
            None => Ok(()),
        };
        let started = launched?;
        let record = SandboxRecord {
            id: spec.id.clone(),
            bwrap_pid: started.bwrap_pid,
            init_pid: started.init_pid,
            init_start_time: started.init_start_time,
            env: spec.env.clone(),
            volumes: spec
                .mounts
                .iter()
                .map(|mount| sandbox::VolumeBindRecord {
                    volume_id: mount.volume.volume_id.clone(),
                    mount_path: mount.mount_path.clone(),
                    subpath: mount.subpath.clone(),
                    read_only: mount.read_only,
                })
                .collect(),
            network: spec.network.clone(),
        };
        let saved = connected.and_then(|()| {
            serde_json::to_vec_pretty(&record)
                .map_err(std::io::Error::other)
                .and_then(|bytes| write_atomically(&paths.record, &bytes))
                .map_err(RunnerError::from)
        });
        if let Err(err) = saved {
            let _ = record.kill().await;
            return Err(err);
        }
        Ok(record)
    }

    /// Mounts the volumes and launches bubblewrap, in network namespace `netns` if given (else
    /// in a new, unconnected one).
    async fn mount_and_launch(
        &self,
        spec: &SandboxSpec,
        paths: &SandboxPaths,
        acquired: &mut Vec<String>,
        netns: Option<std::os::fd::OwnedFd>,
    ) -> Result<sandbox::Started, RunnerError> {
        let mut binds = Vec::with_capacity(spec.mounts.len());
        for mount in &spec.mounts {
            let mounts = Arc::clone(&self.mounts);
            let source = mount.volume.clone();
            let sandbox_id = spec.id.clone();
            let subpath = mount.subpath.clone();
            if !acquired.contains(&source.volume_id) {
                acquired.push(source.volume_id.clone());
            }
            let others: Vec<Arc<SandboxRecord>> = self
                .sandboxes
                .lock()
                .expect("sandbox table poisoned")
                .values()
                .cloned()
                .collect();
            let dir = tokio::task::spawn_blocking(move || {
                let acquired = mounts.acquire(&source, &sandbox_id)?;
                if acquired.replaced_dead_mount {
                    rebind_volume(&mounts, &others, &source.volume_id);
                }
                mounts::open_volume_dir(&acquired.mount_point, subpath.as_deref())
            })
            .await
            .map_err(|err| RunnerError::Io(std::io::Error::other(err)))??;
            binds.push(VolumeBind {
                source: dir,
                mount_path: mount.mount_path.clone(),
                read_only: mount.read_only,
            });
        }
        sandbox::prepare_dirs(paths, &binds)?;
        self.cgroups.create(&spec.id, spec.cpu, spec.memory_gib);
        let launch = sandbox::Launch {
            id: &spec.id,
            env: &spec.env,
            binds: &binds,
            netns: netns.as_ref(),
            cgroup_procs: self.cgroups.procs_files(&spec.id),
        };
        sandbox::launch(launch, paths).await
    }

    /// Adds a volume mount to a running sandbox (hot attach): its processes see the new mount
    /// point at once, as if the sandbox had started with it. `Busy` if the path is taken by
    /// another of its volume mounts.
    pub async fn attach_volume(&self, id: &str, mount: VolumeMountSpec) -> Result<(), RunnerError> {
        validate_mount(&mount)?;
        let _lifecycle = self.lifecycle.lock().await;
        let record = self
            .record(id)
            .ok_or_else(|| RunnerError::NotFound(format!("sandbox {id}")))?;
        if let Some(taken) = record.volumes.iter().find(|bind| {
            let (a, b) = (Path::new(&bind.mount_path), Path::new(&mount.mount_path));
            a.starts_with(b) || b.starts_with(a)
        }) {
            return Err(RunnerError::Busy(format!(
                "{} overlaps the volume mount at {} of sandbox {id}",
                mount.mount_path, taken.mount_path
            )));
        }
        let mounts = Arc::clone(&self.mounts);
        let (source, sandbox_id, init_pid) =
            (mount.volume.clone(), id.to_string(), record.init_pid);
        let (subpath, mount_path, read_only) = (
            mount.subpath.clone(),
            mount.mount_path.clone(),
            mount.read_only,
        );
        let held_before = record.volume_ids().contains(&source.volume_id);
        let others = self.records();
        let bound = tokio::task::spawn_blocking(move || {
            let acquired = mounts.acquire(&source, &sandbox_id)?;
            if acquired.replaced_dead_mount {
                rebind_volume(&mounts, &others, &source.volume_id);
            }
            let bound = mounts::open_volume_dir(&acquired.mount_point, subpath.as_deref())
                .and_then(|dir| {
                    // As at the start: mount points under the home are the user's.
                    let owner = if Path::new(&mount_path).starts_with(sandbox::SANDBOX_HOME) {
                        sandbox::SANDBOX_UID
                    } else {
                        0
                    };
                    mounts::attach_bind(init_pid, &dir, &mount_path, read_only, owner)
                });
            if bound.is_err() && !held_before {
                mounts.release(&source.volume_id, &sandbox_id)?;
            }
            bound
        })
        .await
        .map_err(|err| RunnerError::Io(std::io::Error::other(err)))?;
        bound?;
        let mut updated = (*record).clone();
        updated.volumes.push(sandbox::VolumeBindRecord {
            volume_id: mount.volume.volume_id.clone(),
            mount_path: mount.mount_path.clone(),
            subpath: mount.subpath.clone(),
            read_only: mount.read_only,
        });
        self.save_record(updated)
    }

    /// Removes the volume mount at `mount_path` from a running sandbox (hot detach). `Busy`
    /// while a process of the sandbox uses it (open files, a working directory under it),
    /// unless `force`: then it is cut off (those processes get errors, nothing is lost of what
    /// was written before). The volume's mount on the host goes when no sandbox uses it.
    pub async fn detach_volume(
        &self,
        id: &str,
        mount_path: &str,
        force: bool,
    ) -> Result<(), RunnerError> {
        let _lifecycle = self.lifecycle.lock().await;
        let record = self
            .record(id)
            .ok_or_else(|| RunnerError::NotFound(format!("sandbox {id}")))?;
        let Some(bind) = record
            .volumes
            .iter()
            .find(|bind| bind.mount_path == mount_path)
            .cloned()
        else {
            return Err(RunnerError::NotFound(format!(
                "no volume is mounted at {mount_path} in sandbox {id}"
            )));
        };
        let (init_pid, path) = (record.init_pid, mount_path.to_string());
        tokio::task::spawn_blocking(move || mounts::detach_bind(init_pid, &path, force))
            .await
            .map_err(|err| RunnerError::Io(std::io::Error::other(err)))??;
        let mut updated = (*record).clone();
        updated.volumes.retain(|b| b.mount_path != mount_path);
        let still_used = updated.volume_ids().contains(&bind.volume_id);
        self.save_record(updated)?;
        if !still_used {
            self.release_mounts(id, &[bind.volume_id]).await;
        }
        Ok(())
    }

    /// Persists a changed record of a running sandbox and makes it the current one.
    fn save_record(&self, record: SandboxRecord) -> Result<(), RunnerError> {
        let paths = SandboxPaths::new(&self.sandboxes_dir, &record.id);
        let bytes = serde_json::to_vec_pretty(&record).map_err(std::io::Error::other)?;
        write_atomically(&paths.record, &bytes)?;
        self.sandboxes
            .lock()
            .expect("sandbox table poisoned")
            .insert(record.id.clone(), Arc::new(record));
        Ok(())
    }

    fn records(&self) -> Vec<Arc<SandboxRecord>> {
        self.sandboxes
            .lock()
            .expect("sandbox table poisoned")
            .values()
            .cloned()
            .collect()
    }

    /// Kills every process of the sandbox and releases its mounts. Idempotent.
    pub async fn destroy_sandbox(&self, id: &str) -> Result<(), RunnerError> {
        let _lifecycle = self.lifecycle.lock().await;
        self.teardown(id).await
    }

    /// Kills the sandbox's processes and releases everything it holds; the caller holds the
    /// lifecycle lock.
    async fn teardown(&self, id: &str) -> Result<(), RunnerError> {
        let record = self
            .sandboxes
            .lock()
            .expect("sandbox table poisoned")
            .get(id)
            .cloned();
        let Some(record) = record else {
            return Ok(());
        };
        record.kill().await?;
        self.release_mounts(id, &record.volume_ids()).await;
        self.cgroups.remove(id);
        SandboxPaths::new(&self.sandboxes_dir, id).remove();
        self.sandboxes
            .lock()
            .expect("sandbox table poisoned")
            .remove(id);
        Ok(())
    }

    async fn release_mounts(&self, sandbox_id: &str, volume_ids: &[String]) {
        for volume_id in volume_ids {
            let mounts = Arc::clone(&self.mounts);
            let volume = volume_id.clone();
            let sandbox = sandbox_id.to_owned();
            let released =
                tokio::task::spawn_blocking(move || mounts.release(&volume, &sandbox)).await;
            match released {
                Ok(Ok(())) => {}
                Ok(Err(err)) => tracing::error!(volume_id, "cannot release volume mount: {err}"),
                Err(err) => tracing::error!(volume_id, "cannot release volume mount: {err}"),
            }
        }
    }

    pub fn is_running(&self, id: &str) -> bool {
        self.record(id).is_some()
    }

    /// Ids of the sandboxes whose processes are alive, sorted.
    pub fn running_ids(&self) -> Vec<String> {
        let records: Vec<Arc<SandboxRecord>> = self
            .sandboxes
            .lock()
            .expect("sandbox table poisoned")
            .values()
            .cloned()
            .collect();
        let mut ids: Vec<String> = records
            .iter()
            .filter(|record| record.is_alive())
            .map(|record| record.id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// The record of a sandbox whose processes are alive.
    fn record(&self, id: &str) -> Option<Arc<SandboxRecord>> {
        let record = self
            .sandboxes
            .lock()
            .expect("sandbox table poisoned")
            .get(id)
            .cloned()?;
        record.is_alive().then_some(record)
    }

    fn target(&self, id: &str) -> Result<Arc<SandboxRecord>, RunnerError> {
        self.record(id)
            .ok_or_else(|| RunnerError::NotFound(format!("sandbox {id} is not running")))
    }

    /// Runs a shell line in the sandbox as its user; a non-zero exit is a normal result.
    pub async fn exec(&self, id: &str, req: ExecRequest) -> Result<ExecResult, RunnerError> {
        let record = self.target(id)?;
        let target = toolbox::Target {
            record: &record,
            cgroup_procs: self.cgroups.procs_files(id),
        };
        target.exec(req).await
    }

    /// Writes a file in the sandbox (as its user, parents created), streaming `body`.
    pub async fn upload(
        &self,
        id: &str,
        path: &str,
        body: impl tokio::io::AsyncRead + Unpin + Send,
    ) -> Result<(), RunnerError> {
        let record = self.target(id)?;
        let target = toolbox::Target {
            record: &record,
            cgroup_procs: self.cgroups.procs_files(id),
        };
        target.upload(path, body).await
    }

    /// Streams a file out of the sandbox; NotFound before any byte if it does not exist.
    pub async fn download(&self, id: &str, path: &str) -> Result<FileStream, RunnerError> {
        let record = self.target(id)?;
        let target = toolbox::Target {
            record: &record,
            cgroup_procs: self.cgroups.procs_files(id),
        };
        target.download(path).await
    }

    /// Destroys every sandbox (and so unmounts every volume). For tests and shutdown.
    pub async fn release_all(&self) {
        let ids: Vec<String> = self
            .sandboxes
            .lock()
            .expect("sandbox table poisoned")
            .keys()
            .cloned()
            .collect();
        for id in ids {
            if let Err(err) = self.destroy_sandbox(&id).await {
                tracing::error!(sandbox = %id, "cannot destroy sandbox: {err}");
            }
        }
    }
}

/// Gives the running sandboxes that use a volume binds of its new mount (their binds of the
/// replaced, dead mount answer nothing but ENOTCONN).
fn rebind_volume(mounts: &MountManager, sandboxes: &[Arc<SandboxRecord>], volume_id: &str) {
    let mount_point = mounts.mount_point(volume_id);
    for record in sandboxes {
        for bind in record
            .volumes
            .iter()
            .filter(|bind| bind.volume_id == volume_id)
        {
            let renewed =
                mounts::open_volume_dir(&mount_point, bind.subpath.as_deref()).and_then(|dir| {
                    mounts::replace_bind(record.init_pid, &dir, &bind.mount_path, bind.read_only)
                });
            match renewed {
                Ok(()) => tracing::info!(sandbox = %record.id, volume_id, "renewed volume bind"),
                Err(err) => {
                    tracing::error!(sandbox = %record.id, volume_id, "cannot renew volume bind: {err}")
                }
            }
        }
    }
}

/// How often the runner looks for volume mounts whose daemon died under running sandboxes.
const MOUNT_WATCH_PERIOD: Duration = Duration::from_secs(1);
/// After a failed remount (the store or the database down), the next try of that volume waits
/// this long: sandbox creation must not queue behind remounts that keep failing.
const REMOUNT_BACKOFF: Duration = Duration::from_secs(15);

/// Replaces the mount of a volume in use whose daemon died (a crash, an OOM kill) and renews the
/// binds of the sandboxes that use it, until the runner is dropped: their processes see the
/// volume again within about a second (files they had open on the dead mount stay dead).
fn watch_mounts(
    lifecycle: std::sync::Weak<tokio::sync::Mutex<()>>,
    mounts: std::sync::Weak<MountManager>,
    sandboxes: std::sync::Weak<Mutex<HashMap<String, Arc<SandboxRecord>>>>,
) {
    let mut retry_at: HashMap<String, std::time::Instant> = HashMap::new();
    let spawned = std::thread::Builder::new()
        .name("mount-watch".to_owned())
        .spawn(move || loop {
            std::thread::sleep(MOUNT_WATCH_PERIOD);
            let (Some(lifecycle), Some(mounts), Some(sandboxes)) =
                (lifecycle.upgrade(), mounts.upgrade(), sandboxes.upgrade())
            else {
                return;
            };
            let now = std::time::Instant::now();
            retry_at.retain(|_, at| *at > now);
            let broken = match mounts.broken_volumes() {
                Ok(broken) => broken
                    .into_iter()
                    .filter(|volume_id| !retry_at.contains_key(volume_id))
                    .collect::<Vec<_>>(),
                Err(err) => {
                    tracing::warn!("cannot check the volume mounts: {err}");
                    continue;
                }
            };
            if broken.is_empty() {
                continue;
            }
            // Not while a sandbox is created or destroyed: they change the users of the mounts.
            let _lifecycle = lifecycle.blocking_lock();
            let records: Vec<Arc<SandboxRecord>> = sandboxes
                .lock()
                .expect("sandbox table poisoned")
                .values()
                .cloned()
                .collect();
            for volume_id in broken {
                match mounts.remount(&volume_id) {
                    Ok(true) => rebind_volume(&mounts, &records, &volume_id),
                    Ok(false) => {}
                    Err(err) => {
                        tracing::error!(volume_id, "cannot replace the dead mount: {err}");
                        retry_at.insert(volume_id, std::time::Instant::now() + REMOUNT_BACKOFF);
                    }
                }
            }
        });
    if let Err(err) = spawned {
        tracing::error!("cannot watch the volume mounts: {err}");
    }
}

/// How often the host's addresses are compared with those outbound sandboxes cannot reach when
/// no notification came (the kernel's address notifications wake the watcher at once; the poll
/// covers a lost notification).
const HOST_ADDRESS_POLL: Duration = Duration::from_secs(2);

/// Keeps addresses the host gains (a new interface, a new lease) unreachable from sandboxes
/// that started before, until the runner is dropped.
fn watch_host_addresses(
    sandboxes_dir: PathBuf,
    sandboxes: std::sync::Weak<Mutex<HashMap<String, Arc<SandboxRecord>>>>,
) {
    let events = network::AddressEvents::subscribe()
        .inspect_err(|err| {
            tracing::warn!("no address notifications, polling the host's addresses: {err}")
        })
        .ok();
    let mut known = network::host_addresses();
    let spawned = std::thread::Builder::new()
        .name("host-addresses".to_owned())
        .spawn(move || loop {
            match &events {
                Some(events) => events.wait(HOST_ADDRESS_POLL),
                None => std::thread::sleep(HOST_ADDRESS_POLL),
            }
            let Some(sandboxes) = sandboxes.upgrade() else {
                return;
            };
            let current = network::host_addresses();
            let gained: std::collections::BTreeSet<_> = current.difference(&known).copied().collect();
            known = current;
            if gained.is_empty() {
                continue;
            }
            let outbound: Vec<Arc<SandboxRecord>> = sandboxes
                .lock()
                .expect("sandbox table poisoned")
                .values()
                .filter(|record| matches!(record.network, NetworkPolicy::Outbound { .. }))
                .cloned()
                .collect();
            for record in outbound {
                let netns = SandboxPaths::new(&sandboxes_dir, &record.id).netns;
                if record.is_alive() {
                    if let Err(err) = network::prohibit(&netns, &gained) {
                        tracing::error!(sandbox = %record.id, "cannot block new host addresses: {err}");
                    }
                }
            }
        });
    if let Err(err) = spawned {
        tracing::error!("cannot watch the host's addresses: {err}");
    }
}

fn validate_spec(spec: &SandboxSpec) -> Result<(), RunnerError> {
    let id_ok = !spec.id.is_empty()
        && spec.id.len() <= 128
        && !spec.id.starts_with('.')
        && spec
            .id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !id_ok {
        return Err(RunnerError::InvalidInput(format!(
            "invalid sandbox id {:?}",
            spec.id
        )));
    }
    toolbox::validate_env(&spec.env)?;
    spec.mounts.iter().try_for_each(validate_mount)
}

fn validate_mount(mount: &VolumeMountSpec) -> Result<(), RunnerError> {
    {
        let path = std::path::Path::new(&mount.mount_path);
        let normal = path.is_absolute()
            && path
                .components()
                .all(|c| !matches!(c, std::path::Component::ParentDir));
        if !normal || mount.mount_path == "/" || mount.mount_path.contains('\0') {
            return Err(RunnerError::InvalidInput(format!(
                "invalid mount path {:?}",
                mount.mount_path
            )));
        }
        let volume_id = &mount.volume.volume_id;
        let volume_id_ok = !volume_id.is_empty()
            && !volume_id.starts_with('.')
            && volume_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !volume_id_ok {
            return Err(RunnerError::InvalidInput(format!(
                "invalid volume id {volume_id:?}"
            )));
        }
    }
    Ok(())
}

fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
