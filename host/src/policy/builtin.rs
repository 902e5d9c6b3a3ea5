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

mod list {
    include!("builtin_list.rs");
    include!(concat!(env!("OUT_DIR"), "/builtin_wasm.rs"));
}

/// The flag → config mapping of a built-in, by name (`None`: it takes no flags).
fn tunables_of(
    name: &str,
) -> Option<fn(&crate::config::Args) -> serde_json::Map<String, serde_json::Value>> {
    match name {
        // kv_aware falls back to cache_aware and takes its flags too.
        "cache_aware" | "kv_aware" => Some(cache_aware_tunables),
        _ => None,
    }
}

/// All built-in policies (from `builtin_list.rs`, the one list).
pub static BUILTINS: std::sync::LazyLock<Vec<Builtin>> = std::sync::LazyLock::new(|| {
    list::BUILTIN_LIST
        .iter()
        .zip(list::BUILTIN_WASM)
        .map(|(&(name, _, _, about), wasm)| Builtin {
            name,
            about,
            wasm,
            tunables: tunables_of(name),
        })
        .collect()
});

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
