#!/usr/bin/env python3
"""Added routing latency of kv_aware: the same 8 KiB chat prompts, one at a time, through
ours with round_robin, cache_aware and kv_aware over two simulated workers publishing KV events
(no simulated prefill, so the difference is the router's: the worker /tokenize round trip,
cutting the prompt into blocks, the index match and the policy call). Reports p50/p90 of
the client-side latency for each, their difference, and the router's own
`vllm_router_kv_tokenize_duration_seconds` (mean) for kv_aware.

Usage: python3 tests/bench/kv_latency.py [--requests 300] [--prompt-bytes 8192]
"""

import argparse
import http.client
import json
import subprocess
import time
import urllib.request
from pathlib import Path

from compare_routers import free_port, stop
from kv_quality import spawn

ROOT = Path(__file__).resolve().parents[2]


def wait(url):
    for _ in range(300):
        try:
            if urllib.request.urlopen(url + "/health", timeout=1).status == 200:
                return
        except Exception:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not start")


def run(policy, sims, n, size):
    port, mport = free_port(), free_port()
    r = spawn([str(ROOT / "target/release/vllm-router"), "--port", str(port), "--prometheus-port", str(mport),
               "--policy", policy, "--log-level", "warn", "--worker-urls", *sims])
    try:
        wait(f"http://127.0.0.1:{port}")
        time.sleep(1.0)
        conn = http.client.HTTPConnection("127.0.0.1", port)
        lat = []
        for i in range(n + 20):
            words = f"request {i} " + "lorem ipsum dolor sit amet consectetur " * (size // 39)
            body = json.dumps({"model": "sim-model", "max_tokens": 1,
                               "messages": [{"role": "user", "content": words[:size]}]})
            t0 = time.perf_counter()
            conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            if i >= 20:  # warm-up excluded
                lat.append((time.perf_counter() - t0) * 1000)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics").read().decode()
        tok_sum = tok_n = 0.0
        for line in metrics.splitlines():
            if line.startswith('vllm_router_kv_tokenize_duration_seconds_sum{result="ok"}'):
                tok_sum = float(line.split()[-1])
            if line.startswith('vllm_router_kv_tokenize_duration_seconds_count{result="ok"}'):
                tok_n = float(line.split()[-1])
        lat.sort()
        return lat[len(lat) // 2], lat[int(len(lat) * 0.9)], (tok_sum / tok_n * 1000 if tok_n else None), tok_n
    finally:
        stop(r)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--prompt-bytes", type=int, default=8192)
    a = ap.parse_args()
    sims, procs = [], []
    for i in range(2):
        p = spawn([str(ROOT / "target/release/vllm-sim"), "--port", "0", "--worker-id", f"w{i}", "--kv-events",
                   "--record", "false"], stdout=subprocess.PIPE)
        procs.append(p)
        sims.append(f"http://127.0.0.1:{int(p.stdout.readline().split()[1])}")
    try:
        rows = {}
        for policy in ("round_robin", "cache_aware", "kv_aware", "round_robin", "cache_aware", "kv_aware"):
            p50, p90, tok, n = run(policy, sims, a.requests, a.prompt_bytes)
            rows.setdefault(policy, []).append((p50, p90, tok, n))
            print(f"{policy:12} p50 {p50:.3f} ms  p90 {p90:.3f} ms" + (f"  tokenize mean {tok:.3f} ms over {n:.0f}" if tok else ""), flush=True)
        best = {k: min(v) for k, v in rows.items()}
        print(f"added p50 over round_robin (best of 2 each), {a.prompt_bytes}-byte prompts: "
              f"cache_aware {best['cache_aware'][0] - best['round_robin'][0]:.3f} ms, "
              f"kv_aware {best['kv_aware'][0] - best['round_robin'][0]:.3f} ms")
    finally:
        for p in procs:
            stop(p)


if __name__ == "__main__":
    main()
