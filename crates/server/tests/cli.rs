//! The `cellar volume|sandbox|admin` commands against a real in-process server. Needs the cellar
//! binary (CELLAR_BIN or target/debug/cellar) and, for the sandbox commands, bubblewrap.

mod common;

use std::process::Output;

use common::TestServer;
use serde_json::Value;

/// Runs `cellar ARGS` against the server (env-configured, like a user would).
async fn cellar(server: &TestServer, args: &[&str]) -> Output {
    let bin = common::cellar_bin();
    assert!(
        bin.is_file(),
        "cellar binary not found at {} (cargo build -p cellar-cli)",
        bin.display()
    );
    let mut command = tokio::process::Command::new(bin);
    command
        .args(args)
        .env("CELLAR_API_URL", format!("{}/api", server.base))
        .env("CELLAR_API_KEY", &server.key)
        .env_remove("DAYTONA_API_URL")
        .env_remove("DAYTONA_API_KEY");
    command.output().await.unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).to_string()
}

fn assert_ok(output: &Output) {
    assert!(
        output.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        stdout(output),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn volume_and_sandbox_commands() {
    let server = TestServer::start().await;
    assert_ok(&cellar(&server, &["volume", "create", "cli-vol"]).await);
    let listed = cellar(&server, &["volume", "list", "--json"]).await;
    assert_ok(&listed);
    let volumes: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(volumes[0]["name"], "cli-vol");
    assert!(stdout(&cellar(&server, &["volume", "list"]).await).contains("cli-vol"));
    let got: Value = serde_json::from_slice(
        &cellar(&server, &["volume", "get", "cli-vol", "--json"])
            .await
            .stdout,
    )
    .unwrap();
    assert_eq!(got["state"], "ready");

    // Errors: exit code 1 and the server's message.
    let bad = cellar(&server, &["volume", "create", "bad name"]).await;
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains(cellar_server::NAME_RULE));
    let bad_mount = cellar(&server, &["sandbox", "create", "--volume", "cli-vol://etc"]).await;
    assert_eq!(bad_mount.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad_mount.stderr).contains("/etc"));
    let no_key = tokio::process::Command::new(common::cellar_bin())
        .args([
            "volume",
            "list",
            "--api-url",
            &format!("{}/api", server.base),
            "--api-key",
            "nope",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(no_key.status.code(), Some(1));

    let created = cellar(
        &server,
        &[
            "sandbox",
            "create",
            "--name",
            "cli-box",
            "--volume",
            "cli-vol:/home/daytona/v",
            "--json",
        ],
    )
    .await;
    assert_ok(&created);
    let sandbox: Value = serde_json::from_slice(&created.stdout).unwrap();
    assert_eq!(sandbox["state"], "started");

    let exec = cellar(
        &server,
        &[
            "sandbox",
            "exec",
            "cli-box",
            "echo from-cli > v/f && cat v/f",
        ],
    )
    .await;
    assert_ok(&exec);
    assert_eq!(stdout(&exec), "from-cli\n");
    let failing = cellar(&server, &["sandbox", "exec", "cli-box", "exit 7"]).await;
    assert_eq!(failing.status.code(), Some(7));
    let listed = cellar(&server, &["sandbox", "list", "--json"]).await;
    let sandboxes: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(sandboxes.as_array().unwrap().len(), 1);

    let in_use = cellar(&server, &["volume", "delete", "cli-vol"]).await;
    assert_eq!(in_use.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&in_use.stderr).contains("in use"));
    assert_ok(&cellar(&server, &["sandbox", "delete", "cli-box"]).await);
    server
        .wait_for(
            &format!("/api/sandbox/{}", sandbox["id"].as_str().unwrap()),
            "state",
            "destroyed",
        )
        .await;
    assert_ok(&cellar(&server, &["volume", "delete", "cli-vol"]).await);
    server.stop().await;
}

#[tokio::test]
async fn admin_commands_create_organizations_and_keys() {
    let server = TestServer::start().await;
    let data_dir = server.dir.path().to_str().unwrap().to_string();
    let org = cellar(
        &server,
        &["admin", "--data-dir", &data_dir, "org", "create", "acme"],
    )
    .await;
    assert_ok(&org);
    let key = cellar(
        &server,
        &[
            "admin",
            "--data-dir",
            &data_dir,
            "key",
            "create",
            "--org",
            "acme",
        ],
    )
    .await;
    assert_ok(&key);
    let key = stdout(&key).trim().to_string();
    let (status, volumes) = server
        .send(
            server
                .http
                .get(server.url("/api/volumes"))
                .bearer_auth(&key),
        )
        .await;
    assert_eq!((status.as_u16(), volumes), (200, serde_json::json!([])));
    let missing = cellar(
        &server,
        &[
            "admin",
            "--data-dir",
            &data_dir,
            "key",
            "create",
            "--org",
            "nobody",
        ],
    )
    .await;
    assert_eq!(missing.status.code(), Some(1));
    server.stop().await;
}
