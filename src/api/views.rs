//! Core values ↔ protobuf messages. Every enum mapping is an exhaustive match, so a new core variant is a
//! compile error here rather than a silently wrong answer.

use chrono::{DateTime, Utc};

use crate::core::ids::{CourseCode, InvalidValue, PhaseName};
use crate::core::model::{
    BatchAggregate, BatchStatus, ClassType, EssayStatus, PhaseExecution, PhaseStatus, PipelineRun,
    RunStatus,
};
use crate::proto::huleedu::bos::v1 as pb;
use crate::proto::huleedu::common::v1 as common;

/// The public view of a batch: its current run (the active one, else the latest) and the runs before it.
pub fn batch_view(aggregate: &BatchAggregate) -> pb::BatchView {
    let batch = &aggregate.batch;
    let current_index = aggregate
        .runs
        .iter()
        .position(|r| r.status == RunStatus::Running)
        .or_else(|| aggregate.runs.len().checked_sub(1));
    let current_run = current_index
        .and_then(|i| aggregate.runs.get(i))
        .map(run_view);
    let past_runs = aggregate
        .runs
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != current_index)
        .map(|(_, r)| run_view(r))
        .collect();
    let ready = aggregate
        .essays
        .iter()
        .filter(|e| e.status == EssayStatus::Ready)
        .count();
    pb::BatchView {
        batch_id: batch.id.to_string(),
        owner_user_id: batch.owner.to_string(),
        org_id: batch.org_id.as_ref().map(ToString::to_string),
        class_id: batch.class_id.as_ref().map(ToString::to_string),
        course_code: course_code(batch.course_code) as i32,
        status: batch_status(batch.status) as i32,
        expected_essay_count: count(batch.expected_essay_count),
        ready_essay_count: i32::try_from(ready).unwrap_or(i32::MAX),
        class_type: class_type(batch.class_type()) as i32,
        created_at: Some(timestamp(batch.created_at)),
        updated_at: Some(timestamp(batch.updated_at)),
        version: batch.version,
        current_run,
        past_runs,
    }
}

fn run_view(run: &PipelineRun) -> pb::PipelineRunView {
    pb::PipelineRunView {
        run_id: run.id.to_string(),
        requested_pipeline: phase_name(run.requested_pipeline) as i32,
        status: run_status(run.status) as i32,
        correlation_id: run.correlation_id.to_string(),
        started_at: Some(timestamp(run.started_at)),
        ended_at: run.ended_at.map(timestamp),
        phases: run.phases.iter().map(phase_view).collect(),
        successful_essay_count: count(run.successful_essay_count),
        failed_essay_count: count(run.failed_essay_count),
    }
}

fn phase_view(phase: &PhaseExecution) -> pb::PhaseView {
    pb::PhaseView {
        phase: phase_name(phase.phase) as i32,
        status: phase_status(phase.status) as i32,
        attempt: count(phase.attempt.get()),
        essays_total: count(phase.essays_total),
        essays_succeeded: count(phase.essays_succeeded),
        essays_failed: count(phase.essays_failed),
        dispatched_at: phase.dispatched_at.map(timestamp),
        completed_at: phase.completed_at.map(timestamp),
        error: phase.error.clone().unwrap_or_default(),
    }
}

fn count(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

pub fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

pub fn batch_status(status: BatchStatus) -> common::BatchStatus {
    match status {
        BatchStatus::AwaitingContentValidation => common::BatchStatus::AwaitingContentValidation,
        BatchStatus::AwaitingStudentValidation => common::BatchStatus::AwaitingStudentValidation,
        BatchStatus::StudentValidationCompleted => common::BatchStatus::StudentValidationCompleted,
        BatchStatus::ReadyForPipelineExecution => common::BatchStatus::ReadyForPipelineExecution,
        BatchStatus::ProcessingPipelines => common::BatchStatus::ProcessingPipelines,
        BatchStatus::FailedCritically => common::BatchStatus::FailedCritically,
        BatchStatus::Cancelled => common::BatchStatus::Cancelled,
    }
}

pub fn phase_status(status: PhaseStatus) -> common::PipelineExecutionStatus {
    use common::PipelineExecutionStatus as P;
    match status {
        PhaseStatus::PendingDependencies => P::PendingDependencies,
        PhaseStatus::DispatchInitiated => P::DispatchInitiated,
        PhaseStatus::InProgress => P::InProgress,
        PhaseStatus::CompletedSuccessfully => P::CompletedSuccessfully,
        PhaseStatus::CompletedWithPartialSuccess => P::CompletedWithPartialSuccess,
        PhaseStatus::Failed => P::Failed,
        PhaseStatus::SkippedDueToDependencyFailure => P::SkippedDueToDependencyFailure,
        PhaseStatus::RequestedByUser => P::RequestedByUser,
        PhaseStatus::Cancelled => P::Cancelled,
    }
}

pub fn run_status(status: RunStatus) -> common::PipelineRunStatus {
    use common::PipelineRunStatus as P;
    match status {
        RunStatus::Running => P::Running,
        RunStatus::CompletedSuccessfully => P::CompletedSuccessfully,
        RunStatus::CompletedWithFailures => P::CompletedWithFailures,
        RunStatus::Failed => P::Failed,
        RunStatus::Cancelled => P::Cancelled,
    }
}

pub fn class_type(class_type: ClassType) -> common::ClassType {
    match class_type {
        ClassType::Guest => common::ClassType::Guest,
        ClassType::Regular => common::ClassType::Regular,
    }
}

pub fn course_code(code: CourseCode) -> common::CourseCode {
    match code {
        CourseCode::Eng5 => common::CourseCode::Eng5,
        CourseCode::Eng6 => common::CourseCode::Eng6,
        CourseCode::Eng7 => common::CourseCode::Eng7,
        CourseCode::Sv1 => common::CourseCode::Sv1,
        CourseCode::Sv2 => common::CourseCode::Sv2,
        CourseCode::Sv3 => common::CourseCode::Sv3,
    }
}

/// The course code named by a wire value, as the text the core's registration validation parses. Unset and
/// unknown numbers become text the validation rejects (naming the field), so every violation is reported together.
pub fn course_code_text(raw: i32) -> String {
    match common::CourseCode::try_from(raw) {
        Ok(common::CourseCode::Eng5) => CourseCode::Eng5.as_str().to_owned(),
        Ok(common::CourseCode::Eng6) => CourseCode::Eng6.as_str().to_owned(),
        Ok(common::CourseCode::Eng7) => CourseCode::Eng7.as_str().to_owned(),
        Ok(common::CourseCode::Sv1) => CourseCode::Sv1.as_str().to_owned(),
        Ok(common::CourseCode::Sv2) => CourseCode::Sv2.as_str().to_owned(),
        Ok(common::CourseCode::Sv3) => CourseCode::Sv3.as_str().to_owned(),
        Ok(common::CourseCode::Unspecified) => String::new(),
        Err(_) => format!("#{raw}"),
    }
}

pub fn phase_name(phase: PhaseName) -> common::PhaseName {
    match phase {
        PhaseName::StudentMatching => common::PhaseName::StudentMatching,
        PhaseName::Spellcheck => common::PhaseName::Spellcheck,
        PhaseName::Nlp => common::PhaseName::Nlp,
        PhaseName::CjAssessment => common::PhaseName::CjAssessment,
        PhaseName::AiFeedback => common::PhaseName::AiFeedback,
    }
}

/// A phase named on the wire; `field` names the request field in the error.
pub fn parse_phase(field: &'static str, raw: i32) -> Result<PhaseName, InvalidValue> {
    match common::PhaseName::try_from(raw) {
        Ok(common::PhaseName::StudentMatching) => Ok(PhaseName::StudentMatching),
        Ok(common::PhaseName::Spellcheck) => Ok(PhaseName::Spellcheck),
        Ok(common::PhaseName::Nlp) => Ok(PhaseName::Nlp),
        Ok(common::PhaseName::CjAssessment) => Ok(PhaseName::CjAssessment),
        Ok(common::PhaseName::AiFeedback) => Ok(PhaseName::AiFeedback),
        Ok(common::PhaseName::Unspecified) => Err(InvalidValue::new(field, "must name a phase")),
        Err(_) => Err(InvalidValue::new(
            field,
            format!("unknown phase number {raw}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_phase_round_trips_through_the_wire_enum() {
        for phase in PhaseName::ALL {
            assert_eq!(parse_phase("phase", phase_name(phase) as i32), Ok(phase));
        }
        assert_eq!(parse_phase("phase", 0).map_err(|e| e.field), Err("phase"));
        assert_eq!(parse_phase("phase", 42).map_err(|e| e.field), Err("phase"));
    }

    #[test]
    fn course_codes_become_the_text_the_core_parses() {
        for code in CourseCode::ALL {
            assert_eq!(
                CourseCode::parse("course_code", &course_code_text(course_code(code) as i32)),
                Ok(code)
            );
        }
        assert!(CourseCode::parse("course_code", &course_code_text(0)).is_err());
        assert!(CourseCode::parse("course_code", &course_code_text(99)).is_err());
    }

    #[test]
    fn timestamps_keep_sub_second_precision() {
        let at = DateTime::from_timestamp(1_700_000_000, 123_000_000).unwrap_or_default();
        assert_eq!(
            timestamp(at),
            prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 123_000_000
            }
        );
    }
}
