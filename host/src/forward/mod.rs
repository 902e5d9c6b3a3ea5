//! The forwarding core — the one path every request takes, regular and PD alike:
//!
//! 1. [`Forwarder::pick`]: the policy slot chooses among eligible workers (shadows
//!    decide too, for comparison); a policy fault, decline or quarantine is answered by
//!    the fallback (least in-flight);
//! 2. [`Forwarder::drive`], the retry driver: breaker admission → in-flight → send →
//!    classify; a retryable outcome goes to another worker after a backoff **if the
//!    retry budget allows** ([`retry`]);
//! 3. [`Forwarder::settle`] ([`attempt`]): the single place an attempt's outcome reaches
//!    the breaker, metrics, policy feedback and the in-flight count;
//! 4. [`body`]: the response streams to the client unbuffered; the request is settled
//!    when the worker's body ends.
//!
//! PD ([`crate::pd`]) is a plan over the same driver: prefill = `drive` with a rewritten
//! body and the PD request id; decode = one attempt.

pub mod attempt;
pub mod body;
pub mod retry;
pub mod upstream;

use crate::error::ApiError;
use crate::metrics::{Metrics, route_label};
use crate::policy::{self, Choice, PolicySlot, PolicySlots, Stage};
use crate::request::RequestInfo;
use crate::workers::{Registry, Worker};
pub use attempt::{Attempt, AttemptError, Outcome};
use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header::HeaderName};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
pub use retry::{RetryBudget, RetryConfig, is_retryable};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vllm_router_runtime::feedback::FeedbackQueue;
use vllm_router_sdk::Role;

/// The upstream HTTP client (HTTP/1.1, pooled, TCP_NODELAY; TLS to `https://` workers,
/// see [`crate::tls`]).
pub type UpstreamClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

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
        .build(crate::tls::worker_connector(http))
}

/// Admission permits a request holds until its response body ends (or the request
/// fails): the global one (`--max-concurrent-requests`) and the client key's
/// (`max_concurrent` in `--client-api-keys-file`). `Default`: none (info routes, or no
/// limits configured).
#[derive(Debug, Default)]
pub struct Admitted {
    /// The global in-flight permit.
    pub global: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The client key's in-flight permit.
    pub key: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Shared state of the request path.
pub struct Forwarder {
    /// Worker registry.
    pub registry: Arc<Registry>,
    /// The policy slots (A/B arms, shadows, PD's prefill/decode).
    pub slots: Arc<PolicySlots>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Upstream client.
    pub client: UpstreamClient,
    /// Retry settings.
    pub retry: RetryConfig,
    /// Retry budget (`--retry-budget-*`).
    pub budget: RetryBudget,
    /// Whole-exchange timeout (streamed body included).
    pub request_timeout: Duration,
    /// Where `on-complete` goes (a bounded queue drained off the response path).
    pub feedback: Arc<FeedbackQueue>,
    /// Role of the workers non-PD requests go to (decode workers in PD mode).
    pub default_role: Role,
    /// `--record-trace`: decided request stages for `policy replay`.
    pub trace: Option<Arc<crate::trace::TraceRecorder>>,
    /// KV events: the index and request-side tokenization for policies that read the
    /// prefix cache.
    pub kv: Option<Arc<crate::kv::KvEvents>>,
}

/// Who decides a request stage, among which workers.
pub struct Target<'a> {
    /// Workers of this role are candidates.
    pub role: Role,
    /// The stage reported to the policy.
    pub stage: Stage,
    /// The deciding slot; `None` = least in-flight without asking a policy (info routes
    /// such as `/v1/models`, which should not disturb policies).
    pub slot: Option<&'a Arc<PolicySlot>>,
    /// Whether shadow slots decide too (first attempt of a regular request).
    pub shadows: bool,
}

/// A request stage that got a response worth returning (2xx, 4xx, or the last
/// retryable answer): the response head and the attempt, not yet settled.
pub struct Sent {
    /// The worker's response.
    pub resp: Response<upstream::UpstreamBody>,
    /// The attempt it came from (settle it when the body is done).
    pub attempt: Attempt,
    /// The request id the worker saw.
    pub request_id: String,
}

/// Echo the request id to the client.
pub fn set_request_id(headers: &mut HeaderMap, id: &str) {
    if let Ok(v) = HeaderValue::from_str(id) {
        headers.insert(HeaderName::from_static("x-request-id"), v);
    }
}

impl Forwarder {
    /// For a policy that reads the KV prefix cache: have the prompt tokenized (by the
    /// least-loaded eligible worker of `role`) and cut into blocks before `select`.
    /// Nothing for other policies.
    pub async fn prepare_prefix(&self, req: &Arc<RequestInfo>, slot: &Arc<PolicySlot>, role: Role) {
        let Some(kv) = &self.kv else { return };
        if !slot.current().reads_prefix_cache() {
            return;
        }
        kv.want();
        if !kv.needs_prompt(req) {
            return;
        }
        let set = self.registry.snapshot();
        let cands = policy::candidates(&set, role, &[], 0);
        if cands.is_empty() {
            return;
        }
        if let Some(w) = set.get(policy::fallback_choice(&cands)) {
            kv.prepare(req, w).await;
        }
    }

    /// Choose a worker for one attempt of `req` (`exclude`: workers already tried).
    pub fn pick(
        &self,
        req: &Arc<RequestInfo>,
        target: &Target<'_>,
        exclude: &[u32],
    ) -> Option<Choice> {
        let set = self.registry.snapshot();
        let cands = policy::candidates(
            &set,
            target.role,
            exclude,
            self.registry.engine_max_age_ms(),
        );
        let Some(slot) = target.slot else {
            if cands.is_empty() {
                return None;
            }
            let id = policy::fallback_choice(&cands);
            return Some(Choice {
                worker: set.get(id)?.clone(),
                slot: None,
                version: None,
                fallback: true,
                stage: target.stage,
            });
        };
        let choice = policy::choose(
            slot,
            req,
            target.stage,
            &set,
            &cands,
            &self.metrics,
            &self.feedback,
        )?;
        // A KV policy's prompt: count its blocks as held by the chosen worker until the
        // engine's own events arrive (requests sharing the prefix meanwhile see it).
        if let Some(p) = req.kv.get() {
            p.index
                .speculate(choice.worker.id, &p.keys, std::time::Instant::now());
        }
        if let (Some(t), true) = (&self.trace, exclude.is_empty()) {
            let stage = match target.stage {
                Stage::Regular => "regular",
                Stage::Prefill => "prefill",
                Stage::Decode => "decode",
            };
            t.record(
                req,
                stage,
                choice.slot.as_ref().map(|s| s.name.as_str()),
                &choice.worker.url,
                choice.fallback,
            );
        }
        if target.shadows && exclude.is_empty() {
            let shadows = self.slots.shadows();
            if !shadows.is_empty() {
                policy::run_shadows(
                    &shadows,
                    req,
                    target.stage,
                    &set,
                    &cands,
                    choice.worker.id,
                    &self.metrics,
                );
            }
        }
        Some(choice)
    }

    /// The retry driver: attempts `body` on workers chosen for `target` until one gives
    /// a response worth returning, the attempts (`--retry-max-retries`) or the retry
    /// budget run out, or a timeout ends it. `request_id(worker)` names the id the
    /// worker sees (`None`: the request's own).
    ///
    /// - A half-open breaker with its probe slots taken skips the worker without
    ///   spending an attempt.
    /// - Retryable: statuses of [`is_retryable`] and transport errors other than a
    ///   timeout (a timed-out request may still be running on the worker).
    /// - The backoff ([`RetryConfig::backoff`]) is slept before every retry, after the
    ///   next worker was chosen and admitted.
    ///
    /// Errors are router answers (OpenAI-style JSON): `503 no_healthy_workers`,
    /// `502 upstream_unreachable`, `504 upstream_timeout`.
    pub async fn drive(
        &self,
        req: &Arc<RequestInfo>,
        target: &Target<'_>,
        body: &Bytes,
        request_id: &(dyn Fn(&Worker) -> Option<String> + Sync),
    ) -> Result<Sent, ApiError> {
        let route = route_label(&req.path);
        let mut tried: Vec<u32> = Vec::new();
        let mut last_err: Option<ApiError> = None;
        let mut number = 0u32;
        self.budget.deposit();
        while number < self.retry.attempts {
            let Some(choice) = self.pick(req, target, &tried) else {
                break;
            };
            let worker = choice.worker.clone();
            tried.push(worker.id);
            let Some(ticket) = worker.breaker_admit() else {
                continue;
            };
            if number > 0 {
                self.metrics.retries.with_label_values(&[route]).inc();
                tokio::time::sleep(self.retry.backoff(number - 1)).await;
            }
            number += 1;
            let rid = request_id(&worker).unwrap_or_else(|| req.request_id.clone());
            let attempt = Attempt {
                choice,
                guard: worker.start_request(),
                ticket,
                sent: Instant::now(),
                number,
            };
            // May this request be retried once more? Only with attempts left, another
            // eligible worker (else the worker's own answer is better than ours), and
            // room in the retry budget (asked last: asking spends it).
            let may_retry = || {
                if number >= self.retry.attempts
                    || !policy::has_candidate(&self.registry.snapshot(), target.role, &tried)
                {
                    return false;
                }
                let ok = self.budget.try_withdraw();
                if !ok {
                    self.metrics
                        .retries_refused
                        .with_label_values(&[route])
                        .inc();
                    tracing::debug!(request_id = %req.request_id, "retry refused by the retry budget");
                }
                ok
            };
            match self.send(req, &worker, body.clone(), &rid).await {
                Ok(resp) => {
                    let status = resp.status();
                    if is_retryable(status) && may_retry() {
                        tracing::debug!(worker = %worker.name(), %status, request_id = %req.request_id, "retryable status; trying another worker");
                        self.settle(attempt, Outcome::Answered(status), None, false);
                        last_err = Some(ApiError::no_workers(format!(
                            "all {} attempts failed with retryable statuses (last {status} from {})",
                            number, worker.url
                        )));
                        continue;
                    }
                    return Ok(Sent {
                        resp,
                        attempt,
                        request_id: rid,
                    });
                }
                Err(err) => {
                    if let AttemptError::Connect(why) = &err {
                        // Nothing listens: the same evidence a failed probe gives. Health
                        // owns up/down and its probes bring the worker back.
                        if worker.mark_down() {
                            tracing::warn!(worker = %worker.name(), "worker marked unhealthy: connection failed ({why}); health checks bring it back");
                        }
                    }
                    let timeout = matches!(err, AttemptError::Timeout);
                    let retry = !timeout && may_retry();
                    self.settle(attempt, Outcome::Transport(err.kind()), None, !retry);
                    tracing::debug!(worker = %worker.name(), request_id = %req.request_id, "attempt failed: {err}");
                    if timeout {
                        return Err(ApiError::new(
                            StatusCode::GATEWAY_TIMEOUT,
                            "timeout",
                            "upstream_timeout",
                            format!(
                                "worker {} did not answer within {}s",
                                worker.url,
                                self.request_timeout.as_secs()
                            ),
                        ));
                    }
                    let e = ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        "upstream_error",
                        "upstream_unreachable",
                        format!("worker {} failed: {err}", worker.url),
                    );
                    last_err = Some(e);
                    if !retry {
                        break;
                    }
                }
            }
        }
        Err(match last_err {
            Some(e) if !policy::has_candidate(&self.registry.snapshot(), target.role, &[]) => {
                ApiError::no_workers(format!(
                    "no healthy workers available (last error: {})",
                    e.message
                ))
            }
            Some(e) => e,
            None => ApiError::no_workers(match target.role {
                Role::Prefill => "no healthy prefill workers available",
                Role::Decode if self.default_role != Role::Decode => {
                    "no healthy decode workers available"
                }
                _ => "no healthy workers available",
            }),
        })
    }

    /// Route a regular request and return the response for the client. Never fails:
    /// router errors become OpenAI-style JSON errors.
    ///
    /// `policy`: whether the policy slots decide (`false`: least in-flight, for info
    /// routes). `admission`: the concurrency permit (`--max-concurrent-requests`),
    /// held until the response body ends.
    pub async fn forward(
        self: &Arc<Self>,
        req: Arc<RequestInfo>,
        policy: bool,
        admission: Admitted,
    ) -> Response<Body> {
        let started = Instant::now();
        // One arm per request: retries stay on the same A/B arm.
        let arm = policy.then(|| self.slots.pick(&req));
        let target = Target {
            role: self.default_role,
            stage: Stage::Regular,
            slot: arm.as_ref(),
            shadows: true,
        };
        if let Some(slot) = arm.as_ref() {
            self.prepare_prefix(&req, slot, target.role).await;
        }
        match self.drive(&req, &target, &req.body, &|_| None).await {
            Ok(sent) => {
                let slot = arm.as_ref().map(|s| s.name.as_str()).unwrap_or("none");
                self.metrics.worker_request(sent.attempt.worker(), slot);
                body::respond(self.clone(), &req, sent, admission, started, None)
            }
            Err(err) => self.error_response(
                &req,
                arm.as_ref().map(|s| s.name.as_str()),
                err,
                started,
                &req.request_id,
            ),
        }
    }

    /// Count a router-side error response and build it (with the request id).
    pub fn error_response(
        &self,
        req: &RequestInfo,
        slot: Option<&str>,
        err: ApiError,
        started: Instant,
        request_id: &str,
    ) -> Response<Body> {
        self.finish_error(
            route_label(&req.path),
            slot.unwrap_or("none"),
            &err,
            started,
        );
        let mut resp = axum::response::IntoResponse::into_response(err);
        set_request_id(resp.headers_mut(), request_id);
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
}
