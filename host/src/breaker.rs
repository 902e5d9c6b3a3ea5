//! Per-worker circuit breaker.
//!
//! - **Closed**: traffic flows. `failure_threshold` failures in a row (5xx, connection
//!   error, timeout, broken stream), none older than `window` before the latest, open it.
//!   Any success resets the streak.
//! - **Open**: the worker gets no traffic for `open_for`.
//! - **Half-open**: at most `half_open_max` requests at a time are let through as probes
//!   (vllm-project/router lets *all* traffic through half-open, which hammers a worker
//!   that is still sick); `success_threshold` successes close it, any failure re-opens it.
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
    /// Time spent open before probing.
    pub open_for: Duration,
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
    /// Current state (without applying a due open → half-open move).
    pub fn state(&self) -> BreakerState {
        BreakerState::from_u8(self.state.load(Ordering::Relaxed))
    }

    fn set(&self, inner: &mut Inner, to: BreakerState, now_ms: u64) -> Transition {
        let from = self.state();
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
                    && now_ms.saturating_sub(inner.changed_ms) >= cfg.open_for.as_millis() as u64
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
                    .then(|| self.set(&mut inner, BreakerState::Open, now_ms))
            }
            (BreakerState::HalfOpen, true) => {
                inner.half_successes += 1;
                (inner.half_successes >= cfg.success_threshold)
                    .then(|| self.set(&mut inner, BreakerState::Closed, now_ms))
            }
            (BreakerState::HalfOpen, false) => {
                Some(self.set(&mut inner, BreakerState::Open, now_ms))
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
            window: Duration::from_millis(5000),
            half_open_max: 1,
        }
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
