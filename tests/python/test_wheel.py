"""The pip package: `maturin build` makes a wheel carrying the real binary (bindings
"bin", no Python dependencies); installed into a fresh venv, its `vllm-router` command
and `python -m vllm_wasm_router` run the router, which serves a request over a
simulated worker. The build reuses the workspace's target directory and release profile
(only the crates whose features differ are rebuilt)."""
import json
import shutil
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

from conftest import start_router, start_sim

ROOT = Path(__file__).resolve().parents[2]


def build_wheel(tmp: Path) -> Path:
    out = tmp / "wheels"
    cmd = [sys.executable, "-m", "maturin", "build", "--release", "--locked", "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True)
    wheels = list(out.glob("vllm_wasm_router-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_the_wheel_installs_a_working_vllm_router_command(tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith(".data/scripts/vllm-router") for n in names), names
    assert "vllm_wasm_router/__main__.py" in names
    meta = next(n for n in names if n.endswith("METADATA"))
    assert "Requires-Dist" not in zipfile.ZipFile(wheel).read(meta).decode(), "no Python dependencies"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-index", str(wheel)], check=True)
    exe = venv / "bin" / "vllm-router"
    assert exe.exists()
    assert "--policy-wasm" in subprocess.run([str(exe), "--help"], check=True, capture_output=True, text=True).stdout
    v = subprocess.run([str(venv / "bin" / "python"), "-m", "vllm_wasm_router", "--version"], check=True,
                       capture_output=True, text=True).stdout
    assert v.startswith("vllm-router "), v
    sim, port = start_sim("wheel")
    r, rport = start_router("--worker-urls", f"http://127.0.0.1:{port}", exe=exe)
    try:
        body = json.dumps({"model": "sim-model", "prompt": "hi", "max_tokens": 2}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{rport}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
            assert resp.headers["x-vllm-sim-worker"] == "wheel"
    finally:
        for p in (r, sim):
            p.kill()
            p.wait()
