//! Most updates of a transition change no indexed column, so PostgreSQL can write them as heap-only tuples (HOT:
//! no new index entries) — if no index names a column they change and the page has room. Two indexes stood in the
//! way, both serving a scanner that reads a handful of rows:
//! - the timeout scanner's `(status, dispatched_at)`: every phase status change inserted into all four indexes of
//!   `phase_executions`. A phase waits for its outcome exactly while it has been dispatched and has not completed,
//!   so a partial index over those rows, by `dispatched_at`, serves the scanner; the DISPATCH_INITIATED →
//!   IN_PROGRESS update then touches no index at all;
//! - the relay's `(published_at, parked, next_attempt_at, id)` over every row, published ones included: the lease
//!   a claim writes into `next_attempt_at` was a new entry in all four outbox indexes. The claim needs the pending
//!   rows in id order (a partial index by id) and pruning needs published rows by age (a partial index by
//!   `published_at`); neither names `next_attempt_at`, so a claim is a HOT update.
//!
//! On PostgreSQL the tables updated in place keep 30 % of each page free for those new row versions.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

const UP: [&str; 5] = [
    "CREATE INDEX ix_phase_executions_waiting ON phase_executions (dispatched_at, id) \
     WHERE completed_at IS NULL AND dispatched_at IS NOT NULL",
    "DROP INDEX ix_phase_executions_status_dispatched",
    "CREATE INDEX ix_event_outbox_pending ON event_outbox (id) WHERE published_at IS NULL AND NOT parked",
    "CREATE INDEX ix_event_outbox_published ON event_outbox (published_at) WHERE published_at IS NOT NULL",
    "DROP INDEX ix_event_outbox_due",
];

const DOWN: [&str; 5] = [
    "CREATE INDEX ix_event_outbox_due ON event_outbox (published_at, parked, next_attempt_at, id)",
    "DROP INDEX ix_event_outbox_published",
    "DROP INDEX ix_event_outbox_pending",
    "CREATE INDEX ix_phase_executions_status_dispatched ON phase_executions (status, dispatched_at)",
    "DROP INDEX ix_phase_executions_waiting",
];

/// The tables whose rows a transition updates in place.
const UPDATED_IN_PLACE: [&str; 5] = [
    "batches",
    "pipeline_runs",
    "phase_executions",
    "essay_phase_results",
    "event_outbox",
];

async fn run(
    manager: &SchemaManager<'_>,
    statements: &[&str],
    fillfactor: &str,
) -> Result<(), DbErr> {
    let db = manager.get_connection();
    for sql in statements {
        db.execute_unprepared(sql).await?;
    }
    if manager.get_database_backend() == DbBackend::Postgres {
        for table in UPDATED_IN_PLACE {
            db.execute_unprepared(&format!("ALTER TABLE {table} {fillfactor}"))
                .await?;
        }
    }
    Ok(())
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        run(manager, &UP, "SET (fillfactor = 70)").await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        run(manager, &DOWN, "RESET (fillfactor)").await
    }
}
