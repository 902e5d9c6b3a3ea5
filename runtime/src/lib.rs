//! # vllm-router-runtime
//!
//! The WebAssembly side of vllm-router's policies, in the shape of Spin's `core` crate:
//! one wasmtime engine with its limits and epoch ticker, the compiled-component cache,
//! the host functions and WASI shim a policy may import, a loaded policy version with its
//! single long-lived instance, fault classification and quarantine, and the bounded
//! feedback queue that delivers `on-complete` off the response path.
//!
//! **Knows no HTTP.** The request reaches a policy through the [`RequestView`] trait and
//! workers through [`WorkerInfo`]; the host (crate `vllm-router`) implements both.
//!
//! Every guest call runs under an epoch deadline and a memory cap; a trap drops the
//! instance's Store (a trap poisons it) and the next call re-instantiates from the cached
//! pre-instance (~20 µs), running `init` again.
//!
//! Lifecycle of a version, as `wit/policy.wit` states it: compile → instantiate →
//! `init(config)` **once** → `workers-changed` (pushed by the host whenever its worker
//! set changes, never on a client's request) → `select` … and `on-complete` once per
//! routed request (from the feedback thread). `decision::none` is a *decline*, not a
//! fault: the host's fallback decides and nothing counts toward quarantine.

#![forbid(unsafe_code)]

pub mod clock;
pub mod feedback;
mod wasi;

use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};
use wasmtime::component::{Component, HasSelf, Linker, Resource};
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder};

/// What a policy may read of a request. The host's request type implements it; tests
/// use a fake. Every method is called only while a `select` runs.
pub trait RequestView: Send + Sync {
    /// URL path, e.g. `/v1/chat/completions`.
    fn path(&self) -> &str;
    /// The body's `model`.
    fn model(&self) -> Option<&str>;
    /// A header the client sent (name case-insensitive).
    fn header(&self, name: &str) -> Option<&str>;
    /// A scalar body field by dotted path (see `wit/policy.wit`).
    fn body_field(&self, path: &str) -> Option<String>;
    /// The routing text (prompt) of the request.
    fn routing_text(&self) -> &str;
    /// Body length, bytes.
    fn body_length(&self) -> u64;
    /// The request id the router uses.
    fn request_id(&self) -> &str;
}

/// A worker as a policy sees it in `workers-changed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    /// The router's id.
    pub id: u32,
    /// Base URL without the data-parallel suffix.
    pub url: String,
    /// Role in a PD deployment.
    pub role: vllm_router_sdk::Role,
    /// Data-parallel rank, if the URL serves several.
    pub dp_rank: Option<u32>,
    /// Labels from service discovery (`key`, `value`); empty for static workers.
    pub labels: Vec<(String, String)>,
}

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "policy",
        imports: { default: trappable },
        with: { "vllm:router-policy/types.request": super::ReqHandle },
        // `Stage` is used as a map key in the host's metrics handles.
        additional_derives: [Hash, Eq, PartialEq],
    });
}

pub use bindings::vllm::router_policy::types::{Completion, Stage};
use bindings::vllm::router_policy::{host, types};
use bindings::{Policy as PolicyWorld, PolicyPre};
use vllm_router_sdk::wire::{pack_candidate, pack_engine};

/// Marker for the `request` resource: the host passes the current request by borrow and
/// keeps it in the Store's data, so no table entry is made per call.
pub struct ReqHandle;

/// Epoch ticks per millisecond (the ticker thread bumps the epoch every 1 ms while
/// guest calls run; see [`Ticker`]).
const TICK: Duration = Duration::from_millis(1);
/// Ticks without a guest call after which the ticker parks (an idle router is idle).
const IDLE_TICKS: u32 = 200;
/// `init`, `workers-changed` and state hand-off may build large structures: they get
/// this many times the per-call `select` budget.
const SETUP_BUDGET_FACTOR: u64 = 100;
/// Lines a policy may log per second before the host drops them.
const LOG_LINES_PER_SEC: u32 = 20;

/// Per-Store state: the current request, the log limiter and the memory limits.
pub struct PolicyState {
    current: Option<(Arc<dyn RequestView>, Stage)>,
    label: Arc<str>,
    limits: StoreLimits,
    started: Instant,
    log_window: (u64, u32),
}

impl PolicyState {
    fn req(&self) -> wasmtime::Result<&dyn RequestView> {
        match &self.current {
            Some((r, _)) => Ok(&**r),
            None => Err(wasmtime::Error::msg("request accessed outside select")),
        }
    }
}

impl types::Host for PolicyState {}

impl types::HostRequest for PolicyState {
    fn path(&mut self, _: Resource<ReqHandle>) -> wasmtime::Result<String> {
        Ok(self.req()?.path().to_owned())
    }
    fn model(&mut self, _: Resource<ReqHandle>) -> wasmtime::Result<Option<String>> {
        Ok(self.req()?.model().map(str::to_owned))
    }
    fn header(&mut self, _: Resource<ReqHandle>, name: String) -> wasmtime::Result<Option<String>> {
        let r = self.req()?;
        // A request id the router generated is not a client header.
        Ok(r.header(&name).map(str::to_owned))
    }
    fn body_field(
        &mut self,
        _: Resource<ReqHandle>,
        path: String,
    ) -> wasmtime::Result<Option<String>> {
        Ok(self.req()?.body_field(&path))
    }
    fn routing_text(&mut self, _: Resource<ReqHandle>) -> wasmtime::Result<String> {
        Ok(self.req()?.routing_text().to_owned())
    }
    fn body_length(&mut self, _: Resource<ReqHandle>) -> wasmtime::Result<u64> {
        Ok(self.req()?.body_length())
    }
    fn request_id(&mut self, _: Resource<ReqHandle>) -> wasmtime::Result<String> {
        Ok(self.req()?.request_id().to_owned())
    }
    fn stage(&mut self, _: Resource<ReqHandle>) -> wasmtime::Result<Stage> {
        match &self.current {
            Some((_, s)) => Ok(*s),
            None => Err(wasmtime::Error::msg("request accessed outside select")),
        }
    }
    fn drop(&mut self, _: Resource<ReqHandle>) -> wasmtime::Result<()> {
        Ok(())
    }
}

impl host::Host for PolicyState {
    fn log(&mut self, level: types::Level, message: String) -> wasmtime::Result<()> {
        let sec = self.started.elapsed().as_secs();
        if self.log_window.0 != sec {
            self.log_window = (sec, 0);
        }
        self.log_window.1 += 1;
        if self.log_window.1 > LOG_LINES_PER_SEC {
            return Ok(());
        }
        // One log line per message: newlines (a panic's location line) become spaces.
        let msg: String = message
            .chars()
            .take(1024)
            .map(|c| if c == '\n' { ' ' } else { c })
            .collect();
        let policy = &*self.label;
        match level {
            types::Level::Debug => tracing::debug!(policy, "{msg}"),
            types::Level::Info => tracing::info!(policy, "{msg}"),
            types::Level::Warn => tracing::warn!(policy, "{msg}"),
            types::Level::Error => tracing::error!(policy, "{msg}"),
        }
        Ok(())
    }
    fn now_ms(&mut self) -> wasmtime::Result<u64> {
        Ok(clock::uptime_ms())
    }
    fn random(&mut self) -> wasmtime::Result<u64> {
        Ok(rand::random())
    }
}

/// The epoch ticker: bumps the engine's epoch every [`TICK`] while guest calls run, and
/// parks when none ran for [`IDLE_TICKS`] ticks, so an idle router costs no wake-ups.
///
/// Parking is safe against a call that starts meanwhile (Dekker-style, all `SeqCst`): a
/// caller bumps `calls`/`active` then reads `parked`; the ticker sets `parked` then
/// re-reads `calls`/`active` before parking. One of the two sees the other, so a running
/// call always has a ticking epoch (its deadline fires).
struct Ticker {
    calls: AtomicU64,
    active: AtomicU64,
    parked: AtomicBool,
    thread: std::sync::OnceLock<std::thread::Thread>,
}

/// Marks a guest call in progress (keeps the ticker running).
struct CallGuard<'a>(&'a Ticker);

impl Ticker {
    fn enter(&self) -> CallGuard<'_> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.active.fetch_add(1, Ordering::SeqCst);
        if self.parked.load(Ordering::SeqCst) {
            self.parked.store(false, Ordering::SeqCst);
            if let Some(t) = self.thread.get() {
                t.unpark();
            }
        }
        CallGuard(self)
    }
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Sandbox limits of one policy instance.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Per-call deadline of `select` / `on-complete`, in ms (epoch ticks).
    pub call_ms: u64,
    /// Linear-memory cap per instance, bytes.
    pub max_memory: usize,
    /// Core instances a component may create (a Rust or C component needs 1-4; JS and
    /// Python components more).
    pub max_instances: usize,
}

/// The wasmtime engine shared by every policy, with its linker and sandbox limits.
pub struct PolicyEngine {
    engine: Engine,
    linker: Linker<PolicyState>,
    /// Sandbox limits.
    pub limits: Limits,
    ticker: Arc<Ticker>,
    /// Recently compiled components by SHA-256, most recent last: a rollback to a
    /// version seen before (A → B → A) skips compilation (tens of milliseconds).
    compiled: Mutex<Vec<(String, PolicyPre<PolicyState>)>>,
    /// Faults within `quarantine_window_ms` that quarantine a version (0 = never).
    quarantine_faults: AtomicU64,
    quarantine_window_ms: AtomicU64,
}

/// Compiled components kept for fast rollbacks.
const COMPILED_CACHE: usize = 8;

impl PolicyEngine {
    /// Build the engine (Cranelift without its own optimisations, see
    /// [`PolicyEngine::with_options`]) and start its epoch ticker thread (stops when the
    /// engine drops). `timeout_ms`: per-call budget; `max_memory_mb`: per-instance cap.
    pub fn new(timeout_ms: u64, max_memory_mb: u64) -> anyhow::Result<Arc<Self>> {
        Self::with_options(timeout_ms, max_memory_mb, false)
    }

    /// Like [`PolicyEngine::new`]; `optimize` turns on Cranelift's optimisations. Policies
    /// arrive already optimised by their own compiler (LLVM for Rust, C, Go): measured
    /// here, decision cost is the same either way while compilation (start, hot swap) is
    /// ~25 % faster without (cache_aware 176 vs 224–254 ms on one core).
    pub fn with_options(
        timeout_ms: u64,
        max_memory_mb: u64,
        optimize: bool,
    ) -> anyhow::Result<Arc<Self>> {
        let mut cfg = Config::new();
        cfg.wasm_component_model(true);
        cfg.epoch_interruption(true);
        cfg.cranelift_opt_level(if optimize {
            wasmtime::OptLevel::Speed
        } else {
            wasmtime::OptLevel::None
        });
        let engine = Engine::new(&cfg)?;
        let mut linker = Linker::new(&engine);
        PolicyWorld::add_to_linker::<PolicyState, HasSelf<PolicyState>>(&mut linker, |s| s)?;
        let ticker = Arc::new(Ticker {
            calls: AtomicU64::new(0),
            active: AtomicU64::new(0),
            parked: AtomicBool::new(false),
            thread: std::sync::OnceLock::new(),
        });
        let me = Arc::new(PolicyEngine {
            engine,
            linker,
            limits: Limits {
                call_ms: timeout_ms.max(1),
                max_memory: (max_memory_mb as usize) << 20,
                max_instances: 4,
            },
            ticker: ticker.clone(),
            compiled: Mutex::new(Vec::new()),
            quarantine_faults: AtomicU64::new(5),
            quarantine_window_ms: AtomicU64::new(10_000),
        });
        let weak: Weak<PolicyEngine> = Arc::downgrade(&me);
        let handle = std::thread::Builder::new()
            .name("policy-epoch".into())
            .spawn(move || {
                let mut seen = u64::MAX;
                let mut quiet = 0u32;
                while let Some(e) = weak.upgrade() {
                    e.engine.increment_epoch();
                    let t = &e.ticker;
                    let calls = t.calls.load(Ordering::SeqCst);
                    if calls != seen || t.active.load(Ordering::SeqCst) > 0 {
                        seen = calls;
                        quiet = 0;
                    } else {
                        quiet += 1;
                    }
                    if quiet >= IDLE_TICKS {
                        t.parked.store(true, Ordering::SeqCst);
                        let busy = t.calls.load(Ordering::SeqCst) != seen
                            || t.active.load(Ordering::SeqCst) > 0;
                        drop(e);
                        if busy {
                            continue;
                        }
                        // Woken by the next call; the timeout only lets the thread notice
                        // that the engine was dropped.
                        std::thread::park_timeout(Duration::from_secs(60));
                        quiet = 0;
                        continue;
                    }
                    drop(e);
                    std::thread::sleep(TICK);
                }
            })?;
        let _ = ticker.thread.set(handle.thread().clone());
        Ok(me)
    }

    /// Quarantine a version after `faults` faults within `window` (`faults` 0 = never).
    pub fn set_quarantine(&self, faults: u32, window: Duration) {
        self.quarantine_faults
            .store(faults as u64, Ordering::Relaxed);
        self.quarantine_window_ms
            .store(window.as_millis() as u64, Ordering::Relaxed);
    }

    /// True while the epoch ticker is parked (no guest call for a while).
    pub fn ticker_parked(&self) -> bool {
        self.ticker.parked.load(Ordering::SeqCst)
    }

    /// Compile and validate a policy component: compile, link, instantiate, `init`
    /// with `config`, then `workers-changed(workers)` at `generation`. `name` labels it
    /// in logs and metrics; `sha256` is the hex digest of `bytes` (the caller hashed the
    /// bytes it read, once). Errors say which step failed (not a component, wrong world,
    /// `init` refused, trap) with the guest's own message first.
    pub fn load(
        self: &Arc<Self>,
        name: &str,
        source: &str,
        bytes: &[u8],
        sha256: &str,
        config: &str,
        generation: u64,
        workers: &[WorkerInfo],
    ) -> anyhow::Result<Arc<PolicyVersion>> {
        let cached = {
            let mut c = self.compiled.lock();
            c.iter().position(|(h, _)| *h == sha256).map(|i| {
                let e = c.remove(i);
                let pre = e.1.clone();
                c.push(e);
                pre
            })
        };
        let pre = match cached {
            Some(pre) => pre,
            None => {
                let component = Component::new(&self.engine, bytes)
                    .map_err(|e| anyhow::anyhow!("not a valid WebAssembly component: {e:#}"))?;
                let mut linker = self.linker.clone();
                wasi::link_wasi(&mut linker, &self.engine, &component)?;
                let pre = linker
                    .instantiate_pre(&component)
                    .map_err(|e| anyhow::anyhow!("component does not fit this router (needs world vllm:router-policy/policy@0.1.x): {e:#}"))?;
                let pre = PolicyPre::new(pre).map_err(|e| {
                    anyhow::anyhow!(
                        "component does not export vllm:router-policy/balancer@0.1.x: {e:#}"
                    )
                })?;
                let mut c = self.compiled.lock();
                c.push((sha256.to_string(), pre.clone()));
                if c.len() > COMPILED_CACHE {
                    c.remove(0);
                }
                pre
            }
        };
        let version = Arc::new(PolicyVersion {
            name: name.to_string(),
            label: format!("{name}@{}", &sha256[..12.min(sha256.len())]).into(),
            sha256: sha256.to_string(),
            source: source.to_string(),
            config: config.to_string(),
            loaded_at: SystemTime::now(),
            engine: self.clone(),
            pre,
            live: Mutex::new(None),
            workers: Mutex::new((0, Arc::new(Vec::new()))),
            synced: AtomicU64::new(u64::MAX),
            faults: AtomicU64::new(0),
            inits: AtomicU64::new(0),
            recent_faults: Mutex::new(std::collections::VecDeque::new()),
            quarantined: AtomicBool::new(false),
            newly_quarantined: AtomicBool::new(false),
        });
        // Validate now: a version that cannot start is refused before it serves. The
        // instance made here is the one that serves (init runs once per load).
        let live = version.instantiate()?;
        *version.live.lock() = Some(live);
        version
            .workers_changed(generation, Arc::new(workers.to_vec()))
            .map_err(|f| anyhow::anyhow!("workers-changed failed: {f}"))?;
        Ok(version)
    }
}

struct Live {
    store: Store<PolicyState>,
    world: PolicyWorld,
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
    engine: Arc<PolicyEngine>,
    pre: PolicyPre<PolicyState>,
    live: Mutex<Option<Live>>,
    /// The latest worker set pushed (generation, workers), replayed into a fresh
    /// instance after a fault.
    workers: Mutex<(u64, Arc<Vec<WorkerInfo>>)>,
    /// Generation the live instance knows (`u64::MAX` = none); read without the lock.
    synced: AtomicU64,
    faults: AtomicU64,
    inits: AtomicU64,
    recent_faults: Mutex<std::collections::VecDeque<Instant>>,
    quarantined: AtomicBool,
    newly_quarantined: AtomicBool,
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
    fn instantiate(&self) -> anyhow::Result<Live> {
        let _call = self.engine.ticker.enter();
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.engine.limits.max_memory)
            .trap_on_grow_failure(true)
            .instances(self.engine.limits.max_instances)
            .build();
        let state = PolicyState {
            current: None,
            label: self.label.clone(),
            limits,
            started: Instant::now(),
            log_window: (0, 0),
        };
        let mut store = Store::new(&self.engine.engine, state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(self.engine.limits.call_ms * SETUP_BUDGET_FACTOR);
        let world = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| anyhow::anyhow!("instantiation failed: {}", classify(e)))?;
        self.inits.fetch_add(1, Ordering::Relaxed);
        match world
            .vllm_router_policy_balancer()
            .call_init(&mut store, &self.config)
        {
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
        let list: Vec<types::Worker> = workers.iter().map(to_wit_worker).collect();
        live.store
            .set_epoch_deadline(self.engine.limits.call_ms * SETUP_BUDGET_FACTOR);
        live.world
            .vllm_router_policy_balancer()
            .call_workers_changed(&mut live.store, &list)
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
            live.store.data_mut().current = Some((req, stage));
            live.store.set_epoch_deadline(self.engine.limits.call_ms);
            let r = live.world.vllm_router_policy_balancer().call_select(
                &mut live.store,
                Resource::new_borrow(0),
                &words,
                &engine,
            );
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
        self.with_live(|live| {
            live.store.set_epoch_deadline(self.engine.limits.call_ms);
            live.world
                .vllm_router_policy_balancer()
                .call_on_complete(&mut live.store, done)
                .map_err(classify)
        })
    }

    /// The policy's exported state (empty when it has none or fails).
    pub fn export_state(&self) -> Vec<u8> {
        self.with_live(|live| {
            live.store
                .set_epoch_deadline(self.engine.limits.call_ms * SETUP_BUDGET_FACTOR);
            live.world
                .vllm_router_policy_balancer()
                .call_export_state(&mut live.store)
                .map_err(classify)
        })
        .unwrap_or_default()
    }

    /// Hand state from a previous version; `Ok(false)` when the policy declined it.
    pub fn import_state(&self, state: &[u8]) -> Result<bool, PolicyFault> {
        self.with_live(|live| {
            live.store
                .set_epoch_deadline(self.engine.limits.call_ms * SETUP_BUDGET_FACTOR);
            let r = live
                .world
                .vllm_router_policy_balancer()
                .call_import_state(&mut live.store, state)
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
