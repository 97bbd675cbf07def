//! Redis pub/sub: real-time notifications for users (`ws:{user_id}`) and change announcements
//! between replicas (`bos:batch-changes`), so `WatchBatch` on one replica sees changes committed by
//! another.
//!
//! Redis is a convenience here, never part of a unit of work: when it is down, publishing logs and
//! counts the failure and the committed change stands.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::Serialize;
use uuid::Uuid;

use tokio::sync::mpsc;

use super::feed::ChangeFeed;
use crate::core::effect::{Effect, Notification};
use crate::core::ids::BatchId;
use crate::core::ports::{Applied, CommitObserver};

/// Channel carrying the ids of changed batches between replicas.
pub const CHANGES_CHANNEL: &str = "bos:batch-changes";
/// Event name of a phase notification.
pub const PHASE_CONCLUDED_EVENT: &str = "batch_phase_concluded";

const TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("BOS_REDIS_URL: {0}")]
    InvalidUrl(String),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("could not encode the notification: {0}")]
    Encode(#[from] serde_json::Error),
}

/// The JSON a user's browser receives on `ws:{user_id}`.
#[derive(Debug, Serialize)]
pub struct PhaseConcludedMessage<'a> {
    pub event: &'static str,
    pub batch_id: String,
    pub phase: &'a str,
    pub status: &'a str,
    pub timestamp: String,
    pub correlation_id: String,
}

impl<'a> PhaseConcludedMessage<'a> {
    pub fn new(n: &'a Notification) -> Self {
        Self {
            event: PHASE_CONCLUDED_EVENT,
            batch_id: n.batch_id.to_string(),
            phase: n.phase.as_str(),
            status: n.status.as_str(),
            timestamp: n
                .timestamp
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            correlation_id: n.correlation_id.to_string(),
        }
    }
}

/// Told whether other replicas' changes reach this process, and which batch each one changed: the store's
/// aggregate cache trusts entries only while they do (an adapter in `app`, so the store needs no notify types).
pub trait CacheCoherence: Send + Sync {
    /// Subscribed: every announcement published from now on will arrive.
    fn live(&self);
    /// The subscription dropped, failed or was shut down: announcements may be missed.
    fn lost(&self);
    /// Another replica committed a change of `batch_id`.
    fn changed(&self, batch_id: BatchId);
}

/// For processes (and tests) with nothing to keep coherent.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoCoherence;

impl CacheCoherence for NoCoherence {
    fn live(&self) {}
    fn lost(&self) {}
    fn changed(&self, _batch_id: BatchId) {}
}

/// Publishes notifications and change announcements; cheap to clone.
#[derive(Clone)]
pub struct RedisNotifier {
    client: redis::Client,
    conn: ConnectionManager,
    /// Prepended to every channel name (tests isolate themselves with it; empty in production).
    prefix: String,
    /// Identifies this process, so it ignores its own change announcements.
    origin: Uuid,
}

impl std::fmt::Debug for RedisNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisNotifier")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisNotifier {
    /// Does not connect: the connection is made on first use and re-made after failures, so a
    /// Redis that is down at start-up does not stop BOS. Call it inside a Tokio runtime.
    pub fn new(url: &str, prefix: impl Into<String>) -> Result<Self, NotifyError> {
        let client =
            redis::Client::open(url).map_err(|e| NotifyError::InvalidUrl(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT))
            .set_number_of_retries(1);
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
        Ok(Self {
            client,
            conn,
            prefix: prefix.into(),
            origin: Uuid::now_v7(),
        })
    }

    pub fn user_channel(&self, user_id: &str) -> String {
        format!("{}ws:{user_id}", self.prefix)
    }

    pub fn changes_channel(&self) -> String {
        format!("{}{CHANGES_CHANNEL}", self.prefix)
    }

    async fn publish(&self, channel: String, message: String) -> Result<(), NotifyError> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(channel).arg(message);
        tokio::time::timeout(TIMEOUT, cmd.query_async::<i64>(&mut conn))
            .await
            .map_err(|_| NotifyError::Timeout(TIMEOUT))??;
        Ok(())
    }

    pub async fn publish_notification(
        &self,
        notification: &Notification,
    ) -> Result<(), NotifyError> {
        let json = serde_json::to_string(&PhaseConcludedMessage::new(notification))?;
        self.publish(self.user_channel(notification.user_id.as_str()), json)
            .await
    }

    pub async fn publish_change(&self, batch_id: BatchId) -> Result<(), NotifyError> {
        self.publish(
            self.changes_channel(),
            format!("{}|{batch_id}", self.origin),
        )
        .await
    }

    fn report(&self, kind: &'static str, result: Result<(), NotifyError>) {
        match result {
            Ok(()) => metrics::counter!("redis_publish_total", "kind" => kind, "result" => "ok")
                .increment(1),
            Err(e) => {
                metrics::counter!("redis_publish_total", "kind" => kind, "result" => "error")
                    .increment(1);
                tracing::warn!(error = %e, kind, "redis publish failed; the committed change stands");
            }
        }
    }

    /// Feeds change announcements of other replicas into `coherence` and then `feed` until `shutdown` resolves,
    /// reconnecting with backoff while Redis is down. `coherence` hears `live` once subscribed and `lost` whenever
    /// the subscription ends, so it never trusts a period in which announcements could have been missed.
    pub async fn relay_changes(
        &self,
        feed: ChangeFeed,
        coherence: Arc<dyn CacheCoherence>,
        shutdown: impl Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut delay = Duration::from_millis(200);
        loop {
            tokio::select! {
                () = &mut shutdown => {
                    coherence.lost();
                    return;
                }
                result = self.subscribe_once(&feed, coherence.as_ref()) => {
                    coherence.lost();
                    match result {
                        Ok(()) => delay = Duration::from_millis(200),
                        Err(e) => {
                            metrics::counter!("redis_subscribe_errors_total").increment(1);
                            tracing::warn!(error = %e, "redis change subscription lost; retrying");
                        }
                    }
                }
            }
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }

    async fn subscribe_once(
        &self,
        feed: &ChangeFeed,
        coherence: &dyn CacheCoherence,
    ) -> Result<(), NotifyError> {
        let mut pubsub = tokio::time::timeout(TIMEOUT, self.client.get_async_pubsub())
            .await
            .map_err(|_| NotifyError::Timeout(TIMEOUT))??;
        tokio::time::timeout(TIMEOUT, pubsub.subscribe(self.changes_channel()))
            .await
            .map_err(|_| NotifyError::Timeout(TIMEOUT))??;
        // Redis has confirmed the subscription: every announcement from here on is delivered on this connection.
        coherence.live();
        tracing::info!("redis change subscription live");
        let mut messages = pubsub.on_message();
        while let Some(message) = messages.next().await {
            let Ok(payload) = message.get_payload::<String>() else {
                continue;
            };
            if let Some(batch_id) = self.remote_change(&payload) {
                // The cache first, so a watcher woken by the feed re-reads the batch from the database.
                coherence.changed(batch_id);
                feed.publish(batch_id);
            }
        }
        // The stream ends when the connection drops.
        Ok(())
    }

    /// The batch id of another replica's announcement; `None` for our own or malformed ones.
    fn remote_change(&self, payload: &str) -> Option<BatchId> {
        let (origin, id) = payload.split_once('|')?;
        if origin == self.origin.to_string() {
            return None;
        }
        BatchId::parse("batch_id", id).ok()
    }
}

/// What the publisher task sends, in commit order.
#[derive(Debug)]
enum Outgoing {
    Notification(Notification),
    Change(BatchId),
}

/// Hands committed changes to a background task that publishes them in order, so a slow or
/// absent Redis never delays a unit of work. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RedisPublisher {
    tx: mpsc::Sender<Outgoing>,
}

impl RedisNotifier {
    /// Starts the publishing task; it ends when every `RedisPublisher` clone is dropped.
    pub fn spawn_publisher(self, capacity: usize) -> (RedisPublisher, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<Outgoing>(capacity.max(1));
        let task = tokio::spawn(async move {
            while let Some(item) = rx.recv().await {
                match item {
                    Outgoing::Notification(n) => {
                        self.report("notification", self.publish_notification(&n).await)
                    }
                    Outgoing::Change(id) => self.report("change", self.publish_change(id).await),
                }
            }
        });
        (RedisPublisher { tx }, task)
    }
}

impl RedisPublisher {
    /// Queues the notifications of a committed change and its announcement; drops them (counted)
    /// when the queue is full because Redis is slow or down.
    pub fn after_commit(&self, batch_id: BatchId, applied: &Applied) {
        let Applied::Changed { effects, .. } = applied else {
            return;
        };
        let notifications = effects.iter().filter_map(|e| match e {
            Effect::Notify(n) => Some(Outgoing::Notification(n.clone())),
            Effect::Publish(_) => None,
        });
        for item in notifications.chain(std::iter::once(Outgoing::Change(batch_id))) {
            if self.tx.try_send(item).is_err() {
                metrics::counter!("redis_publish_dropped_total").increment(1);
                tracing::warn!(%batch_id, "redis publish queue full; notification dropped");
            }
        }
    }
}

/// Hands every committed change to the publishing task.
impl CommitObserver for RedisPublisher {
    fn committed(&self, batch_id: BatchId, applied: &Applied) {
        self.after_commit(batch_id, applied);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn own_announcements_are_ignored() {
        let notifier = RedisNotifier::new("redis://127.0.0.1:1", "t:").unwrap();
        let id = BatchId::from_uuid(Uuid::now_v7());
        assert_eq!(
            notifier.remote_change(&format!("{}|{id}", notifier.origin)),
            None
        );
        assert_eq!(
            notifier.remote_change(&format!("{}|{id}", Uuid::now_v7())),
            Some(id)
        );
        assert_eq!(notifier.remote_change("garbage"), None);
        assert_eq!(notifier.user_channel("u1"), "t:ws:u1");
    }
}
