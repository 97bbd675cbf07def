//! The real stack for end-to-end tests: a tansu broker process (ARCHITECTURE §5, installed by `scripts/tansu`),
//! `bos serve` processes (the binary under test, configured only through its environment), the simulated
//! downstream services, and clients that see BOS only from the outside: its API, its topics and Redis.
//! Include with `mod stack;` next to `mod support;`.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bos::core::ids::BatchId;
use bos::proto::huleedu::bos::v1 as api;
use bos::proto::huleedu::bos::v1::batch_service_client::BatchServiceClient;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::support::kafka::{ReadRecord, TopicReader, PARTITIONS};

/// The HS256 secret every process of a stack shares.
pub const JWT_SECRET: &str = "e2e-test-secret-0123456789abcdef";
pub const INTERNAL_KEY: &str = "e2e-internal-key";

pub fn free_port() -> u16 {
    bos::bench::stack::free_port().expect("a free loopback port")
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A tansu broker on a free loopback port with every BOS topic (and dead-letter topic) created.
pub struct Tansu {
    child: Child,
    pub bootstrap: String,
}

impl Tansu {
    pub async fn start() -> Tansu {
        let path = Command::new(repo_root().join("scripts/tansu"))
            .arg("path")
            .output()
            .expect("run scripts/tansu path");
        assert!(
            path.status.success(),
            "scripts/tansu path: {}",
            String::from_utf8_lossy(&path.stderr)
        );
        let bin = String::from_utf8_lossy(&path.stdout).trim().to_owned();
        let port = free_port();
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
            .spawn()
            .expect("start tansu");
        let bootstrap = format!("127.0.0.1:{port}");
        wait_for_port(port, Duration::from_secs(20)).await;
        let tansu = Tansu { child, bootstrap };
        tansu.create_topics().await;
        tansu
    }

    async fn create_topics(&self) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()
            .expect("admin client");
        let names = bos::events::broker::all_topics();
        let topics: Vec<NewTopic<'_>> = names
            .iter()
            .map(|name| NewTopic::new(name, PARTITIONS, TopicReplication::Fixed(1)))
            .collect();
        let results = admin
            .create_topics(
                &topics,
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .expect("create topics");
        for result in results {
            if let Err((topic, code)) = result {
                assert_eq!(
                    code,
                    rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists,
                    "create {topic}"
                );
            }
        }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn wait_for_port(port: u16, within: Duration) {
    bos::bench::stack::wait_for_port(port, within)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// What every `bos serve` process of one stack shares.
#[derive(Debug, Clone)]
pub struct StackEnv {
    pub database_url: String,
    pub brokers: String,
    pub redis_url: Option<String>,
    pub group: String,
    pub phase_timeout_secs: u64,
}

/// One `bos serve` process.
pub struct BosProcess {
    child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

impl BosProcess {
    /// Starts the binary under test and waits until `/healthz` answers (or the process has exited, e.g. at a
    /// crash point, which `wait_healthy` reports as `false`).
    pub async fn start(env: &StackEnv, extra: &[(&str, String)]) -> BosProcess {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let log = std::env::temp_dir().join(format!(
            "bos-e2e-{port}-{}.log",
            uuid::Uuid::now_v7().simple()
        ));
        let file = std::fs::File::create(&log).expect("log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_bos"));
        command
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info,sqlx=warn,rdkafka=warn")
            .env("BOS_LISTEN_ADDR", addr.to_string())
            .env("BOS_DATABASE_URL", &env.database_url)
            .env("BOS_KAFKA_BROKERS", &env.brokers)
            .env("BOS_KAFKA_GROUP", &env.group)
            .env("BOS_JWT_SECRET", JWT_SECRET)
            .env("BOS_INTERNAL_API_KEY", INTERNAL_KEY)
            .env("BOS_PHASE_TIMEOUT_SECS", env.phase_timeout_secs.to_string())
            .env(
                "BOS_DATA_DIR",
                std::env::temp_dir().join(format!("bos-e2e-data-{port}")),
            )
            .stdout(file.try_clone().expect("log file"))
            .stderr(file);
        if let Some(redis) = &env.redis_url {
            command.env("BOS_REDIS_URL", redis);
        }
        for (key, value) in extra {
            command.env(key, value);
        }
        let child = command.spawn().expect("start bos serve");
        let mut process = BosProcess { child, addr, log };
        process.wait_healthy(Duration::from_secs(60)).await;
        process
    }

    /// Waits for `/healthz`; `false` if the process exited first.
    pub async fn wait_healthy(&mut self, within: Duration) -> bool {
        let url = format!("http://{}/healthz", self.addr);
        let client = reqwest::Client::new();
        let until = Instant::now() + within;
        loop {
            if self.exited() {
                return false;
            }
            if let Ok(response) = client.get(&url).send().await {
                if response.status().is_success() {
                    return true;
                }
            }
            assert!(
                Instant::now() < until,
                "bos did not become healthy; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// SIGKILL: no shutdown, no flushing, no offset commits.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for BosProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

pub type Client =
    BatchServiceClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

#[derive(Clone)]
pub struct Bearer(MetadataValue<tonic::metadata::Ascii>);

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

/// A gRPC client of one process acting as `user`.
pub async fn client(process: &BosProcess, user: &str) -> Client {
    try_client(process, user).await.expect("connect")
}

/// As `client`, but a refused or reset connection is the caller's to handle: a process that is meant to crash
/// may die while the client connects.
pub async fn try_client(
    process: &BosProcess,
    user: &str,
) -> Result<Client, tonic::transport::Error> {
    let jwt = bos::config::JwtKey::Secret(bos::config::Secret::new(JWT_SECRET));
    let token = bos::api::auth::mint_token(&jwt, user, None, 3600).expect("mint a token");
    let channel = Channel::from_shared(process.url())
        .expect("url")
        .connect()
        .await?;
    let bearer = Bearer(format!("Bearer {token}").parse().expect("header"));
    Ok(BatchServiceClient::with_interceptor(channel, bearer))
}

pub async fn register(
    client: &mut Client,
    essays: i32,
    class_id: Option<&str>,
) -> api::RegisterBatchResponse {
    client
        .register_batch(api::RegisterBatchRequest {
            expected_essay_count: essays,
            course_code: bos::proto::huleedu::common::v1::CourseCode::Eng5 as i32,
            class_id: class_id.map(str::to_owned),
            student_prompt_ref: "prompt://e2e".to_owned(),
            assignment_id: "e2e".to_owned(),
            ..Default::default()
        })
        .await
        .expect("register")
        .into_inner()
}

pub async fn status(client: &mut Client, batch_id: &str) -> api::BatchView {
    client
        .get_batch_status(api::GetBatchStatusRequest {
            batch_id: batch_id.to_owned(),
        })
        .await
        .expect("status")
        .into_inner()
        .batch
        .expect("a batch view")
}

/// Polls until `done` holds for the batch (panics with the last view after `within`).
pub async fn wait_until(
    client: &mut Client,
    batch_id: &str,
    within: Duration,
    done: impl Fn(&api::BatchView) -> bool,
) -> api::BatchView {
    let until = Instant::now() + within;
    loop {
        let view = status(client, batch_id).await;
        if done(&view) {
            return view;
        }
        assert!(
            Instant::now() < until,
            "batch {batch_id} did not get there: {view:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn is_ready(view: &api::BatchView) -> bool {
    view.status == bos::proto::huleedu::common::v1::BatchStatus::ReadyForPipelineExecution as i32
}

/// Every run of the view has ended.
pub fn runs_ended(view: &api::BatchView) -> bool {
    let running = bos::proto::huleedu::common::v1::PipelineRunStatus::Running as i32;
    view.current_run
        .iter()
        .chain(&view.past_runs)
        .all(|r| r.status != running)
        && (view.current_run.is_some() || !view.past_runs.is_empty())
}

/// Phase commands read back from the broker, by (batch, phase, attempt) → the distinct event ids published.
pub fn commands_by_key(records: &[ReadRecord]) -> BTreeMap<(String, String, String), Vec<String>> {
    let mut by_key: BTreeMap<(String, String, String), Vec<String>> = BTreeMap::new();
    for record in records {
        let (Some(phase), Some(attempt)) = (record.header("phase"), record.header("attempt"))
        else {
            continue;
        };
        let key = (
            record.key.clone().unwrap_or_default(),
            phase.to_owned(),
            attempt.to_owned(),
        );
        let ids = by_key.entry(key).or_default();
        let id = record.header("event_id").unwrap_or_default().to_owned();
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    by_key
}

/// The command topics (student matching and the four pipeline phases).
pub fn command_topics() -> Vec<String> {
    bos::events::codec::published_topics()
        .into_iter()
        .filter(|t| t.contains(".command."))
        .collect()
}

pub fn parse_batch(id: &str) -> BatchId {
    BatchId::parse("batch_id", id).expect("a batch id")
}

/// Reads `topics` from the beginning until `complete` holds for what was read (a relay under load may publish
/// the last records a while after the state they follow is visible), then a short quiet period more, so a
/// duplicate published late is seen too. Panics after `within`.
pub async fn read_until(
    bootstrap: &str,
    topics: &[String],
    within: Duration,
    complete: impl Fn(&[ReadRecord]) -> bool,
) -> Vec<ReadRecord> {
    let reader = TopicReader::new(bootstrap, topics);
    let until = Instant::now() + within;
    let mut records = Vec::new();
    while !complete(&records) {
        assert!(
            Instant::now() < until,
            "the topics never held what was expected: {records:#?}"
        );
        if let Some(record) = reader.next(Duration::from_millis(200)).await {
            records.push(record);
        }
    }
    records.extend(reader.drain(Duration::from_secs(1)).await);
    records
}

/// How many distinct event ids the records of `topic` carry.
pub fn distinct_events(records: &[ReadRecord], topic: &str) -> usize {
    let mut ids: Vec<&str> = records
        .iter()
        .filter(|r| r.topic == topic)
        .filter_map(|r| r.header("event_id"))
        .collect();
    ids.sort();
    ids.dedup();
    ids.len()
}
