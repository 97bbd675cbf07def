//! The diff writer: what a decision changed, written as the fewest statements. The batch row's compare-and-set
//! comes first and always: on PostgreSQL it takes the row lock that serialises every other writer of the batch, and a
//! lost race shows up as `rows_affected == 0` before any child row is touched. Child rows are then written without
//! their own version, except phase executions, which carry one and are compare-and-set as well.

use std::collections::{HashMap, HashSet};

use sea_orm::sea_query::{Expr, IntoColumnRef, OnConflict};
use sea_orm::{
    ActiveModelTrait, ActiveValue, ColumnTrait, DatabaseTransaction, EntityTrait, IntoActiveModel,
    Iterable, QueryFilter, TryInsertResult,
};

use super::entities::{
    batch_essays, batches, essay_phase_results, phase_executions, pipeline_runs,
};
use super::mapping::{batch_to_row, essay_to_row, phase_to_row, result_to_row, run_to_row};
use super::repository::AttemptError;
use super::StoreError;
use crate::core::model::BatchAggregate;

/// Bind parameters per statement we allow ourselves: under SQLite's 32,766 and PostgreSQL's 65,535.
const MAX_BIND_PARAMS: usize = 30_000;

/// Inserts a new batch, or compare-and-sets the existing one; sets the aggregate's version to the stored one.
pub(super) async fn write_batch(
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
                return Err(AttemptError::StaleBatch);
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
pub(super) async fn write_children(
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
