//! The HTTP client `cellar volume` and `cellar sandbox` use to talk to a Cellar server.

use std::io::Write;

use anyhow::{anyhow, Context, Result};
use clap::Args;
use serde_json::Value;

const DEFAULT_API_URL: &str = "http://127.0.0.1:3986/api";

/// Where the server is and how to authenticate.
#[derive(Args, Debug, Clone)]
pub struct ApiArgs {
    /// API URL [env: CELLAR_API_URL, else DAYTONA_API_URL] [default: http://127.0.0.1:3986/api]
    #[arg(long, global = true, value_name = "URL")]
    pub api_url: Option<String>,
    /// API key [env: CELLAR_API_KEY, else DAYTONA_API_KEY]
    #[arg(long, global = true, value_name = "KEY")]
    pub api_key: Option<String>,
}

pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    key: String,
    runtime: tokio::runtime::Runtime,
}

fn first_env(names: &[&str]) -> Option<String> {
    names
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
}

impl ApiClient {
    pub fn new(args: &ApiArgs) -> Result<ApiClient> {
        let base = args
            .api_url
            .clone()
            .or_else(|| first_env(&["CELLAR_API_URL", "DAYTONA_API_URL"]))
            .unwrap_or_else(|| DEFAULT_API_URL.to_string());
        let key = args
            .api_key
            .clone()
            .or_else(|| first_env(&["CELLAR_API_KEY", "DAYTONA_API_KEY"]))
            .context("no API key: pass --api-key or set CELLAR_API_KEY (or DAYTONA_API_KEY)")?;
        Ok(ApiClient {
            http: reqwest::Client::new(),
            base: base.trim_end_matches('/').to_string(),
            key,
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
        })
    }

    /// `path` is relative to the API URL (`/volumes`), or an absolute URL (toolbox).
    fn url(&self, path: &str) -> String {
        if path.starts_with("http://") || path.starts_with("https://") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        }
    }

    /// The API URL followed by these path segments, each percent-encoded.
    pub fn api_url(&self, segments: &[&str]) -> Result<url::Url> {
        let mut url = url::Url::parse(&self.base)
            .with_context(|| format!("the API URL {:?} is not a URL", self.base))?;
        url.path_segments_mut()
            .map_err(|()| anyhow!("the API URL {:?} cannot have a path", self.base))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    pub fn get(&self, path: &str) -> Result<Value> {
        self.send(self.http.get(self.url(path)))
    }

    pub fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.send(self.http.post(self.url(path)).json(body))
    }

    pub fn patch(&self, path: &str, body: &Value) -> Result<Value> {
        self.send(self.http.patch(self.url(path)).json(body))
    }

    pub fn delete(&self, path: &str) -> Result<Value> {
        self.send(self.http.delete(self.url(path)))
    }

    /// Runs the asynchronous calls of one command (transfers run many at once).
    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// A request to an absolute URL (see [`ApiClient::api_url`]).
    pub fn request(&self, method: reqwest::Method, url: url::Url) -> reqwest::RequestBuilder {
        self.http.request(method, url.as_str())
    }

    /// Sends a request; a failure status becomes an error carrying the server's message.
    fn send(&self, request: reqwest::RequestBuilder) -> Result<Value> {
        self.block_on(self.json(request))
    }

    /// Sends a request and parses the JSON answer (`Null` if empty).
    pub async fn json(&self, request: reqwest::RequestBuilder) -> Result<Value> {
        let text = self
            .response(request)
            .await?
            .text()
            .await
            .context("reading the server's answer")?;
        Ok(if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        })
    }

    /// Sends a request; a success answer is returned unread (to be streamed), a failure becomes
    /// an [`ApiError`]. A request over the key's rate (429) is sent again after the server's
    /// `Retry-After`, unless its body is a stream (the caller retries those: [`ApiError::retry_after`]).
    pub async fn response(
        &self,
        mut request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response> {
        let mut pacing = RatePacing::default();
        loop {
            let copy = request.try_clone();
            let result = self.response_once(request).await;
            match (copy, pacing.wait(&result)) {
                (Some(copy), Some(wait)) => {
                    tokio::time::sleep(wait).await;
                    request = copy;
                }
                _ => return result,
            }
        }
    }

    async fn response_once(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let response = request
            .bearer_auth(&self.key)
            .send()
            .await
            .with_context(|| format!("cannot reach the Cellar server at {}", self.base))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .map(std::time::Duration::from_secs);
        let text = response.text().await.unwrap_or_default();
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        Err(ApiError {
            status,
            code: field(&body, "code").to_string(),
            message: field(&body, "message").to_string(),
            retry_after,
        }
        .into())
    }
}

/// How long a request refused for the key's rate (429) keeps being sent again, in all.
const RATE_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(120);

/// The waits of one request that the server refuses for the key's rate.
#[derive(Default)]
pub struct RatePacing {
    waited: std::time::Duration,
}

impl RatePacing {
    /// How long to wait before sending again, or None: `result` is final (a success, another
    /// error, or refused for longer than [`RATE_RETRY_FOR`]). The server's `Retry-After` is
    /// whole seconds: up to as much again at random spreads concurrent transfers out, so they
    /// do not all come back at the same instant to be refused together.
    pub fn wait<T>(&mut self, result: &Result<T>) -> Option<std::time::Duration> {
        let after = ApiError::retry_after(result.as_ref().err()?)?;
        if self.waited >= RATE_RETRY_FOR {
            return None;
        }
        let wait = after.mul_f64(1.0 + rand::random::<f64>());
        self.waited += wait;
        Some(wait)
    }
}

/// A failure answer of the server: `{"statusCode", "message", "code"}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: reqwest::StatusCode,
    /// The machine-readable code (`FILE_NOT_FOUND`, ...), "" if the server sent none.
    pub code: String,
    pub message: String,
    /// The server's `Retry-After` of a 429.
    pub retry_after: Option<std::time::Duration>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.message.is_empty() {
            write!(f, "the server answered {}", self.status)
        } else {
            write!(f, "{} ({})", self.message, self.status)
        }
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    /// The server's code of this error, if it is an [`ApiError`] (through any context).
    pub fn code_of(error: &anyhow::Error) -> Option<&str> {
        error.downcast_ref::<ApiError>().map(|e| e.code.as_str())
    }

    /// How long to wait before sending again, if the server refused for the key's rate (429).
    pub fn retry_after(error: &anyhow::Error) -> Option<std::time::Duration> {
        let e = error.downcast_ref::<ApiError>()?;
        (e.status == reqwest::StatusCode::TOO_MANY_REQUESTS)
            .then(|| e.retry_after.unwrap_or(std::time::Duration::from_secs(1)))
    }
}

/// A string field of a JSON object ("" if absent).
pub fn field<'a>(value: &'a Value, name: &str) -> &'a str {
    value.get(name).and_then(Value::as_str).unwrap_or("")
}

/// Prints rows as left-aligned columns under a header.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) -> Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    let mut stdout = std::io::stdout().lock();
    for cells in std::iter::once(&header).chain(rows) {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        writeln!(stdout, "{}", padded.join("  ").trim_end())?;
    }
    Ok(())
}

/// Pretty JSON on stdout.
pub fn print_json(value: &Value) -> Result<()> {
    writeln!(
        std::io::stdout(),
        "{}",
        serde_json::to_string_pretty(value)?
    )?;
    Ok(())
}
