//! End-to-end: policies written in every supported language, and the grant-nothing WASI
//! they run in, through the real binary.
//!
//! - `wasi_user` (std Rust) prints, reads its arguments, environment, stdin and a file,
//!   and sleeps: all of it runs (no trap), and it is granted nothing.
//! - The same example policy (`examples/policies/*`: fewest in-flight, skip workers whose
//!   engine queue exceeds `max_waiting`, log once at init) written in Go, C, JavaScript
//!   and Python, built by `examples/policies/build-all.sh` (which `tests/run.sh` runs),
//!   decides real requests with no policy fault.

use std::time::{Duration, Instant};
use vllm_router_tests::*;

/// Poll until `router` logged a line containing `needle` (30 s: interpreted components
/// compile for seconds).
async fn wait_line(router: &Proc, needle: &str) -> Vec<String> {
    wait_log(router, needle, 1, Duration::from_secs(30)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_std_guest_may_print_and_look_around_and_is_granted_nothing() {
    let sims = start_sims(2, &[]);
    let wasm = policy_wasm("test_policy_wasi_user");
    let router = start_router(
        &urls(&sims),
        &[
            "--policy-wasm",
            wasm.to_str().unwrap(),
            "--no-watch",
            "--log-level",
            "warn,vllm_router::app=info,vllm_router_runtime=info",
        ],
    );
    let c = client();
    for i in 0..5 {
        let r = post_completion(&c, &router, &format!("hello {i}")).await;
        assert_eq!(r.status(), 200);
        // Lowest id: the policy decided (a fault would fall back to least in-flight,
        // which spreads sequential requests too, so check the fault counter below).
        assert_eq!(worker_of(&r), "w0");
    }
    // stdout reached the log, tagged with the policy, showing nothing was granted.
    let init = wait_line(&router, "wasi-user init:").await;
    assert!(!init.is_empty(), "no stdout line in the log");
    assert!(
        init[0].contains("args=0 env=0 file=denied"),
        "granted something: {}",
        init[0]
    );
    assert!(init[0].contains("test_policy_wasi_user@"), "{}", init[0]);
    let stderr = wait_line(&router, "wasi-user stderr line").await;
    assert!(
        stderr[0].contains("WARN"),
        "stderr is a warning: {}",
        stderr[0]
    );
    assert!(
        !wait_line(&router, "wasi-user stdin bytes=0")
            .await
            .is_empty()
    );
    assert!(
        !wait_line(&router, "wasi-user first request")
            .await
            .is_empty()
    );
    // The router's own metrics (its metrics port; the serving port's /metrics is the
    // fleet's vLLM metrics, where these series never appear).
    let m = router_metrics(&router).await;
    assert!(
        metric_sum(&m, "vllm_router_worker_requests_total", &[]) > 0.0,
        "not the router's metrics: {m}"
    );
    assert_eq!(
        metric_sum(&m, "vllm_router_policy_failures_total", &[]),
        0.0
    );
}

/// The component `tests/build_language_policies.sh` built for `lang`.
fn language_policy(lang: &str) -> std::path::PathBuf {
    let p = workspace_root().join(format!(
        "target/lang-policies/least_{lang}/least_{lang}.wasm"
    ));
    assert!(
        p.is_file(),
        "{} is missing: run tests/build_language_policies.sh (tests/run.sh does)",
        p.display()
    );
    p
}

/// Requests per language in the load phase: `VLLM_ROUTER_LANG_REQUESTS` (the bench
/// sets 20000), default 400.
fn load_requests() -> usize {
    std::env::var("VLLM_ROUTER_LANG_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400)
}

/// The example policy in `lang`, through the real router: its init line is logged, idle
/// sequential requests all go to the lowest id (its tie rule; the router's fallback
/// would spread them), then a concurrent phase of 4 KiB prompts ends with every request
/// answered and no policy fault, decline or fallback.
async fn example_policy_decides(lang: &str) {
    let wasm = language_policy(lang);
    // Interpreted guests pause for their GC: a 50 ms budget, as documented for them.
    let budget = if matches!(lang, "js" | "python") {
        "50"
    } else {
        "5"
    };
    let sims = start_sims(3, &[]);
    let router = start_router(
        &urls(&sims),
        &[
            "--policy-wasm",
            wasm.to_str().unwrap(),
            "--policy-config",
            r#"{"max_waiting": 4}"#,
            "--policy-timeout-ms",
            budget,
            "--no-watch",
            "--log-level",
            "warn,vllm_router::app=info,vllm_router_runtime=info",
        ],
    );
    let init = wait_line(
        &router,
        &format!("least_{lang} ({lang}) ready, max_waiting=4"),
    )
    .await;
    assert!(
        !init.is_empty(),
        "{lang}: no init line: {:?}",
        router.log_matching("policy")
    );
    let c = client();
    for i in 0..10 {
        let r = post_completion(&c, &router, &format!("idle {i}")).await;
        assert_eq!(worker_of(&r), "w0", "{lang}: idle request {i}");
    }
    let n = load_requests();
    let prompt: String = "routing policies in every language. ".repeat(4096 / 36);
    let started = Instant::now();
    let ok = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..8 {
        let (c, url, ok, prompt) = (c.clone(), router.url(), ok.clone(), prompt.clone());
        tasks.push(tokio::spawn(async move {
            for i in (t..n).step_by(8) {
                let body = serde_json::json!({
                    "model": "sim-model",
                    "messages": [{"role": "user", "content": format!("{i} {prompt}")}],
                    "max_tokens": 1,
                });
                let r = post_json(&c, &format!("{url}/v1/chat/completions"), &[], &body).await;
                if r.status() == 200 {
                    ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let answered = ok.load(std::sync::atomic::Ordering::Relaxed);
    // The router's own metrics (its metrics port; the serving port's /metrics is the
    // fleet's vLLM metrics, where these series never appear).
    let m = router_metrics(&router).await;
    assert!(
        metric_sum(&m, "vllm_router_worker_requests_total", &[]) > 0.0,
        "not the router's metrics: {m}"
    );
    let faults = metric_sum(&m, "vllm_router_policy_failures_total", &[]);
    let fallbacks = metric_sum(&m, "vllm_router_policy_fallbacks_total", &[]);
    eprintln!(
        "{lang}: {answered}/{n} answered in {:.1} s, {} policy faults, {} fallbacks",
        started.elapsed().as_secs_f64(),
        faults.abs(),
        fallbacks.abs()
    );
    assert_eq!(answered, n, "{lang}: requests failed");
    assert_eq!(faults, 0.0, "{lang}: policy faults");
    assert_eq!(
        fallbacks, 0.0,
        "{lang}: the router's fallback decided some requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_policy_in_rust_decides() {
    example_policy_decides("rust").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_policy_in_go_decides() {
    example_policy_decides("go").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_policy_in_c_decides() {
    example_policy_decides("c").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_policy_in_js_decides() {
    example_policy_decides("js").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_policy_in_python_decides() {
    example_policy_decides("python").await;
}
