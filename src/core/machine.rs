//! `decide`: the batch state machine and the entry point of every state change.
//!
//! Which input may touch a batch in which status is data (`TRANSITIONS` and `rule`), checked before any handler
//! runs, so an illegal transition is always a typed rejection and never a silent overwrite (defect 2). The pipeline
//! run and the phase inputs live in `run`; how phases progress lives in `progress`.

use chrono::{DateTime, Utc};

use super::effect::{BatchEssaysRegistered, Effect, OutboundEvent};
use super::ids::{Attempt, EssayId, InvalidValue, PhaseName};
use super::initiators::{initiate, PhaseContext};
use super::input::{Actor, EssayRef, FailedEssay, Input, NewBatch, StudentAssociation};
use super::model::{Batch, BatchAggregate, BatchStatus, ClassType, Essay, EssayStatus, RunStatus};
use super::rejection::Rejection;
use super::run;

/// The outcome of `decide`: the whole new state and what to do once it is committed.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub aggregate: BatchAggregate,
    pub effects: Vec<Effect>,
}

impl Decision {
    /// Nothing to change and nothing to do.
    pub fn unchanged(aggregate: &BatchAggregate) -> Self {
        Self {
            aggregate: aggregate.clone(),
            effects: Vec::new(),
        }
    }
}

/// The kinds of `Input`, for the transition table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InputKind {
    Register,
    ContentProvisioned,
    StudentAssociationsConfirmed,
    EssaysReady,
    ValidationErrors,
    RequestPipeline,
    PhaseCommandDelivered,
    PhaseOutcome,
    PhaseTimedOut,
    Cancel,
}

impl InputKind {
    pub const ALL: [InputKind; 10] = [
        InputKind::Register,
        InputKind::ContentProvisioned,
        InputKind::StudentAssociationsConfirmed,
        InputKind::EssaysReady,
        InputKind::ValidationErrors,
        InputKind::RequestPipeline,
        InputKind::PhaseCommandDelivered,
        InputKind::PhaseOutcome,
        InputKind::PhaseTimedOut,
        InputKind::Cancel,
    ];

    pub fn of(input: &Input) -> Self {
        match input {
            Input::Register(_) => InputKind::Register,
            Input::ContentProvisioned { .. } => InputKind::ContentProvisioned,
            Input::StudentAssociationsConfirmed { .. } => InputKind::StudentAssociationsConfirmed,
            Input::EssaysReady { .. } => InputKind::EssaysReady,
            Input::ValidationErrors { .. } => InputKind::ValidationErrors,
            Input::RequestPipeline { .. } => InputKind::RequestPipeline,
            Input::PhaseCommandDelivered { .. } => InputKind::PhaseCommandDelivered,
            Input::PhaseOutcome { .. } => InputKind::PhaseOutcome,
            Input::PhaseTimedOut { .. } => InputKind::PhaseTimedOut,
            Input::Cancel { .. } => InputKind::Cancel,
        }
    }

    /// A short stable name for logs, metrics labels and rejections.
    pub fn as_str(self) -> &'static str {
        match self {
            InputKind::Register => "register",
            InputKind::ContentProvisioned => "content_provisioned",
            InputKind::StudentAssociationsConfirmed => "student_associations_confirmed",
            InputKind::EssaysReady => "essays_ready",
            InputKind::ValidationErrors => "validation_errors",
            InputKind::RequestPipeline => "request_pipeline",
            InputKind::PhaseCommandDelivered => "phase_command_delivered",
            InputKind::PhaseOutcome => "phase_outcome",
            InputKind::PhaseTimedOut => "phase_timed_out",
            InputKind::Cancel => "cancel",
        }
    }

    fn is_phase_input(self) -> bool {
        matches!(
            self,
            InputKind::PhaseOutcome | InputKind::PhaseTimedOut | InputKind::PhaseCommandDelivered
        )
    }
}

use BatchStatus as S;
use InputKind as K;

const NON_TERMINAL: [BatchStatus; 5] = [
    S::AwaitingContentValidation,
    S::AwaitingStudentValidation,
    S::StudentValidationCompleted,
    S::ReadyForPipelineExecution,
    S::ProcessingPipelines,
];

/// The legal (status, input) pairs of ARCHITECTURE §3 and the statuses each may land in. Validation errors and
/// cancel are legal in every non-terminal status (see `rule`).
pub const TRANSITIONS: &[(BatchStatus, InputKind, &[BatchStatus])] = &[
    (
        S::AwaitingContentValidation,
        K::ContentProvisioned,
        &[S::AwaitingStudentValidation, S::ReadyForPipelineExecution],
    ),
    (
        S::AwaitingStudentValidation,
        K::StudentAssociationsConfirmed,
        &[S::StudentValidationCompleted, S::ReadyForPipelineExecution],
    ),
    // An early essays-ready is kept on the batch and applied when the associations are confirmed (defect 9).
    (
        S::AwaitingStudentValidation,
        K::EssaysReady,
        &[S::AwaitingStudentValidation],
    ),
    (
        S::StudentValidationCompleted,
        K::EssaysReady,
        &[S::ReadyForPipelineExecution],
    ),
    // A request whose phases are all done completes at once and leaves the batch ready (defect 18).
    (
        S::ReadyForPipelineExecution,
        K::RequestPipeline,
        &[S::ProcessingPipelines, S::ReadyForPipelineExecution],
    ),
    (
        S::ProcessingPipelines,
        K::PhaseCommandDelivered,
        &[S::ProcessingPipelines],
    ),
    (
        S::ProcessingPipelines,
        K::PhaseOutcome,
        &[S::ProcessingPipelines, S::ReadyForPipelineExecution],
    ),
    (
        S::ProcessingPipelines,
        K::PhaseTimedOut,
        &[S::ProcessingPipelines, S::ReadyForPipelineExecution],
    ),
];

/// What the table says about one (status, input kind) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Allowed; the batch ends in one of these statuses.
    Legal(&'static [BatchStatus]),
    /// Accepted and ignored: a delivery report for a command whose run is over changes nothing.
    NoOp,
    Refuse(Refusal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    AlreadyExists,
    IllegalTransition,
    RunActive,
    NoActiveRun,
}

const STAY_OR_FAIL: [&[BatchStatus]; 5] = [
    &[S::AwaitingContentValidation, S::FailedCritically],
    &[S::AwaitingStudentValidation, S::FailedCritically],
    &[S::StudentValidationCompleted, S::FailedCritically],
    &[S::ReadyForPipelineExecution, S::FailedCritically],
    &[S::ProcessingPipelines, S::FailedCritically],
];

pub fn rule(from: BatchStatus, kind: InputKind) -> Rule {
    if kind == K::Register {
        return Rule::Refuse(Refusal::AlreadyExists);
    }
    if let Some((_, _, to)) = TRANSITIONS
        .iter()
        .find(|(s, k, _)| *s == from && *k == kind)
    {
        return Rule::Legal(to);
    }
    if let Some(i) = NON_TERMINAL.iter().position(|s| *s == from) {
        match kind {
            K::ValidationErrors => return Rule::Legal(STAY_OR_FAIL[i]),
            K::Cancel => return Rule::Legal(&[S::Cancelled]),
            _ => {}
        }
    }
    match kind {
        K::PhaseCommandDelivered => Rule::NoOp,
        k if k.is_phase_input() => Rule::Refuse(Refusal::NoActiveRun),
        K::RequestPipeline if from == S::ProcessingPipelines => Rule::Refuse(Refusal::RunActive),
        _ => Rule::Refuse(Refusal::IllegalTransition),
    }
}

/// Decides what `input` does to the batch. `state` is `None` only for a batch that does not exist yet. Pure: the
/// same arguments always give the same answer; ids and the resolved pipeline come in `input`.
pub fn decide(
    state: Option<&BatchAggregate>,
    input: &Input,
    now: DateTime<Utc>,
) -> Result<Decision, Rejection> {
    let current = match (state, input) {
        (None, Input::Register(new)) => return register(new, now),
        (None, _) => return Err(Rejection::NotFound),
        (Some(current), _) => current,
    };
    if let Input::RequestPipeline { actor, .. } | Input::Cancel { actor, .. } = input {
        check_owner(&current.batch, actor)?;
    }
    let from = current.batch.status;
    let kind = InputKind::of(input);
    match rule(from, kind) {
        Rule::NoOp => return Ok(Decision::unchanged(current)),
        Rule::Refuse(refusal) => return Err(refuse(current, refusal, kind)),
        Rule::Legal(_) => {}
    }
    let mut agg = current.clone();
    let mut effects = Vec::new();
    match input {
        Input::Register(_) => return Err(Rejection::AlreadyExists),
        Input::ContentProvisioned { essays, .. } => {
            content_provisioned(&mut agg, &mut effects, essays)?
        }
        Input::StudentAssociationsConfirmed { associations, .. } => {
            associations_confirmed(&mut agg, associations)?
        }
        Input::EssaysReady { essays, .. } => essays_ready(&mut agg, essays)?,
        Input::ValidationErrors { failed, critical } => {
            validation_errors(&mut agg, &mut effects, failed, *critical, now)?
        }
        Input::RequestPipeline { .. } => run::request_pipeline(&mut agg, &mut effects, input, now)?,
        Input::PhaseCommandDelivered { phase, attempt } => {
            run::command_delivered(&mut agg, *phase, *attempt)
        }
        Input::PhaseOutcome { .. } => run::phase_outcome(&mut agg, &mut effects, input, now)?,
        Input::PhaseTimedOut {
            phase,
            attempt,
            timeout,
        } => run::phase_timed_out(&mut agg, &mut effects, *phase, *attempt, *timeout, now)?,
        Input::Cancel { reason, .. } => cancel(&mut agg, &mut effects, reason.as_deref(), now),
    }
    if agg != *current {
        agg.batch.updated_at = now;
    }
    Ok(Decision {
        aggregate: agg,
        effects,
    })
}

/// Someone else's batch looks exactly like a missing one.
pub fn check_owner(batch: &Batch, actor: &Actor) -> Result<(), Rejection> {
    match actor {
        Actor::User(user) if *user != batch.owner => Err(Rejection::NotFound),
        _ => Ok(()),
    }
}

fn refuse(agg: &BatchAggregate, refusal: Refusal, kind: InputKind) -> Rejection {
    let illegal = Rejection::IllegalTransition {
        from: agg.batch.status,
        input: kind.as_str(),
    };
    match refusal {
        Refusal::AlreadyExists => Rejection::AlreadyExists,
        Refusal::IllegalTransition => illegal,
        Refusal::NoActiveRun => Rejection::NoActiveRun,
        Refusal::RunActive => match agg.active_run() {
            Some(run) => Rejection::RunActive { run_id: run.id },
            None => illegal,
        },
    }
}

fn register(new: &NewBatch, now: DateTime<Utc>) -> Result<Decision, Rejection> {
    let expected = u32::try_from(new.essay_ids.len())
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| InvalidValue::new("essay_ids", "a batch needs at least one essay"))?;
    let mut unique = new.essay_ids.clone();
    unique.sort();
    unique.dedup();
    if unique.len() != new.essay_ids.len() {
        return Err(InvalidValue::new("essay_ids", "essay ids must be unique").into());
    }
    let batch = Batch {
        id: new.batch_id,
        owner: new.owner.clone(),
        org_id: new.org_id.clone(),
        class_id: new.class_id.clone(),
        course_code: new.course_code,
        expected_essay_count: expected,
        student_prompt_ref: new.student_prompt_ref.clone(),
        assignment_id: new.assignment_id.clone(),
        cj_default_llm_model: new.cj_default_llm_model.clone(),
        cj_default_temperature: new.cj_default_temperature,
        status: S::AwaitingContentValidation,
        correlation_id: new.correlation_id,
        essays_ready_pending: false,
        status_reason: None,
        created_at: now,
        updated_at: now,
        version: 0,
    };
    let essays = new
        .essay_ids
        .iter()
        .map(|id| Essay {
            id: *id,
            text_ref: None,
            student_id: None,
            status: EssayStatus::Registered,
            validation_error: None,
        })
        .collect();
    let event = BatchEssaysRegistered {
        batch_id: batch.id,
        correlation_id: batch.correlation_id,
        expected_essay_count: expected,
        essay_ids: new.essay_ids.clone(),
        course_code: batch.course_code,
        student_prompt_ref: batch.student_prompt_ref.clone(),
        user_id: batch.owner.clone(),
        org_id: batch.org_id.clone(),
        class_id: batch.class_id.clone(),
    };
    Ok(Decision {
        aggregate: BatchAggregate {
            batch,
            essays,
            results: Vec::new(),
            runs: Vec::new(),
        },
        effects: vec![Effect::Publish(OutboundEvent::BatchEssaysRegistered(event))],
    })
}

/// Every id must name an essay of this batch; `field` is the payload field the ids came from.
fn check_members<'a>(
    agg: &BatchAggregate,
    field: &'static str,
    ids: impl IntoIterator<Item = &'a EssayId>,
) -> Result<(), Rejection> {
    for id in ids {
        if !agg.essays.iter().any(|e| e.id == *id) {
            return Err(InvalidValue::new(
                field,
                format!("essay {id} does not belong to the batch"),
            )
            .into());
        }
    }
    Ok(())
}

fn essay_mut(agg: &mut BatchAggregate, id: EssayId) -> Option<&mut Essay> {
    agg.essays.iter_mut().find(|e| e.id == id)
}

/// Sets the text of the listed essays and moves them to `status`; an essay that failed validation stays failed.
fn mark_essays(agg: &mut BatchAggregate, essays: &[EssayRef], status: EssayStatus) {
    for r in essays {
        if let Some(essay) = essay_mut(agg, r.essay_id) {
            essay.text_ref = Some(r.text_ref.clone());
            if essay.status != EssayStatus::ValidationFailed {
                essay.status = status;
            }
        }
    }
}

fn content_provisioned(
    agg: &mut BatchAggregate,
    effects: &mut Vec<Effect>,
    essays: &[EssayRef],
) -> Result<(), Rejection> {
    check_members(
        agg,
        "essays_for_processing",
        essays.iter().map(|e| &e.essay_id),
    )?;
    match agg.batch.class_type() {
        ClassType::Guest => {
            mark_essays(agg, essays, EssayStatus::Ready);
            agg.batch.status = S::ReadyForPipelineExecution;
        }
        ClassType::Regular => {
            mark_essays(agg, essays, EssayStatus::Provisioned);
            let to_match: Vec<EssayRef> = essays
                .iter()
                .filter(|r| {
                    agg.essays
                        .iter()
                        .any(|e| e.id == r.essay_id && e.status == EssayStatus::Provisioned)
                })
                .cloned()
                .collect();
            let ctx = PhaseContext {
                batch: &agg.batch,
                essays: &to_match,
                attempt: Attempt::FIRST,
                run_id: None,
                correlation_id: agg.batch.correlation_id,
            };
            let command = initiate(PhaseName::StudentMatching, &ctx)
                .map_err(|e| InvalidValue::new("class_id", e.to_string()))?;
            effects.push(Effect::Publish(OutboundEvent::PhaseCommand(command)));
            agg.batch.status = S::AwaitingStudentValidation;
        }
    }
    Ok(())
}

fn associations_confirmed(
    agg: &mut BatchAggregate,
    associations: &[StudentAssociation],
) -> Result<(), Rejection> {
    check_members(
        agg,
        "associations",
        associations.iter().map(|a| &a.essay_id),
    )?;
    for a in associations {
        if let Some(essay) = essay_mut(agg, a.essay_id) {
            essay.student_id = Some(a.student_id.clone());
        }
    }
    agg.batch.status = S::StudentValidationCompleted;
    if agg.batch.essays_ready_pending {
        agg.batch.essays_ready_pending = false;
        agg.batch.status = S::ReadyForPipelineExecution;
    }
    Ok(())
}

/// The ready essays become `Ready` at once, even when the event is early: the essay status remembers which essays
/// the event named, and `essays_ready_pending` remembers that the batch must move on once associations arrive.
fn essays_ready(agg: &mut BatchAggregate, essays: &[EssayRef]) -> Result<(), Rejection> {
    check_members(agg, "ready_essays", essays.iter().map(|e| &e.essay_id))?;
    mark_essays(agg, essays, EssayStatus::Ready);
    if agg.batch.status == S::AwaitingStudentValidation {
        agg.batch.essays_ready_pending = true;
    } else {
        agg.batch.status = S::ReadyForPipelineExecution;
    }
    Ok(())
}

/// Failed essays are never sent to a phase. A critical failure fails the batch; its active run (if any) ends
/// FAILED with its unfinished phases CANCELLED, since they were stopped rather than failed themselves.
fn validation_errors(
    agg: &mut BatchAggregate,
    effects: &mut Vec<Effect>,
    failed: &[FailedEssay],
    critical: bool,
    now: DateTime<Utc>,
) -> Result<(), Rejection> {
    check_members(agg, "failed_essays", failed.iter().map(|f| &f.essay_id))?;
    for f in failed {
        if let Some(essay) = essay_mut(agg, f.essay_id) {
            essay.status = EssayStatus::ValidationFailed;
            essay.validation_error = Some(f.error.clone());
        }
    }
    if critical {
        run::abort_active_run(agg, effects, RunStatus::Failed, now);
        agg.batch.status = S::FailedCritically;
        agg.batch.status_reason = Some(format!(
            "critical validation failure ({} essays failed)",
            failed.len()
        ));
    }
    Ok(())
}

/// Cancel ends the batch; an active run ends CANCELLED with its unfinished phases CANCELLED.
fn cancel(
    agg: &mut BatchAggregate,
    effects: &mut Vec<Effect>,
    reason: Option<&str>,
    now: DateTime<Utc>,
) {
    run::abort_active_run(agg, effects, RunStatus::Cancelled, now);
    agg.batch.status = S::Cancelled;
    agg.batch.status_reason = Some(reason.unwrap_or("cancelled").to_owned());
}
