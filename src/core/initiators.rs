//! Phase initiators: one entry per phase turning the batch context into the command that starts the phase. Adding a
//! phase is adding an entry to `INITIATORS`; the coordinator does not change.

use super::effect::PhaseCommand;
use super::ids::{Attempt, CorrelationId, PhaseName, RunId};
use super::input::EssayRef;
use super::model::Batch;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InitiatorError {
    #[error("student matching needs a class, and batch has none")]
    MissingClass,
    #[error("no initiator is registered for phase {0}")]
    NoInitiator(PhaseName),
}

/// What an initiator gets: the batch, the essays to send (with the text each should start from) and the dispatch.
#[derive(Debug, Clone, Copy)]
pub struct PhaseContext<'a> {
    pub batch: &'a Batch,
    pub essays: &'a [EssayRef],
    pub attempt: Attempt,
    pub run_id: Option<RunId>,
    pub correlation_id: CorrelationId,
}

pub type Initiator = fn(&PhaseContext<'_>) -> Result<PhaseCommand, InitiatorError>;

/// The phase table.
pub const INITIATORS: &[(PhaseName, Initiator)] = &[
    (PhaseName::StudentMatching, student_matching),
    (PhaseName::Spellcheck, spellcheck),
    (PhaseName::Nlp, nlp),
    (PhaseName::CjAssessment, cj_assessment),
    (PhaseName::AiFeedback, ai_feedback),
];

pub fn initiator(phase: PhaseName) -> Option<Initiator> {
    INITIATORS
        .iter()
        .find(|(p, _)| *p == phase)
        .map(|(_, f)| *f)
}

/// Builds the command for `phase` with its registered initiator.
pub fn initiate(phase: PhaseName, ctx: &PhaseContext<'_>) -> Result<PhaseCommand, InitiatorError> {
    let build = initiator(phase).ok_or(InitiatorError::NoInitiator(phase))?;
    build(ctx)
}

/// The fields every command carries; phase-specific ones start empty.
fn base(phase: PhaseName, ctx: &PhaseContext<'_>) -> PhaseCommand {
    let batch = ctx.batch;
    PhaseCommand {
        batch_id: batch.id,
        correlation_id: ctx.correlation_id,
        run_id: ctx.run_id,
        phase,
        attempt: ctx.attempt,
        language: batch.course_code.language(),
        course_code: batch.course_code,
        essays: ctx.essays.to_vec(),
        class_id: None,
        class_type: batch.class_type(),
        student_prompt_ref: None,
        assignment_id: None,
        cj_default_llm_model: None,
        cj_default_temperature: None,
        owner: batch.owner.clone(),
    }
}

fn student_matching(ctx: &PhaseContext<'_>) -> Result<PhaseCommand, InitiatorError> {
    let class_id = ctx
        .batch
        .class_id
        .clone()
        .ok_or(InitiatorError::MissingClass)?;
    Ok(PhaseCommand {
        class_id: Some(class_id),
        ..base(PhaseName::StudentMatching, ctx)
    })
}

fn spellcheck(ctx: &PhaseContext<'_>) -> Result<PhaseCommand, InitiatorError> {
    Ok(base(PhaseName::Spellcheck, ctx))
}

fn nlp(ctx: &PhaseContext<'_>) -> Result<PhaseCommand, InitiatorError> {
    Ok(PhaseCommand {
        student_prompt_ref: ctx.batch.student_prompt_ref.clone(),
        ..base(PhaseName::Nlp, ctx)
    })
}

fn cj_assessment(ctx: &PhaseContext<'_>) -> Result<PhaseCommand, InitiatorError> {
    let batch = ctx.batch;
    Ok(PhaseCommand {
        student_prompt_ref: batch.student_prompt_ref.clone(),
        assignment_id: batch.assignment_id.clone(),
        cj_default_llm_model: batch.cj_default_llm_model.clone(),
        cj_default_temperature: batch.cj_default_temperature,
        ..base(PhaseName::CjAssessment, ctx)
    })
}

fn ai_feedback(ctx: &PhaseContext<'_>) -> Result<PhaseCommand, InitiatorError> {
    Ok(PhaseCommand {
        student_prompt_ref: ctx.batch.student_prompt_ref.clone(),
        assignment_id: ctx.batch.assignment_id.clone(),
        ..base(PhaseName::AiFeedback, ctx)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::test_support::{guest_aggregate, regular_aggregate};

    #[test]
    fn every_phase_has_exactly_one_initiator() {
        for phase in PhaseName::ALL {
            assert_eq!(
                INITIATORS.iter().filter(|(p, _)| *p == phase).count(),
                1,
                "{phase}"
            );
        }
    }

    #[test]
    fn student_matching_requires_a_class() {
        let guest = guest_aggregate();
        let ctx = PhaseContext {
            batch: &guest.batch,
            essays: &[],
            attempt: Attempt::FIRST,
            run_id: None,
            correlation_id: guest.batch.correlation_id,
        };
        assert_eq!(
            initiate(PhaseName::StudentMatching, &ctx),
            Err(InitiatorError::MissingClass)
        );

        let regular = regular_aggregate();
        let ctx = PhaseContext {
            batch: &regular.batch,
            ..ctx
        };
        let cmd = initiate(PhaseName::StudentMatching, &ctx).unwrap();
        assert_eq!(cmd.class_id, regular.batch.class_id);
        assert_eq!(cmd.language, regular.batch.course_code.language());
    }

    #[test]
    fn cj_assessment_carries_the_assignment_and_model_settings() {
        let agg = regular_aggregate();
        let ctx = PhaseContext {
            batch: &agg.batch,
            essays: &[],
            attempt: Attempt::FIRST.next(),
            run_id: None,
            correlation_id: agg.batch.correlation_id,
        };
        let cmd = initiate(PhaseName::CjAssessment, &ctx).unwrap();
        assert_eq!(cmd.assignment_id, agg.batch.assignment_id);
        assert_eq!(cmd.cj_default_temperature, agg.batch.cj_default_temperature);
        assert_eq!(cmd.attempt.get(), 2);
        assert_eq!(
            initiate(PhaseName::Spellcheck, &ctx).unwrap().assignment_id,
            None
        );
    }
}
