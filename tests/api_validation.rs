//! Bad input is INVALID_ARGUMENT over gRPC and 400 over HTTP, naming every offending field, and stores nothing.

mod api_support;
mod support;

use api_support::{authed, ApiServer};
use bos::core::ids::UserId;
use bos::core::ports::BatchRepository;
use bos::proto::huleedu::bos::v1 as pb;
use bos::proto::huleedu::common::v1::{CourseCode, PhaseName};
use serde_json::{json, Value};
use tonic::Code;
use tonic_types::StatusExt;

fn fields(status: &tonic::Status) -> Vec<String> {
    let mut fields: Vec<String> = status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default();
    fields.sort();
    fields
}

fn json_fields(body: &Value) -> Vec<String> {
    let mut fields: Vec<String> = body["details"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["@type"] == "type.googleapis.com/google.rpc.BadRequest")
        .flat_map(|d| d["fieldViolations"].as_array().cloned().unwrap_or_default())
        .map(|v| v["field"].as_str().unwrap_or_default().to_owned())
        .collect();
    fields.sort();
    fields
}

async fn post(server: &ApiServer, path: &str, body: String) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(server.url(path))
        .header("authorization", ApiServer::bearer("carol"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_registrations_name_their_fields_and_store_nothing() {
    let server = ApiServer::start().await;
    let mut grpc = server.batches().await;

    let grpc_cases = [
        (
            pb::RegisterBatchRequest {
                expected_essay_count: 0,
                course_code: CourseCode::Eng5 as i32,
                ..Default::default()
            },
            vec!["expected_essay_count"],
        ),
        (
            pb::RegisterBatchRequest {
                expected_essay_count: -4,
                course_code: CourseCode::Eng5 as i32,
                ..Default::default()
            },
            vec!["expected_essay_count"],
        ),
        (
            pb::RegisterBatchRequest {
                expected_essay_count: 3,
                course_code: 99,
                ..Default::default()
            },
            vec!["course_code"],
        ),
        (
            pb::RegisterBatchRequest {
                expected_essay_count: 3,
                ..Default::default()
            },
            vec!["course_code"],
        ),
        (
            pb::RegisterBatchRequest {
                expected_essay_count: 0,
                course_code: CourseCode::Sv2 as i32,
                assignment_id: "a".repeat(101),
                cj_default_temperature: Some(7.5),
                ..Default::default()
            },
            vec![
                "assignment_id",
                "cj_default_temperature",
                "expected_essay_count",
            ],
        ),
    ];
    for (request, expected) in grpc_cases {
        let status = grpc
            .register_batch(authed("carol", request.clone()))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{request:?}");
        assert_eq!(fields(&status), expected, "{request:?}");
    }

    let http_cases = [
        (
            json!({"expectedEssayCount": 0, "courseCode": "COURSE_CODE_ENG5"}).to_string(),
            vec!["expected_essay_count"],
        ),
        (
            json!({"expectedEssayCount": -1, "courseCode": "COURSE_CODE_ENG5"}).to_string(),
            vec!["expected_essay_count"],
        ),
        (
            json!({"expectedEssayCount": 2, "courseCode": "FR1"}).to_string(),
            vec!["course_code"],
        ),
        (
            json!({"expectedEssayCount": "many", "courseCode": "COURSE_CODE_ENG5"}).to_string(),
            vec!["expected_essay_count"],
        ),
        (
            json!({"expectedEssayCount": 2, "courseCode": "COURSE_CODE_ENG5", "classId": 42})
                .to_string(),
            vec!["class_id"],
        ),
        (
            json!({"expectedEssayCount": 2.5, "courseCode": ["ENG5"]}).to_string(),
            vec!["course_code", "expected_essay_count"],
        ),
        (
            json!({"expectedEssayCount": 2, "courseCode": "COURSE_CODE_ENG5", "userId": "mallory"})
                .to_string(),
            vec!["userId"],
        ),
        ("[1, 2]".to_owned(), vec![""]),
        ("{\"expectedEssayCount\": ".to_owned(), vec![""]),
    ];
    for (body, expected) in http_cases {
        let (status, answer) = post(&server, "/v1/batches/register", body.clone()).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["code"], 3, "{body}");
        assert_eq!(json_fields(&answer), expected, "{body}: {answer}");
    }

    // Over 1 MiB: refused before it is parsed.
    let huge = json!({"expectedEssayCount": 1, "courseCode": "COURSE_CODE_ENG5", "studentPromptRef": "x".repeat(1_100_000)});
    let (status, answer) = post(&server, "/v1/batches/register", huge.to_string()).await;
    assert_eq!(status, 413);
    assert_eq!(answer["code"], 3);

    let store = server.store().await;
    let page = store
        .list_batches(&UserId::parse("u", "carol").unwrap(), 100, None)
        .await
        .unwrap();
    assert!(page.batches.is_empty(), "nothing stored: {page:?}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_ids_and_phases_are_invalid_arguments() {
    let server = ApiServer::start().await;
    let batch_id = server.ready_batch("carol", 1).await;
    let before = server.load(batch_id).await;
    let mut grpc = server.batches().await;
    let http = reqwest::Client::new();

    let status = grpc
        .get_batch_status(authed(
            "carol",
            pb::GetBatchStatusRequest {
                batch_id: "not-a-uuid".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), fields(&status)),
        (Code::InvalidArgument, vec!["batch_id".to_owned()])
    );
    let response = http
        .get(server.url("/v1/batches/not-a-uuid/status"))
        .header("authorization", ApiServer::bearer("carol"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    assert_eq!(json_fields(&response.json().await.unwrap()), ["batch_id"]);

    let status = grpc
        .request_pipeline(authed(
            "carol",
            pb::RequestPipelineRequest {
                batch_id: "1234".into(),
                requested_pipeline: 0,
                prompt_ref: String::new(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(
        fields(&status),
        ["batch_id", "requested_pipeline"],
        "every violation at once"
    );

    let status = grpc
        .request_pipeline(authed(
            "carol",
            pb::RequestPipelineRequest {
                batch_id: batch_id.to_string(),
                requested_pipeline: PhaseName::StudentMatching as i32,
                prompt_ref: String::new(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), fields(&status)),
        (Code::InvalidArgument, vec!["requested_pipeline".to_owned()])
    );

    // The prompt reference is used, so it is checked like the registration's.
    let status = grpc
        .request_pipeline(authed(
            "carol",
            pb::RequestPipelineRequest {
                batch_id: batch_id.to_string(),
                requested_pipeline: PhaseName::Spellcheck as i32,
                prompt_ref: "p".repeat(513),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), fields(&status)),
        (Code::InvalidArgument, vec!["prompt_ref".to_owned()])
    );

    let (code, answer) = post(
        &server,
        &format!("/v1/batches/{batch_id}/pipelines"),
        json!({"requestedPipeline": "PHASE_NAME_SPELLING"}).to_string(),
    )
    .await;
    assert_eq!(
        (code, json_fields(&answer)),
        (400, vec!["requested_pipeline".to_owned()])
    );
    let (code, answer) = post(
        &server,
        &format!("/v1/batches/{batch_id}/retry"),
        json!({"phase": true}).to_string(),
    )
    .await;
    assert_eq!(
        (code, json_fields(&answer)),
        (400, vec!["phase".to_owned()])
    );

    assert_eq!(server.load(batch_id).await, before, "nothing changed");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_paths_are_json_404s() {
    let server = ApiServer::start().await;
    let http = reqwest::Client::new();
    for (method, path) in [
        ("GET", "/v1/nothing/here"),
        ("DELETE", "/v1/batches/register"),
        ("GET", "/nope"),
    ] {
        let response = http
            .request(method.parse().unwrap(), server.url(path))
            .header("authorization", ApiServer::bearer("carol"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 404, "{method} {path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], 5);
    }
    server.shutdown().await;
}
