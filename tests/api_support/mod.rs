//! The API tests' server: `bos::app::run_observed` (the code path of `bos serve`) on port 0 over a fresh
//! PostgreSQL database, with real tonic and reqwest clients. Include with `mod api_support;` (after `mod support;`).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bos::app::Handles;
use bos::config::{Config, ConfigLayer, JwtKey, Secret};
use bos::core::ids::BatchId;
use bos::core::input::Actor;
use bos::core::model::BatchAggregate;
use bos::proto::huleedu::bos::v1 as pb;
use bos::proto::huleedu::bos::v1::batch_internal_service_client::BatchInternalServiceClient;
use bos::proto::huleedu::bos::v1::batch_service_client::BatchServiceClient;
use bos::store::Store;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use crate::support::{fixtures, TestDb};

pub const SECRET: &str = "api-tests-hs256-secret-0123456789";
pub const INTERNAL_KEY: &str = "api-tests-internal-key-0123456789";

pub struct ApiServer {
    pub addr: SocketAddr,
    pub handles: Handles,
    pub db: TestDb,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), bos::app::AppError>>>,
}

impl ApiServer {
    pub async fn start() -> ApiServer {
        let db = TestDb::postgres().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = Config::from_layer(ConfigLayer {
            listen_addr: Some(addr.to_string()),
            database_url: Some(db.url.clone()),
            jwt_secret: Some(SECRET.to_owned()),
            internal_api_key: Some(INTERNAL_KEY.to_owned()),
            ..Default::default()
        })
        .unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let (handles_tx, handles_rx) = oneshot::channel::<Handles>();
        let task = tokio::spawn(bos::app::run_observed(
            listener,
            config,
            async move {
                let _ = stopped.await;
            },
            move |handles| {
                let _ = handles_tx.send(handles);
            },
        ));
        let handles = tokio::time::timeout(Duration::from_secs(60), handles_rx)
            .await
            .expect("the server starts")
            .expect("the server hands out its handles");
        let server = ApiServer {
            addr,
            handles,
            db,
            stop: Some(stop),
            task: Some(task),
        };
        server.wait_ready().await;
        server
    }

    async fn wait_ready(&self) {
        let http = reqwest::Client::new();
        for _ in 0..200 {
            if let Ok(r) = http.get(self.url("/healthz")).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("server never became healthy");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn token(user: &str) -> String {
        bos::api::auth::mint_token(
            &JwtKey::Secret(Secret::new(SECRET)),
            user,
            Some("org-1"),
            600,
        )
        .unwrap()
    }

    pub fn bearer(user: &str) -> String {
        format!("Bearer {}", Self::token(user))
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn batches(&self) -> BatchServiceClient<Channel> {
        BatchServiceClient::new(self.channel().await)
    }

    pub async fn internal(&self) -> BatchInternalServiceClient<Channel> {
        BatchInternalServiceClient::new(self.channel().await)
    }

    /// A separate store on the server's database, for looking at what was (not) stored.
    pub async fn store(&self) -> Store {
        self.db.store().await
    }

    pub async fn load(&self, batch_id: BatchId) -> BatchAggregate {
        self.handles
            .orchestrator
            .batch_for(&Actor::Internal, batch_id)
            .await
            .expect("batch exists")
    }

    /// Registers a GUEST batch of `essays` for `user` over gRPC and provisions its content, so it is ready for
    /// pipelines. Returns its id.
    pub async fn ready_batch(&self, user: &str, essays: i32) -> BatchId {
        let mut client = self.batches().await;
        let answer = client
            .register_batch(authed(
                user,
                pb::RegisterBatchRequest {
                    expected_essay_count: essays,
                    course_code: bos::proto::huleedu::common::v1::CourseCode::Eng5 as i32,
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        let batch_id = BatchId::parse("batch_id", &answer.batch_id).unwrap();
        let agg = self.load(batch_id).await;
        self.handles
            .orchestrator
            .handle(batch_id, fixtures::provisioned(&agg), None)
            .await
            .unwrap();
        batch_id
    }

    /// A ready GUEST batch of `user`'s whose spellcheck run failed (every essay), so a retry is legal for them.
    pub async fn failed_batch(&self, user: &str, essays: i32) -> BatchId {
        use bos::core::ids::PhaseName as CorePhase;
        use bos::core::input::{Input, ReportedPhaseStatus};
        let batch_id = self.ready_batch(user, essays).await;
        self.batches()
            .await
            .request_pipeline(authed(
                user,
                pb::RequestPipelineRequest {
                    batch_id: batch_id.to_string(),
                    requested_pipeline: bos::proto::huleedu::common::v1::PhaseName::Spellcheck
                        as i32,
                    prompt_ref: String::new(),
                },
            ))
            .await
            .unwrap();
        let agg = self.load(batch_id).await;
        let attempt = agg
            .active_run()
            .unwrap()
            .phase(CorePhase::Spellcheck)
            .unwrap()
            .attempt;
        let failed = Input::PhaseOutcome {
            phase: CorePhase::Spellcheck,
            attempt,
            status: ReportedPhaseStatus::FailedCritically,
            processed: vec![],
            failed: agg.essays.iter().map(|e| e.id).collect(),
        };
        self.handles
            .orchestrator
            .handle(batch_id, failed, None)
            .await
            .unwrap();
        batch_id
    }

    /// Waits until every dispatched phase of the active run is IN_PROGRESS (the relay reports each command it
    /// delivered), recording the delivery itself if the relay has not within a few seconds. After this the batch
    /// changes only when the test changes it.
    pub async fn settle(&self, batch_id: BatchId) {
        use bos::core::model::PhaseStatus;
        for _ in 0..100 {
            let agg = self.load(batch_id).await;
            let waiting = agg
                .active_run()
                .map(|r| {
                    r.phases
                        .iter()
                        .any(|p| p.status == PhaseStatus::DispatchInitiated)
                })
                .unwrap_or(false);
            if !waiting {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let agg = self.load(batch_id).await;
        let dispatched: Vec<_> = agg
            .active_run()
            .map(|r| {
                r.phases
                    .iter()
                    .filter(|p| p.status == PhaseStatus::DispatchInitiated)
                    .map(|p| (p.phase, p.attempt))
                    .collect()
            })
            .unwrap_or_default();
        for (phase, attempt) in dispatched {
            let _ = self
                .handles
                .orchestrator
                .handle(
                    batch_id,
                    bos::core::input::Input::PhaseCommandDelivered { phase, attempt },
                    None,
                )
                .await;
        }
    }

    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A gRPC request carrying `user`'s bearer token.
pub fn authed<T>(user: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", ApiServer::bearer(user).parse().unwrap());
    request
}

/// A gRPC request carrying the internal API key `key`.
pub fn internal<T>(key: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-internal-api-key", key.parse().unwrap());
    request
}

/// A generated message as proto3 JSON, the way the HTTP side renders it.
pub fn to_json<M: prost::Message>(full_name: &str, message: &M) -> serde_json::Value {
    let descriptor = bos::proto::descriptor_pool()
        .get_message_by_name(full_name)
        .unwrap();
    let dynamic =
        prost_reflect::DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())
            .unwrap();
    serde_json::to_value(&dynamic).unwrap()
}
