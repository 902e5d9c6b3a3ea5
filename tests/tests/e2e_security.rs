//! End-to-end: the router's credentials towards workers (`--api-key`, as
//! vllm-project/router's flag) and CORS for browser clients (`--cors-allowed-origins`),
//! through the real binary. The simulator with `--api-key` answers 401 to generation
//! requests and `/health` probes without the key.

use serde_json::json;
use vllm_router_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_key_goes_to_workers_and_a_clients_own_authorization_is_kept() {
    let key = "worker-secret-123";
    let sims = start_sims(1, &["--api-key", key]);
    let with_key = start_router(
        &urls(&sims),
        &[
            "--api-key",
            key,
            "--worker-startup-timeout-secs",
            "10",
            "--log-level",
            "debug",
        ],
    );
    let c = client();
    // Health probes carry the key: the worker is healthy and serves.
    let r = post_completion(&c, &with_key, "hi").await;
    assert_eq!(r.status(), 200);
    let rec = sim_requests(&sims[0]).await;
    let auth = rec.last().unwrap()["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h[0] == "authorization")
        .map(|h| h[1].as_str().unwrap().to_string());
    assert_eq!(auth.as_deref(), Some("Bearer worker-secret-123"));
    // A client's own Authorization is forwarded as is (here: a wrong key → the worker's
    // 401 reaches the client), never replaced.
    let r = post_json(
        &c,
        &format!("{}/v1/completions", with_key.url()),
        &[("authorization", "Bearer client-own")],
        &json!({"model": "sim-model", "prompt": "x", "max_tokens": 1}),
    )
    .await;
    assert_eq!(r.status(), 401);
    // The key never reaches the log, even at debug level.
    assert!(
        with_key.log_matching(key).is_empty(),
        "the worker key was logged"
    );

    // Without --api-key the worker's health probe is refused: no healthy worker.
    let without = start_router(&urls(&sims), &["--worker-startup-timeout-secs", "0"]);
    let r = post_json(
        &c,
        &format!("{}/v1/completions", without.url()),
        &[],
        &json!({"model": "sim-model", "prompt": "x", "max_tokens": 1}),
    )
    .await;
    assert_eq!(
        r.status(),
        503,
        "a worker refusing the probes must not be used"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_answers_preflights_for_allowed_origins_only() {
    let sims = start_sims(1, &[]);
    let router = start_router(
        &urls(&sims),
        &["--cors-allowed-origins", "https://chat.example.com"],
    );
    let c = client();
    let pre = c
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/v1/chat/completions", router.url()),
        )
        .header("origin", "https://chat.example.com")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type,authorization",
        )
        .send()
        .await
        .unwrap();
    assert!(pre.status().is_success(), "{}", pre.status());
    assert_eq!(
        pre.headers()["access-control-allow-origin"],
        "https://chat.example.com"
    );
    let r = post_json(
        &c,
        &format!("{}/v1/completions", router.url()),
        &[("origin", "https://chat.example.com")],
        &json!({"model": "sim-model", "prompt": "x", "max_tokens": 1}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://chat.example.com"
    );
    // Another origin gets no allow header (the browser blocks it).
    let r = post_json(
        &c,
        &format!("{}/v1/completions", router.url()),
        &[("origin", "https://evil.example.com")],
        &json!({"model": "sim-model", "prompt": "x", "max_tokens": 1}),
    )
    .await;
    assert!(r.headers().get("access-control-allow-origin").is_none());
    // Without the flag: no CORS headers at all.
    let plain = start_router(&urls(&sims), &[]);
    let r = post_json(
        &c,
        &format!("{}/v1/completions", plain.url()),
        &[("origin", "https://chat.example.com")],
        &json!({"model": "sim-model", "prompt": "x", "max_tokens": 1}),
    )
    .await;
    assert!(r.headers().get("access-control-allow-origin").is_none());
}
