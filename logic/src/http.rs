//! goim's HTTP API (PROTOCOL.md §3.2): routes under `/goim`, query
//! parameters bound like gin (lists repeat the parameter: `mids=1&mids=2`),
//! the raw request body as the pushed message, and answers shaped
//! `{"code":0,"message":"","data":...}` with HTTP 200 for API errors
//! (code -400 for a bad request, -500 for a backend failure).
//!
//! Beyond goim: with `logic.api.tokens` every route but `/goim/nodes/*`
//! needs `Authorization: Bearer <token>` (HTTP 401 and code -401 without);
//! unknown routes get HTTP 404 and a wrong method 405 (both with the JSON
//! shape), bodies over `logic.http.max_body` get 413, and an
//! `Idempotency-Key` header makes a push idempotent.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequest, MatchedPath, Request, State};
use axum::http::{self, HeaderMap, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{Logic, LogicError};

/// goim result codes.
pub const CODE_OK: i32 = 0;
pub const CODE_REQUEST_ERR: i32 = -400;
pub const CODE_SERVER_ERR: i32 = -500;
/// A push refused by `logic.backpressure` (HTTP 429, with `Retry-After`).
pub const CODE_TOO_MANY_REQUESTS: i32 = -429;
pub const CODE_UNAUTHORIZED: i32 = -401;
/// Idempotency keys longer than this are refused.
const MAX_IDEMPOTENCY_KEY: usize = 256;

/// The goim answer body.
#[derive(Debug, Serialize)]
struct Body {
    code: i32,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Value>,
}

/// The goim code of an answer, kept for the request metrics.
#[derive(Debug, Clone, Copy)]
struct ApiCode(i32);

struct ApiResponse {
    status: StatusCode,
    body: Body,
    /// `Retry-After` of a refused push (backpressure).
    retry_after: Option<Duration>,
}

impl ApiResponse {
    fn ok(data: Option<Value>) -> Self {
        ApiResponse {
            status: StatusCode::OK,
            body: Body {
                code: CODE_OK,
                message: String::new(),
                data,
            },
            retry_after: None,
        }
    }

    fn error(status: StatusCode, code: i32, message: impl Into<String>) -> Self {
        ApiResponse {
            status,
            body: Body {
                code,
                message: message.into(),
                data: None,
            },
            retry_after: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::error(StatusCode::OK, CODE_REQUEST_ERR, message)
    }
}

impl From<LogicError> for ApiResponse {
    fn from(error: LogicError) -> Self {
        match error {
            LogicError::InvalidArgument(message) => ApiResponse::bad_request(message),
            LogicError::Throttled(retry_after) => ApiResponse {
                retry_after: Some(retry_after),
                ..ApiResponse::error(
                    StatusCode::TOO_MANY_REQUESTS,
                    CODE_TOO_MANY_REQUESTS,
                    error.to_string(),
                )
            },
            other => ApiResponse::error(StatusCode::OK, CODE_SERVER_ERR, other.to_string()),
        }
    }
}

impl IntoResponse for ApiResponse {
    fn into_response(self) -> Response {
        let code = self.body.code;
        let retry_after = self.retry_after;
        let mut response = (self.status, axum::Json(self.body)).into_response();
        if let Some(after) = retry_after {
            // Whole seconds, at least 1 (RFC 9110 delay-seconds).
            let seconds = after.as_secs_f64().ceil().max(1.0) as u64;
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, http::HeaderValue::from(seconds));
        }
        response.extensions_mut().insert(ApiCode(code));
        response
    }
}

type ApiResult = Result<ApiResponse, ApiResponse>;

fn data<T: Serialize>(value: T) -> ApiResult {
    serde_json::to_value(value)
        .map(|v| ApiResponse::ok(Some(v)))
        .map_err(|e| ApiResponse::error(StatusCode::OK, CODE_SERVER_ERR, e.to_string()))
}

/// Query parameters in order; repeated names are lists.
struct Params(Vec<(String, String)>);

impl Params {
    fn from_uri(uri: &Uri) -> Params {
        let query = uri.query().unwrap_or("");
        Params(
            form_urlencoded::parse(query.as_bytes())
                .into_owned()
                .collect(),
        )
    }

    fn first(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn all(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// A string that must be present and non-empty (gin `binding:"required"`).
    fn required_str(&self, name: &str) -> Result<String, ApiResponse> {
        match self.first(name) {
            Some(v) if !v.is_empty() => Ok(v.to_string()),
            _ => Err(ApiResponse::bad_request(format!("{name} is required"))),
        }
    }

    /// A number; missing or empty is `None` (gin binds it as 0).
    fn number<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, ApiResponse> {
        match self.first(name) {
            None | Some("") => Ok(None),
            Some(v) => v.trim().parse().map(Some).map_err(|_| {
                ApiResponse::bad_request(format!(
                    "{name}: invalid value {v:?} (want {})",
                    std::any::type_name::<T>()
                ))
            }),
        }
    }

    /// A number that must be present and non-zero (gin `binding:"required"`).
    fn required_i32(&self, name: &str) -> Result<i32, ApiResponse> {
        match self.number::<i32>(name)? {
            Some(v) if v != 0 => Ok(v),
            _ => Err(ApiResponse::bad_request(format!("{name} is required"))),
        }
    }
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiResponse> {
    body.map_err(|rejection| {
        let status = rejection.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            CODE_REQUEST_ERR
        } else {
            CODE_SERVER_ERR
        };
        ApiResponse::error(status, code, rejection.body_text())
    })
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiResponse> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(key) if !key.is_empty() && key.len() <= MAX_IDEMPOTENCY_KEY => Ok(Some(key.into())),
        _ => Err(ApiResponse::bad_request(format!(
            "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"
        ))),
    }
}

/// What every push route takes: query parameters, the raw body as the
/// message, and an optional `Idempotency-Key`.
struct PushInput {
    params: Params,
    msg: Bytes,
    id: Option<String>,
}

impl<S: Send + Sync> FromRequest<S> for PushInput {
    type Rejection = ApiResponse;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let params = Params::from_uri(request.uri());
        let id = idempotency_key(request.headers())?;
        let msg = body_bytes(Bytes::from_request(request, state).await)?;
        Ok(PushInput { params, msg, id })
    }
}

async fn push_keys(State(logic): State<Arc<Logic>>, push: PushInput) -> ApiResult {
    let op = push.params.number::<i32>("operation")?.unwrap_or(0);
    let keys = push.params.all("keys");
    logic
        .push_keys(op, keys, push.msg, push.id.as_deref())
        .await?;
    Ok(ApiResponse::ok(None))
}

async fn push_mids(State(logic): State<Arc<Logic>>, push: PushInput) -> ApiResult {
    let op = push.params.number::<i32>("operation")?.unwrap_or(0);
    let mut mids = Vec::new();
    for raw in push.params.all("mids") {
        let mid = raw.trim().parse::<i64>().map_err(|_| {
            ApiResponse::bad_request(format!("mids: invalid value {raw:?} (want int64)"))
        })?;
        mids.push(mid);
    }
    logic
        .push_mids(op, mids, push.msg, push.id.as_deref())
        .await?;
    Ok(ApiResponse::ok(None))
}

async fn push_room(State(logic): State<Arc<Logic>>, push: PushInput) -> ApiResult {
    let op = push.params.required_i32("operation")?;
    let room_type = push.params.required_str("type")?;
    let room = push.params.required_str("room")?;
    logic
        .push_room(op, &room_type, &room, push.msg, push.id.as_deref())
        .await?;
    Ok(ApiResponse::ok(None))
}

async fn push_all(State(logic): State<Arc<Logic>>, push: PushInput) -> ApiResult {
    let op = push.params.required_i32("operation")?;
    let speed = push.params.number::<i32>("speed")?.unwrap_or(0);
    logic
        .push_all(op, speed, push.msg, push.id.as_deref())
        .await?;
    Ok(ApiResponse::ok(None))
}

async fn online_top(State(logic): State<Arc<Logic>>, uri: Uri) -> ApiResult {
    let params = Params::from_uri(&uri);
    let room_type = params.required_str("type")?;
    let limit = match params.number::<i64>("limit")? {
        Some(limit) if limit > 0 => usize::try_from(limit).unwrap_or(usize::MAX),
        _ => {
            return Err(ApiResponse::bad_request(
                "limit is required and must be > 0",
            ));
        }
    };
    data(logic.online_top(&room_type, limit).await?)
}

async fn online_room(State(logic): State<Arc<Logic>>, uri: Uri) -> ApiResult {
    let params = Params::from_uri(&uri);
    let room_type = params.required_str("type")?;
    let rooms = params.all("rooms");
    if rooms.is_empty() {
        return Err(ApiResponse::bad_request("rooms is required"));
    }
    data(logic.online_room(&room_type, &rooms).await?)
}

async fn online_total(State(logic): State<Arc<Logic>>) -> ApiResult {
    let (ip_count, conn_count) = logic.online_total().await?;
    data(serde_json::json!({ "ip_count": ip_count, "conn_count": conn_count }))
}

/// `NodesReply` as goim's JSON: zero-valued fields left out.
#[derive(Serialize)]
struct NodesJson {
    #[serde(skip_serializing_if = "String::is_empty")]
    domain: String,
    #[serde(skip_serializing_if = "is_zero")]
    tcp_port: i32,
    #[serde(skip_serializing_if = "is_zero")]
    ws_port: i32,
    #[serde(skip_serializing_if = "is_zero")]
    wss_port: i32,
    #[serde(skip_serializing_if = "is_zero")]
    heartbeat: i32,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    nodes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backoff: Option<BackoffJson>,
    #[serde(skip_serializing_if = "is_zero")]
    heartbeat_max: i32,
}

#[derive(Serialize)]
struct BackoffJson {
    #[serde(skip_serializing_if = "is_zero")]
    max_delay: i32,
    #[serde(skip_serializing_if = "is_zero")]
    base_delay: i32,
    #[serde(skip_serializing_if = "is_zero_f32")]
    factor: f32,
    #[serde(skip_serializing_if = "is_zero_f32")]
    jitter: f32,
}

fn is_zero(v: &i32) -> bool {
    *v == 0
}

fn is_zero_f32(v: &f32) -> bool {
    *v == 0.0
}

/// The client address as gin's `ClientIP()` finds it: X-Forwarded-For,
/// then X-Real-Ip, then the peer address.
fn client_ip(headers: &HeaderMap, peer: Option<SocketAddr>) -> Option<IpAddr> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.trim().parse::<IpAddr>().ok())
    };
    header("x-forwarded-for")
        .or_else(|| header("x-real-ip"))
        .or_else(|| peer.map(|p| p.ip()))
}

async fn nodes_weighted(
    State(logic): State<Arc<Logic>>,
    uri: Uri,
    headers: HeaderMap,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
) -> ApiResult {
    let params = Params::from_uri(&uri);
    let platform = params.first("platform").unwrap_or("").to_string();
    let ip = client_ip(&headers, peer.map(|p| (p.0).0));
    let reply = logic.nodes_weighted(&platform, ip).await?;
    data(NodesJson {
        domain: reply.domain,
        tcp_port: reply.tcp_port,
        ws_port: reply.ws_port,
        wss_port: reply.wss_port,
        heartbeat: reply.heartbeat,
        nodes: reply.nodes,
        backoff: reply.backoff.map(|b| BackoffJson {
            max_delay: b.max_delay,
            base_delay: b.base_delay,
            factor: b.factor,
            jitter: b.jitter,
        }),
        heartbeat_max: reply.heartbeat_max,
    })
}

async fn nodes_instances(State(logic): State<Arc<Logic>>) -> ApiResult {
    data(logic.nodes_instances().await?)
}

async fn not_found(uri: Uri, method: axum::http::Method) -> ApiResponse {
    ApiResponse::error(
        StatusCode::NOT_FOUND,
        -404,
        format!("no route for {method} {}", uri.path()),
    )
}

async fn method_not_allowed(uri: Uri, method: axum::http::Method) -> ApiResponse {
    ApiResponse::error(
        StatusCode::METHOD_NOT_ALLOWED,
        -405,
        format!("method {method} not allowed for {}", uri.path()),
    )
}

/// Public routes: what clients call to find a comet.
const PUBLIC_PREFIX: &str = "/goim/nodes/";

/// Lets a request through if it carries one of `logic.api.tokens` (or the
/// route is public, or no token is configured).
async fn require_token(State(logic): State<Arc<Logic>>, request: Request, next: Next) -> Response {
    let tokens = logic.api_tokens();
    if !tokens.required() || request.uri().path().starts_with(PUBLIC_PREFIX) {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            let (scheme, token) = value.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    let message = match presented {
        Some(token) if tokens.accepts(token) => return next.run(request).await,
        Some(_) => "invalid bearer token",
        None => "missing bearer token: send Authorization: Bearer <one of logic.api.tokens>",
    };
    let mut response =
        ApiResponse::error(StatusCode::UNAUTHORIZED, CODE_UNAUTHORIZED, message).into_response();
    response.headers_mut().insert(
        axum::http::header::WWW_AUTHENTICATE,
        axum::http::HeaderValue::from_static("Bearer"),
    );
    response
}

/// Counts every request by route, HTTP status and goim code, and times it.
async fn track(State(logic): State<Arc<Logic>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    let code = response
        .extensions()
        .get::<ApiCode>()
        .map(|c| c.0)
        .unwrap_or(CODE_OK);
    let metrics = logic.metrics();
    metrics
        .http_requests
        .with_label_values(&[
            route.as_str(),
            response.status().as_str(),
            code.to_string().as_str(),
        ])
        .inc();
    metrics
        .http_duration
        .with_label_values(&[route.as_str()])
        .observe(started.elapsed().as_secs_f64());
    response
}

/// The API as an axum router.
pub fn router(logic: Arc<Logic>) -> Router {
    let max_body = logic.config().http.max_body;
    Router::new()
        .route("/goim/push/keys", post(push_keys))
        .route("/goim/push/mids", post(push_mids))
        .route("/goim/push/room", post(push_room))
        .route("/goim/push/all", post(push_all))
        .route("/goim/online/top", get(online_top))
        .route("/goim/online/room", get(online_room))
        .route("/goim/online/total", get(online_total))
        .route("/goim/nodes/weighted", get(nodes_weighted))
        .route("/goim/nodes/instances", get(nodes_instances))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(logic.clone(), require_token))
        .layer(middleware::from_fn_with_state(logic.clone(), track))
        .with_state(logic)
}

/// Serves the API until `shutdown` is cancelled, then finishes in-flight
/// requests.
pub async fn serve(
    listener: TcpListener,
    logic: Arc<Logic>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = router(logic).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::LogicMetrics;
    use http_body_util::BodyExt;
    use pushcluster_api::config::LogicConfig;
    use pushcluster_backplane::bus::MemoryBus;
    use pushcluster_backplane::registry::MemoryRegistry;
    use std::time::Duration;
    use tower::ServiceExt;

    fn app(max_body: usize) -> Router {
        let mut config = LogicConfig::default();
        config.http.max_body = max_body;
        let logic = Logic::new(
            config,
            Arc::new(MemoryRegistry::new(
                Duration::from_secs(60),
                Duration::from_secs(60),
            )),
            Arc::new(MemoryBus::default()),
            LogicMetrics::new(&prometheus::Registry::new()).expect("metrics"),
        )
        .expect("open auth");
        router(Arc::new(logic))
    }

    async fn call(app: Router, method: &str, uri: &str, body: &'static str) -> (u16, Value) {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .body(axum::body::Body::from(body))
            .expect("request");
        let response = app.oneshot(request).await.expect("infallible");
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (status, serde_json::from_slice(&bytes).expect("json body"))
    }

    #[tokio::test]
    async fn missing_and_invalid_parameters_are_code_minus_400() {
        for (uri, needle) in [
            ("/goim/push/room?type=live&room=1", "operation is required"),
            (
                "/goim/push/room?operation=0&type=live&room=1",
                "operation is required",
            ),
            (
                "/goim/push/room?operation=x&type=live&room=1",
                "operation: invalid value",
            ),
            ("/goim/push/room?operation=1&room=1", "type is required"),
            (
                "/goim/push/all?operation=1&speed=fast",
                "speed: invalid value",
            ),
            (
                "/goim/push/mids?operation=1&mids=abc",
                "mids: invalid value",
            ),
            ("/goim/push/mids?operation=1", "mids is required"),
            ("/goim/push/keys?operation=1", "keys is required"),
        ] {
            let (status, body) = call(app(1024), "POST", uri, "m").await;
            assert_eq!(status, 200, "{uri}");
            assert_eq!(body["code"], -400, "{uri}");
            let message = body["message"].as_str().unwrap_or_default();
            assert!(message.contains(needle), "{uri}: {message}");
        }
        let (_, body) = call(app(1024), "GET", "/goim/online/top?type=live", "").await;
        assert_eq!(body["code"], -400);
    }

    #[tokio::test]
    async fn success_has_empty_message_and_no_data() {
        let (status, body) = call(
            app(1024),
            "POST",
            "/goim/push/room?operation=1000&type=live&room=1",
            "hello",
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(body, serde_json::json!({"code": 0, "message": ""}));
    }

    #[tokio::test]
    async fn unknown_routes_wrong_methods_and_big_bodies() {
        let (status, body) = call(app(1024), "GET", "/goim/nope", "").await;
        assert_eq!((status, body["code"].as_i64()), (404, Some(-404)));
        let (status, _) = call(app(1024), "GET", "/goim/push/room", "").await;
        assert_eq!(status, 405);
        let (status, body) = call(
            app(4),
            "POST",
            "/goim/push/room?operation=1&type=live&room=1",
            "too long",
        )
        .await;
        assert_eq!((status, body["code"].as_i64()), (413, Some(-400)));
    }

    #[tokio::test]
    async fn nodes_weighted_defaults_to_the_default_domain() {
        let (status, body) = call(app(1024), "GET", "/goim/nodes/weighted", "").await;
        assert_eq!(status, 200);
        assert_eq!(
            body["data"],
            serde_json::json!({
                "domain": "conn.goim.io",
                "tcp_port": 3101,
                "ws_port": 3102,
                "wss_port": 3103,
                "heartbeat": 240,
                "nodes": ["conn.goim.io"],
                "backoff": {"max_delay": 300, "base_delay": 3, "factor": 1.8f32, "jitter": 1.3f32},
                "heartbeat_max": 2
            })
        );
    }

    #[test]
    fn client_ip_prefers_forwarded_headers() {
        let mut headers = HeaderMap::new();
        let peer: SocketAddr = "10.0.0.1:5".parse().expect("addr");
        assert_eq!(client_ip(&headers, Some(peer)), Some(peer.ip()));
        headers.insert("x-real-ip", "10.0.0.2".parse().expect("value"));
        assert_eq!(client_ip(&headers, Some(peer)), "10.0.0.2".parse().ok());
        headers.insert(
            "x-forwarded-for",
            "1.2.3.4, 10.0.0.3".parse().expect("value"),
        );
        assert_eq!(client_ip(&headers, Some(peer)), "1.2.3.4".parse().ok());
    }
}
