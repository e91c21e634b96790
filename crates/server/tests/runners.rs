//! Runners on "other hosts": a server without its embedded runner and `cellar runner` processes
//! on loopback, each with its own data directory. Scheduling (least loaded, pinned), the toolbox
//! through a remote runner, `kill -9` of a runner (its sandboxes become lost, the other runner
//! goes on) and its return (reconciled). Needs root, bwrap and the cellar binary (CELLAR_BIN or
//! target/debug/cellar; `cargo build -p cellar-cli`).

mod common;

use std::time::{Duration, Instant};

use common::runner::{wait_for_runners, RunnerProcess};
use common::TestServer;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Short, so that the lost-runner cases take seconds.
const RUNNER_TIMEOUT: Duration = Duration::from_secs(3);

async fn start_server() -> TestServer {
    TestServer::start_with(|config| {
        config.embedded_runner = false;
        config.runner_timeout = RUNNER_TIMEOUT;
    })
    .await
}

async fn create(server: &TestServer, body: Value) -> Value {
    let (status, sandbox) = server.post("/api/sandbox", &body).await;
    assert_eq!(status, StatusCode::OK, "{sandbox}");
    assert_eq!(sandbox["state"], "started", "{sandbox}");
    sandbox
}

async fn exec(server: &TestServer, id: &str, command: &str) -> (i64, String) {
    let (status, body) = server
        .post(
            &format!("/toolbox/{id}/process/execute"),
            &json!({ "command": command }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{command}: {body}");
    (
        body["exitCode"].as_i64().unwrap(),
        body["result"].as_str().unwrap().to_string(),
    )
}

fn id(sandbox: &Value) -> String {
    sandbox["id"].as_str().unwrap().to_string()
}

/// Checks the sandbox runs on `runner`, records it in `all` and returns its id.
fn on(runner: &str, sandbox: &Value, all: &mut Vec<String>) -> String {
    assert_eq!(sandbox["runnerId"], runner, "{sandbox}");
    all.push(id(sandbox));
    id(sandbox)
}

async fn destroy_all(server: &TestServer, sandboxes: &[String]) {
    for id in sandboxes {
        let (status, body) = server.delete(&format!("/api/sandbox/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    for id in sandboxes {
        server
            .wait_for(&format!("/api/sandbox/{id}"), "state", "destroyed")
            .await;
    }
}

#[tokio::test]
async fn sandboxes_spread_pin_and_survive_a_lost_runner() {
    let server = start_server().await;
    let (_, token) = server
        .admin(|c| cellar_server::admin_create_runner_token(c, "test runners"))
        .unwrap();
    let dirs = tempfile::tempdir().unwrap();
    std::fs::create_dir(dirs.path().join("a")).unwrap();
    std::fs::create_dir(dirs.path().join("b")).unwrap();
    let mut a = RunnerProcess::start(&server, "a", &token, &dirs.path().join("a"));
    let b = RunnerProcess::start(&server, "b", &token, &dirs.path().join("b"));
    wait_for_runners(&server, &["a", "b"], "live").await;
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", a.child.id())).unwrap();
    assert!(
        !String::from_utf8_lossy(&cmdline).contains(&token),
        "the token is not on the runner's command line"
    );

    // Least loaded: four sandboxes, two on each runner.
    let mut all = Vec::new();
    let mut placed = Vec::new();
    for _ in 0..4 {
        let sandbox = create(&server, json!({})).await;
        placed.push(sandbox["runnerId"].as_str().unwrap().to_string());
        all.push(id(&sandbox));
    }
    placed.sort();
    assert_eq!(placed, ["a", "a", "b", "b"], "spread least loaded");

    // Pinned, twice on b: b now runs two more than a.
    let pinned = json!({ "labels": { "cellar.io/runner": "b" } });
    let on_b = on("b", &create(&server, pinned.clone()).await, &mut all);
    on("b", &create(&server, pinned).await, &mut all);
    // The next two unpinned ones go to a, the less loaded one.
    let first_on_a = on("a", &create(&server, json!({})).await, &mut all);
    let second_on_a = on("a", &create(&server, json!({})).await, &mut all);
    let (status, body) = server
        .post(
            "/api/sandbox",
            &json!({ "labels": { "cellar.io/runner": "nowhere" } }),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("nowhere"),
        "{body}"
    );
    let (status, body) = server
        .post(
            "/api/sandbox",
            &json!({ "labels": { "cellar.io/runner": "not a name" } }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // Volumes whose metadata is SQLite on the server's disk cannot be mounted on another host.
    let volume = server.create_volume("runner-vol").await;
    let mount = json!([{ "volumeId": volume["id"], "mountPath": "/home/daytona/vol" }]);
    let (status, body) = server
        .post("/api/sandbox", &json!({ "volumes": mount }))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("SQLite"),
        "{body}"
    );
    let (status, body) = server
        .post(
            "/api/sandbox",
            &json!({ "volumes": mount, "labels": { "cellar.io/runner": "a" } }),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    // The toolbox through a remote runner: exec, upload (streamed), download.
    assert_eq!(
        exec(&server, &first_on_a, "echo $((6 * 7)); exit 3").await,
        (3, "42\n".to_string())
    );
    let big: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 251) as u8).collect();
    let form = reqwest::multipart::Form::new()
        .part(
            "files[0].file",
            reqwest::multipart::Part::bytes(big.clone()).file_name("x"),
        )
        .text("files[0].path", "dir/big.bin")
        .text("files[1].path", "/home/daytona/small.txt")
        .part(
            "files[1].file",
            reqwest::multipart::Part::bytes(b"small".to_vec()).file_name("y"),
        );
    let response = server
        .http
        .post(server.url(&format!("/toolbox/{first_on_a}/files/bulk-upload")))
        .bearer_auth(&server.key)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "{}",
        response.text().await.unwrap()
    );
    assert_eq!(
        exec(
            &server,
            &first_on_a,
            "stat -c %s dir/big.bin && cat small.txt"
        )
        .await,
        (0, format!("{}\nsmall", big.len()))
    );
    let response = server
        .http
        .post(server.url(&format!("/toolbox/{first_on_a}/files/bulk-download")))
        .bearer_auth(&server.key)
        .json(&json!({ "paths": ["dir/big.bin", "missing"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.bytes().await.unwrap();
    assert!(
        body.windows(big.len())
            .any(|window| window == big.as_slice()),
        "the 3 MiB file came back whole"
    );
    assert!(String::from_utf8_lossy(&body).contains("FILE_NOT_FOUND"));

    // kill -9 of runner a: its sandboxes become lost within the timeout; b goes on.
    let a_sandboxes: Vec<String> = {
        let (_, list) = server.get("/api/sandbox").await;
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["runnerId"] == "a")
            .map(id)
            .collect()
    };
    assert_eq!(a_sandboxes.len(), 4);
    let killed = Instant::now();
    a.kill_9();
    let lost = server
        .wait_for(&format!("/api/sandbox/{first_on_a}"), "state", "error")
        .await;
    let detected = killed.elapsed();
    println!("dead runner detected after {} ms", detected.as_millis());
    assert!(
        detected < RUNNER_TIMEOUT + Duration::from_secs(3),
        "detected after {detected:?}"
    );
    assert!(
        lost["errorReason"]
            .as_str()
            .unwrap()
            .contains("runner a lost"),
        "{lost}"
    );
    for id in &a_sandboxes {
        let (_, sandbox) = server.get(&format!("/api/sandbox/{id}")).await;
        assert_eq!(sandbox["state"], "error", "{sandbox}");
    }
    let (status, body) = server
        .post(
            &format!("/toolbox/{first_on_a}/process/execute"),
            &json!({ "command": "true" }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(exec(&server, &on_b, "echo still here").await.0, 0);
    // New sandboxes go to b only, even unpinned; pinning the lost runner is refused.
    on("b", &create(&server, json!({})).await, &mut all);
    let (status, body) = server
        .post(
            "/api/sandbox",
            &json!({ "labels": { "cellar.io/runner": "a" } }),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");

    // Deleted while its runner is away: destroyed for the server now, on the runner once it
    // reports the sandbox.
    let (status, _) = server.delete(&format!("/api/sandbox/{second_on_a}")).await;
    assert_eq!(status, StatusCode::OK);
    server
        .wait_for(&format!("/api/sandbox/{second_on_a}"), "state", "destroyed")
        .await;
    assert!(a.holds(&second_on_a));

    // The runner comes back (same data directory): it adopts its sandboxes and reconciles.
    a.restart();
    let back = server
        .wait_for(&format!("/api/sandbox/{first_on_a}"), "state", "started")
        .await;
    assert_eq!(back["errorReason"], Value::Null, "{back}");
    assert_eq!(
        exec(&server, &first_on_a, "cat small.txt").await,
        (0, "small".into())
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while a.holds(&second_on_a) {
        assert!(
            Instant::now() < deadline,
            "the runner never destroyed the deleted sandbox: {}",
            a.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for id in a_sandboxes.iter().filter(|id| **id != second_on_a) {
        let (_, sandbox) = server.get(&format!("/api/sandbox/{id}")).await;
        assert_eq!(sandbox["state"], "started", "{sandbox}");
    }

    all.retain(|id| *id != second_on_a);
    destroy_all(&server, &all).await;
    assert!(all.iter().all(|id| !a.holds(id) && !b.holds(id)));
    drop((a, b));
    server.stop().await;
}

#[tokio::test]
async fn runner_tokens_are_checked_and_revocable() {
    let server = start_server().await;
    let dirs = tempfile::tempdir().unwrap();
    let (token_id, token) = server
        .admin(|c| cellar_server::admin_create_runner_token(c, "revocable"))
        .unwrap();

    // A wrong token never joins, and the runner says why without echoing it.
    std::fs::create_dir(dirs.path().join("wrong")).unwrap();
    let wrong_token = "cellar_runner_0123456789abcdef";
    let wrong = RunnerProcess::start(&server, "wrong", wrong_token, &dirs.path().join("wrong"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !wrong.log().contains("runner token") {
        assert!(Instant::now() < deadline, "{}", wrong.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!wrong.log().contains(wrong_token), "{}", wrong.log());
    assert!(server
        .admin(cellar_server::admin_list_runners)
        .unwrap()
        .iter()
        .all(|runner| runner.id != "wrong"));
    drop(wrong);

    // The name of the embedded runner is reserved.
    std::fs::create_dir(dirs.path().join("local")).unwrap();
    let local = RunnerProcess::start(&server, "local", &token, &dirs.path().join("local"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !local.log().contains("reserved") {
        assert!(Instant::now() < deadline, "{}", local.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(local);

    std::fs::create_dir(dirs.path().join("r")).unwrap();
    let runner = RunnerProcess::start(&server, "r", &token, &dirs.path().join("r"));
    wait_for_runners(&server, &["r"], "live").await;
    // A second runner under the same name (another data directory) is refused while r lives.
    std::fs::create_dir(dirs.path().join("twin")).unwrap();
    let twin = RunnerProcess::start(&server, "r", &token, &dirs.path().join("twin"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !twin.log().contains("another runner named") {
        assert!(Instant::now() < deadline, "{}", twin.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(twin);
    let sandbox = create(&server, json!({})).await;
    assert_eq!(sandbox["runnerId"], "r");

    let tokens = server
        .admin(cellar_server::admin_list_runner_tokens)
        .unwrap();
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0].revoked_at, None);
    assert_eq!(
        server
            .admin(|c| cellar_server::admin_revoke_runner_token(c, &token_id))
            .unwrap(),
        1
    );
    assert!(server
        .admin(|c| cellar_server::admin_revoke_runner_token(c, &token_id))
        .is_err());
    // Its heartbeats are refused from now on: the runner and its sandbox are lost.
    let lost = server
        .wait_for(&format!("/api/sandbox/{}", id(&sandbox)), "state", "error")
        .await;
    assert!(
        lost["errorReason"].as_str().unwrap().contains("lost"),
        "{lost}"
    );
    wait_for_runners(&server, &["r"], "lost").await;

    // A new token brings it back; the sandbox is started again.
    let (_, renewed) = server
        .admin(|c| cellar_server::admin_create_runner_token(c, "new"))
        .unwrap();
    drop(runner);
    let runner = RunnerProcess::start(&server, "r", &renewed, &dirs.path().join("r"));
    server
        .wait_for(
            &format!("/api/sandbox/{}", id(&sandbox)),
            "state",
            "started",
        )
        .await;
    destroy_all(&server, &[id(&sandbox)]).await;
    assert!(!runner.holds(&id(&sandbox)));
    drop(runner);
    server.stop().await;
}

/// With PostgreSQL, volumes are mounted on any runner: one volume, sandboxes on two runners
/// ("hosts"), written on one, read on the other. The mount daemons get the metadata URL (which
/// holds the database password) through their environment, never their command line.
#[tokio::test]
async fn with_postgres_a_volume_is_shared_by_sandboxes_on_two_runners() {
    let server = TestServer::start_on_with(common::Control::Postgres, |config| {
        config.embedded_runner = false;
        config.runner_timeout = RUNNER_TIMEOUT;
    })
    .await;
    let (_, token) = server
        .admin(|c| cellar_server::admin_create_runner_token(c, "pg runners"))
        .unwrap();
    let dirs = tempfile::tempdir().unwrap();
    std::fs::create_dir(dirs.path().join("a")).unwrap();
    std::fs::create_dir(dirs.path().join("b")).unwrap();
    let a = RunnerProcess::start(&server, "a", &token, &dirs.path().join("a"));
    let b = RunnerProcess::start(&server, "b", &token, &dirs.path().join("b"));
    wait_for_runners(&server, &["a", "b"], "live").await;

    let volume = server.create_volume("shared").await;
    let mount = |runner: &str| {
        json!({
            "volumes": [{ "volumeId": "shared", "mountPath": "/home/daytona/shared" }],
            "labels": { "cellar.io/runner": runner }
        })
    };
    let writer = create(&server, mount("a")).await;
    let reader = create(&server, mount("b")).await;
    assert_eq!(
        (writer["runnerId"].as_str(), reader["runnerId"].as_str()),
        (Some("a"), Some("b"))
    );
    assert_eq!(
        exec(
            &server,
            &id(&writer),
            "echo across hosts > shared/note && sync"
        )
        .await
        .0,
        0
    );
    assert_eq!(
        exec(&server, &id(&reader), "cat shared/note").await,
        (0, "across hosts\n".to_string())
    );
    // Unpinned sandboxes with volumes are scheduled on remote runners too.
    let third = create(
        &server,
        json!({ "volumes": [{ "volumeId": volume["id"], "mountPath": "/v" }] }),
    )
    .await;
    assert_eq!(
        exec(&server, &id(&third), "cat /v/note").await.1,
        "across hosts\n"
    );

    let password = url::Url::parse(&server.config.database.as_ref().unwrap().0)
        .unwrap()
        .password()
        .unwrap()
        .to_string();
    let mut daemons = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(" mount ") && cmdline.contains(&dirs.path().display().to_string()) {
            daemons += 1;
            assert!(!cmdline.contains(&password), "{cmdline}");
            assert!(!cmdline.contains("postgres://"), "{cmdline}");
        }
    }
    assert!(daemons >= 2, "a mount daemon on each runner");
    for runner in [&a, &b] {
        assert!(!runner.log().contains(&password));
        // The mount daemons' logs too.
        for entry in std::fs::read_dir(runner.dir.join("runner/mounts"))
            .unwrap()
            .flatten()
        {
            if entry.path().extension().is_some_and(|ext| ext == "log") {
                let log = std::fs::read_to_string(entry.path()).unwrap();
                assert!(!log.contains(&password), "{log}");
            }
        }
    }

    destroy_all(&server, &[id(&writer), id(&reader), id(&third)]).await;
    let (status, body) = server
        .delete(&format!("/api/volumes/{}", volume["id"].as_str().unwrap()))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    server
        .wait_for(
            &format!("/api/volumes/{}", volume["id"].as_str().unwrap()),
            "state",
            "deleted",
        )
        .await;
    assert!(!server.has_volume_metadata(volume["id"].as_str().unwrap()));
    drop((a, b));
    server.stop().await;
}
