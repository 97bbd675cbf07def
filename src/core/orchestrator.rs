//! The application service both transports call: it gathers what `decide` needs (ids, time, the resolved
//! pipeline) and hands one unit of work to the repository, which runs `decide` inside its transaction.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::ids::{Attempt, BatchId, CorrelationId, EssayId, InvalidValue, PhaseName, RunId};
use super::input::{Actor, Input};
use super::machine::check_owner;
use super::model::{BatchAggregate, RunStatus};
use super::ports::{
    Applied, BatchRepository, Clock, IdGenerator, InboxEntry, PipelineResolver, RepositoryError,
    ResolveError, ResolveRequest, UnitOfWork,
};
use super::registration::{self, ValidRegistration};
use super::rejection::Rejection;
use super::run::check_retryable;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OrchestratorError {
    #[error(transparent)]
    Rejected(Rejection),
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Repository(RepositoryError),
    #[error("invalid request: {0:?}")]
    Invalid(Vec<InvalidValue>),
    /// The consumed event was processed before (only when an inbox entry was given); nothing to do.
    #[error("event already processed")]
    Duplicate,
}

impl From<Rejection> for OrchestratorError {
    fn from(r: Rejection) -> Self {
        OrchestratorError::Rejected(r)
    }
}

impl From<RepositoryError> for OrchestratorError {
    fn from(e: RepositoryError) -> Self {
        match e {
            RepositoryError::Rejected(r) => OrchestratorError::Rejected(r),
            other => OrchestratorError::Repository(other),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Registered {
    pub batch_id: BatchId,
    pub correlation_id: CorrelationId,
    pub essay_ids: Vec<EssayId>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RunAccepted {
    pub run_id: RunId,
    pub correlation_id: CorrelationId,
    /// The run's phases in dispatch order (empty when everything was already done).
    pub phases: Vec<PhaseName>,
    /// The attempt number each phase of the run was given (decided inside the transaction).
    pub attempts: BTreeMap<PhaseName, Attempt>,
    /// `Running`, or already final when the run completed at once.
    pub status: RunStatus,
}

/// Wall-clock time.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// Time-ordered random ids.
#[derive(Debug, Clone, Copy, Default)]
pub struct UuidV7Generator;

impl IdGenerator for UuidV7Generator {
    fn new_id(&self) -> Uuid {
        Uuid::now_v7()
    }
}

/// What comes with a pipeline request or retry beyond who asks for what: where it comes from, and the prompt.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestOrigin {
    /// The run's correlation id (a consumed event's own); a new one when absent.
    pub correlation: Option<CorrelationId>,
    /// The request's prompt reference (or assignment id): when non-empty it replaces the batch's student prompt
    /// reference, which the nlp, cj_assessment and ai_feedback commands carry.
    pub prompt_ref: Option<String>,
    /// The consumed event carrying the request: its redelivery is `OrchestratorError::Duplicate`, whatever the
    /// batch's state by then.
    pub inbox: Option<InboxEntry>,
}

impl RequestOrigin {
    /// A request carried by a consumed event.
    pub fn event(inbox: InboxEntry, correlation: Option<CorrelationId>) -> Self {
        Self {
            correlation,
            inbox: Some(inbox),
            prompt_ref: None,
        }
    }

    /// With the request's prompt reference (empty counts as absent).
    pub fn with_prompt_ref(mut self, prompt_ref: Option<String>) -> Self {
        self.prompt_ref = prompt_ref;
        self
    }
}

/// What a new run is asked to do, once the batch has been checked.
struct StartRun {
    requested: PhaseName,
    done: Vec<PhaseName>,
    is_retry: bool,
    reason: Option<String>,
}

pub struct Orchestrator {
    repo: Arc<dyn BatchRepository>,
    resolver: Arc<dyn PipelineResolver>,
    clock: Arc<dyn Clock>,
    ids: Arc<dyn IdGenerator>,
}

impl Orchestrator {
    pub fn new(
        repo: Arc<dyn BatchRepository>,
        resolver: Arc<dyn PipelineResolver>,
        clock: Arc<dyn Clock>,
        ids: Arc<dyn IdGenerator>,
    ) -> Self {
        Self {
            repo,
            resolver,
            clock,
            ids,
        }
    }

    pub async fn register_batch(
        &self,
        registration: ValidRegistration,
    ) -> Result<Registered, OrchestratorError> {
        let batch_id = BatchId::from_uuid(self.ids.new_id());
        let correlation_id = CorrelationId::from_uuid(self.ids.new_id());
        let essay_ids: Vec<EssayId> = (0..registration.expected_essay_count)
            .map(|_| EssayId::from_uuid(self.ids.new_id()))
            .collect();
        let input = Input::Register(registration.into_new_batch(
            batch_id,
            correlation_id,
            essay_ids.clone(),
        ));
        self.apply(batch_id, input, None).await?;
        Ok(Registered {
            batch_id,
            correlation_id,
            essay_ids,
        })
    }

    /// A pipeline request from a user (RPC) or from the client pipeline request event (`origin.inbox` set). The
    /// request is checked before the resolver is asked, and checked again inside the transaction.
    pub async fn request_pipeline(
        &self,
        actor: Actor,
        batch_id: BatchId,
        requested: PhaseName,
        origin: RequestOrigin,
    ) -> Result<RunAccepted, OrchestratorError> {
        if !requested.is_pipeline_phase() {
            let reason = format!("{requested} is not a pipeline phase");
            return Err(Rejection::Invalid(InvalidValue::new("requested_pipeline", reason)).into());
        }
        let origin = checked(origin)?;
        let inbox = origin.inbox.clone();
        self.deduplicated(inbox.as_ref(), async {
            let agg = self.checked_batch_for(&actor, batch_id).await?;
            if let Some(run) = agg.active_run() {
                return Err(Rejection::RunActive { run_id: run.id }.into());
            }
            let done = agg.done_phases();
            let start = StartRun {
                requested,
                done,
                is_retry: false,
                reason: None,
            };
            self.start_run(actor, agg, start, origin).await
        })
        .await
    }

    /// Retries a FAILED or partially succeeded phase of the caller's own batch: resolved like any request (with the
    /// phase itself not counted as done), one correlation id for everything it produces. A redelivered retry event
    /// (`origin.inbox` seen before) is a duplicate, never a second retry nor a refusal.
    pub async fn retry_phase(
        &self,
        actor: Actor,
        batch_id: BatchId,
        phase: PhaseName,
        reason: Option<String>,
        origin: RequestOrigin,
    ) -> Result<RunAccepted, OrchestratorError> {
        let origin = checked(origin)?;
        let inbox = origin.inbox.clone();
        self.deduplicated(inbox.as_ref(), async {
            let agg = self.checked_batch_for(&actor, batch_id).await?;
            if let Some(run) = agg.active_run() {
                return Err(Rejection::RunActive { run_id: run.id }.into());
            }
            check_retryable(&agg, phase)?;
            let done: Vec<PhaseName> = agg
                .done_phases()
                .into_iter()
                .filter(|p| *p != phase)
                .collect();
            let start = StartRun {
                requested: phase,
                done,
                is_retry: true,
                reason,
            };
            self.start_run(actor, agg, start, origin).await
        })
        .await
    }

    /// Runs `attempt` unless the consumed event behind it was processed before. The state checks of a request run
    /// before its unit of work (the resolver is asked in between), so the inbox is consulted first; and a refusal
    /// is re-checked against the inbox, because a concurrent delivery of the same event may have committed between
    /// that first look and the state check.
    async fn deduplicated<T>(
        &self,
        inbox: Option<&InboxEntry>,
        attempt: impl Future<Output = Result<T, OrchestratorError>>,
    ) -> Result<T, OrchestratorError> {
        let Some(entry) = inbox else {
            return attempt.await;
        };
        if self.repo.is_processed(entry.event_id).await? {
            return Err(OrchestratorError::Duplicate);
        }
        match attempt.await {
            Err(OrchestratorError::Rejected(rejection)) => {
                if self.repo.is_processed(entry.event_id).await? {
                    Err(OrchestratorError::Duplicate)
                } else {
                    Err(OrchestratorError::Rejected(rejection))
                }
            }
            other => other,
        }
    }

    async fn start_run(
        &self,
        actor: Actor,
        agg: BatchAggregate,
        start: StartRun,
        origin: RequestOrigin,
    ) -> Result<RunAccepted, OrchestratorError> {
        let batch_id = agg.batch.id;
        let correlation_id = origin
            .correlation
            .unwrap_or_else(|| CorrelationId::from_uuid(self.ids.new_id()));
        let StartRun {
            requested,
            done,
            is_retry,
            reason,
        } = start;
        let request = ResolveRequest {
            batch_id,
            requested,
            correlation_id,
            done,
        };
        let resolved = self.resolver.resolve(&request).await?;
        let run_id = RunId::from_uuid(self.ids.new_id());
        let input = Input::RequestPipeline {
            actor,
            requested,
            resolved,
            run_id,
            correlation_id,
            is_retry,
            reason,
            prompt_ref: origin.prompt_ref,
        };
        let after = match self.apply(batch_id, input, origin.inbox).await? {
            Applied::Changed { aggregate, .. } => aggregate,
            Applied::Duplicate => return Err(OrchestratorError::Duplicate),
        };
        let run = after.runs.iter().find(|r| r.id == run_id).ok_or_else(|| {
            RepositoryError::Corrupt(format!("run {run_id} missing after it was accepted"))
        })?;
        Ok(RunAccepted {
            run_id,
            correlation_id,
            phases: run.phases.iter().map(|p| p.phase).collect(),
            attempts: run.phases.iter().map(|p| (p.phase, p.attempt)).collect(),
            status: run.status,
        })
    }

    /// The event path: one consumed event (or relay report) applied to one batch.
    pub async fn handle(
        &self,
        batch_id: BatchId,
        input: Input,
        inbox: Option<InboxEntry>,
    ) -> Result<Applied, OrchestratorError> {
        self.apply(batch_id, input, inbox).await
    }

    /// The batch as `actor` may see it, for status reads (`BatchRepository::read`): someone else's batch is
    /// NotFound.
    pub async fn batch_for(
        &self,
        actor: &Actor,
        batch_id: BatchId,
    ) -> Result<BatchAggregate, OrchestratorError> {
        owned_by(self.repo.read(batch_id).await?, actor)
    }

    /// Like `batch_for`, but version-checked: the state checks before a unit of work must not see a cached
    /// state that trails another replica's commit.
    async fn checked_batch_for(
        &self,
        actor: &Actor,
        batch_id: BatchId,
    ) -> Result<BatchAggregate, OrchestratorError> {
        owned_by(self.repo.load(batch_id).await?, actor)
    }

    /// Fails every phase dispatched more than `timeout` ago (at most `limit` of them); returns how many failed. A
    /// phase that concluded meanwhile is refused by `decide` and not counted.
    pub async fn time_out_overdue(
        &self,
        timeout: Duration,
        limit: u32,
    ) -> Result<usize, OrchestratorError> {
        let now = self.clock.now();
        let Some(before) = chrono::Duration::from_std(timeout)
            .ok()
            .and_then(|t| now.checked_sub_signed(t))
        else {
            return Ok(0);
        };
        let overdue = self.repo.timed_out_phases(before, limit).await?;
        let mut failed = 0;
        for phase in overdue {
            let input = Input::PhaseTimedOut {
                phase: phase.phase,
                attempt: phase.attempt,
                timeout,
            };
            match self
                .repo
                .apply(unit(phase.batch_id, input, None), now)
                .await
            {
                Ok(Applied::Changed { .. }) => failed += 1,
                Ok(Applied::Duplicate) | Err(RepositoryError::Rejected(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(failed)
    }

    async fn apply(
        &self,
        batch_id: BatchId,
        input: Input,
        inbox: Option<InboxEntry>,
    ) -> Result<Applied, OrchestratorError> {
        let now = self.clock.now();
        Ok(self.repo.apply(unit(batch_id, input, inbox), now).await?)
    }
}

/// The origin with its prompt reference checked (a bad one is INVALID_ARGUMENT naming `prompt_ref`).
/// The batch if it exists and `actor` may see it: someone else's batch is NotFound.
fn owned_by(
    agg: Option<BatchAggregate>,
    actor: &Actor,
) -> Result<BatchAggregate, OrchestratorError> {
    let agg = agg.ok_or(Rejection::NotFound)?;
    check_owner(&agg.batch, actor)?;
    Ok(agg)
}

fn checked(origin: RequestOrigin) -> Result<RequestOrigin, OrchestratorError> {
    let prompt_ref = registration::prompt_ref(origin.prompt_ref).map_err(Rejection::Invalid)?;
    Ok(RequestOrigin {
        prompt_ref,
        ..origin
    })
}

fn unit(batch_id: BatchId, input: Input, inbox: Option<InboxEntry>) -> UnitOfWork {
    UnitOfWork {
        batch_id,
        input,
        inbox,
    }
}
