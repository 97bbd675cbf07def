//! The relay's claim looks only at unpublished rows, but the first schema indexed every row by key: with published
//! rows kept for the retention window, each claim's per-key check walked the key's whole history. A partial index
//! over the unpublished, unparked rows keeps that check proportional to what is waiting. On PostgreSQL the outbox
//! is a queue (every row is updated twice, then left alone), so it is vacuumed and analysed after a fixed number
//! of changed rows rather than a fraction of a table that only grows.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

const UP: [&str; 2] = [
    "CREATE INDEX ix_event_outbox_unpublished_key ON event_outbox (message_key, id) \
     WHERE published_at IS NULL AND NOT parked",
    "DROP INDEX ix_event_outbox_key_id",
];

const DOWN: [&str; 2] = [
    "CREATE INDEX ix_event_outbox_key_id ON event_outbox (message_key, id)",
    "DROP INDEX ix_event_outbox_unpublished_key",
];

const UP_POSTGRES: &str = "ALTER TABLE event_outbox SET (\
     autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000, \
     autovacuum_analyze_scale_factor = 0, autovacuum_analyze_threshold = 5000)";

const DOWN_POSTGRES: &str = "ALTER TABLE event_outbox RESET (\
     autovacuum_vacuum_scale_factor, autovacuum_vacuum_threshold, \
     autovacuum_analyze_scale_factor, autovacuum_analyze_threshold)";

async fn run(
    manager: &SchemaManager<'_>,
    statements: &[&str],
    postgres_only: &str,
) -> Result<(), DbErr> {
    let db = manager.get_connection();
    for sql in statements {
        db.execute_unprepared(sql).await?;
    }
    if manager.get_database_backend() == DbBackend::Postgres {
        db.execute_unprepared(postgres_only).await?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        run(manager, &UP, UP_POSTGRES).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        run(manager, &DOWN, DOWN_POSTGRES).await
    }
}
