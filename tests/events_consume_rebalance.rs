//! Partitions handed over between replicas mid-run: a second group member joins (rebalance), then the first one
//! leaves (its partitions move). Nothing is lost, nothing happens twice, nothing is dead-lettered.

mod support;

#[path = "events_consume/harness.rs"]
mod harness;

use std::time::Duration;

use bos::core::ids::PhaseName;
use bos::core::model::BatchStatus;
use bos::events::codec::{consumed_topics, dlq_topic};
use bos::proto::huleedu::common::v1 as pc;
use harness::{check_published, shape, Delivery, Driver, Harness};
use support::kafka::TopicReader;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitions_move_between_replicas_without_loss_or_repeats() {
    let h = Harness::start(Some("redis://127.0.0.1:6379")).await;
    let first = h.register("teacher-1", 3, true).await;
    let second = h.register("teacher-2", 3, false).await;
    let mut a = Driver::new(
        &h,
        &first,
        "teacher-1",
        Delivery::Repeated { times: 2, seed: 5 },
    );
    let mut b = Driver::new(&h, &second, "teacher-2", Delivery::Once);
    tokio::join!(a.prepare(true), b.prepare(false));

    // A second replica joins: the group rebalances while work goes on.
    let joined = h.start_consumer();
    a.request(PhaseName::AiFeedback).await;
    b.request(PhaseName::AiFeedback).await;
    // After the first answer, the original replica leaves; its partitions move to the new one.
    let leaving = h.first_consumer_stopper();
    let (done_a, done_b) = tokio::join!(
        a.answer_until_complete(Some(Box::new(move || {
            let _ = leaving.send(true);
        }))),
        b.answer_until_complete(None)
    );
    for done in [&done_a, &done_b] {
        assert_eq!(
            done.final_status,
            pc::PipelineRunStatus::CompletedSuccessfully as i32
        );
        assert_eq!(done.successful_essay_count, 3);
    }
    let agg_a = h
        .wait_status(first.batch_id, BatchStatus::ReadyForPipelineExecution)
        .await;
    let agg_b = h
        .wait_status(second.batch_id, BatchStatus::ReadyForPipelineExecution)
        .await;
    assert_eq!(agg_a.runs.len(), 1);
    assert_eq!(agg_b.runs.len(), 1);
    let phases = |s: harness::Shape| {
        s.runs[0]
            .phases
            .iter()
            .map(|p| (p.0, p.1.clone(), p.2))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        phases(shape(&agg_a, &first.essay_ids)),
        phases(shape(&agg_b, &second.essay_ids))
    );
    let outbox = h.outbox().await;
    check_published(first.batch_id, &a.seen, &outbox);
    check_published(second.batch_id, &b.seen, &outbox);
    let dlq: Vec<String> = consumed_topics().iter().map(|t| dlq_topic(t)).collect();
    let dead = TopicReader::new(h.bootstrap(), &dlq)
        .drain(Duration::from_millis(1500))
        .await;
    assert!(dead.is_empty(), "unexpected dead letters: {dead:#?}");
    let _ = joined.stop.send(true);
    tokio::time::timeout(Duration::from_secs(30), joined.task)
        .await
        .expect("the second replica stops in time")
        .expect("no panic");
    h.stop().await;
}
