//! The authorisation matrix: missing, expired and forged tokens, another user's batch, and the internal API without
//! or with a wrong key. Each answers the right code over gRPC and HTTP, reveals nothing, and changes nothing.

mod api_support;
mod support;

use api_support::{authed, internal, ApiServer, INTERNAL_KEY, SECRET};
use bos::config::{JwtKey, Secret};
use bos::proto::huleedu::bos::v1 as pb;
use bos::proto::huleedu::common::v1::PhaseName;
use serde_json::{json, Value};
use tonic::Code;

fn with_header<T>(message: T, name: &'static str, value: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(name, value.parse().unwrap());
    request
}

fn expired_token() -> String {
    #[derive(serde::Serialize)]
    struct Claims<'a> {
        sub: &'a str,
        exp: u64,
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &Claims {
            sub: "alice",
            exp: now - 3600,
        },
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn forged_token() -> String {
    bos::api::auth::mint_token(
        &JwtKey::Secret(Secret::new("some-other-secret-entirely")),
        "alice",
        None,
        600,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_credentials_are_unauthenticated_on_both_transports() {
    let server = ApiServer::start().await;
    let batch_id = server.failed_batch("alice", 2).await;
    let before = server.load(batch_id).await;
    let id = batch_id.to_string();
    let http = reqwest::Client::new();
    let mut grpc = server.batches().await;

    let cases: Vec<(&str, Option<String>)> = vec![
        ("no token", None),
        ("expired token", Some(format!("Bearer {}", expired_token()))),
        ("bad signature", Some(format!("Bearer {}", forged_token()))),
        ("not a bearer", Some("Basic YWxpY2U6cHc=".to_owned())),
    ];
    for (case, header) in cases {
        let status_request = pb::GetBatchStatusRequest {
            batch_id: id.clone(),
        };
        let request = match &header {
            Some(h) => with_header(status_request, "authorization", h),
            None => tonic::Request::new(status_request),
        };
        let err = grpc.get_batch_status(request).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{case}: {err:?}");

        let retry = pb::RetryPhaseRequest {
            batch_id: id.clone(),
            phase: PhaseName::Spellcheck as i32,
            reason: String::new(),
        };
        let request = match &header {
            Some(h) => with_header(retry, "authorization", h),
            None => tonic::Request::new(retry),
        };
        assert_eq!(
            grpc.retry_phase(request).await.unwrap_err().code(),
            Code::Unauthenticated,
            "{case}"
        );

        let mut get = http.get(server.url(&format!("/v1/batches/{id}/status")));
        let mut post = http
            .post(server.url(&format!("/v1/batches/{id}/retry")))
            .json(&json!({"phase": "PHASE_NAME_SPELLCHECK"}));
        let mut register = http
            .post(server.url("/v1/batches/register"))
            .json(&json!({"expectedEssayCount": 1, "courseCode": "COURSE_CODE_ENG5"}));
        if let Some(h) = &header {
            get = get.header("authorization", h);
            post = post.header("authorization", h);
            register = register.header("authorization", h);
        }
        for request in [get, post, register] {
            let response = request.send().await.unwrap();
            assert_eq!(response.status().as_u16(), 401, "{case}");
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["code"], 16, "{case}: {body}");
            assert!(
                !body.to_string().contains(&id),
                "{case}: nothing about the batch leaks"
            );
        }
    }
    assert_eq!(server.load(batch_id).await, before, "nothing changed");
    let listed = server.store().await;
    let bob_batches = bos::core::ports::BatchRepository::list_batches(
        &listed,
        &bos::core::ids::UserId::parse("u", "alice").unwrap(),
        100,
        None,
    )
    .await
    .unwrap();
    assert_eq!(bob_batches.batches.len(), 1, "no registration got through");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_users_batch_is_not_found_and_untouched() {
    let server = ApiServer::start().await;
    let batch_id = server.failed_batch("alice", 2).await;
    let ready_id = server.ready_batch("alice", 2).await;
    let before = server.load(batch_id).await;
    let ready_before = server.load(ready_id).await;
    let id = batch_id.to_string();
    let missing = uuid::Uuid::now_v7().to_string();
    let mut grpc = server.batches().await;
    let http = reqwest::Client::new();

    // Bob's view of alice's batch must be indistinguishable from a batch that does not exist.
    for target in [id.clone(), missing.clone()] {
        let status = grpc
            .get_batch_status(authed(
                "bob",
                pb::GetBatchStatusRequest {
                    batch_id: target.clone(),
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(
            (status.code(), status.message()),
            (Code::NotFound, "batch not found")
        );
        let retry = grpc
            .retry_phase(authed(
                "bob",
                pb::RetryPhaseRequest {
                    batch_id: target.clone(),
                    phase: PhaseName::Spellcheck as i32,
                    reason: String::new(),
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(
            (retry.code(), retry.message()),
            (Code::NotFound, "batch not found")
        );
        let watch = grpc
            .watch_batch(authed(
                "bob",
                pb::WatchBatchRequest {
                    batch_id: target.clone(),
                },
            ))
            .await
            .map(|_| ())
            .unwrap_err();
        assert_eq!(
            (watch.code(), watch.message()),
            (Code::NotFound, "batch not found")
        );

        let response = http
            .get(server.url(&format!("/v1/batches/{target}/status")))
            .header("authorization", ApiServer::bearer("bob"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 404);
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            body,
            json!({"code": 5, "message": "batch not found", "details": []})
        );
    }
    let pipeline = grpc
        .request_pipeline(authed(
            "bob",
            pb::RequestPipelineRequest {
                batch_id: ready_id.to_string(),
                requested_pipeline: PhaseName::Spellcheck as i32,
                prompt_ref: String::new(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(pipeline.code(), Code::NotFound);
    let response = http
        .post(server.url(&format!("/v1/batches/{ready_id}/pipelines")))
        .header("authorization", ApiServer::bearer("bob"))
        .json(&json!({"requestedPipeline": "PHASE_NAME_SPELLCHECK"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 404);
    let response = http
        .post(server.url(&format!("/v1/batches/{id}/retry")))
        .header("authorization", ApiServer::bearer("bob"))
        .json(&json!({"phase": "PHASE_NAME_SPELLCHECK"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 404);

    assert_eq!(
        server.load(batch_id).await,
        before,
        "state and version unchanged"
    );
    assert_eq!(
        server.load(ready_id).await,
        ready_before,
        "state and version unchanged"
    );

    // The owner can do what bob could not.
    grpc.retry_phase(authed(
        "alice",
        pb::RetryPhaseRequest {
            batch_id: id.clone(),
            phase: PhaseName::Spellcheck as i32,
            reason: "flaky".into(),
        },
    ))
    .await
    .unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn internal_api_needs_the_right_key() {
    let server = ApiServer::start().await;
    let batch_id = server.ready_batch("alice", 1).await;
    let id = batch_id.to_string();
    let mut client = server.internal().await;
    let http = reqwest::Client::new();

    let none = client
        .get_pipeline_state(tonic::Request::new(pb::GetPipelineStateRequest {
            batch_id: id.clone(),
        }))
        .await
        .unwrap_err();
    assert_eq!(none.code(), Code::Unauthenticated);
    let wrong = client
        .get_pipeline_state(internal(
            "api-tests-internal-key-0123456780",
            pb::GetPipelineStateRequest {
                batch_id: id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    // A user token is no internal credential.
    let user = client
        .get_pipeline_state(authed(
            "alice",
            pb::GetPipelineStateRequest {
                batch_id: id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(user.code(), Code::Unauthenticated);

    let url = server.url(&format!("/internal/v1/batches/{id}/pipeline-state"));
    assert_eq!(http.get(&url).send().await.unwrap().status().as_u16(), 401);
    let response = http
        .get(&url)
        .header("x-internal-api-key", "wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], 16);
    assert!(!body.to_string().contains(&id));

    let ok = client
        .get_pipeline_state(internal(
            INTERNAL_KEY,
            pb::GetPipelineStateRequest {
                batch_id: id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.batch.unwrap().batch_id, id);
    assert_eq!(
        http.get(&url)
            .header("x-internal-api-key", INTERNAL_KEY)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );

    // Health, /healthz and /openapi.json stay open.
    assert_eq!(
        http.get(server.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    assert_eq!(
        http.get(server.url("/openapi.json"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    server.shutdown().await;
}
