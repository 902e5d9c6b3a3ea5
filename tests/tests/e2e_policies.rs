//! End-to-end checks of the built-in policies through the real binary: cache_aware's
//! prefix affinity, every built-in loaded from a file, and engine load scraped from the
//! workers' `/metrics` reaching the policy.

use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use vllm_router_tests::*;

fn conversation(sys: &str, turns: &[(&str, &str)]) -> Value {
    let mut msgs = vec![json!({"role": "system", "content": sys})];
    for (u, a) in turns {
        msgs.push(json!({"role": "user", "content": u}));
        if !a.is_empty() {
            msgs.push(json!({"role": "assistant", "content": a}));
        }
    }
    json!({"model": "sim-model", "messages": msgs, "max_tokens": 2})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_aware_keeps_conversations_and_spreads_new_ones() {
    let sims = start_sims(3, &[]);
    let router = start_router(&urls(&sims), &["--policy", "cache_aware"]);
    let c = client();
    let url = format!("{}/v1/chat/completions", router.url());
    let sys = "You are a meticulous assistant. Answer with care and cite sources. ".repeat(3);
    let mut owner = HashMap::new();
    for conv in 0..9 {
        let q1 = format!("conversation {conv}: explain topic number {conv} in depth");
        let mut history = vec![(q1.as_str(), "")];
        let r = post_json(&c, &url, &[], &conversation(&sys, &history)).await;
        assert_eq!(r.status(), 200);
        owner.insert(conv, worker_of(&r));
        history[0].1 = "a long and careful answer about the topic";
        history.push(("please go on with more detail", ""));
        let r = post_json(&c, &url, &[], &conversation(&sys, &history)).await;
        assert_eq!(
            worker_of(&r),
            owner[&conv],
            "turn 2 of conversation {conv} moved"
        );
        // The simulated engine confirms the prefix was cached there.
        let cached: u64 = r.headers()["x-sim-cached-tokens"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(cached > 0, "turn 2 had no prefix-cache hit");
    }
    let used: HashSet<&String> = owner.values().collect();
    assert_eq!(
        used.len(),
        3,
        "a shared system prompt piled conversations: {owner:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_builtin_loads_from_a_file_and_serves() {
    let sims = start_sims(2, &[]);
    let dir = std::env::temp_dir().join(format!("vr-builtins-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let c = client();
    for name in [
        "round_robin",
        "random",
        "consistent_hash",
        "power_of_two",
        "cache_aware",
    ] {
        let path = dir.join(format!("{name}.wasm"));
        let out = std::process::Command::new(bin("vllm-router"))
            .arg("--export-policy")
            .arg(format!("{name}={}", path.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let router = start_router(&urls(&sims), &["--policy-wasm", path.to_str().unwrap()]);
        for i in 0..4 {
            let r = post_json(
                &c,
                &format!("{}/v1/chat/completions", router.url()),
                &[],
                &chat_body(&format!("hello {i}"), false),
            )
            .await;
            assert_eq!(r.status(), 200, "{name}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_queue_from_worker_metrics_steers_power_of_two() {
    let busy = start_sim("busy", &["--waiting", "40"]);
    let idle = start_sim("idle", &[]);
    let router = start_router(
        &[busy.url(), idle.url()],
        &[
            "--policy",
            "power_of_two",
            "--engine-metrics-interval-ms",
            "100",
        ],
    );
    let c = client();
    // Wait for a scrape round (100 ms interval).
    tokio::time::sleep(Duration::from_millis(600)).await;
    for _ in 0..20 {
        let r = post_json(
            &c,
            &format!("{}/v1/completions", router.url()),
            &[],
            &json!({"model": "sim-model", "prompt": "x", "max_tokens": 1}),
        )
        .await;
        assert_eq!(
            worker_of(&r),
            "idle",
            "a worker with 40 queued requests was chosen"
        );
    }
}
