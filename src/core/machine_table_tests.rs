//! Every (batch status, input kind) pair: legal ones land where ARCHITECTURE §3 says, every other one is refused
//! with the right rejection. The expectations below are written out from §3, independently of `TRANSITIONS`.

use std::time::Duration;

use super::decide;
use super::ids::{Attempt, PhaseName};
use super::input::{Actor, FailedEssay, Input, ProcessedEssay, ReportedPhaseStatus};
use super::machine::{rule, InputKind, Rule, TRANSITIONS};
use super::model::{BatchAggregate, BatchStatus};
use super::rejection::Rejection;
use super::test_support::*;
use BatchStatus as S;

/// A REGULAR batch in `status`, reached through `decide`.
fn batch_in(status: BatchStatus) -> BatchAggregate {
    let mut agg = regular_aggregate();
    let path: &[fn(&BatchAggregate) -> Input] = match status {
        S::AwaitingContentValidation => &[],
        S::AwaitingStudentValidation => &[provisioned],
        S::StudentValidationCompleted => &[provisioned, associations],
        S::ReadyForPipelineExecution => &[provisioned, associations, essays_ready],
        S::ProcessingPipelines => &[provisioned, associations, essays_ready, |a| {
            request(a, PhaseName::Spellcheck, 1)
        }],
        S::FailedCritically => &[provisioned, associations, essays_ready, |a| critical(a)],
        S::Cancelled => &[provisioned, associations, essays_ready, |_| Input::Cancel {
            actor: Actor::Internal,
            reason: None,
        }],
    };
    for make in path {
        let input = make(&agg);
        agg = step(&agg, input).aggregate;
    }
    assert_eq!(agg.batch.status, status);
    agg
}

fn critical(agg: &BatchAggregate) -> Input {
    Input::ValidationErrors {
        failed: vec![FailedEssay {
            essay_id: agg.essays[0].id,
            error: "unreadable".to_owned(),
        }],
        critical: true,
    }
}

/// Inputs of `kind` that would be accepted if the status allowed them.
fn samples(agg: &BatchAggregate, kind: InputKind) -> Vec<Input> {
    match kind {
        InputKind::Register => vec![Input::Register(new_batch(true, 3))],
        InputKind::ContentProvisioned => vec![provisioned(agg)],
        InputKind::StudentAssociationsConfirmed => vec![associations(agg)],
        InputKind::EssaysReady => vec![essays_ready(agg)],
        InputKind::ValidationErrors => {
            let mut soft = critical(agg);
            if let Input::ValidationErrors { critical, .. } = &mut soft {
                *critical = false;
            }
            vec![soft, critical(agg)]
        }
        InputKind::RequestPipeline => vec![request(agg, PhaseName::Spellcheck, 9)],
        InputKind::PhaseCommandDelivered => vec![Input::PhaseCommandDelivered {
            phase: PhaseName::Spellcheck,
            attempt: Attempt::FIRST,
        }],
        InputKind::PhaseOutcome => vec![Input::PhaseOutcome {
            phase: PhaseName::Spellcheck,
            attempt: Attempt::FIRST,
            status: ReportedPhaseStatus::CompletedSuccessfully,
            processed: agg
                .essays
                .iter()
                .map(|e| ProcessedEssay {
                    essay_id: e.id,
                    output_ref: None,
                })
                .collect(),
            failed: vec![],
        }],
        InputKind::PhaseTimedOut => vec![Input::PhaseTimedOut {
            phase: PhaseName::Spellcheck,
            attempt: Attempt::FIRST,
            timeout: Duration::ZERO,
        }],
        InputKind::Cancel => vec![Input::Cancel {
            actor: Actor::User(owner()),
            reason: Some("teacher cancelled".to_owned()),
        }],
    }
}

#[derive(Debug, PartialEq)]
enum Expect {
    Lands(BatchStatus),
    NoOp,
    Refused(Rejection),
}

/// §3 written out: where each sample lands (the critical validation sample is the second one).
fn expected(from: BatchStatus, input: &Input, agg: &BatchAggregate) -> Expect {
    use InputKind as K;
    let kind = InputKind::of(input);
    let non_terminal = !from.is_terminal();
    match (from, kind) {
        (_, K::Register) => Expect::Refused(Rejection::AlreadyExists),
        (S::AwaitingContentValidation, K::ContentProvisioned) => {
            Expect::Lands(S::AwaitingStudentValidation)
        }
        (S::AwaitingStudentValidation, K::StudentAssociationsConfirmed) => {
            Expect::Lands(S::StudentValidationCompleted)
        }
        (S::AwaitingStudentValidation, K::EssaysReady) => {
            Expect::Lands(S::AwaitingStudentValidation)
        }
        (S::StudentValidationCompleted, K::EssaysReady) => {
            Expect::Lands(S::ReadyForPipelineExecution)
        }
        (S::ReadyForPipelineExecution, K::RequestPipeline) => Expect::Lands(S::ProcessingPipelines),
        (S::ProcessingPipelines, K::RequestPipeline) => {
            Expect::Refused(Rejection::RunActive { run_id: run_id(1) })
        }
        (S::ProcessingPipelines, K::PhaseCommandDelivered) => Expect::Lands(S::ProcessingPipelines),
        (S::ProcessingPipelines, K::PhaseOutcome | K::PhaseTimedOut) => {
            Expect::Lands(S::ReadyForPipelineExecution)
        }
        (_, K::ValidationErrors) if non_terminal => match input {
            Input::ValidationErrors { critical: true, .. } => Expect::Lands(S::FailedCritically),
            _ => Expect::Lands(from),
        },
        (_, K::Cancel) if non_terminal => Expect::Lands(S::Cancelled),
        (_, K::PhaseCommandDelivered) => Expect::NoOp,
        (_, K::PhaseOutcome | K::PhaseTimedOut) => Expect::Refused(Rejection::NoActiveRun),
        _ => Expect::Refused(Rejection::IllegalTransition {
            from: agg.batch.status,
            input: kind.as_str(),
        }),
    }
}

#[test]
fn every_status_and_input_pair_follows_the_state_machine() {
    let mut checked = 0;
    for from in BatchStatus::ALL {
        let agg = batch_in(from);
        for kind in InputKind::ALL {
            for input in samples(&agg, kind) {
                let before = agg.clone();
                let got = match decide(Some(&agg), &input, t(10)) {
                    Ok(d) if d.aggregate == agg && d.effects.is_empty() => Expect::NoOp,
                    Ok(d) => Expect::Lands(d.aggregate.batch.status),
                    Err(r) => Expect::Refused(r),
                };
                let want = expected(from, &input, &agg);
                assert_eq!(got, want, "{} on {}", kind.as_str(), from.as_str());
                assert_eq!(agg, before);
                // The data table agrees with the outcome.
                match (&got, rule(from, kind)) {
                    (Expect::Lands(to), Rule::Legal(targets)) => {
                        assert!(targets.contains(to), "{from:?} {kind:?}")
                    }
                    (Expect::NoOp, Rule::NoOp) | (Expect::Refused(_), Rule::Refuse(_)) => {}
                    (got, rule) => {
                        panic!("{from:?} {kind:?}: got {got:?} but the table says {rule:?}")
                    }
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, BatchStatus::ALL.len() * (InputKind::ALL.len() + 1));
}

#[test]
fn a_guest_batch_is_ready_right_after_provisioning() {
    let agg = guest_aggregate();
    let d = step(&agg, provisioned(&agg));
    assert_eq!(d.aggregate.batch.status, S::ReadyForPipelineExecution);
    assert!(
        matches!(rule(S::AwaitingContentValidation, InputKind::ContentProvisioned), Rule::Legal(t) if t.contains(&S::ReadyForPipelineExecution))
    );
}

#[test]
fn inputs_for_a_missing_batch() {
    for kind in InputKind::ALL {
        for input in samples(&regular_aggregate(), kind) {
            let got = decide(None, &input, t(0));
            if kind == InputKind::Register {
                assert_eq!(
                    got.unwrap().aggregate.batch.status,
                    S::AwaitingContentValidation
                );
            } else {
                assert_eq!(got, Err(Rejection::NotFound), "{kind:?}");
            }
        }
    }
}

#[test]
fn the_table_only_names_non_terminal_sources() {
    for (from, _, to) in TRANSITIONS {
        assert!(!from.is_terminal());
        assert!(!to.is_empty());
    }
}

#[test]
fn foreign_users_see_nothing() {
    let agg = batch_in(S::ReadyForPipelineExecution);
    let cancel = Input::Cancel {
        actor: Actor::User(stranger()),
        reason: None,
    };
    assert_eq!(decide(Some(&agg), &cancel, t(1)), Err(Rejection::NotFound));
}

#[test]
fn changes_stamp_updated_at_and_never_touch_versions() {
    let mut agg = batch_in(S::ReadyForPipelineExecution);
    agg.batch.version = 7;
    let d = decide(Some(&agg), &request(&agg, PhaseName::Spellcheck, 2), t(50)).unwrap();
    assert_eq!(d.aggregate.batch.updated_at, t(50));
    assert_eq!(d.aggregate.batch.version, 7);
    assert!(d.aggregate.runs[0].phases.iter().all(|p| p.version == 0));
}

/// A delivery report is settled once its attempt left DISPATCH_INITIATED, never before, and never for an attempt
/// the batch has not dispatched.
#[test]
fn delivery_reports_settle_once_their_attempt_moved_on() {
    let ready = ready_guest();
    let started = step(&ready, request(&ready, PhaseName::Nlp, 1));
    let spellcheck = commands(&started.effects)[0].clone();
    let delivered = |phase, attempt| Input::PhaseCommandDelivered { phase, attempt };
    let report = delivered(spellcheck.phase, spellcheck.attempt);
    assert!(
        !super::settled(&started.aggregate, &report),
        "still DISPATCH_INITIATED"
    );
    let later_attempt = delivered(spellcheck.phase, Attempt::FIRST.next());
    assert!(
        !super::settled(&started.aggregate, &later_attempt),
        "never dispatched"
    );
    // nlp waits for spellcheck: not dispatched, so not settled either.
    let nlp = delivered(PhaseName::Nlp, Attempt::FIRST);
    assert!(!super::settled(&started.aggregate, &nlp));

    let in_progress = step(&started.aggregate, report.clone());
    assert!(super::settled(&in_progress.aggregate, &report));
    let completed = step(&started.aggregate, outcome_for(&spellcheck, &[]));
    assert!(
        super::settled(&completed.aggregate, &report),
        "the outcome came first"
    );
    assert!(
        !super::settled(&completed.aggregate, &nlp),
        "nlp is dispatched now"
    );
    assert!(!super::settled(
        &completed.aggregate,
        &Input::Cancel {
            actor: Actor::Internal,
            reason: None
        }
    ));
}
