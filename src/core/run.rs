//! Pipeline runs: starting a run for an accepted request, and the phase inputs (delivery reports, outcomes,
//! timeouts). How phases then progress (dispatch, skip, end of run) is in `progress`.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::effect::Effect;
use super::ids::{Attempt, EssayId, PhaseName};
use super::input::{Actor, Input, ReportedPhaseStatus};
use super::model::{
    BatchAggregate, BatchStatus, PhaseExecution, PhaseStatus, PipelineRun, RunStatus,
};
use super::progress::{
    active_run_index, advance, conclude, invalid, latest_execution, put_result, result,
};
use super::registration;
use super::rejection::Rejection;

pub(crate) use super::progress::abort_active_run;
pub use super::progress::latest_result;

/// Whether a retry of `phase` is allowed by the batch's history (not by ownership or run state).
pub fn check_retryable(agg: &BatchAggregate, phase: PhaseName) -> Result<(), Rejection> {
    let not = |reason: String| Rejection::NotRetryable { phase, reason };
    match latest_execution(agg, phase).map(|p| p.status) {
        None => Err(not("it has never run for this batch".to_owned())),
        Some(PhaseStatus::Failed | PhaseStatus::CompletedWithPartialSuccess) => Ok(()),
        Some(status) => Err(not(format!("its latest execution is {}", status.as_str()))),
    }
}

/// Starts a run for an accepted request. The resolved pipeline is checked, phases already done for the batch are
/// pruned (never the phase being retried), and every phase whose dependencies allow is dispatched at once.
pub(crate) fn request_pipeline(
    agg: &mut BatchAggregate,
    effects: &mut Vec<Effect>,
    input: &Input,
    now: DateTime<Utc>,
) -> Result<(), Rejection> {
    let Input::RequestPipeline {
        actor,
        requested,
        resolved,
        run_id,
        correlation_id,
        is_retry,
        prompt_ref,
        ..
    } = input
    else {
        return Ok(());
    };
    let requested = *requested;
    if !requested.is_pipeline_phase() {
        return Err(invalid(
            "requested_pipeline",
            format!("{requested} is not a pipeline phase"),
        ));
    }
    if *is_retry {
        if !matches!(actor, Actor::User(_)) {
            return Err(Rejection::NotRetryable {
                phase: requested,
                reason: "only the batch owner can retry a phase".to_owned(),
            });
        }
        check_retryable(agg, requested)?;
    }
    if agg.runs.iter().any(|r| r.id == *run_id) {
        return Err(invalid("run_id", format!("run {run_id} already exists")));
    }
    let done = agg.done_phases();
    let mut phases: Vec<PhaseExecution> = Vec::new();
    for resolved_phase in &resolved.phases {
        let phase = resolved_phase.phase;
        if !phase.is_pipeline_phase() || phases.iter().any(|p| p.phase == phase) {
            return Err(invalid(
                "resolved_pipeline",
                format!("{phase} is not a pipeline phase or is listed twice"),
            ));
        }
        let retried = *is_retry && phase == requested;
        if done.contains(&phase) && !retried {
            continue;
        }
        for dep in &resolved_phase.depends_on {
            if !done.contains(dep) && !phases.iter().any(|p| p.phase == *dep) {
                return Err(invalid(
                    "resolved_pipeline",
                    format!("{phase} depends on {dep}, which is neither done nor earlier in the pipeline"),
                ));
            }
        }
        phases.push(PhaseExecution {
            phase,
            status: if retried {
                PhaseStatus::RequestedByUser
            } else {
                PhaseStatus::PendingDependencies
            },
            // Fixed when the run is created: a phase is dispatched at most once per run.
            attempt: agg
                .last_attempt(phase)
                .map(Attempt::next)
                .unwrap_or(Attempt::FIRST),
            depends_on: resolved_phase.depends_on.clone(),
            essays_total: 0,
            essays_succeeded: 0,
            essays_failed: 0,
            dispatched_at: None,
            completed_at: None,
            error: None,
            version: 0,
        });
    }
    let requested_in_run = phases.iter().any(|p| p.phase == requested);
    if !requested_in_run && (*is_retry || !done.contains(&requested)) {
        return Err(invalid(
            "resolved_pipeline",
            format!("the resolved pipeline does not contain {requested}"),
        ));
    }
    agg.runs.push(PipelineRun {
        id: *run_id,
        requested_pipeline: requested,
        is_retry: *is_retry,
        status: RunStatus::Running,
        correlation_id: *correlation_id,
        phases,
        started_at: now,
        ended_at: None,
        successful_essay_count: 0,
        failed_essay_count: 0,
    });
    if let Some(prompt_ref) = registration::prompt_ref(prompt_ref.clone())? {
        agg.batch.student_prompt_ref = Some(prompt_ref);
    }
    agg.batch.status = BatchStatus::ProcessingPipelines;
    advance(agg, effects, now)
}

/// The relay delivered a command: DISPATCH_INITIATED → IN_PROGRESS for that attempt, nothing otherwise.
pub(crate) fn command_delivered(agg: &mut BatchAggregate, phase: PhaseName, attempt: Attempt) {
    let Some(ri) = active_run_index(agg) else {
        return;
    };
    if let Some(p) = agg.runs[ri].phases.iter_mut().find(|p| p.phase == phase) {
        if p.attempt == attempt && p.status == PhaseStatus::DispatchInitiated {
            p.status = PhaseStatus::InProgress;
        }
    }
}

/// Whether `input` can change nothing on `agg` nor on any later state of the batch, so that deciding it on a
/// stale copy is as good as deciding it on the stored state. So far one input is: a delivery report for an attempt
/// that has left DISPATCH_INITIATED (an outcome, a timeout, a cancellation or the report itself came first) or
/// whose run has ended. An attempt never returns to DISPATCH_INITIATED and an ended run never runs again (a retry
/// is a new attempt in a new run), so what holds here holds in every later state.
pub fn settled(agg: &BatchAggregate, input: &Input) -> bool {
    let Input::PhaseCommandDelivered { phase, attempt } = input else {
        return false;
    };
    agg.runs.iter().any(|run| {
        run.phases.iter().any(|p| {
            p.phase == *phase
                && p.attempt == *attempt
                && (run.status != RunStatus::Running
                    || !matches!(
                        p.status,
                        PhaseStatus::PendingDependencies
                            | PhaseStatus::RequestedByUser
                            | PhaseStatus::DispatchInitiated
                    ))
        })
    })
}

/// Finds the phase an outcome or timeout answers: active run, phase in it, current attempt, dispatched.
fn dispatched_phase(
    agg: &BatchAggregate,
    phase: PhaseName,
    attempt: Attempt,
    input: &'static str,
) -> Result<(usize, usize), Rejection> {
    let ri = active_run_index(agg).ok_or(Rejection::NoActiveRun)?;
    let pi = agg.runs[ri]
        .phases
        .iter()
        .position(|p| p.phase == phase)
        .ok_or(Rejection::UnknownPhase { phase })?;
    let current = &agg.runs[ri].phases[pi];
    if current.attempt != attempt {
        return Err(Rejection::StaleAttempt {
            phase,
            current: current.attempt,
            got: attempt,
        });
    }
    if !current.status.is_dispatched() {
        return Err(Rejection::IllegalPhaseTransition {
            phase,
            status: current.status,
            input,
        });
    }
    Ok((ri, pi))
}

/// The essays a dispatched attempt was sent (see the module comment).
fn phase_input(agg: &BatchAggregate, ri: usize, pi: usize) -> BTreeSet<EssayId> {
    let run = &agg.runs[ri];
    let p = &run.phases[pi];
    agg.results
        .iter()
        .filter(|r| r.phase == p.phase && r.run_id == run.id && r.attempt == p.attempt)
        .map(|r| r.essay_id)
        .collect()
}

pub(crate) fn phase_outcome(
    agg: &mut BatchAggregate,
    effects: &mut Vec<Effect>,
    input: &Input,
    now: DateTime<Utc>,
) -> Result<(), Rejection> {
    let Input::PhaseOutcome {
        phase,
        attempt,
        status,
        processed,
        failed,
    } = input
    else {
        return Ok(());
    };
    let (ri, pi) = dispatched_phase(agg, *phase, *attempt, "phase_outcome")?;
    let sent = phase_input(agg, ri, pi);
    let processed_ids: BTreeSet<EssayId> = processed.iter().map(|p| p.essay_id).collect();
    let failed_ids: BTreeSet<EssayId> = failed.iter().copied().collect();
    if let Some(id) = processed_ids.iter().find(|id| !sent.contains(id)) {
        return Err(invalid(
            "processed_essays",
            format!("essay {id} was not sent to {phase}"),
        ));
    }
    if let Some(id) = failed_ids.iter().find(|id| !sent.contains(id)) {
        return Err(invalid(
            "failed_essay_ids",
            format!("essay {id} was not sent to {phase}"),
        ));
    }
    if let Some(id) = failed_ids.intersection(&processed_ids).next() {
        return Err(invalid(
            "failed_essay_ids",
            format!("essay {id} is reported both processed and failed"),
        ));
    }
    let run_id = agg.runs[ri].id;
    for p in processed {
        put_result(
            agg,
            result(
                p.essay_id,
                *phase,
                run_id,
                *attempt,
                true,
                p.output_ref.clone(),
            ),
        );
    }
    for id in &failed_ids {
        put_result(agg, result(*id, *phase, run_id, *attempt, false, None));
    }
    let total = u32::try_from(sent.len()).unwrap_or(u32::MAX);
    let ok = u32::try_from(processed_ids.len()).unwrap_or(u32::MAX);
    let (new_status, error) = match status {
        ReportedPhaseStatus::FailedCritically => {
            (PhaseStatus::Failed, Some("the phase failed critically"))
        }
        _ if ok == 0 => (PhaseStatus::Failed, Some("no essay was processed")),
        // Essays the outcome does not mention are failures too: they were sent and did not come back (defect 4).
        ReportedPhaseStatus::CompletedWithFailures => {
            (PhaseStatus::CompletedWithPartialSuccess, None)
        }
        ReportedPhaseStatus::CompletedSuccessfully if ok < total => {
            (PhaseStatus::CompletedWithPartialSuccess, None)
        }
        ReportedPhaseStatus::CompletedSuccessfully => (PhaseStatus::CompletedSuccessfully, None),
    };
    agg.runs[ri].phases[pi].essays_succeeded = ok;
    conclude(
        agg,
        effects,
        ri,
        pi,
        new_status,
        error.map(str::to_owned),
        now,
    );
    advance(agg, effects, now)
}

/// A dispatched phase that outlived its timeout fails with reason `timeout`. Asked too early (the phase was
/// dispatched less than `timeout` ago) it is refused as an illegal phase transition.
pub(crate) fn phase_timed_out(
    agg: &mut BatchAggregate,
    effects: &mut Vec<Effect>,
    phase: PhaseName,
    attempt: Attempt,
    timeout: Duration,
    now: DateTime<Utc>,
) -> Result<(), Rejection> {
    let (ri, pi) = dispatched_phase(agg, phase, attempt, "phase_timed_out")?;
    let p = &agg.runs[ri].phases[pi];
    let overdue = match (p.dispatched_at, chrono::Duration::from_std(timeout)) {
        (Some(at), Ok(timeout)) => at
            .checked_add_signed(timeout)
            .is_some_and(|deadline| deadline <= now),
        _ => false,
    };
    if !overdue {
        return Err(Rejection::IllegalPhaseTransition {
            phase,
            status: p.status,
            input: "phase_timed_out",
        });
    }
    conclude(
        agg,
        effects,
        ri,
        pi,
        PhaseStatus::Failed,
        Some("timeout".to_owned()),
        now,
    );
    advance(agg, effects, now)
}
