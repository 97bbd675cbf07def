//! Poison records go to `<topic>.DLQ` with their origin and error in headers and the consumer moves on; transient
//! failures retry the same record instead (defect 16). Mock cluster, real PostgreSQL, real Redis.

mod support;

#[path = "events_consume/harness.rs"]
mod harness;

use std::collections::BTreeMap;
use std::time::Duration;

use bos::core::ids::{BatchId, PhaseName};
use bos::core::model::BatchStatus;
use bos::events::codec::{consumed_topics, dlq_topic, phase_to_proto, topic_for, EncodedRecord};
use bos::events::dlq::header as dlq;
use bos::proto::huleedu::common::v1 as pc;
use bos::proto::huleedu::events::v1 as pe;
use bos::store::FaultPoint;
use harness::{envelope, Delivery, Driver, Harness, DEADLINE};
use support::kafka::{ReadRecord, TopicReader};
use uuid::Uuid;

const REDIS: &str = "redis://127.0.0.1:6379";

fn topic<M: prost::Name>() -> String {
    topic_for::<M>().expect("topic")
}

fn request(batch_id: BatchId, owner: &str) -> EncodedRecord {
    let request = pe::ClientBatchPipelineRequest {
        batch_id: batch_id.to_string(),
        requested_pipeline: phase_to_proto(PhaseName::Spellcheck) as i32,
        user_id: owner.to_owned(),
        ..Default::default()
    };
    envelope(&request, batch_id)
}

fn dead_letter_readers(h: &Harness) -> TopicReader {
    let topics: Vec<String> = consumed_topics().iter().map(|t| dlq_topic(t)).collect();
    TopicReader::new(h.bootstrap(), &topics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_records_of_every_kind_are_dead_lettered_and_consumption_continues() {
    let h = Harness::start(Some(REDIS)).await;
    let owner = "teacher-p";
    let registered = h.register(owner, 2, false).await;
    let batch_id = registered.batch_id;
    let mut driver = Driver::new(&h, &registered, owner, Delivery::Once);
    driver.prepare(false).await;
    let key = batch_id.to_string();

    // 1. Not protobuf at all, on the partition the good request will use after it.
    let garbage = b"not a protobuf \xff\xff".to_vec();
    let garbage_headers = vec![("x-origin".to_owned(), b"fuzzer".to_vec())];
    let request_topic = topic::<pe::ClientBatchPipelineRequest>();
    h.producer
        .send_raw(
            &request_topic,
            Some(key.as_bytes()),
            Some(&garbage),
            &garbage_headers,
        )
        .await;
    // 2. A well-formed envelope whose payload type belongs to another topic.
    let ready = pe::BatchEssaysReady {
        batch_id: key.clone(),
        ready_essays: vec![],
        course_code: pc::CourseCode::Eng5 as i32,
        class_type: pc::ClassType::Guest as i32,
    };
    let mut wrong_type = envelope(&ready, batch_id);
    wrong_type.topic = topic::<pe::BatchPhaseOutcome>();
    h.producer.send(&wrong_type).await;
    // 3. A batch nobody registered.
    let stranger = BatchId::from_uuid(Uuid::now_v7());
    let provisioning = pe::BatchContentProvisioningCompleted {
        batch_id: stranger.to_string(),
        provisioned_count: 0,
        expected_count: 1,
        course_code: pc::CourseCode::Eng5 as i32,
        user_id: owner.to_owned(),
        essays_for_processing: vec![],
    };
    let unknown_batch = envelope(&provisioning, stranger);
    h.producer.send(&unknown_batch).await;
    // 4. Essays-ready for a GUEST batch that is already ready: illegal in its state.
    let illegal = envelope(&ready, batch_id);
    h.producer.send(&illegal).await;
    // Then a good record behind the garbage on the same partition.
    h.producer.send(&request(batch_id, owner)).await;

    let command = driver.next().await;
    assert_eq!(
        command.topic,
        topic::<pe::SpellcheckInitiateCommand>(),
        "the consumer kept going"
    );
    let agg = h
        .wait_status(batch_id, BatchStatus::ProcessingPipelines)
        .await;
    assert_eq!(agg.runs.len(), 1);

    let dead = dead_letter_readers(&h).read(4, DEADLINE).await;
    let mut by_topic: BTreeMap<String, ReadRecord> =
        dead.into_iter().map(|r| (r.topic.clone(), r)).collect();
    let originals = TopicReader::new(h.bootstrap(), &consumed_topics())
        .drain(Duration::from_millis(1500))
        .await;
    let expectations: [(&EncodedRecord, &str); 3] = [
        (&wrong_type, "does not match topic"),
        (&unknown_batch, "batch not found"),
        (
            &illegal,
            "not allowed while the batch is ReadyForPipelineExecution",
        ),
    ];
    let garbage_record = EncodedRecord {
        topic: request_topic.clone(),
        key: key.clone(),
        payload: garbage.clone(),
        headers: [("x-origin".to_owned(), "fuzzer".to_owned())]
            .into_iter()
            .collect(),
    };
    for (sent, error) in [(&garbage_record, "not an EventEnvelope")]
        .into_iter()
        .chain(expectations)
    {
        let dead = by_topic
            .remove(&dlq_topic(&sent.topic))
            .unwrap_or_else(|| panic!("no dead letter for {}", sent.topic));
        let original = originals
            .iter()
            .find(|r| r.topic == sent.topic && r.payload == sent.payload)
            .expect("the original record");
        assert_eq!(dead.key.as_deref(), Some(sent.key.as_str()));
        assert_eq!(dead.payload, sent.payload);
        assert_eq!(dead.header(dlq::ORIGINAL_TOPIC), Some(sent.topic.as_str()));
        assert_eq!(
            dead.header(dlq::ORIGINAL_PARTITION),
            Some(original.partition.to_string().as_str())
        );
        assert_eq!(
            dead.header(dlq::ORIGINAL_OFFSET),
            Some(original.offset.to_string().as_str())
        );
        assert_eq!(dead.header(dlq::ATTEMPT), Some("1"));
        let reason = dead.header(dlq::ERROR).unwrap_or_default();
        assert!(
            reason.contains(error),
            "{} dead-lettered for '{reason}', expected '{error}'",
            sent.topic
        );
        for (name, value) in &sent.headers {
            assert_eq!(
                dead.header(name),
                Some(value.as_str()),
                "original header {name} kept"
            );
        }
    }
    assert!(
        by_topic.is_empty(),
        "unexpected dead letters: {by_topic:#?}"
    );
    assert!(h
        .orchestrator
        .batch_for(&bos::core::input::Actor::Internal, stranger)
        .await
        .is_err());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transient_failures_retry_the_same_record_and_never_dead_letter() {
    let h = Harness::start(Some(REDIS)).await;
    let owner = "teacher-t";
    let registered = h.register(owner, 2, false).await;
    let batch_id = registered.batch_id;
    let mut driver = Driver::new(&h, &registered, owner, Delivery::Once);
    let _registered_event = driver.next().await;

    // The database fails the first three commits of the provisioning unit: rolled back each time, then applied.
    let faults = h.store.faults().clone();
    let before = faults.hits(FaultPoint::BeforeCommit);
    faults.fail_times(FaultPoint::BeforeCommit, 3);
    let provisioning = pe::BatchContentProvisioningCompleted {
        batch_id: batch_id.to_string(),
        provisioned_count: 2,
        expected_count: 2,
        course_code: pc::CourseCode::Eng5 as i32,
        user_id: owner.to_owned(),
        essays_for_processing: registered
            .essay_ids
            .iter()
            .enumerate()
            .map(|(i, e)| pc::EssayRef {
                essay_id: e.to_string(),
                text_storage_id: format!("orig-{i}"),
            })
            .collect(),
    };
    h.producer.send(&envelope(&provisioning, batch_id)).await;
    h.wait_status(batch_id, BatchStatus::ReadyForPipelineExecution)
        .await;
    assert_eq!(
        faults.hits(FaultPoint::BeforeCommit) - before,
        4,
        "three failed attempts, then the commit"
    );

    // The request's unit commits but the handler sees an error afterwards: the retry finds it in the inbox and
    // nothing happens twice.
    faults.fail_times(FaultPoint::AfterCommit, 1);
    h.producer.send(&request(batch_id, owner)).await;
    let command = driver.next().await;
    assert_eq!(command.topic, topic::<pe::SpellcheckInitiateCommand>());
    let agg = h
        .wait_status(batch_id, BatchStatus::ProcessingPipelines)
        .await;
    assert_eq!(agg.runs.len(), 1, "one run despite the retry");
    let rest = driver_rest(&mut driver).await;
    assert!(rest.is_empty(), "nothing else published: {rest:#?}");
    let dead = dead_letter_readers(&h)
        .drain(Duration::from_millis(1500))
        .await;
    assert!(
        dead.is_empty(),
        "transient failures are not poison: {dead:#?}"
    );
    h.stop().await;
}

async fn driver_rest(driver: &mut Driver<'_>) -> Vec<ReadRecord> {
    driver.drain(Duration::from_millis(1500)).await
}
