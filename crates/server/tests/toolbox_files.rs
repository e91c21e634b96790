//! The toolbox's file calls (info, list, delete, move, permissions, find, search, replace) from
//! the server's side: bad input, missing and forbidden paths answer 4xx with the error body and
//! never a 5xx, paths never reach a shell; and the calls, with a large streamed transfer, through
//! a remote runner (`cellar runner`). The official clients' view is tests/compat (cases j and k).
//! Needs root, bwrap and the cellar binary (CELLAR_BIN or target/debug/cellar).

mod common;

use common::runner::{wait_for_runners, RunnerProcess};
use common::TestServer;
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The toolbox of one sandbox.
struct Toolbox<'a> {
    server: &'a TestServer,
    base: String,
}

impl Toolbox<'_> {
    async fn create(server: &TestServer) -> Toolbox<'_> {
        let (status, sandbox) = server.post("/api/sandbox", &json!({})).await;
        assert_eq!(status, StatusCode::OK, "{sandbox}");
        assert_eq!(sandbox["state"], "started", "{sandbox}");
        Toolbox {
            server,
            base: format!("/toolbox/{}", sandbox["id"].as_str().unwrap()),
        }
    }

    fn request(
        &self,
        method: Method,
        endpoint: &str,
        query: &[(&str, &str)],
    ) -> reqwest::RequestBuilder {
        let url = self.server.url(&format!("{}/{endpoint}", self.base));
        let url = reqwest::Url::parse_with_params(&url, query).unwrap();
        self.server
            .http
            .request(method, url)
            .bearer_auth(&self.server.key)
    }

    async fn call(
        &self,
        method: Method,
        endpoint: &str,
        query: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        self.server
            .send(self.request(method, endpoint, query))
            .await
    }

    async fn replace(&self, body: Value) -> (StatusCode, Value) {
        self.server
            .send(self.request(Method::POST, "files/replace", &[]).json(&body))
            .await
    }

    /// Deletes the sandbox and waits until it is gone: a sandbox outlives the server and the
    /// runner that started it, so one left behind would run on after the test.
    async fn destroy(self) {
        let id = self.base.trim_start_matches("/toolbox/");
        let (status, body) = self.server.delete(&format!("/api/sandbox/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        self.server
            .wait_for(&format!("/api/sandbox/{id}"), "state", "destroyed")
            .await;
    }

    /// Runs a shell line that must succeed; returns its output.
    async fn ok(&self, command: &str) -> String {
        let (status, body) = self
            .server
            .post(
                &format!("{}/process/execute", self.base),
                &json!({ "command": command }),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{command}: {body}");
        assert_eq!(body["exitCode"], 0, "{command}: {body}");
        body["result"].as_str().unwrap().to_string()
    }
}

/// What is tried, the call (method, endpoint, query) and the status it must answer.
type Case<'a> = (
    &'a str,
    Method,
    &'a str,
    &'a [(&'a str, &'a str)],
    StatusCode,
);

/// An error answer in the API's shape, with the expected status. A missing or forbidden file
/// carries the toolbox daemon's code, which the clients turn into their precise error classes.
fn assert_error(what: &str, (status, body): (StatusCode, Value), expected: StatusCode) {
    assert_eq!(status, expected, "{what}: {body}");
    assert_eq!(body["statusCode"], expected.as_u16(), "{what}: {body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "{what}: {body}");
    let daemon_code = match expected {
        StatusCode::NOT_FOUND => Some("FILE_NOT_FOUND"),
        StatusCode::FORBIDDEN => Some("FILE_ACCESS_DENIED"),
        _ => None,
    };
    match daemon_code {
        Some(code) => assert_eq!(
            (&body["code"], &body["source"]),
            (&json!(code), &json!("DAYTONA_DAEMON")),
            "{what}: {body}"
        ),
        None => assert!(body["code"].is_string(), "{what}: {body}"),
    }
}

#[tokio::test]
async fn bad_input_missing_and_forbidden_paths_answer_4xx() {
    let server = TestServer::start().await;
    let tb = Toolbox::create(&server).await;
    tb.ok("mkdir -p d/sub e && printf 'x\\n' > d/f && mkdir locked && touch locked/x && chmod 000 locked && ln -s nowhere dangling")
        .await;
    use Method as M;
    let (bad, missing, forbidden, conflict) = (
        StatusCode::BAD_REQUEST,
        StatusCode::NOT_FOUND,
        StatusCode::FORBIDDEN,
        StatusCode::CONFLICT,
    );
    let cases: &[Case] = &[
        (
            "info: empty path",
            M::GET,
            "files/info",
            &[("path", "")],
            bad,
        ),
        ("info: NUL", M::GET, "files/info", &[("path", "a\0b")], bad),
        ("info: no path", M::GET, "files/info", &[], bad),
        (
            "info: missing",
            M::GET,
            "files/info",
            &[("path", "absent")],
            missing,
        ),
        (
            "info: shell text",
            M::GET,
            "files/info",
            &[("path", "$(touch pwned)")],
            missing,
        ),
        (
            "info: dangling symlink",
            M::GET,
            "files/info",
            &[("path", "dangling")],
            missing,
        ),
        (
            "info: in a locked dir",
            M::GET,
            "files/info",
            &[("path", "locked/x")],
            forbidden,
        ),
        ("list: a file", M::GET, "files", &[("path", "d/f")], bad),
        (
            "list: depth 0",
            M::GET,
            "files",
            &[("path", "d"), ("depth", "0")],
            bad,
        ),
        (
            "list: depth -1",
            M::GET,
            "files",
            &[("path", "d"), ("depth", "-1")],
            bad,
        ),
        (
            "list: locked",
            M::GET,
            "files",
            &[("path", "locked")],
            forbidden,
        ),
        (
            "list: missing",
            M::GET,
            "files",
            &[("path", "absent")],
            missing,
        ),
        (
            "delete: a directory",
            M::DELETE,
            "files",
            &[("path", "d")],
            bad,
        ),
        (
            "delete: recursive=maybe",
            M::DELETE,
            "files",
            &[("path", "d"), ("recursive", "maybe")],
            bad,
        ),
        (
            "delete: missing",
            M::DELETE,
            "files",
            &[("path", "absent")],
            missing,
        ),
        (
            "delete: read-only",
            M::DELETE,
            "files",
            &[("path", "/etc/hostname")],
            forbidden,
        ),
        (
            "delete: in a locked dir",
            M::DELETE,
            "files",
            &[("path", "locked/x")],
            forbidden,
        ),
        (
            "move: missing",
            M::POST,
            "files/move",
            &[("source", "absent"), ("destination", "x")],
            missing,
        ),
        (
            "move: no parent",
            M::POST,
            "files/move",
            &[("source", "d/f"), ("destination", "no/x")],
            missing,
        ),
        (
            "move: exists",
            M::POST,
            "files/move",
            &[("source", "d/f"), ("destination", "e")],
            conflict,
        ),
        (
            "move: into itself",
            M::POST,
            "files/move",
            &[("source", "e"), ("destination", "e/x")],
            bad,
        ),
        (
            "move: no source",
            M::POST,
            "files/move",
            &[("destination", "x")],
            bad,
        ),
        (
            "move: read-only",
            M::POST,
            "files/move",
            &[("source", "/etc/hostname"), ("destination", "/etc/h2")],
            forbidden,
        ),
        (
            "mode: 9",
            M::POST,
            "files/permissions",
            &[("path", "d/f"), ("mode", "9")],
            bad,
        ),
        (
            "mode: 12345",
            M::POST,
            "files/permissions",
            &[("path", "d/f"), ("mode", "12345")],
            bad,
        ),
        (
            "owner: an option",
            M::POST,
            "files/permissions",
            &[("path", "d/f"), ("owner", "-R")],
            bad,
        ),
        (
            "owner: unknown",
            M::POST,
            "files/permissions",
            &[("path", "d/f"), ("owner", "nosuchuser")],
            bad,
        ),
        (
            "owner: root",
            M::POST,
            "files/permissions",
            &[("path", "d/f"), ("owner", "root")],
            forbidden,
        ),
        (
            "group: a space",
            M::POST,
            "files/permissions",
            &[("path", "d/f"), ("group", "a b")],
            bad,
        ),
        (
            "mode: missing",
            M::POST,
            "files/permissions",
            &[("path", "absent"), ("mode", "644")],
            missing,
        ),
        (
            "mode: read-only",
            M::POST,
            "files/permissions",
            &[("path", "/etc/hostname"), ("mode", "777")],
            forbidden,
        ),
        (
            "find: empty pattern",
            M::GET,
            "files/find",
            &[("path", "d"), ("pattern", "")],
            bad,
        ),
        (
            "find: two lines",
            M::GET,
            "files/find",
            &[("path", "d"), ("pattern", "a\nb")],
            bad,
        ),
        (
            "find: missing",
            M::GET,
            "files/find",
            &[("path", "absent"), ("pattern", "x")],
            missing,
        ),
        (
            "search: bad glob",
            M::GET,
            "files/search",
            &[("path", "d"), ("pattern", "[")],
            bad,
        ),
        (
            "search: a file",
            M::GET,
            "files/search",
            &[("path", "d/f"), ("pattern", "*")],
            bad,
        ),
        (
            "search: missing",
            M::GET,
            "files/search",
            &[("path", "absent"), ("pattern", "*")],
            missing,
        ),
        (
            "search: locked",
            M::GET,
            "files/search",
            &[("path", "locked"), ("pattern", "*")],
            forbidden,
        ),
    ];
    for (what, method, endpoint, query, expected) in cases {
        let answer = tb.call(method.clone(), endpoint, query).await;
        assert_error(what, answer, *expected);
    }
    // Replace: bad requests as a whole, files that cannot be changed one by one.
    for body in [
        json!({"files": ["d/f"], "pattern": "", "newValue": "y"}),
        json!({"files": ["a\u{0}b"], "pattern": "x", "newValue": "y"}),
        json!({"files": ["d/f"], "pattern": "x"}),
        json!({"files": "d/f", "pattern": "x", "newValue": "y"}),
    ] {
        assert_error(&format!("replace {body}"), tb.replace(body).await, bad);
    }
    let files = [
        "absent",
        "d",
        "/etc/hostname",
        "locked/x",
        "/dev/zero",
        "d/f",
    ];
    let (status, results) = tb
        .replace(json!({"files": files, "pattern": "x", "newValue": "$(touch pwned)"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{results}");
    let outcome: Vec<(&str, bool)> = results
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["file"].as_str().unwrap(), r["success"].as_bool().unwrap()))
        .collect();
    assert_eq!(
        outcome,
        files.iter().map(|f| (*f, *f == "d/f")).collect::<Vec<_>>(),
        "{results}"
    );
    assert!(results[0]["error"]
        .as_str()
        .unwrap()
        .contains("no such file"));
    assert_eq!(tb.ok("cat d/f").await, "$(touch pwned)\n");
    // An unknown sandbox.
    let other = Toolbox {
        server: &server,
        base: "/toolbox/no-such-sandbox".to_string(),
    };
    let (status, body) = other
        .call(Method::GET, "files/info", &[("path", "d")])
        .await;
    assert_eq!(
        (status, &body["code"]),
        (missing, &json!("NOT_FOUND")),
        "not a file's code: {body}"
    );
    // No path or pattern ever reached a shell.
    assert_eq!(
        tb.ok("find /home/daytona /tmp -name pwned 2>/dev/null; true")
            .await,
        ""
    );
    tb.destroy().await;
}

/// A stream of `len` bytes (`len` a multiple of 1 MiB) made on the fly, and its SHA-256.
async fn generated(len: usize) -> (reqwest::Body, String) {
    let base: Vec<u8> = (0..1usize << 20).map(|j| (j * 31 % 251) as u8).collect();
    // Every chunk differs: a misplaced chunk changes the checksum.
    let chunk = move |i: usize| {
        let mut chunk = base.clone();
        chunk[..8].copy_from_slice(&(i as u64).to_le_bytes());
        bytes::Bytes::from(chunk)
    };
    let hashing = chunk.clone();
    let expected = tokio::task::spawn_blocking(move || {
        let mut hash = Sha256::new();
        for i in 0..len >> 20 {
            hash.update(hashing(i));
        }
        hex::encode(hash.finalize())
    })
    .await
    .unwrap();
    let stream =
        futures::stream::iter(0..len >> 20).map(move |i| Ok::<_, std::io::Error>(chunk(i)));
    (reqwest::Body::wrap_stream(stream), expected)
}

/// The peak resident memory of this process (the server runs in it), in MiB.
fn peak_rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        >> 10
}

// Several threads: hashing in the test must not stall the in-process server's heartbeats.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn file_calls_and_a_large_transfer_through_a_remote_runner() {
    let server = TestServer::start_with(|config| config.embedded_runner = false).await;
    let (_, token) = server
        .admin(|c| cellar_server::admin_create_runner_token(c, "toolbox files"))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _runner = RunnerProcess::start(&server, "remote", &token, dir.path());
    wait_for_runners(&server, &["remote"], "live").await;
    let tb = Toolbox::create(&server).await;
    tb.ok("mkdir -p t/src && printf 'one\\ntwo one\\n' > t/a.txt && printf 'one\\n' > t/src/b.rs && ln -s t tlink")
        .await;

    let (status, info) = tb
        .call(Method::GET, "files/info", &[("path", "t/a.txt")])
        .await;
    assert_eq!(status, StatusCode::OK, "{info}");
    assert_eq!(
        (&info["name"], &info["size"], &info["isDir"]),
        (&json!("a.txt"), &json!(12), &json!(false))
    );
    let (status, matches) = tb
        .call(
            Method::GET,
            "files/find",
            &[("path", "t"), ("pattern", "one")],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{matches}");
    let mut found: Vec<String> = matches
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            format!(
                "{}:{}:{}",
                m["file"].as_str().unwrap(),
                m["line"],
                m["content"].as_str().unwrap()
            )
        })
        .collect();
    found.sort();
    assert_eq!(
        found,
        ["t/a.txt:1:one", "t/a.txt:2:two one", "t/src/b.rs:1:one"]
    );
    let (status, search) = tb
        .call(
            Method::GET,
            "files/search",
            &[("path", "t"), ("pattern", "**/*.rs")],
        )
        .await;
    assert_eq!(
        (status, &search["files"]),
        (StatusCode::OK, &json!(["t/src/b.rs"]))
    );
    // A symlink named as the directory is followed.
    let (status, listed) = tb
        .call(Method::GET, "files", &[("path", "tlink"), ("depth", "2")])
        .await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    let paths: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["tlink/a.txt", "tlink/src", "tlink/src/b.rs"]);
    let (status, search) = tb
        .call(
            Method::GET,
            "files/search",
            &[("path", "tlink"), ("pattern", "*.rs")],
        )
        .await;
    assert_eq!(
        (status, &search["files"]),
        (StatusCode::OK, &json!(["tlink/src/b.rs"]))
    );
    let (status, results) = tb
        .replace(json!({"files": ["t/a.txt"], "pattern": "one", "newValue": "1"}))
        .await;
    assert_eq!(
        (status, &results[0]["success"]),
        (StatusCode::OK, &json!(true)),
        "{results}"
    );
    assert_eq!(tb.ok("cat t/a.txt").await, "1\ntwo 1\n");
    let (status, _) = tb
        .call(
            Method::POST,
            "files/permissions",
            &[("path", "t/a.txt"), ("mode", "604")],
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(tb.ok("stat -c %a t/a.txt").await, "604\n");
    let (status, _) = tb
        .call(
            Method::POST,
            "files/move",
            &[("source", "t/a.txt"), ("destination", "t/src/a.txt")],
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        tb.ok("ls t t/src").await,
        "t:\nsrc\n\nt/src:\na.txt\nb.rs\n"
    );
    let (status, _) = tb
        .call(
            Method::DELETE,
            "files",
            &[("path", "t"), ("recursive", "true")],
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(tb.ok("test ! -e t && echo gone").await, "gone\n");

    // 256 MiB in and out, streamed on both sides: the server (in this process) holds none of it.
    let len = 256usize << 20;
    let (body, expected) = generated(len).await;
    let before = peak_rss_mib();
    let form = reqwest::multipart::Form::new()
        .text("files[0].path", "big.bin")
        .part(
            "files[0].file",
            reqwest::multipart::Part::stream(body).file_name("big.bin"),
        );
    let response = tb
        .request(Method::POST, "files/bulk-upload", &[])
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
        tb.ok("sha256sum big.bin").await,
        format!("{expected}  big.bin\n")
    );
    let response = tb
        .request(Method::POST, "files/bulk-download", &[])
        .json(&json!({"paths": ["big.bin"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let boundary = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .split("boundary=")
        .nth(1)
        .unwrap()
        .to_string();
    // The file is the part's body: after its headers, before the closing boundary.
    let trailer = format!("\r\n--{boundary}--\r\n").len();
    let (mut header, mut held, mut hash, mut body_len) = (Vec::new(), Vec::new(), Sha256::new(), 0);
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        let data: &[u8] = if header.ends_with(b"\r\n\r\n") {
            &chunk
        } else {
            header.extend_from_slice(&chunk);
            let Some(end) = header.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let rest = header.split_off(end + 4);
            held.extend_from_slice(&rest);
            &[]
        };
        held.extend_from_slice(data);
        if held.len() > trailer {
            let ready = held.len() - trailer;
            hash.update(&held[..ready]);
            body_len += ready;
            held.drain(..ready);
        }
    }
    assert_eq!(
        held.len(),
        trailer,
        "the response ends with the closing boundary"
    );
    assert_eq!(body_len, len);
    assert_eq!(
        hex::encode(hash.finalize()),
        expected,
        "the file came back whole"
    );
    let grown = peak_rss_mib().saturating_sub(before);
    println!(
        "peak RSS of the test process grew {grown} MiB over a {} MiB round trip",
        len >> 20
    );
    assert!(
        grown < 128,
        "peak RSS grew {grown} MiB during a {} MiB transfer",
        len >> 20
    );
    tb.destroy().await;
}
