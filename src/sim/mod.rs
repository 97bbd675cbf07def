//! `bos simulate`: plays the services around BOS (File Service, Class Management, Essay Lifecycle with
//! spellcheck, NLP, CJ and AI feedback) against any BOS deployment's broker. It consumes what BOS publishes and
//! answers each record with the events the real services would send, with a configurable latency, per-essay
//! failure rate and phases that never answer.

pub mod cli;
pub mod demo;
pub mod responder;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use prost::{Message, Name};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message as _;
use tokio::sync::Mutex;

use crate::core::ids::{CorrelationId, EventId};
use crate::events::codec::{
    encode_message, published_topics, EncodeError, EncodedRecord, EnvelopeMeta, TraceContext,
};
pub use responder::{Answer, Behaviour};

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("encoding an answer: {0}")]
    Encode(#[from] EncodeError),
}

/// Where and how to simulate.
#[derive(Debug, Clone)]
pub struct SimulatorOptions {
    pub brokers: String,
    pub group: String,
    pub latency: Duration,
    pub behaviour: Behaviour,
}

/// Counts of what the simulator did, for its summary and for tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SimStats {
    pub records_seen: u64,
    pub redeliveries_ignored: u64,
    pub answers_sent: u64,
    pub undecodable: u64,
}

/// Runs until `shutdown` completes; answers every record BOS publishes once (redeliveries are recognised by the
/// stored event id BOS keeps for ever).
pub async fn run(
    options: SimulatorOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<SimStats, SimError> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &options.brokers)
        .set("group.id", &options.group)
        .set("enable.auto.commit", "true")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .create()?;
    let topics = published_topics();
    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topic_refs)?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &options.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "1")
        .create()?;

    let answered: Arc<Mutex<HashSet<String>>> = Arc::default();
    let stats: Arc<Mutex<SimStats>> = Arc::default();
    tokio::pin!(shutdown);
    loop {
        let message = tokio::select! {
            _ = &mut shutdown => break,
            received = consumer.recv() => received,
        };
        let message = match message {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!(%error, "simulator: receive failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        stats.lock().await.records_seen += 1;
        let reply = match responder::respond(
            message.topic(),
            message.payload().unwrap_or_default(),
            &options.behaviour,
        ) {
            Ok(Some(reply)) => reply,
            Ok(None) => continue,
            Err(error) => {
                tracing::warn!(%error, topic = message.topic(), "simulator: record not understood");
                stats.lock().await.undecodable += 1;
                continue;
            }
        };
        if !answered.lock().await.insert(reply.answers_event.clone()) {
            stats.lock().await.redeliveries_ignored += 1;
            continue;
        }
        let producer = producer.clone();
        let stats = Arc::clone(&stats);
        let latency = options.latency;
        tokio::spawn(async move {
            tokio::time::sleep(latency).await;
            for answer in reply.answers {
                match publish(&producer, &answer, &reply.correlation_id).await {
                    Ok(()) => stats.lock().await.answers_sent += 1,
                    Err(error) => tracing::warn!(%error, "simulator: could not publish an answer"),
                }
            }
        });
    }
    let stats = stats.lock().await.clone();
    Ok(stats)
}

/// Wraps an answer in an envelope, as the answering service would, and publishes it keyed by batch id.
pub async fn publish(
    producer: &FutureProducer,
    answer: &Answer,
    correlation_id: &str,
) -> Result<(), SimError> {
    let record = encode_answer(answer, correlation_id)?;
    let headers = record
        .headers
        .iter()
        .fold(OwnedHeaders::new(), |headers, (key, value)| {
            headers.insert(Header {
                key,
                value: Some(value.as_str()),
            })
        });
    producer
        .send(
            FutureRecord::to(&record.topic)
                .key(&record.key)
                .payload(&record.payload)
                .headers(headers),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(error, _)| SimError::Kafka(error))?;
    Ok(())
}

/// The record for one answer: a fresh event id, the correlation id of the command it answers.
pub fn encode_answer(answer: &Answer, correlation_id: &str) -> Result<EncodedRecord, EncodeError> {
    let meta = EnvelopeMeta {
        event_id: EventId::from_uuid(uuid::Uuid::now_v7()),
        correlation_id: CorrelationId::parse("correlation_id", correlation_id)
            .unwrap_or_else(|_| CorrelationId::from_uuid(uuid::Uuid::now_v7())),
        timestamp: Utc::now(),
        trace: TraceContext::new_root(),
    };
    fn wrap<M: Message + Name>(
        m: &M,
        key: &str,
        meta: &EnvelopeMeta,
    ) -> Result<EncodedRecord, EncodeError> {
        encode_message(m, key, meta)
    }
    let key = answer.batch_id();
    match answer {
        Answer::ContentProvisioned(m) => wrap(m, key, &meta),
        Answer::AssociationsConfirmed(m) => wrap(m, key, &meta),
        Answer::EssaysReady(m) => wrap(m, key, &meta),
        Answer::PhaseOutcome(m) => wrap(m, key, &meta),
    }
}
