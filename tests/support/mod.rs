//! Shared helpers for integration tests: a fresh database per test (PostgreSQL or SQLite), a readable outbox
//! encoder, and builders for the core's inputs. Include with `mod support;` from any `tests/*.rs`.
//!
//! PostgreSQL: `BOS_TEST_PG_URL` names the server's admin database (default
//! `postgres://postgres@127.0.0.1:5432/postgres`); each `TestDb` creates `bos_test_<uuid>` there and drops it
//! (WITH (FORCE)) when dropped. SQLite: a file in the temp directory, removed when dropped.

#![allow(dead_code)]

pub mod fixtures;
pub mod kafka;
pub mod relay;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use bos::core::effect::OutboundEvent;
use bos::core::ids::EventId;
use bos::core::ports::CommitObserver;
use bos::store::{
    EffectEncoder, EncodeError, GroupCommitConfig, GroupCommitter, OutboxMessage, Store,
    StoreConfig,
};
use chrono::{DateTime, Utc};
use sea_orm::{ConnectOptions, ConnectionTrait, Database};
use uuid::Uuid;

pub fn pg_admin_url() -> String {
    std::env::var("BOS_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Replaces the database name at the end of a PostgreSQL url.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let prefix_end = base
        .rfind('/')
        .filter(|i| *i > "postgres://".len())
        .unwrap_or(base.len());
    format!("{}/{}{}", &base[..prefix_end], name, query)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// A database that exists for one test.
#[derive(Debug)]
pub struct TestDb {
    pub backend: Backend,
    pub url: String,
    pg_name: Option<String>,
    sqlite_path: Option<PathBuf>,
}

impl TestDb {
    pub async fn new(backend: Backend) -> TestDb {
        match backend {
            Backend::Postgres => Self::postgres().await,
            Backend::Sqlite => Self::sqlite(),
        }
    }

    /// A new, empty PostgreSQL database.
    pub async fn postgres() -> TestDb {
        let name = format!("bos_test_{}", Uuid::new_v4().simple());
        let admin = pg_admin_url();
        let mut options = ConnectOptions::new(admin.clone());
        options.max_connections(1).sqlx_logging(false);
        let conn = Database::connect(options)
            .await
            .expect("connect to the PostgreSQL admin database");
        conn.execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
            .await
            .expect("create the test database");
        conn.close().await.ok();
        TestDb {
            backend: Backend::Postgres,
            url: with_database(&admin, &name),
            pg_name: Some(name),
            sqlite_path: None,
        }
    }

    /// A new SQLite file in the temp directory.
    pub fn sqlite() -> TestDb {
        let path = std::env::temp_dir().join(format!("bos_test_{}.db", Uuid::new_v4().simple()));
        TestDb {
            backend: Backend::Sqlite,
            url: format!("sqlite://{}?mode=rwc", path.display()),
            pg_name: None,
            sqlite_path: Some(path),
        }
    }

    /// A migrated store on this database with the test encoder.
    pub async fn store(&self) -> Store {
        self.store_with(StoreConfig::default()).await
    }

    pub async fn store_with(&self, config: StoreConfig) -> Store {
        let store = Store::connect_with(&self.url, config)
            .await
            .expect("connect the store")
            .with_encoder(Arc::new(TestEncoder));
        store.migrate().await.expect("migrate");
        store
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(path) = self.sqlite_path.take() {
            for suffix in ["", "-wal", "-shm"] {
                let mut p = path.clone().into_os_string();
                p.push(suffix);
                let _ = std::fs::remove_file(p);
            }
        }
        if let Some(name) = self.pg_name.take() {
            // Drop runs inside the test's runtime, which cannot be blocked on; a fresh thread has its own.
            let admin = pg_admin_url();
            let joined = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let mut options = ConnectOptions::new(admin);
                    options.max_connections(1).sqlx_logging(false);
                    let conn = Database::connect(options).await?;
                    conn.execute_unprepared(&format!(
                        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                    ))
                    .await?;
                    conn.close().await?;
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
                })
                .map_err(|e| std::io::Error::other(e.to_string()))
            })
            .join();
            if let Ok(Err(e)) = joined {
                eprintln!("could not drop a test database: {e}");
            }
        }
    }
}

/// Encodes an outbound event as readable text: topic by kind, key = batch id, payload = the Debug form.
#[derive(Debug, Default, Clone, Copy)]
pub struct TestEncoder;

impl EffectEncoder for TestEncoder {
    fn encode(
        &self,
        event: &OutboundEvent,
        event_id: EventId,
        now: DateTime<Utc>,
    ) -> Result<OutboxMessage, EncodeError> {
        let topic = match event {
            OutboundEvent::BatchEssaysRegistered(_) => "test.batch.essays.registered".to_owned(),
            OutboundEvent::PhaseCommand(c) => format!("test.{}.initiate", c.phase.as_str()),
            OutboundEvent::PipelineCompleted(_) => "test.batch.pipeline.completed".to_owned(),
        };
        let mut headers = BTreeMap::new();
        headers.insert("event_id".to_owned(), event_id.to_string());
        headers.insert("event_type".to_owned(), topic.clone());
        headers.insert(
            "correlation_id".to_owned(),
            event.correlation_id().to_string(),
        );
        headers.insert("event_timestamp".to_owned(), now.to_rfc3339());
        Ok(OutboxMessage {
            topic,
            key: event.batch_id().to_string(),
            payload: format!("{event:?}").into_bytes(),
            headers,
        })
    }
}

/// The repository `bos serve` runs on: `store` behind the group committer, telling `observers` about each commit.
pub fn committer(store: &Store, observers: Vec<Arc<dyn CommitObserver>>) -> Arc<GroupCommitter> {
    Arc::new(GroupCommitter::start(
        store.clone(),
        GroupCommitConfig::default(),
        observers,
    ))
}

/// Runs an async test body once per backend, each on its own fresh database.
#[macro_export]
macro_rules! on_both_backends {
    ($name:ident, $body:path) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                let db = $crate::support::TestDb::postgres().await;
                $body(&db).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                let db = $crate::support::TestDb::sqlite();
                $body(&db).await;
            }
        }
    };
}
