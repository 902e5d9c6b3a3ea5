//! Many cores, one policy instance: decisions per second when N threads call `select`
//! on the same `PolicyVersion` at once (one instance behind a mutex, see
//! docs/performance.md "Many cores"). 16 workers, a small chat-sized routing text;
//! N = 1, 2, 4, 8 threads for 1.5 s each; round_robin and cache_aware. On a machine with
//! fewer cores than N the extra threads also compete for CPU, so read N ≤ cores as lock
//! contention and N > cores as oversubscription.
//!
//! Run: `cargo bench -p vllm-router-tests --bench policy_contention` (≈ 15 s).

use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vllm_router::policy::{Candidate, PolicyEngine, Stage, builtin};
use vllm_router::request::RequestInfo;
use vllm_router::workers::Registry;
use vllm_router_sdk::Role;

fn main() {
    let engine = PolicyEngine::new(50, 64).unwrap();
    let reg = Registry::default();
    for i in 0..16 {
        reg.add(&format!("http://10.0.0.{i}:8000"), Role::Regular, 1)
            .unwrap();
    }
    let set = reg.snapshot();
    let cands: Vec<Candidate> = set
        .workers
        .iter()
        .map(|w| Candidate {
            id: w.id,
            in_flight: w.id % 3,
            engine: None,
        })
        .collect();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!("one policy instance, N threads calling select (16 workers; {cores} cores here)\n");
    println!("| policy | threads | decisions/s | µs per decision per thread | × 1 thread |");
    println!("|---|---|---|---|---|");
    for name in ["round_robin", "cache_aware"] {
        let b = builtin::find(name).unwrap();
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
        let mut base = 0.0;
        for threads in [1usize, 2, 4, 8] {
            let stop = Arc::new(AtomicBool::new(false));
            let count = Arc::new(AtomicU64::new(0));
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let (stop, count, version, set, cands) =
                        (stop.clone(), count.clone(), version.clone(), set.clone(), cands.clone());
                    std::thread::spawn(move || {
                        let body = Bytes::from(format!(
                            r#"{{"model":"m","messages":[{{"role":"user","content":"thread {t} asks about the weather in a city"}}]}}"#
                        ));
                        let mut info = RequestInfo::from_json(
                            http::Method::POST,
                            "/v1/chat/completions".into(),
                            "/v1/chat/completions".into(),
                            http::HeaderMap::new(),
                            body,
                        )
                        .unwrap();
                        info.request_id = "bench".into();
                        let req = Arc::new(info);
                        let mut n = 0u64;
                        while !stop.load(Ordering::Relaxed) {
                            let _ = version.select(req.clone(), Stage::Regular, set.generation, &cands);
                            n += 1;
                        }
                        count.fetch_add(n, Ordering::Relaxed);
                    })
                })
                .collect();
            let t0 = Instant::now();
            std::thread::sleep(Duration::from_millis(1500));
            stop.store(true, Ordering::Relaxed);
            for h in handles {
                h.join().unwrap();
            }
            let secs = t0.elapsed().as_secs_f64();
            let rate = count.load(Ordering::Relaxed) as f64 / secs;
            if threads == 1 {
                base = rate;
            }
            let per = threads as f64 * 1e6 / rate;
            println!(
                "| {name} | {threads} | {rate:.0} | {per:.2} | {:.2} |",
                rate / base
            );
        }
    }
}
