//! The consumer loop: one group member subscribed to the six consumed topics. Each partition has a worker; records
//! of one batch (the record key) are processed in order, records of different batches side by side (see
//! `window`); partitions proceed independently. An offset is committed only after its
//! record's unit of work committed (or the record reached the dead-letter topic), so a later offset is never
//! committed past an unfinished earlier one (defect 16).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::codec::consumed_topics;
use super::dedupe::Dedupe;
use super::dlq::{DlqPublisher, RawRecord};
use super::handlers::EventHandler;
use super::processor::{Finished, Processor};
use super::window::KeyedWindow;

/// Records buffered per partition before the dispatcher waits for that partition's worker.
const PARTITION_BUFFER: usize = 256;
/// Records of one partition processed at once (each of a different batch; a batch's records run one by one).
/// Together they feed the group committer enough units to share commits.
const RECORDS_IN_FLIGHT: usize = 32;
/// A worker commits at least every this many finished records, and whenever it has caught up.
const COMMIT_EVERY: u32 = 64;

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("cannot create the Kafka consumer: {0}")]
    Create(String),
    #[error("cannot subscribe to {topics:?}: {reason}")]
    Subscribe { topics: Vec<String>, reason: String },
}

/// Retry delays for transient failures: `initial`, doubled per attempt, capped at `max`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    pub(super) fn next(&self, current: Duration) -> Duration {
        current.saturating_mul(2).min(self.max)
    }
}

#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub brokers: String,
    pub group: String,
    /// Extra librdkafka settings (tests shorten session timeouts).
    pub overrides: Vec<(String, String)>,
    pub backoff: Backoff,
}

impl ConsumerSettings {
    pub fn new(brokers: impl Into<String>, group: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            group: group.into(),
            overrides: Vec::new(),
            backoff: Backoff::default(),
        }
    }
}

/// Progress of one assigned partition, shared by its worker and the rebalance callback.
#[derive(Debug)]
pub(super) struct PartitionState {
    pub(super) revoked: AtomicBool,
    /// Offset to commit next: the offset after the last finished record (-1: nothing finished yet).
    finished: AtomicI64,
    committed: AtomicI64,
}

type PartitionKey = (String, i32);
type Partitions = Arc<Mutex<HashMap<PartitionKey, Arc<PartitionState>>>>;

/// Hands partitions over cleanly: on revoke, commit what the workers finished, then tell them to stop.
pub struct RebalanceContext {
    partitions: Partitions,
}

impl ClientContext for RebalanceContext {}

impl ConsumerContext for RebalanceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else {
            return;
        };
        let mut partitions = self
            .partitions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut finished = TopicPartitionList::new();
        for element in revoked.elements() {
            let key = (element.topic().to_owned(), element.partition());
            if let Some(state) = partitions.remove(&key) {
                state.revoked.store(true, Ordering::SeqCst);
                let next = state.finished.load(Ordering::SeqCst);
                if next > state.committed.load(Ordering::SeqCst) {
                    let _ = finished.add_partition_offset(&key.0, key.1, Offset::Offset(next));
                }
            }
        }
        tracing::info!(partitions = revoked.count(), "partitions revoked");
        if finished.count() > 0 {
            if let Err(e) = consumer.commit(&finished, CommitMode::Sync) {
                tracing::warn!(error = %e, "commit on revoke failed; the next owner sees those records again");
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(assigned) = rebalance {
            tracing::info!(partitions = assigned.count(), "partitions assigned");
        }
    }
}

pub struct EventConsumer {
    consumer: Arc<StreamConsumer<RebalanceContext>>,
    partitions: Partitions,
    processor: Arc<Processor>,
}

impl EventConsumer {
    /// Creates the group member and subscribes it to every consumed topic.
    pub fn new(
        settings: &ConsumerSettings,
        handler: EventHandler,
        dedupe: Dedupe,
        dlq: DlqPublisher,
    ) -> Result<Self, ConsumerError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &settings.brokers)
            .set("group.id", &settings.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // A replica that dies (SIGKILL, lost host) hands its partitions over after this, not Kafka's 45 s
            // default; heartbeats every second keep a live replica well inside it.
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            // The embedded broker (librdkafka's mock cluster) and tansu answer a fetch when its wait runs out, not
            // when a record arrives, so the 500 ms default was added to every event's latency (bos bench latency:
            // p50 298 ms at 50 events/s; 12 ms with 10 ms here, 6.6 ms with 2 ms). The price: an idle member sends
            // ~500 tiny fetches a second, about 2 % of a core (BENCHMARKS.md).
            .set("fetch.wait.max.ms", "2");
        for (key, value) in &settings.overrides {
            config.set(key, value);
        }
        let partitions: Partitions = Arc::default();
        let context = RebalanceContext {
            partitions: partitions.clone(),
        };
        let consumer: StreamConsumer<RebalanceContext> = config
            .create_with_context(context)
            .map_err(|e| ConsumerError::Create(e.to_string()))?;
        let topics = consumed_topics();
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&names)
            .map_err(|e| ConsumerError::Subscribe {
                topics: topics.clone(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            consumer: Arc::new(consumer),
            partitions,
            processor: Arc::new(Processor {
                handler,
                dedupe,
                dlq,
                backoff: settings.backoff,
            }),
        })
    }

    /// Consumes until `shutdown` resolves, then lets every worker finish or abandon its current record.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut workers: HashMap<PartitionKey, mpsc::Sender<RawRecord>> = HashMap::new();
        let mut tasks = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            let message = tokio::select! {
                biased;
                () = &mut shutdown => break,
                message = self.consumer.recv() => message,
            };
            let record = match message {
                Ok(message) => raw_record(&message),
                Err(e) => {
                    tracing::warn!(error = %e, "kafka consumer error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let key = (record.topic.clone(), record.partition);
            let sender = match workers.get(&key) {
                Some(sender) if !sender.is_closed() && self.is_current(&key) => sender.clone(),
                _ => {
                    let sender = self.spawn_worker(&key, &mut tasks, stop_rx.clone());
                    workers.insert(key, sender.clone());
                    sender
                }
            };
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                _ = sender.send(record) => {}
            }
        }
        let _ = stop_tx.send(true);
        drop(workers);
        while tasks.join_next().await.is_some() {}
        // Closing leaves the group, which waits on the broker; keep that off the async workers.
        let consumer = self.consumer;
        let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
        tracing::info!("consumer stopped");
    }

    /// True when the partition is assigned and its worker state is the live one (not revoked).
    fn is_current(&self, key: &PartitionKey) -> bool {
        let partitions = self
            .partitions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        partitions
            .get(key)
            .is_some_and(|s| !s.revoked.load(Ordering::SeqCst))
    }

    fn spawn_worker(
        &self,
        key: &PartitionKey,
        tasks: &mut JoinSet<()>,
        stop: watch::Receiver<bool>,
    ) -> mpsc::Sender<RawRecord> {
        let state = Arc::new(PartitionState {
            revoked: AtomicBool::new(false),
            finished: AtomicI64::new(-1),
            committed: AtomicI64::new(-1),
        });
        self.partitions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.clone(), state.clone());
        let (tx, rx) = mpsc::channel(PARTITION_BUFFER);
        let worker = Worker {
            key: key.clone(),
            state,
            consumer: self.consumer.clone(),
            processor: self.processor.clone(),
            stop,
        };
        tasks.spawn(worker.run(rx));
        tx
    }
}

/// One record being processed: its offset and key, and how it ended.
type RecordFuture = std::pin::Pin<Box<dyn Future<Output = (i64, Vec<u8>, Finished)> + Send>>;

struct Worker {
    key: PartitionKey,
    state: Arc<PartitionState>,
    consumer: Arc<StreamConsumer<RebalanceContext>>,
    processor: Arc<Processor>,
    stop: watch::Receiver<bool>,
}

impl Worker {
    async fn run(mut self, mut records: mpsc::Receiver<RawRecord>) {
        let mut window = KeyedWindow::default();
        let mut running: FuturesUnordered<RecordFuture> = FuturesUnordered::new();
        // A record whose batch has an earlier record still running; it holds the ones behind it back.
        let mut waiting: Option<RawRecord> = None;
        let mut taking = true;
        let mut uncommitted = 0u32;
        loop {
            taking = taking && !self.interrupted();
            let room = waiting.is_none() && running.len() < RECORDS_IN_FLIGHT;
            if !taking && running.is_empty() {
                break;
            }
            tokio::select! {
                biased;
                Some((offset, key, finished)) = running.next(), if !running.is_empty() => {
                    match finished {
                        // Interrupted: the record stays unfinished, so its offset is not committed.
                        Finished::Abandoned => taking = false,
                        Finished::Done => {
                            window.finish(offset, &key);
                            uncommitted += 1;
                        }
                    }
                    if taking {
                        if let Some(next) = waiting.take_if(|r| window.is_free(record_key(r))) {
                            window.start(record_key(&next));
                            running.push(self.start(next));
                        }
                    }
                }
                _ = self.stop.changed(), if taking => taking = false,
                record = records.recv(), if taking && room => match record {
                    Some(record) => {
                        if window.admit(record.offset, record_key(&record)) {
                            running.push(self.start(record));
                        } else {
                            waiting = Some(record);
                        }
                    }
                    None => taking = false,
                },
            }
            if let Some(next) = window.committable() {
                self.state.finished.fetch_max(next, Ordering::SeqCst);
            }
            if (records.is_empty() && running.is_empty()) || uncommitted >= COMMIT_EVERY {
                self.commit();
                uncommitted = 0;
            }
        }
        self.commit();
    }

    /// Processes one record on its own future; several run at once (of different batches).
    fn start(&self, record: RawRecord) -> RecordFuture {
        let (processor, state, stop) = (
            self.processor.clone(),
            self.state.clone(),
            self.stop.clone(),
        );
        Box::pin(async move {
            let (offset, key) = (record.offset, record_key(&record).to_vec());
            let finished = processor.process(record, &state, &stop).await;
            (offset, key, finished)
        })
    }

    fn interrupted(&self) -> bool {
        *self.stop.borrow() || self.state.revoked.load(Ordering::SeqCst)
    }

    fn commit(&self) {
        if self.state.revoked.load(Ordering::SeqCst) {
            // The rebalance callback committed what was finished; the partition may belong to someone else now.
            return;
        }
        let next = self.state.finished.load(Ordering::SeqCst);
        if next <= self.state.committed.load(Ordering::SeqCst) {
            return;
        }
        let mut offsets = TopicPartitionList::new();
        if offsets
            .add_partition_offset(&self.key.0, self.key.1, Offset::Offset(next))
            .is_err()
        {
            return;
        }
        match self.consumer.commit(&offsets, CommitMode::Async) {
            Ok(()) => self.state.committed.store(next, Ordering::SeqCst),
            Err(e) => {
                tracing::warn!(topic = %self.key.0, partition = self.key.1, error = %e, "offset commit failed")
            }
        }
    }
}

fn raw_record<M: Message>(message: &M) -> RawRecord {
    let headers = message
        .headers()
        .map(|headers| {
            headers
                .iter()
                .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                .collect()
        })
        .unwrap_or_default();
    RawRecord {
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        payload: message.payload().map(<[u8]>::to_vec),
        headers,
    }
}

/// The key that orders records: the batch id the producers key by (an unkeyed record orders with the other unkeyed).
fn record_key(record: &RawRecord) -> &[u8] {
    record.key.as_deref().unwrap_or_default()
}
