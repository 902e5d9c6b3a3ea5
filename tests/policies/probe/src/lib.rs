//! Test policy that reports what the host does to it, through `host.log` (the e2e tests
//! read the router's log): `probe init` once per instance, `probe workers-changed n=N`
//! per worker-set push, and `probe complete stage=S worker=W status=C` per
//! `on-complete`. Chooses the lowest-id candidate. A request with the header
//! `x-probe: 0.2` also gets `probe v0.2 pointer=… hash=… engine=…`: contract 0.2's
//! `body-pointer("/metadata/tags/1")`, `host.hash64(b"vllm-router")` and whether
//! `engine-load` had a sample for every candidate.

use vllm_router_sdk::prelude::*;

/// Logs every host call it receives.
pub struct Probe;

impl Policy for Probe {
    fn new(_: &str) -> Result<Self, String> {
        host::log(Level::Info, "probe init");
        Ok(Probe)
    }
    fn workers_changed(&mut self, workers: &[Worker]) {
        let labels: usize = workers.iter().map(|w| w.labels.len()).sum();
        host::log(
            Level::Info,
            &format!("probe workers-changed n={} labels={labels}", workers.len()),
        );
    }
    fn select(&mut self, req: &dyn Request, c: &[Candidate]) -> Decision {
        if req.header("x-probe").as_deref() == Some("0.2") {
            host::log(
                Level::Info,
                &format!(
                    "probe v0.2 pointer={:?} hash={} engine={}",
                    req.body_pointer("/metadata/tags/1"),
                    host::hash64(b"vllm-router"),
                    c.iter().all(|c| c.engine.is_some()),
                ),
            );
        }
        Decision::Worker(c[0].id)
    }
    fn on_complete(&mut self, done: &Completion) {
        host::log(
            Level::Info,
            &format!(
                "probe complete stage={:?} worker={} status={}",
                done.stage, done.worker, done.status
            ),
        );
    }
}

vllm_router_sdk::export_policy!(Probe);
