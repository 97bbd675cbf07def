//! The outbox relay against a real Kafka-protocol broker (librdkafka's mock cluster, hosted by
//! `EmbeddedBroker`) and real PostgreSQL: stored ids and headers, order per key, two relays on
//! one database, and a broker outage during registrations.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bos::core::graph::BuiltinResolver;
use bos::core::ids::{BatchId, PhaseName, UserId};
use bos::core::input::Actor;
use bos::core::model::PhaseStatus;
use bos::core::orchestrator::{Orchestrator, SystemClock, UuidV7Generator};
use bos::core::ports::{Applied, BatchRepository};
use bos::core::registration::{validate, RawRegistration};
use bos::events::broker::{BrokerOptions, EmbeddedBroker};
use bos::events::codec::ProtobufEffectEncoder;
use bos::events::relay::{DeliveryListener, Relay, RelayConfig, RelayHandle};
use bos::notify::feed::{ChangeFeed, NotifyingRepository};
use bos::proto::huleedu::events::v1::EventEnvelope;
use bos::store::entities::event_outbox;
use bos::store::{OutboxPolicy, OutboxStats, Store, StoreConfig};
use chrono::Utc;
use prost::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sea_orm::{ActiveValue, ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
use support::fixtures;
use support::TestDb;
use tokio::sync::watch;
use uuid::Uuid;

const PARTITIONS: i32 = 3;

/// One record read back from the broker.
#[derive(Debug, Clone)]
struct Record {
    topic: String,
    partition: i32,
    offset: i64,
    key: String,
    payload: Vec<u8>,
    headers: BTreeMap<String, String>,
}

impl Record {
    fn event_id(&self) -> String {
        self.headers.get("event_id").cloned().unwrap_or_default()
    }
}

/// Reads every record of `topics` from the beginning until `expected` arrived and no more came for
/// a moment (so duplicates would be seen), or the deadline passes.
async fn read_topics(
    bootstrap: &str,
    topics: &[String],
    expected: usize,
    deadline: Duration,
) -> Vec<Record> {
    let bootstrap = bootstrap.to_owned();
    let topics = topics.to_vec();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", format!("reader-{}", Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut assignment = TopicPartitionList::new();
        for topic in &topics {
            for p in 0..PARTITIONS {
                assignment
                    .add_partition_offset(topic, p, Offset::Beginning)
                    .unwrap();
            }
        }
        consumer.assign(&assignment).unwrap();
        let started = Instant::now();
        let mut last_new = Instant::now();
        let mut out = Vec::new();
        while started.elapsed() < deadline {
            if out.len() >= expected && last_new.elapsed() > Duration::from_millis(1500) {
                break;
            }
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    let mut headers = BTreeMap::new();
                    if let Some(h) = m.headers() {
                        for header in h.iter() {
                            let value = header
                                .value
                                .map(|v| String::from_utf8_lossy(v).into_owned())
                                .unwrap_or_default();
                            headers.insert(header.key.to_owned(), value);
                        }
                    }
                    out.push(Record {
                        topic: m.topic().to_owned(),
                        partition: m.partition(),
                        offset: m.offset(),
                        key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                        payload: m.payload().unwrap_or_default().to_vec(),
                        headers,
                    });
                    last_new = Instant::now();
                }
                Some(Err(e)) => eprintln!("reader: {e}"),
                None => {}
            }
        }
        out
    })
    .await
    .unwrap()
}

struct Env {
    _db: TestDb,
    store: Store,
    orchestrator: Arc<Orchestrator>,
    broker: EmbeddedBroker,
}

fn store_config() -> StoreConfig {
    StoreConfig {
        outbox: OutboxPolicy {
            lease: Duration::from_secs(30),
            base_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(500),
            // An outage in these tests must never park a row.
            max_attempts: 10_000,
        },
        ..StoreConfig::default()
    }
}

async fn connect_store(db: &TestDb) -> Store {
    Store::connect_with(&db.url, store_config())
        .await
        .unwrap()
        .with_encoder(Arc::new(ProtobufEffectEncoder))
}

async fn env() -> Env {
    let db = TestDb::postgres().await;
    let store = connect_store(&db).await;
    store.migrate().await.unwrap();
    let orchestrator = Arc::new(Orchestrator::new(
        Arc::new(store.clone()),
        Arc::new(BuiltinResolver::default()),
        Arc::new(SystemClock),
        Arc::new(UuidV7Generator),
    ));
    let broker = EmbeddedBroker::start(BrokerOptions {
        brokers: 1,
        partitions: PARTITIONS,
    })
    .unwrap();
    Env {
        _db: db,
        store,
        orchestrator,
        broker,
    }
}

fn relay_config() -> RelayConfig {
    RelayConfig {
        batch_size: 64,
        poll_interval: Duration::from_millis(200),
        delivery_timeout: Duration::from_secs(2),
        backoff_base: Duration::from_millis(100),
        backoff_cap: Duration::from_millis(500),
        gauge_interval: Duration::from_secs(1),
    }
}

/// Starts a relay task; returns the stop switch and the task.
fn spawn_relay(
    store: Store,
    bootstrap: &str,
    listener: Option<Arc<dyn DeliveryListener>>,
) -> (watch::Sender<bool>, tokio::task::JoinHandle<()>) {
    let (stop, task, _) = spawn_relay_with(store, bootstrap, listener, relay_config());
    (stop, task)
}

fn spawn_relay_with(
    store: Store,
    bootstrap: &str,
    listener: Option<Arc<dyn DeliveryListener>>,
    config: RelayConfig,
) -> (
    watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
    RelayHandle,
) {
    let relay = Relay::new(store, bootstrap, listener, config).unwrap();
    let handle = relay.handle();
    let (stop, mut stopped) = watch::channel(false);
    let task = tokio::spawn(relay.run(async move {
        let _ = stopped.wait_for(|s| *s).await;
    }));
    (stop, task, handle)
}

/// Waits until no row is pending (published or parked).
async fn wait_settled(store: &Store, within: Duration) -> OutboxStats {
    let started = Instant::now();
    loop {
        let stats = store.outbox_stats().await.unwrap();
        if stats.pending == 0 {
            return stats;
        }
        assert!(started.elapsed() < within, "outbox not drained: {stats:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_drained(store: &Store, within: Duration) {
    let stats = wait_settled(store, within).await;
    assert_eq!(stats.parked, 0, "nothing may be parked");
}

async fn outbox_rows(store: &Store) -> Vec<event_outbox::Model> {
    event_outbox::Entity::find()
        .order_by_asc(event_outbox::Column::Id)
        .all(store.connection())
        .await
        .unwrap()
}

async fn register(orchestrator: &Orchestrator, owner: &str) -> BatchId {
    let raw = RawRegistration {
        expected_essay_count: 3,
        course_code: "ENG5".into(),
        class_id: None,
        student_prompt_ref: Some("prompt".into()),
        assignment_id: None,
        cj_default_llm_model: None,
        cj_default_temperature: None,
    };
    let valid = validate(raw, UserId::parse("user_id", owner).unwrap(), None).unwrap();
    orchestrator.register_batch(valid).await.unwrap().batch_id
}

fn published_topics(rows: &[event_outbox::Model]) -> Vec<String> {
    let set: HashSet<String> = rows.iter().map(|r| r.topic.clone()).collect();
    set.into_iter().collect()
}

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
        .request_pipeline(owner, batch_id, PhaseName::Nlp, None, None)
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
    let agg = env.store.load(batch_id).await.unwrap().unwrap();
    let run = agg.active_run().expect("a run is active");
    assert_eq!(
        run.phase(PhaseName::Spellcheck).unwrap().status,
        PhaseStatus::InProgress
    );

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
    let records = read_topics(
        env.broker.bootstrap_servers(),
        &published_topics(&rows),
        rows.len(),
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(records.len(), rows.len(), "every row exactly once");
    let by_id: HashMap<String, &Record> = records.iter().map(|r| (r.event_id(), r)).collect();
    for row in &rows {
        let record = by_id
            .get(&row.event_id.to_string())
            .expect("row published under its stored event id");
        assert_eq!(record.topic, row.topic);
        assert_eq!(record.key, row.message_key);
        assert_eq!(record.key, batch_id.to_string(), "keyed by batch id");
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
    let agg = env.store.load(batch_id).await.unwrap().unwrap();
    assert_eq!(
        agg.active_run()
            .unwrap()
            .phase(PhaseName::Nlp)
            .unwrap()
            .status,
        PhaseStatus::InProgress
    );
}

/// Inserts `per_key` rows for each key straight into the outbox, interleaved across keys.
async fn insert_raw_rows(
    store: &Store,
    topic: &str,
    keys: &[String],
    per_key: usize,
) -> Vec<(String, Uuid)> {
    let mut inserted = Vec::new();
    let now = Utc::now();
    for seq in 0..per_key {
        for key in keys {
            let event_id = Uuid::now_v7();
            let headers = BTreeMap::from([
                ("event_id".to_owned(), event_id.to_string()),
                ("seq".to_owned(), seq.to_string()),
            ]);
            let row = event_outbox::ActiveModel {
                id: ActiveValue::NotSet,
                event_id: ActiveValue::Set(event_id),
                topic: ActiveValue::Set(topic.to_owned()),
                message_key: ActiveValue::Set(key.clone()),
                payload: ActiveValue::Set(format!("{key}#{seq}").into_bytes()),
                headers: ActiveValue::Set(serde_json::to_string(&headers).unwrap()),
                created_at: ActiveValue::Set(now),
                published_at: ActiveValue::Set(None),
                attempts: ActiveValue::Set(0),
                next_attempt_at: ActiveValue::Set(now),
                last_error: ActiveValue::Set(None),
                parked: ActiveValue::Set(false),
            };
            event_outbox::Entity::insert(row)
                .exec(store.connection())
                .await
                .unwrap();
            inserted.push((key.clone(), event_id));
        }
    }
    inserted
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
    let second_store = connect_store(&env._db).await;
    let (stop_a, task_a) = spawn_relay(env.store.clone(), env.broker.bootstrap_servers(), None);
    let (stop_b, task_b) = spawn_relay(second_store, env.broker.bootstrap_servers(), None);
    wait_drained(&env.store, Duration::from_secs(60)).await;
    let _ = stop_a.send(true);
    let _ = stop_b.send(true);
    task_a.await.unwrap();
    task_b.await.unwrap();

    let rows = outbox_rows(&env.store).await;
    let records = read_topics(
        env.broker.bootstrap_servers(),
        &published_topics(&rows),
        rows.len(),
        Duration::from_secs(30),
    )
    .await;
    let mut seen = HashSet::new();
    for record in &records {
        assert!(
            seen.insert(record.event_id()),
            "event id {} published twice",
            record.event_id()
        );
    }
    let stored: HashSet<String> = rows.iter().map(|r| r.event_id.to_string()).collect();
    assert_eq!(seen, stored, "every stored row published, nothing else");

    // Order per key: on the shared topic each key's records sit in one partition in insert order.
    for key in &keys {
        let mut of_key: Vec<&Record> = records
            .iter()
            .filter(|r| r.topic == topic && &r.key == key)
            .collect();
        assert!(
            of_key.windows(2).all(|w| w[0].partition == w[1].partition),
            "one partition per key"
        );
        of_key.sort_by_key(|r| r.offset);
        let got: Vec<String> = of_key.iter().map(|r| r.event_id()).collect();
        let want: Vec<String> = inserted
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, id)| id.to_string())
            .collect();
        assert_eq!(got, want, "records of {key} in commit order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_outage_during_registrations_loses_and_duplicates_nothing() {
    let env = env().await;
    let (stop, task, handle) = spawn_relay_with(
        env.store.clone(),
        env.broker.bootstrap_servers(),
        None,
        relay_config(),
    );

    // Some traffic while the broker is up.
    let mut batches = Vec::new();
    for i in 0..5 {
        batches.push(register(&env.orchestrator, &format!("before-{i}")).await);
    }
    wait_drained(&env.store, Duration::from_secs(20)).await;

    // The broker goes away; registrations keep succeeding (they only touch the database).
    env.broker.set_down(true).unwrap();
    let outage = Instant::now();
    let mut during = 0;
    while outage.elapsed() < Duration::from_secs(4) {
        batches.push(register(&env.orchestrator, &format!("during-{during}")).await);
        during += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let noticed = Instant::now();
    while handle.is_healthy() {
        assert!(
            noticed.elapsed() < Duration::from_secs(10),
            "the relay never reported the outage"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = env.store.outbox_stats().await.unwrap();
    assert!(
        stats.pending > 0,
        "rows wait in the outbox while the broker is down: {stats:?}"
    );
    let failed_attempts: i32 = outbox_rows(&env.store)
        .await
        .iter()
        .map(|r| r.attempts)
        .sum();

    env.broker.set_down(false).unwrap();
    for i in 0..5 {
        batches.push(register(&env.orchestrator, &format!("after-{i}")).await);
    }
    wait_drained(&env.store, Duration::from_secs(60)).await;
    assert!(handle.is_healthy(), "healthy again once rows flow");
    let _ = stop.send(true);
    task.await.unwrap();

    let rows = outbox_rows(&env.store).await;
    assert_eq!(rows.len(), batches.len(), "one registered event per batch");
    let records = read_topics(
        env.broker.bootstrap_servers(),
        &published_topics(&rows),
        rows.len(),
        Duration::from_secs(30),
    )
    .await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for record in &records {
        *counts.entry(record.event_id()).or_default() += 1;
    }
    let duplicated: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(duplicated.is_empty(), "published twice: {duplicated:?}");
    let stored: HashSet<String> = rows.iter().map(|r| r.event_id.to_string()).collect();
    let got: HashSet<String> = counts.into_keys().collect();
    assert_eq!(got, stored, "nothing lost");
    let keys: HashSet<String> = records.iter().map(|r| r.key.clone()).collect();
    let batch_keys: HashSet<String> = batches.iter().map(ToString::to_string).collect();
    assert_eq!(keys, batch_keys);
    eprintln!("registered {} batches during a 4 s outage; {failed_attempts} failed publish attempts recorded", during);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_wakes_the_relay_without_waiting_for_its_poll() {
    let env = env().await;
    let mut config = relay_config();
    // Only a wake-up can explain a publish within the test's deadline.
    config.poll_interval = Duration::from_secs(120);
    let (stop, task, handle) = spawn_relay_with(
        env.store.clone(),
        env.broker.bootstrap_servers(),
        None,
        config,
    );
    let feed = ChangeFeed::new();
    let (stop_wake, mut wake_stopped) = watch::channel(false);
    let waker = tokio::spawn(handle.wake_on_changes(feed.clone(), async move {
        let _ = wake_stopped.wait_for(|s| *s).await;
    }));
    let orchestrator = Orchestrator::new(
        Arc::new(NotifyingRepository::new(Arc::new(env.store.clone()), feed)),
        Arc::new(BuiltinResolver::default()),
        Arc::new(SystemClock),
        Arc::new(UuidV7Generator),
    );
    // Let the relay's first (empty) round pass, so it is asleep in its long poll.
    tokio::time::sleep(Duration::from_millis(500)).await;

    for i in 0..3 {
        let started = Instant::now();
        register(&orchestrator, &format!("prompt-{i}")).await;
        wait_drained(&env.store, Duration::from_secs(5)).await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "published {:?} after the commit",
            started.elapsed()
        );
    }
    let _ = stop_wake.send(true);
    let _ = stop.send(true);
    waker.await.unwrap();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_that_keeps_failing_is_parked_and_starves_nobody() {
    let env = env().await;
    let topic = format!("bos.test.park.{}", Uuid::new_v4().simple());
    env.broker.create_topic(&topic, PARTITIONS).unwrap();
    // The producer refuses records above message.max.bytes (1 MB) before they leave the process.
    let poison = insert_raw_rows(&env.store, &topic, &["poison".to_owned()], 1).await;
    event_outbox::Entity::update_many()
        .col_expr(
            event_outbox::Column::Payload,
            sea_orm::sea_query::Expr::value(vec![0u8; 2 * 1024 * 1024]),
        )
        .filter(event_outbox::Column::MessageKey.eq("poison"))
        .exec(env.store.connection())
        .await
        .unwrap();
    // Later rows of the same key wait behind it only until it is parked.
    let mut healthy = insert_raw_rows(&env.store, &topic, &["poison".to_owned()], 2).await;
    healthy.extend(insert_raw_rows(&env.store, &topic, &["fine".to_owned()], 5).await);

    let mut config = store_config();
    config.outbox.max_attempts = 3;
    config.outbox.base_backoff = Duration::from_millis(10);
    let store = Store::connect_with(&env._db.url, config).await.unwrap();
    let (stop, task) = spawn_relay(store, env.broker.bootstrap_servers(), None);
    let stats = wait_settled(&env.store, Duration::from_secs(20)).await;
    let _ = stop.send(true);
    task.await.unwrap();
    assert_eq!(stats.parked, 1, "{stats:?}");
    let parked = env.store.parked_rows(10).await.unwrap();
    assert_eq!(parked[0].event_id.to_string(), poison[0].1.to_string());
    assert_eq!(parked[0].attempts, 3);
    let records = read_topics(
        env.broker.bootstrap_servers(),
        std::slice::from_ref(&topic),
        healthy.len(),
        Duration::from_secs(20),
    )
    .await;
    for key in ["poison", "fine"] {
        let mut of_key: Vec<&Record> = records.iter().filter(|r| r.key == key).collect();
        of_key.sort_by_key(|r| r.offset);
        let got: Vec<String> = of_key.iter().map(|r| r.event_id()).collect();
        let want: Vec<String> = healthy
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, id)| id.to_string())
            .collect();
        assert_eq!(got, want, "every other row of {key} went out, in order");
    }
}
