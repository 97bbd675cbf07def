//! The aggregate cache: the last aggregate this process read or committed for a batch, keyed by the batch row's
//! version. Every change of a batch compare-and-sets its batch row (see `repository`), so an aggregate whose
//! version equals the stored one is the stored aggregate: a unit of work or a status read then needs one query
//! (the batch row) instead of five. Another replica's commit changes the version, so a stale entry is never used.
//!
//! Bounded by rows (batch + essays + results + phases), not entries: one batch may hold 10,000 essays.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use crate::core::ids::BatchId;
use crate::core::model::BatchAggregate;

pub(crate) struct AggregateCache {
    budget: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<BatchId, (u64, Arc<BatchAggregate>)>,
    /// Insertion order, oldest first, with the stamp each entry had; a stale pair is skipped on eviction.
    order: VecDeque<(BatchId, u64)>,
    rows: usize,
    next_stamp: u64,
}

fn weight(aggregate: &BatchAggregate) -> usize {
    1 + aggregate.essays.len()
        + aggregate.results.len()
        + aggregate
            .runs
            .iter()
            .map(|r| 1 + r.phases.len())
            .sum::<usize>()
}

/// The order a load from the database returns: results by essay id then phase name (essays, runs and phases are
/// already in position order in both).
pub(crate) fn canonical(mut aggregate: BatchAggregate) -> BatchAggregate {
    aggregate.results.sort_by(|a, b| {
        (a.essay_id.as_uuid(), a.phase.as_str()).cmp(&(b.essay_id.as_uuid(), b.phase.as_str()))
    });
    aggregate
}

impl AggregateCache {
    /// A cache holding at most `budget` rows; 0 disables it.
    pub(crate) fn new(budget: usize) -> Self {
        Self {
            budget,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The map stays consistent between statements; a panic elsewhere does not poison its meaning.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The cached aggregate of `batch_id` if it is at `version`.
    pub(crate) fn get(&self, batch_id: BatchId, version: i64) -> Option<Arc<BatchAggregate>> {
        let inner = self.lock();
        let (_, aggregate) = inner.entries.get(&batch_id)?;
        (aggregate.batch.version == version).then(|| Arc::clone(aggregate))
    }

    /// Remembers an aggregate exactly as the database now holds it (committed, or just read).
    pub(crate) fn put(&self, aggregate: Arc<BatchAggregate>) {
        let w = weight(&aggregate);
        if w > self.budget {
            return;
        }
        let id = aggregate.batch.id;
        let mut inner = self.lock();
        let stamp = inner.next_stamp;
        inner.next_stamp += 1;
        if let Some((_, old)) = inner.entries.insert(id, (stamp, aggregate)) {
            inner.rows -= weight(&old);
        }
        inner.rows += w;
        inner.order.push_back((id, stamp));
        while inner.rows > self.budget {
            let Some((old_id, old_stamp)) = inner.order.pop_front() else {
                break;
            };
            if inner
                .entries
                .get(&old_id)
                .is_some_and(|(s, _)| *s == old_stamp)
            {
                if let Some((_, old)) = inner.entries.remove(&old_id) {
                    inner.rows -= weight(&old);
                }
            }
        }
        // Re-put batches leave stale pairs behind; drop them before they outnumber the entries.
        if inner.order.len() > 2 * inner.entries.len() + 64 {
            let Inner { entries, order, .. } = &mut *inner;
            order.retain(|(id, s)| entries.get(id).is_some_and(|(live, _)| live == s));
        }
    }

    #[cfg(test)]
    fn rows(&self) -> usize {
        self.lock().rows
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use uuid::Uuid;

    use super::*;
    use crate::core::ids::{CorrelationId, CourseCode, EssayId, UserId};
    use crate::core::input::{Input, NewBatch};
    use crate::core::machine::decide;

    fn registered_aggregate(essays: usize) -> BatchAggregate {
        let new = NewBatch {
            batch_id: BatchId::from_uuid(Uuid::now_v7()),
            correlation_id: CorrelationId::from_uuid(Uuid::now_v7()),
            owner: UserId::parse("owner", "cache-test").unwrap(),
            org_id: None,
            class_id: None,
            course_code: CourseCode::Eng5,
            essay_ids: (0..essays)
                .map(|_| EssayId::from_uuid(Uuid::now_v7()))
                .collect(),
            student_prompt_ref: None,
            assignment_id: None,
            cj_default_llm_model: None,
            cj_default_temperature: None,
        };
        decide(None, &Input::Register(new), Utc::now())
            .unwrap()
            .aggregate
    }

    #[test]
    fn hits_only_at_the_cached_version_and_stays_within_budget() {
        let cache = AggregateCache::new(100);
        let a = registered_aggregate(10);
        let id = a.batch.id;
        let version = a.batch.version;
        cache.put(Arc::new(a.clone()));
        assert_eq!(cache.get(id, version).as_deref(), Some(&a));
        assert!(cache.get(id, version + 1).is_none());

        // Eleven rows each: the oldest entries go once the budget is exceeded.
        let mut ids = vec![id];
        for _ in 0..20 {
            let b = registered_aggregate(10);
            ids.push(b.batch.id);
            cache.put(Arc::new(b));
            assert!(cache.rows() <= 100);
        }
        assert!(cache.get(ids[0], version).is_none());
        let last = *ids.last().unwrap();
        assert!(cache.get(last, 0).is_some());

        // Re-putting one batch many times keeps the bookkeeping bounded.
        let c = registered_aggregate(1);
        for _ in 0..1000 {
            cache.put(Arc::new(c.clone()));
        }
        let inner = cache.lock();
        assert!(inner.order.len() <= 2 * inner.entries.len() + 65);
    }

    #[test]
    fn too_large_aggregates_are_not_cached() {
        let cache = AggregateCache::new(5);
        let a = registered_aggregate(10);
        cache.put(Arc::new(a.clone()));
        assert!(cache.get(a.batch.id, a.batch.version).is_none());
        assert_eq!(cache.rows(), 0);
    }
}
