//! The initial schema: batches and their essays, pipeline runs and their phase executions, per-essay phase
//! results, the inbox (`processed_events`) and the outbox (`event_outbox`). One definition serves PostgreSQL and
//! SQLite. Every enum column is text with a CHECK listing exactly the names the service writes (defect 19: the
//! database and the code must not drift; a test compares these lists with the core and the protobuf enums).

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

/// `BatchStatus` names.
pub const BATCH_STATUSES: &[&str] = &[
    "AWAITING_CONTENT_VALIDATION",
    "AWAITING_STUDENT_VALIDATION",
    "STUDENT_VALIDATION_COMPLETED",
    "READY_FOR_PIPELINE_EXECUTION",
    "PROCESSING_PIPELINES",
    "FAILED_CRITICALLY",
    "CANCELLED",
];
/// Phase execution status names (`PipelineExecutionStatus` in protobuf).
pub const PHASE_STATUSES: &[&str] = &[
    "PENDING_DEPENDENCIES",
    "DISPATCH_INITIATED",
    "IN_PROGRESS",
    "COMPLETED_SUCCESSFULLY",
    "COMPLETED_WITH_PARTIAL_SUCCESS",
    "FAILED",
    "SKIPPED_DUE_TO_DEPENDENCY_FAILURE",
    "REQUESTED_BY_USER",
    "CANCELLED",
];
/// Pipeline run status names (`PipelineRunStatus` in protobuf).
pub const RUN_STATUSES: &[&str] = &[
    "RUNNING",
    "COMPLETED_SUCCESSFULLY",
    "COMPLETED_WITH_FAILURES",
    "FAILED",
    "CANCELLED",
];
/// Essay status names (internal; no protobuf enum).
pub const ESSAY_STATUSES: &[&str] = &["REGISTERED", "PROVISIONED", "READY", "VALIDATION_FAILED"];
/// Phase names: the core's lower-case names (protobuf `PHASE_NAME_*`, lower-cased).
pub const PHASE_NAMES: &[&str] = &[
    "student_matching",
    "spellcheck",
    "nlp",
    "cj_assessment",
    "ai_feedback",
];
/// Course codes (protobuf `COURSE_CODE_*`).
pub const COURSE_CODES: &[&str] = &["ENG5", "ENG6", "ENG7", "SV1", "SV2", "SV3"];

#[derive(DeriveIden)]
enum Batches {
    Table,
    Id,
    OwnerUserId,
    OrgId,
    ClassId,
    CourseCode,
    ExpectedEssayCount,
    StudentPromptRef,
    AssignmentId,
    CjDefaultLlmModel,
    CjDefaultTemperature,
    Status,
    CorrelationId,
    EssaysReadyPending,
    StatusReason,
    CreatedAt,
    UpdatedAt,
    Version,
}

#[derive(DeriveIden)]
enum BatchEssays {
    Table,
    BatchId,
    EssayId,
    Position,
    TextRef,
    StudentId,
    Status,
    ValidationError,
}

#[derive(DeriveIden)]
enum PipelineRuns {
    Table,
    Id,
    BatchId,
    Seq,
    RequestedPipeline,
    IsRetry,
    Status,
    CorrelationId,
    StartedAt,
    EndedAt,
    SuccessfulEssayCount,
    FailedEssayCount,
}

#[derive(DeriveIden)]
enum PhaseExecutions {
    Table,
    Id,
    RunId,
    BatchId,
    Phase,
    Position,
    Status,
    Attempt,
    DependsOn,
    EssaysTotal,
    EssaysSucceeded,
    EssaysFailed,
    DispatchedAt,
    CompletedAt,
    Error,
    Version,
}

#[derive(DeriveIden)]
enum EssayPhaseResults {
    Table,
    BatchId,
    EssayId,
    Phase,
    RunId,
    Attempt,
    Succeeded,
    OutputRef,
}

#[derive(DeriveIden)]
enum ProcessedEvents {
    Table,
    EventId,
    Topic,
    ProcessedAt,
}

#[derive(DeriveIden)]
enum EventOutbox {
    Table,
    Id,
    EventId,
    Topic,
    MessageKey,
    Payload,
    Headers,
    CreatedAt,
    PublishedAt,
    Attempts,
    NextAttemptAt,
    LastError,
    Parked,
}

/// `CHECK (col IN (...))`, named so a violation says which column refused the value.
fn one_of<C: IntoIden + 'static>(name: &'static str, col: C, values: &[&str]) -> Check {
    Check::named(
        name,
        Expr::col(col).is_in(values.iter().map(|v| (*v).to_owned())),
    )
}

fn non_negative<C: IntoIden + 'static>(name: &'static str, col: C) -> Check {
    Check::named(name, Expr::col(col).gte(0))
}

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Batches::Table)
                    .col(pk_uuid(Batches::Id))
                    .col(string_len(Batches::OwnerUserId, 128))
                    .col(string_len_null(Batches::OrgId, 128))
                    .col(string_len_null(Batches::ClassId, 128))
                    .col(string_len(Batches::CourseCode, 16).check(one_of(
                        "ck_batches_course_code",
                        Batches::CourseCode,
                        COURSE_CODES,
                    )))
                    .col(integer(Batches::ExpectedEssayCount).check(non_negative(
                        "ck_batches_expected_essay_count",
                        Batches::ExpectedEssayCount,
                    )))
                    .col(text_null(Batches::StudentPromptRef))
                    .col(string_len_null(Batches::AssignmentId, 100))
                    .col(text_null(Batches::CjDefaultLlmModel))
                    .col(double_null(Batches::CjDefaultTemperature))
                    .col(string_len(Batches::Status, 64).check(one_of(
                        "ck_batches_status",
                        Batches::Status,
                        BATCH_STATUSES,
                    )))
                    .col(uuid(Batches::CorrelationId))
                    .col(boolean(Batches::EssaysReadyPending))
                    .col(text_null(Batches::StatusReason))
                    .col(timestamp_with_time_zone(Batches::CreatedAt))
                    .col(timestamp_with_time_zone(Batches::UpdatedAt))
                    .col(big_integer(Batches::Version))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_batches_owner_created")
                    .table(Batches::Table)
                    .col(Batches::OwnerUserId)
                    .col((Batches::CreatedAt, IndexOrder::Desc))
                    .col((Batches::Id, IndexOrder::Desc))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(BatchEssays::Table)
                    .col(uuid(BatchEssays::BatchId))
                    .col(uuid(BatchEssays::EssayId))
                    .col(integer(BatchEssays::Position))
                    .col(text_null(BatchEssays::TextRef))
                    .col(text_null(BatchEssays::StudentId))
                    .col(string_len(BatchEssays::Status, 64).check(one_of(
                        "ck_batch_essays_status",
                        BatchEssays::Status,
                        ESSAY_STATUSES,
                    )))
                    .col(text_null(BatchEssays::ValidationError))
                    // The primary key is the UNIQUE (batch_id, essay_id) of defect 19.
                    .primary_key(
                        Index::create()
                            .col(BatchEssays::BatchId)
                            .col(BatchEssays::EssayId),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_batch_essays_batch")
                            .from(BatchEssays::Table, BatchEssays::BatchId)
                            .to(Batches::Table, Batches::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(PipelineRuns::Table)
                    .col(pk_uuid(PipelineRuns::Id))
                    .col(uuid(PipelineRuns::BatchId))
                    .col(integer(PipelineRuns::Seq))
                    .col(
                        string_len(PipelineRuns::RequestedPipeline, 32).check(one_of(
                            "ck_pipeline_runs_requested_pipeline",
                            PipelineRuns::RequestedPipeline,
                            PHASE_NAMES,
                        )),
                    )
                    .col(boolean(PipelineRuns::IsRetry))
                    .col(string_len(PipelineRuns::Status, 64).check(one_of(
                        "ck_pipeline_runs_status",
                        PipelineRuns::Status,
                        RUN_STATUSES,
                    )))
                    .col(uuid(PipelineRuns::CorrelationId))
                    .col(timestamp_with_time_zone(PipelineRuns::StartedAt))
                    .col(timestamp_with_time_zone_null(PipelineRuns::EndedAt))
                    .col(integer(PipelineRuns::SuccessfulEssayCount))
                    .col(integer(PipelineRuns::FailedEssayCount))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_pipeline_runs_batch")
                            .from(PipelineRuns::Table, PipelineRuns::BatchId)
                            .to(Batches::Table, Batches::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ux_pipeline_runs_batch_seq")
                    .table(PipelineRuns::Table)
                    .col(PipelineRuns::BatchId)
                    .col(PipelineRuns::Seq)
                    .unique()
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(PhaseExecutions::Table)
                    .col(big_pk_auto(PhaseExecutions::Id))
                    .col(uuid(PhaseExecutions::RunId))
                    .col(uuid(PhaseExecutions::BatchId))
                    .col(string_len(PhaseExecutions::Phase, 32).check(one_of(
                        "ck_phase_executions_phase",
                        PhaseExecutions::Phase,
                        PHASE_NAMES,
                    )))
                    .col(integer(PhaseExecutions::Position))
                    .col(string_len(PhaseExecutions::Status, 64).check(one_of(
                        "ck_phase_executions_status",
                        PhaseExecutions::Status,
                        PHASE_STATUSES,
                    )))
                    .col(integer(PhaseExecutions::Attempt).check(Check::named(
                        "ck_phase_executions_attempt",
                        Expr::col(PhaseExecutions::Attempt).gte(1),
                    )))
                    // Comma-separated phase names of the same run; validated against PHASE_NAMES on read.
                    .col(text(PhaseExecutions::DependsOn))
                    .col(integer(PhaseExecutions::EssaysTotal))
                    .col(integer(PhaseExecutions::EssaysSucceeded))
                    .col(integer(PhaseExecutions::EssaysFailed))
                    .col(timestamp_with_time_zone_null(PhaseExecutions::DispatchedAt))
                    .col(timestamp_with_time_zone_null(PhaseExecutions::CompletedAt))
                    .col(text_null(PhaseExecutions::Error))
                    .col(big_integer(PhaseExecutions::Version))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_phase_executions_run")
                            .from(PhaseExecutions::Table, PhaseExecutions::RunId)
                            .to(PipelineRuns::Table, PipelineRuns::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_phase_executions_batch")
                            .from(PhaseExecutions::Table, PhaseExecutions::BatchId)
                            .to(Batches::Table, Batches::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        for (name, cols) in [
            (
                "ux_phase_executions_run_phase",
                vec![PhaseExecutions::RunId, PhaseExecutions::Phase],
            ),
            (
                "ux_phase_executions_batch_phase_attempt",
                vec![
                    PhaseExecutions::BatchId,
                    PhaseExecutions::Phase,
                    PhaseExecutions::Attempt,
                ],
            ),
        ] {
            let mut index = Index::create();
            index.name(name).table(PhaseExecutions::Table).unique();
            for col in cols {
                index.col(col);
            }
            manager.create_index(index).await?;
        }
        // The timeout scanner: phases waiting for an outcome, oldest dispatch first.
        manager
            .create_index(
                Index::create()
                    .name("ix_phase_executions_status_dispatched")
                    .table(PhaseExecutions::Table)
                    .col(PhaseExecutions::Status)
                    .col(PhaseExecutions::DispatchedAt)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(EssayPhaseResults::Table)
                    .col(uuid(EssayPhaseResults::BatchId))
                    .col(uuid(EssayPhaseResults::EssayId))
                    .col(string_len(EssayPhaseResults::Phase, 32).check(one_of(
                        "ck_essay_phase_results_phase",
                        EssayPhaseResults::Phase,
                        PHASE_NAMES,
                    )))
                    .col(uuid(EssayPhaseResults::RunId))
                    .col(integer(EssayPhaseResults::Attempt))
                    .col(boolean(EssayPhaseResults::Succeeded))
                    .col(text_null(EssayPhaseResults::OutputRef))
                    .primary_key(
                        Index::create()
                            .col(EssayPhaseResults::BatchId)
                            .col(EssayPhaseResults::EssayId)
                            .col(EssayPhaseResults::Phase),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_essay_phase_results_essay")
                            .from_tbl(EssayPhaseResults::Table)
                            .from_col(EssayPhaseResults::BatchId)
                            .from_col(EssayPhaseResults::EssayId)
                            .to_tbl(BatchEssays::Table)
                            .to_col(BatchEssays::BatchId)
                            .to_col(BatchEssays::EssayId)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(ProcessedEvents::Table)
                    .col(pk_uuid(ProcessedEvents::EventId))
                    .col(string_len(ProcessedEvents::Topic, 255))
                    .col(timestamp_with_time_zone(ProcessedEvents::ProcessedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_processed_events_processed_at")
                    .table(ProcessedEvents::Table)
                    .col(ProcessedEvents::ProcessedAt)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(EventOutbox::Table)
                    .col(big_pk_auto(EventOutbox::Id))
                    .col(uuid_uniq(EventOutbox::EventId))
                    .col(string_len(EventOutbox::Topic, 255))
                    .col(string_len(EventOutbox::MessageKey, 255))
                    .col(blob(EventOutbox::Payload))
                    .col(text(EventOutbox::Headers))
                    .col(timestamp_with_time_zone(EventOutbox::CreatedAt))
                    .col(timestamp_with_time_zone_null(EventOutbox::PublishedAt))
                    .col(integer(EventOutbox::Attempts).default(0))
                    .col(timestamp_with_time_zone(EventOutbox::NextAttemptAt))
                    .col(text_null(EventOutbox::LastError))
                    .col(boolean(EventOutbox::Parked).default(false))
                    .to_owned(),
            )
            .await?;
        // The relay's claim: unpublished, not parked, due, in id order.
        manager
            .create_index(
                Index::create()
                    .name("ix_event_outbox_due")
                    .table(EventOutbox::Table)
                    .col(EventOutbox::PublishedAt)
                    .col(EventOutbox::Parked)
                    .col(EventOutbox::NextAttemptAt)
                    .col(EventOutbox::Id)
                    .to_owned(),
            )
            .await?;
        // Per-key order: "is there an older unpublished row for this key?"
        manager
            .create_index(
                Index::create()
                    .name("ix_event_outbox_key_id")
                    .table(EventOutbox::Table)
                    .col(EventOutbox::MessageKey)
                    .col(EventOutbox::Id)
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(EventOutbox::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(ProcessedEvents::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(EssayPhaseResults::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(PhaseExecutions::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(PipelineRuns::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(BatchEssays::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(Batches::Table).to_owned())
            .await?;
        Ok(())
    }
}
