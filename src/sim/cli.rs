//! The `bos simulate` command: where the broker and the API are, and what to print.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::Config;
use crate::core::ids::PhaseName;
use crate::events::codec::phase_to_proto;

/// File in the data directory where `bos serve` writes the embedded broker's address, so `bos simulate` and other
/// local tools find it without configuration.
pub const BROKER_ADDR_FILE: &str = "broker.addr";

#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// Register demo batches through the API, request pipelines and show their progress until all are done.
    #[arg(long)]
    pub demo: bool,
    /// The BOS API for --demo [default: http://<BOS_LISTEN_ADDR>].
    #[arg(long, value_name = "URL")]
    pub api: Option<String>,
    /// Bearer token for --demo [default: minted for --user from the configured or development secret].
    #[arg(long, value_name = "JWT")]
    pub token: Option<String>,
    /// The teacher the demo registers batches as.
    #[arg(long, default_value = "demo-teacher")]
    pub user: String,
    /// Milliseconds each simulated service takes to answer.
    #[arg(long, default_value_t = 150)]
    pub latency_ms: u64,
    /// Chance (0–1) that one essay fails in one phase attempt.
    #[arg(long, default_value_t = 0.1)]
    pub failure_rate: f64,
    /// Phases whose commands are never answered (comma-separated phase names, e.g. cj_assessment).
    #[arg(long, value_delimiter = ',', value_name = "PHASES")]
    pub never_answer: Vec<String>,
    /// Send essays-ready before the student associations are confirmed.
    #[arg(long)]
    pub early_essays_ready: bool,
    /// Seed of the failure draws.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Consumer group of the simulated services.
    #[arg(long, default_value = "bos-simulator")]
    pub group: String,
    /// Give up on the demo after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub deadline_secs: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error("--failure-rate must be between 0 and 1, got {0}")]
    FailureRate(f64),
    #[error("--never-answer: {0}")]
    Phase(#[from] crate::core::ids::InvalidValue),
    #[error("no broker: set BOS_KAFKA_BROKERS, or start `bos serve` with the embedded broker in data dir {0}")]
    NoBroker(PathBuf),
    #[error(transparent)]
    Sim(#[from] super::SimError),
    #[error(transparent)]
    Demo(#[from] super::demo::DemoError),
    #[error("token: {0}")]
    Token(#[from] crate::api::auth::AuthError),
    #[error("{0} demo batch(es) did not complete")]
    Incomplete(usize),
}

impl SimulateArgs {
    pub fn behaviour(&self) -> Result<super::Behaviour, SimulateError> {
        if !(0.0..=1.0).contains(&self.failure_rate) {
            return Err(SimulateError::FailureRate(self.failure_rate));
        }
        let never_answer = self
            .never_answer
            .iter()
            .map(|raw| PhaseName::parse("never_answer", raw).map(|p| phase_to_proto(p) as i32))
            .collect::<Result<BTreeSet<i32>, _>>()?;
        Ok(super::Behaviour {
            failure_rate: self.failure_rate,
            never_answer,
            early_essays_ready: self.early_essays_ready,
            seed: self.seed,
        })
    }
}

/// The broker: configured, or the one a local `bos serve` announced in its data directory.
pub fn broker_address(config: &Config) -> Result<String, SimulateError> {
    if let Some(brokers) = &config.kafka_brokers {
        return Ok(brokers.clone());
    }
    read_announced_broker(&config.data_dir)
        .ok_or_else(|| SimulateError::NoBroker(config.data_dir.clone()))
}

fn read_announced_broker(data_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(data_dir.join(BROKER_ADDR_FILE)).ok()?;
    let address = text.trim();
    (!address.is_empty()).then(|| address.to_owned())
}

/// `bos simulate [--demo]`: answers BOS's commands until SIGINT/SIGTERM, or, with --demo, until the demo batches
/// are done (then prints the summary table).
pub async fn simulate(
    config: &Config,
    args: SimulateArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), SimulateError> {
    let options = super::SimulatorOptions {
        brokers: broker_address(config)?,
        group: args.group.clone(),
        latency: Duration::from_millis(args.latency_ms),
        behaviour: args.behaviour()?,
    };
    println!(
        "simulating the downstream services on broker {}",
        options.brokers
    );
    if !args.demo {
        let stats = super::run(options, shutdown).await?;
        println!("{stats:?}");
        return Ok(());
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let simulator = tokio::spawn(super::run(options, async move {
        let _ = stop_rx.await;
    }));
    let api = args
        .api
        .clone()
        .unwrap_or_else(|| format!("http://{}", config.listen_addr));
    let token = match &args.token {
        Some(token) => token.clone(),
        None => crate::api::auth::mint_token(&config.jwt, &args.user, None, 3600)?,
    };
    let outcome = super::demo::run(
        &api,
        &token,
        super::demo::default_batches(),
        Duration::from_secs(args.deadline_secs),
    )
    .await;
    let _ = stop_tx.send(());
    let _ = simulator.await;
    let results = outcome?;
    println!("\n{}", super::demo::summary_table(&results));
    let expected = super::demo::default_batches().len();
    if results.len() < expected {
        return Err(SimulateError::Incomplete(expected - results.len()));
    }
    Ok(())
}
