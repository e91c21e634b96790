//! `cellar runner`: runs the sandboxes a server assigns to this host. It serves the runner
//! operations over HTTP (authenticated with a callback token it makes at start and sends only
//! to the server), registers with the server using its runner token, and heartbeats.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use axum::{Json, Router};
use cellar_runner::{ExecRequest, Runner, RunnerConfig, RunnerError, SandboxSpec, VolumeMountSpec};
use futures::TryStreamExt;
use tokio_util::io::{ReaderStream, StreamReader};

use super::protocol::{
    error_to_wire, DetachQuery, Directive, FileQuery, Heartbeat, Register, HEARTBEAT_INTERVAL,
};

/// How a `cellar runner` is set up.
pub struct AgentConfig {
    /// Base URL of the server (without `/api`).
    pub server_url: String,
    pub token: String,
    pub name: String,
    pub listen: SocketAddr,
    /// Base URL the server reaches this runner at.
    pub advertise: String,
    pub data_dir: PathBuf,
    pub capacity: u32,
    pub cellar_bin: PathBuf,
}

impl std::fmt::Debug for AgentConfig {
    // The token never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("server_url", &self.server_url)
            .field("name", &self.name)
            .field("listen", &self.listen)
            .field("advertise", &self.advertise)
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
struct AgentState {
    runner: Arc<Runner>,
    /// Hash of the callback token: what every call of the server must present.
    callback_hash: String,
}

/// Serves and heartbeats until `signal` completes. Sandboxes keep running after it returns; a
/// restarted runner on the same data directory adopts them.
pub async fn run(
    config: AgentConfig,
    signal: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    let _lock = crate::lock_file(&config.data_dir.join("runner.lock"), || {
        format!(
            "another cellar runner is running on the data directory {}",
            config.data_dir.display()
        )
    })?;
    let instance = instance_id(&config.data_dir)?;
    let runner = Arc::new(
        Runner::new(RunnerConfig {
            state_dir: config.data_dir.join("runner"),
            cellar_bin: config.cellar_bin.clone(),
        })
        .context("starting the runner")?,
    );
    let callback_token = crate::db::generate_key();
    let state = AgentState {
        runner: runner.clone(),
        callback_hash: crate::db::hash_key(&callback_token),
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let app = router(state);
    let serving = tokio::spawn(async move { axum::serve(listener, app).await });
    tracing::info!(
        name = %config.name,
        "runner serving at {} (advertised as {})",
        config.listen,
        config.advertise
    );
    let heartbeats = Heartbeats {
        http: reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(10))
            .build()?,
        server: config.server_url.trim_end_matches('/').to_string(),
        token: config.token,
        register: Register {
            name: config.name,
            instance,
            url: config.advertise,
            capacity: config.capacity,
            callback_token,
            sandboxes: Vec::new(),
        },
        runner,
    };
    tokio::select! {
        _ = signal => {}
        () = heartbeats.run() => {}
        served = serving => { served.context("runner API task")?.context("serving the runner API")?; }
    }
    Ok(())
}

/// A random id kept in the data directory: the same runner after a restart, another one with
/// another data directory (two runners may not share a name).
fn instance_id(data_dir: &std::path::Path) -> anyhow::Result<String> {
    let path = data_dir.join("runner-instance");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_string()),
        Ok(_) => write_instance_id(&path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => write_instance_id(&path),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn write_instance_id(path: &std::path::Path) -> anyhow::Result<String> {
    let id = uuid::Uuid::new_v4().to_string();
    std::fs::write(path, &id).with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}

struct Heartbeats {
    http: reqwest::Client,
    server: String,
    token: String,
    register: Register,
    runner: Arc<Runner>,
}

/// Why a call to the server did not work.
enum CallError {
    /// The server does not know this runner (it restarted, or the runner was replaced).
    Unknown,
    Failed(String),
}

impl Heartbeats {
    /// Registers, then heartbeats every [`HEARTBEAT_INTERVAL`]; registers again whenever the
    /// server does not know the runner. Failures are logged when they start and when they end.
    async fn run(mut self) {
        let mut registered = false;
        let mut failing: Option<String> = None;
        loop {
            let outcome = if registered {
                self.heartbeat().await
            } else {
                self.register().await
            };
            match outcome {
                Ok(directive) => {
                    if let Some(why) = failing.take() {
                        tracing::info!("reached the server again (after: {why})");
                    }
                    if !registered {
                        tracing::info!(server = %self.server, "registered with the server");
                    }
                    registered = true;
                    self.apply(directive);
                }
                Err(CallError::Unknown) => {
                    tracing::info!("the server does not know this runner: registering again");
                    registered = false;
                    continue;
                }
                Err(CallError::Failed(why)) => {
                    if failing.as_deref() != Some(why.as_str()) {
                        tracing::warn!("cannot reach the server: {why}");
                    }
                    failing = Some(why);
                }
            }
            tokio::time::sleep(HEARTBEAT_INTERVAL).await;
        }
    }

    async fn register(&mut self) -> Result<Directive, CallError> {
        self.register.sandboxes = self.runner.running_ids();
        self.call("register", &self.register).await
    }

    async fn heartbeat(&self) -> Result<Directive, CallError> {
        let beat = Heartbeat {
            name: self.register.name.clone(),
            instance: self.register.instance.clone(),
            capacity: self.register.capacity,
            sandboxes: self.runner.running_ids(),
        };
        self.call("heartbeat", &beat).await
    }

    async fn call(&self, what: &str, body: &impl serde::Serialize) -> Result<Directive, CallError> {
        let url = format!("{}/runner-api/v1/{what}", self.server);
        let response = self
            .http
            .post(&url)
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .map_err(|e| CallError::Failed(format!("{what}: {e}")))?;
        let status = response.status();
        if status == StatusCode::NOT_FOUND {
            return Err(CallError::Unknown);
        }
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_string))
                .unwrap_or(text);
            return Err(CallError::Failed(format!("{what}: {status}: {message}")));
        }
        response
            .json()
            .await
            .map_err(|e| CallError::Failed(format!("{what}: {e}")))
    }

    /// Destroys what the server no longer wants, off the heartbeat's path.
    fn apply(&self, directive: Directive) {
        for id in directive.destroy {
            let runner = self.runner.clone();
            tokio::spawn(async move {
                tracing::info!(sandbox = %id, "destroying a sandbox the server no longer wants");
                if let Err(e) = runner.destroy_sandbox(&id).await {
                    tracing::error!(sandbox = %id, "destroying the sandbox failed: {e}");
                }
            });
        }
    }
}

fn router(state: AgentState) -> Router {
    Router::new()
        .route("/v1/sandboxes", post(create))
        .route("/v1/sandboxes/{id}", delete(destroy))
        .route("/v1/sandboxes/{id}/exec", post(exec))
        .route(
            "/v1/sandboxes/{id}/mounts",
            post(attach_volume).delete(detach_volume),
        )
        .route(
            "/v1/sandboxes/{id}/file",
            axum::routing::put(upload).get(download),
        )
        .layer(axum::extract::DefaultBodyLimit::disable())
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .with_state(state)
}

async fn authenticate(State(state): State<AgentState>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::api::bearer_key)
        .map(crate::db::hash_key);
    if presented.as_deref() != Some(state.callback_hash.as_str()) {
        return (
            StatusCode::UNAUTHORIZED,
            "the server's callback token is required",
        )
            .into_response();
    }
    next.run(request).await
}

/// A runner error as the wire carries it.
struct Failure(RunnerError);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let (status, body) = error_to_wire(self.0);
        (status, Json(body)).into_response()
    }
}

impl From<RunnerError> for Failure {
    fn from(err: RunnerError) -> Failure {
        Failure(err)
    }
}

async fn create(
    State(state): State<AgentState>,
    Json(spec): Json<SandboxSpec>,
) -> Result<StatusCode, Failure> {
    let id = spec.id.clone();
    state.runner.create_sandbox(spec).await?;
    tracing::info!(sandbox = %id, "sandbox started");
    Ok(StatusCode::NO_CONTENT)
}

async fn destroy(
    State(state): State<AgentState>,
    Path(id): Path<String>,
) -> Result<StatusCode, Failure> {
    state.runner.destroy_sandbox(&id).await?;
    tracing::info!(sandbox = %id, "sandbox destroyed");
    Ok(StatusCode::NO_CONTENT)
}

async fn attach_volume(
    State(state): State<AgentState>,
    Path(id): Path<String>,
    Json(mount): Json<VolumeMountSpec>,
) -> Result<StatusCode, Failure> {
    state.runner.attach_volume(&id, mount).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn detach_volume(
    State(state): State<AgentState>,
    Path(id): Path<String>,
    Query(query): Query<DetachQuery>,
) -> Result<StatusCode, Failure> {
    state
        .runner
        .detach_volume(&id, &query.path, query.force)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn exec(
    State(state): State<AgentState>,
    Path(id): Path<String>,
    Json(request): Json<ExecRequest>,
) -> Result<Response, Failure> {
    Ok(Json(state.runner.exec(&id, request).await?).into_response())
}

async fn upload(
    State(state): State<AgentState>,
    Path(id): Path<String>,
    Query(query): Query<FileQuery>,
    body: Body,
) -> Result<StatusCode, Failure> {
    let reader = StreamReader::new(body.into_data_stream().map_err(std::io::Error::other));
    state.runner.upload(&id, &query.path, reader).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn download(
    State(state): State<AgentState>,
    Path(id): Path<String>,
    Query(query): Query<FileQuery>,
) -> Result<Response, Failure> {
    let file = state.runner.download(&id, &query.path).await?;
    Ok(Body::from_stream(ReaderStream::new(file)).into_response())
}
