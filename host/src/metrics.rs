//! Prometheus metrics (prefix `vllm_router_`), served on `--prometheus-host:--prometheus-port`.
//! Labels are bounded: route (a fixed set, see [`route_label`]), status, worker URL, policy
//! slot and version; never request ids.

use crate::workers::{Registry as Workers, Worker};
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::sync::Arc;

/// Gauges read from the worker registry and admission control at scrape time (a
/// Prometheus `Collector`): `vllm_router_worker_in_flight`, `vllm_router_worker_health`,
/// `vllm_router_cb_state` (worker label `url` or `url@rank`, like every worker metric)
/// and `vllm_router_admission_requests{state}`. Workers that left have no series.
pub struct FleetGauges {
    workers: Arc<Workers>,
    /// (in flight, queued) of admission control.
    admission: Box<dyn Fn() -> (i64, i64) + Send + Sync>,
    in_flight: IntGaugeVec,
    health: IntGaugeVec,
    cb_state: IntGaugeVec,
    admission_g: IntGaugeVec,
    /// Serialises concurrent scrapes (the gauges are reset and refilled per scrape).
    scrape: parking_lot::Mutex<()>,
}

impl FleetGauges {
    /// Gauges over `workers`; `admission()` gives (in flight, queued).
    pub fn new(
        workers: Arc<Workers>,
        admission: Box<dyn Fn() -> (i64, i64) + Send + Sync>,
    ) -> Self {
        let g = |name: &str, help: &str, label: &str| {
            IntGaugeVec::new(Opts::new(name, help), &[label]).expect("valid metric")
        };
        FleetGauges {
            workers,
            admission,
            in_flight: g(
                "vllm_router_worker_in_flight",
                "Requests in flight per worker (until the end of the response stream).",
                "worker",
            ),
            health: g(
                "vllm_router_worker_health",
                "1 when the worker is healthy (active health checks), else 0.",
                "worker",
            ),
            cb_state: g(
                "vllm_router_cb_state",
                "Circuit breaker state per worker: 0 closed, 1 open, 2 half-open.",
                "worker",
            ),
            admission_g: g(
                "vllm_router_admission_requests",
                "Generation requests holding an admission slot (state=in_flight) or waiting for one (state=queued).",
                "state",
            ),
            scrape: parking_lot::Mutex::new(()),
        }
    }
}

impl Collector for FleetGauges {
    fn desc(&self) -> Vec<&Desc> {
        [
            &self.in_flight,
            &self.health,
            &self.cb_state,
            &self.admission_g,
        ]
        .into_iter()
        .flat_map(|g| g.desc())
        .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let _one = self.scrape.lock();
        for g in [&self.in_flight, &self.health, &self.cb_state] {
            g.reset();
        }
        for w in &self.workers.snapshot().workers {
            let n = w.name();
            self.in_flight
                .with_label_values(&[n])
                .set(w.in_flight() as i64);
            self.health
                .with_label_values(&[n])
                .set(w.is_healthy() as i64);
            self.cb_state
                .with_label_values(&[n])
                .set(w.breaker_state() as i64);
        }
        let (in_flight, queued) = (self.admission)();
        self.admission_g
            .with_label_values(&["in_flight"])
            .set(in_flight);
        self.admission_g.with_label_values(&["queued"]).set(queued);
        [
            &self.in_flight,
            &self.health,
            &self.cb_state,
            &self.admission_g,
        ]
        .into_iter()
        .flat_map(|g| g.collect())
        .collect()
    }
}

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
    /// Retries the retry budget refused, by route.
    pub retries_refused: IntCounterVec,
    /// `on-complete` feedback dropped because the feedback queue was full.
    pub feedback_dropped: prometheus::IntCounter,
    /// Workers Kubernetes discovery registered, by reason.
    pub discovery_registrations: IntCounterVec,
    /// Workers Kubernetes discovery removed (after their drain), by reason
    /// (`pod_gone`, `pod_not_ready`, `pod_replaced`, `role_changed`).
    pub discovery_deregistrations: IntCounterVec,
    /// Kubernetes watch errors (each followed by a retry with backoff, a re-list on 410).
    pub discovery_watch_restarts: prometheus::IntCounter,
    /// Unix time (s) of the last completed reconcile pass.
    pub discovery_last_sync: prometheus::IntGauge,
    /// Workers discovery owns, by state (`serving`, `draining`).
    pub discovery_workers: IntGaugeVec,
    /// `vllm_router_client_connections`: client connections open now.
    pub client_connections: prometheus::IntGauge,
    /// `vllm_router_client_connections_closed_total{reason}`: connections the router
    /// closed (header_timeout, idle_timeout, tls_handshake_failed, tls_handshake_timeout).
    pub client_connections_closed: IntCounterVec,
    /// `vllm_router_tls_certificate_reloads_total{result}` (ok, error).
    pub tls_reloads: IntCounterVec,
    /// `vllm_router_client_key_requests_total{key,outcome}`: requests per client key
    /// *name* (never the key) by outcome (admitted, rate_limited, concurrency_limited).
    pub client_key_requests: IntCounterVec,
    /// `vllm_router_client_auth_failures_total{reason}` (missing, invalid).
    pub client_auth_failures: IntCounterVec,
    /// `vllm_router_client_keys_reloads_total{result}` (ok, error).
    pub client_keys_reloads: IntCounterVec,
    /// `vllm_router_kv_source_state{worker}`: 0 fallback, 1 exact, 2 degraded.
    pub kv_source_state: IntGaugeVec,
    /// `vllm_router_kv_index_blocks{worker}`: blocks the index holds for each worker.
    pub kv_index_blocks: IntGaugeVec,
    /// `vllm_router_kv_blocks_total{op}`: blocks stored, removed, evicted (bound),
    /// orphaned (`BlockStored` whose parent was unknown).
    pub kv_blocks: IntCounterVec,
    /// `vllm_router_kv_resyncs_total{reason}`: restart, replayed, reset.
    pub kv_resyncs: IntCounterVec,
    /// `vllm_router_kv_event_decode_errors_total`.
    pub kv_decode_errors: prometheus::IntCounter,
    /// `vllm_router_kv_tokenize_duration_seconds{result}`: the `/tokenize` call before
    /// `select` for a policy that reads the prefix cache (ok, error, timeout).
    pub kv_tokenize_seconds: HistogramVec,
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
                "Policy faults (trap, timeout, out_of_memory, bad_answer, init); a decline (decision::none) is not a fault.",
                &["slot", "version", "kind"],
            ),
            policy_fallbacks: counter(
                &r,
                "vllm_router_policy_fallbacks_total",
                "Requests routed by the fallback instead of the policy, by slot and reason (fault, declined, quarantined, syncing).",
                &["slot", "reason"],
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
                "Requests answered 429 by admission control, by reason (queue_full, queue_timeout, rate_limited: --rate-limit-tokens-per-second).",
                &["reason"],
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
            retries_refused: counter(
                &r,
                "vllm_router_retries_refused_total",
                "Retries refused by the retry budget (--retry-budget-ratio, --retry-budget-min-per-sec), by route; the attempt's own answer went to the client.",
                &["route"],
            ),
            feedback_dropped: {
                let c = prometheus::IntCounter::new(
                    "vllm_router_policy_feedback_dropped_total",
                    "on-complete calls dropped because the policy feedback queue was full.",
                )
                .expect("valid metric");
                r.register(Box::new(c.clone())).expect("unique metric");
                c
            },
            discovery_registrations: counter(
                &r,
                "vllm_router_discovery_registrations_total",
                "Workers Kubernetes discovery registered, by reason.",
                &["reason"],
            ),
            discovery_deregistrations: counter(
                &r,
                "vllm_router_discovery_deregistrations_total",
                "Workers Kubernetes discovery removed after draining, by reason (pod_gone, pod_not_ready, pod_replaced, role_changed).",
                &["reason"],
            ),
            discovery_watch_restarts: {
                let c = prometheus::IntCounter::new(
                    "vllm_router_discovery_watch_restarts_total",
                    "Kubernetes pod watch errors; each is retried with backoff (a 410 re-lists).",
                )
                .expect("valid metric");
                r.register(Box::new(c.clone())).expect("unique metric");
                c
            },
            discovery_last_sync: {
                let g = prometheus::IntGauge::new(
                    "vllm_router_discovery_last_sync_timestamp_seconds",
                    "Unix time of the last completed Kubernetes discovery reconcile pass.",
                )
                .expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            discovery_workers: gauge(
                &r,
                "vllm_router_discovery_workers",
                "Workers owned by Kubernetes discovery, by state (serving, draining).",
                &["state"],
            ),
            client_connections: {
                let g = prometheus::IntGauge::new(
                    "vllm_router_client_connections",
                    "Client connections open now (bounded by --max-client-connections).",
                )
                .expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            client_connections_closed: counter(
                &r,
                "vllm_router_client_connections_closed_total",
                "Client connections the router closed, by reason (header_timeout, idle_timeout, tls_handshake_failed, tls_handshake_timeout).",
                &["reason"],
            ),
            tls_reloads: counter(
                &r,
                "vllm_router_tls_certificate_reloads_total",
                "Reloads of the listener's TLS certificate after a file change, by result (ok, error: the old one keeps serving).",
                &["result"],
            ),
            client_key_requests: counter(
                &r,
                "vllm_router_client_key_requests_total",
                "Requests per client API key name (--client-api-keys-file) by outcome (admitted, rate_limited, concurrency_limited).",
                &["key", "outcome"],
            ),
            client_auth_failures: counter(
                &r,
                "vllm_router_client_auth_failures_total",
                "Requests refused with 401, by reason (missing, invalid).",
                &["reason"],
            ),
            client_keys_reloads: counter(
                &r,
                "vllm_router_client_keys_reloads_total",
                "Reloads of --client-api-keys-file, by result (ok, error: the previous keys stay).",
                &["result"],
            ),
            kv_source_state: gauge(
                &r,
                "vllm_router_kv_source_state",
                "State of each worker's KV-event source: 0 fallback (no events), 1 exact, 2 degraded (events lost, not yet resynchronised).",
                &["worker"],
            ),
            kv_index_blocks: gauge(
                &r,
                "vllm_router_kv_index_blocks",
                "KV blocks the router's index holds for each worker (from its KV events; bounded by --kv-index-max-blocks).",
                &["worker"],
            ),
            kv_blocks: counter(
                &r,
                "vllm_router_kv_blocks_total",
                "KV blocks applied to the router's index from vLLM KV events, by op (stored, removed, evicted: over --kv-index-max-blocks, orphaned: parent unknown).",
                &["op"],
            ),
            kv_resyncs: counter(
                &r,
                "vllm_router_kv_resyncs_total",
                "KV-event sources resynchronised, by reason (restart: sequence went back; replayed: gap filled from the replay socket; reset: gap not replayable, entries dropped).",
                &["reason"],
            ),
            kv_decode_errors: {
                let c = prometheus::IntCounter::new(
                    "vllm_router_kv_event_decode_errors_total",
                    "KV-event messages that could not be decoded (ignored).",
                )
                .expect("valid metric");
                r.register(Box::new(c.clone())).expect("unique metric");
                c
            },
            kv_tokenize_seconds: histogram(
                &r,
                "vllm_router_kv_tokenize_duration_seconds",
                "Time to tokenize a prompt (worker /tokenize) before select, for policies that read the prefix cache, by result (ok, error, timeout).",
                &["result"],
                &[
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                ],
            ),
            registry: r,
        }
    }

    /// Publish `worker`'s KV-event source state.
    pub fn kv_state(&self, worker: &str, s: crate::kv::SourceState) {
        self.kv_source_state
            .with_label_values(&[worker])
            .set(s.code() as i64);
    }

    /// Count what applying one event batch did.
    pub fn kv_applied(&self, a: &crate::kv::index::Applied) {
        for (op, n) in [
            ("stored", a.stored),
            ("removed", a.removed),
            ("evicted", a.evicted),
            ("orphaned", a.orphans),
        ] {
            if n > 0 {
                self.kv_blocks.with_label_values(&[op]).inc_by(n);
            }
        }
    }

    /// Count a KV-source resynchronisation.
    pub fn kv_resync(&self, reason: &str) {
        self.kv_resyncs.with_label_values(&[reason]).inc();
    }

    /// Drop the series of workers that left (every metric with a `worker` label whose
    /// value names no worker in `set`), so a removed worker leaves no stale series.
    /// Called on every published worker set (rare: membership changes only).
    pub fn retain_workers(&self, set: &crate::workers::WorkerSet) {
        let live: std::collections::HashSet<&str> = set.workers.iter().map(|w| w.name()).collect();
        for vec in [
            &self.upstream_errors,
            &self.worker_requests,
            &self.cb_transitions,
        ] {
            for family in vec.collect() {
                for m in family.get_metric() {
                    let labels = m.get_label();
                    let stale = labels
                        .iter()
                        .any(|l| l.name() == "worker" && !live.contains(l.value()));
                    if stale {
                        // By name: collected labels come sorted by name, not in the
                        // vec's declared order.
                        let by_name: std::collections::HashMap<&str, &str> =
                            labels.iter().map(|l| (l.name(), l.value())).collect();
                        let _ = vec.remove(&by_name);
                    }
                }
            }
        }
    }

    /// Count an upstream failure of `worker` (`kind`: connect, timeout, transport,
    /// status_5xx, stream, health_check).
    pub fn upstream_error(&self, worker: &Worker, kind: &str) {
        self.upstream_errors
            .with_label_values(&[worker.name(), kind])
            .inc();
    }

    /// Count a request routed to `worker` by `slot`.
    pub fn worker_request(&self, worker: &Worker, slot: &str) {
        self.worker_requests
            .with_label_values(&[worker.name(), slot])
            .inc();
    }

    /// Count a request the fallback routed for `slot` (`reason`: fault, declined,
    /// quarantined, syncing).
    pub fn policy_fallback(&self, slot: &str, reason: &str) {
        self.policy_fallbacks
            .with_label_values(&[slot, reason])
            .inc();
    }

    /// Observe one `select` call of `slot`.
    pub fn policy_decision(&self, slot: &str, took: std::time::Duration) {
        self.policy_decision_seconds
            .with_label_values(&[slot])
            .observe(took.as_secs_f64());
    }

    /// Register the gauges derived from the worker registry and admission control; they
    /// are read at scrape time, so workers that left have no series.
    pub fn register_fleet(&self, fleet: FleetGauges) {
        self.registry
            .register(Box::new(fleet))
            .expect("unique fleet gauges");
    }

    /// Record `new` as the version serving in `slot`, dropping `old`'s series.
    pub fn set_policy_info(
        &self,
        slot: &str,
        old: Option<&vllm_router_runtime::PolicyVersion>,
        new: &vllm_router_runtime::PolicyVersion,
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
