//! `/runner-api/v1`: where `cellar runner` processes register and heartbeat, authenticated with
//! a runner token (`cellar admin runner-token create`). Not part of the Daytona API.

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use super::extract::ApiJson;
use super::{bearer_key, blocking, AppState};
use crate::db::{HeartbeatOutcome, RunnerReport};
use crate::error::{ApiError, ApiResult};
use crate::runners::protocol::{Directive, Heartbeat, Register};
use crate::runners::{RemoteRunner, RunnerHandle};
use crate::validate::validate_runner_name;

/// The id of the runner token the request presented.
#[derive(Clone)]
pub struct RunnerToken(String);

fn refused() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::UNAUTHORIZED,
        "missing, unknown or revoked runner token (send Authorization: Bearer <runner token>)",
    )
}

pub async fn authenticate(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let token = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_key)
        .map(str::to_string);
    let Some(token) = token else {
        return refused().into_response();
    };
    let db = state.services.db.clone();
    match blocking(move || db.runner_token_id(&token)).await {
        Ok(Some(id)) => {
            request.extensions_mut().insert(RunnerToken(id));
            next.run(request).await
        }
        Ok(None) => refused().into_response(),
        Err(e) => e.into_response(),
    }
}

fn timeout_ms(state: &AppState) -> i64 {
    i64::try_from(state.services.config.runner_timeout.as_millis()).unwrap_or(i64::MAX)
}

/// A runner joins or rejoins: the server records it, answers which of its sandboxes to destroy
/// and from now on calls it at `url` with its callback token.
pub async fn register(
    State(state): State<AppState>,
    Extension(RunnerToken(token_id)): Extension<RunnerToken>,
    ApiJson(body): ApiJson<Register>,
) -> ApiResult<Json<Directive>> {
    validate_runner_name(&body.name).map_err(ApiError::bad_request)?;
    let url = body.url.trim_end_matches('/').to_string();
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(ApiError::bad_request(format!(
            "runner url {url:?} must start with http:// or https://"
        )));
    }
    if body.capacity == 0 {
        return Err(ApiError::bad_request("runner capacity must be at least 1"));
    }
    let timeout = timeout_ms(&state);
    let db = state.services.db.clone();
    let (name, instance, capacity, sandboxes) = (
        body.name.clone(),
        body.instance.clone(),
        body.capacity,
        body.sandboxes.clone(),
    );
    // Callable before the database shows the runner live: the scheduler, which reads the
    // database, must never pick a runner this process cannot call yet. A registration the
    // database refuses (another live runner of that name) puts the earlier handle back.
    let (inserted, replaced) = state.services.runners.insert(
        &body.name,
        RunnerHandle::Remote(RemoteRunner::new(&body.name, &url, body.callback_token)),
    );
    let registered_url = url.clone();
    let destroy = blocking(move || {
        let report = RunnerReport {
            name: &name,
            instance: &instance,
            capacity,
            sandboxes: &sandboxes,
        };
        db.register_runner(
            &report,
            &registered_url,
            &token_id,
            crate::db::now_ms(),
            timeout,
        )
    })
    .await
    .inspect_err(|_| {
        state
            .services
            .runners
            .undo_insert(&body.name, &inserted, replaced)
    })?;
    tracing::info!(
        runner = %body.name,
        "runner registered from {url} (capacity {}, running {}, to destroy {})",
        body.capacity,
        body.sandboxes.len(),
        destroy.len()
    );
    Ok(Json(Directive { destroy }))
}

/// A heartbeat: 404 when the server does not know this runner instance (it must register).
pub async fn heartbeat(
    State(state): State<AppState>,
    Extension(RunnerToken(token_id)): Extension<RunnerToken>,
    ApiJson(body): ApiJson<Heartbeat>,
) -> ApiResult<Json<Directive>> {
    let unknown = || ApiError::not_found("unknown runner instance: register first");
    // After a server restart the database knows the runner but this process cannot call it.
    if state.services.runners.get(&body.name).is_none() {
        return Err(unknown());
    }
    let db = state.services.db.clone();
    let name = body.name.clone();
    let outcome = blocking(move || {
        let report = RunnerReport {
            name: &body.name,
            instance: &body.instance,
            capacity: body.capacity,
            sandboxes: &body.sandboxes,
        };
        db.heartbeat_runner(&report, &token_id, crate::db::now_ms())
    })
    .await?;
    match outcome {
        HeartbeatOutcome::Unknown => Err(unknown()),
        HeartbeatOutcome::Accepted { destroy, rejoined } => {
            if rejoined {
                tracing::info!(runner = %name, "lost runner is back (reconciled)");
            }
            Ok(Json(Directive { destroy }))
        }
    }
}
