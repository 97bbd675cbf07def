//! The demo's flows on the real stack — PostgreSQL, Redis, a tansu broker and a `bos serve` process — asserted
//! only from the outside: the API, the topics and the owner's Redis channel.

mod stack;
mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bos::events::codec::decode_payload;
use bos::proto::huleedu::common::v1 as pc;
use bos::proto::huleedu::events::v1 as pe;
use bos::sim::demo::{default_batches, DemoResult};
use bos::sim::{Behaviour, SimulatorOptions};
use futures::StreamExt;
use stack::{command_topics, commands_by_key, BosProcess, StackEnv, Tansu, JWT_SECRET};
use support::TestDb;

const REDIS_URL: &str = "redis://127.0.0.1:6379";

/// Collects every message published on `channel` until the test ends.
async fn listen(channel: String) -> Arc<Mutex<Vec<serde_json::Value>>> {
    let client = redis::Client::open(REDIS_URL).expect("redis url");
    let mut pubsub = client.get_async_pubsub().await.expect("redis pubsub");
    pubsub.subscribe(&channel).await.expect("subscribe");
    let seen: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let sink = Arc::clone(&seen);
    tokio::spawn(async move {
        let mut messages = pubsub.into_on_message();
        while let Some(message) = messages.next().await {
            let payload: String = message.get_payload().unwrap_or_default();
            if let Ok(value) = serde_json::from_str(&payload) {
                sink.lock().unwrap().push(value);
            }
        }
    });
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn demo_batches_complete_with_one_command_per_attempt_real_counts_and_owner_notifications() {
    let tansu = Tansu::start().await;
    let db = TestDb::postgres().await;
    let user = format!("e2e-teacher-{}", uuid::Uuid::now_v7().simple());
    let notifications = listen(format!("ws:{user}")).await;
    let env = StackEnv {
        database_url: db.url.clone(),
        brokers: tansu.bootstrap.clone(),
        redis_url: Some(REDIS_URL.to_owned()),
        group: "bos".to_owned(),
        phase_timeout_secs: 3600,
    };
    let bos = BosProcess::start(&env, &[]).await;
    let (stop_simulator, stopped) = tokio::sync::oneshot::channel::<()>();
    let simulator = tokio::spawn(bos::sim::run(
        SimulatorOptions {
            brokers: tansu.bootstrap.clone(),
            group: "e2e-simulator".to_owned(),
            latency: Duration::from_millis(20),
            behaviour: Behaviour {
                failure_rate: 0.2,
                ..Behaviour::default()
            },
        },
        async move {
            let _ = stopped.await;
        },
    ));

    let jwt = bos::config::JwtKey::Secret(bos::config::Secret::new(JWT_SECRET));
    let token = bos::api::auth::mint_token(&jwt, &user, None, 3600).unwrap();
    let batches = default_batches();
    let results = bos::sim::demo::run(
        &bos.url(),
        &token,
        batches.clone(),
        Duration::from_secs(150),
    )
    .await
    .unwrap_or_else(|e| panic!("demo failed: {e}\n{}", bos.log_text()));
    let _ = stop_simulator.send(());
    let stats = simulator.await.unwrap().unwrap();
    assert_eq!(stats.undecodable, 0);

    // Final statuses: every run ended, and every essay is accounted for.
    assert_eq!(results.len(), batches.len());
    let by_batch: BTreeMap<String, &DemoResult> =
        results.iter().map(|r| (r.batch_id.clone(), r)).collect();
    for (result, batch) in results.iter().zip(&batches) {
        assert_ne!(result.run_status, "RUNNING", "{result:?}");
        assert_eq!(result.succeeded + result.failed, batch.essays, "{result:?}");
        let regular = batch.class_id.is_some();
        assert_eq!(result.class_type, if regular { "REGULAR" } else { "GUEST" });
    }

    // The topics: one command per (batch, phase, attempt), keyed by batch id; real counts in completions.
    let mut topics = command_topics();
    let completed_topic = bos::events::codec::topic_for::<pe::BatchPipelineCompleted>().unwrap();
    topics.push(completed_topic.clone());
    let records = stack::read_until(
        &tansu.bootstrap,
        &topics,
        Duration::from_secs(30),
        |records| stack::distinct_events(records, &completed_topic) >= batches.len(),
    )
    .await;
    let commands = commands_by_key(&records);
    assert!(!commands.is_empty());
    for ((batch, phase, attempt), ids) in &commands {
        assert_eq!(
            ids.len(),
            1,
            "{batch} {phase} attempt {attempt} was commanded as {ids:?}"
        );
        assert!(
            by_batch.contains_key(batch),
            "a command for an unknown batch {batch}"
        );
    }
    let matching = commands
        .keys()
        .filter(|(_, phase, _)| phase == "student_matching")
        .count();
    assert_eq!(
        matching,
        batches.iter().filter(|b| b.class_id.is_some()).count()
    );
    let mut seen_completions = std::collections::BTreeSet::new();
    let completions: Vec<pe::BatchPipelineCompleted> = records
        .iter()
        .filter(|r| r.topic == completed_topic)
        // At-least-once: a completion published twice carries one event id and counts once.
        .filter(|r| seen_completions.insert(r.header("event_id").unwrap_or_default().to_owned()))
        .map(|r| {
            decode_payload::<pe::BatchPipelineCompleted>(&r.topic, Some(&r.payload))
                .unwrap()
                .1
        })
        .collect();
    assert_eq!(completions.len(), batches.len(), "one completion per run");
    for completion in &completions {
        let result = by_batch[&completion.batch_id];
        assert_eq!(completion.successful_essay_count, result.succeeded);
        assert_eq!(completion.failed_essay_count, result.failed);
        assert_ne!(
            completion.final_status,
            pc::PipelineRunStatus::Running as i32
        );
    }

    // The owner's channel: one batch_phase_concluded per concluded pipeline phase.
    let pipeline_commands = commands
        .keys()
        .filter(|(_, phase, _)| phase != "student_matching")
        .count();
    let seen = notifications.lock().unwrap().clone();
    let concluded: Vec<_> = seen
        .iter()
        .filter(|n| n["event"] == "batch_phase_concluded")
        .collect();
    assert!(
        concluded.len() >= pipeline_commands,
        "{} notifications for {pipeline_commands} phases: {seen:#?}",
        concluded.len()
    );
    for notification in concluded {
        let batch = notification["batch_id"].as_str().unwrap_or_default();
        assert!(
            by_batch.contains_key(batch),
            "notification for another batch: {notification}"
        );
    }
}
