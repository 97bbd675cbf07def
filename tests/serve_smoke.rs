//! `bos serve` (embedded defaults) on port 0, spoken to through real clients: gRPC health and reflection over h2c,
//! `/healthz`, `/metrics` and unknown paths over HTTP/1.1, then a graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bos::config::{Config, ConfigLayer};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

struct Server {
    addr: SocketAddr,
    data_dir: PathBuf,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), bos::app::AppError>>,
}

/// Starts the server as `bos serve` would with nothing configured (embedded SQLite file, embedded
/// broker, development auth), in a data directory of its own, and waits until `/healthz` answers.
async fn start() -> Server {
    let data_dir = std::env::temp_dir().join(format!("bos-smoke-{}", uuid::Uuid::now_v7()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = Config::from_layer(ConfigLayer {
        listen_addr: Some(addr.to_string()),
        data_dir: Some(data_dir.clone()),
        ..Default::default()
    })
    .unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(bos::app::run(listener, config, async move {
        let _ = stopped.await;
    }));
    let server = Server {
        addr,
        data_dir,
        stop,
        task,
    };
    let http = reqwest::Client::new();
    for _ in 0..600 {
        assert!(
            !server.task.is_finished(),
            "the server stopped while starting"
        );
        if let Ok(response) = http.get(server.url("/healthz")).send().await {
            if response.status().is_success() {
                return server;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the server did not become ready within 30 s");
}

impl Server {
    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn shutdown(self) {
        self.stop.send(()).unwrap();
        let result = tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("server stops within the grace period")
            .unwrap();
        result.unwrap();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

#[tokio::test]
async fn grpc_health_check_answers_serving() {
    let server = start().await;
    let mut client = HealthClient::new(server.channel().await);
    let response = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.status(), ServingStatus::Serving);

    let unknown = client
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    server.shutdown().await;
}

#[tokio::test]
async fn healthz_metrics_and_unknown_paths_over_http() {
    let server = start().await;
    let http = reqwest::Client::new();

    let healthz = http.get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(healthz.status(), reqwest::StatusCode::OK);
    let body: serde_json::Value = healthz.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({
            "status": "SERVING",
            "checks": {"database": "ok", "broker": "ok", "redis": "disabled"}
        })
    );

    let metrics = http.get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), reqwest::StatusCode::OK);
    let text = metrics.text().await.unwrap();
    assert!(text.contains("bos_build_info"), "{text}");

    let missing = http.get(server.url("/no/such/path")).send().await.unwrap();
    assert_eq!(missing.status(), reqwest::StatusCode::NOT_FOUND);
    assert_eq!(
        missing.headers()[reqwest::header::CONTENT_TYPE],
        "application/json"
    );
    let status: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(status["code"], 5);
    assert_eq!(status["message"], "no route for GET /no/such/path");
    assert!(status["details"].as_array().unwrap().is_empty());
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_grpc_method_is_unimplemented_not_http_404() {
    let server = start().await;
    let mut client = tonic::client::Grpc::new(server.channel().await);
    client.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/no.such.Service/Method");
    let codec = tonic_prost::ProstCodec::<HealthCheckRequest, HealthCheckRequest>::default();
    let err = client
        .unary(
            tonic::Request::new(HealthCheckRequest::default()),
            path,
            codec,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    server.shutdown().await;
}

#[tokio::test]
async fn reflection_lists_our_services() {
    use tokio_stream::StreamExt;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let server = start().await;
    let mut client = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "huleedu.bos.v1.BatchService",
        "huleedu.bos.v1.BatchInternalService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
    drop(responses);
    server.shutdown().await;
}

#[tokio::test]
async fn shutdown_stops_accepting_connections() {
    let server = start().await;
    let url = server.url("/healthz");
    server.shutdown().await;
    let after = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(after.is_err(), "server still answers after shutdown");
}
