//! How the phases of the active run progress: dispatching phases as their dependencies allow, skipping dependants
//! of a failed phase, telling the owner about every concluded phase, and ending the run with real counts.
//!
//! The essays a phase was sent are recorded as `EssayPhaseResult`s of the dispatched attempt with
//! `succeeded = false` at dispatch; the outcome overwrites them. So the phase's input is always known, and an essay
//! the outcome never mentions (or a timed-out attempt) counts as failed for that phase.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};

use super::effect::{Effect, Notification, OutboundEvent, PipelineCompleted};
use super::ids::{Attempt, CorrelationId, EssayId, InvalidValue, PhaseName, RunId, TextRef};
use super::initiators::{initiate, PhaseContext};
use super::input::EssayRef;
use super::model::{
    BatchAggregate, BatchStatus, EssayPhaseResult, EssayStatus, PhaseExecution, PhaseStatus,
    RunStatus,
};
use super::rejection::Rejection;

pub(crate) fn active_run_index(agg: &BatchAggregate) -> Option<usize> {
    agg.runs.iter().position(|r| r.status == RunStatus::Running)
}

/// The most recent execution of `phase` in any run.
pub fn latest_execution(agg: &BatchAggregate, phase: PhaseName) -> Option<&PhaseExecution> {
    agg.runs.iter().rev().find_map(|r| r.phase(phase))
}

/// The latest result of `phase` for one essay (there is at most one per essay and phase).
pub fn latest_result(
    agg: &BatchAggregate,
    essay: EssayId,
    phase: PhaseName,
) -> Option<&EssayPhaseResult> {
    agg.results
        .iter()
        .find(|r| r.essay_id == essay && r.phase == phase)
}

pub(crate) fn succeeded(agg: &BatchAggregate, essay: EssayId, phase: PhaseName) -> bool {
    latest_result(agg, essay, phase).is_some_and(|r| r.succeeded)
}

pub(crate) fn put_result(agg: &mut BatchAggregate, result: EssayPhaseResult) {
    match agg
        .results
        .iter_mut()
        .find(|r| r.essay_id == result.essay_id && r.phase == result.phase)
    {
        Some(slot) => *slot = result,
        None => agg.results.push(result),
    }
}

pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Rejection {
    InvalidValue::new(field, reason).into()
}

pub(crate) fn result(
    essay_id: EssayId,
    phase: PhaseName,
    run_id: RunId,
    attempt: Attempt,
    succeeded: bool,
    output_ref: Option<TextRef>,
) -> EssayPhaseResult {
    EssayPhaseResult {
        essay_id,
        phase,
        run_id,
        attempt,
        succeeded,
        output_ref,
    }
}

/// Moves a phase to a terminal status and tells the owner.
pub(crate) fn conclude(
    agg: &mut BatchAggregate,
    effects: &mut Vec<Effect>,
    ri: usize,
    pi: usize,
    status: PhaseStatus,
    error: Option<String>,
    now: DateTime<Utc>,
) {
    let correlation_id = agg.runs[ri].correlation_id;
    let p = &mut agg.runs[ri].phases[pi];
    p.status = status;
    p.error = error;
    p.completed_at = Some(now);
    // Whatever was sent and not reported processed did not succeed (timeouts, cancels, unmentioned essays).
    p.essays_failed = p.essays_total.saturating_sub(p.essays_succeeded);
    let phase = p.phase;
    effects.push(notification(agg, phase, status, correlation_id, now));
}

fn notification(
    agg: &BatchAggregate,
    phase: PhaseName,
    status: PhaseStatus,
    correlation_id: CorrelationId,
    now: DateTime<Utc>,
) -> Effect {
    Effect::Notify(Notification {
        user_id: agg.batch.owner.clone(),
        batch_id: agg.batch.id,
        phase,
        status,
        timestamp: now,
        correlation_id,
    })
}

/// Dispatches every waiting phase whose dependencies are satisfied, skips those behind a failed dependency, and
/// ends the run when every phase is terminal.
pub(crate) fn advance(
    agg: &mut BatchAggregate,
    effects: &mut Vec<Effect>,
    now: DateTime<Utc>,
) -> Result<(), Rejection> {
    let Some(ri) = active_run_index(agg) else {
        return Ok(());
    };
    loop {
        let mut progressed = false;
        for pi in 0..agg.runs[ri].phases.len() {
            let run = &agg.runs[ri];
            let p = &run.phases[pi];
            if !matches!(
                p.status,
                PhaseStatus::PendingDependencies | PhaseStatus::RequestedByUser
            ) {
                continue;
            }
            let in_run: Vec<(PhaseName, PhaseStatus)> = p
                .depends_on
                .iter()
                .filter_map(|d| run.phase(*d).map(|dp| (dp.phase, dp.status)))
                .collect();
            if let Some((dep, status)) = in_run
                .iter()
                .find(|(_, s)| s.is_terminal() && !s.counts_as_done())
            {
                let error = format!("dependency {dep} ended {}", status.as_str());
                conclude(
                    agg,
                    effects,
                    ri,
                    pi,
                    PhaseStatus::SkippedDueToDependencyFailure,
                    Some(error),
                    now,
                );
            } else if in_run.iter().all(|(_, s)| s.counts_as_done()) {
                dispatch(agg, effects, ri, pi, now)?;
            } else {
                continue;
            }
            progressed = true;
        }
        if !progressed {
            break;
        }
    }
    if agg.runs[ri].phases.iter().all(|p| p.status.is_terminal()) {
        finish_run(agg, effects, ri, now);
    }
    Ok(())
}

/// The essays a phase gets: ready essays that succeeded in every dependency, each with the text the latest
/// dependency produced (or the original). A retry after partial success sends only the essays that failed.
fn select_essays(agg: &BatchAggregate, ri: usize, pi: usize) -> Vec<EssayRef> {
    let run = &agg.runs[ri];
    let p = &run.phases[pi];
    let only_failed = run.is_retry
        && p.phase == run.requested_pipeline
        && agg.runs[..ri]
            .iter()
            .rev()
            .find_map(|r| r.phase(p.phase))
            .is_some_and(|prev| prev.status == PhaseStatus::CompletedWithPartialSuccess);
    agg.essays
        .iter()
        .filter(|e| e.status == EssayStatus::Ready)
        .filter(|e| p.depends_on.iter().all(|d| succeeded(agg, e.id, *d)))
        .filter(|e| !only_failed || latest_result(agg, e.id, p.phase).is_some_and(|r| !r.succeeded))
        .filter_map(|e| {
            let produced = p
                .depends_on
                .iter()
                .rev()
                .find_map(|d| latest_result(agg, e.id, *d).and_then(|r| r.output_ref.clone()));
            produced
                .or_else(|| e.text_ref.clone())
                .map(|text_ref| EssayRef {
                    essay_id: e.id,
                    text_ref,
                })
        })
        .collect()
}

fn dispatch(
    agg: &mut BatchAggregate,
    effects: &mut Vec<Effect>,
    ri: usize,
    pi: usize,
    now: DateTime<Utc>,
) -> Result<(), Rejection> {
    let essays = select_essays(agg, ri, pi);
    if essays.is_empty() {
        conclude(
            agg,
            effects,
            ri,
            pi,
            PhaseStatus::Failed,
            Some("no essays to process".to_owned()),
            now,
        );
        return Ok(());
    }
    let (run_id, correlation_id) = (agg.runs[ri].id, agg.runs[ri].correlation_id);
    let (phase, attempt) = (
        agg.runs[ri].phases[pi].phase,
        agg.runs[ri].phases[pi].attempt,
    );
    let ctx = PhaseContext {
        batch: &agg.batch,
        essays: &essays,
        attempt,
        run_id: Some(run_id),
        correlation_id,
    };
    let command =
        initiate(phase, &ctx).map_err(|e| invalid("requested_pipeline", e.to_string()))?;
    for e in &essays {
        put_result(agg, result(e.essay_id, phase, run_id, attempt, false, None));
    }
    let p = &mut agg.runs[ri].phases[pi];
    p.status = PhaseStatus::DispatchInitiated;
    p.dispatched_at = Some(now);
    p.essays_total = u32::try_from(essays.len()).unwrap_or(u32::MAX);
    effects.push(Effect::Publish(OutboundEvent::PhaseCommand(command)));
    Ok(())
}

/// Real counts (defect 6): of the essays the run sent anywhere, those the requested phase reported processed in this
/// run. A run that had nothing to do because everything was done counts the batch's ready essays by their latest
/// result for the requested phase.
fn run_counts(agg: &BatchAggregate, ri: usize) -> (u32, u32) {
    let run = &agg.runs[ri];
    let mut input: BTreeSet<EssayId> = agg
        .results
        .iter()
        .filter(|r| r.run_id == run.id)
        .map(|r| r.essay_id)
        .collect();
    if run.phases.is_empty() {
        input = agg
            .essays
            .iter()
            .filter(|e| e.status == EssayStatus::Ready)
            .map(|e| e.id)
            .collect();
    }
    let ok = input
        .iter()
        .filter(|id| {
            latest_result(agg, **id, run.requested_pipeline)
                .is_some_and(|r| r.succeeded && (run.phases.is_empty() || r.run_id == run.id))
        })
        .count();
    let to_u32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    (to_u32(ok), to_u32(input.len() - ok))
}

/// Ends the run (defects 1, 5): outcome from its phases, real counts, a completion event, batch ready again.
fn finish_run(agg: &mut BatchAggregate, effects: &mut Vec<Effect>, ri: usize, now: DateTime<Utc>) {
    let phases = &agg.runs[ri].phases;
    let status = if phases
        .iter()
        .all(|p| p.status == PhaseStatus::CompletedSuccessfully)
    {
        RunStatus::CompletedSuccessfully
    } else if !phases.iter().any(|p| p.status.counts_as_done()) {
        RunStatus::Failed
    } else {
        RunStatus::CompletedWithFailures
    };
    end_run(agg, effects, ri, status, now);
    if agg.batch.status == BatchStatus::ProcessingPipelines {
        agg.batch.status = BatchStatus::ReadyForPipelineExecution;
    }
}

/// Stops the active run (cancel, critical failure): unfinished phases CANCELLED (each announced), run ends with
/// `status` and a completion event with real counts. The caller sets the batch status.
pub(crate) fn abort_active_run(
    agg: &mut BatchAggregate,
    effects: &mut Vec<Effect>,
    status: RunStatus,
    now: DateTime<Utc>,
) {
    let Some(ri) = active_run_index(agg) else {
        return;
    };
    for pi in 0..agg.runs[ri].phases.len() {
        if !agg.runs[ri].phases[pi].status.is_terminal() {
            conclude(agg, effects, ri, pi, PhaseStatus::Cancelled, None, now);
        }
    }
    end_run(agg, effects, ri, status, now);
}

fn end_run(
    agg: &mut BatchAggregate,
    effects: &mut Vec<Effect>,
    ri: usize,
    status: RunStatus,
    now: DateTime<Utc>,
) {
    let (ok, failed) = run_counts(agg, ri);
    let batch_id = agg.batch.id;
    let run = &mut agg.runs[ri];
    run.status = status;
    run.ended_at = Some(now);
    run.successful_essay_count = ok;
    run.failed_essay_count = failed;
    let mut completed_phases: Vec<PhaseName> = run
        .phases
        .iter()
        .filter(|p| p.status.counts_as_done())
        .map(|p| p.phase)
        .collect();
    if run.phases.is_empty() {
        // Completed at once: the requested phase was already done.
        completed_phases.push(run.requested_pipeline);
    }
    let event = PipelineCompleted {
        batch_id,
        correlation_id: run.correlation_id,
        run_id: run.id,
        completed_phases,
        final_status: status,
        processing_duration: (now - run.started_at).to_std().unwrap_or_default(),
        successful_essay_count: ok,
        failed_essay_count: failed,
    };
    effects.push(Effect::Publish(OutboundEvent::PipelineCompleted(event)));
}
