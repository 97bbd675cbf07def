//! Kafka helpers for the event-plane tests: a mock cluster with every topic, a reader that collects records of
//! some topics (from the beginning, no consumer group), and a producer that sends records the way other services do.

use std::collections::BTreeMap;
use std::time::Duration;

use bos::events::broker::{BrokerOptions, EmbeddedBroker};
use bos::events::codec::EncodedRecord;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use uuid::Uuid;

/// Partitions of every topic in the test cluster.
pub const PARTITIONS: i32 = 3;

/// A mock cluster (in-process, real Kafka protocol) with every BOS topic and dead-letter topic created.
pub fn start_cluster() -> EmbeddedBroker {
    EmbeddedBroker::start(BrokerOptions {
        brokers: 1,
        partitions: PARTITIONS,
    })
    .expect("start the mock cluster")
}

/// Settings every test consumer group member should use: short session timeouts make group joins fast.
pub fn group_overrides() -> Vec<(String, String)> {
    [
        ("session.timeout.ms", "6000"),
        ("heartbeat.interval.ms", "500"),
        ("topic.metadata.refresh.interval.ms", "1000"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// A record as read back from the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
}

impl ReadRecord {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// Reads every partition of some topics from the beginning, without a consumer group.
pub struct TopicReader {
    consumer: StreamConsumer,
}

impl TopicReader {
    pub fn new(bootstrap: &str, topics: &[String]) -> TopicReader {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", format!("test-reader-{}", Uuid::now_v7()))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()
            .expect("create the test reader");
        let mut assignment = TopicPartitionList::new();
        for topic in topics {
            for partition in 0..PARTITIONS {
                assignment
                    .add_partition_offset(topic, partition, Offset::Beginning)
                    .expect("add a partition");
            }
        }
        consumer.assign(&assignment).expect("assign the partitions");
        TopicReader { consumer }
    }

    /// The next record, or `None` when nothing arrives within `wait`.
    pub async fn next(&self, wait: Duration) -> Option<ReadRecord> {
        match tokio::time::timeout(wait, self.consumer.recv()).await {
            Ok(Ok(message)) => Some(read_record(&message)),
            Ok(Err(e)) => panic!("test reader failed: {e}"),
            Err(_) => None,
        }
    }

    /// Exactly `n` records (fails the test if they do not arrive within `deadline`).
    pub async fn read(&self, n: usize, deadline: Duration) -> Vec<ReadRecord> {
        let until = tokio::time::Instant::now() + deadline;
        let mut records = Vec::with_capacity(n);
        while records.len() < n {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(record) => records.push(record),
                None => panic!(
                    "got {} of {n} records within {deadline:?}: {records:#?}",
                    records.len()
                ),
            }
        }
        records
    }

    /// Whatever arrives until nothing more comes for `quiet`.
    pub async fn drain(&self, quiet: Duration) -> Vec<ReadRecord> {
        let mut records = Vec::new();
        while let Some(record) = self.next(quiet).await {
            records.push(record);
        }
        records
    }
}

fn read_record<M: Message>(message: &M) -> ReadRecord {
    let headers = message
        .headers()
        .map(|h| {
            h.iter()
                .filter_map(|h| {
                    h.value
                        .map(|v| (h.key.to_owned(), String::from_utf8_lossy(v).into_owned()))
                })
                .collect()
        })
        .unwrap_or_default();
    ReadRecord {
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        key: message
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned()),
        payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        headers,
    }
}

/// Sends records as the other services would.
#[derive(Clone)]
pub struct TestProducer {
    producer: FutureProducer,
}

impl TestProducer {
    pub fn new(bootstrap: &str) -> TestProducer {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "0")
            .create()
            .expect("create the test producer");
        TestProducer { producer }
    }

    /// Sends an encoded envelope record (key, value and headers as encoded) and waits for the broker's ack.
    pub async fn send(&self, record: &EncodedRecord) {
        let headers: Vec<(String, Vec<u8>)> = record
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
            .collect();
        self.send_raw(
            &record.topic,
            Some(record.key.as_bytes()),
            Some(&record.payload),
            &headers,
        )
        .await;
    }

    /// Sends arbitrary bytes (poison-record tests).
    pub async fn send_raw(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: &[(String, Vec<u8>)],
    ) {
        let mut owned = OwnedHeaders::new();
        for (k, v) in headers {
            owned = owned.insert(Header {
                key: k,
                value: Some(v.as_slice()),
            });
        }
        let mut out: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(owned);
        if let Some(key) = key {
            out = out.key(key);
        }
        if let Some(payload) = payload {
            out = out.payload(payload);
        }
        self.producer
            .send(out, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .expect("deliver the test record");
    }
}
