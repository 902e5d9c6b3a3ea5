"""Helpers for vllm-router policies in Python (componentize-py).

Shipped into a policy project by `vllm-router policy new NAME --lang python` and put on
the componentize path by its build.sh. Pure Python: it also runs under plain `python3`
for native tests.
"""

from dataclasses import dataclass
from typing import List, Optional


@dataclass
class EngineLoad:
    """What the router scraped from the worker's vLLM /metrics."""

    running: int  # vllm:num_requests_running
    waiting: int  # vllm:num_requests_waiting
    kv_cache_permille: int  # vllm:kv_cache_usage_perc, 0..1000


@dataclass
class Candidate:
    """A worker the request may go to (healthy, circuit breaker admitting)."""

    id: int
    in_flight: int  # requests this router dispatched to it and not finished
    engine: Optional[EngineLoad]  # None when there is no fresh sample

    def load(self) -> int:
        """Router in-flight plus, when known, the engine's waiting queue (requests)."""
        return self.in_flight + (self.engine.waiting if self.engine else 0)


def decode_candidates(words: List[int], engine: List[int]) -> List[Candidate]:
    """The packed words of `select` (see wit/policy.wit) as Candidates."""
    out = []
    for i, w in enumerate(words):
        e = engine[i] if i < len(engine) else 0
        load = None
        if e >> 63:
            load = EngineLoad(e & 0xFFFFFF, (e >> 24) & 0xFFFFFF, (e >> 48) & 0x7FF)
        out.append(Candidate(w & 0xFFFFFFFF, w >> 32, load))
    return out


def pack_candidate(c: Candidate) -> int:
    """The inverse of decode_candidates for one candidate word (for native tests)."""
    return c.id | (c.in_flight << 32)


def pack_engine(e: Optional[EngineLoad]) -> int:
    """The engine word for one candidate (for native tests); 0 when None."""
    if e is None:
        return 0
    return (1 << 63) | (min(e.kv_cache_permille, 1000) << 48) | (e.waiting << 24) | e.running
