//! Request ids, Prometheus metrics with bounded labels, and health over the real port.

mod api_support;
mod support;

use api_support::{authed, ApiServer};
use bos::proto::huleedu::bos::v1 as pb;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_ids_metrics_and_health() {
    let server = ApiServer::start().await;
    let batch_id = server.ready_batch("frank", 1).await.to_string();
    let http = reqwest::Client::new();

    // The caller's request id is echoed; without one, one is generated.
    let response = http
        .get(server.url(&format!("/v1/batches/{batch_id}/status")))
        .header("authorization", ApiServer::bearer("frank"))
        .header("x-request-id", "req-abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.headers()["x-request-id"], "req-abc-123");
    let response = http.get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(response.headers()["x-request-id"].len(), 36);

    let mut grpc = server.batches().await;
    let mut request = authed(
        "frank",
        pb::GetBatchStatusRequest {
            batch_id: batch_id.clone(),
        },
    );
    request
        .metadata_mut()
        .insert("x-request-id", "grpc-req-7".parse().unwrap());
    let answer = grpc.get_batch_status(request).await.unwrap();
    assert_eq!(answer.metadata().get("x-request-id").unwrap(), "grpc-req-7");
    // Errors are counted with their code too.
    let missing = uuid::Uuid::now_v7().to_string();
    grpc.get_batch_status(authed(
        "frank",
        pb::GetBatchStatusRequest { batch_id: missing },
    ))
    .await
    .unwrap_err();

    let health = HealthClient::new(server.channel().await)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, ServingStatus::Serving as i32);

    let metrics = http
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let has = |needles: &[&str]| {
        metrics
            .lines()
            .any(|l| l.starts_with("requests_total{") && needles.iter().all(|n| l.contains(n)))
    };
    assert!(
        has(&[
            "transport=\"http\"",
            "method=\"huleedu.bos.v1.BatchService/GetBatchStatus\"",
            "code=\"200\""
        ]),
        "{metrics}"
    );
    assert!(
        has(&[
            "transport=\"grpc\"",
            "method=\"huleedu.bos.v1.BatchService/GetBatchStatus\"",
            "code=\"0\""
        ]),
        "{metrics}"
    );
    assert!(
        has(&[
            "transport=\"grpc\"",
            "method=\"huleedu.bos.v1.BatchService/GetBatchStatus\"",
            "code=\"5\""
        ]),
        "{metrics}"
    );
    assert!(
        metrics.contains("request_duration_seconds_bucket{"),
        "a histogram: {metrics}"
    );
    assert!(
        !metrics.contains(&batch_id),
        "batch ids never become labels"
    );
    server.shutdown().await;
}
