#!/usr/bin/env bash
# Build {{name}}.wasm from policy.js with componentize-js (npm
# @bytecodealliance/componentize-js, the StarlingMonkey engine): a ~12 MB component the
# router compiles in ~10 s, ~0.35 ms per decision. (jco's QuickJS backend builds a
# 1.6 MB component but its synchronous exports never drop the borrowed request, which
# the component model traps on: componentize-qjs 0.4.5.)
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x node_modules/.bin/componentize-js ]; then
  echo "== installing @bytecodealliance/componentize-js from npm (into ./node_modules)" >&2
  npm install --no-audit --no-fund --silent @bytecodealliance/componentize-js@0
fi
echo "== native tests (node)" >&2
node test.mjs
mkdir -p build
cat vllm-router/sdk-js/helpers.js policy.js > build/bundle.js
echo "== componentize-js (StarlingMonkey)" >&2
# -d http fetch-event: leave out the HTTP server parts (they would import wasi:http).
node_modules/.bin/componentize-js "$PWD/build/bundle.js" --wit vllm-router/wit -n policy \
  -d http fetch-event -o "$PWD/build/{{name}}.wasm"
mv build/{{name}}.wasm {{name}}.wasm
echo "wrote {{name}}.wasm ($(wc -c < {{name}}.wasm) bytes)" >&2
