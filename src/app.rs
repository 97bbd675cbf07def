//! The composition root: builds the adapters from the configuration, hands them to the core,
//! serves the API and shuts everything down in order.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use migration::{Migrator, MigratorTrait};
use tokio::net::TcpListener;
use tonic::service::RoutesBuilder;

use crate::api;
use crate::api::health::{self, Health, Probes};
use crate::api::probes::{BrokerProbe, DatabaseProbe, RedisProbe};
use crate::api::stack::ApiStack;
use crate::clients::bcs::{BcsClient, BcsSettings};
use crate::config::Config;
use crate::core::graph::BuiltinResolver;
use crate::core::graph::DependencyGraph;
use crate::core::ids::BatchId;
use crate::core::orchestrator::{Orchestrator, SystemClock, UuidV7Generator};
use crate::core::ports::{BatchRepository, CommitObserver, PipelineResolver};
use crate::events::broker::{BrokerOptions, EmbeddedBroker};
use crate::events::codec::{topic_for, ProtobufEffectEncoder};
use crate::events::consumer::{ConsumerSettings, EventConsumer};
use crate::events::dedupe::{Dedupe, DedupeConfig};
use crate::events::dlq::DlqPublisher;
use crate::events::handlers::EventHandler;
use crate::events::relay::{DeliveryListener, Relay, RelayConfig};
use crate::events::scanner::{self, ScannerConfig};
use crate::notify::feed::ChangeFeed;
use crate::notify::redis::{CacheCoherence, RedisNotifier};
use crate::proto::huleedu::events::v1 as pe;
use crate::store::{GroupCommitConfig, GroupCommitter, Store, StoreConfig};

/// How long open requests and streams may run on after a shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Errors that stop the process.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The listen address could not be bound.
    #[error("BOS_LISTEN_ADDR: cannot listen on {addr}")]
    Bind {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The directory of the SQLite database file could not be created.
    #[error("BOS_DATABASE_URL: cannot create the SQLite directory {path}")]
    DataDir {
        /// The configured directory.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Connecting to or migrating the database failed.
    #[error("database")]
    Database(#[from] sea_orm::DbErr),
    /// The server could not be built or failed while serving.
    #[error(transparent)]
    Server(#[from] api::server::ServerError),
    /// The store could not be opened or migrated.
    #[error("store")]
    Store(#[from] crate::store::StoreError),
    /// The API could not be assembled (auth keys, HTTP rules).
    #[error("api")]
    Api(#[from] api::stack::StackError),
    /// The embedded Kafka-protocol broker could not start.
    #[error("embedded broker")]
    Broker(#[from] crate::events::broker::BrokerError),
    /// The outbox relay's producer could not be created.
    #[error("outbox relay")]
    Relay(#[from] crate::events::relay::RelayError),
    /// The Redis URL is unusable.
    #[error("redis")]
    Redis(#[from] crate::notify::redis::NotifyError),
    /// The Kafka consumer could not be created or subscribed.
    #[error("kafka consumer")]
    Consumer(#[from] crate::events::consumer::ConsumerError),
    /// The dead-letter producer could not be created.
    #[error("dead letters")]
    Dlq(#[from] crate::events::dlq::DlqError),
    /// The Redis URL of the dedupe fast path is unusable.
    #[error("dedupe")]
    Dedupe(#[from] crate::events::dedupe::DedupeError),
    /// The Batch Conductor Service URL is unusable.
    #[error("batch conductor")]
    Bcs(#[from] crate::clients::bcs::BcsError),
}

/// `bos serve`: binds the configured address and runs until SIGINT or SIGTERM.
pub async fn serve(config: Config) -> Result<(), AppError> {
    let listener = TcpListener::bind(config.listen_addr)
        .await
        .map_err(|source| AppError::Bind {
            addr: config.listen_addr,
            source,
        })?;
    run(listener, config, shutdown_signal()).await
}

/// Runs the service on an already bound `listener` until `shutdown` resolves. Tests bind port 0
/// and pass their own shutdown future.
pub async fn run<F>(listener: TcpListener, config: Config, shutdown: F) -> Result<(), AppError>
where
    F: Future<Output = ()> + Send + 'static,
{
    run_observed(listener, config, shutdown, |_| {}).await
}

/// The core of a running service, for the process that started it (black-box tests drive batches
/// through the very orchestrator and change feed the server uses).
#[derive(Clone)]
pub struct Handles {
    /// The orchestrator behind every RPC and consumed event.
    pub orchestrator: Arc<Orchestrator>,
    /// Announces every committed change.
    pub feed: ChangeFeed,
}

/// [`run`], handing the [`Handles`] to `on_start` once they are built.
pub async fn run_observed<F, H>(
    listener: TcpListener,
    config: Config,
    shutdown: F,
    on_start: H,
) -> Result<(), AppError>
where
    F: Future<Output = ()> + Send + 'static,
    H: FnOnce(Handles) + Send,
{
    let local_addr = listener
        .local_addr()
        .map_err(api::server::ServerError::Io)?;
    tracing::info!(%config, "starting");

    // Adapters (store, event plane, notifications, clients) are built here and their gRPC
    // services registered on `grpc`; HTTP/JSON routes go into `http`.
    let (health, health_service) = Health::new().await;
    let mut grpc = RoutesBuilder::default();
    grpc.add_service(health_service);
    api::server::add_reflection(&mut grpc)?;
    let http = axum::Router::new();

    let store = open_store(&config).await?;
    // Background tasks (relay, scanner, consumer, Redis) stop when this flips to true.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let mut tasks: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    // Kafka: the configured brokers, else an in-process broker living as long as this function.
    let (bootstrap, embedded_broker) = match &config.kafka_brokers {
        Some(brokers) => (brokers.clone(), None),
        None => {
            let broker = EmbeddedBroker::start(BrokerOptions::default())?;
            tracing::info!(
                bootstrap = broker.bootstrap_servers(),
                "no BOS_KAFKA_BROKERS: embedded broker started"
            );
            (broker.bootstrap_servers().to_owned(), Some(broker))
        }
    };
    // Every committed change is announced on the feed (WatchBatch streams listen to it), and
    // with Redis also published to the owner's channel and to the other replicas.
    let feed = ChangeFeed::new();
    let mut observers: Vec<Arc<dyn CommitObserver>> = vec![Arc::new(feed.clone())];
    if let Some(url) = &config.redis_url {
        // The recorder first: the subscription may go live (status_cache_coherent) before /metrics is built.
        let _ = api::metrics::prometheus_handle();
        let notifier = RedisNotifier::new(url.expose(), "")?;
        tasks.push(tokio::spawn({
            let (notifier, feed, stopped) = (notifier.clone(), feed.clone(), stopped());
            let coherence: Arc<dyn CacheCoherence> = Arc::new(store.clone());
            async move { notifier.relay_changes(feed, coherence, stopped).await }
        }));
        let (publisher, publisher_task) = notifier.spawn_publisher(4096);
        tasks.push(publisher_task);
        observers.push(Arc::new(publisher));
    }
    // Units of work from every caller are committed in groups (one transaction, one WAL flush per group).
    let repository: Arc<dyn BatchRepository> = Arc::new(GroupCommitter::start(
        store.clone(),
        GroupCommitConfig {
            lanes: config.commit_lanes,
            ..GroupCommitConfig::default()
        },
        observers,
    ));
    let resolver: Arc<dyn PipelineResolver> = match &config.bcs_url {
        Some(url) => Arc::new(BcsClient::new(
            url,
            BcsSettings::default(),
            DependencyGraph::builtin(),
        )?),
        None => Arc::new(BuiltinResolver::default()),
    };
    let orchestrator = Arc::new(Orchestrator::new(
        repository,
        resolver,
        Arc::new(SystemClock),
        Arc::new(UuidV7Generator),
    ));
    let relay = Relay::new(
        store.clone(),
        &bootstrap,
        Some(Arc::clone(&orchestrator) as Arc<dyn DeliveryListener>),
        RelayConfig::default(),
    )?;
    let relay_handle = relay.handle();
    tasks.push(tokio::spawn(
        relay_handle
            .clone()
            .wake_on_changes(feed.clone(), stopped()),
    ));
    tasks.push(tokio::spawn(relay.run(stopped())));
    tasks.push(tokio::spawn(crate::store::retention::run_pruning(
        store.clone(),
        config.retention,
        Duration::from_secs(600),
        stopped(),
    )));
    tasks.push(tokio::spawn(scanner::run(
        Arc::clone(&orchestrator),
        ScannerConfig::new(config.phase_timeout),
        stopped(),
    )));
    // Consumed events: dedupe fast path (Redis, optional), dead letters, one group member.
    let dedupe = match &config.redis_url {
        Some(url) => Dedupe::redis(DedupeConfig::new(url.expose()))?,
        None => Dedupe::disabled(),
    };
    let probes = Probes {
        database: Arc::new(DatabaseProbe(store.clone())),
        broker: Arc::new(BrokerProbe {
            relay: relay_handle,
            // The relay publishes there first for every batch; asking for it never creates anything new.
            topic: topic_for::<pe::BatchEssaysRegistered>()
                .unwrap_or_else(|| "huleedu.batch.essays.registered.v1".to_owned()),
        }),
        redis: Arc::new(RedisProbe(dedupe.clone())),
    };
    let handler = EventHandler::new(Arc::clone(&orchestrator));
    let consumer = EventConsumer::new(
        &ConsumerSettings::new(&bootstrap, &config.kafka_group),
        handler,
        dedupe,
        DlqPublisher::new(&bootstrap, &[])?,
    )?;
    tasks.push(tokio::spawn(consumer.run(stopped())));
    let api_stack = ApiStack::new(&config)?;
    ApiStack::add_services(&mut grpc, Arc::clone(&orchestrator), feed.clone());
    on_start(Handles {
        orchestrator: Arc::clone(&orchestrator),
        feed: feed.clone(),
    });

    let router = api::server::router(grpc.routes(), http, health.clone(), &api_stack);
    health.refresh(&probes).await;
    health.set_serving(true).await;
    tasks.push(tokio::spawn(health.clone().refresh_until(
        probes,
        health::REFRESH_INTERVAL,
        stopped(),
    )));
    tracing::info!(%local_addr, "serving gRPC, HTTP/JSON, /healthz and /metrics");
    announce(
        &config,
        local_addr,
        embedded_broker
            .as_ref()
            .map(EmbeddedBroker::bootstrap_servers),
    );

    let drain_health = health.clone();
    let shutdown = async move {
        shutdown.await;
        tracing::info!("shutdown requested; draining");
        drain_health.set_serving(false).await;
    };
    let served = api::server::serve(listener, router, shutdown, SHUTDOWN_GRACE).await;
    let _ = stop_tx.send(true);
    for task in tasks {
        if tokio::time::timeout(SHUTDOWN_GRACE, task).await.is_err() {
            tracing::warn!("a background task did not stop in time");
        }
    }
    if let Some(broker) = embedded_broker {
        // Dropping joins the broker's thread; keep that off the async workers.
        let _ = tokio::task::spawn_blocking(move || drop(broker)).await;
    }
    served?;
    tracing::info!("stopped");
    Ok(())
}

/// Tells a newcomer how to reach a development server: where it listens, the embedded broker (also written to
/// the data directory, where `bos simulate` looks for it) and, with the development secret, a ready token.
fn announce(config: &Config, local_addr: std::net::SocketAddr, embedded_broker: Option<&str>) {
    println!("BOS listening on {local_addr} (gRPC, HTTP/JSON, /healthz, /metrics)");
    if let Some(bootstrap) = embedded_broker {
        println!("embedded Kafka-protocol broker: {bootstrap}");
        let path = config.data_dir.join(crate::sim::cli::BROKER_ADDR_FILE);
        let written = std::fs::create_dir_all(&config.data_dir)
            .and_then(|()| std::fs::write(&path, bootstrap));
        if let Err(error) = written {
            tracing::warn!(%error, path = %path.display(), "cannot announce the embedded broker");
        }
    }
    if matches!(config.jwt, crate::config::JwtKey::Development) {
        if let Ok(token) = api::auth::mint_token(&config.jwt, "demo-teacher", None, 86_400) {
            println!("development token for user demo-teacher (24 h): {token}");
        }
    }
}

/// The store on the configured database, migrated, writing protobuf envelopes to the outbox.
pub async fn open_store(config: &Config) -> Result<Store, AppError> {
    if let Some(dir) = sqlite_dir(config.database_url.expose()) {
        std::fs::create_dir_all(&dir).map_err(|source| AppError::DataDir { path: dir, source })?;
    }
    let store_config = StoreConfig {
        status_cache_max_age: config.status_cache_max_age,
        write_connections: u32::try_from(config.commit_lanes).unwrap_or(u32::MAX),
        ..StoreConfig::default()
    };
    let store = Store::connect_with(config.database_url.expose(), store_config)
        .await?
        .with_encoder(Arc::new(ProtobufEffectEncoder));
    store.migrate().await?;
    Ok(store)
}

/// `bos migrate`: applies every pending migration to the configured database.
pub async fn migrate(config: &Config) -> Result<(), AppError> {
    let db = connect_database(config).await?;
    Migrator::up(&db, None).await?;
    let applied = Migrator::get_applied_migrations(&db).await?.len();
    tracing::info!(applied, "database schema is up to date");
    db.close().await?;
    Ok(())
}

/// Connects to the configured database, first creating the directory of a SQLite file.
pub async fn connect_database(config: &Config) -> Result<sea_orm::DatabaseConnection, AppError> {
    if let Some(dir) = sqlite_dir(config.database_url.expose()) {
        std::fs::create_dir_all(&dir).map_err(|source| AppError::DataDir { path: dir, source })?;
    }
    Ok(sea_orm::Database::connect(config.database_url.expose()).await?)
}

/// The directory holding the file of a `sqlite:` URL; `None` for other URLs and in-memory SQLite.
fn sqlite_dir(url: &str) -> Option<std::path::PathBuf> {
    let rest = url.strip_prefix("sqlite:")?;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let file = rest.split('?').next().unwrap_or_default();
    if file.is_empty() || file.contains(":memory:") {
        return None;
    }
    let parent = std::path::Path::new(file).parent()?;
    (!parent.as_os_str().is_empty()).then(|| parent.to_owned())
}

/// Resolves on the first SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

/// The Redis change subscription keeps the store's aggregate cache coherent with the other replicas (see
/// `store::cache`); the store itself knows nothing of notify.
/// `status_cache_coherent` (1 while status reads may skip the database) tells an operator, and the status bench,
/// which mode a replica is in.
impl CacheCoherence for Store {
    fn live(&self) {
        self.remote_live();
        metrics::gauge!("status_cache_coherent").set(1.0);
    }

    fn lost(&self) {
        self.remote_lost();
        metrics::gauge!("status_cache_coherent").set(0.0);
    }

    fn changed(&self, batch_id: BatchId) {
        self.remote_changed(batch_id);
    }
}

#[cfg(test)]
mod tests {
    use super::sqlite_dir;

    #[test]
    fn sqlite_dir_is_the_parent_of_the_database_file() {
        assert_eq!(
            sqlite_dir("sqlite://.bos/bos.db?mode=rwc"),
            Some(".bos".into())
        );
        assert_eq!(
            sqlite_dir("sqlite:///var/lib/bos/x.db"),
            Some("/var/lib/bos".into())
        );
        assert_eq!(sqlite_dir("sqlite:bos.db"), None);
        assert_eq!(sqlite_dir("sqlite::memory:"), None);
        assert_eq!(sqlite_dir("postgres://h/db"), None);
    }
}
