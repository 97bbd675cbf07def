//! `BatchRepository` on SeaORM: the unit of work. What a decision changed is written by `diff`.
//!
//! A unit decides from the newest aggregate this process knows of (the aggregate cache) without reading the
//! database first: the batch row's compare-and-set, the first statement of every change, proves the guess. Only
//! a guess that no compare-and-set proved (it lost, or the decision wrote nothing, or was a rejection) is checked
//! against the stored batch row, and decided again when it was stale — unless the core says the unit is settled:
//! no later state of the batch could make it change anything (`core::settled`), so no read can change the answer.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use rand::Rng;
use sea_orm::DatabaseTransaction;
use uuid::Uuid;

use super::cache::canonical;
use super::diff::WriteSet;
use super::faults::FaultPoint;
use super::outbox::insert_messages;
use super::{inbox, queries, Store, StoreError};
use crate::core::effect::Effect;
use crate::core::ids::{BatchId, EventId, UserId};
use crate::core::machine::decide;
use crate::core::model::BatchAggregate;
use crate::core::ports::{
    Applied, BatchPage, BatchRepository, BoxFuture, RepositoryError, TimedOutPhase, UnitOfWork,
};
use crate::core::rejection::Rejection;
use crate::core::settled;

/// A unit decided, its rows planned into a `WriteSet`; its outbox rows and the commit are the caller's.
pub(super) struct Written {
    pub(super) aggregate: BatchAggregate,
    pub(super) effects: Vec<Effect>,
    pub(super) messages: Vec<(EventId, super::OutboxMessage)>,
    /// False when the decision changed nothing: then nothing was written and the version stands.
    pub(super) changed: bool,
}

/// Why one attempt of a unit did not commit.
pub(super) enum AttemptError {
    /// A compare-and-set lost; re-read and decide again.
    Conflict,
    /// A batch row's compare-and-set lost: a unit decided from a stale aggregate, and nothing of the flush was
    /// written.
    StaleBatch,
    Rejected(Rejection),
    Store(StoreError),
}

impl From<StoreError> for AttemptError {
    fn from(e: StoreError) -> Self {
        AttemptError::Store(e)
    }
}

impl From<sea_orm::DbErr> for AttemptError {
    fn from(e: sea_orm::DbErr) -> Self {
        AttemptError::Store(StoreError::Database(e))
    }
}

impl From<super::faults::InjectedFault> for AttemptError {
    fn from(e: super::faults::InjectedFault) -> Self {
        AttemptError::Store(StoreError::Fault(e))
    }
}

impl Store {
    /// Runs one unit of work (see `BatchRepository::apply`).
    pub async fn apply_unit(
        &self,
        unit: UnitOfWork,
        now: DateTime<Utc>,
    ) -> Result<Applied, RepositoryError> {
        if let Some(applied) = self.settled_unit(&unit) {
            return Ok(applied);
        }
        // The database keeps microseconds; deciding with the stored precision makes the returned aggregate equal
        // to what a later load reads.
        let now = now.trunc_subsecs(6);
        let _writer = self.write_guard().await;
        let attempts = self.config.max_cas_attempts.max(1);
        for attempt in 1..=attempts {
            match self.try_apply(&unit, now).await {
                Ok(applied) => return Ok(applied),
                Err(AttemptError::Rejected(r)) => return Err(RepositoryError::Rejected(r)),
                Err(AttemptError::Store(e)) => return Err(e.into()),
                Err(AttemptError::Conflict | AttemptError::StaleBatch) if attempt < attempts => {
                    tokio::time::sleep(self.backoff(attempt)).await;
                }
                Err(AttemptError::Conflict | AttemptError::StaleBatch) => {}
            }
        }
        Err(RepositoryError::Conflict { attempts })
    }

    /// The answer to a unit that the newest cached aggregate shows can change nothing in any state of the batch
    /// from that one on (`core::settled`; a delivery report whose outcome came first): that aggregate and no
    /// effects, without a transaction. The aggregate may trail the stored one; nothing the unit could do depends on
    /// the difference. A unit with an inbox entry always runs, as its event id must be recorded.
    pub(crate) fn settled_unit(&self, unit: &UnitOfWork) -> Option<Applied> {
        if unit.inbox.is_some() {
            return None;
        }
        let newest = self.cache.newest(unit.batch_id)?;
        if !settled(&newest, &unit.input) {
            return None;
        }
        metrics::counter!("store_settled_units_total").increment(1);
        Some(Applied::Changed {
            aggregate: Box::new(newest.as_ref().clone()),
            effects: Vec::new(),
        })
    }

    /// Full jitter over an exponentially growing window, so the losers of one race do not collide again.
    fn backoff(&self, attempt: u32) -> Duration {
        let window = self
            .config
            .cas_backoff
            .saturating_mul(1u32 << attempt.min(10));
        let micros = u64::try_from(window.as_micros()).unwrap_or(u64::MAX).max(1);
        Duration::from_micros(rand::rng().random_range(0..=micros))
    }

    async fn try_apply(
        &self,
        unit: &UnitOfWork,
        now: DateTime<Utc>,
    ) -> Result<Applied, AttemptError> {
        let ticket = self.cache.ticket();
        let txn = self.begin_write().await?;
        if let Some(entry) = &unit.inbox {
            if !inbox::record(&txn, entry, now).await? {
                txn.commit().await?;
                return Ok(Applied::Duplicate);
            }
            self.faults.hit(FaultPoint::AfterInbox)?;
        }
        let written = match self.decide_and_flush(&txn, unit, now).await {
            Err(AttemptError::Rejected(rejection)) => {
                txn.rollback().await?;
                return Err(AttemptError::Rejected(rejection));
            }
            other => other?,
        };
        insert_messages(&txn, written.messages, now).await?;
        self.faults.hit(FaultPoint::BeforeCommit)?;
        txn.commit().await?;
        if written.changed {
            // What the database now holds, so the batch's next unit of work reads one row instead of five.
            self.cache
                .put(Arc::new(canonical(written.aggregate.clone())), ticket);
        }
        self.faults.hit(FaultPoint::AfterCommit)?;
        Ok(Applied::Changed {
            aggregate: Box::new(written.aggregate),
            effects: written.effects,
        })
    }

    /// One unit's decision and its rows, written: a guess that the batch row's compare-and-set refutes (another
    /// replica moved the batch on) is decided again on the stored aggregate at once.
    async fn decide_and_flush(
        &self,
        txn: &DatabaseTransaction,
        unit: &UnitOfWork,
        now: DateTime<Utc>,
    ) -> Result<Written, AttemptError> {
        let mut writes = WriteSet::default();
        let written = self.decide_from_newest(txn, unit, now, &mut writes).await?;
        match writes.flush(txn, &self.faults).await {
            Err(AttemptError::StaleBatch) => {}
            flushed => return flushed.map(|()| written),
        }
        metrics::counter!("store_stale_guesses_total").increment(1);
        let written = self.decide_from_stored(txn, unit, now, &mut writes).await?;
        writes.flush(txn, &self.faults).await?;
        Ok(written)
    }

    /// `decide_into` from the newest aggregate this process knows of, read from `txn` only when there is none or
    /// the decision writes nothing (see the module documentation). `writes` must not hold rows of the unit's batch.
    pub(super) async fn decide_from_newest(
        &self,
        txn: &DatabaseTransaction,
        unit: &UnitOfWork,
        now: DateTime<Utc>,
        writes: &mut WriteSet,
    ) -> Result<Written, AttemptError> {
        let Some(guess) = self.cache.newest(unit.batch_id) else {
            return self.decide_from_stored(txn, unit, now, writes).await;
        };
        let guessed = self.decide_into(Some(&guess), unit, now, writes);
        match &guessed {
            // The batch row's compare-and-set, when the rows are flushed, proves or refutes it.
            Ok(written) if written.changed => return guessed,
            // Nothing written and nothing any later state could change: the guess is as good as the stored state.
            Ok(_) if settled(&guess, &unit.input) => return guessed,
            // Nothing is written, so nothing will prove the guess: it stands if the batch row is at its version.
            Ok(_) | Err(AttemptError::Rejected(_)) => {}
            Err(_) => return guessed,
        }
        let stored = queries::load_in(txn, unit.batch_id, Some(&self.cache)).await?;
        if stored.as_ref().map(|a| a.batch.version) == Some(guess.batch.version) {
            return guessed;
        }
        metrics::counter!("store_stale_guesses_total").increment(1);
        self.decide_into(stored.as_ref(), unit, now, writes)
    }

    /// `decide_into` from the aggregate as `txn` reads it.
    async fn decide_from_stored(
        &self,
        txn: &DatabaseTransaction,
        unit: &UnitOfWork,
        now: DateTime<Utc>,
        writes: &mut WriteSet,
    ) -> Result<Written, AttemptError> {
        let stored = queries::load_in(txn, unit.batch_id, Some(&self.cache)).await?;
        self.decide_into(stored.as_ref(), unit, now, writes)
    }

    /// decide → the changed rows into `writes` → the outbox messages, from the aggregate `old`; nothing touches
    /// the database. The outbox rows come back for the caller to insert (a group inserts every unit's rows in one
    /// statement).
    pub(super) fn decide_into(
        &self,
        old: Option<&BatchAggregate>,
        unit: &UnitOfWork,
        now: DateTime<Utc>,
        writes: &mut WriteSet,
    ) -> Result<Written, AttemptError> {
        let decision = decide(old, &unit.input, now).map_err(AttemptError::Rejected)?;
        let mut aggregate = decision.aggregate;
        if aggregate.batch.id != unit.batch_id {
            return Err(StoreError::Corrupt(format!(
                "decide returned batch {} for unit of batch {}",
                aggregate.batch.id, unit.batch_id
            ))
            .into());
        }
        let changed = old != Some(&aggregate) || !decision.effects.is_empty();
        let mut messages = Vec::new();
        if changed {
            writes.plan(old, &mut aggregate)?;
            messages = self.encode(&decision.effects, now)?;
        }
        Ok(Written {
            aggregate,
            effects: decision.effects,
            messages,
            changed,
        })
    }

    fn encode(
        &self,
        effects: &[Effect],
        now: DateTime<Utc>,
    ) -> Result<Vec<(EventId, super::OutboxMessage)>, StoreError> {
        let publishes: Vec<_> = effects
            .iter()
            .filter_map(|e| match e {
                Effect::Publish(event) => Some(event),
                Effect::Notify(_) => None,
            })
            .collect();
        if publishes.is_empty() {
            return Ok(Vec::new());
        }
        let encoder = self.encoder.as_ref().ok_or_else(|| {
            StoreError::Corrupt("no effect encoder configured for the outbox".to_owned())
        })?;
        publishes
            .into_iter()
            .map(|event| {
                let event_id = EventId::from_uuid(Uuid::now_v7());
                let message = encoder
                    .encode(event, event_id, now)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                Ok((event_id, message))
            })
            .collect()
    }
}

impl BatchRepository for Store {
    fn apply<'a>(
        &'a self,
        unit: UnitOfWork,
        now: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<Applied, RepositoryError>> {
        Box::pin(self.apply_unit(unit, now))
    }

    fn load<'a>(
        &'a self,
        batch_id: BatchId,
    ) -> BoxFuture<'a, Result<Option<BatchAggregate>, RepositoryError>> {
        Box::pin(async move { Ok(self.load_aggregate(batch_id).await?) })
    }

    fn read<'a>(
        &'a self,
        batch_id: BatchId,
    ) -> BoxFuture<'a, Result<Option<BatchAggregate>, RepositoryError>> {
        Box::pin(async move { Ok(self.read_aggregate(batch_id).await?) })
    }

    fn list_batches<'a>(
        &'a self,
        owner: &'a UserId,
        page_size: u32,
        page_token: Option<&'a str>,
    ) -> BoxFuture<'a, Result<BatchPage, RepositoryError>> {
        Box::pin(self.list_owned(owner, page_size, page_token))
    }

    fn timed_out_phases<'a>(
        &'a self,
        dispatched_before: DateTime<Utc>,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<TimedOutPhase>, RepositoryError>> {
        Box::pin(async move {
            Ok(self
                .phases_dispatched_before(dispatched_before, limit)
                .await?)
        })
    }

    fn is_processed<'a>(
        &'a self,
        event_id: EventId,
    ) -> BoxFuture<'a, Result<bool, RepositoryError>> {
        Box::pin(async move { Ok(Store::is_processed(self, event_id).await?) })
    }
}
