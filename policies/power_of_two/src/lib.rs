//! `power_of_two`: the power of two random choices (Mitzenmacher, "The Power of Two
//! Choices in Randomized Load Balancing", 2001). Draw two distinct eligible workers at
//! random and send the request to the less loaded one.
//!
//! Load = the router's in-flight count for the worker (held until the end of the
//! response stream) plus, when the host scrapes it, the engine's waiting queue
//! (`vllm:num_requests_waiting`), see [`Candidate::load`]. vllm-project/router polls
//! SGLang's `/get_load`, which vLLM lacks, so there it degrades to random; here the
//! router's own in-flight count is always present. Ties go to the first draw.
//! Config: none (`{}`).

use vllm_router_sdk::prelude::*;

/// Power of two random choices over eligible workers.
#[derive(Debug, Default)]
pub struct PowerOfTwo;

impl Policy for PowerOfTwo {
    fn new(_config: &str) -> Result<Self, String> {
        Ok(PowerOfTwo)
    }

    fn select(&mut self, _req: &dyn Request, candidates: &[Candidate]) -> Decision {
        let n = candidates.len();
        if n == 1 {
            return Decision::Worker(candidates[0].id);
        }
        let a = host::random_below(n);
        // A second index distinct from the first, uniform over the rest.
        let mut b = host::random_below(n - 1);
        if b >= a {
            b += 1;
        }
        let (ca, cb) = (&candidates[a], &candidates[b]);
        Decision::Worker(if cb.load() < ca.load() { cb.id } else { ca.id })
    }
}

vllm_router_sdk::export_policy!(PowerOfTwo);

#[cfg(test)]
mod tests {
    use super::*;
    use vllm_router_sdk::testing::{FakeRequest, Harness, seed_random};

    #[test]
    fn never_picks_the_most_loaded_of_two_and_avoids_hot_workers() {
        seed_random(3);
        let mut h = Harness::<PowerOfTwo>::new("{}", 2).unwrap();
        h.set_in_flight(0, 9);
        for _ in 0..200 {
            assert_eq!(h.pick(&FakeRequest::chat("x")), 1);
        }
    }

    #[test]
    fn keeps_in_flight_balanced_under_dispatch() {
        seed_random(11);
        let mut h = Harness::<PowerOfTwo>::new("{}", 8).unwrap();
        let req = FakeRequest::chat("x");
        for _ in 0..800 {
            h.dispatch(&req);
        }
        let loads: Vec<u32> = (0..8).map(|i| h.in_flight(i)).collect();
        let (min, max) = (*loads.iter().min().unwrap(), *loads.iter().max().unwrap());
        // Random alone would spread 100 ± ~30; two choices keep it within a few.
        assert!(max - min <= 6, "{loads:?}");
    }

    #[test]
    fn engine_queue_counts_as_load() {
        seed_random(5);
        let mut h = Harness::<PowerOfTwo>::new("{}", 2).unwrap();
        h.set_engine(
            1,
            Some(EngineLoad {
                running: 4,
                waiting: 20,
                kv_cache_permille: 900,
            }),
        );
        h.set_in_flight(0, 3);
        for _ in 0..100 {
            assert_eq!(h.pick(&FakeRequest::chat("x")), 0);
        }
    }

    #[test]
    fn single_candidate() {
        let mut h = Harness::<PowerOfTwo>::new("{}", 3).unwrap();
        h.set_healthy(0, false);
        h.set_healthy(2, false);
        assert_eq!(h.pick(&FakeRequest::chat("x")), 1);
    }
}
