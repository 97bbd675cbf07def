//! One TCP port for everything: gRPC over HTTP/2 (h2c), HTTP/JSON over HTTP/1.1 or HTTP/2,
//! `GET /healthz` and `GET /metrics`.
//!
//! The tonic services become an axum router, the plain HTTP routes are added beside them, and
//! axum's server detects the protocol per connection.

use std::future::Future;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::{Routes, RoutesBuilder};

use axum::handler::HandlerWithoutStateExt;
use axum::serve::ListenerExt;
use tower::util::BoxCloneSyncService;

use super::health::Health;
use super::metrics;
use super::stack::ApiStack;
use crate::proto::FILE_DESCRIPTOR_SET;

/// Errors of building or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The embedded descriptors could not be loaded into the reflection service.
    #[error("gRPC reflection")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// Accepting or serving connections failed.
    #[error("server I/O")]
    Io(#[from] std::io::Error),
}

/// Adds gRPC server reflection (v1 and v1alpha) describing our services and the health service.
pub fn add_reflection(grpc: &mut RoutesBuilder) -> Result<(), ServerError> {
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    // v1alpha is what older clients (grpcurl, some buf versions) ask for first.
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    grpc.add_service(v1).add_service(v1alpha);
    Ok(())
}

/// The full router: the gRPC `routes`, the `http` routes (HTTP/JSON, added by other modules),
/// `/healthz`, `/metrics`, and a fallback that answers unknown paths in the caller's protocol.
///
/// `api` adds HTTP/JSON transcoding (paths no rule matches still reach the 404 fallback), `/openapi.json`, and the
/// auth and telemetry layers around everything.
pub fn router(grpc: Routes, http: Router, health: Health, api: &ApiStack) -> Router {
    let plain = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .with_state(health);
    let not_found = BoxCloneSyncService::new(not_found.into_service());
    api.finish(grpc.into_axum_router(), http.merge(plain), not_found)
}

/// The last health report: 200 while serving, 503 otherwise, with every dependency's state either way.
async fn healthz(State(health): State<Health>) -> Response {
    let report = health.report();
    let code = if report.status == "SERVING" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(report)).into_response()
}

async fn metrics_text() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics::render(),
    )
        .into_response()
}

/// gRPC callers get `UNIMPLEMENTED` as a gRPC status; everyone else gets HTTP 404 with a JSON
/// `google.rpc.Status` body (code 5 = NOT_FOUND), like every other HTTP/JSON error.
async fn not_found(method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let is_grpc = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"));
    if is_grpc {
        let status = tonic::Status::unimplemented(format!("unknown method {}", uri.path()));
        return status.into_http::<axum::body::Body>().into_response();
    }
    let body = serde_json::json!({
        "code": 5,
        "message": format!("no route for {method} {}", uri.path()),
        "details": [],
    });
    (StatusCode::NOT_FOUND, Json(body)).into_response()
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting connections and
/// lets open requests finish for at most `grace` (long-lived streams would otherwise hold the
/// process for ever).
pub async fn serve<F>(
    listener: TcpListener,
    router: Router,
    shutdown: F,
    grace: Duration,
) -> Result<(), ServerError>
where
    F: Future<Output = ()> + Send + 'static,
{
    let (draining_tx, mut draining_rx) = watch::channel(false);
    // Without TCP_NODELAY a response that spans several segments (RegisterBatch of 1,000 essays) waited for the
    // client's delayed ACK: ~40 ms of a 64 ms call (bos bench register).
    let listener = listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY on a connection");
        }
    });
    let server = axum::serve(listener, router).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = draining_tx.send(true);
    });
    let deadline = async move {
        // Resolves `grace` after the drain started; never if the sender is gone without draining.
        if draining_rx.wait_for(|draining| *draining).await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        result = server => Ok(result?),
        () = deadline => {
            tracing::warn!(?grace, "connections still open after the shutdown grace period; closing");
            Ok(())
        }
    }
}
