//! The phase-timeout scanner: a periodic task that fails phases dispatched longer ago than the
//! configured timeout, through the same unit of work as every other change (defect 5: a command
//! nobody answers no longer leaves its phase waiting for ever).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::core::orchestrator::Orchestrator;

#[derive(Debug, Clone)]
pub struct ScannerConfig {
    /// How long a dispatched phase may wait for its outcome.
    pub phase_timeout: Duration,
    /// How often to look.
    pub interval: Duration,
    /// Phases timed out per pass at most; a full pass is followed by another at once.
    pub limit: u32,
}

impl ScannerConfig {
    pub fn new(phase_timeout: Duration) -> Self {
        Self {
            phase_timeout,
            interval: Duration::from_secs(5),
            limit: 100,
        }
    }
}

/// Scans until `shutdown` resolves.
pub async fn run(
    orchestrator: Arc<Orchestrator>,
    config: ScannerConfig,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            _ = ticker.tick() => {}
        }
        loop {
            match orchestrator
                .time_out_overdue(config.phase_timeout, config.limit)
                .await
            {
                Ok(0) => break,
                Ok(n) => {
                    metrics::counter!("phases_timed_out_total").increment(n as u64);
                    tracing::warn!(
                        count = n,
                        timeout_secs = config.phase_timeout.as_secs(),
                        "phases timed out"
                    );
                    if n < config.limit as usize {
                        break;
                    }
                }
                Err(e) => {
                    metrics::counter!("timeout_scan_errors_total").increment(1);
                    tracing::warn!(error = %e, "timeout scan failed; next pass retries");
                    break;
                }
            }
        }
    }
}
