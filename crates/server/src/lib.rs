//! cellar-server: the REST API (the Daytona subset that volumes and sandboxes need), the volume
//! and sandbox state machines, organisations and API keys, with an embedded runner for the
//! single-host default.

mod api;
pub mod config;
mod db;
mod error;
mod files;
mod lifecycle;
pub mod runners;
mod validate;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use cellar_runner::{Runner, RunnerConfig};

pub use api::ApiDoc;
pub use config::{ConfigOverrides, ServerConfig};
pub use validate::NAME_RULE;

use crate::db::ControlDb;
use crate::lifecycle::Services;
use crate::runners::{Registry, RunnerHandle};

/// A running server.
pub struct Server {
    addr: SocketAddr,
    base_url: String,
    bootstrap_key: Option<String>,
    shutdown: tokio::sync::oneshot::Sender<()>,
    serving: tokio::task::JoinHandle<std::io::Result<()>>,
    reconciling: tokio::task::JoinHandle<()>,
    watching_runners: tokio::task::JoinHandle<()>,
    closing_idle_volumes: tokio::task::JoinHandle<()>,
    /// The S3 gateway's stop signal and task, when it runs.
    s3_gateway: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<std::io::Result<()>>,
    )>,
    files: Arc<files::VolumeFiles>,
    events: Arc<api::events::EventHub>,
    /// Held while serving: one server per data directory.
    _data_dir_lock: std::fs::File,
}

impl Server {
    /// Opens the data directory, starts the embedded runner, binds and serves; the reconciler
    /// finishes (in the background) whatever a previous run left half done.
    pub async fn start(config: ServerConfig) -> anyhow::Result<Server> {
        export_file_credentials(&config);
        let data_dir_lock = lock_data_dir(&config.data_dir)?;
        let started_at = db::now();
        let location = config.control_location()?;
        let db = tokio::task::spawn_blocking(move || ControlDb::open(&location))
            .await?
            .context("opening the control database")?;
        let runners = Registry::default();
        if config.embedded_runner {
            let runner = Runner::new(RunnerConfig {
                state_dir: config.data_dir.join("runner"),
                cellar_bin: config.cellar_bin.clone(),
            })
            .context("starting the embedded runner")?;
            runners.insert(
                db::EMBEDDED_RUNNER,
                RunnerHandle::Embedded(Arc::new(runner)),
            );
        }
        let capacity = config.embedded_runner.then_some(config.runner_capacity);
        let (bootstrap_key, url_secret) = db
            .run(move |db| {
                let key = db.bootstrap()?;
                let now = db::now_ms();
                db.set_embedded_runner(capacity, now)?;
                db.restart_runner_clocks(now)?;
                let secret = db.server_secret("url_signing", &files::signing::new_secret())?;
                Ok((key, secret))
            })
            .await?;
        let url_secret = hex::decode(url_secret).context("the stored URL signing secret")?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let addr = listener.local_addr()?;
        let base_url = config
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{addr}"));
        let files = Arc::new(files::VolumeFiles::new(files::IDLE_CLOSE_AFTER));
        let services = Arc::new(Services {
            db,
            runners,
            config,
            started_at,
            files: files.clone(),
            signer: files::signing::UrlSigner::new(url_secret),
        });
        let mut state = api::AppState::new(services.clone(), base_url.clone());
        let s3_gateway = match services.config.s3_listen {
            Some(addr) => {
                let s3 = api::gateway::bind(&services, addr).await?;
                state.s3 = Some(s3.settings.clone());
                let (stop_s3, stopped) = tokio::sync::oneshot::channel::<()>();
                let serving = tokio::spawn(api::gateway::serve(services.clone(), s3, async {
                    let _ = stopped.await;
                }));
                Some((stop_s3, serving))
            }
            None => None,
        };
        let closing_idle_volumes = tokio::spawn(files.clone().close_idle_volumes());
        let watching_runners = tokio::spawn(services.clone().watch_runners());
        let reconciling = tokio::spawn(async move {
            if let Err(e) = services.reconcile().await {
                tracing::error!("reconciling interrupted work: {e:#}");
            }
        });
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let events = state.events.clone();
        let app = api::router(state);
        let serving = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stop.await;
                })
                .await
        });
        tracing::info!("serving the Cellar API at {base_url}/api");
        Ok(Server {
            addr,
            base_url,
            bootstrap_key,
            shutdown,
            serving,
            reconciling,
            watching_runners,
            closing_idle_volumes,
            s3_gateway,
            files,
            events,
            _data_dir_lock: data_dir_lock,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://host:port/api`: what DAYTONA_API_URL / CELLAR_API_URL should be set to.
    pub fn api_url(&self) -> String {
        format!("{}/api", self.base_url)
    }

    /// The API key created on the very first start (shown once; only its hash is stored).
    pub fn bootstrap_key(&self) -> Option<&str> {
        self.bootstrap_key.as_deref()
    }

    /// Serves until `signal` completes, then stops accepting requests. Running sandboxes and
    /// their mounts stay up; the next start adopts them.
    pub async fn run_until(
        mut self,
        signal: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        tokio::select! {
            _ = signal => {}
            result = &mut self.serving => return result.context("server task")?.context("serving"),
        }
        self.shutdown().await
    }

    /// Stops serving (in-flight requests finish) and the reconciler; closes the volumes the file
    /// API has open.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(());
        // Event streams never end by themselves: the graceful shutdown would wait for them.
        self.events.close_all();
        self.reconciling.abort();
        self.watching_runners.abort();
        let served = self.serving.await;
        if let Some((stop, serving)) = self.s3_gateway {
            let _ = stop.send(());
            match serving.await {
                Ok(Err(e)) => tracing::error!("S3 gateway: {e}"),
                Err(e) => tracing::error!("S3 gateway task: {e}"),
                Ok(Ok(())) => {}
            }
        }
        self.closing_idle_volumes.abort();
        self.files.close_all().await;
        served.context("server task")?.context("serving")
    }
}

/// Takes `<data dir>/server.lock`, so that a second server cannot run on the same state.
fn lock_data_dir(data_dir: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
    lock_file(&data_dir.join("server.lock"), || {
        format!(
            "another cellar server is running on the data directory {}",
            data_dir.display()
        )
    })
}

/// How long a lock file may look held after its holder let go (see [`lock_file`]).
const LOCK_RELEASE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Takes an exclusive lock on `path` (created), held as long as the file is open.
pub(crate) fn lock_file(
    path: &Path,
    held: impl FnOnce() -> String,
) -> anyhow::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    // A child being forked (a mount daemon, a sandbox) holds a copy of the previous holder's
    // descriptor until it execs, so a lock just released may look held for a moment.
    let deadline = std::time::Instant::now() + LOCK_RELEASE_GRACE;
    // SAFETY: flock on a descriptor we own; the lock goes with the file.
    while unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        if std::time::Instant::now() >= deadline {
            anyhow::bail!(held());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(file)
}

/// Volume maintenance in this process reads the store credentials from the environment; the
/// TOML file's `[s3]` keys fill in what the environment lacks. Called before any request runs.
fn export_file_credentials(config: &ServerConfig) {
    for (name, value) in config.store_env() {
        if std::env::var_os(&name).is_none() {
            // SAFETY-free in edition 2021; done at startup before volume work reads the env.
            std::env::set_var(name, value);
        }
    }
}

fn admin_db(config: &ServerConfig) -> anyhow::Result<ControlDb> {
    ControlDb::open(&config.control_location()?).context("opening the control database")
}

/// `cellar admin org create NAME`: returns the new organisation's id.
pub fn admin_create_org(config: &ServerConfig, name: &str) -> anyhow::Result<String> {
    Ok(admin_db(config)?.create_org(name)?)
}

/// `cellar admin key create --org NAME`: returns the key (shown once; only its hash is stored).
pub fn admin_create_key(config: &ServerConfig, org_name: &str) -> anyhow::Result<String> {
    let db = admin_db(config)?;
    let org_id = db
        .org_id_by_name(org_name)?
        .with_context(|| format!("organization {org_name:?} does not exist"))?;
    Ok(db.create_key(&org_id)?)
}

/// `cellar admin runner-token create`: returns (id, token); the token is shown once, only its
/// hash is stored.
pub fn admin_create_runner_token(
    config: &ServerConfig,
    name: &str,
) -> anyhow::Result<(String, String)> {
    Ok(admin_db(config)?.create_runner_token(name)?)
}

pub use db::{RunnerRow, RunnerTokenRow, CONTROL_SCHEMA};

/// `cellar admin runner list`: every runner the server knows, as last heard of.
pub fn admin_list_runners(config: &ServerConfig) -> anyhow::Result<Vec<RunnerRow>> {
    Ok(admin_db(config)?.list_runners()?)
}

/// `cellar admin runner-token list`.
pub fn admin_list_runner_tokens(config: &ServerConfig) -> anyhow::Result<Vec<RunnerTokenRow>> {
    Ok(admin_db(config)?.list_runner_tokens()?)
}

/// `cellar admin runner-token revoke ID|NAME`: fails if nothing was revoked.
pub fn admin_revoke_runner_token(config: &ServerConfig, id_or_name: &str) -> anyhow::Result<usize> {
    let revoked = admin_db(config)?.revoke_runner_token(id_or_name)?;
    if revoked == 0 {
        anyhow::bail!("no unrevoked runner token has the id or name {id_or_name:?}");
    }
    Ok(revoked)
}
