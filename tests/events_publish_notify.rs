//! The timeout scanner and the Redis notifications, against real PostgreSQL and real Redis
//! (127.0.0.1:6379; each test uses its own channel prefix).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bos::core::graph::BuiltinResolver;
use bos::core::ids::{BatchId, PhaseName, UserId};
use bos::core::input::{Actor, Input, ProcessedEssay, ReportedPhaseStatus};
use bos::core::model::{BatchStatus, PhaseStatus, RunStatus};
use bos::core::orchestrator::{Orchestrator, SystemClock, UuidV7Generator};
use bos::core::ports::{BatchRepository, PipelineResolver};
use bos::core::registration::{validate, RawRegistration};
use bos::events::scanner::{self, ScannerConfig};
use bos::notify::feed::ChangeFeed;
use bos::notify::redis::{NoCoherence, RedisNotifier};
use bos::store::Store;
use futures::StreamExt;
use serde_json::Value;
use support::TestDb;
use tokio::sync::watch;
use uuid::Uuid;

const REDIS_URL: &str = "redis://127.0.0.1:6379";

fn orchestrator(repo: Arc<dyn BatchRepository>) -> Arc<Orchestrator> {
    let resolver: Arc<dyn PipelineResolver> = Arc::new(BuiltinResolver::default());
    Arc::new(Orchestrator::new(
        repo,
        resolver,
        Arc::new(SystemClock),
        Arc::new(UuidV7Generator),
    ))
}

/// A GUEST batch of two essays with spellcheck dispatched.
async fn dispatched_spellcheck(orch: &Orchestrator, store: &Store, owner: &str) -> BatchId {
    let raw = RawRegistration {
        expected_essay_count: 2,
        course_code: "SV1".into(),
        class_id: None,
        student_prompt_ref: None,
        assignment_id: None,
        cj_default_llm_model: None,
        cj_default_temperature: None,
    };
    let owner = UserId::parse("user_id", owner).unwrap();
    let batch_id = orch
        .register_batch(validate(raw, owner.clone(), None).unwrap())
        .await
        .unwrap()
        .batch_id;
    let agg = store.load(batch_id).await.unwrap().unwrap();
    orch.handle(batch_id, support::fixtures::provisioned(&agg), None)
        .await
        .unwrap();
    orch.request_pipeline(
        Actor::User(owner),
        batch_id,
        PhaseName::Spellcheck,
        Default::default(),
    )
    .await
    .unwrap();
    batch_id
}

fn stop_switch() -> (
    watch::Sender<bool>,
    impl Fn() -> futures::future::BoxFuture<'static, ()>,
) {
    let (tx, rx) = watch::channel(false);
    let make = move || {
        let mut rx = rx.clone();
        let fut: futures::future::BoxFuture<'static, ()> = Box::pin(async move {
            let _ = rx.wait_for(|s| *s).await;
        });
        fut
    };
    (tx, make)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scanner_times_out_an_overdue_phase_and_ends_the_run() {
    let db = TestDb::postgres().await;
    let store = db.store().await;
    let orch = orchestrator(Arc::new(store.clone()));
    let batch_id = dispatched_spellcheck(&orch, &store, "scan-owner").await;

    let (stop, shutdown) = stop_switch();
    let config = ScannerConfig {
        phase_timeout: Duration::from_millis(300),
        interval: Duration::from_millis(100),
        limit: 10,
    };
    let task = tokio::spawn(scanner::run(orch.clone(), config, shutdown()));

    let started = Instant::now();
    let agg = loop {
        let agg = store.load(batch_id).await.unwrap().unwrap();
        if agg.active_run().is_none() {
            break agg;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "phase never timed out"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = stop.send(true);
    task.await.unwrap();

    // Not before the timeout: the phase was dispatched at least 300 ms before it failed.
    assert!(started.elapsed() >= Duration::from_millis(300));
    let run = agg.runs.last().unwrap();
    let phase = run.phase(PhaseName::Spellcheck).unwrap();
    assert_eq!(phase.status, PhaseStatus::Failed);
    assert!(
        phase
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("timeout"),
        "{:?}",
        phase.error
    );
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(agg.batch.status, BatchStatus::ReadyForPipelineExecution);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scanner_leaves_phases_within_their_timeout_alone() {
    let db = TestDb::postgres().await;
    let store = db.store().await;
    let orch = orchestrator(Arc::new(store.clone()));
    let batch_id = dispatched_spellcheck(&orch, &store, "patient-owner").await;
    let (stop, shutdown) = stop_switch();
    let config = ScannerConfig {
        phase_timeout: Duration::from_secs(3600),
        interval: Duration::from_millis(50),
        limit: 10,
    };
    let task = tokio::spawn(scanner::run(orch.clone(), config, shutdown()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop.send(true);
    task.await.unwrap();
    let agg = store.load(batch_id).await.unwrap().unwrap();
    let phase = agg
        .active_run()
        .unwrap()
        .phase(PhaseName::Spellcheck)
        .unwrap();
    assert_eq!(phase.status, PhaseStatus::DispatchInitiated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn phase_outcome_notifies_the_owner_channel() {
    let prefix = format!("test-{}:", Uuid::new_v4().simple());
    let db = TestDb::postgres().await;
    let store = db.store().await;
    let notifier = RedisNotifier::new(REDIS_URL, prefix.clone()).unwrap();
    let channel = notifier.user_channel("notified-owner");
    let (publisher, _task) = notifier.spawn_publisher(64);
    let repo = support::committer(&store, vec![Arc::new(publisher)]);
    let orch = orchestrator(repo);
    let batch_id = dispatched_spellcheck(&orch, &store, "notified-owner").await;

    let client = redis::Client::open(REDIS_URL).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe(&channel).await.unwrap();
    let mut messages = pubsub.on_message();

    let agg = store.load(batch_id).await.unwrap().unwrap();
    let run = agg.active_run().unwrap();
    let attempt = run.phase(PhaseName::Spellcheck).unwrap().attempt;
    let outcome = Input::PhaseOutcome {
        phase: PhaseName::Spellcheck,
        attempt,
        status: ReportedPhaseStatus::CompletedWithFailures,
        processed: vec![ProcessedEssay {
            essay_id: agg.essays[0].id,
            output_ref: None,
        }],
        failed: vec![agg.essays[1].id],
    };
    orch.handle(batch_id, outcome, None).await.unwrap();

    let message = tokio::time::timeout(Duration::from_secs(5), messages.next())
        .await
        .expect("a notification within 5 s")
        .unwrap();
    let json: Value = serde_json::from_str(&message.get_payload::<String>().unwrap()).unwrap();
    assert_eq!(json["event"], "batch_phase_concluded");
    assert_eq!(json["batch_id"], batch_id.to_string());
    assert_eq!(json["phase"], "spellcheck");
    assert_eq!(json["status"], "COMPLETED_WITH_PARTIAL_SUCCESS");
    assert_eq!(json["correlation_id"], run.correlation_id.to_string());
    let timestamp = json["timestamp"].as_str().unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(timestamp).is_ok(),
        "{timestamp}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changes_fan_out_to_other_replicas_but_not_back() {
    let prefix = format!("test-{}:", Uuid::new_v4().simple());
    let replica_a = RedisNotifier::new(REDIS_URL, prefix.clone()).unwrap();
    let replica_b = RedisNotifier::new(REDIS_URL, prefix.clone()).unwrap();
    let (feed_a, feed_b) = (ChangeFeed::new(), ChangeFeed::new());
    let (stop, shutdown) = stop_switch();
    let a = {
        let (n, f, s) = (replica_a.clone(), feed_a.clone(), shutdown());
        tokio::spawn(async move { n.relay_changes(f, Arc::new(NoCoherence), s).await })
    };
    let b = {
        let (n, f, s) = (replica_b.clone(), feed_b.clone(), shutdown());
        tokio::spawn(async move { n.relay_changes(f, Arc::new(NoCoherence), s).await })
    };
    let mut seen_a = feed_a.subscribe();
    let mut seen_b = feed_b.subscribe();

    // The subscription starts asynchronously: announce until B hears one.
    let batch_id = BatchId::from_uuid(Uuid::now_v7());
    let started = Instant::now();
    loop {
        replica_a.publish_change(batch_id).await.unwrap();
        if let Ok(Ok(id)) = tokio::time::timeout(Duration::from_millis(200), seen_b.recv()).await {
            assert_eq!(id.batch_id, batch_id);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "replica B never heard the change"
        );
    }
    assert!(
        seen_a.try_recv().is_err(),
        "a replica ignores its own announcements"
    );
    let _ = stop.send(true);
    a.await.unwrap();
    b.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_down_never_fails_or_delays_the_unit_of_work() {
    // Nobody listens on this port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let db = TestDb::postgres().await;
    let store = db.store().await;
    let notifier = RedisNotifier::new(&format!("redis://127.0.0.1:{port}"), "down:").unwrap();
    assert!(notifier
        .publish_change(BatchId::from_uuid(Uuid::now_v7()))
        .await
        .is_err());
    let (publisher, _task) = notifier.spawn_publisher(4);
    let orch = orchestrator(support::committer(&store, vec![Arc::new(publisher)]));
    let started = Instant::now();
    // Several units, more notifications than the queue holds: all commit, none waits for Redis.
    for i in 0..3 {
        dispatched_spellcheck(&orch, &store, &format!("owner-{i}")).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}
