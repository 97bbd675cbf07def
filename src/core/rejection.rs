//! Why `decide` refused an input. Adapters map the kind to a gRPC status, an HTTP status, or a dead-letter record.

use super::ids::{Attempt, InvalidValue, PhaseName, RunId};
use super::model::{BatchStatus, PhaseStatus};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    /// The batch does not exist, or belongs to somebody else (never reveal which).
    #[error("batch not found")]
    NotFound,
    #[error("batch already exists")]
    AlreadyExists,
    #[error("{input} is not allowed while the batch is {from:?}")]
    IllegalTransition {
        from: BatchStatus,
        input: &'static str,
    },
    #[error("pipeline run {run_id} is still active")]
    RunActive { run_id: RunId },
    #[error("no pipeline run is active")]
    NoActiveRun,
    #[error("phase {phase} is not part of the active run")]
    UnknownPhase { phase: PhaseName },
    #[error("outcome for {phase} attempt {got} does not answer the current attempt {current}")]
    StaleAttempt {
        phase: PhaseName,
        current: Attempt,
        got: Attempt,
    },
    #[error("phase {phase} is {status:?} and cannot take {input}")]
    IllegalPhaseTransition {
        phase: PhaseName,
        status: PhaseStatus,
        input: &'static str,
    },
    #[error("phase {phase} cannot be retried: {reason}")]
    NotRetryable { phase: PhaseName, reason: String },
    #[error(transparent)]
    Invalid(#[from] InvalidValue),
}

/// Coarse classes of rejection, for error mapping and dead-lettering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectionKind {
    NotFound,
    AlreadyExists,
    /// The input is well-formed but not allowed in the current state.
    FailedPrecondition,
    /// The input itself is malformed.
    InvalidArgument,
}

impl Rejection {
    pub fn kind(&self) -> RejectionKind {
        match self {
            Rejection::NotFound => RejectionKind::NotFound,
            Rejection::AlreadyExists => RejectionKind::AlreadyExists,
            Rejection::Invalid(_) => RejectionKind::InvalidArgument,
            Rejection::IllegalTransition { .. }
            | Rejection::RunActive { .. }
            | Rejection::NoActiveRun
            | Rejection::UnknownPhase { .. }
            | Rejection::StaleAttempt { .. }
            | Rejection::IllegalPhaseTransition { .. }
            | Rejection::NotRetryable { .. } => RejectionKind::FailedPrecondition,
        }
    }
}
