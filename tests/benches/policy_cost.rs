//! Cost of one policy decision: through the host (WebAssembly component, the real
//! `PolicyVersion::select` path with epoch deadline and answer validation) and the same
//! policy logic called natively, side by side, at 8 / 16 / 64 / 512 workers.
//!
//! Run: `cargo bench -p vllm-router-tests --bench policy_cost`

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use std::sync::Arc;
use vllm_router::policy::{Candidate, PolicyEngine, Stage, builtin};
use vllm_router::request::RequestInfo;
use vllm_router::workers::Registry;
use vllm_router_sdk::testing::FakeRequest;
use vllm_router_sdk::{Policy, Role};

fn request() -> Arc<RequestInfo> {
    let body = Bytes::from_static(
        br#"{"model":"m","messages":[{"role":"user","content":"hello there"}],"max_tokens":16}"#,
    );
    let mut info = RequestInfo::from_json(
        http::Method::POST,
        "/v1/chat/completions".into(),
        "/v1/chat/completions".into(),
        http::HeaderMap::new(),
        body,
    )
    .unwrap();
    info.request_id = "bench".into();
    Arc::new(info)
}

fn bench(c: &mut Criterion) {
    let engine = PolicyEngine::new(5, 64).unwrap();
    let req = request();
    let fake = FakeRequest::chat("hello there");
    let mut g = c.benchmark_group("select");
    for name in ["round_robin", "random"] {
        let b = builtin::find(name).unwrap();
        let version = engine.load(b.name, "bench", b.wasm, "{}").unwrap();
        for n in [8usize, 16, 64, 512] {
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
            let cands: Vec<Candidate> = set
                .workers
                .iter()
                .map(|w| Candidate {
                    id: w.id,
                    in_flight: 0,
                    engine: None,
                })
                .collect();
            version.select(&req, Stage::Regular, &set, &cands).unwrap();
            g.bench_with_input(BenchmarkId::new(format!("{name}/wasm"), n), &n, |bch, _| {
                bch.iter(|| {
                    black_box(
                        version
                            .select(&req, Stage::Regular, &set, black_box(&cands))
                            .unwrap(),
                    )
                })
            });
            let native: Vec<vllm_router_sdk::Candidate> = cands
                .iter()
                .map(|c| vllm_router_sdk::Candidate {
                    id: c.id,
                    in_flight: c.in_flight,
                    engine: None,
                })
                .collect();
            match name {
                "round_robin" => {
                    let mut p = policy_round_robin::RoundRobin::new("{}").unwrap();
                    g.bench_with_input(
                        BenchmarkId::new(format!("{name}/native"), n),
                        &n,
                        |bch, _| bch.iter(|| black_box(p.select(&fake, black_box(&native)))),
                    );
                }
                _ => {
                    let mut p = policy_random::Random::new("{}").unwrap();
                    g.bench_with_input(
                        BenchmarkId::new(format!("{name}/native"), n),
                        &n,
                        |bch, _| bch.iter(|| black_box(p.select(&fake, black_box(&native)))),
                    );
                }
            }
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
