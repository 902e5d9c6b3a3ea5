//! One loaded policy version: its single live instance, the guest calls (`select`,
//! `workers-changed`, `on-complete`, state hand-off), fault classification and
//! quarantine.

use crate::bindings_v2::exports::vllm::router_policy::{
    balancer as v2_balancer, feedback as v2_feedback, state_transfer as v2_state,
};
use crate::bindings_v2::vllm::router_policy::types as v2_types;
use crate::engine::{Limits, PolicyEngine};
use crate::{
    Completion, PolicyPre, PolicyState, PolicyWorld, RequestView, Stage, WorkerInfo, types,
};
use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};
use vllm_router_sdk::wire::{pack_candidate, pack_engine};
use wasmtime::component::InstancePre;
use wasmtime::component::Resource;
use wasmtime::{Store, StoreLimitsBuilder};

/// A compiled, linked component of either contract version, with its export lookups
/// done once (per compile, not per instantiation).
#[derive(Clone)]
pub(crate) enum Pre {
    /// `vllm:router-policy@0.1.0` (every export in `balancer`).
    V1(PolicyPre<PolicyState>),
    /// `vllm:router-policy@0.2.0`: `balancer` required, `feedback` and `state-transfer`
    /// probed (absent = the policy does not want them).
    V2 {
        pre: InstancePre<PolicyState>,
        balancer: v2_balancer::GuestIndices,
        feedback: Option<v2_feedback::GuestIndices>,
        state: Option<v2_state::GuestIndices>,
    },
}

impl Pre {
    /// Classify a linked component by the `balancer` it exports. Errors: it exports
    /// neither version's `balancer` (or one with the wrong functions).
    pub(crate) fn new(pre: InstancePre<PolicyState>) -> anyhow::Result<Pre> {
        let exports_v2 = pre
            .component()
            .get_export_index(None, "vllm:router-policy/balancer@0.2.0")
            .is_some();
        if exports_v2 {
            let balancer = v2_balancer::GuestIndices::new(&pre).map_err(|e| {
                anyhow::anyhow!(
                    "component's vllm:router-policy/balancer@0.2.0 does not match the contract: {e:#}"
                )
            })?;
            let feedback = v2_feedback::GuestIndices::new(&pre).ok();
            let state = v2_state::GuestIndices::new(&pre).ok();
            return Ok(Pre::V2 {
                pre,
                balancer,
                feedback,
                state,
            });
        }
        PolicyPre::new(pre).map(Pre::V1).map_err(|e| {
            anyhow::anyhow!(
                "component does not export vllm:router-policy/balancer (0.1.x or 0.2.x): {e:#}"
            )
        })
    }

    pub(crate) fn instance_pre(&self) -> &InstancePre<PolicyState> {
        match self {
            Pre::V1(p) => p.instance_pre(),
            Pre::V2 { pre, .. } => pre,
        }
    }

    /// The contract version the component speaks, e.g. `0.2.0`.
    pub(crate) fn contract(&self) -> &'static str {
        match self {
            Pre::V1(_) => "0.1.0",
            Pre::V2 { .. } => "0.2.0",
        }
    }

    fn instantiate(&self, store: &mut Store<PolicyState>) -> wasmtime::Result<Exports> {
        Ok(match self {
            Pre::V1(p) => Exports::V1(p.instantiate(&mut *store)?),
            Pre::V2 {
                pre,
                balancer,
                feedback,
                state,
            } => {
                let instance = pre.instantiate(&mut *store)?;
                Exports::V2 {
                    balancer: balancer.load(&mut *store, &instance)?,
                    feedback: match feedback {
                        Some(f) => Some(f.load(&mut *store, &instance)?),
                        None => None,
                    },
                    state: match state {
                        Some(s) => Some(s.load(&mut *store, &instance)?),
                        None => None,
                    },
                }
            }
        })
    }
}

/// The typed exports of a live instance.
enum Exports {
    V1(PolicyWorld),
    V2 {
        balancer: v2_balancer::Guest,
        feedback: Option<v2_feedback::Guest>,
        state: Option<v2_state::Guest>,
    },
}

/// A decision in either version's type.
fn decision_v2(d: v2_types::Decision) -> types::Decision {
    match d {
        v2_types::Decision::Worker(id) => types::Decision::Worker(id),
        v2_types::Decision::None(why) => types::Decision::None(why),
    }
}

fn worker_v2(w: &WorkerInfo) -> v2_types::Worker {
    v2_types::Worker {
        id: w.id,
        url: w.url.clone(),
        role: match w.role {
            vllm_router_sdk::Role::Regular => v2_types::Role::Regular,
            vllm_router_sdk::Role::Prefill => v2_types::Role::Prefill,
            vllm_router_sdk::Role::Decode => v2_types::Role::Decode,
        },
        dp_rank: w.dp_rank,
        labels: w.labels.clone(),
    }
}

pub(crate) struct Live {
    store: Store<PolicyState>,
    world: Exports,
    /// Worker-set generation this instance was told about.
    generation: u64,
    /// Reused candidate / engine word buffers for `select`.
    buffers: (Vec<u64>, Vec<u64>),
}

/// What went wrong in a policy call. The request is still served (by the fallback).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyFault {
    /// The guest trapped (panic, unreachable, out of bounds, missing import, ...).
    Trap(String),
    /// The call exceeded `--policy-timeout-ms`.
    Timeout,
    /// The instance hit `--policy-max-memory-mb`.
    OutOfMemory,
    /// The answer named a worker that is not a candidate.
    BadAnswer(u32),
    /// (Re-)instantiation or `init` failed.
    Init(String),
}

impl PolicyFault {
    /// Metric label value.
    pub fn kind(&self) -> &'static str {
        match self {
            PolicyFault::Trap(_) => "trap",
            PolicyFault::Timeout => "timeout",
            PolicyFault::OutOfMemory => "out_of_memory",
            PolicyFault::BadAnswer(_) => "bad_answer",
            PolicyFault::Init(_) => "init",
        }
    }
}

impl std::fmt::Display for PolicyFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PolicyFault::Trap(m) => write!(f, "trap: {m}"),
            PolicyFault::Timeout => write!(f, "exceeded its time limit"),
            PolicyFault::OutOfMemory => write!(f, "exceeded its memory limit"),
            PolicyFault::BadAnswer(id) => write!(f, "chose worker {id}, which is not a candidate"),
            PolicyFault::Init(m) => write!(f, "could not start: {m}"),
        }
    }
}

/// Why `select` gave no worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoChoice {
    /// A fault: counted toward quarantine; the fallback decides.
    Fault(PolicyFault),
    /// The policy answered `decision::none(reason)`: the fallback decides; not a fault.
    Declined(String),
    /// The instance has not yet been told about the current worker set (the push is on
    /// its way); the fallback decides this one request. Not a fault.
    Syncing,
}

/// Longest fault message kept (the cause comes first; the wasm backtrace after it).
const FAULT_MESSAGE_CHARS: usize = 2000;

/// Turn a wasmtime error into a fault. The message puts the *cause* first (the guest's
/// panic text, the missing import, the trap code), then the wasm backtrace, so a cut
/// message still says what went wrong.
fn classify(e: wasmtime::Error) -> PolicyFault {
    if let Some(trap) = e.downcast_ref::<wasmtime::Trap>() {
        if *trap == wasmtime::Trap::Interrupt {
            return PolicyFault::Timeout;
        }
    }
    let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
    let all = chain.join(" | ");
    if all.contains("forcing trap when growing memory") || all.contains("memory minimum size") {
        return PolicyFault::OutOfMemory;
    }
    // wasmtime puts the backtrace in the outermost message and the trap in a cause.
    let (backtrace, causes): (Vec<&String>, Vec<&String>) =
        chain.iter().partition(|m| m.contains("wasm backtrace"));
    let mut msg = causes
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(": ");
    if let Some(b) = backtrace.first() {
        if !msg.is_empty() {
            msg.push_str(" — ");
        }
        msg.push_str(&b.replace('\n', " "));
    }
    PolicyFault::Trap(msg.chars().take(FAULT_MESSAGE_CHARS).collect())
}

/// One loaded, validated policy component: its identity, its compiled pre-instance, and
/// its single live instance (state such as counters and trees lives there).
pub struct PolicyVersion {
    /// Policy name (built-in name or file stem).
    pub name: String,
    /// `name@sha256[..12]`, used in logs and metric labels.
    pub label: Arc<str>,
    /// SHA-256 of the component bytes, hex.
    pub sha256: String,
    /// Where it came from: `builtin:NAME` or a file path.
    pub source: String,
    /// JSON config given to `init`.
    pub config: String,
    /// When it was loaded.
    pub loaded_at: SystemTime,
    pub(crate) engine: Arc<PolicyEngine>,
    /// This version's sandbox limits (the engine's, or its slot's overrides).
    pub(crate) limits: crate::Limits,
    pub(crate) pre: Pre,
    /// Whether the component imports `prefix-cache` (`vllm:router-kv/…@0.1.0` or
    /// `vllm:router-policy/…@0.2.0`; the host then has
    /// the prompt tokenized before `select`; see [`PolicyVersion::reads_prefix_cache`]).
    pub(crate) reads_prefix_cache: bool,
    pub(crate) live: Mutex<Option<Live>>,
    /// The latest worker set pushed (generation, workers), replayed into a fresh
    /// instance after a fault.
    pub(crate) workers: Mutex<(u64, Arc<Vec<WorkerInfo>>)>,
    /// Generation the live instance knows (`u64::MAX` = none); read without the lock.
    pub(crate) synced: AtomicU64,
    pub(crate) faults: AtomicU64,
    pub(crate) inits: AtomicU64,
    pub(crate) recent_faults: Mutex<std::collections::VecDeque<Instant>>,
    pub(crate) quarantined: AtomicBool,
    pub(crate) newly_quarantined: AtomicBool,
}

impl std::fmt::Debug for PolicyVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyVersion")
            .field("label", &self.label)
            .field("source", &self.source)
            .finish()
    }
}

fn to_wit_worker(w: &WorkerInfo) -> types::Worker {
    types::Worker {
        id: w.id,
        url: w.url.clone(),
        role: match w.role {
            vllm_router_sdk::Role::Regular => types::Role::Regular,
            vllm_router_sdk::Role::Prefill => types::Role::Prefill,
            vllm_router_sdk::Role::Decode => types::Role::Decode,
        },
        dp_rank: w.dp_rank,
        labels: w.labels.clone(),
    }
}

impl PolicyVersion {
    /// Whether this version imports `prefix-cache` (0.1's `vllm:router-kv` package or
    /// 0.2's `vllm:router-policy`): only then is a
    /// request's prompt tokenized and matched against the KV-event index before `select`
    /// (a policy that never asks costs nothing).
    pub fn reads_prefix_cache(&self) -> bool {
        self.reads_prefix_cache
    }

    pub(crate) fn instantiate(&self) -> anyhow::Result<Live> {
        let _call = self.engine.ticker.enter();
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.limits.max_memory)
            .trap_on_grow_failure(true)
            .instances(self.limits.max_instances)
            .tables(self.limits.max_tables)
            .memories(self.limits.max_memories)
            .build();
        let state = PolicyState {
            current: None,
            engine_words: Vec::new(),
            candidate_ids: Vec::new(),
            label: self.label.clone(),
            limits,
            started: Instant::now(),
            log_window: (0, 0),
            stdio: [Vec::new(), Vec::new()],
            peak_memory: 0,
        };
        let mut store = Store::new(&self.engine.engine, state);
        store.limiter(|s| s as &mut dyn wasmtime::ResourceLimiter);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(Limits::SETUP_TICKS);
        let world = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| anyhow::anyhow!("instantiation failed: {}", classify(e)))?;
        self.inits.fetch_add(1, Ordering::Relaxed);
        let init = match &world {
            Exports::V1(w) => w
                .vllm_router_policy_balancer()
                .call_init(&mut store, &self.config),
            Exports::V2 { balancer, .. } => balancer.call_init(&mut store, &self.config),
        };
        match init {
            Ok(Ok(())) => {}
            Ok(Err(msg)) => anyhow::bail!("init refused the config: {msg}"),
            Err(e) => anyhow::bail!("init failed: {}", classify(e)),
        }
        Ok(Live {
            store,
            world,
            generation: u64::MAX,
            buffers: (Vec::new(), Vec::new()),
        })
    }

    /// Bring a (possibly fresh) instance up to the latest pushed worker set.
    fn catch_up(&self, live: &mut Live) -> Result<(), PolicyFault> {
        let (generation, workers) = {
            let w = self.workers.lock();
            (w.0, w.1.clone())
        };
        if live.generation == generation {
            return Ok(());
        }
        live.store.set_epoch_deadline(Limits::SETUP_TICKS);
        match &live.world {
            Exports::V1(w) => {
                let list: Vec<types::Worker> = workers.iter().map(to_wit_worker).collect();
                w.vllm_router_policy_balancer()
                    .call_workers_changed(&mut live.store, &list)
            }
            Exports::V2 { balancer, .. } => {
                let list: Vec<v2_types::Worker> = workers.iter().map(worker_v2).collect();
                balancer.call_workers_changed(&mut live.store, &list)
            }
        }
        .map_err(classify)?;
        live.generation = generation;
        self.synced.store(generation, Ordering::Release);
        Ok(())
    }

    /// Run `f` on the live instance, instantiating it (init + the latest worker set) if
    /// a fault dropped it. A fault drops the instance so the next call starts clean.
    fn with_live<R>(
        &self,
        f: impl FnOnce(&mut Live) -> Result<R, PolicyFault>,
    ) -> Result<R, PolicyFault> {
        let _call = self.engine.ticker.enter();
        let mut guard = self.live.lock();
        if guard.is_none() {
            match self.instantiate() {
                Ok(l) => *guard = Some(l),
                Err(e) => {
                    let fault = PolicyFault::Init(format!("{e:#}"));
                    self.note_fault();
                    return Err(fault);
                }
            }
        }
        let live = guard.as_mut().expect("instance present");
        let out = self.catch_up(live).and_then(|()| f(live));
        if let Err(fault) = &out {
            if !matches!(fault, PolicyFault::BadAnswer(_)) {
                *guard = None;
                self.synced.store(u64::MAX, Ordering::Release);
            }
            self.note_fault();
        }
        out
    }

    fn note_fault(&self) {
        self.faults.fetch_add(1, Ordering::Relaxed);
        let limit = self.engine.quarantine_faults.load(Ordering::Relaxed) as usize;
        if limit == 0 {
            return;
        }
        let window =
            Duration::from_millis(self.engine.quarantine_window_ms.load(Ordering::Relaxed));
        let now = Instant::now();
        let mut q = self.recent_faults.lock();
        q.push_back(now);
        while q.front().is_some_and(|t| now.duration_since(*t) > window) {
            q.pop_front();
        }
        if q.len() >= limit && !self.quarantined.swap(true, Ordering::AcqRel) {
            self.newly_quarantined.store(true, Ordering::Release);
        }
    }

    /// True once the version failed `--policy-quarantine-faults` times within the
    /// window: the router stops calling it (the fallback decides) until a new version
    /// is loaded into the slot.
    pub fn is_quarantined(&self) -> bool {
        self.quarantined.load(Ordering::Relaxed)
    }

    /// True exactly once, after the version became quarantined (for logs and metrics).
    pub fn take_newly_quarantined(&self) -> bool {
        self.newly_quarantined.swap(false, Ordering::AcqRel)
    }

    /// Push a new worker set (`workers-changed`) at `generation`. Called by the host when
    /// its registry publishes a set, off the request path; a no-op when the instance
    /// already has it. A fault here is counted like any other.
    pub fn workers_changed(
        &self,
        generation: u64,
        workers: Arc<Vec<WorkerInfo>>,
    ) -> Result<(), PolicyFault> {
        {
            let mut w = self.workers.lock();
            if w.0 == generation && self.synced.load(Ordering::Acquire) == generation {
                return Ok(());
            }
            *w = (generation, workers);
        }
        self.with_live(|_| Ok(()))
    }

    /// This version's sandbox limits.
    pub fn limits(&self) -> &crate::Limits {
        &self.limits
    }

    /// Largest linear memory the live instance has grown to, bytes (0 when no instance
    /// is live).
    pub fn peak_memory_bytes(&self) -> usize {
        self.live
            .lock()
            .as_ref()
            .map(|l| l.store.data().peak_memory)
            .unwrap_or(0)
    }

    /// The component's imports and exports by name (e.g. `vllm:router-policy/host@0.1.0`,
    /// `wasi:io/streams@0.2.6`), for `vllm-router policy check`.
    pub fn interface_names(&self) -> (Vec<String>, Vec<String>) {
        let engine = &self.engine.engine;
        let ty = self.pre.instance_pre().component().component_type();
        let imports = ty.imports(engine).map(|(n, _)| n.to_string()).collect();
        let exports = ty.exports(engine).map(|(n, _)| n.to_string()).collect();
        (imports, exports)
    }

    /// The worker-set generation the live instance knows (`u64::MAX`: none).
    pub fn synced_generation(&self) -> u64 {
        self.synced.load(Ordering::Acquire)
    }

    /// Ask the policy for a worker. `candidates` must be non-empty and in ascending id
    /// order; the answer is validated against them. `generation`: the worker set the
    /// candidates come from; when the instance does not know it yet, the answer is
    /// [`NoChoice::Syncing`] without a guest call (`workers-changed` never runs on a
    /// client's request).
    pub fn select(
        &self,
        req: Arc<dyn RequestView>,
        stage: Stage,
        generation: u64,
        candidates: &[vllm_router_sdk::Candidate],
    ) -> Result<u32, NoChoice> {
        // The live instance knows this set; or it was dropped by a fault and will be
        // revived with the set it was last pushed (which is this one). Otherwise the
        // host's push of this set has not arrived yet.
        if self.synced.load(Ordering::Acquire) != generation && self.workers.lock().0 != generation
        {
            return Err(NoChoice::Syncing);
        }
        let r = self.with_live(|live| {
            if live.generation != generation {
                return Ok(None);
            }
            // Pack into buffers kept with the instance: no allocation per decision.
            let (mut words, mut engine) = std::mem::take(&mut live.buffers);
            words.clear();
            engine.clear();
            words.extend(candidates.iter().map(pack_candidate));
            if candidates.iter().any(|c| c.engine.is_some()) {
                engine.extend(candidates.iter().map(|c| pack_engine(c.engine.as_ref())));
            }
            let data = live.store.data_mut();
            data.current = Some((req, stage));
            if self.reads_prefix_cache {
                data.candidate_ids.clear();
                data.candidate_ids.extend(candidates.iter().map(|c| c.id));
            }
            live.store.set_epoch_deadline(Limits::CALL_TICKS);
            let r = match &live.world {
                Exports::V1(w) => w.vllm_router_policy_balancer().call_select(
                    &mut live.store,
                    Resource::new_borrow(0),
                    &words,
                    &engine,
                ),
                Exports::V2 { balancer, .. } => {
                    // 0.2: engine load is read on demand (`request.engine-load`).
                    std::mem::swap(&mut live.store.data_mut().engine_words, &mut engine);
                    let r = balancer.call_select(&mut live.store, Resource::new_borrow(0), &words);
                    std::mem::swap(&mut live.store.data_mut().engine_words, &mut engine);
                    r.map(decision_v2)
                }
            };
            live.buffers = (words, engine);
            live.store.data_mut().current = None;
            match r.map_err(classify)? {
                types::Decision::Worker(id)
                    if candidates.binary_search_by_key(&id, |c| c.id).is_ok() =>
                {
                    Ok(Some(Ok(id)))
                }
                types::Decision::Worker(id) => Err(PolicyFault::BadAnswer(id)),
                types::Decision::None(why) => Ok(Some(Err(why.chars().take(200).collect()))),
            }
        });
        match r {
            Ok(Some(Ok(id))) => Ok(id),
            Ok(Some(Err(why))) => Err(NoChoice::Declined(why)),
            Ok(None) => Err(NoChoice::Syncing),
            Err(f) => Err(NoChoice::Fault(f)),
        }
    }

    /// Tell the policy a request it routed has ended (call from the feedback thread, see
    /// [`feedback::FeedbackQueue`]).
    pub fn complete(&self, done: Completion) -> Result<(), PolicyFault> {
        if !self.wants_feedback() {
            return Ok(());
        }
        self.with_live(|live| {
            live.store.set_epoch_deadline(Limits::CALL_TICKS);
            match &live.world {
                Exports::V1(w) => w
                    .vllm_router_policy_balancer()
                    .call_on_complete(&mut live.store, done),
                Exports::V2 { feedback, .. } => match feedback {
                    Some(f) => f.call_on_complete(
                        &mut live.store,
                        v2_types::Completion {
                            worker: done.worker,
                            status: done.status,
                            latency_ms: done.latency_ms,
                            first_byte_ms: done.first_byte_ms,
                            stage: crate::host_api::stage_v2(done.stage),
                        },
                    ),
                    None => Ok(()),
                },
            }
            .map_err(classify)
        })
    }

    /// Whether the policy takes `on-complete` (always for 0.1; for 0.2, when it exports
    /// `feedback`): the host skips queueing completions for one that does not.
    pub fn wants_feedback(&self) -> bool {
        match &self.pre {
            Pre::V1(_) => true,
            Pre::V2 { feedback, .. } => feedback.is_some(),
        }
    }

    /// The contract version the component speaks (`0.1.0` or `0.2.0`).
    pub fn contract(&self) -> &'static str {
        self.pre.contract()
    }

    /// The policy's exported state (empty when it has none or fails).
    pub fn export_state(&self) -> Vec<u8> {
        self.with_live(|live| {
            live.store.set_epoch_deadline(Limits::SETUP_TICKS);
            match &live.world {
                Exports::V1(w) => w
                    .vllm_router_policy_balancer()
                    .call_export_state(&mut live.store),
                Exports::V2 { state: Some(s), .. } => s.call_export_state(&mut live.store),
                Exports::V2 { state: None, .. } => Ok(Vec::new()),
            }
            .map_err(classify)
        })
        .unwrap_or_default()
    }

    /// Hand state from a previous version; `Ok(false)` when the policy declined it (or,
    /// 0.2, exports no `state-transfer`).
    pub fn import_state(&self, state: &[u8]) -> Result<bool, PolicyFault> {
        self.with_live(|live| {
            live.store.set_epoch_deadline(Limits::SETUP_TICKS);
            let r = match &live.world {
                Exports::V1(w) => w
                    .vllm_router_policy_balancer()
                    .call_import_state(&mut live.store, state),
                Exports::V2 { state: Some(s), .. } => s.call_import_state(&mut live.store, state),
                Exports::V2 { state: None, .. } => Ok(Err("no state-transfer export".into())),
            }
            .map_err(classify)?;
            Ok(r.is_ok())
        })
    }

    /// Faults counted so far.
    pub fn faults(&self) -> u64 {
        self.faults.load(Ordering::Relaxed)
    }

    /// Times `init` ran for this version (1 after a load; +1 per fault that forced a
    /// fresh instance).
    pub fn inits(&self) -> u64 {
        self.inits.load(Ordering::Relaxed)
    }
}
