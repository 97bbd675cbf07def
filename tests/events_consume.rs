//! The consuming side end to end on a real Kafka-protocol broker (mock cluster), real PostgreSQL and real Redis:
//! the test plays the other services, BOS runs its store, orchestrator, outbox relay and consumer.

mod support;

#[path = "events_consume/harness.rs"]
mod harness;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bos::core::ids::{EssayId, PhaseName};
use bos::core::model::{BatchStatus, PhaseStatus, RunStatus};
use bos::events::codec::{consumed_topics, dlq_topic, topic_for};
use bos::events::dedupe::FastPathState;
use bos::proto::huleedu::common::v1 as pc;
use bos::proto::huleedu::events::v1 as pe;
use harness::{check_published, shape, Delivery, Driver, Harness, Shape};
use support::kafka::{ReadRecord, TopicReader};

const REDIS: &str = "redis://127.0.0.1:6379";
const QUIET: Duration = Duration::from_millis(1500);

struct Driven {
    essays: Vec<EssayId>,
    records: Vec<ReadRecord>,
    completed: pe::BatchPipelineCompleted,
    shape: Shape,
}

async fn drive(
    h: &Harness,
    owner: &str,
    regular: bool,
    requested: PhaseName,
    delivery: Delivery,
) -> Driven {
    let registered = h.register(owner, 3, regular).await;
    let mut driver = Driver::new(h, &registered, owner, delivery);
    driver.prepare(regular).await;
    driver.request(requested).await;
    let completed = driver.answer_until_complete(None).await;
    let agg = h
        .wait_status(registered.batch_id, BatchStatus::ReadyForPipelineExecution)
        .await;
    Driven {
        shape: shape(&agg, &registered.essay_ids),
        essays: registered.essay_ids,
        records: driver.seen,
        completed,
    }
}

fn command_topics(records: &[ReadRecord]) -> Vec<String> {
    records
        .iter()
        .filter(|r| harness::command_of(r).is_some())
        .map(|r| r.topic.clone())
        .collect()
}

fn topic<M: prost::Name>() -> String {
    topic_for::<M>().expect("topic")
}

fn assert_completed(driven: &Driven, phases: &[PhaseName]) {
    assert_eq!(
        driven.completed.final_status,
        pc::PipelineRunStatus::CompletedSuccessfully as i32
    );
    assert_eq!(
        driven.completed.successful_essay_count,
        driven.essays.len() as i32
    );
    assert_eq!(driven.completed.failed_essay_count, 0);
    let run = driven.shape.runs.last().expect("a run");
    assert_eq!(run.status, RunStatus::CompletedSuccessfully.as_str());
    let ran: Vec<PhaseName> = run.phases.iter().map(|p| p.0).collect();
    assert_eq!(ran, phases);
    assert!(run
        .phases
        .iter()
        .all(|p| p.1 == PhaseStatus::CompletedSuccessfully.as_str() && p.2 == 1));
    // Every essay carries the output of the last phase that wrote one.
    let last = phases.last().expect("a phase");
    let outputs: Vec<_> = driven
        .shape
        .results
        .iter()
        .filter(|r| r.1 == *last)
        .map(|r| r.4.clone())
        .collect();
    assert_eq!(outputs.len(), driven.essays.len());
    assert!(outputs
        .iter()
        .all(|o| o.as_deref().is_some_and(|o| o.starts_with("out-"))));
}

async fn assert_no_dead_letters(h: &Harness) {
    let dlq: Vec<String> = consumed_topics().iter().map(|t| dlq_topic(t)).collect();
    let dead = TopicReader::new(h.bootstrap(), &dlq).drain(QUIET).await;
    assert!(dead.is_empty(), "unexpected dead letters: {dead:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn guest_and_regular_batches_flow_through_kafka() {
    let h = Harness::start(Some(REDIS)).await;
    let (guest, regular) = tokio::join!(
        drive(
            &h,
            "teacher-g",
            false,
            PhaseName::CjAssessment,
            Delivery::Once
        ),
        drive(&h, "teacher-r", true, PhaseName::AiFeedback, Delivery::Once),
    );
    assert_completed(&guest, &[PhaseName::Spellcheck, PhaseName::CjAssessment]);
    assert_completed(
        &regular,
        &[PhaseName::Spellcheck, PhaseName::Nlp, PhaseName::AiFeedback],
    );
    assert_eq!(
        command_topics(&guest.records),
        [
            topic::<pe::SpellcheckInitiateCommand>(),
            topic::<pe::CjAssessmentInitiateCommand>()
        ]
    );
    assert_eq!(
        command_topics(&regular.records),
        [
            topic::<pe::StudentMatchingInitiateCommand>(),
            topic::<pe::SpellcheckInitiateCommand>(),
            topic::<pe::NlpInitiateCommand>(),
            topic::<pe::AiFeedbackInitiateCommand>()
        ]
    );
    // Students were matched on the REGULAR batch only.
    assert!(regular.shape.essays.iter().all(|e| e.3.is_some()));
    assert!(guest.shape.essays.iter().all(|e| e.3.is_none()));

    let outbox = h.outbox().await;
    for driven in [&guest, &regular] {
        let batch_id =
            bos::core::ids::BatchId::parse("key", driven.records[0].key.as_deref().unwrap())
                .unwrap();
        check_published(batch_id, &driven.records, &outbox);
        // Nothing else was published for the batch: every outbox row of it was read exactly once.
        let rows = outbox
            .values()
            .filter(|r| r.message_key == batch_id.to_string())
            .count();
        assert_eq!(rows, driven.records.len());
    }
    assert_no_dead_letters(&h).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_five_times_and_shuffled_gives_the_state_of_one_delivery() {
    let h = Harness::start(Some(REDIS)).await;
    let repeated = |seed| Delivery::Repeated { times: 5, seed };
    let (guest_once, guest_many, regular_once, regular_many) = tokio::join!(
        drive(
            &h,
            "teacher-a",
            false,
            PhaseName::AiFeedback,
            Delivery::Once
        ),
        drive(&h, "teacher-b", false, PhaseName::AiFeedback, repeated(11)),
        drive(
            &h,
            "teacher-c",
            true,
            PhaseName::CjAssessment,
            Delivery::Once
        ),
        drive(&h, "teacher-d", true, PhaseName::CjAssessment, repeated(12)),
    );
    assert_eq!(guest_many.shape, guest_once.shape);
    assert_eq!(regular_many.shape, regular_once.shape);
    assert_completed(
        &guest_many,
        &[PhaseName::Spellcheck, PhaseName::Nlp, PhaseName::AiFeedback],
    );
    assert_completed(
        &regular_many,
        &[PhaseName::Spellcheck, PhaseName::CjAssessment],
    );
    let outbox = h.outbox().await;
    for driven in [&guest_once, &guest_many, &regular_once, &regular_many] {
        let batch_id =
            bos::core::ids::BatchId::parse("key", driven.records[0].key.as_deref().unwrap())
                .unwrap();
        // One command per (batch, phase, attempt), each once.
        check_published(batch_id, &driven.records, &outbox);
    }
    assert_eq!(
        command_topics(&regular_many.records),
        command_topics(&regular_once.records)
    );
    // Redeliveries are duplicates, never poison.
    assert_no_dead_letters(&h).await;
    h.stop().await;
}

/// A Redis server of our own, so the test can take it away.
struct PrivateRedis {
    child: Child,
    url: String,
}

impl PrivateRedis {
    fn start() -> PrivateRedis {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        PrivateRedis {
            child,
            url: format!("redis://127.0.0.1:{port}"),
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    async fn keys(&self) -> usize {
        let client = redis::Client::open(self.url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("DBSIZE")
            .query_async::<usize>(&mut conn)
            .await
            .unwrap()
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_going_away_mid_run_changes_nothing_but_the_health_flag() {
    let mut redis = PrivateRedis::start();
    let h = Harness::start(Some(&redis.url)).await;
    let owner = "teacher-x";
    let reference = h.register("teacher-y", 3, true).await;
    let registered = h.register(owner, 3, true).await;
    let mut driver = Driver::new(
        &h,
        &registered,
        owner,
        Delivery::Repeated { times: 5, seed: 7 },
    );
    let mut reference_driver = Driver::new(&h, &reference, "teacher-y", Delivery::Once);
    tokio::join!(driver.prepare(true), reference_driver.prepare(true));
    assert!(
        redis.keys().await > 0,
        "the fast path remembered processed events"
    );
    assert_eq!(h.dedupe.health().state(), FastPathState::Active);

    reference_driver.request(PhaseName::AiFeedback).await;
    driver.request(PhaseName::AiFeedback).await;
    let kill = Box::new(|| redis.kill());
    let (completed, reference_completed) = tokio::join!(
        driver.answer_until_complete(Some(kill)),
        reference_driver.answer_until_complete(None)
    );
    assert!(
        h.dedupe.health().is_bypassed(),
        "the health flag reports the bypass"
    );
    assert_eq!(
        completed.final_status,
        pc::PipelineRunStatus::CompletedSuccessfully as i32
    );
    assert_eq!(
        completed.successful_essay_count,
        reference_completed.successful_essay_count
    );
    let agg = h
        .wait_status(registered.batch_id, BatchStatus::ReadyForPipelineExecution)
        .await;
    let reference_agg = h
        .wait_status(reference.batch_id, BatchStatus::ReadyForPipelineExecution)
        .await;
    assert_eq!(
        shape(&agg, &registered.essay_ids),
        shape(&reference_agg, &reference.essay_ids)
    );
    let outbox = h.outbox().await;
    check_published(registered.batch_id, &driver.seen, &outbox);
    assert_no_dead_letters(&h).await;
    h.stop().await;
}
