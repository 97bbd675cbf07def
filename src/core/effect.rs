//! What a decision asks the adapters to do after it commits: events and commands to publish (through the outbox,
//! in the same transaction) and notifications to send (after the commit, best effort).

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::ids::{
    Attempt, BatchId, ClassId, CorrelationId, CourseCode, EssayId, Language, OrgId, PhaseName,
    RunId, UserId,
};
use super::input::EssayRef;
use super::model::{ClassType, PhaseStatus, RunStatus};

#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    Publish(OutboundEvent),
    Notify(Notification),
}

/// An event or command for Kafka. The adapter picks the topic from the variant (and, for commands, the phase) and
/// keys every record by `batch_id`.
#[derive(Debug, Clone, PartialEq)]
pub enum OutboundEvent {
    BatchEssaysRegistered(BatchEssaysRegistered),
    PhaseCommand(PhaseCommand),
    PipelineCompleted(PipelineCompleted),
}

impl OutboundEvent {
    pub fn batch_id(&self) -> BatchId {
        match self {
            OutboundEvent::BatchEssaysRegistered(e) => e.batch_id,
            OutboundEvent::PhaseCommand(c) => c.batch_id,
            OutboundEvent::PipelineCompleted(c) => c.batch_id,
        }
    }
    pub fn correlation_id(&self) -> CorrelationId {
        match self {
            OutboundEvent::BatchEssaysRegistered(e) => e.correlation_id,
            OutboundEvent::PhaseCommand(c) => c.correlation_id,
            OutboundEvent::PipelineCompleted(c) => c.correlation_id,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BatchEssaysRegistered {
    pub batch_id: BatchId,
    pub correlation_id: CorrelationId,
    pub expected_essay_count: u32,
    pub essay_ids: Vec<EssayId>,
    pub course_code: CourseCode,
    pub student_prompt_ref: Option<String>,
    pub user_id: UserId,
    pub org_id: Option<OrgId>,
    pub class_id: Option<ClassId>,
}

/// The command that starts a phase (student matching or a pipeline phase). Built by the phase's initiator.
#[derive(Debug, Clone, PartialEq)]
pub struct PhaseCommand {
    pub batch_id: BatchId,
    pub correlation_id: CorrelationId,
    /// The run the phase belongs to; none for student matching, which precedes pipelines.
    pub run_id: Option<RunId>,
    pub phase: PhaseName,
    pub attempt: Attempt,
    pub language: Language,
    pub course_code: CourseCode,
    pub essays: Vec<EssayRef>,
    pub class_id: Option<ClassId>,
    pub class_type: ClassType,
    pub student_prompt_ref: Option<String>,
    pub assignment_id: Option<String>,
    pub cj_default_llm_model: Option<String>,
    pub cj_default_temperature: Option<f64>,
    pub owner: UserId,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PipelineCompleted {
    pub batch_id: BatchId,
    pub correlation_id: CorrelationId,
    pub run_id: RunId,
    pub completed_phases: Vec<PhaseName>,
    pub final_status: RunStatus,
    pub processing_duration: Duration,
    pub successful_essay_count: u32,
    pub failed_essay_count: u32,
}

/// A real-time update for the batch owner (`ws:{user_id}`, event `batch_phase_concluded`).
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub user_id: UserId,
    pub batch_id: BatchId,
    pub phase: PhaseName,
    pub status: PhaseStatus,
    pub timestamp: DateTime<Utc>,
    pub correlation_id: CorrelationId,
}
