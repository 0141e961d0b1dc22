//! The HTTP side of the API port: the JSON gateway (`/v1/...`), the OpenAPI
//! document, Prometheus `/metrics` and the dashboard at `/`. Every JSON route
//! calls the same RPC method a gRPC client would, with the HTTP
//! `Authorization` header as its metadata, so auth, limits and errors are
//! those of gRPC; only the encoding differs. gRPC requests share the port:
//! they are routed by their `/conflux.v1.Conflux/...` paths.

use super::{Api, ERROR_KIND_HEADER, auth::Rpc, authorize, pb, status};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use pb::conflux_server::Conflux;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tonic::{Code, Request};

/// The dashboard: one self-contained page, built into the binary.
const DASHBOARD_HTML: &str = include_str!("dashboard.html");
/// The OpenAPI 3 description of the JSON gateway.
const OPENAPI_JSON: &str = include_str!("openapi.json");

/// Header carrying a client's retry key (as the gRPC field `idempotency_key`).
const IDEMPOTENCY_HEADER: &str = "idempotency-key";

type ApiState = State<Arc<Api>>;

/// The gateway's routes merged with `grpc` (tonic's routes). `body_limit_bytes`
/// caps request bodies as gRPC's decode limit does.
pub fn router(api: Arc<Api>, grpc: Router, body_limit_bytes: usize) -> Router {
    let http = Router::new()
        .route("/", get(dashboard))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/status", get(node_status))
        .route("/v1/types", get(list_types))
        .route("/v1/entities/{entity_type}", get(list_entities))
        .route("/v1/entities/{entity_type}/{id}", get(get_state))
        .route("/v1/entities/{entity_type}/{id}/{operation}", post(invoke))
        .route("/v1/dead-letters", get(dead_letters))
        .route("/v1/errors", get(recent_errors))
        .route("/v1/stats", get(stats))
        .layer(DefaultBodyLimit::max(body_limit_bytes))
        .with_state(api);
    // tonic's fallback answers every unknown path as gRPC UNIMPLEMENTED; a
    // browser or curl deserves a 404.
    grpc.merge(http).fallback(not_found)
}

/// A gRPC request carrying the HTTP caller's credentials.
fn rpc_request<T>(message: T, headers: &HeaderMap) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(v) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())
        && let Ok(v) = v.parse()
    {
        request.metadata_mut().insert("authorization", v);
    }
    request
}

/// The HTTP status of a gRPC code (as grpc-gateway maps them, except that a
/// refused business rule — FAILED_PRECONDITION — is a 409 Conflict, and a
/// trapped turn — ABORTED — a 500: the entity's code failed, not the request).
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::FailedPrecondition => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Aborted | Code::Internal | Code::Unknown | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    /// The gRPC code's name, e.g. `NOT_FOUND`.
    code: &'a str,
    /// The machine-readable kind, e.g. `unknown-type`.
    kind: &'a str,
    message: &'a str,
}

/// `{"error": {"code", "kind", "message"}}` with the matching HTTP status; the
/// kind is also in the `conflux-error-kind` header, as in gRPC.
fn error_response(s: &tonic::Status) -> Response {
    let kind = s.metadata().get(ERROR_KIND_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("error");
    let body = ErrorBody { error: ErrorDetail { code: code_name(s.code()), kind, message: s.message() } };
    // A reused idempotency key is refused like payment APIs refuse it.
    let code = match kind {
        "idempotency-key-reused" => StatusCode::UNPROCESSABLE_ENTITY,
        _ => http_status(s.code()),
    };
    let mut response = (code, axum::Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(kind) {
        response.headers_mut().insert(ERROR_KIND_HEADER, v);
    }
    response
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A JSON body of an RPC's answer, or its error.
fn json<T: Serialize>(r: Result<tonic::Response<T>, tonic::Status>) -> Response {
    match r {
        Ok(r) => axum::Json(r.into_inner()).into_response(),
        Err(s) => error_response(&s),
    }
}

fn bad_request(kind: &'static str, message: impl Into<String>) -> Response {
    error_response(&status(Code::InvalidArgument, kind, message))
}

async fn not_found(headers: HeaderMap) -> Response {
    let grpc = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"));
    if grpc {
        // What tonic would have said: gRPC status UNIMPLEMENTED in the headers.
        let mut r = StatusCode::OK.into_response();
        r.headers_mut().insert("grpc-status", HeaderValue::from_static("12"));
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        return r;
    }
    error_response(&status(Code::NotFound, "not-found", "no such route; see /v1/openapi.json"))
}

async fn dashboard() -> Response {
    let mut r = DASHBOARD_HTML.into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    r
}

async fn openapi() -> Response {
    let mut r = OPENAPI_JSON.into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

async fn invoke(
    State(api): ApiState,
    Path((entity_type, id, operation)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // The CLI sends `null` for "no argument"; an empty body means the same.
    let payload = if body.iter().all(u8::is_ascii_whitespace) {
        b"null".to_vec()
    } else if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&body) {
        return bad_request("bad-json", format!("the request body is not valid JSON: {e}"));
    } else {
        body.to_vec()
    };
    let idempotency_key = match headers.get(IDEMPOTENCY_HEADER).map(|v| v.to_str()) {
        None => String::new(),
        Some(Ok(k)) => k.to_owned(),
        Some(Err(_)) => {
            return bad_request("bad-idempotency-key", "the Idempotency-Key header must be visible ASCII");
        }
    };
    let request =
        pb::InvokeRequest { entity: Some(pb::EntityRef { entity_type, id }), operation, payload, idempotency_key };
    match api.invoke(rpc_request(request, &headers)).await {
        Ok(r) => {
            let reply = r.into_inner().reply;
            let content_type = if serde_json::from_slice::<serde::de::IgnoredAny>(&reply).is_ok() {
                "application/json"
            } else {
                "application/octet-stream"
            };
            ([(header::CONTENT_TYPE, content_type)], reply).into_response()
        }
        Err(s) => error_response(&s),
    }
}

#[derive(Deserialize)]
struct PageQuery {
    #[serde(default)]
    prefix: String,
    #[serde(default)]
    start_after: String,
    #[serde(default)]
    limit: u32,
}

async fn list_entities(
    State(api): ApiState,
    Path(entity_type): Path<String>,
    Query(q): Query<PageQuery>,
    headers: HeaderMap,
) -> Response {
    let request = pb::ListEntitiesRequest { entity_type, prefix: q.prefix, start_after: q.start_after, limit: q.limit };
    json(api.list_entities(rpc_request(request, &headers)).await)
}

async fn get_state(
    State(api): ApiState,
    Path((entity_type, id)): Path<(String, String)>,
    Query(q): Query<PageQuery>,
    headers: HeaderMap,
) -> Response {
    let request = pb::GetStateRequest {
        entity: Some(pb::EntityRef { entity_type, id }),
        start_after: q.start_after,
        limit: q.limit,
    };
    json(api.get_state(rpc_request(request, &headers)).await)
}

async fn node_status(State(api): ApiState, headers: HeaderMap) -> Response {
    json(api.status(rpc_request(pb::StatusRequest {}, &headers)).await)
}

async fn list_types(State(api): ApiState, headers: HeaderMap) -> Response {
    json(api.list_types(rpc_request(pb::ListTypesRequest {}, &headers)).await)
}

async fn dead_letters(State(api): ApiState, Query(q): Query<PageQuery>, headers: HeaderMap) -> Response {
    let request = pb::ListDeadLettersRequest { start_after: q.start_after, limit: q.limit };
    json(api.list_dead_letters(rpc_request(request, &headers)).await)
}

#[derive(Serialize)]
struct RecentErrors {
    errors: Vec<RecentErrorJson>,
}

#[derive(Serialize)]
struct RecentErrorJson {
    at_ms: u64,
    entity: String,
    operation: String,
    invocation_id: String,
    kind: &'static str,
    message: String,
}

async fn recent_errors(State(api): ApiState, headers: HeaderMap) -> Response {
    if let Err(s) = authorize(&api.auth, Rpc::Metrics, &rpc_request((), &headers)) {
        return error_response(&s);
    }
    let errors = api
        .scheduler
        .recent_errors()
        .into_iter()
        .map(|e| RecentErrorJson {
            at_ms: e.at_ms,
            entity: e.entity,
            operation: e.operation,
            invocation_id: e.invocation_id,
            kind: e.kind,
            message: e.message,
        })
        .collect();
    axum::Json(RecentErrors { errors }).into_response()
}

#[derive(Serialize)]
struct Stats {
    turns_ok: u64,
    turns_failed: u64,
    /// Cumulative invocation latency histogram; `le` in seconds, `"+Inf"` last.
    latency_buckets: Vec<Bucket>,
    latency_sum_seconds: f64,
    latency_count: u64,
}

#[derive(Serialize)]
struct Bucket {
    le: serde_json::Value,
    count: u64,
}

async fn stats(State(api): ApiState, headers: HeaderMap) -> Response {
    if let Err(s) = authorize(&api.auth, Rpc::Metrics, &rpc_request((), &headers)) {
        return error_response(&s);
    }
    let s = api.scheduler.stats();
    let h = crate::telemetry::snapshot(&crate::telemetry::metrics().invocation_seconds);
    let latency_buckets = h
        .buckets
        .iter()
        .map(|&(le, count)| Bucket { le: if le.is_finite() { le.into() } else { "+Inf".into() }, count })
        .collect();
    axum::Json(Stats {
        turns_ok: s.turns_ok,
        turns_failed: s.turns_failed,
        latency_buckets,
        latency_sum_seconds: h.sum,
        latency_count: h.count,
    })
    .into_response()
}

async fn metrics(State(api): ApiState, headers: HeaderMap) -> Response {
    if let Err(s) = authorize(&api.auth, Rpc::Metrics, &rpc_request((), &headers)) {
        return error_response(&s);
    }
    let s = api.scheduler.stats();
    let gauges = crate::telemetry::NodeGauges {
        resident_instances: s.resident_instances as u64,
        guest_memory_bytes: s.guest_memory_bytes as u64,
        active_entities: s.active_entities as u64,
        inflight_invocations: s.inflight_invocations as u64,
        outbox_messages: s.outbox_messages,
        entity_types: api.registry.list().len() as u64,
        log_applied_index: api.log.applied_index(),
        log_durable_index: api.log.last_durable_index(),
        uptime_seconds: api.started.elapsed().as_secs(),
    };
    let text = crate::telemetry::metrics().render(gauges);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_map_to_the_statuses_clients_expect() {
        assert_eq!(http_status(Code::InvalidArgument), StatusCode::BAD_REQUEST);
        assert_eq!(http_status(Code::Unauthenticated), StatusCode::UNAUTHORIZED);
        assert_eq!(http_status(Code::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(http_status(Code::FailedPrecondition), StatusCode::CONFLICT);
        assert_eq!(http_status(Code::ResourceExhausted), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(http_status(Code::Unavailable), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(http_status(Code::Aborted), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn the_openapi_document_is_json_and_names_every_route() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI_JSON).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for p in [
            "/v1/entities/{entity_type}/{id}/{operation}",
            "/v1/entities/{entity_type}",
            "/v1/entities/{entity_type}/{id}",
            "/v1/types",
            "/v1/status",
            "/v1/dead-letters",
            "/v1/errors",
            "/v1/stats",
            "/metrics",
        ] {
            assert!(paths.contains_key(p), "{p} is not documented");
        }
    }
}
