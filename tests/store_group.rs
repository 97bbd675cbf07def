//! Group commit on a real database (PostgreSQL and SQLite): many units in one transaction keep the meaning each
//! has alone — in-order decisions per batch, duplicates as no-ops, a refused unit leaving no row — and a group that
//! cannot commit falls back to its units one by one without losing or doubling anything.

mod support;

use std::sync::Arc;

use bos::core::ids::EventId;
use bos::core::model::{BatchAggregate, BatchStatus};
use bos::core::ports::{Applied, BatchRepository, RepositoryError, UnitOfWork};
use bos::core::rejection::Rejection;
use bos::store::entities::event_outbox;
use bos::store::{FaultPlan, FaultPoint, GroupCommitConfig, GroupCommitter, Store};
use chrono::Utc;
use sea_orm::EntityTrait;
use support::fixtures::*;
use support::TestDb;
use uuid::Uuid;

async fn outbox_len(store: &Store) -> usize {
    event_outbox::Entity::find()
        .all(store.connection())
        .await
        .unwrap()
        .len()
}

fn changed(applied: &Result<Applied, RepositoryError>) -> &BatchAggregate {
    match applied {
        Ok(Applied::Changed { aggregate, .. }) => aggregate,
        other => panic!("expected a change, got {other:?}"),
    }
}

async fn registered(store: &Store, n: usize) -> Vec<BatchAggregate> {
    let units: Vec<UnitOfWork> = (0..n)
        .map(|i| register(&new_batch(&format!("teacher-{i}"), 3, true)))
        .collect();
    let results = store.apply_group(units, Utc::now()).await;
    results.iter().map(|r| changed(r).clone()).collect()
}

fn new_event() -> EventId {
    EventId::from_uuid(Uuid::now_v7())
}

async fn one_group_keeps_every_units_meaning(db: &TestDb) {
    let store = db.store().await;
    let batches = registered(&store, 4).await;
    for b in &batches {
        assert_eq!(b.batch.version, 0, "registered in one group");
    }
    let (a, b, c, d) = (&batches[0], &batches[1], &batches[2], &batches[3]);
    let done_before = new_event();
    store
        .apply(
            event_unit(d.batch.id, provisioned(d), done_before, "provisioning"),
            Utc::now(),
        )
        .await
        .unwrap();
    let outbox_before = outbox_len(&store).await;

    let twice = new_event();
    let refused = new_event();
    let units = vec![
        // Two units of one batch, decided in order: provisioned, then the associations it now waits for.
        event_unit(a.batch.id, provisioned(a), new_event(), "provisioning"),
        event_unit(a.batch.id, associations(a), new_event(), "matching"),
        // One event id twice: the second is the duplicate.
        event_unit(b.batch.id, provisioned(b), twice, "provisioning"),
        event_unit(b.batch.id, provisioned(b), twice, "provisioning"),
        // Associations before provisioning: refused, and it leaves no inbox row behind.
        event_unit(c.batch.id, associations(c), refused, "matching"),
        // Processed before this group.
        event_unit(d.batch.id, provisioned(d), done_before, "provisioning"),
    ];
    let results = store.apply_group(units, Utc::now()).await;
    assert_eq!(results.len(), 6);

    let a1 = changed(&results[0]);
    assert_eq!(a1.batch.status, BatchStatus::AwaitingStudentValidation);
    assert_eq!(a1.batch.version, 1);
    let a2 = changed(&results[1]);
    assert_eq!(a2.batch.status, BatchStatus::StudentValidationCompleted);
    assert_eq!(
        a2.batch.version, 2,
        "the second unit started from the first"
    );
    assert_eq!(
        changed(&results[2]).batch.status,
        BatchStatus::AwaitingStudentValidation
    );
    assert!(matches!(results[3], Ok(Applied::Duplicate)));
    assert!(
        matches!(
            results[4],
            Err(RepositoryError::Rejected(
                Rejection::IllegalTransition { .. }
            ))
        ),
        "{:?}",
        results[4]
    );
    assert!(matches!(results[5], Ok(Applied::Duplicate)));

    assert_eq!(store.load(a.batch.id).await.unwrap().unwrap(), *a2);
    let stored_b = store.load(b.batch.id).await.unwrap().unwrap();
    assert_eq!(stored_b.batch.version, 1, "the duplicate changed nothing");
    let stored_c = store.load(c.batch.id).await.unwrap().unwrap();
    assert_eq!(stored_c, *c, "the refused unit wrote nothing");
    assert!(!store.is_processed(refused).await.unwrap());
    assert!(store.is_processed(twice).await.unwrap());
    // Every publish effect of the committed units is in the outbox, and nothing else.
    let published: usize = results
        .iter()
        .filter_map(|r| match r {
            Ok(Applied::Changed { effects, .. }) => Some(
                effects
                    .iter()
                    .filter(|e| matches!(e, bos::core::effect::Effect::Publish(_)))
                    .count(),
            ),
            _ => None,
        })
        .sum();
    assert!(published >= 2, "both provisioned units publish");
    assert_eq!(outbox_len(&store).await, outbox_before + published);
}
on_both_backends!(one_group, one_group_keeps_every_units_meaning);

async fn a_group_that_cannot_commit_runs_its_units_alone(db: &TestDb) {
    let faults = Arc::new(FaultPlan::new());
    let store = db.store().await.with_faults(faults.clone());
    let batches = registered(&store, 3).await;
    let outbox_before = outbox_len(&store).await;
    let events: Vec<EventId> = (0..3).map(|_| new_event()).collect();
    let units: Vec<UnitOfWork> = batches
        .iter()
        .zip(&events)
        .map(|(b, e)| event_unit(b.batch.id, provisioned(b), *e, "provisioning"))
        .collect();

    // The group fails once before its commit; each unit then commits on its own.
    let commits_before = faults.hits(FaultPoint::BeforeCommit);
    faults.fail_times(FaultPoint::BeforeCommit, 1);
    let results = store.apply_group(units, Utc::now()).await;
    assert_eq!(
        faults.hits(FaultPoint::BeforeCommit),
        commits_before + 4,
        "one group attempt, then three units alone"
    );
    for (result, b) in results.iter().zip(&batches) {
        let after = changed(result);
        assert_eq!(after.batch.version, 1);
        assert_eq!(
            store.load(b.batch.id).await.unwrap().unwrap().batch.status,
            BatchStatus::AwaitingStudentValidation
        );
    }
    for e in &events {
        assert!(store.is_processed(*e).await.unwrap());
    }
    assert_eq!(
        outbox_len(&store).await,
        outbox_before + 3,
        "one command per unit: the rolled-back group left nothing"
    );
}
on_both_backends!(fallback, a_group_that_cannot_commit_runs_its_units_alone);

/// A group decides from this process's newest cached aggregates; another replica (a second store) moved two of the
/// batches on. The refusal decided on a stale aggregate is checked and decided again inside the group; the change
/// decided on a stale aggregate loses its batch row's compare-and-set at the flush, and the group runs its units
/// alone, where it is decided again on the stored state. Nothing is written over the other replica's change.
async fn stale_guesses_in_a_group_are_decided_again(db: &TestDb) {
    let store = db.store().await;
    let other = db.store().await;
    let batches = registered(&store, 3).await;
    let (a, b, c) = (&batches[0], &batches[1], &batches[2]);
    let moved_a = changed(
        &other
            .apply(unit(a.batch.id, provisioned(a)), Utc::now())
            .await,
    )
    .clone();
    let moved_b = changed(
        &other
            .apply(unit(b.batch.id, provisioned(b)), Utc::now())
            .await,
    )
    .clone();
    let units = vec![
        // At version 0 associations are refused (not provisioned yet); at `other`'s version they are taken.
        event_unit(a.batch.id, associations(a), new_event(), "matching"),
        // At version 0 this provisions the batch; `other` did that already.
        event_unit(b.batch.id, provisioned(b), new_event(), "provisioning"),
        event_unit(c.batch.id, provisioned(c), new_event(), "provisioning"),
    ];
    let results = store.apply_group(units, Utc::now()).await;
    let after_a = changed(&results[0]);
    assert_eq!(after_a.batch.version, moved_a.batch.version + 1);
    assert_ne!(
        after_a.batch.status, moved_a.batch.status,
        "associations taken"
    );
    assert!(
        !matches!(&results[1], Ok(Applied::Changed { effects, .. }) if !effects.is_empty()),
        "provisioning twice published again: {:?}",
        results[1]
    );
    assert_eq!(other.load(b.batch.id).await.unwrap().unwrap(), moved_b);
    assert_eq!(changed(&results[2]).batch.version, 1);
    assert_eq!(store.load(a.batch.id).await.unwrap().unwrap(), *after_a);
}
on_both_backends!(stale_guesses, stale_guesses_in_a_group_are_decided_again);

async fn concurrent_callers_share_commits(db: &TestDb) {
    let store = db.store().await;
    let batches = registered(&store, 64).await;
    let committer = Arc::new(GroupCommitter::start(
        store.clone(),
        GroupCommitConfig {
            lanes: 1,
            max_units: 64,
        },
        Vec::new(),
    ));
    let tasks: Vec<_> = batches
        .iter()
        .map(|b| {
            let (committer, unit) = (
                committer.clone(),
                event_unit(b.batch.id, provisioned(b), new_event(), "provisioning"),
            );
            tokio::spawn(async move { committer.apply(unit, Utc::now()).await })
        })
        .collect();
    for task in tasks {
        let result = task.await.unwrap();
        assert_eq!(
            changed(&result).batch.status,
            BatchStatus::AwaitingStudentValidation
        );
    }
    let stats = committer.stats();
    assert_eq!(stats.units, 64);
    assert!(
        stats.groups < 32,
        "64 concurrent units went through {} transactions",
        stats.groups
    );
    // A request that reads through the committer sees the committed state.
    let first = committer.load(batches[0].batch.id).await.unwrap().unwrap();
    assert_eq!(first.batch.version, 1);
}
on_both_backends!(shared_commits, concurrent_callers_share_commits);

/// Records the batch versions it is told about, in the order it is told.
#[derive(Default)]
struct VersionLog(std::sync::Mutex<Vec<(bos::core::ids::BatchId, i64)>>);

impl bos::core::ports::CommitObserver for VersionLog {
    fn committed(&self, batch_id: bos::core::ids::BatchId, applied: &Applied) {
        if let Applied::Changed { aggregate, .. } = applied {
            self.0
                .lock()
                .unwrap()
                .push((batch_id, aggregate.batch.version));
        }
    }
}

async fn observers_hear_each_batch_in_commit_order(db: &TestDb) {
    let store = db.store().await;
    let batches = registered(&store, 16).await;
    let log = Arc::new(VersionLog::default());
    let committer = Arc::new(GroupCommitter::start(
        store.clone(),
        GroupCommitConfig {
            lanes: 2,
            max_units: 64,
        },
        vec![log.clone()],
    ));
    // Two callers per batch at once (provisioning, then the associations it waits for); whichever order the lane
    // commits them in, the observer must hear the versions of each batch rising.
    let tasks: Vec<_> = batches
        .iter()
        .flat_map(|b| {
            [
                event_unit(b.batch.id, provisioned(b), new_event(), "provisioning"),
                event_unit(b.batch.id, associations(b), new_event(), "matching"),
            ]
        })
        .map(|unit| {
            let committer = committer.clone();
            tokio::spawn(async move { committer.apply(unit, Utc::now()).await })
        })
        .collect();
    let mut changes = 0;
    for task in tasks {
        if let Ok(Applied::Changed { .. }) = task.await.unwrap() {
            changes += 1;
        }
    }
    let log = log.0.lock().unwrap().clone();
    assert_eq!(log.len(), changes, "every committed change heard once");
    for b in &batches {
        let versions: Vec<i64> = log
            .iter()
            .filter(|(id, _)| *id == b.batch.id)
            .map(|(_, v)| *v)
            .collect();
        assert!(
            versions.windows(2).all(|w| w[0] < w[1]),
            "batch {} heard out of order: {versions:?}",
            b.batch.id
        );
    }
}
on_both_backends!(observed_in_order, observers_hear_each_batch_in_commit_order);

async fn a_failure_after_the_commit_never_runs_the_units_again(db: &TestDb) {
    let faults = Arc::new(FaultPlan::new());
    let store = db.store().await.with_faults(faults.clone());
    let batches = registered(&store, 3).await;
    let outbox_before = outbox_len(&store).await;
    // No inbox ids: only the group itself can keep these units from being applied twice.
    let units: Vec<UnitOfWork> = batches
        .iter()
        .map(|b| unit(b.batch.id, provisioned(b)))
        .collect();

    faults.fail_times(FaultPoint::AfterCommit, 1);
    let results = store.apply_group(units, Utc::now()).await;
    for result in &results {
        assert!(
            matches!(result, Err(RepositoryError::Unavailable(_))),
            "{result:?}"
        );
    }
    for b in &batches {
        let stored = store.load(b.batch.id).await.unwrap().unwrap();
        assert_eq!(stored.batch.version, 1, "committed once");
        assert_eq!(stored.batch.status, BatchStatus::AwaitingStudentValidation);
    }
    assert_eq!(
        outbox_len(&store).await,
        outbox_before + 3,
        "one command each"
    );
}
on_both_backends!(
    after_commit,
    a_failure_after_the_commit_never_runs_the_units_again
);
