//! {{name}}: a vllm-router policy in Rust (the example policy every language template
//! starts from). Fewest in-flight requests wins (ties: lowest id); workers whose engine
//! queue exceeds `max_waiting` (config, default 8) are skipped; when every worker is
//! over it the policy declines and the router's fallback decides. Logs once at init.
//! Build: ./build.sh (writes {{name}}.wasm). Test natively: cargo test

use vllm_router_sdk::prelude::*;

/// The policy's state: its config.
pub struct {{Type}} {
    max_waiting: u32,
}

impl Policy for {{Type}} {
    fn new(config: &str) -> Result<Self, String> {
        let max_waiting = vllm_router_sdk::config::int(config, "max_waiting")
            .map_err(|e| format!("config: {e}"))?
            .unwrap_or(8);
        let max_waiting = u32::try_from(max_waiting).map_err(|_| "max_waiting must be >= 0")?;
        host::log(Level::Info, &format!("{{name}} (rust) ready, max_waiting={max_waiting}"));
        Ok({{Type}} { max_waiting })
    }

    fn select(&mut self, _req: &dyn Request, candidates: &[Candidate]) -> Decision {
        candidates
            .iter()
            .filter(|c| c.engine.is_none_or(|e| e.waiting <= self.max_waiting))
            .min_by_key(|c| (c.in_flight, c.id))
            .map(|c| Decision::Worker(c.id))
            .unwrap_or_else(|| Decision::None("every worker's queue is over max_waiting".into()))
    }
}

vllm_router_sdk::export_policy!({{Type}});

#[cfg(test)]
mod tests {
    use super::*;
    use vllm_router_sdk::testing::{FakeRequest, Harness};

    #[test]
    fn picks_fewest_in_flight_and_skips_long_queues() {
        let mut h = Harness::<{{Type}}>::new(r#"{"max_waiting": 4}"#, 3).unwrap();
        h.set_in_flight(0, 3);
        h.set_in_flight(1, 1);
        h.set_in_flight(2, 2);
        assert_eq!(h.pick(&FakeRequest::chat("x")), 1);
        h.set_engine(1, Some(EngineLoad { running: 0, waiting: 9, kv_cache_permille: 0 }));
        assert_eq!(h.pick(&FakeRequest::chat("x")), 2);
    }
}
