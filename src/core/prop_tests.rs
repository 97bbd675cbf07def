//! Random event sequences (duplicated, reordered, stale attempts, interleaved retries, timeouts) through `decide`:
//! the state stays legal, no (phase, attempt) is ever commanded twice, counts are the reported ones, and a run that
//! gets all its outcomes ends.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use proptest::prelude::*;

use super::effect::{Effect, OutboundEvent, PhaseCommand};
use super::ids::{Attempt, EssayId, PhaseName, RunId};
use super::input::{Actor, FailedEssay, Input, ProcessedEssay, ReportedPhaseStatus};
use super::model::{BatchAggregate, BatchStatus, RunStatus};
use super::test_support::*;
use super::{decide, settled};

#[derive(Debug, Clone)]
enum Action {
    Provision,
    Associate,
    Ready,
    SoftInvalid(u8),
    Critical,
    Cancel,
    Request(u8),
    Retry(u8),
    Deliver(u8),
    Outcome { cmd: u8, fail_mask: u8, mode: u8 },
    TimeOut(u8),
    Replay(u8),
    Tick(u16),
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        10 => Just(Action::Provision),
        6 => Just(Action::Associate),
        10 => Just(Action::Ready),
        4 => any::<u8>().prop_map(Action::SoftInvalid),
        1 => Just(Action::Critical),
        1 => Just(Action::Cancel),
        25 => any::<u8>().prop_map(Action::Request),
        15 => any::<u8>().prop_map(Action::Retry),
        15 => any::<u8>().prop_map(Action::Deliver),
        70 => (any::<u8>(), any::<u8>(), 0u8..4).prop_map(|(cmd, fail_mask, mode)| Action::Outcome { cmd, fail_mask, mode }),
        10 => any::<u8>().prop_map(Action::TimeOut),
        15 => any::<u8>().prop_map(Action::Replay),
        10 => any::<u16>().prop_map(Action::Tick),
    ]
}

/// Everything observed along one sequence.
struct World {
    agg: BatchAggregate,
    now: i64,
    next_run: u128,
    inputs: Vec<Input>,
    commands: Vec<PhaseCommand>,
    commanded: HashSet<(PhaseName, Attempt)>,
    /// Essays each accepted outcome reported processed, per (run, phase).
    processed: BTreeMap<(RunId, PhaseName), BTreeSet<EssayId>>,
    completions: usize,
    /// Delivery reports `settled` said could change nothing from some state on.
    settled: Vec<Input>,
}

impl World {
    /// A batch just registered, or (`ready`) already through content, associations and readiness.
    fn new(regular: bool, ready: bool) -> Self {
        let mut agg = decide(None, &Input::Register(new_batch(regular, 4)), t(0))
            .unwrap()
            .aggregate;
        if ready {
            for make in [provisioned, associations, essays_ready] {
                let input = make(&agg);
                if let Ok(d) = decide(Some(&agg), &input, t(0)) {
                    agg = d.aggregate;
                }
            }
            assert_eq!(agg.batch.status, BatchStatus::ReadyForPipelineExecution);
        }
        Self {
            agg,
            now: 0,
            next_run: 0,
            inputs: Vec::new(),
            commands: Vec::new(),
            commanded: HashSet::new(),
            processed: BTreeMap::new(),
            completions: 0,
            settled: Vec::new(),
        }
    }

    fn input_for(&mut self, action: &Action) -> Option<Input> {
        let agg = &self.agg;
        let pick = |n: u8, len: usize| (len > 0).then(|| usize::from(n) % len);
        Some(match action {
            Action::Provision => provisioned(agg),
            Action::Associate => associations(agg),
            Action::Ready => essays_ready(agg),
            Action::SoftInvalid(n) => Input::ValidationErrors {
                failed: vec![FailedEssay {
                    essay_id: agg.essays[usize::from(*n) % agg.essays.len()].id,
                    error: "bad file".to_owned(),
                }],
                critical: false,
            },
            Action::Critical => Input::ValidationErrors {
                failed: vec![],
                critical: true,
            },
            Action::Cancel => Input::Cancel {
                actor: Actor::Internal,
                reason: None,
            },
            Action::Request(n) | Action::Retry(n) => {
                self.next_run += 1;
                let phase = PhaseName::PIPELINE[usize::from(*n) % 4];
                if matches!(action, Action::Retry(_)) {
                    retry(agg, phase, self.next_run)
                } else {
                    request(agg, phase, self.next_run)
                }
            }
            Action::Deliver(n) => {
                let cmd = &self.commands[pick(*n, self.commands.len())?];
                Input::PhaseCommandDelivered {
                    phase: cmd.phase,
                    attempt: cmd.attempt,
                }
            }
            Action::Outcome {
                cmd,
                fail_mask,
                mode,
            } => {
                let cmd = &self.commands[pick(*cmd, self.commands.len())?];
                outcome(cmd, *fail_mask, *mode)
            }
            Action::TimeOut(n) => {
                let cmd = &self.commands[pick(*n, self.commands.len())?];
                Input::PhaseTimedOut {
                    phase: cmd.phase,
                    attempt: cmd.attempt,
                    timeout: Duration::from_secs(300),
                }
            }
            Action::Replay(n) => self.inputs[pick(*n, self.inputs.len())?].clone(),
            Action::Tick(secs) => {
                self.now += i64::from(*secs);
                return None;
            }
        })
    }

    fn apply(&mut self, input: Input) {
        self.inputs.push(input.clone());
        let Ok(d) = decide(Some(&self.agg), &input, t(self.now)) else {
            return;
        };
        if let Input::PhaseOutcome {
            phase, processed, ..
        } = &input
        {
            // Accepted: it answered the active run's current attempt.
            let run = self.agg.active_run().map(|r| r.id).unwrap();
            let set = self.processed.entry((run, *phase)).or_default();
            *set = processed.iter().map(|p| p.essay_id).collect();
        }
        self.agg = d.aggregate;
        for effect in &d.effects {
            match effect {
                Effect::Publish(OutboundEvent::PhaseCommand(c)) => {
                    assert!(
                        self.commanded.insert((c.phase, c.attempt)),
                        "{} attempt {} commanded twice",
                        c.phase,
                        c.attempt
                    );
                    self.commands.push(c.clone());
                }
                Effect::Publish(OutboundEvent::PipelineCompleted(c)) => {
                    self.completions += 1;
                    let run = self.agg.runs.iter().find(|r| r.id == c.run_id).unwrap();
                    assert_eq!(
                        (c.successful_essay_count, c.failed_essay_count),
                        (run.successful_essay_count, run.failed_essay_count)
                    );
                    self.check_counts(c.run_id);
                }
                _ => {}
            }
        }
        check_invariants(&self.agg);
        self.check_settled();
    }

    /// A delivery report once settled changes nothing in this state nor in any later one (a unit decides it on a
    /// cached, possibly stale, copy of the batch without reading the stored state).
    fn check_settled(&mut self) {
        for input in &self.settled {
            if let Ok(d) = decide(Some(&self.agg), input, t(self.now)) {
                assert!(
                    d.aggregate == self.agg && d.effects.is_empty(),
                    "settled {input:?} changed the batch"
                );
            }
        }
        for cmd in &self.commands {
            let input = Input::PhaseCommandDelivered {
                phase: cmd.phase,
                attempt: cmd.attempt,
            };
            if settled(&self.agg, &input) && !self.settled.contains(&input) {
                self.settled.push(input);
            }
        }
    }

    /// The completion counts are the essays the requested phase reported processed in this run; the rest of the
    /// essays the run sent anywhere count as failed.
    fn check_counts(&self, run_id: RunId) {
        let run = self.agg.runs.iter().find(|r| r.id == run_id).unwrap();
        if run.phases.is_empty() {
            return;
        }
        let sent: BTreeSet<EssayId> = self
            .commands
            .iter()
            .filter(|c| c.run_id == Some(run_id))
            .flat_map(|c| c.essays.iter().map(|e| e.essay_id))
            .collect();
        let reported = self
            .processed
            .get(&(run_id, run.requested_pipeline))
            .map_or(0, BTreeSet::len);
        assert_eq!(
            run.successful_essay_count as usize, reported,
            "run {run_id}"
        );
        assert_eq!(
            (run.successful_essay_count + run.failed_essay_count) as usize,
            sent.len()
        );
    }

    /// Answers every dispatched phase of the active run until the run ends.
    fn drain(&mut self, fail_mask: u8) {
        for _ in 0..10 {
            let Some(run) = self.agg.active_run() else {
                return;
            };
            let run_id = run.id;
            let open: Vec<PhaseCommand> = self
                .commands
                .iter()
                .filter(|c| c.run_id == Some(run_id))
                .filter(|c| {
                    run.phase(c.phase)
                        .is_some_and(|p| p.attempt == c.attempt && p.status.is_dispatched())
                })
                .cloned()
                .collect();
            assert!(!open.is_empty(), "an active run waits for nothing: {run:?}");
            for cmd in open {
                self.apply(outcome(&cmd, fail_mask, 0));
            }
        }
        panic!("the run did not end after all its outcomes");
    }
}

fn outcome(cmd: &PhaseCommand, fail_mask: u8, mode: u8) -> Input {
    let fails = |i: usize| fail_mask & (1 << (i % 8)) != 0;
    let processed: Vec<ProcessedEssay> = cmd
        .essays
        .iter()
        .enumerate()
        .filter(|(i, _)| !fails(*i))
        .map(|(_, e)| ProcessedEssay {
            essay_id: e.essay_id,
            output_ref: Some(text(&format!(
                "{}-{}-{}",
                cmd.phase, cmd.attempt, e.essay_id
            ))),
        })
        .collect();
    let failed: Vec<EssayId> = cmd
        .essays
        .iter()
        .enumerate()
        .filter(|(i, _)| fails(*i))
        .map(|(_, e)| e.essay_id)
        .collect();
    let (status, failed) = match mode {
        1 => (ReportedPhaseStatus::FailedCritically, failed),
        2 => (ReportedPhaseStatus::CompletedSuccessfully, failed),
        // Failed essays left out of the report entirely.
        3 => (ReportedPhaseStatus::CompletedWithFailures, Vec::new()),
        _ if failed.is_empty() => (ReportedPhaseStatus::CompletedSuccessfully, failed),
        _ => (ReportedPhaseStatus::CompletedWithFailures, failed),
    };
    Input::PhaseOutcome {
        phase: cmd.phase,
        attempt: cmd.attempt,
        status,
        processed,
        failed,
    }
}

fn check_invariants(agg: &BatchAggregate) {
    let running = agg
        .runs
        .iter()
        .filter(|r| r.status == RunStatus::Running)
        .count();
    assert!(running <= 1, "{running} runs are running");
    assert_eq!(
        agg.batch.status == BatchStatus::ProcessingPipelines,
        running == 1,
        "{:?}",
        agg.batch.status
    );
    for run in &agg.runs {
        if run.status.is_terminal() {
            assert!(
                run.phases.iter().all(|p| p.status.is_terminal()),
                "ended run with open phases: {run:?}"
            );
            assert!(run.ended_at.is_some());
        } else {
            assert!(
                run.phases.iter().any(|p| !p.status.is_terminal()),
                "running run with nothing open"
            );
        }
        for p in &run.phases {
            if p.status.is_terminal() && p.essays_total > 0 {
                assert_eq!(
                    p.essays_succeeded + p.essays_failed,
                    p.essays_total,
                    "{p:?}"
                );
            }
            assert!(p.essays_succeeded <= p.essays_total);
        }
    }
    let mut pairs = BTreeSet::new();
    for r in &agg.results {
        assert!(
            pairs.insert((r.essay_id, r.phase)),
            "two results for one essay and phase"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn random_event_sequences_keep_the_batch_legal(
        regular in any::<bool>(),
        ready in proptest::bool::weighted(0.7),
        actions in proptest::collection::vec(action(), 1..80),
        final_mask in any::<u8>(),
    ) {
        let mut world = World::new(regular, ready);
        for action in &actions {
            if let Some(input) = world.input_for(action) {
                world.apply(input);
            }
        }
        world.drain(final_mask);
        prop_assert!(world.agg.active_run().is_none());
        prop_assert_ne!(world.agg.batch.status, BatchStatus::ProcessingPipelines);
        let ended = world.agg.runs.iter().filter(|r| r.status.is_terminal()).count();
        prop_assert_eq!(ended, world.completions, "every ended run announced its completion once");
    }
}
