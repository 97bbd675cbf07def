//! The outbox relay is woken by commits that wrote outbox rows, and only by those: a change with nothing to publish
//! leaves it asleep. Real PostgreSQL, the mock cluster.

mod support;

use std::time::{Duration, Instant};

use bos::core::effect::Effect;
use bos::core::ids::{Attempt, PhaseName};
use bos::core::input::{Actor, Input};
use bos::core::ports::{Applied, BatchRepository};
use support::fixtures;
use support::kafka::PARTITIONS;
use support::relay::*;
use uuid::Uuid;

async fn unpublished(env: &Env) -> usize {
    outbox_rows(&env.store)
        .await
        .iter()
        .filter(|r| r.published_at.is_none())
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_changes_that_wrote_outbox_rows_wake_the_relay() {
    let env = env().await;
    let relay = WokenRelay::start(&env).await;
    let orchestrator = &relay.orchestrator;

    // A GUEST batch up to a dispatched spellcheck: every step writes rows, and each wakes the relay.
    let batch_id = register(orchestrator, "alice").await;
    let agg = env.store.load(batch_id).await.unwrap().unwrap();
    orchestrator
        .handle(batch_id, fixtures::provisioned(&agg), None)
        .await
        .unwrap();
    orchestrator
        .request_pipeline(
            Actor::User(agg.batch.owner.clone()),
            batch_id,
            PhaseName::Spellcheck,
            Default::default(),
        )
        .await
        .unwrap();
    wait_drained(&env.store, Duration::from_secs(5)).await;

    // A row written behind the feed's back, then a committed change that publishes nothing.
    let topic = format!("bos.test.wake.{}", Uuid::new_v4().simple());
    env.broker.create_topic(&topic, PARTITIONS).unwrap();
    insert_raw_rows(&env.store, &topic, &["quiet".to_owned()], 1).await;
    let delivered = Input::PhaseCommandDelivered {
        phase: PhaseName::Spellcheck,
        attempt: Attempt::FIRST,
    };
    let applied = orchestrator
        .handle(batch_id, delivered, None)
        .await
        .unwrap();
    let Applied::Changed { effects, .. } = applied else {
        panic!("the delivery report was not applied")
    };
    assert!(
        !effects.iter().any(|e| matches!(e, Effect::Publish(_))),
        "{effects:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(unpublished(&env).await, 1, "the relay stayed asleep");

    // The next change that writes rows wakes it; the waiting row goes out with them.
    let started = Instant::now();
    register(orchestrator, "bob").await;
    wait_drained(&env.store, Duration::from_secs(5)).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "published {:?} after the commit",
        started.elapsed()
    );
    assert_eq!(unpublished(&env).await, 0);

    relay.stop().await;
}
