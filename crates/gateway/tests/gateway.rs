//! The gateway over a real volume (SQLite metadata, blocks in a directory), driven by a real S3
//! client (object_store's, which signs with SigV4) on loopback.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use cellar_gateway::{BackendError, Gateway, Grant, Grants, VolumeHandle, Volumes};
use cellar_vfs::{Ctx, FileKind, Vfs, VolumeConfig, ROOT_INO};
use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};

const CTX: Ctx = Ctx {
    uid: 1000,
    gid: 1000,
    pid: 0,
};

struct StaticGrants(HashMap<String, Grant>);

#[async_trait::async_trait]
impl Grants for StaticGrants {
    async fn grant(&self, access_key_id: &str) -> Result<Option<Grant>, BackendError> {
        Ok(self.0.get(access_key_id).cloned())
    }
}

struct OneVolume(Arc<Vfs>);

#[async_trait::async_trait]
impl Volumes for OneVolume {
    async fn open(&self, volume_id: &str) -> Result<VolumeHandle, BackendError> {
        if volume_id != "vol-1" {
            return Err(BackendError::NotFound);
        }
        Ok(Arc::new(self.0.clone()))
    }
}

fn grant(prefix: &str, read_only: bool, expires_at: Option<SystemTime>) -> Grant {
    Grant {
        secret_key: "s3cr3t-s3cr3t-s3cr3t".into(),
        volume_id: "vol-1".into(),
        bucket: "Work_Vol".into(),
        prefix: prefix.into(),
        read_only,
        expires_at,
    }
}

fn client(endpoint: &str, key: &str, secret: &str) -> AmazonS3 {
    AmazonS3Builder::new()
        .with_endpoint(endpoint)
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_bucket_name("Work_Vol")
        .with_access_key_id(key)
        .with_secret_access_key(secret)
        .with_retry(RetryConfig {
            max_retries: 0,
            ..RetryConfig::default()
        })
        .build()
        .unwrap()
}

fn denied<T: std::fmt::Debug>(result: object_store::Result<T>) {
    match result {
        Err(object_store::Error::PermissionDenied { .. }) => {}
        other => panic!("expected 403, got {other:?}"),
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_operations_on_a_volume_with_scoped_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("blocks");
    std::fs::create_dir_all(&store).unwrap();
    let config = VolumeConfig {
        meta_url: format!("sqlite://{}", dir.path().join("meta.db").display()),
        store_url: format!("file://{}", store.display()),
        volume: "vol-1".into(),
        cache_mem_bytes: 16 << 20,
        cache_dir: None,
        cache_disk_bytes: 0,
        mount_point: String::new(),
        store_timeouts: Default::default(),
    };
    let vfs = tokio::task::spawn_blocking(move || Vfs::open_volume(config))
        .await
        .unwrap()
        .unwrap();
    let past = SystemTime::now() - Duration::from_secs(1);
    let grants = StaticGrants(HashMap::from([
        ("RW".to_string(), grant("", false, None)),
        ("RO".to_string(), grant("", true, None)),
        ("PFX".to_string(), grant("team/", false, None)),
        ("OLD".to_string(), grant("", false, Some(past))),
    ]));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let gateway = Gateway::new(Arc::new(grants), Arc::new(OneVolume(vfs.clone())), CTX);
    let serving = tokio::spawn(gateway.serve(listener, async {
        let _ = stopped.await;
    }));
    let secret = "s3cr3t-s3cr3t-s3cr3t";
    let rw = client(&endpoint, "RW", secret);

    // PUT creates the parents; GET (whole, ranged) and HEAD read it back.
    let data = pattern(300_000, 7);
    let key = Path::from("a/b/c.bin");
    rw.put(&key, PutPayload::from(data.clone())).await.unwrap();
    let got = rw.get(&key).await.unwrap().bytes().await.unwrap();
    assert_eq!(&got[..], &data[..]);
    let part = rw.get_range(&key, 1000..70_000).await.unwrap();
    assert_eq!(&part[..], &data[1000..70_000]);
    let meta = rw.head(&key).await.unwrap();
    assert_eq!(meta.size, data.len() as u64);
    assert!(meta.e_tag.is_some());
    assert!(
        rw.get_range(&key, 400_000..400_010).await.is_err(),
        "a range past the end is refused"
    );

    // It is a file of the volume, seen through the same vfs.
    let vfs_check = vfs.clone();
    let size = tokio::task::spawn_blocking(move || {
        let a = vfs_check.lookup(&CTX, ROOT_INO, b"a").unwrap();
        let b = vfs_check.lookup(&CTX, a.ino, b"b").unwrap();
        let c = vfs_check.lookup(&CTX, b.ino, b"c.bin").unwrap();
        assert_eq!(a.kind, FileKind::Directory);
        c.size
    })
    .await
    .unwrap();
    assert_eq!(size, data.len() as u64);

    // Replacing keeps one file, with the new content and a new ETag.
    rw.put(&key, PutPayload::from(b"short".to_vec()))
        .await
        .unwrap();
    let again = rw.head(&key).await.unwrap();
    assert_eq!(again.size, 5);
    assert_ne!(again.e_tag, meta.e_tag);

    // Listings with a delimiter roll directories up into common prefixes.
    rw.put(&Path::from("a/top.txt"), PutPayload::from(b"t".to_vec()))
        .await
        .unwrap();
    let root = rw.list_with_delimiter(None).await.unwrap();
    assert_eq!(root.common_prefixes, vec![Path::from("a")]);
    assert!(root.objects.is_empty());
    let under_a = rw
        .list_with_delimiter(Some(&Path::from("a")))
        .await
        .unwrap();
    assert_eq!(under_a.common_prefixes, vec![Path::from("a/b")]);
    let names: Vec<String> = under_a
        .objects
        .iter()
        .map(|o| o.location.to_string())
        .collect();
    assert_eq!(names, ["a/top.txt"]);
    let all: Vec<String> = rw
        .list(None)
        .map_ok(|o| o.location.to_string())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(all, ["a/b/c.bin", "a/top.txt"]);

    // Multipart: parts appended by reference on completion.
    let big = Path::from("big/m.bin");
    let mut upload = rw.put_multipart(&big).await.unwrap();
    let parts = [
        pattern(5 << 20, 1),
        pattern(5 << 20, 2),
        pattern(123_457, 3),
    ];
    for p in &parts {
        upload.put_part(PutPayload::from(p.clone())).await.unwrap();
    }
    upload.complete().await.unwrap();
    let got = rw.get(&big).await.unwrap().bytes().await.unwrap();
    assert_eq!(got.len(), parts.iter().map(Vec::len).sum::<usize>());
    assert!(got[..] == parts.concat()[..], "the parts in order");
    // An aborted upload leaves nothing.
    let mut aborted = rw.put_multipart(&Path::from("big/gone.bin")).await.unwrap();
    aborted
        .put_part(PutPayload::from(pattern(1000, 9)))
        .await
        .unwrap();
    aborted.abort().await.unwrap();
    assert!(matches!(
        rw.head(&Path::from("big/gone.bin")).await,
        Err(object_store::Error::NotFound { .. })
    ));

    // DELETE removes the file and the directories it leaves empty.
    rw.delete(&key).await.unwrap();
    assert!(matches!(
        rw.get(&key).await,
        Err(object_store::Error::NotFound { .. })
    ));
    let under_a = rw
        .list_with_delimiter(Some(&Path::from("a")))
        .await
        .unwrap();
    assert!(
        under_a.common_prefixes.is_empty(),
        "a/b/ went with its last object"
    );
    rw.delete(&Path::from("never/was")).await.unwrap();

    // Read-only: reads work, writes are refused.
    let ro = client(&endpoint, "RO", secret);
    assert_eq!(
        &ro.get(&big).await.unwrap().bytes().await.unwrap()[..5],
        &parts[0][..5]
    );
    denied(
        ro.put(&Path::from("ro.txt"), PutPayload::from(b"x".to_vec()))
            .await,
    );
    denied(ro.delete(&big).await);
    denied(ro.put_multipart(&Path::from("ro-big")).await);

    // Prefix-scoped: inside the prefix only, and listings show only it.
    let pfx = client(&endpoint, "PFX", secret);
    pfx.put(&Path::from("team/x.txt"), PutPayload::from(b"x".to_vec()))
        .await
        .unwrap();
    denied(
        pfx.put(&Path::from("other/x.txt"), PutPayload::from(b"x".to_vec()))
            .await,
    );
    denied(pfx.get(&big).await);
    let seen = pfx.list_with_delimiter(None).await.unwrap();
    assert_eq!(seen.common_prefixes, vec![Path::from("team")]);
    let everything: Vec<String> = pfx
        .list(None)
        .map_ok(|o| o.location.to_string())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(everything, ["team/x.txt"]);

    // Expired, unknown and wrongly signed: refused.
    denied(client(&endpoint, "OLD", secret).get(&big).await);
    denied(client(&endpoint, "NOPE", secret).get(&big).await);
    denied(client(&endpoint, "RW", "wrong-secret").get(&big).await);

    let _ = stop.send(());
    serving.await.unwrap().unwrap();
    tokio::task::spawn_blocking(move || vfs.shutdown())
        .await
        .unwrap()
        .unwrap();
}
