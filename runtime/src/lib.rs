//! # vllm-router-runtime
//!
//! The WebAssembly side of vllm-router's policies, in the shape of Spin's `core` crate:
//! one wasmtime engine with its limits and epoch ticker, the compiled-component cache,
//! the host functions and WASI shim a policy may import, a loaded policy version with its
//! single long-lived instance, fault classification and quarantine, and the bounded
//! feedback queue that delivers `on-complete` off the response path.
//!
//! **Knows no HTTP.** The request reaches a policy through the [`RequestView`] trait and
//! workers through [`WorkerInfo`]; the host (crate `vllm-router`) implements both.
//!
//! Every guest call runs under an epoch deadline and a memory cap; a trap drops the
//! instance's Store (a trap poisons it) and the next call re-instantiates from the cached
//! pre-instance (~20 µs), running `init` again.
//!
//! Lifecycle of a version, as `wit/policy.wit` states it: compile → instantiate →
//! `init(config)` **once** → `workers-changed` (pushed by the host whenever its worker
//! set changes, never on a client's request) → `select` … and `on-complete` once per
//! routed request (from the feedback thread). `decision::none` is a *decline*, not a
//! fault: the host's fallback decides and nothing counts toward quarantine.

// One `unsafe` call, with its safety argument: `disk_cache::deserialize`.
#![deny(unsafe_code)]

pub mod clock;
pub mod disk_cache;
mod engine;
pub mod feedback;
mod host_api;
mod version;
mod wasi;

pub use engine::{Limits, PolicyEngine};
pub use host_api::PolicyState;
pub use version::{NoChoice, PolicyFault, PolicyVersion};

use std::time::Duration;

/// What a policy may read of a request. The host's request type implements it; tests
/// use a fake. Every method is called only while a `select` runs.
pub trait RequestView: Send + Sync {
    /// URL path, e.g. `/v1/chat/completions`.
    fn path(&self) -> &str;
    /// The body's `model`.
    fn model(&self) -> Option<&str>;
    /// A header the client sent (name case-insensitive).
    fn header(&self, name: &str) -> Option<&str>;
    /// A scalar body field by dotted path (see `wit/policy.wit`).
    fn body_field(&self, path: &str) -> Option<String>;
    /// A scalar body field by JSON Pointer (RFC 6901; contract 0.2's `body-pointer`).
    fn body_pointer(&self, pointer: &str) -> Option<String>;
    /// The routing text (prompt) of the request.
    fn routing_text(&self) -> &str;
    /// Body length, bytes.
    fn body_length(&self) -> u64;
    /// The request id the router uses.
    fn request_id(&self) -> &str;
    /// The prompt's prefix match against the KV-event index (`prefix-cache`, 0.1's
    /// `vllm:router-kv` package or 0.2's `vllm:router-policy`;
    /// `wit/kv/prefix-cache.wit`): pushes one word per id of `candidates` (worker ids in
    /// `select` order) onto `out` — leading blocks held in bits 0..32, source state in
    /// bits 32..34 — and returns the prompt's full blocks. The default (no index, or no
    /// tokenized prompt) is 0 blocks and a zero word per candidate.
    fn prefix_match(&self, candidates: &[u32], out: &mut Vec<u64>) -> u32 {
        out.extend(candidates.iter().map(|_| 0u64));
        0
    }
}

/// A worker as a policy sees it in `workers-changed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    /// The router's id.
    pub id: u32,
    /// Base URL without the data-parallel suffix.
    pub url: String,
    /// Role in a PD deployment.
    pub role: vllm_router_sdk::Role,
    /// Data-parallel rank, if the URL serves several.
    pub dp_rank: Option<u32>,
    /// Labels from service discovery (`key`, `value`); empty for static workers.
    pub labels: Vec<(String, String)>,
}

/// Contract 0.1 (`wit/policy.wit`, frozen) with its KV capability package
/// (`wit/kv/prefix-cache.wit`): every component built before 0.2 links against these.
mod bindings {
    wasmtime::component::bindgen!({
        // A component that does not import `prefix-cache` links exactly as before.
        path: ["../wit", "../wit/kv"],
        world: "vllm:router-kv/policy-kv",
        imports: { default: trappable },
        with: { "vllm:router-policy/types.request": super::ReqHandle },
        // `Stage` is used as a map key in the host's metrics handles.
        additional_derives: [Hash, Eq, PartialEq],
    });
}

/// Contract 0.2 (`wit/0.2/policy.wit`). Linked beside 0.1 (the component model treats
/// 0.1 and 0.2 as incompatible packages, so both sets of imports are defined); the
/// version a component speaks is read from its `balancer` export.
pub(crate) mod bindings_v2 {
    wasmtime::component::bindgen!({
        path: "../wit/0.2",
        world: "vllm:router-policy/policy-full",
        imports: { default: trappable },
        with: { "vllm:router-policy/types.request": super::ReqHandle },
    });
}

use bindings::vllm::router_kv::prefix_cache;
pub use bindings::vllm::router_policy::types::{Completion, Stage};
use bindings::vllm::router_policy::{host, types};
use bindings::{PolicyKv as PolicyWorld, PolicyKvPre as PolicyPre};

/// The contract versions this runtime links, oldest first (`vllm:router-policy@…`).
pub const CONTRACTS: &[&str] = &["0.1.0", "0.2.0"];

/// Marker for the `request` resource: the host passes the current request by borrow and
/// keeps it in the Store's data, so no table entry is made per call.
pub struct ReqHandle;

/// The ticker parks after this long without a guest call (an idle router is idle).
pub(crate) const IDLE_PARK: Duration = Duration::from_millis(200);
/// `init`, `workers-changed` and state hand-off may build large structures: they get
/// this many times the per-call `select` budget.
pub(crate) const SETUP_BUDGET_FACTOR: u64 = 100;
/// Lines a policy may log per second before the host drops them.
pub(crate) const LOG_LINES_PER_SEC: u32 = 20;
