//! Parsing of store URLs into explicit backend settings.
//!
//! The S3 client is built only from what is parsed here (never `AmazonS3Builder::from_env`), so
//! unrelated variables of the environment (`AWS_CA_BUNDLE`, `AWS_PROFILE`, ...) cannot change how
//! Cellar talks to a plain-http test endpoint.

use crate::StoreError;
use object_store::path::Path;
use std::fmt;
use std::path::PathBuf;

/// Where a volume's objects live, parsed from the store URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Backend {
    /// `file:///abs/dir`: a local directory (created if missing).
    Local {
        root: PathBuf,
    },
    S3(S3Settings),
}

/// Explicit S3 client settings.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct S3Settings {
    pub bucket: String,
    /// `None`: AWS itself (`https://s3.{region}.amazonaws.com`).
    pub endpoint: Option<String>,
    pub region: String,
    pub credentials: S3Credentials,
}

impl S3Settings {
    /// The endpoint as shown in messages (never carries credentials: userinfo is rejected).
    pub fn endpoint_for_messages(&self) -> String {
        self.endpoint
            .clone()
            .unwrap_or_else(|| format!("https://s3.{}.amazonaws.com", self.region))
    }

    pub fn allow_http(&self) -> bool {
        self.endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"))
    }
}

impl fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Settings")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("credentials", &self.credentials)
            .finish()
    }
}

/// A parsed store location: the backend plus the object prefix of one volume inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoreLocation {
    pub backend: Backend,
    /// URL prefix joined with the volume prefix; every object of the volume lives under it.
    pub prefix: Path,
    /// The URL prefix alone: other volumes' prefixes (a fork's ancestors) are joined to it.
    pub base: Path,
}

impl StoreLocation {
    /// Short description of the store for messages: no secrets.
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Local { root } => format!("directory {}", root.display()),
            Backend::S3(s3) => format!("bucket {} at {}", s3.bucket, s3.endpoint_for_messages()),
        }
    }
}

/// S3 access keys. `Debug` redacts them.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl S3Credentials {
    /// `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`), if both keys are set.
    pub fn from_env() -> Option<S3Credentials> {
        let var = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
        Some(S3Credentials {
            access_key_id: var("AWS_ACCESS_KEY_ID")?,
            secret_access_key: var("AWS_SECRET_ACCESS_KEY")?,
            session_token: var("AWS_SESSION_TOKEN"),
        })
    }
}

impl fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key_id", &"<redacted>")
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

fn config_err(msg: impl Into<String>) -> StoreError {
    StoreError::Config(msg.into())
}

/// Joins slash-separated prefix parts into one object path, rejecting `.`/`..` and similar.
pub(crate) fn join_prefix(parts: &[&str]) -> Result<Path, StoreError> {
    let joined: Vec<&str> = parts
        .iter()
        .flat_map(|p| p.split('/'))
        .filter(|s| !s.is_empty())
        .collect();
    Path::parse(joined.join("/")).map_err(|e| config_err(format!("invalid object prefix: {e}")))
}

pub(crate) fn parse_location(
    url: &str,
    volume_prefix: &str,
    credentials: Option<S3Credentials>,
) -> Result<StoreLocation, StoreError> {
    // Never echo the whole URL back: a user may have pasted credentials into it.
    let parsed =
        url::Url::parse(url).map_err(|e| config_err(format!("store URL does not parse: {e}")))?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(config_err(
            "credentials in the store URL are not supported; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
        ));
    }
    match parsed.scheme() {
        "file" => parse_file(&parsed, volume_prefix),
        "s3" => parse_s3(&parsed, volume_prefix, credentials),
        other => Err(config_err(format!(
            "unsupported store URL scheme {other:?} (expected file:// or s3://)"
        ))),
    }
}

fn parse_file(url: &url::Url, volume_prefix: &str) -> Result<StoreLocation, StoreError> {
    if url.query().is_some() {
        return Err(config_err("file:// store URLs take no options"));
    }
    let root = url
        .to_file_path()
        .map_err(|()| config_err("file:// store URL must name an absolute local directory"))?;
    Ok(StoreLocation {
        backend: Backend::Local { root },
        prefix: join_prefix(&[volume_prefix])?,
        base: Path::default(),
    })
}

fn parse_s3(
    url: &url::Url,
    volume_prefix: &str,
    credentials: Option<S3Credentials>,
) -> Result<StoreLocation, StoreError> {
    let bucket = url
        .host_str()
        .filter(|b| !b.is_empty())
        .ok_or_else(|| config_err("s3:// store URL needs a bucket: s3://bucket[/prefix]"))?
        .to_string();
    let mut endpoint = None;
    let mut region = None;
    for (key, value) in url.query_pairs() {
        match key.as_ref() {
            "endpoint" => endpoint = Some(parse_endpoint(&value)?),
            "region" => region = Some(value.into_owned()),
            other => {
                return Err(config_err(format!(
                    "unknown s3:// store URL option {other:?} (known: endpoint, region)"
                )))
            }
        }
    }
    let credentials = credentials.ok_or_else(|| {
        config_err("S3 credentials missing: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    })?;
    Ok(StoreLocation {
        backend: Backend::S3(S3Settings {
            bucket,
            endpoint,
            region: region.unwrap_or_else(|| "us-east-1".to_string()),
            credentials,
        }),
        prefix: join_prefix(&[url.path(), volume_prefix])?,
        base: join_prefix(&[url.path()])?,
    })
}

fn parse_endpoint(value: &str) -> Result<String, StoreError> {
    let endpoint = url::Url::parse(value)
        .map_err(|e| config_err(format!("endpoint option does not parse as a URL: {e}")))?;
    if !matches!(endpoint.scheme(), "http" | "https") {
        return Err(config_err("endpoint must be an http:// or https:// URL"));
    }
    if !endpoint.username().is_empty() || endpoint.password().is_some() {
        return Err(config_err("endpoint must not carry credentials"));
    }
    if endpoint.host_str().is_none() {
        return Err(config_err("endpoint has no host"));
    }
    Ok(value.trim_end_matches('/').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> Option<S3Credentials> {
        Some(S3Credentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "super-secret-value".into(),
            session_token: Some("token-value".into()),
        })
    }

    #[test]
    fn s3_url_with_endpoint_region_and_prefixes() {
        let loc = parse_location(
            "s3://bucket/base/dir?endpoint=http://127.0.0.1:7480/&region=eu-west-1",
            "volumes/v1",
            creds(),
        )
        .unwrap();
        assert_eq!(loc.prefix.as_ref(), "base/dir/volumes/v1");
        let Backend::S3(s3) = loc.backend else {
            panic!("not s3")
        };
        assert_eq!(s3.bucket, "bucket");
        assert_eq!(s3.endpoint.as_deref(), Some("http://127.0.0.1:7480"));
        assert_eq!(s3.region, "eu-west-1");
        assert!(s3.allow_http());
        assert_eq!(s3.credentials, creds().unwrap());
    }

    #[test]
    fn s3_defaults_to_aws_over_https() {
        let loc = parse_location("s3://b", "", creds()).unwrap();
        assert_eq!(loc.prefix.as_ref(), "");
        let Backend::S3(s3) = loc.backend else {
            panic!("not s3")
        };
        assert_eq!(s3.region, "us-east-1");
        assert!(!s3.allow_http());
        assert_eq!(
            s3.endpoint_for_messages(),
            "https://s3.us-east-1.amazonaws.com"
        );
    }

    #[test]
    fn debug_redacts_secrets() {
        let loc = parse_location("s3://b?endpoint=http://h:1", "v", creds()).unwrap();
        let shown = format!("{loc:?}");
        assert!(!shown.contains("super-secret-value"), "{shown}");
        assert!(!shown.contains("AKIDEXAMPLE"), "{shown}");
        assert!(!shown.contains("token-value"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn missing_credentials_is_a_config_error() {
        let err = parse_location("s3://b", "v", None).unwrap_err();
        assert!(
            matches!(err, StoreError::Config(ref m) if m.contains("AWS_ACCESS_KEY_ID")),
            "{err}"
        );
    }

    #[test]
    fn bad_urls_are_rejected_without_echoing_secrets() {
        for url in [
            "s3://key:topsecret@bucket",
            "s3://bucket?endpoint=http://key:topsecret@host:1",
            "s3://bucket?unknown=topsecret",
            "ftp://host/dir",
            "file:///dir?x=1",
        ] {
            let err = parse_location(url, "v", creds()).unwrap_err();
            assert!(matches!(err, StoreError::Config(_)), "{url}: {err}");
            assert!(!err.to_string().contains("topsecret"), "{url}: {err}");
        }
        assert!(parse_location("file:///tmp/x", "a/../b", creds()).is_err());
    }

    #[test]
    fn file_url() {
        let loc = parse_location("file:///tmp/cellar-data", "/vol/7/", creds()).unwrap();
        assert_eq!(
            loc.backend,
            Backend::Local {
                root: PathBuf::from("/tmp/cellar-data")
            }
        );
        assert_eq!(loc.prefix.as_ref(), "vol/7");
    }
}
