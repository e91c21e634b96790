//! The S3 gateway of this server (docs/GATEWAY.md): `/api/volumes/{volumeId}/s3-credentials`
//! mints, lists and revokes credentials; [`start`] serves every volume as a bucket on its own
//! address, through the volumes the file API has open.
//!
//! A secret is never stored: it is an HMAC of its access key id under the server secret
//! `s3_credentials` (SigV4 needs the secret in the clear to check a signature, so a hash would
//! not do), and it is shown once, when minted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use cellar_gateway::{BackendError, Gateway, Grant, VolumeHandle};
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use utoipa::ToSchema;

use super::extract::{ApiJson, ApiPath};
use super::{blocking, AppState, Org};
use crate::db::{volume_state, S3CredentialRow, VolumeRow};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::files::{FileError, API_CTX};
use crate::lifecycle::Services;

/// Validity of credentials minted without `expiresInSeconds`.
const DEFAULT_EXPIRY_SECS: u64 = 3600;
/// Longest validity a credential can be minted with.
const MAX_EXPIRY_SECS: u64 = 365 * 24 * 3600;
/// Longest key prefix (S3 keys are at most 1024 bytes).
const MAX_PREFIX_LEN: usize = 1024;
/// The region clients sign for; any name works, this one is every SDK's default.
pub const REGION: &str = "us-east-1";

/// What the endpoint and the gateway share.
pub struct S3Settings {
    /// The endpoint URL answered to clients.
    pub endpoint: String,
    /// Derives the secrets.
    key: Vec<u8>,
}

impl S3Settings {
    fn secret(&self, access_key_id: &str) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(format!("cellar-s3-v1\n{access_key_id}").as_bytes());
        hex::encode(&mac.finalize().into_bytes()[..20])
    }
}

/// The gateway's listener, bound.
pub struct S3Listener {
    pub settings: Arc<S3Settings>,
    listener: tokio::net::TcpListener,
}

/// Binds the gateway's address and reads (or makes) the secret its credentials derive from.
pub async fn bind(services: &Services, addr: SocketAddr) -> anyhow::Result<S3Listener> {
    let db = services.db.clone();
    let candidate = crate::files::signing::new_secret();
    let key = db
        .run(move |db| db.server_secret("s3_credentials", &candidate))
        .await?;
    let key = hex::decode(key).context("the stored S3 credentials secret")?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the S3 gateway to {addr}"))?;
    let bound = listener.local_addr()?;
    let endpoint = services
        .config
        .s3_public_url
        .clone()
        .unwrap_or_else(|| format!("http://{bound}"));
    tracing::info!("serving the S3 gateway at {endpoint}");
    Ok(S3Listener {
        settings: Arc::new(S3Settings { endpoint, key }),
        listener,
    })
}

/// Serves the gateway until `stop` completes.
pub async fn serve(
    services: Arc<Services>,
    s3: S3Listener,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let backend = Arc::new(Backend {
        services,
        settings: s3.settings,
    });
    Gateway::new(backend.clone(), backend, API_CTX)
        .serve(s3.listener, stop)
        .await
}

/// The control database and the open volumes, as the gateway sees them.
struct Backend {
    services: Arc<Services>,
    settings: Arc<S3Settings>,
}

fn unavailable(e: impl std::fmt::Display) -> BackendError {
    BackendError::Unavailable(e.to_string())
}

#[async_trait::async_trait]
impl cellar_gateway::Grants for Backend {
    async fn grant(&self, access_key_id: &str) -> Result<Option<Grant>, BackendError> {
        let db = self.services.db.clone();
        let id = access_key_id.to_string();
        let found = db
            .run(move |db| {
                let Some(row) = db.s3_credential(&id)? else {
                    return Ok(None);
                };
                let volume = db.volume_by_id_in_any_org(&row.volume_id)?;
                Ok(volume.map(|volume| (row, volume)))
            })
            .await
            .map_err(unavailable)?;
        let Some((row, volume)) = found else {
            return Ok(None);
        };
        if volume.org_id != row.org_id {
            return Ok(None);
        }
        Ok(Some(Grant {
            secret_key: self.settings.secret(&row.access_key_id),
            volume_id: row.volume_id,
            bucket: volume.name,
            prefix: row.prefix,
            read_only: row.read_only,
            expires_at: row.expires_at_ms.map(expiry_time),
        }))
    }
}

#[async_trait::async_trait]
impl cellar_gateway::Volumes for Backend {
    async fn open(&self, volume_id: &str) -> Result<VolumeHandle, BackendError> {
        let db = self.services.db.clone();
        let id = volume_id.to_string();
        let volume = db
            .run(move |db| db.volume_by_id_in_any_org(&id))
            .await
            .map_err(unavailable)?;
        if volume.is_none_or(|v| v.state != volume_state::READY) {
            return Err(BackendError::NotFound);
        }
        let config = self.services.volume_config(volume_id);
        match self.services.files.acquire(volume_id, config).await {
            Ok(lease) => Ok(Arc::new(lease)),
            Err(FileError::Unavailable(_)) => Err(BackendError::NotFound),
            Err(e) => Err(unavailable(e)),
        }
    }
}

fn expiry_time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

fn rfc3339(ms: i64) -> String {
    humantime::format_rfc3339_millis(expiry_time(ms)).to_string()
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateS3Credentials {
    /// Only keys starting with this may be read or written (default: the whole volume). A key
    /// `a/b` is the file `/a/b`, so a prefix like `data/` scopes to a directory.
    pub prefix: Option<String>,
    /// Only GET, HEAD and listings (default false).
    pub read_only: Option<bool>,
    /// Validity in seconds (default 3600, at most 31536000).
    pub expires_in_seconds: Option<u64>,
}

/// Minted credentials: the secret is shown only here.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3CredentialsDto {
    pub access_key_id: String,
    pub secret_access_key: String,
    /// The volume's bucket: its name.
    pub bucket: String,
    /// The gateway's endpoint URL (path-style requests).
    pub endpoint: String,
    /// The region to sign for.
    pub region: String,
    pub prefix: String,
    pub read_only: bool,
    /// RFC 3339.
    pub expires_at: String,
}

/// A credential as listed (without its secret).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3CredentialInfo {
    pub access_key_id: String,
    pub bucket: String,
    pub prefix: String,
    pub read_only: bool,
    pub expires_at: Option<String>,
    pub created_at: String,
}

fn info(row: S3CredentialRow, bucket: &str) -> S3CredentialInfo {
    S3CredentialInfo {
        access_key_id: row.access_key_id,
        bucket: bucket.to_string(),
        prefix: row.prefix,
        read_only: row.read_only,
        expires_at: row.expires_at_ms.map(rfc3339),
        created_at: row.created_at,
    }
}

/// The organisation's volume by id or name.
async fn org_volume(state: &AppState, org: String, key: &str) -> ApiResult<VolumeRow> {
    let db = state.services.db.clone();
    let lookup = key.to_string();
    blocking(move || db.volume_by_id_or_name(&org, &lookup))
        .await?
        .ok_or_else(|| {
            ApiError::not_found(format!("volume {key} not found")).with_code("VOLUME_NOT_FOUND")
        })
}

fn settings(state: &AppState) -> ApiResult<Arc<S3Settings>> {
    state.s3.clone().ok_or_else(|| {
        ApiError::conflict("the S3 gateway is not enabled on this server (set --s3-listen)")
            .with_code("S3_GATEWAY_DISABLED")
    })
}

fn check_prefix(prefix: &str) -> ApiResult<()> {
    let invalid =
        |why: &str| Err(ApiError::bad_request(format!("prefix {why}")).with_code("INVALID_PREFIX"));
    if prefix.len() > MAX_PREFIX_LEN {
        return invalid(&format!("is longer than {MAX_PREFIX_LEN} bytes"));
    }
    if prefix.starts_with('/') {
        return invalid("starts with '/' (keys are relative to the volume's root: 'a/b' is /a/b)");
    }
    if prefix.contains('\0') {
        return invalid("contains a NUL byte");
    }
    Ok(())
}

/// Mints S3 credentials for the volume.
#[utoipa::path(
    post, operation_id = "createVolumeS3Credentials", path = "/api/volumes/{volumeId}/s3-credentials", tag = "s3 gateway",
    params(("volumeId" = String, Path, description = "Volume id or name")),
    request_body = CreateS3Credentials,
    responses(
        (status = 201, description = "the credentials; the secret is shown only this once", body = S3CredentialsDto),
        (status = 404, body = ErrorBody),
        (status = 409, description = "VOLUME_NOT_READY, or S3_GATEWAY_DISABLED", body = ErrorBody)
    )
)]
pub async fn create(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath(volume_key): ApiPath<String>,
    ApiJson(body): ApiJson<CreateS3Credentials>,
) -> ApiResult<(StatusCode, Json<S3CredentialsDto>)> {
    let settings = settings(&state)?;
    let prefix = body.prefix.unwrap_or_default();
    check_prefix(&prefix)?;
    let expires_in = body.expires_in_seconds.unwrap_or(DEFAULT_EXPIRY_SECS);
    if !(1..=MAX_EXPIRY_SECS).contains(&expires_in) {
        return Err(ApiError::bad_request(format!(
            "expiresInSeconds must be 1 to {MAX_EXPIRY_SECS}"
        )));
    }
    let volume = org_volume(&state, org.clone(), &volume_key).await?;
    if volume.state != volume_state::READY {
        return Err(ApiError::conflict(format!(
            "volume {} is {}: only a ready volume is served",
            volume.id, volume.state
        ))
        .with_code("VOLUME_NOT_READY"));
    }
    let expires_at_ms = crate::db::now_ms().saturating_add((expires_in * 1000) as i64);
    // 20 characters like AWS's ids, from 80 random bits.
    let access_key_id = format!(
        "CK{}",
        &uuid::Uuid::new_v4().simple().to_string()[..18].to_uppercase()
    );
    let row = S3CredentialRow {
        access_key_id: access_key_id.clone(),
        org_id: org,
        volume_id: volume.id.clone(),
        prefix: prefix.clone(),
        // A snapshot never changes: its credentials are read-only whatever was asked.
        read_only: body.read_only.unwrap_or(false)
            || volume.kind == crate::db::volume_kind::SNAPSHOT,
        expires_at_ms: Some(expires_at_ms),
        created_at: crate::db::now(),
    };
    let read_only = row.read_only;
    let db = state.services.db.clone();
    blocking(move || db.insert_s3_credential(&row)).await?;
    Ok((
        StatusCode::CREATED,
        Json(S3CredentialsDto {
            secret_access_key: settings.secret(&access_key_id),
            access_key_id,
            bucket: volume.name,
            endpoint: settings.endpoint.clone(),
            region: REGION.to_string(),
            prefix,
            read_only,
            expires_at: rfc3339(expires_at_ms),
        }),
    ))
}

/// The volume's credentials that are not revoked (expired ones included), without secrets.
#[utoipa::path(
    get, operation_id = "listVolumeS3Credentials", path = "/api/volumes/{volumeId}/s3-credentials", tag = "s3 gateway",
    params(("volumeId" = String, Path, description = "Volume id or name")),
    responses((status = 200, body = [S3CredentialInfo]), (status = 404, body = ErrorBody))
)]
pub async fn list(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath(volume_key): ApiPath<String>,
) -> ApiResult<Json<Vec<S3CredentialInfo>>> {
    let volume = org_volume(&state, org.clone(), &volume_key).await?;
    let db = state.services.db.clone();
    let id = volume.id.clone();
    let rows = blocking(move || db.list_s3_credentials(&org, &id)).await?;
    Ok(Json(
        rows.into_iter().map(|r| info(r, &volume.name)).collect(),
    ))
}

/// Revokes a credential: its next request is refused.
#[utoipa::path(
    delete, operation_id = "revokeVolumeS3Credentials", path = "/api/volumes/{volumeId}/s3-credentials/{accessKeyId}", tag = "s3 gateway",
    params(
        ("volumeId" = String, Path, description = "Volume id or name"),
        ("accessKeyId" = String, Path, description = "The credential's access key id")
    ),
    responses((status = 204, description = "revoked"), (status = 404, body = ErrorBody))
)]
pub async fn revoke(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath((volume_key, access_key_id)): ApiPath<(String, String)>,
) -> ApiResult<StatusCode> {
    let volume = org_volume(&state, org.clone(), &volume_key).await?;
    let db = state.services.db.clone();
    let key = access_key_id.clone();
    let revoked = blocking(move || db.revoke_s3_credential(&org, &volume.id, &key)).await?;
    if !revoked {
        return Err(ApiError::not_found(format!(
            "no live S3 credential {access_key_id} on this volume"
        )));
    }
    Ok(StatusCode::NO_CONTENT)
}
