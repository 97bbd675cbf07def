//! Reads: the aggregate of one batch (inside a unit of work or alone), a user's batches page by page, and the
//! phases past their timeout.

use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
};
use uuid::Uuid;

use super::cache::{canonical, AggregateCache};
use super::entities::{
    batch_essays, batches, essay_phase_results, phase_executions, pipeline_runs,
};
use super::mapping::{self, BatchRows};
use super::{Store, StoreError};
use crate::core::ids::{Attempt, BatchId, InvalidValue, PhaseName, UserId};
use crate::core::model::{BatchAggregate, BatchStatus, PhaseStatus};
use crate::core::ports::{BatchPage, BatchSummary, RepositoryError, TimedOutPhase};
use crate::core::rejection::Rejection;

pub const DEFAULT_PAGE_SIZE: u32 = 20;
pub const MAX_PAGE_SIZE: u32 = 100;

/// Reads every row of one batch with its versions. With a cache, the batch row comes first and the rest only when
/// the cache does not hold the batch at that row's version (one query instead of five). Either way the entry counts
/// as verified now (see `cache` for when that lets status reads skip the query).
pub(crate) async fn load_in<C: ConnectionTrait>(
    conn: &C,
    batch_id: BatchId,
    cache: Option<&AggregateCache>,
) -> Result<Option<BatchAggregate>, StoreError> {
    // Before the query: a remote change announced while it runs must keep its result from being trusted.
    let ticket = cache.map(AggregateCache::ticket);
    let id = batch_id.as_uuid();
    let Some(batch) = batches::Entity::find_by_id(id).one(conn).await? else {
        return Ok(None);
    };
    if let Some(hit) = cache.and_then(|c| c.get(batch_id, batch.version)) {
        // The version says the rows are the cached ones; the batch row itself is checked too, so a row changed
        // behind the store's back without a version bump is read afresh rather than trusted.
        if mapping::batch_from_row(&batch).is_ok_and(|b| b == hit.batch) {
            if let (Some(cache), Some(ticket)) = (cache, ticket) {
                cache.refresh(batch_id, batch.version, ticket);
            }
            return Ok(Some((*hit).clone()));
        }
    }
    let essays = batch_essays::Entity::find()
        .filter(batch_essays::Column::BatchId.eq(id))
        .order_by_asc(batch_essays::Column::Position)
        .all(conn)
        .await?;
    let runs = pipeline_runs::Entity::find()
        .filter(pipeline_runs::Column::BatchId.eq(id))
        .order_by_asc(pipeline_runs::Column::Seq)
        .all(conn)
        .await?;
    let phases = phase_executions::Entity::find()
        .filter(phase_executions::Column::BatchId.eq(id))
        .order_by_asc(phase_executions::Column::RunId)
        .order_by_asc(phase_executions::Column::Position)
        .all(conn)
        .await?;
    let results = essay_phase_results::Entity::find()
        .filter(essay_phase_results::Column::BatchId.eq(id))
        .order_by_asc(essay_phase_results::Column::EssayId)
        .order_by_asc(essay_phase_results::Column::Phase)
        .all(conn)
        .await?;
    let rows = BatchRows {
        batch,
        essays,
        runs,
        phases,
        results,
    };
    // Ordered in Rust as well as in SQL, so a committed aggregate put in canonical order equals a load whatever
    // the database's collation.
    let aggregate = canonical(mapping::assemble(rows)?);
    if let (Some(cache), Some(ticket)) = (cache, ticket) {
        cache.put(Arc::new(aggregate.clone()), ticket);
    }
    Ok(Some(aggregate))
}

/// The opaque keyset cursor: the last row's creation time and id.
fn encode_token(created_at: DateTime<Utc>, id: Uuid) -> String {
    format!(
        "{}_{}",
        created_at.to_rfc3339_opts(SecondsFormat::Micros, true),
        id.simple()
    )
}

fn decode_token(token: &str) -> Result<(DateTime<Utc>, Uuid), InvalidValue> {
    let bad = || InvalidValue::new("page_token", "is not a token this service issued");
    let (at, id) = token.split_once('_').ok_or_else(bad)?;
    let at = DateTime::parse_from_rfc3339(at)
        .map_err(|_| bad())?
        .with_timezone(&Utc);
    let id = Uuid::parse_str(id).map_err(|_| bad())?;
    Ok((at, id))
}

impl Store {
    pub(crate) async fn load_aggregate(
        &self,
        batch_id: BatchId,
    ) -> Result<Option<BatchAggregate>, StoreError> {
        load_in(&self.db, batch_id, Some(&self.cache)).await
    }

    /// A status read: the cached aggregate when it may be trusted without a query, else a version-checked load.
    pub(crate) async fn read_aggregate(
        &self,
        batch_id: BatchId,
    ) -> Result<Option<BatchAggregate>, StoreError> {
        let max_age = self.config.status_cache_max_age;
        if let Some(hit) = self.cache.trusted(batch_id, max_age) {
            return Ok(Some((*hit).clone()));
        }
        self.load_aggregate(batch_id).await
    }

    pub(crate) async fn list_owned(
        &self,
        owner: &UserId,
        page_size: u32,
        page_token: Option<&str>,
    ) -> Result<BatchPage, RepositoryError> {
        let size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let mut query =
            batches::Entity::find().filter(batches::Column::OwnerUserId.eq(owner.as_str()));
        if let Some(token) = page_token.filter(|t| !t.is_empty()) {
            let (at, id) = decode_token(token)
                .map_err(|e| RepositoryError::Rejected(Rejection::Invalid(e)))?;
            query = query.filter(
                Condition::any().add(batches::Column::CreatedAt.lt(at)).add(
                    Condition::all()
                        .add(batches::Column::CreatedAt.eq(at))
                        .add(batches::Column::Id.lt(id)),
                ),
            );
        }
        let mut rows = query
            .order_by_desc(batches::Column::CreatedAt)
            .order_by_desc(batches::Column::Id)
            .limit(u64::from(size) + 1)
            .all(&self.db)
            .await
            .map_err(StoreError::from)?;
        let more = rows.len() > size as usize;
        rows.truncate(size as usize);
        let next_page_token = if more {
            rows.last().map(|r| encode_token(r.created_at, r.id))
        } else {
            None
        };
        let batches = rows
            .iter()
            .map(|r| {
                Ok(BatchSummary {
                    batch_id: BatchId::from_uuid(r.id),
                    status: BatchStatus::from_str_name(&r.status).ok_or_else(|| {
                        StoreError::Corrupt(format!("batches.status: unknown value '{}'", r.status))
                    })?,
                    created_at: r.created_at,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(BatchPage {
            batches,
            next_page_token,
        })
    }

    pub(crate) async fn phases_dispatched_before(
        &self,
        dispatched_before: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<TimedOutPhase>, StoreError> {
        let waiting = [
            PhaseStatus::DispatchInitiated.as_str(),
            PhaseStatus::InProgress.as_str(),
        ];
        let rows = phase_executions::Entity::find()
            .filter(phase_executions::Column::Status.is_in(waiting))
            // The conditions of the partial index `ix_phase_executions_waiting`, which holds exactly these phases.
            .filter(phase_executions::Column::CompletedAt.is_null())
            .filter(phase_executions::Column::DispatchedAt.is_not_null())
            .filter(phase_executions::Column::DispatchedAt.lte(dispatched_before))
            .order_by_asc(phase_executions::Column::DispatchedAt)
            .order_by_asc(phase_executions::Column::Id)
            .limit(u64::from(limit.max(1)))
            .all(&self.db)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(TimedOutPhase {
                    batch_id: BatchId::from_uuid(r.batch_id),
                    phase: PhaseName::parse("phase", &r.phase)
                        .map_err(|e| StoreError::Corrupt(format!("phase_executions.phase: {e}")))?,
                    attempt: Attempt::parse("attempt", i64::from(r.attempt)).map_err(|e| {
                        StoreError::Corrupt(format!("phase_executions.attempt: {e}"))
                    })?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        let at = DateTime::parse_from_rfc3339("2026-12-04T10:11:12.123456Z")
            .unwrap()
            .with_timezone(&Utc);
        let id = Uuid::now_v7();
        assert_eq!(decode_token(&encode_token(at, id)), Ok((at, id)));
        assert!(decode_token("nonsense").is_err());
        assert!(decode_token("2026-12-04T10:11:12Z_nope").is_err());
    }
}
