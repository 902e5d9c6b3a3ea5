//! End-to-end: the real `vllm-router` binary in front of simulated vLLM workers.

use futures_util::StreamExt;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use vllm_router_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_stream_and_stream_for_completions_and_chat() {
    let sims = start_sims(2, &[]);
    let router = start_router(&urls(&sims), &["--policy", "round_robin"]);
    let c = client();
    // Non-stream chat: vLLM's shape, body reached the worker unchanged.
    let body = r#"{"messages":[{"role":"user","content":"hi"}], "model":"sim-model",  "max_tokens":3, "extra_field":{"kept":true}}"#;
    let r = c
        .post(format!("{}/v1/chat/completions", router.url()))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let worker = worker_of(&r);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], "the of and ");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    let sim = &sims[worker[1..].parse::<usize>().unwrap()];
    let seen = sim_requests(sim).await;
    assert_eq!(
        seen.last().unwrap()["body"],
        serde_json::from_str::<Value>(body).unwrap()
    );

    // Non-stream completion.
    let r = c
        .post(format!("{}/v1/completions", router.url()))
        .json(&json!({"model": "sim-model", "prompt": "once", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], "the of ");

    // Streams: SSE chunks then [DONE], content-type preserved.
    for (path, body) in [
        ("/v1/chat/completions", chat_body("hello", true)),
        (
            "/v1/completions",
            json!({"model": "sim-model", "prompt": "once", "max_tokens": 4, "stream": true}),
        ),
    ] {
        let r = c
            .post(format!("{}{path}", router.url()))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        let text = r.text().await.unwrap();
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(*events.last().unwrap(), "data: [DONE]");
        let tokens: String = events
            .iter()
            .filter(|e| **e != "data: [DONE]")
            .map(|e| serde_json::from_str::<Value>(e.strip_prefix("data: ").unwrap()).unwrap())
            .map(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .or(v["choices"][0]["text"].as_str())
                    .unwrap_or("")
                    .to_string()
            })
            .collect();
        assert_eq!(tokens, "the of and to ", "{path}");
    }

    // Embeddings and an unknown POST path are forwarded too.
    let r = c
        .post(format!("{}/v1/embeddings", router.url()))
        .json(&json!({"model": "sim-model", "input": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .post(format!("{}/tokenize", router.url()))
        .json(&json!({"model": "sim-model", "prompt": "x"}))
        .send()
        .await
        .unwrap();
    assert!(r.headers().contains_key("x-vllm-sim-worker"));

    // Info routes.
    let v: Value = get_json(&c, &format!("{}/v1/models", router.url())).await;
    assert_eq!(v["data"][0]["id"], "sim-model");
    let v: Value = get_json(&c, &format!("{}/readiness", router.url())).await;
    assert_eq!(
        v,
        json!({"status": "ready", "healthy_workers": 2, "total_workers": 2})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_stream_chunk_arrives_before_the_worker_finishes() {
    // 6 tokens, 300 ms apart: the worker needs >= 1.5 s to finish.
    let sims = start_sims(1, &["--token-delay-ms", "300"]);
    let router = start_router(&urls(&sims), &[]);
    let mut body = chat_body("stream me", true);
    body["max_tokens"] = json!(6);
    let t0 = Instant::now();
    let r = client()
        .post(format!("{}/v1/chat/completions", router.url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut stream = r.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    let first_at = t0.elapsed();
    assert!(String::from_utf8_lossy(&first).starts_with("data: "));
    let mut rest = Vec::new();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    let done_at = t0.elapsed();
    assert!(String::from_utf8_lossy(&rest).ends_with("data: [DONE]\n\n"));
    // The first chunk reached us while at least 5 token delays (1.5 s) were still to come.
    assert!(
        done_at - first_at >= Duration::from_millis(1400),
        "first {first_at:?}, done {done_at:?}: stream was buffered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_gives_exactly_equal_counts_under_concurrency() {
    let sims = start_sims(3, &[]);
    let router = start_router(&urls(&sims), &["--policy", "round_robin"]);
    let c = client();
    let url = format!("{}/v1/chat/completions", router.url());
    let results = futures_util::stream::iter(0..60)
        .map(|i| {
            let c = c.clone();
            let url = url.clone();
            async move {
                let r = c
                    .post(&url)
                    .json(&chat_body(&format!("q{i}"), i % 2 == 0))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                let w = worker_of(&r);
                r.bytes().await.unwrap();
                w
            }
        })
        .buffer_unordered(12)
        .collect::<Vec<_>>()
        .await;
    let mut counts: HashMap<String, u32> = HashMap::new();
    for w in results {
        *counts.entry(w).or_default() += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(counts.values().all(|&n| n == 20), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_wasm_loads_the_example_policy_and_it_decides() {
    let wasm = example_policy_wasm();
    let sims = start_sims(3, &["--token-delay-ms", "100"]);
    let router = start_router(
        &urls(&sims),
        &[
            "--policy-wasm",
            wasm.to_str().unwrap(),
            "--policy-config",
            r#"{"tag":"e2e"}"#,
        ],
    );
    let c = client();
    // A long stream keeps one worker busy (in flight) ...
    let mut body = chat_body("long", true);
    body["max_tokens"] = json!(40);
    let busy = c
        .post(format!("{}/v1/chat/completions", router.url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    let busy_worker = worker_of(&busy);
    let mut busy_stream = busy.bytes_stream();
    busy_stream.next().await.unwrap().unwrap();
    // ... so least-in-flight never sends it the short requests (round_robin would).
    let mut seen = HashMap::<String, u32>::new();
    for i in 0..8 {
        let mut b = chat_body(&format!("short {i}"), false);
        b["max_tokens"] = json!(1);
        let r = c
            .post(format!("{}/v1/chat/completions", router.url()))
            .json(&b)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        *seen.entry(worker_of(&r)).or_default() += 1;
    }
    assert!(
        !seen.contains_key(&busy_worker),
        "busy worker {busy_worker} got traffic: {seen:?}"
    );
    assert_eq!(seen.len(), 2, "{seen:?}");
    // The router reports the custom policy's version in its metrics.
    let m = router_metrics(&router).await;
    assert!(
        m.contains("vllm_router_policy_info{")
            && m.contains("policy=\"least_inflight_policy\"")
            && m.contains("source=\"/"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_forwarded_echoed_and_generated() {
    let sims = start_sims(1, &[]);
    let router = start_router(&urls(&sims), &[]);
    let c = client();
    let url = format!("{}/v1/chat/completions", router.url());
    // Client id in x-request-id.
    let r = post_json(
        &c,
        &url,
        &[("x-request-id", "client-id-1")],
        &chat_body("a", false),
    )
    .await;
    assert_eq!(r.headers()["x-request-id"], "client-id-1");
    // Client id in a later header of --request-id-headers.
    let r = post_json(
        &c,
        &url,
        &[("x-correlation-id", "corr-7")],
        &chat_body("b", false),
    )
    .await;
    assert_eq!(r.headers()["x-request-id"], "corr-7");
    // None: generated, chat prefix.
    let r = post_json(&c, &url, &[], &chat_body("c", false)).await;
    let generated = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(
        generated.starts_with("chatcmpl-") && generated.len() > 20,
        "{generated}"
    );
    let seen = sim_requests(&sims[0]).await;
    let ids: Vec<&str> = seen
        .iter()
        .map(|r| {
            r["headers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|h| h[0] == "x-request-id")
                .unwrap()[1]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(ids, vec!["client-id-1", "corr-7", generated.as_str()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_4xx_is_passed_through_and_not_retried() {
    let sims = start_sims(2, &[]);
    let router = start_router(&urls(&sims), &[]);
    let r = client()
        .post(format!("{}/v1/chat/completions", router.url()))
        .header("x-sim-status", "404")
        .json(&chat_body("x", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("simulated failure 404"),
        "{v}"
    );
    let total = sim_requests(&sims[0]).await.len() + sim_requests(&sims[1]).await.len();
    assert_eq!(total, 1, "a 4xx must not be retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_503_is_retried_on_another_worker() {
    let sims = vec![
        start_sim("bad", &["--fail-status", "503"]),
        start_sim("good", &[]),
    ];
    let router = start_router(&urls(&sims), &["--policy", "round_robin"]);
    for _ in 0..4 {
        let r = client()
            .post(format!("{}/v1/chat/completions", router.url()))
            .json(&chat_body("x", false))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-vllm-sim-worker"], "good");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_gets_400_and_the_router_keeps_serving() {
    let sims = start_sims(1, &[]);
    let router = start_router(&urls(&sims), &[]);
    let c = client();
    let url = format!("{}/v1/chat/completions", router.url());
    for (body, code) in [
        ("{\"model\": ", "invalid_json"),
        ("[1,2,3]", "invalid_json"),
        ("", "empty_body"),
    ] {
        let r = c
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body:?}");
        assert!(r.headers().contains_key("x-request-id"));
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], code, "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().unwrap().len() > 10);
    }
    let r = c
        .post(&url)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let r = c
        .post(&url)
        .json(&chat_body("fine", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        sim_requests(&sims[0]).await.len() == 1,
        "bad requests must not reach the worker"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_max_payload_size_gets_413() {
    let sims = start_sims(1, &[]);
    let router = start_router(&urls(&sims), &["--max-payload-size", "1024"]);
    let big = chat_body(&"x".repeat(4096), false);
    let r = client()
        .post(format!("{}/v1/chat/completions", router.url()))
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "payload_too_large");
    let r = client()
        .post(format!("{}/v1/chat/completions", router.url()))
        .json(&chat_body("ok", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_workers_down_gives_503_and_recovery_follows() {
    let mut sims = start_sims(2, &[]);
    let router = start_router(&urls(&sims), &["--health-success-threshold", "1"]);
    let c = client();
    let url = format!("{}/v1/chat/completions", router.url());
    assert_eq!(
        c.post(&url)
            .json(&chat_body("a", false))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let port0 = sims[0].port;
    for s in sims.iter_mut() {
        s.kill();
    }
    for _ in 0..3 {
        let r = c
            .post(&url)
            .json(&chat_body("b", false))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "no_healthy_workers", "{v}");
    }
    let r = c
        .get(format!("{}/readiness", router.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    // A worker comes back on the same port: the health checker (1 s for unhealthy
    // workers) lets traffic flow again.
    let _back = {
        let mut child = std::process::Command::new(bin("vllm-sim"))
            .args(["--port", &port0.to_string(), "--worker-id", "back"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut ok = false;
        while Instant::now() < deadline {
            let r = c
                .post(&url)
                .json(&chat_body("c", false))
                .send()
                .await
                .unwrap();
            if r.status() == 200 {
                assert_eq!(r.headers()["x-vllm-sim-worker"], "back");
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(ok, "router did not recover when a worker came back");
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_keeps_sessions_on_one_worker_and_spreads_sessions() {
    let sims = start_sims(3, &[]);
    let router = start_router(&urls(&sims), &["--policy", "consistent_hash"]);
    let c = client();
    let url = format!("{}/v1/chat/completions", router.url());
    let mut owners = HashMap::<String, String>::new();
    for round in 0..3 {
        for s in 0..30 {
            let r = c
                .post(&url)
                .header("x-session-id", format!("session-{s}"))
                .json(&chat_body(&format!("turn {round}"), false))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let w = worker_of(&r);
            let prev = owners
                .entry(format!("session-{s}"))
                .or_insert_with(|| w.clone());
            assert_eq!(*prev, w, "session-{s} moved");
        }
    }
    let distinct: std::collections::HashSet<_> = owners.values().collect();
    assert_eq!(
        distinct.len(),
        3,
        "30 sessions should use all 3 workers: {owners:?}"
    );
    // No session key and no client request id: the same prompt text lands on one worker
    // (a router-generated request id must not become the key).
    let mut seen = std::collections::HashSet::new();
    for _ in 0..6 {
        let r = c
            .post(&url)
            .json(&chat_body("identical prompt", false))
            .send()
            .await
            .unwrap();
        seen.insert(worker_of(&r));
    }
    assert_eq!(seen.len(), 1, "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_of_two_steers_away_from_a_busy_worker() {
    let sims = start_sims(2, &["--token-delay-ms", "100"]);
    let router = start_router(&urls(&sims), &["--policy", "power_of_two"]);
    let c = client();
    let url = format!("{}/v1/chat/completions", router.url());
    // Three long streams in flight on whichever workers they land on ...
    let mut streams = Vec::new();
    let mut busy = HashMap::<String, u32>::new();
    for _ in 0..3 {
        let mut b = chat_body("long", true);
        b["max_tokens"] = json!(40);
        let r = c.post(&url).json(&b).send().await.unwrap();
        *busy.entry(worker_of(&r)).or_default() += 1;
        let mut s = r.bytes_stream();
        s.next().await.unwrap().unwrap();
        streams.push(s);
    }
    // ... with two workers, power of two compares both: the less loaded one gets every
    // short request.
    let (hot, cold) = if busy.get("w0").copied().unwrap_or(0) >= 2 {
        ("w0", "w1")
    } else {
        ("w1", "w0")
    };
    for _ in 0..6 {
        let mut b = chat_body("short", false);
        b["max_tokens"] = json!(1);
        let r = c.post(&url).json(&b).send().await.unwrap();
        assert_eq!(
            r.headers()["x-vllm-sim-worker"],
            cold,
            "hot worker {hot} chosen; in flight {busy:?}"
        );
    }
}
