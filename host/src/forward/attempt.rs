//! One attempt: send the body to a worker, and record how it ended **in one place**
//! ([`Forwarder::settle`]): the breaker, the upstream-error metric, policy feedback and
//! the in-flight count all consume the same [`Outcome`].

use super::Forwarder;
use super::upstream::{self, SendError, UpstreamBody};
use crate::policy::{Choice, Completion, Stage};
use crate::request::RequestInfo;
use crate::workers::{BreakerTicket, InFlight, Worker};
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Response, StatusCode};
use http_body_util::Full;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why an attempt produced no usable response.
#[derive(Debug)]
pub enum AttemptError {
    /// The TCP connection failed (refused, unreachable, connect timeout): nothing
    /// listens there, which is health evidence (the worker is marked down at once, as a
    /// failed probe would; probes bring it back).
    Connect(String),
    /// A pooled keep-alive connection the worker had closed before our request got
    /// through: nothing was processed, but the worker may be fine.
    Closed(String),
    /// No answer within `--request-timeout-secs`.
    Timeout,
    /// Anything else on the transport (the request may have been processed).
    Other(String),
}

impl AttemptError {
    /// Metric label value (`upstream_errors_total{kind}`).
    pub fn kind(&self) -> &'static str {
        match self {
            AttemptError::Connect(_) => "connect",
            AttemptError::Closed(_) => "connection_closed",
            AttemptError::Timeout => "timeout",
            AttemptError::Other(_) => "transport",
        }
    }
}

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttemptError::Connect(m) => write!(f, "connection failed: {m}"),
            AttemptError::Closed(m) => {
                write!(f, "connection closed before the request got through: {m}")
            }
            AttemptError::Timeout => write!(f, "no answer within the request timeout"),
            AttemptError::Other(m) => write!(f, "{m}"),
        }
    }
}

/// How an attempt ended, classified once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The worker answered with this status and (for a final attempt) its body ended.
    Answered(StatusCode),
    /// No response: connect error, timeout, broken transport (metric kind).
    Transport(&'static str),
    /// The response started with this status but its body broke or timed out.
    StreamFailed(StatusCode),
    /// The client went away before the body ended: says nothing about the worker.
    Abandoned(StatusCode),
}

impl Outcome {
    /// What the breaker should learn: `Some(true)` success, `Some(false)` failure,
    /// `None` nothing. A 4xx (429 included) is an answer from a live worker, not a
    /// failure; a 5xx, a transport error or a broken stream is.
    pub fn breaker_ok(self) -> Option<bool> {
        match self {
            Outcome::Answered(s) => Some(!s.is_server_error()),
            Outcome::Transport(_) | Outcome::StreamFailed(_) => Some(false),
            Outcome::Abandoned(_) => None,
        }
    }

    /// The status reported to the policy (0 when no response arrived).
    pub fn status(self) -> u16 {
        match self {
            Outcome::Answered(s) | Outcome::StreamFailed(s) | Outcome::Abandoned(s) => s.as_u16(),
            Outcome::Transport(_) => 0,
        }
    }

    /// The upstream-error metric kind, if this outcome is one.
    pub fn error_kind(self) -> Option<&'static str> {
        match self {
            Outcome::Answered(s) if s.is_server_error() => Some("status_5xx"),
            Outcome::Answered(_) | Outcome::Abandoned(_) => None,
            Outcome::Transport(k) => Some(k),
            Outcome::StreamFailed(_) => Some("stream"),
        }
    }
}

/// An attempt in progress: the worker chosen, its in-flight guard and breaker ticket.
/// Consumed by [`Forwarder::settle`].
pub struct Attempt {
    /// How the worker was chosen.
    pub choice: Choice,
    pub(crate) guard: InFlight,
    pub(crate) ticket: BreakerTicket,
    /// When the request was sent.
    pub sent: Instant,
    /// Attempts made for this request stage so far, this one included (1-based).
    pub number: u32,
}

impl Attempt {
    /// The worker.
    pub fn worker(&self) -> &Arc<Worker> {
        self.guard.worker()
    }
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

/// Headers a proxy must not forward (RFC 9110 §7.6.1), plus `Host` and
/// `Content-Length`, which the client library sets for the new hop.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// Remove the fields of [`is_hop_by_hop`] from `headers` in place, except
/// `Content-Length` when `keep_length` (a response passed through keeps its length).
/// One scan when there are none, the usual case.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_length: bool) {
    let strip = |k: &HeaderName| is_hop_by_hop(k) && !(keep_length && *k == header::CONTENT_LENGTH);
    if !headers.keys().any(strip) {
        return;
    }
    let names: Vec<HeaderName> = headers.keys().filter(|k| strip(k)).cloned().collect();
    for name in names {
        headers.remove(&name);
    }
}

impl Forwarder {
    /// Send `body` with `req`'s method, path and client headers (minus hop-by-hop) to
    /// `worker`, with `x-request-id: request_id` and the worker's DP rank header. The
    /// body is sent as given: the client's bytes are never re-serialised.
    pub async fn send(
        &self,
        req: &RequestInfo,
        worker: &Arc<Worker>,
        body: Bytes,
        request_id: &str,
    ) -> Result<Response<UpstreamBody>, AttemptError> {
        let plain = worker.scheme == http::uri::Scheme::HTTP;
        let uri = if plain {
            // Origin form on a connection of our own (see `upstream`); `Host` below.
            http::Uri::try_from(req.path_and_query.as_str()).map_err(|e| e.to_string())
        } else {
            http::Uri::builder()
                .scheme(worker.scheme.clone())
                .authority(worker.authority.clone())
                .path_and_query(req.path_and_query.as_str())
                .build()
                .map_err(|e| e.to_string())
        }
        .map_err(|e| AttemptError::Other(format!("bad upstream URI: {e}")))?;
        let mut headers = HeaderMap::with_capacity(req.headers.len() + 3);
        for (k, v) in req.headers.iter() {
            if !is_hop_by_hop(k) {
                headers.append(k.clone(), v.clone());
            }
        }
        if plain {
            headers.insert(header::HOST, worker.host_header.clone());
        }
        if let Ok(v) = HeaderValue::from_str(request_id) {
            headers.insert(HeaderName::from_static("x-request-id"), v);
        }
        // `--api-key`: the workers' key, for clients that bring none of their own.
        if let Some(auth) = crate::health::worker_auth() {
            if !headers.contains_key(header::AUTHORIZATION) {
                headers.insert(header::AUTHORIZATION, auth.clone());
            }
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
        // A pooled connection the worker closed before our request got through ends
        // as a send error (hyper's "connection closed before message completed" /
        // IncompleteMessage): nothing was processed, so it is a connection failure for
        // retry and breaker purposes.
        let classify = |msg: String| {
            if msg.contains("IncompleteMessage") || msg.contains("ChannelClosed") {
                AttemptError::Closed(msg)
            } else {
                AttemptError::Other(msg)
            }
        };
        if plain {
            return match tokio::time::timeout(self.request_timeout, upstream::send(worker, up))
                .await
            {
                Err(_) => Err(AttemptError::Timeout),
                Ok(Err((SendError::Connect(m), _))) => Err(AttemptError::Connect(m)),
                // On a kept-alive connection, an end before any response is the worker
                // having closed it first; on a fresh one it is the worker failing.
                Ok(Err((SendError::Closed, true))) => Err(AttemptError::Closed(
                    "connection ended before a response".into(),
                )),
                Ok(Err((SendError::Closed, false))) => Err(AttemptError::Other(
                    "the worker closed a new connection without a response".into(),
                )),
                Ok(Err((SendError::Http(e), true))) => Err(classify(format!("{e:?}"))),
                Ok(Err((SendError::Http(e), false))) => Err(AttemptError::Other(format!("{e:?}"))),
                Ok(Ok(resp)) => Ok(resp),
            };
        }
        match tokio::time::timeout(self.request_timeout, self.client.request(up)).await {
            Err(_) => Err(AttemptError::Timeout),
            Ok(Err(e)) if e.is_connect() => Err(AttemptError::Connect(format!("{e:#}"))),
            Ok(Err(e)) => Err(classify(format!("{e:?}"))),
            Ok(Ok(resp)) => Ok(resp.map(UpstreamBody::pooled)),
        }
    }

    /// Record how `attempt` ended — the one place that does it:
    /// - the breaker learns success or failure ([`Outcome::breaker_ok`]);
    /// - `vllm_router_upstream_errors_total{worker, kind}` counts a failure, and
    ///   `vllm_router_pd_stage_requests_total{stage, status}` every PD attempt;
    /// - when `final_attempt`, the deciding policy gets `on-complete` (once per request
    ///   stage, through the feedback queue, never on this thread); attempts retried
    ///   elsewhere are not reported (see `wit/policy.wit`);
    /// - the worker's in-flight count falls (the guard drops).
    pub fn settle(
        &self,
        attempt: Attempt,
        outcome: Outcome,
        first_byte: Option<Duration>,
        final_attempt: bool,
    ) {
        let Attempt {
            choice,
            guard,
            ticket,
            sent,
            ..
        } = attempt;
        match outcome.breaker_ok() {
            Some(ok) => ticket.record(ok),
            None => drop(ticket),
        }
        if let Some(kind) = outcome.error_kind() {
            self.metrics.upstream_error(guard.worker(), kind);
        }
        let stage = match choice.stage {
            Stage::Prefill => Some("prefill"),
            Stage::Decode => Some("decode"),
            Stage::Regular => None,
        };
        if let Some(stage) = stage {
            let status = match outcome.status() {
                0 => StatusCode::BAD_GATEWAY,
                s => StatusCode::from_u16(s).unwrap_or(StatusCode::BAD_GATEWAY),
            };
            self.metrics
                .pd_stage_requests
                .with_label_values(&[stage, status.as_str()])
                .inc();
        }
        if final_attempt && !choice.fallback {
            // A 0.2 policy without a `feedback` export gets no completions (no queueing).
            if let Some(version) = choice.version.as_ref().filter(|v| v.wants_feedback()) {
                let ms = |d: Duration| d.as_millis().min(u32::MAX as u128) as u32;
                let done = Completion {
                    worker: choice.worker.id,
                    status: outcome.status(),
                    latency_ms: ms(sent.elapsed()),
                    first_byte_ms: first_byte.map(ms),
                    stage: choice.stage,
                };
                if !self.feedback.send(version.clone(), done) {
                    self.metrics.feedback_dropped.inc();
                }
            }
        }
        drop(guard);
    }
}
