//! `bos bench <measure>`: the load generator. It starts what it measures on loopback (a fresh PostgreSQL
//! database, a broker, `bos serve` child processes of this binary), drives it through the generated tonic client
//! and rdkafka, bounds itself in count and time, and prints throughput, p50/p90/p99 latency, errors by gRPC code,
//! and each figure against its reference from the same run as a ratio. BENCHMARKS.md holds the results.

pub mod api;
pub mod flow;
pub mod memory;
pub mod process;
pub mod stack;
pub mod stats;
pub mod transitions;

use std::time::{Duration, Instant};

use clap::{Args, Subcommand};

pub use stack::BrokerChoice;

/// Why a measure could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0} is not a loopback address; the generator only targets this machine")]
    NotLoopback(String),
    #[error("setup: {0}")]
    Setup(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("database: {0}")]
    Database(#[from] sea_orm::DbErr),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("broker: {0}")]
    Broker(#[from] crate::events::broker::BrokerError),
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("gRPC call: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    #[error("token: {0}")]
    Token(#[from] crate::api::auth::AuthError),
}

/// Settings shared by every measure.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Admin URL of the loopback PostgreSQL server; each run creates (and drops) its own database there.
    #[arg(
        long,
        global = true,
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub pg_admin_url: String,
    /// Broker: `mock` (librdkafka mock cluster in the generator), `tansu` (scripts/tansu), or a loopback host:port.
    #[arg(long, global = true, default_value = "mock")]
    pub broker: BrokerChoice,
    /// Partitions per topic (also the concurrency of the raw reference loop).
    #[arg(long, global = true, default_value_t = 4)]
    pub partitions: i32,
    /// Log every statement of the run's database with its duration (PostgreSQL's server log), for profiling.
    #[arg(long, global = true)]
    pub log_statements: bool,
    /// Hard bound on one measure's run time, setup included, in seconds.
    #[arg(long, global = true, default_value_t = 900)]
    pub max_secs: u64,
    #[arg(skip = None)]
    started: Option<Instant>,
}

impl Common {
    /// When the running measure must stop.
    pub fn deadline(&self) -> Instant {
        self.started.unwrap_or_else(Instant::now) + Duration::from_secs(self.max_secs)
    }
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub measure: Measure,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Subcommand)]
pub enum Measure {
    /// Transitions/s through consume → unit of work → outbox → relay, vs a raw single-row CAS UPDATE loop.
    Transitions(transitions::TransitionArgs),
    /// Event in → next record out latency at a constant offered load (default 1,000 transitions/s).
    Latency(transitions::LatencyArgs),
    /// GetBatchStatus: gRPC vs a bare tonic echo service, HTTP/JSON vs gRPC.
    Status(api::StatusArgs),
    /// RegisterBatch of 1,000 essays.
    Register(api::RegisterArgs),
    /// Resident memory idle and through a soak (`--soak-secs`, default 600).
    Memory(memory::MemoryArgs),
    /// Cold start to serving in the embedded mode, and its idle memory.
    ColdStart(memory::ColdStartArgs),
    /// Every measure with its defaults, one after the other (`--soak-secs` sets the soak).
    All(AllArgs),
    /// The bare tonic echo service the status measure compares against (started by it).
    #[command(hide = true)]
    EchoServer(api::EchoArgs),
}

#[derive(Debug, Clone, Args)]
pub struct AllArgs {
    /// Soak length in seconds.
    #[arg(long, default_value_t = 600)]
    pub soak_secs: u64,
}

/// Runs one measure and prints its figures; the verdict lines (ratios and targets) come last.
pub async fn run(args: BenchArgs) -> Result<(), BenchError> {
    let mut common = args.common;
    if let Measure::EchoServer(echo) = &args.measure {
        return api::echo_server(echo).await;
    }
    if let BrokerChoice::External(list) = &common.broker {
        stack::require_loopback(list)?;
    }
    print_machine();
    let measures: Vec<Measure> = match args.measure {
        Measure::All(all) => vec![
            Measure::ColdStart(memory::ColdStartArgs { runs: 7 }),
            Measure::Register(api::RegisterArgs {
                rounds: 40,
                essays: 1000,
            }),
            Measure::Status(api::StatusArgs {
                concurrency: 32,
                connections: 4,
                seconds: 5,
                max_calls: 2_000_000,
                essays: 20,
                redis_url: api::DEFAULT_REDIS_URL.to_owned(),
            }),
            Measure::Transitions(transitions::TransitionArgs {
                batches: transitions::DEFAULT_BATCHES,
                essays: 4,
                raw_seconds: 5,
            }),
            Measure::Latency(transitions::LatencyArgs {
                rate: 1000.0,
                seconds: 6,
                essays: 4,
            }),
            Measure::Memory(memory::MemoryArgs {
                soak_secs: all.soak_secs,
                in_flight: 16,
                essays: 20,
                sample_secs: 10,
            }),
        ],
        one => vec![one],
    };
    let mut verdicts = Vec::new();
    for measure in measures {
        common.started = Some(Instant::now());
        let lines = match &measure {
            Measure::Transitions(a) => transitions::transitions(&common, a).await?,
            Measure::Latency(a) => transitions::latency(&common, a).await?,
            Measure::Status(a) => api::status(&common, a).await?,
            Measure::Register(a) => api::register_batches(&common, a).await?,
            Measure::Memory(a) => memory::memory(&common, a).await?,
            Measure::ColdStart(a) => memory::cold_start(a).await?,
            Measure::All(_) | Measure::EchoServer(_) => Vec::new(),
        };
        for line in &lines {
            println!("{line}");
        }
        verdicts.extend(lines);
    }
    println!("\n== verdicts ==");
    for line in verdicts {
        println!("{line}");
    }
    Ok(())
}

/// The machine the figures belong to.
fn print_machine() {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_owned())
        })
        .and_then(|kib| kib.parse::<u64>().ok())
        .map_or_else(
            || "unknown".into(),
            |kib| format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0),
        );
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "machine: {cpus} CPUs ({cpu}), {mem} memory; bos {}",
        env!("CARGO_PKG_VERSION")
    );
}
