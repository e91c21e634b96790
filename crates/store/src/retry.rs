//! Retry policy of the S3 client and the mapping of `object_store` errors onto [`StoreError`].
//!
//! `object_store` retries transient failures itself (5xx, connection errors, dropped
//! connections, timeouts of idempotent requests) with exponential backoff and jitter; this module
//! sets that policy explicitly and turns what is left after retrying into short, secret-free
//! messages: response bodies (which may quote the access key id) never reach a message.

use crate::StoreError;
use object_store::client::{HttpError, HttpErrorKind};
use object_store::{BackoffConfig, ClientOptions, RetryConfig};
use std::error::Error as _;
use std::time::Duration;

/// How long the store waits on the object store before giving up. The defaults fail an
/// operation on a silent store (one that accepts connections and never answers) in about
/// 20 s (two tries of 10 s) and always within `operation` (30 s), so that fsync answers EIO
/// well within a minute even when it first waits for a flush already under way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreTimeouts {
    /// Opening a connection (a refused connection fails at once and is retried).
    pub connect: Duration,
    /// One try of one request, from sending it to the last byte of its answer (one block of
    /// 4 MiB, or a ranged GET of up to 8 MiB: the default needs about 1 MB/s).
    pub request: Duration,
    /// Retries of one request stop once this much time has passed since its first try.
    pub retry: Duration,
    /// The hard bound of one store operation (a block's upload, a ranged read), waiting for
    /// a free connection slot, retries and integrity re-reads included.
    pub operation: Duration,
}

impl Default for StoreTimeouts {
    fn default() -> Self {
        StoreTimeouts {
            connect: Duration::from_secs(2),
            request: Duration::from_secs(10),
            retry: Duration::from_secs(20),
            operation: Duration::from_secs(30),
        }
    }
}

pub(crate) fn retry_config(max_retries: u32, timeouts: &StoreTimeouts) -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            base: 2.0,
        },
        max_retries: max_retries as usize,
        retry_timeout: timeouts.retry,
    }
}

/// `plain_http`: the endpoint is `http://`, so TLS is never used; then the system trust store
/// is not loaded either, and CA variables pointing at missing files (`SSL_CERT_FILE`, ...)
/// cannot break the client.
pub(crate) fn client_options(plain_http: bool, timeouts: &StoreTimeouts) -> ClientOptions {
    ClientOptions::new()
        .with_allow_http(plain_http)
        .with_no_system_certificates(plain_http)
        .with_connect_timeout(timeouts.connect)
        .with_timeout(timeouts.request)
}

/// What went wrong, extracted from an `object_store` error chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    NotFound,
    NoSuchBucket,
    Auth {
        status: Option<u16>,
        code: Option<String>,
    },
    Unreachable {
        timeout: bool,
    },
    /// HTTP status (if any) and S3 error code (if any) of another failure.
    Other {
        status: Option<u16>,
        code: Option<String>,
        kind: String,
    },
}

/// Classifies an error, looking through its whole source chain.
pub(crate) fn classify(err: &object_store::Error) -> Failure {
    let text = chain_text(err);
    let status = status_in(&text);
    let code = s3_code_in(&text);
    if code.as_deref() == Some("NoSuchBucket") {
        return Failure::NoSuchBucket;
    }
    match err {
        object_store::Error::NotFound { .. } => return Failure::NotFound,
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => return Failure::Auth { status, code },
        _ => {}
    }
    const AUTH_CODES: [&str; 4] = [
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
    ];
    if matches!(status, Some(401 | 403)) || code.as_deref().is_some_and(|c| AUTH_CODES.contains(&c))
    {
        return Failure::Auth { status, code };
    }
    if let Some(kind) = http_error_kind(err) {
        match kind {
            HttpErrorKind::Connect => return Failure::Unreachable { timeout: false },
            HttpErrorKind::Timeout => return Failure::Unreachable { timeout: true },
            _ => {}
        }
    }
    if status == Some(404) {
        return Failure::NotFound;
    }
    let kind = match http_error_kind(err) {
        Some(HttpErrorKind::Interrupted) => "connection interrupted".to_string(),
        Some(HttpErrorKind::Decode) => "undecodable response".to_string(),
        Some(_) => "request failed".to_string(),
        // Neither an HTTP exchange nor a status: a local error (file system), safe to quote.
        None if status.is_none() && code.is_none() => text
            .lines()
            .next()
            .unwrap_or_default()
            .chars()
            .take(300)
            .collect(),
        None => "request failed".to_string(),
    };
    Failure::Other { status, code, kind }
}

/// Turns a failed operation (`op` on object `key`) into a [`StoreError`] naming the store `store`.
pub(crate) fn to_store_error(
    err: &object_store::Error,
    op: &str,
    key: &str,
    store: &str,
) -> StoreError {
    let detail = |status: &Option<u16>, code: &Option<String>| -> String {
        match (status, code) {
            (Some(s), Some(c)) => format!("HTTP {s} {c}"),
            (Some(s), None) => format!("HTTP {s}"),
            (None, Some(c)) => c.clone(),
            (None, None) => String::new(),
        }
    };
    match classify(err) {
        Failure::NotFound => StoreError::NotFound(key.to_string()),
        Failure::NoSuchBucket => StoreError::Config(format!("{store}: the bucket does not exist")),
        Failure::Auth { status, code } => {
            StoreError::Auth(format!("{op} {key} on {store}: {}", detail(&status, &code)))
        }
        Failure::Unreachable { timeout } => StoreError::Io(format!(
            "could not reach {store}: {} (gave up {op} {key} after retrying)",
            if timeout {
                "timed out"
            } else {
                "connection failed"
            }
        )),
        Failure::Other { status, code, kind } => {
            let detail = detail(&status, &code);
            let sep = if detail.is_empty() { "" } else { ": " };
            StoreError::Io(format!("{op} {key} on {store} failed: {kind}{sep}{detail}"))
        }
    }
}

fn chain_text(err: &object_store::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push('\n');
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn http_error_kind(err: &object_store::Error) -> Option<HttpErrorKind> {
    let mut source = err.source();
    while let Some(s) = source {
        if let Some(http) = s.downcast_ref::<HttpError>() {
            return Some(http.kind());
        }
        source = s.source();
    }
    None
}

/// `object_store` reports statuses as "... status code: 403 Forbidden ..." inside its messages.
fn status_in(text: &str) -> Option<u16> {
    let after = &text[text.find("status code: ")? + "status code: ".len()..];
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The S3 error code of an XML error body, e.g. `<Code>InvalidAccessKeyId</Code>`.
fn s3_code_in(text: &str) -> Option<String> {
    let start = text.find("<Code>")? + "<Code>".len();
    let len = text[start..].find("</Code>")?;
    let code = &text[start..start + len];
    code.chars()
        .all(|c| c.is_ascii_alphanumeric())
        .then(|| code.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Body(&'static str);
    impl std::fmt::Display for Body {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for Body {}

    fn generic(source: impl std::error::Error + Send + Sync + 'static) -> object_store::Error {
        object_store::Error::Generic {
            store: "S3",
            source: Box::new(source),
        }
    }

    #[test]
    fn status_and_code_extraction() {
        let text = "Error performing GET http://h/b in 1ms - Server returned non-2xx status code: \
                    403 Forbidden: <?xml?><Error><Code>InvalidAccessKeyId</Code><AWSAccessKeyId>AKID</AWSAccessKeyId></Error>";
        assert_eq!(status_in(text), Some(403));
        assert_eq!(s3_code_in(text), Some("InvalidAccessKeyId".into()));
        assert_eq!(status_in("no status"), None);
        assert_eq!(s3_code_in("<Code>bad code</Code>"), None);
    }

    #[test]
    fn classification_of_failures() {
        let forbidden = generic(Body("Server returned non-2xx status code: 403 Forbidden: <Code>SignatureDoesNotMatch</Code>"));
        assert_eq!(
            classify(&forbidden),
            Failure::Auth {
                status: Some(403),
                code: Some("SignatureDoesNotMatch".into())
            }
        );
        let no_bucket = generic(Body(
            "status code: 404 Not Found: <Code>NoSuchBucket</Code>",
        ));
        assert_eq!(classify(&no_bucket), Failure::NoSuchBucket);
        let missing = object_store::Error::NotFound {
            path: "k".into(),
            source: Box::new(Body("404")),
        };
        assert_eq!(classify(&missing), Failure::NotFound);
        let refused = generic(HttpError::new(
            HttpErrorKind::Connect,
            Body("connection refused"),
        ));
        assert_eq!(classify(&refused), Failure::Unreachable { timeout: false });
        let timeout = generic(HttpError::new(HttpErrorKind::Timeout, Body("deadline")));
        assert_eq!(classify(&timeout), Failure::Unreachable { timeout: true });
        let server = generic(Body(
            "status code: 503 Service Unavailable: <Code>SlowDown</Code>",
        ));
        assert_eq!(
            classify(&server),
            Failure::Other {
                status: Some(503),
                code: Some("SlowDown".into()),
                kind: "request failed".into()
            }
        );
    }

    #[test]
    fn local_errors_are_quoted() {
        let disk_full = generic(Body(
            "Unable to write /data/x: No space left on device\ncontext",
        ));
        let err = to_store_error(&disk_full, "put", "x", "directory /data");
        assert_eq!(
            err.to_string(),
            "object store: put x on directory /data failed: \
             Generic S3 error: Unable to write /data/x: No space left on device"
        );
    }

    #[test]
    fn store_errors_carry_no_response_body() {
        let forbidden = generic(Body(
            "status code: 403 Forbidden: <Code>InvalidAccessKeyId</Code><AWSAccessKeyId>AKIDSECRETISH</AWSAccessKeyId>",
        ));
        let err = to_store_error(&forbidden, "list", "vol/", "bucket b at http://127.0.0.1:1");
        assert!(matches!(err, StoreError::Auth(_)), "{err}");
        let shown = err.to_string();
        assert!(!shown.contains("AKIDSECRETISH"), "{shown}");
        assert!(
            shown.contains("InvalidAccessKeyId") && !shown.contains('\n'),
            "{shown}"
        );

        let refused = generic(HttpError::new(HttpErrorKind::Connect, Body("refused")));
        let err = to_store_error(&refused, "get", "k", "bucket b at http://127.0.0.1:1");
        assert!(
            matches!(err, StoreError::Io(ref m) if m.contains("http://127.0.0.1:1")),
            "{err}"
        );
    }

    #[test]
    fn retry_policy_is_bounded() {
        let timeouts = StoreTimeouts::default();
        let config = retry_config(5, &timeouts);
        assert_eq!(config.max_retries, 5);
        assert_eq!(config.retry_timeout, timeouts.retry);
        // The last try starts within the retry window and lasts at most one request timeout,
        // and the operation bound caps both: fsync on a silent store fails within a minute.
        assert!(timeouts.retry + timeouts.request <= Duration::from_secs(60));
        assert!(timeouts.operation < Duration::from_secs(60));
        assert!(config.backoff.max_backoff <= Duration::from_secs(10));
    }
}
