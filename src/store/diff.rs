//! The diff writer: what a decision changed, as rows, written as few statements as possible. A `WriteSet`
//! gathers the rows of one unit of work, or of several units of different batches (a group), and `flush` writes
//! each table's rows in one statement: the batch rows' compare-and-set first — on PostgreSQL it takes the row locks
//! that serialise every other writer of those batches, and a lost race shows up as fewer rows updated before any
//! child row is touched — then the child rows, parents before children. Child rows carry no version of their own,
//! except phase executions, which are compare-and-set as well.

use std::collections::{HashMap, HashSet};

use sea_orm::{ActiveValue, DatabaseTransaction, EntityTrait, IntoActiveModel};

use super::entities::{
    batch_essays, batches, essay_phase_results, phase_executions, pipeline_runs,
};
use super::faults::{FaultPlan, FaultPoint};
use super::mapping::{batch_to_row, essay_to_row, phase_to_row, result_to_row, run_to_row};
use super::repository::AttemptError;
use super::rows::{insert_rows, update_rows, OnKey, RowUpdate};
use super::StoreError;
use crate::core::ids::BatchId;
use crate::core::model::BatchAggregate;

/// The rows a set of decisions writes, by table. Holds at most one change per batch: a second decision about a
/// batch must wait for the first one's rows to be flushed (`holds`), because it is compared against them.
#[derive(Default)]
pub(super) struct WriteSet {
    batches: HashSet<BatchId>,
    batch_inserts: Vec<batches::Model>,
    batch_updates: Vec<(batches::Model, i64)>,
    /// Essays the stored aggregate does not have yet: a plain INSERT, as the batch row's compare-and-set (or its
    /// insert) has already shown that no row of theirs exists. An upsert cost PostgreSQL a third more per row.
    essay_inserts: Vec<batch_essays::Model>,
    /// Essays the stored aggregate has, changed.
    essay_updates: Vec<batch_essays::Model>,
    run_inserts: Vec<pipeline_runs::Model>,
    run_updates: Vec<(pipeline_runs::Model, i64)>,
    phase_inserts: Vec<phase_executions::ActiveModel>,
    phase_updates: Vec<(phase_executions::Model, i64)>,
    results: Vec<essay_phase_results::Model>,
}

const NEW_BATCH: OnKey<batches::Column> = OnKey {
    keys: &[batches::Column::Id],
    update: &[],
};

const ESSAY_UPSERT: OnKey<batch_essays::Column> = OnKey {
    keys: &[batch_essays::Column::BatchId, batch_essays::Column::EssayId],
    update: &[
        batch_essays::Column::Position,
        batch_essays::Column::TextRef,
        batch_essays::Column::StudentId,
        batch_essays::Column::Status,
        batch_essays::Column::ValidationError,
    ],
};

const RESULT_UPSERT: OnKey<essay_phase_results::Column> = OnKey {
    keys: &[
        essay_phase_results::Column::BatchId,
        essay_phase_results::Column::EssayId,
        essay_phase_results::Column::Phase,
    ],
    update: &[
        essay_phase_results::Column::RunId,
        essay_phase_results::Column::Attempt,
        essay_phase_results::Column::Succeeded,
        essay_phase_results::Column::OutputRef,
    ],
};

const BATCH_CAS: RowUpdate<batches::Column> = RowUpdate {
    keys: &[batches::Column::Id],
    fixed: &[],
    version: Some(batches::Column::Version),
};

const RUN_UPDATE: RowUpdate<pipeline_runs::Column> = RowUpdate {
    keys: &[pipeline_runs::Column::Id, pipeline_runs::Column::BatchId],
    fixed: &[],
    version: None,
};

const PHASE_CAS: RowUpdate<phase_executions::Column> = RowUpdate {
    keys: &[
        phase_executions::Column::RunId,
        phase_executions::Column::Phase,
    ],
    fixed: &[phase_executions::Column::Id],
    version: Some(phase_executions::Column::Version),
};

impl WriteSet {
    pub(super) fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// Whether rows of `batch_id` wait to be flushed.
    pub(super) fn holds(&self, batch_id: BatchId) -> bool {
        self.batches.contains(&batch_id)
    }

    /// Adds the rows that take the stored aggregate `old` (None: a new batch) to `new`, and sets `new`'s versions
    /// to those the rows will have once flushed.
    pub(super) fn plan(
        &mut self,
        old: Option<&BatchAggregate>,
        new: &mut BatchAggregate,
    ) -> Result<(), AttemptError> {
        if !self.batches.insert(new.batch.id) {
            return Err(StoreError::Corrupt(format!(
                "batch {} planned twice before a flush",
                new.batch.id
            ))
            .into());
        }
        match old {
            None => {
                new.batch.version = 0;
                self.batch_inserts
                    .push(batch_to_row(&new.batch).map_err(StoreError::from)?);
            }
            Some(old) => {
                let expected = old.batch.version;
                new.batch.version = expected + 1;
                self.batch_updates.push((
                    batch_to_row(&new.batch).map_err(StoreError::from)?,
                    expected,
                ));
            }
        }
        self.plan_children(old, new)
    }

    /// Writes every planned row, one statement per table and kind, and empties the set. A lost compare-and-set of
    /// a batch row is `StaleBatch` (nothing of the set was written); of any other row, `Conflict`.
    pub(super) async fn flush(
        &mut self,
        txn: &DatabaseTransaction,
        faults: &FaultPlan,
    ) -> Result<(), AttemptError> {
        let set = std::mem::take(self);
        if set.is_empty() {
            return Ok(());
        }
        // A concurrent registration of the same id makes this insert wait and then do nothing; a retry reads the
        // winner and `decide` rejects with AlreadyExists.
        let new_batches = set.batch_inserts.len() as u64;
        if insert_rows::<batches::Entity, _, _>(txn, set.batch_inserts, Some(&NEW_BATCH)).await?
            != new_batches
        {
            return Err(AttemptError::Conflict);
        }
        let moved = set.batch_updates.len() as u64;
        if update_rows::<batches::Entity>(txn, set.batch_updates, &BATCH_CAS).await? != moved {
            return Err(AttemptError::StaleBatch);
        }
        faults.hit(FaultPoint::AfterCas)?;
        insert_all::<batch_essays::Entity, _>(txn, set.essay_inserts, None).await?;
        insert_all::<batch_essays::Entity, _>(txn, set.essay_updates, Some(&ESSAY_UPSERT)).await?;
        insert_all::<pipeline_runs::Entity, _>(txn, set.run_inserts, None).await?;
        update_all::<pipeline_runs::Entity>(txn, set.run_updates, &RUN_UPDATE).await?;
        insert_all::<phase_executions::Entity, _>(txn, set.phase_inserts, None).await?;
        update_all::<phase_executions::Entity>(txn, set.phase_updates, &PHASE_CAS).await?;
        insert_all::<essay_phase_results::Entity, _>(txn, set.results, Some(&RESULT_UPSERT)).await
    }

    /// Plans every child row that is new or changed. Phase executions are compare-and-set on their own version.
    fn plan_children(
        &mut self,
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
        for (position, essay) in new.essays.iter().enumerate() {
            let row = || essay_to_row(batch_id, position, essay).map_err(StoreError::from);
            match old_essays.get(&essay.id) {
                None => self.essay_inserts.push(row()?),
                Some((old_pos, old_essay)) if *old_pos != position || *old_essay != essay => {
                    self.essay_updates.push(row()?)
                }
                Some(_) => {}
            }
        }
        let kept: HashSet<_> = new.essays.iter().map(|e| e.id).collect();
        if let Some(gone) = old.essays.iter().find(|e| !kept.contains(&e.id)) {
            return Err(missing("essay", gone.id));
        }

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
                None => self.run_inserts.push(run_row),
                Some((old_seq, old_run)) => {
                    let before =
                        run_to_row(batch_id, *old_seq, old_run).map_err(StoreError::from)?;
                    if before != run_row {
                        self.run_updates.push((run_row, 0));
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
                        self.phase_inserts.push(row);
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
                        self.phase_updates.push((after, expected));
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
        for result in &new.results {
            if old_results.get(&(result.essay_id, result.phase)) != Some(&result) {
                self.results
                    .push(result_to_row(batch_id, result).map_err(StoreError::from)?);
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
        Ok(())
    }
}

/// Inserts (or upserts) every row; fewer written means a row went missing under us.
async fn insert_all<E, M>(
    txn: &DatabaseTransaction,
    rows: Vec<M>,
    on_key: Option<&OnKey<E::Column>>,
) -> Result<(), AttemptError>
where
    E: EntityTrait,
    M: IntoActiveModel<E::ActiveModel> + Send,
{
    let planned = rows.len() as u64;
    expect_all(insert_rows::<E, _, _>(txn, rows, on_key).await?, planned)
}

/// Updates every row; fewer updated means a compare-and-set lost.
async fn update_all<E>(
    txn: &DatabaseTransaction,
    rows: Vec<(E::Model, i64)>,
    how: &RowUpdate<E::Column>,
) -> Result<(), AttemptError>
where
    E: EntityTrait,
    E::Model: IntoActiveModel<E::ActiveModel>,
{
    let planned = rows.len() as u64;
    expect_all(update_rows::<E>(txn, rows, how).await?, planned)
}

fn expect_all(written: u64, planned: u64) -> Result<(), AttemptError> {
    if written == planned {
        Ok(())
    } else {
        Err(AttemptError::Conflict)
    }
}

fn missing(what: &str, id: impl std::fmt::Display) -> AttemptError {
    AttemptError::Store(StoreError::Corrupt(format!(
        "decide dropped {what} {id}; rows are never deleted"
    )))
}
