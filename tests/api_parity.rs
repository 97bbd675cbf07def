//! Every RPC over gRPC and over HTTP/JSON gives the same answer for the same request.

mod api_support;
mod support;

use api_support::{authed, internal, to_json, ApiServer, INTERNAL_KEY};
use bos::proto::huleedu::bos::v1 as pb;
use bos::proto::huleedu::common::v1::{CourseCode, PhaseName};
use serde_json::{json, Value};

async fn http_json(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let body = response.json::<Value>().await.unwrap();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_rpc_answers_the_same_over_grpc_and_http() {
    let server = ApiServer::start().await;
    let http = reqwest::Client::new();
    let mut grpc = server.batches().await;

    // RegisterBatch: ids differ per call, the shape and everything else does not.
    let over_grpc = grpc
        .register_batch(authed(
            "alice",
            pb::RegisterBatchRequest {
                expected_essay_count: 2,
                course_code: CourseCode::Sv1 as i32,
                class_id: Some("class-1".into()),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(over_grpc.essay_ids.len(), 2);
    let (status, over_http) = http_json(
        http.post(server.url("/v1/batches/register"))
            .header("authorization", ApiServer::bearer("alice"))
            .json(&json!({"expectedEssayCount": 2, "course_code": "COURSE_CODE_SV1", "classId": "class-1"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{over_http}");
    assert_eq!(over_http["essayIds"].as_array().map(Vec::len), Some(2));
    assert!(over_http["batchId"].is_string() && over_http["correlationId"].is_string());
    let grpc_view = server
        .load(bos::core::ids::BatchId::parse("b", &over_grpc.batch_id).unwrap())
        .await;
    let http_view = server
        .load(bos::core::ids::BatchId::parse("b", over_http["batchId"].as_str().unwrap()).unwrap())
        .await;
    assert_eq!(grpc_view.batch.status, http_view.batch.status);
    assert_eq!(grpc_view.batch.class_id, http_view.batch.class_id);
    assert_eq!(
        http_view.batch.owner.as_str(),
        "alice",
        "the owner comes from the token"
    );

    // GetBatchStatus of a registered batch.
    let batch_id = server.ready_batch("alice", 3).await;
    let id = batch_id.to_string();
    let status_grpc = grpc
        .get_batch_status(authed(
            "alice",
            pb::GetBatchStatusRequest {
                batch_id: id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let (code, status_http) = http_json(
        http.get(server.url(&format!("/v1/batches/{id}/status")))
            .header("authorization", ApiServer::bearer("alice"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(
        to_json("huleedu.bos.v1.GetBatchStatusResponse", &status_grpc),
        status_http
    );
    assert_eq!(
        status_http["batch"]["status"],
        "BATCH_STATUS_READY_FOR_PIPELINE_EXECUTION"
    );
    assert!(
        status_http["batch"]["version"].is_string(),
        "int64 is a string in JSON"
    );
    assert!(status_http["batch"]["createdAt"]
        .as_str()
        .unwrap()
        .ends_with('Z'));

    // RetryPhase rejection: nothing failed, so nothing can be retried — same code and details on both sides.
    let retry_grpc = grpc
        .retry_phase(authed(
            "alice",
            pb::RetryPhaseRequest {
                batch_id: id.clone(),
                phase: PhaseName::Spellcheck as i32,
                reason: "again".into(),
            },
        ))
        .await
        .unwrap_err();
    let (code, retry_http) = http_json(
        http.post(server.url(&format!("/v1/batches/{id}/retry")))
            .header("authorization", ApiServer::bearer("alice"))
            .json(&json!({"phase": "PHASE_NAME_SPELLCHECK", "reason": "again"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(retry_grpc.code(), tonic::Code::FailedPrecondition);
    assert_eq!(code, 400);
    assert_eq!(retry_http["code"], retry_grpc.code() as i32);
    assert_eq!(retry_http["message"], retry_grpc.message());
    assert_eq!(
        retry_http["details"][0]["@type"],
        "type.googleapis.com/google.rpc.ErrorInfo"
    );
    assert_eq!(retry_http["details"][0]["reason"], "NOT_RETRYABLE");

    // RequestPipeline: two equal batches, one asked over each transport.
    let other = server.ready_batch("alice", 3).await.to_string();
    let pipeline_grpc = grpc
        .request_pipeline(authed(
            "alice",
            pb::RequestPipelineRequest {
                batch_id: id.clone(),
                requested_pipeline: PhaseName::Nlp as i32,
                prompt_ref: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let (code, pipeline_http) = http_json(
        http.post(server.url(&format!("/v1/batches/{other}/pipelines")))
            .header("authorization", ApiServer::bearer("alice"))
            .json(&json!({"requestedPipeline": "PHASE_NAME_NLP"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, 200, "{pipeline_http}");
    let mut expected = to_json("huleedu.bos.v1.RequestPipelineResponse", &pipeline_grpc);
    expected["runId"] = pipeline_http["runId"].clone();
    expected["correlationId"] = pipeline_http["correlationId"].clone();
    assert_eq!(expected, pipeline_http);
    assert_eq!(
        pipeline_http["phases"],
        json!(["PHASE_NAME_SPELLCHECK", "PHASE_NAME_NLP"])
    );
    assert_eq!(pipeline_http["status"], "PIPELINE_RUN_STATUS_RUNNING");

    // A second request while the run is active is refused alike.
    let again_grpc = grpc
        .request_pipeline(authed(
            "alice",
            pb::RequestPipelineRequest {
                batch_id: id.clone(),
                requested_pipeline: PhaseName::Nlp as i32,
                prompt_ref: String::new(),
            },
        ))
        .await
        .unwrap_err();
    let (code, again_http) = http_json(
        http.post(server.url(&format!("/v1/batches/{id}/pipelines")))
            .header("authorization", ApiServer::bearer("alice"))
            .json(&json!({"requested_pipeline": "PHASE_NAME_NLP"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, 400);
    assert_eq!(again_http["message"], again_grpc.message());
    assert_eq!(again_http["details"][0]["reason"], "RUN_ACTIVE");

    // Internal GetPipelineState, once the relay's delivery report has landed (it would change the view between the
    // two calls otherwise).
    server.settle(batch_id).await;
    let state_grpc = server
        .internal()
        .await
        .get_pipeline_state(internal(
            INTERNAL_KEY,
            pb::GetPipelineStateRequest {
                batch_id: id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let (code, state_http) = http_json(
        http.get(server.url(&format!("/internal/v1/batches/{id}/pipeline-state")))
            .header("x-internal-api-key", INTERNAL_KEY)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(
        to_json("huleedu.bos.v1.GetPipelineStateResponse", &state_grpc),
        state_http
    );
    assert_eq!(
        state_http["batch"]["status"],
        "BATCH_STATUS_PROCESSING_PIPELINES"
    );
    let first_phase = state_http["batch"]["currentRun"]["phases"][0]["status"]
        .as_str()
        .unwrap();
    assert!(
        [
            "PIPELINE_EXECUTION_STATUS_DISPATCH_INITIATED",
            "PIPELINE_EXECUTION_STATUS_IN_PROGRESS"
        ]
        .contains(&first_phase),
        "{first_phase}"
    );

    server.shutdown().await;
}
