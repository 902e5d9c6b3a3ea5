//! Policies on the request path: the candidate list (eligible workers), the call into
//! the slot's serving version (the WebAssembly runtime lives in crate
//! `vllm-router-runtime`), and the fallback that serves a request whenever the policy
//! faults, declines or is quarantined (the client never sees a policy's fault).
//!
//! Where a worker is chosen: [`choose`] (called by `forward::Forwarder::pick`).

pub mod builtin;
pub mod loader;
pub mod slots;
pub mod sync;

use crate::metrics::Metrics;
use crate::request::RequestInfo;
use crate::workers::{Worker, WorkerSet};
pub use slots::{PolicySlot, PolicySlots, PolicySource, SlotLimits, SlotSpec};
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

fn eligible(w: &Worker, role: Role, exclude: &[u32]) -> bool {
    w.role == role
        && w.is_healthy()
        && !w.is_draining()
        && !exclude.contains(&w.id)
        && w.breaker_allows()
}

/// The eligible workers of `role` for a request (healthy, breaker admitting), excluding
/// ids already tried, in ascending id order. Engine load is attached when the sample is
/// younger than `engine_max_age_ms` (0 = engine scraping off: none attached).
pub fn candidates(
    set: &WorkerSet,
    role: Role,
    exclude: &[u32],
    engine_max_age_ms: u64,
) -> Vec<Candidate> {
    let now = if engine_max_age_ms > 0 {
        crate::util::uptime_ms()
    } else {
        0
    };
    set.workers
        .iter()
        .filter(|w| eligible(w, role, exclude))
        .map(|w| Candidate {
            id: w.id,
            in_flight: w.in_flight(),
            engine: if engine_max_age_ms > 0 {
                w.engine_load(now, engine_max_age_ms)
            } else {
                None
            },
        })
        .collect()
}

/// Whether any worker of `role` not in `exclude` is eligible (no allocation).
pub fn has_candidate(set: &WorkerSet, role: Role, exclude: &[u32]) -> bool {
    set.workers.iter().any(|w| eligible(w, role, exclude))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::BreakerShared;
    use crate::workers::Registry;
    use loader::SlotLoader;
    use std::path::PathBuf;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    /// A test component built by `tests/run.sh` (hostile, probe, ...).
    fn test_component(stem: &str) -> PathBuf {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/policy-wasm/wasm32-wasip2/policy")
            .join(format!("{stem}.wasm"));
        assert!(
            p.exists(),
            "{} missing: run tests/run.sh (it builds the test components)",
            p.display()
        );
        p
    }

    fn setup(stem: &str, config: &str) -> (SlotLoader, Arc<PolicySlot>) {
        let registry = Arc::new(Registry::with_breaker(Arc::new(BreakerShared::default())));
        registry
            .add("http://127.0.0.1:1", Role::Regular, 3)
            .unwrap();
        let engine = PolicyEngine::new(5, 16).unwrap();
        engine.set_quarantine(3, Duration::from_secs(60));
        let l = SlotLoader {
            engine,
            registry,
            metrics: Arc::new(Metrics::new()),
        };
        let spec = SlotSpec {
            source: PolicySource::File(test_component(stem)),
            config: config.into(),
            limits: Default::default(),
        };
        let s = l
            .new_slot("t", Role::Regular, spec, 100, false, None)
            .unwrap();
        (l, s)
    }

    #[test]
    fn a_slot_may_have_its_own_limits_within_bounds() {
        let (l, _) = setup("test_policy_pick_first", "{}");
        let spec = |limits: SlotLimits| SlotSpec {
            source: PolicySource::File(test_component("test_policy_pick_first")),
            config: "{}".into(),
            limits,
        };
        let own = SlotLimits {
            timeout_ms: Some(50),
            max_memory_mb: Some(128),
            max_instances: Some(20),
        };
        let s = l
            .new_slot("js", Role::Regular, spec(own), 100, false, None)
            .unwrap();
        let lim = s.current().limits().clone();
        assert_eq!(
            (lim.call_ms, lim.max_memory, lim.max_instances),
            (50, 128 << 20, 20)
        );
        // Unset fields keep the router's flags (PolicyEngine::new(5, 16) in setup).
        let s = l
            .new_slot(
                "d",
                Role::Regular,
                spec(SlotLimits::default()),
                100,
                false,
                None,
            )
            .unwrap();
        assert_eq!(s.current().limits().call_ms, 5);
        let err = l
            .new_slot(
                "x",
                Role::Regular,
                spec(SlotLimits {
                    timeout_ms: Some(60_000),
                    ..Default::default()
                }),
                100,
                false,
                None,
            )
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("timeout_ms must be 1..=1000"), "{err}");
    }

    fn req() -> Arc<RequestInfo> {
        let mut r = RequestInfo::raw(
            http::Method::POST,
            "/v1/completions".into(),
            "/v1/completions".into(),
            http::HeaderMap::new(),
            bytes::Bytes::from_static(b"{}"),
        );
        r.request_id = "r1".into();
        Arc::new(r)
    }

    fn feedback() -> Arc<FeedbackQueue> {
        FeedbackQueue::start(16, |_, _| {}, || {}).unwrap()
    }

    #[test]
    fn a_decline_is_answered_by_the_fallback_and_never_quarantines() {
        let (l, slot) = setup("test_policy_hostile", r#"{"mode":"decline"}"#);
        let set = l.registry.snapshot();
        let cands = candidates(&set, Role::Regular, &[], 0);
        let fb = feedback();
        for _ in 0..20 {
            let c = choose(&slot, &req(), Stage::Regular, &set, &cands, &l.metrics, &fb).unwrap();
            assert!(c.fallback);
        }
        let v = slot.current();
        assert_eq!(v.faults(), 0);
        assert!(!v.is_quarantined());
        assert_eq!(v.inits(), 1);
    }

    #[test]
    fn traps_are_faults_reinit_the_instance_and_quarantine_after_the_limit() {
        let (l, slot) = setup("test_policy_hostile", r#"{"mode":"trap"}"#);
        let set = l.registry.snapshot();
        let cands = candidates(&set, Role::Regular, &[], 0);
        let fb = feedback();
        for _ in 0..5 {
            let c = choose(&slot, &req(), Stage::Regular, &set, &cands, &l.metrics, &fb).unwrap();
            assert!(c.fallback, "the client is served by the fallback");
        }
        let v = slot.current();
        assert_eq!(
            v.faults(),
            3,
            "quarantined at 3: later requests skip the policy"
        );
        assert!(v.is_quarantined());
        // Each trap dropped the instance; the next call re-instantiated it (init again).
        assert_eq!(v.inits(), 3);
    }

    #[test]
    fn a_version_behind_the_worker_set_is_not_called_until_the_push() {
        let (l, slot) = setup("test_policy_pick_first", "{}");
        let v = slot.current();
        l.registry
            .add("http://127.0.0.1:2", Role::Regular, 1)
            .unwrap();
        let set = l.registry.snapshot();
        let cands = candidates(&set, Role::Regular, &[], 0);
        let nudges = Arc::new(AtomicUsize::new(0));
        let n2 = nudges.clone();
        let fb = FeedbackQueue::start(
            16,
            |_, _| {},
            move || {
                n2.fetch_add(1, Ordering::SeqCst);
            },
        )
        .unwrap();
        let c = choose(&slot, &req(), Stage::Regular, &set, &cands, &l.metrics, &fb).unwrap();
        assert!(c.fallback, "no workers-changed on the request path");
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while nudges.load(Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < end, "sync never requested");
            std::thread::yield_now();
        }
        // The push (what the feedback thread's sync does) brings it up to date.
        sync::push_workers(&l.registry, &PolicySlots::new(vec![slot.clone()], false));
        assert_eq!(v.synced_generation(), set.generation);
        let c = choose(&slot, &req(), Stage::Regular, &set, &cands, &l.metrics, &fb).unwrap();
        assert!(!c.fallback);
        assert_eq!(c.worker.id, cands[0].id);
    }

    #[test]
    fn feedback_is_delivered_off_thread_and_dropped_when_the_queue_is_full() {
        let (_l, slot) = setup("test_policy_pick_first", "{}");
        let v = slot.current();
        let done = |w| Completion {
            worker: w,
            status: 200,
            latency_ms: 1,
            first_byte_ms: None,
            stage: Stage::Regular,
        };
        // The thread's sync hook blocks until released, so the queue (4) fills up.
        let (entered_tx, entered_rx) = std::sync::mpsc::channel::<()>();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = parking_lot::Mutex::new(release_rx);
        let fb = FeedbackQueue::start(
            4,
            |_, _| {},
            move || {
                let _ = entered_tx.send(());
                let _ = release_rx.lock().recv();
            },
        )
        .unwrap();
        fb.request_sync();
        entered_rx.recv().unwrap();
        let sent = (0..100).filter(|i| fb.send(v.clone(), done(*i))).count();
        assert_eq!(sent, 4, "a full queue drops instead of blocking the caller");
        assert_eq!(fb.dropped(), 96);
        release_tx.send(()).unwrap();
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while fb.delivered() < 4 {
            assert!(std::time::Instant::now() < end);
            std::thread::yield_now();
        }
    }
}
