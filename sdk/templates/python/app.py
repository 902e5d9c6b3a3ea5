"""{{name}}: a vllm-router policy in Python (the example policy every language template
starts from). Fewest in-flight requests wins (ties: lowest id); workers whose engine
queue exceeds max_waiting (config, default 8) are skipped; when every worker is over it
the policy declines and the router's fallback decides. Logs once at init.

Build: ./build.sh (writes {{name}}.wasm). Test natively: python3 test_app.py
"""

import json

from vllm_router_policy import decode_candidates

try:  # inside the component
    from wit_world import exports
    from wit_world.imports import host, types
    from componentize_py_types import Err
except ImportError:  # native tests: see test_app.py
    exports = types = host = Err = None


def choose(max_waiting, candidates):
    """The decision itself, pure Python: a worker id, or None to decline."""
    best = None
    for c in candidates:
        if c.engine is not None and c.engine.waiting > max_waiting:
            continue
        if best is None or c.in_flight < best.in_flight:
            best = c
    return None if best is None else best.id


class Balancer(exports.Balancer if exports else object):
    max_waiting = 8

    def init(self, config: str) -> None:
        try:
            cfg = json.loads(config)
        except ValueError as e:
            raise Err(f"config is not JSON: {e}")
        Balancer.max_waiting = int(cfg.get("max_waiting", 8))
        host.log(types.Level.INFO, f"{{name}} (python) ready, max_waiting={Balancer.max_waiting}")

    def workers_changed(self, workers) -> None:
        pass

    def select(self, req, candidates, engine):
        pick = choose(Balancer.max_waiting, decode_candidates(candidates, engine))
        if pick is None:
            return types.Decision_None_("every worker's queue is over max_waiting")
        return types.Decision_Worker(pick)

    def on_complete(self, done) -> None:
        pass

    def export_state(self) -> bytes:
        return b""

    def import_state(self, state: bytes) -> None:
        raise Err("this policy keeps no state")
