//! Policies on the request path: the candidate list (eligible workers), the call into
//! the slot's serving version (the WebAssembly runtime lives in crate
//! `vllm-router-runtime`), and the fallback that serves a request whenever the policy
//! faults, declines or is quarantined (the client never sees a policy's fault).
//!
//! Where a worker is chosen: [`choose`] (called by `forward::Forwarder::pick`).

pub mod builtin;
pub mod slots;
pub mod sync;

use crate::metrics::Metrics;
use crate::request::RequestInfo;
use crate::workers::{Worker, WorkerSet};
pub use slots::{PolicySlot, PolicySlots, PolicySource, SlotSpec};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;
use vllm_router_runtime::feedback::FeedbackQueue;
pub use vllm_router_runtime::{
    Completion, NoChoice, PolicyEngine, PolicyFault, PolicyVersion, RequestView, Stage, WorkerInfo,
};
use vllm_router_sdk::Role;
pub use vllm_router_sdk::{Candidate, EngineLoad};

/// The outcome of choosing a worker for one attempt.
pub struct Choice {
    /// The chosen worker.
    pub worker: Arc<Worker>,
    /// The slot (A/B arm) that decided; `None` for routes that bypass policies.
    pub slot: Option<Arc<PolicySlot>>,
    /// The policy version asked (also when the fallback decided); `None` when no policy
    /// was asked.
    pub version: Option<Arc<PolicyVersion>>,
    /// True when the fallback chose (policy fault, decline, quarantine, or no policy).
    pub fallback: bool,
    /// The request stage this choice is for.
    pub stage: Stage,
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

/// The eligible workers of `role` for a request (healthy, breaker admitting), excluding
/// ids already tried.
/// Engine load is attached when scraping is on and the sample is fresh.
pub fn candidates(set: &WorkerSet, role: Role, exclude: &[u32]) -> Vec<Candidate> {
    let max_age = crate::engine::max_age_ms();
    let now = if max_age > 0 {
        crate::util::uptime_ms()
    } else {
        0
    };
    set.workers
        .iter()
        .filter(|w| {
            w.role == role && w.is_healthy() && !exclude.contains(&w.id) && w.breaker_allows()
        })
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
/// A fault is counted, logged at warn (with slot, version and cause) and answered by
/// [`fallback_choice`]; a decline (`decision::none`) or a version still waiting for the
/// current worker set is answered by the fallback too, counted but not a fault.
pub fn choose(
    slot: &Arc<PolicySlot>,
    req: &Arc<RequestInfo>,
    stage: Stage,
    set: &WorkerSet,
    cands: &[Candidate],
    metrics: &Metrics,
    feedback: &FeedbackQueue,
) -> Option<Choice> {
    if cands.is_empty() {
        return None;
    }
    slot.count_decision();
    let version = slot.current();
    let (id, fallback) = if version.is_quarantined() {
        metrics.policy_fallback(&slot.name, "quarantined");
        (fallback_choice(cands), true)
    } else {
        decide(slot, &version, req, stage, set, cands, metrics, feedback)
    };
    let worker = set.get(id)?.clone();
    Some(Choice {
        worker,
        slot: Some(slot.clone()),
        version: Some(version),
        fallback,
        stage,
    })
}

/// One `select` call with its metrics. Returns the worker id and whether the fallback
/// chose.
#[allow(clippy::too_many_arguments)]
fn decide(
    slot: &PolicySlot,
    version: &PolicyVersion,
    req: &Arc<RequestInfo>,
    stage: Stage,
    set: &WorkerSet,
    cands: &[Candidate],
    metrics: &Metrics,
    feedback: &FeedbackQueue,
) -> (u32, bool) {
    let t0 = Instant::now();
    let result = version.select(req.clone(), stage, set.generation, cands);
    metrics.policy_decision(&slot.name, t0.elapsed());
    match result {
        Ok(id) => (id, false),
        Err(NoChoice::Declined(why)) => {
            metrics.policy_fallback(&slot.name, "declined");
            tracing::debug!(slot = %slot.name, policy = %version.label, request_id = %req.request_id,
                "policy declined to choose ({why}); routed by fallback (least in-flight)");
            (fallback_choice(cands), true)
        }
        Err(NoChoice::Syncing) => {
            // The worker-set push is on its way; make sure it is (idempotent).
            metrics.policy_fallback(&slot.name, "syncing");
            feedback.request_sync();
            (fallback_choice(cands), true)
        }
        Err(NoChoice::Fault(fault)) => {
            metrics
                .policy_failures
                .with_label_values(&[slot.name.as_str(), &*version.label, fault.kind()])
                .inc();
            metrics.policy_fallback(&slot.name, "fault");
            tracing::warn!(slot = %slot.name, policy = %version.label, request_id = %req.request_id,
                "policy failed ({fault}); routed by fallback (least in-flight)");
            if version.take_newly_quarantined() {
                metrics
                    .policy_quarantines
                    .with_label_values(&[&slot.name])
                    .inc();
                tracing::error!(slot = %slot.name, policy = %version.label,
                    "policy quarantined after repeated faults: the fallback (least in-flight) decides until a new version is loaded");
            }
            (fallback_choice(cands), true)
        }
    }
}

/// Let each shadow slot decide on the same candidates and count whether it agreed with
/// the serving choice `chosen`. Never affects routing; faults only count as `failed`.
pub fn run_shadows(
    shadows: &[Arc<PolicySlot>],
    req: &Arc<RequestInfo>,
    stage: Stage,
    set: &WorkerSet,
    cands: &[Candidate],
    chosen: u32,
    metrics: &Metrics,
) {
    for s in shadows {
        s.count_decision();
        let v = s.current();
        let t0 = Instant::now();
        let r = v.select(req.clone(), stage, set.generation, cands);
        metrics.policy_decision(&s.name, t0.elapsed());
        let agreement = match r {
            Ok(id) if id == chosen => {
                s.count_agreement();
                "agree"
            }
            Ok(_) => "disagree",
            Err(NoChoice::Fault(fault)) => {
                metrics
                    .policy_failures
                    .with_label_values(&[s.name.as_str(), &*v.label, fault.kind()])
                    .inc();
                "failed"
            }
            Err(NoChoice::Declined(_)) | Err(NoChoice::Syncing) => "declined",
        };
        metrics
            .shadow_decisions
            .with_label_values(&[s.name.as_str(), agreement])
            .inc();
    }
}
