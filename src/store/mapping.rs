//! Rows ↔ the core's aggregate. Reading validates every stored value (an enum name the core does not know is
//! corruption, not a default); writing turns counts into the column types and refuses values that do not fit.

use std::collections::HashMap;

use uuid::Uuid;

use super::entities::{
    batch_essays, batches, essay_phase_results, phase_executions, pipeline_runs,
};
use crate::core::ids::{
    Attempt, BatchId, ClassId, CorrelationId, CourseCode, EssayId, OrgId, PhaseName, RunId,
    TextRef, UserId,
};
use crate::core::model::{
    Batch, BatchAggregate, BatchStatus, Essay, EssayPhaseResult, EssayStatus, PhaseExecution,
    PhaseStatus, PipelineRun, RunStatus,
};

/// A stored row that does not fit the domain, or a domain value that does not fit a column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{table}.{column}: {reason}")]
pub struct MappingError {
    pub table: &'static str,
    pub column: &'static str,
    pub reason: String,
}

impl MappingError {
    fn new(table: &'static str, column: &'static str, reason: impl Into<String>) -> Self {
        Self {
            table,
            column,
            reason: reason.into(),
        }
    }
}

pub(crate) fn to_i32(
    table: &'static str,
    column: &'static str,
    value: u32,
) -> Result<i32, MappingError> {
    i32::try_from(value)
        .map_err(|_| MappingError::new(table, column, format!("{value} does not fit")))
}

fn to_u32(table: &'static str, column: &'static str, value: i32) -> Result<u32, MappingError> {
    u32::try_from(value)
        .map_err(|_| MappingError::new(table, column, format!("{value} is negative")))
}

fn text<T>(
    table: &'static str,
    column: &'static str,
    raw: &str,
    parse: impl FnOnce(&'static str, &str) -> Result<T, crate::core::ids::InvalidValue>,
) -> Result<T, MappingError> {
    parse(column, raw).map_err(|e| MappingError::new(table, column, e.reason))
}

fn opt_text<T>(
    table: &'static str,
    column: &'static str,
    raw: Option<&str>,
    parse: impl FnOnce(&'static str, &str) -> Result<T, crate::core::ids::InvalidValue>,
) -> Result<Option<T>, MappingError> {
    raw.map(|r| text(table, column, r, parse)).transpose()
}

fn named<T>(
    table: &'static str,
    column: &'static str,
    raw: &str,
    from: fn(&str) -> Option<T>,
) -> Result<T, MappingError> {
    from(raw).ok_or_else(|| MappingError::new(table, column, format!("unknown value '{raw}'")))
}

fn phase_name(
    table: &'static str,
    column: &'static str,
    raw: &str,
) -> Result<PhaseName, MappingError> {
    text(table, column, raw, PhaseName::parse)
}

fn attempt(table: &'static str, raw: i32) -> Result<Attempt, MappingError> {
    Attempt::parse("attempt", i64::from(raw))
        .map_err(|e| MappingError::new(table, "attempt", e.reason))
}

pub(crate) fn batch_to_row(batch: &Batch) -> Result<batches::Model, MappingError> {
    Ok(batches::Model {
        id: batch.id.as_uuid(),
        owner_user_id: batch.owner.as_str().to_owned(),
        org_id: batch.org_id.as_ref().map(|o| o.as_str().to_owned()),
        class_id: batch.class_id.as_ref().map(|c| c.as_str().to_owned()),
        course_code: batch.course_code.as_str().to_owned(),
        expected_essay_count: to_i32(
            "batches",
            "expected_essay_count",
            batch.expected_essay_count,
        )?,
        student_prompt_ref: batch.student_prompt_ref.clone(),
        assignment_id: batch.assignment_id.clone(),
        cj_default_llm_model: batch.cj_default_llm_model.clone(),
        cj_default_temperature: batch.cj_default_temperature,
        status: batch.status.as_str().to_owned(),
        correlation_id: batch.correlation_id.as_uuid(),
        essays_ready_pending: batch.essays_ready_pending,
        status_reason: batch.status_reason.clone(),
        created_at: batch.created_at,
        updated_at: batch.updated_at,
        version: batch.version,
    })
}

pub(crate) fn batch_from_row(row: &batches::Model) -> Result<Batch, MappingError> {
    const T: &str = "batches";
    Ok(Batch {
        id: BatchId::from_uuid(row.id),
        owner: text(T, "owner_user_id", &row.owner_user_id, UserId::parse)?,
        org_id: opt_text(T, "org_id", row.org_id.as_deref(), OrgId::parse)?,
        class_id: opt_text(T, "class_id", row.class_id.as_deref(), ClassId::parse)?,
        course_code: text(T, "course_code", &row.course_code, CourseCode::parse)?,
        expected_essay_count: to_u32(T, "expected_essay_count", row.expected_essay_count)?,
        student_prompt_ref: row.student_prompt_ref.clone(),
        assignment_id: row.assignment_id.clone(),
        cj_default_llm_model: row.cj_default_llm_model.clone(),
        cj_default_temperature: row.cj_default_temperature,
        status: named(T, "status", &row.status, BatchStatus::from_str_name)?,
        correlation_id: CorrelationId::from_uuid(row.correlation_id),
        essays_ready_pending: row.essays_ready_pending,
        status_reason: row.status_reason.clone(),
        created_at: row.created_at,
        updated_at: row.updated_at,
        version: row.version,
    })
}

pub(crate) fn essay_to_row(
    batch_id: Uuid,
    position: usize,
    essay: &Essay,
) -> Result<batch_essays::Model, MappingError> {
    let position = i32::try_from(position)
        .map_err(|_| MappingError::new("batch_essays", "position", "too many essays"))?;
    Ok(batch_essays::Model {
        batch_id,
        essay_id: essay.id.as_uuid(),
        position,
        text_ref: essay.text_ref.as_ref().map(|t| t.as_str().to_owned()),
        student_id: essay.student_id.clone(),
        status: essay.status.as_str().to_owned(),
        validation_error: essay.validation_error.clone(),
    })
}

fn essay_from_row(row: &batch_essays::Model) -> Result<Essay, MappingError> {
    const T: &str = "batch_essays";
    Ok(Essay {
        id: EssayId::from_uuid(row.essay_id),
        text_ref: opt_text(T, "text_ref", row.text_ref.as_deref(), TextRef::parse)?,
        student_id: row.student_id.clone(),
        status: named(T, "status", &row.status, EssayStatus::from_str_name)?,
        validation_error: row.validation_error.clone(),
    })
}

pub(crate) fn run_to_row(
    batch_id: Uuid,
    seq: usize,
    run: &PipelineRun,
) -> Result<pipeline_runs::Model, MappingError> {
    const T: &str = "pipeline_runs";
    Ok(pipeline_runs::Model {
        id: run.id.as_uuid(),
        batch_id,
        seq: i32::try_from(seq).map_err(|_| MappingError::new(T, "seq", "too many runs"))?,
        requested_pipeline: run.requested_pipeline.as_str().to_owned(),
        is_retry: run.is_retry,
        status: run.status.as_str().to_owned(),
        correlation_id: run.correlation_id.as_uuid(),
        started_at: run.started_at,
        ended_at: run.ended_at,
        successful_essay_count: to_i32(T, "successful_essay_count", run.successful_essay_count)?,
        failed_essay_count: to_i32(T, "failed_essay_count", run.failed_essay_count)?,
    })
}

/// The row of a phase; `id` is 0 and ignored on insert (the database assigns it).
pub(crate) fn phase_to_row(
    batch_id: Uuid,
    run_id: Uuid,
    position: usize,
    phase: &PhaseExecution,
) -> Result<phase_executions::Model, MappingError> {
    const T: &str = "phase_executions";
    let depends_on: Vec<&str> = phase.depends_on.iter().map(|p| p.as_str()).collect();
    Ok(phase_executions::Model {
        id: 0,
        run_id,
        batch_id,
        phase: phase.phase.as_str().to_owned(),
        position: i32::try_from(position)
            .map_err(|_| MappingError::new(T, "position", "too many phases"))?,
        status: phase.status.as_str().to_owned(),
        attempt: to_i32(T, "attempt", phase.attempt.get())?,
        depends_on: depends_on.join(","),
        essays_total: to_i32(T, "essays_total", phase.essays_total)?,
        essays_succeeded: to_i32(T, "essays_succeeded", phase.essays_succeeded)?,
        essays_failed: to_i32(T, "essays_failed", phase.essays_failed)?,
        dispatched_at: phase.dispatched_at,
        completed_at: phase.completed_at,
        error: phase.error.clone(),
        version: phase.version,
    })
}

fn phase_from_row(row: &phase_executions::Model) -> Result<PhaseExecution, MappingError> {
    const T: &str = "phase_executions";
    let depends_on = row
        .depends_on
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| phase_name(T, "depends_on", s))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(PhaseExecution {
        phase: phase_name(T, "phase", &row.phase)?,
        status: named(T, "status", &row.status, PhaseStatus::from_str_name)?,
        attempt: attempt(T, row.attempt)?,
        depends_on,
        essays_total: to_u32(T, "essays_total", row.essays_total)?,
        essays_succeeded: to_u32(T, "essays_succeeded", row.essays_succeeded)?,
        essays_failed: to_u32(T, "essays_failed", row.essays_failed)?,
        dispatched_at: row.dispatched_at,
        completed_at: row.completed_at,
        error: row.error.clone(),
        version: row.version,
    })
}

pub(crate) fn result_to_row(
    batch_id: Uuid,
    result: &EssayPhaseResult,
) -> Result<essay_phase_results::Model, MappingError> {
    Ok(essay_phase_results::Model {
        batch_id,
        essay_id: result.essay_id.as_uuid(),
        phase: result.phase.as_str().to_owned(),
        run_id: result.run_id.as_uuid(),
        attempt: to_i32("essay_phase_results", "attempt", result.attempt.get())?,
        succeeded: result.succeeded,
        output_ref: result.output_ref.as_ref().map(|t| t.as_str().to_owned()),
    })
}

fn result_from_row(row: &essay_phase_results::Model) -> Result<EssayPhaseResult, MappingError> {
    const T: &str = "essay_phase_results";
    Ok(EssayPhaseResult {
        essay_id: EssayId::from_uuid(row.essay_id),
        phase: phase_name(T, "phase", &row.phase)?,
        run_id: RunId::from_uuid(row.run_id),
        attempt: attempt(T, row.attempt)?,
        succeeded: row.succeeded,
        output_ref: opt_text(T, "output_ref", row.output_ref.as_deref(), TextRef::parse)?,
    })
}

/// The rows of one batch, as read; `assemble` orders nothing itself: callers pass essays by position, runs by
/// seq and phases by position.
pub(crate) struct BatchRows {
    pub batch: batches::Model,
    pub essays: Vec<batch_essays::Model>,
    pub runs: Vec<pipeline_runs::Model>,
    pub phases: Vec<phase_executions::Model>,
    pub results: Vec<essay_phase_results::Model>,
}

pub(crate) fn assemble(rows: BatchRows) -> Result<BatchAggregate, MappingError> {
    let mut phases_by_run: HashMap<Uuid, Vec<PhaseExecution>> = HashMap::new();
    for row in &rows.phases {
        phases_by_run
            .entry(row.run_id)
            .or_default()
            .push(phase_from_row(row)?);
    }
    let runs = rows
        .runs
        .iter()
        .map(|row| {
            const T: &str = "pipeline_runs";
            Ok(PipelineRun {
                id: RunId::from_uuid(row.id),
                requested_pipeline: phase_name(T, "requested_pipeline", &row.requested_pipeline)?,
                is_retry: row.is_retry,
                status: named(T, "status", &row.status, RunStatus::from_str_name)?,
                correlation_id: CorrelationId::from_uuid(row.correlation_id),
                phases: phases_by_run.remove(&row.id).unwrap_or_default(),
                started_at: row.started_at,
                ended_at: row.ended_at,
                successful_essay_count: to_u32(
                    T,
                    "successful_essay_count",
                    row.successful_essay_count,
                )?,
                failed_essay_count: to_u32(T, "failed_essay_count", row.failed_essay_count)?,
            })
        })
        .collect::<Result<Vec<_>, MappingError>>()?;
    if let Some(orphan) = phases_by_run.keys().next() {
        return Err(MappingError::new(
            "phase_executions",
            "run_id",
            format!("run {orphan} belongs to another batch"),
        ));
    }
    Ok(BatchAggregate {
        batch: batch_from_row(&rows.batch)?,
        essays: rows
            .essays
            .iter()
            .map(essay_from_row)
            .collect::<Result<_, _>>()?,
        results: rows
            .results
            .iter()
            .map(result_from_row)
            .collect::<Result<_, _>>()?,
        runs,
    })
}
