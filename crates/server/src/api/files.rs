//! `/api/volumes/{volumeId}/files*`: the files of a volume without a sandbox — list, stat,
//! download (Range), streamed upload with atomic replace, mkdir, move, delete, mode, and signed
//! URLs for one download or upload without an API key.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header::{
    ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG, LAST_MODIFIED, RANGE,
};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::extract::{ApiJson, ApiPath, ApiQuery};
use super::{blocking, org_of, AppState, Org};
use crate::db::{volume_state, VolumeRow};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::files::signing::{SignatureError, MAX_EXPIRY_SECS};
use crate::files::{self, Entry, EntryKind, FileError, Lease, VolumePath};

/// Bytes moved per vfs call and per body piece of a transfer; a transfer holds a few of them.
const PIECE: usize = 1 << 20;
/// Pieces queued between the HTTP body and the vfs thread of one transfer.
const QUEUED_PIECES: usize = 4;
const DEFAULT_LIST_LIMIT: usize = 1000;
const DEFAULT_URL_EXPIRY_SECS: u64 = 3600;

/// One file, directory or link.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FileEntry {
    /// Absolute path inside the volume.
    pub path: String,
    pub name: String,
    /// file, directory, symlink or other.
    #[serde(rename = "type")]
    pub kind: String,
    pub size: u64,
    /// Permission bits in octal, e.g. "0644".
    pub mode: String,
    pub modified_at: String,
    /// A symlink's target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

impl From<Entry> for FileEntry {
    fn from(entry: Entry) -> FileEntry {
        let kind = match entry.kind {
            EntryKind::File => "file",
            EntryKind::Directory => "directory",
            EntryKind::Symlink => "symlink",
            EntryKind::Other => "other",
        };
        FileEntry {
            path: entry.path,
            name: entry.name,
            kind: kind.to_string(),
            size: entry.size,
            mode: format!("{:04o}", entry.mode),
            modified_at: humantime::format_rfc3339_millis(entry.modified).to_string(),
            target: entry.target,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FileListing {
    pub entries: Vec<FileEntry>,
    /// Pass as `cursor` for the next page; null on the last one.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
pub struct ListQuery {
    /// Directory to list (default `/`).
    #[serde(default = "root")]
    pub path: String,
    /// Every descendant, depth first, instead of the directory's entries.
    #[serde(default)]
    pub recursive: bool,
    /// At most this many entries (default 1000, at most 10000).
    pub limit: Option<usize>,
    /// The `nextCursor` of the previous page.
    pub cursor: Option<String>,
}

fn root() -> String {
    "/".to_string()
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct PathQuery {
    /// Absolute path inside the volume.
    pub path: String,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct DeleteQuery {
    pub path: String,
    /// Delete a directory and everything in it.
    #[serde(default)]
    pub recursive: bool,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct DownloadQuery {
    pub path: String,
    /// Of a signed URL: Unix seconds.
    pub expires: Option<u64>,
    /// Of a signed URL.
    pub signature: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct UploadQuery {
    pub path: String,
    /// Create missing parent directories.
    #[serde(default)]
    pub parents: bool,
    /// Replace an existing file (default true).
    #[serde(default = "yes")]
    pub overwrite: bool,
    /// Permission bits of the new file, octal (default 0644).
    pub mode: Option<String>,
    pub expires: Option<u64>,
    pub signature: Option<String>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct MkdirRequest {
    pub path: String,
    /// Create missing parents; an existing directory is then fine (200).
    #[serde(default)]
    pub parents: bool,
    /// Octal, default "0755".
    pub mode: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct MoveRequest {
    pub from: String,
    pub to: String,
    /// Replace what is at `to`.
    #[serde(default)]
    pub overwrite: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ModeRequest {
    pub path: String,
    /// Octal, e.g. "0755".
    pub mode: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SignedUrlRequest {
    pub path: String,
    /// GET (download) or PUT (upload).
    pub method: String,
    /// Validity, 1 s to 7 days (default 3600).
    pub expires_in_seconds: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SignedUrl {
    pub url: String,
    pub method: String,
    pub expires_at: String,
}

impl From<FileError> for ApiError {
    fn from(err: FileError) -> ApiError {
        let (status, code) = match &err {
            FileError::InvalidPath(_) => (StatusCode::BAD_REQUEST, "INVALID_PATH"),
            FileError::Invalid(_) => (StatusCode::BAD_REQUEST, "BAD_REQUEST"),
            FileError::NotFound(_) => (StatusCode::NOT_FOUND, "FILE_NOT_FOUND"),
            FileError::NotADirectory(_) => (StatusCode::CONFLICT, "NOT_A_DIRECTORY"),
            FileError::IsADirectory(_) => (StatusCode::CONFLICT, "IS_A_DIRECTORY"),
            FileError::NotAFile(_) => (StatusCode::CONFLICT, "NOT_A_FILE"),
            FileError::AlreadyExists(_) => (StatusCode::CONFLICT, "ALREADY_EXISTS"),
            FileError::NotEmpty(_) => (StatusCode::CONFLICT, "DIRECTORY_NOT_EMPTY"),
            FileError::QuotaExceeded(_) => (StatusCode::INSUFFICIENT_STORAGE, "QUOTA_EXCEEDED"),
            FileError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "FILE_TOO_LARGE"),
            FileError::Forbidden(_) => (StatusCode::FORBIDDEN, "FORBIDDEN"),
            FileError::Unavailable(_) => (StatusCode::CONFLICT, "VOLUME_NOT_READY"),
            FileError::Internal(_) => return ApiError::internal(err),
        };
        ApiError::new(status, err.to_string()).with_code(code)
    }
}

fn parse_path(path: &str) -> ApiResult<VolumePath> {
    Ok(VolumePath::parse(path)?)
}

/// An octal mode of at most 4 digits ("644", "0755", "1777").
fn parse_mode(mode: Option<&str>, default: u32) -> ApiResult<u32> {
    let Some(mode) = mode else { return Ok(default) };
    let digits = mode.strip_prefix("0o").unwrap_or(mode);
    let valid = (1..=5).contains(&digits.len()) && digits.chars().all(|c| ('0'..='7').contains(&c));
    match u32::from_str_radix(digits, 8) {
        Ok(bits) if valid && bits <= 0o7777 => Ok(bits),
        _ => Err(ApiError::bad_request(format!(
            "invalid mode {mode:?}: an octal number of permission bits, at most 7777 (e.g. \"0644\")"
        ))
        .with_code("INVALID_MODE")),
    }
}

fn volume_not_found(key: &str) -> ApiError {
    ApiError::not_found(format!("volume {key} not found")).with_code("VOLUME_NOT_FOUND")
}

/// The volume's files, if its state lets them be used (only a `ready` volume has them).
async fn open_volume(state: &AppState, volume: &VolumeRow) -> ApiResult<Lease> {
    if volume.state != volume_state::READY {
        let why = match volume.state.as_str() {
            volume_state::DELETED => "it is deleted",
            volume_state::PENDING_DELETE | volume_state::DELETING => "it is being deleted",
            volume_state::CREATING => "it is still being created",
            _ => "it is not ready",
        };
        return Err(ApiError::conflict(format!(
            "volume {} (state {}) refuses file operations: {why}",
            volume.id, volume.state
        ))
        .with_code("VOLUME_NOT_READY"));
    }
    let config = state.services.volume_config(&volume.id);
    Ok(state.services.files.acquire(&volume.id, config).await?)
}

/// The organisation's volume by id or name.
pub(super) async fn org_volume(state: &AppState, org: String, key: &str) -> ApiResult<VolumeRow> {
    let db = state.services.db.clone();
    let lookup = key.to_string();
    blocking(move || db.volume_by_id_or_name(&org, &lookup))
        .await?
        .ok_or_else(|| volume_not_found(key))
}

async fn org_volume_files(state: &AppState, org: String, key: &str) -> ApiResult<Lease> {
    let volume = org_volume(state, org, key).await?;
    open_volume(state, &volume).await
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Who may transfer `path`: the holder of a signed URL for this method, volume and path, or of
/// an API key of the volume's organisation.
async fn authorize_transfer(
    state: &AppState,
    headers: &HeaderMap,
    volume_key: &str,
    path: &VolumePath,
    method: &str,
    expires: Option<u64>,
    signature: Option<&str>,
) -> ApiResult<VolumeRow> {
    let forbidden = |e: SignatureError| {
        ApiError::new(StatusCode::FORBIDDEN, e.to_string()).with_code("INVALID_SIGNATURE")
    };
    if expires.is_some() || signature.is_some() {
        let (Some(expires), Some(signature)) = (expires, signature) else {
            return Err(forbidden(SignatureError::Incomplete));
        };
        let db = state.services.db.clone();
        let id = volume_key.to_string();
        let volume = blocking(move || db.volume_by_id_in_any_org(&id)).await?;
        // An unknown volume is the same refusal: a URL tells nothing about other volumes.
        let Some(volume) = volume else {
            return Err(forbidden(SignatureError::Mismatch));
        };
        state
            .services
            .signer
            .verify(
                method,
                &volume.id,
                &path.as_string(),
                expires,
                signature,
                now_secs(),
            )
            .map_err(forbidden)?;
        return Ok(volume);
    }
    let org = org_of(state, headers).await?;
    org_volume(state, org, volume_key).await
}

#[utoipa::path(
    get, operation_id = "listVolumeFiles", path = "/api/volumes/{volumeId}/files", tag = "volume files",
    params(("volumeId" = String, Path, description = "Volume id or name"), ListQuery),
    responses(
        (status = 200, body = FileListing),
        (status = 404, description = "no such volume or directory", body = ErrorBody),
        (status = 409, description = "NOT_A_DIRECTORY, or the volume is not ready", body = ErrorBody)
    )
)]
pub async fn list(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath(volume_key): ApiPath<String>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> ApiResult<Json<FileListing>> {
    let path = parse_path(&query.path)?;
    let cursor = query.cursor.as_deref().map(parse_path).transpose()?;
    let limit = query.limit.unwrap_or(DEFAULT_LIST_LIMIT);
    if limit == 0 || limit > files::MAX_LIST_LIMIT {
        return Err(ApiError::bad_request(format!(
            "limit must be 1 to {}",
            files::MAX_LIST_LIMIT
        )));
    }
    let vfs = org_volume_files(&state, org, &volume_key).await?;
    let listing =
        blocking(move || files::list(&vfs, &path, query.recursive, limit, cursor.as_ref())).await?;
    Ok(Json(FileListing {
        entries: listing.entries.into_iter().map(FileEntry::from).collect(),
        next_cursor: listing.next_cursor,
    }))
}

#[utoipa::path(
    get, operation_id = "statVolumeFile", path = "/api/volumes/{volumeId}/files/stat", tag = "volume files",
    params(("volumeId" = String, Path, description = "Volume id or name"), PathQuery),
    responses((status = 200, description = "the node itself (a link is not followed)", body = FileEntry), (status = 404, body = ErrorBody))
)]
pub async fn stat(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath(volume_key): ApiPath<String>,
    ApiQuery(query): ApiQuery<PathQuery>,
) -> ApiResult<Json<FileEntry>> {
    let path = parse_path(&query.path)?;
    let vfs = org_volume_files(&state, org, &volume_key).await?;
    Ok(Json(
        blocking(move || files::stat(&vfs, &path)).await?.into(),
    ))
}

/// A `Range` header, for a file of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
enum ByteRange {
    /// No range (or one this server ignores, as RFC 9110 allows: several, or malformed).
    Whole,
    /// `[start, end)`.
    Part(u64, u64),
    Unsatisfiable,
}

fn parse_range(header: Option<&str>, size: u64) -> ByteRange {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return ByteRange::Whole;
    };
    if spec.contains(',') {
        return ByteRange::Whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return ByteRange::Whole;
    };
    let number = |s: &str| s.trim().parse::<u64>().ok();
    match (first.trim().is_empty(), number(first), number(last)) {
        // bytes=-N: the last N bytes.
        (true, _, Some(n)) => match n {
            0 => ByteRange::Unsatisfiable,
            _ if size == 0 => ByteRange::Unsatisfiable,
            n => ByteRange::Part(size.saturating_sub(n), size),
        },
        (false, Some(start), end) if last.trim().is_empty() || end.is_some() => {
            if end.is_some_and(|end| end < start) {
                return ByteRange::Whole;
            }
            if start >= size {
                return ByteRange::Unsatisfiable;
            }
            let end = end.map_or(size, |end| end.saturating_add(1).min(size));
            ByteRange::Part(start, end)
        }
        _ => ByteRange::Whole,
    }
}

fn header(value: &str) -> HeaderValue {
    HeaderValue::from_str(value).expect("ASCII header value")
}

#[utoipa::path(
    get, operation_id = "downloadVolumeFile", path = "/api/volumes/{volumeId}/files/content", tag = "volume files",
    params(("volumeId" = String, Path, description = "Volume id or name (the id in a signed URL)"), DownloadQuery),
    responses(
        (status = 200, description = "the file", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 206, description = "the requested range", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 403, description = "a signed URL that expired or is for another method or path", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "IS_A_DIRECTORY or NOT_A_FILE (a link or special file)", body = ErrorBody),
        (status = 416, description = "the range is outside the file", body = ErrorBody)
    ),
    security((), ("bearer" = []))
)]
pub async fn download(
    State(state): State<AppState>,
    ApiPath(volume_key): ApiPath<String>,
    method: Method,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<DownloadQuery>,
) -> ApiResult<Response> {
    let path = parse_path(&query.path)?;
    let volume = authorize_transfer(
        &state,
        &headers,
        &volume_key,
        &path,
        "GET",
        query.expires,
        query.signature.as_deref(),
    )
    .await?;
    let vfs = open_volume(&state, &volume).await?;
    let (reader, attr) = blocking(move || files::open_for_read(vfs, &path)).await?;
    let size = attr.size;
    let range = parse_range(headers.get(RANGE).and_then(|v| v.to_str().ok()), size);
    let modified =
        std::time::UNIX_EPOCH + std::time::Duration::from_nanos(attr.mtime_ns.max(0) as u64);
    let mut response = Response::builder()
        .header(ACCEPT_RANGES, "bytes")
        .header(
            ETAG,
            header(&format!(
                "\"{:x}-{:x}-{:x}\"",
                attr.ino, attr.data_version, size
            )),
        )
        .header(LAST_MODIFIED, header(&httpdate::fmt_http_date(modified)));
    let (start, end) = match range {
        ByteRange::Whole => (0, size),
        ByteRange::Part(start, end) => {
            response = response.status(StatusCode::PARTIAL_CONTENT).header(
                CONTENT_RANGE,
                header(&format!("bytes {start}-{}/{size}", end - 1)),
            );
            (start, end)
        }
        ByteRange::Unsatisfiable => {
            let mut refused = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!("the range is outside the file ({size} bytes)"),
            )
            .into_response();
            refused
                .headers_mut()
                .insert(CONTENT_RANGE, header(&format!("bytes */{size}")));
            close_off_thread(reader);
            return Ok(refused);
        }
    };
    let response = response
        .header(CONTENT_TYPE, "application/octet-stream")
        .header(CONTENT_LENGTH, end - start);
    let body = if method == Method::HEAD {
        close_off_thread(reader);
        Body::empty()
    } else {
        stream_file(reader, start, end)
    };
    response.body(body).map_err(ApiError::internal)
}

/// Closing a file is a metadata transaction: not on an async worker.
fn close_off_thread(reader: files::Reader) {
    tokio::task::spawn_blocking(move || drop(reader));
}

/// `[start, end)` of an open file as a body, read a piece at a time on the blocking pool.
fn stream_file(reader: files::Reader, start: u64, end: u64) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(QUEUED_PIECES);
    tokio::task::spawn_blocking(move || {
        let mut offset = start;
        while offset < end {
            let len = (end - offset).min(PIECE as u64) as u32;
            let piece = match reader.read(offset, len) {
                // Shorter than when opened (truncated in place meanwhile): the body ends short
                // of its Content-Length, which the client sees as a failed transfer.
                Ok(data) if data.is_empty() => return,
                Ok(data) => data,
                Err(e) => {
                    tracing::warn!("download failed: {e}");
                    let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
                    return;
                }
            };
            offset += piece.len() as u64;
            // The client went away.
            if tx.blocking_send(Ok(Bytes::from(piece))).is_err() {
                return;
            }
        }
    });
    Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|piece| (piece, rx))
    }))
}

/// What the HTTP side hands the vfs thread of an upload.
enum Piece {
    Data(Bytes),
    /// The body arrived whole: commit. A queue closed without it is an interrupted upload.
    End,
}

#[utoipa::path(
    put, operation_id = "uploadVolumeFile", path = "/api/volumes/{volumeId}/files/content", tag = "volume files",
    params(("volumeId" = String, Path, description = "Volume id or name (the id in a signed URL)"), UploadQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the file's bytes, of any size (chunked allowed)"),
    responses(
        (status = 201, description = "created", body = FileEntry),
        (status = 200, description = "replaced a file (atomically: readers see the old or the new file)", body = FileEntry),
        (status = 403, description = "a signed URL that expired or is for another method or path", body = ErrorBody),
        (status = 404, description = "the parent directory is missing (and parents=false)", body = ErrorBody),
        (status = 409, description = "ALREADY_EXISTS (overwrite=false), IS_A_DIRECTORY, or the volume is not ready", body = ErrorBody),
        (status = 507, description = "QUOTA_EXCEEDED: the volume's quota is exhausted; nothing was changed", body = ErrorBody)
    ),
    security((), ("bearer" = []))
)]
pub async fn upload(
    State(state): State<AppState>,
    ApiPath(volume_key): ApiPath<String>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<UploadQuery>,
    body: Body,
) -> ApiResult<Response> {
    let path = parse_path(&query.path)?;
    let mode = parse_mode(query.mode.as_deref(), 0o644)?;
    let volume = authorize_transfer(
        &state,
        &headers,
        &volume_key,
        &path,
        "PUT",
        query.expires,
        query.signature.as_deref(),
    )
    .await?;
    let vfs = open_volume(&state, &volume).await?;
    let (parents, overwrite) = (query.parents, query.overwrite);
    let upload =
        blocking(move || files::begin_upload(vfs, &path, parents, overwrite, mode)).await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Piece>(QUEUED_PIECES);
    let writer = tokio::task::spawn_blocking(move || {
        let mut upload = upload;
        while let Some(piece) = rx.blocking_recv() {
            match piece {
                Piece::Data(data) => upload.write(&data)?,
                Piece::End => {
                    let replaced = upload.replaces;
                    return upload.finish().map(|entry| (entry, replaced));
                }
            }
        }
        // Dropping the upload discards it.
        Err(FileError::Invalid("the upload was interrupted".into()))
    });
    let received = receive_body(body, &tx).await;
    if received.is_ok() {
        let _ = tx.send(Piece::End).await;
    }
    drop(tx);
    let written = match writer.await {
        Ok(written) => written,
        Err(e) => return Err(ApiError::internal(e)),
    };
    // The writer's own failure (quota, ...) explains a body it stopped taking.
    let (entry, replaced) = match (written, received) {
        (Ok(done), _) => done,
        (Err(FileError::Invalid(_)), Err(why)) => {
            return Err(ApiError::bad_request(format!(
                "the upload was interrupted ({why}); nothing was stored"
            )))
        }
        (Err(e), _) => return Err(e.into()),
    };
    let status = if replaced {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(FileEntry::from(entry))).into_response())
}

/// Feeds the request body to the writer in pieces of about [`PIECE`] bytes. Fails if the body
/// fails (the client went away) or the writer stopped taking pieces.
async fn receive_body(body: Body, tx: &tokio::sync::mpsc::Sender<Piece>) -> Result<(), String> {
    use futures::StreamExt;
    let mut stream = body.into_data_stream();
    let mut pending = bytes::BytesMut::new();
    loop {
        let chunk = match stream.next().await {
            Some(Ok(chunk)) => Some(chunk),
            Some(Err(e)) => return Err(format!("reading the body: {e}")),
            None => None,
        };
        let last = chunk.is_none();
        if let Some(chunk) = chunk {
            pending.extend_from_slice(&chunk);
        }
        if (last && !pending.is_empty()) || pending.len() >= PIECE {
            let piece = pending.split().freeze();
            if tx.send(Piece::Data(piece)).await.is_err() {
                return Err("the file could not be written".into());
            }
        }
        if last {
            return Ok(());
        }
    }
}

#[utoipa::path(
    post, operation_id = "makeVolumeDirectory", path = "/api/volumes/{volumeId}/files/mkdir", tag = "volume files",
    params(("volumeId" = String, Path, description = "Volume id or name")),
    request_body = MkdirRequest,
    responses(
        (status = 201, description = "created", body = FileEntry),
        (status = 200, description = "already a directory (parents=true)", body = FileEntry),
        (status = 404, description = "the parent is missing (parents=false)", body = ErrorBody),
        (status = 409, description = "ALREADY_EXISTS", body = ErrorBody)
    )
)]
pub async fn mkdir(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath(volume_key): ApiPath<String>,
    ApiJson(body): ApiJson<MkdirRequest>,
) -> ApiResult<Response> {
    let path = parse_path(&body.path)?;
    let mode = parse_mode(body.mode.as_deref(), 0o755)?;
    let vfs = org_volume_files(&state, org, &volume_key).await?;
    let (entry, created) =
        blocking(move || files::make_dir(&vfs, &path, body.parents, mode)).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(FileEntry::from(entry))).into_response())
}

#[utoipa::path(
    post, operation_id = "moveVolumeFile", path = "/api/volumes/{volumeId}/files/move", tag = "volume files",
    params(("volumeId" = String, Path, description = "Volume id or name")),
    request_body = MoveRequest,
    responses(
        (status = 200, description = "the entry at its new path", body = FileEntry),
        (status = 404, body = ErrorBody),
        (status = 409, description = "ALREADY_EXISTS (overwrite=false), DIRECTORY_NOT_EMPTY, IS_A_DIRECTORY", body = ErrorBody)
    )
)]
pub async fn move_file(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath(volume_key): ApiPath<String>,
    ApiJson(body): ApiJson<MoveRequest>,
) -> ApiResult<Json<FileEntry>> {
    let from = parse_path(&body.from)?;
    let to = parse_path(&body.to)?;
    let vfs = org_volume_files(&state, org, &volume_key).await?;
    Ok(Json(
        blocking(move || files::rename(&vfs, &from, &to, body.overwrite))
            .await?
            .into(),
    ))
}

#[utoipa::path(
    delete, operation_id = "deleteVolumeFile", path = "/api/volumes/{volumeId}/files", tag = "volume files",
    params(("volumeId" = String, Path, description = "Volume id or name"), DeleteQuery),
    responses(
        (status = 204, description = "deleted"),
        (status = 404, body = ErrorBody),
        (status = 409, description = "DIRECTORY_NOT_EMPTY (without recursive)", body = ErrorBody)
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath(volume_key): ApiPath<String>,
    ApiQuery(query): ApiQuery<DeleteQuery>,
) -> ApiResult<StatusCode> {
    let path = parse_path(&query.path)?;
    let vfs = org_volume_files(&state, org, &volume_key).await?;
    blocking(move || files::remove(&vfs, &path, query.recursive)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post, operation_id = "setVolumeFileMode", path = "/api/volumes/{volumeId}/files/mode", tag = "volume files",
    params(("volumeId" = String, Path, description = "Volume id or name")),
    request_body = ModeRequest,
    responses((status = 200, body = FileEntry), (status = 404, body = ErrorBody), (status = 409, description = "NOT_A_FILE: a link", body = ErrorBody))
)]
pub async fn set_mode(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath(volume_key): ApiPath<String>,
    ApiJson(body): ApiJson<ModeRequest>,
) -> ApiResult<Json<FileEntry>> {
    let path = parse_path(&body.path)?;
    let mode = parse_mode(Some(&body.mode), 0)?;
    let vfs = org_volume_files(&state, org, &volume_key).await?;
    Ok(Json(
        blocking(move || files::set_mode(&vfs, &path, mode))
            .await?
            .into(),
    ))
}

#[utoipa::path(
    post, operation_id = "signVolumeFileUrl", path = "/api/volumes/{volumeId}/files/url", tag = "volume files",
    params(("volumeId" = String, Path, description = "Volume id or name")),
    request_body = SignedUrlRequest,
    responses((status = 200, description = "a URL that works without an API key, for this method and path, until it expires", body = SignedUrl), (status = 404, body = ErrorBody))
)]
pub async fn sign_url(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath(volume_key): ApiPath<String>,
    ApiJson(body): ApiJson<SignedUrlRequest>,
) -> ApiResult<Json<SignedUrl>> {
    let path = parse_path(&body.path)?.as_string();
    let method = body.method.to_ascii_uppercase();
    if method != "GET" && method != "PUT" {
        return Err(ApiError::bad_request(format!(
            "method {:?} cannot be signed: GET (download) or PUT (upload)",
            body.method
        )));
    }
    let lifetime = body.expires_in_seconds.unwrap_or(DEFAULT_URL_EXPIRY_SECS);
    if !(1..=MAX_EXPIRY_SECS).contains(&lifetime) {
        return Err(ApiError::bad_request(format!(
            "expiresInSeconds must be 1 to {MAX_EXPIRY_SECS} (7 days)"
        )));
    }
    let volume = org_volume(&state, org, &volume_key).await?;
    let expires = now_secs() + lifetime;
    let signature = state
        .services
        .signer
        .sign(&method, &volume.id, &path, expires);
    let query = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("path", &path)
        .append_pair("expires", &expires.to_string())
        .append_pair("signature", &signature)
        .finish();
    let expires_at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(expires);
    Ok(Json(SignedUrl {
        url: format!(
            "{}/api/volumes/{}/files/content?{query}",
            state.base_url, volume.id
        ),
        method,
        expires_at: humantime::format_rfc3339_seconds(expires_at).to_string(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        use ByteRange::*;
        let r = |h: &str, size| parse_range(Some(h), size);
        assert_eq!(parse_range(None, 10), Whole);
        assert_eq!(r("bytes=0-4", 10), Part(0, 5));
        assert_eq!(r("bytes=5-", 10), Part(5, 10));
        assert_eq!(r("bytes=5-100", 10), Part(5, 10));
        assert_eq!(r("bytes=-3", 10), Part(7, 10));
        assert_eq!(r("bytes=-30", 10), Part(0, 10));
        assert_eq!(r("bytes=10-", 10), Unsatisfiable);
        assert_eq!(r("bytes=0-0", 0), Unsatisfiable);
        assert_eq!(r("bytes=-0", 10), Unsatisfiable);
        assert_eq!(r("bytes=-1", 0), Unsatisfiable);
        assert_eq!(r("bytes=0-1,3-4", 10), Whole);
        assert_eq!(r("bytes=4-2", 10), Whole);
        assert_eq!(r("items=0-1", 10), Whole);
        assert_eq!(r("bytes=x-1", 10), Whole);
    }

    #[test]
    fn modes() {
        assert_eq!(parse_mode(None, 0o644).unwrap(), 0o644);
        assert_eq!(parse_mode(Some("755"), 0).unwrap(), 0o755);
        assert_eq!(parse_mode(Some("0644"), 0).unwrap(), 0o644);
        assert_eq!(parse_mode(Some("1777"), 0).unwrap(), 0o1777);
        for bad in ["", "8", "0o", "77777", "-1", "abc", "10000"] {
            assert!(parse_mode(Some(bad), 0).is_err(), "{bad:?}");
        }
    }
}
