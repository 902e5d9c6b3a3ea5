//! HTTP front end: OpenAI-compatible routes, health/readiness, and the catch-all proxy.

use crate::error::ApiError;
use crate::forward::{Forwarder, set_request_id};
use crate::metrics::route_label;
use crate::pd::Pd;
use crate::request::{BodyError, RequestInfo};
use axum::Router;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderMap, Method, StatusCode, header};
use std::sync::Arc;
use std::time::Instant;

/// Largest total size of a request's header names and values, in bytes (vLLM and most
/// proxies refuse far less; hyper itself stops at ~400 KiB with a bare 431).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Everything the handlers share.
pub struct AppState {
    /// The forwarding core.
    pub fwd: Arc<Forwarder>,
    /// Prefill/decode mode (`--vllm-pd-disaggregation`): its slots and discovery data.
    pub pd: Option<Arc<Pd>>,
    /// `--request-id-headers`, lower-cased.
    pub request_id_headers: Vec<http::HeaderName>,
    /// `--max-payload-size`, bytes.
    pub max_payload: usize,
    /// `--max-concurrent-requests` with its queue.
    pub admission: Admission,
    /// Client for scraping workers' `/metrics` (fleet metrics on `GET /metrics`).
    pub probe: crate::health::ProbeClient,
    /// With Kubernetes discovery: true once its first list was reconciled
    /// (`/readiness` is 503 before).
    pub discovery_synced: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// `--cors-allowed-origins` (empty: no CORS headers; `*`: any origin).
    pub cors_allowed_origins: Vec<String>,
    /// `--client-api-keys-file`: client authentication and per-key limits.
    pub client_keys: Option<Arc<crate::clients::ClientKeys>>,
    /// `--rate-limit-tokens-per-second`: the global request rate.
    pub rate_limit: Option<crate::clients::TokenBucket>,
}

/// Admission control: at most `limit` generation requests in flight (held until the
/// response body ends), up to `queue_size` more waiting up to `queue_timeout`; beyond
/// that, 429 with `Retry-After`.
pub struct Admission {
    permits: Arc<tokio::sync::Semaphore>,
    waiting: std::sync::atomic::AtomicUsize,
    /// Bound of the wait queue (0 = reject at once).
    pub queue_size: usize,
    /// Longest wait in the queue.
    pub queue_timeout: std::time::Duration,
    /// The in-flight limit.
    pub limit: usize,
}

impl Admission {
    /// `limit` concurrent requests, a queue of `queue_size` waiting up to `queue_timeout`.
    pub fn new(limit: usize, queue_size: usize, queue_timeout: std::time::Duration) -> Self {
        Admission {
            permits: Arc::new(tokio::sync::Semaphore::new(limit)),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            queue_size,
            queue_timeout,
            limit,
        }
    }

    /// Requests waiting in the queue now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Requests holding a permit now.
    pub fn in_flight(&self) -> usize {
        self.limit - self.permits.available_permits()
    }

    async fn admit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, (&'static str, String)> {
        use std::sync::atomic::Ordering;
        if let Ok(p) = self.permits.clone().try_acquire_owned() {
            return Ok(p);
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.queue_size {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err((
                "queue_full",
                format!(
                    "router at --max-concurrent-requests ({}) with {} requests queued (--queue-size); retry later",
                    self.limit, self.queue_size
                ),
            ));
        }
        let r =
            tokio::time::timeout(self.queue_timeout, self.permits.clone().acquire_owned()).await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        match r {
            Ok(Ok(p)) => Ok(p),
            _ => Err((
                "queue_timeout",
                format!(
                    "waited {}s in the admission queue (--queue-timeout-secs) without a free slot; retry later",
                    self.queue_timeout.as_secs()
                ),
            )),
        }
    }
}

/// Build the client-facing router.
pub fn app(state: Arc<AppState>) -> Router {
    let cors = cors_layer(&state.cors_allowed_origins);
    let mut protected = Router::new()
        .route("/v1/models", get(models))
        .route("/list_workers", get(list_workers))
        .route("/metrics", get(fleet_metrics))
        .fallback(proxy_any);
    if state.client_keys.is_some() {
        protected = protected.layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authenticate,
        ));
    }
    let router = Router::new()
        .route("/health", get(health))
        .route("/liveness", get(liveness))
        .route("/readiness", get(readiness))
        .merge(protected)
        .with_state(state);
    match cors {
        Some(c) => router.layer(c),
        None => router,
    }
}

/// CORS for browser clients (tower-http's `CorsLayer`: preflight answered by the
/// router, headers added to every response), from `--cors-allowed-origins`; `*` allows
/// any origin. `None` when no origin is configured (no CORS headers at all). Origins
/// that are not valid header values are skipped (validated at startup).
fn cors_layer(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, Any, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| o.parse().ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods(Any)
            .allow_headers(Any)
            .expose_headers([http::HeaderName::from_static("x-request-id")]),
    )
}

/// With `--client-api-keys-file`: 401 without a known `Authorization: Bearer KEY`;
/// otherwise the key goes into the request's extensions (for its limits) and the
/// client's `Authorization` is removed, so the router's key never reaches a worker
/// (which gets `--api-key`, if set, instead). CORS preflights pass (the CORS layer
/// answers them before this).
async fn authenticate(
    State(st): State<Arc<AppState>>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let (mut parts, body) = req.into_parts();
    match check_client_key(&st, &mut parts) {
        Ok(()) => next.run(Request::from_parts(parts, body)).await,
        Err(refusal) => refusal,
    }
}

/// The client-key check of [`authenticate`], also run by [`ClientService`]'s direct
/// path: `Err` is the 401 to send.
fn check_client_key(st: &AppState, parts: &mut http::request::Parts) -> Result<(), Response> {
    let Some(keys) = &st.client_keys else {
        return Ok(());
    };
    match keys.authenticate(&parts.headers) {
        Ok(key) => {
            parts.headers.remove(header::AUTHORIZATION);
            parts.extensions.insert(key);
            Ok(())
        }
        Err(e) => {
            let (reason, msg) = match e {
                crate::clients::AuthError::Missing => (
                    "missing",
                    "missing API key: send `Authorization: Bearer KEY`",
                ),
                crate::clients::AuthError::Invalid => ("invalid", "invalid API key"),
            };
            st.fwd
                .metrics
                .client_auth_failures
                .with_label_values(&[reason])
                .inc();
            let mut r = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "invalid_api_key",
                msg,
            )
            .into_response();
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
            Err(r)
        }
    }
}

/// 429 with `Retry-After` (seconds, rounded up), recorded like every router error.
fn too_many(
    st: &AppState,
    route: &'static str,
    started: Instant,
    code: &'static str,
    msg: String,
    retry_after: u64,
    rid: &str,
) -> Response {
    let e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", code, msg);
    st.fwd.finish_error(route, "none", &e, started);
    let mut r = e.into_response();
    set_request_id(r.headers_mut(), rid);
    r.headers_mut()
        .insert(header::RETRY_AFTER, http::HeaderValue::from(retry_after));
    r
}

async fn liveness() -> impl IntoResponse {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        r#"{"status":"alive"}"#,
    )
}

fn counts(st: &AppState) -> (usize, usize, Vec<String>) {
    let set = st.fwd.registry.snapshot();
    let total = set.workers.len();
    let unhealthy: Vec<String> = set
        .workers
        .iter()
        .filter(|w| !w.is_healthy())
        .map(|w| w.name().to_string())
        .collect();
    (total - unhealthy.len(), total, unhealthy)
}

/// `/health`: 200 while at least one worker is healthy (status `healthy`, or `degraded`
/// with the unhealthy list), 503 when none is. vllm-project/router answers 503 as soon as
/// one worker of many is down, which takes a whole fleet out of its load balancer.
async fn health(State(st): State<Arc<AppState>>) -> Response {
    let (healthy, total, unhealthy) = counts(&st);
    let (code, status) = match healthy {
        0 => (StatusCode::SERVICE_UNAVAILABLE, "unhealthy"),
        h if h == total => (StatusCode::OK, "healthy"),
        _ => (StatusCode::OK, "degraded"),
    };
    let body = serde_json::json!({"status": status, "healthy_workers": healthy, "total_workers": total, "unhealthy_workers": unhealthy});
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// `/readiness`: 200 `{"status":"ready","healthy_workers":n,"total_workers":m}` when at
/// least one worker is healthy, else 503 `not_ready` with a reason.
async fn readiness(State(st): State<Arc<AppState>>) -> Response {
    let (healthy, total, _) = counts(&st);
    let unsynced = st
        .discovery_synced
        .as_ref()
        .is_some_and(|s| !s.load(std::sync::atomic::Ordering::Relaxed));
    let (code, body) = if unsynced {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "not_ready", "reason": "Kubernetes discovery has not synced yet", "healthy_workers": healthy, "total_workers": total}),
        )
    } else if healthy > 0 {
        (
            StatusCode::OK,
            serde_json::json!({"status": "ready", "healthy_workers": healthy, "total_workers": total}),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "not_ready", "reason": "no healthy workers available", "healthy_workers": 0, "total_workers": total}),
        )
    };
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// `/list_workers`: `{"urls": [...]}` (vllm-project/router compatible).
async fn list_workers(State(st): State<Arc<AppState>>) -> Response {
    let set = st.fwd.registry.snapshot();
    let urls: Vec<String> = set.workers.iter().map(|w| w.name().to_string()).collect();
    axum::Json(serde_json::json!({"urls": urls})).into_response()
}

/// `/v1/models`: forwarded to the least-loaded healthy worker (not the first registered
/// one, which may be down).
async fn models(State(st): State<Arc<AppState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    handle(st, parts, body, false).await
}

async fn proxy_any(State(st): State<Arc<AppState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    handle(st, parts, body, true).await
}

/// The service the client listener runs for every request. The generation routes
/// (`POST /v1/…` other than `/v1/models`) go straight to [`handle`]; everything else
/// (health and info routes, the admin API, 404 and 405 answers) through axum's router.
/// With `--cors-allowed-origins` every request takes the router (its CORS layer).
///
/// Why: on the hot route axum's router decides nothing (its fallback is the same
/// `handle`) but costs a path match, a boxed request body, a boxed handler future and
/// the extractors, per request. Measured in issue 16's pinned bench: see
/// docs/performance.md.
#[derive(Clone)]
pub struct ClientService {
    router: hyper_util::service::TowerToHyperService<Router>,
    direct: Option<Arc<AppState>>,
}

impl ClientService {
    /// `router`: the full application (client routes, admin API); `st`: its state.
    pub fn new(router: Router, st: Arc<AppState>) -> Self {
        ClientService {
            router: hyper_util::service::TowerToHyperService::new(router),
            direct: st.cors_allowed_origins.is_empty().then_some(st),
        }
    }

    /// Answer one request (never fails: router errors are OpenAI-style JSON).
    pub fn call(
        &self,
        req: http::Request<hyper::body::Incoming>,
    ) -> impl std::future::Future<Output = Response> + Send + use<> {
        use futures_util::future::{Either, FutureExt};
        let direct = self
            .direct
            .as_ref()
            .filter(|_| {
                req.method() == Method::POST
                    && req.uri().path().starts_with("/v1/")
                    && req.uri().path() != "/v1/models"
            })
            .cloned();
        match direct {
            // Boxed: hyper moves the service's future into its connection state, and
            // this one holds the whole request path's state machine (kilobytes); one
            // allocation costs less than those copies (tests/bench/instructions.sh).
            Some(st) => Either::Left(Box::pin(async move {
                let (mut parts, body) = req.into_parts();
                if let Err(refusal) = check_client_key(&st, &mut parts) {
                    return refusal;
                }
                handle(st, parts, body, true).await
            })),
            None => Either::Right(
                hyper::service::Service::call(&self.router, req)
                    .map(|r| r.unwrap_or_else(|never| match never {})),
            ),
        }
    }
}

fn request_id(st: &AppState, headers: &HeaderMap, path: &str) -> (String, bool) {
    for name in &st.request_id_headers {
        if let Some(v) = headers.get(name).and_then(|v| v.to_str().ok()) {
            if !v.is_empty() {
                return (v.to_string(), true);
            }
        }
    }
    let prefix = match path {
        "/v1/chat/completions" => "chatcmpl-",
        "/v1/completions" => "cmpl-",
        "/v1/embeddings" => "embd-",
        "/v1/responses" => "resp-",
        _ => "req-",
    };
    let mut hex = [0u8; uuid::fmt::Simple::LENGTH];
    let hex = uuid::Uuid::new_v4().simple().encode_lower(&mut hex);
    let mut id = String::with_capacity(prefix.len() + hex.len());
    id.push_str(prefix);
    id.push_str(hex);
    (id, false)
}

fn is_json_content_type(headers: &HeaderMap) -> bool {
    match headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        None => true,
        Some(ct) => {
            // Compared without case and without a lowercased copy (hot path).
            let mime = ct.split(';').next().unwrap_or("").trim().as_bytes();
            mime.is_empty()
                || mime.eq_ignore_ascii_case(b"application/json")
                || (mime.len() >= 5 && mime[mime.len() - 5..].eq_ignore_ascii_case(b"+json"))
        }
    }
}

/// Validate a request, admit it, and hand it to the PD flow or the forwarding core.
/// `policy`: whether the policy slots decide (`false`: least in-flight, info routes).
async fn handle<B>(
    st: Arc<AppState>,
    parts: http::request::Parts,
    body: B,
    policy: bool,
) -> Response
where
    B: http_body::Body<Data = bytes::Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let started = Instant::now();
    let path = parts.uri.path().to_string();
    let route = route_label(&path);
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| path.clone());
    let (rid, from_client) = request_id(&st, &parts.headers, &path);
    let header_bytes: usize = parts
        .headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    let fail = |e: ApiError| {
        st.fwd.finish_error(route, "none", &e, started);
        let mut r = e.into_response();
        set_request_id(r.headers_mut(), &rid);
        r
    };

    // The client key's limits (rate first, then in flight), before reading the body.
    let mut admitted = crate::forward::Admitted::default();
    if let Some(key) = parts.extensions.get::<Arc<crate::clients::ClientKey>>() {
        let outcome = match key.admit() {
            Ok(p) => {
                admitted.key = p;
                Ok(())
            }
            Err(crate::clients::Refusal::RateLimited(wait)) => Err((
                "rate_limited",
                format!(
                    "API key {:?} is over its requests_per_second; retry later",
                    key.name
                ),
                crate::clients::retry_after_secs(wait),
            )),
            Err(crate::clients::Refusal::ConcurrencyLimited) => Err((
                "concurrency_limited",
                format!(
                    "API key {:?} has max_concurrent requests in flight; retry when one ends",
                    key.name
                ),
                1,
            )),
        };
        let m = &st.fwd.metrics.client_key_requests;
        match outcome {
            Ok(()) => m.with_label_values(&[&key.name, "admitted"]).inc(),
            Err((code, msg, after)) => {
                m.with_label_values(&[&key.name, code]).inc();
                tracing::debug!(key = %key.name, code, "client key over its limits");
                return too_many(&st, route, started, code, msg, after, &rid);
            }
        }
    }
    if header_bytes > MAX_HEADER_BYTES {
        return fail(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "invalid_request_error",
            "headers_too_large",
            format!("request headers total {header_bytes} bytes; the limit is {MAX_HEADER_BYTES}"),
        ));
    }
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "payload_too_large",
            format!(
                "request body exceeds --max-payload-size ({} bytes)",
                st.max_payload
            ),
        )
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > st.max_payload) {
        return fail(too_large());
    }
    let read = http_body_util::BodyExt::collect(http_body_util::Limited::new(body, st.max_payload));
    let bytes = match read.await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let over = e.is::<http_body_util::LengthLimitError>();
            return fail(if over {
                too_large()
            } else {
                ApiError::bad_request(
                    "body_read_failed",
                    format!("could not read request body: {e}"),
                )
            });
        }
    };

    let generation = parts.method == Method::POST && policy;
    let mut info = if generation {
        if !is_json_content_type(&parts.headers) {
            return fail(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                "unsupported_media_type",
                "Content-Type must be application/json",
            ));
        }
        if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            return fail(ApiError::bad_request(
                "empty_body",
                "request body is empty; expected a JSON object",
            ));
        }
        match RequestInfo::from_json(
            parts.method.clone(),
            path_and_query,
            path,
            parts.headers,
            bytes,
        ) {
            Ok(i) => i,
            Err(BodyError::NotObject) => {
                return fail(ApiError::bad_request(
                    "invalid_json",
                    "request body must be a JSON object",
                ));
            }
            Err(BodyError::Malformed(m)) => {
                return fail(ApiError::bad_request(
                    "invalid_json",
                    format!("request body is not valid JSON: {m}"),
                ));
            }
        }
    } else {
        RequestInfo::raw(
            parts.method.clone(),
            path_and_query,
            path,
            parts.headers,
            bytes,
        )
    };
    info.request_id = rid;
    info.request_id_from_client = from_client;
    if generation {
        let global = match &st.rate_limit {
            Some(bucket) => bucket.try_take().map_err(|wait| {
                (
                    "rate_limited",
                    "router over --rate-limit-tokens-per-second; retry later".to_string(),
                    crate::clients::retry_after_secs(wait),
                )
            }),
            None => Ok(()),
        };
        let global = match global {
            Ok(()) => st.admission.admit().await.map_err(|(c, m)| (c, m, 1)),
            Err(e) => Err(e),
        };
        match global {
            Ok(p) => admitted.global = Some(p),
            Err((code, msg, after)) => {
                st.fwd
                    .metrics
                    .admission_rejections
                    .with_label_values(&[code])
                    .inc();
                return too_many(&st, route, started, code, msg, after, &info.request_id);
            }
        }
    }
    if let (Some(pd), true) = (&st.pd, generation && crate::pd::is_generation(&info.path)) {
        return crate::pd::serve(&st.fwd, pd, Arc::new(info), admitted).await;
    }
    st.fwd.forward(Arc::new(info), policy, admitted).await
}

/// `GET /metrics`: the fleet's vLLM metrics, summed over the workers (see
/// [`crate::fleet`]). The router's own metrics are on `--prometheus-port`.
async fn fleet_metrics(State(st): State<Arc<AppState>>) -> Response {
    let set = st.fwd.registry.snapshot();
    let mut urls: Vec<&str> = set.workers.iter().map(|w| w.url.as_str()).collect();
    urls.sort_unstable();
    urls.dedup();
    let scrape = |url: &str| {
        let client = st.probe.clone();
        let uri = format!("{url}/metrics");
        async move {
            let uri: http::Uri = uri.parse().ok()?;
            let r = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                crate::health::get(&client, uri),
            )
            .await
            .ok()?
            .ok()?;
            if !r.status().is_success() {
                return None;
            }
            let body = http_body_util::BodyExt::collect(r.into_body()).await.ok()?;
            String::from_utf8(body.to_bytes().to_vec()).ok()
        }
    };
    let texts = futures_util::future::join_all(urls.iter().map(|u| scrape(u))).await;
    let missing: Vec<&str> = urls
        .iter()
        .zip(&texts)
        .filter(|(_, t)| t.is_none())
        .map(|(u, _)| *u)
        .collect();
    let ok: Vec<&str> = texts.iter().flatten().map(String::as_str).collect();
    let mut body = format!(
        "# vllm-router: fleet metrics summed over {} of {} workers{}\n",
        ok.len(),
        urls.len(),
        if missing.is_empty() {
            String::new()
        } else {
            format!(" (no answer: {})", missing.join(", "))
        }
    );
    body.push_str(&crate::fleet::merge(&ok));
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn json_content_types_are_recognised_without_case() {
        let ct = |v: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(v) = v {
                h.insert(header::CONTENT_TYPE, v.parse().unwrap());
            }
            is_json_content_type(&h)
        };
        assert!(
            ct(None),
            "no Content-Type: JSON assumed (curl -d sends none)"
        );
        assert!(ct(Some("application/json")));
        assert!(ct(Some("Application/JSON; charset=utf-8")));
        assert!(ct(Some("application/vnd.api+JSON")));
        assert!(
            ct(Some(" ; charset=utf-8")),
            "an empty media type is not refused"
        );
        assert!(!ct(Some("text/plain")));
        assert!(!ct(Some("application/x-www-form-urlencoded")));
        assert!(!ct(Some("json")));
    }

    #[tokio::test(start_paused = true)]
    async fn admission_admits_queues_rejects_and_times_out() {
        let a = Arc::new(Admission::new(1, 1, Duration::from_secs(5)));
        let first = a.admit().await.expect("a free slot");
        assert_eq!(a.in_flight(), 1);
        // The second waits in the queue...
        let a2 = a.clone();
        let queued = tokio::spawn(async move { a2.admit().await.map(|_| ()) });
        tokio::task::yield_now().await;
        assert_eq!(a.waiting(), 1);
        // ...the third finds the queue full.
        assert_eq!(a.admit().await.unwrap_err().0, "queue_full");
        // The first ends: the queued one gets its slot.
        drop(first);
        assert!(queued.await.unwrap().is_ok());
        // Held slot, empty queue: a waiter times out after queue_timeout (paused time).
        let held = a.admit().await.unwrap();
        let a3 = a.clone();
        let late = tokio::spawn(async move { a3.admit().await.map(|_| ()) });
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(late.await.unwrap().unwrap_err().0, "queue_timeout");
        assert_eq!(a.waiting(), 0);
        drop(held);
    }
}
