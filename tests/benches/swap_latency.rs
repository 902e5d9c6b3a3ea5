//! Hot-swap latency: from the atomic rename of a new policy file to the first request
//! decided by the new version (debounce, read, hash, compile, instantiate, `init`, smoke
//! test, state hand-off and publish included), with the default `--watch-debounce-ms`.
//! Two test policies make the serving version visible: `pick_first` routes to w0,
//! `pick_last` to w1; a client polls with back-to-back requests.
//!
//! Two cases: **new** bytes every time (a custom section with a counter is appended, so
//! each swap compiles; the case of shipping a new policy) and **rollback** to bytes the
//! router has compiled before (served from its compiled-component cache).
//!
//! Run: `cargo build --release --workspace && bash tests/run.sh`-built test policies, then
//! `cargo bench -p vllm-router-tests --bench swap_latency` (≈10 s). Prints a summary.

use std::time::{Duration, Instant};
use vllm_router_tests::*;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds = 30;
    let sims = start_sims(2, &["--record", "false"]);
    let dir = TempDir::new("swap-bench");
    let policy = dir.join("policy.wasm");
    let first = std::fs::read(policy_wasm("test_policy_pick_first")).unwrap();
    let last = std::fs::read(policy_wasm("test_policy_pick_last")).unwrap();
    std::fs::write(&policy, &first).unwrap();
    let router = start_router(&urls(&sims), &["--policy-wasm", policy.to_str().unwrap()]);
    let c = client();
    let url = format!("{}/v1/completions", router.url());
    let body = serde_json::json!({"model": "sim-model", "prompt": "x", "max_tokens": 1});
    let mut serving = worker_of(&post_json(&c, &url, &[], &body).await);
    let mut results = Vec::new();
    for fresh in [true, false] {
        let mut samples = Vec::new();
        for i in 0..rounds {
            eprint!(
                "\r[{}/{rounds}] swapping ({})   ",
                i + 1,
                if fresh { "new bytes" } else { "rollback" }
            );
            let (bytes, expect) = if serving == "w0" {
                (&last, "w1")
            } else {
                (&first, "w0")
            };
            let tmp = dir.join("policy.tmp");
            let mut bytes = bytes.clone();
            if fresh {
                // A custom section (id 0): LEB128 size, name "bench", payload = round number.
                let payload = format!("{i}-{}", std::process::id());
                let mut sec = vec![5u8];
                sec.extend_from_slice(b"bench");
                sec.extend_from_slice(payload.as_bytes());
                bytes.push(0);
                bytes.push(sec.len() as u8);
                bytes.extend_from_slice(&sec);
            }
            std::fs::write(&tmp, &bytes).unwrap();
            let t0 = Instant::now();
            std::fs::rename(&tmp, &policy).unwrap();
            loop {
                let w = worker_of(&post_json(&c, &url, &[], &body).await);
                if w == expect {
                    break;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "swap not seen in 10 s"
                );
            }
            samples.push(t0.elapsed().as_secs_f64() * 1000.0);
            serving = expect.to_string();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        samples.sort_by(f64::total_cmp);
        results.push((fresh, samples));
    }
    eprintln!();
    println!(
        "hot-swap latency, rename → first request decided by the new version ({rounds} swaps each):"
    );
    for (fresh, s) in results {
        let pct = |p: f64| s[((s.len() - 1) as f64 * p).round() as usize];
        println!(
            "  {:<28} median {:6.1} ms   p90 {:6.1} ms   min {:6.1} ms   max {:6.1} ms",
            if fresh {
                "new policy (compiles)"
            } else {
                "rollback (compiled before)"
            },
            pct(0.5),
            pct(0.9),
            s[0],
            s[s.len() - 1]
        );
    }
}
