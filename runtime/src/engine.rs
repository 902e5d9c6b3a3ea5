//! The wasmtime engine shared by every policy: configuration, the linker, sandbox limits,
//! the epoch ticker (parks when idle) and the compiled-component cache.

use crate::version::PolicyVersion;
use crate::version::Pre;
use crate::{IDLE_PARK, PolicyState, PolicyWorld, SETUP_BUDGET_FACTOR, WorkerInfo, wasi};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine};

/// The epoch ticker: bumps the engine's epoch once per call budget
/// ([`Limits::tick`], `--policy-timeout-ms`) while guest calls run, and parks when none
/// ran for [`IDLE_PARK`], so an idle router costs no wake-ups.
///
/// A call may run two ticks ([`Limits::CALL_TICKS`]): it is interrupted between one and
/// two budgets after it started, never before one. A 1 ms tick with a deadline of
/// `call_ms` ticks would be tighter, but it woke the ticker ~900 times a second under
/// load, and every wake preempted the request thread on the same core: measured on
/// issue 16's pinned bench (`tests/bench/pinned_profile.sh c64`), a tick of 10 ms
/// instead of 1 ms took the router from 81.6-97.4 to 72.4-80.9 µs of CPU per request
/// (3 alternating pairs), most of it in the kernel (context switches).
///
/// Parking is safe against a call that starts meanwhile (Dekker-style, all `SeqCst`): a
/// caller bumps `calls`/`active` then reads `parked`; the ticker sets `parked` then
/// re-reads `calls`/`active` before parking. One of the two sees the other, so a running
/// call always has a ticking epoch (its deadline fires).
pub(crate) struct Ticker {
    calls: AtomicU64,
    active: AtomicU64,
    parked: AtomicBool,
    thread: std::sync::OnceLock<std::thread::Thread>,
}

/// Marks a guest call in progress (keeps the ticker running).
pub(crate) struct CallGuard<'a>(&'a Ticker);

impl Ticker {
    pub(crate) fn enter(&self) -> CallGuard<'_> {
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
    /// Per-call budget of `select` / `on-complete`, in ms (also the epoch tick: a call
    /// is interrupted between one and two budgets after it starts).
    pub call_ms: u64,
    /// Linear-memory cap per instance, bytes.
    pub max_memory: usize,
    /// Core instances a component may create. A Rust or C component needs 1-4, Go with
    /// the SDK's adapter 2, jco's QuickJS output 11, componentize-py's 14.
    pub max_instances: usize,
    /// Tables a component may create (each core instance may have a few).
    pub max_tables: usize,
    /// Linear memories a component may create (componentize-py links several modules
    /// that each bring one). `max_memory` caps each of them.
    pub max_memories: usize,
}

impl Limits {
    /// The epoch tick: one call budget (`call_ms`).
    pub fn tick(&self) -> Duration {
        Duration::from_millis(self.call_ms)
    }

    /// Epoch deadline of a `select` / `on-complete` call, in ticks: interrupted between
    /// `call_ms` and `2 × call_ms` after it starts (see [`Ticker`]).
    pub const CALL_TICKS: u64 = 2;

    /// Epoch deadline of `init`, `workers-changed` and state hand-off, in ticks:
    /// between [`SETUP_BUDGET_FACTOR`] and one more budget.
    pub const SETUP_TICKS: u64 = SETUP_BUDGET_FACTOR + 1;

    /// The router's defaults: `call_ms` per call, `max_memory_mb` MiB per memory, room
    /// for the largest real components (32 instances, 64 tables, 16 memories: twice
    /// what componentize-py needs), still a fixed bound per instance.
    pub fn new(call_ms: u64, max_memory_mb: u64) -> Limits {
        Limits {
            call_ms: call_ms.max(1),
            max_memory: (max_memory_mb as usize) << 20,
            max_instances: 32,
            max_tables: 64,
            max_memories: 16,
        }
    }
}

/// The wasmtime engine shared by every policy, with its linker and sandbox limits.
pub struct PolicyEngine {
    pub(crate) engine: Engine,
    linker: Linker<PolicyState>,
    /// Sandbox limits.
    pub limits: Limits,
    pub(crate) ticker: Arc<Ticker>,
    /// Recently compiled components by SHA-256, most recent last: a rollback to a
    /// version seen before (A → B → A) skips compilation (tens of milliseconds).
    compiled: Mutex<Vec<(String, Pre)>>,
    /// Faults within `quarantine_window_ms` that quarantine a version (0 = never).
    pub(crate) quarantine_faults: AtomicU64,
    pub(crate) quarantine_window_ms: AtomicU64,
    /// Compiled components on disk (restarts and swaps back skip compilation).
    disk: std::sync::OnceLock<crate::disk_cache::DiskCache>,
}

/// Compiled components kept for fast rollbacks.
const COMPILED_CACHE: usize = 8;

impl PolicyEngine {
    /// Build the engine (Cranelift without its own optimisations, see
    /// [`PolicyEngine::with_options`]) with [`Limits::new`] and start its epoch ticker thread (stops when the
    /// engine drops). `timeout_ms`: per-call budget; `max_memory_mb`: per-instance cap.
    pub fn new(timeout_ms: u64, max_memory_mb: u64) -> anyhow::Result<Arc<Self>> {
        Self::with_options(Limits::new(timeout_ms, max_memory_mb), false)
    }

    /// Like [`PolicyEngine::new`]; `optimize` turns on Cranelift's optimisations. Policies
    /// arrive already optimised by their own compiler (LLVM for Rust, C, Go): measured
    /// here, decision cost is the same either way while compilation (start, hot swap) is
    /// ~25 % faster without (cache_aware 176 vs 224–254 ms on one core).
    pub fn with_options(limits: Limits, optimize: bool) -> anyhow::Result<Arc<Self>> {
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
        // `prefix-cache` re-exports the `request` resource of `types` (`use`); the
        // bindings do not define it there, and the catch-all for unknown imports
        // (`wasi::link_wasi`) would otherwise define a *different* resource under that
        // name, which the type check refuses ("mismatched resource types").
        // Contract 0.2 beside 0.1: distinct package versions, so both sets coexist.
        crate::bindings_v2::PolicyFull::add_to_linker::<PolicyState, HasSelf<PolicyState>>(
            &mut linker,
            |s| s,
        )?;
        for instance in [
            "vllm:router-kv/prefix-cache@0.1.0",
            "vllm:router-policy/prefix-cache@0.2.0",
        ] {
            linker.instance(instance)?.resource(
                "request",
                wasmtime::component::ResourceType::host::<crate::ReqHandle>(),
                |_, _| Ok(()),
            )?;
        }
        let ticker = Arc::new(Ticker {
            calls: AtomicU64::new(0),
            active: AtomicU64::new(0),
            parked: AtomicBool::new(false),
            thread: std::sync::OnceLock::new(),
        });
        let me = Arc::new(PolicyEngine {
            engine,
            linker,
            limits,
            ticker: ticker.clone(),
            compiled: Mutex::new(Vec::new()),
            quarantine_faults: AtomicU64::new(5),
            quarantine_window_ms: AtomicU64::new(10_000),
            disk: std::sync::OnceLock::new(),
        });
        let weak: Weak<PolicyEngine> = Arc::downgrade(&me);
        let tick = me.limits.tick();
        let idle_ticks = IDLE_PARK
            .as_millis()
            .div_ceil(tick.as_millis().max(1))
            .max(1) as u32;
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
                    if quiet >= idle_ticks {
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
                    std::thread::sleep(tick);
                }
            })?;
        let _ = ticker.thread.set(handle.thread().clone());
        Ok(me)
    }

    /// Keep compiled components in `dir` (see [`crate::disk_cache`]). Errors: the
    /// directory cannot be created, is not the router user's, or others may write it.
    pub fn set_disk_cache(&self, dir: &std::path::Path) -> anyhow::Result<()> {
        let cache = crate::disk_cache::DiskCache::open(dir, &self.engine)?;
        let _ = self.disk.set(cache);
        Ok(())
    }

    /// Whether the disk cache (if set) holds `sha256` compiled for this engine.
    pub fn disk_cached(&self, sha256: &str) -> bool {
        self.disk.get().is_some_and(|d| d.contains(sha256))
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
        self.load_limited(
            name,
            source,
            bytes,
            sha256,
            config,
            generation,
            workers,
            self.limits.clone(),
        )
    }

    /// [`PolicyEngine::load`] with this version's own sandbox limits (a slot's
    /// `timeout_ms`, `max_memory_mb`, `max_instances`) instead of the engine's.
    #[allow(clippy::too_many_arguments)]
    pub fn load_limited(
        self: &Arc<Self>,
        name: &str,
        source: &str,
        bytes: &[u8],
        sha256: &str,
        config: &str,
        generation: u64,
        workers: &[WorkerInfo],
        limits: Limits,
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
                let cached = self.disk.get().and_then(|d| d.get(&self.engine, sha256));
                let component = match cached {
                    Some(c) => c,
                    None => {
                        check_header(bytes)?;
                        let c = Component::new(&self.engine, bytes).map_err(|e| {
                            // wasmparser's messages may span lines; a log line must not.
                            let msg = format!("{e:#}")
                                .split_whitespace()
                                .collect::<Vec<_>>()
                                .join(" ");
                            anyhow::anyhow!("not a valid WebAssembly component: {msg}")
                        })?;
                        if let Some(d) = self.disk.get() {
                            d.put(sha256, &c);
                        }
                        c
                    }
                };
                let mut linker = self.linker.clone();
                wasi::link_wasi(&mut linker, &self.engine, &component)?;
                let pre = linker.instantiate_pre(&component).map_err(|e| {
                    anyhow::anyhow!(
                        "component does not fit this router (needs world vllm:router-policy/policy@0.1.x or @0.2.x): {e:#}"
                    )
                })?;
                let pre = Pre::new(pre)?;
                let mut c = self.compiled.lock();
                c.push((sha256.to_string(), pre.clone()));
                if c.len() > COMPILED_CACHE {
                    c.remove(0);
                }
                pre
            }
        };
        let reads_prefix_cache = pre
            .instance_pre()
            .component()
            .component_type()
            .imports(&self.engine)
            .any(|(name, _)| {
                name.starts_with("vllm:router-kv/prefix-cache@")
                    || name.starts_with("vllm:router-policy/prefix-cache@")
            });
        let version = Arc::new(PolicyVersion {
            name: name.to_string(),
            reads_prefix_cache,
            label: format!("{name}@{}", &sha256[..12.min(sha256.len())]).into(),
            sha256: sha256.to_string(),
            source: source.to_string(),
            config: config.to_string(),
            loaded_at: SystemTime::now(),
            engine: self.clone(),
            limits,
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

/// Refuse bytes that are not a WebAssembly component before compiling, with a one-line
/// reason a person can act on (a core module, a text file, an empty or cut file).
fn check_header(bytes: &[u8]) -> anyhow::Result<()> {
    const MAGIC: &[u8] = b"\0asm";
    if bytes.len() < 8 || &bytes[..4] != MAGIC {
        let start: String = bytes
            .iter()
            .take(16)
            .map(|b| {
                if b.is_ascii_graphic() || *b == b' ' {
                    *b as char
                } else {
                    '.'
                }
            })
            .collect();
        anyhow::bail!(
            "not a WebAssembly file ({} bytes, starts with {start:?}; a component starts with \\0asm)",
            bytes.len()
        );
    }
    // Layer 1 is a component; layer 0 a core module (build with wasm32-wasip2, or run
    // `wasm-tools component new` on a core module).
    if bytes[6..8] != [1, 0] {
        anyhow::bail!(
            "a core WebAssembly module, not a component: build for wasm32-wasip2 (or wrap it with `wasm-tools component new`)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_header;

    #[test]
    fn files_that_are_not_components_get_a_one_line_reason() {
        let e = check_header(b"this is not a component")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not a WebAssembly file") && e.contains("this is not a co"),
            "{e}"
        );
        assert!(!e.contains('\n'));
        let e = check_header(b"").unwrap_err().to_string();
        assert!(e.contains("0 bytes"), "{e}");
        let core = b"\0asm\x01\0\0\0";
        let e = check_header(core).unwrap_err().to_string();
        assert!(e.contains("core WebAssembly module"), "{e}");
        assert!(check_header(b"\0asm\x0d\0\x01\0").is_ok());
    }
}
