//! Snapshots and forks through the API, on SQLite and PostgreSQL control state: a snapshot keeps
//! the moment it was taken and refuses writes (the file API, a sandbox's mount), a fork is a
//! writable copy, neither copies a block, deleting the origin keeps its forks whole, and the
//! shared data goes only with the last volume that holds it.

mod common;

use common::{exec, require_runner_prerequisites, Control, TestServer};
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn put(server: &TestServer, volume: &str, path: &str, body: &'static [u8]) {
    let url = server.url(&format!(
        "/api/volumes/{volume}/files/content?path={path}&parents=true"
    ));
    let (status, answer) = server
        .send(server.http.put(url).bearer_auth(&server.key).body(body))
        .await;
    assert!(
        status.is_success(),
        "PUT {path} on {volume}: {status} {answer}"
    );
}

/// PUT that must fail: its status and error code.
async fn refused_put(server: &TestServer, volume: &str, path: &str) -> (StatusCode, Value) {
    let url = server.url(&format!("/api/volumes/{volume}/files/content?path={path}"));
    server
        .send(server.http.put(url).bearer_auth(&server.key).body("x"))
        .await
}

async fn content(server: &TestServer, volume: &str, path: &str) -> Option<Vec<u8>> {
    let url = server.url(&format!("/api/volumes/{volume}/files/content?path={path}"));
    let response = server
        .http
        .get(url)
        .bearer_auth(&server.key)
        .send()
        .await
        .unwrap();
    match response.status() {
        StatusCode::OK => Some(response.bytes().await.unwrap().to_vec()),
        StatusCode::NOT_FOUND => None,
        other => panic!("GET {path} on {volume}: {other}"),
    }
}

async fn make(server: &TestServer, path: &str, body: Value) -> Value {
    let (status, volume) = server.post(path, &body).await;
    assert_eq!(status, StatusCode::OK, "{path}: {volume}");
    assert_eq!(volume["state"], "ready", "{volume}");
    volume
}

fn id(volume: &Value) -> &str {
    volume["id"].as_str().unwrap()
}

async fn lifecycle(control: Control) {
    let server = TestServer::start_on(control).await;
    let origin = server.create_volume("work").await;
    let v = id(&origin);
    put(&server, v, "/a.txt", b"first").await;
    put(&server, v, "/dir/b.txt", b"bee").await;
    let blocks_before = server.block_files().len();

    let snapshot = make(
        &server,
        &format!("/api/volumes/{v}/snapshots"),
        json!({"name": "work-snap"}),
    )
    .await;
    let s = id(&snapshot);
    assert_eq!(snapshot["kind"], "snapshot");
    assert_eq!(snapshot["originId"], v);
    assert_eq!(server.block_files().len(), blocks_before, "no block copied");
    // Writers go on; the snapshot keeps the moment it was taken and refuses changes.
    put(&server, v, "/a.txt", b"second").await;
    assert_eq!(content(&server, s, "/a.txt").await.unwrap(), b"first");
    assert_eq!(content(&server, s, "/dir/b.txt").await.unwrap(), b"bee");
    let (status, body) = refused_put(&server, s, "/new.txt").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("read-only"),
        "{body}"
    );

    // Listed with their volume, not among the volumes; a default name is made up.
    let unnamed = make(&server, &format!("/api/volumes/{v}/snapshots"), json!({})).await;
    assert!(
        unnamed["name"]
            .as_str()
            .unwrap()
            .starts_with("work-snapshot-"),
        "{unnamed}"
    );
    let (_, listed) = server.get(&format!("/api/volumes/{v}/snapshots")).await;
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["work-snap", unnamed["name"].as_str().unwrap()]);
    let (_, volumes) = server.get("/api/volumes").await;
    assert!(
        volumes
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["kind"] == "volume"),
        "{volumes}"
    );

    // A fork of the volume and one of the snapshot: writable, each on its own.
    let fork = make(
        &server,
        &format!("/api/volumes/{v}/fork"),
        json!({"name": "work-fork"}),
    )
    .await;
    let f = id(&fork);
    assert_eq!(
        (fork["kind"].as_str(), fork["originId"].as_str()),
        (Some("volume"), Some(v))
    );
    assert_eq!(content(&server, f, "/a.txt").await.unwrap(), b"second");
    put(&server, f, "/a.txt", b"fork").await;
    put(&server, f, "/fork-only", b"f").await;
    assert_eq!(content(&server, v, "/a.txt").await.unwrap(), b"second");
    assert_eq!(content(&server, v, "/fork-only").await, None);
    let branch = make(
        &server,
        &format!("/api/volumes/{s}/fork"),
        json!({"name": "from-snap"}),
    )
    .await;
    let b = id(&branch);
    assert_eq!(content(&server, b, "/a.txt").await.unwrap(), b"first");
    put(&server, b, "/a.txt", b"branch").await;
    assert_eq!(content(&server, s, "/a.txt").await.unwrap(), b"first");
    let (_, fork_now) = server.get(&format!("/api/volumes/{f}")).await;
    assert!(
        fork_now["usage"]["exclusiveBytes"].is_u64(),
        "usage reports exclusive bytes: {fork_now}"
    );

    // Bad input: 4xx with a message.
    let (status, body) = server
        .post(
            &format!("/api/volumes/{v}/fork"),
            &json!({"name": "bad name!"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = server
        .post(
            &format!("/api/volumes/{v}/fork"),
            &json!({"name": "work-fork"}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, body) = server
        .post("/api/volumes/no-such/fork", &json!({"name": "x"}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = server
        .delete(&format!("/api/volumes/{f}/snapshots/{s}"))
        .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "not a snapshot of the fork: {body}"
    );

    // Deleting the origin keeps its forks and snapshots whole; its data stays for them.
    let (status, body) = server.delete(&format!("/api/volumes/{v}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    server
        .wait_for(&format!("/api/volumes/{v}"), "state", "deleted")
        .await;
    assert!(server.has_volume_metadata(v), "kept for its forks");
    assert_eq!(content(&server, f, "/dir/b.txt").await.unwrap(), b"bee");
    assert_eq!(content(&server, s, "/a.txt").await.unwrap(), b"first");
    assert_eq!(content(&server, b, "/dir/b.txt").await.unwrap(), b"bee");

    // The last one that shares the origin's data takes it along.
    for (path, gone) in [
        (format!("/api/volumes/{f}"), f),
        (
            format!("/api/volumes/{v}/snapshots/{}", id(&unnamed)),
            id(&unnamed),
        ),
        (format!("/api/volumes/{b}"), b),
    ] {
        let (status, body) = server.delete(&path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        server
            .wait_for(&format!("/api/volumes/{gone}"), "state", "deleted")
            .await;
        assert!(
            server.has_volume_metadata(v),
            "the snapshot {s} still shares it"
        );
    }
    let (status, body) = server.delete(&format!("/api/volumes/{s}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    server
        .wait_for(&format!("/api/volumes/{s}"), "state", "deleted")
        .await;
    for gone in [v, s, f, b] {
        assert!(!server.has_volume_metadata(gone), "{gone} left metadata");
    }
    assert_eq!(server.block_files(), Vec::<std::path::PathBuf>::new());
    server.stop().await;
}

#[tokio::test]
async fn snapshots_and_forks_on_sqlite() {
    lifecycle(Control::Sqlite).await;
}

#[tokio::test]
async fn snapshots_and_forks_on_postgres() {
    lifecycle(Control::Postgres).await;
}

/// A sandbox mounts a snapshot read-only (whatever it asked) while another writes the volume.
#[tokio::test]
async fn a_sandbox_mounts_a_snapshot_read_only() {
    require_runner_prerequisites();
    let server = TestServer::start().await;
    let volume = server.create_volume("data").await;
    let v = id(&volume);
    put(&server, v, "/greeting", b"hello").await;
    let snapshot = make(&server, &format!("/api/volumes/{v}/snapshots"), json!({})).await;
    let (status, sandbox) = server
        .post(
            "/api/sandbox",
            &json!({"volumes": [
                {"volumeId": v, "mountPath": "/mnt/live"},
                {"volumeId": id(&snapshot), "mountPath": "/mnt/snap"}
            ]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{sandbox}");
    assert_eq!(
        exec(
            &server,
            &sandbox,
            "echo changed > /mnt/live/greeting && cat /mnt/snap/greeting"
        )
        .await,
        (0, "hello".to_string())
    );
    let (code, out) = exec(&server, &sandbox, "echo x > /mnt/snap/new").await;
    assert_ne!(code, 0, "a snapshot accepted a write: {out}");
    assert!(out.contains("Read-only"), "{out}");
    let path = format!("/api/sandbox/{}", id(&sandbox));
    let (status, body) = server.delete(&path).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Its mounts are released before the server stops.
    server.wait_for(&path, "state", "destroyed").await;
    server.stop().await;
}
