//! The REST API against a real in-process server: auth, volumes, mount-path rules, OpenAPI and
//! recovery after a restart. (Sandboxes with a real runner: tests/sandboxes.rs.)

mod common;

use common::{Control, TestServer};
use reqwest::StatusCode;
use serde_json::{json, Value};

fn assert_error_body(body: &Value, status: StatusCode) {
    assert_eq!(body["statusCode"], status.as_u16(), "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(body["code"].is_string(), "{body}");
    assert!(body["source"].is_string(), "{body}");
}

async fn requests_need_a_valid_key_and_see_only_their_organization(control: Control) {
    let server = TestServer::start_on(control).await;
    let volume = server.create_volume("private").await;
    let id = volume["id"].as_str().unwrap();

    let (status, body) = server
        .send(server.http.get(server.url("/api/volumes")))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_error_body(&body, status);
    let wrong = server
        .http
        .get(server.url("/api/volumes"))
        .bearer_auth("cellar_wrong");
    assert_eq!(server.send(wrong).await.0, StatusCode::UNAUTHORIZED);
    let toolbox = server
        .http
        .post(server.url("/toolbox/x/process/execute"))
        .json(&json!({"command": "true"}));
    assert_eq!(server.send(toolbox).await.0, StatusCode::UNAUTHORIZED);

    // A second organization, made with the admin functions while the server runs.
    server
        .admin(|c| cellar_server::admin_create_org(c, "other"))
        .unwrap();
    let other_key = server
        .admin(|c| cellar_server::admin_create_key(c, "other"))
        .unwrap();
    assert!(server
        .admin(|c| cellar_server::admin_create_org(c, "other"))
        .is_err());
    assert!(server
        .admin(|c| cellar_server::admin_create_key(c, "nobody"))
        .is_err());
    let as_other = |request: reqwest::RequestBuilder| request.bearer_auth(&other_key);
    for (request, key) in [
        (
            server.http.get(server.url(&format!("/api/volumes/{id}"))),
            id,
        ),
        (
            server.http.get(server.url("/api/volumes/by-name/private")),
            "private",
        ),
        (
            server
                .http
                .delete(server.url(&format!("/api/volumes/{id}"))),
            id,
        ),
    ] {
        let (status, body) = server.send(as_other(request)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        // Exactly what a volume that does not exist answers: nothing but the caller's own key.
        assert_eq!(body["message"], format!("volume {key} not found"), "{body}");
    }
    let (status, list) = server
        .send(as_other(server.http.get(server.url("/api/volumes"))))
        .await;
    assert_eq!((status, list), (StatusCode::OK, json!([])));
    // The other organization may use the same name.
    let request = server
        .http
        .post(server.url("/api/volumes"))
        .json(&json!({"name": "private"}));
    let (status, theirs) = server.send(as_other(request)).await;
    assert_eq!(status, StatusCode::OK, "{theirs}");
    assert_ne!(theirs["id"], volume["id"]);
    assert_ne!(theirs["organizationId"], volume["organizationId"]);
    // Sandboxes of another organization's volumes: not found either.
    let request = server
        .http
        .post(server.url("/api/sandbox"))
        .json(&json!({"volumes": [{"volumeId": id, "mountPath": "/home/daytona/v"}]}));
    let (status, body) = server.send(as_other(request)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("not found"),
        "{body}"
    );
    server.stop().await;
}

async fn volume_lifecycle_removes_every_object_and_frees_the_name(control: Control) {
    let server = TestServer::start_on(control).await;
    let volume = server.create_volume("data-1").await;
    for field in [
        "id",
        "name",
        "organizationId",
        "createdAt",
        "updatedAt",
        "state",
    ] {
        assert!(volume[field].is_string(), "{field} in {volume}");
    }
    assert!(
        volume.as_object().unwrap().contains_key("errorReason"),
        "{volume}"
    );
    let id = volume["id"].as_str().unwrap().to_string();

    let (status, by_name) = server.get("/api/volumes/by-name/data-1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(by_name["id"], volume["id"]);
    let (status, by_id) = server.get(&format!("/api/volumes/{id}")).await;
    assert_eq!((status, &by_id["name"]), (StatusCode::OK, &json!("data-1")));
    let (status, body) = server.get("/api/volumes/by-name/absent").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error_body(&body, status);

    let (status, body) = server
        .post("/api/volumes", &json!({"name": "data-1"}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    // Put objects in the store, then delete: all of them and the metadata must go.
    common::write_into_volume(&server, &id, "big", vec![7u8; 3 << 20]);
    assert!(
        !server.block_files().is_empty(),
        "the write reached the block store"
    );
    assert!(server.has_volume_metadata(&id));
    let (status, _) = server.delete(&format!("/api/volumes/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    server
        .wait_for(&format!("/api/volumes/{id}"), "state", "deleted")
        .await;
    assert_eq!(server.block_files(), Vec::<std::path::PathBuf>::new());
    assert!(!server.has_volume_metadata(&id));
    assert_eq!(
        server.get("/api/volumes/by-name/data-1").await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        server.delete(&format!("/api/volumes/{id}")).await.0,
        StatusCode::NOT_FOUND
    );

    let (_, live) = server.get("/api/volumes").await;
    assert_eq!(live, json!([]));
    let (_, all) = server.get("/api/volumes?includeDeleted=true").await;
    assert_eq!(all.as_array().unwrap().len(), 1);
    assert_eq!(all[0]["state"], "deleted");

    let again = server.create_volume("data-1").await;
    assert_ne!(again["id"], volume["id"]);
    server.stop().await;
}

async fn volume_names_follow_the_rule_and_the_quota_holds(control: Control) {
    let server = TestServer::start_on_with(control, |config| config.volume_quota = 2).await;
    let long = "a".repeat(64);
    for bad in ["", "-x", ".x", "a b", "a/b", "ü", long.as_str()] {
        let (status, body) = server.post("/api/volumes", &json!({ "name": bad })).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad:?}: {body}");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains(cellar_server::NAME_RULE),
            "{body}"
        );
    }
    server.create_volume(&"b".repeat(63)).await;
    // Unknown fields are ignored.
    let (status, body) = server
        .post("/api/volumes", &json!({"name": "v.2_x", "size": 10}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = server.post("/api/volumes", &json!({"name": "third"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("at most 2 volumes"),
        "{body}"
    );
    server.stop().await;
}

async fn bad_input_is_400_never_500(control: Control) {
    let server = TestServer::start_on(control).await;
    let malformed = [
        ("/api/volumes", "{\"name\": "),
        ("/api/volumes", "[]"),
        ("/api/volumes", "{}"),
        ("/api/sandbox", "{\"volumes\": 5}"),
        ("/api/sandbox", "not json"),
    ];
    for (path, text) in malformed {
        let request = server
            .http
            .post(server.url(path))
            .bearer_auth(&server.key)
            .header("content-type", "application/json")
            .body(text);
        let (status, body) = server.send(request).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {text}: {body}");
        assert_error_body(&body, status);
    }
    let no_content_type = server
        .http
        .post(server.url("/api/volumes"))
        .bearer_auth(&server.key)
        .body("{}");
    assert_eq!(
        server.send(no_content_type).await.0,
        StatusCode::BAD_REQUEST
    );
    let (status, _) = server.get("/api/volumes?includeDeleted=maybe").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = server.get("/api/sandbox?labels=nope").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) = server.get("/api/volumes/%FF%FE").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_error_body(&body, status);
    let (status, body) = server.get("/api/nothing-here").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error_body(&body, status);
    server.stop().await;
}

async fn every_mount_path_rule_answers_400_naming_the_rule(control: Control) {
    let server = TestServer::start_on(control).await;
    server.create_volume("vol").await;
    let mount = |path: &str| json!({"volumeId": "vol", "mountPath": path});
    let cases: Vec<(Value, &str)> = vec![
        (json!([mount("relative/path")]), "absolute"),
        (json!([mount("")]), "absolute"),
        (json!([mount("/")]), "root"),
        (json!([mount("/home/../etc")]), "'..'"),
        (json!([mount("/home/./x")]), "'.'"),
        (json!([mount("/home/x/..")]), "'..'"),
        (json!([mount("/home/x/.")]), "'.'"),
        (json!([mount("/home//x")]), "'//'"),
        (json!([mount("//etc")]), "/etc"),
        (json!([mount("/etc/")]), "/etc"),
        (json!([mount("/proc")]), "/proc"),
        (json!([mount("/sys/fs")]), "/sys"),
        (json!([mount("/dev/shm")]), "/dev"),
        (json!([mount("/boot")]), "/boot"),
        (json!([mount("/etc/ssl")]), "/etc"),
        (json!([mount("/bin")]), "/bin"),
        (json!([mount("/sbin")]), "/sbin"),
        (json!([mount("/lib/x")]), "/lib"),
        (json!([mount("/lib64")]), "/lib64"),
        (json!([mount("/usr")]), "/usr"),
        (json!([mount("/usr/bin")]), "/usr"),
        (json!([mount("/usr/lib")]), "/usr"),
        (json!([mount("/usr/local/x")]), "/usr"),
        (json!([mount("/lib32")]), "/lib32"),
        (json!([mount("/libx32/x")]), "/libx32"),
        (json!([mount("/data"), mount("/data")]), "duplicate"),
        (json!([mount("/data"), mount("/data/inner")]), "nested"),
        (json!([mount("/data/inner"), mount("/data/")]), "nested"),
        (
            json!([{"volumeId": "vol", "mountPath": "/data", "subpath": "/abs"}]),
            "relative",
        ),
        (
            json!([{"volumeId": "vol", "mountPath": "/data", "subpath": "a/../../b"}]),
            "'..'",
        ),
        (
            json!([{"volumeId": "missing", "mountPath": "/data"}]),
            "volume missing not found",
        ),
    ];
    let subpath =
        |subpath: &str| json!([{"volumeId": "vol", "mountPath": "/data", "subpath": subpath}]);
    let long_component = "c".repeat(256);
    let long_path = "d/".repeat(2100) + "d";
    let mut cases = cases;
    cases.extend([
        (subpath(".."), "'..'"),
        (subpath("a/./b"), "'.'"),
        (subpath("./a"), "'.'"),
        (subpath("a//b"), "empty"),
        (subpath("a/"), "empty"),
        (subpath("a\0b"), "NUL"),
        (subpath(&long_component), "255"),
        (subpath(&long_path), "4096"),
    ]);
    for (volumes, rule) in cases {
        let (status, body) = server
            .post("/api/sandbox", &json!({ "volumes": volumes }))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{volumes}: {body}");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.contains(rule),
            "{volumes}: expected {rule:?} in {message:?}"
        );
    }
    let (_, sandboxes) = server.get("/api/sandbox").await;
    assert_eq!(sandboxes["items"], json!([]), "no sandbox was created");
    server.stop().await;
}

async fn openapi_document_lists_every_endpoint(control: Control) {
    let server = TestServer::start_on(control).await;
    let (status, doc) = server
        .send(server.http.get(server.url("/api/openapi.json")))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3."),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().unwrap();
    let expected = [
        ("/api/volumes", "get"),
        ("/api/volumes", "post"),
        ("/api/volumes/by-name/{name}", "get"),
        ("/api/volumes/{volumeId}", "get"),
        ("/api/volumes/{volumeId}", "delete"),
        ("/api/sandbox", "get"),
        ("/api/sandbox", "post"),
        ("/api/sandbox/{sandboxIdOrName}", "get"),
        ("/api/sandbox/{sandboxIdOrName}", "delete"),
        ("/api/sandbox/{sandboxId}/toolbox-proxy-url", "get"),
        ("/toolbox/{sandboxId}/process/execute", "post"),
        ("/toolbox/{sandboxId}/files/bulk-upload", "post"),
        ("/toolbox/{sandboxId}/files/bulk-download", "post"),
        ("/toolbox/{sandboxId}/files/folder", "post"),
        ("/toolbox/{sandboxId}/files", "get"),
        ("/toolbox/{sandboxId}/files", "delete"),
        ("/toolbox/{sandboxId}/files/info", "get"),
        ("/toolbox/{sandboxId}/files/move", "post"),
        ("/toolbox/{sandboxId}/files/permissions", "post"),
        ("/toolbox/{sandboxId}/files/find", "get"),
        ("/toolbox/{sandboxId}/files/search", "get"),
        ("/toolbox/{sandboxId}/files/replace", "post"),
        ("/metrics", "get"),
    ];
    for (path, method) in expected {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} missing"
        );
    }
    let mut operation_ids: Vec<&str> = paths
        .values()
        .flat_map(|item| item.as_object().unwrap().values())
        .filter_map(|operation| operation["operationId"].as_str())
        .collect();
    let count = operation_ids.len();
    operation_ids.sort();
    operation_ids.dedup();
    assert_eq!(
        operation_ids.len(),
        count,
        "operation ids are unique: {operation_ids:?}"
    );
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for schema in [
        "VolumeDto",
        "SandboxDto",
        "CreateSandbox",
        "ErrorBody",
        "ExecuteRequest",
    ] {
        assert!(schemas.contains_key(schema), "schema {schema} missing");
    }
    server.stop().await;
}

async fn a_restart_finishes_interrupted_volume_transitions(control: Control) {
    let mut server = TestServer::start_on(control).await;
    let doomed = server.create_volume("doomed").await;
    let doomed_id = doomed["id"].as_str().unwrap().to_string();
    common::write_into_volume(&server, &doomed_id, "file", vec![1u8; 1 << 20]);
    assert!(!server.block_files().is_empty());
    let (_, org) = server.get("/api/volumes/by-name/doomed").await;
    let org_id = org["organizationId"].as_str().unwrap().to_string();

    let mut second = server.config.clone();
    second.listen = "127.0.0.1:0".parse().unwrap();
    let refused = cellar_server::Server::start(second)
        .await
        .err()
        .expect("one server per data dir");
    assert!(
        refused.to_string().contains("another cellar server"),
        "{refused:#}"
    );

    // As if the server had died mid-deletion, and mid-creation of another volume.
    server
        .restart(|config| {
            common::control_sql(
                config,
                "UPDATE volumes SET state = 'deleting' WHERE id = ?1",
                cellar_sql::params![doomed_id].to_vec(),
            );
            common::control_sql(
                config,
                "INSERT INTO volumes (id, org_id, name, state, created_at, updated_at) \
                 VALUES ('half-made', ?1, 'half-made', 'creating', '2026-01-01T00:00:00.000Z', \
                 '2026-01-01T00:00:00.000Z')",
                cellar_sql::params![org_id].to_vec(),
            );
        })
        .await;
    server
        .wait_for(&format!("/api/volumes/{doomed_id}"), "state", "deleted")
        .await;
    assert_eq!(server.block_files(), Vec::<std::path::PathBuf>::new());
    assert!(!server.has_volume_metadata(&doomed_id));
    server
        .wait_for("/api/volumes/half-made", "state", "ready")
        .await;
    assert!(server.has_volume_metadata("half-made"));
    server.stop().await;
}

async fn sandbox_creation_waits_for_a_volume_still_being_created(control: Control) {
    let server = TestServer::start_on(control).await;
    let existing = server.create_volume("existing").await;
    common::control_sql(
        &server.config,
        "INSERT INTO volumes (id, org_id, name, state, created_at, updated_at) \
         VALUES ('slow', ?1, 'slow', 'creating', '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:00.000Z')",
        cellar_sql::params![existing["organizationId"].as_str().unwrap()].to_vec(),
    );
    let config = server.config.clone();
    let settle = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(400));
        common::control_sql(
            &config,
            "UPDATE volumes SET state = 'error', error_reason = 'boom' WHERE id = 'slow'",
            Vec::new(),
        );
    });
    let started = std::time::Instant::now();
    let body = json!({"volumes": [{"volumeId": "slow", "mountPath": "/data"}]});
    let (status, answer) = server.post("/api/sandbox", &body).await;
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(400),
        "it waited"
    );
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert!(
        answer["message"].as_str().unwrap().contains("boom"),
        "{answer}"
    );
    settle.join().unwrap();
    server.stop().await;
}

/// Creates nothing and answers 400 with a message naming `field`.
async fn assert_refused(server: &TestServer, body: Value, field: &str) {
    let (status, answer) = server.post("/api/sandbox", &body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
    assert_error_body(&answer, status);
    let message = answer["message"].as_str().unwrap();
    assert!(
        message.contains(field),
        "{body}: {field:?} not in {message:?}"
    );
}

async fn sandbox_fields_that_cannot_work_are_refused_naming_the_field(control: Control) {
    let server = TestServer::start_on(control).await;
    server.create_volume("vol").await;
    let env = |name: &str, value: &str| json!({ "env": { name: value } });
    let cases: Vec<(Value, &str)> = vec![
        (env("", "x"), "name"),
        (env("A=B", "x"), "\"A=B\""),
        (env("1A", "x"), "\"1A\""),
        (env("A-B", "x"), "\"A-B\""),
        (env("A\0B", "x"), "name"),
        (env("A", "x\0y"), "NUL"),
        (env("PATH", ""), "PATH"),
        (env("BIG", &"x".repeat(70_000)), "env"),
        (json!({"user": "root"}), "user"),
        (json!({"user": ""}), "user"),
        (json!({"snapshot": "ubuntu:22.04"}), "snapshot"),
        (json!({"target": "us"}), "target"),
        (json!({"gpu": 1}), "gpu"),
        (json!({"gpuType": ["H100"]}), "gpuType"),
        (json!({"spot": true}), "spot"),
        (json!({"kvm": true}), "kvm"),
        (json!({"public": true}), "public"),
        (json!({"disk": 10}), "disk"),
        (json!({"cpu": -1}), "cpu"),
        (json!({"memory": -1}), "memory"),
        (json!({"memory": 1_i64 << 40}), "memory"),
        (json!({"autoStopInterval": 15}), "autoStopInterval"),
        (json!({"autoPauseInterval": 60}), "autoPauseInterval"),
        (json!({"autoArchiveInterval": 60}), "autoArchiveInterval"),
        (json!({"ttlMinutes": 5}), "ttlMinutes"),
        (json!({"domainAllowList": "example.com"}), "domainAllowList"),
        (
            json!({"outboundProxyUrl": "http://proxy:3128"}),
            "outboundProxyUrl",
        ),
        (
            json!({"otelEndpointOverride": "http://otel"}),
            "otelEndpointOverride",
        ),
        (
            json!({"buildInfo": {"dockerfileContent": "FROM alpine"}}),
            "buildInfo",
        ),
        (json!({"linkedSandbox": "other"}), "linkedSandbox"),
        (json!({"secrets": [{"TOKEN": "vault-name"}]}), "secrets"),
        (
            json!({"networkAllowList": "10.0.0.0/8,not-a-cidr"}),
            "networkAllowList",
        ),
        (
            json!({"networkAllowList": "10.0.0.0/33"}),
            "networkAllowList",
        ),
        (json!({"networkAllowList": "10.0.0.1"}), "networkAllowList"),
        (
            json!({"networkBlockAll": true, "networkAllowList": "10.0.0.0/8"}),
            "networkAllowList",
        ),
        (json!({"name": "bad name"}), "sandbox name"),
    ];
    for (body, field) in cases {
        assert_refused(&server, body, field).await;
    }
    let (_, sandboxes) = server.get("/api/sandbox").await;
    assert_eq!(sandboxes["items"], json!([]), "no sandbox was created");
    server.stop().await;
}

async fn unknown_routes_and_wrong_methods_answer_the_error_body(control: Control) {
    let server = TestServer::start_on(control).await;
    let with_key = |request: reqwest::RequestBuilder| request.bearer_auth(&server.key);
    let cases = [
        (server.http.get(server.url("/")), StatusCode::NOT_FOUND),
        (server.http.get(server.url("/api")), StatusCode::NOT_FOUND),
        (
            server.http.get(server.url("/toolbox/x/nothing")),
            StatusCode::NOT_FOUND,
        ),
        (
            with_key(server.http.delete(server.url("/api/volumes/by-name/v"))),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            with_key(server.http.put(server.url("/api/volumes"))),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            with_key(server.http.post(server.url("/api/sandbox/x"))),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            with_key(server.http.get(server.url("/toolbox/x/process/execute"))),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            server.http.post(server.url("/api/openapi.json")),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
    ];
    for (request, want) in cases {
        let request = request.build().unwrap();
        let what = format!("{} {}", request.method(), request.url());
        let response = server.http.execute(request).await.unwrap();
        let status = response.status();
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_string();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, want, "{what}: {body}");
        assert_eq!(content_type, "application/json", "{what}");
        assert_error_body(&body, status);
    }
    server.stop().await;
}

async fn the_bearer_scheme_is_case_insensitive_and_the_key_is_not(control: Control) {
    let server = TestServer::start_on(control).await;
    let with = |authorization: String| {
        server
            .http
            .get(server.url("/api/volumes"))
            .header("authorization", authorization)
    };
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let (status, body) = server.send(with(format!("{scheme} {}", server.key))).await;
        assert_eq!(status, StatusCode::OK, "{scheme}: {body}");
    }
    let wrong_keys = [
        format!("Bearer {}", server.key.to_uppercase()),
        format!("Bearer {}x", server.key),
        format!("Basic {}", server.key),
        format!("Bearer{}", server.key),
        server.key.clone(),
    ];
    for header in wrong_keys {
        let (status, body) = server.send(with(header.clone())).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{header}: {body}");
        assert_error_body(&body, status);
    }
    server.stop().await;
}

async fn toolbox_input_is_checked_before_the_sandbox(control: Control) {
    let server = TestServer::start_on(control).await;
    let toolbox = format!("{}/toolbox/no-such-sandbox", server.base);
    let execute = format!("{toolbox}/process/execute");
    let cases = [
        (json!({"command": "echo \0"}), "command"),
        (json!({"command": "x".repeat(140_000)}), "command"),
        (json!({"command": "pwd", "cwd": "/tmp\0x"}), "cwd"),
        (json!({"command": "pwd", "envs": {"A=B": "x"}}), "envs"),
        (json!({"command": "pwd", "envs": {"A": "\0"}}), "envs"),
    ];
    for (body, field) in cases {
        let (status, answer) = server.post(&execute, &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        assert!(
            answer["message"].as_str().unwrap().contains(field),
            "{answer}"
        );
    }
    let (status, answer) = server
        .post(
            &format!("{toolbox}/files/bulk-download"),
            &json!({"paths": ["/ok", "/a\0b"]}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert!(
        answer["message"].as_str().unwrap().contains("paths[1]"),
        "{answer}"
    );
    for url in [
        format!("{toolbox}/files?path=/a%00b"),
        format!("{toolbox}/files?path="),
    ] {
        let (status, answer) = server.get(&url).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{url}: {answer}");
        assert_error_body(&answer, status);
    }
    for url in [
        format!("{toolbox}/files/folder?path=/a%00b&mode=755"),
        format!("{toolbox}/files/folder?path=/a&mode=9"),
    ] {
        let (status, answer) = server.post(&url, &json!({})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{url}: {answer}");
        assert_error_body(&answer, status);
    }
    server.stop().await;
}

on_both_databases!(
    requests_need_a_valid_key_and_see_only_their_organization,
    volume_lifecycle_removes_every_object_and_frees_the_name,
    volume_names_follow_the_rule_and_the_quota_holds,
    bad_input_is_400_never_500,
    every_mount_path_rule_answers_400_naming_the_rule,
    openapi_document_lists_every_endpoint,
    a_restart_finishes_interrupted_volume_transitions,
    sandbox_creation_waits_for_a_volume_still_being_created,
    sandbox_fields_that_cannot_work_are_refused_naming_the_field,
    unknown_routes_and_wrong_methods_answer_the_error_body,
    the_bearer_scheme_is_case_insensitive_and_the_key_is_not,
    toolbox_input_is_checked_before_the_sandbox,
);
