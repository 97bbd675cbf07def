//! The one mapping from core failures to `tonic::Status` (with `google.rpc` rich details), and from a `Status` to
//! the HTTP/JSON answer (HTTP status + JSON `google.rpc.Status`). Both transports go through here.

use std::collections::HashMap;
use std::sync::LazyLock;

use axum::http::StatusCode;
use bytes::Bytes;
use prost_reflect::{DescriptorPool, DynamicMessage};
use tonic::Code;
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::core::ids::InvalidValue;
use crate::core::orchestrator::OrchestratorError;
use crate::core::ports::{RepositoryError, ResolveError};
use crate::core::rejection::Rejection;

/// `ErrorInfo.domain` of every error BOS raises.
pub const ERROR_DOMAIN: &str = "bos.huleedu";

/// Why an API call failed, before it becomes a `Status`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid request")]
    Invalid(Vec<InvalidValue>),
    #[error(transparent)]
    Rejected(Rejection),
    #[error(transparent)]
    Repository(RepositoryError),
    #[error(transparent)]
    Resolve(ResolveError),
    #[error("{0}")]
    Unauthenticated(String),
    /// The same request was processed before.
    #[error("already processed")]
    Duplicate,
}

impl From<InvalidValue> for ApiError {
    fn from(value: InvalidValue) -> Self {
        ApiError::Invalid(vec![value])
    }
}

impl From<Vec<InvalidValue>> for ApiError {
    fn from(values: Vec<InvalidValue>) -> Self {
        ApiError::Invalid(values)
    }
}

impl From<Rejection> for ApiError {
    fn from(rejection: Rejection) -> Self {
        ApiError::Rejected(rejection)
    }
}

impl From<OrchestratorError> for ApiError {
    fn from(error: OrchestratorError) -> Self {
        match error {
            OrchestratorError::Rejected(r) => ApiError::Rejected(r),
            OrchestratorError::Resolve(r) => ApiError::Resolve(r),
            OrchestratorError::Repository(r) => ApiError::Repository(r),
            OrchestratorError::Invalid(v) => ApiError::Invalid(v),
            OrchestratorError::Duplicate => ApiError::Duplicate,
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(error: ApiError) -> Self {
        status_of(error)
    }
}

/// Shorthand for the services: a core failure straight to a `Status`.
pub fn to_status(error: impl Into<ApiError>) -> tonic::Status {
    status_of(error.into())
}

fn status_of(error: ApiError) -> tonic::Status {
    match error {
        ApiError::Invalid(values) => invalid_argument(&values),
        ApiError::Rejected(rejection) => rejection_status(&rejection),
        ApiError::Repository(RepositoryError::Rejected(rejection)) => rejection_status(&rejection),
        ApiError::Repository(RepositoryError::Conflict { attempts }) => {
            tonic::Status::with_error_details(
                Code::Aborted,
                format!("the batch changed concurrently {attempts} times; retry the request"),
                error_info("CONCURRENT_UPDATE", &[]),
            )
        }
        ApiError::Repository(RepositoryError::Unavailable(reason)) => {
            tracing::warn!(%reason, "repository unavailable");
            tonic::Status::with_error_details(
                Code::Unavailable,
                "storage is unavailable; retry later",
                error_info("STORAGE_UNAVAILABLE", &[]),
            )
        }
        ApiError::Repository(RepositoryError::Corrupt(reason)) => {
            tracing::error!(%reason, "stored batch data does not parse");
            tonic::Status::internal("stored batch data is inconsistent")
        }
        ApiError::Resolve(ResolveError::NotAPipelinePhase(phase)) => {
            invalid_argument(&[InvalidValue::new(
                "requested_pipeline",
                format!("{phase} cannot be requested as a pipeline"),
            )])
        }
        ApiError::Resolve(ResolveError::InvalidAnswer(reason)) => {
            tracing::error!(%reason, "pipeline resolver answered something unusable");
            tonic::Status::internal("the pipeline resolver answered something unusable")
        }
        ApiError::Resolve(ResolveError::Unavailable(reason)) => {
            tracing::warn!(%reason, "pipeline resolver unavailable");
            tonic::Status::with_error_details(
                Code::Unavailable,
                "the pipeline resolver is unavailable; retry later",
                error_info("RESOLVER_UNAVAILABLE", &[]),
            )
        }
        ApiError::Unauthenticated(message) => tonic::Status::unauthenticated(message),
        ApiError::Duplicate => tonic::Status::already_exists("the request was already processed"),
    }
}

fn invalid_argument(values: &[InvalidValue]) -> tonic::Status {
    bad_request(
        values
            .iter()
            .map(|v| (v.field.to_owned(), v.reason.clone()))
            .collect(),
    )
}

/// INVALID_ARGUMENT with a BadRequest naming every `(field, description)`; an empty field means the whole request.
pub fn bad_request(violations: Vec<(String, String)>) -> tonic::Status {
    let summary = violations
        .iter()
        .map(|(field, reason)| {
            if field.is_empty() {
                reason.clone()
            } else {
                format!("{field}: {reason}")
            }
        })
        .collect::<Vec<_>>()
        .join("; ");
    let violations: Vec<FieldViolation> = violations
        .into_iter()
        .map(|(f, d)| FieldViolation::new(f, d))
        .collect();
    tonic::Status::with_error_details(
        Code::InvalidArgument,
        format!("invalid request: {summary}"),
        ErrorDetails::with_bad_request(violations),
    )
}

fn error_info(reason: &str, metadata: &[(&str, String)]) -> ErrorDetails {
    let metadata: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata)
}

fn rejection_status(rejection: &Rejection) -> tonic::Status {
    let message = rejection.to_string();
    let precondition = |reason: &str, metadata: &[(&str, String)]| {
        tonic::Status::with_error_details(
            Code::FailedPrecondition,
            message.clone(),
            error_info(reason, metadata),
        )
    };
    match rejection {
        Rejection::NotFound => tonic::Status::not_found("batch not found"),
        Rejection::AlreadyExists => tonic::Status::already_exists(message),
        Rejection::Invalid(value) => invalid_argument(std::slice::from_ref(value)),
        Rejection::IllegalTransition { from, input } => precondition(
            "ILLEGAL_TRANSITION",
            &[
                ("batch_status", from.as_str().to_owned()),
                ("input", (*input).to_owned()),
            ],
        ),
        Rejection::RunActive { run_id } => {
            precondition("RUN_ACTIVE", &[("run_id", run_id.to_string())])
        }
        Rejection::NoActiveRun => precondition("NO_ACTIVE_RUN", &[]),
        Rejection::UnknownPhase { phase } => {
            precondition("UNKNOWN_PHASE", &[("phase", phase.to_string())])
        }
        Rejection::StaleAttempt {
            phase,
            current,
            got,
        } => precondition(
            "STALE_ATTEMPT",
            &[
                ("phase", phase.to_string()),
                ("current_attempt", current.to_string()),
                ("attempt", got.to_string()),
            ],
        ),
        Rejection::IllegalPhaseTransition {
            phase,
            status,
            input,
        } => precondition(
            "ILLEGAL_PHASE_TRANSITION",
            &[
                ("phase", phase.to_string()),
                ("phase_status", status.as_str().to_owned()),
                ("input", (*input).to_owned()),
            ],
        ),
        Rejection::NotRetryable { phase, .. } => {
            precondition("NOT_RETRYABLE", &[("phase", phase.to_string())])
        }
    }
}

/// The HTTP status grpc-gateway answers for a gRPC code.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The google.rpc types, for rendering `details` (packed `Any`s) as proto3 JSON.
static RPC_POOL: LazyLock<Option<DescriptorPool>> = LazyLock::new(|| {
    let mut pool = DescriptorPool::global();
    match pool.decode_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET) {
        Ok(()) => Some(pool),
        Err(error) => {
            tracing::error!(%error, "google.rpc descriptors do not load; error details are left out of JSON");
            None
        }
    }
});

/// A `Status` as the JSON `google.rpc.Status` body: `{code, message, details: [{"@type": …, …}]}`.
pub fn status_json(status: &tonic::Status) -> serde_json::Value {
    let details = RPC_POOL
        .as_ref()
        .and_then(|pool| details_json(pool, status.details()))
        .unwrap_or_else(|| serde_json::Value::Array(Vec::new()));
    serde_json::json!({
        "code": status.code() as i32,
        "message": status.message(),
        "details": details,
    })
}

fn details_json(pool: &DescriptorPool, encoded: &[u8]) -> Option<serde_json::Value> {
    if encoded.is_empty() {
        return None;
    }
    let descriptor = pool.get_message_by_name("google.rpc.Status")?;
    let message = DynamicMessage::decode(descriptor, Bytes::copy_from_slice(encoded)).ok()?;
    let json = serde_json::to_value(&message).ok()?;
    json.get("details").cloned()
}

/// The HTTP answer for a `Status`.
pub fn http_response(status: &tonic::Status) -> axum::response::Response {
    use axum::response::IntoResponse;
    (http_status(status.code()), axum::Json(status_json(status))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::ids::{PhaseName, RunId};
    use crate::core::model::BatchStatus;

    #[test]
    fn every_violated_field_is_reported_in_bad_request() {
        let status = to_status(vec![
            InvalidValue::new("expected_essay_count", "must be between 1 and 10000"),
            InvalidValue::new("course_code", "unknown course code"),
        ]);
        assert_eq!(status.code(), Code::InvalidArgument);
        let fields: Vec<String> = status
            .get_details_bad_request()
            .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
            .unwrap_or_default();
        assert_eq!(fields, ["expected_essay_count", "course_code"]);
    }

    #[test]
    fn rejections_map_to_their_codes_with_reasons() {
        let illegal = to_status(Rejection::IllegalTransition {
            from: BatchStatus::AwaitingContentValidation,
            input: "request_pipeline",
        });
        assert_eq!(illegal.code(), Code::FailedPrecondition);
        assert_eq!(
            illegal.get_details_error_info().map(|i| i.reason),
            Some("ILLEGAL_TRANSITION".to_owned())
        );
        let active = to_status(Rejection::RunActive {
            run_id: RunId::from_uuid(uuid::Uuid::nil()),
        });
        assert_eq!(
            active.get_details_error_info().map(|i| i.reason),
            Some("RUN_ACTIVE".to_owned())
        );
        assert_eq!(to_status(Rejection::NotFound).code(), Code::NotFound);
        assert_eq!(
            to_status(ApiError::Repository(RepositoryError::Conflict {
                attempts: 3
            }))
            .code(),
            Code::Aborted
        );
        assert_eq!(
            to_status(ApiError::Repository(RepositoryError::Unavailable(
                "down".into()
            )))
            .code(),
            Code::Unavailable
        );
        let not_pipeline = to_status(ApiError::Resolve(ResolveError::NotAPipelinePhase(
            PhaseName::StudentMatching,
        )));
        assert_eq!(not_pipeline.code(), Code::InvalidArgument);
    }

    #[test]
    fn json_body_is_a_google_rpc_status_with_typed_details() {
        let status = to_status(InvalidValue::new("batch_id", "'x' is not a UUID"));
        let json = status_json(&status);
        assert_eq!(json["code"], 3);
        assert_eq!(
            json["details"][0]["@type"],
            "type.googleapis.com/google.rpc.BadRequest"
        );
        assert_eq!(
            json["details"][0]["fieldViolations"][0]["field"],
            "batch_id"
        );
        assert_eq!(http_status(status.code()), StatusCode::BAD_REQUEST);
    }
}
