//! `BatchRepository` on SeaORM: the unit of work and the diff writer.
//!
//! The batch row's compare-and-set is written first and always (unless the decision changed nothing at all): on
//! PostgreSQL it takes the row lock that serialises every other writer of the batch, and a lost race shows up as
//! `rows_affected == 0` before any child row is touched. Child rows are then written without their own version,
//! except phase executions, which carry one and are compare-and-set as well.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use rand::Rng;
use sea_orm::sea_query::{Expr, IntoColumnRef, OnConflict};
use sea_orm::{
    ActiveModelTrait, ActiveValue, ColumnTrait, DatabaseTransaction, EntityTrait, IntoActiveModel,
    Iterable, QueryFilter, TryInsertResult,
};
use uuid::Uuid;

use super::cache::canonical;
use super::entities::{
    batch_essays, batches, essay_phase_results, phase_executions, pipeline_runs,
};
use super::faults::FaultPoint;
use super::mapping::{batch_to_row, essay_to_row, phase_to_row, result_to_row, run_to_row};
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

/// Bind parameters per statement we allow ourselves: under SQLite's 32,766 and PostgreSQL's 65,535.
const MAX_BIND_PARAMS: usize = 30_000;

/// A unit decided and written inside an open transaction, before its outbox rows and the commit.
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
                Err(AttemptError::Conflict) if attempt < attempts => {
                    tokio::time::sleep(self.backoff(attempt)).await;
                }
                Err(AttemptError::Conflict) => {}
            }
        }
        Err(RepositoryError::Conflict { attempts })
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
        let old = queries::load_in(&txn, unit.batch_id, Some(&self.cache)).await?;
        let written = match self.decide_and_write(&txn, old.as_ref(), unit, now).await {
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

    /// decide → batch compare-and-set → child rows, inside `txn`, from the aggregate `old` as `txn` sees it. The
    /// outbox rows come back for the caller to insert (a group inserts every unit's rows in one statement).
    pub(super) async fn decide_and_write(
        &self,
        txn: &DatabaseTransaction,
        old: Option<&BatchAggregate>,
        unit: &UnitOfWork,
        now: DateTime<Utc>,
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
            write_batch(txn, old, &mut aggregate).await?;
            self.faults.hit(FaultPoint::AfterCas)?;
            write_children(txn, old, &mut aggregate).await?;
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

/// Inserts a new batch, or compare-and-sets the existing one; sets the aggregate's version to the stored one.
async fn write_batch(
    txn: &DatabaseTransaction,
    old: Option<&BatchAggregate>,
    new: &mut BatchAggregate,
) -> Result<(), AttemptError> {
    match old {
        None => {
            new.batch.version = 0;
            let row = batch_to_row(&new.batch).map_err(StoreError::from)?;
            // A concurrent registration of the same id makes this insert wait and then do nothing; the retry
            // reads the winner and `decide` rejects with AlreadyExists.
            let inserted = batches::Entity::insert(row.into_active_model())
                .on_conflict_do_nothing_on([batches::Column::Id])
                .exec_without_returning(txn)
                .await?;
            if !matches!(inserted, TryInsertResult::Inserted(1)) {
                return Err(AttemptError::Conflict);
            }
        }
        Some(old) => {
            let expected = old.batch.version;
            new.batch.version = expected;
            let before = batch_to_row(&old.batch).map_err(StoreError::from)?;
            let after = batch_to_row(&new.batch).map_err(StoreError::from)?;
            let result = batches::Entity::update_many()
                .set(changes(before, after))
                .col_expr(batches::Column::Version, plus_one(batches::Column::Version))
                .filter(batches::Column::Id.eq(new.batch.id.as_uuid()))
                .filter(batches::Column::Version.eq(expected))
                .exec(txn)
                .await?;
            if result.rows_affected != 1 {
                return Err(AttemptError::Conflict);
            }
            new.batch.version = expected + 1;
        }
    }
    Ok(())
}

/// `col + 1`, the version bump of a compare-and-set.
fn plus_one(col: impl IntoColumnRef) -> Expr {
    // Called as a function: importing the trait would shadow `Ord::max`/`min` on integers in this module.
    sea_orm::sea_query::ExprTrait::add(Expr::col(col), 1)
}

/// The columns whose value differs between two rows, as `Set` values; everything else stays out of the UPDATE.
fn changes<M, A>(before: M, after: M) -> A
where
    M: IntoActiveModel<A>,
    A: ActiveModelTrait,
{
    let mut out = before.into_active_model();
    let after = after.into_active_model();
    for col in <A::Entity as EntityTrait>::Column::iter() {
        let old = out.get(col).into_value();
        let new = after.get(col).into_value();
        if let Some(new) = new {
            if old.as_ref() != Some(&new) {
                out.set(col, new);
            }
        }
    }
    out
}

fn missing(what: &str, id: impl std::fmt::Display) -> AttemptError {
    AttemptError::Store(StoreError::Corrupt(format!(
        "decide dropped {what} {id}; rows are never deleted"
    )))
}

/// Writes every child row that is new or changed. Phase executions are compare-and-set on their own version.
async fn write_children(
    txn: &DatabaseTransaction,
    old: Option<&BatchAggregate>,
    new: &mut BatchAggregate,
) -> Result<(), AttemptError> {
    let batch_id = new.batch.id.as_uuid();
    let empty = BatchAggregate {
        batch: new.batch.clone(),
        essays: Vec::new(),
        results: Vec::new(),
        runs: Vec::new(),
    };
    let old = old.unwrap_or(&empty);

    // Essays: bulk insert the new ones, bulk upsert the changed ones (both inside the batch's compare-and-set).
    let old_essays: HashMap<_, _> = old
        .essays
        .iter()
        .enumerate()
        .map(|(i, e)| (e.id, (i, e)))
        .collect();
    let (mut inserts, mut updates) = (Vec::new(), Vec::new());
    for (position, essay) in new.essays.iter().enumerate() {
        match old_essays.get(&essay.id) {
            None => {
                inserts.push(essay_to_row(batch_id, position, essay).map_err(StoreError::from)?)
            }
            Some((old_pos, old_essay)) if *old_pos != position || *old_essay != essay => {
                updates.push(essay_to_row(batch_id, position, essay).map_err(StoreError::from)?)
            }
            Some(_) => {}
        }
    }
    let kept: HashSet<_> = new.essays.iter().map(|e| e.id).collect();
    if let Some(gone) = old.essays.iter().find(|e| !kept.contains(&e.id)) {
        return Err(missing("essay", gone.id));
    }
    bulk_write::<batch_essays::Entity, _>(
        txn,
        inserts,
        updates,
        OnConflict::columns([batch_essays::Column::BatchId, batch_essays::Column::EssayId])
            .update_columns([
                batch_essays::Column::Position,
                batch_essays::Column::TextRef,
                batch_essays::Column::StudentId,
                batch_essays::Column::Status,
                batch_essays::Column::ValidationError,
            ])
            .to_owned(),
    )
    .await?;

    // Runs and their phases.
    let old_runs: HashMap<_, _> = old
        .runs
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id, (i, r)))
        .collect();
    for (seq, run) in new.runs.iter_mut().enumerate() {
        let run_row = run_to_row(batch_id, seq, run).map_err(StoreError::from)?;
        let old_run = old_runs.get(&run.id);
        match old_run {
            None => {
                pipeline_runs::Entity::insert(run_row.into_active_model())
                    .exec_without_returning(txn)
                    .await?;
            }
            Some((old_seq, old_run)) => {
                let before = run_to_row(batch_id, *old_seq, old_run).map_err(StoreError::from)?;
                if before != run_row {
                    let result = pipeline_runs::Entity::update_many()
                        .set(changes(before, run_row))
                        .filter(pipeline_runs::Column::Id.eq(run.id.as_uuid()))
                        .filter(pipeline_runs::Column::BatchId.eq(batch_id))
                        .exec(txn)
                        .await?;
                    if result.rows_affected != 1 {
                        return Err(AttemptError::Conflict);
                    }
                }
            }
        }
        let old_phases: HashMap<_, _> = old_run
            .map(|(_, r)| {
                r.phases
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (p.phase, (i, p)))
                    .collect()
            })
            .unwrap_or_default();
        if let Some((_, old_run)) = old_run {
            if let Some(gone) = old_run.phases.iter().find(|p| run.phase(p.phase).is_none()) {
                return Err(missing(
                    "phase",
                    format!("{} of run {}", gone.phase, run.id),
                ));
            }
        }
        let run_id = run.id.as_uuid();
        for (position, phase) in run.phases.iter_mut().enumerate() {
            match old_phases.get(&phase.phase) {
                None => {
                    phase.version = 0;
                    let mut row = phase_to_row(batch_id, run_id, position, phase)
                        .map_err(StoreError::from)?
                        .into_active_model();
                    row.id = ActiveValue::NotSet;
                    phase_executions::Entity::insert(row)
                        .exec_without_returning(txn)
                        .await?;
                }
                Some((old_pos, old_phase)) => {
                    let expected = old_phase.version;
                    phase.version = expected;
                    let before = phase_to_row(batch_id, run_id, *old_pos, old_phase)
                        .map_err(StoreError::from)?;
                    let after = phase_to_row(batch_id, run_id, position, phase)
                        .map_err(StoreError::from)?;
                    if before == after {
                        continue;
                    }
                    let result = phase_executions::Entity::update_many()
                        .set(changes(before, after))
                        .col_expr(
                            phase_executions::Column::Version,
                            plus_one(phase_executions::Column::Version),
                        )
                        .filter(phase_executions::Column::RunId.eq(run_id))
                        .filter(phase_executions::Column::Phase.eq(phase.phase.as_str()))
                        .filter(phase_executions::Column::Version.eq(expected))
                        .exec(txn)
                        .await?;
                    if result.rows_affected != 1 {
                        return Err(AttemptError::Conflict);
                    }
                    phase.version = expected + 1;
                }
            }
        }
    }
    if let Some(gone) = old
        .runs
        .iter()
        .find(|r| !new.runs.iter().any(|n| n.id == r.id))
    {
        return Err(missing("run", gone.id));
    }

    // Per-essay phase results: one row per (essay, phase), the latest attempt's.
    let old_results: HashMap<_, _> = old
        .results
        .iter()
        .map(|r| ((r.essay_id, r.phase), r))
        .collect();
    let (mut inserts, mut updates) = (Vec::new(), Vec::new());
    for result in &new.results {
        match old_results.get(&(result.essay_id, result.phase)) {
            None => inserts.push(result_to_row(batch_id, result).map_err(StoreError::from)?),
            Some(old) if *old != result => {
                updates.push(result_to_row(batch_id, result).map_err(StoreError::from)?)
            }
            Some(_) => {}
        }
    }
    if let Some(gone) = old.results.iter().find(|r| {
        !new.results
            .iter()
            .any(|n| n.essay_id == r.essay_id && n.phase == r.phase)
    }) {
        return Err(missing(
            "result",
            format!("{} of essay {}", gone.phase, gone.essay_id),
        ));
    }
    bulk_write::<essay_phase_results::Entity, _>(
        txn,
        inserts,
        updates,
        OnConflict::columns([
            essay_phase_results::Column::BatchId,
            essay_phase_results::Column::EssayId,
            essay_phase_results::Column::Phase,
        ])
        .update_columns([
            essay_phase_results::Column::RunId,
            essay_phase_results::Column::Attempt,
            essay_phase_results::Column::Succeeded,
            essay_phase_results::Column::OutputRef,
        ])
        .to_owned(),
    )
    .await?;
    Ok(())
}

/// Inserts new rows and upserts changed rows in as few statements as the bind-parameter limit allows, checking
/// that every row was written.
async fn bulk_write<E, M>(
    txn: &DatabaseTransaction,
    inserts: Vec<M>,
    updates: Vec<M>,
    upsert: OnConflict,
) -> Result<(), AttemptError>
where
    E: EntityTrait,
    M: IntoActiveModel<E::ActiveModel> + Clone + Send,
    E::ActiveModel: Send,
{
    let per_row = <E::Column as Iterable>::iter().count().max(1);
    let chunk = (MAX_BIND_PARAMS / per_row).max(1);
    for rows in inserts.chunks(chunk) {
        let n = rows.len() as u64;
        let written = E::insert_many(rows.iter().cloned().map(IntoActiveModel::into_active_model))
            .exec_without_returning(txn)
            .await?;
        if written != n {
            return Err(AttemptError::Conflict);
        }
    }
    for rows in updates.chunks(chunk) {
        let n = rows.len() as u64;
        let written = E::insert_many(rows.iter().cloned().map(IntoActiveModel::into_active_model))
            .on_conflict(upsert.clone())
            .exec_without_returning(txn)
            .await?;
        if written != n {
            return Err(AttemptError::Conflict);
        }
    }
    Ok(())
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
