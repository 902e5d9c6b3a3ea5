#!/usr/bin/env bash
# Build {{name}}.wasm: native tests, then cargo for wasm32-wasip2 (a component directly).
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v cargo >/dev/null; then
  echo "Rust is missing: install it with https://rustup.rs, then: rustup target add wasm32-wasip2" >&2
  exit 1
fi
if command -v rustup >/dev/null && ! rustup target list --installed | grep -q wasm32-wasip2; then
  echo "== rustup target add wasm32-wasip2" >&2
  rustup target add wasm32-wasip2
fi
echo "== cargo test (native)" >&2
cargo test --quiet
echo "== cargo build (wasm32-wasip2)" >&2
cargo build --release --target wasm32-wasip2
cp target/wasm32-wasip2/release/{{name}}.wasm build-{{name}}.wasm.tmp
mv build-{{name}}.wasm.tmp {{name}}.wasm
echo "wrote {{name}}.wasm ($(wc -c < {{name}}.wasm) bytes)" >&2
