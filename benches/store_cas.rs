//! `cargo bench --bench store_cas`: the cost of the persistence spine.
//!
//! 1. p50 (and p95) of registering a batch of 1,000 essays (one transaction: batch row, 1,000 essay rows in one
//!    INSERT, one outbox row).
//! 2. CAS throughput of `apply` (inbox-free unit: read the aggregate, decide, compare-and-set the batch row, upsert
//!    one essay row) next to a raw single-row `UPDATE batches SET version = version + 1 WHERE id = $1 AND
//!    version = $2` loop (read the version, then the CAS), at the same concurrency over the same batches.
//!
//! Database: `BOS_BENCH_DATABASE_URL` (postgres:// or sqlite://), else a fresh database on the local PostgreSQL
//! (see tests/support). Knobs: `BOS_BENCH_TASKS` (16), `BOS_BENCH_BATCHES` (64), `BOS_BENCH_APPLY_OPS` (100 per
//! task), `BOS_BENCH_RAW_OPS` (1,000 per task), `BOS_BENCH_REGISTERS` (30).
//!
//! Without the `--bench` argument (`cargo test --all-targets` runs this target too) it runs a smoke configuration
//! of a few operations, so CI exercises the code without paying for the measurement.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bos::core::ids::{BatchId, EssayId};
use bos::core::input::{FailedEssay, Input};
use bos::core::ports::{Applied, BatchRepository, RepositoryError};
use bos::store::{Store, StoreConfig};
use chrono::Utc;
use sea_orm::{ConnectionTrait, DbBackend, Statement, Value};
use support::fixtures::{new_batch, register, unit};
use support::{TestDb, TestEncoder};

/// `cargo bench` passes `--bench`; `cargo test` does not.
fn started_by_cargo_bench() -> bool {
    std::env::args().skip(1).any(|a| a == "--bench")
}

/// A knob's value: the environment, else `full` under `cargo bench`, else the smoke value.
fn knob(name: &str, full: usize, smoke: usize) -> usize {
    let default = if started_by_cargo_bench() {
        full
    } else {
        smoke
    };
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

async fn open() -> (Store, Option<TestDb>) {
    let config = StoreConfig {
        max_connections: 32,
        // The tasks write through `Store` itself, not through the lanes of `bos serve`.
        write_connections: 32,
        ..StoreConfig::default()
    };
    match std::env::var("BOS_BENCH_DATABASE_URL") {
        Ok(url) => {
            let store = Store::connect_with(&url, config)
                .await
                .expect("connect")
                .with_encoder(Arc::new(TestEncoder));
            store.migrate().await.expect("migrate");
            (store, None)
        }
        Err(_) => {
            let db = TestDb::postgres().await;
            let store = db.store_with(config).await;
            (store, Some(db))
        }
    }
}

async fn bench_register(store: &Store, rounds: usize, essays: usize) {
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let new = new_batch("bench-owner", essays, true);
        let started = Instant::now();
        store
            .apply(register(&new), Utc::now())
            .await
            .expect("register");
        times.push(started.elapsed());
    }
    times.sort();
    println!(
        "register {essays} essays: p50 {:.2} ms, p95 {:.2} ms, min {:.2} ms ({rounds} rounds)",
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.95).as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3,
    );
}

struct Target {
    batch_id: BatchId,
    essays: Vec<EssayId>,
}

#[derive(Default)]
struct Tally {
    ok: u64,
    conflicts: u64,
    rejected: u64,
}

/// 16 tasks × ops over `targets`; each op fails one essay with a new message, so every op really changes a row.
async fn bench_apply(
    store: &Store,
    targets: &Arc<Vec<Target>>,
    tasks: usize,
    ops: usize,
) -> (f64, Tally) {
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let (store, targets) = (store.clone(), targets.clone());
            tokio::spawn(async move {
                let mut tally = Tally::default();
                for k in 0..ops {
                    let target = &targets[(t * 7 + k) % targets.len()];
                    let essay = target.essays[(t + k) % target.essays.len()];
                    let input = Input::ValidationErrors {
                        failed: vec![FailedEssay {
                            essay_id: essay,
                            error: format!("bench {t}-{k}"),
                        }],
                        critical: false,
                    };
                    match store.apply(unit(target.batch_id, input), Utc::now()).await {
                        Ok(Applied::Changed { .. }) => tally.ok += 1,
                        Ok(Applied::Duplicate) => {}
                        Err(RepositoryError::Conflict { .. }) => tally.conflicts += 1,
                        Err(RepositoryError::Rejected(_)) => tally.rejected += 1,
                        Err(e) => panic!("apply failed: {e}"),
                    }
                }
                tally
            })
        })
        .collect();
    let mut total = Tally::default();
    for h in handles {
        let t = h.await.expect("task");
        total.ok += t.ok;
        total.conflicts += t.conflicts;
        total.rejected += t.rejected;
    }
    (total.ok as f64 / started.elapsed().as_secs_f64(), total)
}

/// The same concurrency and batches: read the version, `UPDATE … WHERE id = ? AND version = ?`, retry on 0 rows.
async fn bench_raw(
    store: &Store,
    targets: &Arc<Vec<Target>>,
    tasks: usize,
    ops: usize,
) -> (f64, u64) {
    let backend = store.backend();
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let (store, targets) = (store.clone(), targets.clone());
            tokio::spawn(async move {
                let conn = store.connection();
                let mut conflicts = 0u64;
                for k in 0..ops {
                    let id: Value = targets[(t * 7 + k) % targets.len()].batch_id.as_uuid().into();
                    loop {
                        let row = conn
                            .query_one_raw(Statement::from_sql_and_values(
                                backend,
                                "SELECT version FROM batches WHERE id = $1",
                                [id.clone()],
                            ))
                            .await
                            .expect("read")
                            .expect("row");
                        let version: i64 = row.try_get("", "version").expect("version");
                        let done = conn
                            .execute_raw(Statement::from_sql_and_values(
                                backend,
                                "UPDATE batches SET version = version + 1 WHERE id = $1 AND version = $2",
                                [id.clone(), version.into()],
                            ))
                            .await
                            .expect("update");
                        if done.rows_affected() == 1 {
                            break;
                        }
                        conflicts += 1;
                    }
                }
                conflicts
            })
        })
        .collect();
    let mut conflicts = 0;
    for h in handles {
        conflicts += h.await.expect("task");
    }
    (
        (tasks * ops) as f64 / started.elapsed().as_secs_f64(),
        conflicts,
    )
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let (store, _db) = open().await;
    let backend = match store.backend() {
        DbBackend::Postgres => "PostgreSQL",
        DbBackend::Sqlite => "SQLite",
        _ => "other",
    };
    let (tasks, batches) = (
        knob("BOS_BENCH_TASKS", 16, 2),
        knob("BOS_BENCH_BATCHES", 64, 2),
    );
    let (apply_ops, raw_ops) = (
        knob("BOS_BENCH_APPLY_OPS", 100, 3),
        knob("BOS_BENCH_RAW_OPS", 1000, 3),
    );
    let essays = knob("BOS_BENCH_ESSAYS", 1000, 10);
    let mode = if started_by_cargo_bench() {
        "full"
    } else {
        "smoke (not started by cargo bench)"
    };
    println!("store_cas on {backend}, {mode}: {tasks} tasks, {batches} batches");

    // Warm the pool and the caches.
    bench_register(&store, knob("BOS_BENCH_WARMUP", 3, 1), essays).await;
    bench_register(&store, knob("BOS_BENCH_REGISTERS", 30, 2), essays).await;

    let mut targets = Vec::with_capacity(batches);
    for _ in 0..batches {
        let new = new_batch("bench-owner", 16, false);
        store
            .apply(register(&new), Utc::now())
            .await
            .expect("register target");
        targets.push(Target {
            batch_id: new.batch_id,
            essays: new.essay_ids.clone(),
        });
    }
    let targets = Arc::new(targets);

    let (apply_rate, tally) = bench_apply(&store, &targets, tasks, apply_ops).await;
    println!(
        "apply (read aggregate + decide + batch CAS + essay upsert): {apply_rate:.0} commits/s \
         ({} ok, {} gave up on conflict, {} rejected)",
        tally.ok, tally.conflicts, tally.rejected
    );
    // Every op changes a live batch: a rejection or no commit at all is a bug, in smoke mode too.
    assert_eq!(tally.rejected, 0, "apply rejected a valid change");
    assert!(tally.ok > 0, "no unit of work committed");
    let (raw_rate, raw_conflicts) = bench_raw(&store, &targets, tasks, raw_ops).await;
    println!(
        "raw single-row CAS loop: {raw_rate:.0} commits/s ({raw_conflicts} lost races retried)"
    );
    println!(
        "ratio raw / apply: {:.2}x (apply reaches {:.0}% of the raw CAS rate)",
        raw_rate / apply_rate,
        100.0 * apply_rate / raw_rate
    );
}
