//! Per-worker circuit breaker.
//!
//! - **Closed**: traffic flows. `failure_threshold` failures in a row (5xx, connection
//!   error, timeout, broken stream), none older than `window` before the latest, open it.
//!   Any success resets the streak.
//! - **Open**: the worker gets no traffic for `open_for × trips`, capped at
//!   `max_open_for`, where `trips` counts the times it opened without staying closed
//!   for `max_open_for` in between: Envoy's outlier detection grows the ejection time
//!   the same way (`base_ejection_time` × ejections, capped by `max_ejection_time`), so
//!   a worker that keeps failing right after each probe is probed ever less often.
//! - **Half-open**: at most `half_open_max` requests at a time are let through as probes
//!   (vllm-project/router lets *all* traffic through half-open, which hammers a worker
//!   that is still sick); `success_threshold` successes close it, any failure re-opens it.
//!
//! The breaker is the **only** owner of request-outcome ejection: 5xx answers, timeouts
//! and broken streams do not touch the worker's health (active probes own "up/down", see
//! [`crate::health`]), so the two never count the same failure against different
//! thresholds and a worker whose `/health` answers but whose requests fail no longer
//! flaps up and down. The one request outcome health takes is a failed TCP connection
//! (nothing listens), the same evidence a failed probe gives.
//!
//! Transitions are lazy (checked when a request looks at the worker), logged, and counted
//! in `vllm_router_cb_transitions_total`.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::time::Duration;

/// Breaker settings (`--cb-*`).
#[derive(Debug, Clone)]
pub struct BreakerConfig {
    /// Off entirely (`--disable-circuit-breaker`).
    pub enabled: bool,
    /// Consecutive failures that open the breaker.
    pub failure_threshold: u32,
    /// Successful probes that close it again.
    pub success_threshold: u32,
    /// Time spent open before probing, on the first trip.
    pub open_for: Duration,
    /// Cap of the growing open time (`--cb-max-timeout-duration-secs`).
    pub max_open_for: Duration,
    /// A failure streak older than this (first to last failure) starts over.
    pub window: Duration,
    /// Concurrent probe requests allowed while half-open.
    pub half_open_max: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            enabled: true,
            failure_threshold: 10,
            success_threshold: 3,
            open_for: Duration::from_secs(60),
            max_open_for: Duration::from_secs(300),
            window: Duration::from_secs(120),
            half_open_max: 1,
        }
    }
}

/// Settings shared by every worker's breaker, with the hook that reports transitions
/// (metrics); the hook is set once at startup.
#[derive(Default)]
pub struct BreakerShared {
    /// Settings.
    pub cfg: BreakerConfig,
    /// Called on each transition with the worker's name.
    pub on_transition: std::sync::OnceLock<Box<dyn Fn(&str, Transition) + Send + Sync>>,
}

impl std::fmt::Debug for BreakerShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.cfg.fmt(f)
    }
}

/// Breaker state, as exported in `vllm_router_cb_state` (0, 1, 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BreakerState {
    /// Traffic flows.
    Closed = 0,
    /// No traffic.
    Open = 1,
    /// Bounded probes.
    HalfOpen = 2,
}

impl BreakerState {
    /// Lower-case name for logs and labels.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
    fn from_u8(v: u8) -> Self {
        match v {
            1 => BreakerState::Open,
            2 => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    streak: u32,
    streak_started_ms: u64,
    changed_ms: u64,
    half_successes: u32,
    /// Times opened in a row (reset after `max_open_for` closed).
    trips: u32,
    /// Open time of the current trip, ms.
    open_for_ms: u64,
}

/// One worker's breaker. Reads on the hot path are one atomic load when closed.
#[derive(Debug, Default)]
pub struct Breaker {
    state: AtomicU8,
    probes: AtomicU32,
    inner: Mutex<Inner>,
}

/// A transition that happened, for logs and metrics.
pub type Transition = (BreakerState, BreakerState);

impl Breaker {
    /// How long the current (or last) trip keeps the breaker open, ms.
    pub fn open_for_ms(&self) -> u64 {
        self.inner.lock().open_for_ms
    }

    /// Current state (without applying a due open → half-open move).
    pub fn state(&self) -> BreakerState {
        BreakerState::from_u8(self.state.load(Ordering::Relaxed))
    }

    fn set(&self, inner: &mut Inner, to: BreakerState, now_ms: u64) -> Transition {
        self.set_with(inner, to, now_ms, &BreakerConfig::default())
    }

    fn set_with(
        &self,
        inner: &mut Inner,
        to: BreakerState,
        now_ms: u64,
        cfg: &BreakerConfig,
    ) -> Transition {
        let from = self.state();
        if to == BreakerState::Open {
            let max = cfg.max_open_for.max(cfg.open_for).as_millis() as u64;
            // A worker that stayed closed for the whole cap starts over at one trip.
            if from == BreakerState::Closed && now_ms.saturating_sub(inner.changed_ms) >= max {
                inner.trips = 0;
            }
            inner.trips = inner.trips.saturating_add(1);
            inner.open_for_ms = (cfg.open_for.as_millis() as u64)
                .saturating_mul(inner.trips as u64)
                .min(max);
        }
        self.state.store(to as u8, Ordering::Relaxed);
        inner.changed_ms = now_ms;
        inner.half_successes = 0;
        inner.streak = 0;
        (from, to)
    }

    /// Whether a request may be sent now; moves open → half-open when `open_for` passed.
    pub fn allows(&self, cfg: &BreakerConfig, now_ms: u64) -> (bool, Option<Transition>) {
        if !cfg.enabled {
            return (true, None);
        }
        match self.state() {
            BreakerState::Closed => (true, None),
            BreakerState::HalfOpen => (
                self.probes.load(Ordering::Relaxed) < cfg.half_open_max,
                None,
            ),
            BreakerState::Open => {
                let mut inner = self.inner.lock();
                if self.state() == BreakerState::Open
                    && now_ms.saturating_sub(inner.changed_ms) >= inner.open_for_ms
                {
                    let t = self.set(&mut inner, BreakerState::HalfOpen, now_ms);
                    (cfg.half_open_max > 0, Some(t))
                } else {
                    (self.state() != BreakerState::Open, None)
                }
            }
        }
    }

    /// Admit a request chosen for this worker: `Some(is_probe)`, or `None` when open, or
    /// half-open with every probe slot taken (choose another worker). A probe slot must
    /// be given back by [`Breaker::record`] or [`Breaker::release_probe`].
    pub fn acquire(&self, cfg: &BreakerConfig) -> Option<bool> {
        if !cfg.enabled {
            return Some(false);
        }
        match self.state() {
            BreakerState::Closed => Some(false),
            BreakerState::Open => None,
            BreakerState::HalfOpen => {
                let mut cur = self.probes.load(Ordering::Relaxed);
                loop {
                    if cur >= cfg.half_open_max {
                        return None;
                    }
                    match self.probes.compare_exchange(
                        cur,
                        cur + 1,
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    ) {
                        Ok(_) => return Some(true),
                        Err(v) => cur = v,
                    }
                }
            }
        }
    }

    /// Give back a probe slot without an outcome (the client went away).
    pub fn release_probe(&self) {
        let _ = self
            .probes
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |v| v.checked_sub(1));
    }

    /// Record the outcome of a request admitted by [`Breaker::acquire`] (`probe` as it
    /// returned). Returns the transition it caused, if any.
    pub fn record(
        &self,
        cfg: &BreakerConfig,
        probe: bool,
        ok: bool,
        now_ms: u64,
    ) -> Option<Transition> {
        if !cfg.enabled {
            return None;
        }
        if probe {
            self.release_probe();
        }
        let mut inner = self.inner.lock();
        match (self.state(), ok) {
            (BreakerState::Closed, true) => {
                inner.streak = 0;
                None
            }
            (BreakerState::Closed, false) => {
                if inner.streak == 0
                    || now_ms.saturating_sub(inner.streak_started_ms)
                        > cfg.window.as_millis() as u64
                {
                    inner.streak = 0;
                    inner.streak_started_ms = now_ms;
                }
                inner.streak += 1;
                (inner.streak >= cfg.failure_threshold)
                    .then(|| self.set_with(&mut inner, BreakerState::Open, now_ms, cfg))
            }
            (BreakerState::HalfOpen, true) => {
                inner.half_successes += 1;
                (inner.half_successes >= cfg.success_threshold)
                    .then(|| self.set(&mut inner, BreakerState::Closed, now_ms))
            }
            (BreakerState::HalfOpen, false) => {
                Some(self.set_with(&mut inner, BreakerState::Open, now_ms, cfg))
            }
            // A request admitted before the breaker opened: its outcome changes nothing.
            (BreakerState::Open, _) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            enabled: true,
            failure_threshold: 3,
            success_threshold: 2,
            open_for: Duration::from_millis(1000),
            max_open_for: Duration::from_millis(2500),
            window: Duration::from_millis(5000),
            half_open_max: 1,
        }
    }

    fn trip(b: &Breaker, c: &BreakerConfig, now: u64) {
        for _ in 0..c.failure_threshold {
            let t = b.acquire(c).unwrap();
            b.record(c, t, false, now);
        }
    }

    #[test]
    fn open_time_grows_per_trip_is_capped_and_resets_after_a_long_closed_spell() {
        let b = Breaker::default();
        let c = cfg();
        trip(&b, &c, 0);
        assert_eq!(b.open_for_ms(), 1000);
        // Probe fails right away: second trip, 2 × open_for.
        assert!(b.allows(&c, 1000).0);
        let p = b.acquire(&c).unwrap();
        b.record(&c, p, false, 1000);
        assert_eq!(b.open_for_ms(), 2000);
        assert!(
            !b.allows(&c, 2999).0,
            "still open after the first trip's time"
        );
        assert!(b.allows(&c, 3000).0);
        let p = b.acquire(&c).unwrap();
        b.record(&c, p, false, 3000);
        assert_eq!(b.open_for_ms(), 2500, "capped at max_open_for");
        // Recover, stay closed longer than the cap: the next trip starts over.
        assert!(b.allows(&c, 5500).0);
        for now in [5500, 5600] {
            let p = b.acquire(&c).unwrap();
            b.record(&c, p, true, now);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        trip(&b, &c, 9000);
        assert_eq!(b.open_for_ms(), 1000);
    }

    #[test]
    fn opens_after_threshold_half_opens_with_one_probe_and_closes() {
        let b = Breaker::default();
        let c = cfg();
        for i in 0..3 {
            let t = b.acquire(&c).unwrap();
            let tr = b.record(&c, t, false, 10 + i);
            assert_eq!(tr.is_some(), i == 2);
        }
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.allows(&c, 500).0);
        assert!(b.acquire(&c).is_none());
        // After open_for: half-open, one probe at a time.
        let (ok, tr) = b.allows(&c, 1100);
        assert!(ok);
        assert_eq!(tr, Some((BreakerState::Open, BreakerState::HalfOpen)));
        let p1 = b.acquire(&c).unwrap();
        assert!(b.acquire(&c).is_none(), "second concurrent probe admitted");
        assert!(!b.allows(&c, 1100).0);
        assert_eq!(b.record(&c, p1, true, 1200), None);
        let p2 = b.acquire(&c).unwrap();
        assert_eq!(
            b.record(&c, p2, true, 1300),
            Some((BreakerState::HalfOpen, BreakerState::Closed))
        );
        assert!(b.allows(&c, 1300).0);
    }

    #[test]
    fn a_failed_probe_reopens_and_success_resets_the_streak() {
        let b = Breaker::default();
        let c = cfg();
        for ok in [false, false, true, false, false] {
            let t = b.acquire(&c).unwrap();
            b.record(&c, t, ok, 0);
        }
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "a success in between resets"
        );
        let t = b.acquire(&c).unwrap();
        b.record(&c, t, false, 0);
        assert_eq!(b.state(), BreakerState::Open);
        b.allows(&c, 2000);
        let p = b.acquire(&c).unwrap();
        assert_eq!(
            b.record(&c, p, false, 2001),
            Some((BreakerState::HalfOpen, BreakerState::Open))
        );
        assert!(!b.allows(&c, 2500).0);
    }

    #[test]
    fn old_failures_fall_out_of_the_window_and_disabled_never_opens() {
        let b = Breaker::default();
        let c = cfg();
        for now in [0, 1000, 9000] {
            let t = b.acquire(&c).unwrap();
            b.record(&c, t, false, now);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        let off = BreakerConfig {
            enabled: false,
            ..cfg()
        };
        for _ in 0..100 {
            let t = b.acquire(&off).unwrap();
            b.record(&off, t, false, 0);
        }
        assert!(b.allows(&off, 0).0);
    }
}
