//! Resident memory of `bos serve` idle and through a soak of whole batch lifecycles, and cold start to serving in
//! the embedded mode (SQLite file, in-process broker, nothing configured).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::oneshot;

use super::flow::{self, Plane};
use super::process::{self, BosProcess};
use super::stack::{self, Client, Stack};
use super::stats::{percentile, verdict, Recorder};
use super::{BenchError, Common};
use crate::events::codec::topic_for;
use crate::proto::huleedu::bos::v1 as api;
use crate::proto::huleedu::common::v1 as pc;
use crate::proto::huleedu::events::v1 as pe;

/// Flags of `bos bench memory`.
#[derive(Debug, Clone, clap::Args)]
pub struct MemoryArgs {
    /// Soak length in seconds (the issue asks for 10 minutes).
    #[arg(long, default_value_t = 600)]
    pub soak_secs: u64,
    /// Batches in flight during the soak (closed loop: register → pipeline → completed → status read).
    #[arg(long, default_value_t = 16)]
    pub in_flight: usize,
    /// Essays per soak batch.
    #[arg(long, default_value_t = 20)]
    pub essays: i32,
    /// Seconds between memory samples.
    #[arg(long, default_value_t = 10)]
    pub sample_secs: u64,
}

/// Flags of `bos bench cold-start`.
#[derive(Debug, Clone, clap::Args)]
pub struct ColdStartArgs {
    /// Starts measured (each on a fresh data directory).
    #[arg(long, default_value_t = 7)]
    pub runs: usize,
}

const MIB: f64 = 1024.0;

/// `bos bench cold-start`: spawn → first healthy `/healthz`, embedded mode, fresh data directory each time; then
/// the idle resident memory of the last one.
pub async fn cold_start(args: &ColdStartArgs) -> Result<Vec<String>, BenchError> {
    let mut times = Vec::new();
    let mut idle_rss = 0;
    for run in 0..args.runs.max(1) {
        let spawned = Instant::now();
        let mut bos = BosProcess::spawn(&[])?;
        bos.wait_healthy(Duration::from_secs(30)).await?;
        times.push(spawned.elapsed());
        if run + 1 == args.runs.max(1) {
            tokio::time::sleep(Duration::from_secs(3)).await;
            idle_rss = bos.rss_kib()?;
        }
        bos.stop();
    }
    times.sort_unstable();
    let p50 = percentile(&times, 0.5);
    println!(
        "cold start (embedded SQLite + broker, fresh data dir, {} runs): min {:.1} ms, p50 {:.1} ms, max {:.1} ms",
        times.len(),
        times[0].as_secs_f64() * 1e3,
        p50.as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3
    );
    Ok(vec![
        verdict(
            "cold start to serving (embedded) p50",
            p50,
            Duration::from_millis(300),
        ),
        format!(
            "TARGET idle RSS (embedded mode): {:.1} MiB (target < 40 MiB: {})",
            idle_rss as f64 / MIB,
            if (idle_rss as f64) < 40.0 * MIB {
                "met"
            } else {
                "MISSED"
            }
        ),
    ])
}

/// `bos bench memory`: idle RSS on PostgreSQL + broker, then RSS samples through the soak.
pub async fn memory(common: &Common, args: &MemoryArgs) -> Result<Vec<String>, BenchError> {
    let stack = Stack::start(common).await?;
    let (bos, broker) = (&stack.bos, &stack.broker);
    let result = async {
        let plane = Plane::start(broker.bootstrap(), common.partitions)?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let idle = bos.rss_kib()?;
        let before = process::cpu_time(bos.pid());
        tokio::time::sleep(Duration::from_secs(10)).await;
        let idle_cpu = process::cpu_time(bos.pid()).saturating_sub(before);
        println!(
            "idle (PostgreSQL + external broker): RSS {:.1} MiB, CPU {:.2} % of one core",
            idle as f64 / MIB,
            idle_cpu.as_secs_f64() * 10.0
        );
        let client = stack::client(&bos.url(), "bench-user").await?;
        let (samples, soak) = soak(bos, plane, client, args).await?;
        let summary = soak.summary();
        println!("{summary}");
        for (at, kib) in &samples {
            println!("  rss at {:>5} s: {:.1} MiB", at.as_secs(), *kib as f64 / MIB);
        }
        let max = samples.iter().map(|s| s.1).max().unwrap_or(idle);
        let (half_at, half) = samples.get(samples.len() / 2).copied().unwrap_or((Duration::ZERO, idle));
        let (end_at, end) = samples.last().copied().unwrap_or((Duration::ZERO, idle));
        // Flat: over the second half of the soak RSS grows by less than 3 % (warm-up, pools and caches fill in
        // the first half); the slope is printed either way.
        let minutes = end_at.saturating_sub(half_at).as_secs_f64() / 60.0;
        let slope = if minutes > 0.0 { (end as f64 - half as f64) / MIB / minutes } else { 0.0 };
        let flat = (end as f64) <= half as f64 * 1.03;
        println!("  second half: {slope:+.3} MiB per minute");
        Ok::<_, BenchError>(vec![
            format!(
                "TARGET idle RSS: {:.1} MiB (target < 40 MiB: {})",
                idle as f64 / MIB,
                if (idle as f64) < 40.0 * MIB { "met" } else { "MISSED" }
            ),
            format!(
                "TARGET soak RSS ({} s, {} pipelines): max {:.1} MiB, end {:.1} MiB, half-way {:.1} MiB, {slope:+.3} MiB/min (target < 40 MiB and flat: {})",
                args.soak_secs,
                summary.ok,
                max as f64 / MIB,
                end as f64 / MIB,
                half as f64 / MIB,
                if (max as f64) < 40.0 * MIB && flat { "met" } else { "MISSED" }
            ),
        ])
    }
    .await;
    stack.stop().await;
    result
}

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<()>>>>;

/// Runs `in_flight` closed-loop batch lifecycles until the soak ends, answering every command at once, and samples
/// the process's RSS.
async fn soak(
    bos: &BosProcess,
    mut plane: Plane,
    client: Client,
    args: &MemoryArgs,
) -> Result<(Vec<(Duration, u64)>, Recorder), BenchError> {
    let started = Instant::now();
    let until = started + Duration::from_secs(args.soak_secs);
    let waiters: Waiters = Arc::default();
    let mut workers = FuturesUnordered::new();
    for _ in 0..args.in_flight.max(1) {
        let (client, waiters, essays) = (client.clone(), Arc::clone(&waiters), args.essays);
        workers.push(tokio::spawn(lifecycles(client, waiters, essays, until)));
    }
    let mut samples = Vec::new();
    let mut next_sample = started;
    let mut deliveries = FuturesUnordered::new();
    let mut rec = Recorder::new("soak: pipelines completed (register -> completed)");
    loop {
        if Instant::now() >= next_sample {
            samples.push((started.elapsed(), bos.rss_kib()?));
            next_sample += Duration::from_secs(args.sample_secs.max(1));
        }
        tokio::select! {
            arrival = plane.arrivals.recv() => {
                let Some(arrival) = arrival else { break };
                if topic_for::<pe::BatchPipelineCompleted>().as_deref() == Some(arrival.topic.as_str()) {
                    let waiter = waiters.lock().unwrap_or_else(PoisonError::into_inner).remove(&arrival.key);
                    if let Some(waiter) = waiter {
                        let _ = waiter.send(());
                    }
                    continue;
                }
                for record in flow::answers(&arrival)? {
                    match plane.send(&record) {
                        Ok(d) => deliveries.push(d),
                        Err(code) => rec.error(code),
                    }
                }
            }
            Some(_) = deliveries.next(), if !deliveries.is_empty() => {}
            finished = workers.next() => match finished {
                Some(Ok(worker)) => rec.merge(worker),
                Some(Err(e)) => return Err(BenchError::Setup(e.to_string())),
                None => break,
            },
            () = tokio::time::sleep_until(next_sample.into()) => {}
        }
    }
    rec.stop();
    samples.push((started.elapsed(), bos.rss_kib()?));
    plane.stop().await;
    Ok((samples, rec))
}

/// One closed loop: register, request ai_feedback, wait for the pipeline to complete, read the status; again.
async fn lifecycles(mut client: Client, waiters: Waiters, essays: i32, until: Instant) -> Recorder {
    let mut rec = Recorder::new("");
    while Instant::now() < until {
        let at = Instant::now();
        let batch = match super::api::register(&mut client, essays).await {
            Ok(r) => r.batch_id,
            Err(s) => {
                rec.error(format!("{:?}", s.code()));
                continue;
            }
        };
        let (tx, rx) = oneshot::channel();
        waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(batch.clone(), tx);
        loop {
            let requested = client
                .request_pipeline(api::RequestPipelineRequest {
                    batch_id: batch.clone(),
                    requested_pipeline: pc::PhaseName::AiFeedback as i32,
                    prompt_ref: String::new(),
                })
                .await;
            match requested {
                Ok(_) => break,
                Err(s) if s.code() == tonic::Code::FailedPrecondition && Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                // The soak ended while the batch's content was still on its way: cut off, not failed.
                Err(s) if s.code() == tonic::Code::FailedPrecondition => return rec,
                Err(s) => {
                    rec.error(format!("{:?}", s.code()));
                    return rec;
                }
            }
        }
        let budget = until.saturating_duration_since(Instant::now()) + Duration::from_secs(30);
        if tokio::time::timeout(budget, rx).await.is_err() {
            rec.error("pipeline-not-completed");
            continue;
        }
        match client
            .get_batch_status(api::GetBatchStatusRequest { batch_id: batch })
            .await
        {
            Ok(_) => rec.ok(at.elapsed()),
            Err(s) => rec.error(format!("{:?}", s.code())),
        }
    }
    rec
}
