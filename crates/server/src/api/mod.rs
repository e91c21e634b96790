//! HTTP surface: the Daytona REST subset under `/api`, the toolbox under `/toolbox`.

pub(crate) mod events;
mod extract;
mod files;
pub(crate) mod gateway;
mod limits;
mod runners;
pub(crate) mod sandboxes;
mod toolbox;
mod volumes;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::lifecycle::Services;

#[derive(Clone)]
pub struct AppState {
    pub services: Arc<Services>,
    /// Absolute base of the toolbox endpoints, without a trailing slash.
    pub toolbox_url: String,
    /// `http://host:port` clients reach this server at (signed URLs start with it).
    pub base_url: String,
    /// Requests per API key.
    pub rate: Arc<limits::RateLimiter>,
    /// The followers of volume change logs behind the event streams.
    pub events: Arc<events::EventHub>,
    /// The S3 gateway, when it is enabled.
    pub s3: Option<Arc<gateway::S3Settings>>,
}

impl AppState {
    pub fn new(services: Arc<Services>, base_url: String) -> AppState {
        let limits = services.config.limits;
        AppState {
            services,
            toolbox_url: format!("{base_url}/toolbox"),
            base_url,
            rate: Arc::new(limits::RateLimiter::new(
                limits.rate_per_sec,
                limits.rate_burst,
            )),
            events: Arc::default(),
            s3: None,
        }
    }
}

/// The organisation the request's API key belongs to.
#[derive(Clone)]
pub struct Org(pub String);

pub fn router(state: AppState) -> Router {
    let limits = state.services.config.limits;
    let body_limit = |kind| {
        let limit = match kind {
            limits::BodyKind::Request => limits.max_body_bytes,
            limits::BodyKind::Upload => limits.max_upload_bytes,
        };
        middleware::from_fn_with_state((limit, kind), limits::limit_body)
    };
    let api = Router::new()
        .route("/volumes", get(volumes::list).post(volumes::create))
        .route("/volumes/by-name/{name}", get(volumes::get_by_name))
        .route(
            "/volumes/{volume_id}",
            get(volumes::get)
                .patch(volumes::update)
                .delete(volumes::delete),
        )
        .route(
            "/volumes/{volume_id}/snapshots",
            get(volumes::list_snapshots).post(volumes::create_snapshot),
        )
        .route(
            "/volumes/{volume_id}/snapshots/{snapshot_id}",
            delete(volumes::delete_snapshot),
        )
        .route("/volumes/{volume_id}/fork", post(volumes::fork))
        .route(
            "/volumes/{volume_id}/files",
            get(files::list).delete(files::delete),
        )
        .route("/volumes/{volume_id}/files/stat", get(files::stat))
        .route("/volumes/{volume_id}/files/mkdir", post(files::mkdir))
        .route("/volumes/{volume_id}/files/move", post(files::move_file))
        .route("/volumes/{volume_id}/files/mode", post(files::set_mode))
        .route("/volumes/{volume_id}/files/url", post(files::sign_url))
        .route("/volumes/{volume_id}/events", get(events::events))
        .route(
            "/sandbox/{sandbox_id}/volumes",
            post(sandboxes::attach_volume).delete(sandboxes::detach_volume),
        )
        .route(
            "/volumes/{volume_id}/s3-credentials",
            get(gateway::list).post(gateway::create),
        )
        .route(
            "/volumes/{volume_id}/s3-credentials/{access_key_id}",
            delete(gateway::revoke),
        )
        .route("/sandbox", get(sandboxes::list).post(sandboxes::create))
        .route(
            "/sandbox/{id_or_name}",
            get(sandboxes::get).delete(sandboxes::delete),
        )
        .route(
            "/sandbox/{id_or_name}/toolbox-proxy-url",
            get(sandboxes::toolbox_proxy_url),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .route("/openapi.json", get(openapi_json))
        .route_layer(body_limit(limits::BodyKind::Request))
        // An API key or a signed URL: the handlers check which.
        .route(
            "/volumes/{volume_id}/files/content",
            get(files::download)
                .layer(body_limit(limits::BodyKind::Request))
                .merge(put(files::upload).layer(body_limit(limits::BodyKind::Upload))),
        );
    let toolbox = Router::new()
        .route("/{sandbox_id}/process/execute", post(toolbox::execute))
        .route(
            "/{sandbox_id}/files/bulk-download",
            post(toolbox::bulk_download),
        )
        .route(
            "/{sandbox_id}/files/folder",
            post(toolbox::fs::create_folder),
        )
        .route(
            "/{sandbox_id}/files",
            get(toolbox::fs::list_files).delete(toolbox::fs::delete_file),
        )
        .route("/{sandbox_id}/files/info", get(toolbox::fs::get_file_info))
        .route("/{sandbox_id}/files/move", post(toolbox::fs::move_file))
        .route(
            "/{sandbox_id}/files/permissions",
            post(toolbox::fs::set_file_permissions),
        )
        .route("/{sandbox_id}/files/find", get(toolbox::fs::find_in_files))
        .route("/{sandbox_id}/files/search", get(toolbox::fs::search_files))
        .route(
            "/{sandbox_id}/files/replace",
            post(toolbox::fs::replace_in_files),
        )
        .route_layer(body_limit(limits::BodyKind::Request))
        // Uploads are streamed to the sandbox: only the larger upload limit applies.
        .route(
            "/{sandbox_id}/files/bulk-upload",
            post(toolbox::bulk_upload).layer(body_limit(limits::BodyKind::Upload)),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    let runner_api = Router::new()
        .route("/register", post(runners::register))
        .route("/heartbeat", post(runners::heartbeat))
        .route_layer(body_limit(limits::BodyKind::Request))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            runners::authenticate,
        ));
    Router::new()
        .route("/metrics", get(metrics))
        .nest("/api", api)
        .nest("/toolbox", toolbox)
        .nest("/runner-api/v1", runner_api)
        // The limits above replace axum's fixed 2 MB for the extractors that buffer a body.
        .layer(DefaultBodyLimit::disable())
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this endpoint",
            )
        })
        .with_state(state)
}

/// The key of `Authorization: Bearer <key>`; the scheme is case-insensitive (RFC 9110), the key
/// is not.
pub(crate) fn bearer_key(header: &str) -> Option<&str> {
    let (scheme, key) = header.trim_start().split_once([' ', '\t'])?;
    let key = key.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !key.is_empty()).then_some(key)
}

/// The organisation of the request's `Authorization: Bearer <key>`, or 401.
pub(crate) async fn org_of(state: &AppState, headers: &HeaderMap) -> ApiResult<String> {
    let key = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_key)
        .map(str::to_string)
        .ok_or_else(ApiError::unauthorized)?;
    let db = state.services.db.clone();
    let checked = key.clone();
    let org = blocking(move || db.org_for_key(&checked))
        .await?
        .ok_or_else(ApiError::unauthorized)?;
    state.rate.check(&key).map_err(limits::too_many_requests)?;
    Ok(org)
}

/// Resolves `Authorization: Bearer <key>` to an organisation, or answers 401.
async fn authenticate(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    match org_of(&state, request.headers()).await {
        Ok(org) => {
            request.extensions_mut().insert(Org(org));
            next.run(request).await
        }
        Err(e) => e.into_response(),
    }
}

/// Prometheus metrics of this process (docs/METRICS.md). Open unless a metrics token is set:
/// aggregate counts and latencies by operation name, nothing naming a volume, organisation,
/// path or key; the token keeps other tenants from watching the server's activity.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "metrics",
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "OpenMetrics text exposition", content_type = "application/openmetrics-text", body = String),
        (status = 401, description = "a metrics token is configured and the request lacks it", body = ErrorBody),
    )
)]
async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(token) = &state.services.config.metrics_token {
        let given = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_key);
        if !given.is_some_and(|given| same_secret(given.as_bytes(), token.0.as_bytes())) {
            return ApiError::unauthorized().into_response();
        }
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            cellar_metrics::CONTENT_TYPE,
        )],
        cellar_metrics::encode(),
    )
        .into_response()
}

/// Compares secrets in time independent of where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// Runs a blocking call (the control database, the vfs) off the async workers.
pub async fn blocking<T: Send + 'static, E: Into<ApiError> + Send + 'static>(
    work: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> ApiResult<T> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(Into::into),
        Err(e) => Err(ApiError::internal(e)),
    }
}

impl From<crate::db::DbError> for ApiError {
    fn from(err: crate::db::DbError) -> ApiError {
        use crate::db::DbError;
        match err {
            DbError::Conflict(message) => ApiError::conflict(message),
            DbError::Invalid(message) => ApiError::bad_request(message),
            DbError::NotFound(message) => ApiError::not_found(message),
            DbError::Unavailable(message) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message)
            }
            other => ApiError::internal(other),
        }
    }
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        // Every listed endpoint needs the key and reads some input: each may answer 401 and 400.
        let error = |description: &str| {
            utoipa::openapi::ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    utoipa::openapi::ContentBuilder::new()
                        .schema(Some(utoipa::openapi::Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
        };
        let mut rate_limited = error("this API key is over its request rate (rate_limit)");
        rate_limited.headers.insert(
            "Retry-After".to_string(),
            utoipa::openapi::HeaderBuilder::new()
                .schema(Some(
                    utoipa::openapi::ObjectBuilder::new()
                        .schema_type(utoipa::openapi::schema::Type::Integer),
                ))
                .description(Some("seconds until the key may send again"))
                .build()
                .into(),
        );
        // Every request is subject to the size and rate limits too.
        let common = [
            ("400", error("invalid input; the message names the field")),
            ("401", error("missing or invalid API key")),
            (
                "413",
                error("the request body is over the server's limit (max_body_bytes, max_upload_bytes)"),
            ),
            ("429", rate_limited),
        ];
        for item in openapi.paths.paths.values_mut() {
            for operation in [
                &mut item.get,
                &mut item.post,
                &mut item.delete,
                &mut item.put,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                for (status, response) in &common {
                    operation
                        .responses
                        .responses
                        .entry(status.to_string())
                        .or_insert_with(|| response.clone().into());
                }
            }
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Cellar API",
        description = "Volumes and sandboxes behind the Daytona REST subset. Every endpoint \
                       except this document needs `Authorization: Bearer <api key>`; a file's \
                       content may instead be transferred with a signed URL."
    ),
    paths(
        volumes::list,
        volumes::create,
        volumes::get_by_name,
        volumes::get,
        volumes::update,
        volumes::delete,
        volumes::create_snapshot,
        volumes::list_snapshots,
        volumes::delete_snapshot,
        volumes::fork,
        files::list,
        files::stat,
        files::download,
        files::upload,
        files::mkdir,
        files::move_file,
        files::delete,
        files::set_mode,
        files::sign_url,
        events::events,
        gateway::create,
        gateway::list,
        gateway::revoke,
        sandboxes::list,
        sandboxes::create,
        sandboxes::get,
        sandboxes::delete,
        sandboxes::attach_volume,
        sandboxes::detach_volume,
        sandboxes::toolbox_proxy_url,
        toolbox::execute,
        toolbox::bulk_upload,
        toolbox::bulk_download,
        toolbox::fs::create_folder,
        toolbox::fs::list_files,
        toolbox::fs::get_file_info,
        toolbox::fs::delete_file,
        toolbox::fs::move_file,
        toolbox::fs::set_file_permissions,
        toolbox::fs::find_in_files,
        toolbox::fs::search_files,
        toolbox::fs::replace_in_files,
        metrics,
    ),
    components(schemas(ErrorBody, events::EventFrame, events::ChangeEvent, events::LostEvent)),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
pub struct ApiDoc;

async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

#[cfg(test)]
mod tests {
    use super::bearer_key;

    #[test]
    fn bearer_scheme_is_case_insensitive_and_the_key_is_not_touched() {
        for header in [
            "Bearer k1",
            "bearer k1",
            "BEARER k1",
            "BeArEr   k1 ",
            "Bearer\tk1",
        ] {
            assert_eq!(bearer_key(header), Some("k1"), "{header:?}");
        }
        assert_eq!(bearer_key("Bearer K1"), Some("K1"));
        for header in ["Bearer", "Bearer ", "Basic k1", "Bearerk1", "k1", ""] {
            assert_eq!(bearer_key(header), None, "{header:?}");
        }
    }
}
