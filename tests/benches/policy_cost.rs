//! Cost of one policy decision, side by side in one run: through the host (the
//! WebAssembly component on the real `PolicyVersion::select` path, with epoch deadline,
//! candidate copy and answer validation) and the same policy crate called natively.
//!
//! Fleets of 8 / 16 / 64 / 512 workers; for the text-keyed policies (cache_aware, and
//! consistent_hash without a session key) routing texts of 1 / 8 / 64 KiB. cache_aware
//! runs against a warm tree (200 prompts sharing a half-length header) and the request
//! extends a cached prompt, so each decision walks and refreshes the whole path.
//! Timing: median of 15 batches, each ≥ 20 ms; figures in µs per decision.
//!
//! Cold columns: the median of 301 single decisions, each made right after walking a
//! buffer of 2 MiB (L1 and L2 evicted, L3 warm) or 64 MiB (every cache level and the
//! TLBs evicted). On the router's request path a decision meets the policy's code and
//! memory after the kernel's TCP work and hyper's parsing have run on the same core, so
//! the cold columns, not the hot loop, say what a live decision costs (issue 16 asked
//! why the live `policy_decision_duration_seconds` reads several µs against the hot
//! loop's ~0.6).
//!
//! Run: `cargo bench -p vllm-router-tests --bench policy_cost` (≈1 min). Prints a table.

use bytes::Bytes;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vllm_router::policy::{Candidate, PolicyEngine, Stage, builtin};
use vllm_router::request::RequestInfo;
use vllm_router::workers::{Registry, WorkerSet};
use vllm_router_sdk::{Policy, Request, Role};

/// Median µs per call of `f`, over 15 batches sized to last ≥ 20 ms each.
fn time_us(mut f: impl FnMut()) -> f64 {
    let mut per_batch = 1u64;
    loop {
        let t = Instant::now();
        for _ in 0..per_batch {
            f();
        }
        if t.elapsed() >= Duration::from_millis(20) {
            break;
        }
        per_batch *= 2;
    }
    let mut samples: Vec<f64> = (0..15)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..per_batch {
                f();
            }
            t.elapsed().as_secs_f64() * 1e6 / per_batch as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[7]
}

/// Median µs of one call of `f` right after `evict` walked (read and wrote) every cache
/// line of its buffer; see the module docs.
fn cold_us(evict: &mut [u8], mut f: impl FnMut()) -> f64 {
    let mut samples: Vec<f64> = (0..301)
        .map(|_| {
            for i in (0..evict.len()).step_by(64) {
                evict[i] = evict[i].wrapping_add(1);
            }
            black_box(&mut *evict);
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[150]
}

fn body_with_text(text: &str) -> Bytes {
    Bytes::from(
        serde_json::to_vec(&serde_json::json!({"model": "m", "prompt": text, "max_tokens": 16}))
            .unwrap(),
    )
}

fn request(body: Bytes) -> Arc<RequestInfo> {
    let mut info = RequestInfo::from_json(
        http::Method::POST,
        "/v1/completions".into(),
        "/v1/completions".into(),
        http::HeaderMap::new(),
        body,
    )
    .unwrap();
    info.request_id = "bench".into();
    // Render the routing text once, as the first policy call on a request would.
    let _ = info.routing_text();
    Arc::new(info)
}

/// A native request with the routing text rendered once (as the host caches it).
struct Native {
    text: String,
}

impl Request for Native {
    fn path(&self) -> String {
        "/v1/completions".into()
    }
    fn model(&self) -> Option<String> {
        Some("m".into())
    }
    fn header(&self, _: &str) -> Option<String> {
        None
    }
    fn body_field(&self, _: &str) -> Option<String> {
        None
    }
    fn body_pointer(&self, _: &str) -> Option<String> {
        None
    }
    fn routing_text(&self) -> String {
        self.text.clone()
    }
    fn body_length(&self) -> u64 {
        self.text.len() as u64
    }
    fn request_id(&self) -> String {
        "bench".into()
    }
    fn stage(&self) -> vllm_router_sdk::Stage {
        vllm_router_sdk::Stage::Regular
    }
}

fn fleet(n: usize) -> (Arc<WorkerSet>, Vec<Candidate>, Vec<vllm_router_sdk::Worker>) {
    let reg = Registry::default();
    for i in 0..n {
        reg.add(
            &format!("http://10.0.{}.{}:8000", i / 250, i % 250),
            Role::Regular,
            1,
        )
        .unwrap();
    }
    let set = reg.snapshot();
    let cands = set
        .workers
        .iter()
        .map(|w| Candidate {
            id: w.id,
            in_flight: (w.id % 3),
            engine: None,
        })
        .collect();
    let workers = set
        .workers
        .iter()
        .map(|w| vllm_router_sdk::Worker {
            id: w.id,
            url: w.url.clone(),
            role: Role::Regular,
            dp_rank: None,
            labels: vec![],
        })
        .collect();
    (set, cands, workers)
}

fn native_cands(c: &[Candidate]) -> Vec<vllm_router_sdk::Candidate> {
    c.to_vec()
}

fn text_of(kib: usize, salt: usize) -> String {
    // A half-length shared header, then a distinct tail: few-shot style.
    let half = kib * 512;
    let header: String = "shared few-shot header line. "
        .chars()
        .cycle()
        .take(half)
        .collect();
    let tail: String = format!("question {salt}: ")
        .chars()
        .chain("tail words ".chars().cycle())
        .take(half)
        .collect();
    header + &tail
}

fn native_policy(
    name: &str,
    workers: &[vllm_router_sdk::Worker],
) -> Box<dyn FnMut(&Native, &[vllm_router_sdk::Candidate])> {
    macro_rules! mk {
        ($t:ty) => {{
            let mut p = <$t>::new("{}").unwrap();
            p.workers_changed(workers);
            Box::new(move |r: &Native, c: &[vllm_router_sdk::Candidate]| {
                black_box(p.select(r, c));
            })
        }};
    }
    match name {
        "round_robin" => mk!(policy_round_robin::RoundRobin),
        "random" => mk!(policy_random::Random),
        "power_of_two" => mk!(policy_power_of_two::PowerOfTwo),
        "consistent_hash" => mk!(policy_consistent_hash::ConsistentHash),
        _ => mk!(policy_cache_aware::CacheAware),
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument selects policies by substring.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let engine = PolicyEngine::new(50, 64).unwrap();
    let mut rows: Vec<(String, usize, String, [f64; 5])> = Vec::new();
    let mut l2 = vec![0u8; 2 << 20];
    let mut l3 = vec![0u8; 64 << 20];
    let cases: Vec<(&str, Vec<usize>, Vec<usize>)> = vec![
        ("round_robin", vec![8, 16, 64, 512], vec![0]),
        ("random", vec![8, 16, 64, 512], vec![0]),
        ("power_of_two", vec![8, 64, 512], vec![0]),
        ("consistent_hash", vec![8, 64, 512], vec![1, 8, 64]),
        ("cache_aware", vec![8, 64, 512], vec![1, 8, 64]),
    ];
    let total: usize = cases.iter().map(|(_, n, t)| n.len() * t.len()).sum();
    let mut done = 0;
    for (name, sizes, texts) in &cases {
        if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        let b = builtin::find(name).unwrap();
        for &n in sizes {
            let (set, cands, workers) = fleet(n);
            let ncands = native_cands(&cands);
            for &kib in texts {
                done += 1;
                eprint!("\r[{done}/{total}] {name} workers={n} text={kib}KiB        ");
                let text = if kib == 0 {
                    "hello there".to_string()
                } else {
                    text_of(kib, 0)
                };
                let version = engine
                    .load(
                        b.name,
                        "bench",
                        b.wasm,
                        &format!("bench-{}", b.name),
                        "{}",
                        set.generation,
                        &vllm_router::policy::sync::worker_infos(&set),
                    )
                    .unwrap();
                let mut native = native_policy(name, &workers);
                // Warm the tree (cache_aware) with 200 prompts sharing the header.
                if *name == "cache_aware" {
                    for s in 1..=200 {
                        let t = text_of(kib, s);
                        let r = request(body_with_text(&t));
                        version
                            .select(r.clone(), Stage::Regular, set.generation, &cands)
                            .unwrap();
                        native(&Native { text: t }, &ncands);
                    }
                }
                let req = request(body_with_text(&text));
                let nreq = Native { text: text.clone() };
                version
                    .select(req.clone(), Stage::Regular, set.generation, &cands)
                    .unwrap();
                let mut decide = || {
                    black_box(
                        version
                            .select(
                                req.clone(),
                                Stage::Regular,
                                set.generation,
                                black_box(&cands),
                            )
                            .unwrap(),
                    );
                };
                let wasm = time_us(&mut decide);
                let nat = time_us(|| native(&nreq, black_box(&ncands)));
                let wasm_l2 = cold_us(&mut l2, &mut decide);
                let wasm_l3 = cold_us(&mut l3, &mut decide);
                let nat_l2 = cold_us(&mut l2, || native(&nreq, black_box(&ncands)));
                let label = if kib == 0 {
                    "-".to_string()
                } else {
                    format!("{kib} KiB")
                };
                rows.push((
                    name.to_string(),
                    n,
                    label,
                    [wasm, nat, wasm_l2, nat_l2, wasm_l3],
                ));
            }
        }
    }
    eprintln!();
    println!(
        "\nPolicy decision cost, µs per decision (hot: median of 15 batches; cold: median of 301 single calls after evicting caches)"
    );
    println!(
        "{:<16} {:>7} {:>8} {:>10} {:>10} {:>7} {:>12} {:>12} {:>12}",
        "policy",
        "workers",
        "text",
        "wasm µs",
        "native µs",
        "ratio",
        "wasm L2-cold",
        "nat. L2-cold",
        "wasm all-cold"
    );
    for (name, n, label, [w, nat, wl2, nl2, wl3]) in &rows {
        println!(
            "{:<16} {:>7} {:>8} {:>10.2} {:>10.2} {:>6.1}x {:>12.2} {:>12.2} {:>12.2}",
            name,
            n,
            label,
            w,
            nat,
            w / nat.max(1e-3),
            wl2,
            nl2,
            wl3
        );
    }
}
