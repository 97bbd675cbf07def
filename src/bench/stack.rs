//! The system under test, started by the load generator on loopback: a fresh PostgreSQL database, a Kafka-protocol
//! broker (librdkafka's mock cluster in this process, a tansu process, or a given loopback address), and `bos serve`
//! child processes of this very binary, configured only through their environment.

use std::net::{IpAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

use super::process::BosProcess;
use super::BenchError;
use crate::config::{JwtKey, Secret};
use crate::events::broker::{all_topics, BrokerOptions, EmbeddedBroker};
use crate::proto::huleedu::bos::v1::batch_service_client::BatchServiceClient;

/// The HS256 secret the generator shares with the processes it starts.
pub const JWT_SECRET: &str = "bos-bench-secret-0123456789abcdef";

/// A free loopback port (bound and released; the child binds it right after).
pub fn free_port() -> Result<u16, BenchError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Refuses anything but loopback: the generator must never load someone else's machine.
pub fn require_loopback(list: &str) -> Result<(), BenchError> {
    for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let host = entry
            .rsplit_once(':')
            .map_or(entry, |(h, _)| h)
            .trim_matches(['[', ']']);
        let loopback =
            host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            return Err(BenchError::NotLoopback(entry.to_owned()));
        }
    }
    Ok(())
}

/// Refuses a `scheme://[user[:password]@]host[:port][/…]` URL whose host is not loopback.
pub fn require_loopback_url(url: &str) -> Result<(), BenchError> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host.is_empty() {
        return Err(BenchError::NotLoopback(url.to_owned()));
    }
    require_loopback(host)
}

/// A PostgreSQL database created for one run and dropped at its end.
pub struct BenchDb {
    admin: DatabaseConnection,
    name: String,
    pub url: String,
}

impl BenchDb {
    /// Creates `bos_bench_<uuid>` on the server of `admin_url` (a loopback server), from `common`'s settings.
    pub async fn for_run(common: &super::Common) -> Result<BenchDb, BenchError> {
        let db = Self::create(&common.pg_admin_url).await?;
        if common.log_statements {
            db.admin
                .execute_unprepared(&format!(
                    "ALTER DATABASE \"{}\" SET log_min_duration_statement = 0",
                    db.name
                ))
                .await?;
            println!(
                "logging every statement of {} to the PostgreSQL server log",
                db.name
            );
        }
        Ok(db)
    }

    /// Creates `bos_bench_<uuid>` on the server of `admin_url` (a loopback server).
    pub async fn create(admin_url: &str) -> Result<BenchDb, BenchError> {
        require_loopback_url(admin_url)?;
        let name = format!("bos_bench_{}", uuid::Uuid::now_v7().simple());
        let mut options = ConnectOptions::new(admin_url.to_owned());
        options.max_connections(1).sqlx_logging(false);
        let admin = Database::connect(options).await?;
        admin
            .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
            .await?;
        let base = admin_url
            .rsplit_once('/')
            .map_or(admin_url, |(base, _)| base);
        Ok(BenchDb {
            admin,
            url: format!("{base}/{name}"),
            name,
        })
    }

    pub async fn drop_database(self) {
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        if let Err(error) = self.admin.execute_unprepared(&sql).await {
            eprintln!("warning: cannot drop {}: {error}", self.name);
        }
        let _ = self.admin.close().await;
    }
}

/// Which broker the measures use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerChoice {
    /// librdkafka's mock cluster, hosted by the generator.
    Mock,
    /// A tansu process (`scripts/tansu path`, or `BOS_TANSU_BIN`).
    Tansu,
    /// An already running broker on loopback.
    External(String),
}

impl std::str::FromStr for BrokerChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "mock" => Ok(BrokerChoice::Mock),
            "tansu" => Ok(BrokerChoice::Tansu),
            other if other.contains(':') => Ok(BrokerChoice::External(other.to_owned())),
            other => Err(format!("'{other}': expected mock, tansu or host:port")),
        }
    }
}

/// A running broker with every BOS topic.
pub enum Broker {
    Mock(EmbeddedBroker),
    Tansu { child: Child, bootstrap: String },
    External(String),
}

impl Broker {
    pub async fn start(choice: &BrokerChoice, partitions: i32) -> Result<Broker, BenchError> {
        match choice {
            BrokerChoice::Mock => Ok(Broker::Mock(EmbeddedBroker::start(BrokerOptions {
                brokers: 1,
                partitions,
            })?)),
            BrokerChoice::External(list) => {
                require_loopback(list)?;
                create_topics(list, partitions).await?;
                Ok(Broker::External(list.clone()))
            }
            BrokerChoice::Tansu => {
                let bin = tansu_binary()?;
                let port = free_port()?;
                let url = format!("tcp://127.0.0.1:{port}");
                let child = Command::new(bin)
                    .args([
                        "broker",
                        "--listener-url",
                        &url,
                        "--advertised-listener-url",
                        &url,
                    ])
                    .args(["--storage-engine", "memory://tansu/"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?;
                let bootstrap = format!("127.0.0.1:{port}");
                let broker = Broker::Tansu { child, bootstrap };
                wait_for_port(port, Duration::from_secs(20)).await?;
                create_topics(broker.bootstrap(), partitions).await?;
                Ok(broker)
            }
        }
    }

    pub fn bootstrap(&self) -> &str {
        match self {
            Broker::Mock(b) => b.bootstrap_servers(),
            Broker::Tansu { bootstrap, .. } => bootstrap,
            Broker::External(list) => list,
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            Broker::Mock(_) => "librdkafka mock cluster (in the generator process)",
            Broker::Tansu { .. } => "tansu 0.1.2 (memory storage, own process)",
            Broker::External(_) => "external loopback broker",
        }
    }

    /// Stops the broker off the async workers (the mock cluster joins its thread).
    pub async fn stop(self) {
        match self {
            Broker::Mock(b) => {
                let _ = tokio::task::spawn_blocking(move || drop(b)).await;
            }
            Broker::Tansu { mut child, .. } => {
                let _ = child.kill();
                let _ = child.wait();
            }
            Broker::External(_) => {}
        }
    }
}

fn tansu_binary() -> Result<PathBuf, BenchError> {
    if let Ok(bin) = std::env::var("BOS_TANSU_BIN") {
        return Ok(bin.into());
    }
    let out = Command::new("scripts/tansu").arg("path").output()?;
    if !out.status.success() {
        return Err(BenchError::Setup(format!(
            "scripts/tansu path (run from the repository root, or set BOS_TANSU_BIN): {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().into())
}

async fn create_topics(bootstrap: &str, partitions: i32) -> Result<(), BenchError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let names = all_topics();
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&topics, &options).await? {
        if let Err((topic, code)) = result {
            if code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                return Err(BenchError::Setup(format!("create topic {topic}: {code}")));
            }
        }
    }
    Ok(())
}

pub async fn wait_for_port(port: u16, within: Duration) -> Result<(), BenchError> {
    let until = Instant::now() + within;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() >= until {
            return Err(BenchError::Setup(format!(
                "nothing listens on 127.0.0.1:{port}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A database, a broker and one `bos serve` on them: what most measures run against.
pub struct Stack {
    pub db: BenchDb,
    pub broker: Broker,
    pub bos: BosProcess,
}

impl Stack {
    /// Starts the three, undoing what was started when a later one fails (no database is left behind).
    pub async fn start(common: &super::Common) -> Result<Stack, BenchError> {
        Self::start_with(common, &[]).await
    }

    /// `start`, with more settings for `bos serve` (`extra`).
    pub async fn start_with(
        common: &super::Common,
        extra: &[(&str, String)],
    ) -> Result<Stack, BenchError> {
        let broker = Broker::start(&common.broker, common.partitions).await?;
        let db = match BenchDb::for_run(common).await {
            Ok(db) => db,
            Err(e) => {
                broker.stop().await;
                return Err(e);
            }
        };
        match BosProcess::start_with(&db.url, broker.bootstrap(), extra).await {
            Ok(bos) => Ok(Stack { db, broker, bos }),
            Err(e) => {
                db.drop_database().await;
                broker.stop().await;
                Err(e)
            }
        }
    }

    pub async fn stop(self) {
        self.bos.stop();
        self.broker.stop().await;
        self.db.drop_database().await;
    }
}

/// A bearer token for `user`, signed with the bench secret.
pub fn token(user: &str) -> Result<String, BenchError> {
    let jwt = JwtKey::Secret(Secret::new(JWT_SECRET));
    Ok(crate::api::auth::mint_token(&jwt, user, None, 24 * 3600)?)
}

/// Adds the bearer token to every request of a client.
#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl Bearer {
    pub fn new(user: &str) -> Result<Bearer, BenchError> {
        let value = format!("Bearer {}", token(user)?)
            .parse()
            .map_err(|_| BenchError::Setup("the token is not a header value".into()))?;
        Ok(Bearer(value))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

pub type Client =
    BatchServiceClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

/// A gRPC channel to `url` (HTTP/2, one connection).
pub async fn channel(url: &str) -> Result<Channel, BenchError> {
    Ok(Channel::from_shared(url.to_owned())
        .map_err(|e| BenchError::Setup(e.to_string()))?
        .connect()
        .await?)
}

/// A client of BOS acting as `user`.
pub async fn client(url: &str, user: &str) -> Result<Client, BenchError> {
    Ok(
        BatchServiceClient::with_interceptor(channel(url).await?, Bearer::new(user)?)
            .max_decoding_message_size(64 * 1024 * 1024),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_targets_are_accepted() {
        assert!(require_loopback("127.0.0.1:9092").is_ok());
        assert!(require_loopback("localhost:9092,127.0.0.2:1").is_ok());
        assert!(require_loopback("[::1]:9092").is_ok());
        assert!(require_loopback("10.0.0.5:9092").is_err());
        assert!(require_loopback("kafka.example.com:9092").is_err());
        assert!(require_loopback_url("redis://127.0.0.1:6379").is_ok());
        assert!(require_loopback_url("redis://:pw@localhost:6379/0").is_ok());
        assert!(require_loopback_url("postgres://postgres@127.0.0.1:5432/postgres").is_ok());
        assert!(require_loopback_url("redis://cache.example.com:6379").is_err());
        assert!(require_loopback_url("redis://u:p@10.0.0.5/0").is_err());
        assert!(require_loopback_url("redis://").is_err());
    }

    #[test]
    fn broker_choice_parses() {
        assert_eq!("mock".parse(), Ok(BrokerChoice::Mock));
        assert_eq!("tansu".parse(), Ok(BrokerChoice::Tansu));
        assert_eq!(
            "127.0.0.1:1".parse(),
            Ok(BrokerChoice::External("127.0.0.1:1".into()))
        );
        assert!("nope".parse::<BrokerChoice>().is_err());
    }
}
