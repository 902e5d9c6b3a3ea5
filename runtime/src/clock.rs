//! The router's monotonic clock: one base for the host, `host.now-ms` and
//! `wasi:clocks/monotonic-clock`, so a policy comparing the two sees the same time.

use std::sync::OnceLock;
use std::time::Instant;

static START: OnceLock<Instant> = OnceLock::new();

/// Mark the router's start (first call wins).
pub fn mark_start() {
    START.get_or_init(Instant::now);
}

/// Milliseconds since the router started (monotonic).
pub fn uptime_ms() -> u64 {
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Nanoseconds since the router started (monotonic).
pub fn uptime_ns() -> u64 {
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}
