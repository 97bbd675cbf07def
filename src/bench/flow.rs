//! The event plane of the load generator: it plays the downstream services (with `sim::responder`, the same
//! answers `bos simulate` gives), reads everything BOS publishes, and times each event it sends until the next
//! record BOS publishes for that batch.
//!
//! A measured batch goes: pipeline ai_feedback requested (setup) → spellcheck command (held until the measure
//! starts) → spellcheck outcome → nlp command → nlp outcome → ai_feedback command → ai_feedback outcome → pipeline
//! completed. So each batch gives three measured transitions, each one event in on Kafka, one unit of work, one
//! outbox row and one record out on Kafka.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::stack::Client;
use super::stats::Recorder;
use super::BenchError;
use crate::events::codec::{published_topics, topic_for, EncodedRecord};
use crate::proto::huleedu::bos::v1 as api;
use crate::proto::huleedu::common::v1 as pc;
use crate::proto::huleedu::events::v1 as pe;
use crate::sim::{encode_answer, responder, Behaviour};

/// One record BOS published, stamped when the generator received it.
#[derive(Debug)]
pub struct Arrival {
    pub topic: String,
    pub key: String,
    pub payload: Vec<u8>,
    pub at: Instant,
}

/// A producer for the events the generator sends, and a reader of every topic BOS publishes.
pub struct Plane {
    producer: FutureProducer,
    pub arrivals: mpsc::UnboundedReceiver<Arrival>,
    reader: JoinHandle<()>,
}

impl Plane {
    /// Starts reading every published topic from the beginning (no consumer group: no join delay).
    pub fn start(bootstrap: &str, partitions: i32) -> Result<Plane, BenchError> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("acks", "all")
            .set("linger.ms", "0")
            .set("client.id", "bos-bench")
            .create()?;
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set(
                "group.id",
                format!("bos-bench-reader-{}", uuid::Uuid::now_v7()),
            )
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "1")
            .create()?;
        let mut assignment = TopicPartitionList::new();
        for topic in published_topics() {
            for partition in 0..partitions {
                assignment.add_partition_offset(&topic, partition, Offset::Beginning)?;
            }
        }
        consumer.assign(&assignment)?;
        let (tx, arrivals) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            loop {
                match consumer.recv().await {
                    Ok(m) => {
                        let arrival = Arrival {
                            topic: m.topic().to_owned(),
                            key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                            payload: m.payload().unwrap_or_default().to_vec(),
                            at: Instant::now(),
                        };
                        if tx.send(arrival).is_err() {
                            return;
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "bench reader");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        Ok(Plane {
            producer,
            arrivals,
            reader,
        })
    }

    /// Queues one record; the returned future resolves with its delivery report.
    pub fn send(&self, record: &EncodedRecord) -> Result<DeliveryFuture, String> {
        let headers = record
            .headers
            .iter()
            .fold(OwnedHeaders::new(), |headers, (key, value)| {
                headers.insert(Header {
                    key,
                    value: Some(value.as_str()),
                })
            });
        self.producer
            .send_result(
                FutureRecord::to(&record.topic)
                    .key(&record.key)
                    .payload(&record.payload)
                    .headers(headers),
            )
            .map_err(|(e, _)| kafka_code(&e))
    }

    /// Stops reading and drops both clients before the broker goes away.
    pub async fn stop(self) {
        self.reader.abort();
        let _ = self.reader.await;
        let producer = self.producer;
        let _ = tokio::task::spawn_blocking(move || drop(producer)).await;
    }
}

fn kafka_code(e: &rdkafka::error::KafkaError) -> String {
    match e.rdkafka_error_code() {
        Some(code) => format!("kafka:{code:?}"),
        None => format!("kafka:{e}"),
    }
}

/// The records answering one record of BOS's, as the downstream services would send them.
pub fn answers(arrival: &Arrival) -> Result<Vec<EncodedRecord>, BenchError> {
    let Some(reply) = responder::respond(&arrival.topic, &arrival.payload, &Behaviour::default())
        .map_err(|e| BenchError::Setup(format!("cannot read BOS's record: {e}")))?
    else {
        return Ok(Vec::new());
    };
    reply
        .answers
        .iter()
        .map(|a| encode_answer(a, &reply.correlation_id))
        .collect::<Result<_, _>>()
        .map_err(|e| BenchError::Setup(format!("cannot encode an answer: {e}")))
}

fn is_topic_of<M: prost::Name>(topic: &str) -> bool {
    topic_for::<M>().as_deref() == Some(topic)
}

/// Registers a GUEST batch and requests the ai_feedback pipeline once it is ready (the provisioning answer is
/// sent by the arrival loop meanwhile).
async fn register_and_request(
    mut client: Client,
    essays: i32,
    deadline: Instant,
) -> Result<String, tonic::Status> {
    let registered = super::api::register(&mut client, essays).await?;
    loop {
        let requested = client
            .request_pipeline(api::RequestPipelineRequest {
                batch_id: registered.batch_id.clone(),
                requested_pipeline: pc::PhaseName::AiFeedback as i32,
                prompt_ref: String::new(),
            })
            .await;
        match requested {
            Ok(_) => return Ok(registered.batch_id),
            // Not ready yet: the content-provisioned event is still on its way.
            Err(s) if s.code() == tonic::Code::FailedPrecondition && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(s) => return Err(s),
        }
    }
}

/// Answers held per batch: the spellcheck outcome each batch starts its measured life with.
pub type Held = HashMap<String, Vec<EncodedRecord>>;

/// Brings `count` batches to "spellcheck command published", answering provisioning on the way, and holds the
/// spellcheck outcomes. gRPC failures are counted in `errors`.
pub async fn prepare(
    plane: &mut Plane,
    client: &Client,
    count: usize,
    essays: i32,
    concurrency: usize,
    deadline: Instant,
    errors: &mut Recorder,
) -> Result<Held, BenchError> {
    let tasks = futures::stream::iter(0..count)
        .map(|_| register_and_request(client.clone(), essays, deadline))
        .buffer_unordered(concurrency.max(1))
        .collect::<Vec<_>>();
    tokio::pin!(tasks);
    let mut requested: Option<usize> = None;
    let mut held = Held::new();
    let mut deliveries = FuturesUnordered::new();
    loop {
        if requested.is_some_and(|n| held.len() >= n) {
            break;
        }
        tokio::select! {
            results = &mut tasks, if requested.is_none() => {
                let mut ok = 0;
                for result in results {
                    match result {
                        Ok(_) => ok += 1,
                        Err(status) => errors.error(format!("{:?}", status.code())),
                    }
                }
                requested = Some(ok);
            }
            arrival = plane.arrivals.recv() => {
                let Some(arrival) = arrival else {
                    return Err(BenchError::Setup("the bench reader stopped".into()));
                };
                if is_topic_of::<pe::BatchEssaysRegistered>(&arrival.topic) {
                    for record in answers(&arrival)? {
                        deliveries.push(plane.send(&record).map_err(BenchError::Setup)?);
                    }
                } else if is_topic_of::<pe::SpellcheckInitiateCommand>(&arrival.topic) {
                    held.insert(arrival.key.clone(), answers(&arrival)?);
                }
            }
            Some(delivered) = deliveries.next(), if !deliveries.is_empty() => {
                if let Ok(Err((e, _))) = delivered {
                    errors.error(kafka_code(&e));
                }
            }
            () = tokio::time::sleep_until(deadline.into()) => {
                return Err(BenchError::Setup(format!(
                    "setup timed out: {} of {count} batches reached spellcheck", held.len()
                )));
            }
        }
    }
    Ok(held)
}

/// What a measured drive did.
pub struct Drive {
    /// One latency per transition: event sent → next record of that batch received.
    pub transitions: Recorder,
    pub batches_completed: usize,
    /// Events actually sent per second (the offered load as achieved).
    pub sent_rate: f64,
}

/// Sends the held answers and answers every command BOS publishes for the measured batches, at `rate` events per
/// second (`None`: as fast as BOS takes them), until every batch completed its pipeline or `deadline`.
pub async fn drive(
    plane: &mut Plane,
    held: Held,
    rate: Option<f64>,
    deadline: Instant,
) -> Result<Drive, BenchError> {
    let batches = held.len();
    let mut queue: VecDeque<(String, Vec<EncodedRecord>)> = held.into_iter().collect();
    let mut in_flight: HashMap<String, Instant> = HashMap::new();
    let mut deliveries = FuturesUnordered::new();
    let mut rec = Recorder::new("transition (event in -> record out)");
    let interval = rate.map(|r| Duration::from_secs_f64(1.0 / r.max(0.001)));
    let started = Instant::now();
    let mut next_send = started;
    let (mut sent, mut completed) = (0u64, 0usize);
    let mut last_completion = started;
    while completed < batches {
        let now = Instant::now();
        while let Some((batch, records)) = (now >= next_send).then(|| queue.pop_front()).flatten() {
            let sent_at = Instant::now();
            let mut queued = true;
            for record in &records {
                match plane.send(record) {
                    Ok(delivery) => deliveries.push(delivery),
                    Err(code) => {
                        rec.error(code);
                        queued = false;
                    }
                }
            }
            if queued {
                in_flight.insert(batch, sent_at);
                sent += 1;
            }
            if let Some(step) = interval {
                // A constant offered load: no catching up in a burst after the queue ran dry.
                let floor = now.checked_sub(step).unwrap_or(now);
                next_send = (next_send + step).max(floor);
                if Instant::now() < next_send {
                    break;
                }
            }
        }
        let pacing = interval.is_some() && !queue.is_empty();
        tokio::select! {
            arrival = plane.arrivals.recv() => {
                let Some(arrival) = arrival else {
                    return Err(BenchError::Setup("the bench reader stopped".into()));
                };
                let Some(sent_at) = in_flight.remove(&arrival.key) else { continue };
                rec.ok(arrival.at.saturating_duration_since(sent_at));
                if is_topic_of::<pe::BatchPipelineCompleted>(&arrival.topic) {
                    completed += 1;
                    last_completion = arrival.at;
                } else {
                    queue.push_back((arrival.key.clone(), answers(&arrival)?));
                }
            }
            Some(delivered) = deliveries.next(), if !deliveries.is_empty() => {
                if let Ok(Err((e, _))) = delivered {
                    rec.error(kafka_code(&e));
                }
            }
            () = tokio::time::sleep_until(next_send.into()), if pacing => {}
            () = tokio::time::sleep_until(deadline.into()) => break,
        }
    }
    if completed < batches {
        rec.stop();
        rec.error(format!("unfinished:{}", batches - completed));
    } else {
        rec.stop_at(last_completion);
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(Drive {
        transitions: rec,
        batches_completed: completed,
        sent_rate: if elapsed > 0.0 {
            sent as f64 / elapsed
        } else {
            0.0
        },
    })
}
