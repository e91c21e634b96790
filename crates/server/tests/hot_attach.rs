//! Hot attach and detach: a volume mount added to a running sandbox (and removed from it)
//! without restarting it, through the API, with real bubblewrap sandboxes and FUSE mounts.

mod common;

use common::{exec, require_runner_prerequisites, TestServer};
use reqwest::StatusCode;
use serde_json::{json, Value};

fn mount_paths(sandbox: &Value) -> Vec<String> {
    sandbox["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn volumes_attach_to_and_detach_from_a_running_sandbox() {
    require_runner_prerequisites();
    let server = TestServer::start().await;
    let volume = server.create_volume("late").await;
    let v = volume["id"].as_str().unwrap();
    let url = server.url(&format!("/api/volumes/{v}/files/content?path=/greeting"));
    let (status, body) = server
        .send(server.http.put(url).bearer_auth(&server.key).body("hello"))
        .await;
    assert!(status.is_success(), "{body}");
    let (status, sandbox) = server.post("/api/sandbox", &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{sandbox}");
    let id = sandbox["id"].as_str().unwrap().to_string();
    // A process that started before the attach.
    assert_eq!(
        exec(
            &server,
            &sandbox,
            "echo started > /tmp/marker && ls /mnt/late 2>&1; true"
        )
        .await
        .0,
        0
    );

    let attach = |path: &'static str, read_only: bool| {
        let body = json!({"volumeId": "late", "mountPath": path, "readOnly": read_only});
        let server = &server;
        let id = id.clone();
        async move {
            server
                .post(&format!("/api/sandbox/{id}/volumes"), &body)
                .await
        }
    };
    let (status, updated) = attach("/mnt/late", false).await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(mount_paths(&updated), vec!["/mnt/late"]);
    assert_eq!(
        exec(
            &server,
            &sandbox,
            "cat /mnt/late/greeting && cat /tmp/marker"
        )
        .await,
        (0, "hellostarted\n".to_string()),
        "the running sandbox sees the new mount, and kept its state"
    );
    // A second mount of the same volume, read-only, under the home (owned by the user).
    let (status, updated) = attach("/home/daytona/ro/late", true).await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    let (code, out) = exec(
        &server,
        &sandbox,
        "echo new > /mnt/late/written && cat /home/daytona/ro/late/written && stat -c %U /home/daytona/ro && touch /home/daytona/ro/late/x",
    )
    .await;
    assert_ne!(code, 0, "a read-only attach accepted a write: {out}");
    assert!(out.starts_with("new\ndaytona\n"), "{out}");
    assert!(out.contains("Read-only"), "{out}");

    // Taken and overlapping paths, unknown volumes and bad paths are refused.
    assert_eq!(attach("/mnt/late", false).await.0, StatusCode::CONFLICT);
    assert_eq!(
        attach("/mnt/late/inner", false).await.0,
        StatusCode::CONFLICT
    );
    assert_eq!(attach("/etc/late", false).await.0, StatusCode::BAD_REQUEST);
    let (status, body) = server
        .post(
            &format!("/api/sandbox/{id}/volumes"),
            &json!({"volumeId": "nope", "mountPath": "/mnt/nope"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // A volume mounted into a sandbox cannot be deleted.
    assert_eq!(
        server.delete(&format!("/api/volumes/{v}")).await.0,
        StatusCode::CONFLICT
    );

    // Detaching a mount a process uses: 409, unless forced.
    let (code, out) = exec(
        &server,
        &sandbox,
        "nohup sh -c 'cd /mnt/late && exec sleep 60' >/dev/null 2>&1 & sleep 0.5; echo ok",
    )
    .await;
    assert_eq!((code, out.as_str()), (0, "ok\n"));
    let detach = |path: &'static str, force: bool| {
        let server = &server;
        let id = id.clone();
        async move {
            server
                .delete(&format!(
                    "/api/sandbox/{id}/volumes?mountPath={path}&force={force}"
                ))
                .await
        }
    };
    let (status, body) = detach("/mnt/late", false).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("in use"),
        "{body}"
    );
    let (status, updated) = detach("/mnt/late", true).await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(mount_paths(&updated), vec!["/home/daytona/ro/late"]);
    let (code, out) = exec(&server, &sandbox, "cat /mnt/late/greeting").await;
    assert_ne!(code, 0, "the detached mount still answers: {out}");
    let (status, updated) = detach("/home/daytona/ro/late", false).await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(mount_paths(&updated), Vec::<String>::new());
    assert_eq!(detach("/mnt/late", false).await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        exec(&server, &sandbox, "cat /tmp/marker").await,
        (0, "started\n".to_string()),
        "the sandbox ran on through all of it"
    );

    // Not in use any more: the volume can go; the sandbox too.
    let (status, body) = server.delete(&format!("/api/sandbox/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    server
        .wait_for(&format!("/api/sandbox/{id}"), "state", "destroyed")
        .await;
    let (status, body) = server.delete(&format!("/api/volumes/{v}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    server.stop().await;
}
