//! `/api/volumes`: create, get (by id or name), list, delete.

use axum::extract::State;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::extract::{ApiJson, ApiPath, ApiQuery};
use super::{blocking, AppState, Org};
use crate::db::{volume_state, DeleteVolume, VolumeRow};
use crate::error::{ApiError, ApiResult, ErrorBody};
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
}

impl From<VolumeRow> for VolumeDto {
    fn from(row: VolumeRow) -> VolumeDto {
        VolumeDto {
            id: row.id,
            name: row.name,
            organization_id: row.org_id,
            state: row.state,
            created_at: row.created_at,
            updated_at: row.updated_at,
            last_used_at: row.last_used_at,
            error_reason: row.error_reason,
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateVolume {
    /// 1-63 characters of letters, digits, '.', '_' and '-', starting with a letter or digit.
    pub name: String,
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
    Ok(Json(rows.into_iter().map(VolumeDto::from).collect()))
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
    let services = state.services.clone();
    let quota = services.config.volume_quota;
    let db = services.db.clone();
    let volume = blocking(move || db.insert_volume(&org, &body.name, quota)).await?;
    // Provisioning runs as its own task so that it completes even if the client disconnects.
    let task = tokio::spawn({
        let services = services.clone();
        let id = volume.id.clone();
        async move { services.provision_volume(id).await }
    });
    task.await.map_err(ApiError::internal)?;
    let db = services.db.clone();
    let row = blocking(move || db.volume(&volume.org_id, &volume.id)).await?;
    row.map(|row| Json(row.into()))
        .ok_or_else(|| ApiError::internal("volume vanished after creation"))
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
    row.map(|row| Json(row.into()))
        .ok_or_else(|| not_found(&name))
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
    row.map(|row| Json(row.into()))
        .ok_or_else(|| not_found(&volume_id))
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
    let db = state.services.db.clone();
    let key = volume_id.clone();
    match blocking(move || db.begin_volume_delete(&org, &key)).await? {
        DeleteVolume::NotFound => Err(not_found(&volume_id)),
        DeleteVolume::InUse(sandboxes) => Err(ApiError::conflict(format!(
            "volume {volume_id} is in use by sandbox(es) {}; delete them first",
            sandboxes.join(", ")
        ))),
        DeleteVolume::Creating => Err(ApiError::conflict(format!(
            "volume {volume_id} is still being created; retry in a moment"
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
