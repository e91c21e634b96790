//! Volumes on S3: the server configured with an s3:// store (Ceph RGW from
//! tests/harness/rgw.sh: source its env file for CELLAR_TEST_S3_URL, AWS_ACCESS_KEY_ID and
//! AWS_SECRET_ACCESS_KEY). Deleting a volume must leave nothing of it in the bucket.

mod common;

use common::TestServer;
use reqwest::StatusCode;

/// Every object under the store URL.
fn list_bucket(store_url: &str) -> Vec<String> {
    let store_url = store_url.to_string();
    // The block store runs its own runtime: keep it off the test's.
    std::thread::spawn(move || {
        let options = cellar_store::StoreOptions {
            block_size: 4 << 20,
            cache_mem_bytes: 0,
            cache_dir: None,
            cache_disk_bytes: 0,
            max_retries: 3,
            timeouts: Default::default(),
        };
        let store = cellar_store::BlockStore::open(&store_url, "", options).unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let objects = runtime.block_on(store.list()).unwrap();
        objects.into_iter().map(|o| o.key).collect()
    })
    .join()
    .unwrap()
}

#[tokio::test]
async fn volume_deletion_empties_the_bucket() {
    let store_url = common::s3_store_url();
    let server = TestServer::start_with(|config| config.store_url = store_url.clone()).await;
    let volume = server.create_volume("on-s3").await;
    let id = volume["id"].as_str().unwrap();
    common::write_into_volume(&server, id, "big", vec![3u8; 9 << 20]);
    let objects = list_bucket(&store_url);
    assert!(
        !objects.is_empty(),
        "a 9 MiB file is stored in the bucket: {objects:?}"
    );

    let (status, _) = server.delete(&format!("/api/volumes/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    server
        .wait_for(&format!("/api/volumes/{id}"), "state", "deleted")
        .await;
    assert_eq!(list_bucket(&store_url), Vec::<String>::new());
    assert!(!server.volume_db(id).exists());
    server.stop().await;
}
