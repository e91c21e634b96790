//! An [`ObjectStore`] in front of the real client that records every request it forwards in the
//! process's metrics (`cellar_store_*`): the one place every request of every code path passes.
//! Below it, the S3 client's HTTP connections count every try of a request, retries included.

use cellar_metrics::{HttpOutcome, StoreOp, StoreRequest};
use futures::stream::{BoxStream, StreamExt};
use object_store::client::{
    ClientOptions, HttpClient, HttpConnector, HttpError, HttpRequest, HttpResponse, HttpService,
    ReqwestConnector,
};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result, UploadPart,
};
use std::sync::Arc;

#[derive(Debug)]
pub(crate) struct Metered(pub Arc<dyn ObjectStore>);

impl std::fmt::Display for Metered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Records the end of `request`: failed, or the bytes `moved` counts of a success.
fn finish<T>(mut request: StoreRequest, result: Result<T>, moved: impl Fn(&T) -> u64) -> Result<T> {
    match &result {
        Ok(value) => request.bytes(moved(value)),
        Err(_) => request.failed(),
    }
    result
}

/// Counts a streamed request from its start until the stream is dropped (ended or abandoned).
fn metered_stream<T: Send + 'static>(
    stream: BoxStream<'static, Result<T>>,
    op: StoreOp,
) -> BoxStream<'static, Result<T>> {
    let mut request = StoreRequest::start(op);
    stream
        .inspect(move |item| {
            if item.is_err() {
                request.failed();
            }
        })
        .boxed()
}

#[derive(Debug)]
struct MeteredUpload(Box<dyn MultipartUpload>);

#[async_trait::async_trait]
impl MultipartUpload for MeteredUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let request = StoreRequest::start(StoreOp::Put);
        let len = data.content_length() as u64;
        let part = self.0.put_part(data);
        Box::pin(async move { finish(request, part.await, |_| len) })
    }

    async fn complete(&mut self) -> Result<PutResult> {
        self.0.complete().await
    }

    async fn abort(&mut self) -> Result<()> {
        self.0.abort().await
    }
}

#[async_trait::async_trait]
impl ObjectStore for Metered {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let request = StoreRequest::start(StoreOp::Put);
        let len = payload.content_length() as u64;
        finish(
            request,
            self.0.put_opts(location, payload, opts).await,
            |_| len,
        )
    }

    /// Each part of a multipart upload counts as one `put` of its bytes.
    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        let upload = self.0.put_multipart_opts(location, opts).await?;
        Ok(Box::new(MeteredUpload(upload)))
    }

    // `get_ranges` keeps the trait's default, which fetches through `get_opts` below.
    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let request = StoreRequest::start(StoreOp::Get);
        let result = self.0.get_opts(location, options).await;
        finish(request, result, |got| got.range.end - got.range.start)
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        metered_stream(self.0.delete_stream(locations), StoreOp::Delete)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        metered_stream(self.0.list(prefix), StoreOp::List)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let request = StoreRequest::start(StoreOp::List);
        finish(request, self.0.list_with_delimiter(prefix).await, |_| 0)
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        let request = StoreRequest::start(StoreOp::Copy);
        finish(request, self.0.copy_opts(from, to, options).await, |_| 0)
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        let request = StoreRequest::start(StoreOp::Rename);
        finish(request, self.0.rename_opts(from, to, options).await, |_| 0)
    }
}

/// Makes the S3 client's HTTP clients, each counting its exchanges.
#[derive(Debug, Default)]
pub(crate) struct CountingConnector(ReqwestConnector);

impl HttpConnector for CountingConnector {
    fn connect(&self, options: &ClientOptions) -> Result<HttpClient> {
        Ok(HttpClient::new(CountingClient(self.0.connect(options)?)))
    }
}

#[derive(Debug)]
struct CountingClient(HttpClient);

#[async_trait::async_trait]
impl HttpService for CountingClient {
    async fn call(&self, request: HttpRequest) -> std::result::Result<HttpResponse, HttpError> {
        let response = self.0.execute(request).await;
        cellar_metrics::store_http_attempt(match &response {
            Ok(answer) if answer.status().is_server_error() => HttpOutcome::ServerError,
            Ok(answer) if answer.status().is_client_error() => HttpOutcome::ClientError,
            Ok(_) => HttpOutcome::Success,
            Err(_) => HttpOutcome::TransportError,
        });
        response
    }
}
