//! The toolbox's file calls besides the transfers: folders, listings, file info, delete, move,
//! permissions, content search (`find`), name search (`search`) and replace. Each runs one fixed
//! script inside the sandbox as its user ([`run_script`]), with paths and patterns as positional
//! arguments, never quoted into the script: paths resolve in the sandbox's root, relative ones
//! from the user's home, and the user's rights apply. Replace streams each file out of the
//! sandbox and back in through the same transfers as downloads and uploads.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use cellar_runner::{ExecRequest, EXEC_OUTPUT_LIMIT};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWrite, AsyncWriteExt};
use utoipa::{IntoParams, ToSchema};

use super::{runner_error, started_sandbox, Sandbox};
use crate::api::extract::{ApiJson, ApiPath, ApiQuery};
use crate::api::{AppState, Org};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::validate::validate_toolbox_path;

/// Shell functions every script starts with. A script fails with `fail CODE MESSAGE` (the codes
/// are those of [`script_error`]); `try COMMAND...` runs a command and, if it fails, fails with
/// its message, classified by its errno text (hence the C locale); `need PATH` fails unless the
/// path exists (a dangling symlink counts).
const PRELUDE: &str = r#"export LC_ALL=C
fail() { printf '%s\n' "$2"; exit "$1"; }
try() {
    out=$("$@" 2>&1) && return 0
    case $out in
    *'Permission denied'* | *'Operation not permitted'* | *'Read-only file system'*) fail 3 "$out" ;;
    *'No such file or directory'*) fail 2 "$out" ;;
    *) fail 1 "$out" ;;
    esac
}
need() {
    if [ -e "$1" ] || [ -L "$1" ]; then return 0; fi
    parent=$(dirname -- "$1")
    if [ -d "$parent" ] && [ ! -x "$parent" ]; then fail 3 "$1: permission denied"; fi
    fail 2 "no such file or directory: $1"
}
"#;

/// A file call's failure. A missing or forbidden path answers with the codes of Daytona's
/// toolbox daemon (`FILE_NOT_FOUND`, `FILE_ACCESS_DENIED`, source `DAYTONA_DAEMON`), as the
/// bulk-download error parts do, so that the clients raise their `DaytonaFileNotFoundError` and
/// `DaytonaFileAccessDeniedError`; any other failure is a plain [`ApiError`].
pub struct FileError {
    error: ApiError,
    daemon_code: Option<&'static str>,
}

type FileResult<T> = Result<T, FileError>;

impl From<ApiError> for FileError {
    fn from(error: ApiError) -> FileError {
        FileError {
            error,
            daemon_code: None,
        }
    }
}

impl IntoResponse for FileError {
    fn into_response(self) -> Response {
        let Some(code) = self.daemon_code else {
            return self.error.into_response();
        };
        let body = ErrorBody {
            status_code: self.error.status.as_u16(),
            message: self.error.message,
            code: code.to_string(),
            source: "DAYTONA_DAEMON".to_string(),
        };
        (self.error.status, Json(body)).into_response()
    }
}

/// What a script's exit code means to the client: 1 bad request (the message says why), 2 not
/// found, 3 permission denied, 4 conflict. Anything else is the sandbox failing, not the input.
fn script_error(code: i32, output: &str) -> FileError {
    let message = output.trim().to_string();
    let daemon = |status, code| FileError {
        error: ApiError::new(status, message.clone()),
        daemon_code: Some(code),
    };
    match code {
        1 => ApiError::bad_request(message).into(),
        2 => daemon(StatusCode::NOT_FOUND, "FILE_NOT_FOUND"),
        3 => daemon(StatusCode::FORBIDDEN, "FILE_ACCESS_DENIED"),
        4 => ApiError::conflict(message).into(),
        _ => ApiError::internal(format!("a toolbox script exited with {code}: {message}")).into(),
    }
}

/// Runs `script` (after [`PRELUDE`]) in the sandbox as its user, with `args` as `$1`, `$2`, ...;
/// returns its output.
async fn run_script(sandbox: &Sandbox, script: &str, args: Vec<String>) -> FileResult<String> {
    let (id, runner) = sandbox;
    let request = ExecRequest {
        command: format!("{PRELUDE}{script}"),
        args,
        ..ExecRequest::default()
    };
    let result = runner.exec(id, request).await.map_err(runner_error)?;
    if result.exit_code != 0 {
        return Err(script_error(result.exit_code, &result.output));
    }
    // The runner keeps only this much output: a longer answer would be silently cut.
    if result.output.len() >= EXEC_OUTPUT_LIMIT {
        return Err(ApiError::bad_request(format!(
            "the answer is over {} MiB: search a narrower path or pattern",
            EXEC_OUTPUT_LIMIT >> 20
        ))
        .into());
    }
    Ok(result.output)
}

/// A path as a script argument: checked, and never mistaken for an option.
fn path_arg(field: &str, path: &str) -> ApiResult<String> {
    validate_toolbox_path(field, path).map_err(ApiError::bad_request)?;
    Ok(if path.starts_with('-') {
        format!("./{path}")
    } else {
        path.to_string()
    })
}

/// A search pattern: non-empty and one line.
fn pattern_arg(pattern: &str) -> ApiResult<String> {
    if pattern.is_empty() || pattern.contains(['\0', '\n']) {
        return Err(ApiError::bad_request(
            "invalid pattern: must be one non-empty line without NUL characters",
        ));
    }
    Ok(pattern.to_string())
}

/// One file or directory, as the Daytona toolbox reports it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FileInfo {
    pub name: String,
    pub path: String,
    pub is_dir: bool,
    pub size: i64,
    /// Symbolic mode, e.g. `-rw-r--r--`.
    pub mode: String,
    /// Octal permissions, e.g. `0644`.
    pub permissions: String,
    pub owner: String,
    pub group: String,
    pub mod_time: String,
    pub modified_at: String,
}

/// `find -printf` format of a [`FileInfo`] record (NUL-terminated: any file name survives).
const FILE_INFO_FORMAT: &str = "%y\\t%s\\t%M\\t%m\\t%u\\t%g\\t%T@\\t%p\\0";

fn parse_file_info(record: &str) -> Option<FileInfo> {
    let fields: Vec<&str> = record.splitn(8, '\t').collect();
    let [kind, size, mode, octal, owner, group, mtime, path] = fields[..] else {
        return None;
    };
    let seconds = mtime.split('.').next()?.parse::<u64>().ok()?;
    let modified =
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(seconds))
            .to_string();
    let name = path
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|name| !name.is_empty())
        .unwrap_or(path);
    Some(FileInfo {
        name: name.to_string(),
        path: path.to_string(),
        is_dir: kind == "d",
        size: size.parse().ok()?,
        mode: mode.to_string(),
        permissions: format!("{octal:0>4}"),
        owner: owner.to_string(),
        group: group.to_string(),
        mod_time: modified.clone(),
        modified_at: modified,
    })
}

fn parse_file_infos(output: &str) -> Vec<FileInfo> {
    output
        .split('\0')
        .filter(|record| !record.is_empty())
        .filter_map(parse_file_info)
        .collect()
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct CreateFolderQuery {
    /// Directory to create (with missing parents); relative to the user's home.
    pub path: String,
    /// Octal permissions, e.g. `755`.
    pub mode: String,
}

/// Creates a directory (and missing parents) with the given permissions.
#[utoipa::path(
    post, operation_id = "createFolder", path = "/toolbox/{sandboxId}/files/folder", tag = "toolbox",
    params(("sandboxId" = String, Path, description = "Sandbox id"), CreateFolderQuery),
    responses((status = 201, description = "created"), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody))
)]
pub async fn create_folder(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath(sandbox_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<CreateFolderQuery>,
) -> FileResult<StatusCode> {
    let path = path_arg("path", &query.path)?;
    let mode = octal_mode(&query.mode, 3..=4)?;
    let sandbox = started_sandbox(&state, &org, &sandbox_id).await?;
    run_script(
        &sandbox,
        r#"try mkdir -p -m "$2" -- "$1""#,
        vec![path, mode],
    )
    .await?;
    Ok(StatusCode::CREATED)
}

/// An octal mode of `digits` digits.
fn octal_mode(mode: &str, digits: std::ops::RangeInclusive<usize>) -> ApiResult<String> {
    if digits.contains(&mode.len()) && mode.chars().all(|c| ('0'..='7').contains(&c)) {
        Ok(mode.to_string())
    } else {
        Err(ApiError::bad_request(format!(
            "invalid mode {mode:?}: must be octal, e.g. 755"
        )))
    }
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct ListFilesQuery {
    /// Directory to list; relative to the user's home.
    pub path: String,
    /// How many levels to list (default 1: the directory's own entries).
    pub depth: Option<u32>,
}

/// Lists a directory, sorted by path.
#[utoipa::path(
    get, operation_id = "listFiles", path = "/toolbox/{sandboxId}/files", tag = "toolbox",
    params(("sandboxId" = String, Path, description = "Sandbox id"), ListFilesQuery),
    responses((status = 200, body = [FileInfo]), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody))
)]
pub async fn list_files(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath(sandbox_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<ListFilesQuery>,
) -> FileResult<Json<Vec<FileInfo>>> {
    let path = path_arg("path", &query.path)?;
    let depth = query.depth.unwrap_or(1);
    if depth == 0 {
        return Err(ApiError::bad_request("invalid depth: must be at least 1").into());
    }
    let sandbox = started_sandbox(&state, &org, &sandbox_id).await?;
    // A symlink given as the path is followed (`-H`), those below it are not; unreadable
    // directories below the first level are left out, as Daytona does.
    let script = r#"need "$1"
[ -d "$1" ] || fail 1 "not a directory: $1"
[ -r "$1" ] && [ -x "$1" ] || fail 3 "$1: permission denied"
find -H "$1" -mindepth 1 -maxdepth "$2" -printf "$3" 2>/dev/null
exit 0"#;
    let args = vec![path, depth.to_string(), FILE_INFO_FORMAT.to_string()];
    let mut files = parse_file_infos(&run_script(&sandbox, script, args).await?);
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Json(files))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct PathQuery {
    /// Relative to the user's home.
    pub path: String,
}

/// Information about a file or directory (a symlink is followed).
#[utoipa::path(
    get, operation_id = "getFileInfo", path = "/toolbox/{sandboxId}/files/info", tag = "toolbox",
    params(("sandboxId" = String, Path, description = "Sandbox id"), PathQuery),
    responses((status = 200, body = FileInfo), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody))
)]
pub async fn get_file_info(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath(sandbox_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<PathQuery>,
) -> FileResult<Json<FileInfo>> {
    let path = path_arg("path", &query.path)?;
    let sandbox = started_sandbox(&state, &org, &sandbox_id).await?;
    let script = r#"need "$1"
[ -e "$1" ] || fail 2 "dangling symbolic link: $1"
exec find -L "$1" -maxdepth 0 -printf "$2""#;
    let output = run_script(&sandbox, script, vec![path, FILE_INFO_FORMAT.to_string()]).await?;
    let info = parse_file_infos(&output)
        .pop()
        .ok_or_else(|| ApiError::internal(format!("unreadable file information: {output:?}")))?;
    Ok(Json(info))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct DeleteQuery {
    /// Relative to the user's home.
    pub path: String,
    /// Required (`true`) to delete a directory, with everything in it.
    pub recursive: Option<bool>,
}

/// Deletes a file, a symlink, or (with `recursive=true`) a directory tree.
#[utoipa::path(
    delete, operation_id = "deleteFile", path = "/toolbox/{sandboxId}/files", tag = "toolbox",
    params(("sandboxId" = String, Path, description = "Sandbox id"), DeleteQuery),
    responses((status = 204, description = "deleted"), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody))
)]
pub async fn delete_file(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath(sandbox_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<DeleteQuery>,
) -> FileResult<StatusCode> {
    let path = path_arg("path", &query.path)?;
    let recursive = query.recursive.unwrap_or(false).to_string();
    let sandbox = started_sandbox(&state, &org, &sandbox_id).await?;
    let script = r#"need "$1"
if [ -d "$1" ] && [ ! -L "$1" ]; then
    [ "$2" = true ] || fail 1 "$1 is a directory: delete it with recursive=true"
    try rm -rf -- "$1"
else
    try rm -f -- "$1"
fi"#;
    run_script(&sandbox, script, vec![path, recursive]).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct MoveQuery {
    pub source: String,
    /// Must not exist; its directory must.
    pub destination: String,
}

/// Moves or renames a file or directory.
#[utoipa::path(
    post, operation_id = "moveFile", path = "/toolbox/{sandboxId}/files/move", tag = "toolbox",
    params(("sandboxId" = String, Path, description = "Sandbox id"), MoveQuery),
    responses((status = 200, description = "moved"), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody))
)]
pub async fn move_file(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath(sandbox_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<MoveQuery>,
) -> FileResult<()> {
    let source = path_arg("source", &query.source)?;
    let destination = path_arg("destination", &query.destination)?;
    let sandbox = started_sandbox(&state, &org, &sandbox_id).await?;
    let script = r#"need "$1"
parent=$(dirname -- "$2")
[ -d "$parent" ] || fail 2 "no such directory: $parent"
if [ -e "$2" ] || [ -L "$2" ]; then fail 4 "destination already exists: $2"; fi
try mv -T -- "$1" "$2""#;
    run_script(&sandbox, script, vec![source, destination]).await?;
    Ok(())
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct PermissionsQuery {
    pub path: String,
    /// Octal, e.g. `0755`.
    pub mode: Option<String>,
    /// A user name or id.
    pub owner: Option<String>,
    /// A group name or id.
    pub group: Option<String>,
}

/// A user or group name or id, as `chown`/`chgrp` take it.
fn account_arg(field: &str, value: Option<String>) -> ApiResult<String> {
    let value = value.unwrap_or_default();
    let valid = value.len() <= 64
        && !value.starts_with('-')
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !valid {
        return Err(ApiError::bad_request(format!(
            "invalid {field} {value:?}: must be a user or group name or id"
        )));
    }
    Ok(value)
}

/// Sets the mode and/or the owner and group of a file or directory.
#[utoipa::path(
    post, operation_id = "setFilePermissions", path = "/toolbox/{sandboxId}/files/permissions", tag = "toolbox",
    params(("sandboxId" = String, Path, description = "Sandbox id"), PermissionsQuery),
    responses((status = 200, description = "set"), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody))
)]
pub async fn set_file_permissions(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath(sandbox_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<PermissionsQuery>,
) -> FileResult<()> {
    let path = path_arg("path", &query.path)?;
    let mode = match query.mode.as_deref() {
        None | Some("") => String::new(),
        Some(mode) => octal_mode(mode, 1..=4)?,
    };
    let owner = account_arg("owner", query.owner)?;
    let group = account_arg("group", query.group)?;
    let sandbox = started_sandbox(&state, &org, &sandbox_id).await?;
    let script = r#"need "$1"
[ -z "$2" ] || try chmod -- "$2" "$1"
[ -z "$3" ] || try chown -- "$3" "$1"
[ -z "$4" ] || try chgrp -- "$4" "$1""#;
    run_script(&sandbox, script, vec![path, mode, owner, group]).await?;
    Ok(())
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct SearchQuery {
    /// A file, or a directory searched recursively; relative to the user's home.
    pub path: String,
    pub pattern: String,
}

/// A line that contains the pattern.
#[derive(Debug, Serialize, ToSchema)]
pub struct Match {
    pub file: String,
    /// 1-based.
    pub line: u64,
    pub content: String,
}

/// Finds the lines of text files that contain `pattern` (a plain string, not a regular
/// expression), like `grep -rnF`; binary files and unreadable files are skipped.
#[utoipa::path(
    get, operation_id = "findInFiles", path = "/toolbox/{sandboxId}/files/find", tag = "toolbox",
    params(("sandboxId" = String, Path, description = "Sandbox id"), SearchQuery),
    responses((status = 200, body = [Match]), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody))
)]
pub async fn find_in_files(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath(sandbox_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<SearchQuery>,
) -> FileResult<Json<Vec<Match>>> {
    let path = path_arg("path", &query.path)?;
    let pattern = pattern_arg(&query.pattern)?;
    let sandbox = started_sandbox(&state, &org, &sandbox_id).await?;
    // `-Z`: the file name ends with a NUL, so `name\0line:content\n` records parse whatever the
    // name holds. grep exits 1 when nothing matches and 2 when a file could not be read.
    let script = r#"need "$1"
grep -rnIZsF -D skip -e "$2" -- "$1"
[ $? -le 2 ] || fail 1 "grep failed"
exit 0"#;
    let output = run_script(&sandbox, script, vec![path, pattern]).await?;
    Ok(Json(parse_matches(&output)))
}

fn parse_matches(output: &str) -> Vec<Match> {
    let mut matches = Vec::new();
    let mut rest = output;
    while let Some((file, after)) = rest.split_once('\0') {
        let (record, next) = after.split_once('\n').unwrap_or((after, ""));
        rest = next;
        let Some((line, content)) = record.split_once(':') else {
            continue;
        };
        if let Ok(line) = line.parse() {
            matches.push(Match {
                file: file.to_string(),
                line,
                content: content.to_string(),
            });
        }
    }
    matches
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SearchFilesResponse {
    pub files: Vec<String>,
}

/// The glob of a name search: a pattern without `/` matches file names at any depth (`*.py`),
/// one with `/` the path relative to the searched directory (`src/**/*.rs`); `*` and `?` never
/// match `/`, `**` matches any number of directories, `{a,b}` and `[a-z]` work.
fn name_matcher(pattern: &str) -> ApiResult<(globset::GlobMatcher, bool)> {
    let glob = globset::GlobBuilder::new(pattern)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .map_err(|e| ApiError::bad_request(format!("invalid glob pattern {pattern:?}: {e}")))?;
    Ok((glob.compile_matcher(), pattern.contains('/')))
}

/// Finds the files (not directories) below `path` whose name, or relative path if the pattern
/// has a `/`, matches a glob.
#[utoipa::path(
    get, operation_id = "searchFiles", path = "/toolbox/{sandboxId}/files/search", tag = "toolbox",
    params(("sandboxId" = String, Path, description = "Sandbox id"), SearchQuery),
    responses((status = 200, body = SearchFilesResponse), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody))
)]
pub async fn search_files(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath(sandbox_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<SearchQuery>,
) -> FileResult<Json<SearchFilesResponse>> {
    let path = path_arg("path", &query.path)?;
    let pattern = pattern_arg(&query.pattern)?;
    let (matcher, by_path) = name_matcher(&pattern)?;
    let sandbox = started_sandbox(&state, &org, &sandbox_id).await?;
    let script = r#"need "$1"
[ -d "$1" ] || fail 1 "not a directory: $1"
[ -r "$1" ] && [ -x "$1" ] || fail 3 "$1: permission denied"
find -H "$1" ! -type d -print0 2>/dev/null
exit 0"#;
    let output = run_script(&sandbox, script, vec![path.clone()]).await?;
    let mut files: Vec<String> = output
        .split('\0')
        .filter(|file| {
            let relative = file
                .strip_prefix(path.as_str())
                .unwrap_or(file)
                .trim_start_matches('/');
            let candidate = if by_path {
                relative
            } else {
                relative.rsplit('/').next().unwrap_or(relative)
            };
            !relative.is_empty() && matcher.is_match(candidate)
        })
        .map(str::to_string)
        .collect();
    files.sort();
    Ok(Json(SearchFilesResponse { files }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplaceRequest {
    pub files: Vec<String>,
    /// A plain string, not a regular expression.
    pub pattern: String,
    pub new_value: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReplaceResult {
    pub file: String,
    pub success: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Replaces every occurrence of `pattern` with `newValue` in each file; a file that cannot be
/// read or written gets `success: false` and the reason. Files are streamed (spooled to a
/// temporary file of the server, never held in memory) and rewritten in place, keeping their
/// mode and owner; a file without the pattern is not rewritten.
#[utoipa::path(
    post, operation_id = "replaceInFiles", path = "/toolbox/{sandboxId}/files/replace", tag = "toolbox",
    params(("sandboxId" = String, Path, description = "Sandbox id")),
    request_body = ReplaceRequest,
    responses((status = 200, body = [ReplaceResult]), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody))
)]
pub async fn replace_in_files(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath(sandbox_id): ApiPath<String>,
    ApiJson(body): ApiJson<ReplaceRequest>,
) -> FileResult<Json<Vec<ReplaceResult>>> {
    let args = body
        .files
        .iter()
        .enumerate()
        .map(|(i, file)| path_arg(&format!("files[{i}]"), file))
        .collect::<ApiResult<Vec<_>>>()?;
    if body.pattern.is_empty() {
        return Err(ApiError::bad_request("invalid pattern: must not be empty").into());
    }
    let sandbox = started_sandbox(&state, &org, &sandbox_id).await?;
    // Only regular files the user may read and write: never a device or FIFO without an end.
    let script = r#"for f; do
    if [ ! -e "$f" ]; then printf N
    elif [ ! -f "$f" ]; then printf D
    elif [ ! -r "$f" ] || [ ! -w "$f" ]; then printf P
    else printf K; fi
done"#;
    let verdicts = run_script(&sandbox, script, args).await?;
    let mut results = Vec::with_capacity(body.files.len());
    for (file, verdict) in body.files.into_iter().zip(verdicts.chars()) {
        let outcome = match verdict {
            'K' => replace_in_file(&sandbox, &file, &body.pattern, &body.new_value).await,
            'N' => Err(format!("no such file or directory: {file}")),
            'D' => Err(format!("not a regular file: {file}")),
            _ => Err(format!("{file}: permission denied")),
        };
        results.push(ReplaceResult {
            file,
            success: outcome.is_ok(),
            error: outcome.err(),
        });
    }
    Ok(Json(results))
}

async fn replace_in_file(
    (id, runner): &Sandbox,
    file: &str,
    pattern: &str,
    new_value: &str,
) -> Result<(), String> {
    let content = runner
        .download(id, file)
        .await
        .map_err(|e| runner_error(e).message)?;
    let spool = tempfile::tempfile().map_err(|e| format!("no room for a copy: {e}"))?;
    let mut spool = tokio::fs::File::from_std(spool);
    let replaced = replace_stream(
        content,
        &mut spool,
        pattern.as_bytes(),
        new_value.as_bytes(),
    )
    .await
    .map_err(|e| format!("reading {file}: {e}"))?;
    if replaced == 0 {
        return Ok(());
    }
    spool
        .rewind()
        .await
        .map_err(|e| format!("rewinding the copy: {e}"))?;
    runner
        .upload(id, file, spool)
        .await
        .map_err(|e| runner_error(e).message)
}

/// Copies `input` to `output` with each occurrence of `pattern` replaced, left to right and
/// without overlaps (as `str::replace`), holding one chunk and less than a pattern's length
/// more. Returns the number of replacements.
async fn replace_stream(
    mut input: impl AsyncRead + Unpin,
    output: &mut (impl AsyncWrite + Unpin),
    pattern: &[u8],
    replacement: &[u8],
) -> std::io::Result<u64> {
    let mut chunk = vec![0u8; 256 << 10];
    let mut pending: Vec<u8> = Vec::new();
    let mut out: Vec<u8> = Vec::new();
    let mut replaced = 0;
    loop {
        let read = input.read(&mut chunk).await?;
        pending.extend_from_slice(&chunk[..read]);
        out.clear();
        let mut start = 0;
        while let Some(at) = pending[start..]
            .windows(pattern.len())
            .position(|window| window == pattern)
        {
            out.extend_from_slice(&pending[start..start + at]);
            out.extend_from_slice(replacement);
            start += at + pattern.len();
            replaced += 1;
        }
        // An occurrence may still begin in the last pattern.len() - 1 bytes, unless at the end.
        let keep = if read == 0 {
            0
        } else {
            (pattern.len() - 1).min(pending.len() - start)
        };
        let safe = pending.len() - keep;
        out.extend_from_slice(&pending[start..safe]);
        output.write_all(&out).await?;
        pending.drain(..safe);
        if read == 0 {
            output.flush().await?;
            return Ok(replaced);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn replace_in_chunks(input: &[u8], pattern: &str, replacement: &str) -> (Vec<u8>, u64) {
        // One byte per read: every occurrence straddles a chunk boundary.
        let reader = byte_by_byte(input);
        let mut output = Vec::new();
        let count = replace_stream(
            reader,
            &mut output,
            pattern.as_bytes(),
            replacement.as_bytes(),
        )
        .await
        .unwrap();
        (output, count)
    }

    fn byte_by_byte(input: &[u8]) -> impl AsyncRead + Unpin {
        let chunks: Vec<std::io::Result<bytes::Bytes>> = input
            .iter()
            .map(|byte| Ok(bytes::Bytes::copy_from_slice(&[*byte])))
            .collect();
        tokio_util::io::StreamReader::new(futures::stream::iter(chunks))
    }

    #[tokio::test]
    async fn replace_stream_matches_str_replace_across_chunk_boundaries() {
        let cases = [
            ("hello world, hello", "hello", "bye"),
            ("aaaa", "aa", "b"),
            ("abababa", "aba", "X"),
            ("no match here", "zzz", "y"),
            ("xxx", "x", ""),
            ("tail ab", "abc", "-"),
            ("", "a", "b"),
        ];
        for (input, pattern, replacement) in cases {
            let (output, count) = replace_in_chunks(input.as_bytes(), pattern, replacement).await;
            assert_eq!(
                String::from_utf8(output).unwrap(),
                input.replace(pattern, replacement),
                "{input:?} {pattern:?}"
            );
            assert_eq!(count as usize, input.matches(pattern).count(), "{input:?}");
        }
    }

    #[test]
    fn file_info_records_parse_any_name() {
        let record = "f\t12\t-rw-r-----\t640\tdaytona\tdaytona\t1700000000.5\t/h/a\tb\nc";
        let info = parse_file_info(record).unwrap();
        assert_eq!(
            (
                info.name.as_str(),
                info.path.as_str(),
                info.is_dir,
                info.size
            ),
            ("a\tb\nc", "/h/a\tb\nc", false, 12)
        );
        assert_eq!(info.permissions, "0640");
        assert_eq!(info.modified_at, "2023-11-14T22:13:20Z");
        let root = parse_file_info("d\t0\tdrwxr-xr-x\t755\troot\troot\t0\t/").unwrap();
        assert_eq!((root.name.as_str(), root.is_dir), ("/", true));
    }

    #[test]
    fn grep_records_parse_names_with_colons_and_newlines() {
        let output = "/a:b\u{0}3:x: y\n/c\nd\u{0}10:\n";
        let matches = parse_matches(output);
        let found: Vec<(&str, u64, &str)> = matches
            .iter()
            .map(|m| (m.file.as_str(), m.line, m.content.as_str()))
            .collect();
        assert_eq!(found, [("/a:b", 3, "x: y"), ("/c\nd", 10, "")]);
    }

    #[test]
    fn name_globs_match_names_anywhere_and_paths_from_the_base() {
        let (by_name, by_path) = name_matcher("*.py").unwrap();
        assert!(!by_path);
        assert!(by_name.is_match("a.py") && !by_name.is_match("a.pyc"));
        let (relative, by_path) = name_matcher("src/**/*.rs").unwrap();
        assert!(by_path);
        assert!(relative.is_match("src/a.rs") && relative.is_match("src/x/y/a.rs"));
        assert!(!relative.is_match("lib/src/a.rs"));
        let (braces, _) = name_matcher("{a,b}?.txt").unwrap();
        assert!(braces.is_match("a1.txt") && !braces.is_match("c1.txt"));
        assert!(name_matcher("[").is_err());
    }
}
