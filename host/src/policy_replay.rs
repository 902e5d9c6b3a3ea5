//! `vllm-router policy replay FILE --trace TRACE [--against OTHER]`: a policy over
//! recorded traffic (`--record-trace`) and a simulated fleet, offline.
//!
//! The fleet model is the simulator's (`vllm-sim`): per worker, a prefix cache of
//! `--cache-blocks` block keys in LRU order (the trace's chained block hashes, so two
//! requests share cache exactly when their prompts share a prefix of whole blocks); a
//! request occupies one of `--max-running` slots for `prefill = uncached blocks x
//! --prefill-ms-per-block` plus `--decode-ms`, and waits in a FIFO queue when all slots are
//! taken. The policy sees what the router would give it: in-flight = running + queued on
//! that worker, engine words (running, waiting, KV use = cache fill) and the request (path,
//! model, session-key headers and `user` as their recorded hashes, routing text rebuilt
//! from the block keys so shared prefixes stay shared).
//!
//! Output: a progress bar, a table per policy (share per worker, prefix-cache hit rate,
//! queue wait and time-to-first-token proxy p50/p99, decision cost), with `--against`
//! both side by side plus their agreement rate (B asked on A's fleet state for every
//! request), and a PNG chart (`--png`, default `TRACE.replay.png`).

use crate::request::RequestInfo;
use crate::trace::BLOCK_CHARS;
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use vllm_router_runtime::{Limits, NoChoice, PolicyEngine, PolicyVersion, Stage, WorkerInfo};
use vllm_router_sdk::{Candidate, EngineLoad, Role};

/// Arguments of `policy replay`.
#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    /// The policy component (`.wasm`), or `builtin:NAME` (e.g. `builtin:cache_aware`).
    file: String,
    /// A trace written by `--record-trace` (JSON lines), or by
    /// `tests/bench/make_sample_trace.py`.
    #[arg(long)]
    trace: PathBuf,
    /// A second policy to compare with (file or `builtin:NAME`).
    #[arg(long)]
    against: Option<String>,
    /// JSON config for the policy's `init`.
    #[arg(long, default_value = "{}")]
    config: String,
    /// JSON config for the `--against` policy.
    #[arg(long, default_value = "{}")]
    against_config: String,
    /// Simulated workers (default: the distinct workers in the trace, at least 2).
    #[arg(long)]
    workers: Option<u32>,
    /// Prefix-cache capacity per worker, in blocks of 64 characters (~16 tokens).
    #[arg(long, default_value_t = 4096)]
    cache_blocks: usize,
    /// Concurrent requests a worker runs; more wait in its queue.
    #[arg(long, default_value_t = 8)]
    max_running: usize,
    /// Simulated prefill time per uncached block, ms.
    #[arg(long, default_value_t = 2.0)]
    prefill_ms_per_block: f64,
    /// Simulated decode time per request, ms.
    #[arg(long, default_value_t = 60.0)]
    decode_ms: f64,
    /// Replay speed: arrival times are divided by this (2 = twice the recorded rate).
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// Where to write the PNG chart (default: TRACE with `.replay.png`).
    #[arg(long)]
    png: Option<PathBuf>,
}

/// One trace line, as replayed.
struct TraceReq {
    t_ms: f64,
    path: String,
    model: Option<String>,
    blocks: Vec<u64>,
    text: Option<String>,
    text_bytes: usize,
    keys: Vec<(String, String)>,
    user: Option<String>,
}

fn read_trace(path: &PathBuf) -> anyhow::Result<(Vec<TraceReq>, usize)> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read trace {}: {e}", path.display()))?;
    let mut out = Vec::new();
    let mut workers = std::collections::HashSet::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("{}:{}: not JSON: {e}", path.display(), n + 1))?;
        if v["stage"].as_str().is_some_and(|s| s == "decode") {
            continue; // a PD request is replayed once, by its prefill stage
        }
        if let Some(w) = v["worker"].as_str() {
            workers.insert(w.to_string());
        }
        let blocks = v["blocks"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|b| b.as_str().and_then(|s| u64::from_str_radix(s, 16).ok()))
                    .collect()
            })
            .unwrap_or_default();
        let keys = v["keys"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        out.push(TraceReq {
            t_ms: v["t_ms"].as_f64().unwrap_or(0.0),
            path: v["path"].as_str().unwrap_or("/v1/completions").to_string(),
            model: v["model"].as_str().map(str::to_string),
            blocks,
            text: v["text"].as_str().map(str::to_string),
            text_bytes: v["text_bytes"].as_u64().unwrap_or(0) as usize,
            keys,
            user: v["user"].as_str().map(str::to_string),
        });
    }
    if out.is_empty() {
        anyhow::bail!("trace {} has no requests", path.display());
    }
    out.sort_by(|a, b| a.t_ms.total_cmp(&b.t_ms));
    Ok((out, workers.len()))
}

/// The request a policy sees for trace line `t`: a completions body whose prompt is the
/// recorded text, or one rebuilt from the block keys (each block: its key in hex, four
/// times: equal prefixes of keys give equal prefixes of text).
fn rebuild(t: &TraceReq, i: usize) -> anyhow::Result<RequestInfo> {
    let prompt = match &t.text {
        Some(s) => s.clone(),
        None => {
            let mut s = String::with_capacity(t.text_bytes.max(t.blocks.len() * BLOCK_CHARS));
            for k in &t.blocks {
                for _ in 0..BLOCK_CHARS / 16 {
                    s.push_str(&format!("{k:016x}"));
                }
            }
            // The partial last block: unique filler (never cached, as in vLLM).
            while s.len() < t.text_bytes {
                s.push_str(&format!("~{i:x}"));
            }
            s
        }
    };
    let mut body = serde_json::json!({"prompt": prompt});
    if let Some(m) = &t.model {
        body["model"] = m.clone().into();
    }
    if let Some(u) = &t.user {
        body["user"] = u.clone().into();
    }
    let mut headers = http::HeaderMap::new();
    for (k, v) in &t.keys {
        if let (Ok(k), Ok(v)) = (
            http::header::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_str(v),
        ) {
            headers.insert(k, v);
        }
    }
    let path = if t.path.contains("chat") {
        "/v1/completions".to_string() // the rebuilt prompt is a completions prompt
    } else {
        t.path.clone()
    };
    let mut r = RequestInfo::from_json(
        http::Method::POST,
        path.clone(),
        path,
        headers,
        Bytes::from(serde_json::to_vec(&body)?),
    )
    .map_err(|e| anyhow::anyhow!("rebuilding request {i}: {e:?}"))?;
    r.request_id = format!("replay-{i}");
    Ok(r)
}

/// One simulated worker.
#[derive(Default)]
struct SimWorker {
    /// End times (ms) of running requests.
    running: Vec<f64>,
    /// Queued requests: prefill+decode duration (ms) and arrival time.
    queue: VecDeque<(f64, f64)>,
    cache_stamp: HashMap<u64, u64>,
    cache_order: BTreeMap<u64, u64>,
    clock: u64,
    served: u64,
}

/// Results of one policy's run.
#[derive(Default)]
struct Outcome {
    name: String,
    share: Vec<u64>,
    hit_blocks: u64,
    query_blocks: u64,
    waits: Vec<f64>,
    ttft: Vec<f64>,
    decide_us: Vec<f64>,
    declines: u64,
    faults: u64,
    agree: u64,
    compared: u64,
}

struct Fleet {
    w: Vec<SimWorker>,
    cache_blocks: usize,
    max_running: usize,
}

impl Fleet {
    /// Advance every worker to `now`: requests that end by then free their slot, and
    /// the queue's head starts in it at that moment (its wait is recorded).
    fn advance(&mut self, now: f64, out: &mut Outcome) {
        for w in &mut self.w {
            loop {
                w.running.sort_by(|a, b| a.total_cmp(b));
                match w.running.first() {
                    Some(&end) if end <= now => {
                        w.running.remove(0);
                        if let Some((dur, arrived)) = w.queue.pop_front() {
                            let start = end.max(arrived);
                            out.waits.push(start - arrived);
                            w.running.push(start + dur);
                        }
                    }
                    _ => break,
                }
            }
        }
    }

    fn candidates(&self) -> Vec<Candidate> {
        self.w
            .iter()
            .enumerate()
            .map(|(i, w)| Candidate {
                id: i as u32,
                in_flight: (w.running.len() + w.queue.len()) as u32,
                engine: Some(EngineLoad {
                    running: w.running.len() as u32,
                    waiting: w.queue.len() as u32,
                    kv_cache_permille: ((w.cache_stamp.len() * 1000) / self.cache_blocks.max(1))
                        .min(1000) as u16,
                }),
            })
            .collect()
    }

    /// Route request blocks to worker `i` at `now`; returns uncached blocks.
    fn admit(&mut self, i: usize, blocks: &[u64], now: f64, a: &ReplayArgs, out: &mut Outcome) {
        let w = &mut self.w[i];
        let mut hit = 0u64;
        let mut leading = true;
        for k in blocks {
            w.clock += 1;
            match w.cache_stamp.insert(*k, w.clock) {
                Some(old) => {
                    w.cache_order.remove(&old);
                    if leading {
                        hit += 1;
                    }
                }
                None => leading = false,
            }
            w.cache_order.insert(w.clock, *k);
            while w.cache_stamp.len() > self.cache_blocks {
                let (_, victim) = w.cache_order.pop_first().expect("non-empty");
                w.cache_stamp.remove(&victim);
            }
        }
        out.hit_blocks += hit;
        out.query_blocks += blocks.len() as u64;
        let prefill = (blocks.len() as u64 - hit) as f64 * a.prefill_ms_per_block;
        let dur = prefill + a.decode_ms;
        w.served += 1;
        if w.running.len() < self.max_running && w.queue.is_empty() {
            out.waits.push(0.0);
            out.ttft.push(prefill);
            w.running.push(now + dur);
        } else {
            // TTFT proxy for a queued request: its wait is known when it starts; count
            // the prefill now and the wait in `waits`.
            out.ttft.push(prefill);
            w.queue.push_back((dur, now));
        }
    }
}

fn load(
    engine: &Arc<PolicyEngine>,
    spec: &str,
    config: &str,
    workers: &[WorkerInfo],
    tag: &str,
) -> anyhow::Result<(String, Arc<PolicyVersion>)> {
    let (name, bytes) = match spec.strip_prefix("builtin:") {
        Some(b) => {
            let p = crate::policy::builtin::find(b).ok_or_else(|| {
                anyhow::anyhow!(
                    "unknown built-in '{b}'; built-ins: {}",
                    crate::policy::builtin::names()
                )
            })?;
            (b.to_string(), p.wasm.to_vec())
        }
        None => {
            let bytes =
                std::fs::read(spec).map_err(|e| anyhow::anyhow!("cannot read {spec}: {e}"))?;
            let name = std::path::Path::new(spec)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| spec.to_string());
            (name, bytes)
        }
    };
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
    let v = engine
        .load(
            &format!("{name}{tag}"),
            spec,
            &bytes,
            &sha,
            config,
            1,
            workers,
        )
        .map_err(|e| anyhow::anyhow!("{spec}: {e:#}"))?;
    Ok((name, v))
}

fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Run `policy` (and `shadow` on the same states, for agreement) over the trace.
fn run(
    name: &str,
    policy: &PolicyVersion,
    shadow: Option<&PolicyVersion>,
    reqs: &[Arc<RequestInfo>],
    trace: &[TraceReq],
    n_workers: usize,
    a: &ReplayArgs,
) -> anyhow::Result<Outcome> {
    let mut out = Outcome {
        name: name.to_string(),
        share: vec![0; n_workers],
        ..Default::default()
    };
    let mut fleet = Fleet {
        w: (0..n_workers).map(|_| SimWorker::default()).collect(),
        cache_blocks: a.cache_blocks,
        max_running: a.max_running.max(1),
    };
    let t0 = trace[0].t_ms;
    let step = (trace.len() / 50).max(1);
    // A bar on a terminal; in a log, one line per quarter.
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let quarter = (trace.len() / 4).max(1);
    for (i, (t, req)) in trace.iter().zip(reqs).enumerate() {
        let now = (t.t_ms - t0) / a.speed.max(1e-6);
        fleet.advance(now, &mut out);
        let cands = fleet.candidates();
        let started = Instant::now();
        let pick = match policy.select(req.clone(), Stage::Regular, 1, &cands) {
            Ok(id) => id as usize,
            Err(NoChoice::Declined(_)) => {
                out.declines += 1;
                crate::policy::fallback_choice(&cands) as usize
            }
            Err(NoChoice::Fault(f)) => {
                out.faults += 1;
                if out.faults == 1 {
                    eprintln!("\n{name}: fault at request {i}: {f}");
                }
                crate::policy::fallback_choice(&cands) as usize
            }
            Err(NoChoice::Syncing) => crate::policy::fallback_choice(&cands) as usize,
        };
        out.decide_us.push(started.elapsed().as_secs_f64() * 1e6);
        if let Some(s) = shadow {
            out.compared += 1;
            if s.select(req.clone(), Stage::Regular, 1, &cands).ok() == Some(pick as u32) {
                out.agree += 1;
            }
        }
        out.share[pick] += 1;
        fleet.admit(pick, &t.blocks, now, a, &mut out);
        if tty && (i % step == 0 || i + 1 == trace.len()) {
            let done = (i + 1) * 40 / trace.len();
            eprint!(
                "\r{name:>20} [{}{}] {:>3}% {}/{}",
                "#".repeat(done),
                ".".repeat(40 - done),
                (i + 1) * 100 / trace.len(),
                i + 1,
                trace.len()
            );
        } else if !tty && ((i + 1) % quarter == 0 || i + 1 == trace.len()) {
            eprintln!("{name}: {}/{} requests replayed", i + 1, trace.len());
        }
    }
    fleet.advance(f64::MAX / 4.0, &mut out);
    if tty {
        eprintln!();
    }
    for v in [&mut out.waits, &mut out.ttft, &mut out.decide_us] {
        v.sort_by(|x, y| x.total_cmp(y));
    }
    Ok(out)
}

/// Entry point of `policy replay`.
pub fn replay(a: &ReplayArgs) -> anyhow::Result<()> {
    let (trace, seen_workers) = read_trace(&a.trace)?;
    let n_workers = a
        .workers
        .map(|w| w as usize)
        .unwrap_or(seen_workers.max(2))
        .max(1);
    println!(
        "policy replay: {} requests from {} over {} simulated workers (cache {} blocks, {} running each)",
        trace.len(),
        a.trace.display(),
        n_workers,
        a.cache_blocks,
        a.max_running
    );
    let engine = PolicyEngine::with_options(Limits::new(50, 256), false)?;
    engine.set_quarantine(0, std::time::Duration::from_secs(1));
    let workers: Vec<WorkerInfo> = (0..n_workers as u32)
        .map(|i| WorkerInfo {
            id: i,
            url: format!("http://sim-worker-{i}:8000"),
            role: Role::Regular,
            dp_rank: None,
            labels: Vec::new(),
        })
        .collect();
    let reqs: Vec<Arc<RequestInfo>> = trace
        .iter()
        .enumerate()
        .map(|(i, t)| rebuild(t, i).map(Arc::new))
        .collect::<anyhow::Result<_>>()?;
    let (name_a, pol_a) = load(&engine, &a.file, &a.config, &workers, "")?;
    let mut outcomes = Vec::new();
    match &a.against {
        None => outcomes.push(run(&name_a, &pol_a, None, &reqs, &trace, n_workers, a)?),
        Some(b) => {
            let (name_b, pol_b) = load(&engine, b, &a.against_config, &workers, "")?;
            let (_, shadow_b) = load(&engine, b, &a.against_config, &workers, "-shadow")?;
            let name_b = if name_b == name_a {
                format!("{name_b} (B)")
            } else {
                name_b
            };
            outcomes.push(run(
                &name_a,
                &pol_a,
                Some(&shadow_b),
                &reqs,
                &trace,
                n_workers,
                a,
            )?);
            outcomes.push(run(&name_b, &pol_b, None, &reqs, &trace, n_workers, a)?);
        }
    }
    print_summary(&outcomes, n_workers);
    let png = a.png.clone().unwrap_or_else(|| {
        let mut p = a.trace.clone().into_os_string();
        p.push(".replay.png");
        p.into()
    });
    write_chart(&png, &outcomes, n_workers)?;
    println!("chart: {}", png.display());
    if outcomes.iter().any(|o| o.faults > 0) {
        anyhow::bail!("a policy faulted during the replay (see above)");
    }
    Ok(())
}

fn hit_rate(o: &Outcome) -> f64 {
    o.hit_blocks as f64 / o.query_blocks.max(1) as f64
}

fn print_summary(outcomes: &[Outcome], n_workers: usize) {
    let w = 22;
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let col = |f: &dyn Fn(&Outcome) -> String| outcomes.iter().map(f).collect::<Vec<_>>();
    rows.push(("policy".into(), col(&|o| o.name.clone())));
    rows.push((
        "prefix-cache hit rate".into(),
        col(&|o| format!("{:.1} %", 100.0 * hit_rate(o))),
    ));
    rows.push((
        "queue wait p50 / p99".into(),
        col(&|o| format!("{:.0} / {:.0} ms", pct(&o.waits, 0.5), pct(&o.waits, 0.99))),
    ));
    rows.push((
        "prefill p50 / p99".into(),
        col(&|o| format!("{:.0} / {:.0} ms", pct(&o.ttft, 0.5), pct(&o.ttft, 0.99))),
    ));
    rows.push((
        "decision p50 / p99".into(),
        col(&|o| {
            format!(
                "{:.1} / {:.1} us",
                pct(&o.decide_us, 0.5),
                pct(&o.decide_us, 0.99)
            )
        }),
    ));
    rows.push((
        "declines / faults".into(),
        col(&|o| format!("{} / {}", o.declines, o.faults)),
    ));
    for i in 0..n_workers {
        let total = |o: &Outcome| o.share.iter().sum::<u64>().max(1) as f64;
        rows.push((
            format!("share worker {i}"),
            col(&|o| format!("{:.1} %", 100.0 * o.share[i] as f64 / total(o))),
        ));
    }
    if let Some(o) = outcomes.first().filter(|o| o.compared > 0) {
        rows.push((
            "agreement (B on A's state)".into(),
            vec![
                format!("{:.1} %", 100.0 * o.agree as f64 / o.compared as f64),
                String::new(),
            ],
        ));
    }
    println!();
    for (label, cells) in rows {
        print!("  {label:<28}");
        for c in cells {
            print!("{c:>w$}");
        }
        println!();
    }
}

fn write_chart(path: &PathBuf, outcomes: &[Outcome], n_workers: usize) -> anyhow::Result<()> {
    use crate::chart::{Panel, bar_chart};
    let names: Vec<String> = outcomes.iter().map(|o| o.name.clone()).collect();
    let share = Panel {
        title: "share of requests per worker (%)",
        groups: (0..n_workers).map(|i| format!("w{i}")).collect(),
        values: outcomes
            .iter()
            .map(|o| {
                let t = o.share.iter().sum::<u64>().max(1) as f64;
                o.share.iter().map(|s| 100.0 * *s as f64 / t).collect()
            })
            .collect(),
        fmt: |v| format!("{v:.0}"),
    };
    let hits = Panel {
        title: "prefix-cache hit rate (%)",
        groups: vec!["hit rate".into()],
        values: outcomes.iter().map(|o| vec![100.0 * hit_rate(o)]).collect(),
        fmt: |v| format!("{v:.1}"),
    };
    let wait = Panel {
        title: "queue wait p99 / prefill p99 (ms)",
        groups: vec!["wait".into(), "prefill".into()],
        values: outcomes
            .iter()
            .map(|o| vec![pct(&o.waits, 0.99), pct(&o.ttft, 0.99)])
            .collect(),
        fmt: |v| format!("{v:.0}"),
    };
    let png = bar_chart("vllm-router policy replay", &names, &[share, hits, wait]);
    std::fs::write(path, png).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(())
}
