//! The relay's side of the outbox on a real database: leases, per-key order, concurrent relays, back-off,
//! parking and pruning.

mod support;

use std::collections::HashSet;
use std::time::Duration as StdDuration;

use bos::core::ids::EventId;
use bos::core::ports::{Applied, BatchRepository};
use bos::store::{FailureOutcome, OutboxPolicy, Store, StoreConfig};
use chrono::{DateTime, Duration, SubsecRound, Utc};
use support::fixtures::*;
use support::{Backend, TestDb};
use uuid::Uuid;

/// Registers `n` batches (one outbox row each, each its own key); returns the batch ids in order.
async fn register_batches(store: &Store, n: usize, now: DateTime<Utc>) -> Vec<String> {
    let mut keys = Vec::new();
    for _ in 0..n {
        let new = new_batch("teacher-1", 1, true);
        store.apply(register(&new), now).await.unwrap();
        keys.push(new.batch_id.to_string());
    }
    keys
}

fn policy(max_attempts: u32) -> StoreConfig {
    StoreConfig {
        outbox: OutboxPolicy {
            max_attempts,
            ..OutboxPolicy::default()
        },
        ..StoreConfig::default()
    }
}

async fn claims_are_leased_and_ordered_per_key(db: &TestDb) {
    let store = db.store().await;
    let now = Utc::now();
    let new = new_batch("teacher-1", 2, true);
    let Applied::Changed { aggregate, .. } = store.apply(register(&new), now).await.unwrap() else {
        panic!()
    };
    // A second row for the same key: the student-matching command.
    store
        .apply(unit(new.batch_id, provisioned(&aggregate)), now)
        .await
        .unwrap();
    let others = register_batches(&store, 2, now).await;

    let first = store.claim_due(10, now).await.unwrap();
    let keys: Vec<_> = first.iter().map(|r| r.key.clone()).collect();
    assert_eq!(
        keys,
        vec![
            new.batch_id.to_string(),
            others[0].clone(),
            others[1].clone()
        ]
    );
    assert_eq!(
        first[0].topic, "test.batch.essays.registered",
        "only the oldest row of a key is claimable"
    );
    assert_eq!(
        first[0].headers.get("event_id"),
        Some(&first[0].event_id.to_string())
    );
    assert!(
        store.claim_due(10, now).await.unwrap().is_empty(),
        "claimed rows are leased"
    );

    // Once the key's first row is published, its next row is claimable.
    assert_eq!(store.mark_published(&[first[0].id], now).await.unwrap(), 1);
    let second = store.claim_due(10, now).await.unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].topic, "test.student_matching.initiate");

    // A crashed relay's rows come back after the lease.
    let after_lease =
        now + Duration::from_std(store.config().outbox.lease).unwrap() + Duration::seconds(1);
    let again: HashSet<_> = store
        .claim_due(10, after_lease)
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    let expected: HashSet<_> = [first[1].id, first[2].id, second[0].id]
        .into_iter()
        .collect();
    assert_eq!(again, expected);
}
on_both_backends!(leases_and_key_order, claims_are_leased_and_ordered_per_key);

async fn two_relays_never_claim_the_same_row(db: &TestDb) {
    let store = db.store().await;
    let now = Utc::now();
    let keys = register_batches(&store, 120, now).await;
    // PostgreSQL: two pools, as two replicas would have. SQLite: one process, two relay tasks on one store.
    let second = match db.backend {
        Backend::Postgres => db.store().await,
        Backend::Sqlite => store.clone(),
    };
    let relays: Vec<_> = [store.clone(), second]
        .into_iter()
        .map(|relay| {
            tokio::spawn(async move {
                let mut claimed = Vec::new();
                loop {
                    let rows = relay.claim_due(7, now).await.unwrap();
                    if rows.is_empty() {
                        break;
                    }
                    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
                    tokio::task::yield_now().await;
                    relay.mark_published(&ids, now).await.unwrap();
                    claimed.extend(ids);
                }
                claimed
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut per_relay = Vec::new();
    for relay in relays {
        let claimed = relay.await.unwrap();
        per_relay.push(claimed.len());
        all.extend(claimed);
    }
    let distinct: HashSet<_> = all.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        all.len(),
        "no row was claimed twice: {per_relay:?}"
    );
    assert_eq!(all.len(), keys.len(), "every row was claimed");
    let stats = store.outbox_stats().await.unwrap();
    assert_eq!((stats.pending, stats.published), (0, 120));
}
on_both_backends!(two_relays, two_relays_never_claim_the_same_row);

async fn failures_back_off_exponentially_then_park(db: &TestDb) {
    let store = db.store_with(policy(4)).await;
    let now = Utc::now().trunc_subsecs(6);
    let keys = register_batches(&store, 1, now).await;
    let new = new_batch("teacher-1", 1, false);
    store.apply(register(&new), now).await.unwrap();

    let mut at = now;
    let mut delays = Vec::new();
    for attempt in 1..=4 {
        let rows = store.claim_due(10, at).await.unwrap();
        let row = rows
            .iter()
            .find(|r| r.key == keys[0])
            .expect("the failing row is due");
        assert_eq!(row.attempts, attempt - 1);
        match store
            .record_failure(row.id, "broker down", at)
            .await
            .unwrap()
        {
            FailureOutcome::RetryAt(next) => {
                delays.push((next - at).to_std().unwrap());
                // Not due a moment before its back-off ends.
                let early = store
                    .claim_due(10, next - Duration::milliseconds(1))
                    .await
                    .unwrap();
                assert!(early.iter().all(|r| r.key != keys[0]));
                at = next;
            }
            FailureOutcome::Parked => assert_eq!(attempt, 4),
            FailureOutcome::Unchanged => panic!("the failure was not recorded"),
        }
    }
    assert_eq!(
        delays,
        vec![
            StdDuration::from_millis(200),
            StdDuration::from_millis(400),
            StdDuration::from_millis(800)
        ]
    );
    let far_future = now + Duration::days(1);
    let rows = store.claim_due(10, far_future).await.unwrap();
    assert!(
        rows.iter().all(|r| r.key != keys[0]),
        "a parked row is never claimed again"
    );
    assert_eq!(store.parked_count().await.unwrap(), 1);
    let parked = store.parked_rows(10).await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].attempts, 4);
    assert_eq!(
        store
            .record_failure(parked[0].id, "again", far_future)
            .await
            .unwrap(),
        FailureOutcome::Unchanged
    );
}
on_both_backends!(backoff_and_park, failures_back_off_exponentially_then_park);

async fn a_parked_row_does_not_block_newer_rows_of_its_key(db: &TestDb) {
    let store = db.store_with(policy(1)).await;
    let now = Utc::now();
    let new = new_batch("teacher-1", 1, true);
    let Applied::Changed { aggregate, .. } = store.apply(register(&new), now).await.unwrap() else {
        panic!()
    };
    store
        .apply(unit(new.batch_id, provisioned(&aggregate)), now)
        .await
        .unwrap();
    let first = store.claim_due(10, now).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(
        store
            .record_failure(first[0].id, "poison", now)
            .await
            .unwrap(),
        FailureOutcome::Parked
    );
    let next = store.claim_due(10, now).await.unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].topic, "test.student_matching.initiate");
}
on_both_backends!(
    parked_row_does_not_starve,
    a_parked_row_does_not_block_newer_rows_of_its_key
);

async fn prune_removes_old_published_rows_and_old_inbox_rows(db: &TestDb) {
    let store = db.store().await;
    let now = Utc::now();
    register_batches(&store, 3, now).await;
    let rows = store.claim_due(10, now).await.unwrap();
    store.mark_published(&[rows[0].id], now).await.unwrap();
    let new = new_batch("teacher-1", 1, false);
    let Applied::Changed { aggregate, .. } = store.apply(register(&new), now).await.unwrap() else {
        panic!()
    };
    let event_id = EventId::from_uuid(Uuid::now_v7());
    store
        .apply(
            event_unit(
                new.batch_id,
                provisioned(&aggregate),
                event_id,
                "provisioning",
            ),
            now,
        )
        .await
        .unwrap();

    let report = store
        .prune(now - Duration::hours(1), now - Duration::hours(1))
        .await
        .unwrap();
    assert_eq!(
        (report.outbox_rows, report.inbox_rows),
        (0, 0),
        "nothing is old enough yet"
    );
    let report = store
        .prune(now + Duration::seconds(1), now + Duration::seconds(1))
        .await
        .unwrap();
    assert_eq!((report.outbox_rows, report.inbox_rows), (1, 1));
    assert!(!store.is_processed(event_id).await.unwrap());
    let stats = store.outbox_stats().await.unwrap();
    assert_eq!(
        (stats.pending, stats.published, stats.parked),
        (3, 0, 0),
        "unpublished rows are kept"
    );
    assert!(stats.oldest_pending_created_at.is_some());
}
on_both_backends!(prune, prune_removes_old_published_rows_and_old_inbox_rows);
