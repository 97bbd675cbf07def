//! The core's ports: traits the adapters implement. The core calls them only through the `Orchestrator`; it never
//! does I/O itself.

use std::future::Future;
use std::pin::Pin;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::effect::Effect;
use super::ids::{Attempt, BatchId, CorrelationId, EventId, PhaseName, UserId};
use super::input::{Input, ResolvedPipeline};
use super::model::{BatchAggregate, BatchStatus};
use super::rejection::Rejection;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

/// Generates time-ordered ids (UUIDv7).
pub trait IdGenerator: Send + Sync {
    fn new_id(&self) -> Uuid;
}

/// What to resolve: the requested (final) phase and the phases the batch has already done (for a retry, without
/// the retried phase, so that it is not pruned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolveRequest {
    pub batch_id: BatchId,
    pub requested: PhaseName,
    pub correlation_id: CorrelationId,
    pub done: Vec<PhaseName>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("phase {0} cannot be requested as a pipeline")]
    NotAPipelinePhase(PhaseName),
    #[error("the pipeline resolver answered something unusable: {0}")]
    InvalidAnswer(String),
    /// Transient: the resolver could not be reached; the caller may retry.
    #[error("the pipeline resolver is unavailable: {0}")]
    Unavailable(String),
}

/// Turns a requested phase into the ordered phases to run (the Batch Conductor Service or the built-in graph).
pub trait PipelineResolver: Send + Sync {
    fn resolve<'a>(
        &'a self,
        request: &'a ResolveRequest,
    ) -> BoxFuture<'a, Result<ResolvedPipeline, ResolveError>>;
}

/// The consumed event that caused a unit of work; its id makes the unit happen at most once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxEntry {
    pub event_id: EventId,
    pub topic: String,
}

/// One state change: inbox check → read → decide → compare-and-set → outbox → commit.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitOfWork {
    pub batch_id: BatchId,
    pub input: Input,
    pub inbox: Option<InboxEntry>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// Committed: the state after the change and the effects it decided (publish effects are already in the
    /// outbox; notifications are for the caller to send).
    Changed {
        aggregate: Box<BatchAggregate>,
        effects: Vec<Effect>,
    },
    /// The event id was processed before; nothing changed.
    Duplicate,
}

/// Told about each unit of work after it committed, in commit order for any one batch. Must not block: it runs on
/// the committing task.
pub trait CommitObserver: Send + Sync {
    fn committed(&self, batch_id: BatchId, applied: &Applied);
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RepositoryError {
    #[error("rejected: {0}")]
    Rejected(#[from] Rejection),
    /// Every compare-and-set attempt lost to a concurrent change.
    #[error("gave up after {attempts} conflicting concurrent updates")]
    Conflict { attempts: u32 },
    /// Transient: the database is unreachable or failed; the caller may retry.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// A stored row does not parse into the domain (a bug or a manual edit).
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// A phase dispatched longer ago than the timeout allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimedOutPhase {
    pub batch_id: BatchId,
    pub phase: PhaseName,
    pub attempt: Attempt,
}

/// A page of a user's batches, newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchPage {
    pub batches: Vec<BatchSummary>,
    pub next_page_token: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BatchSummary {
    pub batch_id: BatchId,
    pub status: BatchStatus,
    pub created_at: DateTime<Utc>,
}

pub trait BatchRepository: Send + Sync {
    /// Runs one unit of work in one transaction, calling `decide` with `now`; retries on a version conflict a
    /// bounded number of times. A duplicate inbox event is a committed no-op.
    fn apply<'a>(
        &'a self,
        unit: UnitOfWork,
        now: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<Applied, RepositoryError>>;
    /// The batch exactly as stored (version-checked): what a unit of work or a pre-check decides on.
    fn load<'a>(
        &'a self,
        batch_id: BatchId,
    ) -> BoxFuture<'a, Result<Option<BatchAggregate>, RepositoryError>>;
    /// The batch for a status read only: an adapter may answer from a cache kept coherent with every writer
    /// without asking the database, so it may trail a commit of another process by a bounded moment. Never
    /// decide on it.
    fn read<'a>(
        &'a self,
        batch_id: BatchId,
    ) -> BoxFuture<'a, Result<Option<BatchAggregate>, RepositoryError>> {
        self.load(batch_id)
    }
    fn list_batches<'a>(
        &'a self,
        owner: &'a UserId,
        page_size: u32,
        page_token: Option<&'a str>,
    ) -> BoxFuture<'a, Result<BatchPage, RepositoryError>>;
    /// Phases still waiting for an outcome that were dispatched at or before `dispatched_before`.
    fn timed_out_phases<'a>(
        &'a self,
        dispatched_before: DateTime<Utc>,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<TimedOutPhase>, RepositoryError>>;
    /// Whether a unit of work carrying this consumed event id has committed. Callers that check the state before
    /// the unit of work (pipeline requests, which need resolving first) ask this first, so that a redelivery is a
    /// duplicate rather than a refusal; `apply` stays the authoritative check.
    fn is_processed<'a>(
        &'a self,
        event_id: EventId,
    ) -> BoxFuture<'a, Result<bool, RepositoryError>>;
}
