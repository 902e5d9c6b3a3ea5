"""Native tests of {{name}}'s decision (plain python3, no component)."""

import sys

sys.path.insert(0, "vllm-router/sdk-python")
from vllm_router_policy import Candidate, EngineLoad  # noqa: E402
from app import choose  # noqa: E402

assert choose(4, [Candidate(0, 3, None), Candidate(1, 1, None), Candidate(2, 2, None)]) == 1
assert choose(4, [Candidate(0, 3, None), Candidate(1, 1, EngineLoad(0, 9, 0)), Candidate(2, 2, None)]) == 2
assert choose(4, [Candidate(0, 0, EngineLoad(0, 5, 0))]) is None
print("ok: {{name}} native tests")
