//! Worker sets reach policies when the registry publishes them, never on a client's
//! request (Pingora's `update()` shape): the registry's publish hook raises the feedback
//! thread's sync flag, and that thread calls `workers-changed` on every version serving
//! in any slot. A version that a request finds behind the current set is answered by the
//! fallback for that request and nudges the sync again (see `policy::choose`).

use super::{PolicySlots, WorkerInfo};
use crate::workers::{Registry, WorkerSet};
use std::sync::Arc;

/// The policy-facing description of a worker set.
pub fn worker_infos(set: &WorkerSet) -> Arc<Vec<WorkerInfo>> {
    Arc::new(
        set.workers
            .iter()
            .map(|w| WorkerInfo {
                id: w.id,
                url: w.url.clone(),
                role: w.role,
                dp_rank: w.dp_rank,
                labels: w.labels.clone(),
            })
            .collect(),
    )
}

/// Push the registry's current set to every version serving in `slots` (each version
/// skips it when already up to date). Runs on the feedback thread.
pub fn push_workers(registry: &Registry, slots: &PolicySlots) {
    let set = registry.snapshot();
    let infos = worker_infos(&set);
    for slot in slots.every_slot() {
        let v = slot.current();
        if v.synced_generation() == set.generation {
            continue;
        }
        if let Err(f) = v.workers_changed(set.generation, infos.clone()) {
            tracing::warn!(slot = %slot.name, policy = %v.label, "workers-changed failed ({f}); the fallback decides until the next push succeeds");
        }
    }
}
