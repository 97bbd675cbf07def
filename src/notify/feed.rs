//! In-process change feed: every committed change of a batch is announced by id, so `WatchBatch` streams can
//! re-read the batch instead of polling. Redis pub/sub (when configured) feeds remote changes into the same feed.

use std::sync::Arc;

use tokio::sync::broadcast;

use crate::core::effect::Effect;
use crate::core::ids::BatchId;
use crate::core::model::BatchAggregate;
use crate::core::ports::{Applied, CommitObserver};

/// How many announcements a slow subscriber may fall behind before it is told it lagged (it then re-reads).
const CAPACITY: usize = 1024;

/// One announced change. Local changes carry the committed state, so a watcher sees every state in commit order
/// (re-reading could merge two quick changes into one); changes of other replicas carry only the id.
#[derive(Debug, Clone)]
pub struct Change {
    pub batch_id: BatchId,
    pub snapshot: Option<Arc<BatchAggregate>>,
    /// Whether the change wrote outbox rows, so the relay has something to publish (assumed for other replicas'
    /// changes, which do not say).
    pub publishes: bool,
}

/// A broadcast of changed batches. Cheap to clone; all clones share one channel.
#[derive(Debug, Clone)]
pub struct ChangeFeed {
    sender: broadcast::Sender<Change>,
}

impl Default for ChangeFeed {
    fn default() -> Self {
        Self::new()
    }
}

impl ChangeFeed {
    pub fn new() -> Self {
        let (sender, _) = broadcast::channel(CAPACITY);
        Self { sender }
    }

    /// Announces that `batch_id` changed (on another replica: what it wrote is unknown). Nobody listening is fine.
    pub fn publish(&self, batch_id: BatchId) {
        self.send(Change {
            batch_id,
            snapshot: None,
            publishes: true,
        });
    }

    /// Announces a committed state of a batch; `publishes` when the change wrote outbox rows.
    pub fn publish_snapshot(&self, aggregate: Arc<BatchAggregate>, publishes: bool) {
        self.send(Change {
            batch_id: aggregate.batch.id,
            snapshot: Some(aggregate),
            publishes,
        });
    }

    fn send(&self, change: Change) {
        // An error only means there are no subscribers right now.
        let _ = self.sender.send(change);
    }

    /// Every change published after this call.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.sender.subscribe()
    }
}

/// Announces every committed change, with its state, to the feed's subscribers.
impl CommitObserver for ChangeFeed {
    fn committed(&self, _batch_id: BatchId, applied: &Applied) {
        if let Applied::Changed { aggregate, effects } = applied {
            let publishes = effects.iter().any(|e| matches!(e, Effect::Publish(_)));
            self.publish_snapshot(Arc::new(aggregate.as_ref().clone()), publishes);
        }
    }
}
