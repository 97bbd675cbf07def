//! Per-call operability, one layer for both transports: a request id (`x-request-id`, generated when absent, echoed
//! back), a tracing span, the `grpc-timeout` deadline, and Prometheus metrics with bounded labels — the method
//! comes from the gRPC path or the matched HTTP rule (never from a path holding a batch id).

use std::collections::HashSet;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Request, Response};
use futures::future::BoxFuture;
use http_body::Frame;
use tower::{Layer, Service};
use tracing::Instrument;

use super::transcode::RoutedRpc;

pub const REQUEST_ID_HEADER: &str = "x-request-id";
const MAX_REQUEST_ID_LEN: usize = 128;

/// Plain HTTP routes that are their own label.
const PLAIN_ROUTES: [&str; 3] = ["/healthz", "/metrics", "/openapi.json"];

/// Every gRPC method this server knows, as `package.Service/Method`.
static GRPC_METHODS: LazyLock<HashSet<String>> = LazyLock::new(|| {
    let mut methods: HashSet<String> = crate::proto::descriptor_pool()
        .services()
        .flat_map(|s| {
            let service = s.full_name().to_owned();
            s.methods()
                .map(|m| format!("{service}/{}", m.name()))
                .collect::<Vec<_>>()
        })
        .collect();
    for extra in [
        "grpc.health.v1.Health/Check",
        "grpc.health.v1.Health/Watch",
        "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ] {
        methods.insert(extra.to_owned());
    }
    methods
});

#[derive(Debug, Clone, Copy, Default)]
pub struct TelemetryLayer;

impl<S> Layer<S> for TelemetryLayer {
    type Service = Telemetry<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Telemetry { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Telemetry<S> {
    inner: S,
}

impl<S> Service<Request<Body>> for Telemetry<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let started = Instant::now();
        let request_id = request_id(request.headers());
        if let Ok(value) = HeaderValue::from_str(&request_id) {
            request.headers_mut().insert(REQUEST_ID_HEADER, value);
        }
        let grpc = super::auth::is_grpc(&request);
        let path = request.uri().path().to_owned();
        let deadline = if grpc {
            grpc_timeout(request.headers())
        } else {
            None
        };
        let grpc_method = grpc.then(|| grpc_label(&path));
        let span = tracing::info_span!(
            "call",
            request_id = %request_id,
            transport = if grpc { "grpc" } else { "http" },
            method = grpc_method.as_deref().unwrap_or(request.method().as_str()),
            path = %if grpc { "" } else { path.as_str() },
        );
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(
            async move {
                let call = inner.call(request);
                let mut response = match deadline {
                    Some(limit) => match tokio::time::timeout(limit, call).await {
                        Ok(result) => result.unwrap_or_else(|never| match never {}),
                        Err(_) => tonic::Status::deadline_exceeded("deadline exceeded")
                            .into_http::<Body>(),
                    },
                    None => call.await.unwrap_or_else(|never| match never {}),
                };
                if let Ok(value) = HeaderValue::from_str(&request_id) {
                    response.headers_mut().insert(REQUEST_ID_HEADER, value);
                }
                match grpc_method {
                    Some(method) => Ok(observe_grpc(response, method, started)),
                    None => {
                        let method = http_label(&path, &response);
                        let code = response.status().as_u16().to_string();
                        record("http", method, code, started);
                        tracing::info!(status = response.status().as_u16(), "answered");
                        Ok(response)
                    }
                }
            }
            .instrument(span),
        )
    }
}

fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| {
            !v.is_empty()
                && v.len() <= MAX_REQUEST_ID_LEN
                && v.chars().all(|c| c.is_ascii_graphic())
        })
        .map_or_else(|| uuid::Uuid::now_v7().to_string(), str::to_owned)
}

fn grpc_label(path: &str) -> String {
    let name = path.trim_start_matches('/');
    if GRPC_METHODS.contains(name) {
        name.to_owned()
    } else {
        "unknown".to_owned()
    }
}

fn http_label(path: &str, response: &Response<Body>) -> String {
    if let Some(RoutedRpc(rpc)) = response.extensions().get::<RoutedRpc>() {
        rpc.clone()
    } else if PLAIN_ROUTES.contains(&path) {
        path.to_owned()
    } else {
        "unmatched".to_owned()
    }
}

fn record(transport: &'static str, method: String, code: String, started: Instant) {
    let elapsed = started.elapsed().as_secs_f64();
    metrics::counter!("requests_total", "transport" => transport, "method" => method.clone(), "code" => code)
        .increment(1);
    metrics::histogram!("request_duration_seconds", "transport" => transport, "method" => method)
        .record(elapsed);
}

/// `grpc-timeout`: an integer of at most 8 digits and a unit (H, M, S, m, u, n).
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let raw = headers.get("grpc-timeout")?.to_str().ok()?;
    let split = raw.len().checked_sub(1)?;
    let (digits, unit) = raw.split_at(split);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let value: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(value.saturating_mul(3600)),
        "M" => Duration::from_secs(value.saturating_mul(60)),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    })
}

/// Records a gRPC call when its answer ends: the status is in the trailers (or, trailers-only, in the headers),
/// and a stream's duration is the whole stream.
fn observe_grpc(response: Response<Body>, method: String, started: Instant) -> Response<Body> {
    let (parts, body) = response.into_parts();
    let mut recorder = Recorder {
        method: Some(method),
        code: None,
        started,
    };
    if let Some(code) = parts
        .headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
    {
        recorder.code = Some(code.to_owned());
    }
    Response::from_parts(
        parts,
        Body::new(ObservedBody {
            inner: body,
            recorder,
        }),
    )
}

struct Recorder {
    method: Option<String>,
    code: Option<String>,
    started: Instant,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if let Some(method) = self.method.take() {
            // No status at all means the client went away before the answer ended.
            let code = self.code.take().unwrap_or_else(|| "1".to_owned());
            tracing::info!(grpc_status = %code, "answered");
            record("grpc", method, code, self.started);
        }
    }
}

pin_project_lite::pin_project! {
    struct ObservedBody {
        #[pin]
        inner: Body,
        recorder: Recorder,
    }
}

impl http_body::Body for ObservedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(code) = frame
                .trailers_ref()
                .and_then(|t| t.get("grpc-status"))
                .and_then(|v| v.to_str().ok())
            {
                this.recorder.code = Some(code.to_owned());
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_every_unit() {
        let header = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("grpc-timeout", HeaderValue::from_str(v).unwrap());
            grpc_timeout(&h)
        };
        assert_eq!(header("2S"), Some(Duration::from_secs(2)));
        assert_eq!(header("150m"), Some(Duration::from_millis(150)));
        assert_eq!(header("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(header("5n"), Some(Duration::from_nanos(5)));
        assert_eq!(header("S"), None);
        assert_eq!(header("123456789S"), None);
        assert_eq!(header("10x"), None);
    }

    #[test]
    fn labels_are_bounded() {
        assert_eq!(
            grpc_label("/huleedu.bos.v1.BatchService/GetBatchStatus"),
            "huleedu.bos.v1.BatchService/GetBatchStatus"
        );
        assert_eq!(grpc_label("/evil/0198-batch-id"), "unknown");
        let response = Response::new(Body::empty());
        assert_eq!(
            http_label("/v1/batches/0198-some-id/status", &response),
            "unmatched"
        );
        assert_eq!(http_label("/healthz", &response), "/healthz");
    }

    #[test]
    fn request_ids_are_kept_or_generated() {
        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_ID_HEADER, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&headers), "abc-123");
        assert_eq!(request_id(&HeaderMap::new()).len(), 36);
    }
}
