//! Transitions through the whole spine (Kafka in → unit of work → outbox → relay → Kafka out), at full speed
//! against a raw compare-and-set loop on the same PostgreSQL, and at a fixed offered load for latency.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement,
    TransactionTrait, Value,
};

use super::flow::{self, Plane};
use super::process;
use super::stack::{self, Stack};
use super::stats::{verdict, Ratio, Recorder, Summary};
use super::{BenchError, Common};

/// Batches of `bos bench transitions` unless told otherwise.
pub const DEFAULT_BATCHES: usize = 1500;

/// Flags of `bos bench transitions`.
#[derive(Debug, Clone, clap::Args)]
pub struct TransitionArgs {
    /// Batches driven through spellcheck → nlp → ai_feedback (three measured transitions each). 1,500 give a
    /// measured window of over a second; with 600 it was half a second, much of it ramp-up and ramp-down.
    #[arg(long, default_value_t = DEFAULT_BATCHES)]
    pub batches: usize,
    /// Essays per batch.
    #[arg(long, default_value_t = 4)]
    pub essays: i32,
    /// Seconds the raw compare-and-set reference runs.
    #[arg(long, default_value_t = 5)]
    pub raw_seconds: u64,
}

/// Flags of `bos bench latency`.
#[derive(Debug, Clone, clap::Args)]
pub struct LatencyArgs {
    /// Offered load: events sent per second (each one transition).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Seconds of offered load (batches prepared = rate × seconds / 3).
    #[arg(long, default_value_t = 6)]
    pub seconds: u64,
    /// Essays per batch.
    #[arg(long, default_value_t = 4)]
    pub essays: i32,
}

/// The running stack of one transition measure, with the generator's event plane.
struct Spine {
    stack: Stack,
    plane: Plane,
}

impl Spine {
    async fn start(common: &Common) -> Result<Spine, BenchError> {
        let stack = Stack::start(common).await?;
        let plane = match Plane::start(stack.broker.bootstrap(), common.partitions) {
            Ok(plane) => plane,
            Err(e) => {
                stack.stop().await;
                return Err(e);
            }
        };
        println!(
            "stack: bos serve (pid {}) on {}, PostgreSQL database {}, broker: {}, {} partitions per topic",
            stack.bos.pid(),
            stack.bos.addr,
            stack.db.url.rsplit('/').next().unwrap_or_default(),
            stack.broker.label(),
            common.partitions
        );
        Ok(Spine { stack, plane })
    }

    async fn prepare(
        &mut self,
        common: &Common,
        batches: usize,
        essays: i32,
    ) -> Result<flow::Held, BenchError> {
        let client = stack::client(&self.stack.bos.url(), "bench-user").await?;
        let started = Instant::now();
        let mut setup_errors = Recorder::new("setup");
        let held = flow::prepare(
            &mut self.plane,
            &client,
            batches,
            essays,
            16,
            common.deadline(),
            &mut setup_errors,
        )
        .await?;
        let errors = setup_errors.summary().errors;
        println!(
            "setup: {} batches registered, provisioned and at spellcheck in {:.1} s (errors: {errors:?})",
            held.len(),
            started.elapsed().as_secs_f64()
        );
        Ok(held)
    }

    async fn stop(self) {
        self.plane.stop().await;
        self.stack.stop().await;
    }
}

/// `bos bench transitions`: full-speed transitions, then the raw CAS loop at the same concurrency.
pub async fn transitions(
    common: &Common,
    args: &TransitionArgs,
) -> Result<Vec<String>, BenchError> {
    let mut spine = Spine::start(common).await?;
    let result = async {
        let held = spine.prepare(common, args.batches, args.essays).await?;
        let cpu = process::CpuMeter::start(spine.stack.bos.pid());
        let window = chrono::Utc::now();
        spine.stack.bos.profile(true);
        let drive = flow::drive(&mut spine.plane, held, None, common.deadline()).await?;
        spine.stack.bos.profile(false);
        if common.log_statements {
            println!("measured window (UTC): {window} .. {}", chrono::Utc::now());
        }
        let measured = drive.transitions.summary();
        println!("{measured}");
        println!("  {}", cpu.per_op(measured.ok, measured.elapsed));
        let concurrency = usize::try_from(common.partitions).unwrap_or(1).max(1);
        let seconds = Duration::from_secs(args.raw_seconds);
        let cpu = process::CpuMeter::start(spine.stack.bos.pid());
        let raw = sql_loop(&spine.stack.db.url, SqlLoop::RawCas, concurrency, seconds).await?;
        println!("{raw}");
        println!("  {}", cpu.per_op(raw.ok, raw.elapsed));
        let floor =
            sql_loop(&spine.stack.db.url, SqlLoop::MinimalUnit, concurrency, seconds).await?;
        println!("{floor}");
        let ratio = Ratio {
            label: format!(
                "transitions/s through the spine vs raw CAS UPDATE/s at concurrency {concurrency}"
            ),
            measured: measured.throughput,
            reference: raw.throughput,
            target: 0.7,
        };
        let context = format!(
            "CONTEXT minimal unit of work (BEGIN, inbox, CAS, outbox, COMMIT) vs raw CAS: {:.3}; spine vs minimal unit: {:.3}",
            floor.throughput / raw.throughput.max(1e-9),
            measured.throughput / floor.throughput.max(1e-9),
        );
        Ok::<_, BenchError>(vec![ratio.to_string(), context])
    }
    .await;
    spine.stop().await;
    result
}

/// `bos bench latency`: event in → next record out at a constant offered load.
pub async fn latency(common: &Common, args: &LatencyArgs) -> Result<Vec<String>, BenchError> {
    let mut spine = Spine::start(common).await?;
    let result = async {
        let batches = ((args.rate * args.seconds as f64) / 3.0).ceil().max(1.0) as usize;
        let held = spine.prepare(common, batches, args.essays).await?;
        let cpu = process::CpuMeter::start(spine.stack.bos.pid());
        let drive = flow::drive(&mut spine.plane, held, Some(args.rate), common.deadline()).await?;
        let s = drive.transitions.summary();
        println!("{s}");
        println!("  {}", cpu.per_op(s.ok, s.elapsed));
        println!(
            "offered {:.0} events/s, sent {:.1}/s, completed {} pipelines",
            args.rate, drive.sent_rate, drive.batches_completed
        );
        Ok::<_, BenchError>(vec![
            format!(
                "LOAD offered {:.0}/s, achieved {:.1} transitions/s",
                args.rate, s.throughput
            ),
            verdict(
                "event-in -> command-out p50",
                s.p50,
                Duration::from_millis(10),
            ),
            verdict(
                "event-in -> command-out p99",
                s.p99,
                Duration::from_millis(50),
            ),
        ])
    }
    .await;
    spine.stop().await;
    result
}

/// What one task of a SQL reference loop does per operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqlLoop {
    /// `UPDATE batches SET version = version + 1 WHERE id = $1 AND version = $2`, one round trip, autocommit: the
    /// issue's physical reference.
    RawCas,
    /// The least a transactional unit of work can do: BEGIN; inbox INSERT; the CAS UPDATE; outbox INSERT (born
    /// published, so the running relay leaves it alone); COMMIT. The floor of the design, for context.
    MinimalUnit,
}

/// `concurrency` tasks, each on its own `batches` row, each running `kind` back to back for `duration`.
pub async fn sql_loop(
    url: &str,
    kind: SqlLoop,
    concurrency: usize,
    duration: Duration,
) -> Result<Summary, BenchError> {
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .max_connections(concurrency as u32)
        .min_connections(concurrency as u32)
        .sqlx_logging(false);
    let db = Database::connect(options).await?;
    let rows = db
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            format!("SELECT id, version FROM batches ORDER BY id LIMIT {concurrency}"),
        ))
        .await?;
    if rows.len() < concurrency {
        return Err(BenchError::Setup(format!(
            "the SQL loop needs {concurrency} batch rows, found {}",
            rows.len()
        )));
    }
    let mut targets = Vec::with_capacity(concurrency);
    for row in rows {
        let id: uuid::Uuid = row.try_get("", "id")?;
        let version: i64 = row.try_get("", "version")?;
        targets.push((id, version));
    }
    let db = Arc::new(db);
    let until = Instant::now() + duration;
    let started = Instant::now();
    let tasks: Vec<_> = targets
        .into_iter()
        .map(|(id, mut version)| {
            let db = Arc::clone(&db);
            tokio::spawn(async move {
                let mut rec = Recorder::new("sql");
                while Instant::now() < until {
                    let at = Instant::now();
                    let done = match kind {
                        SqlLoop::RawCas => cas(&*db, id, version).await,
                        SqlLoop::MinimalUnit => minimal_unit(&db, id, version).await,
                    };
                    match done {
                        Ok(1) => {
                            version += 1;
                            rec.ok(at.elapsed());
                        }
                        Ok(_) => rec.error("cas-lost"),
                        Err(_) => rec.error("db"),
                    }
                }
                rec
            })
        })
        .collect();
    let name = match kind {
        SqlLoop::RawCas => format!("raw CAS UPDATE ({concurrency} tasks)"),
        SqlLoop::MinimalUnit => format!("minimal unit of work ({concurrency} tasks)"),
    };
    let mut total = Recorder::new(name);
    for task in tasks {
        total.merge(task.await.map_err(|e| BenchError::Setup(e.to_string()))?);
    }
    total.stop();
    let mut summary = total.summary();
    // The merged recorder's clock started after the tasks; use the loop's own.
    summary.elapsed = started.elapsed();
    summary.throughput = summary.ok as f64 / summary.elapsed.as_secs_f64();
    if let Ok(db) = Arc::try_unwrap(db) {
        let _ = db.close().await;
    }
    Ok(summary)
}

async fn cas<C: ConnectionTrait>(
    conn: &C,
    id: uuid::Uuid,
    version: i64,
) -> Result<u64, sea_orm::DbErr> {
    Ok(conn
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE batches SET version = version + 1 WHERE id = $1 AND version = $2",
            [Value::from(id), Value::from(version)],
        ))
        .await?
        .rows_affected())
}

async fn minimal_unit(
    db: &DatabaseConnection,
    id: uuid::Uuid,
    version: i64,
) -> Result<u64, sea_orm::DbErr> {
    let txn = db.begin().await?;
    let event = Value::from(uuid::Uuid::now_v7());
    txn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO processed_events (event_id, topic, processed_at) VALUES ($1, 'bench.floor', now())",
        [event.clone()],
    ))
    .await?;
    let updated = cas(&txn, id, version).await?;
    txn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO event_outbox (event_id, topic, message_key, payload, headers, created_at, published_at, \
         attempts, next_attempt_at, parked) VALUES ($1, 'bench.floor', $2, '\\x00', '{}', now(), now(), 0, now(), false)",
        [event, Value::from(id.to_string())],
    ))
    .await?;
    txn.commit().await?;
    Ok(updated)
}
