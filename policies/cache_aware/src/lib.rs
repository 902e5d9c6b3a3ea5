//! `cache_aware` as a component: the logic lives in `policy-cache-aware-core` (shared
//! with `kv_aware`, which falls back to it when it has no KV events); this crate only
//! exports it.

pub use policy_cache_aware_core::*;

vllm_router_sdk::export_policy!(CacheAware);
