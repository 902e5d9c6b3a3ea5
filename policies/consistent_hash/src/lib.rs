//! `consistent_hash`: session affinity by a hash ring with virtual nodes.
//!
//! - Ring: 160 virtual nodes per worker (vllm-project/router's count), keyed
//!   `"{url}:{i}"` (or `"{url}@{rank}:{i}"`), so every router replica builds the same ring.
//!   Point hash: the contract's published XXH3-64 (`host.hash64`, seed 0) of the
//!   UTF-8 key, points sorted ascending; a request's key hash goes to the first point at
//!   or after it (wrapping). Any language with an xxHash library (or the host call)
//!   reproduces this ring exactly.
//! - Key, first present: client headers `x-session-id`, `x-user-id`, `x-tenant-id`,
//!   `x-request-id`, `x-correlation-id`, `x-trace-id` (the host shows only headers the
//!   client sent, so a router-generated id never becomes the key); then body fields
//!   `session_params.session_id`, `user`, `session_id`, `user_id` (parsed as JSON); else
//!   the routing text.
//! - Owner unhealthy: walk the ring clockwise to the **next** eligible member, so a dead
//!   worker's keys spread over the others (vllm-project/router sends them all to the first
//!   healthy worker).
//! - Optional bounded load (Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing with
//!   Bounded Loads", SODA 2018): with `{"bounded_load": true, "load_factor": c}` a member
//!   whose in-flight count is at or above `ceil(c × (total in-flight + 1) / candidates)`
//!   is passed over for the next one on the ring.
//!
//! Config (JSON, all optional): `virtual_nodes` (160), `bounded_load` (false),
//! `load_factor` (1.25, ≥ 1).

use serde::Deserialize;
use std::collections::HashMap;
use vllm_router_sdk::prelude::*;

/// Body fields checked after the headers, in priority order.
pub use vllm_router_sdk::routing::SESSION_KEY_FIELDS as KEY_FIELDS;
/// Header names checked for a key, in priority order (shared with the router's sticky
/// A/B assignment).
pub use vllm_router_sdk::routing::SESSION_KEY_HEADERS as KEY_HEADERS;

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    virtual_nodes: u32,
    bounded_load: bool,
    load_factor: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            virtual_nodes: 160,
            bounded_load: false,
            load_factor: 1.25,
        }
    }
}

/// The ring's point hash: the contract's published XXH3-64 (`host.hash64`, seed 0), so a
/// policy in any language builds this exact ring (see docs/policies.md).
pub use vllm_router_sdk::host::hash64;

/// The policy: a sorted ring of `(point, worker id)`.
pub struct ConsistentHash {
    cfg: Config,
    ring: Vec<(u64, WorkerId)>,
}

impl ConsistentHash {
    /// The hash key of a request (see module docs), with its source for debugging.
    pub fn key(req: &dyn Request) -> String {
        for h in KEY_HEADERS {
            if let Some(v) = req.header(h).filter(|v| !v.is_empty()) {
                return format!("header:{h}:{v}");
            }
        }
        for f in KEY_FIELDS {
            if let Some(v) = req.body_field(f).filter(|v| !v.is_empty()) {
                return format!("field:{f}:{v}");
            }
        }
        format!("text:{}", req.routing_text())
    }

    /// Owner of `key` among `candidates`: first ring point at or after the key's hash,
    /// walking clockwise past members that are not candidates (or, with bounded load,
    /// are at capacity).
    pub fn owner(&self, key: &str, candidates: &[Candidate]) -> Option<WorkerId> {
        if self.ring.is_empty() {
            return None;
        }
        let load: HashMap<WorkerId, u32> = candidates.iter().map(|c| (c.id, c.in_flight)).collect();
        let cap = if self.cfg.bounded_load {
            let total: u64 = candidates.iter().map(|c| c.in_flight as u64).sum();
            Some(
                ((self.cfg.load_factor * (total + 1) as f64) / candidates.len() as f64).ceil()
                    as u32,
            )
        } else {
            None
        };
        let h = hash64(key.as_bytes());
        let start = self.ring.partition_point(|(p, _)| *p < h);
        let n = self.ring.len();
        let mut first_eligible = None;
        for i in 0..n {
            let (_, id) = self.ring[(start + i) % n];
            let Some(&inflight) = load.get(&id) else {
                continue;
            };
            first_eligible.get_or_insert(id);
            if cap.is_none_or(|c| inflight < c) {
                return Some(id);
            }
        }
        first_eligible
    }
}

impl Policy for ConsistentHash {
    // Reads only in-flight counts: engine load is never copied in (contract 0.2).
    const USES_ENGINE_LOAD: bool = false;

    fn new(config: &str) -> Result<Self, String> {
        let cfg: Config =
            serde_json::from_str(config).map_err(|e| format!("consistent_hash config: {e}"))?;
        if cfg.virtual_nodes == 0 || cfg.virtual_nodes > 10_000 {
            return Err("consistent_hash config: virtual_nodes must be within 1..=10000".into());
        }
        if cfg.load_factor < 1.0 {
            return Err("consistent_hash config: load_factor must be >= 1.0".into());
        }
        Ok(ConsistentHash {
            cfg,
            ring: Vec::new(),
        })
    }

    fn workers_changed(&mut self, workers: &[Worker]) {
        let mut ring = Vec::with_capacity(workers.len() * self.cfg.virtual_nodes as usize);
        for w in workers {
            let k = w.key();
            for i in 0..self.cfg.virtual_nodes {
                ring.push((hash64(format!("{k}:{i}").as_bytes()), w.id));
            }
        }
        ring.sort_unstable();
        self.ring = ring;
    }

    fn select(&mut self, req: &dyn Request, candidates: &[Candidate]) -> Decision {
        let key = Self::key(req);
        match self.owner(&key, candidates) {
            Some(id) => Decision::Worker(id),
            None => Decision::None("ring has no eligible member".into()),
        }
    }
}

vllm_router_sdk::export_policy!(ConsistentHash);

#[cfg(test)]
mod tests {
    use super::*;
    use vllm_router_sdk::testing::{FakeRequest, Harness};

    fn workers(n: usize) -> Vec<Worker> {
        (0..n)
            .map(|i| Worker {
                id: i as u32,
                url: format!("http://10.1.0.{i}:8000"),
                role: Role::Regular,
                dp_rank: None,
                labels: vec![],
            })
            .collect()
    }

    fn session(i: usize) -> FakeRequest {
        FakeRequest::chat("same text for all").with_header("x-session-id", &format!("s-{i}"))
    }

    #[test]
    fn same_key_same_worker_and_keys_spread() {
        let mut h = Harness::<ConsistentHash>::with_workers("{}", workers(4)).unwrap();
        let mut counts = [0u32; 4];
        for i in 0..4000 {
            let a = h.pick(&session(i));
            assert_eq!(a, h.pick(&session(i)));
            counts[a as usize] += 1;
        }
        // 160 virtual nodes: each worker within ±25 % of its fair share of 1000.
        assert!(
            counts.iter().all(|&c| (750..=1250).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn key_priority_headers_then_parsed_fields_then_text() {
        let req = FakeRequest::new(
            "/v1/chat/completions",
            r#"{"prompt":"user: mallory","user":"bob","session_params":{"session_id":"s9"}}"#,
        );
        assert_eq!(
            ConsistentHash::key(&req),
            "field:session_params.session_id:s9"
        );
        let req = req.with_header("x-user-id", "u1");
        assert_eq!(ConsistentHash::key(&req), "header:x-user-id:u1");
        let plain = FakeRequest::new("/v1/completions", r#"{"prompt":"user: mallory"}"#);
        assert_eq!(ConsistentHash::key(&plain), "text:user: mallory");
    }

    #[test]
    fn unhealthy_owner_falls_to_the_next_member_not_one_worker() {
        let mut h = Harness::<ConsistentHash>::with_workers("{}", workers(5)).unwrap();
        let owners: Vec<u32> = (0..2000).map(|i| h.pick(&session(i))).collect();
        h.set_healthy(2, false);
        let mut moved_to = [0u32; 5];
        for (i, &o) in owners.iter().enumerate() {
            let now = h.pick(&session(i));
            if o == 2 {
                assert_ne!(now, 2);
                moved_to[now as usize] += 1;
            } else {
                assert_eq!(now, o, "keys of healthy workers must not move");
            }
        }
        // The orphans spread over the other four (next ring member), none takes them all.
        let orphans: u32 = moved_to.iter().sum();
        assert!(orphans > 200);
        assert!(
            moved_to.iter().all(|&m| m < orphans * 6 / 10),
            "{moved_to:?}"
        );
        assert!(
            moved_to.iter().filter(|&&m| m > 0).count() >= 3,
            "{moved_to:?}"
        );
    }

    #[test]
    fn membership_change_moves_about_one_nth_of_keys() {
        let mut h = Harness::<ConsistentHash>::with_workers("{}", workers(8)).unwrap();
        let before: Vec<u32> = (0..5000).map(|i| h.pick(&session(i))).collect();
        h.set_workers(workers(9));
        let after: Vec<u32> = (0..5000).map(|i| h.pick(&session(i))).collect();
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        // Ideal 1/9 = 556 keys, all of them onto the new worker.
        assert!((350..=800).contains(&moved), "moved {moved}");
        assert!(
            before
                .iter()
                .zip(&after)
                .filter(|(a, b)| a != b)
                .all(|(_, b)| *b == 8)
        );
    }

    #[test]
    fn bounded_load_passes_over_a_saturated_owner() {
        let mut h = Harness::<ConsistentHash>::with_workers(
            r#"{"bounded_load":true,"load_factor":1.25}"#,
            workers(4),
        )
        .unwrap();
        let req = session(42);
        let owner = h.pick(&req);
        h.set_in_flight(owner, 50);
        let other = h.pick(&req);
        assert_ne!(other, owner);
        // Without bounded load the owner keeps the key whatever its load.
        let mut plain = Harness::<ConsistentHash>::with_workers("{}", workers(4)).unwrap();
        plain.set_in_flight(owner, 50);
        assert_eq!(plain.pick(&req), owner);
    }

    #[test]
    fn bad_config_is_refused() {
        assert!(Harness::<ConsistentHash>::new(r#"{"virtual_nodes":0}"#, 2).is_err());
        assert!(Harness::<ConsistentHash>::new(r#"{"load_factor":0.5}"#, 2).is_err());
        assert!(Harness::<ConsistentHash>::new(r#"{"nope":1}"#, 2).is_err());
    }
}
