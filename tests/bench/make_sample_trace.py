#!/usr/bin/env python3
"""Write a sample trace for `vllm-router policy replay` (the format of --record-trace).

Multi-turn chat conversations that share a handful of long system prompts, arriving as
a Poisson process: the traffic shape where prefix-cache-aware routing matters (each
turn extends its conversation's prefix; conversations share a system-prompt prefix).

    python3 tests/bench/make_sample_trace.py --out sample.trace.jsonl
    vllm-router policy replay builtin:cache_aware --trace sample.trace.jsonl \
        --against builtin:round_robin --workers 4

Block keys are computed exactly as the router records them (routing text cut into
64-character blocks, chained 64-bit FNV-1a), so the replay's prefix caches behave as
with recorded traffic. Standard library only.
"""

import argparse
import json
import random

BLOCK = 64
BASIS = 0xCBF29CE484222325
PRIME = 0x100000001B3
MASK = (1 << 64) - 1


def fnv1a(h, data):
    for b in data:
        h ^= b
        h = (h * PRIME) & MASK
    return h


def block_keys(text):
    data = text.encode()
    keys, h = [], BASIS
    for i in range(0, len(data) - len(data) % BLOCK, BLOCK):
        h = fnv1a(h, data[i:i + BLOCK])
        keys.append(f"{h:016x}")
    return keys


def words(rng, n):
    vocab = ["route", "cache", "prefix", "token", "worker", "decode", "prefill", "model",
             "latency", "queue", "policy", "tensor", "batch", "stream", "kv", "block"]
    return " ".join(rng.choice(vocab) for _ in range(n))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="sample.trace.jsonl")
    ap.add_argument("--conversations", type=int, default=300)
    ap.add_argument("--system-prompts", type=int, default=4)
    ap.add_argument("--max-turns", type=int, default=6)
    ap.add_argument("--rate", type=float, default=300.0, help="requests per second")
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    systems = [f"You are assistant {i}. " + words(rng, 300) for i in range(a.system_prompts)]
    # Each conversation: a list of turns; turns are interleaved by arrival time.
    pending = []
    for c in range(a.conversations):
        history = [("system", rng.choice(systems))]
        for turn in range(rng.randint(1, a.max_turns)):
            history.append(("user", words(rng, rng.randint(20, 120))))
            text = "".join(f"{role}\n{content}\n" for role, content in history)
            pending.append((c, turn, text))
            history.append(("assistant", words(rng, rng.randint(30, 150))))
    # Turn k of a conversation comes after turn k-1: order by (conversation start + turn
    # gap), with Poisson arrivals overall.
    rng.shuffle(pending)
    pending.sort(key=lambda p: (p[1], p[0]))
    t = 0.0
    lines = []
    for c, turn, text in pending:
        t += rng.expovariate(a.rate) * 1000.0
        lines.append({
            "t_ms": round(t, 3), "path": "/v1/chat/completions", "model": "sample-model",
            "stage": "regular", "body_bytes": len(text) + 80, "text_bytes": len(text),
            "blocks": block_keys(text),
            "keys": {"x-session-id": f"{fnv1a(BASIS, f'conv-{c}'.encode()):016x}"},
            "slot": "default", "worker": f"http://sample-worker-{c % 4}:8000",
            "fallback": False,
        })
    with open(a.out, "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    print(f"wrote {len(lines)} requests from {a.conversations} conversations to {a.out}")


if __name__ == "__main__":
    main()
