//! Fixtures for the core's tests: batches built through `decide` itself, and inputs shaped like real events.

use chrono::{DateTime, TimeZone, Utc};
use uuid::Uuid;

use super::effect::{Effect, OutboundEvent, PhaseCommand, PipelineCompleted};
use super::graph::DependencyGraph;
use super::ids::{
    BatchId, ClassId, CorrelationId, CourseCode, EssayId, PhaseName, RunId, TextRef, UserId,
};
use super::input::{
    Actor, EssayRef, Input, NewBatch, ProcessedEssay, ReportedPhaseStatus, StudentAssociation,
};
use super::machine::{decide, Decision};
use super::model::BatchAggregate;

pub fn t(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_750_000_000 + secs, 0).single().unwrap()
}

pub fn owner() -> UserId {
    UserId::parse("user_id", "teacher-1").unwrap()
}

pub fn stranger() -> UserId {
    UserId::parse("user_id", "someone-else").unwrap()
}

pub fn essay_id(n: u128) -> EssayId {
    EssayId::from_uuid(Uuid::from_u128(0xE55A_0000 + n))
}

pub fn text(s: &str) -> TextRef {
    TextRef::parse("text_ref", s).unwrap()
}

pub fn new_batch(regular: bool, essays: u128) -> NewBatch {
    NewBatch {
        batch_id: BatchId::from_uuid(Uuid::from_u128(0xBA7C)),
        correlation_id: CorrelationId::from_uuid(Uuid::from_u128(0xC0)),
        owner: owner(),
        org_id: None,
        class_id: regular.then(|| ClassId::parse("class_id", "class-9a").unwrap()),
        course_code: CourseCode::Eng5,
        essay_ids: (1..=essays).map(essay_id).collect(),
        student_prompt_ref: Some("prompt-1".to_owned()),
        assignment_id: Some("assignment-1".to_owned()),
        cj_default_llm_model: Some("model-x".to_owned()),
        cj_default_temperature: Some(0.3),
    }
}

pub fn step(agg: &BatchAggregate, input: Input) -> Decision {
    decide(Some(agg), &input, t(0)).unwrap()
}

pub fn step_at(agg: &BatchAggregate, input: Input, secs: i64) -> Decision {
    decide(Some(agg), &input, t(secs)).unwrap()
}

pub fn guest_aggregate() -> BatchAggregate {
    decide(None, &Input::Register(new_batch(false, 3)), t(0))
        .unwrap()
        .aggregate
}

pub fn regular_aggregate() -> BatchAggregate {
    decide(None, &Input::Register(new_batch(true, 3)), t(0))
        .unwrap()
        .aggregate
}

pub fn refs(agg: &BatchAggregate, prefix: &str) -> Vec<EssayRef> {
    agg.essays
        .iter()
        .map(|e| EssayRef {
            essay_id: e.id,
            text_ref: text(&format!("{prefix}-{}", e.id)),
        })
        .collect()
}

pub fn provisioned(agg: &BatchAggregate) -> Input {
    let essays = refs(agg, "original");
    let n = u32::try_from(essays.len()).unwrap();
    Input::ContentProvisioned {
        essays,
        provisioned_count: n,
        expected_count: n,
    }
}

pub fn associations(agg: &BatchAggregate) -> Input {
    Input::StudentAssociationsConfirmed {
        associations: agg
            .essays
            .iter()
            .map(|e| StudentAssociation {
                essay_id: e.id,
                student_id: format!("student-{}", e.id),
            })
            .collect(),
        timeout_triggered: false,
    }
}

pub fn essays_ready(agg: &BatchAggregate) -> Input {
    Input::EssaysReady {
        essays: refs(agg, "original"),
        class_type: None,
    }
}

pub fn ready_guest() -> BatchAggregate {
    let agg = guest_aggregate();
    step(&agg, provisioned(&agg)).aggregate
}

pub fn run_id(n: u128) -> RunId {
    RunId::from_uuid(Uuid::from_u128(0x2000 + n))
}

pub fn correlation(n: u128) -> CorrelationId {
    CorrelationId::from_uuid(Uuid::from_u128(0x3000 + n))
}

/// A request resolved by the built-in graph, as the orchestrator would build it.
pub fn request(agg: &BatchAggregate, phase: PhaseName, n: u128) -> Input {
    Input::RequestPipeline {
        actor: Actor::User(owner()),
        requested: phase,
        resolved: DependencyGraph::builtin()
            .resolve(phase, &agg.done_phases())
            .unwrap(),
        run_id: run_id(n),
        correlation_id: correlation(n),
        is_retry: false,
        reason: None,
        prompt_ref: None,
    }
}

pub fn retry(agg: &BatchAggregate, phase: PhaseName, n: u128) -> Input {
    let done: Vec<PhaseName> = agg
        .done_phases()
        .into_iter()
        .filter(|p| *p != phase)
        .collect();
    Input::RequestPipeline {
        actor: Actor::User(owner()),
        requested: phase,
        resolved: DependencyGraph::builtin().resolve(phase, &done).unwrap(),
        run_id: run_id(n),
        correlation_id: correlation(n),
        is_retry: true,
        reason: Some("try again".to_owned()),
        prompt_ref: None,
    }
}

pub fn commands(effects: &[Effect]) -> Vec<&PhaseCommand> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Publish(OutboundEvent::PhaseCommand(c)) => Some(c),
            _ => None,
        })
        .collect()
}

pub fn completions(effects: &[Effect]) -> Vec<&PipelineCompleted> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Publish(OutboundEvent::PipelineCompleted(c)) => Some(c),
            _ => None,
        })
        .collect()
}

/// The outcome a phase service would send for `cmd`: essays in `fail` failed, the rest processed with an output.
pub fn outcome_for(cmd: &PhaseCommand, fail: &[EssayId]) -> Input {
    let processed: Vec<ProcessedEssay> = cmd
        .essays
        .iter()
        .filter(|e| !fail.contains(&e.essay_id))
        .map(|e| ProcessedEssay {
            essay_id: e.essay_id,
            output_ref: Some(text(&format!("{}-{}", cmd.phase, e.essay_id))),
        })
        .collect();
    let failed: Vec<EssayId> = cmd
        .essays
        .iter()
        .map(|e| e.essay_id)
        .filter(|id| fail.contains(id))
        .collect();
    Input::PhaseOutcome {
        phase: cmd.phase,
        attempt: cmd.attempt,
        status: if failed.is_empty() {
            ReportedPhaseStatus::CompletedSuccessfully
        } else {
            ReportedPhaseStatus::CompletedWithFailures
        },
        processed,
        failed,
    }
}

pub fn failed_outcome(cmd: &PhaseCommand) -> Input {
    Input::PhaseOutcome {
        phase: cmd.phase,
        attempt: cmd.attempt,
        status: ReportedPhaseStatus::FailedCritically,
        processed: Vec::new(),
        failed: cmd.essays.iter().map(|e| e.essay_id).collect(),
    }
}
