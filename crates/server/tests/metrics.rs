//! `GET /metrics` of the server: what the file API did shows in the counters; with a metrics
//! token the endpoint answers only to it. And the metrics socket of a mount that the embedded
//! runner started for a sandbox.

mod common;

use common::{exec, require_runner_prerequisites, TestServer};
use reqwest::StatusCode;
use serde_json::json;
use std::io::{Read, Write};

/// The value of the sample `series` (name with labels, as exposed), or 0 when absent.
fn sample(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |value| value.parse().expect("a number"))
}

async fn scrape(server: &TestServer, token: Option<&str>) -> (StatusCode, String, String) {
    let mut request = server.http.get(server.url("/metrics"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("request reaches the server");
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, content_type, response.text().await.unwrap())
}

#[tokio::test]
async fn metrics_count_what_the_file_api_did() {
    let server = TestServer::start().await;
    let volume = server.create_volume("metered").await;
    let id = volume["id"].as_str().unwrap();
    let (status, content_type, before) = scrape(&server, None).await;
    assert_eq!(status, StatusCode::OK, "open without a metrics token");
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );

    // Larger than an inline file: its bytes go to the store.
    let body = vec![7u8; 3 << 20];
    let url = server.url(&format!("/api/volumes/{id}/files/content?path=%2Fbig"));
    let (status, _) = server
        .send(server.http.put(url).bearer_auth(&server.key).body(body))
        .await;
    assert_eq!(status, StatusCode::CREATED);

    let (_, _, after) = scrape(&server, None).await;
    let moved = |series: &str| sample(&after, series) - sample(&before, series);
    assert!(
        moved(r#"cellar_fs_request_duration_seconds_count{op="write"}"#) >= 1.0,
        "{after}"
    );
    assert!(moved("cellar_fs_written_bytes_total") >= f64::from(3 << 20));
    assert!(moved(r#"cellar_store_request_duration_seconds_count{op="put"}"#) >= 1.0);
    assert!(moved(r#"cellar_store_bytes_total{op="put"}"#) >= f64::from(3 << 20));
    assert!(moved(r#"cellar_meta_transaction_duration_seconds_count{kind="write"}"#) >= 1.0);
    // Nothing names the volume.
    assert!(!after.contains(id) && !after.contains("metered"));
    server.stop().await;
}

#[tokio::test]
async fn a_metrics_token_closes_the_endpoint_to_everyone_else() {
    let server = TestServer::start_with(|config| {
        config.metrics_token = Some(cellar_server::config::MetricsToken("scrape-me".into()));
    })
    .await;
    assert_eq!(scrape(&server, None).await.0, StatusCode::UNAUTHORIZED);
    // An API key is not the metrics token.
    let key = server.key.clone();
    assert_eq!(
        scrape(&server, Some(&key)).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (status, _, body) = scrape(&server, Some("scrape-me")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("# TYPE cellar_meta_transaction_duration_seconds histogram"));
    server.stop().await;
}

/// `GET /metrics` over the unix socket of a mount daemon: the body of its 200 answer.
fn scrape_socket(socket: &std::path::Path) -> String {
    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("{}: {e}", socket.display()));
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    body.to_string()
}

#[tokio::test]
async fn a_runner_mount_serves_its_metrics_on_a_socket_in_the_runner_directory() {
    require_runner_prerequisites();
    let server = TestServer::start().await;
    let volume = server.create_volume("shared").await;
    let volume_id = volume["id"].as_str().unwrap().to_string();
    let (status, sandbox) = server
        .post(
            "/api/sandbox",
            &json!({"volumes": [{"volumeId": volume_id, "mountPath": "/home/daytona/v"}]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{sandbox}");
    let id = sandbox["id"].as_str().unwrap().to_string();
    let sandbox = server
        .wait_for(&format!("/api/sandbox/{id}"), "state", "started")
        .await;
    let socket = server
        .config
        .data_dir
        .join(format!("runner/mounts/{volume_id}.metrics.sock"));
    let before = scrape_socket(&socket);
    let (code, out) = exec(
        &server,
        &sandbox,
        "mkdir v/d && echo hello > v/d/f && cat v/d/f",
    )
    .await;
    assert_eq!((code, out.trim()), (0, "hello"));
    let after = scrape_socket(&socket);
    let moved = |series: &str| sample(&after, series) - sample(&before, series);
    assert_eq!(
        moved(r#"cellar_fs_request_duration_seconds_count{op="mkdir"}"#),
        1.0,
        "{after}"
    );
    assert!(moved(r#"cellar_fs_request_duration_seconds_count{op="create"}"#) >= 1.0);
    assert!(moved("cellar_fs_written_bytes_total") >= 6.0);
    let (status, _) = server.delete(&format!("/api/sandbox/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    server
        .wait_for(&format!("/api/sandbox/{id}"), "state", "destroyed")
        .await;
    server.stop().await;
}
