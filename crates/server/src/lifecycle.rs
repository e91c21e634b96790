//! State transitions that do real work: provisioning and deleting volumes, starting and destroying
//! sandboxes. Each runs as its own task so it finishes even when the client that asked goes away;
//! the reconciler runs the same steps at startup for whatever a crash interrupted.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use cellar_runner::{NetworkPolicy, RunnerError, SandboxSpec, VolumeMountSpec, VolumeSource};
use cellar_vfs::VolumeConfig;

use crate::config::ServerConfig;
use crate::db::{sandbox_state, volume_kind, volume_state, ControlDb, SandboxRow, EMBEDDED_RUNNER};
use crate::runners::{Registry, RunnerHandle};

/// What the lifecycle tasks and the API handlers share.
pub struct Services {
    pub db: ControlDb,
    /// The runners this process can call: the embedded one, and those that registered.
    pub runners: Registry,
    pub config: ServerConfig,
    /// When this process started (RFC 3339, like the rows' timestamps): the reconciler leaves
    /// newer work to the tasks doing it.
    pub started_at: String,
    /// The volumes the file API has open.
    pub files: Arc<crate::files::VolumeFiles>,
    /// Signs and checks the file API's signed URLs.
    pub signer: crate::files::signing::UrlSigner,
}

/// Memory budget of the block cache used by volume maintenance in the server process.
const MAINTENANCE_CACHE_BYTES: u64 = 64 << 20;

impl Services {
    fn volume_db_path(&self, volume_id: &str) -> PathBuf {
        self.config
            .data_dir
            .join("volumes")
            .join(format!("{volume_id}.db"))
    }

    /// A volume's metadata URL: `<database>?volume=<id>` with PostgreSQL (control state and
    /// metadata share the database), else its SQLite file in the data directory.
    fn volume_meta_url(&self, volume_id: &str) -> String {
        match &self.config.database {
            Some(url) => {
                let separator = if url.0.contains('?') { '&' } else { '?' };
                format!("{}{separator}volume={volume_id}", url.0)
            }
            None => format!("sqlite://{}", self.volume_db_path(volume_id).display()),
        }
    }

    pub(crate) fn volume_config(&self, volume_id: &str) -> VolumeConfig {
        VolumeConfig {
            meta_url: self.volume_meta_url(volume_id),
            store_url: self.config.store_url.clone(),
            volume: volume_id.to_string(),
            cache_mem_bytes: MAINTENANCE_CACHE_BYTES,
            cache_dir: None,
            cache_disk_bytes: 0,
            mount_point: String::new(),
            store_timeouts: Default::default(),
        }
    }

    fn volume_source(&self, volume_id: &str) -> VolumeSource {
        let config = self.volume_config(volume_id);
        VolumeSource {
            volume_id: volume_id.to_string(),
            meta_url: config.meta_url,
            store_url: config.store_url,
            volume_name: config.volume,
            store_env: self.config.store_env(),
        }
    }

    /// What a runner needs to mount a volume into a sandbox.
    pub(crate) fn mount_spec(&self, mount: &crate::db::MountRow) -> VolumeMountSpec {
        VolumeMountSpec {
            volume: self.volume_source(&mount.volume_id),
            mount_path: mount.mount_path.clone(),
            subpath: mount.subpath.clone(),
            read_only: mount.read_only,
        }
    }

    /// Whether runners on other hosts can mount the volumes: not while their metadata is in
    /// SQLite files on the server's disk.
    pub fn volumes_reach_other_hosts(&self) -> bool {
        self.config.database.is_some()
    }

    /// The runner a sandbox is scheduled on, if this process can call it.
    pub fn runner(&self, name: &str) -> Result<Arc<RunnerHandle>, RunnerError> {
        self.runners
            .get(name)
            .ok_or_else(|| RunnerError::Unavailable(format!("runner {name} is not connected")))
    }

    /// Formats a volume in `creating`, gives it the byte quota it was created with, and makes it
    /// `ready` (or `error` with the reason).
    pub async fn provision_volume(self: &Arc<Self>, volume_id: String) {
        let config = self.volume_config(&volume_id);
        let volumes_dir = self.config.data_dir.join("volumes");
        let db = self.db.clone();
        let id = volume_id.clone();
        let services = self.clone();
        let outcome = run_blocking(move || {
            let row = db
                .volume_by_id_in_any_org(&id)
                .context("reading the volume's row")?
                .context("the volume's row is gone")?;
            std::fs::create_dir_all(&volumes_dir)
                .with_context(|| format!("creating {}", volumes_dir.display()))?;
            if let Some(origin) = &row.origin_id {
                // A fork or snapshot: the origin's metadata (and quota) copied, objects shared.
                let read_only = row.kind == volume_kind::SNAPSHOT;
                let started = std::time::Instant::now();
                let stats = cellar_vfs::maintenance::fork(
                    &services.volume_config(origin),
                    &config,
                    read_only,
                )?;
                tracing::info!(volume = %id, origin = %origin, inodes = stats.inodes,
                    slices = stats.slices, ms = started.elapsed().as_millis() as u64,
                    "volume forked");
                return Ok(());
            }
            cellar_vfs::maintenance::format(&config)?;
            if row.quota_bytes.is_some() {
                cellar_vfs::maintenance::set_quota(&config, row.quota_bytes)?;
            }
            Ok(())
        })
        .await;
        match outcome {
            Ok(()) => {
                self.move_volume(
                    &volume_id,
                    &[volume_state::CREATING],
                    volume_state::READY,
                    None,
                )
                .await
            }
            Err(e) => {
                let reason = format!("formatting the volume failed: {e:#}");
                self.move_volume(
                    &volume_id,
                    &[volume_state::CREATING],
                    volume_state::ERROR,
                    Some(reason),
                )
                .await
            }
        }
    }

    /// Deletes every object and the metadata of a volume in `pending_delete`/`deleting`, then
    /// marks it `deleted` (its name is free again).
    pub async fn delete_volume(self: &Arc<Self>, volume_id: String) {
        const DELETING: &[&str] = &[volume_state::PENDING_DELETE, volume_state::DELETING];
        self.move_volume(&volume_id, DELETING, volume_state::DELETING, None)
            .await;
        // The file API's instance of the volume goes first: nothing may write while it goes.
        self.files.retire(&volume_id).await;
        let services = self.clone();
        let id = volume_id.clone();
        let outcome = run_blocking(move || services.remove_volume_data(&id)).await;
        match outcome {
            Ok(()) => {
                self.move_volume(
                    &volume_id,
                    &[volume_state::DELETING],
                    volume_state::DELETED,
                    None,
                )
                .await
            }
            Err(e) => {
                let reason = format!("deleting the volume failed: {e:#}");
                self.move_volume(
                    &volume_id,
                    &[volume_state::DELETING],
                    volume_state::ERROR,
                    Some(reason),
                )
                .await
            }
        }
    }

    /// Removes a deleted volume's objects and metadata (objects first, the metadata last, so a
    /// retry after a crash still finds what is left), unless forks or snapshots still share
    /// them: then they stay, out of sight, until the last of those is deleted. A fork first
    /// releases its origin's objects; when the origin was deleted before and this was its last
    /// fork, the origin's data goes too (and so on up the lineage).
    fn remove_volume_data(&self, volume_id: &str) -> anyhow::Result<()> {
        let mut id = volume_id.to_string();
        loop {
            let config = self.volume_config(&id);
            let forks = cellar_vfs::maintenance::forks(&config)?;
            if !forks.is_empty() {
                tracing::info!(volume = %id, forks = ?forks, "volume data kept for its forks");
                return Ok(());
            }
            let origin = self
                .db
                .volume_by_id_in_any_org(&id)?
                .and_then(|row| row.origin_id);
            if let Some(origin) = &origin {
                cellar_vfs::maintenance::release_fork(&self.volume_config(origin), &id)?;
            }
            cellar_vfs::maintenance::destroy(&config)?;
            match origin {
                Some(origin)
                    if self
                        .db
                        .volume_by_id_in_any_org(&origin)?
                        .is_some_and(|row| row.state == volume_state::DELETED) =>
                {
                    id = origin
                }
                _ => return Ok(()),
            }
        }
    }

    async fn move_volume(
        &self,
        volume_id: &str,
        from: &'static [&'static str],
        to: &'static str,
        error: Option<String>,
    ) {
        let (id, reason) = (volume_id.to_string(), error.clone());
        let moved = self
            .db
            .run(move |db| db.transition_volume(&id, from, to, reason.as_deref()))
            .await;
        match moved {
            Ok(true) if to == volume_state::ERROR => {
                tracing::warn!(volume = %volume_id, "volume error: {}", error.unwrap_or_default())
            }
            Ok(true) => tracing::info!(volume = %volume_id, "volume {to}"),
            Ok(false) => tracing::debug!(volume = %volume_id, "volume left {from:?} meanwhile"),
            Err(e) => tracing::error!(volume = %volume_id, "recording volume state {to}: {e}"),
        }
    }

    /// Moves a sandbox to `to` if it is in one of `from` (see `ControlDb::transition_sandbox`).
    async fn move_sandbox(
        &self,
        id: &str,
        from: &'static [&'static str],
        to: &'static str,
        error: Option<String>,
    ) -> crate::db::DbResult<bool> {
        let id = id.to_string();
        self.db
            .run(move |db| db.transition_sandbox(&id, from, to, error.as_deref()))
            .await
    }

    /// Starts a sandbox in `creating` with the runner: `started`, or `error` with the reason. If
    /// the sandbox was deleted meanwhile, destroys what was started. Returns the runner's error,
    /// for a caller that can still answer its client with it.
    pub async fn start_sandbox(self: &Arc<Self>, sandbox: SandboxRow) -> Result<(), RunnerError> {
        let spec = SandboxSpec {
            id: sandbox.id.clone(),
            env: sandbox.settings.env.clone(),
            mounts: sandbox.mounts.iter().map(|m| self.mount_spec(m)).collect(),
            cpu: u32::try_from(sandbox.settings.cpu).unwrap_or(u32::MAX),
            memory_gib: u32::try_from(sandbox.settings.memory).unwrap_or(u32::MAX),
            network: if sandbox.settings.network_block_all {
                NetworkPolicy::Isolated
            } else {
                NetworkPolicy::Outbound {
                    allow: sandbox.settings.network_allow_list.clone(),
                }
            },
        };
        let id = sandbox.id;
        let runner_id = sandbox.runner_id;
        let started = match self.runner(&runner_id) {
            Ok(runner) => runner.create_sandbox(spec).await,
            Err(e) => Err(e),
        };
        let (to, error) = match &started {
            Ok(()) => (sandbox_state::STARTED, None),
            Err(e) => {
                tracing::warn!(sandbox = %id, "starting the sandbox failed: {e}");
                (
                    sandbox_state::ERROR,
                    Some(format!("starting the sandbox failed: {e}")),
                )
            }
        };
        match self
            .move_sandbox(&id, &[sandbox_state::CREATING], to, error)
            .await
        {
            Ok(true) => tracing::info!(sandbox = %id, "sandbox {to}"),
            // Deleted while starting: the delete left the destroying to us.
            Ok(false) => self.destroy_sandbox(id, runner_id).await,
            Err(e) => tracing::error!(sandbox = %id, "recording sandbox state: {e}"),
        }
        started
    }

    /// Destroys a sandbox in `destroying` and marks it `destroyed`.
    pub async fn destroy_sandbox(self: &Arc<Self>, id: String, runner_id: String) {
        let destroyed = match self.runner(&runner_id) {
            Ok(runner) => runner.destroy_sandbox(&id).await,
            Err(e) => Err(e),
        };
        let (to, error) = match destroyed {
            Ok(()) | Err(RunnerError::NotFound(_)) => (sandbox_state::DESTROYED, None),
            // A remote runner that cannot do it now destroys the sandbox when it next reports
            // it: the server no longer wants it.
            Err(RunnerError::Unavailable(why)) if runner_id != EMBEDDED_RUNNER => {
                tracing::warn!(
                    sandbox = %id,
                    "runner {runner_id} cannot destroy the sandbox now ({why}); it will once it reports it"
                );
                (sandbox_state::DESTROYED, None)
            }
            Err(e) => {
                tracing::warn!(sandbox = %id, "destroying the sandbox failed: {e}");
                (
                    sandbox_state::ERROR,
                    Some(format!("destroying the sandbox failed: {e}")),
                )
            }
        };
        match self
            .move_sandbox(&id, &[sandbox_state::DESTROYING], to, error)
            .await
        {
            Ok(_) => tracing::info!(sandbox = %id, "sandbox {to}"),
            Err(e) => tracing::error!(sandbox = %id, "recording sandbox state: {e}"),
        }
    }

    /// Marks runners that missed their heartbeats lost (and their sandboxes with them), for as
    /// long as the server runs.
    pub async fn watch_runners(self: Arc<Self>) {
        let timeout = self.config.runner_timeout;
        let timeout_ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
        // Detection lags the timeout by at most a tenth of it (and at most 250 ms).
        let period = (timeout / 10).clamp(
            std::time::Duration::from_millis(10),
            std::time::Duration::from_millis(250),
        );
        let mut ticks = tokio::time::interval(period);
        loop {
            ticks.tick().await;
            let now = crate::db::now_ms();
            let lost = self
                .db
                .run(move |db| db.mark_lost_runners(now, timeout_ms))
                .await;
            match lost {
                Ok(lost) => {
                    for runner in lost {
                        tracing::warn!(
                            runner = %runner.id,
                            "runner lost: no heartbeat for {} ms (timeout {} ms); {} sandbox(es) marked lost",
                            now - runner.last_heartbeat_ms,
                            timeout_ms,
                            runner.sandboxes
                        );
                    }
                }
                Err(e) => tracing::error!("checking runner heartbeats: {e}"),
            }
        }
    }

    /// Finishes whatever a previous run of the server left half done.
    pub async fn reconcile(self: &Arc<Self>) -> anyhow::Result<()> {
        let db = &self.db;
        for volume in db
            .run(|db| db.volumes_in_states(&[volume_state::CREATING]))
            .await?
        {
            tracing::info!(volume = %volume.id, "resuming provisioning");
            self.provision_volume(volume.id).await;
        }
        let deleting = |db: &ControlDb| {
            db.volumes_in_states(&[volume_state::PENDING_DELETE, volume_state::DELETING])
        };
        for volume in db.run(deleting).await? {
            tracing::info!(volume = %volume.id, "resuming deletion");
            self.delete_volume(volume.id).await;
        }
        for sandbox in db
            .run(|db| db.sandboxes_in_state(sandbox_state::DESTROYING))
            .await?
        {
            tracing::info!(sandbox = %sandbox.id, "resuming destruction");
            self.destroy_sandbox(sandbox.id, sandbox.runner_id).await;
        }
        let interrupted = db
            .run(|db| db.sandboxes_in_state(sandbox_state::CREATING))
            .await?
            .into_iter()
            .filter(|sandbox| sandbox.created_at < self.started_at);
        for sandbox in interrupted {
            let embedded = match self.runners.get(&sandbox.runner_id) {
                Some(runner) if sandbox.runner_id == EMBEDDED_RUNNER => runner,
                // A remote runner reports the sandbox if it got to start it, and then destroys it.
                _ => {
                    let reason = "the server restarted while the sandbox was being created";
                    tracing::warn!(sandbox = %sandbox.id, "{reason}");
                    self.move_sandbox(
                        &sandbox.id,
                        &[sandbox_state::CREATING],
                        sandbox_state::ERROR,
                        Some(reason.to_string()),
                    )
                    .await?;
                    continue;
                }
            };
            tracing::info!(sandbox = %sandbox.id, "restarting interrupted creation");
            // Whatever the runner got to before the crash goes first.
            if let Err(e) = embedded.destroy_sandbox(&sandbox.id).await {
                if !matches!(e, RunnerError::NotFound(_)) {
                    tracing::warn!(sandbox = %sandbox.id, "cleaning up before restart: {e}");
                }
            }
            // A failure is recorded in the sandbox's state.
            let _ = self.start_sandbox(sandbox).await;
        }
        if let Some(RunnerHandle::Embedded(runner)) = self.runners.get(EMBEDDED_RUNNER).as_deref() {
            const SETTLED: [&[&str]; 2] = [&[sandbox_state::STARTED], &[sandbox_state::LOST]];
            for from in SETTLED {
                let listed = db
                    .run(move |db| db.sandboxes_on_runner(EMBEDDED_RUNNER, from[0]))
                    .await?;
                for sandbox in listed {
                    // Asked after listing: a sandbox started meanwhile is running by now.
                    let (to, reason) = if runner.is_running(&sandbox.id) {
                        (sandbox_state::STARTED, None)
                    } else {
                        let reason = "the sandbox is no longer running (its host restarted)";
                        tracing::warn!(sandbox = %sandbox.id, "{reason}");
                        (sandbox_state::ERROR, Some(reason.to_string()))
                    };
                    self.move_sandbox(&sandbox.id, from, to, reason).await?;
                }
            }
        }
        Ok(())
    }
}

/// Runs blocking volume maintenance on a blocking thread of the server's runtime (the vfs drives
/// its store calls on that same runtime: one runtime per process).
async fn run_blocking<T: Send + 'static>(
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    match tokio::task::spawn_blocking(work).await {
        Ok(outcome) => outcome,
        Err(e) if e.is_panic() => {
            let panic = e.into_panic();
            let message = panic
                .downcast_ref::<&str>()
                .map(|m| m.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(anyhow::anyhow!("volume maintenance panicked: {message}"))
        }
        Err(e) => Err(anyhow::anyhow!("volume maintenance was cancelled: {e}")),
    }
}
