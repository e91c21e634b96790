//! `/api/volumes`: create, get (by id or name), list, change (the byte quota), delete;
//! snapshots (read-only, point in time) and forks (writable copies) sharing the origin's data.

use axum::extract::State;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::extract::{ApiJson, ApiPath, ApiQuery};
use super::{blocking, AppState, Org};
use crate::db::{volume_kind, volume_state, DeleteVolume, NewVolume, VolumeRow};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::lifecycle::Services;
use crate::validate::validate_volume_name;

/// A volume as Daytona's clients expect it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeDto {
    pub id: String,
    pub name: String,
    pub organization_id: String,
    /// pending_create, creating, ready, pending_delete, deleting, deleted or error.
    pub state: String,
    pub created_at: String,
    pub updated_at: String,
    pub last_used_at: Option<String>,
    pub error_reason: Option<String>,
    /// What the volume holds, from its metadata's counters (null unless it is ready).
    pub usage: Option<VolumeUsageDto>,
    /// The most bytes its files may hold (null: no limit).
    pub quota_bytes: Option<u64>,
    /// `volume`, or `snapshot` (read-only: mounted read-only, its files cannot change).
    pub kind: String,
    /// The volume or snapshot this one was forked or snapshotted from.
    pub origin_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeUsageDto {
    /// Bytes the files really hold (a sparse file counts its data only), shared or not.
    pub bytes: u64,
    /// Files, directories and links, the root directory not counted.
    pub files: u64,
    /// Bytes of stored data that only this volume holds (no fork or snapshot shares them):
    /// what deleting it frees.
    pub exclusive_bytes: u64,
}

impl VolumeDto {
    /// The row with the usage of a ready volume read from its metadata (blocking). A volume
    /// whose usage cannot be read is still answered, without it.
    fn of(services: &Services, row: VolumeRow) -> VolumeDto {
        let mut quota_bytes = row.quota_bytes;
        let usage = if row.state == volume_state::READY {
            match cellar_vfs::maintenance::usage(&services.volume_config(&row.id)) {
                Ok(usage) => {
                    quota_bytes = usage.quota_bytes;
                    Some(VolumeUsageDto {
                        bytes: usage.bytes,
                        files: usage.files,
                        exclusive_bytes: usage.exclusive_bytes,
                    })
                }
                Err(e) => {
                    tracing::warn!(volume = %row.id, "reading the volume's usage: {e:#}");
                    None
                }
            }
        } else {
            None
        };
        VolumeDto {
            id: row.id,
            name: row.name,
            organization_id: row.org_id,
            state: row.state,
            created_at: row.created_at,
            updated_at: row.updated_at,
            last_used_at: row.last_used_at,
            error_reason: row.error_reason,
            usage,
            quota_bytes,
            kind: row.kind,
            origin_id: row.origin_id,
        }
    }
}

/// Volume rows as DTOs, their usage read off the async workers.
async fn dtos(state: &AppState, rows: Vec<VolumeRow>) -> ApiResult<Vec<VolumeDto>> {
    let services = state.services.clone();
    blocking(move || {
        Ok::<_, ApiError>(
            rows.into_iter()
                .map(|row| VolumeDto::of(&services, row))
                .collect(),
        )
    })
    .await
}

async fn dto(state: &AppState, row: VolumeRow) -> ApiResult<Json<VolumeDto>> {
    let mut dtos = dtos(state, vec![row]).await?;
    Ok(Json(dtos.remove(0)))
}

/// Largest byte quota (the metadata stores it as a signed 64-bit number).
const MAX_QUOTA_BYTES: u64 = i64::MAX as u64;

fn check_quota(quota: Option<u64>) -> ApiResult<Option<u64>> {
    match quota {
        Some(bytes) if bytes > MAX_QUOTA_BYTES => Err(ApiError::bad_request(format!(
            "quotaBytes must be at most {MAX_QUOTA_BYTES}"
        ))),
        quota => Ok(quota),
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateVolume {
    /// 1-63 characters of letters, digits, '.', '_' and '-', starting with a letter or digit.
    pub name: String,
    /// The most bytes the volume's files may hold (a Cellar extension; default: no limit).
    pub quota_bytes: Option<u64>,
}

/// `PATCH /api/volumes/{volumeId}`: the fields to change.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpdateVolume {
    /// A number of bytes, or null to remove the quota. Required.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u64>, required = true)]
    pub quota_bytes: Option<Option<u64>>,
}

/// Tells a field given as null (`Some(None)`) from a missing one (`None`).
fn present<'de, D: serde::Deserializer<'de>>(field: D) -> Result<Option<Option<u64>>, D::Error> {
    Option::<u64>::deserialize(field).map(Some)
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
pub struct ListVolumesQuery {
    /// Also list deleted volumes.
    #[serde(default)]
    pub include_deleted: bool,
}

fn not_found(key: &str) -> ApiError {
    ApiError::not_found(format!("volume {key} not found"))
}

#[utoipa::path(
    get, operation_id = "listVolumes", path = "/api/volumes", tag = "volumes", params(ListVolumesQuery),
    responses((status = 200, body = [VolumeDto]), (status = 401, body = ErrorBody))
)]
pub async fn list(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiQuery(query): ApiQuery<ListVolumesQuery>,
) -> ApiResult<Json<Vec<VolumeDto>>> {
    let db = state.services.db.clone();
    let rows = blocking(move || db.list_volumes(&org, query.include_deleted)).await?;
    Ok(Json(dtos(&state, rows).await?))
}

/// Creates a volume; it is `ready` when this answers (or `error` with `errorReason`).
#[utoipa::path(
    post, operation_id = "createVolume", path = "/api/volumes", tag = "volumes", request_body = CreateVolume,
    responses(
        (status = 200, body = VolumeDto),
        (status = 400, description = "invalid name or quota exceeded", body = ErrorBody),
        (status = 409, description = "name in use", body = ErrorBody)
    )
)]
pub async fn create(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiJson(body): ApiJson<CreateVolume>,
) -> ApiResult<Json<VolumeDto>> {
    validate_volume_name(&body.name).map_err(ApiError::bad_request)?;
    let quota_bytes = check_quota(body.quota_bytes)?;
    let new = NewVolume {
        name: body.name,
        quota_bytes,
        origin: None,
        kind: volume_kind::VOLUME,
    };
    create_volume(&state, &org, new).await
}

/// Inserts the row and provisions the volume (formats it, or copies its origin); answers once
/// it is `ready` (or `error`).
async fn create_volume(state: &AppState, org: &str, new: NewVolume) -> ApiResult<Json<VolumeDto>> {
    let services = state.services.clone();
    let quota = services.config.volume_quota;
    let db = services.db.clone();
    let org = org.to_string();
    let volume = blocking(move || db.insert_volume(&org, &new, quota)).await?;
    // Provisioning runs as its own task so that it completes even if the client disconnects.
    let task = tokio::spawn({
        let services = services.clone();
        let id = volume.id.clone();
        async move { services.provision_volume(id).await }
    });
    task.await.map_err(ApiError::internal)?;
    let db = services.db.clone();
    let row = blocking(move || db.volume(&volume.org_id, &volume.id)).await?;
    let row = row.ok_or_else(|| ApiError::internal("volume vanished after creation"))?;
    dto(state, row).await
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateSnapshot {
    /// As a volume name; default: the volume's name, `-snapshot-` and a number.
    pub name: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateFork {
    /// The new volume's name (as for `POST /api/volumes`).
    pub name: String,
}

/// The origin of a snapshot or fork: by id or name, not deleted.
async fn origin(state: &AppState, org: &str, key: &str) -> ApiResult<VolumeRow> {
    let db = state.services.db.clone();
    let (org, id) = (org.to_string(), key.to_string());
    blocking(move || db.volume_by_id_or_name(&org, &id))
        .await?
        .filter(|v| v.state != volume_state::DELETED)
        .ok_or_else(|| not_found(key))
}

/// Takes a snapshot: a read-only, point-in-time volume holding what the volume's writers had
/// closed or fsynced when it was taken. It shares every stored block with the volume (nothing
/// is copied: the time grows with the number of files, not their size), can be mounted
/// read-only into any number of sandboxes while writers go on, and forked.
#[utoipa::path(
    post, operation_id = "createVolumeSnapshot", path = "/api/volumes/{volumeId}/snapshots",
    tag = "volumes", params(("volumeId" = String, Path, description = "Volume id or name")),
    request_body = CreateSnapshot,
    responses(
        (status = 200, body = VolumeDto),
        (status = 400, description = "invalid name or quota exceeded", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "name in use, or the volume is not ready", body = ErrorBody)
    )
)]
pub async fn create_snapshot(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath(volume_id): ApiPath<String>,
    ApiJson(body): ApiJson<CreateSnapshot>,
) -> ApiResult<Json<VolumeDto>> {
    let origin = origin(&state, &org, &volume_id).await?;
    let name = match body.name {
        Some(name) => name,
        None => default_snapshot_name(&origin.name),
    };
    validate_volume_name(&name).map_err(ApiError::bad_request)?;
    let new = NewVolume {
        name,
        quota_bytes: None,
        origin: Some(origin.id),
        kind: volume_kind::SNAPSHOT,
    };
    create_volume(&state, &org, new).await
}

/// `<origin>-snapshot-<ms since the epoch>`, cut to fit a volume name.
fn default_snapshot_name(origin: &str) -> String {
    let suffix = format!("-snapshot-{}", crate::db::now_ms());
    let keep = origin.len().min(63 - suffix.len());
    format!("{}{suffix}", &origin[..keep])
}

#[utoipa::path(
    get, operation_id = "listVolumeSnapshots", path = "/api/volumes/{volumeId}/snapshots",
    tag = "volumes", params(("volumeId" = String, Path, description = "Volume id or name")),
    responses((status = 200, body = [VolumeDto]), (status = 404, body = ErrorBody))
)]
pub async fn list_snapshots(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath(volume_id): ApiPath<String>,
) -> ApiResult<Json<Vec<VolumeDto>>> {
    let origin = origin(&state, &org, &volume_id).await?;
    let db = state.services.db.clone();
    let rows = blocking(move || db.snapshots_of(&org, &origin.id)).await?;
    Ok(Json(dtos(&state, rows).await?))
}

/// Deletes a snapshot of the volume (as `DELETE /api/volumes/{snapshotId}`).
#[utoipa::path(
    delete, operation_id = "deleteVolumeSnapshot",
    path = "/api/volumes/{volumeId}/snapshots/{snapshotId}", tag = "volumes",
    params(
        ("volumeId" = String, Path, description = "Volume id or name"),
        ("snapshotId" = String, Path, description = "Snapshot id")
    ),
    responses(
        (status = 200, description = "deletion started"),
        (status = 404, body = ErrorBody),
        (status = 409, description = "mounted by a sandbox that is not being destroyed", body = ErrorBody)
    )
)]
pub async fn delete_snapshot(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath((volume_id, snapshot_id)): ApiPath<(String, String)>,
) -> ApiResult<()> {
    // By the origin's id even when the origin was deleted (its snapshots live on), or by name.
    let origin_id = match origin(&state, &org, &volume_id).await {
        Ok(origin) => origin.id,
        Err(_) => volume_id.clone(),
    };
    let db = state.services.db.clone();
    let (org_id, key) = (org.clone(), snapshot_id.clone());
    let snapshot = blocking(move || db.volume(&org_id, &key)).await?;
    let is_its_snapshot = snapshot.is_some_and(|s| {
        s.kind == volume_kind::SNAPSHOT && s.origin_id.as_deref() == Some(origin_id.as_str())
    });
    if !is_its_snapshot {
        return Err(ApiError::not_found(format!(
            "snapshot {snapshot_id} of volume {volume_id} not found"
        )));
    }
    start_delete(&state, org, snapshot_id).await
}

/// Forks a volume or a snapshot: a new, writable volume that starts as its copy and shares
/// every stored block with it (no block is copied); writes on either side never show on the
/// other. Holds what the origin's writers had closed or fsynced when it was made.
#[utoipa::path(
    post, operation_id = "forkVolume", path = "/api/volumes/{volumeId}/fork", tag = "volumes",
    params(("volumeId" = String, Path, description = "Volume or snapshot id or name")),
    request_body = CreateFork,
    responses(
        (status = 200, body = VolumeDto),
        (status = 400, description = "invalid name or quota exceeded", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "name in use, or the origin is not ready", body = ErrorBody)
    )
)]
pub async fn fork(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath(volume_id): ApiPath<String>,
    ApiJson(body): ApiJson<CreateFork>,
) -> ApiResult<Json<VolumeDto>> {
    validate_volume_name(&body.name).map_err(ApiError::bad_request)?;
    let origin = origin(&state, &org, &volume_id).await?;
    let new = NewVolume {
        name: body.name,
        quota_bytes: None,
        origin: Some(origin.id),
        kind: volume_kind::VOLUME,
    };
    create_volume(&state, &org, new).await
}

#[utoipa::path(
    get, operation_id = "getVolumeByName", path = "/api/volumes/by-name/{name}", tag = "volumes",
    params(("name" = String, Path, description = "Volume name")),
    responses((status = 200, body = VolumeDto), (status = 404, body = ErrorBody))
)]
pub async fn get_by_name(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<VolumeDto>> {
    let db = state.services.db.clone();
    let key = name.clone();
    let row = blocking(move || db.volume_by_name(&org, &key)).await?;
    dto(&state, row.ok_or_else(|| not_found(&name))?).await
}

#[utoipa::path(
    get, operation_id = "getVolume", path = "/api/volumes/{volumeId}", tag = "volumes",
    params(("volumeId" = String, Path, description = "Volume id")),
    responses((status = 200, body = VolumeDto), (status = 404, body = ErrorBody))
)]
pub async fn get(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath(volume_id): ApiPath<String>,
) -> ApiResult<Json<VolumeDto>> {
    let db = state.services.db.clone();
    let key = volume_id.clone();
    let row = blocking(move || db.volume(&org, &key)).await?;
    dto(&state, row.ok_or_else(|| not_found(&volume_id))?).await
}

/// Changes a ready volume's byte quota (`quotaBytes`, null removes it); every mount enforces
/// the new quota within about a second. A quota below the usage refuses further growth only.
#[utoipa::path(
    patch, operation_id = "updateVolume", path = "/api/volumes/{volumeId}", tag = "volumes",
    params(("volumeId" = String, Path, description = "Volume id or name")),
    request_body = UpdateVolume,
    responses(
        (status = 200, body = VolumeDto),
        (status = 404, body = ErrorBody),
        (status = 409, description = "the volume is not ready", body = ErrorBody)
    )
)]
pub async fn update(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath(volume_id): ApiPath<String>,
    ApiJson(body): ApiJson<UpdateVolume>,
) -> ApiResult<Json<VolumeDto>> {
    let Some(quota) = body.quota_bytes else {
        return Err(ApiError::bad_request(
            "nothing to change: send {\"quotaBytes\": <bytes> or null}",
        ));
    };
    let quota = check_quota(quota)?;
    let db = state.services.db.clone();
    let key = volume_id.clone();
    let row = blocking(move || db.volume_by_id_or_name(&org, &key))
        .await?
        .ok_or_else(|| not_found(&volume_id))?;
    if row.state != volume_state::READY {
        return Err(ApiError::conflict(format!(
            "volume {volume_id} is {}: only a ready volume's quota can change",
            row.state
        )));
    }
    let services = state.services.clone();
    let updated = blocking(move || -> anyhow::Result<VolumeRow> {
        cellar_vfs::maintenance::set_quota(&services.volume_config(&row.id), quota)?;
        services.db.set_volume_quota(&row.id, quota)?;
        Ok(VolumeRow {
            quota_bytes: quota,
            ..row
        })
    })
    .await?;
    dto(&state, updated).await
}

/// Starts deleting a volume: `pending_delete`, then `deleting` (every object and metadata row is
/// removed in the background), then `deleted`.
#[utoipa::path(
    delete, operation_id = "deleteVolume", path = "/api/volumes/{volumeId}", tag = "volumes",
    params(("volumeId" = String, Path, description = "Volume id")),
    responses(
        (status = 200, description = "deletion started"),
        (status = 404, body = ErrorBody),
        (status = 409, description = "mounted by a sandbox that is not being destroyed", body = ErrorBody)
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath(volume_id): ApiPath<String>,
) -> ApiResult<()> {
    start_delete(&state, org, volume_id).await
}

/// Marks a volume (or snapshot) for deletion and starts removing its data in the background.
/// Data that forks or snapshots still share stays until the last of them is deleted.
async fn start_delete(state: &AppState, org: String, volume_id: String) -> ApiResult<()> {
    let db = state.services.db.clone();
    let key = volume_id.clone();
    match blocking(move || db.begin_volume_delete(&org, &key)).await? {
        DeleteVolume::NotFound => Err(not_found(&volume_id)),
        DeleteVolume::InUse(sandboxes) => Err(ApiError::conflict(format!(
            "volume {volume_id} is in use by sandbox(es) {}; delete them first",
            sandboxes.join(", ")
        ))),
        DeleteVolume::Creating => Err(ApiError::conflict(format!(
            "volume {volume_id} (or a fork or snapshot of it) is still being created; retry in a moment"
        ))),
        DeleteVolume::Accepted(volume) => {
            if volume.state == volume_state::PENDING_DELETE {
                let services = state.services.clone();
                tokio::spawn(async move { services.delete_volume(volume.id).await });
            }
            Ok(())
        }
    }
}
