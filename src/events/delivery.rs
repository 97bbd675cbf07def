//! What happens once the broker acknowledged a relay round: the rows are marked published and, a moment later, the
//! phases whose commands went out move to IN_PROGRESS (through the core, as `PhaseCommandDelivered`). It runs beside
//! the relay (`finish_rounds`), so the relay claims its next round at once.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::core::ids::{Attempt, BatchId, PhaseName};
use crate::core::input::Input;
use crate::core::orchestrator::{Orchestrator, OrchestratorError};
use crate::core::ports::BoxFuture;
use crate::store::Store;

/// Told when a phase command reached the broker, so the phase can move to IN_PROGRESS.
pub trait DeliveryListener: Send + Sync {
    fn command_delivered(
        &self,
        batch_id: BatchId,
        phase: PhaseName,
        attempt: Attempt,
    ) -> BoxFuture<'_, ()>;
}

impl DeliveryListener for Orchestrator {
    fn command_delivered(
        &self,
        batch_id: BatchId,
        phase: PhaseName,
        attempt: Attempt,
    ) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            match self
                .handle(
                    batch_id,
                    Input::PhaseCommandDelivered { phase, attempt },
                    None,
                )
                .await
            {
                Ok(_) => {}
                // The phase moved on already (an outcome or a timeout came first): nothing to record.
                Err(OrchestratorError::Rejected(r)) => {
                    tracing::debug!(%batch_id, %phase, %attempt, reason = %r, "delivery report not applied")
                }
                // The phase stays DISPATCH_INITIATED; the timeout scanner covers it either way.
                Err(e) => {
                    tracing::warn!(%batch_id, %phase, %attempt, error = %e, "cannot record command delivery")
                }
            }
        })
    }
}

/// Delivery reports applied at once (each one unit of work on a different batch, mostly): a round's worth, so that
/// the group committer commits them in a few transactions instead of one each.
const DELIVERY_REPORT_CONCURRENCY: usize = 256;

/// Acknowledged rounds whose reports may wait to be taken up by the reporter before the finisher waits for it.
const REPORT_QUEUE_ROUNDS: usize = 256;

/// A phase command the broker acknowledged.
pub(super) type PhaseDelivery = (BatchId, PhaseName, Attempt);

/// What is left of a round once the broker acknowledged its records: marking them published and telling the
/// listener which phase commands went out.
#[derive(Debug, Default)]
pub(super) struct Delivered {
    pub(super) ids: Vec<i64>,
    pub(super) phases: Vec<PhaseDelivery>,
}

/// Finishes delivered rounds beside the relay, everything queued at once, until the relay drops its sender. The
/// rows stay leased until they are marked, so no round claims them again meanwhile; a failed mark only means the
/// rows go out again after their lease, with the same event ids, which consumers dedupe. The listener hears of
/// each round's phase commands `settle` after the broker acknowledged them (see `report_deliveries`).
pub(super) async fn finish_rounds(
    store: Store,
    listener: Option<Arc<dyn DeliveryListener>>,
    settle: Duration,
    relay: Arc<Notify>,
    mut queue: mpsc::Receiver<Delivered>,
) {
    let (reports, acknowledged) = mpsc::channel(REPORT_QUEUE_ROUNDS);
    let reporting =
        listener.map(|listener| tokio::spawn(report_deliveries(listener, settle, acknowledged)));
    while let Some(mut delivered) = queue.recv().await {
        while let Ok(more) = queue.try_recv() {
            delivered.ids.extend(more.ids);
            delivered.phases.extend(more.phases);
        }
        match store.mark_published(&delivered.ids, Utc::now()).await {
            // A later row of the same key becomes claimable only now.
            Ok(_) => relay.notify_one(),
            Err(e) => {
                metrics::counter!("relay_publish_errors").increment(1);
                tracing::warn!(error = %e, rows = delivered.ids.len(), "cannot mark delivered rows published; they go out again after their lease");
            }
        }
        if reporting.is_some()
            && !delivered.phases.is_empty()
            && reports
                .send((Instant::now(), delivered.phases))
                .await
                .is_err()
        {
            tracing::warn!("the delivery reporter has stopped; phases stay DISPATCH_INITIATED");
        }
    }
    drop(reports);
    if let Some(task) = reporting {
        let _ = task.await;
    }
}

/// Tells the listener of each acknowledged round's phase commands once they are `settle` old, everything due at
/// once; when the finisher stops, whatever is left at once.
///
/// Why wait: the delivery report is a state change of its own (DISPATCH_INITIATED → IN_PROGRESS: a compare-and-set
/// of the batch row and of the phase row). When the phase's outcome is back first, which a fast phase service
/// manages within milliseconds, the report is settled (`core::settled`) and answered from the aggregate cache
/// without a transaction. The phase shows DISPATCH_INITIATED up to `settle` longer; the timeout scanner counts
/// from the dispatch either way.
async fn report_deliveries(
    listener: Arc<dyn DeliveryListener>,
    settle: Duration,
    mut queue: mpsc::Receiver<(Instant, Vec<PhaseDelivery>)>,
) {
    let mut pending: VecDeque<(Instant, Vec<PhaseDelivery>)> = VecDeque::new();
    let mut closed = false;
    loop {
        if pending.is_empty() {
            match queue.recv().await {
                Some(round) => pending.push_back(round),
                None => return,
            }
        }
        if !closed {
            let due = pending
                .front()
                .map_or_else(Instant::now, |(at, _)| *at + settle);
            tokio::select! {
                () = tokio::time::sleep_until(due) => {}
                more = queue.recv() => {
                    match more {
                        Some(round) => pending.push_back(round),
                        None => closed = true,
                    }
                    continue;
                }
            }
        }
        let now = Instant::now();
        let mut due = Vec::new();
        while let Some((at, _)) = pending.front() {
            if !closed && *at + settle > now {
                break;
            }
            if let Some((_, phases)) = pending.pop_front() {
                due.extend(phases);
            }
        }
        futures::stream::iter(due)
            .for_each_concurrent(DELIVERY_REPORT_CONCURRENCY, |(batch_id, phase, attempt)| {
                listener.command_delivered(batch_id, phase, attempt)
            })
            .await;
    }
}
