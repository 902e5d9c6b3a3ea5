//! Test policy: always the candidate with the highest id (see `pick_first`).

use vllm_router_sdk::prelude::*;

/// Always the last (highest id) candidate.
pub struct PickLast;

impl Policy for PickLast {
    fn new(_: &str) -> Result<Self, String> {
        Ok(PickLast)
    }
    fn select(&mut self, _: &dyn Request, c: &[Candidate]) -> Decision {
        Decision::Worker(c[c.len() - 1].id)
    }
}

vllm_router_sdk::export_policy!(PickLast);
