//! Policies on the request path: the active policy version (swappable atomically), the
//! candidate list handed to it, and the fallback that serves a request whenever the
//! policy fails (the client never sees a policy's fault).

pub mod builtin;
pub mod runtime;

use crate::metrics::Metrics;
use crate::request::RequestInfo;
use crate::workers::{Worker, WorkerSet};
use arc_swap::ArcSwap;
pub use runtime::{Completion, PolicyEngine, PolicyFault, PolicyVersion, Stage};
pub use vllm_router_sdk::{Candidate, EngineLoad};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;
use vllm_router_sdk::Role;

/// A named policy slot holding the version that currently decides.
pub struct PolicySlot {
    /// Slot name (`default`, `prefill`, `decode`, or an A/B arm).
    pub name: String,
    current: ArcSwap<PolicyVersion>,
}

impl PolicySlot {
    /// A slot serving `version`.
    pub fn new(name: &str, version: Arc<PolicyVersion>) -> Self {
        PolicySlot {
            name: name.to_string(),
            current: ArcSwap::new(version),
        }
    }

    /// The version deciding now.
    pub fn current(&self) -> Arc<PolicyVersion> {
        self.current.load_full()
    }

    /// Publish a new version; requests already routed keep the old one until they end.
    pub fn publish(&self, version: Arc<PolicyVersion>) {
        self.current.store(version);
    }
}

/// The outcome of choosing a worker for one attempt.
pub struct Choice {
    /// The chosen worker.
    pub worker: Arc<Worker>,
    /// The policy version asked (also when the fallback decided).
    pub version: Arc<PolicyVersion>,
    /// True when the fallback chose because the policy failed.
    pub fallback: bool,
}

static FALLBACK_ROTATION: AtomicUsize = AtomicUsize::new(0);

/// Fallback choice: fewest in-flight requests, ties broken by rotation.
pub fn fallback_choice(candidates: &[Candidate]) -> u32 {
    let min = candidates.iter().map(|c| c.in_flight).min().unwrap_or(0);
    let tied: Vec<u32> = candidates
        .iter()
        .filter(|c| c.in_flight == min)
        .map(|c| c.id)
        .collect();
    tied[FALLBACK_ROTATION.fetch_add(1, Ordering::Relaxed) % tied.len()]
}

/// The eligible workers of `role` for a request, excluding ids already tried.
/// Engine load is attached when scraping is on and the sample is fresh.
pub fn candidates(set: &WorkerSet, role: Role, exclude: &[u32]) -> Vec<Candidate> {
    let max_age = crate::engine::max_age_ms();
    let now = if max_age > 0 { crate::util::uptime_ms() } else { 0 };
    set.workers
        .iter()
        .filter(|w| w.role == role && w.is_healthy() && !exclude.contains(&w.id))
        .map(|w| Candidate {
            id: w.id,
            in_flight: w.in_flight(),
            engine: if max_age > 0 {
                w.engine_load(now, max_age)
            } else {
                None
            },
        })
        .collect()
}

/// Choose a worker for `req` with the slot's policy; `None` when no worker is eligible.
/// A policy fault is counted, logged at warn (with slot and version) and answered by
/// [`fallback_choice`].
pub fn choose(
    slot: &PolicySlot,
    req: &Arc<RequestInfo>,
    stage: Stage,
    role: Role,
    set: &WorkerSet,
    exclude: &[u32],
    metrics: &Metrics,
) -> Option<Choice> {
    let cands = candidates(set, role, exclude);
    if cands.is_empty() {
        return None;
    }
    let version = slot.current();
    let t0 = Instant::now();
    let result = version.select(req, stage, set, &cands);
    metrics
        .policy_decision_seconds
        .with_label_values(&[slot.name.as_str(), &*version.label])
        .observe(t0.elapsed().as_secs_f64());
    let (id, fallback) = match result {
        Ok(id) => (id, false),
        Err(fault) => {
            metrics
                .policy_failures
                .with_label_values(&[slot.name.as_str(), &*version.label, fault.kind()])
                .inc();
            metrics
                .policy_fallbacks
                .with_label_values(&[&slot.name])
                .inc();
            tracing::warn!(slot = %slot.name, policy = %version.label, request_id = %req.request_id,
                "policy failed ({fault}); routed by fallback (least in-flight)");
            (fallback_choice(&cands), true)
        }
    };
    let worker = set.get(id)?.clone();
    Some(Choice {
        worker,
        version,
        fallback,
    })
}

/// Load the policy named by the flags: a file (`--policy-wasm`) or a built-in.
pub fn load_initial(
    engine: &Arc<PolicyEngine>,
    policy: &str,
    wasm: Option<&std::path::Path>,
    config: &str,
) -> anyhow::Result<Arc<PolicyVersion>> {
    match wasm {
        Some(path) => {
            let bytes = std::fs::read(path).map_err(|e| {
                anyhow::anyhow!("cannot read --policy-wasm {}: {e}", path.display())
            })?;
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_else(|| "custom".into());
            engine
                .load(&name, &path.display().to_string(), &bytes, config)
                .map_err(|e| anyhow::anyhow!("cannot load policy {}: {e:#}", path.display()))
        }
        None => {
            let b = builtin::find(policy).ok_or_else(|| {
                anyhow::anyhow!(
                    "unknown --policy '{policy}'; built-in policies: {}",
                    builtin::names()
                )
            })?;
            engine.load(b.name, &format!("builtin:{}", b.name), b.wasm, config)
        }
    }
}
