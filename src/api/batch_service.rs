//! `huleedu.bos.v1.BatchService`: decode → core → encode, nothing more. The caller is the verified `Identity` the
//! auth layer put in the request; ownership is the core's check (someone else's batch is NotFound).

use std::pin::Pin;
use std::sync::Arc;

use chrono::Utc;
use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::auth::Identity;
use super::errors::{to_status, ApiError};
use super::views::{batch_view, course_code_text, parse_phase, phase_name, run_status, timestamp};
use crate::core::ids::{BatchId, PhaseName, RunId};
use crate::core::input::Actor;
use crate::core::model::{BatchAggregate, RunStatus};
use crate::core::orchestrator::{Orchestrator, RequestOrigin};
use crate::core::registration::{validate, RawRegistration};
use crate::notify::feed::ChangeFeed;
use crate::proto::huleedu::bos::v1 as pb;
use crate::proto::huleedu::bos::v1::batch_service_server::BatchService;

/// How many views a slow watcher may have queued before the stream waits for it.
const WATCH_BUFFER: usize = 16;

pub struct BatchApi {
    orchestrator: Arc<Orchestrator>,
    feed: ChangeFeed,
}

impl BatchApi {
    pub fn new(orchestrator: Arc<Orchestrator>, feed: ChangeFeed) -> Self {
        Self { orchestrator, feed }
    }
}

fn caller<T>(request: &Request<T>) -> Result<Identity, Status> {
    request
        .extensions()
        .get::<Identity>()
        .cloned()
        .ok_or_else(|| to_status(ApiError::Unauthenticated("missing credentials".to_owned())))
}

/// Parses the batch id and a phase field together, so a request with both wrong names both violations.
fn batch_and_phase(
    batch_id: &str,
    (field, phase): (&'static str, i32),
) -> Result<(BatchId, PhaseName), Status> {
    match (
        BatchId::parse("batch_id", batch_id),
        parse_phase(field, phase),
    ) {
        (Ok(batch_id), Ok(phase)) => Ok((batch_id, phase)),
        (b, p) => Err(to_status(
            b.err().into_iter().chain(p.err()).collect::<Vec<_>>(),
        )),
    }
}

fn optional(text: String) -> Option<String> {
    (!text.trim().is_empty()).then_some(text)
}

#[tonic::async_trait]
impl BatchService for BatchApi {
    async fn register_batch(
        &self,
        request: Request<pb::RegisterBatchRequest>,
    ) -> Result<Response<pb::RegisterBatchResponse>, Status> {
        let identity = caller(&request)?;
        let body = request.into_inner();
        let raw = RawRegistration {
            expected_essay_count: i64::from(body.expected_essay_count),
            course_code: course_code_text(body.course_code),
            class_id: body.class_id,
            student_prompt_ref: optional(body.student_prompt_ref),
            assignment_id: optional(body.assignment_id),
            cj_default_llm_model: optional(body.cj_default_llm_model),
            cj_default_temperature: body.cj_default_temperature,
        };
        let valid = validate(raw, identity.user, identity.org).map_err(to_status)?;
        let registered = self
            .orchestrator
            .register_batch(valid)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::RegisterBatchResponse {
            batch_id: registered.batch_id.to_string(),
            correlation_id: registered.correlation_id.to_string(),
            essay_ids: registered
                .essay_ids
                .iter()
                .map(ToString::to_string)
                .collect(),
        }))
    }

    async fn get_batch_status(
        &self,
        request: Request<pb::GetBatchStatusRequest>,
    ) -> Result<Response<pb::GetBatchStatusResponse>, Status> {
        let actor = Actor::User(caller(&request)?.user);
        let batch_id =
            BatchId::parse("batch_id", &request.get_ref().batch_id).map_err(to_status)?;
        let aggregate = self
            .orchestrator
            .batch_for(&actor, batch_id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::GetBatchStatusResponse {
            batch: Some(batch_view(&aggregate)),
        }))
    }

    async fn retry_phase(
        &self,
        request: Request<pb::RetryPhaseRequest>,
    ) -> Result<Response<pb::RetryPhaseResponse>, Status> {
        let actor = Actor::User(caller(&request)?.user);
        let body = request.into_inner();
        let (batch_id, phase) = batch_and_phase(&body.batch_id, ("phase", body.phase))?;
        let accepted = self
            .orchestrator
            .retry_phase(
                actor,
                batch_id,
                phase,
                optional(body.reason),
                RequestOrigin::default(),
            )
            .await
            .map_err(to_status)?;
        let attempt = accepted
            .attempts
            .get(&phase)
            .map_or(0, |a| i32::try_from(a.get()).unwrap_or(i32::MAX));
        Ok(Response::new(pb::RetryPhaseResponse {
            run_id: accepted.run_id.to_string(),
            correlation_id: accepted.correlation_id.to_string(),
            phases: accepted
                .phases
                .iter()
                .map(|p| phase_name(*p) as i32)
                .collect(),
            attempt,
        }))
    }

    async fn request_pipeline(
        &self,
        request: Request<pb::RequestPipelineRequest>,
    ) -> Result<Response<pb::RequestPipelineResponse>, Status> {
        let actor = Actor::User(caller(&request)?.user);
        let body = request.into_inner();
        let (batch_id, requested) = batch_and_phase(
            &body.batch_id,
            ("requested_pipeline", body.requested_pipeline),
        )?;
        let accepted = self
            .orchestrator
            .request_pipeline(
                actor,
                batch_id,
                requested,
                RequestOrigin::default().with_prompt_ref(optional(body.prompt_ref)),
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::RequestPipelineResponse {
            run_id: accepted.run_id.to_string(),
            correlation_id: accepted.correlation_id.to_string(),
            phases: accepted
                .phases
                .iter()
                .map(|p| phase_name(*p) as i32)
                .collect(),
            status: run_status(accepted.status) as i32,
        }))
    }

    type WatchBatchStream =
        Pin<Box<dyn Stream<Item = Result<pb::WatchBatchResponse, Status>> + Send + 'static>>;

    async fn watch_batch(
        &self,
        request: Request<pb::WatchBatchRequest>,
    ) -> Result<Response<Self::WatchBatchStream>, Status> {
        let actor = Actor::User(caller(&request)?.user);
        let batch_id =
            BatchId::parse("batch_id", &request.get_ref().batch_id).map_err(to_status)?;
        // Subscribe before reading, so a change committed in between is not missed.
        let changes = self.feed.subscribe();
        let current = self
            .orchestrator
            .batch_for(&actor, batch_id)
            .await
            .map_err(to_status)?;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let watch = Watch {
            orchestrator: Arc::clone(&self.orchestrator),
            actor,
            batch_id,
            tx,
        };
        tokio::spawn(watch.run(current, changes));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// One WatchBatch stream: the current view, then a view per committed change, until the watched run ends, the
/// batch becomes terminal, or the client leaves. The watched run is the active one, or the next one to start.
struct Watch {
    orchestrator: Arc<Orchestrator>,
    actor: Actor,
    batch_id: BatchId,
    tx: mpsc::Sender<Result<pb::WatchBatchResponse, Status>>,
}

enum Next {
    Continue,
    Stop,
}

impl Watch {
    async fn run(
        self,
        current: BatchAggregate,
        mut changes: broadcast::Receiver<crate::notify::feed::Change>,
    ) {
        let mut watched = current.active_run().map(|r| r.id);
        let mut last_version = current.batch.version;
        if let Next::Stop = self.send(&current, &mut watched).await {
            return;
        }
        loop {
            let aggregate = tokio::select! {
                () = self.tx.closed() => return,
                change = changes.recv() => match change {
                    Ok(change) if change.batch_id != self.batch_id => continue,
                    Ok(change) => match change.snapshot {
                        Some(snapshot) => snapshot.as_ref().clone(),
                        None => match self.reload().await { Some(a) => a, None => return },
                    },
                    // Fell behind: the latest state is what is left to show.
                    Err(broadcast::error::RecvError::Lagged(_)) => match self.reload().await {
                        Some(a) => a,
                        None => return,
                    },
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            };
            // Snapshots of concurrent commits may arrive out of order; never show an older state after a newer one.
            if aggregate.batch.version <= last_version {
                continue;
            }
            last_version = aggregate.batch.version;
            if let Next::Stop = self.send(&aggregate, &mut watched).await {
                return;
            }
        }
    }

    async fn reload(&self) -> Option<BatchAggregate> {
        match self
            .orchestrator
            .batch_for(&self.actor, self.batch_id)
            .await
        {
            Ok(aggregate) => Some(aggregate),
            Err(error) => {
                let _ = self.tx.send(Err(to_status(error))).await;
                None
            }
        }
    }

    async fn send(&self, aggregate: &BatchAggregate, watched: &mut Option<RunId>) -> Next {
        let view = pb::WatchBatchResponse {
            batch: Some(batch_view(aggregate)),
            observed_at: Some(timestamp(Utc::now())),
        };
        if self.tx.send(Ok(view)).await.is_err() {
            return Next::Stop;
        }
        if aggregate.batch.status.is_terminal() {
            return Next::Stop;
        }
        if watched.is_none() {
            *watched = aggregate.active_run().map(|r| r.id);
        }
        let ended = watched.is_some_and(|id| {
            aggregate
                .runs
                .iter()
                .find(|r| r.id == id)
                .is_some_and(|r| r.status != RunStatus::Running)
        });
        if ended {
            Next::Stop
        } else {
            Next::Continue
        }
    }
}
