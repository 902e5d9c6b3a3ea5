//! The forwarding core: choose a worker, send the body unchanged, retry elsewhere on a
//! retryable failure, and stream the response back while counting the request in flight
//! until its last byte.

use crate::error::ApiError;
use crate::metrics::{Metrics, route_label};
use crate::policy::{self, Choice, Completion, PolicySlot, PolicySlots, Stage};
use crate::request::RequestInfo;
use crate::workers::{BreakerTicket, InFlight, Registry, Worker};
use axum::body::Body;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use vllm_router_sdk::Role;

/// The upstream HTTP client (HTTP/1.1, pooled, TCP_NODELAY).
pub type UpstreamClient = Client<HttpConnector, Full<Bytes>>;

/// Build the upstream client: TCP_NODELAY (streamed chunks otherwise stall ~40 ms on
/// Nagle + delayed ACK), 10 s connect timeout, 50 s idle pool timeout.
pub fn upstream_client() -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    http.set_keepalive(Some(Duration::from_secs(30)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(50))
        .pool_max_idle_per_host(512)
        .build(http)
}

/// Retry settings (`--retry-*`).
#[derive(Debug, Clone)]
pub struct RetryConfig {
    /// Total attempts, first included (≥ 1).
    pub attempts: u32,
    /// First backoff, ms.
    pub initial_backoff_ms: u64,
    /// Backoff cap, ms.
    pub max_backoff_ms: u64,
    /// Growth factor.
    pub multiplier: f64,
    /// Jitter fraction in [0, 1].
    pub jitter: f64,
}

impl RetryConfig {
    /// Backoff before retry number `k` (0-based): `min(initial × multiplier^k, max)`
    /// ± jitter, in ms.
    pub fn backoff(&self, k: u32) -> Duration {
        let base = (self.initial_backoff_ms as f64 * self.multiplier.powi(k as i32))
            .min(self.max_backoff_ms as f64);
        let j = if self.jitter > 0.0 {
            rand::random_range(-self.jitter..=self.jitter)
        } else {
            0.0
        };
        Duration::from_millis((base * (1.0 + j)).max(0.0) as u64)
    }
}

/// Statuses worth another worker: the request may succeed elsewhere.
pub fn is_retryable(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 429 | 500 | 502 | 503 | 504)
}

/// Shared state of the request path.
pub struct Proxy {
    /// Worker registry.
    pub registry: Arc<Registry>,
    /// The policy slots (A/B arms, shadows) deciding regular requests.
    pub slots: Arc<PolicySlots>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Upstream client.
    pub client: UpstreamClient,
    /// Retry settings.
    pub retry: RetryConfig,
    /// Whole-exchange timeout (streamed body included).
    pub request_timeout: Duration,
    /// Consecutive 5xx that mark a worker unhealthy.
    pub failure_threshold: u32,
    /// Prefill/decode mode: its slots and discovery data.
    pub pd: Option<Arc<crate::pd::Pd>>,
    /// Role of the workers non-PD requests go to (decode workers in PD mode).
    pub default_role: Role,
}

const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::HOST,
    header::CONTENT_LENGTH,
];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// Why an attempt produced no usable response.
pub enum AttemptError {
    /// The connection failed (nothing reached the worker).
    Connect(String),
    /// No answer within `--request-timeout-secs`.
    Timeout,
    /// Anything else on the transport.
    Other(String),
}

impl AttemptError {
    /// True for connection failures.
    pub fn is_connect(&self) -> bool {
        matches!(self, AttemptError::Connect(_))
    }
}

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttemptError::Connect(m) => write!(f, "connection failed: {m}"),
            AttemptError::Timeout => write!(f, "no answer within the request timeout"),
            AttemptError::Other(m) => write!(f, "{m}"),
        }
    }
}

/// How the worker was chosen for this request.
pub enum Selector {
    /// By the policy slot (generation routes).
    Policy,
    /// Least in-flight (info routes like `/v1/models`, which should not disturb policies).
    LeastLoaded,
}

impl Proxy {
    fn pick(
        &self,
        arm: Option<&Arc<PolicySlot>>,
        req: &Arc<RequestInfo>,
        exclude: &[u32],
    ) -> Option<Choice> {
        let set = self.registry.snapshot();
        let cands = policy::candidates(&set, self.default_role, exclude);
        match arm {
            Some(slot) => {
                let choice =
                    policy::choose(slot, req, Stage::Regular, &set, &cands, &self.metrics)?;
                if exclude.is_empty() {
                    let shadows = self.slots.shadows();
                    if !shadows.is_empty() {
                        policy::run_shadows(
                            &shadows,
                            req,
                            Stage::Regular,
                            &set,
                            &cands,
                            choice.worker.id,
                            &self.metrics,
                        );
                    }
                }
                Some(choice)
            }
            None => {
                if cands.is_empty() {
                    return None;
                }
                let id = policy::fallback_choice(&cands);
                let slots = self.slots.all();
                Some(Choice {
                    worker: set.get(id)?.clone(),
                    slot: None,
                    version: slots[0].current(),
                    fallback: true,
                })
            }
        }
    }

    async fn send(
        &self,
        req: &RequestInfo,
        worker: &Worker,
    ) -> Result<Response<Incoming>, AttemptError> {
        self.send_with(req, worker, req.body.clone(), &req.request_id)
            .await
    }

    /// Send `body` with `req`'s method, path and client headers (minus hop-by-hop) to
    /// `worker`, with `x-request-id: request_id` and the worker's DP rank header.
    pub async fn send_with(
        &self,
        req: &RequestInfo,
        worker: &Worker,
        body: Bytes,
        request_id: &str,
    ) -> Result<Response<Incoming>, AttemptError> {
        let uri = http::Uri::builder()
            .scheme("http")
            .authority(worker.authority.clone())
            .path_and_query(req.path_and_query.as_str())
            .build()
            .map_err(|e| AttemptError::Other(format!("bad upstream URI: {e}")))?;
        let mut headers = HeaderMap::with_capacity(req.headers.len() + 2);
        for (k, v) in req.headers.iter() {
            if !is_hop_by_hop(k) {
                headers.append(k.clone(), v.clone());
            }
        }
        if let Ok(v) = HeaderValue::from_str(request_id) {
            headers.insert(HeaderName::from_static("x-request-id"), v);
        }
        if let Some(rank) = worker.dp_rank {
            headers.insert(
                HeaderName::from_static("x-data-parallel-rank"),
                HeaderValue::from(rank),
            );
        }
        let mut up = http::Request::new(Full::new(body));
        *up.method_mut() = req.method.clone();
        *up.uri_mut() = uri;
        *up.headers_mut() = headers;
        match tokio::time::timeout(self.request_timeout, self.client.request(up)).await {
            Err(_) => Err(AttemptError::Timeout),
            Ok(Err(e)) if e.is_connect() => Err(AttemptError::Connect(format!("{e:#}"))),
            Ok(Err(e)) => {
                // A pooled connection closed by the worker before our request got through
                // also shows here; treat as a connection failure (nothing was processed).
                let msg = format!("{e:?}");
                Err(AttemptError::Other(msg))
            }
            Ok(Ok(resp)) => Ok(resp),
        }
    }

    /// Route `req` and return the response to send to the client. Never fails: router
    /// errors become OpenAI-style JSON errors.
    ///
    /// `admission`: the concurrency permit (`--max-concurrent-requests`), held until the
    /// response body ends.
    pub async fn forward(
        self: &Arc<Self>,
        req: Arc<RequestInfo>,
        sel: Selector,
        admission: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Response<Body> {
        let route = route_label(&req.path);
        let started = Instant::now();
        // One arm per request: retries stay on the same A/B arm.
        let arm = match sel {
            Selector::Policy => Some(self.slots.pick(&req)),
            Selector::LeastLoaded => None,
        };
        let arm_label = arm.as_ref().map(|s| s.name.as_str()).unwrap_or("none");
        let mut tried: Vec<u32> = Vec::new();
        let mut last_err: Option<ApiError> = None;
        let mut attempt = 0u32;
        let mut backoff_due = false;
        while attempt < self.retry.attempts {
            if backoff_due {
                backoff_due = false;
                self.metrics.retries.with_label_values(&[route]).inc();
                tokio::time::sleep(self.retry.backoff(attempt - 1)).await;
            }
            let Some(choice) = self.pick(arm.as_ref(), &req, &tried) else {
                break;
            };
            let worker = choice.worker.clone();
            tried.push(worker.id);
            // A half-open breaker admits a bounded number of probes; when they are taken
            // the worker is skipped without spending an attempt.
            let Some(ticket) = worker.breaker_admit() else {
                continue;
            };
            attempt += 1;
            backoff_due = true;
            let guard = worker.start_request();
            let sent = Instant::now();
            match self.send(&req, &worker).await {
                Ok(resp) => {
                    let status = resp.status();
                    let more_left = attempt < self.retry.attempts;
                    let ticket = if status.is_server_error() {
                        ticket.record(false);
                        None
                    } else {
                        Some(ticket)
                    };
                    if status.is_server_error() {
                        self.metrics
                            .upstream_errors
                            .with_label_values(&[&worker.url, "status_5xx"])
                            .inc();
                        if worker.record_failure(false, self.failure_threshold) {
                            tracing::warn!(worker = %worker.name(), "worker marked unhealthy after repeated 5xx");
                        }
                    } else {
                        worker.record_success(1);
                    }
                    if is_retryable(status) && more_left {
                        tracing::debug!(worker = %worker.name(), %status, request_id = %req.request_id, "retryable status; trying another worker");
                        self.feedback(&choice, status.as_u16(), sent, None);
                        last_err = None;
                        continue;
                    }
                    self.metrics
                        .worker_requests
                        .with_label_values(&[&worker.url, arm_label])
                        .inc();
                    return self.respond(
                        req, resp, choice, guard, ticket, admission, started, sent, false,
                    );
                }
                Err(err) => {
                    drop(guard);
                    ticket.record(false);
                    self.feedback(&choice, 0, sent, None);
                    let (kind, msg) = match &err {
                        AttemptError::Connect(m) => ("connect", m.clone()),
                        AttemptError::Timeout => (
                            "timeout",
                            format!("no response within {}s", self.request_timeout.as_secs()),
                        ),
                        AttemptError::Other(m) => ("transport", m.clone()),
                    };
                    self.metrics
                        .upstream_errors
                        .with_label_values(&[&worker.url, kind])
                        .inc();
                    let hard = matches!(err, AttemptError::Connect(_));
                    if worker.record_failure(hard, self.failure_threshold) {
                        tracing::warn!(worker = %worker.name(), "worker marked unhealthy: {kind} error: {msg}");
                    }
                    if matches!(err, AttemptError::Timeout) {
                        last_err = Some(ApiError::new(
                            StatusCode::GATEWAY_TIMEOUT,
                            "timeout",
                            "upstream_timeout",
                            format!(
                                "worker {} did not answer within {}s",
                                worker.url,
                                self.request_timeout.as_secs()
                            ),
                        ));
                        break;
                    }
                    last_err = Some(ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        "upstream_error",
                        "upstream_unreachable",
                        format!("worker {} failed: {msg}", worker.url),
                    ));
                }
            }
        }
        let err = match last_err {
            Some(e)
                if !tried.is_empty()
                    && policy::candidates(&self.registry.snapshot(), self.default_role, &[])
                        .is_empty() =>
            {
                ApiError::no_workers(format!(
                    "no healthy workers available (last error: {})",
                    e.message
                ))
            }
            Some(e) => e,
            None if tried.is_empty() => ApiError::no_workers("no healthy workers available"),
            None => ApiError::no_workers(format!(
                "all {} attempts failed with retryable statuses",
                tried.len()
            )),
        };
        self.finish_error(route, arm_label, &err, started);
        let mut resp = axum::response::IntoResponse::into_response(err);
        set_request_id(resp.headers_mut(), &req.request_id);
        resp
    }

    /// Count a router-side error response (`slot`: the A/B arm, or `none`).
    pub fn finish_error(&self, route: &'static str, slot: &str, err: &ApiError, started: Instant) {
        self.metrics
            .request_errors
            .with_label_values(&[route, err.code])
            .inc();
        self.metrics
            .requests
            .with_label_values(&[route, err.status.as_str(), slot])
            .inc();
        self.metrics
            .request_seconds
            .with_label_values(&[route, slot])
            .observe(started.elapsed().as_secs_f64());
    }

    fn feedback(&self, choice: &Choice, status: u16, sent: Instant, first_byte: Option<Duration>) {
        if choice.fallback {
            return;
        }
        let done = Completion {
            worker: choice.worker.id,
            status,
            latency_ms: sent.elapsed().as_millis().min(u32::MAX as u128) as u32,
            first_byte_ms: first_byte.map(|d| d.as_millis().min(u32::MAX as u128) as u32),
            stage: Stage::Regular,
        };
        let _ = choice.version.complete(&self.registry.snapshot(), done);
    }

    /// Turn a worker response into the client response, with in-flight, breaker and
    /// admission released when its body ends. `pd`: a decode response (records the
    /// prefill-start-to-first-byte histogram).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn respond(
        self: &Arc<Self>,
        req: Arc<RequestInfo>,
        resp: Response<Incoming>,
        choice: Choice,
        guard: InFlight,
        ticket: Option<BreakerTicket>,
        admission: Option<tokio::sync::OwnedSemaphorePermit>,
        started: Instant,
        sent: Instant,
        pd: bool,
    ) -> Response<Body> {
        let (parts, body) = resp.into_parts();
        let sse = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let mut out = Response::builder().status(parts.status);
        let headers = out.headers_mut().expect("fresh builder");
        for (k, v) in parts.headers.iter() {
            if !is_hop_by_hop(k) || *k == header::CONTENT_LENGTH {
                headers.append(k.clone(), v.clone());
            }
        }
        set_request_id(headers, &req.request_id);
        let tracked = TrackedBody {
            inner: body,
            done: Some(Done {
                proxy: self.clone(),
                route: route_label(&req.path),
                status: parts.status,
                choice,
                _guard: guard,
                ticket,
                _admission: admission,
                stream_failed: false,
                pd,
                started,
                sent,
                first_byte: None,
                sse,
            }),
            deadline: Box::pin(tokio::time::sleep_until(
                (started + self.request_timeout).into(),
            )),
        };
        out.body(Body::new(tracked)).expect("valid response")
    }
}

/// Echo the request id to the client.
pub fn set_request_id(headers: &mut HeaderMap, id: &str) {
    if let Ok(v) = HeaderValue::from_str(id) {
        headers.insert(HeaderName::from_static("x-request-id"), v);
    }
}

/// Bookkeeping finished when the response body ends (or the client goes away).
struct Done {
    proxy: Arc<Proxy>,
    route: &'static str,
    status: StatusCode,
    choice: Choice,
    _guard: InFlight,
    /// Breaker admission; the outcome is recorded when the body ends.
    ticket: Option<BreakerTicket>,
    /// `--max-concurrent-requests` permit, released when the body ends.
    _admission: Option<tokio::sync::OwnedSemaphorePermit>,
    stream_failed: bool,
    pd: bool,
    started: Instant,
    sent: Instant,
    first_byte: Option<Duration>,
    sse: bool,
}

impl Done {
    fn finish(mut self) {
        if let Some(t) = self.ticket.take() {
            t.record(!self.stream_failed);
        }
        let m = &self.proxy.metrics;
        let slot = self
            .choice
            .slot
            .as_ref()
            .map(|s| s.name.as_str())
            .unwrap_or("none");
        m.requests
            .with_label_values(&[self.route, self.status.as_str(), slot])
            .inc();
        m.request_seconds
            .with_label_values(&[self.route, slot])
            .observe(self.started.elapsed().as_secs_f64());
        if let (true, Some(fb)) = (self.sse, self.first_byte) {
            m.ttfb_seconds
                .with_label_values(&[self.route, slot])
                .observe(fb.as_secs_f64());
        }
        if let (true, Some(fb)) = (self.pd, self.first_byte) {
            m.pd_ttft_seconds
                .observe((self.sent - self.started + fb).as_secs_f64());
            m.pd_stage_seconds
                .with_label_values(&["decode"])
                .observe(self.sent.elapsed().as_secs_f64());
        }
        self.proxy.feedback(
            &self.choice,
            self.status.as_u16(),
            self.sent,
            self.first_byte,
        );
        // `_guard` drops here: the worker's in-flight count falls at the end of the stream.
    }
}

/// The client-facing body: passes the worker's frames through as they arrive (no
/// buffering), records time to first byte, enforces the whole-exchange deadline, and
/// finishes the request's accounting when the stream ends or the client disconnects.
struct TrackedBody {
    inner: Incoming,
    done: Option<Done>,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl TrackedBody {
    fn fail(&mut self, why: &str) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let sse = self.done.as_ref().is_some_and(|d| d.sse);
        if let Some(d) = &self.done {
            d.proxy
                .metrics
                .upstream_errors
                .with_label_values(&[&d.choice.worker.url, "stream"])
                .inc();
            tracing::warn!(worker = %d.choice.worker.name(), "response stream failed: {why}");
        }
        if let Some(mut d) = self.done.take() {
            d.stream_failed = true;
            d.finish();
        }
        if sse {
            // An SSE client gets a final error event rather than a bare truncation.
            let ev = serde_json::json!({"error": {"message": format!("upstream stream failed: {why}"), "type": "upstream_error", "code": "stream_interrupted"}});
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(format!(
                "data: {ev}\n\n"
            ))))));
        }
        Poll::Ready(Some(Err(axum::Error::new(std::io::Error::other(
            why.to_string(),
        )))))
    }
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.done.is_none() {
            return Poll::Ready(None);
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            return self.fail("request timeout reached while streaming");
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                if let Some(d) = self.done.take() {
                    d.finish();
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = self.done.as_mut() {
                    if d.first_byte.is_none() {
                        d.first_byte = Some(d.sent.elapsed());
                    }
                }
                // The worker's body is complete (e.g. its Content-Length reached): account
                // for the request now, before the client can see the last byte and send
                // its next request (which would otherwise still see this one in flight).
                if self.inner.is_end_stream() {
                    if let Some(d) = self.done.take() {
                        d.finish();
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => self.fail(&e.to_string()),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done.is_none() || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        // The client went away before the end: still release in-flight and record it.
        if let Some(d) = self.done.take() {
            d.finish();
        }
    }
}
