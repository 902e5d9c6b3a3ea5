//! KV-event routing through the real binary: simulated vLLM workers publish real
//! vLLM-format KV events (map and array forms, byte and integer hashes) and serve
//! `/tokenize` and `/kv_event_sources`; the router discovers them, follows them, and
//! `kv_aware` routes a prompt to the worker that holds it — a prompt the router itself
//! never saw, so only the events can know. Then eviction (`BlockRemoved`), an engine
//! restart (sequence regression) and lost batches (gap → replay) through the same path.

use serde_json::{Value, json};
use std::time::{Duration, Instant};
use vllm_router_tests::*;

/// A prompt of many 16-token blocks, unique per `tag`.
fn prompt(tag: &str) -> Value {
    let text = format!("{tag}: ") + &"a passage of shared context that fills blocks. ".repeat(30);
    json!({"model": "sim-model", "messages": [{"role": "user", "content": text}], "max_tokens": 2})
}

/// Poll the router's metrics until `cond` holds (bounded).
async fn until_metrics(router: &Proc, what: &str, cond: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = router_metrics(router).await;
        if cond(&m) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{}",
            m.lines()
                .filter(|l| l.contains("kv_"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn state_of(m: &str, worker: &str) -> f64 {
    metric_sum(
        m,
        "vllm_router_kv_source_state",
        &[&format!("worker=\"{worker}\"")],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_aware_routes_by_the_engines_own_events() {
    let mut sims = vec![
        start_sim(
            "w0",
            &[
                "--kv-events",
                "--kv-events-form",
                "array",
                "--kv-int-hashes",
            ],
        ),
        start_sim("w1", &["--kv-events"]),
        start_sim("w2", &["--kv-events"]),
    ];
    // A worker without KV events: the router routes it without them.
    sims.push(start_sim("w3", &[]));
    let us = urls(&sims);
    let router = start_router(&us, &["--policy", "kv_aware"]);
    let c = client();
    let via_router = format!("{}/v1/chat/completions", router.url());
    wait_log(&router, "no KV event sources", 1, Duration::from_secs(20)).await;

    // Each publisher's first batch makes its source exact.
    for (i, s) in sims.iter().take(3).enumerate() {
        let r = post_json(
            &c,
            &format!("{}/v1/chat/completions", s.url()),
            &[],
            &prompt(&format!("warm {i}")),
        )
        .await;
        assert_eq!(r.status(), 200);
    }
    until_metrics(&router, "three exact sources", |m| {
        (0..3).all(|i| state_of(m, &us[i]) == 1.0)
    })
    .await;

    // A prompt cached on one worker *behind the router's back* is routed to it: the
    // approximate tree could not know; the events do. Both payload forms.
    for (i, tag) in [(2usize, "only-w2-knows"), (0, "only-w0-knows")] {
        let p = prompt(tag);
        let label = format!("worker=\"{}\"", us[i]);
        let before = metric_sum(
            &router_metrics(&router).await,
            "vllm_router_kv_index_blocks",
            &[&label],
        );
        let direct = post_json(
            &c,
            &format!("{}/v1/chat/completions", sims[i].url()),
            &[],
            &p,
        )
        .await;
        assert_eq!(direct.status(), 200);
        // Wait until the router's index holds those blocks.
        until_metrics(&router, "the direct request's blocks", |m| {
            metric_sum(m, "vllm_router_kv_index_blocks", &[&label]) >= before + 20.0
        })
        .await;
        for _ in 0..3 {
            let r = post_json(&c, &via_router, &[], &p).await;
            assert_eq!(r.status(), 200);
            assert_eq!(
                worker_of(&r),
                format!("w{i}"),
                "prompt {tag} not routed to its holder"
            );
            let cached: u64 = r.headers()["x-sim-cached-tokens"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(
                cached >= 16 * 20,
                "holder reported only {cached} cached tokens"
            );
        }
    }
    let m = router_metrics(&router).await;
    let tok = metric_sum(
        &m,
        "vllm_router_kv_tokenize_duration_seconds_count",
        &["result=\"ok\""],
    );
    assert!(
        tok >= 6.0,
        "prompts were not tokenized through /tokenize: {tok}"
    );

    // Eviction: a tiny cache on w2 evicts the old prompt's blocks → BlockRemoved.
    set_sim(&sims[2], json!({"cache_blocks": 4})).await;
    let r = post_json(
        &c,
        &format!("{}/v1/chat/completions", sims[2].url()),
        &[],
        &prompt("evictor"),
    )
    .await;
    assert_eq!(r.status(), 200);
    until_metrics(&router, "removals from w2", |m| {
        metric_sum(m, "vllm_router_kv_blocks_total", &["op=\"removed\""]) > 0.0
            && metric_sum(
                m,
                "vllm_router_kv_index_blocks",
                &[&format!("worker=\"{}\"", us[2])],
            ) <= 4.0
    })
    .await;

    // Engine restart on w0: the sequence goes back to 0; its entries are cleared.
    let r = c
        .post(format!("{}/sim/kv/restart", sims[0].url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = post_json(
        &c,
        &format!("{}/v1/chat/completions", sims[0].url()),
        &[],
        &prompt("after restart"),
    )
    .await;
    assert_eq!(r.status(), 200);
    let m = until_metrics(&router, "a restart resync", |m| {
        metric_sum(m, "vllm_router_kv_resyncs_total", &["reason=\"restart\""]) >= 1.0
    })
    .await;
    assert_eq!(state_of(&m, &us[0]), 1.0);

    // Lost batches on w1: the next two never reach the router; the third shows the gap,
    // which the replay socket fills.
    set_sim(&sims[1], json!({"kv_drop_batches": 2})).await;
    for k in 0..3 {
        let r = post_json(
            &c,
            &format!("{}/v1/chat/completions", sims[1].url()),
            &[],
            &prompt(&format!("gap {k}")),
        )
        .await;
        assert_eq!(r.status(), 200);
    }
    let m = until_metrics(&router, "a replayed gap", |m| {
        metric_sum(m, "vllm_router_kv_resyncs_total", &["reason=\"replayed\""]) >= 1.0
    })
    .await;
    assert_eq!(
        state_of(&m, &us[1]),
        1.0,
        "replay did not make w1 exact again"
    );
    // The replayed batches' blocks are in the index: "gap 0" is routed to w1.
    let r = post_json(&c, &via_router, &[], &prompt("gap 0")).await;
    assert_eq!(
        worker_of(&r),
        "w1",
        "blocks from replayed batches are missing"
    );

    assert_eq!(
        metric_sum(
            &router_metrics(&router).await,
            "vllm_router_policy_failures_total",
            &[]
        ),
        0.0
    );
    for s in &mut sims {
        s.kill();
    }
}
