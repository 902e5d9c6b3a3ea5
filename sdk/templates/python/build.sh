#!/usr/bin/env bash
# Build {{name}}.wasm from app.py with componentize-py (PyPI). The component embeds a
# Python interpreter (~18 MB); the router compiles it in ~10 s and imports the WASI it
# links against as a context that grants nothing.
set -euo pipefail
cd "$(dirname "$0")"
export PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$HOME/.local/bin:$PATH"
if ! command -v componentize-py >/dev/null; then
  echo "== installing componentize-py from PyPI" >&2
  python3 -m pip install --quiet componentize-py
fi
echo "== native tests" >&2
python3 test_app.py
echo "== componentize-py" >&2
mkdir -p build
componentize-py -d vllm-router/wit -w policy componentize app \
  -p . -p vllm-router/sdk-python -o build/{{name}}.wasm
mv build/{{name}}.wasm {{name}}.wasm
echo "wrote {{name}}.wasm ($(wc -c < {{name}}.wasm) bytes)" >&2
