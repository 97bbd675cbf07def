//! The inbox: one `processed_events` row per consumed event id, written in the transaction of the change the
//! event caused. The unique event id makes a redelivery a committed no-op (defect 15: dedupe lives in the
//! database, tied to the commit, not in a cache that fails open).

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbErr, EntityTrait, IntoActiveModel, QueryFilter, TryInsertResult,
};

use super::entities::processed_events;
use super::{Store, StoreError};
use crate::core::ids::EventId;
use crate::core::ports::InboxEntry;

/// Inserts the event id; `false` when it was processed before (or is being processed by a transaction that then
/// commits: PostgreSQL makes the second insert wait for the first).
pub(crate) async fn record<C: ConnectionTrait>(
    conn: &C,
    entry: &InboxEntry,
    now: DateTime<Utc>,
) -> Result<bool, DbErr> {
    let row = processed_events::Model {
        event_id: entry.event_id.as_uuid(),
        topic: entry.topic.clone(),
        processed_at: now,
    };
    let result = processed_events::Entity::insert(row.into_active_model())
        .on_conflict_do_nothing_on([processed_events::Column::EventId])
        .exec_without_returning(conn)
        .await?;
    Ok(matches!(result, TryInsertResult::Inserted(1)))
}

impl Store {
    /// Whether an event id is in the inbox (for diagnostics; `apply` does the authoritative check itself).
    pub async fn is_processed(&self, event_id: EventId) -> Result<bool, StoreError> {
        let found = processed_events::Entity::find()
            .filter(processed_events::Column::EventId.eq(event_id.as_uuid()))
            .one(&self.db)
            .await?;
        Ok(found.is_some())
    }
}
