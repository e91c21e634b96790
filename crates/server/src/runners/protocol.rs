//! The runner protocol's messages. A runner calls the server (`/runner-api/v1/register`,
//! `/runner-api/v1/heartbeat`, with its runner token); the server calls the runner
//! (`/v1/sandboxes/...`, with the callback token the runner sent when it registered).

use axum::http::StatusCode;
use cellar_runner::RunnerError;
use serde::{Deserialize, Serialize};

/// How often a runner heartbeats.
pub const HEARTBEAT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// A runner joining: who it is, where the server reaches it, what it runs.
#[derive(Serialize, Deserialize)]
pub struct Register {
    pub name: String,
    /// Stable per runner data directory: a restarted runner is the same instance.
    pub instance: String,
    /// Base URL of the runner's API, as the server reaches it.
    pub url: String,
    pub capacity: u32,
    /// What the server must send (as a bearer token) to call the runner.
    pub callback_token: String,
    /// Ids of the sandboxes it runs.
    pub sandboxes: Vec<String>,
}

/// Every [`HEARTBEAT_INTERVAL`]: what the runner runs now.
#[derive(Debug, Serialize, Deserialize)]
pub struct Heartbeat {
    pub name: String,
    pub instance: String,
    pub capacity: u32,
    pub sandboxes: Vec<String>,
}

/// The server's answer to a registration or heartbeat.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Directive {
    /// Sandboxes the runner runs that the server no longer wants: the runner destroys them.
    pub destroy: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FileQuery {
    pub path: String,
}

/// `DELETE /v1/sandboxes/{id}/mounts`: which volume mount to detach.
#[derive(Debug, Serialize, Deserialize)]
pub struct DetachQuery {
    pub path: String,
    #[serde(default)]
    pub force: bool,
}

/// A runner's error as it travels: the variant and its message.
#[derive(Debug, Serialize, Deserialize)]
pub struct WireError {
    pub kind: String,
    pub message: String,
}

pub fn error_to_wire(err: RunnerError) -> (StatusCode, WireError) {
    let (status, kind, message) = match err {
        RunnerError::NotFound(m) => (StatusCode::NOT_FOUND, "not_found", m),
        RunnerError::InvalidInput(m) => (StatusCode::BAD_REQUEST, "invalid_input", m),
        RunnerError::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", m),
        RunnerError::Busy(m) => (StatusCode::CONFLICT, "busy", m),
        RunnerError::Io(e) => (StatusCode::INTERNAL_SERVER_ERROR, "io", e.to_string()),
    };
    (
        status,
        WireError {
            kind: kind.to_string(),
            message,
        },
    )
}

pub fn error_from_wire(err: WireError) -> RunnerError {
    match err.kind.as_str() {
        "not_found" => RunnerError::NotFound(err.message),
        "invalid_input" => RunnerError::InvalidInput(err.message),
        "unavailable" => RunnerError::Unavailable(err.message),
        "busy" => RunnerError::Busy(err.message),
        _ => RunnerError::Io(std::io::Error::other(err.message)),
    }
}
