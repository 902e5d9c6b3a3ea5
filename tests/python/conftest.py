"""Fixtures: start simulated vLLM workers and the real vllm-router binary on free
127.0.0.1 ports (binaries from target/release, built by tests/run.sh), stop them by PID."""
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("VLLM_ROUTER_BIN_DIR", ROOT / "target" / "release"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_sim(worker_id: str, *extra: str) -> tuple[subprocess.Popen, int]:
    p = subprocess.Popen([str(BIN / "vllm-sim"), "--port", "0", "--worker-id", worker_id, *extra],
                         stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.startswith("LISTENING "), line
    return p, int(line.split()[1])


def start_router(*args: str, exe=None) -> tuple[subprocess.Popen, int]:
    """Start vllm-router (`exe`, default the built one) with `--port 0` and `args`; return
    the process and the port it logged (`vllm-router listening on http://ADDR`), so there
    is no bind-then-release race. The caller stops the process."""
    r = subprocess.Popen([str(exe or BIN / "vllm-router"), "--port", "0", "--prometheus-port", "0",
                          "--log-level", "warn,vllm_router::app=info", *args],
                         stdout=subprocess.PIPE, text=True)
    port = None
    deadline = time.time() + 30
    while port is None and time.time() < deadline:
        line = r.stdout.readline()
        if not line and r.poll() is not None:
            break
        if "vllm-router listening on http://" in line:
            addr = line.split("listening on http://", 1)[1].split()[0]
            port = int(addr.rsplit(":", 1)[1])
    if port is None:
        r.kill()
        r.wait()
        raise AssertionError("vllm-router did not start (no 'listening on' line)")
    return r, port


@pytest.fixture(scope="module")
def router_url():
    procs = []
    try:
        ports = []
        for i in range(3):
            p, port = start_sim(f"w{i}")
            procs.append(p)
            ports.append(port)
        r, port = start_router("--policy", "round_robin",
                               "--worker-urls", *[f"http://127.0.0.1:{p}" for p in ports])
        procs.append(r)
        yield f"http://127.0.0.1:{port}"
    finally:
        for p in procs:
            p.kill()
            p.wait()
