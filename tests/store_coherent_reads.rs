//! Status reads served from the aggregate cache without a query (`BatchRepository::read`), on real PostgreSQL and
//! Redis: only while the coherence signal is live and within the maximum age, never past a remote invalidation,
//! and across two replicas wired through the real Redis subscription and publisher.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bos::core::ids::BatchId;
use bos::core::model::BatchAggregate;
use bos::core::ports::{Applied, BatchRepository};
use bos::notify::feed::ChangeFeed;
use bos::notify::redis::{CacheCoherence, RedisNotifier};
use bos::store::{Store, StoreConfig};
use chrono::Utc;
use sea_orm::{ConnectionTrait, Statement, Value};
use support::fixtures::*;
use support::TestDb;
use tokio::sync::watch;
use uuid::Uuid;

const REDIS_URL: &str = "redis://127.0.0.1:6379";

async fn store_with_max_age(db: &TestDb, max_age: Duration) -> Store {
    db.store_with(StoreConfig {
        status_cache_max_age: max_age,
        ..StoreConfig::default()
    })
    .await
}

fn changed(applied: Applied) -> BatchAggregate {
    match applied {
        Applied::Changed { aggregate, .. } => *aggregate,
        Applied::Duplicate => panic!("expected a change, got a duplicate"),
    }
}

/// Registers a batch through `store`, so its cache holds the committed aggregate.
async fn registered(store: &Store) -> BatchAggregate {
    let new = new_batch("teacher-1", 2, false);
    changed(store.apply(register(&new), Utc::now()).await.unwrap())
}

/// An operator's UPDATE behind every store's back: the batch row's version moves on, nobody announces it.
async fn bump_version_out_of_band(store: &Store, batch_id: BatchId) {
    let conn = store.connection();
    let sql = "UPDATE batches SET version = version + 1, updated_at = now() WHERE id = $1";
    let id = Value::from(batch_id.as_uuid());
    conn.execute_raw(Statement::from_sql_and_values(
        conn.get_database_backend(),
        sql,
        [id],
    ))
    .await
    .unwrap();
}

async fn read_version(store: &Store, batch_id: BatchId) -> i64 {
    store
        .read(batch_id)
        .await
        .unwrap()
        .expect("the batch exists")
        .batch
        .version
}

#[tokio::test]
async fn with_coherence_live_a_read_is_served_without_a_query_until_max_age() {
    let db = TestDb::postgres().await;
    let max_age = Duration::from_millis(600);
    let store = store_with_max_age(&db, max_age).await;
    store.remote_live();
    let agg = registered(&store).await;
    let id = agg.batch.id;
    let v = agg.batch.version;
    let verified = Instant::now();
    bump_version_out_of_band(&store, id).await;
    // Not seen: the read did not ask the database.
    assert_eq!(read_version(&store, id).await, v);
    assert!(
        verified.elapsed() < max_age,
        "the test machine was too slow to prove anything"
    );
    // Seen once the entry is older than max_age.
    tokio::time::sleep(max_age).await;
    assert_eq!(read_version(&store, id).await, v + 1);
    // A version-checked load (units of work, pre-checks) never trusts the cache.
    bump_version_out_of_band(&store, id).await;
    assert_eq!(store.load(id).await.unwrap().unwrap().batch.version, v + 2);
}

#[tokio::test]
async fn without_coherence_a_change_is_seen_at_once() {
    let db = TestDb::postgres().await;
    let store = store_with_max_age(&db, Duration::from_secs(60)).await;
    // Never live (no Redis).
    let agg = registered(&store).await;
    let id = agg.batch.id;
    assert_eq!(read_version(&store, id).await, agg.batch.version);
    bump_version_out_of_band(&store, id).await;
    assert_eq!(read_version(&store, id).await, agg.batch.version + 1);

    // Live, then lost: trust goes with the signal.
    store.remote_live();
    assert_eq!(
        store.load(id).await.unwrap().unwrap().batch.version,
        agg.batch.version + 1
    );
    bump_version_out_of_band(&store, id).await;
    assert_eq!(
        read_version(&store, id).await,
        agg.batch.version + 1,
        "trusted while live"
    );
    store.remote_lost();
    assert_eq!(read_version(&store, id).await, agg.batch.version + 2);
    // Back live: the entry must be verified again before it is trusted.
    store.remote_live();
    bump_version_out_of_band(&store, id).await;
    assert_eq!(read_version(&store, id).await, agg.batch.version + 3);

    // Zero max_age trusts nothing, live or not.
    let zero = store_with_max_age(&db, Duration::ZERO).await;
    zero.remote_live();
    assert_eq!(read_version(&zero, id).await, agg.batch.version + 3);
    bump_version_out_of_band(&zero, id).await;
    assert_eq!(read_version(&zero, id).await, agg.batch.version + 4);
}

#[tokio::test]
async fn a_remote_invalidation_makes_the_next_read_fresh() {
    let db = TestDb::postgres().await;
    let store = store_with_max_age(&db, Duration::from_secs(60)).await;
    store.remote_live();
    let agg = registered(&store).await;
    let id = agg.batch.id;
    bump_version_out_of_band(&store, id).await;
    assert_eq!(read_version(&store, id).await, agg.batch.version, "trusted");
    store.remote_changed(id);
    assert_eq!(read_version(&store, id).await, agg.batch.version + 1);
    // The fresh read is trusted again.
    bump_version_out_of_band(&store, id).await;
    assert_eq!(read_version(&store, id).await, agg.batch.version + 1);
}

fn stop_switch() -> (watch::Sender<bool>, watch::Receiver<bool>) {
    watch::channel(false)
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Waits until `feed` announces `batch_id` (the relay then has invalidated it in the cache).
async fn heard(
    seen: &mut tokio::sync::broadcast::Receiver<bos::notify::feed::Change>,
    batch_id: BatchId,
) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, seen.recv()).await {
            Ok(Ok(change)) if change.batch_id == batch_id => return,
            Ok(_) => {}
            Err(_) => panic!("replica A never heard of {batch_id}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_replicas_commit_reaches_a_trusted_read_through_redis() {
    let db = TestDb::postgres().await;
    let prefix = format!("test-{}:", Uuid::new_v4().simple());
    // Only the invalidation can make A's reads fresh within this test.
    let a = store_with_max_age(&db, Duration::from_secs(60)).await;
    let b = store_with_max_age(&db, Duration::from_secs(60)).await;
    let notifier_a = RedisNotifier::new(REDIS_URL, prefix.clone()).unwrap();
    let notifier_b = RedisNotifier::new(REDIS_URL, prefix.clone()).unwrap();
    let (stop, stop_rx) = stop_switch();
    let feed_a = ChangeFeed::new();
    let mut seen_a = feed_a.subscribe();
    let relay_a = {
        let (n, f, s) = (notifier_a.clone(), feed_a.clone(), stopped(stop_rx.clone()));
        let coherence: Arc<dyn CacheCoherence> = Arc::new(a.clone());
        tokio::spawn(async move { n.relay_changes(f, coherence, s).await })
    };
    let relay_b = {
        let (n, f, s) = (
            notifier_b.clone(),
            ChangeFeed::new(),
            stopped(stop_rx.clone()),
        );
        let coherence: Arc<dyn CacheCoherence> = Arc::new(b.clone());
        tokio::spawn(async move { n.relay_changes(f, coherence, s).await })
    };
    let (publisher_b, _publishing) = notifier_b.clone().spawn_publisher(64);
    let replica_b = support::committer(&b, vec![Arc::new(publisher_b)]);

    // A's subscription starts asynchronously: announce until A hears one (it is live from then on).
    let probe = BatchId::from_uuid(Uuid::now_v7());
    let started = Instant::now();
    loop {
        notifier_b.publish_change(probe).await.unwrap();
        if let Ok(Ok(change)) =
            tokio::time::timeout(Duration::from_millis(200), seen_a.recv()).await
        {
            assert_eq!(change.batch_id, probe);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "A never subscribed"
        );
    }

    // B registers; once A has heard of it, A's read is verified and trusted.
    let new = new_batch("teacher-1", 2, false);
    let agg = changed(replica_b.apply(register(&new), Utc::now()).await.unwrap());
    let id = agg.batch.id;
    heard(&mut seen_a, id).await;
    assert_eq!(read_version(&a, id).await, agg.batch.version);
    bump_version_out_of_band(&a, id).await;
    assert_eq!(
        read_version(&a, id).await,
        agg.batch.version,
        "A serves its trusted entry without a query"
    );

    // B commits a change: A shows it within a short poll, long before A's max_age could explain it.
    let moved = changed(
        replica_b
            .apply(unit(id, provisioned(&agg)), Utc::now())
            .await
            .unwrap(),
    );
    assert_eq!(moved.batch.version, agg.batch.version + 2);
    let committed = Instant::now();
    loop {
        if read_version(&a, id).await == moved.batch.version {
            break;
        }
        assert!(
            committed.elapsed() < Duration::from_secs(2),
            "A still serves a stale state"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Shutting the subscription down takes the trust away: the next out-of-band change is seen at once.
    let _ = stop.send(true);
    relay_a.await.unwrap();
    relay_b.await.unwrap();
    bump_version_out_of_band(&a, id).await;
    assert_eq!(read_version(&a, id).await, moved.batch.version + 1);
}
