//! Dead letters: a record that can never be processed is copied to `<topic>.DLQ` unchanged (key, value, original
//! headers) plus headers saying where it came from and why, and only then does the consumer move past it.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::codec::dlq_topic;

/// Dead-letter header names.
pub mod header {
    pub const ORIGINAL_TOPIC: &str = "dlq-original-topic";
    pub const ORIGINAL_PARTITION: &str = "dlq-original-partition";
    pub const ORIGINAL_OFFSET: &str = "dlq-original-offset";
    pub const ERROR: &str = "dlq-error";
    pub const ATTEMPT: &str = "dlq-attempt";
}

/// A consumed record, detached from the consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl RawRecord {
    /// Headers as text (the ones BOS reads are all text; a non-UTF-8 value is replaced lossily).
    pub fn text_headers(&self) -> BTreeMap<String, String> {
        self.headers
            .iter()
            .filter_map(|(k, v)| {
                v.as_ref()
                    .map(|v| (k.clone(), String::from_utf8_lossy(v).into_owned()))
            })
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("cannot create the dead-letter producer: {0}")]
    Producer(String),
    #[error("dead-letter publish to {topic} failed: {reason}")]
    Publish { topic: String, reason: String },
}

/// Publishes dead letters and waits for the broker's acknowledgement.
#[derive(Clone)]
pub struct DlqPublisher {
    producer: FutureProducer,
    timeout: Duration,
}

impl DlqPublisher {
    /// An idempotent producer (`acks=all`) on `brokers`; `overrides` are extra librdkafka settings.
    pub fn new(brokers: &str, overrides: &[(String, String)]) -> Result<Self, DlqError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            .set("message.timeout.ms", "10000");
        for (key, value) in overrides {
            config.set(key, value);
        }
        let producer = config
            .create()
            .map_err(|e| DlqError::Producer(e.to_string()))?;
        Ok(Self {
            producer,
            timeout: Duration::from_secs(10),
        })
    }

    /// Copies `record` to its dead-letter topic with the reason; returns once the broker acknowledged it, so the
    /// caller may then commit past the record.
    pub async fn publish(
        &self,
        record: &RawRecord,
        error: &str,
        attempt: u32,
    ) -> Result<(), DlqError> {
        let topic = dlq_topic(&record.topic);
        let mut headers = OwnedHeaders::new();
        for (key, value) in &record.headers {
            headers = headers.insert(Header {
                key,
                value: value.as_deref(),
            });
        }
        let partition = record.partition.to_string();
        let offset = record.offset.to_string();
        let attempt = attempt.to_string();
        for (key, value) in [
            (header::ORIGINAL_TOPIC, record.topic.as_str()),
            (header::ORIGINAL_PARTITION, partition.as_str()),
            (header::ORIGINAL_OFFSET, offset.as_str()),
            (header::ERROR, error),
            (header::ATTEMPT, attempt.as_str()),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        let mut out: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic).headers(headers);
        if let Some(key) = record.key.as_deref() {
            out = out.key(key);
        }
        if let Some(payload) = record.payload.as_deref() {
            out = out.payload(payload);
        }
        match self.producer.send(out, self.timeout).await {
            Ok(_) => {
                metrics::counter!("dead_lettered_total", "topic" => record.topic.clone())
                    .increment(1);
                Ok(())
            }
            Err((e, _)) => Err(DlqError::Publish {
                topic,
                reason: e.to_string(),
            }),
        }
    }
}
