//! Request size and rate limits: a body over its route's limit answers 413, a key over its
//! request rate answers 429 with `Retry-After` (docs/CONFIGURATION.md, "Limits").

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::CONTENT_LENGTH;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// Which limit a route's body has.
#[derive(Clone, Copy)]
pub enum BodyKind {
    /// JSON and query-only requests: `max_body_bytes`.
    Request,
    /// Streamed file uploads: `max_upload_bytes`.
    Upload,
}

fn too_large(limit: u64, setting: &str) -> Response {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the request body is larger than {limit} bytes (the server's {setting})"),
    )
    .into_response()
}

/// Refuses a body whose declared length is over the limit before anything reads it, and cuts
/// one that grows past it while being read (chunked, or a lying length): whatever the handler
/// made of the broken body, the answer is then the 413. Counting as the body streams keeps
/// uploads streamed.
pub async fn limit_body(
    State((limit, kind)): State<(u64, BodyKind)>,
    request: Request,
    next: Next,
) -> Response {
    let setting = match kind {
        BodyKind::Request => "max_body_bytes",
        BodyKind::Upload => "max_upload_bytes",
    };
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit) {
        return too_large(limit, setting);
    }
    let exceeded = Arc::new(AtomicBool::new(false));
    let flag = exceeded.clone();
    let mut seen = 0u64;
    let request = request.map(|body| {
        Body::from_stream(body.into_data_stream().map(move |chunk| {
            let chunk = chunk?;
            seen += chunk.len() as u64;
            if seen > limit {
                flag.store(true, Ordering::SeqCst);
                return Err(axum::Error::new(std::io::Error::other(
                    "the request body is over the size limit",
                )));
            }
            Ok(chunk)
        }))
    });
    let response = next.run(request).await;
    if exceeded.load(Ordering::SeqCst) {
        return too_large(limit, setting);
    }
    response
}

/// A token bucket per API key: `rate` requests a second on average, up to `burst` at once.
/// Only keys that authenticated get a bucket, so the map is bounded by the keys that exist.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<[u8; 32], Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    /// `rate` 0 turns limiting off.
    pub fn new(rate: u32, burst: u32) -> RateLimiter {
        RateLimiter {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::default(),
        }
    }

    /// Takes a token for `key`, or says how long until one is there.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        // The key itself is a secret: keep only its hash.
        let id: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = buckets.entry(id).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let refill = now.duration_since(bucket.at).as_secs_f64() * self.rate;
        bucket.tokens = (bucket.tokens + refill).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate))
        }
    }
}

/// The 429 of a key over its rate; `Retry-After` in whole seconds, at least 1.
pub fn too_many_requests(wait: Duration) -> ApiError {
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        format!("too many requests with this API key: retry in {secs} s"),
    )
    .with_retry_after(secs)
}

#[cfg(test)]
mod tests {
    use super::RateLimiter;

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_the_rate() {
        let limiter = RateLimiter::new(10, 3);
        for _ in 0..3 {
            limiter.check("k").unwrap();
        }
        let wait = limiter.check("k").unwrap_err();
        assert!(wait <= std::time::Duration::from_millis(100), "{wait:?}");
        // Another key has its own bucket.
        limiter.check("other").unwrap();
        std::thread::sleep(wait + std::time::Duration::from_millis(5));
        limiter.check("k").unwrap();
        assert!(RateLimiter::new(0, 0).check("k").is_ok(), "0 is off");
    }
}
