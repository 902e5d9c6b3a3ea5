//! # vllm-router SDK
//!
//! Write a load-balancing policy for `vllm-router` as plain Rust, unit test it natively
//! with `cargo test`, and build it into a WebAssembly component with
//! `cargo build --target wasm32-wasip2 --release`.
//!
//! ```ignore
//! use vllm_router_sdk::prelude::*;
//!
//! struct LeastInFlight;
//!
//! impl Policy for LeastInFlight {
//!     fn new(_config: &str) -> Result<Self, String> { Ok(LeastInFlight) }
//!     fn select(&mut self, _req: &dyn Request, candidates: &[Candidate]) -> Decision {
//!         let best = candidates.iter().min_by_key(|c| c.in_flight).unwrap();
//!         Decision::Worker(best.id)
//!     }
//! }
//!
//! vllm_router_sdk::export_policy!(LeastInFlight);
//! ```
//!
//! The contract is `wit/0.2/policy.wit` (package `vllm:router-policy@0.2.0`, world
//! `policy-full`; a component imports `prefix-cache` only if it calls
//! [`kv::cached_prefix`]). This crate mirrors its types as ordinary Rust types so the
//! same policy code runs inside the component and in native tests ([`testing`]).
//! Components built with SDK versions for contract 0.1 keep loading in the router.
//!
//! Cargo feature `feedback` (default): export the optional `feedback` interface, so the
//! router calls [`Policy::on_complete`] after each request. A policy that does not
//! implement `on_complete` can depend on the SDK with `default-features = false`: the
//! router then never queues a completion for it (one call and a thread hand-off per
//! request saved; the built-ins do this). With the feature off, `on_complete` is never
//! called, even if implemented.

use std::fmt;

pub mod config;
pub mod routing;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

#[doc(hidden)]
#[cfg(target_arch = "wasm32")]
pub mod component;

/// Re-exports a policy author needs.
pub mod prelude {
    pub use crate::kv::{self, CachedBlocks, PrefixMatch, SourceState};
    pub use crate::{
        Candidate, Completion, Decision, EngineLoad, Level, Policy, Request, Role, Stage, Worker,
        WorkerId, host,
    };
}

/// Dense id the router gives each worker; stable while the worker is registered.
pub type WorkerId = u32;

/// Role of a worker in a vLLM deployment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Serves whole requests.
    Regular,
    /// Prefill instance of a prefill/decode (PD) deployment.
    Prefill,
    /// Decode instance of a PD deployment.
    Decode,
}

/// Static description of a worker, delivered by [`Policy::workers_changed`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Worker {
    /// The router's id for the worker.
    pub id: WorkerId,
    /// Base URL of the vLLM server (`http://10.0.1.2:8000`), without the DP suffix.
    pub url: String,
    /// Role in a PD deployment.
    pub role: Role,
    /// Data-parallel rank, when the URL serves several.
    pub dp_rank: Option<u32>,
    /// Labels from configuration or discovery.
    pub labels: Vec<(String, String)>,
}

impl Worker {
    /// A stable identity for hashing: `url`, or `url@rank` for a data-parallel rank.
    /// Identical on every router replica.
    pub fn key(&self) -> String {
        match self.dp_rank {
            Some(r) => format!("{}@{}", self.url, r),
            None => self.url.clone(),
        }
    }
}

/// Engine-side load scraped from the worker's vLLM `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineLoad {
    /// `vllm:num_requests_running`.
    pub running: u32,
    /// `vllm:num_requests_waiting`.
    pub waiting: u32,
    /// `vllm:kv_cache_usage_perc` in per-mille (0..=1000).
    pub kv_cache_permille: u16,
}

/// The packed wire form of candidates in `select` (see `wit/policy.wit`): shared by the
/// router and the SDK so both sides agree bit for bit.
pub mod wire {
    use crate::{Candidate, EngineLoad};

    /// `id | in_flight << 32`.
    pub fn pack_candidate(c: &Candidate) -> u64 {
        c.id as u64 | (c.in_flight as u64) << 32
    }

    /// Engine word: running (24 bits), waiting (24), KV per-mille (11), bit 63 = present;
    /// 0 when `None`. Counts saturate at 2^24 − 1.
    pub fn pack_engine(e: Option<&EngineLoad>) -> u64 {
        match e {
            None => 0,
            Some(e) => {
                (e.running.min(0xFF_FFFF) as u64)
                    | (e.waiting.min(0xFF_FFFF) as u64) << 24
                    | (e.kv_cache_permille.min(1000) as u64) << 48
                    | 1 << 63
            }
        }
    }

    /// Inverse of [`pack_engine`].
    pub fn unpack_engine(w: u64) -> Option<EngineLoad> {
        (w >> 63 == 1).then(|| EngineLoad {
            running: (w & 0xFF_FFFF) as u32,
            waiting: ((w >> 24) & 0xFF_FFFF) as u32,
            kv_cache_permille: ((w >> 48) & 0x7FF) as u16,
        })
    }

    /// Decode one candidate word (and its engine word, 0 if none).
    pub fn unpack_candidate(w: u64, engine: u64) -> Candidate {
        Candidate {
            id: w as u32,
            in_flight: (w >> 32) as u32,
            engine: unpack_engine(engine),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn round_trip() {
            let e = EngineLoad {
                running: 7,
                waiting: 0xFF_FFFF,
                kv_cache_permille: 999,
            };
            let c = Candidate {
                id: 42,
                in_flight: u32::MAX,
                engine: Some(e),
            };
            assert_eq!(
                unpack_candidate(pack_candidate(&c), pack_engine(Some(&e))),
                c
            );
            let c = Candidate {
                id: 1,
                in_flight: 0,
                engine: None,
            };
            assert_eq!(unpack_candidate(pack_candidate(&c), pack_engine(None)), c);
            let big = EngineLoad {
                running: u32::MAX,
                waiting: 3,
                kv_cache_permille: 5000,
            };
            let back = unpack_engine(pack_engine(Some(&big))).unwrap();
            assert_eq!(
                (back.running, back.waiting, back.kv_cache_permille),
                (0xFF_FFFF, 3, 1000)
            );
        }
    }
}

/// A worker that may take the current request, with its load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Candidate {
    /// The router's id for the worker.
    pub id: WorkerId,
    /// Requests dispatched by this router and not finished (streams count until their end).
    pub in_flight: u32,
    /// Engine load when the router scrapes `/metrics`.
    pub engine: Option<EngineLoad>,
}

impl Candidate {
    /// One load figure: router in-flight plus, when known, the engine's waiting queue.
    /// Unit: requests.
    pub fn load(&self) -> u64 {
        let engine = self.engine.map(|e| e.waiting as u64).unwrap_or(0);
        self.in_flight as u64 + engine
    }
}

/// The stage a decision is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// A whole request.
    Regular,
    /// Prefill stage of a PD request.
    Prefill,
    /// Decode stage of a PD request.
    Decode,
}

/// A policy's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Route to this worker (must be one of the candidates).
    Worker(WorkerId),
    /// No choice; the reason is logged and the router uses its fallback.
    None(String),
}

/// Feedback after a routed request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The worker that served it.
    pub worker: WorkerId,
    /// HTTP status from the worker; 0 when none arrived.
    pub status: u16,
    /// Dispatch to end of response body, milliseconds.
    pub latency_ms: u32,
    /// Dispatch to first body byte, milliseconds.
    pub first_byte_ms: Option<u32>,
    /// Stage the request was for.
    pub stage: Stage,
}

/// Log severity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

/// Read access to the request being routed. In a component each call crosses into the
/// host and copies only its answer; read what you need, once.
pub trait Request {
    /// URL path, e.g. `/v1/chat/completions`.
    fn path(&self) -> String;
    /// The body's `model` field.
    fn model(&self) -> Option<String>;
    /// A header the client sent (case-insensitive name).
    fn header(&self, name: &str) -> Option<String>;
    /// A scalar JSON body field by dotted path (`session_params.session_id`).
    fn body_field(&self, path: &str) -> Option<String>;
    /// A scalar JSON body field by JSON Pointer (RFC 6901): `/metadata/session_id`,
    /// `/messages/0/content`, `/a~1b` for the key `a/b`. Strings unquoted, numbers and
    /// booleans as JSON text; objects, arrays, null and misses give `None`.
    fn body_pointer(&self, pointer: &str) -> Option<String>;
    /// The prompt text for prefix affinity (see [`routing::routing_text`]).
    fn routing_text(&self) -> String;
    /// Body length in bytes.
    fn body_length(&self) -> u64;
    /// The router's request id.
    fn request_id(&self) -> String;
    /// The stage this decision is for.
    fn stage(&self) -> Stage;
    /// Native tests only: the prefix match a [`testing::FakeRequest`] was given, for
    /// `candidates`. Not part of the component (read it with [`kv::cached_prefix`]).
    #[doc(hidden)]
    #[cfg(not(target_arch = "wasm32"))]
    fn test_prefix_match(&self, candidates: &[WorkerId]) -> kv::PrefixMatch {
        kv::PrefixMatch {
            total_blocks: 0,
            candidates: candidates
                .iter()
                .map(|_| kv::CachedBlocks::default())
                .collect(),
        }
    }
}

/// Exact prefix-cache knowledge from vLLM's KV-cache events: the optional import
/// `vllm:router-policy/prefix-cache@0.2.0` (`wit/0.2/policy.wit`).
///
/// A policy that calls [`cached_prefix`] imports that interface; the router then has each
/// request's prompt tokenized (the worker's `/tokenize`) and matched against its index of
/// which worker holds which KV block before calling `select`. A policy that never calls
/// it does not import it (the linker drops the unused import) and pays nothing.
pub mod kv {
    use crate::{Candidate, Request};

    /// State of a worker's KV-event source, as the router tracks it.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub enum SourceState {
        /// No events from this worker (none configured or discovered, or not yet
        /// connected): its count is 0 and means "unknown", not "cold".
        #[default]
        Fallback,
        /// Every event since the last (re)synchronisation was seen: the count is exact.
        Exact,
        /// Events were lost (a sequence gap or a disconnect) and no replay has closed the
        /// gap yet: the count may be stale.
        Degraded,
    }

    /// What one candidate holds of the request's prompt.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct CachedBlocks {
        /// Leading blocks of the prompt in the worker's KV cache (a hit run from the
        /// first block), in blocks of the engine's block size (vLLM's default 16 tokens).
        pub blocks: u32,
        /// How far to trust `blocks`.
        pub source: SourceState,
    }

    /// The request's prefix match against the candidates of one `select`.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct PrefixMatch {
        /// Full blocks in the prompt; 0 when it could not be tokenized or is shorter than
        /// one block.
        pub total_blocks: u32,
        /// One entry per candidate, in the order of the `candidates` slice passed in.
        pub candidates: Vec<CachedBlocks>,
    }

    impl PrefixMatch {
        /// Whether any candidate's source is [`SourceState::Exact`] or degraded, i.e.
        /// whether the numbers say anything at all.
        pub fn has_events(&self) -> bool {
            self.candidates
                .iter()
                .any(|c| c.source != SourceState::Fallback)
        }
    }

    /// Pack one candidate's entry the way the contract sends it: blocks in bits 0..32,
    /// source state in bits 32..34 (0 fallback, 1 exact, 2 degraded).
    pub fn pack(c: &CachedBlocks) -> u64 {
        let s = match c.source {
            SourceState::Fallback => 0u64,
            SourceState::Exact => 1,
            SourceState::Degraded => 2,
        };
        c.blocks as u64 | s << 32
    }

    /// Inverse of [`pack`]; an unknown state reads as fallback.
    pub fn unpack(w: u64) -> CachedBlocks {
        CachedBlocks {
            blocks: w as u32,
            source: match (w >> 32) & 3 {
                1 => SourceState::Exact,
                2 => SourceState::Degraded,
                _ => SourceState::Fallback,
            },
        }
    }

    /// The current request's prefix match, one entry per element of `candidates` (pass
    /// the slice `select` received). In a component this is one host call; natively it
    /// is what the [`crate::testing::FakeRequest`] was given.
    pub fn cached_prefix(req: &dyn Request, candidates: &[Candidate]) -> PrefixMatch {
        #[cfg(target_arch = "wasm32")]
        {
            let _ = req;
            let (total_blocks, words) = crate::component::cached_prefix_words();
            let mut m = PrefixMatch {
                total_blocks,
                candidates: words.into_iter().map(unpack).collect(),
            };
            m.candidates
                .resize(candidates.len(), CachedBlocks::default());
            m
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            let ids: Vec<_> = candidates.iter().map(|c| c.id).collect();
            req.test_prefix_match(&ids)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn pack_round_trip() {
            for source in [
                SourceState::Fallback,
                SourceState::Exact,
                SourceState::Degraded,
            ] {
                let c = CachedBlocks {
                    blocks: u32::MAX,
                    source,
                };
                assert_eq!(unpack(pack(&c)), c);
            }
            assert_eq!(unpack(3 << 32).source, SourceState::Fallback);
        }
    }
}

/// A load-balancing policy. One instance lives for the life of a loaded policy version;
/// calls never overlap (the router serialises them), so `&mut self` is safe to use for
/// counters, rings and trees.
pub trait Policy: Sized + 'static {
    /// Build the policy from its JSON config (`"{}"` when none was given).
    /// An `Err` refuses the load, with that message shown to the operator.
    fn new(config: &str) -> Result<Self, String>;

    /// Whether [`Candidate::engine`] is read. Contract 0.2 hands engine load over only
    /// on request (`request.engine-load`); a policy that never looks at it sets this to
    /// `false` and its candidates carry `engine: None` (the words are then never copied
    /// into the component). Default `true`: correct for every policy.
    const USES_ENGINE_LOAD: bool = true;

    /// The full worker set changed. Called before the first `select`.
    fn workers_changed(&mut self, _workers: &[Worker]) {}

    /// Choose among `candidates` (never empty, eligible workers only, ascending id).
    fn select(&mut self, req: &dyn Request, candidates: &[Candidate]) -> Decision;

    /// A request routed by this policy ended.
    fn on_complete(&mut self, _done: &Completion) {}

    /// State to hand to the next version on a hot swap; empty means none.
    fn export_state(&self) -> Vec<u8> {
        Vec::new()
    }

    /// State from the previous version. `Err` means "start cold" (not an error for the load).
    fn import_state(&mut self, _state: &[u8]) -> Result<(), String> {
        Err("state import not supported".to_string())
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Worker(id) => write!(f, "worker {id}"),
            Decision::None(why) => write!(f, "none ({why})"),
        }
    }
}

/// Functions the router offers to policies. Natively (in tests) they are implemented
/// in-process: `log` prints to stderr, `random` is a seedable xorshift generator
/// ([`testing::seed_random`]).
pub mod host {
    use crate::Level;

    /// Write a line to the router's log (rate-limited by the host).
    pub fn log(level: Level, message: &str) {
        imp::log(level, message)
    }

    /// Milliseconds since the router started (monotonic).
    pub fn now_ms() -> u64 {
        imp::now_ms()
    }

    /// 64 random bits (not for cryptography).
    pub fn random() -> u64 {
        imp::random()
    }

    /// The contract's published hash: XXH3-64, seed 0, of `data` (the host computes it
    /// in a component; natively the `xxhash-rust` crate does, with the same result).
    /// Policies in any language that hash with it build identical hash rings.
    pub fn hash64(data: &[u8]) -> u64 {
        imp::hash64(data)
    }

    /// A uniform random index in `0..n` (`n > 0`), by Lemire's multiply-shift.
    pub fn random_below(n: usize) -> usize {
        debug_assert!(n > 0);
        ((random() as u128 * n as u128) >> 64) as usize
    }

    #[cfg(target_arch = "wasm32")]
    mod imp {
        use crate::Level;
        use crate::component::bindings::vllm::router_policy::{host, types};

        pub fn log(level: Level, message: &str) {
            let l = match level {
                Level::Debug => types::Level::Debug,
                Level::Info => types::Level::Info,
                Level::Warn => types::Level::Warn,
                Level::Error => types::Level::Error,
            };
            host::log(l, message)
        }
        pub fn now_ms() -> u64 {
            host::now_ms()
        }
        pub fn random() -> u64 {
            host::random()
        }
        pub fn hash64(data: &[u8]) -> u64 {
            host::hash64(data)
        }
    }

    #[cfg(not(target_arch = "wasm32"))]
    mod imp {
        use crate::Level;
        use std::cell::Cell;
        use std::sync::OnceLock;
        use std::time::Instant;

        thread_local! {
            pub(crate) static RNG: Cell<u64> = const { Cell::new(0x9E37_79B9_7F4A_7C15) };
        }
        static START: OnceLock<Instant> = OnceLock::new();

        pub fn log(level: Level, message: &str) {
            eprintln!("[policy {level:?}] {message}");
        }
        pub fn hash64(data: &[u8]) -> u64 {
            xxhash_rust::xxh3::xxh3_64(data)
        }
        pub fn now_ms() -> u64 {
            START.get_or_init(Instant::now).elapsed().as_millis() as u64
        }
        pub fn random() -> u64 {
            // xorshift64*: fast, good enough for load balancing tests.
            RNG.with(|s| {
                let mut x = s.get();
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                s.set(x);
                x.wrapping_mul(0x2545_F491_4F6C_DD1D)
            })
        }
    }

    #[cfg(all(test, not(target_arch = "wasm32")))]
    #[test]
    fn hash64_is_xxh3_64_with_seed_0() {
        // The reference test vectors of xxHash's XXH3_64bits (sanity check of the
        // published hash every language must reproduce).
        assert_eq!(hash64(b""), 0x2D06_8005_38D3_94C2);
        assert_eq!(hash64(b"a"), 0xE6C6_32B6_1E96_4E1F);
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn seed(seed: u64) {
        imp::RNG.with(|s| s.set(seed | 1));
    }
}

/// Export a [`Policy`] implementation as the component's `balancer` interface.
/// Expands to nothing on native targets, so the same crate is unit-testable natively.
#[macro_export]
macro_rules! export_policy {
    ($policy:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            type __VllmRouterPolicyAdapter = $crate::component::Adapter<$policy>;
            $crate::component::bindings::export!(
                __VllmRouterPolicyAdapter with_types_in $crate::component::bindings
            );
        };
    };
}
