//! The group committer: the `BatchRepository` the service runs on. Units of work from every caller (partition
//! workers, delivery reports, API calls, the timeout scanner) queue per lane; a lane runs whatever queued while its
//! previous group was committing as one group (`Store::apply_group`). Nothing waits to fill a group: an idle lane
//! commits a lone unit at once, and a busy one amortises its commit over everything that arrived meanwhile.
//!
//! A batch always maps to the same lane, so two groups of one replica never race for the same batch row; lanes
//! run side by side on their own connections. The lane tells the commit observers about each committed unit before
//! it answers the callers, so observers see a batch's states in commit order however the callers are scheduled.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};

use super::Store;
use crate::core::ids::{BatchId, EventId, UserId};
use crate::core::model::BatchAggregate;
use crate::core::ports::{
    Applied, BatchPage, BatchRepository, BoxFuture, CommitObserver, RepositoryError, TimedOutPhase,
    UnitOfWork,
};

/// Lanes unless configured (`BOS_COMMIT_LANES`); the store's write pool has as many connections by default. Two,
/// as where BOS shares a few CPUs with PostgreSQL the CPU decides: fewer lanes make larger groups and less database
/// work per transition, and two kept up with 1,000 transitions/s where one did not (BENCHMARKS.md, changes 21, 24).
pub const DEFAULT_COMMIT_LANES: u32 = 2;

/// Tunables of the group committer.
#[derive(Debug, Clone, Copy)]
pub struct GroupCommitConfig {
    /// Groups committing at once (each on its own connection). More lanes: smaller groups, shorter waits behind a
    /// group in progress; fewer: larger groups, less database CPU per transition. The balance is the machine's
    /// (`bos bench latency` with `BOS_COMMIT_LANES` set per run; figures in BENCHMARKS.md).
    pub lanes: usize,
    /// Most units in one group.
    pub max_units: usize,
}

impl Default for GroupCommitConfig {
    fn default() -> Self {
        Self {
            lanes: DEFAULT_COMMIT_LANES as usize,
            max_units: 64,
        }
    }
}

struct Queued {
    unit: UnitOfWork,
    now: DateTime<Utc>,
    reply: oneshot::Sender<Result<Applied, RepositoryError>>,
}

/// Groups and units committed so far, for operators and tests.
#[derive(Debug, Default)]
struct Counters {
    groups: AtomicU64,
    units: AtomicU64,
}

/// A snapshot of the committer's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupCommitStats {
    pub groups: u64,
    pub units: u64,
}

/// A `BatchRepository` that commits units of work in groups; reads go straight to the store.
pub struct GroupCommitter {
    store: Store,
    counters: Arc<Counters>,
    lanes: Vec<mpsc::Sender<Queued>>,
    hasher: std::collections::hash_map::RandomState,
}

impl GroupCommitter {
    /// Starts the lanes on the current runtime; they stop when the committer is dropped. `observers` hear of every
    /// committed unit.
    pub fn start(
        store: Store,
        config: GroupCommitConfig,
        observers: Vec<Arc<dyn CommitObserver>>,
    ) -> Self {
        let observers: Arc<[Arc<dyn CommitObserver>]> = observers.into();
        let max_units = config.max_units.max(1);
        let counters = Arc::new(Counters::default());
        let lanes = (0..config.lanes.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::channel(max_units * 4);
                tokio::spawn(run_lane(
                    store.clone(),
                    rx,
                    max_units,
                    counters.clone(),
                    observers.clone(),
                ));
                tx
            })
            .collect();
        Self {
            store,
            counters,
            lanes,
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    pub fn stats(&self) -> GroupCommitStats {
        GroupCommitStats {
            groups: self.counters.groups.load(Ordering::Relaxed),
            units: self.counters.units.load(Ordering::Relaxed),
        }
    }

    fn lane(&self, batch_id: BatchId) -> &mpsc::Sender<Queued> {
        let index = (self.hasher.hash_one(batch_id) % self.lanes.len() as u64) as usize;
        &self.lanes[index]
    }

    async fn submit(
        &self,
        unit: UnitOfWork,
        now: DateTime<Utc>,
    ) -> Result<Applied, RepositoryError> {
        // Answered without a lane or a transaction: nothing to commit, and nothing for the observers.
        if let Some(applied) = self.store.settled_unit(&unit) {
            return Ok(applied);
        }
        let (reply, answer) = oneshot::channel();
        let lane = self.lane(unit.batch_id);
        if lane.send(Queued { unit, now, reply }).await.is_err() {
            return Err(stopped());
        }
        answer.await.unwrap_or_else(|_| Err(stopped()))
    }
}

fn stopped() -> RepositoryError {
    RepositoryError::Unavailable("the group committer has stopped".to_owned())
}

async fn run_lane(
    store: Store,
    mut queue: mpsc::Receiver<Queued>,
    max_units: usize,
    counters: Arc<Counters>,
    observers: Arc<[Arc<dyn CommitObserver>]>,
) {
    while let Some(first) = queue.recv().await {
        let mut group = vec![first];
        while group.len() < max_units {
            match queue.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        // One clock reading for the group: units are decided in one transaction, at one moment.
        let now = group.iter().map(|q| q.now).max().unwrap_or_else(Utc::now);
        let batch_ids: Vec<BatchId> = group.iter().map(|q| q.unit.batch_id).collect();
        let (units, replies): (Vec<_>, Vec<_>) =
            group.into_iter().map(|q| (q.unit, q.reply)).unzip();
        counters.groups.fetch_add(1, Ordering::Relaxed);
        counters
            .units
            .fetch_add(units.len() as u64, Ordering::Relaxed);
        let results = store.apply_group(units, now).await;
        for (batch_id, applied) in batch_ids.iter().zip(&results) {
            if let Ok(applied) = applied {
                for observer in observers.iter() {
                    observer.committed(*batch_id, applied);
                }
            }
        }
        for (reply, result) in replies.into_iter().zip(results) {
            // The caller may have gone (cancelled); the unit stands either way.
            let _ = reply.send(result);
        }
    }
}

impl BatchRepository for GroupCommitter {
    fn apply<'a>(
        &'a self,
        unit: UnitOfWork,
        now: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<Applied, RepositoryError>> {
        Box::pin(self.submit(unit, now))
    }

    fn load<'a>(
        &'a self,
        batch_id: BatchId,
    ) -> BoxFuture<'a, Result<Option<BatchAggregate>, RepositoryError>> {
        self.store.load(batch_id)
    }

    fn read<'a>(
        &'a self,
        batch_id: BatchId,
    ) -> BoxFuture<'a, Result<Option<BatchAggregate>, RepositoryError>> {
        self.store.read(batch_id)
    }

    fn list_batches<'a>(
        &'a self,
        owner: &'a UserId,
        page_size: u32,
        page_token: Option<&'a str>,
    ) -> BoxFuture<'a, Result<BatchPage, RepositoryError>> {
        self.store.list_batches(owner, page_size, page_token)
    }

    fn timed_out_phases<'a>(
        &'a self,
        dispatched_before: DateTime<Utc>,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<TimedOutPhase>, RepositoryError>> {
        self.store.timed_out_phases(dispatched_before, limit)
    }

    fn is_processed<'a>(
        &'a self,
        event_id: EventId,
    ) -> BoxFuture<'a, Result<bool, RepositoryError>> {
        BatchRepository::is_processed(&self.store, event_id)
    }
}
