//! Request size and rate limits: a body over `max_body_bytes` answers 413 (declared or streamed),
//! file uploads have their own larger `max_upload_bytes` and stay streamed, a key over its rate
//! answers 429 with `Retry-After`, and the OpenAPI document describes both. The toolbox upload
//! needs root, bwrap and the cellar binary (CELLAR_BIN or target/debug/cellar).

mod common;

use std::time::{Duration, Instant};

use common::{require_runner_prerequisites, TestServer};
use reqwest::StatusCode;
use serde_json::{json, Value};

const MAX_BODY: u64 = 64 << 10;
/// Above axum's own default of 2 MB, which must not apply either.
const MAX_UPLOAD: u64 = 3 << 20;

fn assert_too_large(what: &str, (status, body): (StatusCode, Value)) {
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{what}: {body}");
    assert_eq!(body["statusCode"], 413, "{what}: {body}");
    assert_eq!(body["code"], "PAYLOAD_TOO_LARGE", "{what}: {body}");
    assert!(
        body["message"].as_str().unwrap().contains("larger than"),
        "{what}: {body}"
    );
}

/// A body sent in pieces with no Content-Length (chunked), so only reading it shows its size.
fn chunked(len: usize) -> reqwest::Body {
    let pieces = (0..len.div_ceil(16 << 10))
        .map(move |i| Ok::<_, std::io::Error>(vec![b'x'; (len - i * (16 << 10)).min(16 << 10)]));
    reqwest::Body::wrap_stream(futures::stream::iter(pieces))
}

async fn small_limits() -> TestServer {
    TestServer::start_with(|config| {
        config.limits.max_body_bytes = MAX_BODY;
        config.limits.max_upload_bytes = MAX_UPLOAD;
    })
    .await
}

#[tokio::test]
async fn bodies_over_the_limit_answer_413_and_uploads_have_their_own() {
    let server = small_limits().await;
    let volume = server.create_volume("limited").await;
    let id = volume["id"].as_str().unwrap();

    // A JSON body over the limit, declared and chunked: refused, nothing created.
    let big_name = "a".repeat(MAX_BODY as usize + 1);
    assert_too_large(
        "declared JSON body",
        server
            .post("/api/volumes", &json!({ "name": big_name }))
            .await,
    );
    let request = server
        .http
        .post(server.url("/api/volumes"))
        .bearer_auth(&server.key)
        .header("content-type", "application/json")
        .body(chunked(MAX_BODY as usize + 1));
    assert_too_large("chunked JSON body", server.send(request).await);
    let (_, list) = server.get("/api/volumes").await;
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    // Under the limit, the same endpoint works.
    let (status, body) = server
        .post("/api/volumes", &json!({ "name": "fits" }))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // A file upload over the request limit but under the upload limit is stored, streamed.
    let upload = |path: &str, body: reqwest::Body| {
        server
            .http
            .put(server.url(&format!("/api/volumes/{id}/files/content?path={path}")))
            .bearer_auth(&server.key)
            .body(body)
    };
    let fits = MAX_UPLOAD as usize - 1;
    let (status, body) = server.send(upload("/fits.bin", chunked(fits))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["size"], fits, "{body}");
    // Over the upload limit, declared or streamed: 413, and nothing stored.
    let over = vec![0u8; MAX_UPLOAD as usize + 1];
    assert_too_large(
        "declared upload",
        server.send(upload("/over.bin", over.into())).await,
    );
    assert_too_large(
        "streamed upload",
        server
            .send(upload("/over.bin", chunked(MAX_UPLOAD as usize * 3)))
            .await,
    );
    let (status, body) = server
        .get(&format!("/api/volumes/{id}/files/stat?path=/over.bin"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    // The runner API has the request limit too, once the runner token is checked.
    let (_, token) = server.admin(|c| cellar_server::admin_create_runner_token(c, "r").unwrap());
    let register = |token: &str| {
        server
            .http
            .post(server.url("/runner-api/v1/register"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(chunked(MAX_BODY as usize + 1))
    };
    let (status, _) = server.send(register("not-a-token")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_too_large("runner registration", server.send(register(&token)).await);
    server.stop().await;
}

#[tokio::test]
async fn toolbox_uploads_have_the_upload_limit() {
    require_runner_prerequisites();
    let server = small_limits().await;
    let (status, sandbox) = server.post("/api/sandbox", &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{sandbox}");
    let url = server.url(&format!(
        "/toolbox/{}/files/bulk-upload",
        sandbox["id"].as_str().unwrap()
    ));
    let form = |len: usize| {
        reqwest::multipart::Form::new()
            .text("files[0].path", "up.bin")
            .part(
                "files[0].file",
                reqwest::multipart::Part::stream(chunked(len)).file_name("up.bin"),
            )
    };
    let send = |len| {
        server
            .http
            .post(&url)
            .bearer_auth(&server.key)
            .multipart(form(len))
    };
    // Above the request limit (and axum's 2 MB), under the upload limit: written to the sandbox.
    let fits = MAX_UPLOAD as usize - 1024;
    let (status, body) = server.send(send(fits)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (code, out) = common::exec(&server, &sandbox, "stat -c %s up.bin").await;
    assert_eq!((code, out.trim()), (0, fits.to_string().as_str()));
    assert_too_large(
        "streamed toolbox upload",
        server.send(send(MAX_UPLOAD as usize * 2)).await,
    );
    let path = format!("/api/sandbox/{}", sandbox["id"].as_str().unwrap());
    let (status, body) = server.delete(&path).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Stopping the server before the sandbox is gone would leave its network helper behind.
    server.wait_for(&path, "state", "destroyed").await;
    server.stop().await;
}

#[tokio::test]
async fn a_key_over_its_rate_answers_429_with_retry_after() {
    let server = TestServer::start_with(|config| {
        config.limits.rate_per_sec = 2;
        config.limits.rate_burst = 5;
    })
    .await;
    let other_key = server.admin(|c| {
        cellar_server::admin_create_org(c, "other").unwrap();
        cellar_server::admin_create_key(c, "other").unwrap()
    });
    let started = Instant::now();
    for i in 0..5 {
        let (status, body) = server.get("/api/volumes").await;
        assert_eq!(
            status,
            StatusCode::OK,
            "request {i} is within the burst: {body}"
        );
    }
    let response = server
        .http
        .get(server.url("/api/volumes"))
        .bearer_auth(&server.key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        (&body["statusCode"], &body["code"]),
        (&json!(429), &json!("TOO_MANY_REQUESTS")),
        "{body}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "the burst took so long that tokens came back: {:?}",
        started.elapsed()
    );
    // Toolbox calls count against the same key.
    let (status, _) = server
        .post("/toolbox/none/process/execute", &json!({"command": "true"}))
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    // Another key has a bucket of its own; a missing key is 401, not 429.
    let (status, body) = server
        .send(
            server
                .http
                .get(server.url("/api/volumes"))
                .bearer_auth(&other_key),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = server
        .send(server.http.get(server.url("/api/volumes")))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // After the wait it asked for, the key works again.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let (status, body) = server.get("/api/volumes").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    server.stop().await;
}

#[tokio::test]
async fn a_larger_body_limit_than_axums_default_holds() {
    let server = TestServer::start_with(|config| config.limits.max_body_bytes = 4 << 20).await;
    // 3 MiB of JSON is read and judged on its content: an invalid name, not a too large body.
    let (status, body) = server
        .post("/api/volumes", &json!({ "name": "a".repeat(3 << 20) }))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("name") && !message.contains("length limit"),
        "{message}"
    );
    server.stop().await;
}

#[tokio::test]
async fn the_openapi_document_describes_413_and_429() {
    let server = TestServer::start().await;
    let (status, document) = server.get("/api/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    for (path, method) in [
        ("/api/volumes", "post"),
        ("/api/volumes/{volumeId}/files/content", "put"),
        ("/toolbox/{sandboxId}/files/bulk-upload", "post"),
        ("/api/sandbox", "get"),
    ] {
        let responses = &document["paths"][path][method]["responses"];
        assert!(responses["413"].is_object(), "{path} {method}: {responses}");
        assert!(
            responses["429"]["headers"]["Retry-After"].is_object(),
            "{path} {method}: {responses}"
        );
    }
    server.stop().await;
}
