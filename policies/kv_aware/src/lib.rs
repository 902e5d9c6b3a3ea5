//! `kv_aware`: exact prefix-cache routing from vLLM's KV-cache events, bounded by load.
//!
//! Per request the router tells the policy, per candidate, how many of the prompt's
//! leading KV blocks the worker holds (`vllm:router-kv/prefix-cache`, from the engines'
//! `BlockStored` / `BlockRemoved` events; see docs/kv-events.md). Then:
//!
//! 1. **No exact source** among the candidates (no events configured or discovered,
//!    publishers unreachable), or a prompt shorter than one block or not tokenizable:
//!    behave exactly as `cache_aware` (its approximate prefix tree over the text).
//! 2. Otherwise, **bounded load** (Mirrokni, Thorup, Zadimoghaddam, "Consistent hashing
//!    with bounded loads", SODA 2018): with `L` the candidates' total load (router
//!    in-flight + engine queue) and `n` candidates, only workers whose load + 1 is at
//!    most `ceil(load_factor × (L + 1) / n)` may take the request, so a hot prefix
//!    cannot pile everything onto its holder; among them the lowest
//!    `cost = uncached blocks + load_weight × load` wins (the cost model of NVIDIA
//!    Dynamo's KV router and vllm-project/router's `kv_aware`: prefill work the worker
//!    would redo, plus the queue it would wait behind); exact ties go at random.
//!    A worker beyond its **fair share** of recent decisions (cache_aware's rule:
//!    more than `ceil((affinity_load_factor − 1) × mean)` above the least-used
//!    candidate) gets no credit for its cached blocks unless the request continues a
//!    conversation — the tree saw it sent there, or the index shows one worker holding
//!    at least half the prompt with nobody else within a block of it (with several
//!    router replicas, a replica's tree misses most turns): a popular template
//!    spreads to a few holders instead of one, while chats keep their worker.
//!    When no allowed candidate holds any block of the prompt, the events say nothing
//!    and step 1 decides (its placement of new prefixes balances better than a tie).
//! 3. The choice is also recorded in the `cache_aware` tree, so a fall back to step 1
//!    starts warm.
//!
//! Config (JSON, all optional): `load_factor` (1.25, ≥ 1), `load_weight` (1.0 block per
//! request of load, ≥ 0), plus every `cache_aware` key for the fallback (the router
//! fills those from its flags).

use policy_cache_aware_core::CacheAware;
use vllm_router_sdk::kv::{self, SourceState};
use vllm_router_sdk::prelude::*;

/// The policy: the KV-event decision, with `cache_aware` as its fallback.
pub struct KvAware {
    fallback: CacheAware,
    load_factor: f64,
    load_weight: f64,
}

impl KvAware {
    /// The KV-event decision; `None` when the events say nothing (use the fallback).
    fn decide(&mut self, req: &dyn Request, text: &str, candidates: &[Candidate]) -> Option<usize> {
        let m = kv::cached_prefix(req, candidates);
        if m.total_blocks == 0 || !m.candidates.iter().any(|c| c.source == SourceState::Exact) {
            return None;
        }
        // Balance over time as cache_aware keeps it: a worker beyond its fair share of
        // recent decisions takes a request on affinity only when the request continues
        // a conversation it holds.
        let mut fair = self.fallback.affinity_allowed(text, candidates);
        // A conversation's next turn, seen from the index: one worker holds most of the
        // prompt (at least half of it) and nobody else comes within a block of it. That
        // replica's tree may never have seen the earlier turns (several router replicas),
        // but moving the conversation would still cost its whole prefill.
        let mut by_hits: Vec<(u32, usize)> = m
            .candidates
            .iter()
            .enumerate()
            .map(|(i, c)| (c.blocks.min(m.total_blocks), i))
            .collect();
        by_hits.sort_unstable_by(|a, b| b.cmp(a));
        if let [(top, i), rest @ ..] = by_hits.as_slice() {
            let second = rest.first().map(|r| r.0).unwrap_or(0);
            if *top * 2 >= m.total_blocks && *top > second + 1 {
                fair[*i] = true;
            }
        }
        let n = candidates.len() as f64;
        let total: u64 = candidates.iter().map(Candidate::load).sum();
        let cap = (self.load_factor * (total + 1) as f64 / n).ceil().max(1.0) as u64;
        let mut best: Option<(f64, usize)> = None;
        let mut ties = 0usize;
        for pass in 0..2 {
            for (i, c) in candidates.iter().enumerate() {
                // First pass: within the bound; if nobody is (rounding), everyone.
                if pass == 0 && c.load() + 1 > cap {
                    continue;
                }
                // Cached blocks count only where affinity is allowed.
                let cached = if fair[i] {
                    m.candidates[i].blocks.min(m.total_blocks)
                } else {
                    0
                };
                let cost = (m.total_blocks - cached) as f64 + self.load_weight * c.load() as f64;
                match best {
                    Some((b, _)) if cost > b => {}
                    Some((b, _)) if cost == b => {
                        ties += 1;
                        if host::random_below(ties + 1) == 0 {
                            best = Some((cost, i));
                        }
                    }
                    _ => {
                        best = Some((cost, i));
                        ties = 0;
                    }
                }
            }
            if best.is_some() {
                break;
            }
        }
        let (_, i) = best?;
        // No allowed candidate holds any of the prompt: the events add nothing, and
        // cache_aware's placement (least loaded, then the smallest recent share, then
        // the least cached text) spreads new prefixes better than a random tie.
        let credited = fair[i] && m.candidates[i].blocks > 0;
        credited.then_some(i)
    }
}

impl Policy for KvAware {
    fn new(config: &str) -> Result<Self, String> {
        let mut v: serde_json::Value = serde_json::from_str(if config.trim().is_empty() {
            "{}"
        } else {
            config
        })
        .map_err(|e| format!("kv_aware: config is not JSON: {e}"))?;
        let obj = v
            .as_object_mut()
            .ok_or("kv_aware: config must be a JSON object")?;
        let num = |obj: &mut serde_json::Map<String, serde_json::Value>, k: &str, d: f64| match obj
            .remove(k)
        {
            None => Ok(d),
            Some(x) => x
                .as_f64()
                .ok_or_else(|| format!("kv_aware: {k} must be a number")),
        };
        let load_factor = num(obj, "load_factor", 1.25)?;
        let load_weight = num(obj, "load_weight", 1.0)?;
        if !(load_factor >= 1.0 && load_factor.is_finite()) {
            return Err("kv_aware: load_factor must be ≥ 1".into());
        }
        if !(load_weight >= 0.0 && load_weight.is_finite()) {
            return Err("kv_aware: load_weight must be ≥ 0".into());
        }
        Ok(KvAware {
            fallback: CacheAware::new(&v.to_string())?,
            load_factor,
            load_weight,
        })
    }

    fn workers_changed(&mut self, workers: &[Worker]) {
        self.fallback.workers_changed(workers);
    }

    fn select(&mut self, req: &dyn Request, candidates: &[Candidate]) -> Decision {
        let text = req.routing_text();
        match self.decide(req, &text, candidates) {
            Some(i) => {
                let id = candidates[i].id;
                self.fallback.observe(&text, id);
                Decision::Worker(id)
            }
            None => self.fallback.select(req, candidates),
        }
    }

    fn export_state(&self) -> Vec<u8> {
        self.fallback.export_state()
    }

    fn import_state(&mut self, state: &[u8]) -> Result<(), String> {
        self.fallback.import_state(state)
    }
}

vllm_router_sdk::export_policy!(KvAware);

#[cfg(test)]
mod tests {
    use super::*;
    use vllm_router_sdk::testing::{FakeRequest, Harness};

    fn long_chat(text: &str) -> FakeRequest {
        FakeRequest::chat(&text.repeat(40))
    }

    #[test]
    fn the_worker_holding_the_longest_prefix_wins_within_the_bound() {
        let mut h = Harness::<KvAware>::new("{}", 4).unwrap();
        let req = long_chat("a").with_cached_prefix(10, &[(1, 3), (2, 9), (3, 0)]);
        assert_eq!(h.pick(&req), 2);
        // Worker 2 busy beyond the bound: the next best holder takes it.
        h.set_in_flight(2, 4);
        assert_eq!(h.pick(&req), 1);
    }

    #[test]
    fn without_exact_sources_it_behaves_as_cache_aware() {
        let mut h = Harness::<KvAware>::new("{}", 3).unwrap();
        let mut c = Harness::<CacheAware>::new("{}", 3).unwrap();
        vllm_router_sdk::testing::seed_random(7);
        let a: Vec<u32> = (0..30)
            .map(|i| h.pick(&long_chat(&format!("conversation {} ", i % 5))))
            .collect();
        vllm_router_sdk::testing::seed_random(7);
        let b: Vec<u32> = (0..30)
            .map(|i| c.pick(&long_chat(&format!("conversation {} ", i % 5))))
            .collect();
        assert_eq!(a, b);
    }

    #[test]
    fn no_cached_blocks_anywhere_goes_to_the_least_loaded() {
        let mut h = Harness::<KvAware>::new("{}", 3).unwrap();
        h.set_in_flight(0, 2);
        h.set_in_flight(2, 1);
        let req = long_chat("b").with_cached_prefix(8, &[(0, 0), (1, 0), (2, 0)]);
        assert_eq!(h.pick(&req), 1);
    }

    #[test]
    fn a_conversation_held_by_one_worker_stays_there_a_shared_prefix_spreads() {
        // Different texts each time, so the fallback's tree sees no continuation: only
        // the index can tell.
        let mut h = Harness::<KvAware>::new("{}", 2).unwrap();
        for i in 0..12 {
            let req = long_chat(&format!("turn {i} ")).with_cached_prefix(10, &[(0, 8), (1, 0)]);
            assert_eq!(
                h.pick(&req),
                0,
                "request {i} left the worker holding its prefix"
            );
        }
        // Both hold the same prefix (a template): the fair share spreads them.
        let mut h = Harness::<KvAware>::new("{}", 2).unwrap();
        let mut on = [0u32; 2];
        for i in 0..12 {
            let req =
                long_chat(&format!("question {i} ")).with_cached_prefix(10, &[(0, 8), (1, 8)]);
            on[h.pick(&req) as usize] += 1;
        }
        assert!(on[0] >= 4 && on[1] >= 4, "a shared prefix piled up: {on:?}");
    }

    #[test]
    fn config_is_checked() {
        assert!(KvAware::new(r#"{"load_factor":0.5}"#).is_err());
        assert!(KvAware::new(r#"{"load_weight":"x"}"#).is_err());
        assert!(KvAware::new(r#"{"cache_threshold":0.5,"load_weight":2}"#).is_ok());
        assert!(
            KvAware::new(r#"{"nope":1}"#).is_err(),
            "cache_aware keys are still checked"
        );
    }
}
