//! The unit of work on a real database (PostgreSQL and SQLite, a fresh database per test): compare-and-set under
//! concurrency, inbox dedupe, atomicity of state + outbox, bulk registration, and the aggregate round trip.

mod support;

use std::sync::Arc;
use std::time::Instant;

use bos::core::ids::{EventId, PhaseName};
use bos::core::model::{BatchStatus, PhaseStatus};
use bos::core::ports::{Applied, BatchRepository, RepositoryError};
use bos::core::rejection::Rejection;
use bos::store::entities::event_outbox;
use bos::store::{FaultPlan, FaultPoint, Store};
use chrono::{Duration, Utc};
use sea_orm::EntityTrait;
use support::fixtures::*;
use support::TestDb;
use uuid::Uuid;

async fn outbox_rows(store: &Store) -> Vec<event_outbox::Model> {
    event_outbox::Entity::find()
        .all(store.connection())
        .await
        .unwrap()
}

fn changed(applied: Applied) -> bos::core::model::BatchAggregate {
    match applied {
        Applied::Changed { aggregate, .. } => *aggregate,
        Applied::Duplicate => panic!("expected a change, got a duplicate"),
    }
}

async fn registered(
    store: &Store,
    essays: usize,
    regular: bool,
) -> bos::core::model::BatchAggregate {
    let new = new_batch("teacher-1", essays, regular);
    changed(store.apply(register(&new), Utc::now()).await.unwrap())
}

async fn same_transition_from_32_tasks_one_wins(db: &TestDb) {
    let store = db.store().await;
    let agg = registered(&store, 3, false).await;
    assert_eq!(agg.batch.version, 0);
    let input = provisioned(&agg);
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (store, unit) = (store.clone(), unit(agg.batch.id, input.clone()));
            tokio::spawn(async move { store.apply(unit, Utc::now()).await })
        })
        .collect();
    let mut wins = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(Applied::Changed { aggregate, .. }) => {
                wins += 1;
                assert_eq!(aggregate.batch.version, 1);
            }
            Err(RepositoryError::Rejected(Rejection::IllegalTransition { from, .. })) => {
                assert_eq!(from, BatchStatus::ReadyForPipelineExecution)
            }
            other => panic!("unexpected result {other:?}"),
        }
    }
    assert_eq!(wins, 1);
    let stored = store.load(agg.batch.id).await.unwrap().unwrap();
    assert_eq!(stored.batch.version, 1, "the version rose by exactly one");
    assert_eq!(stored.batch.status, BatchStatus::ReadyForPipelineExecution);
}
on_both_backends!(
    same_transition_from_32_tasks,
    same_transition_from_32_tasks_one_wins
);

async fn same_event_delivered_32_times_changes_once(db: &TestDb) {
    let store = db.store().await;
    let agg = registered(&store, 3, true).await;
    let event_id = EventId::from_uuid(Uuid::now_v7());
    let input = provisioned(&agg);
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let store = store.clone();
            let unit = event_unit(agg.batch.id, input.clone(), event_id, "provisioning");
            tokio::spawn(async move { store.apply(unit, Utc::now()).await })
        })
        .collect();
    let (mut changes, mut duplicates) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Ok(Applied::Changed { .. }) => changes += 1,
            Ok(Applied::Duplicate) => duplicates += 1,
            Err(e) => panic!("unexpected error {e:?}"),
        }
    }
    assert_eq!((changes, duplicates), (1, 31));
    let stored = store.load(agg.batch.id).await.unwrap().unwrap();
    assert_eq!(stored.batch.version, 1);
    assert_eq!(stored.batch.status, BatchStatus::AwaitingStudentValidation);
    let matching: Vec<_> = outbox_rows(&store)
        .await
        .into_iter()
        .filter(|r| r.topic == "test.student_matching.initiate")
        .collect();
    assert_eq!(
        matching.len(),
        1,
        "exactly one student-matching command in the outbox"
    );
    assert!(store.is_processed(event_id).await.unwrap());
}
on_both_backends!(
    same_event_32_times,
    same_event_delivered_32_times_changes_once
);

async fn failure_after_cas_rolls_back_state_inbox_and_outbox(db: &TestDb) {
    for point in [
        FaultPoint::AfterInbox,
        FaultPoint::AfterCas,
        FaultPoint::BeforeCommit,
    ] {
        let faults = Arc::new(FaultPlan::new());
        let store = db.store().await.with_faults(faults.clone());
        let agg = registered(&store, 3, true).await;
        let outbox_before = outbox_rows(&store).await.len();
        let event_id = EventId::from_uuid(Uuid::now_v7());
        let unit = event_unit(agg.batch.id, provisioned(&agg), event_id, "provisioning");

        let hits_before = faults.hits(point);
        faults.fail_times(point, 1);
        let err = store.apply(unit.clone(), Utc::now()).await.unwrap_err();
        assert!(
            matches!(err, RepositoryError::Unavailable(_)),
            "{point:?}: {err:?}"
        );
        assert_eq!(faults.hits(point), hits_before + 1, "{point:?} was reached");

        let stored = store.load(agg.batch.id).await.unwrap().unwrap();
        assert_eq!(stored, agg, "{point:?}: no row of the batch changed");
        assert_eq!(
            outbox_rows(&store).await.len(),
            outbox_before,
            "{point:?}: no outbox row"
        );
        assert!(
            !store.is_processed(event_id).await.unwrap(),
            "{point:?}: no inbox row"
        );

        // The redelivery after the failure goes through.
        let after = changed(store.apply(unit, Utc::now()).await.unwrap());
        assert_eq!(after.batch.status, BatchStatus::AwaitingStudentValidation);
        assert_eq!(outbox_rows(&store).await.len(), outbox_before + 1);
    }
}
on_both_backends!(
    injected_failure_rolls_back,
    failure_after_cas_rolls_back_state_inbox_and_outbox
);

async fn a_thousand_essays_register_in_one_transaction(db: &TestDb) {
    let faults = Arc::new(FaultPlan::new());
    let store = db.store().await.with_faults(faults.clone());
    let new = new_batch("teacher-1", 1000, false);

    faults.fail_times(FaultPoint::BeforeCommit, 1);
    assert!(store.apply(register(&new), Utc::now()).await.is_err());
    assert_eq!(
        store.load(new.batch_id).await.unwrap(),
        None,
        "all or nothing"
    );

    let started = Instant::now();
    let agg = changed(store.apply(register(&new), Utc::now()).await.unwrap());
    eprintln!(
        "{:?}: registered 1,000 essays in {:?}",
        db.backend,
        started.elapsed()
    );
    let stored = store.load(new.batch_id).await.unwrap().unwrap();
    assert_eq!(stored.essays.len(), 1000);
    let ids: Vec<_> = stored.essays.iter().map(|e| e.id).collect();
    assert_eq!(ids, new.essay_ids, "essays keep their order");
    assert_eq!(stored, agg);
    assert_eq!(outbox_rows(&store).await.len(), 1);
}
on_both_backends!(
    register_1000_essays,
    a_thousand_essays_register_in_one_transaction
);

async fn registering_an_existing_id_is_rejected(db: &TestDb) {
    let store = db.store().await;
    let new = new_batch("teacher-1", 2, false);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (store, unit) = (store.clone(), register(&new));
            tokio::spawn(async move { store.apply(unit, Utc::now()).await })
        })
        .collect();
    let mut wins = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(Applied::Changed { .. }) => wins += 1,
            Err(RepositoryError::Rejected(Rejection::AlreadyExists)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(wins, 1);
    assert_eq!(outbox_rows(&store).await.len(), 1);
}
on_both_backends!(register_existing_id, registering_an_existing_id_is_rejected);

async fn a_pipeline_round_trips_through_the_rows(db: &TestDb) {
    let store = db.store().await;
    let now = Utc::now();
    let agg = registered(&store, 4, false).await;
    let agg = changed(
        store
            .apply(unit(agg.batch.id, provisioned(&agg)), now)
            .await
            .unwrap(),
    );
    assert_eq!(store.load(agg.batch.id).await.unwrap().as_ref(), Some(&agg));

    let applied = store
        .apply(unit(agg.batch.id, request(&agg, PhaseName::Nlp)), now)
        .await
        .unwrap();
    let Applied::Changed { aggregate, effects } = applied else {
        panic!("duplicate")
    };
    assert_eq!(aggregate.batch.status, BatchStatus::ProcessingPipelines);
    assert_eq!(
        store.load(agg.batch.id).await.unwrap().as_ref(),
        Some(&*aggregate)
    );
    let run = aggregate.active_run().unwrap();
    let phases: Vec<_> = run
        .phases
        .iter()
        .map(|p| (p.phase, p.status, p.version))
        .collect();
    assert_eq!(
        phases,
        vec![
            (PhaseName::Spellcheck, PhaseStatus::DispatchInitiated, 0),
            (PhaseName::Nlp, PhaseStatus::PendingDependencies, 0),
        ]
    );

    // The timeout scanner sees the dispatched phase once its dispatch time has passed.
    let overdue = store
        .timed_out_phases(now + Duration::hours(1), 10)
        .await
        .unwrap();
    assert_eq!(overdue.len(), 1);
    assert_eq!(
        (overdue[0].batch_id, overdue[0].phase),
        (agg.batch.id, PhaseName::Spellcheck)
    );
    assert!(store
        .timed_out_phases(now - Duration::hours(1), 10)
        .await
        .unwrap()
        .is_empty());

    let spellcheck = commands(&effects)[0].clone();
    let applied = store
        .apply(unit(agg.batch.id, success_for(&spellcheck)), now)
        .await
        .unwrap();
    let Applied::Changed { aggregate, effects } = applied else {
        panic!("duplicate")
    };
    let stored = store.load(agg.batch.id).await.unwrap().unwrap();
    let run = stored.active_run().unwrap();
    assert_eq!(
        run.phase(PhaseName::Spellcheck).unwrap().status,
        PhaseStatus::CompletedSuccessfully
    );
    assert_eq!(
        run.phase(PhaseName::Spellcheck).unwrap().version,
        1,
        "the phase row was compare-and-set"
    );
    assert_eq!(
        run.phase(PhaseName::Nlp).unwrap().status,
        PhaseStatus::DispatchInitiated
    );
    // A completed phase no longer waits; the one dispatched after it does.
    let overdue = store
        .timed_out_phases(now + Duration::hours(1), 10)
        .await
        .unwrap();
    let waiting: Vec<_> = overdue.iter().map(|p| p.phase).collect();
    assert_eq!(waiting, vec![PhaseName::Nlp]);
    let spellchecked: Vec<_> = stored
        .results
        .iter()
        .filter(|r| r.phase == PhaseName::Spellcheck)
        .collect();
    assert_eq!(spellchecked.len(), 4, "one stored output per essay");
    assert!(spellchecked
        .iter()
        .all(|r| r.succeeded && r.output_ref.is_some()));
    let mut expected = *aggregate;
    expected.results.sort_by_key(|r| (r.essay_id, r.phase));
    let mut actual = stored.clone();
    actual.results.sort_by_key(|r| (r.essay_id, r.phase));
    assert_eq!(actual, expected);

    // nlp starts from spellcheck's output (defect 8), read back from the rows.
    let nlp = commands(&effects)[0];
    assert_eq!(nlp.phase, PhaseName::Nlp);
    assert!(nlp
        .essays
        .iter()
        .all(|e| e.text_ref.as_str().starts_with("spellcheck-")));
    assert_eq!(stored.batch.version, 3);
}
on_both_backends!(pipeline_round_trip, a_pipeline_round_trips_through_the_rows);

async fn batches_page_newest_first(db: &TestDb) {
    let store = db.store().await;
    let start = Utc::now();
    let mut mine = Vec::new();
    for i in 0..5 {
        let new = new_batch("owner-a", 1, false);
        store
            .apply(register(&new), start + Duration::seconds(i))
            .await
            .unwrap();
        mine.push(new.batch_id);
    }
    let other = new_batch("owner-b", 1, false);
    store.apply(register(&other), start).await.unwrap();
    mine.reverse();

    let owner = user("owner-a");
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = store
            .list_batches(&owner, 2, token.as_deref())
            .await
            .unwrap();
        assert!(page.batches.len() <= 2);
        seen.extend(page.batches.iter().map(|b| b.batch_id));
        match page.next_page_token {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    assert_eq!(seen, mine);
    let err = store
        .list_batches(&owner, 2, Some("garbage"))
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        RepositoryError::Rejected(Rejection::Invalid(_))
    ));
}
on_both_backends!(list_batches_pages, batches_page_newest_first);

async fn unknown_batch_is_not_found(db: &TestDb) {
    let store = db.store().await;
    let new = new_batch("teacher-1", 1, false);
    let agg = registered(&store, 1, false).await;
    let err = store
        .apply(unit(new.batch_id, provisioned(&agg)), Utc::now())
        .await
        .unwrap_err();
    assert_eq!(err, RepositoryError::Rejected(Rejection::NotFound));
    assert_eq!(store.load(new.batch_id).await.unwrap(), None);
}
on_both_backends!(unknown_batch, unknown_batch_is_not_found);
