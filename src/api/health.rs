//! Process health, reported both by the gRPC `grpc.health.v1.Health` service and by `GET /healthz`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

/// Shared health state; clones observe and change the same status.
#[derive(Clone, Debug)]
pub struct Health {
    reporter: HealthReporter,
    serving: Arc<AtomicBool>,
}

impl Health {
    /// Creates the state (NOT_SERVING until [`Health::set_serving`]) and the gRPC health service.
    pub async fn new() -> (
        Self,
        HealthServer<impl tonic_health::pb::health_server::Health>,
    ) {
        let (reporter, service) = tonic_health::server::health_reporter();
        let health = Self {
            reporter,
            serving: Arc::new(AtomicBool::new(false)),
        };
        health.set_serving(false).await;
        (health, service)
    }

    /// Marks the whole server (service name "") serving or not serving.
    pub async fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::SeqCst);
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status("", status).await;
    }

    /// Whether the server is currently serving.
    pub fn is_serving(&self) -> bool {
        self.serving.load(Ordering::SeqCst)
    }
}
