//! `random`: each request goes to an eligible worker drawn uniformly at random
//! (the host's generator, `host::random`, Lemire's unbiased-enough multiply-shift).

use vllm_router_sdk::prelude::*;

/// Uniform random choice over eligible workers. Config: none (`{}`).
#[derive(Debug, Default)]
pub struct Random;

impl Policy for Random {
    // Reads only in-flight counts: engine load is never copied in (contract 0.2).
    const USES_ENGINE_LOAD: bool = false;

    fn new(_config: &str) -> Result<Self, String> {
        Ok(Random)
    }

    fn select(&mut self, _req: &dyn Request, candidates: &[Candidate]) -> Decision {
        Decision::Worker(candidates[host::random_below(candidates.len())].id)
    }
}

vllm_router_sdk::export_policy!(Random);

#[cfg(test)]
mod tests {
    use super::*;
    use vllm_router_sdk::testing::{FakeRequest, Harness, seed_random};

    #[test]
    fn roughly_uniform_over_candidates() {
        seed_random(42);
        let mut h = Harness::<Random>::new("{}", 4).unwrap();
        let req = FakeRequest::chat("x");
        let mut counts = [0u32; 4];
        let n = 40_000;
        for _ in 0..n {
            counts[h.pick(&req) as usize] += 1;
        }
        // Expected 10,000 each; 5 sigma of a binomial(40000, 0.25) is ~433.
        for c in counts {
            assert!((9_500..=10_500).contains(&c), "counts {counts:?}");
        }
    }

    #[test]
    fn never_picks_an_unhealthy_worker() {
        seed_random(7);
        let mut h = Harness::<Random>::new("{}", 5).unwrap();
        h.set_healthy(2, false);
        h.set_healthy(4, false);
        let req = FakeRequest::completion("x");
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..1_000 {
            let id = h.pick(&req);
            assert!(id != 2 && id != 4);
            seen.insert(id);
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![0, 1, 3]);
    }
}
