//! The settings each PostgreSQL pool's sessions run with: write transactions plan by key without a statement of
//! their own to say so, and only the relay's commits skip waiting for their WAL flush.

mod support;

use bos::store::Pool;
use support::TestDb;

async fn setting(store: &bos::store::Store, pool: Pool, name: &str) -> String {
    store
        .session_setting(pool, name)
        .await
        .unwrap_or_else(|e| panic!("read {name} on {pool:?}: {e}"))
}

#[tokio::test]
async fn each_pool_runs_with_its_own_session_settings() {
    let db = TestDb::postgres().await;
    let store = db.store().await;

    // Reads plan as PostgreSQL would.
    assert_eq!(setting(&store, Pool::Reads, "enable_seqscan").await, "on");
    assert_eq!(
        setting(&store, Pool::Reads, "plan_cache_mode").await,
        "auto"
    );
    assert_eq!(
        setting(&store, Pool::Reads, "synchronous_commit").await,
        "on"
    );

    // Writes find every row by key, with generic plans, and their commits are durable before they return.
    for name in ["enable_seqscan", "enable_hashjoin", "enable_mergejoin"] {
        assert_eq!(setting(&store, Pool::Writes, name).await, "off", "{name}");
    }
    assert_eq!(
        setting(&store, Pool::Writes, "plan_cache_mode").await,
        "force_generic_plan"
    );
    assert_eq!(
        setting(&store, Pool::Writes, "synchronous_commit").await,
        "on"
    );

    // The relay plans like the writes and commits without waiting for the flush.
    assert_eq!(setting(&store, Pool::Relay, "enable_seqscan").await, "off");
    assert_eq!(
        setting(&store, Pool::Relay, "synchronous_commit").await,
        "off"
    );

    store.close().await.expect("close");
}
