//! Assembles the API around the server's router: our gRPC services, the HTTP/JSON transcoder as the fallback
//! (unknown paths still reach the server's 404), `/openapi.json`, and the auth and telemetry layers that every
//! request — gRPC or HTTP — passes.

use std::sync::Arc;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tonic::service::RoutesBuilder;
use tower::util::BoxCloneSyncService;

use super::auth::{AuthError, AuthLayer, Authenticator};
use super::batch_service::BatchApi;
use super::internal_service::InternalApi;
use super::telemetry::TelemetryLayer;
use super::transcode::{HttpService, Rules, TranscodeError, Transcoder};
use crate::config::Config;
use crate::core::orchestrator::Orchestrator;
use crate::notify::feed::ChangeFeed;
use crate::proto::huleedu::bos::v1::batch_internal_service_server::BatchInternalServiceServer;
use crate::proto::huleedu::bos::v1::batch_service_server::BatchServiceServer;

#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Transcode(#[from] TranscodeError),
}

/// What the API needs beyond the services: verified credentials, the HTTP rules and the OpenAPI text.
#[derive(Debug, Clone)]
pub struct ApiStack {
    auth: Arc<Authenticator>,
    rules: Arc<Rules>,
    openapi: Arc<String>,
}

impl ApiStack {
    pub fn new(config: &Config) -> Result<Self, StackError> {
        // Install the recorder now: what is recorded before it exists is lost.
        super::metrics::prometheus_handle();
        let auth = Arc::new(Authenticator::new(
            &config.jwt,
            config.internal_api_key.as_ref(),
        )?);
        let rules = Arc::new(Rules::from_descriptors(crate::proto::descriptor_pool())?);
        let openapi = Arc::new(super::openapi::render(&rules));
        Ok(Self {
            auth,
            rules,
            openapi,
        })
    }

    /// Registers `BatchService` and `BatchInternalService`.
    pub fn add_services(
        grpc: &mut RoutesBuilder,
        orchestrator: Arc<Orchestrator>,
        feed: ChangeFeed,
    ) {
        grpc.add_service(BatchServiceServer::new(BatchApi::new(
            Arc::clone(&orchestrator),
            feed,
        )))
        .add_service(BatchInternalServiceServer::new(InternalApi::new(
            orchestrator,
        )));
    }

    /// The full router: `grpc` (tonic's routes as a router) and `rest` (plain HTTP routes), HTTP/JSON transcoding
    /// for every other path (then `not_found`), `/openapi.json`, auth and telemetry around all of it.
    pub fn finish(&self, grpc: Router, rest: Router, not_found: HttpService) -> Router {
        let transcoder = Transcoder::new(
            Arc::clone(&self.rules),
            BoxCloneSyncService::new(grpc.clone()),
            not_found,
        );
        let openapi = Arc::clone(&self.openapi);
        grpc.merge(rest)
            .route(
                "/openapi.json",
                get(move || {
                    let body = openapi.as_ref().clone();
                    async move { ([(header::CONTENT_TYPE, "application/json")], body).into_response() }
                }),
            )
            .fallback_service(transcoder)
            .layer(AuthLayer::new(Arc::clone(&self.auth)))
            .layer(TelemetryLayer)
    }
}
