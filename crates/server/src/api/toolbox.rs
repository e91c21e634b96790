//! `/toolbox/{sandboxId}/...`: exec and file transfer, streamed through the runner; the other
//! file calls are in [`fs`].

pub(super) mod fs;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Multipart, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use cellar_runner::{ExecRequest, RunnerError};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncSeekExt;
use tokio::sync::mpsc;
use tokio_util::io::{ReaderStream, StreamReader};
use utoipa::ToSchema;

use super::extract::{ApiJson, ApiPath};
use super::{blocking, AppState, Org};
use crate::db::sandbox_state;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::runners::{ByteStream, RunnerHandle};
use crate::validate::{validate_env, validate_toolbox_path, MAX_COMMAND_LEN};

#[derive(Debug, Deserialize, ToSchema)]
pub struct ExecuteRequest {
    /// A shell line (`&&`, pipes and redirects work).
    pub command: String,
    /// Working directory (default: the user's home).
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub envs: Option<BTreeMap<String, String>>,
    /// Seconds; on expiry the command is killed and the exit code is 124.
    #[serde(default)]
    pub timeout: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecuteResponse {
    pub exit_code: i32,
    /// stdout and stderr, interleaved.
    pub result: String,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct BulkDownloadRequest {
    pub paths: Vec<String>,
}

pub(crate) fn runner_error(err: RunnerError) -> ApiError {
    match err {
        RunnerError::NotFound(what) => ApiError::not_found(format!("not found: {what}")),
        RunnerError::InvalidInput(why) => ApiError::bad_request(why),
        RunnerError::Unavailable(why) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, why),
        RunnerError::Busy(why) => ApiError::conflict(why),
        RunnerError::Io(e) => ApiError::internal(e),
    }
}

/// A started sandbox: its id and the runner it runs on.
type Sandbox = (String, Arc<RunnerHandle>);

/// The sandbox must belong to the caller's organisation and be started.
async fn started_sandbox(state: &AppState, org: &str, id: &str) -> ApiResult<Sandbox> {
    let db = state.services.db.clone();
    let (org, key) = (org.to_string(), id.to_string());
    let sandbox = blocking(move || db.sandbox(&org, &key)).await?;
    let sandbox = sandbox.ok_or_else(|| ApiError::not_found(format!("sandbox {id} not found")))?;
    if sandbox.state != sandbox_state::STARTED {
        return Err(ApiError::bad_request(format!(
            "sandbox {id} is not started (state {})",
            crate::api::sandboxes::api_state(&sandbox.state)
        )));
    }
    let runner = state
        .services
        .runner(&sandbox.runner_id)
        .map_err(runner_error)?;
    Ok((sandbox.id, runner))
}

/// Runs a shell line in the sandbox; a non-zero exit is a normal answer.
#[utoipa::path(
    post, operation_id = "executeCommand", path = "/toolbox/{sandboxId}/process/execute", tag = "toolbox",
    params(("sandboxId" = String, Path, description = "Sandbox id")),
    request_body = ExecuteRequest,
    responses((status = 200, body = ExecuteResponse), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody))
)]
pub async fn execute(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath(sandbox_id): ApiPath<String>,
    ApiJson(body): ApiJson<ExecuteRequest>,
) -> ApiResult<Json<ExecuteResponse>> {
    let invalid = |why: String| Err(ApiError::bad_request(why));
    if body.command.contains('\0') {
        return invalid("invalid command: must not contain NUL characters".into());
    }
    if body.command.len() > MAX_COMMAND_LEN {
        return invalid(format!(
            "invalid command: at most {MAX_COMMAND_LEN} bytes (send a longer script as a file)"
        ));
    }
    let cwd = body.cwd.filter(|cwd| !cwd.is_empty());
    if let Some(cwd) = cwd.as_deref() {
        validate_toolbox_path("cwd", cwd).map_err(ApiError::bad_request)?;
    }
    let env = body.envs.unwrap_or_default();
    validate_env("envs", &env).map_err(ApiError::bad_request)?;
    let (id, runner) = started_sandbox(&state, &org, &sandbox_id).await?;
    let request = ExecRequest {
        command: body.command,
        cwd,
        env,
        timeout: body.timeout.filter(|t| *t > 0).map(Duration::from_secs),
        ..ExecRequest::default()
    };
    let result = runner.exec(&id, request).await.map_err(runner_error)?;
    Ok(Json(ExecuteResponse {
        exit_code: result.exit_code,
        result: result.output,
    }))
}

/// Which field of `files[i].path` / `files[i].file` a multipart part is.
enum UploadField {
    Path(usize),
    File(usize),
}

fn parse_field_name(name: &str) -> Option<UploadField> {
    let rest = name.strip_prefix("files[")?;
    let (index, field) = rest.split_once("].")?;
    let index = index.parse().ok()?;
    match field {
        "path" => Some(UploadField::Path(index)),
        "file" => Some(UploadField::File(index)),
        _ => None,
    }
}

/// A request body being read; remembers a read failure, so that it is told apart from the
/// runner's own errors.
struct ClientBody<R> {
    inner: R,
    failure: Option<String>,
}

impl<R> ClientBody<R> {
    fn new(inner: R) -> ClientBody<R> {
        ClientBody {
            inner,
            failure: None,
        }
    }
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for ClientBody<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Err(e)) = &polled {
            self.failure = Some(e.to_string());
        }
        polled
    }
}

/// Uploads files: for each i a text field `files[i].path` and a file part `files[i].file`. File
/// contents are streamed into the sandbox; a file part that arrives before its path is spooled
/// to a temporary file (never held in memory).
#[utoipa::path(
    post, operation_id = "uploadFiles", path = "/toolbox/{sandboxId}/files/bulk-upload", tag = "toolbox",
    params(("sandboxId" = String, Path, description = "Sandbox id")),
    request_body(content_type = "multipart/form-data", description = "files[i].path and files[i].file parts"),
    responses((status = 200, description = "all files written"), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody))
)]
pub async fn bulk_upload(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath(sandbox_id): ApiPath<String>,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> ApiResult<()> {
    let mut multipart =
        multipart.map_err(|e| ApiError::bad_request(format!("invalid multipart body: {e}")))?;
    let (id, runner) = started_sandbox(&state, &org, &sandbox_id).await?;
    let mut paths: HashMap<usize, String> = HashMap::new();
    let mut spooled: HashMap<usize, tokio::fs::File> = HashMap::new();
    let bad_part = |e: axum::extract::multipart::MultipartError| {
        ApiError::bad_request(format!("invalid multipart body: {e}"))
    };
    while let Some(field) = multipart.next_field().await.map_err(bad_part)? {
        let Some(kind) = field.name().and_then(parse_field_name) else {
            continue; // Unknown parts are ignored, like unknown JSON fields.
        };
        match kind {
            UploadField::Path(index) => {
                let path = field.text().await.map_err(bad_part)?;
                validate_toolbox_path(&format!("files[{index}].path"), &path)
                    .map_err(ApiError::bad_request)?;
                if let Some(mut file) = spooled.remove(&index) {
                    file.rewind().await.map_err(ApiError::internal)?;
                    runner
                        .upload(&id, &path, file)
                        .await
                        .map_err(runner_error)?;
                }
                paths.insert(index, path);
            }
            UploadField::File(index) => {
                let mut body =
                    ClientBody::new(StreamReader::new(field.map_err(std::io::Error::other)));
                match paths.get(&index) {
                    Some(path) => {
                        let written = runner.upload(&id, path, &mut body).await;
                        // A broken request body is the client's error, not the runner's.
                        if let Some(e) = body.failure.take() {
                            return Err(ApiError::bad_request(format!(
                                "reading files[{index}].file: {e}"
                            )));
                        }
                        written.map_err(runner_error)?
                    }
                    None => {
                        let spool = tempfile::tempfile().map_err(ApiError::internal)?;
                        let mut spool = tokio::fs::File::from_std(spool);
                        tokio::io::copy(&mut body, &mut spool).await.map_err(|e| {
                            ApiError::bad_request(format!("reading files[{index}].file: {e}"))
                        })?;
                        spooled.insert(index, spool);
                    }
                }
            }
        }
    }
    if let Some(index) = spooled.keys().min() {
        return Err(ApiError::bad_request(format!(
            "files[{index}].file has no files[{index}].path"
        )));
    }
    Ok(())
}

/// Downloads files as `multipart/form-data`: a part `name="file"; filename="<path>"` per file,
/// or a part `name="error"` with a JSON error for a path that cannot be read.
#[utoipa::path(
    post, operation_id = "downloadFiles", path = "/toolbox/{sandboxId}/files/bulk-download", tag = "toolbox",
    params(("sandboxId" = String, Path, description = "Sandbox id")),
    request_body = BulkDownloadRequest,
    responses((status = 200, content_type = "multipart/form-data", description = "one part per path"), (status = 404, body = ErrorBody))
)]
pub async fn bulk_download(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath(sandbox_id): ApiPath<String>,
    ApiJson(body): ApiJson<BulkDownloadRequest>,
) -> ApiResult<Response> {
    for (i, path) in body.paths.iter().enumerate() {
        validate_toolbox_path(&format!("paths[{i}]"), path).map_err(ApiError::bad_request)?;
    }
    let (id, runner) = started_sandbox(&state, &org, &sandbox_id).await?;
    let boundary = format!("cellar-{}", uuid::Uuid::new_v4().simple());
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(8);
    let part_boundary = boundary.clone();
    tokio::spawn(async move {
        for path in body.paths {
            let part = match runner.download(&id, &path).await {
                Ok(file) => Ok(file),
                Err(e) => Err(download_error(&path, e)),
            };
            if !write_part(&tx, &part_boundary, &path, part).await {
                return; // The client went away.
            }
        }
        let _ = tx
            .send(Ok(Bytes::from(format!("--{part_boundary}--\r\n"))))
            .await;
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Ok((
        [(
            CONTENT_TYPE,
            format!("multipart/form-data; boundary={boundary}"),
        )],
        Body::from_stream(stream),
    )
        .into_response())
}

/// The JSON body of an error part, in the shape the Daytona daemon uses.
fn download_error(path: &str, err: RunnerError) -> serde_json::Value {
    let (status, code, message) = match &err {
        RunnerError::NotFound(_) => (404, "FILE_NOT_FOUND", format!("file not found: {path}")),
        RunnerError::InvalidInput(why) => (400, "BAD_REQUEST", why.clone()),
        other => (500, "INTERNAL_ERROR", other.to_string()),
    };
    serde_json::json!({"message": message, "statusCode": status, "code": code, "source": "DAYTONA_DAEMON"})
}

/// `filename="<ASCII fallback>"; filename*=UTF-8''<percent-encoded>` (RFC 6266): the user's
/// path never reaches a header raw. Printable ASCII stays as it is in the fallback (`"` and `\`
/// escaped), which the clients compare with the requested path; other bytes become `_`.
fn filename_params(path: &str) -> String {
    let mut fallback = String::with_capacity(path.len());
    let mut encoded = String::with_capacity(path.len());
    for c in path.chars() {
        match c {
            '"' | '\\' => {
                fallback.push('\\');
                fallback.push(c);
            }
            ' '..='~' => fallback.push(c),
            _ => fallback.push('_'),
        }
    }
    for byte in path.bytes() {
        // RFC 5987 attr-char: ALPHA / DIGIT / "!#$&+-.^_`|~"
        if byte.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    format!("filename=\"{fallback}\"; filename*=UTF-8''{encoded}")
}

/// Sends one part; returns false once the receiver is gone or the file failed midway (the
/// response then ends without its closing boundary, so the client sees a broken body).
async fn write_part(
    tx: &mpsc::Sender<std::io::Result<Bytes>>,
    boundary: &str,
    path: &str,
    part: Result<ByteStream, serde_json::Value>,
) -> bool {
    let (name, content_type) = match &part {
        Ok(_) => ("file", "application/octet-stream"),
        Err(_) => ("error", "application/json"),
    };
    let header = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; {}\r\n\
         Content-Type: {content_type}\r\n\r\n",
        filename_params(path)
    );
    if tx.send(Ok(Bytes::from(header))).await.is_err() {
        return false;
    }
    match part {
        Ok(file) => {
            let mut chunks = ReaderStream::new(file);
            while let Some(chunk) = futures::StreamExt::next(&mut chunks).await {
                let failed = chunk.is_err();
                if tx.send(chunk).await.is_err() || failed {
                    return false;
                }
            }
        }
        Err(error) => {
            if tx.send(Ok(Bytes::from(error.to_string()))).await.is_err() {
                return false;
            }
        }
    }
    tx.send(Ok(Bytes::from_static(b"\r\n"))).await.is_ok()
}
