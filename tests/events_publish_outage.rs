//! The outbox relay through a broker outage and a row that keeps failing (mock cluster + real
//! PostgreSQL): nothing lost, nothing published twice, a poisoned row parked instead of looping.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use bos::store::entities::event_outbox;
use bos::store::Store;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use support::kafka::{ReadRecord, PARTITIONS};
use support::relay::*;
use uuid::Uuid;

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
    let records = read_all(
        env.broker.bootstrap_servers(),
        &published_topics(&rows),
        rows.len(),
    )
    .await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for record in &records {
        *counts.entry(event_id(record)).or_default() += 1;
    }
    let duplicated: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(duplicated.is_empty(), "published twice: {duplicated:?}");
    let stored: HashSet<String> = rows.iter().map(|r| r.event_id.to_string()).collect();
    let got: HashSet<String> = counts.into_keys().collect();
    assert_eq!(got, stored, "nothing lost");
    let keys: HashSet<String> = records.iter().filter_map(|r| r.key.clone()).collect();
    let batch_keys: HashSet<String> = batches.iter().map(ToString::to_string).collect();
    assert_eq!(keys, batch_keys);
    eprintln!("registered {} batches during a 4 s outage; {failed_attempts} failed publish attempts recorded", during);
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
    let store = Store::connect_with(&env.db.url, config).await.unwrap();
    let (stop, task) = spawn_relay(store, env.broker.bootstrap_servers(), None);
    let stats = wait_settled(&env.store, Duration::from_secs(20)).await;
    let _ = stop.send(true);
    task.await.unwrap();
    assert_eq!(stats.parked, 1, "{stats:?}");
    let parked = env.store.parked_rows(10).await.unwrap();
    assert_eq!(parked[0].event_id.to_string(), poison[0].1.to_string());
    assert_eq!(parked[0].attempts, 3);
    let records = read_all(
        env.broker.bootstrap_servers(),
        std::slice::from_ref(&topic),
        healthy.len(),
    )
    .await;
    for key in ["poison", "fine"] {
        let mut of_key: Vec<&ReadRecord> = records
            .iter()
            .filter(|r| r.key.as_deref() == Some(key))
            .collect();
        of_key.sort_by_key(|r| r.offset);
        let got: Vec<String> = of_key.iter().map(|r| event_id(r)).collect();
        let want: Vec<String> = healthy
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, id)| id.to_string())
            .collect();
        assert_eq!(got, want, "every other row of {key} went out, in order");
    }
}
