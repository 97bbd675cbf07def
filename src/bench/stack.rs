//! The system under test, started by the load generator on loopback: a fresh PostgreSQL database, a Kafka-protocol
//! broker (librdkafka's mock cluster in this process, a tansu process, or a given loopback address), and `bos serve`
//! child processes of this very binary, configured only through their environment.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

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
        let rest = admin_url.split_once("://").map_or(admin_url, |(_, r)| r);
        let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
        require_loopback(host.split('/').next().unwrap_or_default())?;
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

/// One `bos serve` child process.
pub struct BosProcess {
    child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
    data_dir: PathBuf,
}

impl BosProcess {
    /// Starts `bos serve` with the bench secret and `env` (database, brokers, …); does not wait for it.
    pub fn spawn(env: &[(&str, String)]) -> Result<BosProcess, BenchError> {
        let port = free_port()?;
        let addr: SocketAddr = SocketAddr::from(([127, 0, 0, 1], port));
        let tag = uuid::Uuid::now_v7().simple();
        let log = std::env::temp_dir().join(format!("bos-bench-{port}-{tag}.log"));
        let data_dir = std::env::temp_dir().join(format!("bos-bench-data-{tag}"));
        let file = std::fs::File::create(&log)?;
        // BOS_BENCH_WRAP runs BOS under a profiler, e.g. "valgrind --tool=callgrind --callgrind-out-file=/tmp/cg".
        let wrap = std::env::var("BOS_BENCH_WRAP").unwrap_or_default();
        let mut words = wrap.split_whitespace();
        let mut command = match words.next() {
            Some(program) => {
                let mut c = Command::new(program);
                c.args(words).arg(std::env::current_exe()?);
                c
            }
            None => Command::new(std::env::current_exe()?),
        };
        command
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn,sqlx=warn,rdkafka=warn")
            .env("BOS_LISTEN_ADDR", addr.to_string())
            .env("BOS_JWT_SECRET", JWT_SECRET)
            .env("BOS_DATA_DIR", &data_dir)
            .stdout(Stdio::null())
            .stderr(file);
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn()?;
        Ok(BosProcess {
            child,
            addr,
            log,
            data_dir,
        })
    }

    /// Starts `bos serve` on a PostgreSQL database and a broker, and waits until `/healthz` answers.
    pub async fn start(database_url: &str, brokers: &str) -> Result<BosProcess, BenchError> {
        let group = format!("bos-bench-{}", uuid::Uuid::now_v7().simple());
        let mut process = BosProcess::spawn(&[
            ("BOS_DATABASE_URL", database_url.to_owned()),
            ("BOS_KAFKA_BROKERS", brokers.to_owned()),
            ("BOS_KAFKA_GROUP", group),
        ])?;
        process.wait_healthy(Duration::from_secs(300)).await?;
        Ok(process)
    }

    /// Polls `/healthz` until it answers 200; returns how long that took from now.
    pub async fn wait_healthy(&mut self, within: Duration) -> Result<Duration, BenchError> {
        let started = Instant::now();
        let url = format!("http://{}/healthz", self.addr);
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(BenchError::Setup(format!(
                    "bos serve exited ({status}); log {}",
                    self.log.display()
                )));
            }
            if let Ok(response) = client.get(&url).send().await {
                if response.status().is_success() {
                    return Ok(started.elapsed());
                }
            }
            if started.elapsed() > within {
                return Err(BenchError::Setup(format!(
                    "bos serve not healthy after {within:?}; log {}",
                    self.log.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Under `BOS_BENCH_WRAP=valgrind --tool=callgrind --collect-atstart=no …`: collect only while measuring.
    pub fn profile(&self, on: bool) {
        if std::env::var("BOS_BENCH_WRAP").is_ok_and(|w| w.contains("callgrind")) {
            let _ = Command::new("callgrind_control")
                .arg(if on { "--instr=on" } else { "--instr=off" })
                .arg(self.pid().to_string())
                .stdout(Stdio::null())
                .status();
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size from /proc, in KiB (Linux only).
    pub fn rss_kib(&self) -> Result<u64, BenchError> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| BenchError::Setup("no VmRSS in /proc/<pid>/status".into()))
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the process (SIGTERM, then SIGKILL after 30 s, so a profiler around it can write its output) and
    /// removes its data directory; the log is kept for a post-mortem.
    pub fn stop(mut self) {
        let terminated = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        let until = Instant::now() + Duration::from_secs(30);
        while terminated && Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

impl Drop for BosProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
        let broker = Broker::start(&common.broker, common.partitions).await?;
        let db = match BenchDb::for_run(common).await {
            Ok(db) => db,
            Err(e) => {
                broker.stop().await;
                return Err(e);
            }
        };
        match BosProcess::start(&db.url, broker.bootstrap()).await {
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

/// CPU time (user + system) a process has used, from /proc (Linux; clock ticks assumed 100 Hz, the kernel's
/// USER_HZ on every mainstream distribution).
pub fn cpu_time(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the command name (which may hold spaces) start at the closing parenthesis.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the state.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// CPU time of every process named `name` (e.g. the PostgreSQL server and its backends).
pub fn cpu_time_of(name: &str) -> Duration {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Duration::ZERO;
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name)
        })
        .map(cpu_time)
        .sum()
}

/// CPU used by the parts of the stack over one measured stretch.
#[derive(Debug, Clone, Copy)]
pub struct CpuMeter {
    bos: u32,
    start: [Duration; 3],
}

impl CpuMeter {
    pub fn start(bos_pid: u32) -> Self {
        Self {
            bos: bos_pid,
            start: Self::now(bos_pid),
        }
    }

    fn now(bos: u32) -> [Duration; 3] {
        [
            cpu_time(bos),
            cpu_time_of("postgres"),
            cpu_time(std::process::id()),
        ]
    }

    /// "CPU ms per op: bos …, postgres …, generator+broker …" for `ops` operations since `start`.
    pub fn per_op(&self, ops: u64, wall: Duration) -> String {
        let end = Self::now(self.bos);
        let used: Vec<Duration> = end
            .iter()
            .zip(self.start)
            .map(|(e, s)| e.saturating_sub(s))
            .collect();
        let per = |d: Duration| d.as_secs_f64() * 1e3 / ops.max(1) as f64;
        let total: Duration = used.iter().sum();
        format!(
            "CPU per op: bos {:.3} ms, postgres {:.3} ms, generator (+ mock broker) {:.3} ms; machine busy {:.0} % of {} CPUs",
            per(used[0]),
            per(used[1]),
            per(used[2]),
            100.0 * total.as_secs_f64() / wall.as_secs_f64().max(1e-9)
                / std::thread::available_parallelism().map_or(1, |n| n.get()) as f64,
            std::thread::available_parallelism().map_or(1, |n| n.get()),
        )
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
