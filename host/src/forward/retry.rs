//! Retry settings: exponential backoff with jitter, which statuses are worth another
//! worker, and a **retry budget** that bounds retries to a fraction of recent requests.
//!
//! Without a budget, `--retry-max-retries 5` means an outage multiplies the fleet's load
//! by five exactly when it can least take it (a retry storm). The budget follows
//! linkerd2-proxy's `TpsBudget` and Finagle's `RetryBudget`: over a sliding window of
//! [`BUDGET_WINDOW_SECS`] seconds, retries may not exceed `ratio` × requests plus a floor
//! of `min_per_sec` × window retries (so a quiet router can still retry). Envoy's
//! `retry_budget` (`budget_percent` 20 %, `min_retry_concurrency` 3) has the same intent
//! expressed over active requests. A refused retry is counted in
//! `vllm_router_retries_refused_total` and the attempt's own answer goes to the client.

use http::StatusCode;
use parking_lot::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Retry settings (`--retry-*`).
#[derive(Debug, Clone)]
pub struct RetryConfig {
    /// Total attempts, first included (≥ 1).
    pub attempts: u32,
    /// First backoff, ms.
    pub initial_backoff_ms: u64,
    /// Backoff cap, ms.
    pub max_backoff_ms: u64,
    /// Growth factor.
    pub multiplier: f64,
    /// Jitter fraction in [0, 1].
    pub jitter: f64,
}

impl RetryConfig {
    /// Backoff before retry number `k` (0-based): `min(initial × multiplier^k, max)`
    /// ± jitter, in ms.
    pub fn backoff(&self, k: u32) -> Duration {
        let base = (self.initial_backoff_ms as f64 * self.multiplier.powi(k as i32))
            .min(self.max_backoff_ms as f64);
        let j = if self.jitter > 0.0 {
            rand::random_range(-self.jitter..=self.jitter)
        } else {
            0.0
        };
        Duration::from_millis((base * (1.0 + j)).max(0.0) as u64)
    }
}

/// Statuses worth another worker: the request may succeed elsewhere.
pub fn is_retryable(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 429 | 500 | 502 | 503 | 504)
}

/// Length of the budget's sliding window, seconds.
pub const BUDGET_WINDOW_SECS: u64 = 10;

#[derive(Debug, Default, Clone, Copy)]
struct Bucket {
    /// Second (since the budget's start) this bucket counts; stale buckets are reset.
    sec: u64,
    requests: u64,
    retries: u64,
}

/// A retry budget over a sliding window of [`BUDGET_WINDOW_SECS`] one-second buckets.
/// Time comes from `tokio::time`, so tests run it on paused time.
#[derive(Debug)]
pub struct RetryBudget {
    /// Retries allowed per request in the window (e.g. 0.2 = 20 %); negative = unlimited.
    ratio: f64,
    /// Retries allowed per second regardless of traffic (the floor).
    min_per_sec: u32,
    start: Instant,
    buckets: Mutex<[Bucket; BUDGET_WINDOW_SECS as usize]>,
}

impl RetryBudget {
    /// A budget of `ratio` retries per request plus `min_per_sec` per second.
    /// `ratio < 0` disables the budget (every retry allowed).
    pub fn new(ratio: f64, min_per_sec: u32) -> Self {
        RetryBudget {
            ratio,
            min_per_sec,
            start: Instant::now(),
            buckets: Mutex::new([Bucket::default(); BUDGET_WINDOW_SECS as usize]),
        }
    }

    fn with_bucket<R>(&self, f: impl FnOnce(&mut [Bucket], usize) -> R) -> R {
        let sec = self.start.elapsed().as_secs();
        let mut b = self.buckets.lock();
        let i = (sec % BUDGET_WINDOW_SECS) as usize;
        if b[i].sec != sec {
            b[i] = Bucket {
                sec,
                ..Bucket::default()
            };
        }
        // Buckets older than the window are ignored by the sums below.
        for x in b.iter_mut() {
            if sec.saturating_sub(x.sec) >= BUDGET_WINDOW_SECS {
                *x = Bucket {
                    sec: x.sec,
                    ..Bucket::default()
                };
            }
        }
        f(&mut b[..], i)
    }

    /// Count one client request (call once per request, not per attempt).
    pub fn deposit(&self) {
        if self.ratio < 0.0 {
            return;
        }
        self.with_bucket(|b, i| b[i].requests += 1);
    }

    /// Take one retry from the budget; `false` when the window's retries are spent.
    pub fn try_withdraw(&self) -> bool {
        if self.ratio < 0.0 {
            return true;
        }
        self.with_bucket(|b, i| {
            let (req, ret) = b
                .iter()
                .fold((0u64, 0u64), |(q, r), x| (q + x.requests, r + x.retries));
            let allowed =
                self.ratio * req as f64 + (self.min_per_sec as u64 * BUDGET_WINDOW_SECS) as f64;
            if (ret as f64) < allowed {
                b[i].retries += 1;
                true
            } else {
                false
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps_without_jitter() {
        let c = RetryConfig {
            attempts: 5,
            initial_backoff_ms: 50,
            max_backoff_ms: 300,
            multiplier: 2.0,
            jitter: 0.0,
        };
        let got: Vec<u64> = (0..5).map(|k| c.backoff(k).as_millis() as u64).collect();
        assert_eq!(got, vec![50, 100, 200, 300, 300]);
    }

    #[test]
    fn retryable_statuses() {
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(is_retryable(StatusCode::from_u16(s).unwrap()), "{s}");
        }
        for s in [200, 400, 404, 422, 501] {
            assert!(!is_retryable(StatusCode::from_u16(s).unwrap()), "{s}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn budget_bounds_retries_to_ratio_plus_floor() {
        // 20 % of requests, floor 1/s → 10 retries per window for free.
        let b = RetryBudget::new(0.2, 1);
        for _ in 0..100 {
            b.deposit();
        }
        let granted = (0..1000).filter(|_| b.try_withdraw()).count();
        assert_eq!(granted, 20 + 10, "ratio × requests + floor × window");
    }

    #[tokio::test(start_paused = true)]
    async fn budget_refills_as_the_window_slides() {
        let b = RetryBudget::new(0.0, 1);
        let first = (0..100).filter(|_| b.try_withdraw()).count();
        assert_eq!(first, 10);
        assert!(!b.try_withdraw());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!b.try_withdraw(), "retries of 5 s ago still count");
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(b.try_withdraw(), "the window slid past the spent retries");
    }

    #[tokio::test(start_paused = true)]
    async fn negative_ratio_disables_the_budget() {
        let b = RetryBudget::new(-1.0, 0);
        assert!((0..10_000).all(|_| b.try_withdraw()));
    }
}
