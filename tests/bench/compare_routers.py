#!/usr/bin/env python3
"""Router overhead, side by side in one run: direct to a simulated worker (the physical
limit), the physical anchors nginx and haproxy (Debian packages, plain keep-alive
reverse proxies, one worker process / thread, round robin), `floor` (floor-proxy, a
hyper + Tokio reverse proxy with nothing else: what our stack costs before the router
does anything; tests/src/bin/floor-proxy.rs), vllm-router (ours:
round_robin, cache_aware) and the peers installed from PyPI (vllm-project/router as
`vllm-router`, SGLang's `sglang-router`), same two simulated workers, same policies.

Arrangement on a 2-core machine: the router under test is pinned alone on core 0
(`taskset -c 0`); wrk and the simulated workers share core 1. Each (system, workload)
pair runs `--repeats` times; the order of systems alternates between rounds (forward,
backward) so drift and warm-up do not favour one system. Medians are reported.

Workloads (wrk, HTTP/1.1 keep-alive, small chat completion body):
  c1     non-streaming, 1 connection  (latency p50/p99)
  c64    non-streaming, 64 connections (throughput, p50/p99)
  s64    streaming 16 SSE chunks, 64 connections
Router CPU per request = (utime + stime of the router process during the run) / requests:
the figure that stays stable on a noisy shared machine.

Writes target/bench/compare.{json,md,png} and prints the table.
With `--baseline PATH` (a vllm-router binary built from an earlier commit, e.g. in a git
worktree), that binary runs as system `baseline` with the same flags as `ours`: a
before/after comparison measured side by side in one run.
Usage: python3 tests/bench/compare_routers.py [--repeats 3] [--duration 4] [--baseline BIN] [--no-peers]
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "target" / "bench"
VENV = ROOT / "target" / "bench-venv"
TICK = os.sysconf("SC_CLK_TCK")

CHAT = '{"model":"sim-model","messages":[{"role":"user","content":"hello, how are you today?"}],"max_tokens":4}'
STREAM = '{"model":"sim-model","messages":[{"role":"user","content":"hello, how are you today?"}],"max_tokens":16,"stream":true}'


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def apt_install(pkgs):
    """Install Debian packages without letting their post-install scripts start the
    system services (nginx would otherwise bind port 80 as a daemon)."""
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    rc = Path("/usr/sbin/policy-rc.d")
    made = False
    if not rc.exists():
        subprocess.run(sudo + ["sh", "-c", f"printf '#!/bin/sh\\nexit 101\\n' > {rc} && chmod +x {rc}"], check=True)
        made = True
    try:
        log(f"installing {' '.join(pkgs)} (Debian packages)")
        subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *pkgs], check=True,
                       stdout=subprocess.DEVNULL)
    finally:
        if made:
            subprocess.run(sudo + ["rm", "-f", str(rc)], check=False)


def ensure_tools():
    missing = [p for p, b in (("wrk", "wrk"), ("nginx", "nginx"), ("haproxy", "haproxy"))
               if not shutil.which(b) and not Path(f"/usr/sbin/{b}").exists()]
    if missing:
        apt_install(missing)
    if not (VENV / "bin" / "sglang-router").exists() or not (VENV / "bin" / "vllm-router").exists():
        log(f"installing peers from PyPI into {VENV} (vllm-router, sglang-router, matplotlib)")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                        "vllm-router", "sglang-router", "matplotlib"], check=True)
    log("building vllm-router (release)")
    subprocess.run(["cargo", "build", "--release", "--workspace", "--locked", "-q"], cwd=ROOT, check=True)


def pip_version(name):
    out = subprocess.run([str(VENV / "bin" / "pip"), "show", name], capture_output=True, text=True).stdout
    m = re.search(r"^Version: (.+)$", out, re.M)
    return m.group(1) if m else "?"


def spawn(cmd, core):
    return subprocess.Popen(["taskset", "-c", str(core)] + cmd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def stop(p):
    if p and p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def post_ok(port, body=CHAT):
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=2) as r:
            return r.status == 200
    except Exception:
        return False


def start_sim(name, core):
    port = free_port()
    p = spawn([str(ROOT / "target/release/vllm-sim"), "--port", str(port), "--worker-id", name,
               "--record", "false", "--cache-blocks", "0"], core)
    deadline = time.time() + 10
    while not post_ok(port):
        if time.time() > deadline:
            raise RuntimeError("vllm-sim did not start")
        time.sleep(0.05)
    return p, port


BASELINE = None
CONF = OUT / "proxy-conf"


def proxy_cmd(system, port, workers):
    """nginx / haproxy as plain keep-alive reverse proxies: one worker process (nginx) or
    thread (haproxy), round robin, upstream connections reused, no logging, no
    buffering of streamed responses."""
    CONF.mkdir(parents=True, exist_ok=True)
    if system == "nginx":
        d = CONF / f"nginx-{port}"
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        servers = "".join(f"    server 127.0.0.1:{w};\n" for w in workers)
        (d / "nginx.conf").write_text(f"""worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log stderr crit;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  upstream workers {{
{servers}    keepalive 256;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://workers;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
""")
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        return [binary, "-e", "stderr", "-p", str(d), "-c", str(d / "nginx.conf")]
    if system == "haproxy":
        f = CONF / f"haproxy-{port}.cfg"
        servers = "".join(f"  server w{i} 127.0.0.1:{w}\n" for i, w in enumerate(workers))
        f.write_text(f"""global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
  http-reuse always
frontend f
  bind 127.0.0.1:{port}
  default_backend b
backend b
  balance roundrobin
{servers}""")
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        return [binary, "-db", "-f", str(f)]
    raise ValueError(system)


def router_cmd(system, policy, port, workers):
    if system in ("nginx", "haproxy"):
        return proxy_cmd(system, port, workers)
    urls = [f"http://127.0.0.1:{w}" for w in workers]
    if system == "floor":
        return [str(ROOT / "target/release/floor-proxy"), str(port), *urls]
    if system in ("ours", "baseline"):
        binary = str(ROOT / "target/release/vllm-router") if system == "ours" else BASELINE
        return [binary, "--port", str(port), "--policy", policy,
                "--prometheus-port", str(free_port()), "--log-level", "warn",
                "--engine-metrics-interval-ms", "0", "--worker-urls", *urls]
    if system == "vllm-project/router":
        return [str(VENV / "bin" / "vllm-router"), "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
                "--prometheus-port", str(free_port()), "--worker-urls", *urls]
    if system == "sglang-router":
        return [str(VENV / "bin" / "sglang-router"), "launch", "--host", "127.0.0.1", "--port", str(port),
                "--policy", policy, "--prometheus-port", str(free_port()), "--log-level", "warn",
                "--worker-urls", *urls]
    raise ValueError(system)


def cpu_seconds(pid):
    """utime + stime of a process and its threads, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def router_pid(p):
    """The process doing the work (Python launchers may exec or fork the Rust binary)."""
    try:
        kids = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
    except Exception:
        kids = []
    return int(kids[0]) if len(kids) == 1 and p.pid != int(kids[0]) else p.pid


def all_pids(p):
    out = subprocess.run(["pgrep", "-g", str(p.pid)], capture_output=True, text=True).stdout.split()
    return [int(x) for x in out] or [p.pid]


def run_wrk(port, conns, body, duration, core=1):
    script = OUT / f"wrk-{abs(hash(body))}.lua"
    script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                      f"wrk.body = '{body}'\n")
    out = subprocess.run(["taskset", "-c", str(core), "wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency",
                          "-s", str(script), f"http://127.0.0.1:{port}/v1/chat/completions"],
                         capture_output=True, text=True).stdout

    def lat(pct):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        v, u = float(m.group(1)), m.group(2)
        return v / 1000 if u == "us" else v if u == "ms" else v * 1000

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    failed = (int(bad.group(1)) if bad else 0) + (sum(int(x) for x in errs.groups()) if errs else 0)
    return {"rps": rps, "p50_ms": lat(50), "p99_ms": lat(99), "requests": total, "failed": failed}


WORKLOADS = [("c1", 1, CHAT), ("c64", 64, CHAT), ("s64", 64, STREAM)]


def measure(system, policy, workers, duration):
    """One system: start it, time to first routed 200, then every workload. Direct has no router."""
    if system == "direct":
        res = {}
        for name, conns, body in WORKLOADS:
            r = run_wrk(workers[0], conns, body, duration)
            r["cpu_us_per_req"] = float("nan")
            res[name] = r
        return res, float("nan"), float("nan")
    port = free_port()
    t0 = time.time()
    p = spawn(router_cmd(system, policy, port, workers), 0)
    try:
        while not post_ok(port):
            if p.poll() is not None or time.time() - t0 > 60:
                raise RuntimeError(f"{system} {policy} did not start")
            time.sleep(0.01)
        startup = (time.time() - t0) * 1000
        res = {}
        for name, conns, body in WORKLOADS:
            pids = all_pids(p)
            c0 = sum(cpu_seconds(x) for x in pids)
            r = run_wrk(port, conns, body, duration)
            c1 = sum(cpu_seconds(x) for x in all_pids(p))
            r["cpu_us_per_req"] = (c1 - c0) * 1e6 / max(r["requests"], 1)
            res[name] = r
        rss = sum(rss_mib(x) for x in all_pids(p))
        return res, startup, rss
    finally:
        stop(p)


def median(xs):
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--duration", type=int, default=4, help="seconds per wrk run")
    ap.add_argument("--baseline", help="an earlier vllm-router binary, run as system `baseline`")
    ap.add_argument("--no-peers", action="store_true", help="skip vllm-project/router and sglang-router")
    args = ap.parse_args()
    global BASELINE
    BASELINE = args.baseline
    OUT.mkdir(parents=True, exist_ok=True)
    if Path(sys.prefix).resolve() != VENV.resolve():
        ensure_tools()
        # Continue inside the venv (matplotlib for the chart).
        os.execv(str(VENV / "bin" / "python"), [str(VENV / "bin" / "python"), __file__] + sys.argv[1:])
    systems = [("direct", "-"), ("nginx", "round_robin"), ("haproxy", "round_robin"),
               ("floor", "round_robin"), ("ours", "round_robin"), ("ours", "cache_aware"),
               ("vllm-project/router", "round_robin"), ("vllm-project/router", "cache_aware"),
               ("sglang-router", "round_robin"), ("sglang-router", "cache_aware")]
    if args.no_peers:
        systems = systems[:6]
    if args.baseline:
        systems[6:6] = [("baseline", "round_robin"), ("baseline", "cache_aware")]
    sims = [start_sim("w0", 1), start_sim("w1", 1)]
    workers = [port for _, port in sims]
    results = {f"{s}|{p}": [] for s, p in systems}
    try:
        total = args.repeats * len(systems)
        done = 0
        for rnd in range(args.repeats):
            order = systems if rnd % 2 == 0 else list(reversed(systems))
            for s, pol in order:
                done += 1
                log(f"[{done}/{total}] round {rnd + 1}: {s} {pol}")
                try:
                    res, startup, rss = measure(s, pol, workers, args.duration)
                    results[f"{s}|{pol}"].append({"workloads": res, "startup_ms": startup, "rss_mib": rss})
                except Exception as e:  # a peer that fails to start is reported, not fatal
                    log(f"    failed: {e}")
    finally:
        for p, _ in sims:
            stop(p)

    rows = []
    for s, pol in systems:
        runs = results[f"{s}|{pol}"]
        if not runs:
            rows.append({"system": s, "policy": pol, "ok": False})
            continue
        row = {"system": s, "policy": pol, "ok": True,
               "startup_ms": median([r["startup_ms"] for r in runs]),
               "rss_mib": median([r["rss_mib"] for r in runs])}
        for w, _, _ in WORKLOADS:
            for k in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "failed"):
                row[f"{w}_{k}"] = median([r["workloads"][w][k] for r in runs])
        rows.append(row)
    direct = rows[0]
    peers = [r for r in rows if r["ok"] and r["system"] in ("vllm-project/router", "sglang-router")]
    if not peers:
        peers = [r for r in rows if r["ok"] and r["system"] != "direct"]
    best_c64 = max((r["c64_rps"] for r in peers), default=float("nan"))
    best_cpu = min((r["c64_cpu_us_per_req"] for r in peers), default=float("nan"))
    versions = {"vllm-project/router": pip_version("vllm-router"), "sglang-router": pip_version("sglang-router")}

    nginx = next((r for r in rows if r["ok"] and r["system"] == "nginx"), None)

    def vs_nginx(r, key):
        return r[key] / nginx[key] if nginx and nginx[key] == nginx[key] and nginx[key] > 0 else float("nan")

    hdr = ("| system | policy | c1 p50 ms | added p50 µs | ×nginx | c1 p99 ms | c64 req/s | ×best peer | c64 p50 ms | c64 p99 ms "
           "| CPU µs/req (c64) | ×best peer | ×nginx | stream s64 req/s | CPU µs/stream | ×nginx | start ms | RSS MiB |")
    lines = [hdr, "|" + "---|" * (hdr.count("|") - 1)]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['system']} | {r['policy']} | failed to start or run |" + " |" * 15)
            continue
        added = (r["c1_p50_ms"] - direct["c1_p50_ms"]) * 1000 if r["system"] != "direct" else 0.0
        r["added_p50_us"] = added
        nginx_added = (nginx["c1_p50_ms"] - direct["c1_p50_ms"]) * 1000 if nginx else float("nan")
        added_x = added / nginx_added if nginx and nginx_added > 0 and r["system"] != "direct" else float("nan")
        lines.append(
            f"| {r['system']} | {r['policy']} | {r['c1_p50_ms']:.3f} | {added:.0f} | {added_x:.2f} | {r['c1_p99_ms']:.3f} "
            f"| {r['c64_rps']:.0f} | {r['c64_rps'] / best_c64:.2f} | {r['c64_p50_ms']:.2f} | {r['c64_p99_ms']:.2f} "
            f"| {r['c64_cpu_us_per_req']:.1f} | {r['c64_cpu_us_per_req'] / best_cpu:.2f} "
            f"| {vs_nginx(r, 'c64_cpu_us_per_req'):.2f} | {r['s64_rps']:.0f} "
            f"| {r['s64_cpu_us_per_req']:.1f} | {vs_nginx(r, 's64_cpu_us_per_req'):.2f} "
            f"| {r['startup_ms']:.0f} | {r['rss_mib']:.1f} |")
    table = "\n".join(lines)
    meta = (f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, repeats {args.repeats} × {args.duration} s, "
            f"peers: vllm-project/router {versions['vllm-project/router']}, sglang-router {versions['sglang-router']}; "
            f"direct = wrk straight to one simulated worker")
    print("\n" + meta + "\n\n" + table)
    failed = sum(r.get(f"{w}_failed", 0) or 0 for r in rows if r["ok"] for w, _, _ in WORKLOADS)
    print(f"\nfailed requests across all runs (median per system summed): {failed}")
    (OUT / "compare.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (OUT / "compare.md").write_text(meta + "\n\n" + table + "\n")
    plot(rows, direct)


def plot(rows, direct):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        log(f"no chart: {e}")
        return
    ok = [r for r in rows if r["ok"]]
    labels = [f"{r['system']}\n{r['policy']}" for r in ok]
    colors = ["#888" if r["system"] == "direct" else "#2a7" if r["system"] == "ours"
              else "#7a9" if r["system"] == "baseline" else "#46a" if r["system"] in ("nginx", "haproxy", "floor")
              else "#c64" for r in ok]
    fig, ax = plt.subplots(1, 3, figsize=(18, 5.5))
    ax[0].bar(labels, [r["c64_rps"] for r in ok], color=colors)
    ax[0].set_title("throughput, 64 connections (req/s)")
    ax[1].bar(labels[1:], [(r["c1_p50_ms"] - direct["c1_p50_ms"]) * 1000 for r in ok[1:]], color=colors[1:])
    ax[1].set_title("added p50 latency vs direct, 1 connection (µs)")
    ax[2].bar(labels[1:], [r["c64_cpu_us_per_req"] for r in ok[1:]], color=colors[1:])
    ax[2].set_title("router CPU per request, c64 (µs)")
    for a in ax:
        a.tick_params(axis="x", labelrotation=60, labelsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "compare.png", dpi=110)
    log(f"chart: {OUT / 'compare.png'}")


if __name__ == "__main__":
    main()
