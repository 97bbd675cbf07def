//! Scale-out on the real stack: three `bos serve` processes on one database and one consumer group drive 200
//! batches through a three-phase pipeline; one process is killed with SIGKILL mid-run and never restarted.

mod stack;
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use bos::sim::{Behaviour, SimulatorOptions};
use futures::{stream, StreamExt};
use stack::{
    client, command_topics, commands_by_key, is_ready, runs_ended, BosProcess, StackEnv, Tansu,
};
use support::kafka::TopicReader;
use support::TestDb;

const BATCHES: usize = 200;
const ESSAYS: i32 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_survive_a_sigkill_without_losing_or_doubling_a_command() {
    let tansu = Tansu::start().await;
    let db = TestDb::postgres().await;
    let env = StackEnv {
        database_url: db.url.clone(),
        brokers: tansu.bootstrap.clone(),
        redis_url: Some("redis://127.0.0.1:6379".to_owned()),
        group: "bos".to_owned(),
        phase_timeout_secs: 3600,
    };
    let mut replicas = vec![
        BosProcess::start(&env, &[]).await,
        BosProcess::start(&env, &[]).await,
        BosProcess::start(&env, &[]).await,
    ];
    let (stop_simulator, stopped) = tokio::sync::oneshot::channel::<()>();
    let simulator = tokio::spawn(bos::sim::run(
        SimulatorOptions {
            brokers: tansu.bootstrap.clone(),
            group: "e2e-simulator".to_owned(),
            // Long enough that a pipeline (three phases) outlasts registering and requesting all 200, so the kill
            // lands mid-run however fast the replicas are, and however slow the count after it.
            latency: Duration::from_millis(1000),
            behaviour: Behaviour {
                failure_rate: 0.05,
                ..Behaviour::default()
            },
        },
        async move {
            let _ = stopped.await;
        },
    ));
    let user = "scale-teacher";
    let mut clients = Vec::new();
    for replica in &replicas {
        clients.push(client(replica, user).await);
    }

    // Register through every replica, then ask each batch for ai_feedback (spellcheck → nlp → ai_feedback).
    let batch_ids: Vec<String> = stream::iter(0..BATCHES)
        .map(|i| {
            let mut client = clients[i % clients.len()].clone();
            async move { stack::register(&mut client, ESSAYS, None).await.batch_id }
        })
        .buffered(16)
        .collect()
        .await;
    let requested = stream::iter(batch_ids.iter().enumerate())
        .map(|(i, batch_id)| {
            let mut client = clients[i % clients.len()].clone();
            async move {
                stack::wait_until(&mut client, batch_id, Duration::from_secs(120), is_ready).await;
                client
                    .request_pipeline(bos::proto::huleedu::bos::v1::RequestPipelineRequest {
                        batch_id: batch_id.clone(),
                        requested_pipeline: bos::proto::huleedu::common::v1::PhaseName::AiFeedback
                            as i32,
                        ..Default::default()
                    })
                    .await
                    .map(|_| ())
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    assert!(requested.iter().all(Result::is_ok), "{requested:?}");

    // Mid-run: some runs may have ended, most have not. Kill the first replica outright.
    // The kill comes first: counting 200 statuses takes long enough on a slow machine for the last runs to end
    // meanwhile. Runs ended by the count include every run that ended before the kill, so fewer than all of them
    // proves that the kill landed mid-run.
    replicas[0].kill();
    let mut survivor = clients[1].clone();
    let ended_by_count = count_ended(&mut survivor, &batch_ids).await;
    assert!(
        ended_by_count < BATCHES,
        "every run had ended by the count after the kill; the test proves nothing"
    );

    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    loop {
        let ended = count_ended(&mut survivor, &batch_ids).await;
        if ended == BATCHES {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{ended} of {BATCHES} runs ended; survivor log:\n{}",
            replicas[1].log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = stop_simulator.send(());
    let _ = simulator.await;

    // No (batch, phase, attempt) was commanded under two event ids; redelivery of one id is allowed.
    let reader = TopicReader::new(&tansu.bootstrap, &command_topics());
    let records = reader.drain(Duration::from_secs(3)).await;
    let commands = commands_by_key(&records);
    for ((batch, phase, attempt), ids) in &commands {
        assert_eq!(
            ids.len(),
            1,
            "{batch} {phase} attempt {attempt} commanded as {ids:?}"
        );
    }
    // Every batch got its three phases, in dependency order (event ids are UUIDv7, so time-ordered).
    let mut per_batch: BTreeMap<&str, Vec<(&str, &str)>> = BTreeMap::new();
    for ((batch, phase, _), ids) in &commands {
        per_batch
            .entry(batch.as_str())
            .or_default()
            .push((ids[0].as_str(), phase.as_str()));
    }
    assert_eq!(per_batch.len(), BATCHES);
    for (batch, mut phases) in per_batch {
        phases.sort();
        let order: Vec<&str> = phases.iter().map(|(_, phase)| *phase).collect();
        assert_eq!(order.first(), Some(&"spellcheck"), "{batch}: {order:?}");
        let nlp = order.iter().position(|p| *p == "nlp");
        let feedback = order.iter().position(|p| *p == "ai_feedback");
        if let (Some(nlp), Some(feedback)) = (nlp, feedback) {
            assert!(nlp < feedback, "{batch}: {order:?}");
        }
    }
}

async fn count_ended(client: &mut stack::Client, batch_ids: &[String]) -> usize {
    let mut ended = 0;
    for batch_id in batch_ids {
        if runs_ended(&stack::status(client, batch_id).await) {
            ended += 1;
        }
    }
    ended
}
