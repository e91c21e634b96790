//! The volume file API (`/api/volumes/{volumeId}/files*`) against a real server: every call,
//! every bad input (a 4xx with a message, never a 500), symlink containment, Range requests,
//! signed URLs, atomic replace, and round trips of a 1,000-file tree and of a 2 GiB file through
//! the real S3 server (tests/harness/rgw.sh).

mod common;

use std::time::Duration;

use common::{Control, TestServer};
use reqwest::header::{CONTENT_RANGE, RANGE};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn files_url(volume: &str, rest: &str) -> String {
    format!("/api/volumes/{volume}/files{rest}")
}

fn enc(path: &str) -> String {
    url::form_urlencoded::byte_serialize(path.as_bytes()).collect()
}

/// PUT of `body` to `path` (`extra`: more query parameters, e.g. "&parents=true").
async fn put(
    server: &TestServer,
    volume: &str,
    path: &str,
    extra: &str,
    body: impl Into<reqwest::Body>,
) -> (StatusCode, Value) {
    let url = server.url(&files_url(
        volume,
        &format!("/content?path={}{extra}", enc(path)),
    ));
    server
        .send(server.http.put(url).bearer_auth(&server.key).body(body))
        .await
}

/// Downloads `path`; returns the status, headers and body.
async fn download(
    server: &TestServer,
    volume: &str,
    path: &str,
    range: Option<&str>,
) -> (StatusCode, reqwest::header::HeaderMap, Vec<u8>) {
    let url = server.url(&files_url(volume, &format!("/content?path={}", enc(path))));
    let mut request = server.http.get(url).bearer_auth(&server.key);
    if let Some(range) = range {
        request = request.header(RANGE, range);
    }
    let response = request.send().await.unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    (status, headers, response.bytes().await.unwrap().to_vec())
}

async fn content(server: &TestServer, volume: &str, path: &str) -> Vec<u8> {
    let (status, _, body) = download(server, volume, path, None).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{path}: {}",
        String::from_utf8_lossy(&body)
    );
    body
}

async fn stat(server: &TestServer, volume: &str, path: &str) -> (StatusCode, Value) {
    server
        .get(&files_url(volume, &format!("/stat?path={}", enc(path))))
        .await
}

/// Every entry of a listing, following `nextCursor` page by page.
async fn list_all(
    server: &TestServer,
    volume: &str,
    path: &str,
    recursive: bool,
    limit: usize,
) -> Vec<Value> {
    let mut entries = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut query = format!("?path={}&recursive={recursive}&limit={limit}", enc(path));
        if let Some(cursor) = &cursor {
            query.push_str(&format!("&cursor={}", enc(cursor)));
        }
        let (status, page) = server.get(&files_url(volume, &query)).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let page_entries = page["entries"].as_array().unwrap();
        assert!(page_entries.len() <= limit);
        entries.extend(page_entries.iter().cloned());
        match page["nextCursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => return entries,
        }
    }
}

fn paths(entries: &[Value]) -> Vec<String> {
    entries
        .iter()
        .map(|e| e["path"].as_str().unwrap().to_string())
        .collect()
}

/// A 4xx answer in the API's error shape, with a message and this code.
#[track_caller]
fn assert_error(answer: &(StatusCode, Value), status: StatusCode, code: &str) {
    let (got, body) = answer;
    assert_eq!(*got, status, "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["statusCode"], status.as_u16(), "{body}");
    assert!(
        !body["message"].as_str().unwrap_or_default().is_empty(),
        "{body}"
    );
}

async fn volume_id(server: &TestServer, name: &str) -> String {
    server.create_volume(name).await["id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn every_operation_and_its_errors(control: Control) {
    let server = TestServer::start_on(control).await;
    let vol = volume_id(&server, "files").await;
    let v = vol.as_str();

    // Upload creates (201), replaces (200); the entry describes the file.
    let created = put(&server, v, "/a.txt", "", "hello").await;
    assert_eq!(created.0, StatusCode::CREATED, "{}", created.1);
    assert_eq!(created.1["path"], "/a.txt");
    assert_eq!(created.1["name"], "a.txt");
    assert_eq!(created.1["type"], "file");
    assert_eq!(created.1["size"], 5);
    assert_eq!(created.1["mode"], "0644");
    assert!(created.1["modifiedAt"].as_str().unwrap().ends_with('Z'));
    let replaced = put(&server, v, "/a.txt", "&mode=0600", "hello, world").await;
    assert_eq!(replaced.0, StatusCode::OK, "{}", replaced.1);
    assert_eq!(replaced.1["size"], 12);
    assert_eq!(replaced.1["mode"], "0600");
    assert_eq!(content(&server, v, "/a.txt").await, b"hello, world");
    // By volume name too; an empty file.
    assert_eq!(
        put(&server, "files", "/empty", "", "").await.0,
        StatusCode::CREATED
    );
    assert_eq!(content(&server, "files", "/empty").await, b"");

    // Parents: 404 without, created with.
    assert_error(
        &put(&server, v, "/d1/d2/f", "", "x").await,
        StatusCode::NOT_FOUND,
        "FILE_NOT_FOUND",
    );
    assert_eq!(
        put(&server, v, "/d1/d2/f", "&parents=true", "x").await.0,
        StatusCode::CREATED
    );
    let (_, d1) = stat(&server, v, "/d1").await;
    assert_eq!(d1["type"], "directory");
    assert_eq!(d1["mode"], "0755");
    assert_error(
        &put(&server, v, "/a.txt", "&overwrite=false", "no").await,
        StatusCode::CONFLICT,
        "ALREADY_EXISTS",
    );
    assert_error(
        &put(&server, v, "/d1", "", "no").await,
        StatusCode::CONFLICT,
        "IS_A_DIRECTORY",
    );
    assert_error(
        &put(&server, v, "/a.txt/x", "", "no").await,
        StatusCode::CONFLICT,
        "NOT_A_DIRECTORY",
    );
    assert_error(
        &put(&server, v, "/m", "&mode=0999", "no").await,
        StatusCode::BAD_REQUEST,
        "INVALID_MODE",
    );
    assert_eq!(content(&server, v, "/a.txt").await, b"hello, world");

    // mkdir: 201, 409 when it exists, 200 with parents; missing parent 404.
    let mkdir = async |path: &str, parents: bool| {
        server
            .post(
                &files_url(v, "/mkdir"),
                &json!({"path": path, "parents": parents, "mode": "0750"}),
            )
            .await
    };
    let made = mkdir("/new", false).await;
    assert_eq!(made.0, StatusCode::CREATED, "{}", made.1);
    assert_eq!(made.1["mode"], "0750");
    assert_error(
        &mkdir("/new", false).await,
        StatusCode::CONFLICT,
        "ALREADY_EXISTS",
    );
    assert_eq!(mkdir("/new", true).await.0, StatusCode::OK);
    assert_error(
        &mkdir("/a.txt", true).await,
        StatusCode::CONFLICT,
        "ALREADY_EXISTS",
    );
    assert_error(
        &mkdir("/x/y", false).await,
        StatusCode::NOT_FOUND,
        "FILE_NOT_FOUND",
    );
    assert_eq!(mkdir("/x/y/z", true).await.0, StatusCode::CREATED);

    // Listing: sorted, one level, or recursive depth first; paginated either way.
    let top = list_all(&server, v, "/", false, 1000).await;
    assert_eq!(paths(&top), ["/a.txt", "/d1", "/empty", "/new", "/x"]);
    let all = list_all(&server, v, "/", true, 1000).await;
    let expected = [
        "/a.txt", "/d1", "/d1/d2", "/d1/d2/f", "/empty", "/new", "/x", "/x/y", "/x/y/z",
    ];
    assert_eq!(paths(&all), expected);
    for limit in [1, 2, 4] {
        assert_eq!(
            paths(&list_all(&server, v, "/", true, limit).await),
            expected
        );
    }
    assert_eq!(
        paths(&list_all(&server, v, "/x", true, 1).await),
        ["/x/y", "/x/y/z"]
    );
    let listed = async |query: &str| server.get(&files_url(v, query)).await;
    assert_error(
        &listed("?path=/a.txt").await,
        StatusCode::CONFLICT,
        "NOT_A_DIRECTORY",
    );
    assert_error(
        &listed("?path=/nope").await,
        StatusCode::NOT_FOUND,
        "FILE_NOT_FOUND",
    );
    assert_error(
        &listed("?path=/&limit=0").await,
        StatusCode::BAD_REQUEST,
        "BAD_REQUEST",
    );
    assert_error(
        &listed("?path=/&cursor=/elsewhere/x").await,
        StatusCode::BAD_REQUEST,
        "BAD_REQUEST",
    );
    assert_error(
        &listed("?path=/&recursive=maybe").await,
        StatusCode::BAD_REQUEST,
        "BAD_REQUEST",
    );

    // Move: to a free name, not over an existing one without overwrite, then with it.
    let mv = async |from: &str, to: &str, overwrite: bool| {
        server
            .post(
                &files_url(v, "/move"),
                &json!({"from": from, "to": to, "overwrite": overwrite}),
            )
            .await
    };
    let moved = mv("/d1/d2/f", "/new/f", false).await;
    assert_eq!(moved.0, StatusCode::OK, "{}", moved.1);
    assert_eq!(moved.1["path"], "/new/f");
    assert_eq!(content(&server, v, "/new/f").await, b"x");
    assert_error(
        &mv("/new/f", "/a.txt", false).await,
        StatusCode::CONFLICT,
        "ALREADY_EXISTS",
    );
    assert_eq!(mv("/new/f", "/a.txt", true).await.0, StatusCode::OK);
    assert_eq!(content(&server, v, "/a.txt").await, b"x");
    assert_error(
        &mv("/nope", "/b", false).await,
        StatusCode::NOT_FOUND,
        "FILE_NOT_FOUND",
    );
    assert_error(
        &mv("/x", "/x/y/inside", false).await,
        StatusCode::BAD_REQUEST,
        "BAD_REQUEST",
    );
    assert_error(
        &mv("/", "/b", false).await,
        StatusCode::BAD_REQUEST,
        "BAD_REQUEST",
    );
    assert_error(
        &mv("/a.txt", "/x", true).await,
        StatusCode::CONFLICT,
        "IS_A_DIRECTORY",
    );

    // Mode.
    let chmod = async |path: &str, mode: &str| {
        server
            .post(&files_url(v, "/mode"), &json!({"path": path, "mode": mode}))
            .await
    };
    let changed = chmod("/a.txt", "755").await;
    assert_eq!(changed.0, StatusCode::OK, "{}", changed.1);
    assert_eq!(changed.1["mode"], "0755");
    assert_error(
        &chmod("/a.txt", "rwx").await,
        StatusCode::BAD_REQUEST,
        "INVALID_MODE",
    );
    assert_error(
        &chmod("/nope", "0644").await,
        StatusCode::NOT_FOUND,
        "FILE_NOT_FOUND",
    );

    // Delete: files, empty directories; non-empty ones only with recursive; never the root.
    let rm = async |path: &str, recursive: bool| {
        server
            .delete(&files_url(
                v,
                &format!("?path={}&recursive={recursive}", enc(path)),
            ))
            .await
    };
    assert_eq!(rm("/empty", false).await.0, StatusCode::NO_CONTENT);
    assert_error(
        &stat(&server, v, "/empty").await,
        StatusCode::NOT_FOUND,
        "FILE_NOT_FOUND",
    );
    assert_error(
        &rm("/x", false).await,
        StatusCode::CONFLICT,
        "DIRECTORY_NOT_EMPTY",
    );
    assert_eq!(rm("/x", true).await.0, StatusCode::NO_CONTENT);
    assert_error(
        &rm("/x", true).await,
        StatusCode::NOT_FOUND,
        "FILE_NOT_FOUND",
    );
    assert_error(&rm("/", true).await, StatusCode::BAD_REQUEST, "BAD_REQUEST");
    assert_eq!(
        paths(&list_all(&server, v, "/", true, 10).await),
        ["/a.txt", "/d1", "/d1/d2", "/new"]
    );

    // Content of what is no file.
    let (status, _, body) = download(&server, v, "/d1", None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(String::from_utf8_lossy(&body).contains("IS_A_DIRECTORY"));

    // Bad paths, in every call: 400 INVALID_PATH with a message naming the rule.
    let long_name = "n".repeat(256);
    let long_path = format!("/{}", "p/".repeat(2100));
    for (bad, rule) in [
        ("relative/path", "absolute"),
        ("/a/../b", "'..'"),
        ("/..", "'..'"),
        ("/a\0b", "NUL"),
        (long_name.as_str(), "absolute"),
        (&format!("/{long_name}"), "255"),
        (long_path.as_str(), "4096"),
        ("", "empty"),
    ] {
        let q = enc(bad);
        let answers = [
            server.get(&files_url(v, &format!("?path={q}"))).await,
            server.get(&files_url(v, &format!("/stat?path={q}"))).await,
            server
                .get(&files_url(v, &format!("/content?path={q}")))
                .await,
            put(&server, v, bad, "", "x").await,
            mkdir(bad, true).await,
            mv(bad, "/ok", false).await,
            mv("/a.txt", bad, false).await,
            chmod(bad, "0644").await,
            rm(bad, true).await,
            server
                .post(
                    &files_url(v, "/url"),
                    &json!({"path": bad, "method": "GET"}),
                )
                .await,
        ];
        for answer in &answers {
            assert_error(answer, StatusCode::BAD_REQUEST, "INVALID_PATH");
            assert!(
                answer.1["message"].as_str().unwrap().contains(rule),
                "{bad:?}: {}",
                answer.1
            );
        }
    }
    assert_eq!(content(&server, v, "/a.txt").await, b"x");

    // Unknown volume, no key, malformed bodies.
    assert_error(
        &server.get("/api/volumes/no-such-volume/files?path=/").await,
        StatusCode::NOT_FOUND,
        "VOLUME_NOT_FOUND",
    );
    assert_error(
        &put(&server, "no-such-volume", "/f", "", "x").await,
        StatusCode::NOT_FOUND,
        "VOLUME_NOT_FOUND",
    );
    let anonymous = server
        .send(
            server
                .http
                .get(server.url(&files_url(v, "/content?path=/a.txt"))),
        )
        .await;
    assert_error(&anonymous, StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    let anonymous = server
        .send(server.http.get(server.url(&files_url(v, "?path=/"))))
        .await;
    assert_eq!(anonymous.0, StatusCode::UNAUTHORIZED);
    assert_error(
        &server
            .post(&files_url(v, "/mkdir"), &json!({"parents": true}))
            .await,
        StatusCode::BAD_REQUEST,
        "BAD_REQUEST",
    );

    // A deleted volume refuses its files.
    let (status, body) = server.delete(&format!("/api/volumes/{v}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    server
        .wait_for(&format!("/api/volumes/{v}"), "state", "deleted")
        .await;
    assert!(!server.has_volume_metadata(v));
    assert_error(
        &put(&server, v, "/f", "", "x").await,
        StatusCode::CONFLICT,
        "VOLUME_NOT_READY",
    );
    assert_error(
        &stat(&server, v, "/a.txt").await,
        StatusCode::CONFLICT,
        "VOLUME_NOT_READY",
    );
    server.stop().await;
}

async fn range_requests(control: Control) {
    let server = TestServer::start_on(control).await;
    let vol = volume_id(&server, "ranges").await;
    let v = vol.as_str();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(
        put(&server, v, "/f", "", data.clone()).await.0,
        StatusCode::CREATED
    );

    let (status, headers, body) = download(&server, v, "/f", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, data);
    assert_eq!(headers["content-length"], "100000");
    assert_eq!(headers["accept-ranges"], "bytes");
    assert_eq!(headers["content-type"], "application/octet-stream");
    assert!(headers.contains_key("etag") && headers.contains_key("last-modified"));

    for (range, start, end) in [
        ("bytes=0-0", 0, 1),
        ("bytes=10-19", 10, 20),
        ("bytes=99990-", 99_990, 100_000),
        ("bytes=99990-200000", 99_990, 100_000),
        ("bytes=-5", 99_995, 100_000),
        ("bytes=65530-70000", 65_530, 70_001),
    ] {
        let (status, headers, body) = download(&server, v, "/f", Some(range)).await;
        assert_eq!(status, StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(body, &data[start..end], "{range}");
        assert_eq!(
            headers[CONTENT_RANGE],
            format!("bytes {start}-{}/100000", end - 1),
            "{range}"
        );
    }
    for range in ["bytes=100000-", "bytes=200000-300000", "bytes=-0"] {
        let (status, headers, body) = download(&server, v, "/f", Some(range)).await;
        assert_eq!(status, StatusCode::RANGE_NOT_SATISFIABLE, "{range}");
        assert_eq!(headers[CONTENT_RANGE], "bytes */100000");
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["code"], "RANGE_NOT_SATISFIABLE");
    }
    // Ranges this server ignores (RFC 9110 allows it): the whole file.
    for range in ["bytes=0-1,5-6", "lines=1-2", "bytes=9-2"] {
        let (status, _, body) = download(&server, v, "/f", Some(range)).await;
        assert_eq!(
            (status, body.len()),
            (StatusCode::OK, data.len()),
            "{range}"
        );
    }
    let head = server
        .http
        .head(server.url(&files_url(v, "/content?path=/f")))
        .bearer_auth(&server.key)
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(head.headers()["content-length"], "100000");
    server.stop().await;
}

on_both_databases!(every_operation_and_its_errors, range_requests);

/// Links made inside the volume (as a sandbox would) never lead out of it: absolute targets
/// start at the volume's root, `..` stops there, and a call that names a link acts on the link.
#[tokio::test]
async fn symlinks_stay_inside_the_volume() {
    let server = TestServer::start().await;
    let vol = volume_id(&server, "links").await;
    let v = vol.as_str();
    assert_eq!(
        put(&server, v, "/etc/passwd", "&parents=true", "inside")
            .await
            .0,
        StatusCode::CREATED
    );
    assert_eq!(
        put(&server, v, "/dir/file", "&parents=true", "target")
            .await
            .0,
        StatusCode::CREATED
    );
    common::with_vfs(&server, v, |vfs| {
        let ctx = cellar_vfs::Ctx {
            uid: 1000,
            gid: 1000,
            pid: 1,
        };
        let root = cellar_vfs::ROOT_INO;
        let dir = vfs.lookup(&ctx, root, b"dir").unwrap().ino;
        for (parent, name, target) in [
            (root, "abs", "/etc"),
            (root, "up", "../../../../.."),
            (dir, "up2", "../../../etc"),
            (root, "loop", "loop"),
            (root, "to-file", "/dir/file"),
            (root, "dangling", "/nowhere/at/all"),
        ] {
            vfs.symlink(&ctx, parent, name.as_bytes(), target.as_bytes())
                .unwrap();
        }
    });
    // Followed in intermediate components, inside the volume.
    assert_eq!(content(&server, v, "/abs/passwd").await, b"inside");
    assert_eq!(content(&server, v, "/up/etc/passwd").await, b"inside");
    assert_eq!(content(&server, v, "/up/up/up/dir/file").await, b"target");
    assert_eq!(content(&server, v, "/dir/up2/passwd").await, b"inside");
    assert_error(
        &stat(&server, v, "/loop/x").await,
        StatusCode::BAD_REQUEST,
        "INVALID_PATH",
    );
    assert_error(
        &stat(&server, v, "/dangling/x").await,
        StatusCode::NOT_FOUND,
        "FILE_NOT_FOUND",
    );
    assert_error(
        &stat(&server, v, "/to-file/x").await,
        StatusCode::CONFLICT,
        "NOT_A_DIRECTORY",
    );
    // Uploads through a link land inside the volume too.
    assert_eq!(
        put(&server, v, "/up/etc/new", "", "n").await.0,
        StatusCode::CREATED
    );
    assert_eq!(content(&server, v, "/etc/new").await, b"n");

    // Named by the call: the link itself.
    let (status, link) = stat(&server, v, "/to-file").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (link["type"].as_str(), link["target"].as_str()),
        (Some("symlink"), Some("/dir/file"))
    );
    let (status, _, body) = download(&server, v, "/to-file", None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(String::from_utf8_lossy(&body).contains("NOT_A_FILE"));
    let listing = server.get(&files_url(v, "?path=/abs")).await;
    assert_error(&listing, StatusCode::CONFLICT, "NOT_A_DIRECTORY");
    assert!(
        listing.1["message"]
            .as_str()
            .unwrap()
            .contains("symbolic link"),
        "{}",
        listing.1
    );
    let all = list_all(&server, v, "/", true, 100).await;
    let abs = all.iter().find(|e| e["path"] == "/abs").unwrap();
    assert_eq!(
        abs["type"], "symlink",
        "a listing does not follow links: {abs}"
    );
    assert!(!paths(&all).contains(&"/abs/passwd".to_string()));
    assert_error(
        &server
            .post(
                &files_url(v, "/mode"),
                &json!({"path": "/to-file", "mode": "0600"}),
            )
            .await,
        StatusCode::CONFLICT,
        "NOT_A_FILE",
    );
    // Replacing or deleting a link leaves its target alone.
    assert_eq!(
        put(&server, v, "/to-file", "", "replaced").await.0,
        StatusCode::OK
    );
    assert_eq!(stat(&server, v, "/to-file").await.1["type"], "file");
    assert_eq!(content(&server, v, "/dir/file").await, b"target");
    assert_eq!(
        server.delete(&files_url(v, "?path=/abs")).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(content(&server, v, "/etc/passwd").await, b"inside");
    server.stop().await;
}

async fn mint(server: &TestServer, volume: &str, body: Value) -> (StatusCode, Value) {
    server.post(&files_url(volume, "/url"), &body).await
}

/// A signed URL works without a key for its method and path until it expires; nothing else.
#[tokio::test]
async fn signed_urls_are_scoped_and_expire() {
    let server = TestServer::start().await;
    let vol = volume_id(&server, "signed").await;
    let v = vol.as_str();
    assert_eq!(
        put(&server, v, "/dir/a", "&parents=true", "aaa").await.0,
        StatusCode::CREATED
    );
    assert_eq!(
        put(&server, v, "/dir/b", "", "bbb").await.0,
        StatusCode::CREATED
    );

    // Minted by volume name; the URL names the id.
    let (status, get_url) = mint(
        &server,
        "signed",
        json!({"path": "//dir/./a", "method": "get"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{get_url}");
    assert_eq!(get_url["method"], "GET");
    let url = get_url["url"].as_str().unwrap().to_string();
    assert!(
        url.starts_with(&format!(
            "{}/api/volumes/{v}/files/content?path=%2Fdir%2Fa&expires=",
            server.base
        )),
        "{url}"
    );
    assert!(get_url["expiresAt"].as_str().unwrap().ends_with('Z'));
    let anonymous = server.http.get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::OK);
    assert_eq!(anonymous.bytes().await.unwrap().as_ref(), b"aaa");
    // With a Range, and a key that is wrong: the signature is what counts.
    let ranged = server
        .http
        .get(&url)
        .header(RANGE, "bytes=1-")
        .bearer_auth("bogus")
        .send()
        .await
        .unwrap();
    assert_eq!(ranged.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(ranged.bytes().await.unwrap().as_ref(), b"aa");

    // Another path, another method, another volume, a changed expiry or signature: 403.
    let other_volume = volume_id(&server, "other").await;
    let tampered = [
        url.replace("%2Fdir%2Fa", "%2Fdir%2Fb"),
        url.replace(&vol, &other_volume),
        url.replace("&expires=", "&expires=9"),
        // The signature's last digit changed.
        format!(
            "{}{}",
            &url[..url.len() - 1],
            if url.ends_with('0') { '1' } else { '0' }
        ),
        url.split("&signature=").next().unwrap().to_string(),
    ];
    for bad in &tampered {
        let answer = server.send(server.http.get(bad)).await;
        assert_error(&answer, StatusCode::FORBIDDEN, "INVALID_SIGNATURE");
    }
    let answer = server.send(server.http.put(&url).body("overwritten")).await;
    assert_error(&answer, StatusCode::FORBIDDEN, "INVALID_SIGNATURE");
    assert!(
        answer.1["message"]
            .as_str()
            .unwrap()
            .contains("does not match"),
        "{}",
        answer.1
    );
    assert_eq!(content(&server, v, "/dir/a").await, b"aaa");
    // Only the content endpoint takes signatures.
    let listing = url.replace("/files/content?", "/files?");
    assert_eq!(
        server.send(server.http.get(&listing)).await.0,
        StatusCode::UNAUTHORIZED
    );

    // An upload URL: uploads, without a key, to that path only.
    let (status, put_url) = mint(
        &server,
        v,
        json!({"path": "/up/new", "method": "PUT", "expiresInSeconds": 60}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{put_url}");
    let put_url = put_url["url"].as_str().unwrap().to_string();
    let answer = server
        .send(
            server
                .http
                .put(format!("{put_url}&parents=true"))
                .body("uploaded"),
        )
        .await;
    assert_eq!(answer.0, StatusCode::CREATED, "{}", answer.1);
    assert_eq!(content(&server, v, "/up/new").await, b"uploaded");
    assert_error(
        &server.send(server.http.get(&put_url)).await,
        StatusCode::FORBIDDEN,
        "INVALID_SIGNATURE",
    );
    let elsewhere = put_url.replace("%2Fup%2Fnew", "%2Fup%2Fother");
    assert_error(
        &server.send(server.http.put(elsewhere).body("x")).await,
        StatusCode::FORBIDDEN,
        "INVALID_SIGNATURE",
    );

    // Expiry.
    let (_, short) = mint(
        &server,
        v,
        json!({"path": "/dir/b", "method": "GET", "expiresInSeconds": 1}),
    )
    .await;
    let short = short["url"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let answer = server.send(server.http.get(&short)).await;
    assert_error(&answer, StatusCode::FORBIDDEN, "INVALID_SIGNATURE");
    assert!(
        answer.1["message"].as_str().unwrap().contains("expired"),
        "{}",
        answer.1
    );

    // Minting errors.
    for (body, code) in [
        (
            json!({"path": "/dir/a", "method": "DELETE"}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"path": "/dir/a", "method": "GET", "expiresInSeconds": 0}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"path": "/dir/a", "method": "GET", "expiresInSeconds": 604801}),
            StatusCode::BAD_REQUEST,
        ),
        (json!({"path": "/dir/a"}), StatusCode::BAD_REQUEST),
    ] {
        assert_eq!(mint(&server, v, body.clone()).await.0, code, "{body}");
    }
    assert_eq!(
        mint(&server, "nope", json!({"path": "/a", "method": "GET"}))
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    let anonymous = server
        .send(
            server
                .http
                .post(server.url(&files_url(v, "/url")))
                .json(&json!({"path": "/a", "method": "GET"})),
        )
        .await;
    assert_eq!(anonymous.0, StatusCode::UNAUTHORIZED);

    // The URLs outlive a restart: the secret is in the control database.
    let (_, long) = mint(&server, v, json!({"path": "/dir/b", "method": "GET"})).await;
    let long = long["url"].as_str().unwrap().to_string();
    let mut server = server;
    let old_base = server.base.clone();
    server.restart(|_| {}).await;
    let long = long.replace(&old_base, &server.base);
    let answer = server.http.get(&long).send().await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(answer.bytes().await.unwrap().as_ref(), b"bbb");
    server.stop().await;
}

/// `n` bytes of a pattern that differs at every 8-byte word and between `seed`s.
fn pattern(seed: u64, offset: u64, n: usize) -> Vec<u8> {
    assert_eq!(offset % 8, 0);
    let mut out = Vec::with_capacity(n + 8);
    let mut word = offset / 8;
    while out.len() < n {
        let value = (word ^ (seed << 48)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        out.extend_from_slice(&value.to_le_bytes());
        word += 1;
    }
    out.truncate(n);
    out
}

/// A body of `size` bytes of `pattern(seed)`, produced `piece` bytes at a time, pausing `pause`
/// between pieces; with `fail_at`, the stream fails there (a client that goes away).
fn pattern_body(
    seed: u64,
    size: u64,
    piece: usize,
    pause: Duration,
    fail_at: Option<u64>,
) -> reqwest::Body {
    let stream = futures::stream::unfold(0u64, move |offset| async move {
        if fail_at.is_some_and(|at| offset >= at) {
            return Some((Err(std::io::Error::other("client gone")), u64::MAX));
        }
        if offset >= size {
            return None;
        }
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        let n = (size - offset).min(piece as u64) as usize;
        Some((
            Ok::<_, std::io::Error>(pattern(seed, offset, n)),
            offset + n as u64,
        ))
    });
    reqwest::Body::wrap_stream(stream)
}

/// While an upload replaces a file, readers see the old file whole, then the new one whole;
/// an upload that fails midway leaves the old file and no trace of itself.
#[tokio::test]
async fn uploads_replace_atomically_and_interrupted_ones_leave_nothing() {
    let server = TestServer::start().await;
    let vol = volume_id(&server, "atomic").await;
    let v = vol.to_string();
    const SIZE: u64 = 12 << 20;
    let old = pattern(1, 0, SIZE as usize);
    let new = pattern(2, 0, SIZE as usize);
    assert_eq!(
        put(&server, &v, "/f", "", old.clone()).await.0,
        StatusCode::CREATED
    );

    let upload = {
        let url = server.url(&files_url(&v, "/content?path=%2Ff"));
        let request = server
            .http
            .put(url)
            .bearer_auth(&server.key)
            .body(pattern_body(
                2,
                SIZE,
                256 << 10,
                Duration::from_millis(40),
                None,
            ));
        tokio::spawn(request.send())
    };
    let (mut saw_old, mut saw_new) = (0, 0);
    while !upload.is_finished() {
        let body = content(&server, &v, "/f").await;
        if body == old {
            saw_old += 1;
        } else {
            assert!(
                body == new,
                "a reader saw {} bytes that are neither file",
                body.len()
            );
            saw_new += 1;
        }
        let listed = list_all(&server, &v, "/", false, 100).await;
        assert_eq!(
            paths(&listed),
            ["/f"],
            "the upload is invisible until complete"
        );
    }
    let response = upload.await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        saw_old > 3,
        "readers ran during the upload ({saw_old} old, {saw_new} new)"
    );
    assert_eq!(content(&server, &v, "/f").await, new);

    // Interrupted: the body fails after 5 MiB.
    // Replacing a file and creating a new one: neither leaves a trace.
    for name in ["f", "never"] {
        let url = server.url(&files_url(&v, &format!("/content?path=%2F{name}")));
        let failed = server
            .http
            .put(url)
            .bearer_auth(&server.key)
            .body(pattern_body(
                3,
                SIZE,
                1 << 20,
                Duration::ZERO,
                Some(5 << 20),
            ))
            .send()
            .await;
        assert!(failed.is_err() || failed.unwrap().status().is_client_error());
    }
    assert_eq!(content(&server, &v, "/f").await, new);
    assert_eq!(paths(&list_all(&server, &v, "/", true, 100).await), ["/f"]);
    // Nothing of the interrupted uploads is held once the server noticed (at once, though the
    // client may see its request end first).
    wait_for_usage(&server, &v, SIZE, 1).await;
    server.stop().await;
}

/// Size of file `i` of the test tree: 0 to 96 KiB, a few of them empty and some inline-sized.
fn tree_file_size(i: usize) -> usize {
    (i * 7919) % (96 << 10)
}

fn tree_file_path(i: usize) -> String {
    format!("/tree/d{}/s{}/f{i:04}.bin", i % 10, i % 7)
}

/// A tree of 1,000 files up and down through the API on the real S3 server: what comes back
/// is what went in, and a paginated recursive listing finds every file with its size.
#[tokio::test]
async fn a_tree_of_1000_files_round_trips_on_s3() {
    use futures::StreamExt;
    const FILES: usize = 1000;
    let store_url = common::s3_store_url();
    let owner = TestServer::start_with(|config| config.store_url = store_url.clone()).await;
    let server = &owner;
    let vol = volume_id(server, "tree").await;
    let v = vol.as_str();
    let started = std::time::Instant::now();
    let uploads = futures::stream::iter(0..FILES)
        .map(|i| async move {
            let data = pattern(i as u64, 0, tree_file_size(i));
            let (status, entry) = put(server, v, &tree_file_path(i), "&parents=true", data).await;
            assert_eq!(status, StatusCode::CREATED, "{entry}");
            assert_eq!(entry["size"], tree_file_size(i));
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    assert_eq!(uploads.len(), FILES);
    eprintln!("uploaded {FILES} files in {:?}", started.elapsed());

    let listed = list_all(server, v, "/tree", true, 300).await;
    let mut files: Vec<(String, u64)> = listed
        .iter()
        .filter(|e| e["type"] == "file")
        .map(|e| {
            (
                e["path"].as_str().unwrap().to_string(),
                e["size"].as_u64().unwrap(),
            )
        })
        .collect();
    let directories = listed.iter().filter(|e| e["type"] == "directory").count();
    assert_eq!(directories, 10 + 70, "d0..d9, each with s0..s6");
    let mut expected: Vec<(String, u64)> = (0..FILES)
        .map(|i| (tree_file_path(i), tree_file_size(i) as u64))
        .collect();
    files.sort();
    expected.sort();
    assert_eq!(files, expected);
    let listed_paths = paths(&listed);
    let mut sorted = listed_paths.clone();
    sorted.sort_by(|a, b| a.split('/').cmp(b.split('/')));
    assert_eq!(listed_paths, sorted, "depth first, by name");

    let started = std::time::Instant::now();
    futures::stream::iter(0..FILES)
        .map(|i| async move {
            let body = content(server, v, &tree_file_path(i)).await;
            let want = pattern(i as u64, 0, tree_file_size(i));
            assert_eq!(
                Sha256::digest(&body),
                Sha256::digest(&want),
                "{}",
                tree_file_path(i)
            );
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    eprintln!("downloaded {FILES} files in {:?}", started.elapsed());
    let (status, _) = server.delete(&format!("/api/volumes/{v}")).await;
    assert_eq!(status, StatusCode::OK);
    server
        .wait_for(&format!("/api/volumes/{v}"), "state", "deleted")
        .await;
    owner.stop().await;
}

/// This process's peak resident memory (VmHWM), bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        << 10
}

/// A 2 GiB file up and down through the API on the real S3 server, streamed both ways: what
/// comes back equals, byte for byte, what went up, and the process (server and client) never
/// holds the file in memory.
#[tokio::test]
async fn a_2_gib_file_round_trips_on_s3_in_bounded_memory() {
    use futures::StreamExt;
    const SIZE: u64 = 2 << 30;
    const SEED: u64 = 9;
    let store_url = common::s3_store_url();
    let server = TestServer::start_with(|config| config.store_url = store_url.clone()).await;
    let vol = volume_id(&server, "big").await;
    let v = vol.as_str();

    let started = std::time::Instant::now();
    let (status, entry) = server
        .send(
            server
                .http
                .put(server.url(&files_url(v, "/content?path=%2Fbig.bin")))
                .bearer_auth(&server.key)
                .body(pattern_body(SEED, SIZE, 4 << 20, Duration::ZERO, None)),
        )
        .await;
    let upload = started.elapsed();
    assert_eq!(status, StatusCode::CREATED, "{entry}");
    assert_eq!(entry["size"], SIZE);

    let started = std::time::Instant::now();
    let response = server
        .http
        .get(server.url(&files_url(v, "/content?path=%2Fbig.bin")))
        .bearer_auth(&server.key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.content_length(), Some(SIZE));
    let mut offset = 0u64;
    // Pieces arrive in any size: compare each against the pattern at its offset, 8-aligned.
    let mut carry: Vec<u8> = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(piece) = stream.next().await {
        carry.extend_from_slice(&piece.unwrap());
        let whole = carry.len() - carry.len() % 8;
        assert!(
            carry[..whole] == pattern(SEED, offset, whole)[..],
            "the download differs from the upload within {whole} bytes at offset {offset}"
        );
        offset += whole as u64;
        carry.drain(..whole);
    }
    assert!(
        carry == pattern(SEED, offset, carry.len()),
        "the last bytes differ"
    );
    offset += carry.len() as u64;
    let download = started.elapsed();
    assert_eq!(offset, SIZE);
    let mib_per_s = |d: Duration| (SIZE >> 20) as f64 / d.as_secs_f64();
    let peak = peak_rss();
    eprintln!(
        "2 GiB: upload {upload:?} ({:.0} MiB/s), download {download:?} ({:.0} MiB/s), peak RSS of the test process {} MiB",
        mib_per_s(upload),
        mib_per_s(download),
        peak >> 20
    );
    // The vfs buffers at most 256 MiB of dirty data and caches 64 MiB; everything else streams.
    assert!(
        peak < 1 << 30,
        "peak RSS {} MiB: a transfer held the file",
        peak >> 20
    );
    let (status, _) = server.delete(&format!("/api/volumes/{v}")).await;
    assert_eq!(status, StatusCode::OK);
    server
        .wait_for(&format!("/api/volumes/{v}"), "state", "deleted")
        .await;
    server.stop().await;
}

/// The volume's `usage` as the API reports it.
async fn usage(server: &TestServer, volume: &str) -> (u64, u64) {
    let (status, dto) = server.get(&format!("/api/volumes/{volume}")).await;
    assert_eq!(status, StatusCode::OK, "{dto}");
    (
        dto["usage"]["bytes"].as_u64().unwrap(),
        dto["usage"]["files"].as_u64().unwrap(),
    )
}

/// Waits (10 s at most) for the usage to be `bytes` held by `files` inodes: what a failed
/// upload held goes when the server closes it, just after answering.
async fn wait_for_usage(server: &TestServer, volume: &str, bytes: u64, files: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = usage(server, volume).await;
        if now == (bytes, files) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "usage is {now:?}, not {:?}",
            (bytes, files)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Usage follows writes, overwrites, truncates and deletes exactly; past the quota an upload is
/// refused with 507 and what was stored before is intact; the quota is set at creation and
/// changed with PATCH.
async fn usage_is_exact_and_the_quota_holds(control: Control) {
    const MIB: u64 = 1 << 20;
    let server = TestServer::start_on(control).await;
    let (status, dto) = server
        .post(
            "/api/volumes",
            &json!({"name": "quota", "quotaBytes": 10 * MIB}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{dto}");
    assert_eq!(dto["quotaBytes"], 10 * MIB);
    assert_eq!(
        dto["usage"],
        json!({"bytes": 0, "files": 0, "exclusiveBytes": 0})
    );
    let v = dto["id"].as_str().unwrap().to_string();
    let v = v.as_str();
    let (_, plain) = server.post("/api/volumes", &json!({"name": "plain"})).await;
    assert!(plain["quotaBytes"].is_null(), "{plain}");
    let (_, listed) = server.get("/api/volumes").await;
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["usage"]["files"] == 0),
        "{listed}"
    );

    let a = pattern(1, 0, 3 * MIB as usize);
    assert_eq!(
        put(&server, v, "/a", "", a.clone()).await.0,
        StatusCode::CREATED
    );
    assert_eq!(usage(&server, v).await, (3 * MIB, 1));
    assert_eq!(
        put(
            &server,
            v,
            "/dir/b",
            "&parents=true",
            pattern(2, 0, MIB as usize)
        )
        .await
        .0,
        StatusCode::CREATED
    );
    assert_eq!(usage(&server, v).await, (4 * MIB, 3));
    let a = pattern(3, 0, 2 * MIB as usize);
    assert_eq!(put(&server, v, "/a", "", a.clone()).await.0, StatusCode::OK);
    wait_for_usage(&server, v, 3 * MIB, 3).await;
    assert_eq!(
        put(&server, v, "/small", "", "tiny").await.0,
        StatusCode::CREATED
    );
    assert_eq!(usage(&server, v).await, (3 * MIB + 4, 4));
    // Truncated in place, as a sandbox would.
    common::with_vfs(&server, v, |vfs| {
        let ctx = cellar_vfs::Ctx {
            uid: 1000,
            gid: 1000,
            pid: 1,
        };
        let dir = vfs.lookup(&ctx, cellar_vfs::ROOT_INO, b"dir").unwrap();
        let b = vfs.lookup(&ctx, dir.ino, b"b").unwrap();
        let request = cellar_vfs::SetAttrRequest {
            size: Some(1000),
            ..Default::default()
        };
        vfs.setattr(&ctx, b.ino, request).unwrap();
    });
    assert_eq!(usage(&server, v).await, (2 * MIB + 1000 + 4, 4));
    let rm = server
        .delete(&files_url(v, "?path=/dir&recursive=true"))
        .await;
    assert_eq!(rm.0, StatusCode::NO_CONTENT);
    assert_eq!(usage(&server, v).await, (2 * MIB + 4, 2));

    // Past the quota: 507, and the files stored before are whole.
    let refused = put(&server, v, "/big", "", pattern(4, 0, 9 * MIB as usize)).await;
    assert_error(&refused, StatusCode::INSUFFICIENT_STORAGE, "QUOTA_EXCEEDED");
    let refused = put(&server, v, "/a", "", pattern(4, 0, 9 * MIB as usize)).await;
    assert_error(&refused, StatusCode::INSUFFICIENT_STORAGE, "QUOTA_EXCEEDED");
    assert_eq!(content(&server, v, "/a").await, a);
    assert_eq!(content(&server, v, "/small").await, b"tiny");
    assert_error(
        &stat(&server, v, "/big").await,
        StatusCode::NOT_FOUND,
        "FILE_NOT_FOUND",
    );
    wait_for_usage(&server, v, 2 * MIB + 4, 2).await;

    // PATCH: raise it (by name), remove it; bad bodies are 400.
    let patch = async |volume: &str, body: Value| {
        server
            .send(
                server
                    .http
                    .patch(server.url(&format!("/api/volumes/{volume}")))
                    .bearer_auth(&server.key)
                    .json(&body),
            )
            .await
    };
    let (status, dto) = patch("quota", json!({"quotaBytes": 20 * MIB})).await;
    assert_eq!(status, StatusCode::OK, "{dto}");
    assert_eq!(dto["quotaBytes"], 20 * MIB);
    assert_eq!(
        (&dto["usage"]["bytes"], &dto["usage"]["files"]),
        (&json!(2 * MIB + 4), &json!(2))
    );
    // The 2 MiB file's stored objects (at least its 2 MiB; overwritten ranges still have
    // objects until compaction) are this volume's alone.
    assert!(
        dto["usage"]["exclusiveBytes"].as_u64().unwrap() >= 2 * MIB,
        "{dto}"
    );
    // Mounts (the server's own instance too) pick a new quota up within about a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        put(&server, v, "/big", "", pattern(4, 0, 9 * MIB as usize))
            .await
            .0,
        StatusCode::CREATED
    );
    let (status, dto) = patch(v, json!({"quotaBytes": null})).await;
    assert_eq!(status, StatusCode::OK, "{dto}");
    assert!(dto["quotaBytes"].is_null(), "{dto}");
    let (_, dto) = server.get(&format!("/api/volumes/{v}")).await;
    assert!(dto["quotaBytes"].is_null(), "{dto}");
    for bad in [
        json!({}),
        json!({"quotaBytes": -1}),
        json!({"quotaBytes": "lots"}),
        json!({"quotaBytes": 1.5}),
    ] {
        assert_eq!(
            patch(v, bad.clone()).await.0,
            StatusCode::BAD_REQUEST,
            "{bad}"
        );
    }
    assert_eq!(
        patch("nope", json!({"quotaBytes": 1})).await.0,
        StatusCode::NOT_FOUND
    );
    let (status, _) = server
        .post("/api/volumes", &json!({"name": "neg", "quotaBytes": -5}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = server
        .post(
            "/api/volumes",
            &json!({"name": "huge", "quotaBytes": u64::MAX}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    server.stop().await;
}

on_both_databases!(usage_is_exact_and_the_quota_holds);

/// The API and running sandboxes share the volume: an upload is visible in the sandbox at once
/// (the change feed drops what the sandbox's kernel cached), and a file a sandbox closes can be
/// downloaded at once. Files the API creates belong to the sandbox user.
#[tokio::test]
async fn sandboxes_and_the_api_see_each_others_files_at_once() {
    common::require_runner_prerequisites();
    let server = TestServer::start().await;
    let vol = volume_id(&server, "shared").await;
    let v = vol.as_str();
    assert_eq!(
        put(&server, v, "/before", "", "one").await.0,
        StatusCode::CREATED
    );
    let (status, sandbox) = server
        .post(
            "/api/sandbox",
            &json!({"volumes": [{"volumeId": v, "mountPath": "/home/daytona/vol"}]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{sandbox}");
    let run = async |command: &str| {
        let (code, out) = common::exec(&server, &sandbox, command).await;
        assert_eq!(code, 0, "{command}: {out}");
        out
    };
    // Cached by the sandbox's kernel first, then changed through the API.
    assert_eq!(
        run("pwd; ls vol; stat -c %s vol/before; cat vol/before").await,
        "/home/daytona\nbefore\n3\none"
    );
    assert_eq!(
        put(&server, v, "/during", "", "two").await.0,
        StatusCode::CREATED
    );
    assert_eq!(run("cat vol/during").await, "two");
    assert_eq!(
        put(&server, v, "/before", "", "three!").await.0,
        StatusCode::OK
    );
    assert_eq!(run("cat vol/before").await, "three!");
    let moved = server
        .post(
            &files_url(v, "/move"),
            &json!({"from": "/during", "to": "/moved"}),
        )
        .await;
    assert_eq!(moved.0, StatusCode::OK, "{}", moved.1);
    assert_eq!(run("ls vol").await, "before\nmoved\n");
    let made = server
        .post(&files_url(v, "/mkdir"), &json!({"path": "/made"}))
        .await;
    assert_eq!(made.0, StatusCode::CREATED);
    // Owned by the sandbox user: writable there.
    assert_eq!(
        run("stat -c '%u:%g' vol/before vol/made; printf more >> vol/before; echo hi > vol/made/f; id -u").await,
        "1000:1000\n1000:1000\n1000\n"
    );
    assert_eq!(content(&server, v, "/before").await, b"three!more");
    assert_eq!(content(&server, v, "/made/f").await, b"hi\n");
    // Written in the sandbox: downloadable as soon as it is closed.
    run("head -c 3000000 /dev/urandom > vol/random; sha256sum vol/random > vol/random.sum").await;
    let random = content(&server, v, "/random").await;
    let sum = String::from_utf8(content(&server, v, "/random.sum").await).unwrap();
    assert_eq!(random.len(), 3_000_000);
    assert!(
        sum.starts_with(&hex::encode(Sha256::digest(&random))),
        "{sum}"
    );
    assert_eq!(
        server.delete(&files_url(v, "?path=/moved")).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(run("ls vol").await, "before\nmade\nrandom\nrandom.sum\n");

    let id = sandbox["id"].as_str().unwrap();
    assert_eq!(
        server.delete(&format!("/api/sandbox/{id}")).await.0,
        StatusCode::OK
    );
    server
        .wait_for(&format!("/api/sandbox/{id}"), "state", "destroyed")
        .await;
    server.stop().await;
}

/// The served OpenAPI document describes every file endpoint and the volume changes.
#[tokio::test]
async fn the_openapi_document_lists_the_file_endpoints() {
    let server = TestServer::start().await;
    let (status, doc) = server.get("/api/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    for (path, methods) in [
        ("/api/volumes/{volumeId}", &["get", "patch", "delete"][..]),
        ("/api/volumes/{volumeId}/files", &["get", "delete"]),
        ("/api/volumes/{volumeId}/files/stat", &["get"]),
        ("/api/volumes/{volumeId}/files/content", &["get", "put"]),
        ("/api/volumes/{volumeId}/files/mkdir", &["post"]),
        ("/api/volumes/{volumeId}/files/move", &["post"]),
        ("/api/volumes/{volumeId}/files/mode", &["post"]),
        ("/api/volumes/{volumeId}/files/url", &["post"]),
    ] {
        for method in methods {
            assert!(doc["paths"][path][method].is_object(), "{method} {path}");
        }
    }
    let volume = &doc["components"]["schemas"]["VolumeDto"]["properties"];
    assert!(
        volume["usage"].is_object() && volume["quotaBytes"].is_object(),
        "{volume}"
    );
    server.stop().await;
}
