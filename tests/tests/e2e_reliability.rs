//! End-to-end reliability: circuit breaker, worker death under load, hostile policies,
//! bad input, admission control, graceful shutdown and a promtool check of the metrics.

use futures_util::StreamExt;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vllm_router_tests::*;

async fn sim_count(sim: &Proc) -> usize {
    sim_requests(sim).await.len()
}

fn completion() -> Value {
    json!({"model": "sim-model", "prompt": "x", "max_tokens": 1})
}

/// With the default health settings: request failures belong to the breaker alone (before,
/// passive health counted the same 5xx with threshold 3 and ejected the worker first, so
/// this test had to pass `--health-failure-threshold 1000` to see the breaker at all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_half_opens_with_bounded_probes_and_closes() {
    let sims = start_sims(2, &[]);
    let router = start_router(
        &urls(&sims),
        &[
            "--policy",
            "round_robin",
            "--cb-failure-threshold",
            "3",
            "--cb-success-threshold",
            "2",
            "--cb-timeout-duration-secs",
            "1",
            "--engine-metrics-interval-ms",
            "0",
        ],
    );
    let c = client();
    let url = format!("{}/v1/completions", router.url());
    set_sim(&sims[1], json!({"fail_status": 503})).await;
    // w1 fails; retries put every request on w0, so clients see 200 only.
    for _ in 0..8 {
        assert_eq!(post_json(&c, &url, &[], &completion()).await.status(), 200);
    }
    let m = router_metrics(&router).await;
    let w1 = format!("worker=\"{}\"", sims[1].url());
    assert_eq!(
        metric_sum(&m, "vllm_router_cb_state", &[&w1]),
        1.0,
        "breaker not open:\n{m}"
    );
    assert_eq!(
        sim_count(&sims[1]).await,
        3,
        "exactly threshold failures reach w1"
    );
    // Open: w1 gets nothing.
    for _ in 0..10 {
        assert_eq!(post_json(&c, &url, &[], &completion()).await.status(), 200);
    }
    assert_eq!(sim_count(&sims[1]).await, 3);
    // w1 recovers but is slow; after the open period only one probe at a time reaches it.
    set_sim(&sims[1], json!({"fail_status": 0, "ttft_ms": 400})).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut burst = Vec::new();
    for _ in 0..12 {
        let (c, url) = (c.clone(), url.clone());
        burst.push(tokio::spawn(async move {
            post_json(&c, &url, &[], &completion()).await.status()
        }));
    }
    for b in burst {
        assert_eq!(b.await.unwrap(), 200);
    }
    assert_eq!(
        sim_count(&sims[1]).await,
        4,
        "half-open let more than one concurrent probe through"
    );
    // One more successful probe closes it; then w1 takes its share again.
    set_sim(&sims[1], json!({"ttft_ms": 0})).await;
    for _ in 0..10 {
        assert_eq!(post_json(&c, &url, &[], &completion()).await.status(), 200);
    }
    let m = router_metrics(&router).await;
    assert_eq!(
        metric_sum(&m, "vllm_router_cb_state", &[&w1]),
        0.0,
        "breaker not closed:\n{m}"
    );
    assert!(sim_count(&sims[1]).await >= 8);
    assert_eq!(
        metric_sum(
            &m,
            "vllm_router_cb_transitions_total",
            &[&w1, "to=\"closed\""]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_under_load_fails_no_request_and_is_excluded() {
    let mut sims = start_sims(3, &[]);
    let router = start_router(&urls(&sims), &["--health-check-interval-secs", "1"]);
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, sent, failed, url) = (stop.clone(), sent.clone(), failed.clone(), router.url());
        load.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::Relaxed) {
                let r = post_json(
                    &c,
                    &format!("{url}/v1/chat/completions"),
                    &[],
                    &chat_body("load", false),
                )
                .await;
                sent.fetch_add(1, Ordering::Relaxed);
                if r.status() != 200 {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let dead = sims[1].url();
    sims[1].kill();
    let killed_at = Instant::now();
    // Excluded within one health interval (passively, at the first connection error).
    let c = client();
    loop {
        let h: Value = get_json(&c, &format!("{}/health", router.url())).await;
        if h["unhealthy_workers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u == &json!(dead))
        {
            assert_eq!(h["status"], "degraded");
            break;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(2),
            "dead worker still listed healthy: {h}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    assert!(sent.load(Ordering::Relaxed) > 50);
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "client requests failed when a worker died"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_policies_never_fail_a_request() {
    let sims = start_sims(2, &[]);
    let hostile = policy_wasm("test_policy_hostile");
    let c = client();
    for (mode, kind) in [
        ("loop", "timeout"),
        ("alloc", "out_of_memory"),
        ("panic", "trap"),
        ("trap", "trap"),
        ("bad_id", "bad_answer"),
    ] {
        let cfg = format!(r#"{{"mode":"{mode}"}}"#);
        let router = start_router(
            &urls(&sims),
            &[
                "--policy-wasm",
                hostile.to_str().unwrap(),
                "--policy-config",
                &cfg,
                "--policy-timeout-ms",
                "5",
                "--policy-max-memory-mb",
                "16",
                "--no-watch",
            ],
        );
        for i in 0..12 {
            let r = post_json(
                &c,
                &format!("{}/v1/chat/completions", router.url()),
                &[],
                &chat_body(&format!("{i}"), i % 2 == 0),
            )
            .await;
            assert_eq!(r.status(), 200, "mode {mode}");
            let body = r.text().await.unwrap();
            assert!(body.contains("\"the "), "mode {mode}: {body}");
        }
        let m = router_metrics(&router).await;
        let failures = metric_sum(&m, "vllm_router_policy_failures_total", &[]);
        let of_kind = metric_sum(
            &m,
            "vllm_router_policy_failures_total",
            &[&format!("kind=\"{kind}\"")],
        );
        assert!(
            failures >= 5.0 && of_kind >= 1.0,
            "mode {mode}: {failures} failures, {of_kind} {kind}\n{m}"
        );
        assert_eq!(
            metric_sum(&m, "vllm_router_policy_fallbacks_total", &[]),
            12.0,
            "mode {mode}"
        );
        assert_eq!(
            metric_sum(&m, "vllm_router_policy_quarantines_total", &[]),
            1.0,
            "mode {mode}: quarantine"
        );
    }
    // `decision::none` is a decline, as wit/policy.wit says ("refuse to choose; the
    // router falls back"), not a fault: the fallback routes every request, nothing is
    // counted as a failure and the version is never quarantined (before, five declines
    // in 10 s quarantined it).
    {
        let router = start_router(
            &urls(&sims),
            &[
                "--policy-wasm",
                hostile.to_str().unwrap(),
                "--policy-config",
                r#"{"mode":"decline"}"#,
                "--no-watch",
            ],
        );
        for i in 0..12 {
            post_completion(&c, &router, &format!("{i}")).await;
        }
        let m = router_metrics(&router).await;
        assert_eq!(
            metric_sum(&m, "vllm_router_policy_failures_total", &[]),
            0.0,
            "{m}"
        );
        assert_eq!(
            metric_sum(
                &m,
                "vllm_router_policy_fallbacks_total",
                &["reason=\"declined\""]
            ),
            12.0,
            "{m}"
        );
        assert_eq!(
            metric_sum(&m, "vllm_router_policy_quarantines_total", &[]),
            0.0
        );
    }
    // A policy whose init never returns is refused at startup with a clear error.
    let out = std::process::Command::new(bin("vllm-router"))
        .args([
            "--worker-urls",
            &sims[0].url(),
            "--port",
            &free_port().to_string(),
            "--prometheus-port",
            "0",
        ])
        .args([
            "--policy-wasm",
            hostile.to_str().unwrap(),
            "--policy-config",
            r#"{"mode":"slow_init"}"#,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("init failed") && err.contains("time limit"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_right_4xx_json_and_the_router_keeps_serving() {
    let sims = start_sims(1, &[]);
    let router = start_router(&urls(&sims), &["--max-payload-size", "4096"]);
    let c = client();
    let url = format!("{}/v1/chat/completions", router.url());
    let cases: Vec<(&str, Vec<u8>, &str, u16, &str)> = vec![
        (
            "malformed",
            b"{\"model\": ".to_vec(),
            "application/json",
            400,
            "invalid_json",
        ),
        ("empty", Vec::new(), "application/json", 400, "empty_body"),
        (
            "array",
            b"[1,2]".to_vec(),
            "application/json",
            400,
            "invalid_json",
        ),
        (
            "invalid utf-8",
            b"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}"
                .to_vec(),
            "application/json",
            400,
            "invalid_json",
        ),
        (
            "wrong content type",
            b"{\"model\":\"m\"}".to_vec(),
            "text/plain",
            415,
            "unsupported_media_type",
        ),
        (
            "too large",
            format!("{{\"model\":\"m\",\"prompt\":\"{}\"}}", "x".repeat(5000)).into_bytes(),
            "application/json",
            413,
            "payload_too_large",
        ),
    ];
    for (what, body, ct, status, code) in cases {
        let r = c
            .post(&url)
            .header("content-type", ct)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{what}");
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json"),
            "{what}"
        );
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], code, "{what}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}"
        );
        // The next request is served.
        assert_eq!(
            post_json(&c, &url, &[], &chat_body("after", false))
                .await
                .status(),
            200,
            "after {what}"
        );
    }
    // Absurd headers: 431 JSON, and the router keeps serving.
    let r = c
        .post(&url)
        .header("x-huge", "a".repeat(200_000))
        .json(&chat_body("x", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 431);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "headers_too_large");
    assert_eq!(
        post_json(&c, &url, &[], &chat_body("after", false))
            .await
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_limits_in_flight_queues_then_answers_429_with_retry_after() {
    let sims = start_sims(1, &["--token-delay-ms", "100"]);
    let router = start_router(
        &urls(&sims),
        &[
            "--max-concurrent-requests",
            "2",
            "--queue-size",
            "1",
            "--queue-timeout-secs",
            "1",
        ],
    );
    let c = client();
    let url = format!("{}/v1/chat/completions", router.url());
    // Two streams hold both slots until their end (~2 s).
    let mut streams = Vec::new();
    for _ in 0..2 {
        let mut b = chat_body("long", true);
        b["max_tokens"] = json!(20);
        let r = post_json(&c, &url, &[], &b).await;
        assert_eq!(r.status(), 200);
        let mut s = r.bytes_stream();
        s.next().await.unwrap().unwrap();
        streams.push(s);
    }
    // The third waits in the queue; the fourth finds the queue full.
    let (c3, u3) = (c.clone(), url.clone());
    let queued = tokio::spawn(async move {
        let t = Instant::now();
        let r = post_json(&c3, &u3, &[], &chat_body("queued", false)).await;
        (
            r.status().as_u16(),
            r.headers().get("retry-after").cloned(),
            t.elapsed(),
        )
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = post_json(&c, &url, &[], &chat_body("rejected", false)).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "queue_full");
    let (status, retry_after, waited) = queued.await.unwrap();
    assert_eq!(status, 429);
    assert!(retry_after.is_some());
    assert!(
        waited >= Duration::from_millis(900),
        "left the queue after {waited:?}"
    );
    // When the streams end, slots free up.
    for mut s in streams {
        while let Some(chunk) = s.next().await {
            chunk.unwrap();
        }
    }
    assert_eq!(
        post_json(&c, &url, &[], &chat_body("later", false))
            .await
            .status(),
        200
    );
    let m = router_metrics(&router).await;
    assert_eq!(
        metric_sum(&m, "vllm_router_admission_rejections_total", &[]),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_an_in_flight_stream_finish() {
    let sims = start_sims(1, &["--token-delay-ms", "50"]);
    let mut router = start_router(&urls(&sims), &[]);
    let c = client();
    let mut b = chat_body("long", true);
    b["max_tokens"] = json!(20);
    let r = post_json(
        &c,
        &format!("{}/v1/chat/completions", router.url()),
        &[],
        &b,
    )
    .await;
    let mut s = r.bytes_stream();
    s.next().await.unwrap().unwrap();
    let pid = router.pid();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // No new connections ...
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", router.port)).is_err(),
        "still accepting after SIGTERM"
    );
    // ... but the stream runs to its end.
    let mut body = Vec::new();
    while let Some(chunk) = s.next().await {
        body.extend_from_slice(&chunk.unwrap());
    }
    let text = String::from_utf8(body).unwrap();
    assert!(text.contains("data: [DONE]"), "stream cut short: {text}");
    assert!(
        router.terminate(Duration::from_secs(5)),
        "router did not exit after its last stream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_check() {
    let Ok(out) = std::process::Command::new("promtool")
        .arg("--version")
        .output()
    else {
        assert!(
            std::env::var_os("VLLM_ROUTER_REQUIRE_PROMTOOL").is_none(),
            "promtool required (CI installs the Debian package `prometheus`)"
        );
        eprintln!(
            "promtool not installed; skipping (CI installs it and sets VLLM_ROUTER_REQUIRE_PROMTOOL)"
        );
        return;
    };
    assert!(out.status.success());
    let sims = start_sims(2, &[]);
    let router = start_router(
        &urls(&sims),
        &["--policy", "cache_aware", "--shadow-policy", "random"],
    );
    let c = client();
    for i in 0..10 {
        post_json(
            &c,
            &format!("{}/v1/chat/completions", router.url()),
            &[],
            &chat_body(&format!("{i}"), i % 2 == 0),
        )
        .await;
    }
    let _ = c
        .post(format!("{}/v1/chat/completions", router.url()))
        .body("{")
        .header("content-type", "application/json")
        .send()
        .await;
    let m = router_metrics(&router).await;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(m.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics:\n{report}"
    );
}
