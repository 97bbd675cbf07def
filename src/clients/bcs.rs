//! Batch Conductor Service client: resolves a requested pipeline over HTTP JSON
//! (`POST {base}/internal/v1/pipelines/define`), behind the core's `PipelineResolver` port.
//!
//! Every call has a timeout; 5xx answers, timeouts and connection errors are retried a bounded
//! number of times with exponential backoff; a circuit breaker stops calling a service that keeps
//! failing, so pipeline requests fail fast with `Unavailable` instead of piling up behind timeouts.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::core::graph::DependencyGraph;
use crate::core::ids::PhaseName;
use crate::core::input::{ResolvedPhase, ResolvedPipeline};
use crate::core::ports::{BoxFuture, PipelineResolver, ResolveError, ResolveRequest};

/// The path of the define endpoint, relative to the configured base URL.
pub const DEFINE_PATH: &str = "/internal/v1/pipelines/define";

#[derive(Debug, thiserror::Error)]
pub enum BcsError {
    #[error("BOS_BCS_URL: invalid URL '{url}': {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("could not build the HTTP client: {0}")]
    Client(String),
}

/// Timeouts, retry and breaker settings.
#[derive(Debug, Clone)]
pub struct BcsSettings {
    /// Per attempt.
    pub timeout: Duration,
    /// Attempts per call, the first included.
    pub max_attempts: u32,
    /// Delay before the second attempt; doubles each time.
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// Consecutive failed calls that open the breaker.
    pub failure_threshold: u32,
    /// How long the breaker stays open before one probe call is let through.
    pub cool_down: Duration,
}

impl Default for BcsSettings {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(2),
            max_attempts: 3,
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(2),
            failure_threshold: 5,
            cool_down: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Serialize)]
struct DefineRequest<'a> {
    batch_id: String,
    requested_pipeline: &'a str,
    correlation_id: String,
}

#[derive(Debug, Deserialize)]
struct DefineResponse {
    final_pipeline: Vec<String>,
}

/// Why one attempt failed: transient failures are retried and count against the breaker.
enum AttemptError {
    Transient(String),
    Invalid(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BreakerState {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is in flight; everyone else is refused until it answers.
    HalfOpen,
}

/// Consecutive-failure circuit breaker with a single half-open probe.
#[derive(Debug)]
struct Breaker {
    state: Mutex<BreakerState>,
    threshold: u32,
    cool_down: Duration,
}

impl Breaker {
    fn new(threshold: u32, cool_down: Duration) -> Self {
        Self {
            state: Mutex::new(BreakerState::Closed { failures: 0 }),
            threshold: threshold.max(1),
            cool_down,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        // The state is a plain value, always consistent; a poisoned lock still holds a valid one.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// May a call go out now?
    fn admit(&self, now: Instant) -> bool {
        let mut state = self.lock();
        match *state {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { until } if now >= until => {
                *state = BreakerState::HalfOpen;
                true
            }
            BreakerState::Open { .. } | BreakerState::HalfOpen => false,
        }
    }

    fn success(&self) {
        *self.lock() = BreakerState::Closed { failures: 0 };
    }

    fn failure(&self, now: Instant) {
        let mut state = self.lock();
        let failures = match *state {
            BreakerState::Closed { failures } => failures + 1,
            BreakerState::HalfOpen | BreakerState::Open { .. } => self.threshold,
        };
        *state = if failures >= self.threshold {
            metrics::counter!("bcs_breaker_opened_total").increment(1);
            BreakerState::Open {
                until: now + self.cool_down,
            }
        } else {
            BreakerState::Closed { failures }
        };
    }

    fn is_open(&self) -> bool {
        !matches!(*self.lock(), BreakerState::Closed { .. })
    }
}

/// Client of the Batch Conductor Service.
#[derive(Debug)]
pub struct BcsClient {
    http: reqwest::Client,
    define_url: reqwest::Url,
    settings: BcsSettings,
    breaker: Breaker,
    graph: DependencyGraph,
}

impl BcsClient {
    /// `graph` supplies each answered phase's dependencies (the service answers names only).
    pub fn new(
        base_url: &str,
        settings: BcsSettings,
        graph: DependencyGraph,
    ) -> Result<Self, BcsError> {
        let invalid = |reason: String| BcsError::InvalidUrl {
            url: base_url.to_owned(),
            reason,
        };
        let base = reqwest::Url::parse(base_url).map_err(|e| invalid(e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(invalid("scheme must be http or https".into()));
        }
        let define_url = reqwest::Url::parse(&format!(
            "{}{DEFINE_PATH}",
            base.as_str().trim_end_matches('/')
        ))
        .map_err(|e| invalid(e.to_string()))?;
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .build()
            .map_err(|e| BcsError::Client(e.to_string()))?;
        Ok(Self {
            http,
            define_url,
            breaker: Breaker::new(settings.failure_threshold, settings.cool_down),
            settings,
            graph,
        })
    }

    /// True while the breaker refuses calls (open or probing); for health reporting.
    pub fn breaker_open(&self) -> bool {
        self.breaker.is_open()
    }

    async fn define(&self, request: &ResolveRequest) -> Result<ResolvedPipeline, ResolveError> {
        if !request.requested.is_pipeline_phase() {
            return Err(ResolveError::NotAPipelinePhase(request.requested));
        }
        if !self.breaker.admit(Instant::now()) {
            metrics::counter!("bcs_calls_total", "result" => "breaker_open").increment(1);
            return Err(ResolveError::Unavailable(
                "Batch Conductor Service circuit is open".into(),
            ));
        }
        let body = DefineRequest {
            batch_id: request.batch_id.to_string(),
            requested_pipeline: request.requested.as_str(),
            correlation_id: request.correlation_id.to_string(),
        };
        let mut delay = self.settings.backoff_base;
        let mut attempt = 1;
        loop {
            match self.attempt(&body).await {
                Ok(names) => {
                    self.breaker.success();
                    return match pipeline_from_names(&self.graph, &names) {
                        Ok(pipeline) => {
                            metrics::counter!("bcs_calls_total", "result" => "ok").increment(1);
                            Ok(pipeline)
                        }
                        Err(e) => {
                            metrics::counter!("bcs_calls_total", "result" => "invalid")
                                .increment(1);
                            Err(e)
                        }
                    };
                }
                Err(AttemptError::Invalid(reason)) => {
                    // The service answered, so it is up: not a breaker failure.
                    self.breaker.success();
                    metrics::counter!("bcs_calls_total", "result" => "invalid").increment(1);
                    return Err(ResolveError::InvalidAnswer(reason));
                }
                Err(AttemptError::Transient(reason)) if attempt >= self.settings.max_attempts => {
                    self.breaker.failure(Instant::now());
                    metrics::counter!("bcs_calls_total", "result" => "unavailable").increment(1);
                    return Err(ResolveError::Unavailable(format!(
                        "Batch Conductor Service failed {attempt} times, last: {reason}"
                    )));
                }
                Err(AttemptError::Transient(reason)) => {
                    tracing::warn!(attempt, %reason, "Batch Conductor Service call failed, retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.settings.backoff_cap);
                    attempt += 1;
                }
            }
        }
    }

    async fn attempt(&self, body: &DefineRequest<'_>) -> Result<Vec<String>, AttemptError> {
        let response = self
            .http
            .post(self.define_url.clone())
            .json(body)
            .send()
            .await
            .map_err(|e| AttemptError::Transient(describe(&e)))?;
        let status = response.status();
        if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            return Err(AttemptError::Transient(format!("HTTP {status}")));
        }
        if !status.is_success() {
            return Err(AttemptError::Invalid(format!("HTTP {status}")));
        }
        let answer: DefineResponse = response.json().await.map_err(|e| {
            if e.is_timeout() {
                AttemptError::Transient(describe(&e))
            } else {
                AttemptError::Invalid(format!("undecodable answer: {e}"))
            }
        })?;
        Ok(answer.final_pipeline)
    }
}

fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "connection failed".into()
    } else {
        e.to_string()
    }
}

/// Turns the service's phase names into a pipeline: each phase depends on all its direct
/// dependencies in the graph, as the core expects. An empty list means everything is done already.
fn pipeline_from_names(
    graph: &DependencyGraph,
    names: &[String],
) -> Result<ResolvedPipeline, ResolveError> {
    let mut phases: Vec<ResolvedPhase> = Vec::with_capacity(names.len());
    for name in names {
        let unknown = || ResolveError::InvalidAnswer(format!("unknown pipeline phase '{name}'"));
        let phase = PhaseName::parse("final_pipeline", name)
            .ok()
            .filter(|p| p.is_pipeline_phase())
            .ok_or_else(unknown)?;
        let depends_on = graph.direct_deps(phase).ok_or_else(unknown)?.to_vec();
        if phases.iter().any(|p| p.phase == phase) {
            return Err(ResolveError::InvalidAnswer(format!(
                "phase '{name}' listed twice"
            )));
        }
        phases.push(ResolvedPhase { phase, depends_on });
    }
    // A dependency listed after its dependant would be dispatched too late.
    for (i, p) in phases.iter().enumerate() {
        if let Some(late) = p
            .depends_on
            .iter()
            .find(|d| phases[i..].iter().any(|q| q.phase == **d))
        {
            return Err(ResolveError::InvalidAnswer(format!(
                "phase '{}' is listed before its dependency '{late}'",
                p.phase
            )));
        }
    }
    Ok(ResolvedPipeline { phases })
}

impl PipelineResolver for BcsClient {
    fn resolve<'a>(
        &'a self,
        request: &'a ResolveRequest,
    ) -> BoxFuture<'a, Result<ResolvedPipeline, ResolveError>> {
        Box::pin(self.define(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_after_threshold_and_probes_once() {
        let breaker = Breaker::new(2, Duration::from_millis(50));
        let t0 = Instant::now();
        assert!(breaker.admit(t0));
        breaker.failure(t0);
        assert!(breaker.admit(t0));
        breaker.failure(t0);
        assert!(!breaker.admit(t0), "open after two failures");
        let later = t0 + Duration::from_millis(60);
        assert!(breaker.admit(later), "one probe after the cool-down");
        assert!(!breaker.admit(later), "only one probe at a time");
        breaker.failure(later);
        assert!(
            !breaker.admit(later + Duration::from_millis(10)),
            "a failed probe reopens"
        );
        let much_later = later + Duration::from_millis(120);
        assert!(breaker.admit(much_later));
        breaker.success();
        assert!(breaker.admit(much_later) && breaker.admit(much_later));
    }

    #[test]
    fn names_become_phases_with_graph_dependencies() {
        let graph = DependencyGraph::builtin();
        let pipeline = pipeline_from_names(
            &graph,
            &["spellcheck".into(), "nlp".into(), "ai_feedback".into()],
        )
        .unwrap();
        let phases: Vec<_> = pipeline.phases.iter().map(|p| p.phase).collect();
        assert_eq!(
            phases,
            vec![PhaseName::Spellcheck, PhaseName::Nlp, PhaseName::AiFeedback]
        );
        assert!(pipeline.phases[0].depends_on.is_empty());
        assert_eq!(pipeline.phases[1].depends_on, vec![PhaseName::Spellcheck]);
        assert!(matches!(
            pipeline_from_names(&graph, &["grammar".into()]),
            Err(ResolveError::InvalidAnswer(_))
        ));
        assert!(matches!(
            pipeline_from_names(&graph, &["student_matching".into()]),
            Err(ResolveError::InvalidAnswer(_))
        ));
        assert!(matches!(
            pipeline_from_names(&graph, &["nlp".into(), "spellcheck".into()]),
            Err(ResolveError::InvalidAnswer(_))
        ));
        assert!(pipeline_from_names(&graph, &[]).unwrap().phases.is_empty());
    }
}
