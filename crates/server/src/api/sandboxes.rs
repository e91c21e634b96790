//! `/api/sandbox`: create (with volume mounts), get, list, delete, toolbox-proxy-url.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::extract::{ApiJson, ApiPath, ApiQuery};
use super::{blocking, AppState, Org};
use crate::db::{
    sandbox_state, volume_state, MountRow, Placement, SandboxRow, SandboxSettings, PIN_LABEL,
};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::validate::{
    parse_allow_list, validate_env, validate_mount_path, validate_mount_set, validate_sandbox_name,
    validate_subpath,
};
use cellar_runner::RunnerError;

/// Defaults for what the create request leaves out (Daytona's defaults).
const DEFAULT_USER: &str = "daytona";
const DEFAULT_SNAPSHOT: &str = "cellar-host";
const DEFAULT_CPU: i64 = 1;
const DEFAULT_MEMORY_GIB: i64 = 1;
/// Upper bounds of the cgroup limits (far beyond any host).
const MAX_CPU: i64 = 1024;
const MAX_MEMORY_GIB: i64 = 1 << 20;
/// Budget of all labels (keys and values).
const MAX_LABELS_BYTES: usize = 64 << 10;
/// The single-host runner's target name.
const TARGET: &str = "local";
/// How long `POST /sandbox` waits for the sandbox to start before answering `creating`
/// (clients then poll); below the clients' default 60 s request timeout.
const START_WAIT: Duration = Duration::from_secs(50);
/// How long sandbox creation waits for a volume that is still being provisioned.
const VOLUME_READY_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxVolume {
    /// Volume id or name (resolved to the id on create).
    pub volume_id: String,
    pub mount_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subpath: Option<String>,
    #[serde(default)]
    pub read_only: Option<bool>,
}

/// Daytona's create body. Fields Cellar cannot honour are refused (400 naming the field) unless
/// they carry their "off" value; unknown fields are ignored.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct CreateSandbox {
    pub name: Option<String>,
    /// Only the default snapshot, `cellar-host`.
    pub snapshot: Option<String>,
    /// Only `daytona` (uid 1000), the user every sandbox process runs as.
    pub user: Option<String>,
    /// POSIX names; values without NUL; `PATH`, if set, not empty.
    pub env: Option<BTreeMap<String, String>>,
    pub labels: Option<BTreeMap<String, String>>,
    /// Only false: there are no preview URLs.
    pub public: Option<bool>,
    /// Only the loopback interface (refused together with `networkAllowList`).
    pub network_block_all: Option<bool>,
    /// Comma-separated CIDRs outbound connections may reach, e.g. `10.0.0.0/8,192.168.1.0/24`.
    pub network_allow_list: Option<String>,
    /// Only empty.
    pub domain_allow_list: Option<String>,
    /// Only empty.
    pub outbound_proxy_url: Option<String>,
    /// Only empty.
    pub otel_endpoint_override: Option<String>,
    /// Only `local`, the single host.
    pub target: Option<String>,
    /// CPU cores (a cgroup quota; 0: no limit).
    #[schema(minimum = 0)]
    pub cpu: Option<i64>,
    /// Only 0: there are no GPUs.
    #[schema(minimum = 0)]
    pub gpu: Option<i64>,
    /// Only empty.
    #[schema(value_type = Option<Vec<String>>)]
    pub gpu_type: Option<serde_json::Value>,
    /// Only false.
    pub spot: Option<bool>,
    /// Only false.
    pub kvm: Option<bool>,
    /// Memory in GiB (a cgroup limit; 0: no limit).
    #[schema(minimum = 0)]
    pub memory: Option<i64>,
    /// Only 0: disk space is not limited per sandbox.
    #[schema(minimum = 0)]
    pub disk: Option<i64>,
    /// Only 0: sandboxes are never stopped automatically.
    pub auto_stop_interval: Option<i64>,
    /// Only 0.
    pub auto_pause_interval: Option<i64>,
    /// Only 0.
    pub auto_archive_interval: Option<i64>,
    /// Accepted without effect: a sandbox is never stopped, so never deleted after a stop.
    pub auto_delete_interval: Option<i64>,
    /// Only 0: sandboxes live until deleted.
    pub ttl_minutes: Option<i64>,
    /// Accepted without effect: sandboxes start at once, never queued.
    pub queue_timeout: Option<i64>,
    pub volumes: Option<Vec<SandboxVolume>>,
    /// Refused: only the default snapshot exists.
    #[schema(value_type = Option<Object>)]
    pub build_info: Option<serde_json::Value>,
    /// Refused: there is a single host.
    pub linked_sandbox: Option<String>,
    /// Only empty.
    #[schema(value_type = Option<Vec<Object>>)]
    pub secrets: Option<serde_json::Value>,
}

/// A sandbox as Daytona's clients expect it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxDto {
    pub id: String,
    pub organization_id: String,
    pub name: String,
    pub snapshot: String,
    pub user: String,
    pub env: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub public: bool,
    pub network_block_all: bool,
    /// The allowed networks as given (normalised), or null for no list.
    pub network_allow_list: Option<String>,
    pub kvm: bool,
    pub target: String,
    pub cpu: i64,
    pub gpu: i64,
    pub memory: i64,
    pub disk: i64,
    /// creating, started, destroying, destroyed or error (also when its runner is lost).
    pub state: String,
    pub desired_state: String,
    pub error_reason: Option<String>,
    pub volumes: Vec<SandboxVolume>,
    pub created_at: String,
    pub updated_at: String,
    pub toolbox_proxy_url: String,
    /// The runner the sandbox is scheduled on (pin one with the label `cellar.io/runner`).
    pub runner_id: String,
}

/// The state Daytona's clients see: a sandbox whose runner is lost is an error (with the reason).
pub fn api_state(state: &str) -> &str {
    match state {
        sandbox_state::LOST => sandbox_state::ERROR,
        other => other,
    }
}

impl SandboxDto {
    fn new(row: SandboxRow, toolbox_url: &str) -> SandboxDto {
        let desired_state = match row.state.as_str() {
            sandbox_state::DESTROYING | sandbox_state::DESTROYED => "destroyed",
            _ => "started",
        };
        SandboxDto {
            id: row.id,
            organization_id: row.org_id,
            name: row.name,
            snapshot: row.settings.snapshot,
            user: row.settings.user,
            env: row.settings.env,
            labels: row.settings.labels,
            public: row.settings.public,
            network_block_all: row.settings.network_block_all,
            network_allow_list: (!row.settings.network_allow_list.is_empty()).then(|| {
                let networks: Vec<String> = row
                    .settings
                    .network_allow_list
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                networks.join(",")
            }),
            kvm: false,
            target: TARGET.to_string(),
            cpu: row.settings.cpu,
            gpu: row.settings.gpu,
            memory: row.settings.memory,
            disk: row.settings.disk,
            state: api_state(&row.state).to_string(),
            desired_state: desired_state.to_string(),
            error_reason: row.error_reason,
            volumes: row
                .mounts
                .into_iter()
                .map(|m| SandboxVolume {
                    volume_id: m.volume_id,
                    mount_path: m.mount_path,
                    subpath: m.subpath,
                    read_only: Some(m.read_only),
                })
                .collect(),
            created_at: row.created_at,
            updated_at: row.updated_at,
            toolbox_proxy_url: toolbox_url.to_string(),
            runner_id: row.runner_id,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxList {
    pub items: Vec<SandboxDto>,
    /// Pass as `cursor` to fetch the next page; null on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", default)]
pub struct ListSandboxesQuery {
    /// Opaque cursor from a previous page's `nextCursor`.
    pub cursor: Option<String>,
    /// Page size (default 100).
    pub limit: Option<usize>,
    pub id: Option<String>,
    pub name: Option<String>,
    /// JSON object of labels every listed sandbox carries.
    pub labels: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ToolboxProxyUrl {
    pub url: String,
}

fn not_found(key: &str) -> ApiError {
    ApiError::not_found(format!("sandbox {key} not found"))
}

/// A cgroup limit: `default` when absent, else within 0..=max.
fn limit(value: Option<i64>, default: i64, max: i64, field: &str) -> ApiResult<i64> {
    match value {
        Some(v) if !(0..=max).contains(&v) => Err(ApiError::bad_request(format!(
            "{field} must be between 0 (no limit) and {max}"
        ))),
        Some(v) => Ok(v),
        None => Ok(default),
    }
}

/// Refuses a field Cellar cannot honour unless it has its "off" value.
fn refuse_unless(off: bool, field: &str, why: &str) -> ApiResult<()> {
    if off {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!("{field}: {why}")))
    }
}

fn is_empty_json(value: &Option<serde_json::Value>) -> bool {
    match value {
        None | Some(serde_json::Value::Null) => true,
        Some(serde_json::Value::Array(items)) => items.is_empty(),
        Some(serde_json::Value::String(text)) => text.is_empty(),
        Some(_) => false,
    }
}

/// Checks every field of the create body but the mounts; returns the settings to store.
fn validate_settings(body: &CreateSandbox) -> ApiResult<SandboxSettings> {
    let unset = |text: &Option<String>| text.as_deref().is_none_or(|t| t.trim().is_empty());
    if let Some(name) = body.name.as_deref() {
        validate_sandbox_name(name).map_err(ApiError::bad_request)?;
    }
    let snapshot = body.snapshot.as_deref().unwrap_or(DEFAULT_SNAPSHOT);
    refuse_unless(
        snapshot == DEFAULT_SNAPSHOT,
        "snapshot",
        &format!("only the default snapshot {DEFAULT_SNAPSHOT:?} exists"),
    )?;
    let user = body.user.as_deref().unwrap_or(DEFAULT_USER);
    refuse_unless(
        user == DEFAULT_USER,
        "user",
        &format!("sandbox processes always run as {DEFAULT_USER:?}"),
    )?;
    refuse_unless(
        body.target.as_deref().is_none_or(|t| t == TARGET),
        "target",
        &format!("the only target is {TARGET:?}"),
    )?;
    let env = body.env.clone().unwrap_or_default();
    validate_env("env", &env).map_err(ApiError::bad_request)?;
    let labels = body.labels.clone().unwrap_or_default();
    if let Some(runner) = labels.get(PIN_LABEL) {
        crate::validate::validate_runner_name(runner)
            .map_err(|why| ApiError::bad_request(format!("labels.{PIN_LABEL}: {why}")))?;
    }
    let label_bytes: usize = labels.iter().map(|(k, v)| k.len() + v.len()).sum();
    refuse_unless(
        label_bytes <= MAX_LABELS_BYTES,
        "labels",
        &format!("at most {MAX_LABELS_BYTES} bytes in all"),
    )?;
    refuse_unless(
        body.public != Some(true),
        "public",
        "there are no preview URLs",
    )?;
    refuse_unless(body.gpu.unwrap_or(0) == 0, "gpu", "there are no GPUs")?;
    refuse_unless(
        is_empty_json(&body.gpu_type),
        "gpuType",
        "there are no GPUs",
    )?;
    refuse_unless(body.spot != Some(true), "spot", "there are no GPUs")?;
    refuse_unless(body.kvm != Some(true), "kvm", "KVM is not available")?;
    refuse_unless(
        body.disk.unwrap_or(0) == 0,
        "disk",
        "disk space is not limited per sandbox",
    )?;
    let never_stopped = "sandboxes are never stopped, paused or archived automatically";
    refuse_unless(
        body.auto_stop_interval.unwrap_or(0) == 0,
        "autoStopInterval",
        never_stopped,
    )?;
    refuse_unless(
        body.auto_pause_interval.unwrap_or(0) == 0,
        "autoPauseInterval",
        never_stopped,
    )?;
    refuse_unless(
        body.auto_archive_interval.unwrap_or(0) == 0,
        "autoArchiveInterval",
        never_stopped,
    )?;
    refuse_unless(
        body.ttl_minutes.unwrap_or(0) == 0,
        "ttlMinutes",
        "sandboxes live until they are deleted",
    )?;
    refuse_unless(
        unset(&body.domain_allow_list),
        "domainAllowList",
        "only networkAllowList (CIDRs) is supported",
    )?;
    refuse_unless(
        unset(&body.outbound_proxy_url),
        "outboundProxyUrl",
        "outbound proxies are not supported",
    )?;
    refuse_unless(
        unset(&body.otel_endpoint_override),
        "otelEndpointOverride",
        "there is no telemetry",
    )?;
    refuse_unless(
        is_empty_json(&body.build_info),
        "buildInfo",
        &format!("images cannot be built; only the snapshot {DEFAULT_SNAPSHOT:?} exists"),
    )?;
    refuse_unless(
        unset(&body.linked_sandbox),
        "linkedSandbox",
        "there is a single host",
    )?;
    refuse_unless(
        is_empty_json(&body.secrets),
        "secrets",
        "there is no secret store",
    )?;
    let network_allow_list =
        parse_allow_list(body.network_allow_list.as_deref().unwrap_or_default())
            .map_err(ApiError::bad_request)?;
    let network_block_all = body.network_block_all.unwrap_or(false);
    refuse_unless(
        !network_block_all || network_allow_list.is_empty(),
        "networkAllowList",
        "cannot be combined with networkBlockAll: true",
    )?;
    Ok(SandboxSettings {
        user: user.to_string(),
        snapshot: snapshot.to_string(),
        env,
        labels,
        cpu: limit(body.cpu, DEFAULT_CPU, MAX_CPU, "cpu")?,
        gpu: 0,
        memory: limit(body.memory, DEFAULT_MEMORY_GIB, MAX_MEMORY_GIB, "memory")?,
        disk: 0,
        public: false,
        network_block_all,
        network_allow_list,
    })
}

/// Validates every mount of the request; returns them normalised (volume ids still unresolved).
fn validate_mounts(volumes: &[SandboxVolume]) -> ApiResult<Vec<MountRow>> {
    let mut mounts = Vec::with_capacity(volumes.len());
    for volume in volumes {
        if volume.volume_id.is_empty() {
            return Err(ApiError::bad_request("volumeId must not be empty"));
        }
        let mount_path = validate_mount_path(&volume.mount_path).map_err(ApiError::bad_request)?;
        let subpath = match volume.subpath.as_deref() {
            Some(subpath) => validate_subpath(subpath).map_err(ApiError::bad_request)?,
            None => None,
        };
        mounts.push(MountRow {
            volume_id: volume.volume_id.clone(),
            mount_path,
            subpath,
            read_only: volume.read_only.unwrap_or(false),
        });
    }
    let paths: Vec<String> = mounts.iter().map(|m| m.mount_path.clone()).collect();
    validate_mount_set(&paths).map_err(ApiError::bad_request)?;
    Ok(mounts)
}

/// Resolves each mount's volume (id or name) to a ready volume id, waiting for volumes that are
/// still being provisioned.
async fn resolve_volumes(state: &AppState, org: &str, mounts: &mut [MountRow]) -> ApiResult<()> {
    for mount in mounts.iter_mut() {
        let deadline = Instant::now() + VOLUME_READY_WAIT;
        loop {
            let db = state.services.db.clone();
            let (org_id, key) = (org.to_string(), mount.volume_id.clone());
            let volume = blocking(move || db.volume_by_id_or_name(&org_id, &key)).await?;
            let Some(volume) = volume.filter(|v| v.state != volume_state::DELETED) else {
                return Err(ApiError::bad_request(format!(
                    "volume {} not found",
                    mount.volume_id
                )));
            };
            match volume.state.as_str() {
                volume_state::READY => {
                    mount.volume_id = volume.id;
                    break;
                }
                volume_state::CREATING if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                volume_state::ERROR => {
                    return Err(ApiError::bad_request(format!(
                        "volume {} is in state error: {}",
                        mount.volume_id,
                        volume.error_reason.unwrap_or_default()
                    )))
                }
                other => {
                    return Err(ApiError::bad_request(format!(
                        "volume {} is not ready (state {other})",
                        mount.volume_id
                    )))
                }
            }
        }
    }
    Ok(())
}

/// Creates a sandbox and starts it; answers once it is `started` (or `error`), or `creating`
/// if starting takes unusually long (clients poll `GET /sandbox/{id}`).
#[utoipa::path(
    post, operation_id = "createSandbox", path = "/api/sandbox", tag = "sandbox", request_body = CreateSandbox,
    responses(
        (status = 200, body = SandboxDto),
        (status = 400, description = "an invalid or unsupported field, an invalid mount, an unknown or unready volume", body = ErrorBody),
        (status = 409, description = "name in use, or the pinned runner cannot mount the volumes", body = ErrorBody),
        (status = 503, description = "no live runner has room", body = ErrorBody)
    )
)]
pub async fn create(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiJson(body): ApiJson<CreateSandbox>,
) -> ApiResult<Json<SandboxDto>> {
    let settings = validate_settings(&body)?;
    let mut mounts = validate_mounts(body.volumes.as_deref().unwrap_or_default())?;
    resolve_volumes(&state, &org, &mut mounts).await?;

    let services = state.services.clone();
    let (org_id, name) = (org.clone(), body.name);
    let sandbox = blocking(move || {
        let placement = Placement {
            connected: &services.runners.names(),
            pinned: settings.labels.get(PIN_LABEL).map(String::as_str),
            remote_volumes: services.volumes_reach_other_hosts(),
        };
        services
            .db
            .insert_sandbox(&org_id, name.as_deref(), &settings, &mounts, &placement)
    })
    .await?;
    let id = sandbox.id.clone();
    // Its own task, so the sandbox starts even if the client disconnects.
    let start = tokio::spawn({
        let services = state.services.clone();
        async move { services.start_sandbox(sandbox).await }
    });
    // Input only the runner can judge (a subpath that is a symlink or a file in the volume) is
    // the client's error: answered like any other invalid field, leaving no sandbox behind.
    if let Ok(Ok(Err(RunnerError::InvalidInput(why)))) =
        tokio::time::timeout(START_WAIT, start).await
    {
        let db = state.services.db.clone();
        let reason = why.clone();
        blocking(move || {
            db.transition_sandbox(
                &id,
                &[sandbox_state::ERROR],
                sandbox_state::DESTROYED,
                Some(&reason),
            )
        })
        .await?;
        return Err(ApiError::bad_request(why));
    }
    Ok(Json(load(&state, &org, &id).await?))
}

async fn load(state: &AppState, org: &str, id_or_name: &str) -> ApiResult<SandboxDto> {
    let db = state.services.db.clone();
    let (org, key) = (org.to_string(), id_or_name.to_string());
    let row = blocking(move || db.sandbox(&org, &key)).await?;
    row.map(|row| SandboxDto::new(row, &state.toolbox_url))
        .ok_or_else(|| not_found(id_or_name))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
pub struct DetachVolumeQuery {
    /// The mount path of the volume to remove.
    pub mount_path: String,
    /// Cut the mount off even while a process of the sandbox uses it.
    #[serde(default)]
    pub force: bool,
}

/// Adds a volume mount to a started sandbox without restarting it (hot attach, a Cellar
/// extension): its processes see the new mount point at once. The mount rules are those of
/// sandbox creation, checked against the sandbox's other mounts too.
#[utoipa::path(
    post, operation_id = "attachSandboxVolume", path = "/api/sandbox/{sandboxIdOrName}/volumes",
    tag = "sandbox", params(("sandboxIdOrName" = String, Path, description = "Sandbox id or name")),
    request_body = SandboxVolume,
    responses(
        (status = 200, body = SandboxDto),
        (status = 400, description = "an invalid mount, an unknown or unready volume", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "the sandbox is not started, the path is taken, or its runner cannot mount the volume", body = ErrorBody)
    )
)]
pub async fn attach_volume(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath(id_or_name): ApiPath<String>,
    ApiJson(body): ApiJson<SandboxVolume>,
) -> ApiResult<Json<SandboxDto>> {
    let sandbox = started(&state, &org, &id_or_name).await?;
    let mut mounts = validate_mounts(std::slice::from_ref(&body))?;
    resolve_volumes(&state, &org, &mut mounts).await?;
    let mount = mounts.remove(0);
    let paths: Vec<String> = sandbox
        .mounts
        .iter()
        .map(|m| m.mount_path.clone())
        .chain([mount.mount_path.clone()])
        .collect();
    validate_mount_set(&paths).map_err(ApiError::conflict)?;
    let services = state.services.clone();
    let runner = services
        .runner(&sandbox.runner_id)
        .map_err(super::toolbox::runner_error)?;
    if runner.is_remote() && !services.volumes_reach_other_hosts() {
        return Err(ApiError::conflict(format!(
            "sandbox {id_or_name} runs on runner {} on another host, which cannot mount volumes whose metadata is on the server's disk",
            sandbox.runner_id
        )));
    }
    let db = services.db.clone();
    let (id, row) = (sandbox.id.clone(), mount.clone());
    blocking(move || db.add_sandbox_mount(&id, &row)).await?;
    if let Err(err) = runner
        .attach_volume(&sandbox.id, services.mount_spec(&mount))
        .await
    {
        let db = services.db.clone();
        let (id, path) = (sandbox.id.clone(), mount.mount_path.clone());
        blocking(move || db.remove_sandbox_mount(&id, &path)).await?;
        return Err(super::toolbox::runner_error(err));
    }
    Ok(Json(load(&state, &org, &sandbox.id).await?))
}

/// Removes a volume mount from a started sandbox without restarting it (hot detach, a Cellar
/// extension). 409 while a process of the sandbox uses it (an open file, a working directory
/// under it), unless `force=true`.
#[utoipa::path(
    delete, operation_id = "detachSandboxVolume", path = "/api/sandbox/{sandboxIdOrName}/volumes",
    tag = "sandbox",
    params(("sandboxIdOrName" = String, Path, description = "Sandbox id or name"), DetachVolumeQuery),
    responses(
        (status = 200, body = SandboxDto),
        (status = 404, description = "no such sandbox, or no volume at that path", body = ErrorBody),
        (status = 409, description = "in use (retry with force=true), or the sandbox is not started", body = ErrorBody)
    )
)]
pub async fn detach_volume(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath(id_or_name): ApiPath<String>,
    ApiQuery(query): ApiQuery<DetachVolumeQuery>,
) -> ApiResult<Json<SandboxDto>> {
    let sandbox = started(&state, &org, &id_or_name).await?;
    if !sandbox
        .mounts
        .iter()
        .any(|m| m.mount_path == query.mount_path)
    {
        return Err(ApiError::not_found(format!(
            "no volume is mounted at {} in sandbox {id_or_name}",
            query.mount_path
        )));
    }
    let services = state.services.clone();
    let runner = services
        .runner(&sandbox.runner_id)
        .map_err(super::toolbox::runner_error)?;
    runner
        .detach_volume(&sandbox.id, &query.mount_path, query.force)
        .await
        .map_err(super::toolbox::runner_error)?;
    let db = services.db.clone();
    let (id, path) = (sandbox.id.clone(), query.mount_path.clone());
    blocking(move || db.remove_sandbox_mount(&id, &path)).await?;
    Ok(Json(load(&state, &org, &sandbox.id).await?))
}

/// The caller's sandbox, which must be started (409 otherwise).
async fn started(state: &AppState, org: &str, id_or_name: &str) -> ApiResult<SandboxRow> {
    let db = state.services.db.clone();
    let (org_id, key) = (org.to_string(), id_or_name.to_string());
    let sandbox = blocking(move || db.sandbox(&org_id, &key))
        .await?
        .ok_or_else(|| not_found(id_or_name))?;
    if sandbox.state != sandbox_state::STARTED {
        return Err(ApiError::conflict(format!(
            "sandbox {id_or_name} is not started (state {})",
            api_state(&sandbox.state)
        )));
    }
    Ok(sandbox)
}

#[utoipa::path(
    get, operation_id = "getSandbox", path = "/api/sandbox/{sandboxIdOrName}", tag = "sandbox",
    params(("sandboxIdOrName" = String, Path, description = "Sandbox id or name")),
    responses((status = 200, body = SandboxDto), (status = 404, body = ErrorBody))
)]
pub async fn get(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath(id_or_name): ApiPath<String>,
) -> ApiResult<Json<SandboxDto>> {
    Ok(Json(load(&state, &org, &id_or_name).await?))
}

/// Sandboxes that are not destroyed, oldest first, a page at a time.
#[utoipa::path(
    get, operation_id = "listSandboxes", path = "/api/sandbox", tag = "sandbox", params(ListSandboxesQuery),
    responses((status = 200, body = SandboxList), (status = 400, body = ErrorBody))
)]
pub async fn list(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiQuery(query): ApiQuery<ListSandboxesQuery>,
) -> ApiResult<Json<SandboxList>> {
    let labels: BTreeMap<String, String> = match query.labels.as_deref() {
        Some(json) => serde_json::from_str(json)
            .map_err(|e| ApiError::bad_request(format!("labels must be a JSON object: {e}")))?,
        None => BTreeMap::new(),
    };
    let start: usize = match query.cursor.as_deref() {
        Some(cursor) => cursor
            .parse()
            .map_err(|_| ApiError::bad_request("invalid cursor"))?,
        None => 0,
    };
    let limit = query.limit.unwrap_or(100).max(1);
    let db = state.services.db.clone();
    let rows = blocking(move || db.list_sandboxes(&org)).await?;
    let matching: Vec<SandboxRow> = rows
        .into_iter()
        .filter(|s| query.id.as_ref().is_none_or(|id| &s.id == id))
        .filter(|s| query.name.as_ref().is_none_or(|name| &s.name == name))
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.settings.labels.get(k) == Some(v))
        })
        .collect();
    let end = start.saturating_add(limit).min(matching.len());
    let next_cursor = (end < matching.len()).then(|| end.to_string());
    let items = matching
        .into_iter()
        .skip(start)
        .take(limit)
        .map(|row| SandboxDto::new(row, &state.toolbox_url))
        .collect();
    Ok(Json(SandboxList { items, next_cursor }))
}

/// Starts destroying a sandbox (its processes end, its mounts are released; volume data stays)
/// and answers with the sandbox in state `destroying`.
#[utoipa::path(
    delete, operation_id = "deleteSandbox", path = "/api/sandbox/{sandboxIdOrName}", tag = "sandbox",
    params(("sandboxIdOrName" = String, Path, description = "Sandbox id or name")),
    responses((status = 200, body = SandboxDto), (status = 404, body = ErrorBody))
)]
pub async fn delete(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath(id_or_name): ApiPath<String>,
) -> ApiResult<Json<SandboxDto>> {
    let sandbox = load(&state, &org, &id_or_name).await?;
    let db = state.services.db.clone();
    let id = sandbox.id.clone();
    let from_creating = {
        let id = id.clone();
        let db = db.clone();
        blocking(move || {
            db.transition_sandbox(
                &id,
                &[sandbox_state::CREATING],
                sandbox_state::DESTROYING,
                None,
            )
        })
        .await?
    };
    // A sandbox still starting is destroyed by its start task once the runner returns.
    if !from_creating {
        let settled = [
            sandbox_state::STARTED,
            sandbox_state::ERROR,
            sandbox_state::LOST,
        ];
        let moved = {
            let id = id.clone();
            blocking(move || db.transition_sandbox(&id, &settled, sandbox_state::DESTROYING, None))
                .await?
        };
        if moved {
            let services = state.services.clone();
            let runner_id = sandbox.runner_id.clone();
            tokio::spawn(async move { services.destroy_sandbox(id, runner_id).await });
        }
    }
    Ok(Json(load(&state, &org, &sandbox.id).await?))
}

#[utoipa::path(
    get, operation_id = "getToolboxProxyUrl", path = "/api/sandbox/{sandboxId}/toolbox-proxy-url", tag = "sandbox",
    params(("sandboxId" = String, Path, description = "Sandbox id or name")),
    responses((status = 200, body = ToolboxProxyUrl), (status = 404, body = ErrorBody))
)]
pub async fn toolbox_proxy_url(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath(id_or_name): ApiPath<String>,
) -> ApiResult<Json<ToolboxProxyUrl>> {
    load(&state, &org, &id_or_name).await?;
    Ok(Json(ToolboxProxyUrl {
        url: state.toolbox_url.clone(),
    }))
}
