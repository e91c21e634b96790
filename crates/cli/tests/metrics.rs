//! The metrics of a real mount daemon (`cellar mount --metrics-socket/--metrics-addr`): file
//! operations on the FUSE mount move the counters of FUSE requests, store PUTs and bytes, and
//! metadata transactions. Needs root and /dev/fuse; blocks in a local directory, and in the real
//! S3 server of tests/harness/rgw.sh (`CELLAR_TEST_S3_URL` and the keys, from its env file).

use std::fs;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn cellar(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cellar"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running cellar")
}

fn is_mounted(path: &Path) -> bool {
    cellar_fuse::is_mount_point(&path.canonicalize().unwrap()).unwrap()
}

/// `GET /metrics` over an HTTP connection; returns the body of a 200 answer.
fn scrape(mut stream: impl Read + Write) -> String {
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    body.to_string()
}

fn scrape_unix(socket: &Path) -> String {
    let stream = UnixStream::connect(socket).expect("the metrics socket accepts");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    scrape(stream)
}

/// The value of the sample `series` (name with labels, as exposed), or 0 when absent.
fn sample(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |value| value.parse().expect("a number"))
}

/// A port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = cellar(&["umount", "--lazy", self.0.to_str().unwrap()]);
        }
    }
}

#[test]
fn file_operations_move_the_mount_daemons_metrics() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("store")).unwrap();
    let store = format!("file://{}/store", dir.path().display());
    let after = file_operations_and_their_metrics(&dir, &store);
    assert_eq!(
        sample(
            &after,
            r#"cellar_store_http_attempts_total{outcome="success"}"#
        ),
        0.0,
        "a local directory is not reached over HTTP"
    );
}

#[test]
fn s3_requests_and_their_http_attempts_are_counted() {
    let url = std::env::var("CELLAR_TEST_S3_URL").expect(
        "CELLAR_TEST_S3_URL is not set: start tests/harness/rgw.sh and source its env file",
    );
    for var in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
        assert!(std::env::var_os(var).is_some(), "{var} is not set");
    }
    let mut url = url::Url::parse(&url).expect("CELLAR_TEST_S3_URL is a URL");
    let prefix = format!(
        "{}/cli-metrics-{}",
        url.path().trim_end_matches('/'),
        uuid::Uuid::new_v4()
    );
    url.set_path(&prefix);
    let dir = tempfile::tempdir().unwrap();
    let after = file_operations_and_their_metrics(&dir, url.as_str());
    // Every request took at least one HTTP exchange, and none failed for good.
    let total = |name: &str, key: &str, values: &[&str]| -> f64 {
        values
            .iter()
            .map(|v| sample(&after, &format!("{name}{{{key}=\"{v}\"}}")))
            .sum()
    };
    let requests = total(
        "cellar_store_request_duration_seconds_count",
        "op",
        &["get", "put", "delete", "list"],
    );
    let attempts = total(
        "cellar_store_http_attempts_total",
        "outcome",
        &["success", "client_error", "server_error", "transport_error"],
    );
    assert!(requests >= 2.0, "{after}");
    assert!(
        attempts >= requests,
        "{attempts} attempts for {requests} requests"
    );
    assert!(
        sample(
            &after,
            r#"cellar_store_http_attempts_total{outcome="success"}"#
        ) >= 1.0
    );
}

/// Mounts a volume over `store` with both metrics endpoints, works on it, checks what moved;
/// returns the last scrape.
fn file_operations_and_their_metrics(dir: &tempfile::TempDir, store: &str) -> String {
    assert!(Path::new("/dev/fuse").exists(), "needs /dev/fuse");
    let root = dir.path().display().to_string();
    let mount_point = dir.path().join("mnt");
    fs::create_dir(&mount_point).unwrap();
    let socket = dir.path().join("metrics.sock");
    let addr = format!("127.0.0.1:{}", free_port());
    let meta = format!("sqlite://{root}/meta.db");
    let volume = ["--meta", &meta, "--store", store, "--volume", "metered"];
    let log = format!("{root}/mount.log");
    let mount = |mount_point: &Path| {
        let mut args = vec!["mount"];
        args.extend(volume);
        args.extend(["--log-file", &log, "--metrics-addr", &addr]);
        args.extend(["--metrics-socket", socket.to_str().unwrap()]);
        args.push(mount_point.to_str().unwrap());
        cellar(&args)
    };
    let output = mount(&mount_point);
    assert!(
        output.status.success(),
        "cellar mount failed: {}\nlog:\n{}",
        String::from_utf8_lossy(&output.stderr),
        fs::read_to_string(&log).unwrap_or_default()
    );
    let _guard = Unmount(mount_point.clone());
    assert!(is_mounted(&mount_point));
    let before = scrape_unix(&socket);

    // A second daemon cannot take the socket of a live one, and says why.
    let other = dir.path().join("other");
    fs::create_dir(&other).unwrap();
    let refused = mount(&other);
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("cannot serve metrics"), "{message}");

    // A file larger than the inline limit (its data goes to the store) and small ones.
    let big_data: Vec<u8> = (0..3 << 20).map(|i: u32| (i * 7 + i / 251) as u8).collect();
    fs::create_dir(mount_point.join("d")).unwrap();
    let mut big = fs::File::create(mount_point.join("d/big")).unwrap();
    big.write_all(&big_data).unwrap();
    big.sync_all().unwrap();
    drop(big);
    for i in 0..10 {
        fs::write(mount_point.join(format!("d/small{i}")), b"tiny").unwrap();
    }
    fs::rename(mount_point.join("d/small0"), mount_point.join("d/renamed")).unwrap();
    fs::remove_file(mount_point.join("d/small1")).unwrap();
    assert_eq!(fs::read_dir(mount_point.join("d")).unwrap().count(), 10);
    // Read the big file back past the kernel's page cache.
    let big = fs::File::open(mount_point.join("d/big")).unwrap();
    // SAFETY: an advice call on a descriptor the File keeps open.
    assert_eq!(
        unsafe { libc::posix_fadvise(big.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) },
        0
    );
    let mut read_back = Vec::new();
    (&big).read_to_end(&mut read_back).unwrap();
    assert!(read_back == big_data, "the data reads back");
    drop(big);

    let after = scrape_unix(&socket);
    let moved = |series: &str| sample(&after, series) - sample(&before, series);
    let fs_ops = |op: &str| {
        moved(&format!(
            "cellar_fs_request_duration_seconds_count{{op=\"{op}\"}}"
        ))
    };
    assert!(fs_ops("create") >= 11.0, "{after}");
    assert!(fs_ops("write") >= 11.0);
    assert!(fs_ops("fsync") >= 1.0);
    assert!(fs_ops("flush") >= 11.0);
    assert_eq!(fs_ops("mkdir"), 1.0);
    assert_eq!(fs_ops("rename"), 1.0);
    assert_eq!(fs_ops("unlink"), 1.0);
    assert!(fs_ops("readdir") >= 1.0);
    assert!(fs_ops("read") >= 1.0);
    assert!(moved("cellar_fs_written_bytes_total") >= f64::from((3 << 20) + 40));
    assert!(moved("cellar_fs_read_bytes_total") >= f64::from(3 << 20));
    // The big file's data: at least one PUT carrying all of it; small files stay inline.
    assert!(moved(r#"cellar_store_request_duration_seconds_count{op="put"}"#) >= 1.0);
    assert!(moved(r#"cellar_store_bytes_total{op="put"}"#) >= f64::from(3 << 20));
    assert_eq!(moved(r#"cellar_store_request_errors_total{op="put"}"#), 0.0);
    assert!(
        moved(r#"cellar_cache_hits_total{cache="memory"}"#)
            + moved(r#"cellar_cache_misses_total{cache="memory"}"#)
            >= 1.0,
        "the read looked the block up"
    );
    assert!(moved(r#"cellar_meta_transaction_duration_seconds_count{kind="write"}"#) >= 14.0);
    assert!(moved(r#"cellar_meta_transaction_duration_seconds_count{kind="read"}"#) >= 1.0);
    // Everything was closed: nothing is buffered or uploading.
    assert_eq!(sample(&after, "cellar_vfs_dirty_bytes"), 0.0);
    assert_eq!(sample(&after, "cellar_store_slice_uploads_in_flight"), 0.0);
    assert!(
        !after.contains("small") && !after.contains("metered"),
        "no names"
    );

    // The same numbers over TCP.
    let tcp = std::net::TcpStream::connect(&addr).expect("the metrics port accepts");
    let over_tcp = scrape(tcp);
    assert!(
        sample(
            &over_tcp,
            r#"cellar_fs_request_duration_seconds_count{op="mkdir"}"#
        ) >= 1.0
    );

    let output = cellar(&["umount", mount_point.to_str().unwrap()]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        !socket.exists(),
        "the daemon removes its socket when it ends"
    );
    after
}
