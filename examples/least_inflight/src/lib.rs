//! Example custom policy: **least in-flight**. Each request goes to the eligible worker
//! with the fewest requests this router has in flight on it (ties: the lowest id after
//! the last pick, so equal loads still rotate).
//!
//! Build and load it:
//! ```text
//! cargo build -p least-inflight-policy --target wasm32-wasip2 --profile policy
//! vllm-router --worker-urls http://127.0.0.1:8001 http://127.0.0.1:8002 \
//!     --policy-wasm target/wasm32-wasip2/policy/least_inflight_policy.wasm
//! ```

use vllm_router_sdk::prelude::*;

/// Least in-flight, rotating among ties. Config: `{"tag": "..."}` (optional; echoed in
/// the log when the policy starts, to show how config reaches a policy).
#[derive(Debug, Default)]
pub struct LeastInFlight {
    last: WorkerId,
}

impl Policy for LeastInFlight {
    fn new(config: &str) -> Result<Self, String> {
        let cfg: serde_json::Value =
            serde_json::from_str(config).map_err(|e| format!("config is not JSON: {e}"))?;
        if let Some(tag) = cfg.get("tag").and_then(|t| t.as_str()) {
            host::log(Level::Info, &format!("least_inflight starting, tag={tag}"));
        }
        Ok(LeastInFlight::default())
    }

    fn select(&mut self, _req: &dyn Request, candidates: &[Candidate]) -> Decision {
        let min = candidates.iter().map(Candidate::load).min().unwrap_or(0);
        let tied = candidates.iter().filter(|c| c.load() == min);
        let pick = tied
            .clone()
            .find(|c| c.id > self.last)
            .or_else(|| tied.clone().next());
        match pick {
            Some(c) => {
                self.last = c.id;
                Decision::Worker(c.id)
            }
            None => Decision::None("no candidates".into()),
        }
    }
}

vllm_router_sdk::export_policy!(LeastInFlight);

#[cfg(test)]
mod tests {
    use super::*;
    use vllm_router_sdk::testing::{FakeRequest, Harness};

    #[test]
    fn picks_the_least_loaded() {
        let mut h = Harness::<LeastInFlight>::new("{}", 3).unwrap();
        h.set_in_flight(0, 5);
        h.set_in_flight(1, 2);
        h.set_in_flight(2, 7);
        assert_eq!(h.pick(&FakeRequest::chat("x")), 1);
    }

    #[test]
    fn spreads_dispatches_evenly() {
        let mut h = Harness::<LeastInFlight>::new("{}", 3).unwrap();
        let req = FakeRequest::chat("x");
        for _ in 0..9 {
            h.dispatch(&req);
        }
        assert_eq!((h.in_flight(0), h.in_flight(1), h.in_flight(2)), (3, 3, 3));
    }

    #[test]
    fn bad_config_is_refused() {
        assert!(Harness::<LeastInFlight>::new("not json", 2).is_err());
    }
}
