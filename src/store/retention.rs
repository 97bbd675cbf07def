//! Keeps the inbox and the outbox from growing for ever: a periodic task deletes published outbox rows and
//! processed-event ids older than the retention. Unpublished and parked outbox rows are never pruned.

use std::future::Future;
use std::time::Duration;

use chrono::Utc;

use super::Store;

/// Runs `Store::prune` every `every` until `shutdown` resolves; a failed pass is logged and retried next time.
pub async fn run_pruning(
    store: Store,
    retention: Duration,
    every: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let retention = chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
    tokio::pin!(shutdown);
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            _ = ticks.tick() => {}
        }
        let cutoff = Utc::now() - retention;
        match store.prune(cutoff, cutoff).await {
            Ok(report) if report.outbox_rows + report.inbox_rows > 0 => {
                tracing::info!(
                    outbox = report.outbox_rows,
                    inbox = report.inbox_rows,
                    "pruned rows past retention"
                );
                metrics::counter!("store_pruned_rows_total", "table" => "event_outbox")
                    .increment(report.outbox_rows);
                metrics::counter!("store_pruned_rows_total", "table" => "processed_events")
                    .increment(report.inbox_rows);
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "pruning failed; will retry"),
        }
    }
}
