//! The aggregate cache against the database (PostgreSQL and SQLite): what a store serves from its cache equals
//! what a store with an empty cache reads from the rows, after every step of a pipeline; another process's commit
//! (a second store on the same database) is seen at once; a version bump behind the store's back is read afresh.

mod support;

use bos::core::ids::PhaseName;
use bos::core::input::Input;
use bos::core::model::{BatchAggregate, BatchStatus, PhaseStatus};
use bos::core::ports::{Applied, BatchRepository};
use bos::store::{Store, StoreConfig};
use chrono::Utc;
use sea_orm::{ConnectionTrait, Statement, Value};
use support::fixtures::*;
use support::TestDb;

fn changed(applied: Applied) -> (BatchAggregate, Vec<bos::core::effect::Effect>) {
    match applied {
        Applied::Changed { aggregate, effects } => (*aggregate, effects),
        Applied::Duplicate => panic!("expected a change, got a duplicate"),
    }
}

/// A store whose cache is off: every load reads the rows.
async fn uncached(db: &TestDb) -> Store {
    db.store_with(StoreConfig {
        aggregate_cache_rows: 0,
        ..StoreConfig::default()
    })
    .await
}

async fn assert_same(cached: &Store, fresh: &Store, aggregate: &BatchAggregate) {
    let id = aggregate.batch.id;
    let from_cache = cached.load(id).await.unwrap().expect("cached load");
    let from_rows = fresh.load(id).await.unwrap().expect("row load");
    assert_eq!(from_cache, from_rows, "cache and rows disagree");
    assert_eq!(from_cache.batch.version, aggregate.batch.version);
}

async fn cached_equals_rows_through_a_pipeline(db: &TestDb) {
    let store = db.store().await;
    let fresh = uncached(db).await;
    let new = new_batch("teacher-1", 5, false);
    let (agg, _) = changed(store.apply(register(&new), Utc::now()).await.unwrap());
    assert_same(&store, &fresh, &agg).await;
    let (agg, _) = changed(
        store
            .apply(unit(agg.batch.id, provisioned(&agg)), Utc::now())
            .await
            .unwrap(),
    );
    assert_same(&store, &fresh, &agg).await;
    let (mut agg, mut effects) = changed(
        store
            .apply(
                unit(agg.batch.id, request(&agg, PhaseName::AiFeedback)),
                Utc::now(),
            )
            .await
            .unwrap(),
    );
    assert_same(&store, &fresh, &agg).await;
    // spellcheck → nlp → ai_feedback, each outcome applied by the caching store.
    while let Some(cmd) = commands(&effects).first().map(|c| (*c).clone()) {
        (agg, effects) = changed(
            store
                .apply(unit(agg.batch.id, success_for(&cmd)), Utc::now())
                .await
                .unwrap(),
        );
        assert_same(&store, &fresh, &agg).await;
    }
    assert_eq!(agg.batch.status, BatchStatus::ReadyForPipelineExecution);
    assert_eq!(agg.results.len(), 15, "five essays × three phases");
}
on_both_backends!(cache_round_trip, cached_equals_rows_through_a_pipeline);

async fn other_writers_are_seen(db: &TestDb) {
    let a = db.store().await;
    let b = db.store().await;
    let new = new_batch("teacher-1", 3, false);
    let (agg, _) = changed(a.apply(register(&new), Utc::now()).await.unwrap());
    // `a` caches version 0; `b` (another replica) moves the batch on.
    assert_eq!(a.load(agg.batch.id).await.unwrap().unwrap(), agg);
    let (moved, _) = changed(
        b.apply(unit(agg.batch.id, provisioned(&agg)), Utc::now())
            .await
            .unwrap(),
    );
    assert_eq!(a.load(agg.batch.id).await.unwrap().unwrap(), moved);
    // `a` decides on the state `b` wrote, not on its cached one.
    let (next, _) = changed(
        a.apply(
            unit(agg.batch.id, request(&moved, PhaseName::Spellcheck)),
            Utc::now(),
        )
        .await
        .unwrap(),
    );
    assert_eq!(next.batch.version, moved.batch.version + 1);
    assert_eq!(next.batch.status, BatchStatus::ProcessingPipelines);

    // A version bump behind every store's back (an operator's UPDATE) is read afresh too.
    bump_version(&a, next.batch.id).await;
    let reread = a.load(next.batch.id).await.unwrap().unwrap();
    assert_eq!(reread.batch.version, next.batch.version + 1);
}
on_both_backends!(cache_other_writers, other_writers_are_seen);

/// A unit decides from the newest cached aggregate without reading the batch row first; when another replica has
/// moved the batch on, the guess is refuted (by the batch row's compare-and-set, or by the check a rejection gets)
/// and the unit is decided again on what the database holds.
async fn stale_guesses_are_decided_again(db: &TestDb) {
    let a = db.store().await;
    let b = db.store().await;
    let fresh = uncached(db).await;
    let new = new_batch("teacher-1", 3, false);
    let (registered, _) = changed(a.apply(register(&new), Utc::now()).await.unwrap());
    let id = registered.batch.id;

    // `a` still holds version 0, where a pipeline request is refused (content not provisioned): the refusal is
    // checked against the stored row, and the request decided again on `b`'s state.
    let (ready, _) = changed(
        b.apply(unit(id, provisioned(&registered)), Utc::now())
            .await
            .unwrap(),
    );
    let (running, effects) = changed(
        a.apply(unit(id, request(&ready, PhaseName::Spellcheck)), Utc::now())
            .await
            .unwrap(),
    );
    assert_eq!(running.batch.version, ready.batch.version + 1);
    assert_eq!(running.batch.status, BatchStatus::ProcessingPipelines);
    let spellcheck = commands(&effects)
        .first()
        .map(|c| (*c).clone())
        .expect("a spellcheck command");

    // `b` applies the outcome; `a`, still at the dispatching version, gets the same outcome again: its guess
    // would complete spellcheck a second time, the batch row's compare-and-set refuses it, and deciding again on
    // `b`'s state must not write anything over it.
    let (completed, _) = changed(
        b.apply(unit(id, success_for(&spellcheck)), Utc::now())
            .await
            .unwrap(),
    );
    let again = a
        .apply(unit(id, success_for(&spellcheck)), Utc::now())
        .await;
    if let Ok(Applied::Changed { effects, .. }) = &again {
        assert!(
            effects.is_empty(),
            "a repeated outcome published {effects:?}"
        );
    }
    let stored = fresh.load(id).await.unwrap().expect("stored batch");
    assert_eq!(
        stored, completed,
        "the stale guess wrote over another replica's change"
    );
    assert_eq!(a.load(id).await.unwrap().expect("a's view"), completed);
}
on_both_backends!(cache_stale_guesses, stale_guesses_are_decided_again);

/// A delivery report whose attempt has moved on (its outcome came first) can change nothing in any later state,
/// so it is answered from the cached aggregate without reading the batch row: an out-of-band version bump is not
/// seen, and nothing is written. An unsettled report is still decided on the stored state.
async fn settled_deliveries_are_answered_from_the_cache(db: &TestDb) {
    let store = db.store().await;
    let fresh = uncached(db).await;
    let new = new_batch("teacher-1", 2, false);
    let (registered, _) = changed(store.apply(register(&new), Utc::now()).await.unwrap());
    let id = registered.batch.id;
    let (ready, _) = changed(
        store
            .apply(unit(id, provisioned(&registered)), Utc::now())
            .await
            .unwrap(),
    );
    let (running, effects) = changed(
        store
            .apply(unit(id, request(&ready, PhaseName::Nlp)), Utc::now())
            .await
            .unwrap(),
    );
    let spellcheck = commands(&effects).first().map(|c| (*c).clone()).unwrap();
    let (completed, effects) = changed(
        store
            .apply(unit(id, success_for(&spellcheck)), Utc::now())
            .await
            .unwrap(),
    );
    let nlp = commands(&effects).first().map(|c| (*c).clone()).unwrap();
    assert!(completed.batch.version > running.batch.version);
    bump_version(&store, id).await;

    let late = Input::PhaseCommandDelivered {
        phase: spellcheck.phase,
        attempt: spellcheck.attempt,
    };
    let (answer, effects) = changed(store.apply(unit(id, late), Utc::now()).await.unwrap());
    assert!(effects.is_empty());
    assert_eq!(
        answer.batch.version, completed.batch.version,
        "a settled report is answered from the cache, without reading the bumped row"
    );
    assert_eq!(answer.runs, completed.runs);
    let stored = fresh.load(id).await.unwrap().expect("stored batch");
    assert_eq!(
        stored.batch.version,
        completed.batch.version + 1,
        "nothing written"
    );

    // nlp's report is not settled: it is decided on the stored state (past the bump) and lands.
    let due = Input::PhaseCommandDelivered {
        phase: nlp.phase,
        attempt: nlp.attempt,
    };
    let (landed, _) = changed(store.apply(unit(id, due), Utc::now()).await.unwrap());
    assert_eq!(landed.batch.version, completed.batch.version + 2);
    let phase = landed
        .active_run()
        .and_then(|r| r.phase(PhaseName::Nlp))
        .unwrap();
    assert_eq!(phase.status, PhaseStatus::InProgress);
}
on_both_backends!(
    cache_settled_deliveries,
    settled_deliveries_are_answered_from_the_cache
);

/// An UPDATE of the batch row's version behind every store's back (an operator's, or another replica's).
async fn bump_version(store: &Store, id: bos::core::ids::BatchId) {
    let conn = store.connection();
    let backend = conn.get_database_backend();
    let sql = match backend {
        sea_orm::DbBackend::Postgres => "UPDATE batches SET version = version + 1 WHERE id = $1",
        _ => "UPDATE batches SET version = version + 1 WHERE id = ?",
    };
    let id = Value::from(id.as_uuid());
    conn.execute_raw(Statement::from_sql_and_values(backend, sql, [id]))
        .await
        .unwrap();
}
