//! The outbox relay: publishes committed outbox rows to Kafka with an idempotent producer, exactly
//! as stored (event id, key, headers), then marks them published.
//!
//! Rows are claimed with a lease (several replicas may relay from one database) and only the
//! oldest unpublished row of a key is claimable, so a batch's records reach the broker in commit
//! order. A failed row is handed back to the store, which schedules its retry with exponential
//! backoff and parks it after too many failures; the relay itself also backs off while the broker
//! is unreachable. It is woken right after a commit and polls slowly as a safety net.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::future::join_all;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio::sync::{mpsc, Notify};

use super::codec::header;
pub use super::delivery::DeliveryListener;
use super::delivery::{finish_rounds, Delivered};
use crate::core::ids::{Attempt, BatchId, PhaseName};
use crate::notify::feed::ChangeFeed;
use crate::store::{FailureOutcome, FaultPoint, OutboxRow, Store, StoreError};

/// Rounds that may wait to be finished before the relay waits for the finisher.
const FINISH_QUEUE_ROUNDS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("cannot create the Kafka producer: {0}")]
    Producer(#[from] KafkaError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Tunables; the defaults are what production uses.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Rows claimed per round.
    pub batch_size: u32,
    /// Safety poll: how long the relay sleeps when nobody wakes it.
    pub poll_interval: Duration,
    /// How long the producer keeps trying to deliver one record before reporting a failure.
    pub delivery_timeout: Duration,
    /// Relay-level backoff while publishing fails (the store also delays each failed row).
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// How often the parked-rows gauge is refreshed.
    pub gauge_interval: Duration,
    /// How long after the broker's acknowledgement a phase command's delivery is reported (DISPATCH_INITIATED →
    /// IN_PROGRESS): a report whose outcome came back meanwhile is settled and costs no transaction.
    pub delivery_settle: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 256,
            poll_interval: Duration::from_secs(1),
            delivery_timeout: Duration::from_secs(10),
            backoff_base: Duration::from_millis(200),
            backoff_cap: Duration::from_secs(10),
            gauge_interval: Duration::from_secs(15),
            delivery_settle: Duration::from_secs(1),
        }
    }
}

/// Wakes the relay right after a commit, and reports on it. Cheap to clone.
#[derive(Clone)]
pub struct RelayHandle {
    notify: Arc<Notify>,
    healthy: Arc<AtomicBool>,
    producer: SharedProducer,
}

impl std::fmt::Debug for RelayHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayHandle")
            .field("healthy", &self.is_healthy())
            .finish_non_exhaustive()
    }
}

impl RelayHandle {
    /// False while publishing fails (broker unreachable or the database failing); for health reports.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Whether a broker answers a metadata request for `topic` within `timeout`, asked through the relay's own
    /// producer (so it sees the connections the relay publishes over). An idle relay cannot tell that the broker
    /// went away; this can.
    pub async fn broker_reachable(&self, topic: &str, timeout: Duration) -> bool {
        let producer = current(&self.producer);
        let topic = topic.to_owned();
        // The metadata call blocks its thread until the broker answers or the timeout passes.
        let asked = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&topic), timeout)
                .is_ok()
        });
        matches!(asked.await, Ok(true))
    }

    pub fn wake(&self) {
        // A stored permit makes a wake that arrives while the relay is busy count for its next wait.
        self.notify.notify_one();
    }

    /// Wakes the relay on every change announced on `feed` that wrote outbox rows (local commits, and
    /// other replicas' commits when Redis fans them out) until `shutdown` resolves.
    pub async fn wake_on_changes(self, feed: ChangeFeed, shutdown: impl Future<Output = ()>) {
        let mut changes = feed.subscribe();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                received = changes.recv() => match received {
                    Ok(change) if !change.publishes => {}
                    // Missed announcements may have had rows to publish.
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => self.wake(),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }
}

/// What one round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoundReport {
    pub claimed: usize,
    pub published: usize,
    pub failed: usize,
}

/// The relay's producer, shared with its handles.
type SharedProducer = Arc<Mutex<FutureProducer>>;

fn current(producer: &SharedProducer) -> FutureProducer {
    // A poisoned lock still holds a usable producer handle.
    producer.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

pub struct Relay {
    store: Store,
    /// Replaced when the idempotent producer hits a fatal error (it refuses every send after one).
    producer: SharedProducer,
    producer_config: ClientConfig,
    listener: Option<Arc<dyn DeliveryListener>>,
    notify: Arc<Notify>,
    healthy: Arc<AtomicBool>,
    config: RelayConfig,
}

impl Relay {
    /// Builds the idempotent producer for `bootstrap_servers`.
    pub fn new(
        store: Store,
        bootstrap_servers: &str,
        listener: Option<Arc<dyn DeliveryListener>>,
        config: RelayConfig,
    ) -> Result<Self, RelayError> {
        let mut producer_config = ClientConfig::new();
        producer_config
            .set("bootstrap.servers", bootstrap_servers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // No lingering: a round's rows are sent together anyway, and a lone command should not wait.
            .set("linger.ms", "0")
            .set(
                "message.timeout.ms",
                config.delivery_timeout.as_millis().to_string(),
            )
            .set("client.id", "bos-outbox-relay");
        let producer: FutureProducer = producer_config.create()?;
        Ok(Self {
            store,
            producer: Arc::new(Mutex::new(producer)),
            producer_config,
            listener,
            notify: Arc::new(Notify::new()),
            healthy: Arc::new(AtomicBool::new(true)),
            config,
        })
    }

    pub fn handle(&self) -> RelayHandle {
        RelayHandle {
            notify: self.notify.clone(),
            healthy: self.healthy.clone(),
            producer: self.producer.clone(),
        }
    }

    /// Relays until `shutdown` resolves; a round in progress is finished first.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        // Delivered rounds are marked published and reported beside the relay, so the next round is claimed at once;
        // the bounded queue holds the relay back only if finishing falls far behind.
        let (finisher, queue) = mpsc::channel(FINISH_QUEUE_ROUNDS);
        let finishing = tokio::spawn(finish_rounds(
            self.store.clone(),
            self.listener.clone(),
            self.config.delivery_settle,
            self.notify.clone(),
            queue,
        ));
        let mut failures: u32 = 0;
        // Whether a delivery failed since the last successful one. Failures of the store alone are over as soon
        // as a round gets through the database again; the broker's only when something is delivered.
        let mut delivery_failing = false;
        let mut gauge_refreshed: Option<Instant> = None;
        tracing::info!("outbox relay started");
        loop {
            let round = self.publish_round(&finisher).await;
            let mut pause = self.config.poll_interval;
            let mut backing_off = true;
            match round {
                Ok(report) if report.failed == 0 => {
                    backing_off = false;
                    // An empty round says nothing about the broker; only a delivery clears its failures.
                    if report.published > 0 {
                        delivery_failing = false;
                    }
                    if !delivery_failing {
                        failures = 0;
                    }
                    if report.claimed as u32 >= self.config.batch_size {
                        // More rows may be due right now.
                        pause = Duration::ZERO;
                    }
                }
                Ok(report) => {
                    delivery_failing = true;
                    failures = failures.saturating_add(1);
                    pause = self.backoff(failures);
                    tracing::warn!(
                        failed = report.failed,
                        pause_ms = pause.as_millis() as u64,
                        "outbox publish failures; backing off"
                    );
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    pause = self.backoff(failures);
                    metrics::counter!("relay_publish_errors").increment(1);
                    tracing::warn!(error = %e, pause_ms = pause.as_millis() as u64, "outbox relay round failed; backing off");
                }
            }
            if backing_off {
                self.renew_producer_if_fatal();
            }
            self.healthy.store(failures == 0, Ordering::Relaxed);
            if gauge_refreshed.is_none_or(|t| t.elapsed() >= self.config.gauge_interval) {
                self.refresh_parked_gauge().await;
                gauge_refreshed = Some(Instant::now());
            }
            if pause.is_zero() {
                continue;
            }
            tokio::select! {
                () = &mut shutdown => break,
                // While backing off a commit must not cut the pause short: the broker is the problem.
                () = self.notify.notified(), if !backing_off => {}
                () = tokio::time::sleep(pause) => {}
            }
        }
        self.producer_flush().await;
        drop(finisher);
        let _ = finishing.await;
        tracing::info!("outbox relay stopped");
    }

    fn backoff(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(16);
        self.config
            .backoff_base
            .saturating_mul(1u32 << exp)
            .min(self.config.backoff_cap)
    }

    fn producer(&self) -> FutureProducer {
        current(&self.producer)
    }

    /// After failures: if the producer is fatally broken, build a new one (a new producer id and
    /// epoch), so the relay recovers without a restart.
    fn renew_producer_if_fatal(&self) {
        let Some((code, reason)) = self.producer().client().fatal_error() else {
            return;
        };
        tracing::error!(?code, %reason, "fatal Kafka producer error; creating a new producer");
        metrics::counter!("relay_producer_renewed_total").increment(1);
        match self.producer_config.create::<FutureProducer>() {
            Ok(fresh) => *self.producer.lock().unwrap_or_else(|p| p.into_inner()) = fresh,
            Err(e) => tracing::error!(error = %e, "cannot create a new Kafka producer"),
        }
    }

    async fn producer_flush(&self) {
        let producer = self.producer();
        let _ = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(5))).await;
    }

    async fn refresh_parked_gauge(&self) {
        match self.store.parked_count().await {
            Ok(parked) => metrics::gauge!("outbox_parked").set(parked as f64),
            Err(e) => tracing::debug!(error = %e, "cannot read the parked outbox count"),
        }
    }

    /// Claims due rows, publishes them, waits for every delivery report, then marks the
    /// delivered ones published and hands the failed ones back to the store.
    async fn publish_round(
        &self,
        finisher: &mpsc::Sender<Delivered>,
    ) -> Result<RoundReport, RelayError> {
        let rows = self
            .store
            .claim_due(self.config.batch_size, Utc::now())
            .await?;
        let mut report = RoundReport {
            claimed: rows.len(),
            ..RoundReport::default()
        };
        if rows.is_empty() {
            return Ok(report);
        }
        // A failure here leaves the rows leased; they come back when the lease runs out.
        self.store
            .faults()
            .hit(FaultPoint::AfterClaim)
            .map_err(StoreError::from)?;

        let outcomes = join_all(rows.iter().map(|row| self.publish(row))).await;
        let (mut delivered, mut failed) = (Vec::new(), Vec::new());
        for (row, outcome) in rows.iter().zip(outcomes) {
            match outcome {
                Ok(()) => delivered.push(row),
                Err(reason) => failed.push((row, reason)),
            }
        }
        // Published but not marked: the rows go out again after the lease, with the same event
        // ids, which consumers dedupe.
        self.store
            .faults()
            .hit(FaultPoint::AfterPublishBeforeMark)
            .map_err(StoreError::from)?;

        report.published = delivered.len();
        metrics::counter!("outbox_published_total").increment(delivered.len() as u64);

        for (row, reason) in &failed {
            metrics::counter!("relay_publish_errors").increment(1);
            match self
                .store
                .record_failure(row.id, reason, Utc::now())
                .await?
            {
                FailureOutcome::Parked => {
                    tracing::error!(id = row.id, event_id = %row.event_id, topic = %row.topic, %reason, "outbox row parked after repeated failures");
                    self.refresh_parked_gauge().await;
                }
                FailureOutcome::RetryAt(at) => {
                    tracing::debug!(id = row.id, %reason, retry_at = %at, "outbox row will be retried")
                }
                FailureOutcome::Unchanged => {}
            }
        }
        report.failed = failed.len();

        if !delivered.is_empty() {
            let round = Delivered {
                ids: delivered.iter().map(|r| r.id).collect(),
                phases: delivered
                    .iter()
                    .filter_map(|row| phase_command_of(row))
                    .collect(),
            };
            if finisher.send(round).await.is_err() {
                tracing::warn!(
                    "the round finisher has stopped; delivered rows go out again after their lease"
                );
            }
        }
        Ok(report)
    }

    async fn publish(&self, row: &OutboxRow) -> Result<(), String> {
        let mut headers = OwnedHeaders::new_with_capacity(row.headers.len());
        for (name, value) in &row.headers {
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_bytes()),
            });
        }
        let record = FutureRecord::to(&row.topic)
            .key(row.key.as_bytes())
            .payload(&row.payload)
            .headers(headers);
        let delivery = self
            .producer()
            .send_result(record)
            .map_err(|(e, _)| e.to_string())?;
        match delivery.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => Err(e.to_string()),
            Err(_) => Err("the producer dropped the delivery report".to_owned()),
        }
    }
}

/// The batch, phase and attempt of a phase command row (from the headers the codec sets).
fn phase_command_of(row: &OutboxRow) -> Option<(BatchId, PhaseName, Attempt)> {
    let phase = PhaseName::parse("phase", row.headers.get(header::PHASE)?).ok()?;
    let attempt = row.headers.get(header::ATTEMPT)?.parse::<i64>().ok()?;
    let attempt = Attempt::parse("attempt", attempt).ok()?;
    let batch_id = BatchId::parse("key", &row.key).ok()?;
    Some((batch_id, phase, attempt))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::core::ids::EventId;

    fn row(headers: &[(&str, &str)], key: &str) -> OutboxRow {
        OutboxRow {
            id: 1,
            event_id: EventId::from_uuid(uuid::Uuid::now_v7()),
            topic: "t".into(),
            key: key.into(),
            payload: vec![],
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>(),
            created_at: Utc::now(),
            attempts: 0,
        }
    }

    #[test]
    fn phase_commands_are_recognised_by_their_headers() {
        let batch = uuid::Uuid::now_v7().to_string();
        let found = phase_command_of(&row(&[("phase", "nlp"), ("attempt", "2")], &batch));
        let (b, p, a) = found.unwrap();
        assert_eq!(b.to_string(), batch);
        assert_eq!(p, PhaseName::Nlp);
        assert_eq!(a.get(), 2);
        assert!(phase_command_of(&row(&[("event_id", "x")], &batch)).is_none());
        assert!(phase_command_of(&row(&[("phase", "nlp"), ("attempt", "0")], &batch)).is_none());
        assert!(
            phase_command_of(&row(&[("phase", "nlp"), ("attempt", "1")], "not-a-uuid")).is_none()
        );
    }
}
