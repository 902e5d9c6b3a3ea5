//! Small shared helpers: the router's monotonic clock lives in the policy runtime crate
//! (policies read the same clock) and is re-exported here.

pub use vllm_router_runtime::clock::{mark_start, uptime_ms, uptime_ns};
