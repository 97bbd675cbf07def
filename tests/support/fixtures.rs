//! Builders for the core's inputs, shaped like what the API and the consumers hand to the repository.

use bos::core::effect::{Effect, OutboundEvent, PhaseCommand};
use bos::core::graph::DependencyGraph;
use bos::core::ids::{
    BatchId, ClassId, CorrelationId, CourseCode, EssayId, EventId, PhaseName, RunId, TextRef,
    UserId,
};
use bos::core::input::{
    Actor, EssayRef, Input, NewBatch, ProcessedEssay, ReportedPhaseStatus, StudentAssociation,
};
use bos::core::model::BatchAggregate;
use bos::core::ports::{InboxEntry, UnitOfWork};
use uuid::Uuid;

pub fn user(name: &str) -> UserId {
    UserId::parse("user_id", name).unwrap()
}

pub fn text(s: &str) -> TextRef {
    TextRef::parse("text_ref", s).unwrap()
}

/// A new batch with fresh UUIDv7 ids; `regular` gives it a class (student matching follows provisioning).
pub fn new_batch(owner: &str, essays: usize, regular: bool) -> NewBatch {
    NewBatch {
        batch_id: BatchId::from_uuid(Uuid::now_v7()),
        correlation_id: CorrelationId::from_uuid(Uuid::now_v7()),
        owner: user(owner),
        org_id: None,
        class_id: regular.then(|| ClassId::parse("class_id", "class-9a").unwrap()),
        course_code: CourseCode::Eng5,
        essay_ids: (0..essays)
            .map(|_| EssayId::from_uuid(Uuid::now_v7()))
            .collect(),
        student_prompt_ref: Some("prompt-1".to_owned()),
        assignment_id: Some("assignment-1".to_owned()),
        cj_default_llm_model: Some("model-x".to_owned()),
        cj_default_temperature: Some(0.3),
    }
}

pub fn unit(batch_id: BatchId, input: Input) -> UnitOfWork {
    UnitOfWork {
        batch_id,
        input,
        inbox: None,
    }
}

/// A unit caused by a consumed event.
pub fn event_unit(batch_id: BatchId, input: Input, event_id: EventId, topic: &str) -> UnitOfWork {
    UnitOfWork {
        batch_id,
        input,
        inbox: Some(InboxEntry {
            event_id,
            topic: topic.to_owned(),
        }),
    }
}

pub fn register(new: &NewBatch) -> UnitOfWork {
    unit(new.batch_id, Input::Register(new.clone()))
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

/// A pipeline request resolved by the built-in graph.
pub fn request(agg: &BatchAggregate, phase: PhaseName) -> Input {
    Input::RequestPipeline {
        actor: Actor::User(agg.batch.owner.clone()),
        requested: phase,
        resolved: DependencyGraph::builtin()
            .resolve(phase, &agg.done_phases())
            .unwrap(),
        run_id: RunId::from_uuid(Uuid::now_v7()),
        correlation_id: CorrelationId::from_uuid(Uuid::now_v7()),
        is_retry: false,
        reason: None,
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

/// The outcome a phase service would send for `cmd`: every essay processed, with an output reference.
pub fn success_for(cmd: &PhaseCommand) -> Input {
    Input::PhaseOutcome {
        phase: cmd.phase,
        attempt: cmd.attempt,
        status: ReportedPhaseStatus::CompletedSuccessfully,
        processed: cmd
            .essays
            .iter()
            .map(|e| ProcessedEssay {
                essay_id: e.essay_id,
                output_ref: Some(text(&format!("{}-{}", cmd.phase, e.essay_id))),
            })
            .collect(),
        failed: Vec::new(),
    }
}
