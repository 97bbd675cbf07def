//! HTTP/JSON → gRPC transcoding driven by the `google.api.http` rules in the embedded descriptors. A matching
//! request becomes a real gRPC request (one 5-byte-framed message, `application/grpc`) sent IN-PROCESS to the same
//! tonic routes gRPC clients reach, so both transports share every handler, error and check; the gRPC answer
//! (message frame + `grpc-status`) is turned back into proto3 JSON or a JSON `google.rpc.Status`.

pub mod json;
pub mod template;

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use axum::response::IntoResponse;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Limited};
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MethodDescriptor};
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt};

use self::template::{PathTemplate, TemplateError};
use super::auth::{Identity, InternalCaller};
use super::errors::{bad_request, http_response};

/// Largest request body accepted (bytes).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The in-process gRPC endpoint and the fallback for paths no rule matches.
pub type HttpService = BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// The RPC an HTTP request was routed to; put in response extensions for metrics (a bounded label).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutedRpc(pub String);

#[derive(Debug, thiserror::Error)]
pub enum TranscodeError {
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error("http rule of {0} names a method missing from the descriptors")]
    UnknownMethod(String),
    #[error("http rule of {method}: path variable '{variable}' is not a field of the request")]
    UnknownVariable { method: String, variable: String },
    #[error("http rule of {method}: body '{body}' is not supported (use \"*\" or none)")]
    UnsupportedBody { method: String, body: String },
    #[error("http rule of {method}: streaming methods cannot be transcoded")]
    Streaming { method: String },
}

#[derive(Debug)]
struct Rule {
    verb: Method,
    template: PathTemplate,
    method: MethodDescriptor,
    has_body: bool,
    grpc_path: String,
}

/// The rule table, built once from the descriptors.
#[derive(Debug)]
pub struct Rules {
    rules: Vec<Rule>,
}

impl Rules {
    /// Every rule of every service in `pool`, validated.
    pub fn from_descriptors(pool: &DescriptorPool) -> Result<Self, TranscodeError> {
        let mut rules = Vec::new();
        for binding in crate::proto::http_rules() {
            let method = find_method(pool, &binding.method)
                .ok_or_else(|| TranscodeError::UnknownMethod(binding.method.clone()))?;
            if method.is_client_streaming() || method.is_server_streaming() {
                return Err(TranscodeError::Streaming {
                    method: binding.method,
                });
            }
            let template = PathTemplate::parse(&binding.path)?;
            let input = method.input();
            if let Some(variable) = template
                .variables()
                .find(|v| input.get_field_by_name(v).is_none())
            {
                return Err(TranscodeError::UnknownVariable {
                    method: binding.method,
                    variable: variable.to_owned(),
                });
            }
            let has_body = match binding.body.as_str() {
                "*" => true,
                "" => false,
                other => {
                    return Err(TranscodeError::UnsupportedBody {
                        method: binding.method.clone(),
                        body: other.to_owned(),
                    })
                }
            };
            let verb = Method::from_bytes(binding.verb.as_bytes())
                .map_err(|_| TranscodeError::UnknownMethod(binding.method.clone()))?;
            rules.push(Rule {
                verb,
                template,
                grpc_path: format!("/{}/{}", method.parent_service().full_name(), method.name()),
                method,
                has_body,
            });
        }
        Ok(Self { rules })
    }

    fn find(&self, verb: &Method, path: &str) -> Option<(&Rule, Vec<(String, String)>)> {
        self.rules
            .iter()
            .filter(|r| r.verb == *verb)
            .find_map(|r| r.template.matches(path).map(|bound| (r, bound)))
    }

    /// (verb, path template, method descriptor) of every rule, for the OpenAPI document.
    pub fn iter(&self) -> impl Iterator<Item = (&Method, &str, &MethodDescriptor, bool)> {
        self.rules
            .iter()
            .map(|r| (&r.verb, r.template.as_str(), &r.method, r.has_body))
    }
}

fn find_method(pool: &DescriptorPool, full_name: &str) -> Option<MethodDescriptor> {
    let (service, method) = full_name.rsplit_once('.')?;
    pool.get_service_by_name(service)?
        .methods()
        .find(|m| m.name() == method)
}

/// The transcoding service: put it as the router's fallback.
#[derive(Clone)]
pub struct Transcoder {
    rules: Arc<Rules>,
    grpc: HttpService,
    fallback: HttpService,
}

impl Transcoder {
    pub fn new(rules: Arc<Rules>, grpc: HttpService, fallback: HttpService) -> Self {
        Self {
            rules,
            grpc,
            fallback,
        }
    }
}

impl Service<Request<Body>> for Transcoder {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.handle(request).await) })
    }
}

impl Transcoder {
    async fn handle(self, request: Request<Body>) -> Response<Body> {
        let matched = if super::auth::is_grpc(&request) {
            None
        } else {
            self.rules
                .find(request.method(), request.uri().path())
                .map(|(rule, bound)| {
                    (
                        rule.method.clone(),
                        rule.has_body,
                        rule.grpc_path.clone(),
                        bound,
                    )
                })
        };
        let Some((method, has_body, grpc_path, bound)) = matched else {
            return match self.fallback.oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
        };
        let rpc = RoutedRpc(grpc_path.trim_start_matches('/').to_owned());
        let mut response = match self
            .transcode(request, &method, has_body, &grpc_path, bound)
            .await
        {
            Ok(response) => response,
            Err(status) => status,
        };
        response.extensions_mut().insert(rpc);
        response
    }

    async fn transcode(
        self,
        request: Request<Body>,
        method: &MethodDescriptor,
        has_body: bool,
        grpc_path: &str,
        bound: Vec<(String, String)>,
    ) -> Result<Response<Body>, Response<Body>> {
        let (parts, body) = request.into_parts();
        let body = Limited::new(body, MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|error| {
                if error.is::<http_body_util::LengthLimitError>() {
                    let status = tonic::Status::invalid_argument(format!(
                        "request body exceeds {MAX_BODY_BYTES} bytes"
                    ));
                    let mut response = http_response(&status);
                    *response.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
                    response
                } else {
                    http_response(&tonic::Status::invalid_argument(
                        "request body could not be read",
                    ))
                }
            })?;
        let body = body.to_bytes();

        let input = method.input();
        let mut message = if has_body {
            json::message_from_json(&input, &body).map_err(|v| http_response(&bad_request(v)))?
        } else {
            DynamicMessage::new(input)
        };
        let violations: Vec<_> = bound
            .iter()
            .filter_map(|(name, value)| json::set_path_field(&mut message, name, value).err())
            .collect();
        if !violations.is_empty() {
            return Err(http_response(&bad_request(violations)));
        }

        let grpc_request = grpc_request(&parts.headers, &parts.extensions, grpc_path, &message)
            .map_err(|status| http_response(&status))?;
        let response = match self.grpc.oneshot(grpc_request).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        grpc_to_json(response, method).await
    }
}

/// Headers an HTTP client sends that mean nothing (or something wrong) on the in-process gRPC request.
const NOT_FORWARDED: [header::HeaderName; 7] = [
    header::CONTENT_TYPE,
    header::CONTENT_LENGTH,
    header::ACCEPT,
    header::ACCEPT_ENCODING,
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::HOST,
];

fn grpc_request(
    headers: &HeaderMap,
    extensions: &axum::http::Extensions,
    path: &str,
    message: &DynamicMessage,
) -> Result<Request<Body>, tonic::Status> {
    let encoded = message.encode_to_vec();
    let length = u32::try_from(encoded.len())
        .map_err(|_| tonic::Status::invalid_argument("request too large"))?;
    let mut frame = BytesMut::with_capacity(encoded.len() + 5);
    frame.put_u8(0);
    frame.put_u32(length);
    frame.extend_from_slice(&encoded);

    let mut request = Request::builder()
        .method(Method::POST)
        .uri(path)
        .version(axum::http::Version::HTTP_2)
        .body(Body::from(frame.freeze()))
        .map_err(|_| tonic::Status::internal("could not build the gRPC request"))?;
    for (name, value) in headers {
        if !NOT_FORWARDED.contains(name) && !name.as_str().starts_with("grpc-") {
            request.headers_mut().append(name.clone(), value.clone());
        }
    }
    let h = request.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(header::TE, HeaderValue::from_static("trailers"));
    // Credentials were verified on the way in; carry the verdict across, and the original headers beside it.
    if let Some(identity) = extensions.get::<Identity>() {
        request.extensions_mut().insert(identity.clone());
    }
    if let Some(internal) = extensions.get::<InternalCaller>() {
        request.extensions_mut().insert(*internal);
    }
    Ok(request)
}

async fn grpc_to_json(
    response: Response<Body>,
    method: &MethodDescriptor,
) -> Result<Response<Body>, Response<Body>> {
    let (parts, body) = response.into_parts();
    // Trailers-only answers carry grpc-status in the headers.
    if let Some(status) = failed_status(&parts.headers) {
        return Err(http_response(&status));
    }
    let collected = body.collect().await.map_err(|_| {
        http_response(&tonic::Status::internal(
            "the gRPC answer could not be read",
        ))
    })?;
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let mut data = collected.to_bytes();
    if let Some(status) = failed_status(&trailers) {
        return Err(http_response(&status));
    }
    let payload = read_frame(&mut data)
        .ok_or_else(|| http_response(&tonic::Status::internal("malformed gRPC answer")))?;
    let message = DynamicMessage::decode(method.output(), payload)
        .map_err(|_| http_response(&tonic::Status::internal("undecodable gRPC answer")))?;
    let json = serde_json::to_vec(&message)
        .map_err(|_| http_response(&tonic::Status::internal("unencodable answer")))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], json).into_response())
}

/// A non-OK status in `headers`, if they carry one.
fn failed_status(headers: &HeaderMap) -> Option<tonic::Status> {
    headers.get("grpc-status")?;
    tonic::Status::from_header_map(headers).filter(|s| s.code() != tonic::Code::Ok)
}

fn read_frame(data: &mut Bytes) -> Option<Bytes> {
    if data.len() < 5 || data[0] != 0 {
        return None;
    }
    data.advance(1);
    let length = usize::try_from(data.get_u32()).ok()?;
    (data.len() >= length).then(|| data.split_to(length))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::descriptor_pool;

    #[test]
    fn every_rule_in_the_protos_loads_and_routes() {
        let rules = Rules::from_descriptors(descriptor_pool()).unwrap();
        let (rule, bound) = rules.find(&Method::GET, "/v1/batches/abc/status").unwrap();
        assert_eq!(
            rule.grpc_path,
            "/huleedu.bos.v1.BatchService/GetBatchStatus"
        );
        assert_eq!(bound, [("batch_id".to_owned(), "abc".to_owned())]);
        let (rule, _) = rules.find(&Method::POST, "/v1/batches/register").unwrap();
        assert!(rule.has_body);
        let (rule, _) = rules
            .find(&Method::GET, "/internal/v1/batches/x/pipeline-state")
            .unwrap();
        assert_eq!(
            rule.grpc_path,
            "/huleedu.bos.v1.BatchInternalService/GetPipelineState"
        );
        assert!(rules.find(&Method::GET, "/v1/batches/register").is_none());
        assert_eq!(rules.iter().count(), 5);
    }

    #[test]
    fn frames_round_trip() {
        let mut data = Bytes::from_static(&[0, 0, 0, 0, 2, 8, 1]);
        assert_eq!(read_frame(&mut data), Some(Bytes::from_static(&[8, 1])));
        assert_eq!(
            read_frame(&mut Bytes::from_static(&[0, 0, 0, 0, 9, 1])),
            None
        );
        assert_eq!(read_frame(&mut Bytes::from_static(&[1, 0, 0, 0, 0])), None);
    }
}
