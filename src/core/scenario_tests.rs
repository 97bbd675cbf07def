//! The flows of a batch, end to end through `decide`.

use std::time::Duration;

use super::effect::Effect;
use super::ids::{Attempt, PhaseName};
use super::input::{FailedEssay, Input};
use super::model::{BatchStatus, EssayStatus, PhaseStatus, RunStatus};
use super::rejection::Rejection;
use super::test_support::*;
use super::{decide, Decision};
use PhaseName::*;

/// Feeds the outcome for each command as it appears, with `fail(phase)` naming the essays that fail there.
fn run_to_end(
    mut d: Decision,
    fail: impl Fn(PhaseName) -> Vec<super::ids::EssayId>,
) -> (Decision, Vec<Effect>) {
    let mut all = d.effects.clone();
    let mut pending: Vec<_> = commands(&d.effects).into_iter().cloned().collect();
    while let Some(cmd) = pending.pop() {
        d = step(&d.aggregate, outcome_for(&cmd, &fail(cmd.phase)));
        pending.extend(commands(&d.effects).into_iter().cloned());
        all.extend(d.effects.clone());
    }
    (d, all)
}

#[test]
fn guest_spellcheck_only() {
    let agg = guest_aggregate();
    assert_eq!(agg.batch.status, BatchStatus::AwaitingContentValidation);
    let ready = step(&agg, provisioned(&agg));
    assert_eq!(
        ready.aggregate.batch.status,
        BatchStatus::ReadyForPipelineExecution
    );
    assert!(
        commands(&ready.effects).is_empty(),
        "a guest batch has no student matching"
    );

    let started = step(&ready.aggregate, request(&ready.aggregate, Spellcheck, 1));
    assert_eq!(
        started.aggregate.batch.status,
        BatchStatus::ProcessingPipelines
    );
    let cmds = commands(&started.effects);
    assert_eq!(cmds.len(), 1);
    assert_eq!(
        (cmds[0].phase, cmds[0].attempt),
        (Spellcheck, Attempt::FIRST)
    );
    assert_eq!(cmds[0].essays.len(), 3);
    assert_eq!(cmds[0].correlation_id, correlation(1));

    let delivered = step(
        &started.aggregate,
        Input::PhaseCommandDelivered {
            phase: Spellcheck,
            attempt: Attempt::FIRST,
        },
    );
    assert_eq!(
        delivered.aggregate.runs[0].phases[0].status,
        PhaseStatus::InProgress
    );

    let done = step(&delivered.aggregate, outcome_for(cmds[0], &[]));
    let run = &done.aggregate.runs[0];
    assert_eq!(run.status, RunStatus::CompletedSuccessfully);
    assert_eq!((run.successful_essay_count, run.failed_essay_count), (3, 0));
    assert_eq!(
        done.aggregate.batch.status,
        BatchStatus::ReadyForPipelineExecution
    );
    let completed = completions(&done.effects);
    assert_eq!(completed.len(), 1);
    assert_eq!(completed[0].completed_phases, vec![Spellcheck]);
    assert_eq!(
        (
            completed[0].successful_essay_count,
            completed[0].failed_essay_count
        ),
        (3, 0)
    );
    assert!(done
        .effects
        .iter()
        .any(|e| matches!(e, Effect::Notify(n) if n.phase == Spellcheck)));
}

#[test]
fn regular_through_student_matching_to_cj_assessment() {
    let agg = regular_aggregate();
    let provisioned_d = step(&agg, provisioned(&agg));
    assert_eq!(
        provisioned_d.aggregate.batch.status,
        BatchStatus::AwaitingStudentValidation
    );
    let matching = commands(&provisioned_d.effects);
    assert_eq!(matching.len(), 1);
    assert_eq!(matching[0].phase, StudentMatching);
    assert_eq!(matching[0].run_id, None);
    assert_eq!(matching[0].class_id, agg.batch.class_id);

    let confirmed = step(&provisioned_d.aggregate, associations(&agg));
    assert_eq!(
        confirmed.aggregate.batch.status,
        BatchStatus::StudentValidationCompleted
    );
    assert!(confirmed
        .aggregate
        .essays
        .iter()
        .all(|e| e.student_id.is_some()));
    let ready = step(&confirmed.aggregate, essays_ready(&agg));
    assert_eq!(
        ready.aggregate.batch.status,
        BatchStatus::ReadyForPipelineExecution
    );

    let started = step(&ready.aggregate, request(&ready.aggregate, CjAssessment, 1));
    let phases: Vec<_> = started.aggregate.runs[0]
        .phases
        .iter()
        .map(|p| (p.phase, p.status))
        .collect();
    assert_eq!(
        phases,
        vec![
            (Spellcheck, PhaseStatus::DispatchInitiated),
            (CjAssessment, PhaseStatus::PendingDependencies)
        ]
    );
    let (end, effects) = run_to_end(started, |_| vec![]);
    let cj = commands(&effects)
        .into_iter()
        .find(|c| c.phase == CjAssessment)
        .cloned()
        .unwrap();
    assert_eq!(cj.assignment_id.as_deref(), Some("assignment-1"));
    // CJ reads the spellchecked text, not the original (defect 8).
    assert!(cj
        .essays
        .iter()
        .all(|e| e.text_ref.as_str().starts_with("spellcheck-")));
    assert_eq!(
        end.aggregate.runs[0].status,
        RunStatus::CompletedSuccessfully
    );
    assert_eq!(
        end.aggregate.batch.status,
        BatchStatus::ReadyForPipelineExecution
    );
}

#[test]
fn ai_feedback_needs_nlp() {
    let agg = ready_guest();
    let started = step(&agg, request(&agg, AiFeedback, 1));
    let order: Vec<_> = started.aggregate.runs[0]
        .phases
        .iter()
        .map(|p| p.phase)
        .collect();
    assert_eq!(order, vec![Spellcheck, Nlp, AiFeedback]);
    let (end, effects) = run_to_end(started, |_| vec![]);
    let sent: Vec<_> = commands(&effects).iter().map(|c| c.phase).collect();
    assert_eq!(sent, vec![Spellcheck, Nlp, AiFeedback]);
    assert_eq!(
        end.aggregate.runs[0].status,
        RunStatus::CompletedSuccessfully
    );

    // A later ai_feedback-only request after spellcheck alone runs nlp first.
    let agg = ready_guest();
    let (sc, _) = run_to_end(step(&agg, request(&agg, Spellcheck, 1)), |_| vec![]);
    let second = step(&sc.aggregate, request(&sc.aggregate, AiFeedback, 2));
    let order: Vec<_> = second.aggregate.runs[1]
        .phases
        .iter()
        .map(|p| p.phase)
        .collect();
    assert_eq!(order, vec![Nlp, AiFeedback]);
    assert_eq!(commands(&second.effects)[0].phase, Nlp);
}

#[test]
fn partial_success_passes_only_succeeded_essays() {
    let agg = ready_guest();
    let bad = agg.essays[1].id;
    let started = step(&agg, request(&agg, CjAssessment, 1));
    let spell = commands(&started.effects)[0].clone();
    let after = step(&started.aggregate, outcome_for(&spell, &[bad]));
    let sc = &after.aggregate.runs[0].phases[0];
    assert_eq!(sc.status, PhaseStatus::CompletedWithPartialSuccess);
    assert_eq!(
        (sc.essays_total, sc.essays_succeeded, sc.essays_failed),
        (3, 2, 1)
    );
    let cj = commands(&after.effects)[0].clone();
    assert_eq!(cj.phase, CjAssessment);
    assert_eq!(cj.essays.len(), 2);
    assert!(cj.essays.iter().all(|e| e.essay_id != bad));

    let end = step(&after.aggregate, outcome_for(&cj, &[]));
    let run = &end.aggregate.runs[0];
    assert_eq!(run.status, RunStatus::CompletedWithFailures);
    assert_eq!((run.successful_essay_count, run.failed_essay_count), (2, 1));
}

#[test]
fn failure_mid_pipeline_skips_dependants() {
    let agg = ready_guest();
    let started = step(&agg, request(&agg, AiFeedback, 1));
    let spell = commands(&started.effects)[0].clone();
    let after_spell = step(&started.aggregate, outcome_for(&spell, &[]));
    let nlp = commands(&after_spell.effects)[0].clone();
    let end = step(&after_spell.aggregate, failed_outcome(&nlp));
    let statuses: Vec<_> = end.aggregate.runs[0]
        .phases
        .iter()
        .map(|p| p.status)
        .collect();
    assert_eq!(
        statuses,
        vec![
            PhaseStatus::CompletedSuccessfully,
            PhaseStatus::Failed,
            PhaseStatus::SkippedDueToDependencyFailure
        ]
    );
    let run = &end.aggregate.runs[0];
    assert_eq!(run.status, RunStatus::CompletedWithFailures);
    assert_eq!((run.successful_essay_count, run.failed_essay_count), (0, 3));
    assert_eq!(
        end.aggregate.batch.status,
        BatchStatus::ReadyForPipelineExecution
    );
    assert_eq!(completions(&end.effects).len(), 1);
    // Both concluded phases are announced.
    let notified: Vec<_> = end
        .effects
        .iter()
        .filter_map(|e| match e {
            Effect::Notify(n) => Some((n.phase, n.status)),
            _ => None,
        })
        .collect();
    assert_eq!(
        notified,
        vec![
            (Nlp, PhaseStatus::Failed),
            (AiFeedback, PhaseStatus::SkippedDueToDependencyFailure)
        ]
    );
}

#[test]
fn retry_of_failed_phase() {
    let agg = ready_guest();
    let started = step(&agg, request(&agg, Spellcheck, 1));
    let cmd = commands(&started.effects)[0].clone();
    let failed = step(&started.aggregate, failed_outcome(&cmd));
    assert_eq!(failed.aggregate.runs[0].status, RunStatus::Failed);

    // Not retryable: a phase that never ran, or by someone else.
    assert!(matches!(
        decide(
            Some(&failed.aggregate),
            &retry(&failed.aggregate, Nlp, 2),
            t(1)
        ),
        Err(Rejection::NotRetryable { phase: Nlp, .. })
    ));
    let mut foreign = retry(&failed.aggregate, Spellcheck, 2);
    if let Input::RequestPipeline { actor, .. } = &mut foreign {
        *actor = super::input::Actor::User(stranger());
    }
    assert_eq!(
        decide(Some(&failed.aggregate), &foreign, t(1)),
        Err(Rejection::NotFound)
    );

    let retried = step(&failed.aggregate, retry(&failed.aggregate, Spellcheck, 2));
    let run = &retried.aggregate.runs[1];
    assert!(run.is_retry);
    assert_eq!(run.phases[0].status, PhaseStatus::DispatchInitiated);
    let cmd2 = commands(&retried.effects)[0].clone();
    assert_eq!(cmd2.attempt, Attempt::FIRST.next());
    assert_eq!(cmd2.correlation_id, correlation(2));
    assert_eq!(cmd2.essays.len(), 3);

    // The old attempt's outcome is stale now.
    assert!(matches!(
        decide(Some(&retried.aggregate), &outcome_for(&cmd, &[]), t(2)),
        Err(Rejection::StaleAttempt { .. })
    ));
    let end = step(&retried.aggregate, outcome_for(&cmd2, &[]));
    assert_eq!(
        end.aggregate.runs[1].status,
        RunStatus::CompletedSuccessfully
    );
    assert!(completions(&end.effects)
        .iter()
        .all(|c| c.correlation_id == correlation(2)));

    // A completed phase is not retryable.
    assert!(matches!(
        decide(
            Some(&end.aggregate),
            &retry(&end.aggregate, Spellcheck, 3),
            t(3)
        ),
        Err(Rejection::NotRetryable { .. })
    ));
}

#[test]
fn retry_after_partial_success_sends_only_failed_essays() {
    let agg = ready_guest();
    let bad = agg.essays[2].id;
    let started = step(&agg, request(&agg, Spellcheck, 1));
    let cmd = commands(&started.effects)[0].clone();
    let partial = step(&started.aggregate, outcome_for(&cmd, &[bad]));
    let retried = step(&partial.aggregate, retry(&partial.aggregate, Spellcheck, 2));
    let cmd2 = commands(&retried.effects)[0].clone();
    assert_eq!(
        cmd2.essays.iter().map(|e| e.essay_id).collect::<Vec<_>>(),
        vec![bad]
    );
    let end = step(&retried.aggregate, outcome_for(&cmd2, &[]));
    let run = &end.aggregate.runs[1];
    assert_eq!((run.successful_essay_count, run.failed_essay_count), (1, 0));
}

#[test]
fn timeout_fails_phase() {
    let agg = ready_guest();
    let started = step(&agg, request(&agg, CjAssessment, 1));
    let timeout = Duration::from_secs(600);
    let too_early = Input::PhaseTimedOut {
        phase: Spellcheck,
        attempt: Attempt::FIRST,
        timeout,
    };
    assert!(matches!(
        decide(Some(&started.aggregate), &too_early, t(599)),
        Err(Rejection::IllegalPhaseTransition { .. })
    ));
    let stale = Input::PhaseTimedOut {
        phase: Spellcheck,
        attempt: Attempt::FIRST.next(),
        timeout,
    };
    assert!(matches!(
        decide(Some(&started.aggregate), &stale, t(700)),
        Err(Rejection::StaleAttempt { .. })
    ));

    let timed_out = step_at(&started.aggregate, too_early.clone(), 600);
    let run = &timed_out.aggregate.runs[0];
    assert_eq!(run.phases[0].status, PhaseStatus::Failed);
    assert_eq!(run.phases[0].error.as_deref(), Some("timeout"));
    assert_eq!(
        run.phases[1].status,
        PhaseStatus::SkippedDueToDependencyFailure
    );
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(
        completions(&timed_out.effects)[0].processing_duration,
        Duration::from_secs(600)
    );
    assert_eq!(
        timed_out.aggregate.batch.status,
        BatchStatus::ReadyForPipelineExecution
    );
    // The late outcome finds no run waiting for it.
    let cmd = commands(&started.effects)[0].clone();
    assert_eq!(
        decide(Some(&timed_out.aggregate), &outcome_for(&cmd, &[]), t(601)),
        Err(Rejection::NoActiveRun)
    );
}

#[test]
fn early_essays_ready_is_applied_later() {
    let agg = regular_aggregate();
    let awaiting = step(&agg, provisioned(&agg)).aggregate;
    let early = step(&awaiting, essays_ready(&agg));
    assert_eq!(
        early.aggregate.batch.status,
        BatchStatus::AwaitingStudentValidation
    );
    assert!(early.aggregate.batch.essays_ready_pending);
    let confirmed = step(&early.aggregate, associations(&agg));
    assert_eq!(
        confirmed.aggregate.batch.status,
        BatchStatus::ReadyForPipelineExecution
    );
    assert!(!confirmed.aggregate.batch.essays_ready_pending);
    assert!(confirmed
        .aggregate
        .essays
        .iter()
        .all(|e| e.status == EssayStatus::Ready));
}

#[test]
fn everything_done_completes_at_once() {
    let agg = ready_guest();
    let (done, _) = run_to_end(step(&agg, request(&agg, Spellcheck, 1)), |_| vec![]);
    let again = step(&done.aggregate, request(&done.aggregate, Spellcheck, 2));
    assert!(commands(&again.effects).is_empty());
    let run = &again.aggregate.runs[1];
    assert!(run.phases.is_empty());
    assert_eq!(run.status, RunStatus::CompletedSuccessfully);
    assert_eq!((run.successful_essay_count, run.failed_essay_count), (3, 0));
    assert_eq!(
        again.aggregate.batch.status,
        BatchStatus::ReadyForPipelineExecution
    );
    let completed = completions(&again.effects);
    assert_eq!(completed.len(), 1);
    assert_eq!(
        (
            completed[0].successful_essay_count,
            completed[0].final_status
        ),
        (3, RunStatus::CompletedSuccessfully)
    );
}

#[test]
fn request_while_running_is_rejected() {
    let agg = ready_guest();
    let started = step(&agg, request(&agg, Spellcheck, 1));
    let second = request(&started.aggregate, AiFeedback, 2);
    assert_eq!(
        decide(Some(&started.aggregate), &second, t(1)),
        Err(Rejection::RunActive { run_id: run_id(1) })
    );
    let mut foreign = second;
    if let Input::RequestPipeline { actor, .. } = &mut foreign {
        *actor = super::input::Actor::User(stranger());
    }
    assert_eq!(
        decide(Some(&started.aggregate), &foreign, t(1)),
        Err(Rejection::NotFound)
    );
}

#[test]
fn redelivered_provisioning_never_resets_a_batch() {
    let agg = ready_guest();
    let started = step(&agg, request(&agg, Spellcheck, 1));
    assert!(matches!(
        decide(Some(&started.aggregate), &provisioned(&agg), t(1)),
        Err(Rejection::IllegalTransition {
            from: BatchStatus::ProcessingPipelines,
            ..
        })
    ));
}

#[test]
fn critical_validation_failure_fails_batch_and_run() {
    let agg = ready_guest();
    let started = step(&agg, request(&agg, Nlp, 1));
    let input = Input::ValidationErrors {
        failed: vec![FailedEssay {
            essay_id: agg.essays[0].id,
            error: "empty".to_owned(),
        }],
        critical: true,
    };
    let failed = step(&started.aggregate, input);
    assert_eq!(failed.aggregate.batch.status, BatchStatus::FailedCritically);
    let run = &failed.aggregate.runs[0];
    assert_eq!(run.status, RunStatus::Failed);
    assert!(run
        .phases
        .iter()
        .all(|p| p.status == PhaseStatus::Cancelled));
    assert_eq!(
        failed.aggregate.essays[0].status,
        EssayStatus::ValidationFailed
    );
    assert_eq!(
        completions(&failed.effects)[0].final_status,
        RunStatus::Failed
    );
}

#[test]
fn outcomes_naming_foreign_essays_are_invalid() {
    let agg = ready_guest();
    let bad = agg.essays[0].id;
    let started = step(&agg, request(&agg, CjAssessment, 1));
    let spell = commands(&started.effects)[0].clone();
    let partial = step(&started.aggregate, outcome_for(&spell, &[bad]));
    let mut cj = commands(&partial.effects)[0].clone();
    cj.essays.push(super::input::EssayRef {
        essay_id: bad,
        text_ref: text("x"),
    });
    assert!(matches!(
        decide(Some(&partial.aggregate), &outcome_for(&cj, &[]), t(1)),
        Err(Rejection::Invalid(v)) if v.field == "processed_essays"
    ));
}
