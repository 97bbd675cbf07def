//! The aggregate cache: the last aggregate this process read or committed for a batch, keyed by the batch row's
//! version. Every change of a batch compare-and-sets its batch row (see `repository`), so an aggregate whose
//! version equals the stored one is the stored aggregate: a status read then needs one query (the batch row)
//! instead of five, and a unit of work none when its compare-and-set proves the newest entry. Another replica's
//! commit changes the version, so a stale entry is never used: a read sees the version differ, a unit's
//! compare-and-set loses.
//!
//! Status reads may skip even that query ("trusted" entries), but only while another replica's commit is sure to
//! reach this process: the coherence signal (the Redis change subscription) is live, it has been live since
//! before the entry was verified, the entry is younger than the caller's maximum age, and no remote invalidation
//! happened between the start of the read or transaction that produced the entry and its insertion. A `Ticket`,
//! taken before the database is asked, carries what the last two rules need.
//!
//! Bounded by rows (batch + essays + results + phases), not entries: one batch may hold 10,000 essays.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::core::ids::BatchId;
use crate::core::model::BatchAggregate;

pub(crate) struct AggregateCache {
    budget: usize,
    inner: Mutex<Inner>,
}

/// The coherence state when a read or a transaction started; given back with what it produced.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket {
    generation: u64,
    live: bool,
    at: Instant,
}

struct Entry {
    stamp: u64,
    aggregate: Arc<BatchAggregate>,
    /// The coherence epoch and the time the entry was verified, when it may be served without a query.
    trusted: Option<(u64, Instant)>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<BatchId, Entry>,
    /// Insertion order, oldest first, with the stamp each entry had; a stale pair is skipped on eviction.
    order: VecDeque<(BatchId, u64)>,
    rows: usize,
    next_stamp: u64,
    /// Bumped by every remote invalidation and every change of `live`: a ticket from before it is stale.
    generation: u64,
    /// Bumped whenever the signal goes live or is lost: trust from an earlier epoch is void, all at once.
    epoch: u64,
    live: bool,
}

impl Inner {
    /// The trust a put or refresh made with `ticket` earns: none if anything could have been missed since.
    fn trust_for(&self, ticket: Ticket) -> Option<(u64, Instant)> {
        (ticket.live && self.live && ticket.generation == self.generation)
            .then_some((self.epoch, ticket.at))
    }

    fn remove(&mut self, batch_id: BatchId) {
        if let Some(old) = self.entries.remove(&batch_id) {
            self.rows -= weight(&old.aggregate);
        }
    }
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

    /// Take before asking the database; pass to `put` or `refresh` with what the database said.
    pub(crate) fn ticket(&self) -> Ticket {
        let inner = self.lock();
        Ticket {
            generation: inner.generation,
            live: inner.live,
            at: Instant::now(),
        }
    }

    /// The cached aggregate of `batch_id` if it is at `version`.
    pub(crate) fn get(&self, batch_id: BatchId, version: i64) -> Option<Arc<BatchAggregate>> {
        let inner = self.lock();
        let entry = inner.entries.get(&batch_id)?;
        (entry.aggregate.batch.version == version).then(|| Arc::clone(&entry.aggregate))
    }

    /// The newest cached aggregate of `batch_id`, at whatever version: a guess for a unit of work, which its
    /// compare-and-set proves or refutes.
    pub(crate) fn newest(&self, batch_id: BatchId) -> Option<Arc<BatchAggregate>> {
        let inner = self.lock();
        inner
            .entries
            .get(&batch_id)
            .map(|e| Arc::clone(&e.aggregate))
    }

    /// The cached aggregate of `batch_id` if it may be served without asking the database (see the module doc).
    pub(crate) fn trusted(
        &self,
        batch_id: BatchId,
        max_age: Duration,
    ) -> Option<Arc<BatchAggregate>> {
        let inner = self.lock();
        if !inner.live {
            return None;
        }
        let entry = inner.entries.get(&batch_id)?;
        let (epoch, verified) = entry.trusted?;
        (epoch == inner.epoch && verified.elapsed() < max_age).then(|| Arc::clone(&entry.aggregate))
    }

    /// The database was just seen to hold the cached aggregate at `version` (a version-checked hit): it is
    /// verified anew, with the trust `ticket` earns.
    pub(crate) fn refresh(&self, batch_id: BatchId, version: i64, ticket: Ticket) {
        let mut inner = self.lock();
        let trust = inner.trust_for(ticket);
        if let Some(entry) = inner.entries.get_mut(&batch_id) {
            if entry.aggregate.batch.version == version && trust.is_some() {
                entry.trusted = trust;
            }
        }
    }

    /// Remembers an aggregate exactly as the database held it (committed, or just read) when `ticket` was taken
    /// or later. Never replaces a newer version: concurrent readers and committers may put out of order.
    pub(crate) fn put(&self, aggregate: Arc<BatchAggregate>, ticket: Ticket) {
        let id = aggregate.batch.id;
        let w = weight(&aggregate);
        let mut inner = self.lock();
        let mut trust = inner.trust_for(ticket);
        if let Some(old) = inner.entries.get(&id) {
            let (old_version, new_version) = (old.aggregate.batch.version, aggregate.batch.version);
            if new_version < old_version {
                return;
            }
            if new_version == old_version && trust.is_none() {
                // Same state, verified without trust this time: the earlier verification still stands (a remote
                // change of this batch would have cleared it).
                trust = old.trusted;
            }
        }
        if w > self.budget {
            // Too large to keep; an older version must not linger in its place.
            inner.remove(id);
            return;
        }
        let stamp = inner.next_stamp;
        inner.next_stamp += 1;
        let entry = Entry {
            stamp,
            aggregate,
            trusted: trust,
        };
        if let Some(old) = inner.entries.insert(id, entry) {
            inner.rows -= weight(&old.aggregate);
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
                .is_some_and(|e| e.stamp == old_stamp)
            {
                inner.remove(old_id);
            }
        }
        // Re-put batches leave stale pairs behind; drop them before they outnumber the entries.
        if inner.order.len() > 2 * inner.entries.len() + 64 {
            let Inner { entries, order, .. } = &mut *inner;
            order.retain(|(id, s)| entries.get(id).is_some_and(|e| e.stamp == *s));
        }
    }

    /// The coherence signal went up (`live`: changes of other replicas reach `invalidate` from now on) or down
    /// (nothing is trusted until it is live again). Either way, entries verified before are not trusted until
    /// verified again.
    pub(crate) fn set_coherence(&self, live: bool) {
        let mut inner = self.lock();
        inner.live = live;
        inner.epoch += 1;
        inner.generation += 1;
    }

    /// Another replica changed `batch_id`: its entry is no longer trusted (it stays for version-checked reads),
    /// and reads or transactions in flight may not make any entry trusted.
    pub(crate) fn invalidate(&self, batch_id: BatchId) {
        let mut inner = self.lock();
        inner.generation += 1;
        if let Some(entry) = inner.entries.get_mut(&batch_id) {
            entry.trusted = None;
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

    const AGE: Duration = Duration::from_secs(60);

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

    fn at_version(aggregate: &BatchAggregate, version: i64) -> Arc<BatchAggregate> {
        let mut a = aggregate.clone();
        a.batch.version = version;
        Arc::new(a)
    }

    fn live_cache() -> AggregateCache {
        let cache = AggregateCache::new(1000);
        cache.set_coherence(true);
        cache
    }

    #[test]
    fn hits_only_at_the_cached_version_and_stays_within_budget() {
        let cache = AggregateCache::new(100);
        let a = registered_aggregate(10);
        let id = a.batch.id;
        let version = a.batch.version;
        cache.put(Arc::new(a.clone()), cache.ticket());
        assert_eq!(cache.get(id, version).as_deref(), Some(&a));
        assert!(cache.get(id, version + 1).is_none());

        // Eleven rows each: the oldest entries go once the budget is exceeded.
        let mut ids = vec![id];
        for _ in 0..20 {
            let b = registered_aggregate(10);
            ids.push(b.batch.id);
            cache.put(Arc::new(b), cache.ticket());
            assert!(cache.rows() <= 100);
        }
        assert!(cache.get(ids[0], version).is_none());
        let last = *ids.last().unwrap();
        assert!(cache.get(last, 0).is_some());

        // Re-putting one batch many times keeps the bookkeeping bounded.
        let c = registered_aggregate(1);
        for _ in 0..1000 {
            cache.put(Arc::new(c.clone()), cache.ticket());
        }
        let inner = cache.lock();
        assert!(inner.order.len() <= 2 * inner.entries.len() + 65);
    }

    #[test]
    fn too_large_aggregates_are_not_cached_nor_leave_an_older_version_behind() {
        let cache = AggregateCache::new(5);
        let a = registered_aggregate(10);
        cache.put(Arc::new(a.clone()), cache.ticket());
        assert!(cache.get(a.batch.id, a.batch.version).is_none());
        assert_eq!(cache.rows(), 0);

        let small = registered_aggregate(1);
        let cache = live_cache();
        cache.put(at_version(&small, 1), cache.ticket());
        let mut grown = small.clone();
        grown.essays = registered_aggregate(2000).essays;
        grown.batch.version = 2;
        cache.put(Arc::new(grown), cache.ticket());
        assert!(cache.get(small.batch.id, 1).is_none());
        assert!(cache.trusted(small.batch.id, AGE).is_none());
    }

    #[test]
    fn nothing_is_trusted_without_a_live_signal() {
        let cache = AggregateCache::new(1000);
        let a = registered_aggregate(1);
        cache.put(Arc::new(a.clone()), cache.ticket());
        assert!(cache.get(a.batch.id, a.batch.version).is_some());
        assert!(cache.trusted(a.batch.id, AGE).is_none());
        // Going live does not bless what was verified before.
        cache.set_coherence(true);
        assert!(cache.trusted(a.batch.id, AGE).is_none());
        cache.refresh(a.batch.id, a.batch.version, cache.ticket());
        assert_eq!(cache.trusted(a.batch.id, AGE).as_deref(), Some(&a));
    }

    #[test]
    fn trust_expires_with_age_and_zero_age_trusts_nothing() {
        let cache = live_cache();
        let a = registered_aggregate(1);
        cache.put(Arc::new(a.clone()), cache.ticket());
        assert!(cache.trusted(a.batch.id, AGE).is_some());
        assert!(cache.trusted(a.batch.id, Duration::ZERO).is_none());
        std::thread::sleep(Duration::from_millis(30));
        assert!(cache
            .trusted(a.batch.id, Duration::from_millis(20))
            .is_none());
        assert!(cache.trusted(a.batch.id, AGE).is_some());
    }

    #[test]
    fn an_invalidation_during_a_read_leaves_the_entry_stored_but_untrusted() {
        let cache = live_cache();
        let a = registered_aggregate(1);
        let other = registered_aggregate(1);
        let ticket = cache.ticket();
        // Any remote change (even of another batch) between the ticket and the put.
        cache.invalidate(other.batch.id);
        cache.put(Arc::new(a.clone()), ticket);
        assert!(cache.get(a.batch.id, a.batch.version).is_some());
        assert!(cache.trusted(a.batch.id, AGE).is_none());
        // A later verification makes it trusted; a remote change of that batch un-trusts it again.
        cache.refresh(a.batch.id, a.batch.version, cache.ticket());
        assert!(cache.trusted(a.batch.id, AGE).is_some());
        cache.invalidate(a.batch.id);
        assert!(cache.trusted(a.batch.id, AGE).is_none());
        assert!(cache.get(a.batch.id, a.batch.version).is_some());
    }

    #[test]
    fn losing_the_signal_voids_all_trust_until_re_verified() {
        let cache = live_cache();
        let a = registered_aggregate(1);
        cache.put(Arc::new(a.clone()), cache.ticket());
        let in_flight = cache.ticket();
        cache.set_coherence(false);
        assert!(cache.trusted(a.batch.id, AGE).is_none());
        cache.set_coherence(true);
        assert!(cache.trusted(a.batch.id, AGE).is_none());
        // A read that started before the loss earns nothing either.
        cache.refresh(a.batch.id, a.batch.version, in_flight);
        assert!(cache.trusted(a.batch.id, AGE).is_none());
        cache.refresh(a.batch.id, a.batch.version, cache.ticket());
        assert!(cache.trusted(a.batch.id, AGE).is_some());
    }

    #[test]
    fn puts_are_monotonic_by_version() {
        let cache = live_cache();
        let a = registered_aggregate(1);
        let id = a.batch.id;
        let late_reader = cache.ticket();
        cache.put(at_version(&a, 2), cache.ticket());
        // A read of version 1 that finishes after the commit of version 2 changes nothing.
        cache.put(at_version(&a, 1), late_reader);
        assert!(cache.get(id, 1).is_none());
        assert_eq!(cache.trusted(id, AGE).map(|x| x.batch.version), Some(2));
        // Refreshing a version that is not the cached one trusts nothing.
        cache.invalidate(id);
        cache.refresh(id, 1, cache.ticket());
        assert!(cache.trusted(id, AGE).is_none());
        // An untrusted put of the same version keeps the entry's own verification.
        cache.refresh(id, 2, cache.ticket());
        let stale = cache.ticket();
        cache.invalidate(registered_aggregate(1).batch.id);
        cache.put(at_version(&a, 2), stale);
        assert!(cache.trusted(id, AGE).is_some());
        cache.put(at_version(&a, 3), stale);
        assert!(cache.trusted(id, AGE).is_none());
        assert!(cache.get(id, 3).is_some());
    }
}
