//! What happens once the broker acknowledged a relay round: the rows are marked published and the phases whose
//! commands went out move to IN_PROGRESS (through the core, as `PhaseCommandDelivered`). It runs beside the relay
//! (`finish_rounds`), so the relay claims its next round at once.

use std::sync::Arc;

use chrono::Utc;
use futures::StreamExt;
use tokio::sync::{mpsc, Notify};

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
/// rows go out again after their lease, with the same event ids, which consumers dedupe.
pub(super) async fn finish_rounds(
    store: Store,
    listener: Option<Arc<dyn DeliveryListener>>,
    relay: Arc<Notify>,
    mut queue: mpsc::Receiver<Delivered>,
) {
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
        if let Some(listener) = &listener {
            futures::stream::iter(delivered.phases)
                .for_each_concurrent(DELIVERY_REPORT_CONCURRENCY, |(batch_id, phase, attempt)| {
                    listener.command_delivered(batch_id, phase, attempt)
                })
                .await;
        }
    }
}
