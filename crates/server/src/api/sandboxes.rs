//! `/api/sandbox`: create (with volume mounts), get, list, delete, toolbox-proxy-url.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::extract::{ApiJson, ApiPath, ApiQuery};
use super::{blocking, AppState, Org};
use crate::db::{sandbox_state, volume_state, MountRow, SandboxRow, SandboxSettings};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::validate::{
    validate_mount_path, validate_mount_set, validate_sandbox_name, validate_subpath,
};

/// Defaults for what the create request leaves out (Daytona's defaults).
const DEFAULT_USER: &str = "daytona";
const DEFAULT_SNAPSHOT: &str = "cellar-host";
const DEFAULT_CPU: i64 = 1;
const DEFAULT_MEMORY_GIB: i64 = 1;
const DEFAULT_DISK_GIB: i64 = 3;
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

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct CreateSandbox {
    pub name: Option<String>,
    pub snapshot: Option<String>,
    pub user: Option<String>,
    pub env: Option<BTreeMap<String, String>>,
    pub labels: Option<BTreeMap<String, String>>,
    pub public: Option<bool>,
    pub network_block_all: Option<bool>,
    pub cpu: Option<i64>,
    pub gpu: Option<i64>,
    pub memory: Option<i64>,
    pub disk: Option<i64>,
    pub volumes: Option<Vec<SandboxVolume>>,
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
    pub kvm: bool,
    pub target: String,
    pub cpu: i64,
    pub gpu: i64,
    pub memory: i64,
    pub disk: i64,
    /// creating, started, destroying, destroyed or error.
    pub state: String,
    pub desired_state: String,
    pub error_reason: Option<String>,
    pub volumes: Vec<SandboxVolume>,
    pub created_at: String,
    pub updated_at: String,
    pub toolbox_proxy_url: String,
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
            kvm: false,
            target: TARGET.to_string(),
            cpu: row.settings.cpu,
            gpu: row.settings.gpu,
            memory: row.settings.memory,
            disk: row.settings.disk,
            state: row.state,
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

fn non_negative(value: Option<i64>, default: i64, field: &str) -> ApiResult<i64> {
    match value {
        Some(v) if v < 0 => Err(ApiError::bad_request(format!(
            "{field} must not be negative"
        ))),
        Some(v) => Ok(v),
        None => Ok(default),
    }
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
        (status = 400, description = "invalid mount, unknown or unready volume", body = ErrorBody),
        (status = 409, description = "name in use", body = ErrorBody)
    )
)]
pub async fn create(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiJson(body): ApiJson<CreateSandbox>,
) -> ApiResult<Json<SandboxDto>> {
    if let Some(name) = body.name.as_deref() {
        validate_sandbox_name(name).map_err(ApiError::bad_request)?;
    }
    let settings = SandboxSettings {
        user: body.user.unwrap_or_else(|| DEFAULT_USER.to_string()),
        snapshot: body
            .snapshot
            .unwrap_or_else(|| DEFAULT_SNAPSHOT.to_string()),
        env: body.env.unwrap_or_default(),
        labels: body.labels.unwrap_or_default(),
        cpu: non_negative(body.cpu, DEFAULT_CPU, "cpu")?,
        gpu: non_negative(body.gpu, 0, "gpu")?,
        memory: non_negative(body.memory, DEFAULT_MEMORY_GIB, "memory")?,
        disk: non_negative(body.disk, DEFAULT_DISK_GIB, "disk")?,
        public: body.public.unwrap_or(false),
        network_block_all: body.network_block_all.unwrap_or(false),
    };
    let mut mounts = validate_mounts(body.volumes.as_deref().unwrap_or_default())?;
    resolve_volumes(&state, &org, &mut mounts).await?;

    let db = state.services.db.clone();
    let (org_id, name) = (org.clone(), body.name);
    let sandbox =
        blocking(move || db.insert_sandbox(&org_id, name.as_deref(), &settings, &mounts)).await?;
    let id = sandbox.id.clone();
    // Its own task, so the sandbox starts even if the client disconnects.
    let start = tokio::spawn({
        let services = state.services.clone();
        async move { services.start_sandbox(sandbox).await }
    });
    let _ = tokio::time::timeout(START_WAIT, start).await;
    Ok(Json(load(&state, &org, &id).await?))
}

async fn load(state: &AppState, org: &str, id_or_name: &str) -> ApiResult<SandboxDto> {
    let db = state.services.db.clone();
    let (org, key) = (org.to_string(), id_or_name.to_string());
    let row = blocking(move || db.sandbox(&org, &key)).await?;
    row.map(|row| SandboxDto::new(row, &state.toolbox_url))
        .ok_or_else(|| not_found(id_or_name))
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
        let settled = [sandbox_state::STARTED, sandbox_state::ERROR];
        let moved = {
            let id = id.clone();
            blocking(move || db.transition_sandbox(&id, &settled, sandbox_state::DESTROYING, None))
                .await?
        };
        if moved {
            let services = state.services.clone();
            tokio::spawn(async move { services.destroy_sandbox(id).await });
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
