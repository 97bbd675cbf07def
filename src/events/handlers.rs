//! Dispatch of decoded records to the orchestrator, and the classification the consumer acts on: applied,
//! duplicate, poison (dead-letter and move on) or transient (retry the same record).

use std::sync::Arc;

use crate::core::orchestrator::{Orchestrator, OrchestratorError, RequestOrigin};
use crate::core::ports::{Applied, InboxEntry, RepositoryError, ResolveError};

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

/// Calls the orchestrator for one decoded record.
#[derive(Clone)]
pub struct EventHandler {
    orchestrator: Arc<Orchestrator>,
}

impl EventHandler {
    pub fn new(orchestrator: Arc<Orchestrator>) -> Self {
        Self { orchestrator }
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
            ConsumedEvent::PipelineRequest(request) => {
                let origin = RequestOrigin::event(inbox, event.correlation_id)
                    .with_prompt_ref(request.prompt_ref.clone());
                let accepted = if request.is_retry {
                    self.orchestrator
                        .retry_phase(
                            request.actor.clone(),
                            event.batch_id,
                            request.requested,
                            request.reason.clone(),
                            origin,
                        )
                        .await
                } else {
                    self.orchestrator
                        .request_pipeline(
                            request.actor.clone(),
                            event.batch_id,
                            request.requested,
                            origin,
                        )
                        .await
                };
                accepted.map(|_| HandleResult::Applied)
            }
        };
        outcome.unwrap_or_else(|error| classify(&error))
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
