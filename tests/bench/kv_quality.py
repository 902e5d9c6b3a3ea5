#!/usr/bin/env python3
"""Routing quality with KV events, side by side in one run.

Four simulated vLLM workers (`vllm-sim --kv-events`: a token-based prefix cache with
LRU eviction under pressure, real vLLM-format KV events with a replay socket,
`/tokenize`, `/kv_event_sources`, simulated prefill time per uncached token) serve one
shared-prefix workload through each router configuration:

  ours kv_aware, ours cache_aware, ours round_robin,
  vllm-project/router 0.1.x cache_aware and kv_aware (PyPI `vllm-router`, fed by the same
  simulators through --kv-event-source),

each with 1, 2 and 4 router replicas behind a client that spreads requests over them
round robin (so a conversation's turns reach different replicas: per-replica approximate
trees fragment; an index fed by the engines does not). Workers are restarted for every
configuration (cold caches).

Workload (deterministic, seed 7): multi-turn chats on three shared system prompts (each
turn waits for the previous answer), few-shot templates with many different questions,
and unrelated one-off prompts; 8 requests in flight, streamed.

Per configuration: hit rate (cached prompt tokens / prompt tokens, from the workers'
own `x-sim-cached-tokens`), max/min requests per worker, TTFT p50/p90 (first SSE
chunk; the simulator's prefill costs `--prefill-us-per-token` per uncached token).
Writes target/bench/kv-quality.{json,md,png} and prints the table.

Usage: python3 tests/bench/kv_quality.py [--requests 600] [--no-peer]
"""

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

# Shared with the overhead bench (same directory): logging, free ports, stopping a
# process group.
from compare_routers import free_port, log, stop

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "target" / "bench"
VENV = ROOT / "target" / "bench-venv"
WORKERS = 4
CACHE_BLOCKS = 400          # per worker, 16-token blocks: ~6,400 tokens (eviction pressure)
PREFILL_US_PER_TOKEN = 200  # simulated prefill cost of an uncached token (makes TTFT follow the hit rate)
CONCURRENCY = 8


def ensure():
    try:
        import httpx  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "httpx"], check=True)
    if not (ROOT / "target/release/vllm-router").exists() or not (ROOT / "target/release/vllm-sim").exists():
        log("building vllm-router and vllm-sim (release)")
        subprocess.run(["cargo", "build", "--release", "--workspace", "--locked", "-q"], cwd=ROOT, check=True)


def peer_available():
    if (VENV / "bin" / "vllm-router").exists():
        return True
    log(f"installing vllm-project/router from PyPI into {VENV}")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                        "vllm-router", "matplotlib"], check=True)
        return True
    except subprocess.CalledProcessError:
        log("could not install the peer; its rows are skipped")
        return False


def spawn(cmd, stdout=subprocess.DEVNULL):
    return subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.DEVNULL, start_new_session=True, text=True)


def start_sims():
    sims = []
    for i in range(WORKERS):
        p = spawn([str(ROOT / "target/release/vllm-sim"), "--port", "0", "--worker-id", f"w{i}",
                   "--kv-events", "--cache-blocks", str(CACHE_BLOCKS),
                   "--prefill-us-per-token", str(PREFILL_US_PER_TOKEN), "--record", "false"],
                  stdout=subprocess.PIPE)
        line = p.stdout.readline()
        port = int(line.split()[1])
        sims.append((p, f"http://127.0.0.1:{port}"))
    return sims


def wait_ready(url, deadline=30):
    import httpx
    t0 = time.time()
    while time.time() - t0 < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return True
        except Exception:
            pass
        time.sleep(0.1)
    return False


def router_cmd(system, policy, port, sims):
    urls = [u for _, u in sims]
    if system == "ours":
        return [str(ROOT / "target/release/vllm-router"), "--port", str(port), "--policy", policy,
                "--prometheus-port", str(free_port()), "--log-level", "warn", "--worker-urls", *urls]
    import httpx
    cmd = [str(VENV / "bin" / "vllm-router"), "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
           "--prometheus-port", str(free_port()), "--worker-urls", *urls]
    if policy == "kv_aware":
        for u in urls:
            ep = httpx.get(u + "/kv_event_sources").json()["0"]
            cmd += ["--kv-event-source", f"{u}={ep['endpoint']}", "--kv-event-replay-source",
                    f"{u}={ep['replay_endpoint']}"]
        cmd += ["--kv-event-block-size", "16", "--kv-event-model", "sim-model"]
    return cmd


# ---------------------------------------------------------------- workload

WORDS = ("model router cache block token prefill decode worker latency queue engine tensor "
         "batch prompt stream answer context memory request policy event index shard").split()


def text(rng, chars):
    out = []
    n = 0
    while n < chars:
        w = rng.choice(WORDS)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)


def workload(n, seed=7):
    """A list of 'streams': each a list of request bodies sent in order (a conversation's
    turns), or a single request. Roughly 30 % chat turns, 45 % few-shot, 25 % one-off."""
    rng = random.Random(seed)
    systems = [text(rng, 900) for _ in range(3)]
    templates = [text(rng, 2200) for _ in range(6)]
    streams = []
    chat_turns = int(n * 0.30)
    convs = max(1, chat_turns // 5)
    for c in range(convs):
        sys_p = systems[c % 3]
        msgs = [{"role": "system", "content": sys_p}]
        turns = []
        for t in range(5):
            msgs = msgs + [{"role": "user", "content": f"conversation {c} turn {t}: " + text(rng, 300)}]
            turns.append({"model": "sim-model", "messages": list(msgs), "max_tokens": 4, "stream": True,
                          "user": "chat"})
            msgs = msgs + [{"role": "assistant", "content": text(rng, 200)}]
        streams.append(turns)
    for _ in range(int(n * 0.45)):
        tpl = rng.choice(templates)
        streams.append([{"model": "sim-model", "max_tokens": 4, "stream": True, "user": "template",
                         "messages": [{"role": "user", "content": tpl + "\nQuestion: " + text(rng, 150)}]}])
    for _ in range(n - chat_turns - int(n * 0.45)):
        streams.append([{"model": "sim-model", "max_tokens": 4, "stream": True, "user": "oneoff",
                         "messages": [{"role": "user", "content": text(rng, 1200)}]}])
    rng.shuffle(streams)
    return streams


async def drive(router_urls, streams):
    import httpx
    results = []
    queue = asyncio.Queue()
    for s in streams:
        queue.put_nowait(s)
    counter = {"i": 0}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        async def one(body):
            url = router_urls[counter["i"] % len(router_urls)] + "/v1/chat/completions"
            counter["i"] += 1
            t0 = time.perf_counter()
            async with client.stream("POST", url, json=body) as r:
                ttft = None
                async for chunk in r.aiter_bytes():
                    if ttft is None and chunk:
                        ttft = time.perf_counter() - t0
                h = r.headers
                results.append({
                    "kind": body.get("user", "?"), "status": r.status_code, "worker": h.get("x-vllm-sim-worker", "?"),
                    "cached": int(h.get("x-sim-cached-tokens", 0)), "prompt": int(h.get("x-sim-prompt-tokens", 0)),
                    "ttft": ttft if ttft is not None else time.perf_counter() - t0})

        async def worker():
            while True:
                try:
                    s = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                for body in s:
                    await one(body)
                done = len(results)
                if done % 100 < len(s):
                    log(f"    {done} requests")

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return results


def summarise(results):
    ok = [r for r in results if r["status"] == 200]
    per = {}
    for r in ok:
        per[r["worker"]] = per.get(r["worker"], 0) + 1
    counts = [per.get(f"w{i}", 0) for i in range(WORKERS)]
    tt = sorted(r["ttft"] * 1000 for r in ok)
    q = lambda p: tt[min(len(tt) - 1, int(p * len(tt)))] if tt else float("nan")
    by_kind = {}
    for k in sorted({r["kind"] for r in ok}):
        rs = [r for r in ok if r["kind"] == k]
        by_kind[k] = round(sum(r["cached"] for r in rs) / max(1, sum(r["prompt"] for r in rs)), 3)
    return {
        "requests": len(results), "errors": len(results) - len(ok), "hit_rate_by_kind": by_kind,
        "hit_rate": sum(r["cached"] for r in ok) / max(1, sum(r["prompt"] for r in ok)),
        "max_min": max(counts) / max(1, min(counts)), "per_worker": counts,
        "ttft_p50_ms": q(0.5), "ttft_p90_ms": q(0.9),
    }


def run_config(system, policy, replicas, streams):
    sims = start_sims()
    routers = []
    try:
        for _, u in sims:
            wait_ready(u)
        urls = []
        for k in range(replicas):
            # Free ports are picked then released: retry with fresh ones on a clash.
            for attempt in range(3):
                port = free_port()
                logf = OUT / f"kv-router-{system}-{policy}-{k}.log"
                OUT.mkdir(parents=True, exist_ok=True)
                with open(logf, "w") as lf:
                    p = subprocess.Popen(router_cmd(system, policy, port, sims), stdout=lf, stderr=lf,
                                         start_new_session=True)
                if wait_ready(f"http://127.0.0.1:{port}", 60):
                    break
                stop(p)
                last = (logf.read_text().strip().splitlines() or ["(no output)"])[-1]
                log(f"   replica {k} did not start (attempt {attempt + 1}): {last[:200]}")
            else:
                raise RuntimeError(f"{system} {policy} did not start")
            routers.append(p)
            urls.append(f"http://127.0.0.1:{port}")
        if policy == "kv_aware":
            time.sleep(1.0)  # let subscriptions connect
        results = asyncio.run(drive(urls, streams))
        return summarise(results)
    finally:
        for r in routers:
            stop(r)
        for p, _ in sims:
            stop(p)


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not available: no PNG")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = sorted({(r["router"], r["policy"]) for r in rows})
    for (router, policy) in labels:
        rs = sorted((r for r in rows if r["router"] == router and r["policy"] == policy), key=lambda r: r["replicas"])
        x = [r["replicas"] for r in rs]
        name = f"{'ours' if router == 'ours' else 'vllm-project/router'} {policy}"
        axes[0].plot(x, [r["hit_rate"] for r in rs], marker="o", label=name)
        axes[1].plot(x, [r["ttft_p90_ms"] for r in rs], marker="o", label=name)
    axes[0].set_title("prefix-cache hit rate (tokens)")
    axes[1].set_title("TTFT p90 (ms)")
    for a in axes:
        a.set_xlabel("router replicas")
        a.set_xticks([1, 2, 4])
        a.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--replicas", default="1,2,4")
    ap.add_argument("--no-peer", action="store_true")
    a = ap.parse_args()
    ensure()
    peer = not a.no_peer and peer_available()
    streams = workload(a.requests)
    total = sum(len(s) for s in streams)
    configs = [("ours", "kv_aware"), ("ours", "cache_aware"), ("ours", "round_robin")]
    if peer:
        configs += [("vllm-router", "cache_aware"), ("vllm-router", "kv_aware")]
    rows = []
    for replicas in [int(x) for x in a.replicas.split(",")]:
        for system, policy in configs:
            log(f"== {system} {policy}, {replicas} replica(s), {total} requests")
            try:
                s = run_config(system, policy, replicas, streams)
            except Exception as e:  # a configuration that cannot run is reported, not fatal
                log(f"   failed: {e}")
                continue
            row = {"router": system, "policy": policy, "replicas": replicas, **s}
            rows.append(row)
            log(f"   hit {s['hit_rate']:.3f}  max/min {s['max_min']:.2f}  TTFT p50 {s['ttft_p50_ms']:.1f} ms"
                f"  p90 {s['ttft_p90_ms']:.1f} ms  errors {s['errors']}  per worker {s['per_worker']}  by kind {s['hit_rate_by_kind']}")
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "workers": WORKERS, "cache_blocks_per_worker": CACHE_BLOCKS,
            "prefill_us_per_token": PREFILL_US_PER_TOKEN, "concurrency": CONCURRENCY, "requests": total,
            "cpus": os.cpu_count()}
    (OUT / "kv-quality.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["| router | policy | replicas | hit rate | max/min | TTFT p50 ms | TTFT p90 ms | errors |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['router']} | {r['policy']} | {r['replicas']} | {r['hit_rate']:.3f} | {r['max_min']:.2f} "
                     f"| {r['ttft_p50_ms']:.1f} | {r['ttft_p90_ms']:.1f} | {r['errors']} |")
    table = "\n".join(lines)
    (OUT / "kv-quality.md").write_text(table + "\n")
    png = plot(rows, OUT / "kv-quality.png")
    print(table)
    log(f"wrote {OUT / 'kv-quality.json'}, {OUT / 'kv-quality.md'}" + (f", {OUT / 'kv-quality.png'}" if png else ""))


if __name__ == "__main__":
    main()
