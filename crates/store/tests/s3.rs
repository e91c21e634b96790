//! `BlockStore` against a real S3 server (Ceph RGW from `tests/harness/rgw.sh`).
//!
//! Needs CELLAR_TEST_S3_URL (`s3://bucket?endpoint=http://127.0.0.1:PORT&region=us-east-1`),
//! AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY: `source DIR/env` after `rgw.sh start DIR`.

use bytes::Bytes;
use cellar_store::{BlockStore, S3Credentials, StoreError, StoreOptions};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: these tests need a real S3 server. Start one with \
             `tests/harness/rgw.sh start DIR` and `source DIR/env` (sets CELLAR_TEST_S3_URL, \
             AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
        )
    })
}

fn s3_url() -> String {
    required_env("AWS_ACCESS_KEY_ID");
    required_env("AWS_SECRET_ACCESS_KEY");
    required_env("CELLAR_TEST_S3_URL")
}

/// A volume prefix no other test run uses, so runs against one bucket never see each other.
fn unique_volume(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("store-tests/{test}-{}-{nanos}", std::process::id())
}

fn options() -> StoreOptions {
    StoreOptions {
        cache_mem_bytes: 0,
        ..StoreOptions::default()
    }
}

fn patterned(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i % 253) as u8)
        .collect::<Vec<u8>>()
        .into()
}

#[tokio::test]
async fn multi_block_slice_round_trip() {
    let store = BlockStore::open(&s3_url(), &unique_volume("round-trip"), options()).unwrap();
    store.probe().await.unwrap();
    let data = patterned(9 * MIB + 17);
    let size = data.len() as u32;
    store.put_slice(1_000_042, data.clone()).await.unwrap();

    let mut listed = store.list().await.unwrap();
    listed.sort_by(|a, b| a.key.cmp(&b.key));
    // The server's clock stamps the objects: allow for some skew.
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    let skew_ns = 600 * 1_000_000_000;
    for object in &listed {
        assert!(
            (object.last_modified_ns - now_ns).abs() < skew_ns,
            "{} written at {} ns, now is {now_ns} ns",
            object.key,
            object.last_modified_ns
        );
    }
    let keys: Vec<(&str, u64)> = listed.iter().map(|o| (o.key.as_str(), o.size)).collect();
    assert_eq!(
        keys,
        vec![
            ("chunks/1/1000/1000042_0_4194304", 4 * MIB as u64),
            ("chunks/1/1000/1000042_1_4194304", 4 * MIB as u64),
            ("chunks/1/1000/1000042_2_1048593", MIB as u64 + 17),
        ]
    );
    assert_eq!(
        store.read_slice(1_000_042, size, 0, size).await.unwrap(),
        data
    );
    let (off, len) = (4 * MIB - 10, 4 * MIB + 20);
    assert_eq!(
        store
            .read_slice(1_000_042, size, off as u32, len as u32)
            .await
            .unwrap(),
        data[off..off + len]
    );

    store.delete_slice(1_000_042, size).await.unwrap();
    assert!(store.list().await.unwrap().is_empty());
    let err = store.read_slice(1_000_042, size, 0, 10).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err}");
}

#[tokio::test]
async fn cached_reads_survive_deleted_objects_and_delete_key_works() {
    let volume = unique_volume("cache");
    let cached = BlockStore::open(&s3_url(), &volume, StoreOptions::default()).unwrap();
    let uncached = BlockStore::open(&s3_url(), &volume, options()).unwrap();
    let data = patterned(5 * MIB);
    let size = data.len() as u32;
    uncached.put_slice(7, data.clone()).await.unwrap();
    assert_eq!(cached.read_slice(7, size, 0, size).await.unwrap(), data);
    // Deleted behind the cached store's back: only its cache can still answer.
    for object in uncached.list().await.unwrap() {
        uncached.delete_key(&object.key).await.unwrap();
    }
    assert!(cached.list().await.unwrap().is_empty());
    assert_eq!(
        cached
            .read_slice(7, size, MIB as u32, 4 * MIB as u32)
            .await
            .unwrap(),
        data[MIB..5 * MIB]
    );
    let err = uncached.read_slice(7, size, 0, 10).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err}");
}

#[tokio::test]
async fn wrong_credentials_are_an_auth_error_without_secrets() {
    let wrong = S3Credentials {
        access_key_id: "CELLARWRONGKEYID0000".into(),
        secret_access_key: "cellar-wrong-secret-key-value".into(),
        session_token: None,
    };
    let store = BlockStore::open_with_credentials(
        &s3_url(),
        &unique_volume("auth"),
        options(),
        Some(wrong),
    )
    .unwrap();
    let err = store.probe().await.unwrap_err();
    assert!(matches!(err, StoreError::Auth(_)), "{err}");
    let err = store.put_slice(1, patterned(100)).await.unwrap_err();
    assert!(matches!(err, StoreError::Auth(_)), "{err}");
    let err = store.read_slice(1, 100, 0, 100).await.unwrap_err();
    assert!(matches!(err, StoreError::Auth(_)), "{err}");
    let shown = err.to_string();
    assert!(!shown.contains('\n'), "one line: {shown}");
    assert!(
        !shown.contains("cellar-wrong-secret-key-value") && !shown.contains("CELLARWRONGKEYID0000"),
        "{shown}"
    );
}

#[tokio::test]
async fn missing_bucket_is_reported_by_name() {
    let url = s3_url().replacen("s3://cellar-test", "s3://cellar-no-such-bucket", 1);
    assert!(
        url.starts_with("s3://cellar-no-such-bucket"),
        "test URL should name bucket cellar-test"
    );
    let store = BlockStore::open(&url, "v", options()).unwrap();
    let err = store.probe().await.unwrap_err();
    assert!(
        matches!(err, StoreError::Config(ref m) if m.contains("cellar-no-such-bucket") && m.contains("does not exist")),
        "{err}"
    );
}

#[tokio::test]
async fn closed_port_is_an_io_error_naming_the_endpoint() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("s3://cellar-test?endpoint=http://127.0.0.1:{port}&region=us-east-1");
    let credentials = S3Credentials {
        access_key_id: "AKID".into(),
        secret_access_key: "closed-port-secret".into(),
        session_token: None,
    };
    let store = BlockStore::open_with_credentials(&url, "v", options(), Some(credentials)).unwrap();
    let started = Instant::now();
    let err = store.probe().await.unwrap_err();
    let shown = err.to_string();
    assert!(matches!(err, StoreError::Io(_)), "{err}");
    assert!(
        shown.contains(&format!("http://127.0.0.1:{port}")),
        "{shown}"
    );
    assert!(!shown.contains("closed-port-secret"), "{shown}");
    // Retries are bounded: five backoffs of at most a few seconds, not minutes.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
}

/// Runs `ca_env_child_round_trip` in a child process whose environment points every CA variable
/// at a file that does not exist: plain-http endpoints must not care.
#[test]
fn plain_http_works_with_broken_ca_variables() {
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "ca_env_child_round_trip",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("AWS_CA_BUNDLE", "/nonexistent/ca.pem")
        .env("SSL_CERT_FILE", "/nonexistent/ca.pem")
        .env("SSL_CERT_DIR", "/nonexistent")
        .env("AWS_PROFILE", "cellar-nonexistent-profile")
        .env("AWS_CONFIG_FILE", "/nonexistent/config")
        .env("AWS_ENDPOINT_URL", "https://127.0.0.1:1")
        .env("CELLAR_STORE_CA_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("1 passed"),
        "the child test did not run:\n{stdout}"
    );
}

#[tokio::test]
async fn ca_env_child_round_trip() {
    if std::env::var("CELLAR_STORE_CA_CHILD").is_ok() {
        assert_eq!(
            std::env::var("AWS_CA_BUNDLE").unwrap(),
            "/nonexistent/ca.pem"
        );
    }
    let store = BlockStore::open(&s3_url(), &unique_volume("ca-env"), options()).unwrap();
    store.probe().await.unwrap();
    let data = patterned(MIB);
    store.put_slice(3, data.clone()).await.unwrap();
    assert_eq!(
        store
            .read_slice(3, MIB as u32, 0, MIB as u32)
            .await
            .unwrap(),
        data
    );
    store.delete_slice(3, MIB as u32).await.unwrap();
}

#[tokio::test]
async fn large_objects_upload_in_parts_and_read_back_by_ranges() {
    let options = StoreOptions {
        block_size: 64 << 20,
        cache_mem_bytes: 16 << 20,
        ..StoreOptions::default()
    };
    let store = BlockStore::open(&s3_url(), &unique_volume("large"), options).unwrap();
    let data = patterned(40 * MIB + 3);
    let size = data.len() as u32;
    store.put_slice(9, data.clone()).await.unwrap();
    let listed: Vec<(String, u64)> = store
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|o| (o.key, o.size))
        .collect();
    // One object for the slice, whole although it went up in parts.
    assert_eq!(
        listed,
        vec![(format!("chunks/0/0/9_0_{size}"), u64::from(size))]
    );
    for (off, len) in [
        (0, 10),
        (MIB - 1, 2),
        (17 * MIB + 5, 9 * MIB),
        (40 * MIB, 3),
    ] {
        let got = store
            .read_slice(9, size, off as u32, len as u32)
            .await
            .unwrap();
        assert_eq!(got, data[off..off + len], "at {off}");
    }
    // Streaming it whole through a cache of 16 MiB (read-ahead ahead of the reader).
    for off in (0..data.len()).step_by(MIB) {
        store.prefetch(9, size, (off + MIB) as u32, 8 * MIB as u32);
        let got = store
            .read_slice(9, size, off as u32, MIB as u32)
            .await
            .unwrap();
        assert_eq!(got, data[off..(off + MIB).min(data.len())], "at {off}");
    }
    store.delete_slice(9, size).await.unwrap();
    assert!(store.list().await.unwrap().is_empty());
}

/// A block object damaged in the store (its checksums kept) fails the reads of its damaged page
/// with an error, never its bytes; its other pages still read.
#[tokio::test]
async fn a_corrupt_object_fails_reads_of_its_damaged_page_only() {
    use object_store::{ObjectStore, ObjectStoreExt, PutOptions};
    let volume = unique_volume("corrupt");
    let store = BlockStore::open(&s3_url(), &volume, options()).unwrap();
    let data = patterned(3 * MIB);
    let size = data.len() as u32;
    store.put_slice(5, data.clone()).await.unwrap();

    let url = url::Url::parse(&s3_url()).unwrap();
    let query: std::collections::HashMap<_, _> = url.query_pairs().collect();
    let raw = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(url.host_str().unwrap())
        .with_endpoint(query["endpoint"].as_ref())
        .with_region(query.get("region").map_or("us-east-1", |r| r.as_ref()))
        .with_access_key_id(required_env("AWS_ACCESS_KEY_ID"))
        .with_secret_access_key(required_env("AWS_SECRET_ACCESS_KEY"))
        .with_allow_http(true)
        .build()
        .unwrap();
    let path = object_store::path::Path::from(format!("{volume}/chunks/0/0/5_0_{}", 3 * MIB));
    let got = raw.get(&path).await.unwrap();
    let attributes = got.attributes.clone();
    assert!(
        !attributes.is_empty(),
        "the object carries its page checksums"
    );
    let mut damaged = got.bytes().await.unwrap().to_vec();
    damaged[MIB + MIB / 2] ^= 0x40;
    let options = PutOptions {
        attributes,
        ..PutOptions::default()
    };
    raw.put_opts(&path, damaged.into(), options).await.unwrap();

    let mib = MIB as u32;
    assert_eq!(
        store.read_slice(5, size, 0, mib).await.unwrap(),
        data[..MIB]
    );
    let err = store.read_slice(5, size, mib + 10, 100).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Io(ref m) if m.contains("checksum")),
        "{err}"
    );
    assert!(store.read_slice(5, size, 0, size).await.is_err());
    assert_eq!(
        store.read_slice(5, size, 2 * mib, mib).await.unwrap(),
        data[2 * MIB..]
    );
    store.delete_slice(5, size).await.unwrap();
}
