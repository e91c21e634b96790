//! The S3 operations on volumes.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use cellar_vfs::Ctx;
use futures::{Stream, StreamExt};
use s3s::dto::*;
use s3s::{s3_error, S3Error, S3ErrorCode, S3Request, S3Response, S3Result, S3};

use crate::access::{check_key, unavailable};
use crate::fs::{FsError, Key, List, Listed, Meta, Objects, Writer};
use crate::multipart::{Part, Uploads};
use crate::{Grant, Volumes};

/// Bytes moved per vfs call of a GET or a PUT.
const IO_SIZE: usize = 1 << 20;
/// Pieces in flight between the network and the vfs, per request.
const IO_QUEUE: usize = 4;
/// Most keys one listing page holds (S3's limit).
const MAX_KEYS: i32 = 1000;
const MAX_PART_NUMBER: i32 = 10_000;

pub(crate) struct VolumeBuckets {
    volumes: Arc<dyn Volumes>,
    ctx: Ctx,
    uploads: Uploads,
}

impl VolumeBuckets {
    pub fn new(volumes: Arc<dyn Volumes>, ctx: Ctx) -> VolumeBuckets {
        VolumeBuckets {
            volumes,
            ctx,
            uploads: Uploads::default(),
        }
    }

    async fn objects(&self, grant: &Grant) -> S3Result<Objects> {
        let vfs = self
            .volumes
            .open(&grant.volume_id)
            .await
            .map_err(unavailable)?;
        Ok(Objects { vfs, ctx: self.ctx })
    }
}

/// The grant the access check found for this request.
fn grant_of<T>(req: &S3Request<T>) -> S3Result<Grant> {
    req.extensions
        .get::<Grant>()
        .cloned()
        .ok_or_else(|| s3_error!(AccessDenied))
}

fn fs_error(e: FsError) -> S3Error {
    let custom = |code: &str, status: u16, message: String| {
        let mut err = S3Error::with_message(S3ErrorCode::Custom(code.to_string().into()), message);
        if let Ok(status) = axum::http::StatusCode::from_u16(status) {
            err.set_status_code(status);
        }
        err
    };
    match e {
        FsError::NoSuchKey => s3_error!(NoSuchKey),
        FsError::InvalidKey(message) => {
            S3Error::with_message(S3ErrorCode::InvalidArgument, message)
        }
        FsError::Conflict(message) => custom("KeyConflict", 409, message),
        FsError::ReadOnly => S3Error::with_message(
            S3ErrorCode::AccessDenied,
            "the volume is a snapshot, which is read-only (fork it to change it)".to_string(),
        ),
        FsError::Quota => custom(
            "QuotaExceeded",
            403,
            "the volume's quota is exhausted; nothing was changed".into(),
        ),
        FsError::Io(errno) => {
            tracing::error!("S3 gateway: vfs call failed: {errno}");
            S3Error::with_message(
                S3ErrorCode::InternalError,
                format!("the volume failed: {errno}"),
            )
        }
    }
}

/// Runs blocking vfs work off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, FsError> + Send + 'static,
) -> S3Result<T> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(fs_error),
        Err(e) => Err(S3Error::with_message(
            S3ErrorCode::InternalError,
            format!("a gateway task failed: {e}"),
        )),
    }
}

fn parse_key(key: &str) -> S3Result<Key> {
    Key::parse(key).map_err(fs_error)
}

/// Writes a request body into `writer` (on a blocking thread, fed in pieces of [`IO_SIZE`]).
async fn write_body(mut writer: Writer, body: Option<StreamingBlob>) -> S3Result<Writer> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(IO_QUEUE);
    let writing = tokio::task::spawn_blocking(move || {
        while let Some(data) = rx.blocking_recv() {
            writer.write(&data)?;
        }
        Ok(writer)
    });
    let mut received: S3Result<()> = Ok(());
    if let Some(mut body) = body {
        let mut pending = BytesMut::new();
        while let Some(piece) = body.next().await {
            match piece {
                Ok(piece) => pending.extend_from_slice(&piece),
                Err(e) => {
                    received = Err(s3_error!(IncompleteBody, "reading the request body: {e}"));
                    break;
                }
            }
            if pending.len() >= IO_SIZE && tx.send(pending.split().freeze()).await.is_err() {
                break;
            }
        }
        if received.is_ok() && !pending.is_empty() {
            let _ = tx.send(pending.freeze()).await;
        }
    }
    drop(tx);
    let written = match writing.await {
        Ok(result) => result.map_err(fs_error),
        Err(e) => Err(S3Error::with_message(
            S3ErrorCode::InternalError,
            format!("a gateway task failed: {e}"),
        )),
    };
    match received {
        // The writer goes (unfinished, so nothing is left) on a blocking thread.
        Err(e) => {
            if let Ok(writer) = written {
                tokio::task::spawn_blocking(move || drop(writer));
            }
            Err(e)
        }
        Ok(()) => written,
    }
}

/// The pieces of a GET body, read by a blocking task.
struct Chunks(tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>);

impl Stream for Chunks {
    type Item = Result<Bytes, std::io::Error>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

fn timestamp(meta: &Meta) -> Timestamp {
    Timestamp::from(meta.modified)
}

/// Percent-encoding of `encoding-type=url` listings (what S3 leaves alone stays).
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[async_trait::async_trait]
impl S3 for VolumeBuckets {
    async fn list_buckets(
        &self,
        req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        let grant = grant_of(&req)?;
        Ok(S3Response::new(ListBucketsOutput {
            buckets: Some(vec![Bucket {
                name: Some(grant.bucket),
                ..Default::default()
            }]),
            ..Default::default()
        }))
    }

    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        let grant = grant_of(&req)?;
        self.objects(&grant).await?;
        Ok(S3Response::new(HeadBucketOutput::default()))
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        let grant = grant_of(&req)?;
        self.objects(&grant).await?;
        Ok(S3Response::new(GetBucketLocationOutput::default()))
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        let grant = grant_of(&req)?;
        let key = parse_key(&req.input.key)?;
        let objects = self.objects(&grant).await?;
        let (_, meta) = blocking(move || objects.stat(&key)).await?;
        Ok(S3Response::new(HeadObjectOutput {
            accept_ranges: Some("bytes".into()),
            content_length: Some(meta.size as i64),
            e_tag: Some(ETag::Strong(meta.etag.clone())),
            last_modified: Some(timestamp(&meta)),
            ..Default::default()
        }))
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        let grant = grant_of(&req)?;
        let key = parse_key(&req.input.key)?;
        let range = req.input.range;
        let objects = self.objects(&grant).await?;
        let dir = key.dir;
        let (reader, meta) = blocking(move || {
            let (ino, meta) = objects.stat(&key)?;
            if key.dir {
                return Ok((None, meta));
            }
            let reader = objects.open(ino)?;
            // The size as of the open: the body is this version's.
            let (_, meta) = objects.stat(&key).unwrap_or((ino, meta));
            Ok((Some(reader), meta))
        })
        .await?;
        let (start, end, content_range) = match range {
            None => (0, meta.size, None),
            Some(range) => {
                let Ok(r) = range.check(meta.size) else {
                    // The file closes off the async workers.
                    tokio::task::spawn_blocking(move || drop(reader));
                    return Err(s3_error!(InvalidRange));
                };
                let content_range = format!("bytes {}-{}/{}", r.start, r.end - 1, meta.size);
                (r.start, r.end, Some(content_range))
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel(IO_QUEUE);
        if let (Some(reader), false) = (reader, dir) {
            tokio::task::spawn_blocking(move || {
                let mut offset = start;
                while offset < end {
                    let len = (end - offset).min(IO_SIZE as u64) as u32;
                    let piece = match reader.read(offset, len) {
                        Ok(data) if data.is_empty() => Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "the object was truncated while being read",
                        )),
                        Ok(data) => Ok(Bytes::from(data)),
                        Err(e) => Err(std::io::Error::other(e.to_string())),
                    };
                    let failed = piece.is_err();
                    if let Ok(data) = &piece {
                        offset += data.len() as u64;
                    }
                    if tx.blocking_send(piece).is_err() || failed {
                        break;
                    }
                }
            });
        }
        Ok(S3Response::new(GetObjectOutput {
            body: Some(StreamingBlob::wrap(Chunks(rx))),
            accept_ranges: Some("bytes".into()),
            content_length: Some((end - start) as i64),
            content_range,
            e_tag: Some(ETag::Strong(meta.etag.clone())),
            last_modified: Some(timestamp(&meta)),
            ..Default::default()
        }))
    }

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        let grant = grant_of(&req)?;
        let key = parse_key(&req.input.key)?;
        let objects = self.objects(&grant).await?;
        let meta = if key.dir {
            blocking(move || objects.put_dir(&key)).await?
        } else {
            let writer = blocking(move || objects.writer(&key)).await?;
            let writer = write_body(writer, req.input.body).await?;
            blocking(move || writer.finish()).await?
        };
        Ok(S3Response::new(PutObjectOutput {
            e_tag: Some(ETag::Strong(meta.etag)),
            ..Default::default()
        }))
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        let grant = grant_of(&req)?;
        let objects = self.objects(&grant).await?;
        // A key that cannot name a file names nothing: deleting it succeeds, as in S3.
        if let Ok(key) = Key::parse(&req.input.key) {
            blocking(move || objects.delete(&key)).await?;
        }
        Ok(S3Response::new(DeleteObjectOutput::default()))
    }

    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        let grant = grant_of(&req)?;
        let objects = self.objects(&grant).await?;
        let quiet = req.input.delete.quiet.unwrap_or(false);
        let keys: Vec<String> = req
            .input
            .delete
            .objects
            .into_iter()
            .map(|o| o.key)
            .collect();
        let (deleted, errors) = blocking(move || {
            let (mut deleted, mut errors) = (Vec::new(), Vec::new());
            for key in keys {
                let outcome = match check_key(&grant, &key) {
                    Err(e) => Err(e),
                    Ok(()) => match Key::parse(&key) {
                        Ok(parsed) => objects.delete(&parsed).map_err(fs_error),
                        Err(_) => Ok(()),
                    },
                };
                match outcome {
                    Ok(()) => deleted.push(DeletedObject {
                        key: Some(key),
                        ..Default::default()
                    }),
                    Err(e) => errors.push(Error {
                        code: Some(e.code().as_str().to_string()),
                        message: e.message().map(str::to_string),
                        key: Some(key),
                        ..Default::default()
                    }),
                }
            }
            Ok((deleted, errors))
        })
        .await?;
        Ok(S3Response::new(DeleteObjectsOutput {
            deleted: (!quiet).then_some(deleted),
            errors: (!errors.is_empty()).then_some(errors),
            ..Default::default()
        }))
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        let grant = grant_of(&req)?;
        let input = req.input;
        let max_keys = input.max_keys.unwrap_or(MAX_KEYS).clamp(0, MAX_KEYS);
        let token = match &input.continuation_token {
            Some(token) => Some(
                hex::decode(token)
                    .ok()
                    .and_then(|t| String::from_utf8(t).ok())
                    .ok_or_else(|| s3_error!(InvalidArgument, "invalid continuation token"))?,
            ),
            None => None,
        };
        // Whichever skips more.
        let after = match (token, input.start_after.clone()) {
            (Some(t), Some(s)) => Some(t.max(s)),
            (t, s) => t.or(s),
        };
        let objects = self.objects(&grant).await?;
        let prefix = input.prefix.clone().unwrap_or_default();
        let delimiter = input.delimiter.clone();
        let scope = grant.prefix.clone();
        let (items, truncated) = blocking(move || {
            let list = List {
                prefix: &prefix,
                delimiter: delimiter.as_deref(),
                after: after.as_deref(),
                scope: &scope,
            };
            objects.list(&list, max_keys as usize)
        })
        .await?;
        let encode = input
            .encoding_type
            .as_ref()
            .is_some_and(|e| e.as_str() == EncodingType::URL);
        let shown = |s: String| if encode { url_encode(&s) } else { s };
        let next_continuation_token = truncated
            .then(|| items.last().map(|item| hex::encode(item.key())))
            .flatten();
        let key_count = items.len() as i32;
        let (mut contents, mut common_prefixes) = (Vec::new(), Vec::new());
        for item in items {
            match item {
                Listed::Object { key, meta } => contents.push(Object {
                    e_tag: Some(ETag::Strong(meta.etag.clone())),
                    last_modified: Some(timestamp(&meta)),
                    size: Some(meta.size as i64),
                    storage_class: Some(ObjectStorageClass::from_static(
                        ObjectStorageClass::STANDARD,
                    )),
                    key: Some(shown(key)),
                    ..Default::default()
                }),
                Listed::Prefix(prefix) => common_prefixes.push(CommonPrefix {
                    prefix: Some(shown(prefix)),
                }),
            }
        }
        Ok(S3Response::new(ListObjectsV2Output {
            name: Some(grant.bucket),
            prefix: Some(shown(input.prefix.unwrap_or_default())),
            delimiter: input.delimiter.map(shown),
            start_after: input.start_after.map(shown),
            max_keys: Some(max_keys),
            key_count: Some(key_count),
            is_truncated: Some(truncated),
            continuation_token: input.continuation_token,
            next_continuation_token,
            contents: (!contents.is_empty()).then_some(contents),
            common_prefixes: (!common_prefixes.is_empty()).then_some(common_prefixes),
            encoding_type: input.encoding_type,
            ..Default::default()
        }))
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        let grant = grant_of(&req)?;
        let key = parse_key(&req.input.key)?;
        if key.dir {
            return Err(s3_error!(
                InvalidArgument,
                "a key ending in '/' is a directory: it has no content to upload"
            ));
        }
        self.objects(&grant).await?;
        let upload_id = self.uploads.start(&grant.volume_id, &req.input.key);
        Ok(S3Response::new(CreateMultipartUploadOutput {
            bucket: Some(req.input.bucket),
            key: Some(req.input.key),
            upload_id: Some(upload_id),
            ..Default::default()
        }))
    }

    async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        let grant = grant_of(&req)?;
        let input = req.input;
        if !(1..=MAX_PART_NUMBER).contains(&input.part_number) {
            return Err(s3_error!(
                InvalidArgument,
                "part numbers are 1 to {MAX_PART_NUMBER}"
            ));
        }
        let upload = self
            .uploads
            .get(&input.upload_id, &grant.volume_id, &input.key)
            .ok_or_else(|| s3_error!(NoSuchUpload))?;
        let objects = self.objects(&grant).await?;
        let writer = blocking(move || objects.part_writer()).await?;
        let writer = write_body(writer, input.body).await?;
        let number = input.part_number;
        let etag = blocking(move || {
            writer.commit()?;
            let etag = writer.etag()?;
            // A part sent again replaces the earlier one (which closes here, off the workers).
            let replaced = upload.parts().insert(
                number,
                Part {
                    writer,
                    etag: etag.clone(),
                },
            );
            drop(replaced);
            Ok(etag)
        })
        .await?;
        Ok(S3Response::new(UploadPartOutput {
            e_tag: Some(ETag::Strong(etag)),
            ..Default::default()
        }))
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        let grant = grant_of(&req)?;
        let input = req.input;
        let key = parse_key(&input.key)?;
        let listed: Vec<CompletedPart> = input
            .multipart_upload
            .and_then(|m| m.parts)
            .unwrap_or_default();
        if listed.is_empty() {
            return Err(s3_error!(MalformedXML, "the upload lists no parts"));
        }
        let numbers: Vec<i32> = listed.iter().map(|p| p.part_number.unwrap_or(0)).collect();
        if numbers.windows(2).any(|w| w[0] >= w[1]) {
            return Err(s3_error!(InvalidPartOrder));
        }
        let upload = self
            .uploads
            .get(&input.upload_id, &grant.volume_id, &input.key)
            .ok_or_else(|| s3_error!(NoSuchUpload))?;
        let objects = self.objects(&grant).await?;
        let assembling = upload.clone();
        let assembled = tokio::task::spawn_blocking(move || -> S3Result<Meta> {
            let parts = assembling.parts();
            for p in &listed {
                let part = parts
                    .get(&p.part_number.unwrap_or(0))
                    .ok_or_else(|| s3_error!(InvalidPart))?;
                if p.e_tag.as_ref().is_some_and(|e| e.value() != part.etag) {
                    return Err(s3_error!(InvalidPart, "a part's ETag does not match"));
                }
            }
            let mut target = objects.writer(&key).map_err(fs_error)?;
            for p in &listed {
                if let Some(part) = parts.get(&p.part_number.unwrap_or(0)) {
                    target.append(&part.writer).map_err(fs_error)?;
                }
            }
            target.finish().map_err(fs_error)
        })
        .await
        .map_err(|e| {
            S3Error::with_message(
                S3ErrorCode::InternalError,
                format!("a gateway task failed: {e}"),
            )
        })??;
        let done = self
            .uploads
            .take(&input.upload_id, &grant.volume_id, &input.key);
        tokio::task::spawn_blocking(move || drop((done, upload)));
        Ok(S3Response::new(CompleteMultipartUploadOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            e_tag: Some(ETag::Strong(assembled.etag)),
            ..Default::default()
        }))
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        let grant = grant_of(&req)?;
        let input = req.input;
        let upload = self
            .uploads
            .take(&input.upload_id, &grant.volume_id, &input.key)
            .ok_or_else(|| s3_error!(NoSuchUpload))?;
        // Its parts close (and their files go) off the workers.
        blocking(move || {
            drop(upload);
            Ok(())
        })
        .await?;
        Ok(S3Response::new(AbortMultipartUploadOutput::default()))
    }
}
