//! Engine-load scraping: every `--engine-metrics-interval-ms`, `GET {worker}/metrics` on
//! all workers in parallel and keep `vllm:num_requests_running`,
//! `vllm:num_requests_waiting` and `vllm:kv_cache_usage_perc` (older vLLM:
//! `vllm:gpu_cache_usage_perc`) on each worker. Policies see them as the candidate's
//! `engine` load; a sample older than three intervals (plus 1 s) is withheld rather than
//! shown stale. For a data-parallel rank only series labelled `engine="<rank>"` count;
//! otherwise series are summed over engines (KV use: the maximum).

use crate::health::{ProbeClient, probe_client};
use crate::workers::{Registry, Worker};
use http_body_util::BodyExt;
use std::sync::Arc;
use std::time::Duration;

/// Engine load parsed from one `/metrics` text: `(running, waiting, kv_permille)`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EngineSample {
    /// Requests the engine is running.
    pub running: u32,
    /// Requests waiting in the engine's queue.
    pub waiting: u32,
    /// KV-cache use, per-mille.
    pub kv_permille: u16,
}

/// Parse Prometheus text exposition from vLLM. `rank`: keep only series with
/// `engine="<rank>"`. Returns `None` when none of the three series is present (not a vLLM
/// server, or metrics disabled).
pub fn parse_vllm_metrics(text: &str, rank: Option<u32>) -> Option<EngineSample> {
    let mut s = EngineSample::default();
    let mut seen = false;
    let rank_label = rank.map(|r| format!("engine=\"{r}\""));
    for line in text.lines() {
        if !line.starts_with("vllm:") {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let kind = match name {
            "vllm:num_requests_running" => 0,
            "vllm:num_requests_waiting" => 1,
            "vllm:kv_cache_usage_perc" | "vllm:gpu_cache_usage_perc" => 2,
            _ => continue,
        };
        let (labels, rest) = match line[name_end..].strip_prefix('{') {
            Some(r) => match r.find('}') {
                Some(i) => (&r[..i], &r[i + 1..]),
                None => continue,
            },
            None => ("", &line[name_end..]),
        };
        if let Some(want) = &rank_label {
            if !labels.contains(want.as_str()) {
                continue;
            }
        }
        let Some(v) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        if !v.is_finite() || v < 0.0 {
            continue;
        }
        seen = true;
        match kind {
            0 => s.running = s.running.saturating_add(v as u32),
            1 => s.waiting = s.waiting.saturating_add(v as u32),
            _ => s.kv_permille = s.kv_permille.max((v.min(1.0) * 1000.0) as u16),
        }
    }
    seen.then_some(s)
}

async fn scrape(client: &ProbeClient, w: &Worker, timeout: Duration) -> Option<EngineSample> {
    let uri: http::Uri = format!("{}/metrics", w.url).parse().ok()?;
    let resp = tokio::time::timeout(timeout, crate::health::get(client, uri))
        .await
        .ok()?
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let body = tokio::time::timeout(timeout, resp.into_body().collect())
        .await
        .ok()?
        .ok()?
        .to_bytes();
    parse_vllm_metrics(std::str::from_utf8(&body).ok()?, w.dp_rank)
}

/// Scrape all healthy workers every `interval` until the task is dropped.
pub async fn run(registry: Arc<Registry>, interval: Duration) {
    registry.set_engine_max_age_ms(interval.as_millis() as u64 * 3 + 1000);
    let timeout = interval.max(Duration::from_millis(500));
    let client = probe_client(timeout);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned = false;
    loop {
        tick.tick().await;
        let set = registry.snapshot();
        let due: Vec<&Arc<Worker>> = set.workers.iter().filter(|w| w.is_healthy()).collect();
        let results =
            futures_util::future::join_all(due.iter().map(|w| scrape(&client, w, timeout))).await;
        for (w, r) in due.iter().zip(results) {
            match r {
                Some(s) => w.set_engine_load(&vllm_router_sdk::EngineLoad {
                    running: s.running,
                    waiting: s.waiting,
                    kv_cache_permille: s.kv_permille,
                }),
                None if !warned => {
                    warned = true;
                    tracing::info!(worker = %w.name(), "no vLLM engine metrics at /metrics; policies see router in-flight counts only for it");
                }
                None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 4.0
vllm:num_requests_waiting{engine="0",model_name="m"} 7.0
vllm:num_requests_waiting{engine="1",model_name="m"} 0.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5
vllm:prompt_tokens_total{engine="0",model_name="m"} 1234.0
"#;

    #[test]
    fn sums_engines_or_filters_one_rank() {
        let all = parse_vllm_metrics(SAMPLE, None).unwrap();
        assert_eq!(
            all,
            EngineSample {
                running: 7,
                waiting: 7,
                kv_permille: 500
            }
        );
        let r0 = parse_vllm_metrics(SAMPLE, Some(0)).unwrap();
        assert_eq!(
            r0,
            EngineSample {
                running: 3,
                waiting: 7,
                kv_permille: 250
            }
        );
    }

    #[test]
    fn not_vllm_or_garbage_gives_none() {
        assert_eq!(parse_vllm_metrics("http_requests_total 5\n", None), None);
        assert_eq!(
            parse_vllm_metrics("vllm:num_requests_waiting{engine=\"0\" NaN\n", None),
            None
        );
        assert_eq!(
            parse_vllm_metrics("vllm:num_requests_waiting -3\n", None),
            None
        );
        let old = parse_vllm_metrics(
            "vllm:gpu_cache_usage_perc 0.9\nvllm:num_requests_waiting 2\n",
            None,
        )
        .unwrap();
        assert_eq!(
            old,
            EngineSample {
                running: 0,
                waiting: 2,
                kv_permille: 900
            }
        );
    }
}
