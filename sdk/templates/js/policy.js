// {{name}}: a vllm-router policy in JavaScript (the example policy every language
// template starts from). Fewest in-flight requests wins (ties: lowest id); workers
// whose engine queue exceeds max_waiting (config, default 8) are skipped; when every
// worker is over it the policy declines and the router's fallback decides. Logs once
// at init. Build: ./build.sh (writes {{name}}.wasm). Test natively: node test.mjs
import { log } from 'vllm:router-policy/host@0.1.0';

let maxWaiting = 8;

/** The decision itself: a worker id, or null to decline. */
function choose(maxWaiting, candidates) {
  let best = null;
  for (const c of candidates) {
    if (c.engine !== null && c.engine.waiting > maxWaiting) continue;
    if (best === null || c.inFlight < best.inFlight) best = c;
  }
  return best === null ? null : best.id;
}

export const balancer = {
  init(config) {
    const cfg = JSON.parse(config);
    if (cfg.max_waiting !== undefined) maxWaiting = Number(cfg.max_waiting);
    log('info', `{{name}} (js) ready, max_waiting=${maxWaiting}`);
  },
  workersChanged(workers) {},
  select(req, candidates, engine) {
    const id = choose(maxWaiting, decodeCandidates(candidates, engine));
    return id === null ? decline("every worker's queue is over max_waiting") : pick(id);
  },
  onComplete(done) {},
  exportState() { return new Uint8Array(0); },
  importState(state) { throw 'this policy keeps no state'; },
};
