//! Test policy: always the candidate with the lowest id. Paired with `pick_last`, it
//! makes a hot swap visible to the workers.

use vllm_router_sdk::prelude::*;

/// Always the first (lowest id) candidate.
pub struct PickFirst;

impl Policy for PickFirst {
    fn new(_: &str) -> Result<Self, String> {
        Ok(PickFirst)
    }
    fn select(&mut self, _: &dyn Request, c: &[Candidate]) -> Decision {
        Decision::Worker(c[0].id)
    }
}

vllm_router_sdk::export_policy!(PickFirst);
