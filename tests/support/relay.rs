//! Helpers for the outbox relay tests: a store + orchestrator + embedded broker environment, relay
//! tasks with a stop switch, outbox inspection and raw outbox rows.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bos::core::graph::BuiltinResolver;
use bos::core::ids::{BatchId, UserId};
use bos::core::orchestrator::{Orchestrator, SystemClock, UuidV7Generator};
use bos::core::registration::{validate, RawRegistration};
use bos::events::broker::{BrokerOptions, EmbeddedBroker};
use bos::events::codec::ProtobufEffectEncoder;
use bos::events::relay::{DeliveryListener, Relay, RelayConfig, RelayHandle};
use bos::notify::feed::ChangeFeed;
use bos::store::entities::event_outbox;
use bos::store::{OutboxPolicy, OutboxStats, Store, StoreConfig};
use chrono::Utc;
use sea_orm::{ActiveValue, EntityTrait, QueryOrder};
use tokio::sync::watch;
use uuid::Uuid;

use super::kafka::{ReadRecord, TopicReader, PARTITIONS};
use super::TestDb;

/// Every record of `topics`: at least `expected` of them, then whatever else arrives until the
/// topics stay quiet for a moment (so a duplicate would be seen).
pub async fn read_all(bootstrap: &str, topics: &[String], expected: usize) -> Vec<ReadRecord> {
    let reader = TopicReader::new(bootstrap, topics);
    let mut records = reader.read(expected, Duration::from_secs(30)).await;
    records.extend(reader.drain(Duration::from_millis(1500)).await);
    records
}

/// The `event_id` header of a record.
pub fn event_id(record: &ReadRecord) -> String {
    record.header("event_id").unwrap_or_default().to_owned()
}

/// A migrated PostgreSQL store writing protobuf envelopes, an orchestrator over it, and a broker.
pub struct Env {
    pub db: TestDb,
    pub store: Store,
    pub orchestrator: Arc<Orchestrator>,
    pub broker: EmbeddedBroker,
}

pub fn store_config() -> StoreConfig {
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

pub async fn connect_store(db: &TestDb) -> Store {
    Store::connect_with(&db.url, store_config())
        .await
        .unwrap()
        .with_encoder(Arc::new(ProtobufEffectEncoder))
}

pub async fn env() -> Env {
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
        db,
        store,
        orchestrator,
        broker,
    }
}

pub fn relay_config() -> RelayConfig {
    RelayConfig {
        batch_size: 64,
        poll_interval: Duration::from_millis(200),
        delivery_timeout: Duration::from_secs(2),
        backoff_base: Duration::from_millis(100),
        backoff_cap: Duration::from_millis(500),
        gauge_interval: Duration::from_secs(1),
        delivery_settle: Duration::from_millis(50),
    }
}

/// Starts a relay task; returns the stop switch and the task.
pub fn spawn_relay(
    store: Store,
    bootstrap: &str,
    listener: Option<Arc<dyn DeliveryListener>>,
) -> (watch::Sender<bool>, tokio::task::JoinHandle<()>) {
    let (stop, task, _) = spawn_relay_with(store, bootstrap, listener, relay_config());
    (stop, task)
}

pub fn spawn_relay_with(
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

/// A relay whose safety poll (120 s) never runs within a test, woken only through a change feed, and an
/// orchestrator whose commits reach that feed: only a wake-up can explain a publish within a test's deadlines.
pub struct WokenRelay {
    pub orchestrator: Orchestrator,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    stop_wake: watch::Sender<bool>,
    waker: tokio::task::JoinHandle<()>,
}

impl WokenRelay {
    /// Starts it and lets the relay's first (empty) round pass, so that it is asleep in its long poll.
    pub async fn start(env: &Env) -> WokenRelay {
        let mut config = relay_config();
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
            super::committer(&env.store, vec![Arc::new(feed)]),
            Arc::new(BuiltinResolver::default()),
            Arc::new(SystemClock),
            Arc::new(UuidV7Generator),
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        WokenRelay {
            orchestrator,
            stop,
            task,
            stop_wake,
            waker,
        }
    }

    pub async fn stop(self) {
        let _ = self.stop_wake.send(true);
        let _ = self.stop.send(true);
        self.waker.await.unwrap();
        self.task.await.unwrap();
    }
}

/// Waits until no row is pending (published or parked).
pub async fn wait_settled(store: &Store, within: Duration) -> OutboxStats {
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

pub async fn wait_drained(store: &Store, within: Duration) {
    let stats = wait_settled(store, within).await;
    assert_eq!(stats.parked, 0, "nothing may be parked");
}

pub async fn outbox_rows(store: &Store) -> Vec<event_outbox::Model> {
    event_outbox::Entity::find()
        .order_by_asc(event_outbox::Column::Id)
        .all(store.connection())
        .await
        .unwrap()
}

pub async fn register(orchestrator: &Orchestrator, owner: &str) -> BatchId {
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

pub fn published_topics(rows: &[event_outbox::Model]) -> Vec<String> {
    let set: HashSet<String> = rows.iter().map(|r| r.topic.clone()).collect();
    set.into_iter().collect()
}

/// Inserts `per_key` rows for each key straight into the outbox, interleaved across keys.
pub async fn insert_raw_rows(
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
