//! The health probes of the running service: the database (`SELECT 1`), the broker (through the outbox relay's
//! own producer, and whether the relay manages to publish) and the Redis fast path (a `PING`).

use sea_orm::ConnectionTrait;

use super::health::{Check, Probe, PROBE_TIMEOUT};
use crate::core::ports::BoxFuture;
use crate::events::dedupe::{Dedupe, FastPathState};
use crate::events::relay::RelayHandle;
use crate::store::Store;

/// `SELECT 1` on the store's pool, within [`PROBE_TIMEOUT`] (waiting for a pooled connection included).
pub struct DatabaseProbe(pub Store);

impl Probe for DatabaseProbe {
    fn check(&self) -> BoxFuture<'_, Check> {
        Box::pin(async move {
            let asked = self.0.connection().execute_unprepared("SELECT 1");
            match tokio::time::timeout(PROBE_TIMEOUT, asked).await {
                Ok(Ok(_)) => Check::Ok,
                Ok(Err(error)) => {
                    tracing::debug!(%error, "database health probe failed");
                    Check::Down
                }
                Err(_) => Check::Down,
            }
        })
    }
}

/// Down when no broker answers a metadata request for `topic`; degraded when one answers but the relay's last
/// publishing attempts failed (the outbox keeps the events meanwhile).
pub struct BrokerProbe {
    pub relay: RelayHandle,
    pub topic: String,
}

impl Probe for BrokerProbe {
    fn check(&self) -> BoxFuture<'_, Check> {
        Box::pin(async move {
            if !self
                .relay
                .broker_reachable(&self.topic, PROBE_TIMEOUT)
                .await
            {
                Check::Down
            } else if self.relay.is_healthy() {
                Check::Ok
            } else {
                Check::Degraded
            }
        })
    }
}

/// The dedupe fast path's state after a `PING`.
pub struct RedisProbe(pub Dedupe);

impl Probe for RedisProbe {
    fn check(&self) -> BoxFuture<'_, Check> {
        Box::pin(async move {
            match self.0.probe().await {
                FastPathState::Active => Check::Ok,
                FastPathState::Bypassed => Check::Bypassed,
                FastPathState::Disabled => Check::Disabled,
            }
        })
    }
}
