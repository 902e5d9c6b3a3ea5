//! `vllm-router policy …`: the tools a policy team runs without a fleet.
//!
//! - `policy check FILE`: load a component exactly as the router does (same engine,
//!   limits and WASI), run `init`, `workers-changed` and many `select` calls over a
//!   synthetic fleet with realistic prompts, plus `on-complete` and a state round trip;
//!   print what it imports, what it costs (decision p50/p99 in µs, compile ms, peak
//!   linear memory) and exit non-zero with the reason on any fault, wrong answer or
//!   refused load. What a policy team's CI runs.
//! - `policy new NAME --lang L`: a ready project outside this repository
//!   ([`crate::policy_templates`]).
//! - `policy replay FILE --trace T [--against OTHER]`: recorded traffic over a simulated
//!   fleet ([`crate::policy_replay`]).

use crate::request::RequestInfo;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use vllm_router_runtime::{Completion, Limits, NoChoice, PolicyEngine, Stage, WorkerInfo};
use vllm_router_sdk::{Candidate, EngineLoad, Role};

/// Policy tools: check a component offline, start a new policy project.
#[derive(Parser, Debug)]
#[command(
    name = "vllm-router policy",
    about = "Policy tools: check a component offline, start a new policy project"
)]
pub struct PolicyCli {
    #[command(subcommand)]
    cmd: PolicyCmd,
}

#[derive(Subcommand, Debug)]
enum PolicyCmd {
    /// Load a policy component as the router would and exercise it over a synthetic
    /// fleet: reports contract version, imports, decision cost and memory; exits 1 on
    /// any failure (refused load, fault, answer outside the candidates, decline rate
    /// above --max-decline-ratio).
    Check(CheckArgs),
    /// Create a policy project outside this repository: sources implementing the
    /// example policy (fewest in-flight, skip long engine queues), a build.sh that
    /// writes NAME.wasm, and a README with the exact steps.
    New(crate::policy_templates::NewArgs),
    /// Replay a recorded trace (`--record-trace`) through a policy over a simulated
    /// fleet (prefix caches, queues): per-worker share, prefix-cache hit rate, queueing,
    /// decision cost; with --against, two policies side by side and their agreement.
    /// Writes a PNG chart.
    Replay(crate::policy_replay::ReplayArgs),
}

#[derive(clap::Args, Debug)]
struct CheckArgs {
    /// The component (`.wasm`).
    file: PathBuf,
    /// JSON object given to the policy's `init`.
    #[arg(long, default_value = "{}")]
    config: String,
    /// Workers in the synthetic fleet.
    #[arg(long, default_value_t = 8)]
    workers: u32,
    /// `select` calls to time (each with a different prompt).
    #[arg(long, default_value_t = 2000)]
    calls: u32,
    /// Prompt size of each synthetic chat request, bytes.
    #[arg(long, default_value_t = 4096)]
    prompt_bytes: usize,
    /// Per-call time limit, ms (the router's --policy-timeout-ms).
    #[arg(long, default_value_t = 5)]
    policy_timeout_ms: u64,
    /// Linear-memory limit, MiB (the router's --policy-max-memory-mb).
    #[arg(long, default_value_t = 64)]
    policy_max_memory_mb: u64,
    /// Core-instance limit (the router's --policy-max-instances).
    #[arg(long, default_value_t = 32)]
    policy_max_instances: u64,
    /// Compiled-component cache, as the router's (a component compiled here then starts
    /// in milliseconds in a router on this machine).
    #[arg(long, value_name = "DIR", env = "VLLM_ROUTER_POLICY_CACHE_DIR")]
    policy_cache_dir: Option<PathBuf>,
    /// Compile without the cache (and do not fill it).
    #[arg(long)]
    no_policy_cache: bool,
    /// Fail when more than this share of decisions are declines (0..1).
    #[arg(long, default_value_t = 0.5)]
    max_decline_ratio: f64,
}

/// Entry point of `vllm-router policy …`; `argv` without the binary name and `policy`.
/// Returns the process exit code.
pub fn main(argv: &[String]) -> i32 {
    let cli = match PolicyCli::try_parse_from(
        std::iter::once("vllm-router policy".to_string()).chain(argv.iter().cloned()),
    ) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    let r = match cli.cmd {
        PolicyCmd::Check(a) => check(&a),
        PolicyCmd::New(a) => crate::policy_templates::new_project(&a),
        PolicyCmd::Replay(a) => crate::policy_replay::replay(&a),
    };
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

/// A synthetic chat request whose prompt (about `bytes` long) differs per `i` after a
/// shared system prompt, as a conversation fleet sees.
fn synthetic_request(i: u32, bytes: usize) -> anyhow::Result<RequestInfo> {
    let system = "You are a helpful assistant. Answer briefly. ";
    let mut user = format!("conversation {} turn {}: ", i % 97, i);
    while user.len() + system.len() < bytes {
        user.push_str("tell me more about prefix caching and routing. ");
    }
    user.truncate(bytes.saturating_sub(system.len()).max(1));
    let body = serde_json::json!({
        "model": "check-model",
        "user": format!("user-{}", i % 13),
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": user},
        ],
    });
    let mut headers = http::HeaderMap::new();
    headers.insert("x-session-id", format!("session-{}", i % 31).parse()?);
    let mut r = RequestInfo::from_json(
        http::Method::POST,
        "/v1/chat/completions".into(),
        "/v1/chat/completions".into(),
        headers,
        Bytes::from(serde_json::to_vec(&body)?),
    )
    .map_err(|e| anyhow::anyhow!("synthetic request: {e:?}"))?;
    r.request_id = format!("check-{i}");
    Ok(r)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn check(a: &CheckArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&a.file)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", a.file.display()))?;
    let sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
    serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&a.config)
        .map_err(|e| anyhow::anyhow!("--config must be a JSON object: {e}"))?;
    let mut limits = Limits::new(a.policy_timeout_ms, a.policy_max_memory_mb);
    limits.max_instances = a.policy_max_instances as usize;
    let engine = PolicyEngine::with_options(limits, false)?;
    let cache = crate::app::policy_cache_dir(a.policy_cache_dir.as_deref(), a.no_policy_cache);
    if let Some(d) = &cache {
        if let Err(e) = engine.set_disk_cache(d) {
            eprintln!("note: not using the compiled-component cache: {e:#}");
        }
    }
    let was_cached = engine.disk_cached(&sha256);
    let workers: Vec<WorkerInfo> = (0..a.workers.max(1))
        .map(|i| WorkerInfo {
            id: i,
            url: format!("http://10.0.{}.{}:8000", i / 250, i % 250 + 1),
            role: Role::Regular,
            dp_rank: None,
            labels: Vec::new(),
        })
        .collect();
    let name = a
        .file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "policy".into());
    println!(
        "policy check: {} ({} bytes, sha256 {})",
        a.file.display(),
        bytes.len(),
        &sha256[..12]
    );
    let t0 = Instant::now();
    let version = engine
        .load(
            &name,
            &a.file.to_string_lossy(),
            &bytes,
            &sha256,
            &a.config,
            1,
            &workers,
        )
        .map_err(|e| anyhow::anyhow!("FAILED to load: {e:#}"))?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let (imports, exports) = version.interface_names();
    let contract = version.contract();
    // 0.2's optional interfaces, as the router found them.
    let optional: Vec<&str> = [
        ("feedback", "vllm:router-policy/feedback@"),
        ("state-transfer", "vllm:router-policy/state-transfer@"),
    ]
    .into_iter()
    .filter(|(_, p)| exports.iter().any(|n| n.starts_with(p)))
    .map(|(n, _)| n)
    .chain(
        version
            .reads_prefix_cache()
            .then_some("imports prefix-cache"),
    )
    .collect();
    let wasi: Vec<&String> = imports.iter().filter(|n| n.starts_with("wasi:")).collect();
    println!(
        "  contract       vllm:router-policy@{contract}{}",
        if contract == "0.1.0" {
            " (world policy; every export in balancer)".to_string()
        } else if optional.is_empty() {
            " (balancer only)".to_string()
        } else {
            format!(" (balancer + {})", optional.join(", "))
        }
    );
    println!(
        "  imports        {} ({} WASI{})",
        imports.len(),
        wasi.len(),
        if wasi.is_empty() {
            String::new()
        } else {
            format!(
                ": {}",
                wasi.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    );
    println!(
        "  load           {load_ms:.0} ms ({}, instantiate, init, workers-changed)",
        if was_cached {
            "compiled component from the cache"
        } else {
            "compile"
        }
    );

    // The timed loop: a different prompt and load picture per call.
    let mut times = Vec::with_capacity(a.calls as usize);
    let (mut picks, mut declines) = (0u64, 0u64);
    let mut per_worker = vec![0u64; workers.len()];
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let requests: Vec<Arc<RequestInfo>> = (0..a.calls.min(256))
        .map(|i| synthetic_request(i, a.prompt_bytes).map(Arc::new))
        .collect::<anyhow::Result<_>>()?;
    for i in 0..a.calls {
        let cands: Vec<Candidate> = workers
            .iter()
            .map(|w| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                Candidate {
                    id: w.id,
                    in_flight: (rng % 16) as u32,
                    engine: (i % 2 == 0).then_some(EngineLoad {
                        running: ((rng >> 8) % 32) as u32,
                        waiting: ((rng >> 16) % 12) as u32,
                        kv_cache_permille: ((rng >> 24) % 1000) as u16,
                    }),
                }
            })
            .collect();
        let req = requests[(i as usize) % requests.len()].clone();
        let t = Instant::now();
        let r = version.select(req, Stage::Regular, 1, &cands);
        times.push(t.elapsed().as_secs_f64() * 1e6);
        match r {
            Ok(id) => {
                picks += 1;
                per_worker[id as usize] += 1;
                if i % 4 == 0 {
                    version
                        .complete(Completion {
                            worker: id,
                            status: 200,
                            latency_ms: 120,
                            first_byte_ms: Some(30),
                            stage: Stage::Regular,
                        })
                        .map_err(|f| anyhow::anyhow!("FAILED: on-complete faulted: {f}"))?;
                }
            }
            Err(NoChoice::Declined(_)) => declines += 1,
            Err(NoChoice::Fault(f)) => {
                anyhow::bail!("FAILED: select call {i} faulted: {f}")
            }
            Err(NoChoice::Syncing) => anyhow::bail!("FAILED: the policy lost the worker set"),
        }
    }
    let state = version.export_state();
    let state_ok = version
        .import_state(&state)
        .map_err(|f| anyhow::anyhow!("FAILED: import-state faulted: {f}"))?;
    times.sort_by(|x, y| x.total_cmp(y));
    println!(
        "  select         p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs over {} calls ({} workers, {} B prompts)",
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        times.last().copied().unwrap_or(0.0),
        a.calls,
        workers.len(),
        a.prompt_bytes
    );
    let share: Vec<String> = per_worker
        .iter()
        .map(|n| format!("{:.0}%", 100.0 * *n as f64 / picks.max(1) as f64))
        .collect();
    println!(
        "  decisions      {picks} picks, {declines} declines; share per worker {}",
        share.join(" ")
    );
    println!(
        "  state          {} bytes exported, import {}",
        state.len(),
        if state_ok {
            "accepted"
        } else {
            "declined (starts cold)"
        }
    );
    println!(
        "  memory         {:.1} MiB peak linear memory (limit {} MiB)",
        version.peak_memory_bytes() as f64 / (1 << 20) as f64,
        a.policy_max_memory_mb
    );
    println!("  faults         {}", version.faults());
    if version.faults() > 0 {
        anyhow::bail!("FAILED: {} faults", version.faults());
    }
    let ratio = declines as f64 / a.calls.max(1) as f64;
    if ratio > a.max_decline_ratio {
        anyhow::bail!(
            "FAILED: {:.0}% of decisions declined (limit {:.0}%, --max-decline-ratio)",
            ratio * 100.0,
            a.max_decline_ratio * 100.0
        );
    }
    println!("OK");
    Ok(())
}
