//! Change events (`GET /api/volumes/{volumeId}/events`, server-sent events) against a real
//! server, on SQLite and PostgreSQL: every kind, from the file API and from another client of the
//! volume (as a mount in another process or on another host), the path filter, resuming from an
//! id (header and query), `lost` past the trimmed log, bad input, many subscribers on one
//! follower, and a client too slow to read that still gets every event.

mod common;

use std::time::{Duration, Instant};

use common::{Control, TestServer};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// How long a test waits for one event (a loaded machine is slow, never that slow).
const EVENT_WAIT: Duration = Duration::from_secs(30);

fn enc(path: &str) -> String {
    url::form_urlencoded::byte_serialize(path.as_bytes()).collect()
}

#[derive(Clone, Debug)]
struct Ev {
    id: u64,
    event: String,
    data: Value,
}

impl Ev {
    fn path(&self) -> &str {
        self.data["path"].as_str().unwrap_or_default()
    }
    fn old_path(&self) -> Option<&str> {
        self.data["oldPath"].as_str()
    }
}

/// A server-sent event stream, parsed as it arrives.
struct Stream {
    response: reqwest::Response,
    buf: Vec<u8>,
}

impl Stream {
    /// The status and, on 200, the stream (else the error body).
    async fn open(
        server: &TestServer,
        volume: &str,
        query: &str,
        last_event_id: Option<&str>,
    ) -> Result<Stream, (StatusCode, Value)> {
        let url = server.url(&format!("/api/volumes/{volume}/events{query}"));
        let mut request = server.http.get(url).bearer_auth(&server.key);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.unwrap();
        if response.status() != StatusCode::OK {
            let status = response.status();
            return Err((status, response.json().await.unwrap_or(Value::Null)));
        }
        assert_eq!(
            response.headers()["content-type"],
            "text/event-stream",
            "{:?}",
            response.headers()
        );
        Ok(Stream {
            response,
            buf: Vec::new(),
        })
    }

    async fn subscribe(server: &TestServer, volume: &str, query: &str) -> Stream {
        match Stream::open(server, volume, query, None).await {
            Ok(stream) => stream,
            Err((status, body)) => panic!("subscribing {query}: {status} {body}"),
        }
    }

    /// The next event (keep-alive comments skipped); panics after `EVENT_WAIT`.
    async fn next(&mut self) -> Ev {
        let deadline = Instant::now() + EVENT_WAIT;
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                let text = String::from_utf8(block).unwrap();
                let (mut id, mut event, mut data) = (None, String::new(), String::new());
                for line in text.lines() {
                    if let Some(value) = line.strip_prefix("id:") {
                        id = Some(value.trim().parse::<u64>().unwrap());
                    } else if let Some(value) = line.strip_prefix("event:") {
                        event = value.trim().to_string();
                    } else if let Some(value) = line.strip_prefix("data:") {
                        data.push_str(value.trim_start());
                    }
                }
                if event.is_empty() && data.is_empty() {
                    continue; // a comment (keep-alive)
                }
                return Ev {
                    id: id.expect("every event has an id"),
                    event,
                    data: serde_json::from_str(&data).unwrap(),
                };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let chunk = tokio::time::timeout(left, self.response.chunk())
                .await
                .expect("no event in time")
                .unwrap()
                .expect("the stream ended");
            self.buf.extend_from_slice(&chunk);
        }
    }

    /// Events until (and with) the first that `last` accepts.
    async fn until(&mut self, last: impl Fn(&Ev) -> bool) -> Vec<Ev> {
        let mut events = Vec::new();
        loop {
            let event = self.next().await;
            let done = last(&event);
            events.push(event);
            if done {
                return events;
            }
        }
    }
}

/// `(event, path, oldPath)` of each event.
fn summary(events: &[Ev]) -> Vec<(String, String, Option<String>)> {
    events
        .iter()
        .map(|e| {
            (
                e.event.clone(),
                e.path().to_string(),
                e.old_path().map(str::to_string),
            )
        })
        .collect()
}

/// Whether `want` occurs in `events` in this order (other events may come between).
fn in_order(events: &[Ev], want: &[(&str, &str)]) -> bool {
    let mut want = want.iter().peekable();
    for event in events {
        if want
            .peek()
            .is_some_and(|(kind, path)| event.event == *kind && event.path() == *path)
        {
            want.next();
        }
    }
    want.peek().is_none()
}

async fn volume_id(server: &TestServer, name: &str) -> String {
    server.create_volume(name).await["id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn upload(server: &TestServer, volume: &str, path: &str, body: &'static [u8]) {
    let url = server.url(&format!(
        "/api/volumes/{volume}/files/content?path={}&parents=true",
        enc(path)
    ));
    let (status, reply) = server
        .send(server.http.put(url).bearer_auth(&server.key).body(body))
        .await;
    assert!(status.is_success(), "upload {path}: {status} {reply}");
}

async fn mkdir(server: &TestServer, volume: &str, path: &str) {
    let (status, reply) = server
        .post(
            &format!("/api/volumes/{volume}/files/mkdir"),
            &json!({ "path": path, "parents": true }),
        )
        .await;
    assert!(status.is_success(), "mkdir {path}: {status} {reply}");
}

async fn move_file(server: &TestServer, volume: &str, from: &str, to: &str) {
    let (status, reply) = server
        .post(
            &format!("/api/volumes/{volume}/files/move"),
            &json!({ "from": from, "to": to }),
        )
        .await;
    assert!(status.is_success(), "move {from}: {status} {reply}");
}

async fn remove(server: &TestServer, volume: &str, path: &str) {
    let (status, reply) = server
        .delete(&format!(
            "/api/volumes/{volume}/files?path={}&recursive=true",
            enc(path)
        ))
        .await;
    assert!(status.is_success(), "delete {path}: {status} {reply}");
}

/// Runs `work` as another client of the volume (the vfs with an engine of its own, as a mount
/// in another process or on another host has), off the test's runtime.
async fn as_mount(
    server: &TestServer,
    volume: &str,
    work: impl FnOnce(&cellar_vfs::Vfs) + Send + 'static,
) {
    let config = common::volume_config(server, volume);
    tokio::task::spawn_blocking(move || {
        let vfs = cellar_vfs::Vfs::open_volume(config).unwrap();
        work(&vfs);
        vfs.shutdown().unwrap();
    })
    .await
    .unwrap();
}

const CTX: cellar_vfs::Ctx = cellar_vfs::Ctx {
    uid: 0,
    gid: 0,
    pid: 1,
};

/// Creates `name` in `parent` with `data`, closing it as an application does.
fn write_file(vfs: &cellar_vfs::Vfs, parent: cellar_vfs::Ino, name: &str, data: &[u8]) {
    let (attr, open) = vfs
        .create(
            &CTX,
            parent,
            name.as_bytes(),
            0o100644,
            0o022,
            libc::O_WRONLY,
        )
        .unwrap();
    vfs.write(attr.ino, open.fh, 0, data).unwrap();
    vfs.flush(attr.ino, open.fh, 0).unwrap();
    vfs.release(attr.ino, open.fh, None).unwrap();
}

async fn every_kind_from_every_writer(control: Control) {
    let server = TestServer::start_on(control).await;
    let vol = volume_id(&server, "events").await;
    let v = vol.as_str();
    let mut all = Stream::subscribe(&server, v, "").await;

    mkdir(&server, v, "/out").await;
    upload(&server, v, "/out/a.txt", b"hello").await;
    upload(&server, v, "/out/a.txt", b"replaced").await;
    move_file(&server, v, "/out/a.txt", "/out/b.txt").await;
    remove(&server, v, "/out/b.txt").await;
    as_mount(&server, v, |vfs| {
        write_file(vfs, cellar_vfs::ROOT_INO, "m.txt", b"from a mount");
        let dir = vfs
            .mkdir(&CTX, cellar_vfs::ROOT_INO, b"mdir", 0o755, 0o022)
            .unwrap();
        vfs.rename(
            &CTX,
            cellar_vfs::ROOT_INO,
            b"m.txt",
            dir.ino,
            b"n.txt",
            cellar_vfs::RenameMode::Replace,
        )
        .unwrap();
        vfs.unlink(&CTX, dir.ino, b"n.txt").unwrap();
        write_file(vfs, dir.ino, "kept.txt", b"still here");
    })
    .await;
    let events = all
        .until(|e| e.event == "modified" && e.path() == "/mdir/kept.txt")
        .await;
    let want = [
        ("created", "/out"),
        // An upload appears complete, in one step (its reserved names never show).
        ("created", "/out/a.txt"),
        // Replaced: a new file under the name.
        ("created", "/out/a.txt"),
        ("renamed", "/out/b.txt"),
        ("removed", "/out/b.txt"),
        ("created", "/m.txt"),
        ("modified", "/m.txt"),
        ("created", "/mdir"),
        ("renamed", "/mdir/n.txt"),
        ("removed", "/mdir/n.txt"),
        ("created", "/mdir/kept.txt"),
        ("modified", "/mdir/kept.txt"),
    ];
    assert!(
        in_order(&events, &want),
        "{control:?}: {:#?}",
        summary(&events)
    );
    assert!(events.windows(2).all(|w| w[0].id < w[1].id), "ids ascend");
    assert!(
        !events.iter().any(|e| e.path().contains(".cellar-upload-")
            || e.old_path().is_some_and(|p| p.contains(".cellar-upload-"))),
        "reserved names never show: {:#?}",
        summary(&events)
    );
    let find = |kind: &str, path: &str| {
        events
            .iter()
            .find(|e| e.event == kind && e.path() == path)
            .unwrap()
            .clone()
    };
    assert_eq!(find("created", "/out").data["isDir"], true);
    assert_eq!(find("renamed", "/out/b.txt").old_path(), Some("/out/a.txt"));
    assert_eq!(find("renamed", "/mdir/n.txt").old_path(), Some("/m.txt"));
    // Attributes are those when the server read the change: of a file still there.
    let modified = find("modified", "/mdir/kept.txt");
    assert_eq!(modified.data["isDir"], false);
    assert_eq!(modified.data["size"], 10, "{}", modified.data);
    assert!(modified.data["mtime"].as_str().unwrap().ends_with('Z'));
    assert_eq!(find("removed", "/out/b.txt").data.get("size"), None);
    assert!(events.iter().all(|e| e.data["kind"] == e.event.as_str()));
    server.stop().await;
}

async fn filter_resume_and_lost(control: Control) {
    let server = TestServer::start_on(control).await;
    let vol = volume_id(&server, "filtered").await;
    let v = vol.as_str();
    let mut out = Stream::subscribe(&server, v, "?path=/out").await;
    mkdir(&server, v, "/out").await;
    mkdir(&server, v, "/other").await;
    mkdir(&server, v, "/outside").await;
    upload(&server, v, "/other/x", b"x").await;
    upload(&server, v, "/out/y", b"y").await;
    move_file(&server, v, "/out/y", "/other/y").await;
    upload(&server, v, "/outside/z", b"z").await;
    mkdir(&server, v, "/out/last").await;
    let events = out.until(|e| e.path() == "/out/last").await;
    for event in &events {
        let under = |path: &str| path == "/out" || path.starts_with("/out/");
        assert!(
            under(event.path()) || event.old_path().is_some_and(under),
            "{control:?}: {event:?} is not under /out"
        );
    }
    assert!(
        in_order(
            &events,
            &[
                ("created", "/out"),
                ("created", "/out/y"),
                ("renamed", "/other/y"),
                ("created", "/out/last"),
            ]
        ),
        "{control:?}: {:#?}",
        summary(&events)
    );
    let moved_in = events
        .iter()
        .position(|e| e.event == "created" && e.path() == "/out/y")
        .unwrap();
    let resume_from = events[moved_in].id;
    let missed = summary(&events[moved_in + 1..]);
    drop(out);

    // Resumed from an id: exactly what came after it, by the header and by the query.
    for (query, header) in [
        ("?path=/out".to_string(), Some(resume_from.to_string())),
        (format!("?path=/out&after={resume_from}"), None),
        // The header wins over the query (an EventSource reconnects with the URL it had).
        (
            "?path=/out&after=1".to_string(),
            Some(resume_from.to_string()),
        ),
    ] {
        let mut resumed = match Stream::open(&server, v, &query, header.as_deref()).await {
            Ok(stream) => stream,
            Err(e) => panic!("{e:?}"),
        };
        let replay = resumed.until(|e| e.path() == "/out/last").await;
        assert_eq!(summary(&replay), missed, "{control:?} {query} {header:?}");
        // And then live.
        mkdir(&server, v, &format!("/out/live{}", replay[0].id)).await;
        let live = resumed.next().await;
        assert_eq!(live.event, "created");
        assert!(live.path().starts_with("/out/live"), "{live:?}");
    }

    // Trimmed: a client resuming from before the trim is told it lost events, then goes on.
    let meta_url = common::volume_config(&server, v).meta_url;
    std::thread::spawn(move || {
        let meta = cellar_meta::open(&meta_url).unwrap();
        assert!(meta.trim_changes(i64::MAX).unwrap() > 0);
    })
    .join()
    .unwrap();
    let mut stale = Stream::subscribe(&server, v, &format!("?path=/out&after={resume_from}")).await;
    let lost = stale.next().await;
    assert_eq!(lost.event, "lost", "{control:?}: {lost:?}");
    assert_eq!(lost.data["resumeAfter"], lost.id);
    assert!(lost.data["message"].as_str().unwrap().contains("rescan"));
    mkdir(&server, v, "/out/after-lost").await;
    let next = stale.next().await;
    assert_eq!(
        (next.event.as_str(), next.path()),
        ("created", "/out/after-lost")
    );
    assert!(next.id > lost.id);
    server.stop().await;
}

on_both_databases!(every_kind_from_every_writer, filter_resume_and_lost);

/// Bad input is a 400 with a message; another organisation's volume, or none, is a 404; no key
/// is a 401.
#[tokio::test]
async fn refusals() {
    let server = TestServer::start().await;
    let vol = volume_id(&server, "refused").await;
    let v = vol.as_str();
    for (query, header, message) in [
        ("?path=relative", None, "absolute"),
        ("?path=/a/../b", None, ".."),
        ("?after=x", None, ""),
        ("", Some("not-a-number"), "Last-Event-ID"),
        ("?after=999999999", None, "past the end"),
    ] {
        match Stream::open(&server, v, query, header).await {
            Ok(_) => panic!("{query} {header:?} was accepted"),
            Err((status, body)) => {
                assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
                let text = body["message"].as_str().unwrap();
                assert!(text.contains(message), "{query}: {text}");
            }
        }
    }
    match Stream::open(&server, "no-such-volume", "", None).await {
        Err((status, _)) => assert_eq!(status, StatusCode::NOT_FOUND),
        Ok(_) => panic!("an unknown volume has events"),
    }
    server
        .admin(|c| cellar_server::admin_create_org(c, "other"))
        .unwrap();
    let other_key = server
        .admin(|c| cellar_server::admin_create_key(c, "other"))
        .unwrap();
    let url = server.url(&format!("/api/volumes/{v}/events"));
    let as_other = server.http.get(&url).bearer_auth(&other_key);
    assert_eq!(
        as_other.send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    let anonymous = server.http.get(&url);
    assert_eq!(
        anonymous.send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    // Documented.
    let (status, doc) = server.get("/api/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    let op = &doc["paths"]["/api/volumes/{volumeId}/events"]["get"];
    assert_eq!(op["operationId"], "volumeEvents", "{op}");
    // Each event is described as framed (event, id, data): schema validators (schemathesis)
    // check every event of a stream against it, the JSON in `data` against its own schema.
    let stream = &op["responses"]["200"]["content"]["text/event-stream"]["schema"];
    assert_eq!(stream["$ref"], "#/components/schemas/EventFrame", "{op}");
    let frames = doc["components"]["schemas"]["EventFrame"]["oneOf"]
        .as_array()
        .unwrap_or_else(|| panic!("EventFrame is a oneOf: {doc}"));
    let described: Vec<(Value, Value)> = frames
        .iter()
        .map(|frame| {
            let properties = &frame["properties"];
            assert_eq!(properties["data"]["contentMediaType"], "application/json");
            (
                properties["event"]["enum"].clone(),
                properties["data"]["contentSchema"]["$ref"].clone(),
            )
        })
        .collect();
    assert_eq!(
        described,
        [
            (
                json!(["created", "modified", "removed", "renamed"]),
                json!("#/components/schemas/ChangeEvent")
            ),
            (json!(["lost"]), json!("#/components/schemas/LostEvent")),
        ]
    );
    server.stop().await;
}

/// Threads of this process named `name`.
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|comm| comm.trim_end() == name)
        })
        .count()
}

/// Many subscribers of one volume share one follower of its log; each gets the events of its
/// path, and the follower ends with its last subscriber.
#[tokio::test]
async fn many_subscribers_share_one_follower() {
    const SUBSCRIBERS: usize = 40;
    let server = TestServer::start().await;
    let vol = volume_id(&server, "shared").await;
    let v = vol.as_str();
    let mut streams = Vec::new();
    for i in 0..SUBSCRIBERS {
        let filter = if i % 2 == 0 { "/even" } else { "/odd" };
        streams.push(Stream::subscribe(&server, v, &format!("?path={filter}")).await);
    }
    // Other tests of this binary run followers too, one per volume: far fewer than this.
    assert!(threads_named("cellar-events") < SUBSCRIBERS / 4);
    mkdir(&server, v, "/odd").await;
    mkdir(&server, v, "/even").await;
    for (i, stream) in streams.iter_mut().enumerate() {
        let want = if i % 2 == 0 { "/even" } else { "/odd" };
        let event = stream.next().await;
        assert_eq!((event.event.as_str(), event.path()), ("created", want));
    }
    drop(streams);
    server.stop().await;
}

/// A client that does not read while thousands of events (megabytes) come still gets every
/// one, in order: the follower drops its full queue and the stream catches up from the log.
#[tokio::test]
async fn a_slow_client_gets_every_event() {
    const RENAMES: usize = 2000;
    let server = TestServer::start().await;
    let vol = volume_id(&server, "slow").await;
    let v = vol.as_str();
    // Long paths make big events: the socket buffers fill long before the last one.
    let deep: Vec<String> = (0..14)
        .map(|i| format!("{i:02}{}", "d".repeat(250)))
        .collect();
    let mut slow = Stream::subscribe(&server, v, "").await;
    let names = deep.clone();
    as_mount(&server, v, move |vfs| {
        let mut dir = cellar_vfs::ROOT_INO;
        for name in &names {
            dir = vfs
                .mkdir(&CTX, dir, name.as_bytes(), 0o755, 0o022)
                .unwrap()
                .ino;
        }
        write_file(vfs, dir, "a", b"x");
        for i in 0..RENAMES {
            let (from, to): (&[u8], &[u8]) = if i % 2 == 0 {
                (b"a", b"b")
            } else {
                (b"b", b"a")
            };
            vfs.rename(&CTX, dir, from, dir, to, cellar_vfs::RenameMode::Replace)
                .unwrap();
        }
    })
    .await;
    let prefix = format!("/{}", deep.join("/"));
    let mut renames = Vec::new();
    let mut last_id = 0;
    while renames.len() < RENAMES {
        let event = slow.next().await;
        assert!(event.id > last_id, "ids ascend");
        last_id = event.id;
        if event.event == "renamed" {
            renames.push(event);
        }
    }
    for (i, event) in renames.iter().enumerate() {
        let (from, to) = if i % 2 == 0 { ("a", "b") } else { ("b", "a") };
        assert_eq!(event.path(), format!("{prefix}/{to}"), "rename {i}");
        assert_eq!(
            event.old_path(),
            Some(format!("{prefix}/{from}").as_str()),
            "rename {i}"
        );
    }
    server.stop().await;
}
