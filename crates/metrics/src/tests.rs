use super::*;
use std::io::{Read, Write};

/// The value of the sample `series` (name with labels, as exposed), or 0 when absent.
fn sample(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |value| value.parse().expect("a number"))
}

// Tests share the process-global registry and run in parallel: each asserts on differences, and
// on label values that no other test of this crate records.

#[test]
fn recordings_show_in_the_exposition() {
    let before = encode();
    let failed: Result<(), &str> = fs_request(FsOp::Symlink, || Err("no"));
    assert!(failed.is_err());
    fs_request(FsOp::Symlink, || Ok::<_, ()>(())).unwrap();
    fs_request(FsOp::Readlink, || Ok::<_, ()>(())).unwrap();
    meta_transaction(TxKind::Write, || Err::<(), _>(())).unwrap_err();
    meta_retry();
    let mut request = StoreRequest::start(StoreOp::Copy);
    let during = encode();
    request.bytes(1000);
    request.failed();
    drop(request);
    cache_lookup(Cache::Disk, false);
    let after = encode();

    let moved = |series: &str| sample(&after, series) - sample(&before, series);
    assert_eq!(
        moved(r#"cellar_fs_request_duration_seconds_count{op="symlink"}"#),
        2.0
    );
    assert_eq!(
        moved(r#"cellar_fs_request_errors_total{op="symlink"}"#),
        1.0
    );
    assert_eq!(
        moved(r#"cellar_fs_request_duration_seconds_count{op="readlink"}"#),
        1.0
    );
    assert_eq!(
        moved(r#"cellar_fs_request_errors_total{op="readlink"}"#),
        0.0
    );
    assert_eq!(
        moved(r#"cellar_meta_transaction_errors_total{kind="write"}"#),
        1.0
    );
    assert!(moved("cellar_meta_transaction_retries_total") >= 1.0);
    assert_eq!(
        moved(r#"cellar_store_request_duration_seconds_count{op="copy"}"#),
        1.0
    );
    assert_eq!(moved(r#"cellar_store_bytes_total{op="copy"}"#), 1000.0);
    assert_eq!(
        moved(r#"cellar_store_request_errors_total{op="copy"}"#),
        1.0
    );
    assert_eq!(
        sample(&during, r#"cellar_store_requests_in_flight{op="copy"}"#),
        1.0
    );
    assert_eq!(
        sample(&after, r#"cellar_store_requests_in_flight{op="copy"}"#),
        0.0
    );
    assert!(moved(r#"cellar_cache_misses_total{cache="disk"}"#) >= 1.0);
    // The +Inf bucket holds every observation; series exist for ops never used.
    assert_eq!(
        moved(r#"cellar_fs_request_duration_seconds_bucket{le="+Inf",op="symlink"}"#),
        2.0
    );
    assert!(after.contains(r#"cellar_fs_request_duration_seconds_count{op="setlk"}"#));
    assert!(after.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
}

#[test]
fn dirty_bytes_gauge_follows_every_counter_and_forgets_dropped_ones() {
    // The only test touching this gauge.
    let gauge = || sample(&encode(), "cellar_vfs_dirty_bytes");
    let start = gauge();
    let a = DirtyBytes::default();
    let b = DirtyBytes::default();
    assert_eq!(a.fetch_add(100, Ordering::SeqCst), 0);
    b.fetch_add(50, Ordering::SeqCst);
    a.fetch_sub(30, Ordering::SeqCst);
    assert_eq!(a.load(Ordering::SeqCst), 70);
    assert_eq!(gauge() - start, 120.0);
    drop(b);
    assert_eq!(gauge() - start, 70.0);
    drop(a);
    assert_eq!(gauge(), start);
}

#[test]
fn slice_uploads_are_in_flight_until_dropped() {
    let gauge = || sample(&encode(), "cellar_store_slice_uploads_in_flight");
    let upload = slice_upload();
    assert_eq!(gauge(), 1.0);
    drop(upload);
    assert_eq!(gauge(), 0.0);
}

#[test]
fn every_metric_is_in_the_reference_table() {
    let table = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/METRICS.md"
    ))
    .expect("docs/METRICS.md");
    let exposition = encode();
    let names: Vec<(&str, &str)> = exposition
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .map(|rest| rest.split_once(' ').unwrap())
        .collect();
    assert!(names.len() >= 15, "{names:?}");
    for (name, kind) in names {
        // Counters are exposed with the `_total` suffix the table shows.
        let exposed = match kind {
            "counter" => format!("`{name}_total`"),
            _ => format!("`{name}`"),
        };
        assert!(table.contains(&exposed), "docs/METRICS.md lacks {exposed}");
    }
}

fn get(stream: &mut (impl Read + Write), request: &str) -> String {
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

#[test]
fn serves_metrics_over_tcp_and_unix_sockets() {
    let tcp = MetricsServer::bind(&Endpoint::Tcp("127.0.0.1:0".parse().unwrap())).unwrap();
    tcp.spawn().unwrap();
    let Endpoint::Tcp(addr) = tcp.endpoint().clone() else {
        panic!("a TCP endpoint")
    };
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let answer = get(
        &mut stream,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n",
    );
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains(CONTENT_TYPE), "{head}");
    assert!(
        head.contains(&format!("Content-Length: {}", body.len())),
        "{head}"
    );
    assert!(body.contains("# TYPE cellar_fs_request_duration_seconds histogram"));
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    assert!(get(&mut stream, "GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    assert!(get(&mut stream, "POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));

    let dir = std::env::temp_dir().join(format!("cellar-metrics-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("m.sock");
    // A file left by a dead daemon is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let unix = MetricsServer::bind(&Endpoint::Unix(path.clone())).unwrap();
    unix.spawn().unwrap();
    // A live one is not.
    let taken = MetricsServer::bind(&Endpoint::Unix(path.clone()))
        .err()
        .unwrap();
    assert_eq!(taken.kind(), std::io::ErrorKind::AddrInUse);
    let mut stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let answer = get(&mut stream, "GET /metrics HTTP/1.0\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.contains("cellar_store_request_duration_seconds"));
    drop(unix);
    assert!(!path.exists(), "the socket file goes with the server");
    std::fs::remove_dir_all(&dir).unwrap();
}
