//! End-to-end: hot swap under load, A/B split, sticky arms, shadow agreement and the
//! admin API, through the real binary. Two test policies make the serving version
//! visible to the workers: `pick_first` always routes to w0, `pick_last` to w1.

use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vllm_router_tests::*;

const KEY: &str = "test-admin-key-0123456789";

async fn probe_worker(c: &reqwest::Client, router: &Proc) -> String {
    let r = post_json(
        c,
        &format!("{}/v1/completions", router.url()),
        &[],
        &json!({"model": "sim-model", "prompt": "probe", "max_tokens": 1}),
    )
    .await;
    assert_eq!(r.status(), 200);
    worker_of(&r)
}

/// Replace `dst` with `src`'s bytes, by atomic rename (`mv`) or in place (`cp`).
fn install(src: &[u8], dst: &Path, by_rename: bool) {
    if by_rename {
        let tmp = dst.with_extension("tmp");
        std::fs::write(&tmp, src).unwrap();
        std::fs::rename(&tmp, dst).unwrap();
    } else {
        std::fs::write(dst, src).unwrap();
    }
}

/// A router with `pick_first` as the main policy and `pick_last` as arm `b`.
fn ab_router(sims: &[Proc], extra: &[&str]) -> Proc {
    let first = policy_wasm("test_policy_pick_first");
    let last = policy_wasm("test_policy_pick_last");
    let mut args = vec![
        "--policy-wasm",
        first.to_str().unwrap(),
        "--ab-policy-wasm",
        last.to_str().unwrap(),
        "--no-watch",
    ];
    args.extend_from_slice(extra);
    start_router(&urls(sims), &args)
}

/// Send an admin call with the test's bearer token.
async fn admin_send(rb: reqwest::RequestBuilder) -> reqwest::Response {
    rb.bearer_auth(KEY).send().await.unwrap()
}

async fn admin(c: &reqwest::Client, router: &Proc) -> Value {
    admin_send(c.get(format!("{}/admin/policies", router.url())))
        .await
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swap_under_load_never_fails_a_request_and_keeps_the_last_good_version() {
    let sims = start_sims(2, &[]);
    let dir = TempDir::new("swap");
    let policy = dir.join("policy.wasm");
    let first = std::fs::read(policy_wasm("test_policy_pick_first")).unwrap();
    let last = std::fs::read(policy_wasm("test_policy_pick_last")).unwrap();
    let broken: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", first[..first.len() / 2].to_vec()),
        (
            "random bytes",
            (0..4096u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect(),
        ),
        (
            "other world",
            std::fs::read(policy_wasm("other_world")).unwrap(),
        ),
        (
            "init fails",
            std::fs::read(policy_wasm("test_policy_hostile")).unwrap(),
        ),
        ("empty", Vec::new()),
    ];
    std::fs::write(&policy, &first).unwrap();
    let router = start_router(
        &urls(&sims),
        &[
            "--policy-wasm",
            policy.to_str().unwrap(),
            "--watch-debounce-ms",
            "20",
            "--admin-api-key",
            KEY,
        ],
    );
    let c = client();
    assert_eq!(probe_worker(&c, &router).await, "w0");

    // Continuous load: 4 clients, streaming and not.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = Vec::new();
    for i in 0..4 {
        let (stop, sent, failed, url) = (stop.clone(), sent.clone(), failed.clone(), router.url());
        load.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::Relaxed) {
                let stream = i % 2 == 0;
                let r = c
                    .post(format!("{url}/v1/chat/completions"))
                    .json(&chat_body("load", stream))
                    .send()
                    .await;
                sent.fetch_add(1, Ordering::Relaxed);
                let ok = match r {
                    Ok(r) if r.status() == 200 => {
                        let body = r.text().await.unwrap_or_default();
                        !stream || body.contains("[DONE]")
                    }
                    _ => false,
                };
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }

    let mut serving = "w0";
    let mut broken_done = 0;
    for i in 0..100 {
        // Every 10th swap first installs a broken file: the last good version must keep
        // serving and the error must show in the admin API.
        if i % 10 == 5 {
            let (what, bytes) = &broken[broken_done % broken.len()];
            broken_done += 1;
            let before = admin(&c, &router).await["slots"][0]["last_reload"]["at_unix_s"].clone();
            install(bytes, &policy, i % 20 == 5);
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let a = admin(&c, &router).await;
                let lr = &a["slots"][0]["last_reload"];
                if lr["result"] == "error" {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "broken file ({what}) not reported: {a}"
                );
                let _ = &before;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            for _ in 0..3 {
                assert_eq!(
                    probe_worker(&c, &router).await,
                    serving,
                    "after broken file ({what})"
                );
            }
        }
        let (bytes, expect) = if serving == "w0" {
            (&last, "w1")
        } else {
            (&first, "w0")
        };
        install(bytes, &policy, i % 2 == 0);
        let deadline = Instant::now() + Duration::from_secs(5);
        while probe_worker(&c, &router).await != expect {
            assert!(
                Instant::now() < deadline,
                "swap {i} to {expect} not seen within 5 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        serving = expect;
    }
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let (sent, failed) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(sent > 100, "load generator sent only {sent}");
    assert_eq!(
        failed, 0,
        "{failed} of {sent} client requests failed during hot swaps"
    );
    let m = router_metrics(&router).await;
    assert!(
        metric_sum(
            &m,
            "vllm_router_policy_reloads_total",
            &["result=\"loaded\""]
        ) >= 100.0
    );
    assert!(
        metric_sum(
            &m,
            "vllm_router_policy_reloads_total",
            &["result=\"error\""]
        ) >= 10.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ab_split_follows_the_weights_and_is_labelled_per_arm() {
    let sims = start_sims(2, &[]);
    let router = ab_router(&sims, &["--ab-percent", "30"]);
    let c = client();
    let mut count: HashMap<String, u32> = HashMap::new();
    let n = 1000;
    for _ in 0..n {
        *count.entry(probe_worker(&c, &router).await).or_default() += 1;
    }
    let b = *count.get("w1").unwrap_or(&0) as f64 / n as f64;
    // Binomial sd at p = 0.3, n = 1000 is 0.0145; allow 3.4 sd.
    assert!(
        (b - 0.30).abs() < 0.05,
        "arm b got {b:.3} of requests: {count:?}"
    );
    let m = router_metrics(&router).await;
    let arm_b = metric_sum(
        &m,
        "vllm_router_requests_total",
        &["slot=\"b\"", "status=\"200\""],
    );
    assert_eq!(arm_b as u32, count["w1"], "per-arm request counter");
    assert!(m.contains("vllm_router_policy_info{") && m.contains("slot=\"b\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_ab_keeps_a_session_on_one_arm() {
    let sims = start_sims(2, &[]);
    let router = ab_router(&sims, &["--ab-percent", "50", "--ab-sticky"]);
    let c = client();
    let url = format!("{}/v1/chat/completions", router.url());
    let mut arms = HashMap::new();
    for s in 0..40 {
        let session = format!("session-{s}");
        let mut seen = std::collections::HashSet::new();
        for t in 0..5 {
            let r = post_json(
                &c,
                &url,
                &[("x-session-id", &session)],
                &chat_body(&format!("turn {t}"), false),
            )
            .await;
            seen.insert(worker_of(&r));
        }
        assert_eq!(seen.len(), 1, "{session} flipped arms: {seen:?}");
        *arms.entry(seen.into_iter().next().unwrap()).or_insert(0) += 1;
    }
    assert_eq!(arms.len(), 2, "40 sessions all on one arm: {arms:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_decides_but_is_never_acted_on_and_agreement_is_counted() {
    let sims = start_sims(2, &[]);
    let first = policy_wasm("test_policy_pick_first");
    let last = policy_wasm("test_policy_pick_last");
    let router = start_router(
        &urls(&sims),
        &[
            "--policy-wasm",
            first.to_str().unwrap(),
            "--shadow-policy-wasm",
            last.to_str().unwrap(),
            "--no-watch",
            "--admin-api-key",
            KEY,
        ],
    );
    let c = client();
    for _ in 0..20 {
        assert_eq!(probe_worker(&c, &router).await, "w0");
    }
    let m = router_metrics(&router).await;
    assert_eq!(
        metric_sum(
            &m,
            "vllm_router_shadow_decisions_total",
            &["agreement=\"disagree\""]
        ),
        20.0
    );
    // Replace the shadow with one that agrees.
    let r = admin_send(
        c.put(format!("{}/admin/policies/shadow", router.url()))
            .json(&json!({"path": first})),
    )
    .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    for _ in 0..10 {
        assert_eq!(probe_worker(&c, &router).await, "w0");
    }
    let m = router_metrics(&router).await;
    assert_eq!(
        metric_sum(
            &m,
            "vllm_router_shadow_decisions_total",
            &["agreement=\"agree\""]
        ),
        10.0
    );
    let a = admin(&c, &router).await;
    let shadow = a["slots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "shadow")
        .unwrap();
    assert_eq!(shadow["shadow_agreements"], 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_is_off_by_default_and_needs_the_token() {
    let sims = start_sims(2, &[]);
    let off = start_router(&urls(&sims), &[]);
    let c = client();
    let r = admin_send(c.get(format!("{}/admin/policies", off.url()))).await;
    assert_eq!(r.status(), 404);
    let r = c
        .post(format!("{}/add_worker?url=http://127.0.0.1:1", off.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    let router = start_router(
        &urls(&sims),
        &["--admin-api-key", KEY, "--policy", "round_robin"],
    );
    let base = router.url();
    let r = c
        .get(format!("{base}/admin/policies"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_admin_token");
    let r = c
        .get(format!("{base}/admin/policies"))
        .bearer_auth("wrong-key-wrong-key-wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let a = admin(&c, &router).await;
    assert_eq!(a["slots"][0]["name"], "default");
    assert_eq!(a["slots"][0]["policy"], "round_robin");

    // A failed load changes nothing and says why.
    let r = admin_send(
        c.put(format!("{base}/admin/policies/default"))
            .json(&json!({"path": "/nonexistent/policy.wasm"})),
    )
    .await;
    assert_eq!(r.status(), 422);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cannot read"),
        "{body}"
    );
    let pin = admin_send(
        c.put(format!("{base}/admin/policies/default"))
            .json(&json!({"builtin": "random", "sha256": "00ff"})),
    )
    .await;
    assert_eq!(pin.status(), 422);
    assert_eq!(
        admin(&c, &router).await["slots"][0]["policy"],
        "round_robin"
    );

    // Add an arm, split, promote, remove.
    let r =
        admin_send(c.put(format!("{base}/admin/policies/canary")).json(
            &json!({"builtin": "cache_aware", "config": {"cache_threshold": 0.5}, "weight": 0}),
        ))
        .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let r = admin_send(
        c.put(format!("{base}/admin/weights"))
            .json(&json!({"default": 0, "canary": 0})),
    )
    .await;
    assert_eq!(r.status(), 400, "all-zero weights must be refused");
    let r = admin_send(c.post(format!("{base}/admin/policies/canary/promote"))).await;
    assert_eq!(r.status(), 200);
    let a = admin(&c, &router).await;
    let w: HashMap<String, u64> = a["slots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["weight"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(w["canary"], 100);
    assert_eq!(w["default"], 0);
    for i in 0..5 {
        let r = post_json(
            &c,
            &format!("{base}/v1/chat/completions"),
            &[],
            &chat_body(&format!("x{i}"), false),
        )
        .await;
        assert_eq!(r.status(), 200);
    }
    let m = router_metrics(&router).await;
    assert_eq!(
        metric_sum(&m, "vllm_router_requests_total", &["slot=\"canary\""]),
        5.0
    );
    let r = admin_send(c.delete(format!("{base}/admin/policies/canary"))).await;
    assert_eq!(
        r.status(),
        409,
        "removing the only serving arm must be refused"
    );
    let r = admin_send(c.delete(format!("{base}/admin/policies/default"))).await;
    assert_eq!(r.status(), 200);

    // Worker membership.
    let extra = start_sim("w9", &[]);
    let r = admin_send(c.post(format!("{base}/add_worker?url={}", extra.url()))).await;
    assert_eq!(r.status(), 200);
    let l: Value = get_json(&c, &format!("{base}/list_workers")).await;
    assert_eq!(l["urls"].as_array().unwrap().len(), 3);
    let r = admin_send(c.post(format!("{base}/add_worker?url=http://127.0.0.1:1"))).await;
    assert_eq!(
        r.status(),
        400,
        "a worker that does not answer /health is not added"
    );
    let r = admin_send(c.post(format!("{base}/remove_worker?url={}", extra.url()))).await;
    assert_eq!(r.status(), 200);
    let l: Value = get_json(&c, &format!("{base}/list_workers")).await;
    assert_eq!(l["urls"].as_array().unwrap().len(), 2);
}
