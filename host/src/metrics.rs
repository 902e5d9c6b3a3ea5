//! Prometheus metrics (prefix `vllm_router_`), served on `--prometheus-host:--prometheus-port`.
//! Labels are bounded: route (a fixed set, see [`route_label`]), status, worker URL, policy
//! slot and version; never request ids.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets in seconds, from 0.5 ms to 4 min (LLM requests are long).
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0,
    30.0, 60.0, 120.0, 240.0,
];
/// Policy decision buckets in seconds, from 1 µs to 10 ms.
const DECISION_BUCKETS: &[f64] = &[
    0.000001, 0.0000025, 0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.001, 0.01,
];

/// All router metrics.
pub struct Metrics {
    /// The registry the exposition is rendered from.
    pub registry: Registry,
    /// Requests by route and final status code.
    pub requests: IntCounterVec,
    /// End-to-end request duration (to the end of the response body), by route.
    pub request_seconds: HistogramVec,
    /// Time to first response byte of streamed responses, by route.
    pub ttfb_seconds: HistogramVec,
    /// Router-side errors by route and kind (`no_workers`, `bad_request`, `upstream_unreachable`, ...).
    pub request_errors: IntCounterVec,
    /// Retries (attempts after the first), by route.
    pub retries: IntCounterVec,
    /// Upstream failures by worker and kind (`connect`, `timeout`, `status_5xx`, ...).
    pub upstream_errors: IntCounterVec,
    /// Requests in flight per worker.
    pub worker_in_flight: IntGaugeVec,
    /// 1 when the worker is healthy, else 0.
    pub worker_health: IntGaugeVec,
    /// Requests routed per worker and policy slot.
    pub worker_requests: IntCounterVec,
    /// Duration of a policy's `select`, by slot and version.
    pub policy_decision_seconds: HistogramVec,
    /// Policy faults by slot, version and kind.
    pub policy_failures: IntCounterVec,
    /// Requests routed by the fallback because the policy failed, by slot.
    pub policy_fallbacks: IntCounterVec,
    /// Policy load attempts by slot and result (loaded, unchanged, error).
    pub policy_reloads: IntCounterVec,
    /// The version serving in each slot (value 1; old versions' series are removed).
    pub policy_info: IntGaugeVec,
    /// A/B weight per slot.
    pub slot_weight: IntGaugeVec,
    /// Shadow decisions by shadow slot and whether they matched the serving arm.
    pub shadow_decisions: IntCounterVec,
    /// Requests refused by admission control, by reason (queue_full, queue_timeout).
    pub admission_rejections: IntCounterVec,
    /// Generation requests holding an admission permit / waiting in the queue.
    pub admission: IntGaugeVec,
    /// Circuit breaker state per worker: 0 closed, 1 open, 2 half-open.
    pub cb_state: IntGaugeVec,
    /// Circuit breaker transitions per worker.
    pub cb_transitions: IntCounterVec,
    /// Policy versions quarantined after repeated faults, by slot.
    pub policy_quarantines: IntCounterVec,
    /// PD stage requests by stage (prefill, decode) and status.
    pub pd_stage_requests: IntCounterVec,
    /// PD stage duration by stage (prefill: whole call; decode: to the end of the body).
    pub pd_stage_seconds: HistogramVec,
    /// PD: prefill start to the first decode byte (the TTFT the router adds up).
    pub pd_ttft_seconds: prometheus::Histogram,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

impl Metrics {
    /// Create and register every metric.
    pub fn new() -> Self {
        let r = Registry::new();
        Metrics {
            requests: counter(
                &r,
                "vllm_router_requests_total",
                "Requests by route, final HTTP status and policy slot (A/B arm; `none` when the request failed before routing).",
                &["route", "status", "slot"],
            ),
            request_seconds: histogram(
                &r,
                "vllm_router_request_duration_seconds",
                "End-to-end request duration to the end of the response body, by route and policy slot.",
                &["route", "slot"],
                DURATION_BUCKETS,
            ),
            ttfb_seconds: histogram(
                &r,
                "vllm_router_time_to_first_byte_seconds",
                "Time to the first response byte of streamed responses, by route and policy slot.",
                &["route", "slot"],
                DURATION_BUCKETS,
            ),
            request_errors: counter(
                &r,
                "vllm_router_request_errors_total",
                "Router-side request errors by route and kind.",
                &["route", "error_type"],
            ),
            retries: counter(
                &r,
                "vllm_router_retries_total",
                "Attempts after the first, by route.",
                &["route"],
            ),
            upstream_errors: counter(
                &r,
                "vllm_router_upstream_errors_total",
                "Upstream failures by worker and kind.",
                &["worker", "kind"],
            ),
            worker_in_flight: gauge(
                &r,
                "vllm_router_worker_in_flight",
                "Requests in flight per worker (until the end of the response stream).",
                &["worker"],
            ),
            worker_health: gauge(
                &r,
                "vllm_router_worker_health",
                "1 when the worker is healthy, else 0.",
                &["worker"],
            ),
            worker_requests: counter(
                &r,
                "vllm_router_worker_requests_total",
                "Requests routed per worker and policy slot.",
                &["worker", "slot"],
            ),
            policy_decision_seconds: histogram(
                &r,
                "vllm_router_policy_decision_duration_seconds",
                "Duration of one policy select call, WebAssembly call included, by slot (see vllm_router_policy_info for the version).",
                &["slot"],
                DECISION_BUCKETS,
            ),
            policy_failures: counter(
                &r,
                "vllm_router_policy_failures_total",
                "Policy faults (trap, timeout, out_of_memory, bad_answer, declined, init).",
                &["slot", "version", "kind"],
            ),
            policy_fallbacks: counter(
                &r,
                "vllm_router_policy_fallbacks_total",
                "Requests routed by the fallback because the policy failed.",
                &["slot"],
            ),
            policy_reloads: counter(
                &r,
                "vllm_router_policy_reloads_total",
                "Policy load attempts (file change, admin call) by slot and result: loaded, unchanged, error.",
                &["slot", "result"],
            ),
            policy_info: gauge(
                &r,
                "vllm_router_policy_info",
                "1 for the policy version serving in each slot.",
                &["slot", "policy", "version", "source"],
            ),
            slot_weight: gauge(
                &r,
                "vllm_router_policy_slot_weight",
                "A/B weight of each serving slot.",
                &["slot"],
            ),
            shadow_decisions: counter(
                &r,
                "vllm_router_shadow_decisions_total",
                "Decisions of shadow slots by whether they chose the same worker as the serving arm (agree, disagree, failed).",
                &["slot", "agreement"],
            ),
            admission_rejections: counter(
                &r,
                "vllm_router_admission_rejections_total",
                "Requests answered 429 by admission control, by reason (queue_full, queue_timeout).",
                &["reason"],
            ),
            admission: gauge(
                &r,
                "vllm_router_admission_requests",
                "Generation requests holding an admission slot (state=in_flight) or waiting for one (state=queued).",
                &["state"],
            ),
            cb_state: gauge(
                &r,
                "vllm_router_cb_state",
                "Circuit breaker state per worker: 0 closed, 1 open, 2 half-open.",
                &["worker"],
            ),
            cb_transitions: counter(
                &r,
                "vllm_router_cb_transitions_total",
                "Circuit breaker transitions per worker.",
                &["worker", "from", "to"],
            ),
            policy_quarantines: counter(
                &r,
                "vllm_router_policy_quarantines_total",
                "Policy versions quarantined after repeated faults (the fallback decides until a new version loads), by slot.",
                &["slot"],
            ),
            pd_stage_requests: counter(
                &r,
                "vllm_router_pd_stage_requests_total",
                "Prefill/decode stage requests by stage and HTTP status.",
                &["stage", "status"],
            ),
            pd_stage_seconds: histogram(
                &r,
                "vllm_router_pd_stage_duration_seconds",
                "Prefill/decode stage duration (prefill: the whole call; decode: to the last byte).",
                &["stage"],
                DURATION_BUCKETS,
            ),
            pd_ttft_seconds: {
                let h = prometheus::Histogram::with_opts(
                    HistogramOpts::new(
                        "vllm_router_pd_time_to_first_byte_seconds",
                        "Prefill/decode: from the start of prefill to the first decode byte.",
                    )
                    .buckets(DURATION_BUCKETS.to_vec()),
                )
                .expect("valid metric");
                r.register(Box::new(h.clone())).expect("unique metric");
                h
            },
            registry: r,
        }
    }

    /// Record `new` as the version serving in `slot`, dropping `old`'s series.
    pub fn set_policy_info(
        &self,
        slot: &str,
        old: Option<&crate::policy::PolicyVersion>,
        new: &crate::policy::PolicyVersion,
    ) {
        if let Some(o) = old {
            let _ =
                self.policy_info
                    .remove_label_values(&[slot, &o.name, &o.sha256[..12], &o.source]);
        }
        self.policy_info
            .with_label_values(&[slot, &new.name, &new.sha256[..12], &new.source])
            .set(1);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("encode metrics");
        String::from_utf8(buf).expect("utf-8 metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Route label for a path: the known OpenAI/vLLM routes by name, everything else `other`
/// (keeps cardinality bounded whatever clients send).
pub fn route_label(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/completions" => "/v1/completions",
        "/v1/embeddings" => "/v1/embeddings",
        "/v1/responses" => "/v1/responses",
        "/v1/rerank" | "/rerank" => "/v1/rerank",
        "/v1/models" => "/v1/models",
        "/generate" => "/generate",
        "/tokenize" => "/tokenize",
        "/detokenize" => "/detokenize",
        "/pooling" => "/pooling",
        "/classify" => "/classify",
        "/score" | "/v1/score" => "/v1/score",
        _ => "other",
    }
}
