//! RetryPhase through the API: a failed phase is retried with the next attempt in a new run, once; the retry is
//! answered the same way over gRPC and HTTP/JSON, and a second retry while the first runs is refused.

mod api_support;
mod support;

use api_support::{authed, ApiServer};
use bos::core::ids::PhaseName as CorePhase;
use bos::core::model::PhaseStatus;
use bos::proto::huleedu::bos::v1 as pb;
use bos::proto::huleedu::common::v1::PhaseName;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_phase_is_retried_with_the_next_attempt_once() {
    let server = ApiServer::start().await;
    let batch_id = server.failed_batch("alice", 3).await;
    let mut grpc = server.batches().await;

    let retry = pb::RetryPhaseRequest {
        batch_id: batch_id.to_string(),
        phase: PhaseName::Spellcheck as i32,
        reason: "spellchecker was down".to_owned(),
    };
    let answer = grpc
        .retry_phase(authed("alice", retry.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.attempt, 2);
    assert_eq!(answer.phases, vec![PhaseName::Spellcheck as i32]);

    // Let the relay report the delivery first: after that only this test changes the batch.
    server.settle(batch_id).await;
    let agg = server.load(batch_id).await;
    assert_eq!(agg.runs.len(), 2, "the retry is a run of its own");
    let run = agg.active_run().expect("the retry run is active");
    assert_eq!(run.id.to_string(), answer.run_id);
    assert!(run.is_retry);
    let phase = run.phase(CorePhase::Spellcheck).unwrap();
    assert_eq!(phase.attempt.get(), 2);
    assert!(matches!(
        phase.status,
        PhaseStatus::DispatchInitiated | PhaseStatus::InProgress
    ));

    // While it runs, another retry is refused on both transports and changes nothing.
    let refused = grpc.retry_phase(authed("alice", retry)).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    let http = reqwest::Client::new()
        .post(server.url(&format!("/v1/batches/{batch_id}/retry")))
        .header("authorization", ApiServer::bearer("alice"))
        .json(&serde_json::json!({"phase": "PHASE_NAME_SPELLCHECK", "reason": "again"}))
        .send()
        .await
        .unwrap();
    assert_eq!(http.status(), reqwest::StatusCode::BAD_REQUEST);
    let body: serde_json::Value = http.json().await.unwrap();
    assert_eq!(body["code"], Code::FailedPrecondition as i32);
    assert_eq!(server.load(batch_id).await.batch.version, agg.batch.version);
}
