//! Redis "seen recently" fast path in front of the database inbox.
//!
//! The inbox (`processed_events`, written in the unit of work) is the guarantee; Redis only lets a known duplicate
//! skip the database. So: check before the unit of work, remember only after it committed (a handler that failed
//! must run again: defect 15), and when Redis is slow or gone, bypass it — record a metric and a health flag, and
//! change nothing else.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::core::ids::EventId;

/// Key prefix of the "seen" markers in production.
pub const DEFAULT_KEY_PREFIX: &str = "bos:seen:";
/// How long a marker lives; redeliveries later than this still hit the database inbox.
pub const DEFAULT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Connection and response timeout: the fast path must never slow the consumer down noticeably.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum DedupeError {
    #[error("BOS_REDIS_URL: {0}")]
    InvalidUrl(String),
}

/// State of the fast path, readable by the health reporter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FastPathState {
    /// No Redis configured.
    Disabled,
    /// The last Redis call succeeded.
    Active,
    /// The last Redis call failed or timed out; every event goes to the database inbox only.
    Bypassed,
}

/// Shared health flag of the fast path.
#[derive(Debug, Clone)]
pub struct DedupeHealth(Arc<AtomicU8>);

impl DedupeHealth {
    fn new(state: FastPathState) -> Self {
        let health = Self(Arc::new(AtomicU8::new(0)));
        health.set(state);
        health
    }

    fn set(&self, state: FastPathState) {
        let raw = match state {
            FastPathState::Disabled => 0,
            FastPathState::Active => 1,
            FastPathState::Bypassed => 2,
        };
        self.0.store(raw, Ordering::Relaxed);
    }

    pub fn state(&self) -> FastPathState {
        match self.0.load(Ordering::Relaxed) {
            0 => FastPathState::Disabled,
            1 => FastPathState::Active,
            _ => FastPathState::Bypassed,
        }
    }

    pub fn is_bypassed(&self) -> bool {
        self.state() == FastPathState::Bypassed
    }
}

#[derive(Debug, Clone)]
pub struct DedupeConfig {
    pub url: String,
    pub key_prefix: String,
    pub ttl: Duration,
    pub timeout: Duration,
}

impl DedupeConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            key_prefix: DEFAULT_KEY_PREFIX.to_owned(),
            ttl: DEFAULT_TTL,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

struct RedisFastPath {
    manager: ConnectionManager,
    key_prefix: String,
    ttl_secs: u64,
    timeout: Duration,
}

/// The fast path (or its absence). Cheap to clone.
#[derive(Clone)]
pub struct Dedupe {
    redis: Option<Arc<RedisFastPath>>,
    health: DedupeHealth,
}

impl Dedupe {
    /// No Redis: every event goes straight to the database inbox.
    pub fn disabled() -> Self {
        Self {
            redis: None,
            health: DedupeHealth::new(FastPathState::Disabled),
        }
    }

    /// Connects lazily, so a Redis that is down at start-up only means "bypassed" until it comes up.
    pub fn redis(config: DedupeConfig) -> Result<Self, DedupeError> {
        let client = redis::Client::open(config.url.as_str())
            .map_err(|e| DedupeError::InvalidUrl(e.to_string()))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1)
            .set_max_delay(config.timeout);
        let manager = ConnectionManager::new_lazy_with_config(client, manager_config)
            .map_err(|e| DedupeError::InvalidUrl(e.to_string()))?;
        Ok(Self {
            redis: Some(Arc::new(RedisFastPath {
                manager,
                key_prefix: config.key_prefix,
                ttl_secs: config.ttl.as_secs().max(1),
                timeout: config.timeout,
            })),
            health: DedupeHealth::new(FastPathState::Active),
        })
    }

    pub fn health(&self) -> DedupeHealth {
        self.health.clone()
    }

    /// Pings Redis (within the fast path's timeout) and returns the state that leaves the fast path in: the flag
    /// otherwise changes only when events are consumed, so an idle consumer would not notice Redis coming or going.
    pub async fn probe(&self) -> FastPathState {
        if let Some(redis) = &self.redis {
            let _ = self.run::<String>(redis, redis::cmd("PING")).await;
        }
        self.health.state()
    }

    /// True only when Redis positively knows the event was processed; any doubt sends it to the database.
    pub async fn seen(&self, event_id: EventId) -> bool {
        let Some(redis) = &self.redis else {
            return false;
        };
        let mut command = redis::cmd("EXISTS");
        command.arg(redis.key(event_id));
        match self.run::<i64>(redis, command).await {
            Some(n) => n > 0,
            None => false,
        }
    }

    /// Marks the event as processed. Call only after its unit of work committed (or it was found duplicate).
    pub async fn remember(&self, event_id: EventId) {
        let Some(redis) = &self.redis else {
            return;
        };
        let mut command = redis::cmd("SET");
        command
            .arg(redis.key(event_id))
            .arg(1)
            .arg("NX")
            .arg("EX")
            .arg(redis.ttl_secs);
        let _ = self.run::<redis::Value>(redis, command).await;
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        redis: &RedisFastPath,
        command: redis::Cmd,
    ) -> Option<T> {
        let mut connection = redis.manager.clone();
        // The manager's own timeouts cover a request; this one also covers waiting for a reconnect.
        let outcome =
            tokio::time::timeout(redis.timeout, command.query_async::<T>(&mut connection)).await;
        match outcome {
            Ok(Ok(value)) => {
                if self.health.is_bypassed() {
                    tracing::info!("redis fast path is back");
                }
                self.health.set(FastPathState::Active);
                Some(value)
            }
            Ok(Err(error)) => {
                self.bypass(&error.to_string());
                None
            }
            Err(_) => {
                self.bypass("timed out");
                None
            }
        }
    }

    fn bypass(&self, reason: &str) {
        if !self.health.is_bypassed() {
            tracing::warn!(
                reason,
                "redis fast path bypassed; the database inbox still dedupes"
            );
        }
        self.health.set(FastPathState::Bypassed);
        metrics::counter!("redis_fastpath_bypassed_total").increment(1);
    }
}

impl RedisFastPath {
    fn key(&self, event_id: EventId) -> String {
        format!("{}{event_id}", self.key_prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn id() -> EventId {
        EventId::from_uuid(Uuid::now_v7())
    }

    fn config(url: &str) -> DedupeConfig {
        DedupeConfig {
            key_prefix: format!("bos:test:{}:", Uuid::now_v7()),
            ..DedupeConfig::new(url)
        }
    }

    #[tokio::test]
    async fn disabled_never_claims_a_duplicate() {
        let dedupe = Dedupe::disabled();
        let event = id();
        dedupe.remember(event).await;
        assert!(!dedupe.seen(event).await);
        assert_eq!(dedupe.health().state(), FastPathState::Disabled);
    }

    #[tokio::test]
    async fn remembers_only_what_it_was_told_to() {
        let dedupe = Dedupe::redis(config("redis://127.0.0.1:6379")).unwrap();
        let (a, b) = (id(), id());
        assert!(!dedupe.seen(a).await);
        dedupe.remember(a).await;
        assert!(dedupe.seen(a).await);
        assert!(!dedupe.seen(b).await);
        assert_eq!(dedupe.health().state(), FastPathState::Active);
    }

    #[tokio::test]
    async fn unreachable_redis_is_bypassed_quickly() {
        // Port 1 on loopback refuses connections.
        let dedupe = Dedupe::redis(config("redis://127.0.0.1:1")).unwrap();
        let started = std::time::Instant::now();
        let event = id();
        dedupe.remember(event).await;
        assert!(!dedupe.seen(event).await);
        assert!(dedupe.health().is_bypassed());
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_probe_tells_the_state_without_any_event() {
        assert_eq!(Dedupe::disabled().probe().await, FastPathState::Disabled);
        let up = Dedupe::redis(config("redis://127.0.0.1:6379")).unwrap();
        assert_eq!(up.probe().await, FastPathState::Active);
        let down = Dedupe::redis(config("redis://127.0.0.1:1")).unwrap();
        assert_eq!(
            down.health().state(),
            FastPathState::Active,
            "not asked yet"
        );
        assert_eq!(down.probe().await, FastPathState::Bypassed);
        assert!(down.health().is_bypassed());
    }

    #[test]
    fn a_malformed_url_is_a_typed_error() {
        assert!(matches!(
            Dedupe::redis(DedupeConfig::new("nope://")),
            Err(DedupeError::InvalidUrl(_))
        ));
    }
}
