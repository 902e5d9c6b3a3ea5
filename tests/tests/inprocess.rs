//! The router built in-process over the library (`vllm_router::app::App`) and served on
//! a 127.0.0.1 port inside the test, against simulated workers: no router process to
//! spawn, so these tests are fast and can look at the router's parts directly.

use clap::Parser;
use serde_json::json;
use vllm_router::app::App;
use vllm_router::config::Args;
use vllm_router_tests::*;

/// Build the router from flags and serve it on a free port; returns its base URL and
/// the app's parts.
async fn serve(flags: &[&str]) -> (String, std::sync::Arc<vllm_router::metrics::Metrics>) {
    let mut argv = vec![
        "vllm-router",
        "--no-watch",
        "--engine-metrics-interval-ms",
        "0",
    ];
    argv.extend_from_slice(flags);
    let app = App::build(Args::parse_from(argv)).await.unwrap();
    let metrics = app.metrics.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app.router).await });
    (url, metrics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_never_revisit_a_worker_and_stop_at_the_attempt_limit() {
    let sims = start_sims(3, &["--fail-status", "503"]);
    let u = urls(&sims);
    let mut flags = vec![
        "--policy",
        "round_robin",
        "--retry-max-retries",
        "2",
        "--worker-urls",
    ];
    flags.extend(u.iter().map(String::as_str));
    let (url, metrics) = serve(&flags).await;
    let r = post_json(
        &client(),
        &format!("{url}/v1/completions"),
        &[],
        &json!({"model": "sim-model", "prompt": "x", "max_tokens": 1}),
    )
    .await;
    // Two attempts on two different workers; the last worker's own 503 is returned.
    assert_eq!(r.status(), 503);
    let mut hits = Vec::new();
    for s in &sims {
        hits.push(sim_requests(s).await.len());
    }
    assert_eq!(hits.iter().sum::<usize>(), 2, "{hits:?}");
    assert!(
        hits.iter().all(|h| *h <= 1),
        "a worker was tried twice: {hits:?}"
    );
    let m = metrics.render();
    assert_eq!(metric_sum(&m, "vllm_router_retries_total", &[]), 1.0, "{m}");
    assert_eq!(
        metric_sum(
            &m,
            "vllm_router_upstream_errors_total",
            &["kind=\"status_5xx\""]
        ),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_takes_the_worker_out_without_spending_an_attempt() {
    let sims = vec![
        start_sim("bad", &["--fail-status", "500"]),
        start_sim("good", &[]),
    ];
    let u = urls(&sims);
    let mut flags = vec![
        "--policy",
        "round_robin",
        "--cb-failure-threshold",
        "2",
        "--retry-max-retries",
        "2",
        "--worker-urls",
    ];
    flags.extend(u.iter().map(String::as_str));
    let (url, metrics) = serve(&flags).await;
    let c = client();
    for i in 0..10 {
        let r = post_json(
            &c,
            &format!("{url}/v1/completions"),
            &[],
            &json!({"model": "sim-model", "prompt": format!("{i}"), "max_tokens": 1}),
        )
        .await;
        assert_eq!(r.status(), 200);
    }
    // "bad" failed twice, opened, and got nothing after that.
    assert_eq!(sim_requests(&sims[0]).await.len(), 2);
    let m = metrics.render();
    assert_eq!(
        metric_sum(
            &m,
            "vllm_router_cb_state",
            &[&format!("worker=\"{}\"", sims[0].url())]
        ),
        1.0,
        "{m}"
    );
    // The worker stays up: health (its /health answers) is not the breaker's business.
    assert_eq!(
        metric_sum(
            &m,
            "vllm_router_worker_health",
            &[&format!("worker=\"{}\"", sims[0].url())]
        ),
        1.0
    );
}
