//! Group commit: several units of work in ONE transaction, so their commits (a WAL flush each), their inbox rows
//! and their outbox rows cost one statement each for the whole group instead of one per unit.
//!
//! Every unit keeps its own meaning: it is decided in order against the state the transaction sees (including the
//! earlier units of the group), a duplicate event id is a no-op, a rejected unit leaves no row behind (its inbox row
//! is deleted before the commit). Only when the group cannot get to its COMMIT — a compare-and-set lost to another
//! replica, a database error — is it rolled back and every unit run alone, with its own retries and its own
//! result, exactly as `apply_unit` would have run it. From the COMMIT on, every unit gets the group's answer.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, SubsecRound, Utc};
use sea_orm::sea_query::OnConflict;
use sea_orm::{ColumnTrait, DbErr, EntityTrait, IntoActiveModel, QueryFilter};
use uuid::Uuid;

use super::cache::canonical;
use super::diff::WriteSet;
use super::entities::processed_events;
use super::faults::FaultPoint;
use super::outbox::insert_messages;
use super::repository::AttemptError;
use super::Store;
use crate::core::ids::BatchId;
use crate::core::model::BatchAggregate;
use crate::core::ports::{Applied, InboxEntry, RepositoryError, UnitOfWork};

/// What each unit of a group came to, in the order the units were given.
pub type GroupResults = Vec<Result<Applied, RepositoryError>>;

impl Store {
    /// Runs `units` as one transaction (see the module documentation); the results are in the units' order. Units
    /// of one batch are decided in the order given; units of different batches are written in batch-id order, so
    /// that two groups never wait on each other's rows in opposite orders.
    pub async fn apply_group(&self, units: Vec<UnitOfWork>, now: DateTime<Utc>) -> GroupResults {
        if units.len() <= 1 {
            let mut results = Vec::with_capacity(1);
            for unit in units {
                results.push(self.apply_unit(unit, now).await);
            }
            return results;
        }
        let now = now.trunc_subsecs(6);
        let mut order: Vec<usize> = (0..units.len()).collect();
        order.sort_by_key(|&i| units[i].batch_id.as_uuid());
        let attempt = {
            let _writer = self.write_guard().await;
            self.try_group(&units, &order, now).await
        };
        match attempt {
            Ok(results) => {
                metrics::histogram!("store_group_units").record(units.len() as f64);
                results
            }
            Err(reason) => {
                metrics::counter!("store_group_fallbacks_total").increment(1);
                tracing::debug!(units = units.len(), %reason, "group commit rolled back; running its units one by one");
                let mut results = Vec::with_capacity(units.len());
                for unit in units {
                    results.push(self.apply_unit(unit, now).await);
                }
                results
            }
        }
    }

    async fn try_group(
        &self,
        units: &[UnitOfWork],
        order: &[usize],
        now: DateTime<Utc>,
    ) -> Result<GroupResults, GroupAbort> {
        let ticket = self.cache.ticket();
        let txn = self.begin_write().await?;
        let entries: Vec<&InboxEntry> = order
            .iter()
            .filter_map(|&i| units[i].inbox.as_ref())
            .collect();
        let mut fresh = record_many(&txn, &entries, now).await?;
        if !entries.is_empty() {
            self.faults.hit(FaultPoint::AfterInbox)?;
        }
        let mut results: Vec<Option<Result<Applied, RepositoryError>>> = vec![None; units.len()];
        // The aggregates this transaction wrote: a later unit of the same batch starts from them.
        let mut written: HashMap<BatchId, BatchAggregate> = HashMap::new();
        let mut messages = Vec::new();
        let mut rejected_events = Vec::new();
        let mut writes = WriteSet::default();
        for &i in order {
            let unit = &units[i];
            // `fresh` holds each newly inserted id once: a second unit with the same id is the duplicate.
            if let Some(entry) = &unit.inbox {
                if !fresh.remove(&entry.event_id.as_uuid()) {
                    results[i] = Some(Ok(Applied::Duplicate));
                    continue;
                }
            }
            // A batch's second unit is compared against its first one's rows: they must be written first.
            if writes.holds(unit.batch_id) {
                writes.flush(&txn, &self.faults).await?;
            }
            let outcome = match written.get(&unit.batch_id) {
                Some(aggregate) => self.decide_into(Some(aggregate), unit, now, &mut writes),
                None => self.decide_from_newest(&txn, unit, now, &mut writes).await,
            };
            match outcome {
                Ok(unit_written) => {
                    messages.extend(unit_written.messages);
                    if unit_written.changed {
                        written.insert(unit.batch_id, unit_written.aggregate.clone());
                    }
                    results[i] = Some(Ok(Applied::Changed {
                        aggregate: Box::new(unit_written.aggregate),
                        effects: unit_written.effects,
                    }));
                }
                // `decide` refused before anything of this unit was written; only its inbox row must go.
                Err(AttemptError::Rejected(rejection)) => {
                    if let Some(entry) = &unit.inbox {
                        rejected_events.push(entry.event_id.as_uuid());
                    }
                    results[i] = Some(Err(RepositoryError::Rejected(rejection)));
                }
                Err(e) => return Err(e.into()),
            }
        }
        writes.flush(&txn, &self.faults).await?;
        if !rejected_events.is_empty() {
            processed_events::Entity::delete_many()
                .filter(processed_events::Column::EventId.is_in(rejected_events))
                .exec(&txn)
                .await?;
        }
        insert_messages(&txn, messages, now).await?;
        self.faults.hit(FaultPoint::BeforeCommit)?;
        // A failed COMMIT may still have committed: like a lone unit's, its callers hear that the store is
        // unavailable (an event is redelivered and deduplicated by its inbox row), it is not run again here.
        if let Err(e) = txn.commit().await {
            let unavailable = RepositoryError::from(super::StoreError::Database(e));
            return Ok(vec![Err(unavailable); units.len()]);
        }
        for aggregate in written.into_values() {
            self.cache.put(Arc::new(canonical(aggregate)), ticket);
        }
        // Committed: from here on nothing may send the units round again, so a failure is each unit's answer.
        if let Err(fault) = self.faults.hit(FaultPoint::AfterCommit) {
            let unavailable = RepositoryError::from(super::StoreError::Fault(fault));
            return Ok(vec![Err(unavailable); units.len()]);
        }
        Ok(results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(RepositoryError::Corrupt(
                        "a unit of the group has no result".to_owned(),
                    ))
                })
            })
            .collect())
    }
}

/// Why a group was rolled back as a whole (its units then run one by one).
#[derive(Debug, thiserror::Error)]
enum GroupAbort {
    #[error("a compare-and-set lost to a concurrent change")]
    Conflict,
    #[error("{0}")]
    Store(String),
}

impl From<DbErr> for GroupAbort {
    fn from(e: DbErr) -> Self {
        GroupAbort::Store(e.to_string())
    }
}

impl From<super::StoreError> for GroupAbort {
    fn from(e: super::StoreError) -> Self {
        GroupAbort::Store(e.to_string())
    }
}

impl From<AttemptError> for GroupAbort {
    fn from(e: AttemptError) -> Self {
        match e {
            AttemptError::Conflict | AttemptError::StaleBatch => GroupAbort::Conflict,
            AttemptError::Rejected(r) => GroupAbort::Store(format!("unexpected refusal: {r:?}")),
            AttemptError::Store(e) => GroupAbort::Store(e.to_string()),
        }
    }
}

impl From<super::faults::InjectedFault> for GroupAbort {
    fn from(e: super::faults::InjectedFault) -> Self {
        GroupAbort::Store(e.to_string())
    }
}

/// Inserts every event id in one statement; returns the ids that were new (not processed before, and inserted
/// once even when the group carries the same id twice).
async fn record_many<C: sea_orm::ConnectionTrait>(
    conn: &C,
    entries: &[&InboxEntry],
    now: DateTime<Utc>,
) -> Result<HashSet<Uuid>, DbErr> {
    let mut seen = HashSet::new();
    let rows: Vec<_> = entries
        .iter()
        .filter(|e| seen.insert(e.event_id.as_uuid()))
        .map(|e| {
            processed_events::Model {
                event_id: e.event_id.as_uuid(),
                topic: e.topic.clone(),
                processed_at: now,
            }
            .into_active_model()
        })
        .collect();
    if rows.is_empty() {
        return Ok(HashSet::new());
    }
    let inserted = processed_events::Entity::insert_many(rows)
        .on_conflict(
            OnConflict::column(processed_events::Column::EventId)
                .do_nothing()
                .to_owned(),
        )
        .exec_with_returning_keys(conn)
        .await;
    match inserted {
        Ok(keys) => Ok(keys.into_iter().collect()),
        // Every id was processed before: nothing came back.
        Err(DbErr::RecordNotInserted) => Ok(HashSet::new()),
        Err(e) => Err(e),
    }
}
