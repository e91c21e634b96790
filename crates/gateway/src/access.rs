//! Who may do what: the signature is checked against the grant's secret, then the request
//! against the grant's bucket, key prefix, mode and expiry. Every refusal is AccessDenied.

use std::sync::Arc;
use std::time::SystemTime;

use s3s::access::{S3Access, S3AccessContext};
use s3s::auth::{S3Auth, SecretKey};
use s3s::path::S3Path;
use s3s::{s3_error, S3Error, S3Result};

use crate::{BackendError, Grant, Grants};

/// Operations a read-only grant allows.
const READ_OPS: &[&str] = &[
    "GetObject",
    "HeadObject",
    "ListObjectsV2",
    "HeadBucket",
    "ListBuckets",
    "GetBucketLocation",
];

pub(crate) fn unavailable(e: BackendError) -> S3Error {
    match e {
        BackendError::NotFound => s3_error!(NoSuchBucket),
        BackendError::Unavailable(message) => {
            tracing::warn!("S3 gateway: {message}");
            s3_error!(
                ServiceUnavailable,
                "the volume cannot be reached now; retry"
            )
        }
    }
}

/// The live grant of an access key, or AccessDenied.
async fn live_grant(grants: &dyn Grants, access_key: &str) -> S3Result<Grant> {
    let grant = grants
        .grant(access_key)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| s3_error!(AccessDenied, "unknown or revoked access key"))?;
    if grant.expires_at.is_some_and(|at| at <= SystemTime::now()) {
        return Err(s3_error!(AccessDenied, "the credentials have expired"));
    }
    Ok(grant)
}

pub(crate) struct Auth(pub Arc<dyn Grants>);

#[async_trait::async_trait]
impl S3Auth for Auth {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<SecretKey> {
        Ok(SecretKey::from(
            live_grant(&*self.0, access_key).await?.secret_key,
        ))
    }
}

pub(crate) struct Access(pub Arc<dyn Grants>);

#[async_trait::async_trait]
impl S3Access for Access {
    async fn check(&self, cx: &mut S3AccessContext<'_>) -> S3Result<()> {
        let access_key = cx
            .credentials()
            .map(|c| c.access_key.clone())
            .ok_or_else(|| s3_error!(AccessDenied, "requests must be signed"))?;
        let grant = live_grant(&*self.0, &access_key).await?;
        let op = cx.s3_op().name();
        if grant.read_only && !READ_OPS.contains(&op) {
            return Err(s3_error!(AccessDenied, "the credentials are read-only"));
        }
        match cx.s3_path() {
            S3Path::Root => {
                if op != "ListBuckets" {
                    return Err(s3_error!(AccessDenied));
                }
            }
            S3Path::Bucket { bucket } => check_bucket(&grant, bucket)?,
            S3Path::Object { bucket, key } => {
                check_bucket(&grant, bucket)?;
                check_key(&grant, key)?;
            }
        }
        cx.extensions_mut().insert(grant);
        Ok(())
    }
}

fn check_bucket(grant: &Grant, bucket: &str) -> S3Result<()> {
    if bucket != grant.bucket {
        return Err(s3_error!(
            AccessDenied,
            "the credentials are for another bucket"
        ));
    }
    Ok(())
}

pub(crate) fn check_key(grant: &Grant, key: &str) -> S3Result<()> {
    if !key.starts_with(&grant.prefix) {
        return Err(s3_error!(
            AccessDenied,
            "the key is outside the credentials' prefix"
        ));
    }
    Ok(())
}

/// Buckets are named after volumes, whose names S3's rules would partly refuse (capitals, `_`):
/// the grant decides which name is valid.
pub(crate) struct VolumeNames;

impl s3s::validation::NameValidation for VolumeNames {
    fn validate_bucket_name(&self, name: &str) -> bool {
        !name.is_empty() && name.len() <= 255
    }
}
