//! The S3 gateway of a real server (`s3_listen`): credentials minted, listed and revoked
//! through the API, used by a real S3 client (object_store's, SigV4) on the gateway's address,
//! and the same files seen through the file API.

mod common;

use common::{Control, TestServer};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload, RetryConfig};
use reqwest::StatusCode;
use serde_json::{json, Value};

fn client(cred: &Value) -> AmazonS3 {
    AmazonS3Builder::new()
        .with_endpoint(cred["endpoint"].as_str().unwrap())
        .with_allow_http(true)
        .with_region(cred["region"].as_str().unwrap())
        .with_bucket_name(cred["bucket"].as_str().unwrap())
        .with_access_key_id(cred["accessKeyId"].as_str().unwrap())
        .with_secret_access_key(cred["secretAccessKey"].as_str().unwrap())
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

async fn gateway_credentials(control: Control) {
    let server = TestServer::start_on_with(control, |config| {
        config.s3_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let (status, doc) = server.get("/api/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    for path in [
        "/api/volumes/{volumeId}/s3-credentials",
        "/api/volumes/{volumeId}/s3-credentials/{accessKeyId}",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} is documented");
    }
    let volume = server.create_volume("s3-vol").await;
    let id = volume["id"].as_str().unwrap();
    let creds = format!("/api/volumes/{id}/s3-credentials");

    let (status, rw) = server.post(&creds, &json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{rw}");
    assert_eq!(rw["bucket"], "s3-vol");
    assert_eq!(rw["prefix"], "");
    assert_eq!(rw["readOnly"], false);
    assert!(rw["endpoint"]
        .as_str()
        .unwrap()
        .starts_with("http://127.0.0.1:"));
    for bad in [
        json!({"prefix": "/x"}),
        json!({"expiresInSeconds": 0}),
        json!({"readOnly": "yes"}),
        json!({"unknown": 1}),
    ] {
        let (status, body) = server.post(&creds, &bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    let (status, _) = server
        .post("/api/volumes/nope/s3-credentials", &json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Written through the gateway, read through the file API (one open volume, one vfs).
    let s3 = client(&rw);
    s3.put(
        &Path::from("dir/hello.txt"),
        PutPayload::from(b"hello".to_vec()),
    )
    .await
    .unwrap();
    let response = server
        .http
        .get(server.url(&format!(
            "/api/volumes/{id}/files/content?path=/dir/hello.txt"
        )))
        .bearer_auth(&server.key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(&response.bytes().await.unwrap()[..], b"hello");

    let (_, ro) = server.post(&creds, &json!({"readOnly": true})).await;
    let ro_client = client(&ro);
    assert_eq!(
        &ro_client
            .get(&Path::from("dir/hello.txt"))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()[..],
        b"hello"
    );
    denied(
        ro_client
            .put(&Path::from("dir/no.txt"), PutPayload::from(b"x".to_vec()))
            .await,
    );
    let (_, scoped) = server.post(&creds, &json!({"prefix": "dir/"})).await;
    let scoped_client = client(&scoped);
    scoped_client
        .put(&Path::from("dir/ok.txt"), PutPayload::from(b"ok".to_vec()))
        .await
        .unwrap();
    denied(
        scoped_client
            .put(&Path::from("other.txt"), PutPayload::from(b"x".to_vec()))
            .await,
    );

    // Listed without secrets; a revoked credential is refused from its next request on.
    let (status, listed) = server.get(&creds).await;
    assert_eq!(status, StatusCode::OK);
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 3);
    assert!(listed.iter().all(|c| c.get("secretAccessKey").is_none()));
    let revoke = format!("{creds}/{}", rw["accessKeyId"].as_str().unwrap());
    let (status, _) = server.delete(&revoke).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    denied(s3.get(&Path::from("dir/hello.txt")).await);
    let (status, _) = server.delete(&revoke).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // An expired credential is refused too.
    let (_, short) = server.post(&creds, &json!({"expiresInSeconds": 1})).await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    denied(client(&short).get(&Path::from("dir/hello.txt")).await);
}

on_both_databases!(gateway_credentials);

/// Without `s3_listen` the endpoint says so instead of minting useless credentials.
#[tokio::test]
async fn minting_without_a_gateway_is_a_conflict() {
    let server = TestServer::start().await;
    let volume = server.create_volume("no-gw").await;
    let (status, body) = server
        .post(
            &format!(
                "/api/volumes/{}/s3-credentials",
                volume["id"].as_str().unwrap()
            ),
            &json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["code"], "S3_GATEWAY_DISABLED");
}
