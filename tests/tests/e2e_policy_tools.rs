//! End-to-end: the policy team's tools on the real binary: `policy check` (passes a good
//! component, fails a faulting one with the reason), `--record-trace` (hashes, not
//! prompts, by default) and `policy replay` over the recorded trace (both policies, a
//! summary, a PNG).

use std::process::Command;
use std::time::{Duration, Instant};
use vllm_router_tests::*;

fn router_cmd(args: &[&str]) -> std::process::Output {
    Command::new(bin("vllm-router"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run vllm-router")
}

#[test]
fn policy_check_passes_a_good_policy_and_fails_a_faulting_one_with_the_reason() {
    let good = policy_wasm("test_policy_pick_first");
    let out = router_cmd(&["policy", "check", good.to_str().unwrap(), "--calls", "200"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("vllm:router-policy@0.2.0 (balancer + "),
        "{stdout}"
    );
    assert!(stdout.contains("select         p50"), "{stdout}");
    assert!(stdout.trim_end().ends_with("OK"), "{stdout}");

    // The built-ins implement no `on_complete` and build the SDK without `feedback`:
    // no feedback export, so the router never queues completions for them.
    let rr = policy_wasm("policy_round_robin");
    let out = router_cmd(&["policy", "check", rr.to_str().unwrap(), "--calls", "100"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("vllm:router-policy@0.2.0 (balancer + state-transfer)"),
        "{stdout}"
    );
    let probe = policy_wasm("test_policy_probe");
    let out = router_cmd(&["policy", "check", probe.to_str().unwrap(), "--calls", "100"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("(balancer + feedback, state-transfer)"),
        "{stdout}"
    );

    // A component built from contract 0.1 sources (committed; see its README) passes.
    let old = fixture("contract-0.1.0/power_of_two.wasm");
    let out = router_cmd(&["policy", "check", old.to_str().unwrap(), "--calls", "200"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("vllm:router-policy@0.1.0 (world policy"),
        "{stdout}"
    );

    let hostile = policy_wasm("test_policy_hostile");
    let out = router_cmd(&[
        "policy",
        "check",
        hostile.to_str().unwrap(),
        "--config",
        r#"{"mode":"bad_id"}"#,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("FAILED: select call 0 faulted"), "{stderr}");

    // A refused init is a failed check too, and says so.
    let out = router_cmd(&["policy", "check", hostile.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("FAILED to load"));

    let out = router_cmd(&["policy", "new", "Bad-Name", "--lang", "go", "--dir", "/tmp"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("lowercase letters"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_trace_hides_prompts_and_replays_two_policies() {
    let dir = TempDir::new("trace");
    let trace = dir.join("router.trace.jsonl");
    let sims = start_sims(2, &[]);
    let router = start_router(
        &urls(&sims),
        &[
            "--policy",
            "cache_aware",
            "--record-trace",
            trace.to_str().unwrap(),
        ],
    );
    let c = client();
    let secret = "the secret system prompt of team blue, long enough for blocks. ".repeat(8);
    for i in 0..30 {
        let body = serde_json::json!({
            "model": "sim-model",
            "messages": [{"role": "system", "content": secret},
                         {"role": "user", "content": format!("question {i}")}],
            "max_tokens": 1,
        });
        let r = post_json(
            &c,
            &format!("{}/v1/chat/completions", router.url()),
            &[("x-session-id", &format!("session-{}", i % 5))],
            &body,
        )
        .await;
        assert_eq!(r.status(), 200);
    }
    // The writer flushes within 200 ms of going idle.
    let end = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let t = std::fs::read_to_string(&trace).unwrap_or_default();
        if t.lines().count() >= 30 || Instant::now() > end {
            break t;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(text.lines().count(), 30, "{text}");
    assert!(
        !text.contains("secret system prompt"),
        "a prompt leaked into the trace"
    );
    assert!(
        !text.contains("session-1"),
        "a session id leaked into the trace"
    );
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert!(first["blocks"].as_array().unwrap().len() >= 8, "{first}");
    assert_eq!(first["stage"], "regular");
    assert!(first["keys"]["x-session-id"].is_string(), "{first}");

    let png = dir.join("replay.png");
    let out = router_cmd(&[
        "policy",
        "replay",
        "builtin:cache_aware",
        "--trace",
        trace.to_str().unwrap(),
        "--against",
        "builtin:round_robin",
        "--png",
        png.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("prefix-cache hit rate"), "{stdout}");
    assert!(stdout.contains("agreement (B on A's state)"), "{stdout}");
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    // round_robin spreads the 30 requests evenly over the 2 simulated workers.
    let rr_share: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("share worker"))
        .map(|l| l.split_whitespace().rev().nth(1).unwrap())
        .collect();
    assert_eq!(rr_share, ["50.0", "50.0"], "{stdout}");
}
