//! Everything that must hear about a committed change (the in-process change feed, Redis notifications) hangs
//! off one repository decorator, so adding a listener never means another forwarding wrapper.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::core::ids::{BatchId, EventId, UserId};
use crate::core::model::BatchAggregate;
use crate::core::ports::{
    Applied, BatchPage, BatchRepository, BoxFuture, RepositoryError, TimedOutPhase, UnitOfWork,
};

pub use crate::core::ports::CommitObserver;

/// Forwards to the inner repository and tells every observer about each committed unit of work.
pub struct ObservedRepository<R: ?Sized> {
    inner: Arc<R>,
    observers: Vec<Arc<dyn CommitObserver>>,
}

impl<R: BatchRepository + ?Sized> ObservedRepository<R> {
    pub fn new(inner: Arc<R>, observers: Vec<Arc<dyn CommitObserver>>) -> Self {
        Self { inner, observers }
    }
}

impl<R: BatchRepository + ?Sized> BatchRepository for ObservedRepository<R> {
    fn apply<'a>(
        &'a self,
        unit: UnitOfWork,
        now: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<Applied, RepositoryError>> {
        Box::pin(async move {
            let batch_id = unit.batch_id;
            let applied = self.inner.apply(unit, now).await?;
            for observer in &self.observers {
                observer.committed(batch_id, &applied);
            }
            Ok(applied)
        })
    }

    fn load<'a>(
        &'a self,
        batch_id: BatchId,
    ) -> BoxFuture<'a, Result<Option<BatchAggregate>, RepositoryError>> {
        self.inner.load(batch_id)
    }

    fn read<'a>(
        &'a self,
        batch_id: BatchId,
    ) -> BoxFuture<'a, Result<Option<BatchAggregate>, RepositoryError>> {
        self.inner.read(batch_id)
    }

    fn list_batches<'a>(
        &'a self,
        owner: &'a UserId,
        page_size: u32,
        page_token: Option<&'a str>,
    ) -> BoxFuture<'a, Result<BatchPage, RepositoryError>> {
        self.inner.list_batches(owner, page_size, page_token)
    }

    fn timed_out_phases<'a>(
        &'a self,
        dispatched_before: DateTime<Utc>,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<TimedOutPhase>, RepositoryError>> {
        self.inner.timed_out_phases(dispatched_before, limit)
    }

    fn is_processed<'a>(
        &'a self,
        event_id: EventId,
    ) -> BoxFuture<'a, Result<bool, RepositoryError>> {
        self.inner.is_processed(event_id)
    }
}
