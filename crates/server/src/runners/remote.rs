//! The server's side of a runner on another host: the runner operations over HTTP.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use cellar_runner::{ExecRequest, ExecResult, RunnerError, SandboxSpec, VolumeMountSpec};
use futures::TryStreamExt;
use reqwest::{Method, RequestBuilder, Response};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio_util::io::StreamReader;

use super::protocol::{error_from_wire, WireError};
use super::ByteStream;

/// A registered runner: where it listens and the token it accepts.
pub struct RemoteRunner {
    name: String,
    url: String,
    callback_token: String,
    http: reqwest::Client,
}

impl RemoteRunner {
    pub fn new(name: &str, url: &str, callback_token: String) -> RemoteRunner {
        RemoteRunner {
            name: name.to_string(),
            url: url.trim_end_matches('/').to_string(),
            callback_token,
            // No overall timeout: an exec or a transfer may take long.
            http: reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(3))
                .build()
                .expect("the HTTP client builds"),
        }
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}/v1/sandboxes{path}", self.url))
            .bearer_auth(&self.callback_token)
    }

    /// A request about `what` of sandbox `id` with query parameters (they travel
    /// percent-encoded).
    fn query_request(
        &self,
        method: Method,
        id: &str,
        what: &str,
        query: &[(&str, &str)],
    ) -> Result<RequestBuilder, RunnerError> {
        let mut url = reqwest::Url::parse(&format!("{}/v1/sandboxes/{id}/{what}", self.url))
            .map_err(|e| {
                RunnerError::Unavailable(format!("runner {} has a bad URL: {e}", self.name))
            })?;
        url.query_pairs_mut().extend_pairs(query);
        Ok(self
            .http
            .request(method, url)
            .bearer_auth(&self.callback_token))
    }

    /// A request about the file `file` of sandbox `id`.
    fn file_request(
        &self,
        method: Method,
        id: &str,
        file: &str,
    ) -> Result<RequestBuilder, RunnerError> {
        self.query_request(method, id, "file", &[("path", file)])
    }

    /// Sends a request; a transport failure or an error answer becomes a [`RunnerError`].
    async fn send(&self, request: RequestBuilder) -> Result<Response, RunnerError> {
        let response = request.send().await.map_err(|e| self.unreachable(e))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let text = response.text().await.map_err(|e| self.unreachable(e))?;
        Err(match serde_json::from_str::<WireError>(&text) {
            Ok(wire) => error_from_wire(wire),
            Err(_) => RunnerError::Unavailable(format!(
                "runner {} answered {status}: {}",
                self.name,
                text.chars().take(200).collect::<String>()
            )),
        })
    }

    fn unreachable(&self, err: reqwest::Error) -> RunnerError {
        // reqwest's message names the URL, which holds no secret (the token is a header).
        RunnerError::Unavailable(format!("runner {} is unreachable: {err}", self.name))
    }

    pub async fn create_sandbox(&self, spec: &SandboxSpec) -> Result<(), RunnerError> {
        self.send(self.request(Method::POST, "").json(spec)).await?;
        Ok(())
    }

    pub async fn destroy_sandbox(&self, id: &str) -> Result<(), RunnerError> {
        self.send(self.request(Method::DELETE, &format!("/{id}")))
            .await?;
        Ok(())
    }

    pub async fn attach_volume(
        &self,
        id: &str,
        mount: &VolumeMountSpec,
    ) -> Result<(), RunnerError> {
        self.send(
            self.request(Method::POST, &format!("/{id}/mounts"))
                .json(mount),
        )
        .await?;
        Ok(())
    }

    pub async fn detach_volume(
        &self,
        id: &str,
        mount_path: &str,
        force: bool,
    ) -> Result<(), RunnerError> {
        let force = if force { "true" } else { "false" };
        let query = [("path", mount_path), ("force", force)];
        self.send(self.query_request(Method::DELETE, id, "mounts", &query)?)
            .await?;
        Ok(())
    }

    pub async fn exec(&self, id: &str, request: &ExecRequest) -> Result<ExecResult, RunnerError> {
        let response = self
            .send(
                self.request(Method::POST, &format!("/{id}/exec"))
                    .json(request),
            )
            .await?;
        response.json().await.map_err(|e| self.unreachable(e))
    }

    /// Streams `body` to the runner. The request body is fed from this task through a channel,
    /// so `body` need not outlive the call; a read error aborts the request rather than
    /// truncating the file.
    pub async fn upload(
        &self,
        id: &str,
        path: &str,
        mut body: impl AsyncRead + Unpin + Send,
    ) -> Result<(), RunnerError> {
        let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(4);
        let request = self
            .file_request(Method::PUT, id, path)?
            .body(reqwest::Body::wrap_stream(ChannelBody(rx)));
        let pump = async move {
            let mut buf = vec![0u8; 256 << 10];
            loop {
                match body.read(&mut buf).await {
                    Ok(0) => return,
                    Ok(n) => {
                        if tx
                            .send(Ok(Bytes::copy_from_slice(&buf[..n])))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
        };
        let (sent, ()) = tokio::join!(self.send(request), pump);
        sent.map(|_| ())
    }

    pub async fn download(&self, id: &str, path: &str) -> Result<ByteStream, RunnerError> {
        let response = self.send(self.file_request(Method::GET, id, path)?).await?;
        let stream = response.bytes_stream().map_err(std::io::Error::other);
        Ok(Box::pin(StreamReader::new(stream)))
    }
}

/// A request body fed through a channel.
struct ChannelBody(mpsc::Receiver<std::io::Result<Bytes>>);

impl futures::Stream for ChannelBody {
    type Item = std::io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}
