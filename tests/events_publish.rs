//! The outbox relay against a real Kafka-protocol broker (librdkafka's mock cluster, hosted by
//! `EmbeddedBroker`) and real PostgreSQL: stored ids and headers, order per key, two relays on
//! one database, prompt wake-up after a commit.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bos::core::ids::PhaseName;
use bos::core::input::Actor;
use bos::core::model::PhaseStatus;
use bos::core::ports::{Applied, BatchRepository};
use bos::events::relay::DeliveryListener;
use bos::proto::huleedu::events::v1::EventEnvelope;
use prost::Message as _;
use support::fixtures;
use support::kafka::{ReadRecord, PARTITIONS};
use support::relay::*;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_publishes_stored_ids_and_headers_and_confirms_phase_delivery() {
    let env = env().await;
    // A GUEST batch up to a dispatched spellcheck, then to a dispatched nlp: three rows on one key.
    let batch_id = register(&env.orchestrator, "alice").await;
    let agg = env.store.load(batch_id).await.unwrap().unwrap();
    env.orchestrator
        .handle(batch_id, fixtures::provisioned(&agg), None)
        .await
        .unwrap();
    let owner = Actor::User(agg.batch.owner.clone());
    env.orchestrator
        .request_pipeline(owner, batch_id, PhaseName::Nlp, Default::default())
        .await
        .unwrap();

    let listener: Arc<dyn DeliveryListener> = env.orchestrator.clone();
    let (stop, task) = spawn_relay(
        env.store.clone(),
        env.broker.bootstrap_servers(),
        Some(listener),
    );
    wait_drained(&env.store, Duration::from_secs(20)).await;

    // The relay reported the delivery: spellcheck is IN_PROGRESS, not just DISPATCH_INITIATED.
    let agg = in_progress(&env.store, batch_id, PhaseName::Spellcheck).await;

    // The spellcheck outcome dispatches nlp; the relay is woken by nothing but its poll here.
    let cmd = {
        let rows = outbox_rows(&env.store).await;
        assert_eq!(rows.len(), 2, "registered + spellcheck command");
        agg.active_run()
            .unwrap()
            .phase(PhaseName::Spellcheck)
            .unwrap()
            .attempt
    };
    let outcome = bos::core::input::Input::PhaseOutcome {
        phase: PhaseName::Spellcheck,
        attempt: cmd,
        status: bos::core::input::ReportedPhaseStatus::CompletedSuccessfully,
        processed: agg
            .essays
            .iter()
            .map(|e| bos::core::input::ProcessedEssay {
                essay_id: e.id,
                output_ref: Some(fixtures::text(&format!("corrected-{}", e.id))),
            })
            .collect(),
        failed: vec![],
    };
    let applied = env
        .orchestrator
        .handle(batch_id, outcome, None)
        .await
        .unwrap();
    assert!(matches!(applied, Applied::Changed { .. }));
    wait_drained(&env.store, Duration::from_secs(20)).await;
    let _ = stop.send(true);
    task.await.unwrap();

    let rows = outbox_rows(&env.store).await;
    assert_eq!(rows.len(), 3, "registered, spellcheck, nlp");
    let records = read_all(
        env.broker.bootstrap_servers(),
        &published_topics(&rows),
        rows.len(),
    )
    .await;
    assert_eq!(records.len(), rows.len(), "every row exactly once");
    let by_id: HashMap<String, &ReadRecord> = records.iter().map(|r| (event_id(r), r)).collect();
    for row in &rows {
        let record = by_id
            .get(&row.event_id.to_string())
            .expect("row published under its stored event id");
        assert_eq!(record.topic, row.topic);
        assert_eq!(record.key.as_deref(), Some(row.message_key.as_str()));
        assert_eq!(record.key, Some(batch_id.to_string()), "keyed by batch id");
        assert_eq!(record.payload, row.payload, "the stored bytes, unchanged");
        let stored: BTreeMap<String, String> = serde_json::from_str(&row.headers).unwrap();
        assert_eq!(record.headers, stored, "the stored headers, unchanged");
        for name in [
            "event_id",
            "event_type",
            "correlation_id",
            "traceparent",
            "content-type",
        ] {
            assert!(record.headers.contains_key(name), "header {name}");
        }
        let envelope = EventEnvelope::decode(record.payload.as_slice()).unwrap();
        assert_eq!(envelope.event_id, row.event_id.to_string());
        assert!(row.published_at.is_some());
    }
    // Per key, publish order is commit order.
    let published: Vec<_> = rows.iter().map(|r| r.published_at.unwrap()).collect();
    assert!(published.windows(2).all(|w| w[0] <= w[1]), "{published:?}");
    in_progress(&env.store, batch_id, PhaseName::Nlp).await;
}

/// Waits until the relay's delivery report (applied beside its next round) made `phase` IN_PROGRESS.
async fn in_progress(
    store: &bos::store::Store,
    batch_id: bos::core::ids::BatchId,
    phase: PhaseName,
) -> bos::core::model::BatchAggregate {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let agg = store.load(batch_id).await.unwrap().unwrap();
        let status = agg
            .active_run()
            .expect("a run is active")
            .phase(phase)
            .unwrap()
            .status;
        if status == PhaseStatus::InProgress {
            return agg;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{phase} stayed {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_relays_publish_every_row_exactly_once_in_order_per_key() {
    let env = env().await;
    let topic = format!("bos.test.relay.{}", Uuid::new_v4().simple());
    env.broker.create_topic(&topic, PARTITIONS).unwrap();
    let keys: Vec<String> = (0..12).map(|i| format!("key-{i}")).collect();
    let inserted = insert_raw_rows(&env.store, &topic, &keys, 15).await;
    // Real registrations too, so both kinds of rows go through both relays.
    for i in 0..10 {
        register(&env.orchestrator, &format!("user-{i}")).await;
    }

    // Two replicas: separate pools, separate producers, one database.
    let second_store = connect_store(&env.db).await;
    let (stop_a, task_a) = spawn_relay(env.store.clone(), env.broker.bootstrap_servers(), None);
    let (stop_b, task_b) = spawn_relay(second_store, env.broker.bootstrap_servers(), None);
    wait_drained(&env.store, Duration::from_secs(60)).await;
    let _ = stop_a.send(true);
    let _ = stop_b.send(true);
    task_a.await.unwrap();
    task_b.await.unwrap();

    let rows = outbox_rows(&env.store).await;
    let records = read_all(
        env.broker.bootstrap_servers(),
        &published_topics(&rows),
        rows.len(),
    )
    .await;
    let mut seen = HashSet::new();
    for record in &records {
        assert!(
            seen.insert(event_id(record)),
            "event id {} published twice",
            event_id(record)
        );
    }
    let stored: HashSet<String> = rows.iter().map(|r| r.event_id.to_string()).collect();
    assert_eq!(seen, stored, "every stored row published, nothing else");

    // Order per key: on the shared topic each key's records sit in one partition in insert order.
    for key in &keys {
        let mut of_key: Vec<&ReadRecord> = records
            .iter()
            .filter(|r| r.topic == topic && r.key.as_ref() == Some(key))
            .collect();
        assert!(
            of_key.windows(2).all(|w| w[0].partition == w[1].partition),
            "one partition per key"
        );
        of_key.sort_by_key(|r| r.offset);
        let got: Vec<String> = of_key.iter().map(|r| event_id(r)).collect();
        let want: Vec<String> = inserted
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, id)| id.to_string())
            .collect();
        assert_eq!(got, want, "records of {key} in commit order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_wakes_the_relay_without_waiting_for_its_poll() {
    let env = env().await;
    let relay = WokenRelay::start(&env).await;
    let orchestrator = &relay.orchestrator;

    for i in 0..3 {
        let started = Instant::now();
        register(orchestrator, &format!("prompt-{i}")).await;
        wait_drained(&env.store, Duration::from_secs(5)).await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "published {:?} after the commit",
            started.elapsed()
        );
    }
    relay.stop().await;
}
