//! The `bos` command line. Each subcommand is one match arm that calls one function in a module.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use bos::config::{Config, ConfigLayer};
use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "bos",
    version,
    about = "Batch Orchestrator Service: gRPC-first workflow engine for essay batch processing"
)]
struct Cli {
    /// TOML configuration file (keys as in the README's configuration table, lower case without BOS_).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,

    #[command(flatten)]
    flags: ConfigFlags,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve gRPC, HTTP/JSON, /healthz and /metrics on one port until SIGINT or SIGTERM.
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Print a signed HS256 bearer token from the configured secret (development tooling).
    Token(TokenArgs),
    /// Host an in-process Kafka-protocol broker with every BOS topic, for several local processes to share.
    DevBroker(DevBrokerArgs),
    /// Play the downstream services against BOS's broker; with --demo, also drive demo batches through the API.
    Simulate(bos::sim::cli::SimulateArgs),
    /// Load generator: measures BOS on loopback against references from the same run (see BENCHMARKS.md).
    Bench(bos::bench::BenchArgs),
}

#[derive(Debug, Args)]
struct DevBrokerArgs {
    /// Fixed local port for the bootstrap address (default: a free port, printed).
    #[arg(long)]
    port: Option<u16>,
    /// Partitions per topic.
    #[arg(long, default_value_t = 3)]
    partitions: i32,
}

#[derive(Debug, Args)]
struct TokenArgs {
    /// The user id (`sub` claim).
    #[arg(long)]
    user: String,
    /// The organisation (`org_id` claim).
    #[arg(long)]
    org: Option<String>,
    /// Seconds until the token expires.
    #[arg(long, default_value_t = 3600)]
    ttl_secs: u64,
}

/// Settings that may also be given as flags; they override the file and the environment.
/// Secrets are deliberately not flags: command lines are visible to every local user.
#[derive(Debug, Args)]
struct ConfigFlags {
    /// Address for gRPC and HTTP [env: BOS_LISTEN_ADDR, default 127.0.0.1:50051].
    #[arg(long, global = true, value_name = "ADDR")]
    listen_addr: Option<String>,
    /// Directory of the default SQLite database [env: BOS_DATA_DIR, default .bos].
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// postgres://… or sqlite:… [env: BOS_DATABASE_URL].
    #[arg(long, global = true, value_name = "URL")]
    database_url: Option<String>,
    /// Kafka bootstrap servers host:port,… [env: BOS_KAFKA_BROKERS; unset = embedded broker].
    #[arg(long, global = true, value_name = "LIST")]
    kafka_brokers: Option<String>,
    /// Kafka consumer group [env: BOS_KAFKA_GROUP, default bos].
    #[arg(long, global = true, value_name = "GROUP")]
    kafka_group: Option<String>,
    /// Redis URL [env: BOS_REDIS_URL; unset = no Redis].
    #[arg(long, global = true, value_name = "URL")]
    redis_url: Option<String>,
    /// Batch Conductor Service URL [env: BOS_BCS_URL; unset = built-in resolver].
    #[arg(long, global = true, value_name = "URL")]
    bcs_url: Option<String>,
    /// Seconds a dispatched phase may run [env: BOS_PHASE_TIMEOUT_SECS, default 3600].
    #[arg(long, global = true, value_name = "SECS")]
    phase_timeout_secs: Option<u64>,
}

impl From<ConfigFlags> for ConfigLayer {
    fn from(flags: ConfigFlags) -> Self {
        ConfigLayer {
            listen_addr: flags.listen_addr,
            data_dir: flags.data_dir,
            database_url: flags.database_url,
            kafka_brokers: flags.kafka_brokers,
            kafka_group: flags.kafka_group,
            redis_url: flags.redis_url,
            bcs_url: flags.bcs_url,
            phase_timeout_secs: flags.phase_timeout_secs,
            ..ConfigLayer::default()
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the context chain on one line, without a backtrace: the message names
            // the bad setting, which is what an operator needs.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let config = load_config(cli.config.as_deref(), cli.flags)?;
    if let Command::Token(args) = &cli.command {
        let token =
            bos::api::auth::mint_token(&config.jwt, &args.user, args.org.as_deref(), args.ttl_secs)
                .context("bos token")?;
        println!("{token}");
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Serve => bos::app::serve(config).await.context("bos serve"),
            Command::Migrate => bos::app::migrate(&config).await.context("bos migrate"),
            Command::Token(_) => Ok(()),
            Command::DevBroker(args) => bos::events::broker::serve_dev_broker(
                args.port,
                args.partitions,
                bos::app::shutdown_signal(),
            )
            .await
            .context("bos dev-broker"),
            Command::Simulate(args) => {
                bos::sim::cli::simulate(&config, args, bos::app::shutdown_signal())
                    .await
                    .context("bos simulate")
            }
            Command::Bench(args) => bos::bench::run(args).await.context("bos bench"),
        }
    })
}

fn load_config(file: Option<&std::path::Path>, flags: ConfigFlags) -> anyhow::Result<Config> {
    let env = ConfigLayer::from_env(std::env::vars_os().filter_map(|(k, v)| {
        // Non-UTF-8 variables cannot be BOS settings; skip them instead of panicking.
        Some((k.into_string().ok()?, v.into_string().ok()?))
    }))
    .context("invalid configuration")?;
    Config::load(file, env, flags.into()).context("invalid configuration")
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
}
