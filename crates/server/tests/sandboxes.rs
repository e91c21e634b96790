//! Sandboxes with the real embedded runner: bubblewrap, FUSE mounts of real volumes, exec and
//! file transfer through the toolbox. Needs root, bwrap, /dev/fuse and the cellar binary
//! (CELLAR_BIN or target/debug/cellar; build it with `cargo build -p cellar-cli`).

mod common;

use common::{exec, require_runner_prerequisites, Control, TestServer};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Every field the Python client requires, with its exact JSON type.
fn assert_sandbox_shape(sandbox: &Value) {
    for field in [
        "id",
        "organizationId",
        "name",
        "user",
        "target",
        "toolboxProxyUrl",
        "state",
    ] {
        assert!(sandbox[field].is_string(), "{field} in {sandbox}");
    }
    for field in ["env", "labels"] {
        let map = sandbox[field]
            .as_object()
            .unwrap_or_else(|| panic!("{field} in {sandbox}"));
        assert!(map.values().all(Value::is_string), "{field} in {sandbox}");
    }
    for field in ["public", "networkBlockAll", "kvm"] {
        assert!(sandbox[field].is_boolean(), "{field} in {sandbox}");
    }
    for field in ["cpu", "gpu", "memory", "disk"] {
        assert!(sandbox[field].is_i64(), "{field} in {sandbox}");
    }
}

async fn create_sandbox(server: &TestServer, body: Value) -> Value {
    let (status, sandbox) = server.post("/api/sandbox", &body).await;
    assert_eq!(status, StatusCode::OK, "{sandbox}");
    assert_sandbox_shape(&sandbox);
    assert_eq!(sandbox["state"], "started", "{sandbox}");
    sandbox
}

async fn destroy(server: &TestServer, sandbox: &Value) {
    let id = sandbox["id"].as_str().unwrap();
    let (status, body) = server.delete(&format!("/api/sandbox/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_sandbox_shape(&body);
    assert!(
        ["destroying", "destroyed"].contains(&body["state"].as_str().unwrap()),
        "{body}"
    );
    server
        .wait_for(&format!("/api/sandbox/{id}"), "state", "destroyed")
        .await;
}

/// Downloads `paths` with `files/bulk-download` (200 expected): the content type and body.
async fn bulk_download(server: &TestServer, url: &str, paths: &[&str]) -> (String, Vec<u8>) {
    let response = server
        .http
        .post(url)
        .bearer_auth(&server.key)
        .json(&json!({ "paths": paths }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    (content_type, response.bytes().await.unwrap().to_vec())
}

/// Splits a multipart body into (Content-Disposition, content) pairs.
fn multipart_parts(content_type: &str, body: &[u8]) -> Vec<(String, Vec<u8>)> {
    let boundary = content_type
        .split("boundary=")
        .nth(1)
        .expect("boundary")
        .to_string();
    let delimiter = format!("--{boundary}");
    let text = body.to_vec();
    let mut parts = Vec::new();
    let mut rest: &[u8] = &text;
    while let Some(start) = find(rest, delimiter.as_bytes()) {
        rest = &rest[start + delimiter.len()..];
        if rest.starts_with(b"--") {
            break;
        }
        let headers_end = find(rest, b"\r\n\r\n").expect("part headers");
        let headers = String::from_utf8_lossy(&rest[..headers_end]).to_string();
        let content_start = headers_end + 4;
        let next = find(
            &rest[content_start..],
            format!("\r\n{delimiter}").as_bytes(),
        )
        .expect("part end");
        let disposition = headers
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("content-disposition"))
            .unwrap_or_default()
            .to_string();
        parts.push((
            disposition,
            rest[content_start..content_start + next].to_vec(),
        ));
        rest = &rest[content_start + next..];
    }
    parts
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

async fn sandboxes_share_a_volume_that_outlives_them(control: Control) {
    require_runner_prerequisites();
    let mut server = TestServer::start_on(control).await;
    let volume = server.create_volume("shared").await;
    let volume_id = volume["id"].as_str().unwrap().to_string();

    // Created by volume name, like the SDKs' get(create=True) followed by create().
    let first = create_sandbox(
        &server,
        json!({
            "name": "first",
            "env": {"GREETING": "hi"},
            "labels": {"code-toolbox-language": "python"},
            "volumes": [{"volumeId": "shared", "mountPath": "/home/daytona/volume"}],
            "someFutureField": {"ignored": true},
        }),
    )
    .await;
    let first_id = first["id"].as_str().unwrap().to_string();
    assert_eq!(first["toolboxProxyUrl"], format!("{}/toolbox", server.base));
    assert_eq!(
        first["volumes"][0]["volumeId"],
        volume_id.as_str(),
        "resolved to the id"
    );
    assert_eq!(first["labels"]["code-toolbox-language"], "python");
    let (_, by_name) = server.get("/api/sandbox/first").await;
    assert_eq!(by_name["id"], first["id"]);
    let (_, proxy) = server
        .get(&format!("/api/sandbox/{first_id}/toolbox-proxy-url"))
        .await;
    assert_eq!(proxy["url"], first["toolboxProxyUrl"]);
    let (_, list) = server.get("/api/sandbox").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert!(list["nextCursor"].is_null());

    // Exec: shell lines, env, exit codes.
    let (code, out) = exec(
        &server,
        &first,
        "echo \"$GREETING\" > volume/greeting && cat /home/daytona/volume/greeting",
    )
    .await;
    assert_eq!((code, out.as_str()), (0, "hi\n"));
    assert_eq!(exec(&server, &first, "exit 3").await.0, 3);

    // Upload: one part path-then-file, one file-then-path (spooled), both streamed.
    let big: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 251) as u8).collect();
    let form = reqwest::multipart::Form::new()
        .text("files[0].path", "/home/daytona/volume/up.txt")
        .part(
            "files[0].file",
            reqwest::multipart::Part::bytes(b"uploaded".to_vec()).file_name("x"),
        )
        .part(
            "files[1].file",
            reqwest::multipart::Part::bytes(big.clone()).file_name("y"),
        )
        .text("files[1].path", "volume/dir/big.bin");
    let upload_url = format!(
        "{}/{first_id}/files/bulk-upload",
        first["toolboxProxyUrl"].as_str().unwrap()
    );
    let response = server
        .http
        .post(&upload_url)
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
    let (code, out) = exec(
        &server,
        &first,
        "cat volume/up.txt && stat -c %s volume/dir/big.bin",
    )
    .await;
    assert_eq!(
        (code, out.as_str()),
        (0, format!("uploaded{}\n", big.len()).as_str())
    );

    // Folders and listings (the Daytona volumes example uses both).
    let toolbox = format!("{}/{first_id}", first["toolboxProxyUrl"].as_str().unwrap());
    let folder = |path: &str, mode: &str| {
        server
            .http
            .post(
                url::Url::parse_with_params(
                    &format!("{toolbox}/files/folder"),
                    [("path", path), ("mode", mode)],
                )
                .unwrap(),
            )
            .bearer_auth(&server.key)
    };
    let response = folder("/home/daytona/volume/new dir/it's", "750")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(
        folder("/home/daytona/volume/x", "9x")
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::BAD_REQUEST
    );
    let list = |path: &str| {
        server
            .http
            .get(
                url::Url::parse_with_params(&format!("{toolbox}/files"), [("path", path)]).unwrap(),
            )
            .bearer_auth(&server.key)
    };
    let (status, files) = server.send(list("/home/daytona/volume")).await;
    assert_eq!(status, StatusCode::OK, "{files}");
    let names: Vec<&str> = files
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["dir", "greeting", "new dir", "up.txt"], "{files}");
    let up = &files[3];
    assert_eq!(
        (up["isDir"].as_bool(), up["size"].as_i64()),
        (Some(false), Some(8)),
        "{up}"
    );
    assert_eq!(up["path"], "/home/daytona/volume/up.txt");
    for field in ["group", "modTime", "mode", "owner", "permissions"] {
        assert!(up[field].is_string(), "{field} in {up}");
    }
    assert_eq!(files[2]["isDir"], true);
    let (status, inner) = server.send(list("/home/daytona/volume/new dir")).await;
    assert_eq!(
        (status, &inner[0]["name"], &inner[0]["permissions"]),
        (StatusCode::OK, &json!("it's"), &json!("0750"))
    );
    assert_eq!(
        server.send(list("/home/daytona/volume/absent")).await.0,
        StatusCode::NOT_FOUND
    );

    // Download: a part per path, the missing one as an error part.
    let download_url = format!(
        "{}/{first_id}/files/bulk-download",
        first["toolboxProxyUrl"].as_str().unwrap()
    );
    let paths = [
        "/home/daytona/volume/dir/big.bin",
        "/home/daytona/volume/missing",
    ];
    let (content_type, body) = bulk_download(&server, &download_url, &paths).await;
    assert!(
        content_type.starts_with("multipart/form-data; boundary="),
        "{content_type}"
    );
    let parts = multipart_parts(&content_type, &body);
    assert_eq!(parts.len(), 2);
    assert!(
        parts[0].0.contains(r#"name="file""#)
            && parts[0].0.contains(&format!("filename=\"{}\"", paths[0])),
        "{}",
        parts[0].0
    );
    assert!(parts[0].1 == big, "downloaded content differs");
    assert!(
        parts[1].0.contains(r#"name="error""#) && parts[1].0.contains(paths[1]),
        "{}",
        parts[1].0
    );
    let error: Value = serde_json::from_slice(&parts[1].1).unwrap();
    assert_eq!(
        (error["statusCode"].as_i64(), error["code"].as_str()),
        (Some(404), Some("FILE_NOT_FOUND"))
    );

    // In use: the volume cannot be deleted.
    let (status, body) = server.delete(&format!("/api/volumes/{volume_id}")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    // A second sandbox mounts it read-only elsewhere and sees the first one's writes.
    let second = create_sandbox(
        &server,
        json!({"volumes": [{"volumeId": volume_id, "mountPath": "/mnt/data", "readOnly": true}]}),
    )
    .await;
    assert_eq!(
        exec(&server, &second, "cat /mnt/data/greeting").await,
        (0, "hi\n".to_string())
    );
    let (code, out) = exec(&server, &second, "echo x > /mnt/data/nope").await;
    assert_ne!(code, 0, "read-only mount accepted a write: {out}");
    assert!(out.contains("Read-only"), "{out}");

    // Another organization sees neither sandbox nor toolbox.
    server
        .admin(|c| cellar_server::admin_create_org(c, "other"))
        .unwrap();
    let other_key = server
        .admin(|c| cellar_server::admin_create_key(c, "other"))
        .unwrap();
    let request = server
        .http
        .get(server.url(&format!("/api/sandbox/{first_id}")))
        .bearer_auth(&other_key);
    assert_eq!(server.send(request).await.0, StatusCode::NOT_FOUND);
    let request = server
        .http
        .post(server.url(&format!("/toolbox/{first_id}/process/execute")))
        .bearer_auth(&other_key)
        .json(&json!({"command": "id"}));
    assert_eq!(server.send(request).await.0, StatusCode::NOT_FOUND);

    destroy(&server, &first).await;
    let (status, _) = server.delete(&format!("/api/volumes/{volume_id}")).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "the second sandbox still mounts it"
    );

    // A server restart keeps the running sandbox and its mount.
    server.restart(|_| {}).await;
    let second_id = second["id"].as_str().unwrap();
    let (_, second) = server.get(&format!("/api/sandbox/{second_id}")).await;
    assert_eq!(second["state"], "started", "{second}");
    let second = json!({"id": second_id, "toolboxProxyUrl": format!("{}/toolbox", server.base)});
    assert_eq!(
        exec(&server, &second, "cat /mnt/data/greeting").await,
        (0, "hi\n".to_string())
    );
    destroy(&server, &second).await;

    // The data outlived both sandboxes; a subpath mount sees only its directory.
    let third = create_sandbox(
        &server,
        json!({"volumes": [{"volumeId": "shared", "mountPath": "/home/daytona/sub", "subpath": "dir"}]}),
    )
    .await;
    assert_eq!(
        exec(&server, &third, "ls /home/daytona/sub").await,
        (0, "big.bin\n".to_string())
    );

    // As if the server had died while destroying it: the restart finishes the job.
    let third_id = third["id"].as_str().unwrap().to_string();
    server
        .restart(|config| {
            common::control_sql(
                config,
                "UPDATE sandboxes SET state = 'destroying' WHERE id = ?1",
                cellar_sql::params![third_id].to_vec(),
            );
        })
        .await;
    server
        .wait_for(&format!("/api/sandbox/{third_id}"), "state", "destroyed")
        .await;

    let (status, _) = server.delete(&format!("/api/volumes/{volume_id}")).await;
    assert_eq!(status, StatusCode::OK);
    server
        .wait_for(&format!("/api/volumes/{volume_id}"), "state", "deleted")
        .await;
    assert_eq!(server.block_files(), Vec::<std::path::PathBuf>::new());
    server.stop().await;
}

async fn bad_toolbox_input_on_a_running_sandbox_is_400_never_500(control: Control) {
    require_runner_prerequisites();
    let server = TestServer::start_on(control).await;
    let sandbox = create_sandbox(&server, json!({"networkBlockAll": true})).await;
    let toolbox = format!(
        "{}/{}",
        sandbox["toolboxProxyUrl"].as_str().unwrap(),
        sandbox["id"].as_str().unwrap()
    );
    let bad_exec = [
        json!({"command": "echo a\u{0}b"}),
        json!({"command": "pwd", "cwd": "/tmp\u{0}"}),
        json!({"command": "pwd", "envs": {"A\u{0}": "x"}}),
        json!({"command": "x".repeat(200_000)}),
    ];
    for body in bad_exec {
        let (status, answer) = server
            .post(&format!("{toolbox}/process/execute"), &body)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    }
    let with_path = |endpoint: &str, path: &str| {
        url::Url::parse_with_params(
            &format!("{toolbox}/{endpoint}"),
            [("path", path), ("mode", "755")],
        )
        .unwrap()
    };
    let request = server
        .http
        .post(with_path("files/folder", "/tmp/a\u{0}b"))
        .bearer_auth(&server.key);
    assert_eq!(server.send(request).await.0, StatusCode::BAD_REQUEST);
    let request = server
        .http
        .get(with_path("files", "/tmp/a\u{0}b"))
        .bearer_auth(&server.key);
    assert_eq!(server.send(request).await.0, StatusCode::BAD_REQUEST);
    let form = reqwest::multipart::Form::new()
        .text("files[0].path", "/tmp/a\u{0}b")
        .part(
            "files[0].file",
            reqwest::multipart::Part::bytes(b"x".to_vec()).file_name("x"),
        );
    let request = server
        .http
        .post(format!("{toolbox}/files/bulk-upload"))
        .bearer_auth(&server.key)
        .multipart(form);
    let (status, answer) = server.send(request).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("files[0].path"),
        "{answer}"
    );

    // A path with CR/LF reaches no header raw: one part, its name percent-encoded.
    let injected = "/tmp/x\r\nX-Injected: 1\r\n\r\nbody";
    let download_url = format!("{toolbox}/files/bulk-download");
    let (content_type, body) = bulk_download(&server, &download_url, &[injected]).await;
    let parts = multipart_parts(&content_type, &body);
    assert_eq!(parts.len(), 1, "{}", String::from_utf8_lossy(&body));
    let disposition = &parts[0].0;
    assert!(
        disposition.contains(r#"filename="/tmp/x__X-Injected: 1____body""#)
            && disposition
                .contains("filename*=UTF-8''%2Ftmp%2Fx%0D%0AX-Injected%3A%201%0D%0A%0D%0Abody"),
        "{disposition}"
    );
    assert!(!String::from_utf8_lossy(&body).contains("\r\nX-Injected"));
    destroy(&server, &sandbox).await;
    server.stop().await;
}

async fn a_subpath_that_is_no_directory_is_400_and_leaves_no_sandbox(control: Control) {
    require_runner_prerequisites();
    let server = TestServer::start_on(control).await;
    server.create_volume("vol").await;
    let writer = create_sandbox(
        &server,
        json!({"volumes": [{"volumeId": "vol", "mountPath": "/home/daytona/v"}]}),
    )
    .await;
    let (code, out) = exec(
        &server,
        &writer,
        "ln -s / v/escape && echo x > v/file && mkdir v/dir",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    for subpath in ["escape", "escape/etc", "file", "dir/../../x"] {
        let body =
            json!({"volumes": [{"volumeId": "vol", "mountPath": "/data", "subpath": subpath}]});
        let (status, answer) = server.post("/api/sandbox", &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{subpath}: {answer}");
        assert!(
            answer["message"].as_str().unwrap().contains("subpath"),
            "{subpath}: {answer}"
        );
    }
    let (_, list) = server.get("/api/sandbox").await;
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "only the writer is left: {list}");
    assert_eq!(items[0]["id"], writer["id"]);
    // The directory next to them still works.
    let reader = create_sandbox(
        &server,
        json!({"volumes": [{"volumeId": "vol", "mountPath": "/data", "subpath": "dir"}]}),
    )
    .await;
    destroy(&server, &reader).await;
    destroy(&server, &writer).await;
    server.stop().await;
}

async fn the_network_allow_list_is_kept_and_echoed(control: Control) {
    require_runner_prerequisites();
    let server = TestServer::start_on(control).await;
    let sandbox = create_sandbox(
        &server,
        json!({"networkAllowList": " 10.0.0.0/8, 192.168.1.0/24 ", "networkBlockAll": false}),
    )
    .await;
    assert_eq!(sandbox["networkAllowList"], "10.0.0.0/8,192.168.1.0/24");
    assert_eq!(sandbox["networkBlockAll"], false);
    let id = sandbox["id"].as_str().unwrap();
    let (_, again) = server.get(&format!("/api/sandbox/{id}")).await;
    assert_eq!(again["networkAllowList"], "10.0.0.0/8,192.168.1.0/24");
    let isolated = create_sandbox(&server, json!({"networkBlockAll": true})).await;
    assert_eq!(
        (&isolated["networkBlockAll"], &isolated["networkAllowList"]),
        (&json!(true), &Value::Null)
    );
    // What is not honoured is not claimed.
    assert_eq!(
        (&isolated["disk"], &isolated["gpu"], &isolated["public"]),
        (&json!(0), &json!(0), &json!(false))
    );
    destroy(&server, &isolated).await;
    destroy(&server, &sandbox).await;
    server.stop().await;
}

on_both_databases!(
    sandboxes_share_a_volume_that_outlives_them,
    bad_toolbox_input_on_a_running_sandbox_is_400_never_500,
    a_subpath_that_is_no_directory_is_400_and_leaves_no_sandbox,
    the_network_allow_list_is_kept_and_echoed,
);
