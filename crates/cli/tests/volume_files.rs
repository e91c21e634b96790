//! `cellar volume put/get/ls/rm/mv/du/cat/url/quota` against a real `cellar server` (a child
//! process, no sandboxes) whose volumes live in the real S3 server of tests/harness/rgw.sh
//! (source its env file: CELLAR_TEST_S3_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).
//! Needs curl for the signed URLs.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

/// A `cellar server` on a free loopback port, its data directory and its volumes' blocks under a
/// prefix of the test bucket of its own.
struct Server {
    child: Child,
    dir: tempfile::TempDir,
    api_url: String,
    key: String,
}

impl Server {
    fn start() -> Server {
        Server::start_with(&[])
    }

    /// A server with these extra environment variables (its settings).
    fn start_with(env: &[(&str, &str)]) -> Server {
        let store = std::env::var("CELLAR_TEST_S3_URL").expect(
            "CELLAR_TEST_S3_URL is not set: start tests/harness/rgw.sh and source its env file",
        );
        for var in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
            assert!(
                std::env::var_os(var).is_some(),
                "{var} is not set (source the rgw.sh env file)"
            );
        }
        let mut store = url::Url::parse(&store).expect("CELLAR_TEST_S3_URL is a URL");
        let prefix = format!(
            "{}/cli-files-{}",
            store.path().trim_end_matches('/'),
            uuid::Uuid::new_v4()
        );
        store.set_path(&prefix);
        let dir = tempfile::tempdir().unwrap();
        let log = fs::File::create(dir.path().join("server.log")).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_cellar"))
            .args(["server", "--listen", "127.0.0.1:0", "--no-embedded-runner"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--store", store.as_str()])
            .env_remove("CELLAR_CONFIG")
            .env_remove("CELLAR_DATABASE")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        // The first lines name the API URL and the bootstrap key.
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut api_url, mut key) = (None, None);
        while api_url.is_none() || key.is_none() {
            let Some(Ok(line)) = lines.next() else {
                let log = fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
                panic!("cellar server exited before it was ready:\n{log}");
            };
            if let Some(url) = line.strip_prefix("Cellar API: ") {
                api_url = Some(url.to_string());
            } else if let Some((_, k)) = line.split_once("store it now): ") {
                key = Some(k.to_string());
            }
        }
        // Keep reading, so the server never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Server {
            child,
            dir,
            api_url: api_url.unwrap(),
            key: key.unwrap(),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cellar"));
        command
            .args(args)
            .env("CELLAR_API_URL", &self.api_url)
            .env("CELLAR_API_KEY", &self.key)
            .env_remove("DAYTONA_API_URL")
            .env_remove("DAYTONA_API_KEY");
        command
    }

    fn cellar(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs `cellar ARGS`, asserts it succeeded, returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let output = self.cellar(args);
        assert!(
            output.status.success(),
            "cellar {args:?}: exit {:?}\nstdout: {}\nstderr: {}",
            output.status.code(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }

    /// Runs `cellar ARGS`, asserts it failed with exit code `code`, returns its stderr.
    fn fails(&self, code: i32, args: &[&str]) -> String {
        let output = self.cellar(args);
        let stderr = String::from_utf8_lossy(&output.stderr).to_string();
        assert_eq!(
            output.status.code(),
            Some(code),
            "cellar {args:?}: stdout: {}\nstderr: {stderr}",
            String::from_utf8_lossy(&output.stdout)
        );
        stderr
    }

    fn create_volume(&self, name: &str) {
        self.ok(&["volume", "create", name]);
    }

    /// Deletes a volume and waits until its blocks are gone from the bucket (the test RGW's
    /// memory is shared by the whole suite).
    fn delete_volume(&self, name: &str) {
        let id = self.json(&["volume", "get", name, "--json"])["id"]
            .as_str()
            .unwrap()
            .to_string();
        self.ok(&["volume", "delete", name]);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let volumes = self.json(&["volume", "list", "--include-deleted", "--json"]);
            let volume = volumes
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["id"] == id.as_str());
            if volume.is_none_or(|v| v["state"] == "deleted") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "volume {name} still {}",
                volume.unwrap()["state"]
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn tmp(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: kill has no memory preconditions; the pid is our child's.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Deterministic bytes that differ per seed and position (not compressible runs).
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Writes a file of `mib` MiB of pattern bytes; returns its SHA-256.
fn big_file(path: &Path, mib: usize) -> String {
    let mut file = fs::File::create(path).unwrap();
    let mut hash = Sha256::new();
    for i in 0..mib {
        let chunk = pattern(i as u64 + 1, 1 << 20);
        hash.update(&chunk);
        file.write_all(&chunk).unwrap();
    }
    hex::encode(hash.finalize())
}

fn sha256(mut reader: impl Read) -> String {
    let mut hash = Sha256::new();
    let mut buf = vec![0; 1 << 20];
    loop {
        match reader.read(&mut buf).unwrap() {
            0 => return hex::encode(hash.finalize()),
            n => hash.update(&buf[..n]),
        }
    }
}

/// Runs the command to its end; returns its output and its peak resident memory (MiB, read
/// from /proc while it runs).
fn measured(mut command: Command) -> (Output, u64) {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status_file = format!("/proc/{}/status", child.id());
    let mut pipes = [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    ]
    .map(|pipe| {
        let mut pipe = pipe.unwrap();
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            pipe.read_to_end(&mut bytes).unwrap();
            bytes
        })
    })
    .into_iter();
    let mut peak_kib = 0;
    let status = loop {
        if let Some(hwm) = fs::read_to_string(&status_file).ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
        }) {
            peak_kib = peak_kib.max(hwm);
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = pipes.next().unwrap().join().unwrap();
    let stderr = pipes.next().unwrap().join().unwrap();
    (
        Output {
            status,
            stdout,
            stderr,
        },
        peak_kib / 1024,
    )
}

fn assert_success(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what}: exit {:?}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Every file under `root`: relative path → (contents, permission bits).
fn local_tree(root: &Path) -> BTreeMap<String, (Vec<u8>, u32)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (Vec<u8>, u32)>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            let relative = path
                .strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            if meta.is_dir() {
                out.insert(
                    format!("{relative}/"),
                    (Vec::new(), meta.permissions().mode() & 0o777),
                );
                walk(root, &path, out);
            } else {
                out.insert(
                    relative,
                    (fs::read(&path).unwrap(), meta.permissions().mode() & 0o777),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

#[test]
fn a_tree_of_1000_files_round_trips() {
    let server = Server::start();
    server.create_volume("tree");
    // 1,000 files in 30 directories two levels deep, 0 to 6 KB, one executable; one empty
    // directory.
    let tree = server.tmp("tree");
    let mut total = 0u64;
    for i in 0..1000u64 {
        let dir = tree
            .join(format!("d{}", i % 10))
            .join(format!("s{}", i % 3));
        fs::create_dir_all(&dir).unwrap();
        let size = (i * 37 % 6000) as usize;
        total += size as u64;
        fs::write(dir.join(format!("f{i}.txt")), pattern(i, size)).unwrap();
    }
    fs::set_permissions(tree.join("d1/s1/f1.txt"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::create_dir(tree.join("empty")).unwrap();

    let (put, _) = measured(server.command(&["volume", "put", tree.to_str().unwrap(), "tree:/"]));
    assert_success(&put, "put of the tree");
    assert!(
        String::from_utf8_lossy(&put.stdout).starts_with("uploaded 1000 files"),
        "{}",
        String::from_utf8_lossy(&put.stdout)
    );
    // Not a terminal: no progress bar, no warnings.
    assert_eq!(String::from_utf8_lossy(&put.stderr), "");

    let listed = server.json(&["volume", "ls", "-R", "--json", "tree:/tree"]);
    let listed = listed.as_array().unwrap();
    let count = |kind: &str| listed.iter().filter(|e| e["type"] == kind).count();
    assert_eq!((count("file"), count("directory")), (1000, 10 + 30 + 1));
    let exec = listed
        .iter()
        .find(|e| e["path"] == "/tree/d1/s1/f1.txt")
        .unwrap();
    assert_eq!(
        (exec["mode"].as_str(), exec["size"].as_u64()),
        (Some("0755"), Some(37))
    );

    let du = server.json(&["volume", "du", "--json", "tree:/tree"]);
    assert_eq!(
        (du["bytes"].as_u64(), du["files"].as_u64()),
        (Some(total), Some(1041))
    );
    // The volume's own counters: the same bytes, and the tree directory itself too.
    let du = server.json(&["volume", "du", "--json", "tree"]);
    assert_eq!(
        (du["bytes"].as_u64(), du["files"].as_u64()),
        (Some(total), Some(1042))
    );

    let out = server.tmp("out");
    fs::create_dir(&out).unwrap();
    let got = server.ok(&[
        "volume",
        "get",
        "-j",
        "16",
        "tree:/tree",
        out.to_str().unwrap(),
    ]);
    assert!(got.starts_with("downloaded 1000 files"), "{got}");
    assert!(
        local_tree(&tree) == local_tree(&out.join("tree")),
        "the trees differ"
    );
}

#[test]
fn transfers_wait_out_the_rate_limit() {
    // 5 requests at once, then 20 a second: a put of 60 files must pace itself, not fail.
    let server = Server::start_with(&[("CELLAR_RATE_LIMIT", "20"), ("CELLAR_RATE_BURST", "5")]);
    let tree = server.tmp("paced");
    fs::create_dir(&tree).unwrap();
    for i in 0..60u64 {
        fs::write(tree.join(format!("f{i}")), pattern(i, 100)).unwrap();
    }
    let started = Instant::now();
    let put = server.ok(&["volume", "create", "paced"]);
    assert!(put.contains("paced"), "{put}");
    let put = server.ok(&[
        "volume",
        "put",
        "-j",
        "8",
        tree.to_str().unwrap(),
        "paced:/",
    ]);
    assert!(put.starts_with("uploaded 60 files"), "{put}");
    let out = server.tmp("paced-out");
    let got = server.ok(&["volume", "get", "paced:/paced", out.to_str().unwrap()]);
    assert!(got.starts_with("downloaded 60 files"), "{got}");
    assert!(local_tree(&tree) == local_tree(&out), "the trees differ");
    // At 20 requests a second, 120 transfers cannot have taken less than about 5 s.
    assert!(
        started.elapsed() > Duration::from_secs(4),
        "not limited: {:?}",
        started.elapsed()
    );
}

#[test]
fn a_large_file_streams_both_ways_in_little_memory() {
    let server = Server::start();
    server.create_volume("big");
    let big = server.tmp("big.bin");
    let sum = big_file(&big, 256);

    let (put, put_rss) =
        measured(server.command(&["volume", "put", big.to_str().unwrap(), "big:/data/big.bin"]));
    assert_success(&put, "put of 256 MiB");
    let (get, get_rss) = measured(server.command(&[
        "volume",
        "get",
        "big:/data/big.bin",
        server.tmp("back.bin").to_str().unwrap(),
    ]));
    assert_success(&get, "get of 256 MiB");
    assert_eq!(sha256(fs::File::open(server.tmp("back.bin")).unwrap()), sum);
    // Streamed: the CLI never holds the file (it holds a few MiB of buffers).
    assert!(
        put_rss < 100 && get_rss < 100,
        "peak RSS: put {put_rss} MiB, get {get_rss} MiB"
    );

    // `-`: to standard output.
    let mut child = server
        .command(&["volume", "get", "big:/data/big.bin", "-"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    assert_eq!(sha256(child.stdout.take().unwrap()), sum);
    assert!(child.wait().unwrap().success());

    let listed = server.json(&["volume", "ls", "--json", "big:/data"]);
    assert_eq!(listed[0]["size"].as_u64(), Some(256 << 20));
    server.delete_volume("big");
}

#[test]
fn an_interrupted_put_leaves_no_partial_file() {
    let server = Server::start();
    server.create_volume("cut");
    let big = server.tmp("big.bin");
    big_file(&big, 256);
    let mut put = server
        .command(&["volume", "put", big.to_str().unwrap(), "cut:/big.bin"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once it has sent a good part of the file (what it has read, less its buffers).
    let io = format!("/proc/{}/io", put.id());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let read: u64 = fs::read_to_string(&io)
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("rchar: "))
            .unwrap()
            .parse()
            .unwrap();
        if read > 64 << 20 {
            break;
        }
        assert!(
            put.try_wait().unwrap().is_none(),
            "the put ended before it was killed"
        );
        assert!(Instant::now() < deadline, "the put did not get going");
        std::thread::sleep(Duration::from_millis(10));
    }
    put.kill().unwrap();
    put.wait().unwrap();
    for _ in 0..2 {
        // Nothing named big.bin, nor any half-written file under another name.
        assert_eq!(
            server.json(&["volume", "ls", "--json", "cut"]),
            Value::Array(vec![])
        );
        let missing = server.fails(1, &["volume", "ls", "cut:/big.bin"]);
        assert!(missing.contains("/big.bin does not exist"), "{missing}");
        std::thread::sleep(Duration::from_secs(2));
    }
    // The server is fine: the same put, not interrupted, works.
    server.ok(&["volume", "put", "-q", big.to_str().unwrap(), "cut:/big.bin"]);
    assert_eq!(
        server.json(&["volume", "ls", "--json", "cut:/big.bin"])[0]["size"].as_u64(),
        Some(256 << 20)
    );
    server.delete_volume("cut");
}

#[test]
fn force_is_needed_to_overwrite_and_errors_say_what_to_fix() {
    let server = Server::start();
    server.create_volume("vol");
    let a = server.tmp("a.txt");
    fs::write(&a, "first\n").unwrap();
    server.ok(&["volume", "put", a.to_str().unwrap(), "vol:/dir/a.txt"]);
    fs::write(&a, "second\n").unwrap();
    let refused = server.fails(1, &["volume", "put", a.to_str().unwrap(), "vol:/dir/a.txt"]);
    assert!(
        refused.contains("vol:/dir/a.txt exists already: use --force"),
        "{refused}"
    );
    assert_eq!(server.ok(&["volume", "cat", "vol:/dir/a.txt"]), "first\n");
    // Into an existing directory: the same file.
    server.fails(1, &["volume", "put", a.to_str().unwrap(), "vol:/dir"]);
    server.ok(&["volume", "put", "--force", a.to_str().unwrap(), "vol:/dir"]);
    assert_eq!(server.ok(&["volume", "cat", "vol:/dir/a.txt"]), "second\n");

    // A directory whose one file exists: nothing of it is uploaded.
    let local = server.tmp("dir");
    fs::create_dir(&local).unwrap();
    fs::write(local.join("a.txt"), "third\n").unwrap();
    fs::write(local.join("b.txt"), "new\n").unwrap();
    let refused = server.fails(1, &["volume", "put", local.to_str().unwrap(), "vol:/"]);
    assert!(refused.contains("use --force"), "{refused}");
    assert_eq!(server.ok(&["volume", "ls", "vol:/dir"]), "a.txt\n");
    server.ok(&["volume", "put", "-f", local.to_str().unwrap(), "vol:/"]);
    assert_eq!(server.ok(&["volume", "ls", "vol:/dir"]), "a.txt\nb.txt\n");
    assert_eq!(
        server.ok(&["volume", "cat", "vol:/dir/a.txt", "vol:/dir/b.txt"]),
        "third\nnew\n"
    );

    // get: an existing local file too.
    let target = server.tmp("got.txt");
    fs::write(&target, "mine\n").unwrap();
    let refused = server.fails(
        1,
        &["volume", "get", "vol:/dir/b.txt", target.to_str().unwrap()],
    );
    assert!(
        refused.contains("got.txt exists already: use --force"),
        "{refused}"
    );
    assert_eq!(fs::read_to_string(&target).unwrap(), "mine\n");
    server.ok(&[
        "volume",
        "get",
        "--force",
        "vol:/dir/b.txt",
        target.to_str().unwrap(),
    ]);
    assert_eq!(fs::read_to_string(&target).unwrap(), "new\n");

    // Missing paths, bad paths, unknown volumes: exit code 1 and the server's reason.
    let missing = server.fails(1, &["volume", "get", "vol:/nope", target.to_str().unwrap()]);
    assert!(
        missing.contains("vol:/nope") && missing.contains("does not exist"),
        "{missing}"
    );
    let missing = server.fails(1, &["volume", "cat", "vol:/dir/nope"]);
    assert!(missing.contains("/dir/nope does not exist"), "{missing}");
    let missing = server.fails(
        1,
        &[
            "volume",
            "put",
            server.tmp("nope").to_str().unwrap(),
            "vol:/x",
        ],
    );
    assert!(
        missing.contains("cannot read") && missing.contains("nope"),
        "{missing}"
    );
    let bad = server.fails(1, &["volume", "ls", "vol:/dir/../etc"]);
    assert!(bad.contains("..") && bad.contains("400"), "{bad}");
    let bad = server.fails(1, &["volume", "cat", "vol:/dir"]);
    assert!(bad.contains("409"), "{bad}");
    let unknown = server.fails(1, &["volume", "ls", "nosuchvolume:/"]);
    assert!(unknown.contains("nosuchvolume"), "{unknown}");
    // Usage errors: exit code 2.
    server.fails(2, &["volume", "put", a.to_str().unwrap()]);
    let usage = server.fails(2, &["volume", "put", a.to_str().unwrap(), "novolume"]);
    assert!(usage.contains("VOLUME:/PATH"), "{usage}");
    server.fails(2, &["volume", "get", "vol:/dir/a.txt"]);
    server.fails(2, &["volume", "url", "vol:/dir/a.txt", "--expires", "soon"]);
    // `volume get NAME` still shows the volume.
    assert_eq!(
        server.json(&["volume", "get", "vol", "--json"])["name"],
        "vol"
    );
}

#[test]
fn ls_rm_mv_and_signed_urls() {
    let server = Server::start();
    server.create_volume("misc");
    let local = server.tmp("src");
    fs::create_dir_all(local.join("sub")).unwrap();
    fs::write(local.join("one.txt"), "1").unwrap();
    fs::write(local.join("sub/two.txt"), "22").unwrap();
    server.ok(&["volume", "put", local.to_str().unwrap(), "misc:/"]);

    let listed = server.json(&["volume", "ls", "--json", "misc:/src"]);
    let names: Vec<(&str, &str, u64)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap(),
                e["type"].as_str().unwrap(),
                e["size"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [("one.txt", "file", 1), ("sub", "directory", names[1].2)]
    );
    assert_eq!(
        server.ok(&["volume", "ls", "-R", "misc:/src"]),
        "one.txt\nsub\nsub/two.txt\n"
    );
    let long = server.ok(&["volume", "ls", "-l", "misc:/src"]);
    let first: Vec<&str> = long.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        (first[0], first[1], first[3]),
        ("-rw-r--r--", "1", "one.txt"),
        "{long}"
    );
    assert!(long.lines().nth(1).unwrap().starts_with("drwx"), "{long}");

    // mv: a rename, then into a directory; an existing destination needs --force.
    server.ok(&["volume", "mv", "misc:/src/one.txt", "misc:/src/uno.txt"]);
    server.ok(&["volume", "mv", "misc:/src/uno.txt", "misc:/src/sub"]);
    assert_eq!(
        server.ok(&["volume", "ls", "misc:/src/sub"]),
        "two.txt\nuno.txt\n"
    );
    let refused = server.fails(
        1,
        &[
            "volume",
            "mv",
            "misc:/src/sub/uno.txt",
            "misc:/src/sub/two.txt",
        ],
    );
    assert!(
        refused.contains("misc:/src/sub/two.txt exists already: use --force"),
        "{refused}"
    );
    server.ok(&[
        "volume",
        "mv",
        "-f",
        "misc:/src/sub/uno.txt",
        "misc:/src/sub/two.txt",
    ]);
    assert_eq!(server.ok(&["volume", "cat", "misc:/src/sub/two.txt"]), "1");
    server.fails(1, &["volume", "mv", "misc:/src/sub/two.txt", "other:/x"]);

    // Signed URLs: curl without a key, GET and PUT; an expired one is refused.
    let url = server.ok(&["volume", "url", "misc:/src/sub/two.txt"]);
    let body = Command::new("curl")
        .args(["-sSf", url.trim()])
        .output()
        .unwrap();
    assert_eq!(
        (body.status.success(), body.stdout.as_slice()),
        (true, b"1".as_slice())
    );
    let upload = server.ok(&[
        "volume",
        "url",
        "--put",
        "--expires",
        "10m",
        "misc:/src/put.txt",
    ]);
    let source = server.tmp("put.txt");
    fs::write(&source, "via curl").unwrap();
    let put = Command::new("curl")
        .args(["-sSf", "-T", source.to_str().unwrap(), upload.trim()])
        .output()
        .unwrap();
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    assert_eq!(
        server.ok(&["volume", "cat", "misc:/src/put.txt"]),
        "via curl"
    );
    let short = server.json(&[
        "volume",
        "url",
        "--json",
        "--expires",
        "1s",
        "misc:/src/put.txt",
    ]);
    assert_eq!(short["method"], "GET");
    std::thread::sleep(Duration::from_millis(2100));
    let expired = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            short["url"].as_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&expired.stdout), "403");

    // rm: a directory only with -r.
    let refused = server.fails(1, &["volume", "rm", "misc:/src/sub"]);
    assert!(refused.contains("is a directory: use -r"), "{refused}");
    server.ok(&["volume", "rm", "misc:/src/put.txt"]);
    server.ok(&["volume", "rm", "-r", "misc:/src"]);
    assert_eq!(server.ok(&["volume", "ls", "misc"]), "");
    assert!(server
        .fails(1, &["volume", "rm", "misc:/src"])
        .contains("does not exist"));
    let du = server.json(&["volume", "du", "--json", "misc"]);
    assert_eq!(
        (du["bytes"].as_u64(), du["files"].as_u64()),
        (Some(0), Some(0))
    );
}

#[test]
fn quota_limits_uploads() {
    let server = Server::start();
    server.ok(&["volume", "create", "--quota", "1MiB", "small"]);
    let quota = server.json(&["volume", "quota", "--json", "small"]);
    assert_eq!(quota["quotaBytes"].as_u64(), Some(1 << 20));
    let file = server.tmp("two-mib");
    fs::write(&file, pattern(7, 2 << 20)).unwrap();
    let refused = server.fails(1, &["volume", "put", file.to_str().unwrap(), "small:/f"]);
    assert!(refused.contains("507"), "{refused}");
    assert_eq!(server.ok(&["volume", "ls", "small"]), "");
    assert!(server
        .ok(&["volume", "quota", "small", "none"])
        .starts_with("quota none"));
    server.ok(&["volume", "put", file.to_str().unwrap(), "small:/f"]);
    let du = server.json(&["volume", "du", "--json", "small"]);
    assert_eq!(
        (du["bytes"].as_u64(), du["quotaBytes"].clone()),
        (Some(2 << 20), Value::Null)
    );
    let shown = server.ok(&["volume", "quota", "small", "4MiB"]);
    assert!(shown.starts_with("quota 4.0 MiB (50% used)"), "{shown}");
    let usage = server.fails(2, &["volume", "quota", "small", "lots"]);
    assert!(usage.contains("10GiB"), "{usage}");
}
