//! WatchBatch streams the current view and then every transition of the run, in commit order, and ends with the run
//! (or when the batch becomes terminal). The run is driven through the same orchestrator the server uses.

mod api_support;
mod support;

use std::time::Duration;

use api_support::{authed, ApiServer};
use bos::core::ids::{BatchId, EssayId, PhaseName as CorePhase, TextRef};
use bos::core::input::{Actor, Input, ProcessedEssay, ReportedPhaseStatus};
use bos::proto::huleedu::bos::v1 as pb;
use bos::proto::huleedu::common::v1::PhaseName;
use tokio_stream::StreamExt;

/// (batch status, current run status, every phase's status) of one streamed view.
type Shape = (String, Option<String>, Vec<String>);

fn shape(view: &pb::BatchView) -> Shape {
    use bos::proto::huleedu::common::v1::{
        BatchStatus, PipelineExecutionStatus, PipelineRunStatus,
    };
    let name = |n: &str| n.to_owned();
    let status = BatchStatus::try_from(view.status)
        .map(|s| name(s.as_str_name()))
        .unwrap_or_default();
    let run = view.current_run.as_ref();
    (
        status,
        run.map(|r| {
            PipelineRunStatus::try_from(r.status)
                .map(|s| name(s.as_str_name()))
                .unwrap_or_default()
        }),
        run.map(|r| {
            r.phases
                .iter()
                .map(|p| {
                    PipelineExecutionStatus::try_from(p.status)
                        .map(|s| name(s.as_str_name()))
                        .unwrap_or_default()
                })
                .collect()
        })
        .unwrap_or_default(),
    )
}

fn s(batch: &str, run: Option<&str>, phases: &[&str]) -> Shape {
    (
        format!("BATCH_STATUS_{batch}"),
        run.map(|r| format!("PIPELINE_RUN_STATUS_{r}")),
        phases
            .iter()
            .map(|p| format!("PIPELINE_EXECUTION_STATUS_{p}"))
            .collect(),
    )
}

async fn outcome(
    server: &ApiServer,
    batch_id: BatchId,
    phase: CorePhase,
    processed: &[EssayId],
    failed: &[EssayId],
) {
    let agg = server.load(batch_id).await;
    let attempt = agg
        .active_run()
        .and_then(|r| r.phase(phase))
        .map(|p| p.attempt)
        .unwrap();
    let status = if failed.is_empty() {
        ReportedPhaseStatus::CompletedSuccessfully
    } else {
        ReportedPhaseStatus::CompletedWithFailures
    };
    server
        .handles
        .orchestrator
        .handle(
            batch_id,
            Input::PhaseOutcome {
                phase,
                attempt,
                status,
                processed: processed
                    .iter()
                    .map(|id| ProcessedEssay {
                        essay_id: *id,
                        output_ref: Some(
                            TextRef::parse("output_ref", &format!("{phase}-{id}")).unwrap(),
                        ),
                    })
                    .collect(),
                failed: failed.to_vec(),
            },
            None,
        )
        .await
        .unwrap();
}

async fn delivered(server: &ApiServer, batch_id: BatchId, phase: CorePhase) {
    let agg = server.load(batch_id).await;
    let attempt = agg
        .active_run()
        .and_then(|r| r.phase(phase))
        .map(|p| p.attempt)
        .unwrap();
    server
        .handles
        .orchestrator
        .handle(
            batch_id,
            Input::PhaseCommandDelivered { phase, attempt },
            None,
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_receives_every_transition_of_a_run_in_order() {
    let server = ApiServer::start().await;
    let batch_id = server.ready_batch("dave", 3).await;
    let essays: Vec<EssayId> = server
        .load(batch_id)
        .await
        .essays
        .iter()
        .map(|e| e.id)
        .collect();
    let mut grpc = server.batches().await;
    let mut stream = grpc
        .watch_batch(authed(
            "dave",
            pb::WatchBatchRequest {
                batch_id: batch_id.to_string(),
            },
        ))
        .await
        .unwrap()
        .into_inner();

    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(
        shape(first.batch.as_ref().unwrap()),
        s("READY_FOR_PIPELINE_EXECUTION", None, &[])
    );
    assert!(first.observed_at.is_some());

    grpc.request_pipeline(authed(
        "dave",
        pb::RequestPipelineRequest {
            batch_id: batch_id.to_string(),
            requested_pipeline: PhaseName::Nlp as i32,
            prompt_ref: String::new(),
        },
    ))
    .await
    .unwrap();
    // Back to back, without waiting for the stream: no state may be merged away.
    delivered(&server, batch_id, CorePhase::Spellcheck).await;
    outcome(&server, batch_id, CorePhase::Spellcheck, &essays, &[]).await;
    delivered(&server, batch_id, CorePhase::Nlp).await;
    outcome(
        &server,
        batch_id,
        CorePhase::Nlp,
        &essays[..2],
        &essays[2..],
    )
    .await;

    let mut seen: Vec<Shape> = Vec::new();
    let collect = async {
        while let Some(message) = stream.next().await {
            let view = message.unwrap().batch.unwrap();
            let next = shape(&view);
            // A redelivered no-op may repeat a state; a transition is a change of shape.
            if seen.last() != Some(&next) {
                seen.push(next);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), collect)
        .await
        .expect("the stream ends with the run");

    assert_eq!(
        seen,
        vec![
            s(
                "PROCESSING_PIPELINES",
                Some("RUNNING"),
                &["DISPATCH_INITIATED", "PENDING_DEPENDENCIES"]
            ),
            s(
                "PROCESSING_PIPELINES",
                Some("RUNNING"),
                &["IN_PROGRESS", "PENDING_DEPENDENCIES"]
            ),
            s(
                "PROCESSING_PIPELINES",
                Some("RUNNING"),
                &["COMPLETED_SUCCESSFULLY", "DISPATCH_INITIATED"]
            ),
            s(
                "PROCESSING_PIPELINES",
                Some("RUNNING"),
                &["COMPLETED_SUCCESSFULLY", "IN_PROGRESS"]
            ),
            s(
                "READY_FOR_PIPELINE_EXECUTION",
                Some("COMPLETED_WITH_FAILURES"),
                &["COMPLETED_SUCCESSFULLY", "COMPLETED_WITH_PARTIAL_SUCCESS"]
            ),
        ]
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_ends_when_the_batch_becomes_terminal_and_ignores_other_batches() {
    let server = ApiServer::start().await;
    let batch_id = server.ready_batch("erin", 1).await;
    let other = server.ready_batch("erin", 1).await;
    let mut grpc = server.batches().await;
    let mut stream = grpc
        .watch_batch(authed(
            "erin",
            pb::WatchBatchRequest {
                batch_id: batch_id.to_string(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    stream.next().await.unwrap().unwrap();

    // A change of another batch is not sent on this stream.
    server
        .handles
        .orchestrator
        .handle(
            other,
            Input::Cancel {
                actor: Actor::Internal,
                reason: None,
            },
            None,
        )
        .await
        .unwrap();
    server
        .handles
        .orchestrator
        .handle(
            batch_id,
            Input::Cancel {
                actor: Actor::Internal,
                reason: Some("test".into()),
            },
            None,
        )
        .await
        .unwrap();
    let rest: Vec<pb::WatchBatchResponse> = tokio::time::timeout(
        Duration::from_secs(20),
        stream.map(|m| m.unwrap()).collect(),
    )
    .await
    .expect("the stream ends with the batch");
    assert_eq!(rest.len(), 1, "{rest:?}");
    let view = rest[0].batch.as_ref().unwrap();
    assert_eq!(view.batch_id, batch_id.to_string());
    assert_eq!(shape(view).0, "BATCH_STATUS_CANCELLED");
    server.shutdown().await;
}
