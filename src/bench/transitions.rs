//! Transitions through the whole spine (Kafka in → unit of work → outbox → relay → Kafka out), at full speed
//! against a raw compare-and-set loop on the same PostgreSQL, and at a fixed offered load for latency.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sea_orm::{ConnectOptions, ConnectionTrait, Database, DbBackend, Statement, Value};

use super::flow::{self, Plane};
use super::stack::{self, Stack};
use super::stats::{verdict, Ratio, Recorder, Summary};
use super::{BenchError, Common};

/// Flags of `bos bench transitions`.
#[derive(Debug, Clone, clap::Args)]
pub struct TransitionArgs {
    /// Batches driven through spellcheck → nlp → ai_feedback (three measured transitions each).
    #[arg(long, default_value_t = 600)]
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
        let cpu = stack::CpuMeter::start(spine.stack.bos.pid());
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
        let raw = raw_cas(
            &spine.stack.db.url,
            concurrency,
            Duration::from_secs(args.raw_seconds),
        )
        .await?;
        println!("{raw}");
        let ratio = Ratio {
            label: format!(
                "transitions/s through the spine vs raw CAS UPDATE/s at concurrency {concurrency}"
            ),
            measured: measured.throughput,
            reference: raw.throughput,
            target: 0.7,
        };
        Ok::<_, BenchError>(vec![ratio.to_string()])
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
        let cpu = stack::CpuMeter::start(spine.stack.bos.pid());
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

/// The physical reference: `concurrency` tasks, each on its own `batches` row, each running
/// `UPDATE batches SET version = version + 1 WHERE id = $1 AND version = $2` (one round trip, autocommit) for
/// `duration`.
pub async fn raw_cas(
    url: &str,
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
            "the raw loop needs {concurrency} batch rows, found {}",
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
                let mut rec = Recorder::new("raw");
                while Instant::now() < until {
                    let at = Instant::now();
                    let done = db
                        .execute_raw(Statement::from_sql_and_values(
                            DbBackend::Postgres,
                            "UPDATE batches SET version = version + 1 WHERE id = $1 AND version = $2",
                            [Value::from(id), Value::from(version)],
                        ))
                        .await;
                    match done {
                        Ok(r) if r.rows_affected() == 1 => {
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
    let mut total = Recorder::new(format!("raw CAS UPDATE ({concurrency} tasks)"));
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
