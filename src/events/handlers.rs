//! Dispatch of decoded records to the orchestrator, and the classification the consumer acts on: applied,
//! duplicate, poison (dead-letter and move on) or transient (retry the same record).

use std::sync::Arc;

use crate::core::ids::EventId;
use crate::core::orchestrator::{Orchestrator, OrchestratorError};
use crate::core::ports::{Applied, BoxFuture, InboxEntry, RepositoryError, ResolveError};

use super::codec::{ConsumedEvent, DecodedEvent};

/// What became of one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandleResult {
    /// The unit of work committed.
    Applied,
    /// The event was processed before; nothing changed.
    Duplicate,
    /// It can never succeed (undecodable, unknown batch, illegal for the state): dead-letter it.
    Poison(String),
    /// The database or the resolver is unavailable: retry the same record later.
    Transient(String),
}

impl HandleResult {
    /// Label for `consumed_total{result}`.
    pub fn label(&self) -> &'static str {
        match self {
            HandleResult::Applied => "applied",
            HandleResult::Duplicate => "duplicate",
            HandleResult::Poison(_) => "poison",
            HandleResult::Transient(_) => "transient",
        }
    }
}

/// Asks the database inbox whether an event id was processed. A rejected event that was in fact processed before
/// is a duplicate, not poison (the pipeline request path checks the state before the inbox).
pub trait InboxProbe: Send + Sync {
    fn is_processed<'a>(&'a self, event_id: EventId) -> BoxFuture<'a, Result<bool, String>>;
}

impl InboxProbe for crate::store::Store {
    fn is_processed<'a>(&'a self, event_id: EventId) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(async move {
            crate::store::Store::is_processed(self, event_id)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// Calls the orchestrator for one decoded record.
#[derive(Clone)]
pub struct EventHandler {
    orchestrator: Arc<Orchestrator>,
    inbox: Option<Arc<dyn InboxProbe>>,
}

impl EventHandler {
    pub fn new(orchestrator: Arc<Orchestrator>) -> Self {
        Self {
            orchestrator,
            inbox: None,
        }
    }

    /// Lets rejections of already-processed events count as duplicates.
    pub fn with_inbox(mut self, inbox: Arc<dyn InboxProbe>) -> Self {
        self.inbox = Some(inbox);
        self
    }

    pub async fn handle(&self, event: &DecodedEvent) -> HandleResult {
        let inbox = InboxEntry {
            event_id: event.event_id,
            topic: event.topic.clone(),
        };
        let outcome = match &event.body {
            ConsumedEvent::Input(input) => self
                .orchestrator
                .handle(event.batch_id, input.clone(), Some(inbox))
                .await
                .map(|applied| match applied {
                    Applied::Changed { .. } => HandleResult::Applied,
                    Applied::Duplicate => HandleResult::Duplicate,
                }),
            ConsumedEvent::PipelineRequest(request) if request.is_retry => {
                // A retry has no inbox entry on its path: the core refuses a second retry while the first one's
                // run is active or once the phase is no longer retryable, and the probe below turns such a refusal
                // of a redelivery into a duplicate only if the first delivery was recorded.
                self.orchestrator
                    .retry_phase(
                        request.actor.clone(),
                        event.batch_id,
                        request.requested,
                        request.reason.clone(),
                    )
                    .await
                    .map(|_| HandleResult::Applied)
            }
            ConsumedEvent::PipelineRequest(request) => self
                .orchestrator
                .request_pipeline(
                    request.actor.clone(),
                    event.batch_id,
                    request.requested,
                    event.correlation_id,
                    Some(inbox),
                )
                .await
                .map(|_| HandleResult::Applied),
        };
        match outcome {
            Ok(result) => result,
            Err(error) => self.classify(event, error).await,
        }
    }

    async fn classify(&self, event: &DecodedEvent, error: OrchestratorError) -> HandleResult {
        let result = classify(&error);
        if let (HandleResult::Poison(_), Some(inbox)) = (&result, &self.inbox) {
            match inbox.is_processed(event.event_id).await {
                Ok(true) => return HandleResult::Duplicate,
                Ok(false) => {}
                // Cannot tell: retrying later is safe, dead-lettering a processed event is noise.
                Err(e) => return HandleResult::Transient(format!("inbox lookup failed: {e}")),
            }
        }
        result
    }
}

/// The error classes of ARCHITECTURE §2 and defect 16: state and input problems are poison, outages are transient.
pub fn classify(error: &OrchestratorError) -> HandleResult {
    match error {
        OrchestratorError::Duplicate => HandleResult::Duplicate,
        OrchestratorError::Rejected(r) => HandleResult::Poison(format!("rejected: {r}")),
        OrchestratorError::Invalid(v) => HandleResult::Poison(format!("invalid: {v:?}")),
        OrchestratorError::Resolve(ResolveError::Unavailable(m)) => {
            HandleResult::Transient(format!("resolver unavailable: {m}"))
        }
        OrchestratorError::Resolve(e) => HandleResult::Poison(e.to_string()),
        OrchestratorError::Repository(RepositoryError::Unavailable(m)) => {
            HandleResult::Transient(format!("storage unavailable: {m}"))
        }
        OrchestratorError::Repository(e @ RepositoryError::Conflict { .. }) => {
            HandleResult::Transient(e.to_string())
        }
        OrchestratorError::Repository(e @ RepositoryError::Rejected(_)) => {
            HandleResult::Poison(e.to_string())
        }
        // A stored row that does not parse will not parse on the next attempt either; the record waits in the DLQ
        // until the data is repaired.
        OrchestratorError::Repository(e @ RepositoryError::Corrupt(_)) => {
            HandleResult::Poison(e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::ids::{Attempt, PhaseName};
    use crate::core::rejection::Rejection;

    #[test]
    fn outages_are_transient_and_refusals_are_poison() {
        let cases = [
            (OrchestratorError::Duplicate, "duplicate"),
            (OrchestratorError::Rejected(Rejection::NotFound), "poison"),
            (
                OrchestratorError::Rejected(Rejection::StaleAttempt {
                    phase: PhaseName::Nlp,
                    current: Attempt::FIRST.next(),
                    got: Attempt::FIRST,
                }),
                "poison",
            ),
            (OrchestratorError::Invalid(vec![]), "poison"),
            (
                OrchestratorError::Resolve(ResolveError::Unavailable("down".into())),
                "transient",
            ),
            (
                OrchestratorError::Resolve(ResolveError::InvalidAnswer("?".into())),
                "poison",
            ),
            (
                OrchestratorError::Repository(RepositoryError::Unavailable("db".into())),
                "transient",
            ),
            (
                OrchestratorError::Repository(RepositoryError::Conflict { attempts: 8 }),
                "transient",
            ),
            (
                OrchestratorError::Repository(RepositoryError::Rejected(Rejection::NoActiveRun)),
                "poison",
            ),
            (
                OrchestratorError::Repository(RepositoryError::Corrupt("x".into())),
                "poison",
            ),
        ];
        for (error, want) in cases {
            assert_eq!(classify(&error).label(), want, "{error:?}");
        }
    }
}
