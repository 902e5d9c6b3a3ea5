// The built-in policies, in one place. Read by `host/build.rs` (which crates to build to
// components) and by `policy::builtin` (names, descriptions, the embedded bytes). A new
// built-in is one line here, its crate under `policies/`, and a workspace member.
//
// (name accepted by `--policy`, crate, artifact stem, one-line description)
pub const BUILTIN_LIST: &[(&str, &str, &str, &str)] = &[
    (
        "round_robin",
        "policy-round-robin",
        "policy_round_robin",
        "next eligible worker in id order",
    ),
    (
        "random",
        "policy-random",
        "policy_random",
        "uniform random eligible worker",
    ),
    (
        "consistent_hash",
        "policy-consistent-hash",
        "policy_consistent_hash",
        "session affinity on a hash ring (160 virtual nodes), next-member fallback, optional bounded load",
    ),
    (
        "power_of_two",
        "policy-power-of-two",
        "policy_power_of_two",
        "less loaded of two random eligible workers (in-flight + engine queue)",
    ),
    (
        "cache_aware",
        "policy-cache-aware",
        "policy_cache_aware",
        "prefix-cache affinity on an approximate radix tree of the prompt, balanced by load",
    ),
    (
        "kv_aware",
        "policy-kv-aware",
        "policy_kv_aware",
        "exact prefix-cache affinity from vLLM KV events, bounded by load; cache_aware without events",
    ),
];
