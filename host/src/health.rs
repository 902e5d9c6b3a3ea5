//! Active health checks own a worker's "up/down" (request failures go to the circuit
//! breaker instead, see [`crate::breaker`]): `GET {worker}{--health-check-endpoint}` on every worker in
//! parallel. Healthy workers are probed every `--health-check-interval-secs`; unhealthy
//! ones every second, so a recovered worker is back within about
//! `--health-success-threshold` seconds.

use crate::metrics::Metrics;
use crate::workers::{Registry, Worker};
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Health-check settings.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// Interval between probes of a healthy worker.
    pub interval: Duration,
    /// Probe timeout.
    pub timeout: Duration,
    /// Consecutive failures that mark a worker unhealthy.
    pub failure_threshold: u32,
    /// Consecutive successes that mark it healthy again.
    pub success_threshold: u32,
    /// Path to probe, e.g. `/health`.
    pub endpoint: String,
}

/// The HTTP client of health probes and engine-metrics scrapes.
pub type ProbeClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<bytes::Bytes>>;

/// `--api-key`: `Authorization: Bearer KEY` for workers, marked sensitive (never shown
/// by `Debug` or logs). Set once at startup.
static WORKER_AUTH: std::sync::OnceLock<http::HeaderValue> = std::sync::OnceLock::new();

/// Set the key workers expect (`--api-key`). Errors: a key that cannot be a header value.
pub fn set_worker_api_key(key: &str) -> Result<(), String> {
    let mut v = http::HeaderValue::from_str(&format!("Bearer {key}"))
        .map_err(|_| "--api-key contains characters not allowed in an HTTP header".to_string())?;
    v.set_sensitive(true);
    let _ = WORKER_AUTH.set(v);
    Ok(())
}

/// The `Authorization` value for workers, when `--api-key` is set.
pub fn worker_auth() -> Option<&'static http::HeaderValue> {
    WORKER_AUTH.get()
}

/// GET `uri` with the router's own credentials (`--api-key`), for health probes and
/// metrics scrapes.
pub fn get(client: &ProbeClient, uri: http::Uri) -> hyper_util::client::legacy::ResponseFuture {
    let mut req = http::Request::new(Empty::new());
    *req.uri_mut() = uri;
    if let Some(v) = worker_auth() {
        req.headers_mut()
            .insert(http::header::AUTHORIZATION, v.clone());
    }
    client.request(req)
}

/// The client health probes use: connect timeout `timeout`, TCP_NODELAY.
pub fn probe_client(timeout: Duration) -> ProbeClient {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(timeout));
    http.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(crate::tls::worker_connector(http))
}

async fn probe(client: &ProbeClient, w: &Worker, cfg: &HealthConfig) -> bool {
    probe_url(client, &format!("{}{}", w.url, cfg.endpoint), cfg.timeout).await
}

/// One `GET url` within `timeout`; true on a 2xx answer.
pub async fn probe_url(client: &ProbeClient, url: &str, timeout: Duration) -> bool {
    let Ok(uri) = url.parse::<http::Uri>() else {
        return false;
    };
    matches!(tokio::time::timeout(timeout, get(client, uri)).await, Ok(Ok(r)) if r.status().is_success())
}

/// Probe each distinct base URL once, in parallel (data-parallel ranks of one server
/// share its `/health`), and return one result per worker, in order.
async fn probe_by_url(
    client: &ProbeClient,
    workers: &[Arc<Worker>],
    cfg: &HealthConfig,
) -> Vec<bool> {
    let mut urls: Vec<&Worker> = Vec::new();
    for w in workers {
        if !urls.iter().any(|u| u.url == w.url) {
            urls.push(w);
        }
    }
    let results = futures_util::future::join_all(urls.iter().map(|w| probe(client, w, cfg))).await;
    workers
        .iter()
        .map(|w| {
            urls.iter()
                .position(|u| u.url == w.url)
                .map(|i| results[i])
                .unwrap_or(false)
        })
        .collect()
}

/// Run the checker until the task is dropped.
pub async fn run(registry: Arc<Registry>, cfg: HealthConfig, metrics: Arc<Metrics>) {
    let client = probe_client(cfg.timeout);
    let mut last_full = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let full = last_full.elapsed() >= cfg.interval;
        if full {
            last_full = Instant::now();
        }
        let set = registry.snapshot();
        let due: Vec<Arc<Worker>> = set
            .workers
            .iter()
            .filter(|w| full || !w.is_healthy())
            .cloned()
            .collect();
        if due.is_empty() {
            continue;
        }
        let results = probe_by_url(&client, &due, &cfg).await;
        for (w, ok) in due.iter().zip(results) {
            if ok {
                if w.record_success(cfg.success_threshold) {
                    tracing::info!(worker = %w.name(), "worker healthy again");
                }
            } else {
                metrics.upstream_error(w, "health_check");
                if w.record_failure(false, cfg.failure_threshold) {
                    tracing::warn!(worker = %w.name(), "worker marked unhealthy: {} failed health checks", cfg.failure_threshold);
                }
            }
        }
    }
}

/// Probe every worker once, in parallel, and apply the answer at once (no thresholds):
/// a worker that does not answer gets no traffic until it does, one that answers is
/// healthy. Used at startup and while waiting for workers
/// (`--worker-startup-timeout-secs`). Returns how many answered.
pub async fn startup_probe(registry: &Registry, cfg: &HealthConfig) -> usize {
    let client = probe_client(cfg.timeout);
    let set = registry.snapshot();
    let results = probe_by_url(&client, &set.workers, cfg).await;
    for (w, ok) in set.workers.iter().zip(&results) {
        if *ok {
            if w.record_success(1) {
                tracing::info!(worker = %w.name(), "worker healthy");
            }
        } else if w.record_failure(true, 1) {
            tracing::warn!(worker = %w.name(), "worker not answering {} at startup; no traffic until it does", cfg.endpoint);
        }
    }
    results.iter().filter(|ok| **ok).count()
}
