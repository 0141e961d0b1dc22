//! The HTTP side of the API port: the JSON gateway (`/v1/...`), the OpenAPI
//! document, Prometheus `/metrics` and the dashboard at `/`. Every JSON route
//! calls the same RPC method a gRPC client would, with the HTTP
//! `Authorization` header as its metadata, so auth, limits and errors are
//! those of gRPC; only the encoding differs. gRPC requests share the port:
//! they are routed by their `/conflux.v1.Conflux/...` paths. Every request
//! first passes the browser checks ([`super::browser`]); every refusal, from
//! a route, a check, the body limit or tonic itself, leaves through the one
//! error mapping (`super::*_status`, then [`http_status`] for HTTP).

use super::browser::BrowserPolicy;
use super::{Api, ERROR_KIND_HEADER, auth::Rpc, authorize, pb, status};
use crate::scheduler::{ErrorKind, http_status_of_code};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::BodyExt;
use pb::conflux_server::Conflux;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tonic::{Code, Request as RpcRequest};

/// The dashboard: one self-contained page, built into the binary.
const DASHBOARD_HTML: &str = include_str!("dashboard.html");
/// The OpenAPI 3 description of the JSON gateway.
const OPENAPI_JSON: &str = include_str!("openapi.json");

/// Header carrying a client's retry key (as the gRPC field `idempotency_key`).
const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// A body over the limit is still read (and dropped) up to this much, so that
/// a client that sends all of it before reading the answer gets the answer
/// rather than a reset connection.
const DRAIN_MAX_BYTES: u64 = 64 << 20;
/// How long that reading may take.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The path prefix of the public gRPC service.
const GRPC_SERVICE_PATH: &str = "/conflux.v1.Conflux/";

type ApiState = State<Arc<Api>>;

/// The gateway's routes merged with `grpc` (tonic's routes), behind the
/// browser checks and, for `api.allowed_origins`, CORS.
pub fn router(api: Arc<Api>, grpc: Router) -> Router {
    let policy = Arc::new(BrowserPolicy::new(&api.cfg.allowed_origins, &api.cfg.allowed_hosts, api.tls.is_some()));
    let grpc = grpc.layer(middleware::from_fn_with_state(api.clone(), grpc_error_contract));
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
        .with_state(api);
    // tonic's fallback answers every unknown path as gRPC UNIMPLEMENTED; a
    // browser or curl deserves a 404.
    let app = grpc.merge(http).fallback(not_found).layer(middleware::from_fn_with_state(policy.clone(), browser_guard));
    if policy.allowed_origins().is_empty() {
        return app;
    }
    let origins: Vec<HeaderValue> = policy.allowed_origins().iter().filter_map(|o| o.parse().ok()).collect();
    app.layer(
        tower_http::cors::CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE, HeaderName::from_static(IDEMPOTENCY_HEADER)])
            .expose_headers([HeaderName::from_static(ERROR_KIND_HEADER)])
            .max_age(Duration::from_secs(600)),
    )
}

/// Whether a request speaks gRPC (its refusals are gRPC statuses then).
fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// A refusal in the caller's protocol: a gRPC status, or the JSON error.
fn refuse(s: tonic::Status, grpc: bool) -> Response {
    if grpc { s.into_http::<Body>() } else { error_response(&s) }
}

/// The browser checks, before any route.
async fn browser_guard(State(policy): State<Arc<BrowserPolicy>>, request: Request, next: Next) -> Response {
    match policy.check(request.method(), request.version(), request.headers()) {
        Ok(()) => next.run(request).await,
        Err(refusal) => {
            let s = status(refusal.kind(), refusal.message());
            refuse(s, is_grpc(request.headers()))
        }
    }
}

/// Gives the public service's statuses that tonic produced itself (a message
/// over the decoding limit, an unknown method…) a kind, through
/// [`super::transport_status`]: the request never reached our code.
async fn grpc_error_contract(State(api): ApiState, request: Request, next: Next) -> Response {
    let method = request.uri().path().strip_prefix(GRPC_SERVICE_PATH).map(str::to_owned);
    let mut response = next.run(request).await;
    let Some(method) = method else {
        return response;
    };
    if response.headers().contains_key(ERROR_KIND_HEADER) {
        return response;
    }
    if let Some(s) = tonic::Status::from_header_map(response.headers())
        && s.code() != Code::Ok
    {
        let mapped = super::transport_status(&method, &s, &api.cfg);
        if let Err(e) = mapped.add_header(response.headers_mut()) {
            tracing::warn!("cannot rewrite a transport status: {e}");
        }
    }
    response
}

/// A gRPC request carrying the HTTP caller's credentials.
fn rpc_request<T>(message: T, headers: &HeaderMap) -> RpcRequest<T> {
    let mut request = RpcRequest::new(message);
    if let Some(v) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())
        && let Ok(v) = v.parse()
    {
        request.metadata_mut().insert("authorization", v);
    }
    request
}

/// The HTTP status of a gRPC code ([`http_status_of_code`]).
pub fn http_status(code: Code) -> StatusCode {
    StatusCode::from_u16(http_status_of_code(code)).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
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

/// The HTTP status of a refusal: its kind's ([`ErrorKind::http_status`])
/// when it carries a kind under that kind's own code, else its code's (a
/// transport refusal, a kind this node does not know).
pub fn http_status_of(code: Code, kind: &str) -> StatusCode {
    match ErrorKind::parse(kind) {
        Some(k) if k.grpc_code() == code => {
            StatusCode::from_u16(k.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        }
        _ => http_status(code),
    }
}

/// `{"error": {"code", "kind", "message"}}` with the matching HTTP status; the
/// kind is also in the `conflux-error-kind` header, as in gRPC.
fn error_response(s: &tonic::Status) -> Response {
    let kind = s.metadata().get(ERROR_KIND_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("error");
    let body = ErrorBody { error: ErrorDetail { code: code_name(s.code()), kind, message: s.message() } };
    let mut response = (http_status_of(s.code(), kind), axum::Json(body)).into_response();
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

fn bad_request(kind: ErrorKind, message: impl Into<String>) -> Response {
    error_response(&status(kind, message))
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
    error_response(&status(ErrorKind::NotFound, "no such route; see /v1/openapi.json"))
}

/// The text between the first `open` tag of `html` and its closing tag.
fn inline_block<'a>(html: &'a str, open: &str, close: &str) -> &'a str {
    let start = html.find(open).map_or(html.len(), |i| i + open.len());
    let end = html[start..].find(close).map_or(html.len(), |i| start + i);
    &html[start..end]
}

/// `'sha256-…'`: a CSP source admitting exactly this inline block.
fn csp_hash(block: &str) -> String {
    use base64::Engine;
    use sha2::Digest;
    format!("'sha256-{}'", base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(block.as_bytes())))
}

/// The dashboard's Content-Security-Policy: its own inline script and style
/// (by hash) and requests to its own origin, nothing else; no framing (no
/// clickjacking), no `<base>`, no form submissions.
static DASHBOARD_CSP: LazyLock<HeaderValue> = LazyLock::new(|| {
    let script = csp_hash(inline_block(DASHBOARD_HTML, "<script>", "</script>"));
    let style = csp_hash(inline_block(DASHBOARD_HTML, "<style>", "</style>"));
    let csp = format!(
        "default-src 'none'; script-src {script}; style-src {style}; connect-src 'self'; img-src 'self'; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    );
    HeaderValue::from_str(&csp).expect("a CSP is visible ASCII")
});

async fn dashboard() -> Response {
    let mut r = DASHBOARD_HTML.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(header::CONTENT_SECURITY_POLICY, DASHBOARD_CSP.clone());
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

async fn openapi() -> Response {
    let mut r = OPENAPI_JSON.into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Reads a request body of at most `limit` bytes; a larger one is refused
/// with `payload-too-large`. A client that announced a larger body and waits
/// for `100 Continue` is answered at once (it then sends nothing); one that
/// sends it anyway has the rest read and dropped, within bounds, first.
async fn read_body(headers: &HeaderMap, mut body: Body, limit: usize) -> Result<Bytes, tonic::Status> {
    let too_large = |size: &str| {
        status(
            ErrorKind::PayloadTooLarge,
            format!("the request body (the payload) is {size} bytes; the limit is {limit} (api.max_payload_bytes)"),
        )
    };
    let announced = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if let Some(n) = announced
        && n > limit as u64
    {
        let waits = headers.get(header::EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if !waits && n <= DRAIN_MAX_BYTES {
            drain(body).await;
        }
        return Err(too_large(&n.to_string()));
    }
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| status(ErrorKind::BadBody, format!("cannot read the request body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                drain(body).await;
                return Err(too_large("more than"));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.into())
}

/// Reads and drops what is left of a refused body, within bounds.
async fn drain(mut body: Body) {
    let mut read = 0u64;
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while let Some(Ok(frame)) = body.frame().await {
            read += frame.data_ref().map_or(0, |d| d.len() as u64);
            if read > DRAIN_MAX_BYTES {
                break;
            }
        }
    })
    .await;
}

/// Whether a Content-Type names JSON (`application/json`, any parameters).
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| ct.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

async fn invoke(
    State(api): ApiState,
    Path((entity_type, id, operation)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let body = match read_body(&headers, body, api.cfg.max_payload_bytes).await {
        Ok(body) => body,
        Err(s) => return error_response(&s),
    };
    let blank = body.iter().all(u8::is_ascii_whitespace);
    // A browser sends a text/plain or form body cross-origin without asking
    // first; JSON it may only send after a CORS preflight.
    if !blank && !is_json(&headers) {
        return error_response(&status(
            ErrorKind::UnsupportedMediaType,
            "a request body must be sent as Content-Type: application/json",
        ));
    }
    // The CLI sends `null` for "no argument"; an empty body means the same.
    let payload = if blank {
        b"null".to_vec()
    } else if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&body) {
        return bad_request(ErrorKind::BadJson, format!("the request body is not valid JSON: {e}"));
    } else {
        body.to_vec()
    };
    let idempotency_key = match headers.get(IDEMPOTENCY_HEADER).map(|v| v.to_str()) {
        None => String::new(),
        Some(Ok(k)) => k.to_owned(),
        Some(Err(_)) => {
            return bad_request(ErrorKind::BadIdempotencyKey, "the Idempotency-Key header must be visible ASCII");
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
            kind: e.kind.as_str(),
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
        wal_fdatasyncs: api.log.stats().wal_fdatasyncs,
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
    fn limits_and_media_types_have_their_http_statuses() {
        assert_eq!(http_status_of(Code::InvalidArgument, "payload-too-large"), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(http_status_of(Code::InvalidArgument, "message-too-large"), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(http_status_of(Code::InvalidArgument, "unsupported-media-type"), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(
            http_status_of(Code::FailedPrecondition, "idempotency-key-reused"),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(http_status_of(Code::InvalidArgument, "bad-json"), StatusCode::BAD_REQUEST);
        assert_eq!(http_status_of(Code::Aborted, "conflict"), StatusCode::CONFLICT);
        assert_eq!(http_status_of(Code::PermissionDenied, "cross-origin"), StatusCode::FORBIDDEN);
    }

    #[test]
    fn the_dashboard_policy_admits_its_own_script_and_style_only() {
        // One inline script and one inline style, which the hashes cover.
        assert_eq!(DASHBOARD_HTML.matches("<script").count(), 1);
        assert_eq!(DASHBOARD_HTML.matches("<style").count(), 1);
        assert!(!DASHBOARD_HTML.contains(" style=\""), "inline style attributes need 'unsafe-inline'");
        let script = inline_block(DASHBOARD_HTML, "<script>", "</script>");
        assert!(script.contains("poll()") && !script.contains("</script"));
        let csp = DASHBOARD_CSP.to_str().unwrap();
        assert!(csp.contains(&format!("script-src {};", csp_hash(script))), "{csp}");
        assert!(csp.contains("frame-ancestors 'none'") && csp.contains("default-src 'none'"), "{csp}");
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
