//! `VOLUME:/path` arguments and the server's file API (`/api/volumes/{volume}/files*`).

use std::fmt;

use anyhow::{Context, Result};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::super::api_client::{ApiClient, ApiError};

/// A path inside a volume, as `VOLUME:/path` on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemotePath {
    /// The volume's name or id.
    pub volume: String,
    /// Absolute inside the volume (`/` is its root); a trailing `/` is kept (it means "into
    /// this directory" for put and mv).
    pub path: String,
}

impl RemotePath {
    /// `VOLUME:/path` (a relative path is taken from the volume's root).
    pub fn parse(spec: &str) -> Result<RemotePath, String> {
        let Some((volume, path)) = spec.split_once(':') else {
            return Err(format!(
                "{spec:?} names no volume: expected VOLUME:/PATH, e.g. data:/models/a.bin"
            ));
        };
        RemotePath::new(volume, path, spec)
    }

    /// `VOLUME:/path`, or just `VOLUME` for its root.
    pub fn parse_or_root(spec: &str) -> Result<RemotePath, String> {
        match spec.split_once(':') {
            Some((volume, path)) => RemotePath::new(volume, path, spec),
            None => RemotePath::new(spec, "/", spec),
        }
    }

    fn new(volume: &str, path: &str, spec: &str) -> Result<RemotePath, String> {
        if volume.is_empty() {
            return Err(format!(
                "{spec:?} names no volume: expected VOLUME:/PATH, e.g. data:/models/a.bin"
            ));
        }
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        Ok(RemotePath {
            volume: volume.to_string(),
            path,
        })
    }

    /// The path without a trailing `/` (except the root's).
    pub fn trimmed(&self) -> &str {
        trim_slash(&self.path)
    }

    /// The same volume, another path.
    pub fn with_path(&self, path: String) -> RemotePath {
        RemotePath {
            volume: self.volume.clone(),
            path,
        }
    }

    /// The last component of the path; the volume's name for its root.
    pub fn name(&self) -> &str {
        match self.trimmed().rsplit_once('/') {
            Some((_, "")) | None => &self.volume,
            Some((_, name)) => name,
        }
    }
}

impl fmt::Display for RemotePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.volume, self.path)
    }
}

fn trim_slash(path: &str) -> &str {
    match path.trim_end_matches('/') {
        "" => "/",
        trimmed => trimmed,
    }
}

/// `dir/name` for a path inside a volume.
pub fn join(dir: &str, name: &str) -> String {
    match trim_slash(dir) {
        "/" => format!("/{name}"),
        dir => format!("{dir}/{name}"),
    }
}

/// One file, directory or link of a volume, as the server describes it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub path: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub size: u64,
    /// Octal permission bits, e.g. "0644".
    pub mode: String,
    pub modified_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

impl Entry {
    pub fn is_dir(&self) -> bool {
        self.kind == "directory"
    }

    /// The permission bits (0644 if the server sent something else).
    pub fn mode_bits(&self) -> u32 {
        u32::from_str_radix(&self.mode, 8).unwrap_or(0o644) & 0o7777
    }
}

/// The file API of one volume.
pub struct Files<'a> {
    client: &'a ApiClient,
    volume: String,
}

impl<'a> Files<'a> {
    pub fn new(client: &'a ApiClient, volume: &str) -> Files<'a> {
        Files {
            client,
            volume: volume.to_string(),
        }
    }

    /// `/api/volumes/{volume}/files{suffix}?query`.
    fn url(&self, suffix: &[&str], query: &[(&str, &str)]) -> Result<url::Url> {
        let mut segments = vec!["volumes", &self.volume, "files"];
        segments.extend(suffix);
        let mut url = self.client.api_url(&segments)?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        Ok(url)
    }

    pub async fn stat(&self, path: &str) -> Result<Entry> {
        let url = self.url(&["stat"], &[("path", trim_slash(path))])?;
        parse(
            self.client
                .json(self.client.request(Method::GET, url))
                .await?,
        )
    }

    /// The entry, or `None` if nothing is at that path.
    pub async fn stat_if_exists(&self, path: &str) -> Result<Option<Entry>> {
        match self.stat(path).await {
            Ok(entry) => Ok(Some(entry)),
            Err(e) if ApiError::code_of(&e) == Some("FILE_NOT_FOUND") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every entry of a directory (of its whole tree if `recursive`), sorted by path.
    pub async fn list(&self, path: &str, recursive: bool) -> Result<Vec<Entry>> {
        let mut entries = Vec::new();
        let mut cursor: Option<String> = None;
        let recursive = recursive.to_string();
        loop {
            let mut query = vec![
                ("path", trim_slash(path)),
                ("recursive", &recursive),
                ("limit", "1000"),
            ];
            if let Some(cursor) = &cursor {
                query.push(("cursor", cursor));
            }
            let url = self.url(&[], &query)?;
            let page = self
                .client
                .json(self.client.request(Method::GET, url))
                .await?;
            let items: Vec<Entry> = parse(page.get("entries").cloned().unwrap_or(Value::Null))?;
            entries.extend(items);
            cursor = page
                .get("nextCursor")
                .and_then(Value::as_str)
                .map(str::to_string);
            if cursor.is_none() {
                return Ok(entries);
            }
        }
    }

    pub async fn mkdir(&self, path: &str, mode: u32) -> Result<Entry> {
        let url = self.url(&["mkdir"], &[])?;
        let body = json!({ "path": trim_slash(path), "parents": true, "mode": octal(mode) });
        parse(
            self.client
                .json(self.client.request(Method::POST, url).json(&body))
                .await?,
        )
    }

    pub async fn delete(&self, path: &str, recursive: bool) -> Result<()> {
        let url = self.url(
            &[],
            &[
                ("path", trim_slash(path)),
                ("recursive", &recursive.to_string()),
            ],
        )?;
        self.client
            .response(self.client.request(Method::DELETE, url))
            .await?;
        Ok(())
    }

    pub async fn rename(&self, from: &str, to: &str, overwrite: bool) -> Result<Entry> {
        let url = self.url(&["move"], &[])?;
        let body =
            json!({ "from": trim_slash(from), "to": trim_slash(to), "overwrite": overwrite });
        parse(
            self.client
                .json(self.client.request(Method::POST, url).json(&body))
                .await?,
        )
    }

    /// Uploads `len` bytes of `body` to `path` (its parents are created); the server replaces
    /// the file atomically once the last byte has arrived.
    pub async fn upload(
        &self,
        path: &str,
        body: reqwest::Body,
        len: u64,
        mode: u32,
        overwrite: bool,
    ) -> Result<Entry> {
        let url = self.url(
            &["content"],
            &[
                ("path", trim_slash(path)),
                ("parents", "true"),
                ("overwrite", &overwrite.to_string()),
                ("mode", &octal(mode)),
            ],
        )?;
        let request = self
            .client
            .request(Method::PUT, url)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            // A stream has no length of its own: without this the body would go chunked, and
            // the server could not tell a short body from a complete one.
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(body);
        parse(self.client.json(request).await?)
    }

    /// The answer to a download, its body not read yet.
    pub async fn download(&self, path: &str) -> Result<reqwest::Response> {
        let url = self.url(&["content"], &[("path", trim_slash(path))])?;
        self.client
            .response(self.client.request(Method::GET, url))
            .await
    }

    /// A URL that reads (or, with `put`, writes) one path without an API key until it expires.
    pub async fn signed_url(
        &self,
        path: &str,
        put: bool,
        expires: std::time::Duration,
    ) -> Result<Value> {
        let url = self.url(&["url"], &[])?;
        let body = json!({
            "path": trim_slash(path),
            "method": if put { "PUT" } else { "GET" },
            "expiresInSeconds": expires.as_secs().max(1),
        });
        self.client
            .json(self.client.request(Method::POST, url).json(&body))
            .await
    }
}

fn octal(mode: u32) -> String {
    format!("{:04o}", mode & 0o7777)
}

fn parse<T: serde::de::DeserializeOwned>(value: Value) -> Result<T> {
    serde_json::from_value(value).context("the server's answer is not what the file API returns")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_paths_parse() {
        let p = RemotePath::parse("data:/a/b/").unwrap();
        assert_eq!((p.volume.as_str(), p.path.as_str()), ("data", "/a/b/"));
        assert_eq!((p.trimmed(), p.name()), ("/a/b", "b"));
        assert_eq!(RemotePath::parse("data:rel").unwrap().path, "/rel");
        assert_eq!(RemotePath::parse("data:").unwrap().path, "/");
        assert_eq!(RemotePath::parse("data:/").unwrap().name(), "data");
        assert!(RemotePath::parse("data")
            .unwrap_err()
            .contains("VOLUME:/PATH"));
        assert!(RemotePath::parse(":/x").is_err());
        assert_eq!(RemotePath::parse_or_root("data").unwrap().path, "/");
        assert_eq!(join("/", "x"), "/x");
        assert_eq!(join("/a/", "x"), "/a/x");
    }
}
