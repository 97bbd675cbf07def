//! The batch aggregate: the state `decide` reads and returns. Adapters persist it row by row (no JSON blob); the
//! `version` fields are the compare-and-set tokens the store checks, and the core never changes them.

use chrono::{DateTime, Utc};

use super::ids::{
    Attempt, BatchId, ClassId, CorrelationId, CourseCode, EssayId, OrgId, PhaseName, RunId,
    TextRef, UserId,
};

/// Status of a batch (ARCHITECTURE §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BatchStatus {
    AwaitingContentValidation,
    AwaitingStudentValidation,
    StudentValidationCompleted,
    ReadyForPipelineExecution,
    ProcessingPipelines,
    FailedCritically,
    Cancelled,
}

impl BatchStatus {
    pub const ALL: [BatchStatus; 7] = [
        BatchStatus::AwaitingContentValidation,
        BatchStatus::AwaitingStudentValidation,
        BatchStatus::StudentValidationCompleted,
        BatchStatus::ReadyForPipelineExecution,
        BatchStatus::ProcessingPipelines,
        BatchStatus::FailedCritically,
        BatchStatus::Cancelled,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(self, BatchStatus::FailedCritically | BatchStatus::Cancelled)
    }
    /// Stable upper-case name; matches the protobuf enum value without its prefix and the database value.
    pub fn as_str(self) -> &'static str {
        match self {
            BatchStatus::AwaitingContentValidation => "AWAITING_CONTENT_VALIDATION",
            BatchStatus::AwaitingStudentValidation => "AWAITING_STUDENT_VALIDATION",
            BatchStatus::StudentValidationCompleted => "STUDENT_VALIDATION_COMPLETED",
            BatchStatus::ReadyForPipelineExecution => "READY_FOR_PIPELINE_EXECUTION",
            BatchStatus::ProcessingPipelines => "PROCESSING_PIPELINES",
            BatchStatus::FailedCritically => "FAILED_CRITICALLY",
            BatchStatus::Cancelled => "CANCELLED",
        }
    }
    pub fn from_str_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

/// Status of one phase inside one pipeline run (ARCHITECTURE §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PhaseStatus {
    PendingDependencies,
    DispatchInitiated,
    InProgress,
    CompletedSuccessfully,
    CompletedWithPartialSuccess,
    Failed,
    SkippedDueToDependencyFailure,
    RequestedByUser,
    Cancelled,
}

impl PhaseStatus {
    pub const ALL: [PhaseStatus; 9] = [
        PhaseStatus::PendingDependencies,
        PhaseStatus::DispatchInitiated,
        PhaseStatus::InProgress,
        PhaseStatus::CompletedSuccessfully,
        PhaseStatus::CompletedWithPartialSuccess,
        PhaseStatus::Failed,
        PhaseStatus::SkippedDueToDependencyFailure,
        PhaseStatus::RequestedByUser,
        PhaseStatus::Cancelled,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            PhaseStatus::CompletedSuccessfully
                | PhaseStatus::CompletedWithPartialSuccess
                | PhaseStatus::Failed
                | PhaseStatus::SkippedDueToDependencyFailure
                | PhaseStatus::Cancelled
        )
    }
    /// A phase that produced output for at least some essays counts as done for the batch: later pipelines skip it,
    /// and its failed essays can still be retried explicitly. One rule, used everywhere (defect 18).
    pub fn counts_as_done(self) -> bool {
        matches!(
            self,
            PhaseStatus::CompletedSuccessfully | PhaseStatus::CompletedWithPartialSuccess
        )
    }
    /// Waiting for an outcome from the service that runs the phase.
    pub fn is_dispatched(self) -> bool {
        matches!(
            self,
            PhaseStatus::DispatchInitiated | PhaseStatus::InProgress
        )
    }
    pub fn as_str(self) -> &'static str {
        match self {
            PhaseStatus::PendingDependencies => "PENDING_DEPENDENCIES",
            PhaseStatus::DispatchInitiated => "DISPATCH_INITIATED",
            PhaseStatus::InProgress => "IN_PROGRESS",
            PhaseStatus::CompletedSuccessfully => "COMPLETED_SUCCESSFULLY",
            PhaseStatus::CompletedWithPartialSuccess => "COMPLETED_WITH_PARTIAL_SUCCESS",
            PhaseStatus::Failed => "FAILED",
            PhaseStatus::SkippedDueToDependencyFailure => "SKIPPED_DUE_TO_DEPENDENCY_FAILURE",
            PhaseStatus::RequestedByUser => "REQUESTED_BY_USER",
            PhaseStatus::Cancelled => "CANCELLED",
        }
    }
    pub fn from_str_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

/// Outcome of a whole pipeline run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunStatus {
    Running,
    CompletedSuccessfully,
    CompletedWithFailures,
    Failed,
    Cancelled,
}

impl RunStatus {
    pub const ALL: [RunStatus; 5] = [
        RunStatus::Running,
        RunStatus::CompletedSuccessfully,
        RunStatus::CompletedWithFailures,
        RunStatus::Failed,
        RunStatus::Cancelled,
    ];
    pub fn is_terminal(self) -> bool {
        self != RunStatus::Running
    }
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "RUNNING",
            RunStatus::CompletedSuccessfully => "COMPLETED_SUCCESSFULLY",
            RunStatus::CompletedWithFailures => "COMPLETED_WITH_FAILURES",
            RunStatus::Failed => "FAILED",
            RunStatus::Cancelled => "CANCELLED",
        }
    }
    pub fn from_str_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

/// Where an essay stands before pipelines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EssayStatus {
    /// Id generated at registration, no content yet.
    Registered,
    /// Content provisioned (text reference known), not yet confirmed ready.
    Provisioned,
    /// Ready for pipelines.
    Ready,
    /// Rejected by content validation; never sent to a phase.
    ValidationFailed,
}

impl EssayStatus {
    pub const ALL: [EssayStatus; 4] = [
        EssayStatus::Registered,
        EssayStatus::Provisioned,
        EssayStatus::Ready,
        EssayStatus::ValidationFailed,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            EssayStatus::Registered => "REGISTERED",
            EssayStatus::Provisioned => "PROVISIONED",
            EssayStatus::Ready => "READY",
            EssayStatus::ValidationFailed => "VALIDATION_FAILED",
        }
    }
    pub fn from_str_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

/// REGULAR batches have a class (and go through student matching); GUEST batches do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClassType {
    Guest,
    Regular,
}

/// The batch row.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub id: BatchId,
    pub owner: UserId,
    pub org_id: Option<OrgId>,
    pub class_id: Option<ClassId>,
    pub course_code: CourseCode,
    pub expected_essay_count: u32,
    pub student_prompt_ref: Option<String>,
    pub assignment_id: Option<String>,
    pub cj_default_llm_model: Option<String>,
    pub cj_default_temperature: Option<f64>,
    pub status: BatchStatus,
    /// Correlation id of the registration; each pipeline run has its own.
    pub correlation_id: CorrelationId,
    /// An essays-ready event arrived before the student associations were confirmed; it is applied on arrival at
    /// STUDENT_VALIDATION_COMPLETED (defect 9).
    pub essays_ready_pending: bool,
    /// Why the batch failed critically or was cancelled.
    pub status_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// CAS token, owned by the store.
    pub version: i64,
}

impl Batch {
    pub fn class_type(&self) -> ClassType {
        if self.class_id.is_some() {
            ClassType::Regular
        } else {
            ClassType::Guest
        }
    }
}

/// One essay of a batch (unique per batch and essay).
#[derive(Debug, Clone, PartialEq)]
pub struct Essay {
    pub id: EssayId,
    /// Original text, known once content is provisioned.
    pub text_ref: Option<TextRef>,
    pub student_id: Option<String>,
    pub status: EssayStatus,
    pub validation_error: Option<String>,
}

/// The latest result of one phase for one essay: which attempt produced it and the output text it left
/// (defect 8: retries and later pipelines start from here, not from the original text). Written with
/// `succeeded = false` when the essay is sent to the phase and overwritten by the outcome, so the results of the
/// current attempt are exactly the phase's input, and an essay the outcome never mentions counts as failed.
#[derive(Debug, Clone, PartialEq)]
pub struct EssayPhaseResult {
    pub essay_id: EssayId,
    pub phase: PhaseName,
    pub run_id: RunId,
    pub attempt: Attempt,
    pub succeeded: bool,
    pub output_ref: Option<TextRef>,
}

/// One phase inside one run.
#[derive(Debug, Clone, PartialEq)]
pub struct PhaseExecution {
    pub phase: PhaseName,
    pub status: PhaseStatus,
    /// The attempt this execution dispatches: last attempt of the phase for the batch + 1, fixed when the run is
    /// created (a phase that is skipped or cancelled before dispatch leaves its number unused).
    pub attempt: Attempt,
    /// ALL of the phase's direct graph dependencies, including ones done in earlier runs (those count as
    /// satisfied). A dependency that is also in this run must end COMPLETED_SUCCESSFULLY or
    /// COMPLETED_WITH_PARTIAL_SUCCESS before this phase is dispatched; essays are selected by their results in all.
    pub depends_on: Vec<PhaseName>,
    pub essays_total: u32,
    pub essays_succeeded: u32,
    pub essays_failed: u32,
    pub dispatched_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
    /// CAS token, owned by the store.
    pub version: i64,
}

/// One accepted pipeline request (or retry) and its phases in dispatch order.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineRun {
    pub id: RunId,
    pub requested_pipeline: PhaseName,
    pub is_retry: bool,
    pub status: RunStatus,
    pub correlation_id: CorrelationId,
    pub phases: Vec<PhaseExecution>,
    pub started_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    /// Essays that made it through every phase of the run (filled when the run ends).
    pub successful_essay_count: u32,
    /// Essays the run started with that did not make it through.
    pub failed_essay_count: u32,
}

impl PipelineRun {
    pub fn phase(&self, name: PhaseName) -> Option<&PhaseExecution> {
        self.phases.iter().find(|p| p.phase == name)
    }
}

/// Everything `decide` needs about one batch.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchAggregate {
    pub batch: Batch,
    pub essays: Vec<Essay>,
    pub results: Vec<EssayPhaseResult>,
    /// Oldest first; at most one is `Running`.
    pub runs: Vec<PipelineRun>,
}

impl BatchAggregate {
    pub fn active_run(&self) -> Option<&PipelineRun> {
        self.runs.iter().find(|r| r.status == RunStatus::Running)
    }
    /// Phases done for the batch in any run (see `PhaseStatus::counts_as_done`).
    pub fn done_phases(&self) -> Vec<PhaseName> {
        let mut done: Vec<PhaseName> = self
            .runs
            .iter()
            .flat_map(|r| r.phases.iter())
            .filter(|p| p.status.counts_as_done())
            .map(|p| p.phase)
            .collect();
        done.sort();
        done.dedup();
        done
    }
    /// The highest attempt ever dispatched for a phase of this batch.
    pub fn last_attempt(&self, phase: PhaseName) -> Option<Attempt> {
        self.runs
            .iter()
            .flat_map(|r| r.phases.iter())
            .filter(|p| p.phase == phase)
            .map(|p| p.attempt)
            .max()
    }
}
