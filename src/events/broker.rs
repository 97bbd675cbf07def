//! The embedded Kafka-protocol broker: librdkafka's mock cluster, hosted in-process when no
//! `BOS_KAFKA_BROKERS` is configured, and by `bos dev-broker` so several processes can share one.
//!
//! The mock cluster is a raw handle that is not `Send`, so it lives on a thread of its own; the
//! rest of the program talks to that thread through a command channel.

use std::future::Future;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::mocking::MockCluster;

use super::codec::dlq_topic;
use crate::proto;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("could not start the embedded broker: {0}")]
    Start(String),
    #[error("could not create topic {topic}: {reason}")]
    CreateTopic { topic: String, reason: String },
    #[error("the embedded broker thread is gone")]
    Gone,
    #[error("broker control failed: {0}")]
    Control(String),
    #[error("could not listen on port {port}: {source}")]
    Listen { port: u16, source: io::Error },
}

/// How to shape the embedded cluster.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    pub brokers: i32,
    pub partitions: i32,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        Self {
            brokers: 1,
            partitions: 3,
        }
    }
}

/// Every topic BOS consumes or publishes (from the descriptors) and the dead-letter topic of each.
pub fn all_topics() -> Vec<String> {
    let mut topics = Vec::new();
    for (_, topic) in proto::event_topics() {
        topics.push(dlq_topic(&topic));
        topics.push(topic);
    }
    topics.sort();
    topics.dedup();
    topics
}

enum Command {
    /// Take every broker down (`true`) or bring them back (`false`).
    SetDown(bool, mpsc::Sender<Result<(), String>>),
    CreateTopic(String, i32, mpsc::Sender<Result<(), String>>),
    Stop,
}

/// A running mock cluster with every BOS topic created. Dropping it stops the cluster.
pub struct EmbeddedBroker {
    bootstrap: String,
    commands: mpsc::Sender<Command>,
    thread: Option<JoinHandle<()>>,
}

impl EmbeddedBroker {
    /// Starts the cluster on its own thread and creates every topic (and DLQ topic).
    pub fn start(options: BrokerOptions) -> Result<Self, BrokerError> {
        let (ready_tx, ready_rx) = mpsc::channel::<Result<String, BrokerError>>();
        let (cmd_tx, cmd_rx) = mpsc::channel::<Command>();
        let thread = std::thread::Builder::new()
            .name("bos-embedded-broker".into())
            .spawn(move || host_cluster(options, ready_tx, cmd_rx))
            .map_err(|e| BrokerError::Start(e.to_string()))?;
        let bootstrap = ready_rx.recv().map_err(|_| BrokerError::Gone)??;
        Ok(Self {
            bootstrap,
            commands: cmd_tx,
            thread: Some(thread),
        })
    }

    /// The `bootstrap.servers` value clients use.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    /// Makes every broker refuse connections (`true`) or accept them again (`false`); for outage tests.
    pub fn set_down(&self, down: bool) -> Result<(), BrokerError> {
        self.request(|reply| Command::SetDown(down, reply))
    }

    /// Creates an extra topic (tests use private topics).
    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), BrokerError> {
        let topic = topic.to_owned();
        self.request(move |reply| Command::CreateTopic(topic, partitions, reply))
    }

    fn request(
        &self,
        make: impl FnOnce(mpsc::Sender<Result<(), String>>) -> Command,
    ) -> Result<(), BrokerError> {
        let (tx, rx) = mpsc::channel();
        self.commands
            .send(make(tx))
            .map_err(|_| BrokerError::Gone)?;
        rx.recv()
            .map_err(|_| BrokerError::Gone)?
            .map_err(BrokerError::Control)
    }

    /// Accepts connections on `127.0.0.1:port` and forwards them to the cluster, so a fixed
    /// address can be handed to other processes. Clients then learn the brokers' own addresses
    /// from metadata, which is fine on one machine.
    pub fn forward_port(&self, port: u16) -> Result<SocketAddr, BrokerError> {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .map_err(|source| BrokerError::Listen { port, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| BrokerError::Listen { port, source })?;
        let target = self
            .bootstrap
            .split(',')
            .next()
            .unwrap_or_default()
            .to_owned();
        std::thread::Builder::new()
            .name("bos-broker-forward".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    let target = target.clone();
                    std::thread::spawn(move || {
                        if let Err(e) = forward(stream, &target) {
                            tracing::debug!(error = %e, "broker forward connection ended");
                        }
                    });
                }
            })
            .map_err(|e| BrokerError::Start(e.to_string()))?;
        Ok(local)
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `bos dev-broker`: hosts an embedded broker until `shutdown` resolves and prints the address
/// other processes put in `BOS_KAFKA_BROKERS`. With `port`, that address is fixed.
pub async fn serve_dev_broker(
    port: Option<u16>,
    partitions: i32,
    shutdown: impl Future<Output = ()>,
) -> Result<(), BrokerError> {
    let broker = EmbeddedBroker::start(BrokerOptions {
        brokers: 1,
        partitions,
    })?;
    let address = match port {
        Some(port) => broker.forward_port(port)?.to_string(),
        None => broker.bootstrap_servers().to_owned(),
    };
    println!("BOS_KAFKA_BROKERS={address}");
    tracing::info!(%address, topics = all_topics().len(), partitions, "embedded Kafka-protocol broker running; Ctrl-C stops it");
    shutdown.await;
    // The mock cluster lives on its own thread; dropping joins it, so do that off the runtime.
    let _ = tokio::task::spawn_blocking(move || drop(broker)).await;
    Ok(())
}

fn forward(client: TcpStream, target: &str) -> io::Result<()> {
    let server = TcpStream::connect(target)?;
    let (mut client_r, mut server_w) = (client.try_clone()?, server.try_clone()?);
    let upstream = std::thread::spawn(move || {
        let _ = io::copy(&mut client_r, &mut server_w);
        let _ = server_w.shutdown(std::net::Shutdown::Write);
    });
    let (mut server_r, mut client_w) = (server, client);
    let _ = io::copy(&mut server_r, &mut client_w);
    let _ = client_w.shutdown(std::net::Shutdown::Write);
    let _ = upstream.join();
    Ok(())
}

fn host_cluster(
    options: BrokerOptions,
    ready: mpsc::Sender<Result<String, BrokerError>>,
    commands: mpsc::Receiver<Command>,
) {
    let cluster = match MockCluster::new(options.brokers.max(1)) {
        Ok(cluster) => cluster,
        Err(e) => {
            let _ = ready.send(Err(BrokerError::Start(e.to_string())));
            return;
        }
    };
    let replication = 1;
    for topic in all_topics() {
        // librdkafka's mock thread serves its op queue before draining its wake-up pipe, so an op
        // queued in between loses its wake-up and waits out the thread's 1 s poll. A pause after
        // each op lets the thread go back to sleep first: 26 topics in ~50 ms instead of ~6 s.
        std::thread::sleep(Duration::from_millis(2));
        if let Err(e) = cluster.create_topic(&topic, options.partitions.max(1), replication) {
            let _ = ready.send(Err(BrokerError::CreateTopic {
                topic,
                reason: e.to_string(),
            }));
            return;
        }
    }
    if ready.send(Ok(cluster.bootstrap_servers())).is_err() {
        return;
    }
    loop {
        let command = commands.recv_timeout(Duration::from_secs(3600));
        // The same lost wake-up as above, for control ops that follow each other closely.
        std::thread::sleep(Duration::from_millis(2));
        match command {
            Ok(Command::SetDown(down, reply)) => {
                let result = if down {
                    cluster.broker_down(-1)
                } else {
                    cluster.broker_up(-1)
                };
                let _ = reply.send(result.map_err(|e| e.to_string()));
            }
            Ok(Command::CreateTopic(topic, partitions, reply)) => {
                let result = cluster.create_topic(&topic, partitions, replication);
                let _ = reply.send(result.map_err(|e| e.to_string()));
            }
            Ok(Command::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_topic_has_a_dead_letter_topic() {
        let topics = all_topics();
        assert!(!topics.is_empty());
        for (_, topic) in proto::event_topics() {
            assert!(topics.contains(&topic));
            assert!(topics.contains(&dlq_topic(&topic)));
        }
    }

    #[test]
    fn starts_and_stops() {
        let broker = EmbeddedBroker::start(BrokerOptions::default()).unwrap();
        assert!(broker.bootstrap_servers().starts_with("127.0.0.1:"));
        broker.set_down(true).unwrap();
        broker.set_down(false).unwrap();
        broker.create_topic("bos.test.extra", 2).unwrap();
    }

    #[test]
    fn a_fixed_port_forwards_to_the_cluster() {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let broker = EmbeddedBroker::start(BrokerOptions::default()).unwrap();
        let addr = broker.forward_port(0).unwrap();
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", addr.to_string())
            .create()
            .unwrap();
        let topic = &proto::event_topics()[0].1;
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap();
        assert_eq!(metadata.topics()[0].partitions().len(), 3);
    }
}
