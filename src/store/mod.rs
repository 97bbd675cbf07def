//! The persistence adapter: SeaORM on PostgreSQL or SQLite behind the core's `BatchRepository` port.
//!
//! A unit of work is a transaction (ARCHITECTURE §2), or a share of one (`group`): inbox row → the aggregate with
//! versions (the newest this process committed, or read) → `decide` → compare-and-set on the batch row (always, so
//! every change of a batch is serialised by it) and on changed phase rows → child rows (`diff`, one statement per
//! table for a whole group) → outbox rows → commit. The relay reads the outbox through `outbox`.

mod cache;
pub mod committer;
mod diff;
pub mod entities;
pub mod faults;
mod group;
mod inbox;
pub mod mapping;
pub mod outbox;
mod queries;
mod repository;
pub mod retention;
mod rows;

use std::sync::Arc;
use std::time::Duration;

use migration::{Migrator, MigratorTrait};
use sea_orm::sqlx::sqlite::SqliteJournalMode;
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, DbBackend,
    DbErr, SqliteTransactionMode, Statement, TransactionOptions, TransactionTrait,
};
use tokio::sync::{Mutex, MutexGuard};

pub use committer::{GroupCommitConfig, GroupCommitStats, GroupCommitter, DEFAULT_COMMIT_LANES};
pub use faults::{FaultPlan, FaultPoint, InjectedFault};
pub use group::GroupResults;
pub use outbox::{
    EffectEncoder, EncodeError, FailureOutcome, OutboxMessage, OutboxPolicy, OutboxRow,
    OutboxStats, PruneReport,
};

use crate::core::ports::RepositoryError;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] DbErr),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("unsupported database url '{0}': expected postgres:// or sqlite://")]
    UnsupportedUrl(String),
    #[error(transparent)]
    Fault(#[from] InjectedFault),
}

impl From<mapping::MappingError> for StoreError {
    fn from(e: mapping::MappingError) -> Self {
        StoreError::Corrupt(e.to_string())
    }
}

impl From<StoreError> for RepositoryError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Corrupt(m) => RepositoryError::Corrupt(m),
            other => RepositoryError::Unavailable(other.to_string()),
        }
    }
}

/// `StoreConfig::status_cache_max_age` unless configured (`BOS_STATUS_CACHE_MAX_AGE_MS`).
pub const DEFAULT_STATUS_CACHE_MAX_AGE: Duration = Duration::from_secs(1);

/// Tunables of the store; the defaults are what production uses.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Compare-and-set attempts per unit of work before `RepositoryError::Conflict`.
    pub max_cas_attempts: u32,
    /// Base of the jittered back-off between attempts (doubled per attempt).
    pub cas_backoff: Duration,
    pub outbox: OutboxPolicy,
    /// Connections in the pool of reads (PostgreSQL; SQLite uses fewer, see `connect`).
    pub max_connections: u32,
    /// Connections write transactions run on (PostgreSQL). `bos serve` commits every unit of work through a lane
    /// of the group committer, one transaction at a time per lane, so it sets one per lane.
    pub write_connections: u32,
    /// Rows (batch, essays, results, phases) the aggregate cache may hold; 0 turns it off.
    pub aggregate_cache_rows: usize,
    /// How long after it was verified a cached aggregate may answer a status read without a query, while the
    /// coherence signal is live (`remote_live`); zero never skips the query. Bounds how far a status read can
    /// trail another replica's commit whose announcement was lost without the subscription noticing.
    pub status_cache_max_age: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            max_cas_attempts: 8,
            cas_backoff: Duration::from_millis(2),
            outbox: OutboxPolicy::default(),
            max_connections: 16,
            write_connections: DEFAULT_COMMIT_LANES,
            // About 8 MB: the 2,000 small batches in flight of `bos bench latency` (~21 rows each), or a few dozen
            // 1,000-essay ones. At 20,000 rows those 2,000 batches, touched round-robin, missed on every unit (five
            // SELECTs instead of one; 1,000/s p50 14-34 ms, p99 56-132 ms, against 10-12 ms and 29-31 ms now).
            aggregate_cache_rows: 50_000,
            status_cache_max_age: DEFAULT_STATUS_CACHE_MAX_AGE,
        }
    }
}

/// Session settings of the PostgreSQL connections that write. A write transaction finds every row by key, so it
/// plans without sequential scans and hash or merge joins. A group's `UPDATE … FROM (VALUES …)` is otherwise planned
/// from statistics, and a prepared statement keeps its generic plan for the life of the connection: planned while a
/// table was small (a new database, or no ANALYZE since), it scanned the whole table on every flush for good — 6,150
/// sequential scans of `phase_executions` in a 100-second soak, each flush slower than the last. For the same reason
/// a write's statements always run their generic plan: a custom plan is made anew at every bind, and for a 64-row
/// `UPDATE … FROM (VALUES …)` that planning cost PostgreSQL more than the key lookups it chose (bind was 17 % of the
/// statement time in the spine's statement log), for the plan the generic one already is. Set per session rather
/// than per transaction (`SET LOCAL`), they cost a write transaction no statement; reads keep the defaults.
const WRITE_SETTINGS: &[(&str, &str)] = &[
    ("enable_seqscan", "off"),
    ("enable_hashjoin", "off"),
    ("enable_mergejoin", "off"),
    ("plan_cache_mode", "force_generic_plan"),
];

/// The relay's commits (a claim's lease, a published mark, a failure count) do not wait for their WAL flush: lost in
/// a crash of PostgreSQL, each only makes a row go out again, with the same event id, which is what at-least-once
/// delivery allows. The later synchronous commit of any unit of work flushes them anyway. The units of work
/// themselves keep `synchronous_commit = on`: the consumer commits its offsets after them.
const RELAY_SETTINGS: &[(&str, &str)] = &[("synchronous_commit", "off")];

/// The relay claims, marks and records failures one statement at a time, from two tasks.
const RELAY_CONNECTIONS: u32 = 4;

/// The store's connection pools (one on SQLite).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// Reads, migrations and operator queries.
    Reads,
    /// Units of work and other write transactions.
    Writes,
    /// The outbox relay's claims, marks and failure counts.
    Relay,
}

/// The repository. Cheap to clone: every clone shares the pools, the encoder and the fault plan.
#[derive(Clone)]
pub struct Store {
    db: DatabaseConnection,
    /// The pool write transactions run on: on PostgreSQL its sessions carry the planner settings of
    /// `WRITE_SETTINGS`, so a transaction does not spend a statement setting them; on SQLite it is `db`.
    writer: DatabaseConnection,
    /// The relay's pool (claims, marks, failures): on PostgreSQL its sessions also commit without waiting for the
    /// WAL flush (see `RELAY_SETTINGS`); on SQLite it is `db`.
    relay: DatabaseConnection,
    encoder: Option<Arc<dyn EffectEncoder>>,
    faults: Arc<FaultPlan>,
    /// SQLite allows one writer; taking this lock before a write transaction turns "database is locked" errors
    /// into a wait. `None` on PostgreSQL, where row locks and compare-and-set do the job.
    sqlite_writer: Option<Arc<Mutex<()>>>,
    /// Aggregates by version, shared by every clone (see `cache`).
    cache: Arc<cache::AggregateCache>,
    config: StoreConfig,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Connects one pool to `postgres://…` or `sqlite://…` (`sqlite::memory:` for a private in-memory database).
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        Self::connect_with(url, StoreConfig::default()).await
    }

    pub async fn connect_with(url: &str, config: StoreConfig) -> Result<Store, StoreError> {
        let mut options = ConnectOptions::new(url.to_owned());
        options
            .sqlx_logging(false)
            .acquire_timeout(Duration::from_secs(30));
        let is_sqlite = url.starts_with("sqlite:");
        let (db, writer, relay) = if is_sqlite {
            let in_memory = url.contains(":memory:") || url.contains("mode=memory");
            // An in-memory database exists per connection, so it must have exactly one.
            options
                .max_connections(if in_memory { 1 } else { 4 })
                .min_connections(1);
            options.map_sqlx_sqlite_opts(move |o| {
                let o = o
                    .create_if_missing(true)
                    .foreign_keys(true)
                    .busy_timeout(Duration::from_secs(30));
                if in_memory {
                    o
                } else {
                    o.journal_mode(SqliteJournalMode::Wal)
                }
            });
            let db = Database::connect(options).await?;
            (db.clone(), db.clone(), db)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            options.max_connections(config.max_connections);
            let db = Database::connect(options.clone()).await?;
            // Opened on first use: a store that never writes or relays holds no extra connection.
            options.connect_lazy(true);
            let mut writer_options = options.clone();
            writer_options
                .max_connections(config.write_connections.max(1))
                .map_sqlx_postgres_opts(|o| o.options(WRITE_SETTINGS.iter().copied()));
            let writer = Database::connect(writer_options).await?;
            let mut relay_options = options;
            relay_options
                .max_connections(RELAY_CONNECTIONS)
                .map_sqlx_postgres_opts(|o| {
                    o.options(WRITE_SETTINGS.iter().chain(RELAY_SETTINGS).copied())
                });
            let relay = Database::connect(relay_options).await?;
            (db, writer, relay)
        } else {
            return Err(StoreError::UnsupportedUrl(url.to_owned()));
        };
        Ok(Store {
            db,
            writer,
            relay,
            encoder: None,
            faults: Arc::new(FaultPlan::new()),
            sqlite_writer: is_sqlite.then(|| Arc::new(Mutex::new(()))),
            cache: Arc::new(cache::AggregateCache::new(config.aggregate_cache_rows)),
            config,
        })
    }

    /// The encoder that turns `Effect::Publish` into outbox rows (protobuf in production).
    pub fn with_encoder(mut self, encoder: Arc<dyn EffectEncoder>) -> Self {
        self.encoder = Some(encoder);
        self
    }

    pub fn with_faults(mut self, faults: Arc<FaultPlan>) -> Self {
        self.faults = faults;
        self
    }

    /// Runs the pending migrations.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        Migrator::up(&self.db, None).await?;
        Ok(())
    }

    pub fn backend(&self) -> DbBackend {
        self.db.get_database_backend()
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    pub fn faults(&self) -> &Arc<FaultPlan> {
        &self.faults
    }

    /// The pool, for health checks and operator queries.
    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    /// The value of a run-time setting in the sessions of one of the store's pools (`SELECT current_setting`), for
    /// operators checking what writes and the relay run with. PostgreSQL only.
    pub async fn session_setting(&self, pool: Pool, name: &str) -> Result<String, StoreError> {
        let conn = match pool {
            Pool::Reads => &self.db,
            Pool::Writes => &self.writer,
            Pool::Relay => &self.relay,
        };
        let row = conn
            .query_one_raw(Statement::from_sql_and_values(
                self.backend(),
                "SELECT current_setting($1) AS value",
                [name.into()],
            ))
            .await?
            .ok_or_else(|| StoreError::Corrupt("current_setting returned no row".to_owned()))?;
        Ok(row.try_get("", "value")?)
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        self.db.ping().await?;
        Ok(())
    }

    pub async fn close(self) -> Result<(), StoreError> {
        if self.sqlite_writer.is_none() {
            self.writer.close().await?;
            self.relay.close().await?;
        }
        self.db.close().await?;
        Ok(())
    }

    /// Starts a transaction that will write. On SQLite it is `BEGIN IMMEDIATE`: the write lock is taken up front
    /// (waiting up to the busy timeout), so another process writing the same file makes us wait instead of failing
    /// the upgrade from a read transaction half-way. On PostgreSQL it runs on the writer pool (`WRITE_SETTINGS`).
    async fn begin_write(&self) -> Result<DatabaseTransaction, DbErr> {
        if self.sqlite_writer.is_some() {
            return self
                .writer
                .begin_with_options(TransactionOptions {
                    sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                    ..TransactionOptions::default()
                })
                .await;
        }
        self.writer.begin().await
    }

    /// The coherence signal is up: every other replica's commit will reach `remote_changed` from now on, so
    /// status reads may be served from entries verified after this call (see `cache`).
    pub fn remote_live(&self) {
        self.cache.set_coherence(true);
    }

    /// The coherence signal is gone: every status read asks the database until it is live again.
    pub fn remote_lost(&self) {
        self.cache.set_coherence(false);
    }

    /// Another replica committed a change of `batch_id`.
    pub fn remote_changed(&self, batch_id: crate::core::ids::BatchId) {
        self.cache.invalidate(batch_id);
    }

    async fn write_guard(&self) -> Option<MutexGuard<'_, ()>> {
        match &self.sqlite_writer {
            Some(lock) => Some(lock.lock().await),
            None => None,
        }
    }
}
