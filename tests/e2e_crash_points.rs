//! Crash points: a `bos serve` process aborts (no unwinding, no shutdown) at a named point of the unit of work or
//! the relay, in the middle of a flow; it is restarted and the flow must finish with nothing lost and nothing
//! applied twice. Seen from the outside only: the API, the topics and the dead-letter topics.

mod stack;
mod support;

use std::time::Duration;

use bos::core::ids::{CorrelationId, EventId};
use bos::events::codec::{dlq_topic, encode_message, EnvelopeMeta, TraceContext};
use bos::proto::huleedu::common::v1 as pc;
use bos::proto::huleedu::events::v1 as pe;
use bos::sim::{Behaviour, SimulatorOptions};
use stack::{
    client, command_topics, commands_by_key, is_ready, runs_ended, try_client, BosProcess,
    StackEnv, Tansu,
};
use support::kafka::{TestProducer, TopicReader};
use support::TestDb;

// Each test aims past registration into the event-driven middle: the number is how many passes through the
// point the process survives before it aborts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_after_inbox_insert() {
    crash_and_recover("AfterInbox", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_between_cas_and_outbox_write() {
    crash_and_recover("AfterCas", 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_before_commit() {
    crash_and_recover("BeforeCommit", 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_after_commit_before_offset_commit() {
    crash_and_recover("AfterCommit", 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_after_claim_before_publish() {
    crash_and_recover("AfterClaim", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_after_publish_before_marking_published() {
    crash_and_recover("AfterPublishBeforeMark", 2).await;
}

async fn crash_and_recover(point: &str, after: u64) {
    let tansu = Tansu::start().await;
    let db = TestDb::postgres().await;
    let env = StackEnv {
        database_url: db.url.clone(),
        brokers: tansu.bootstrap.clone(),
        redis_url: None,
        group: "bos".to_owned(),
        phase_timeout_secs: 3600,
    };
    // Registration happens on a process without the crash point, which then stops: the crashing process
    // starts with only consumed events and the relay ahead of it.
    let batch_ids = {
        let registrar = BosProcess::start(&env, &[]).await;
        let mut api = client(&registrar, "crash-teacher").await;
        let guest = stack::register(&mut api, 3, None).await.batch_id;
        let regular = stack::register(&mut api, 3, Some("class-1")).await.batch_id;
        vec![guest, regular]
    };
    let crash_env = [
        ("BOS_CRASH_POINT", point.to_owned()),
        ("BOS_CRASH_AFTER_HITS", after.to_string()),
    ];
    let mut bos = BosProcess::start(&env, &crash_env).await;
    let (stop_simulator, stopped) = tokio::sync::oneshot::channel::<()>();
    let simulator = tokio::spawn(bos::sim::run(
        SimulatorOptions {
            brokers: tansu.bootstrap.clone(),
            group: "e2e-simulator".to_owned(),
            latency: Duration::from_millis(10),
            behaviour: Behaviour::default(),
        },
        async move {
            let _ = stopped.await;
        },
    ));
    let producer = TestProducer::new(&tansu.bootstrap);
    // One pipeline request event per batch, with a fixed event id: sent again after a crash, it must count once.
    let requests: Vec<_> = batch_ids.iter().map(|id| pipeline_request(id)).collect();
    let mut requested = [false, false];
    let mut crashes = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{point}: the flow did not finish; log:\n{}",
            bos.log_text()
        );
        if bos.exited() {
            assert!(
                bos.log_text().contains(&format!("BOS_CRASH_POINT={point}")),
                "{point}: died otherwise:\n{}",
                bos.log_text()
            );
            crashes += 1;
            bos = BosProcess::start(&env, &[]).await;
            for (i, request) in requests.iter().enumerate() {
                if requested[i] {
                    producer.send(request).await;
                }
            }
        }
        // The process may abort at its crash point while this connects: the next round restarts it.
        let Ok(Ok(mut api)) =
            tokio::time::timeout(Duration::from_secs(2), try_client(&bos, "crash-teacher")).await
        else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let mut all_ended = true;
        for (i, batch_id) in batch_ids.iter().enumerate() {
            let view = match api
                .get_batch_status(bos::proto::huleedu::bos::v1::GetBatchStatusRequest {
                    batch_id: batch_id.clone(),
                })
                .await
            {
                Ok(response) => response.into_inner().batch.unwrap_or_default(),
                Err(_) => {
                    all_ended = false;
                    continue;
                }
            };
            if !requested[i] && is_ready(&view) {
                producer.send(&requests[i]).await;
                requested[i] = true;
            }
            all_ended &= requested[i] && runs_ended(&view);
        }
        if all_ended {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(crashes, 1, "{point}: the crash point was never reached");

    // Nothing lost: both runs completed for every essay.
    let mut api = client(&bos, "crash-teacher").await;
    for batch_id in &batch_ids {
        let view = stack::status(&mut api, batch_id).await;
        let run = view
            .current_run
            .clone()
            .or_else(|| view.past_runs.first().cloned())
            .unwrap_or_default();
        assert_eq!(
            run.status,
            pc::PipelineRunStatus::CompletedSuccessfully as i32,
            "{point}: {view:#?}"
        );
        assert_eq!(run.successful_essay_count, 3, "{point}: {view:#?}");
        assert_eq!(
            view.past_runs.len() + usize::from(view.current_run.is_some()),
            1,
            "{point}: one run only"
        );
    }
    let _ = stop_simulator.send(());
    let _ = simulator.await;

    // Nothing applied twice: one event id per (batch, phase, attempt), one completion per run, no dead letters.
    let completed =
        bos::events::codec::topic_for::<pe::BatchPipelineCompleted>().unwrap_or_default();
    let mut topics = command_topics();
    topics.push(completed.clone());
    let records = stack::read_until(
        &tansu.bootstrap,
        &topics,
        Duration::from_secs(30),
        |records| stack::distinct_events(records, &completed) >= batch_ids.len(),
    )
    .await;
    for (key, ids) in commands_by_key(&records) {
        assert_eq!(ids.len(), 1, "{point}: {key:?} commanded as {ids:?}");
    }
    assert_eq!(
        stack::distinct_events(&records, &completed),
        batch_ids.len(),
        "{point}: one completion event per run"
    );
    let dead: Vec<String> = bos::events::codec::consumed_topics()
        .iter()
        .map(|t| dlq_topic(t))
        .collect();
    let dead_letters = TopicReader::new(&tansu.bootstrap, &dead)
        .drain(Duration::from_secs(1))
        .await;
    assert!(
        dead_letters.is_empty(),
        "{point}: dead letters {dead_letters:#?}"
    );
}

fn pipeline_request(batch_id: &str) -> bos::events::codec::EncodedRecord {
    let request = pe::ClientBatchPipelineRequest {
        batch_id: batch_id.to_owned(),
        requested_pipeline: pc::PhaseName::Nlp as i32,
        user_id: "crash-teacher".to_owned(),
        ..Default::default()
    };
    let meta = EnvelopeMeta {
        event_id: EventId::from_uuid(uuid::Uuid::now_v7()),
        correlation_id: CorrelationId::from_uuid(uuid::Uuid::now_v7()),
        timestamp: chrono::Utc::now(),
        trace: TraceContext::new_root(),
    };
    encode_message(&request, batch_id, &meta).expect("encode the pipeline request")
}
