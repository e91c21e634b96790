//! A real server, in-process on a free loopback port, with a temporary data directory and the
//! default file:// block store; its control state (and volume metadata) in SQLite files of the
//! data directory, or in a PostgreSQL database of its own (`Control::Postgres`: the harness's
//! server, see `cellar_meta::testing::postgres_url`).

#![allow(dead_code)] // Each test binary uses a different part of this helper.

pub mod runner;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cellar_server::{Server, ServerConfig};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// The `cellar` binary the embedded runner starts mount daemons with.
pub fn cellar_bin() -> PathBuf {
    std::env::var_os("CELLAR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/cellar"))
}

/// Where a test server keeps its control state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Sqlite,
    Postgres,
}

/// Runs an async test once per control database: `mod NAME { sqlite, postgres }`.
#[macro_export]
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                super::$name(super::common::Control::Sqlite).await
            }
            #[tokio::test]
            async fn postgres() {
                super::$name(super::common::Control::Postgres).await
            }
        }
    )*};
}

/// A database of its own in the test PostgreSQL server, so tests run in parallel.
fn fresh_postgres_database() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let base = cellar_meta::testing::postgres_url();
    let name = format!(
        "control_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    );
    let mut url = url::Url::parse(&base).unwrap();
    // The postgres client blocks on a runtime of its own: not on the test's.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let mut client = postgres::Client::connect(&base, postgres::NoTls).unwrap();
                client
                    .batch_execute(&format!("CREATE DATABASE {name}"))
                    .unwrap();
            })
            .join()
            .unwrap()
    });
    url.set_path(&format!("/{name}"));
    url.to_string()
}

/// Runs one statement on the server's control database (as an operator with a SQL shell
/// would); returns how many rows it changed.
pub fn control_sql(config: &ServerConfig, sql: &str, params: Vec<cellar_sql::Value>) -> usize {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let db = match &config.database {
                    None => cellar_sql::Database::open_sqlite(&config.data_dir.join("control.db"))
                        .unwrap(),
                    Some(url) => cellar_sql::Database::open_postgres(
                        &cellar_sql::PgUrl::parse(&url.0).unwrap(),
                        Some(cellar_server::CONTROL_SCHEMA),
                    )
                    .unwrap(),
                };
                db.write(|tx| tx.execute(sql, params.clone())).unwrap()
            })
            .join()
            .unwrap()
    })
}

/// Whether the volume's metadata exists: its SQLite file, or its PostgreSQL schema.
pub fn volume_metadata_exists(config: &ServerConfig, volume_id: &str) -> bool {
    match &config.database {
        None => config
            .data_dir
            .join("volumes")
            .join(format!("{volume_id}.db"))
            .exists(),
        Some(url) => std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let mut client = postgres::Client::connect(&url.0, postgres::NoTls).unwrap();
                    let row = client
                        .query_one(
                            "SELECT count(*) FROM information_schema.schemata WHERE schema_name = $1",
                            &[&format!("vol_{volume_id}")],
                        )
                        .unwrap();
                    row.get::<_, i64>(0) > 0
                })
                .join()
                .unwrap()
        }),
    }
}

pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub config: ServerConfig,
    server: Option<Server>,
    pub base: String,
    pub key: String,
    pub http: reqwest::Client,
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::start_with(|_| {}).await
    }

    pub async fn start_on(control: Control) -> TestServer {
        TestServer::start_on_with(control, |_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut ServerConfig)) -> TestServer {
        TestServer::start_on_with(Control::Sqlite, adjust).await
    }

    pub async fn start_on_with(
        control: Control,
        adjust: impl FnOnce(&mut ServerConfig),
    ) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServerConfig::with_data_dir(dir.path(), &cellar_bin());
        config.listen = "127.0.0.1:0".parse().unwrap();
        if control == Control::Postgres {
            config.database = Some(cellar_server::config::DatabaseUrl(
                tokio::task::spawn_blocking(fresh_postgres_database)
                    .await
                    .unwrap(),
            ));
        }
        adjust(&mut config);
        let server = Server::start(config.clone()).await.expect("server starts");
        let key = server
            .bootstrap_key()
            .expect("first start creates a key")
            .to_string();
        let base = format!("http://{}", server.local_addr());
        TestServer {
            dir,
            config,
            server: Some(server),
            base,
            key,
            http: reqwest::Client::new(),
        }
    }

    /// Stops the server (sandboxes keep running), runs `while_stopped`, starts it again on the
    /// same data directory.
    pub async fn restart(&mut self, while_stopped: impl FnOnce(&ServerConfig)) {
        self.server.take().unwrap().shutdown().await.unwrap();
        while_stopped(&self.config);
        let server = Server::start(self.config.clone())
            .await
            .expect("server restarts");
        assert!(
            server.bootstrap_key().is_none(),
            "the bootstrap key is only made once"
        );
        self.base = format!("http://{}", server.local_addr());
        self.server = Some(server);
    }

    pub fn url(&self, path: &str) -> String {
        if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        }
    }

    pub async fn send(&self, request: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let response = request.send().await.expect("request reaches the server");
        let status = response.status();
        let text = response.text().await.unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"))
        };
        (status, body)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.http.get(self.url(path)).bearer_auth(&self.key))
            .await
    }

    pub async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        self.send(
            self.http
                .post(self.url(path))
                .bearer_auth(&self.key)
                .json(body),
        )
        .await
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.http.delete(self.url(path)).bearer_auth(&self.key))
            .await
    }

    /// Creates a volume and checks it is ready on return.
    pub async fn create_volume(&self, name: &str) -> Value {
        let (status, volume) = self
            .post("/api/volumes", &serde_json::json!({ "name": name }))
            .await;
        assert_eq!(status, StatusCode::OK, "{volume}");
        assert_eq!(volume["state"], "ready", "{volume}");
        volume
    }

    /// Polls `path` until `field` equals `want`.
    pub async fn wait_for(&self, path: &str, field: &str, want: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, body) = self.get(path).await;
            assert_eq!(status, StatusCode::OK, "{path}: {body}");
            if body[field] == want {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "{path} never reached {field}={want}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn volume_db(&self, volume_id: &str) -> PathBuf {
        self.dir
            .path()
            .join("volumes")
            .join(format!("{volume_id}.db"))
    }

    /// Runs an admin function (`cellar admin ...`) on the server's configuration, on a thread of
    /// its own (a database client may block on a runtime of its own).
    pub fn admin<T: Send>(&self, work: impl FnOnce(&ServerConfig) -> T + Send) -> T {
        std::thread::scope(|scope| scope.spawn(|| work(&self.config)).join().unwrap())
    }

    /// Whether the volume's metadata exists (in whichever database the server uses).
    pub fn has_volume_metadata(&self, volume_id: &str) -> bool {
        volume_metadata_exists(&self.config, volume_id)
    }

    /// Every regular file under the block store directory.
    pub fn block_files(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, out);
                } else {
                    out.push(path);
                }
            }
        }
        let mut files = Vec::new();
        walk(&self.dir.path().join("blocks"), &mut files);
        files
    }

    pub async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await.unwrap();
        }
    }
}

/// The test store URL with a prefix of its own, so the bucket listing sees only this test.
pub fn s3_store_url() -> String {
    let base = std::env::var("CELLAR_TEST_S3_URL").expect(
        "CELLAR_TEST_S3_URL is not set: start tests/harness/rgw.sh and source its env file",
    );
    for var in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
        assert!(
            std::env::var_os(var).is_some(),
            "{var} is not set (source the rgw.sh env file)"
        );
    }
    let mut url = url::Url::parse(&base).expect("CELLAR_TEST_S3_URL is a URL");
    let prefix = format!(
        "{}/server-{}",
        url.path().trim_end_matches('/'),
        uuid::Uuid::new_v4()
    );
    url.set_path(&prefix);
    url.to_string()
}

/// The embedded runner needs the cellar binary (for mount daemons) and bubblewrap.
pub fn require_runner_prerequisites() {
    let bin = cellar_bin();
    assert!(
        bin.is_file(),
        "cellar binary not found at {} (run `cargo build -p cellar-cli` or set CELLAR_BIN)",
        bin.display()
    );
    assert!(
        std::process::Command::new("bwrap")
            .arg("--version")
            .output()
            .is_ok(),
        "bubblewrap (bwrap) is required"
    );
}

/// Runs `command` in the sandbox through the toolbox: (exit code, output).
pub async fn exec(server: &TestServer, sandbox: &Value, command: &str) -> (i64, String) {
    let url = format!(
        "{}/{}/process/execute",
        sandbox["toolboxProxyUrl"].as_str().unwrap(),
        sandbox["id"].as_str().unwrap()
    );
    let (status, body) = server.post(&url, &json!({ "command": command })).await;
    assert_eq!(status, StatusCode::OK, "{command}: {body}");
    (
        body["exitCode"].as_i64().unwrap(),
        body["result"].as_str().unwrap().to_string(),
    )
}

/// How a process other than the server (a mount, this test) opens the volume.
pub fn volume_config(server: &TestServer, volume_id: &str) -> cellar_vfs::VolumeConfig {
    let meta_url = match &server.config.database {
        Some(url) => format!("{}?volume={volume_id}", url.0),
        None => format!("sqlite://{}", server.volume_db(volume_id).display()),
    };
    cellar_vfs::VolumeConfig {
        meta_url,
        store_url: server.config.store_url.clone(),
        volume: volume_id.to_string(),
        cache_mem_bytes: 16 << 20,
        cache_dir: None,
        cache_disk_bytes: 0,
        mount_point: String::new(),
        store_timeouts: Default::default(),
    }
}

/// Runs `work` on the volume opened by the vfs as a second client (like a mount), on a thread
/// outside the test's runtime (the vfs drives its own).
pub fn with_vfs<T: Send + 'static>(
    server: &TestServer,
    volume_id: &str,
    work: impl FnOnce(&cellar_vfs::Vfs) -> T + Send + 'static,
) -> T {
    let config = volume_config(server, volume_id);
    std::thread::spawn(move || {
        let vfs = cellar_vfs::Vfs::open_volume(config).unwrap();
        let result = work(&vfs);
        vfs.shutdown().unwrap();
        result
    })
    .join()
    .unwrap()
}

/// Writes a file into a volume through the vfs (as a mount would), so the store holds objects.
pub fn write_into_volume(server: &TestServer, volume_id: &str, name: &str, data: Vec<u8>) {
    let name = name.as_bytes().to_vec();
    with_vfs(server, volume_id, move |vfs| {
        let ctx = cellar_vfs::Ctx {
            uid: 0,
            gid: 0,
            pid: 1,
        };
        let (attr, open) = vfs
            .create(
                &ctx,
                cellar_vfs::ROOT_INO,
                &name,
                0o100644,
                0o022,
                libc::O_WRONLY,
            )
            .unwrap();
        assert_eq!(
            vfs.write(attr.ino, open.fh, 0, &data).unwrap() as usize,
            data.len()
        );
        vfs.flush(attr.ino, open.fh, 0).unwrap();
        vfs.release(attr.ino, open.fh, None).unwrap();
    })
}
