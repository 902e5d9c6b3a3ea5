//! Native test harness: run a [`Policy`] in plain `cargo test`, with fake workers and fake
//! requests, no wasm build needed.
//!
//! ```
//! use vllm_router_sdk::prelude::*;
//! use vllm_router_sdk::testing::{FakeRequest, Harness};
//!
//! struct First;
//! impl Policy for First {
//!     fn new(_: &str) -> Result<Self, String> { Ok(First) }
//!     fn select(&mut self, _: &dyn Request, c: &[Candidate]) -> Decision { Decision::Worker(c[0].id) }
//! }
//!
//! let mut h = Harness::<First>::new("{}", 3).unwrap();
//! h.set_healthy(0, false);
//! assert_eq!(h.pick(&FakeRequest::chat("hi")), 1);
//! ```

use crate::routing::{FieldIndex, routing_text};
use crate::{
    Candidate, Completion, Decision, EngineLoad, Policy, Request, Role, Stage, Worker, WorkerId,
};

/// Seed the native `host::random` generator of the current thread (deterministic tests).
pub fn seed_random(seed: u64) {
    crate::host::seed(seed)
}

/// A request built in a test: path, client headers and a JSON body.
#[derive(Clone, Debug)]
pub struct FakeRequest {
    /// URL path.
    pub path: String,
    /// Client headers, names lower-case.
    pub headers: Vec<(String, String)>,
    /// Raw JSON body.
    pub body: Vec<u8>,
    /// Router request id.
    pub request_id: String,
    /// Stage.
    pub stage: Stage,
    /// What [`crate::kv::cached_prefix`] answers: the prompt's full blocks and, per
    /// worker id, the leading blocks it holds and its source state (workers not listed:
    /// 0 blocks, fallback).
    pub prefix: Option<(u32, Vec<(WorkerId, crate::kv::CachedBlocks)>)>,
    index: FieldIndex,
}

impl FakeRequest {
    /// A request to `path` with a raw JSON body.
    pub fn new(path: &str, body: impl Into<Vec<u8>>) -> Self {
        let body = body.into();
        let index = FieldIndex::new(&body);
        FakeRequest {
            path: path.to_string(),
            headers: Vec::new(),
            body,
            request_id: "test-request".to_string(),
            stage: Stage::Regular,
            prefix: None,
            index,
        }
    }

    /// Give the request a KV prefix match: `total_blocks` full blocks, and per worker
    /// `(id, leading blocks held)` from an exact source.
    pub fn with_cached_prefix(mut self, total_blocks: u32, held: &[(WorkerId, u32)]) -> Self {
        let per = held
            .iter()
            .map(|&(id, blocks)| {
                (
                    id,
                    crate::kv::CachedBlocks {
                        blocks,
                        source: crate::kv::SourceState::Exact,
                    },
                )
            })
            .collect();
        self.prefix = Some((total_blocks, per));
        self
    }

    /// A chat completion with one user message.
    pub fn chat(user_text: &str) -> Self {
        Self::chat_messages(&[("user", user_text)])
    }

    /// A chat completion with the given `(role, content)` messages.
    pub fn chat_messages(messages: &[(&str, &str)]) -> Self {
        let msgs: Vec<serde_json::Value> = messages
            .iter()
            .map(|(r, c)| serde_json::json!({"role": r, "content": c}))
            .collect();
        let body = serde_json::json!({"model": "test-model", "messages": msgs});
        Self::new("/v1/chat/completions", serde_json::to_vec(&body).unwrap())
    }

    /// A completion with a text prompt.
    pub fn completion(prompt: &str) -> Self {
        let body = serde_json::json!({"model": "test-model", "prompt": prompt});
        Self::new("/v1/completions", serde_json::to_vec(&body).unwrap())
    }

    /// Add a client header.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers
            .push((name.to_ascii_lowercase(), value.to_string()));
        self
    }

    /// Set the stage.
    pub fn with_stage(mut self, stage: Stage) -> Self {
        self.stage = stage;
        self
    }
}

impl Request for FakeRequest {
    fn path(&self) -> String {
        self.path.clone()
    }
    fn model(&self) -> Option<String> {
        self.index.get(&self.body, "model")
    }
    fn header(&self, name: &str) -> Option<String> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone())
    }
    fn body_field(&self, path: &str) -> Option<String> {
        self.index.get(&self.body, path)
    }
    fn body_pointer(&self, pointer: &str) -> Option<String> {
        self.index.pointer(&self.body, pointer)
    }
    fn routing_text(&self) -> String {
        routing_text(&self.body, &self.index)
    }
    fn body_length(&self) -> u64 {
        self.body.len() as u64
    }
    fn request_id(&self) -> String {
        self.request_id.clone()
    }
    fn stage(&self) -> Stage {
        self.stage
    }
    fn test_prefix_match(&self, candidates: &[WorkerId]) -> crate::kv::PrefixMatch {
        let Some((total_blocks, per)) = &self.prefix else {
            return crate::kv::PrefixMatch {
                total_blocks: 0,
                candidates: vec![Default::default(); candidates.len()],
            };
        };
        crate::kv::PrefixMatch {
            total_blocks: *total_blocks,
            candidates: candidates
                .iter()
                .map(|id| {
                    per.iter()
                        .find(|(w, _)| w == id)
                        .map(|(_, c)| *c)
                        .unwrap_or_default()
                })
                .collect(),
        }
    }
}

/// Runs a policy over a fake fleet the way the router does: workers announced through
/// `workers_changed`, eligible candidates with in-flight counts, answers validated.
pub struct Harness<P: Policy> {
    /// The policy under test.
    pub policy: P,
    /// The fleet, in id order.
    pub workers: Vec<Worker>,
    healthy: Vec<bool>,
    in_flight: Vec<u32>,
    engine: Vec<Option<EngineLoad>>,
}

impl<P: Policy> Harness<P> {
    /// Build the policy with `config` and announce `n` workers `http://10.0.0.{i}:8000`
    /// with ids `0..n`.
    pub fn new(config: &str, n: usize) -> Result<Self, String> {
        let workers = (0..n)
            .map(|i| Worker {
                id: i as WorkerId,
                url: format!("http://10.0.0.{i}:8000"),
                role: Role::Regular,
                dp_rank: None,
                labels: Vec::new(),
            })
            .collect();
        Self::with_workers(config, workers)
    }

    /// Build the policy with `config` and announce the given workers.
    pub fn with_workers(config: &str, workers: Vec<Worker>) -> Result<Self, String> {
        let mut policy = P::new(config)?;
        policy.workers_changed(&workers);
        let n = workers.len();
        Ok(Harness {
            policy,
            workers,
            healthy: vec![true; n],
            in_flight: vec![0; n],
            engine: vec![None; n],
        })
    }

    fn pos(&self, id: WorkerId) -> usize {
        self.workers
            .iter()
            .position(|w| w.id == id)
            .expect("unknown worker id")
    }

    /// Replace the fleet (membership change) and tell the policy.
    pub fn set_workers(&mut self, workers: Vec<Worker>) {
        let n = workers.len();
        self.workers = workers;
        self.healthy = vec![true; n];
        self.in_flight = vec![0; n];
        self.engine = vec![None; n];
        self.policy.workers_changed(&self.workers);
    }

    /// Mark a worker healthy or not (unhealthy workers are not candidates).
    pub fn set_healthy(&mut self, id: WorkerId, healthy: bool) {
        let i = self.pos(id);
        self.healthy[i] = healthy;
    }

    /// Set a worker's router in-flight count.
    pub fn set_in_flight(&mut self, id: WorkerId, n: u32) {
        let i = self.pos(id);
        self.in_flight[i] = n;
    }

    /// Set a worker's engine load.
    pub fn set_engine(&mut self, id: WorkerId, load: Option<EngineLoad>) {
        let i = self.pos(id);
        self.engine[i] = load;
    }

    /// Current in-flight count of a worker.
    pub fn in_flight(&self, id: WorkerId) -> u32 {
        self.in_flight[self.pos(id)]
    }

    /// The candidates the router would pass now (engine load only when the policy
    /// declares [`Policy::USES_ENGINE_LOAD`], as in a component).
    pub fn candidates(&self) -> Vec<Candidate> {
        self.workers
            .iter()
            .enumerate()
            .filter(|(i, _)| self.healthy[*i])
            .map(|(i, w)| Candidate {
                id: w.id,
                in_flight: self.in_flight[i],
                engine: if P::USES_ENGINE_LOAD {
                    self.engine[i]
                } else {
                    None
                },
            })
            .collect()
    }

    /// Ask the policy; the raw decision, unvalidated.
    pub fn decide(&mut self, req: &FakeRequest) -> Decision {
        let c = self.candidates();
        self.policy.select(req, &c)
    }

    /// Ask the policy and return the chosen id. Panics (failing the test) on `None` or on
    /// an id that is not a candidate, as the router would treat both as policy faults.
    pub fn pick(&mut self, req: &FakeRequest) -> WorkerId {
        let c = self.candidates();
        match self.policy.select(req, &c) {
            Decision::Worker(id) if c.iter().any(|x| x.id == id) => id,
            Decision::Worker(id) => panic!("policy chose {id}, not a candidate of {c:?}"),
            Decision::None(why) => panic!("policy chose none: {why}"),
        }
    }

    /// [`Harness::pick`] and count the request in flight on the chosen worker (until
    /// [`Harness::complete`]).
    pub fn dispatch(&mut self, req: &FakeRequest) -> WorkerId {
        let id = self.pick(req);
        let i = self.pos(id);
        self.in_flight[i] += 1;
        id
    }

    /// Finish a dispatched request on `id` with `status` and report it to the policy.
    pub fn complete(&mut self, id: WorkerId, status: u16, latency_ms: u32) {
        let i = self.pos(id);
        self.in_flight[i] = self.in_flight[i].saturating_sub(1);
        self.policy.on_complete(&Completion {
            worker: id,
            status,
            latency_ms,
            first_byte_ms: None,
            stage: Stage::Regular,
        });
    }
}
