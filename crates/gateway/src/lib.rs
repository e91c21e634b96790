//! cellar-gateway: an S3 API over Cellar volumes. Each volume is a bucket; an object key is a
//! path in the volume (docs/GATEWAY.md). Requests are signed (SigV4) with credentials that the
//! embedding process mints and looks up ([`Grants`]); volumes are opened by it too
//! ([`Volumes`]), so the gateway shares the process's one open vfs per volume with its file API.
//!
//! Every vfs call blocks: the gateway runs them on the blocking pool.

mod access;
mod fs;
mod multipart;
mod s3;

use std::future::Future;
use std::ops::Deref;
use std::sync::Arc;
use std::time::SystemTime;

use cellar_vfs::{Ctx, Vfs};

/// An open volume; the embedding process keeps it open while a handle lives.
pub type VolumeHandle = Arc<dyn Deref<Target = Vfs> + Send + Sync>;

/// What one access key may do.
#[derive(Clone)]
pub struct Grant {
    /// Signs the requests (SigV4 needs it in the clear).
    pub secret_key: String,
    pub volume_id: String,
    /// The bucket name the volume is served under.
    pub bucket: String,
    /// Only keys starting with it ('' for all).
    pub prefix: String,
    pub read_only: bool,
    pub expires_at: Option<SystemTime>,
}

impl std::fmt::Debug for Grant {
    // The secret is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grant")
            .field("volume_id", &self.volume_id)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("read_only", &self.read_only)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// A lookup or an open that failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The volume is gone (deleted, or being deleted).
    #[error("no such volume")]
    NotFound,
    /// The control database or the volume cannot be reached now.
    #[error("{0}")]
    Unavailable(String),
}

/// The credentials store: the gateway knows nothing of where grants live.
#[async_trait::async_trait]
pub trait Grants: Send + Sync + 'static {
    /// The grant of `access_key_id`; None if the key is unknown or revoked (expiry is checked
    /// by the gateway).
    async fn grant(&self, access_key_id: &str) -> Result<Option<Grant>, BackendError>;
}

/// Opens volumes by id.
#[async_trait::async_trait]
pub trait Volumes: Send + Sync + 'static {
    async fn open(&self, volume_id: &str) -> Result<VolumeHandle, BackendError>;
}

/// The S3 service.
pub struct Gateway {
    service: s3s::service::S3Service,
}

impl Gateway {
    /// Files are created and changed as `ctx` (the user sandboxes run as, so that mounts may
    /// change them).
    pub fn new(grants: Arc<dyn Grants>, volumes: Arc<dyn Volumes>, ctx: Ctx) -> Gateway {
        let mut builder = s3s::service::S3ServiceBuilder::new(s3::VolumeBuckets::new(volumes, ctx));
        builder.set_auth(access::Auth(grants.clone()));
        builder.set_access(access::Access(grants));
        builder.set_validation(access::VolumeNames);
        Gateway {
            service: builder.build(),
        }
    }

    /// Serves on `listener` until `shutdown` completes (requests in flight finish).
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let service = self.service;
        let app = axum::Router::new().fallback_service(tower::service_fn(
            move |request: axum::extract::Request| {
                let mut service = service.clone();
                async move {
                    let response = match tower::Service::call(&mut service, request).await {
                        Ok(response) => response.map(axum::body::Body::new),
                        Err(e) => {
                            tracing::error!("S3 request: {e:?}");
                            axum::http::Response::builder()
                                .status(500)
                                .body(axum::body::Body::empty())
                                .unwrap_or_default()
                        }
                    };
                    Ok::<_, std::convert::Infallible>(response)
                }
            },
        ));
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
    }
}
