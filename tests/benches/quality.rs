//! Routing quality of each built-in policy: prefix-cache hit rate, load spread and
//! simulated prefill time, through the real router binary over 4 simulated vLLM workers
//! with the simulator's prefix-cache model (see `vllm-sim --help`).
//!
//! Workload (fixed seed, interleaved, concurrency 8):
//! - 24 multi-turn chats × 5 turns (a shared 400-character system prompt; each turn
//!   resends the whole history plus a new question, as chat clients do). The chats send
//!   `x-session-id`, which only consistent_hash reads.
//! - 240 few-shot prompts over 8 templates (1.5 KB shared header, distinct question).
//! - 120 unrelated prompts (800 random characters).
//!
//! Each worker's cache holds 384 blocks of 64 characters (24 KiB of prompt, ≈6k tokens),
//! less than the working set, so spreading the same prefixes everywhere costs hits. Prefill is simulated at
//! 5 µs per uncached token. Fresh workers and router per policy.
//!
//! Run: `cargo bench -p vllm-router-tests --bench quality [-- NAME[:JSON] ...]` (≈10 s).
//! Prints a table.

use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;
use tokio::sync::Mutex;
use vllm_router_tests::*;

const WORKERS: usize = 4;
const CONCURRENCY: usize = 8;
const PREFILL_US_PER_TOKEN: u64 = 5;

/// xorshift64*: deterministic workload without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn words(&mut self, chars: usize) -> String {
        const W: &[&str] = &[
            "model", "cache", "token", "prefill", "decode", "worker", "router", "batch", "latency",
            "request", "memory", "kernel", "tensor", "stream", "policy", "vector",
        ];
        let mut s = String::new();
        while s.len() < chars {
            s.push_str(W[self.below(W.len())]);
            s.push(' ');
        }
        s.truncate(chars);
        s
    }
}

/// One unit of client work: a single request, or a chat whose turns go in order.
enum Job {
    Single(Value),
    Chat { session: String, turns: Vec<Value> },
}

fn workload() -> Vec<Job> {
    let mut rng = Rng(0x5eed);
    let mut jobs = Vec::new();
    let sys = rng.words(400);
    for s in 0..24 {
        let mut msgs = vec![json!({"role": "system", "content": sys})];
        let mut turns = Vec::new();
        for _ in 0..5 {
            msgs.push(json!({"role": "user", "content": rng.words(200)}));
            turns.push(json!({"model": "sim-model", "messages": msgs.clone(), "max_tokens": 2}));
            msgs.push(json!({"role": "assistant", "content": rng.words(300)}));
        }
        jobs.push(Job::Chat {
            session: format!("chat-{s}"),
            turns,
        });
    }
    let headers: Vec<String> = (0..8).map(|_| rng.words(1500)).collect();
    for i in 0..240 {
        let prompt = format!("{}\nQ: {}\nA:", headers[i % 8], rng.words(100));
        jobs.push(Job::Single(
            json!({"model": "sim-model", "prompt": prompt, "max_tokens": 2}),
        ));
    }
    for _ in 0..120 {
        jobs.push(Job::Single(
            json!({"model": "sim-model", "prompt": rng.words(800), "max_tokens": 2}),
        ));
    }
    // Shuffle (Fisher–Yates) so the three kinds interleave.
    for i in (1..jobs.len()).rev() {
        let j = rng.below(i + 1);
        jobs.swap(i, j);
    }
    jobs
}

#[derive(Default)]
struct Tally {
    requests: u64,
    failed: u64,
    prompt_tokens: u64,
    cached_tokens: u64,
    per_worker: HashMap<String, u64>,
}

async fn send(
    c: &reqwest::Client,
    url: &str,
    session: Option<&str>,
    body: &Value,
    t: &Mutex<Tally>,
) {
    let path = if body.get("messages").is_some() {
        "/v1/chat/completions"
    } else {
        "/v1/completions"
    };
    let mut rb = c.post(format!("{url}{path}")).json(body);
    if let Some(s) = session {
        rb = rb.header("x-session-id", s);
    }
    let r = rb.send().await;
    let mut t = t.lock().await;
    t.requests += 1;
    let Ok(r) = r else {
        t.failed += 1;
        return;
    };
    if r.status() != 200 {
        t.failed += 1;
        return;
    }
    let h = |n: &str| -> u64 {
        r.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    t.prompt_tokens += h("x-sim-prompt-tokens");
    t.cached_tokens += h("x-sim-cached-tokens");
    let w = r
        .headers()
        .get("x-vllm-sim-worker")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_string();
    *t.per_worker.entry(w).or_default() += 1;
}

async fn run_policy(spec: &str) -> (Tally, f64) {
    // `name` or `name:{json config}`.
    let (policy, config) = spec.split_once(':').unwrap_or((spec, "{}"));
    let prefill = PREFILL_US_PER_TOKEN.to_string();
    let sims = start_sims(
        WORKERS,
        &[
            "--cache-blocks",
            "384",
            "--prefill-us-per-token",
            &prefill,
            "--record",
            "false",
        ],
    );
    let router = start_router(
        &urls(&sims),
        &["--policy", policy, "--policy-config", config],
    );
    let url = router.url();
    let jobs = Arc::new(std::sync::Mutex::new(workload().into_iter()));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let done = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (jobs, tally, url, done) = (jobs.clone(), tally.clone(), url.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let c = client();
            loop {
                let job = jobs.lock().unwrap().next();
                match job {
                    None => break,
                    Some(Job::Single(b)) => send(&c, &url, None, &b, &tally).await,
                    Some(Job::Chat { session, turns }) => {
                        for b in &turns {
                            send(&c, &url, Some(&session), b, &tally).await;
                        }
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let secs = t0.elapsed().as_secs_f64();
    drop(router);
    drop(sims);
    let t = Arc::try_unwrap(tally).ok().unwrap().into_inner();
    (t, secs)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // Arguments (after `--`) replace the policy list: `NAME` or `NAME:{json config}`.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let policies: Vec<String> = if args.is_empty() {
        [
            "round_robin",
            "random",
            "power_of_two",
            "consistent_hash",
            "cache_aware",
        ]
        .map(String::from)
        .to_vec()
    } else {
        args
    };
    let mut rows = Vec::new();
    for (i, p) in policies.iter().enumerate() {
        eprintln!("[{}/{}] {p} ...", i + 1, policies.len());
        let (t, secs) = run_policy(p).await;
        eprintln!(
            "    {} requests ({} failed) in {secs:.1} s",
            t.requests, t.failed
        );
        rows.push((p.to_string(), t, secs));
    }
    let requests = rows.first().map(|r| r.1.requests).unwrap_or(0);
    println!(
        "\nRouting quality over {WORKERS} simulated workers, concurrency {CONCURRENCY}, {requests} requests"
    );
    println!(
        "{:<16} {:>9} {:>12} {:>14} {:>18} {:>7}",
        "policy", "hit rate", "max/min load", "per-worker", "mean prefill (ms)", "failed"
    );
    for (p, t, _) in &rows {
        let mut counts: Vec<u64> = (0..WORKERS)
            .map(|i| *t.per_worker.get(&format!("w{i}")).unwrap_or(&0))
            .collect();
        let hit = t.cached_tokens as f64 / t.prompt_tokens.max(1) as f64;
        let (mx, mn) = (*counts.iter().max().unwrap(), *counts.iter().min().unwrap());
        let ratio = if mn == 0 {
            f64::INFINITY
        } else {
            mx as f64 / mn as f64
        };
        let prefill_ms = (t.prompt_tokens - t.cached_tokens) as f64 * PREFILL_US_PER_TOKEN as f64
            / 1000.0
            / t.requests.max(1) as f64;
        counts.sort_unstable();
        let spread = counts
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join("/");
        println!(
            "{:<16} {:>8.1}% {:>12.2} {:>14} {:>18.2} {:>7}",
            p,
            hit * 100.0,
            ratio,
            spread,
            prefill_ms,
            t.failed
        );
    }
}
