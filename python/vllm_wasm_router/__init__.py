"""vllm-router (the WebAssembly-policy router for vLLM), packaged as a wheel that carries
the binary. The command is `vllm-router`; `python -m vllm_wasm_router` runs the same."""

import os
import shutil
import sys
import sysconfig


def binary() -> str:
    """Path of the `vllm-router` executable installed with this package."""
    scripts = sysconfig.get_path("scripts")
    exe = os.path.join(scripts, "vllm-router")
    if os.path.exists(exe):
        return exe
    found = shutil.which("vllm-router")
    if not found:
        raise FileNotFoundError("vllm-router executable not found next to this Python")
    return found


def main() -> None:
    """Replace this process with the router (signals and exit code are the router's)."""
    exe = binary()
    os.execv(exe, [exe] + sys.argv[1:])
