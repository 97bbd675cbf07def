//! A retry requested by event is deduplicated by the inbox like every other consumed event: delivered three times
//! (twice at once, once after the retry run ended), it starts exactly one retry run and nothing is dead-lettered.
//! Mock cluster, real PostgreSQL, no Redis (so the database inbox alone is tested, not the fast path).

mod support;

#[path = "events_consume/harness.rs"]
mod harness;

use std::time::Duration;

use bos::core::ids::PhaseName;
use bos::core::model::{BatchStatus, PhaseStatus, RunStatus};
use bos::events::codec::{consumed_topics, decode_payload, dlq_topic, phase_to_proto, topic_for};
use bos::proto::huleedu::common::v1 as pc;
use bos::proto::huleedu::events::v1 as pe;
use harness::{check_published, command_of, envelope, Delivery, Driver, Harness};
use support::kafka::TopicReader;

const QUIET: Duration = Duration::from_millis(2000);

fn topic<M: prost::Name>() -> String {
    topic_for::<M>().expect("topic")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_event_delivered_three_times_runs_one_retry() {
    let h = Harness::start(None).await;
    let owner = "teacher-retry";
    let registered = h.register(owner, 2, false).await;
    let batch_id = registered.batch_id;
    let mut driver = Driver::new(&h, &registered, owner, Delivery::Once);
    driver.prepare(false).await;

    // Spellcheck fails as a whole: the run ends FAILED and the phase becomes retryable.
    driver.request(PhaseName::Spellcheck).await;
    let command = driver.next().await;
    let (phase, attempt, _) = command_of(&command).expect("a spellcheck command");
    assert_eq!(attempt, 1);
    let failed = pe::BatchPhaseOutcome {
        batch_id: batch_id.to_string(),
        phase,
        phase_status: pc::PhaseOutcomeStatus::FailedCritically as i32,
        processed_essays: vec![],
        failed_essay_ids: registered.essay_ids.iter().map(|e| e.to_string()).collect(),
        attempt,
    };
    driver.deliver(vec![envelope(&failed, batch_id)]).await;
    let ended = driver.next().await;
    assert_eq!(ended.topic, topic::<pe::BatchPipelineCompleted>());
    h.wait_status(batch_id, BatchStatus::ReadyForPipelineExecution)
        .await;

    // The retry event, twice at once.
    let retry = envelope(
        &pe::ClientBatchPipelineRequest {
            batch_id: batch_id.to_string(),
            requested_pipeline: phase_to_proto(PhaseName::Spellcheck) as i32,
            user_id: owner.to_owned(),
            is_retry: true,
            retry_reason: "the spellchecker was down".to_owned(),
            prompt_ref: String::new(),
        },
        batch_id,
    );
    driver.deliver(vec![retry.clone(), retry.clone()]).await;
    let command = driver.next().await;
    let (phase, attempt, essays) = command_of(&command).expect("the retry's command");
    assert_eq!(attempt, 2);
    assert_eq!(essays.len(), registered.essay_ids.len());
    let succeeded = pe::BatchPhaseOutcome {
        batch_id: batch_id.to_string(),
        phase,
        phase_status: pc::PhaseOutcomeStatus::CompletedSuccessfully as i32,
        processed_essays: essays
            .iter()
            .map(|e| pe::batch_phase_outcome::ProcessedEssay {
                essay_id: e.essay_id.clone(),
                output_text_storage_id: format!("fixed-{}", e.essay_id),
            })
            .collect(),
        failed_essay_ids: vec![],
        attempt,
    };
    driver.deliver(vec![envelope(&succeeded, batch_id)]).await;
    let ended = driver.next().await;
    assert_eq!(ended.topic, topic::<pe::BatchPipelineCompleted>());
    h.wait_status(batch_id, BatchStatus::ReadyForPipelineExecution)
        .await;

    // The third delivery comes after the retry run ended, when the phase is no longer retryable: a duplicate, not
    // a refusal. A plain cj_assessment request behind it on the same partition shows when it has been handled.
    let cj = envelope(
        &pe::ClientBatchPipelineRequest {
            batch_id: batch_id.to_string(),
            requested_pipeline: phase_to_proto(PhaseName::CjAssessment) as i32,
            user_id: owner.to_owned(),
            prompt_ref: "prompt://v2".to_owned(),
            ..Default::default()
        },
        batch_id,
    );
    driver.deliver(vec![retry, cj]).await;
    let next = driver.next().await;
    assert_eq!(
        next.topic,
        topic::<pe::CjAssessmentInitiateCommand>(),
        "{next:?}"
    );
    let (_, command) =
        decode_payload::<pe::CjAssessmentInitiateCommand>(&next.topic, Some(&next.payload))
            .expect("a cj_assessment command");
    assert_eq!(
        command.student_prompt_ref, "prompt://v2",
        "the request's prompt reference reaches the command"
    );
    let late = driver.drain(QUIET).await;
    assert!(late.is_empty(), "a redelivery published {late:#?}");

    let agg = h.load(batch_id).await;
    let retries: Vec<_> = agg.runs.iter().filter(|r| r.is_retry).collect();
    assert_eq!(retries.len(), 1, "exactly one retry run: {:#?}", agg.runs);
    assert_eq!(agg.runs.len(), 3);
    let rerun = retries[0];
    assert_eq!(rerun.status, RunStatus::CompletedSuccessfully);
    let spellcheck = rerun.phase(PhaseName::Spellcheck).expect("spellcheck");
    assert_eq!(
        (spellcheck.status, spellcheck.attempt.get()),
        (PhaseStatus::CompletedSuccessfully, 2)
    );
    assert_eq!(agg.runs[2].requested_pipeline, PhaseName::CjAssessment);
    check_published(batch_id, &driver.seen, &h.outbox().await);

    let dlq: Vec<String> = consumed_topics().iter().map(|t| dlq_topic(t)).collect();
    let dead = TopicReader::new(h.bootstrap(), &dlq).drain(QUIET).await;
    assert!(dead.is_empty(), "unexpected dead letters: {dead:#?}");
    h.stop().await;
}
