//! The settings each PostgreSQL pool's sessions run with: write transactions plan by key without a statement of
//! their own to say so, and only the relay's commits skip waiting for their WAL flush.

mod support;

use bos::store::Pool;
use support::TestDb;

/// (pool, setting, value its sessions must show).
const EXPECTED: &[(Pool, &str, &str)] = &[
    // Reads plan as PostgreSQL would.
    (Pool::Reads, "enable_seqscan", "on"),
    (Pool::Reads, "plan_cache_mode", "auto"),
    (Pool::Reads, "synchronous_commit", "on"),
    // Writes find every row by key, with generic plans, and their commits are durable before they return.
    (Pool::Writes, "enable_seqscan", "off"),
    (Pool::Writes, "enable_hashjoin", "off"),
    (Pool::Writes, "enable_mergejoin", "off"),
    (Pool::Writes, "plan_cache_mode", "force_generic_plan"),
    (Pool::Writes, "synchronous_commit", "on"),
    // The relay plans like the writes and commits without waiting for the flush.
    (Pool::Relay, "enable_seqscan", "off"),
    (Pool::Relay, "synchronous_commit", "off"),
];

#[tokio::test]
async fn each_pool_runs_with_its_own_session_settings() {
    let db = TestDb::postgres().await;
    let store = db.store().await;
    for &(pool, name, expected) in EXPECTED {
        let value = store
            .session_setting(pool, name)
            .await
            .unwrap_or_else(|e| panic!("read {name} on {pool:?}: {e}"));
        assert_eq!(value, expected, "{name} on {pool:?}");
    }
    store.close().await.expect("close");
}
