//! The Batch Conductor Service client against a real local HTTP server that answers, fails and hangs.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use bos::clients::bcs::{BcsClient, BcsSettings, DEFINE_PATH};
use bos::core::graph::DependencyGraph;
use bos::core::ids::{BatchId, CorrelationId, PhaseName};
use bos::core::ports::{PipelineResolver, ResolveError, ResolveRequest};
use serde_json::{json, Value};
use uuid::Uuid;

/// What the fake service does with the next requests.
#[derive(Debug, Clone)]
enum Behaviour {
    Answer(Vec<&'static str>),
    /// Answers 503 this many times, then answers.
    FailThenAnswer(u32, Vec<&'static str>),
    AlwaysFail,
    Hang,
    BadRequest,
}

struct Fake {
    behaviour: Mutex<Behaviour>,
    calls: AtomicU32,
    last_body: Mutex<Option<Value>>,
}

async fn define(State(fake): State<Arc<Fake>>, Json(body): Json<Value>) -> Response {
    fake.calls.fetch_add(1, Ordering::SeqCst);
    *fake.last_body.lock().unwrap() = Some(body);
    let behaviour = fake.behaviour.lock().unwrap().clone();
    match behaviour {
        Behaviour::Answer(phases) => Json(json!({ "final_pipeline": phases })).into_response(),
        Behaviour::FailThenAnswer(0, phases) => {
            Json(json!({ "final_pipeline": phases })).into_response()
        }
        Behaviour::FailThenAnswer(n, phases) => {
            *fake.behaviour.lock().unwrap() = Behaviour::FailThenAnswer(n - 1, phases);
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
        Behaviour::AlwaysFail => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        Behaviour::Hang => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            StatusCode::OK.into_response()
        }
        Behaviour::BadRequest => StatusCode::BAD_REQUEST.into_response(),
    }
}

async fn start(behaviour: Behaviour) -> (String, Arc<Fake>) {
    let fake = Arc::new(Fake {
        behaviour: Mutex::new(behaviour),
        calls: AtomicU32::new(0),
        last_body: Mutex::new(None),
    });
    let app = Router::new()
        .route(DEFINE_PATH, post(define))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (format!("http://{addr}"), fake)
}

fn settings() -> BcsSettings {
    BcsSettings {
        timeout: Duration::from_millis(300),
        max_attempts: 3,
        backoff_base: Duration::from_millis(20),
        backoff_cap: Duration::from_millis(100),
        failure_threshold: 2,
        cool_down: Duration::from_millis(500),
    }
}

fn request(requested: PhaseName) -> ResolveRequest {
    ResolveRequest {
        batch_id: BatchId::from_uuid(Uuid::now_v7()),
        requested,
        correlation_id: CorrelationId::from_uuid(Uuid::now_v7()),
        done: vec![],
    }
}

fn names(pipeline: &bos::core::input::ResolvedPipeline) -> Vec<PhaseName> {
    pipeline.phases.iter().map(|p| p.phase).collect()
}

#[tokio::test]
async fn good_answer_becomes_a_pipeline_with_graph_dependencies() {
    let (url, fake) = start(Behaviour::Answer(vec!["spellcheck", "nlp", "ai_feedback"])).await;
    let client = BcsClient::new(&url, settings(), DependencyGraph::builtin()).unwrap();
    let req = request(PhaseName::AiFeedback);
    let pipeline = client.resolve(&req).await.unwrap();
    assert_eq!(
        names(&pipeline),
        vec![PhaseName::Spellcheck, PhaseName::Nlp, PhaseName::AiFeedback]
    );
    assert_eq!(
        pipeline.phases[2].depends_on,
        vec![PhaseName::Spellcheck, PhaseName::Nlp]
    );
    let body = fake.last_body.lock().unwrap().clone().unwrap();
    assert_eq!(body["batch_id"], json!(req.batch_id.to_string()));
    assert_eq!(body["requested_pipeline"], json!("ai_feedback"));
    assert_eq!(
        body["correlation_id"],
        json!(req.correlation_id.to_string())
    );
    assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn unknown_phase_in_the_answer_is_invalid() {
    let (url, _fake) = start(Behaviour::Answer(vec!["spellcheck", "grammar_check"])).await;
    let client = BcsClient::new(&url, settings(), DependencyGraph::builtin()).unwrap();
    let err = client
        .resolve(&request(PhaseName::Spellcheck))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ResolveError::InvalidAnswer(ref m) if m.contains("grammar_check")),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_client_error_is_invalid_and_not_retried() {
    let (url, fake) = start(Behaviour::BadRequest).await;
    let client = BcsClient::new(&url, settings(), DependencyGraph::builtin()).unwrap();
    let err = client.resolve(&request(PhaseName::Nlp)).await.unwrap_err();
    assert!(matches!(err, ResolveError::InvalidAnswer(_)), "{err:?}");
    assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn server_errors_are_retried_until_success() {
    let (url, fake) = start(Behaviour::FailThenAnswer(2, vec!["spellcheck"])).await;
    let client = BcsClient::new(&url, settings(), DependencyGraph::builtin()).unwrap();
    let pipeline = client
        .resolve(&request(PhaseName::Spellcheck))
        .await
        .unwrap();
    assert_eq!(names(&pipeline), vec![PhaseName::Spellcheck]);
    assert_eq!(
        fake.calls.load(Ordering::SeqCst),
        3,
        "two 503s then the answer"
    );
    assert!(!client.breaker_open());
}

#[tokio::test]
async fn a_hanging_service_times_out_as_unavailable() {
    let (url, fake) = start(Behaviour::Hang).await;
    let client = BcsClient::new(&url, settings(), DependencyGraph::builtin()).unwrap();
    let started = Instant::now();
    let err = client
        .resolve(&request(PhaseName::Spellcheck))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, ResolveError::Unavailable(_)), "{err:?}");
    assert_eq!(
        fake.calls.load(Ordering::SeqCst),
        3,
        "each attempt timed out"
    );
    // 3 × 300 ms timeouts + 20 + 40 ms backoff, far below the 30 s the server would hang.
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[tokio::test]
async fn an_unreachable_service_is_unavailable() {
    // A port nobody listens on: bind, read the port, drop the listener.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = BcsClient::new(
        &format!("http://127.0.0.1:{port}"),
        settings(),
        DependencyGraph::builtin(),
    )
    .unwrap();
    let err = client
        .resolve(&request(PhaseName::Spellcheck))
        .await
        .unwrap_err();
    assert!(matches!(err, ResolveError::Unavailable(_)), "{err:?}");
}

#[tokio::test]
async fn breaker_opens_fails_fast_and_recovers_after_the_cool_down() {
    let (url, fake) = start(Behaviour::AlwaysFail).await;
    let client = BcsClient::new(&url, settings(), DependencyGraph::builtin()).unwrap();
    let req = request(PhaseName::Spellcheck);
    for _ in 0..2 {
        assert!(matches!(
            client.resolve(&req).await,
            Err(ResolveError::Unavailable(_))
        ));
    }
    assert_eq!(
        fake.calls.load(Ordering::SeqCst),
        6,
        "two calls of three attempts each"
    );
    assert!(client.breaker_open());

    // Open: refused without calling the service.
    let err = client.resolve(&req).await.unwrap_err();
    assert!(
        matches!(err, ResolveError::Unavailable(ref m) if m.contains("circuit")),
        "{err:?}"
    );
    assert_eq!(fake.calls.load(Ordering::SeqCst), 6);

    // The service recovers; after the cool-down one probe goes through and closes the breaker.
    *fake.behaviour.lock().unwrap() = Behaviour::Answer(vec!["spellcheck"]);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let pipeline = client.resolve(&req).await.unwrap();
    assert_eq!(names(&pipeline), vec![PhaseName::Spellcheck]);
    assert!(!client.breaker_open());
    assert_eq!(fake.calls.load(Ordering::SeqCst), 7);
}

#[tokio::test]
async fn a_failed_probe_opens_the_breaker_again() {
    let (url, fake) = start(Behaviour::AlwaysFail).await;
    let mut s = settings();
    s.max_attempts = 1;
    let client = BcsClient::new(&url, s, DependencyGraph::builtin()).unwrap();
    let req = request(PhaseName::Spellcheck);
    for _ in 0..2 {
        assert!(client.resolve(&req).await.is_err());
    }
    assert!(client.breaker_open());
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(matches!(
        client.resolve(&req).await,
        Err(ResolveError::Unavailable(_))
    ));
    assert_eq!(fake.calls.load(Ordering::SeqCst), 3, "one probe");
    let err = client.resolve(&req).await.unwrap_err();
    assert!(
        matches!(err, ResolveError::Unavailable(ref m) if m.contains("circuit")),
        "{err:?}"
    );
    assert_eq!(fake.calls.load(Ordering::SeqCst), 3);
}

#[test]
fn invalid_base_urls_are_refused() {
    assert!(BcsClient::new(
        "not a url",
        BcsSettings::default(),
        DependencyGraph::builtin()
    )
    .is_err());
    assert!(BcsClient::new(
        "ftp://x",
        BcsSettings::default(),
        DependencyGraph::builtin()
    )
    .is_err());
}
