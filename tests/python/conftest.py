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


@pytest.fixture(scope="module")
def router_url():
    procs = []
    try:
        ports = []
        for i in range(3):
            p, port = start_sim(f"w{i}")
            procs.append(p)
            ports.append(port)
        # --port 0: the router binds a free port and logs it (no bind-then-release race).
        r = subprocess.Popen([str(BIN / "vllm-router"), "--port", "0", "--prometheus-port", "0",
                              "--policy", "round_robin", "--log-level", "warn,vllm_router::app=info",
                              "--worker-urls", *[f"http://127.0.0.1:{p}" for p in ports]],
                             stdout=subprocess.PIPE, text=True)
        procs.append(r)
        port = None
        deadline = time.time() + 30
        while port is None and time.time() < deadline:
            line = r.stdout.readline()
            assert line or r.poll() is None, "vllm-router exited at startup"
            if "vllm-router listening on http://" in line:
                addr = line.split("listening on http://", 1)[1].split()[0]
                port = int(addr.rsplit(":", 1)[1])
        assert port, "vllm-router did not log its address"
        yield f"http://127.0.0.1:{port}"
    finally:
        for p in procs:
            p.kill()
            p.wait()
