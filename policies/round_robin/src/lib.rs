//! `round_robin`: each request goes to the next eligible worker after the one chosen last,
//! in worker-id order, wrapping around.
//!
//! Unlike a bare `counter % candidates.len()` (vllm-project/router), the position is a
//! worker id, not an index into the filtered list: when a worker turns unhealthy or comes
//! back the rotation continues where it was instead of skipping or repeating workers.
//! The router serialises calls, so counts are exactly equal under any concurrency.

use vllm_router_sdk::prelude::*;

/// Round-robin over eligible workers by id. Config: none (`{}`).
#[derive(Debug, Default)]
pub struct RoundRobin {
    last: Option<WorkerId>,
}

impl Policy for RoundRobin {
    // Reads only in-flight counts: engine load is never copied in (contract 0.2).
    const USES_ENGINE_LOAD: bool = false;

    fn new(_config: &str) -> Result<Self, String> {
        Ok(RoundRobin::default())
    }

    fn select(&mut self, _req: &dyn Request, candidates: &[Candidate]) -> Decision {
        // Candidates arrive in ascending id order: the next one after `last`, else wrap.
        let next = match self.last {
            Some(last) => candidates
                .iter()
                .find(|c| c.id > last)
                .unwrap_or(&candidates[0]),
            None => &candidates[0],
        };
        self.last = Some(next.id);
        Decision::Worker(next.id)
    }

    fn export_state(&self) -> Vec<u8> {
        self.last
            .map(|l| l.to_le_bytes().to_vec())
            .unwrap_or_default()
    }

    fn import_state(&mut self, state: &[u8]) -> Result<(), String> {
        let b: [u8; 4] = state
            .try_into()
            .map_err(|_| "expected 4 bytes".to_string())?;
        self.last = Some(u32::from_le_bytes(b));
        Ok(())
    }
}

vllm_router_sdk::export_policy!(RoundRobin);

#[cfg(test)]
mod tests {
    use super::*;
    use vllm_router_sdk::testing::{FakeRequest, Harness};

    #[test]
    fn cycles_in_id_order_with_equal_counts() {
        let mut h = Harness::<RoundRobin>::new("{}", 3).unwrap();
        let req = FakeRequest::chat("hello");
        let picks: Vec<_> = (0..9).map(|_| h.pick(&req)).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn skips_unhealthy_without_disturbing_rotation() {
        let mut h = Harness::<RoundRobin>::new("{}", 4).unwrap();
        let req = FakeRequest::completion("x");
        assert_eq!(h.pick(&req), 0);
        h.set_healthy(1, false);
        assert_eq!(h.pick(&req), 2);
        assert_eq!(h.pick(&req), 3);
        assert_eq!(h.pick(&req), 0);
        h.set_healthy(1, true);
        assert_eq!(h.pick(&req), 1);
        assert_eq!(h.pick(&req), 2);
    }

    #[test]
    fn single_candidate_always_chosen() {
        let mut h = Harness::<RoundRobin>::new("{}", 3).unwrap();
        h.set_healthy(0, false);
        h.set_healthy(2, false);
        for _ in 0..5 {
            assert_eq!(h.pick(&FakeRequest::chat("a")), 1);
        }
    }

    #[test]
    fn state_survives_hand_off() {
        let mut a = Harness::<RoundRobin>::new("{}", 3).unwrap();
        let req = FakeRequest::chat("a");
        a.pick(&req);
        a.pick(&req);
        let state = a.policy.export_state();
        let mut b = Harness::<RoundRobin>::new("{}", 3).unwrap();
        b.policy.import_state(&state).unwrap();
        assert_eq!(b.pick(&req), 2);
        assert!(b.policy.import_state(b"bad").is_err());
    }
}
