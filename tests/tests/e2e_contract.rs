//! End-to-end: the host does what `wit/policy.wit` says and what the README promises,
//! through the real binary. The `probe` test policy logs every host call it receives
//! (`probe init`, `probe workers-changed …`, `probe complete stage=… worker=… status=…`),
//! and the router's log is read back. Also: bodies are forwarded byte for byte (checked
//! on the raw bytes the simulator received, not on parsed JSON), the retry budget, one
//! load per hot swap, and the fleet's vLLM metrics on the serving port.

use serde_json::{Value, json};
use std::time::{Duration, Instant};
use vllm_router_tests::*;

const KEY: &str = "test-admin-key-0123456789";

/// Log level that shows policy log lines and the router's own info lines.
const POLICY_LOGS: &[&str] = &[
    "--log-level",
    "warn,vllm_router::app=info,vllm_router_runtime=info",
];

fn args<'a>(extra: &[&'a str], probe: &'a str) -> Vec<&'a str> {
    let mut a = vec!["--policy-wasm", probe];
    a.extend_from_slice(POLICY_LOGS);
    a.extend_from_slice(extra);
    a
}

/// Poll until `router` logged at least `n` lines containing `needle` (10 s).
async fn wait_lines(router: &Proc, needle: &str, n: usize) -> Vec<String> {
    wait_log(router, needle, n, Duration::from_secs(10)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_runs_once_per_load_and_on_complete_once_per_request_even_with_retries() {
    let sims = vec![
        start_sim("bad", &["--fail-status", "503"]),
        start_sim("good", &[]),
    ];
    let probe = policy_wasm("test_policy_probe");
    let router = start_router(
        &urls(&sims),
        &args(&["--no-watch"], probe.to_str().unwrap()),
    );
    let c = client();
    let n = 6;
    for i in 0..n {
        let r = post_json(
            &c,
            &format!("{}/v1/chat/completions", router.url()),
            &[],
            &chat_body(&format!("{i}"), i % 2 == 0),
        )
        .await;
        assert_eq!(r.status(), 200);
        assert_eq!(worker_of(&r), "good");
        let _ = r.text().await;
    }
    let done = wait_lines(&router, "probe complete", n).await;
    // The probe picks the lowest id: "bad" (503) first, then the retry goes to "good".
    // One completion per request, for the attempt that ended it (status 200).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let done_now = router.log_matching("probe complete");
    assert_eq!(done_now.len(), n, "{done:?}");
    assert!(
        done_now
            .iter()
            .all(|l| l.contains("stage=Regular") && l.contains("status=200")),
        "{done_now:?}"
    );
    assert_eq!(
        router.log_matching("probe init").len(),
        1,
        "init must run once per load (smoke test and serving share the instance)"
    );
    assert_eq!(router.log_matching("probe workers-changed n=2").len(), 1);
}

/// Contract 0.2's additions reach a guest through the real router: a body field by JSON
/// Pointer (into an array), the published hash (XXH3-64, the same value the SDK computes
/// natively) and engine load on demand, scraped from the simulators' `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_0_2_gives_json_pointer_published_hash_and_engine_load() {
    let sims = start_sims(2, &[]);
    let probe = policy_wasm("test_policy_probe");
    let router = start_router(
        &urls(&sims),
        &args(
            &["--no-watch", "--engine-metrics-interval-ms", "100"],
            probe.to_str().unwrap(),
        ),
    );
    let c = client();
    // Let the first engine scrape land so every candidate has a sample.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let body = json!({
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "metadata": {"tags": ["alpha", "beta/gamma"]},
    });
    let r = post_json(
        &c,
        &format!("{}/v1/chat/completions", router.url()),
        &[("x-probe", "0.2")],
        &body,
    )
    .await;
    assert_eq!(r.status(), 200);
    let _ = r.text().await;
    let line = wait_lines(&router, "probe v0.2", 1).await.remove(0);
    let hash = vllm_router_sdk::host::hash64(b"vllm-router");
    assert!(
        line.contains(r#"pointer=Some(\"beta/gamma\")"#)
            || line.contains(r#"pointer=Some("beta/gamma")"#),
        "{line}"
    );
    assert!(line.contains(&format!("hash={hash} ")), "{line}");
    assert!(line.contains("engine=true"), "{line}");
    let m = router_metrics(&router).await;
    assert_eq!(
        metric_sum(&m, "vllm_router_policy_failures_total", &[]),
        0.0
    );
}

/// A component built from contract 0.1 sources (committed bytes) keeps serving in this
/// router: decisions through real requests, with 0.1's engine list, and no fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_built_for_contract_0_1_still_routes() {
    let sims = start_sims(2, &[]);
    let old = fixture("contract-0.1.0/power_of_two.wasm");
    let router = start_router(
        &urls(&sims),
        &[
            "--policy-wasm",
            old.to_str().unwrap(),
            "--no-watch",
            "--engine-metrics-interval-ms",
            "100",
        ],
    );
    let c = client();
    let mut seen = std::collections::HashSet::new();
    for i in 0..40 {
        let r = post_completion(&c, &router, &format!("old contract {i}")).await;
        assert_eq!(r.status(), 200);
        seen.insert(worker_of(&r));
        let _ = r.text().await;
    }
    assert_eq!(
        seen.len(),
        2,
        "power_of_two spreads over both workers: {seen:?}"
    );
    let m = router_metrics(&router).await;
    assert_eq!(
        metric_sum(&m, "vllm_router_policy_failures_total", &[]),
        0.0
    );
    assert!(
        metric_sum(
            &m,
            "vllm_router_policy_decision_duration_seconds_count",
            &[]
        ) >= 40.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pd_feedback_reaches_both_slots_with_their_stage() {
    let p = start_sim("p0", &["--role", "prefill"]);
    let d = start_sim("d0", &["--role", "decode"]);
    let probe = policy_wasm("test_policy_probe");
    let router = start_router(
        &[],
        &args(
            &[
                "--vllm-pd-disaggregation",
                "--prefill",
                &p.url(),
                "--decode",
                &d.url(),
                "--no-watch",
            ],
            probe.to_str().unwrap(),
        ),
    );
    let c = client();
    for i in 0..3 {
        let _ = post_completion(&c, &router, &format!("x{i}"))
            .await
            .text()
            .await;
    }
    let pre = wait_lines(&router, "probe complete stage=Prefill", 3).await;
    let dec = wait_lines(&router, "probe complete stage=Decode", 3).await;
    assert_eq!(pre.len(), 3, "{pre:?}");
    assert_eq!(dec.len(), 3, "{dec:?}");
    assert!(router.log_matching("stage=Regular").is_empty());
    // Each slot's version was initialised once: prefill, decode, and the regular slot
    // that serves non-generation routes in PD mode.
    assert_eq!(router.log_matching("probe init").len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_worker_set_is_pushed_without_waiting_for_a_request() {
    let sims = start_sims(1, &[]);
    let extra = start_sim("late", &[]);
    let probe = policy_wasm("test_policy_probe");
    let router = start_router(
        &urls(&sims),
        &args(
            &["--no-watch", "--admin-api-key", KEY],
            probe.to_str().unwrap(),
        ),
    );
    assert_eq!(router.log_matching("probe workers-changed n=1").len(), 1);
    let r = client()
        .post(format!("{}/add_worker?url={}", router.url(), extra.url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // No client request was sent: the push came from the registry's publish.
    let pushed = wait_lines(&router, "probe workers-changed n=2", 1).await;
    assert_eq!(pushed.len(), 1);
}

/// The raw bytes of the last request `sim` recorded.
async fn last_raw(sim: &Proc) -> String {
    let r = sim_requests(sim).await;
    r.last().expect("a recorded request")["raw"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Odd key order and spacing, an escaped `é`, a 30-digit integer and `1.0e-7`: any
/// re-serialisation would change at least one of them.
const ODD_COMPLETION: &str = "{ \"prompt\" :\"caf\\u00e9 \",\n  \"max_tokens\":2, \"seed\": 123456789012345678901234567890,\"temperature\": 1.0e-7 , \"model\":\"sim-model\"}";
const ODD_CHAT: &str = "{\"messages\":[ {\"content\":\"caf\\u00e9\",\"role\":\"user\"} ],\"top_p\":1.0e-7,\"model\":\"sim-model\",\"logit_bias\":{\"42\":123456789012345678901234567890}, \"max_tokens\":2}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_forwarded_byte_for_byte() {
    let sims = start_sims(1, &[]);
    let router = start_router(&urls(&sims), &[]);
    let c = client();
    for (path, body) in [
        ("/v1/completions", ODD_COMPLETION),
        ("/v1/chat/completions", ODD_CHAT),
    ] {
        let r = c
            .post(format!("{}{path}", router.url()))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(last_raw(&sims[0]).await, body, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pd_decode_gets_the_client_bytes_plus_the_handoff() {
    let p = start_sim("p0", &["--role", "prefill"]);
    let d = start_sim("d0", &["--role", "decode"]);
    let router = start_router(
        &[],
        &[
            "--vllm-pd-disaggregation",
            "--prefill",
            &p.url(),
            "--decode",
            &d.url(),
        ],
    );
    let r = client()
        .post(format!("{}/v1/completions", router.url()))
        .header("content-type", "application/json")
        .body(ODD_COMPLETION)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let raw = last_raw(&d).await;
    let head = &ODD_COMPLETION[..ODD_COMPLETION.rfind('}').unwrap()];
    assert!(
        raw.starts_with(head),
        "decode body changed the client's bytes:\n{raw}"
    );
    assert!(raw.ends_with('}'));
    let v: Value = serde_json::from_str(&raw).unwrap();
    assert!(v.get("kv_transfer_params").is_some(), "{raw}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_refuses_retries_and_the_workers_answer_goes_to_the_client() {
    let sims = vec![
        start_sim("bad", &["--fail-status", "503"]),
        start_sim("good", &[]),
    ];
    let router = start_router(
        &urls(&sims),
        &[
            "--policy",
            "round_robin",
            "--retry-budget-ratio",
            "0",
            "--retry-budget-min-per-sec",
            "0",
        ],
    );
    let c = client();
    let mut statuses = Vec::new();
    for i in 0..4 {
        let r = post_json(
            &c,
            &format!("{}/v1/completions", router.url()),
            &[],
            &json!({"model": "sim-model", "prompt": format!("{i}"), "max_tokens": 1}),
        )
        .await;
        statuses.push(r.status().as_u16());
    }
    // Round robin alternates: the two requests that hit "bad" get its 503 (no retry).
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 200, 503, 503]);
    let m = router_metrics(&router).await;
    assert_eq!(
        metric_sum(&m, "vllm_router_retries_refused_total", &[]),
        2.0,
        "{m}"
    );
    assert_eq!(metric_sum(&m, "vllm_router_retries_total", &[]), 0.0);
    assert_eq!(sim_requests(&sims[1]).await.len(), 2);
}

/// A router serving `policy.wasm` (a copy of `pick_first`) from a fresh temp dir it
/// watches with `debounce_ms`; returns the dir (kept alive), the file, and the router.
fn watched_policy_router(
    sims: &[Proc],
    tag: &str,
    debounce_ms: &str,
) -> (TempDir, std::path::PathBuf, Proc) {
    let dir = TempDir::new(tag);
    let live = dir.join("policy.wasm");
    std::fs::copy(policy_wasm("test_policy_pick_first"), &live).unwrap();
    let router = start_router(
        &urls(sims),
        &[
            "--policy-wasm",
            live.to_str().unwrap(),
            "--watch-debounce-ms",
            debounce_ms,
        ],
    );
    (dir, live, router)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_swap_loads_once_and_an_idle_watcher_stays_idle() {
    let sims = start_sims(2, &[]);
    let (_dir, live, router) = watched_policy_router(&sims, "swap-once", "50");
    let c = client();
    let url = format!("{}/v1/completions", router.url());
    let body = json!({"model": "sim-model", "prompt": "x", "max_tokens": 1});
    assert_eq!(worker_of(&post_json(&c, &url, &[], &body).await), "w0");
    std::fs::write(
        &live,
        std::fs::read(policy_wasm("test_policy_pick_last")).unwrap(),
    )
    .unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while worker_of(&post_json(&c, &url, &[], &body).await) != "w1" {
        assert!(Instant::now() < end, "swap not seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The router's own reads of the file must not trigger more loads.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let m = router_metrics(&router).await;
    let loads = |result: &str| {
        metric_sum(
            &m,
            "vllm_router_policy_reloads_total",
            &[&format!("result=\"{result}\"")],
        )
    };
    assert_eq!(loads("loaded"), 1.0, "{m}");
    assert_eq!(
        loads("unchanged"),
        0.0,
        "the watcher reacts to its own reads:\n{m}"
    );
    assert_eq!(loads("error"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_metrics_on_the_serving_port_sums_the_fleets_vllm_metrics() {
    let sims = start_sims(2, &[]);
    let router = start_router(&urls(&sims), &["--policy", "round_robin"]);
    let c = client();
    for i in 0..6 {
        post_completion(&c, &router, &format!("{i}")).await;
    }
    let mut per_worker = 0.0;
    for s in &sims {
        let t = metrics_text(&format!("{}/metrics", s.url())).await;
        per_worker += metric_sum(&t, "vllm:request_success_total", &[]);
    }
    assert!(per_worker >= 6.0);
    for _ in 0..3 {
        // The same answer every time (it used to be a different worker's each call).
        let fleet = c
            .get(format!("{}/metrics", router.url()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(fleet.starts_with("# vllm-router: fleet metrics summed over 2 of 2 workers"));
        assert_eq!(
            metric_sum(&fleet, "vllm:request_success_total", &[]),
            per_worker,
            "{fleet}"
        );
        assert_eq!(
            fleet.matches("# TYPE vllm:request_success_total").count(),
            1
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_fault_is_logged_with_its_cause_first() {
    let sims = start_sims(2, &[]);
    let hostile = policy_wasm("test_policy_hostile");
    let router = start_router(
        &urls(&sims),
        &[
            "--policy-wasm",
            hostile.to_str().unwrap(),
            "--policy-config",
            r#"{"mode":"panic"}"#,
            "--no-watch",
            "--log-level",
            "warn,vllm_router::app=info",
        ],
    );
    post_completion(&client(), &router, "x").await;
    // The SDK sends the panic text to the router's log...
    let panicked = wait_lines(&router, "hostile policy panics on purpose", 1).await;
    assert!(!panicked.is_empty(), "{:?}", router.log_matching("policy"));
    // ...and the fault line names the trap before the wasm backtrace.
    let fault = wait_lines(&router, "policy failed (trap:", 1).await;
    let line = &fault[0];
    let cause = line
        .find("unreachable")
        .expect("trap cause in the fault line");
    if let Some(bt) = line.find("wasm backtrace") {
        assert!(cause < bt, "cause after the backtrace: {line}");
    }
}

/// A Kubernetes ConfigMap volume: `policy.wasm -> ..data/policy.wasm`, `..data ->
/// ..2026_…` (a timestamped directory); kubelet updates it by writing a new directory and
/// renaming a `..data_tmp` symlink over `..data`. No event names `policy.wasm`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_style_symlink_swap_is_a_hot_swap() {
    use std::os::unix::fs::symlink;
    let sims = start_sims(2, &[]);
    let dir = TempDir::new("configmap");
    std::fs::create_dir(dir.join("..v1")).unwrap();
    std::fs::copy(
        policy_wasm("test_policy_pick_first"),
        dir.join("..v1/policy.wasm"),
    )
    .unwrap();
    symlink("..v1", dir.join("..data")).unwrap();
    symlink("..data/policy.wasm", dir.join("policy.wasm")).unwrap();
    let live = dir.join("policy.wasm");
    let router = start_router(
        &urls(&sims),
        &[
            "--policy-wasm",
            live.to_str().unwrap(),
            "--watch-debounce-ms",
            "50",
        ],
    );
    let c = client();
    assert_eq!(worker_of(&post_completion(&c, &router, "a").await), "w0");
    std::fs::create_dir(dir.join("..v2")).unwrap();
    std::fs::copy(
        policy_wasm("test_policy_pick_last"),
        dir.join("..v2/policy.wasm"),
    )
    .unwrap();
    symlink("..v2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while worker_of(&post_completion(&c, &router, "b").await) != "w1" {
        assert!(
            Instant::now() < end,
            "the ConfigMap-style swap was not seen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = router_metrics(&router).await;
    assert_eq!(
        metric_sum(
            &m,
            "vllm_router_policy_reloads_total",
            &["result=\"loaded\""]
        ),
        1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_files_changing_beside_a_policy_do_not_reload_it() {
    let sims = start_sims(1, &[]);
    let (dir, _live, router) = watched_policy_router(&sims, "busy-dir", "20");
    // A log file and temp files written next to the policy, as a quickstart or an
    // operator's shell would.
    for i in 0..20 {
        std::fs::write(dir.join("router.log"), format!("line {i}\n")).unwrap();
        std::fs::write(dir.join(&format!("tmp{i}")), b"x").unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = router_metrics(&router).await;
    assert_eq!(
        metric_sum(&m, "vllm_router_policy_reloads_total", &[]),
        0.0,
        "{m}"
    );
}
