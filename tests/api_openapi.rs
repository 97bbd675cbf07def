//! The OpenAPI document is generated from the protos, served at /openapi.json, and committed as docs/openapi.json;
//! this test fails when the committed copy is stale. Regenerate with `BOS_UPDATE_OPENAPI=1 cargo test --test
//! api_openapi`.

mod api_support;
mod support;

use api_support::ApiServer;
use bos::api::openapi;
use bos::api::transcode::Rules;

fn generated() -> String {
    let rules = Rules::from_descriptors(bos::proto::descriptor_pool()).unwrap();
    openapi::render(&rules)
}

#[test]
fn committed_document_is_current() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(openapi::COMMITTED_PATH);
    let fresh = generated();
    if std::env::var_os("BOS_UPDATE_OPENAPI").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &fresh).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "{} is stale; run BOS_UPDATE_OPENAPI=1 cargo test --test api_openapi",
        openapi::COMMITTED_PATH
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_document_is_the_generated_one() {
    let server = ApiServer::start().await;
    let response = reqwest::get(server.url("/openapi.json")).await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let served = response.text().await.unwrap();
    assert_eq!(served, generated());
    let doc: serde_json::Value = serde_json::from_str(&served).unwrap();
    let paths: Vec<&String> = doc["paths"].as_object().unwrap().keys().collect();
    assert_eq!(
        paths,
        [
            "/internal/v1/batches/{batch_id}/pipeline-state",
            "/v1/batches/register",
            "/v1/batches/{batch_id}/pipelines",
            "/v1/batches/{batch_id}/retry",
            "/v1/batches/{batch_id}/status",
        ]
    );
    server.shutdown().await;
}
