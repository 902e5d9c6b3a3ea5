"""The pdjob `scheduler.command` from docs/install.md, run the way pdjob runs it ({PORT}
substituted, $PREFILL_URL_1/$DECODE_URL_1 in the environment, through `sh -c`), over
simulated prefill and decode workers: a completion takes the two-stage flow."""
import json
import os
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from conftest import BIN, start_sim

ROOT = Path(__file__).resolve().parents[2]


def scheduler_command():
    text = (ROOT / "docs" / "install.md").read_text()
    m = re.search(r"^\s*command: (vllm-router .*)$", text, re.M)
    assert m, "no scheduler.command in docs/install.md"
    return m.group(1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def test_the_documented_pdjob_command_runs_the_two_stage_flow():
    prefill, pport = start_sim("p0", "--role", "prefill")
    decode, dport = start_sim("d0", "--role", "decode")
    port = free_port()
    cmd = scheduler_command().replace("{PORT}", str(port))
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}",
               PREFILL_URL_1=f"http://127.0.0.1:{pport}", DECODE_URL_1=f"http://127.0.0.1:{dport}")
    router = subprocess.Popen(["sh", "-c", cmd], env=env, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert router.poll() is None and time.time() < deadline, "the pdjob command did not start a router"
                time.sleep(0.05)
        body = json.dumps({"model": "sim-model", "prompt": "hello", "max_tokens": 3}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200
            rid = r.headers["x-request-id"]
        assert rid.startswith("___prefill_addr_"), rid
        pre = get_json(f"http://127.0.0.1:{pport}/sim/requests")[-1]
        dec = get_json(f"http://127.0.0.1:{dport}/sim/requests")[-1]
        assert pre["body"]["max_tokens"] == 1 and pre["body"]["kv_transfer_params"]["do_remote_decode"] is True
        assert dec["raw"].startswith(body.decode()[:-1]), dec["raw"]
        assert "kv_transfer_params" in dec["body"]
    finally:
        os.killpg(router.pid, 15)
        router.wait(10)
        for p in (prefill, decode):
            p.kill()
            p.wait()
