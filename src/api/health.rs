//! Process health, reported both by the gRPC `grpc.health.v1.Health` service and by `GET /healthz` (defect 20: the
//! original's health ignored Kafka and Redis).
//!
//! The service is SERVING when it accepts work (started, not draining) and its database and broker answer. Redis is
//! a fast path in front of the database inbox and a notification channel: when it is gone it is reported as
//! `bypassed`, and the service keeps serving. A background task re-runs the probes every couple of seconds; both
//! transports read the last result, so a health poller never causes a database or broker round trip itself.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::core::ports::BoxFuture;

/// How often the background task re-runs the probes.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(2);
/// How long one probe may take before its dependency counts as down.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The state of one dependency, as `/healthz` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Check {
    /// Not probed yet.
    Unknown,
    Ok,
    /// Reachable, but the work that uses it is failing (the outbox relay cannot publish); still serving.
    Degraded,
    Down,
    /// Redis unreachable: the fast path is skipped, correctness does not change.
    Bypassed,
    /// Not configured.
    Disabled,
}

/// The last probe results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Checks {
    pub database: Check,
    pub broker: Check,
    pub redis: Check,
}

impl Checks {
    const UNKNOWN: Checks = Checks {
        database: Check::Unknown,
        broker: Check::Unknown,
        redis: Check::Unknown,
    };

    /// Whether the dependencies the service cannot work without answer.
    pub fn essentials_up(&self) -> bool {
        self.database == Check::Ok && matches!(self.broker, Check::Ok | Check::Degraded)
    }
}

/// What `/healthz` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Report {
    /// `SERVING` or `NOT_SERVING`.
    pub status: &'static str,
    pub checks: Checks,
}

/// Asks one dependency whether it is there.
pub trait Probe: Send + Sync {
    fn check(&self) -> BoxFuture<'_, Check>;
}

/// The dependencies to probe.
#[derive(Clone)]
pub struct Probes {
    pub database: Arc<dyn Probe>,
    pub broker: Arc<dyn Probe>,
    pub redis: Arc<dyn Probe>,
}

#[derive(Debug)]
struct State {
    /// Started and not draining.
    accepting: bool,
    checks: Checks,
}

impl State {
    fn serving(&self) -> bool {
        self.accepting && self.checks.essentials_up()
    }
}

/// Shared health state; clones observe and change the same status.
#[derive(Clone, Debug)]
pub struct Health {
    reporter: HealthReporter,
    state: Arc<Mutex<State>>,
}

impl Health {
    /// Creates the state (NOT_SERVING until [`Health::set_serving`] and a successful [`Health::refresh`]) and the
    /// gRPC health service.
    pub async fn new() -> (
        Self,
        HealthServer<impl tonic_health::pb::health_server::Health>,
    ) {
        let (reporter, service) = tonic_health::server::health_reporter();
        let health = Self {
            reporter,
            state: Arc::new(Mutex::new(State {
                accepting: false,
                checks: Checks::UNKNOWN,
            })),
        };
        health.publish().await;
        (health, service)
    }

    /// Marks the server as accepting work (after start-up) or not (draining). It reports SERVING only while it
    /// accepts work and its database and broker answer.
    pub async fn set_serving(&self, accepting: bool) {
        self.with_state(|s| s.accepting = accepting);
        self.publish().await;
    }

    /// Runs every probe once (concurrently) and publishes the result.
    pub async fn refresh(&self, probes: &Probes) -> Checks {
        let (database, broker, redis) = tokio::join!(
            probes.database.check(),
            probes.broker.check(),
            probes.redis.check()
        );
        let checks = Checks {
            database,
            broker,
            redis,
        };
        let changed = self.with_state(|s| std::mem::replace(&mut s.checks, checks) != checks);
        if changed {
            tracing::info!(?checks, "dependency health changed");
        }
        self.publish().await;
        checks
    }

    /// Refreshes every `interval` until `shutdown` resolves.
    pub async fn refresh_until(
        self,
        probes: Probes,
        interval: Duration,
        shutdown: impl Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(interval) => {}
            }
            tokio::select! {
                () = &mut shutdown => return,
                _ = self.refresh(&probes) => {}
            }
        }
    }

    /// Whether the server is currently serving.
    pub fn is_serving(&self) -> bool {
        self.with_state(|s| s.serving())
    }

    /// The status and the last probe results.
    pub fn report(&self) -> Report {
        let (serving, checks) = self.with_state(|s| (s.serving(), s.checks));
        Report {
            status: if serving { "SERVING" } else { "NOT_SERVING" },
            checks,
        }
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        // The state is two plain values; a panic while holding the lock cannot leave it half-written.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut state)
    }

    /// Pushes the current status to the gRPC health service (service name "", the whole server).
    async fn publish(&self) {
        let status = if self.is_serving() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status("", status).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Mutex<Check>);

    impl Probe for Fixed {
        fn check(&self) -> BoxFuture<'_, Check> {
            let check = *self.0.lock().unwrap();
            Box::pin(std::future::ready(check))
        }
    }

    fn fixed(check: Check) -> Arc<Fixed> {
        Arc::new(Fixed(Mutex::new(check)))
    }

    #[tokio::test]
    async fn serving_needs_the_database_and_the_broker_but_not_redis() {
        let (health, _service) = Health::new().await;
        let (database, broker, redis) = (fixed(Check::Ok), fixed(Check::Ok), fixed(Check::Ok));
        let probes = Probes {
            database: database.clone(),
            broker: broker.clone(),
            redis: redis.clone(),
        };
        assert_eq!(health.report().status, "NOT_SERVING");
        health.refresh(&probes).await;
        assert!(!health.is_serving(), "not before start-up ends");
        health.set_serving(true).await;
        assert_eq!(health.report().status, "SERVING");

        let cases = [
            ((Check::Ok, Check::Ok, Check::Bypassed), true),
            ((Check::Ok, Check::Degraded, Check::Disabled), true),
            ((Check::Down, Check::Ok, Check::Ok), false),
            ((Check::Ok, Check::Down, Check::Ok), false),
        ];
        for ((d, b, r), serving) in cases {
            *database.0.lock().unwrap() = d;
            *broker.0.lock().unwrap() = b;
            *redis.0.lock().unwrap() = r;
            let checks = health.refresh(&probes).await;
            assert_eq!(health.is_serving(), serving, "{checks:?}");
            assert_eq!(health.report().checks, checks);
        }
        health.set_serving(false).await;
        *broker.0.lock().unwrap() = Check::Ok;
        health.refresh(&probes).await;
        assert!(
            !health.is_serving(),
            "draining wins over healthy dependencies"
        );
    }

    #[test]
    fn the_report_spells_checks_in_lowercase() {
        let report = Report {
            status: "SERVING",
            checks: Checks {
                database: Check::Ok,
                broker: Check::Degraded,
                redis: Check::Bypassed,
            },
        };
        assert_eq!(
            serde_json::to_value(report).unwrap(),
            serde_json::json!({
                "status": "SERVING",
                "checks": {"database": "ok", "broker": "degraded", "redis": "bypassed"}
            })
        );
    }
}
