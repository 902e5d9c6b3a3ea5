//! Built-in policies: components built from `policies/*` by `host/build.rs` and embedded
//! in the binary, so `--policy NAME` needs no file.

/// A built-in policy component.
pub struct Builtin {
    /// Name accepted by `--policy`.
    pub name: &'static str,
    /// One-line description for `--help` and logs.
    pub about: &'static str,
    /// The component bytes.
    pub wasm: &'static [u8],
    /// The policy's config keys taken from router flags (`--cache-threshold` → ...),
    /// declared here, next to the built-in, once; `--policy-config` keys win over them.
    pub tunables: Option<fn(&crate::config::Args) -> serde_json::Map<String, serde_json::Value>>,
}

/// cache_aware's tunables: vllm-project/router's flag names, SGLang's defaults.
fn cache_aware_tunables(a: &crate::config::Args) -> serde_json::Map<String, serde_json::Value> {
    let v = serde_json::json!({
        "cache_threshold": a.cache_threshold,
        "balance_abs_threshold": a.balance_abs_threshold,
        "balance_rel_threshold": a.balance_rel_threshold,
        "eviction_interval_secs": a.eviction_interval,
        "max_tree_size": a.max_tree_size,
    });
    match v {
        serde_json::Value::Object(m) => m,
        _ => Default::default(),
    }
}

macro_rules! builtin {
    ($name:literal, $stem:literal, $about:literal) => {
        builtin!($name, $stem, $about, None)
    };
    ($name:literal, $stem:literal, $about:literal, $tunables:expr) => {
        Builtin {
            name: $name,
            about: $about,
            tunables: $tunables,
            wasm: include_bytes!(concat!(
                env!("VLLM_ROUTER_POLICY_WASM_DIR"),
                "/",
                $stem,
                ".wasm"
            )),
        }
    };
}

/// All built-in policies.
pub static BUILTINS: &[Builtin] = &[
    builtin!(
        "round_robin",
        "policy_round_robin",
        "next eligible worker in id order"
    ),
    builtin!("random", "policy_random", "uniform random eligible worker"),
    builtin!(
        "consistent_hash",
        "policy_consistent_hash",
        "session affinity on a hash ring (160 virtual nodes), next-member fallback, optional bounded load"
    ),
    builtin!(
        "power_of_two",
        "policy_power_of_two",
        "less loaded of two random eligible workers (in-flight + engine queue)"
    ),
    builtin!(
        "cache_aware",
        "policy_cache_aware",
        "prefix-cache affinity on an approximate radix tree of the prompt, balanced by load",
        Some(cache_aware_tunables)
    ),
];

/// Look up a built-in by name.
pub fn find(name: &str) -> Option<&'static Builtin> {
    BUILTINS.iter().find(|b| b.name == name)
}

/// Names of all built-ins, comma-separated (for error messages).
pub fn names() -> String {
    BUILTINS
        .iter()
        .map(|b| b.name)
        .collect::<Vec<_>>()
        .join(", ")
}
