//! Worker registry: the set of vLLM workers, their health, in-flight counts and ids.
//!
//! The set is an immutable snapshot behind an `ArcSwap` (read without locks on the hot
//! path); a membership change publishes a new snapshot with a higher generation, which
//! tells each policy instance to refresh its copy through `workers-changed`.

use crate::breaker::{Breaker, BreakerShared, BreakerState, Transition};
use arc_swap::ArcSwap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use vllm_router_sdk::Role;

/// One worker (one data-parallel rank of a vLLM server, or the whole server).
#[derive(Debug)]
pub struct Worker {
    /// Router-assigned id, unique for the process lifetime.
    pub id: u32,
    /// Base URL, e.g. `http://10.0.0.1:8000` (no trailing slash, no `@rank`).
    pub url: String,
    /// The authority (`host:port`) parsed from `url`, for building upstream URIs.
    pub authority: http::uri::Authority,
    /// `http` or `https` (TLS, see [`crate::tls`]), from `url`.
    pub scheme: http::uri::Scheme,
    /// `authority` as the `Host` field of upstream requests (made once, not per request).
    pub host_header: http::HeaderValue,
    /// Role in a PD deployment.
    pub role: Role,
    /// Data-parallel rank, sent upstream as `X-data-parallel-rank`.
    pub dp_rank: Option<u32>,
    /// Labels from service discovery (`key`, `value`), passed to policies in
    /// `workers-changed`; empty for workers from flags or the admin API.
    pub labels: Vec<(String, String)>,
    /// `url` or `url@rank`: the worker label of every metric.
    name: String,
    /// Requests dispatched and not finished (streams until their last byte).
    in_flight: AtomicU32,
    healthy: AtomicBool,
    /// Draining (service discovery is removing it): no new requests.
    draining: AtomicBool,
    /// Consecutive failed / successful health observations.
    fail_streak: AtomicU32,
    ok_streak: AtomicU32,
    /// Engine load from the worker's `/metrics` in the policy wire format
    /// (`vllm_router_sdk::wire::pack_engine`); 0 = no sample.
    engine_packed: AtomicU64,
    /// Router uptime (ms) when `engine_packed` was sampled.
    engine_at_ms: AtomicU64,
    /// Circuit breaker and its shared settings.
    breaker: Breaker,
    cb: Arc<BreakerShared>,
    /// Idle upstream connections to this worker (plain HTTP; see
    /// [`crate::forward::upstream`]).
    pub(crate) conns: crate::forward::upstream::IdleConns,
}

impl Worker {
    /// A worker for base URL `url` (must be `http://host:port[/]`).
    pub fn new(id: u32, url: &str, role: Role, dp_rank: Option<u32>) -> Result<Self, String> {
        Self::with_breaker(id, url, role, dp_rank, Arc::default())
    }

    /// A worker whose breaker uses `cb`'s settings.
    pub fn with_breaker(
        id: u32,
        url: &str,
        role: Role,
        dp_rank: Option<u32>,
        cb: Arc<BreakerShared>,
    ) -> Result<Self, String> {
        let url = url.trim_end_matches('/').to_string();
        let uri: http::Uri = url
            .parse()
            .map_err(|e| format!("bad worker URL {url}: {e}"))?;
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("worker URL {url} has no host"))?;
        let scheme = match uri.scheme_str() {
            Some("https") => http::uri::Scheme::HTTPS,
            Some("http") | None => http::uri::Scheme::HTTP,
            Some(other) => return Err(format!("worker URL {url}: unsupported scheme {other}")),
        };
        let host_header = http::HeaderValue::from_str(authority.as_str())
            .map_err(|e| format!("worker URL {url}: host is not a valid Host field: {e}"))?;
        let name = match dp_rank {
            Some(r) => format!("{url}@{r}"),
            None => url.clone(),
        };
        Ok(Worker {
            id,
            url,
            authority,
            scheme,
            host_header,
            role,
            dp_rank,
            labels: Vec::new(),
            name,
            in_flight: AtomicU32::new(0),
            healthy: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            fail_streak: AtomicU32::new(0),
            ok_streak: AtomicU32::new(0),
            engine_packed: AtomicU64::new(0),
            engine_at_ms: AtomicU64::new(0),
            breaker: Breaker::default(),
            conns: Default::default(),
            cb,
        })
    }

    /// Display name: `url` or `url@rank`; the `worker` label of every metric.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Requests in flight on this worker.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether service discovery is draining it (no new requests; in-flight ones finish).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Whether the worker may receive traffic (health checks consider it up).
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Store an engine-load sample (`vllm:num_requests_running`, `..._waiting`, KV-cache
    /// use in per-mille), taken now.
    pub fn set_engine_load(&self, load: &vllm_router_sdk::EngineLoad) {
        self.engine_packed.store(
            vllm_router_sdk::wire::pack_engine(Some(load)),
            Ordering::Relaxed,
        );
        self.engine_at_ms
            .store(crate::util::uptime_ms(), Ordering::Relaxed);
    }

    /// The latest engine-load sample if younger than `max_age_ms` (ms), else `None`.
    pub fn engine_load(&self, now_ms: u64, max_age_ms: u64) -> Option<vllm_router_sdk::EngineLoad> {
        let age = now_ms.saturating_sub(self.engine_at_ms.load(Ordering::Relaxed));
        if age > max_age_ms {
            return None;
        }
        vllm_router_sdk::wire::unpack_engine(self.engine_packed.load(Ordering::Relaxed))
    }

    fn report(&self, t: Option<Transition>) {
        if let Some(t) = t {
            match t.1 {
                BreakerState::Open => {
                    tracing::warn!(worker = %self.name(), from = t.0.as_str(), "circuit breaker opened: no traffic for {:?}", self.cb.cfg.open_for)
                }
                BreakerState::HalfOpen => {
                    tracing::info!(worker = %self.name(), "circuit breaker half-open: probing with up to {} request(s)", self.cb.cfg.half_open_max)
                }
                BreakerState::Closed => {
                    tracing::info!(worker = %self.name(), "circuit breaker closed: worker back in rotation")
                }
            }
            if let Some(hook) = self.cb.on_transition.get() {
                hook(self.name(), t);
            }
        }
    }

    /// Whether the breaker lets a request through now (moves open → half-open when due).
    pub fn breaker_allows(&self) -> bool {
        // The common case (closed) costs one atomic load; the clock is read only when an
        // open breaker may be due for half-open (this runs per candidate per request).
        if !self.cb.cfg.enabled || self.breaker.state() == BreakerState::Closed {
            return true;
        }
        let (ok, t) = self.breaker.allows(&self.cb.cfg, crate::util::uptime_ms());
        self.report(t);
        ok
    }

    /// Breaker state (0 closed, 1 open, 2 half-open in metrics).
    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// Admit a request through the breaker; `None` when it must go elsewhere (open, or
    /// half-open with its probe slots taken).
    pub fn breaker_admit(self: &Arc<Self>) -> Option<BreakerTicket> {
        let probe = self.breaker.acquire(&self.cb.cfg)?;
        Some(BreakerTicket {
            worker: self.clone(),
            probe,
            done: false,
        })
    }

    /// Count a dispatched request; the guard un-counts it when dropped.
    pub fn start_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Mark the worker unhealthy now (a connection to it failed: nothing listens).
    /// Returns true when this call turned it unhealthy. Health probes bring it back.
    pub fn mark_down(&self) -> bool {
        self.record_failure(true, 1)
    }

    /// Record a failed health observation: marks the worker unhealthy at once when
    /// `hard` (nothing answered), else counts toward `threshold`. Returns true when this
    /// call turned it unhealthy. (Request outcomes other than connection failures go to
    /// the circuit breaker, not here.)
    pub fn record_failure(&self, hard: bool, threshold: u32) -> bool {
        self.ok_streak.store(0, Ordering::Relaxed);
        let n = self.fail_streak.fetch_add(1, Ordering::Relaxed) + 1;
        if hard || n >= threshold {
            return self.healthy.swap(false, Ordering::Relaxed);
        }
        false
    }

    /// Record a successful probe. Returns true when this call turned an
    /// unhealthy worker healthy (after `threshold` consecutive successes).
    pub fn record_success(&self, threshold: u32) -> bool {
        self.fail_streak.store(0, Ordering::Relaxed);
        if self.is_healthy() {
            return false;
        }
        let n = self.ok_streak.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= threshold {
            self.ok_streak.store(0, Ordering::Relaxed);
            return !self.healthy.swap(true, Ordering::Relaxed);
        }
        false
    }
}

/// A request admitted by the breaker. Record its outcome with
/// [`BreakerTicket::record`]; dropped unrecorded (client went away) it only gives back
/// its probe slot.
#[derive(Debug)]
pub struct BreakerTicket {
    worker: Arc<Worker>,
    probe: bool,
    done: bool,
}

impl BreakerTicket {
    /// Record success (`ok`) or failure (5xx, connection error, timeout, broken stream).
    pub fn record(mut self, ok: bool) {
        self.done = true;
        let w = &self.worker;
        let t = w
            .breaker
            .record(&w.cb.cfg, self.probe, ok, crate::util::uptime_ms());
        w.report(t);
    }
}

impl Drop for BreakerTicket {
    fn drop(&mut self) {
        if !self.done && self.probe {
            self.worker.breaker.release_probe();
        }
    }
}

/// In-flight accounting guard: decrements the worker's count when dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Worker>);

impl InFlight {
    /// The worker this request is on.
    pub fn worker(&self) -> &Arc<Worker> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An immutable view of the fleet.
#[derive(Debug, Default)]
pub struct WorkerSet {
    /// Workers in ascending id order.
    pub workers: Vec<Arc<Worker>>,
    /// Bumped on every membership change.
    pub generation: u64,
}

impl WorkerSet {
    /// Worker by id.
    pub fn get(&self, id: u32) -> Option<&Arc<Worker>> {
        self.workers
            .binary_search_by_key(&id, |w| w.id)
            .ok()
            .map(|i| &self.workers[i])
    }

    /// Workers of a role.
    pub fn with_role(&self, role: Role) -> impl Iterator<Item = &Arc<Worker>> {
        self.workers.iter().filter(move |w| w.role == role)
    }
}

/// Called with each newly published worker set.
pub type PublishHook = Box<dyn Fn(&Arc<WorkerSet>) + Send + Sync>;

/// The registry: a swappable snapshot plus id allocation.
#[derive(Default)]
pub struct Registry {
    set: ArcSwap<WorkerSet>,
    next_id: AtomicU32,
    generation: AtomicU64,
    cb: Arc<BreakerShared>,
    on_publish: std::sync::OnceLock<PublishHook>,
    /// Oldest engine-load sample shown to policies, ms; 0 = engine scraping off.
    engine_max_age_ms: AtomicU64,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("generation", &self.generation)
            .finish()
    }
}

impl Registry {
    /// A registry whose workers' circuit breakers use `cb`.
    pub fn with_breaker(cb: Arc<BreakerShared>) -> Self {
        Registry {
            cb,
            ..Default::default()
        }
    }

    /// Set the hook told about every published set (once; later calls are ignored).
    /// The policy layer uses it to push `workers-changed` off the request path.
    pub fn on_publish(&self, hook: PublishHook) {
        let _ = self.on_publish.set(hook);
    }

    /// Set the age limit of engine-load samples, ms (the engine scraper does, from its
    /// interval); 0 = scraping off.
    pub fn set_engine_max_age_ms(&self, ms: u64) {
        self.engine_max_age_ms.store(ms, Ordering::Relaxed);
    }

    /// The age limit of engine-load samples, ms (0 when scraping is off).
    pub fn engine_max_age_ms(&self) -> u64 {
        self.engine_max_age_ms.load(Ordering::Relaxed)
    }

    /// Current snapshot.
    pub fn snapshot(&self) -> Arc<WorkerSet> {
        self.set.load_full()
    }

    /// Current generation (cheap; no snapshot clone).
    pub fn generation(&self) -> u64 {
        self.set.load().generation
    }

    /// Add workers for base URL `url`: one per data-parallel rank when `dp_size > 1`.
    /// Returns their ids; an existing (url, rank, role) is kept, not duplicated.
    pub fn add(&self, url: &str, role: Role, dp_size: u32) -> Result<Vec<u32>, String> {
        self.add_labeled(url, role, dp_size, Vec::new())
    }

    /// [`Registry::add`] with labels for the new workers (service discovery's pod
    /// identity), passed to policies in `workers-changed`.
    pub fn add_labeled(
        &self,
        url: &str,
        role: Role,
        dp_size: u32,
        labels: Vec<(String, String)>,
    ) -> Result<Vec<u32>, String> {
        let cur = self.snapshot();
        let mut workers = cur.workers.clone();
        let mut ids = Vec::new();
        let ranks: Vec<Option<u32>> = if dp_size > 1 {
            (0..dp_size).map(Some).collect()
        } else {
            vec![None]
        };
        let base = url.trim_end_matches('/');
        for rank in ranks {
            if let Some(w) = workers
                .iter()
                .find(|w| w.url == base && w.dp_rank == rank && w.role == role)
            {
                ids.push(w.id);
                continue;
            }
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let mut w = Worker::with_breaker(id, url, role, rank, self.cb.clone())?;
            w.labels = labels.clone();
            workers.push(Arc::new(w));
            ids.push(id);
        }
        self.publish(workers);
        Ok(ids)
    }

    /// Mark every worker with base URL `url` (all ranks) draining (no new requests) or
    /// serving again. Returns how many were found. Takes effect at once (a flag, no new
    /// worker set).
    pub fn set_draining(&self, url: &str, draining: bool) -> usize {
        let base = url.trim_end_matches('/');
        let cur = self.snapshot();
        let mut n = 0;
        for w in cur.workers.iter().filter(|w| w.url == base) {
            w.draining.store(draining, Ordering::Relaxed);
            n += 1;
        }
        n
    }

    /// Remove every worker with base URL `url` (all ranks). Returns how many went.
    pub fn remove(&self, url: &str) -> usize {
        let base = url.trim_end_matches('/');
        let cur = self.snapshot();
        let workers: Vec<_> = cur
            .workers
            .iter()
            .filter(|w| w.url != base)
            .cloned()
            .collect();
        let removed = cur.workers.len() - workers.len();
        if removed > 0 {
            self.publish(workers);
        }
        removed
    }

    fn publish(&self, mut workers: Vec<Arc<Worker>>) {
        workers.sort_by_key(|w| w.id);
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let set = Arc::new(WorkerSet {
            workers,
            generation,
        });
        self.set.store(set.clone());
        if let Some(hook) = self.on_publish.get() {
            hook(&set);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dp_ranks_become_separate_workers() {
        let r = Registry::default();
        let ids = r.add("http://127.0.0.1:8000/", Role::Regular, 2).unwrap();
        assert_eq!(ids, vec![0, 1]);
        let s = r.snapshot();
        assert_eq!(s.workers[1].name(), "http://127.0.0.1:8000@1");
        assert_eq!(s.workers[0].authority.as_str(), "127.0.0.1:8000");
        // Re-adding keeps ids and state.
        assert_eq!(
            r.add("http://127.0.0.1:8000", Role::Regular, 2).unwrap(),
            vec![0, 1]
        );
        assert_eq!(r.remove("http://127.0.0.1:8000"), 2);
        assert!(r.snapshot().workers.is_empty());
        assert!(r.generation() >= 3);
    }

    #[test]
    fn in_flight_guard_and_health_streaks() {
        let r = Registry::default();
        r.add("http://a:1", Role::Regular, 1).unwrap();
        let w = r.snapshot().workers[0].clone();
        let g1 = w.start_request();
        let g2 = w.start_request();
        assert_eq!(w.in_flight(), 2);
        drop(g1);
        assert_eq!(g2.worker().in_flight(), 1);
        drop(g2);
        assert_eq!(w.in_flight(), 0);
        assert!(!w.record_failure(false, 3));
        assert!(!w.record_failure(false, 3));
        assert!(w.record_failure(false, 3));
        assert!(!w.is_healthy());
        assert!(!w.record_success(2));
        assert!(w.record_success(2));
        assert!(w.is_healthy());
    }
}
