#!/usr/bin/env bash
# Quickstart: build vllm-router, start three simulated vLLM workers and the router with a
# WebAssembly policy, send real OpenAI-style requests (curl and the official `openai`
# Python client, stream and non-stream), print which worker served each, stop everything.
#
#   bash examples/quickstart.sh [POLICY]        # POLICY: round_robin (default), random,
#                                               # or a path to a policy .wasm file
set -euo pipefail
cd "$(dirname "$0")/.."
POLICY="${1:-round_robin}"

echo "== installing what is missing (wasm32-wasip2 target, openai client)"
rustup target add wasm32-wasip2 >/dev/null
python3 -m pip install --quiet --disable-pip-version-check "openai>=1.40" 2>/dev/null
echo "== building (first build compiles wasmtime: ~8-10 min on 2 cores)"
cargo build --release --locked -p vllm-router -p vllm-router-tests 2>&1 | grep -E "^(error|warning: unused)|Finished" || true
BIN=target/release
[ -x "$BIN/vllm-router" ] || { echo "build failed"; exit 1; }

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
URLS=()
for i in 1 2 3; do
  LOG=$(mktemp)
  "$BIN/vllm-sim" --port 0 --worker-id "worker-$i" --token-delay-ms 20 >"$LOG" &
  PIDS+=($!)
  for _ in $(seq 50); do grep -q LISTENING "$LOG" && break; sleep 0.1; done
  PORT=$(awk '/LISTENING/{print $2}' "$LOG")
  URLS+=("http://127.0.0.1:$PORT")
  echo "   simulated vLLM worker-$i on http://127.0.0.1:$PORT"
done

RPORT=$(free_port); MPORT=$(free_port)
if [ -f "$POLICY" ]; then POLICY_FLAG=(--policy-wasm "$POLICY"); else POLICY_FLAG=(--policy "$POLICY"); fi
"$BIN/vllm-router" --worker-urls "${URLS[@]}" "${POLICY_FLAG[@]}" --port "$RPORT" --prometheus-port "$MPORT" &
PIDS+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$RPORT/readiness" >/dev/null && break; sleep 0.05; done
ROUTER="http://127.0.0.1:$RPORT"
echo "== router on $ROUTER: $(curl -s $ROUTER/readiness)"

echo "== curl, non-streaming chat completions"
for i in 1 2 3 4 5 6; do
  curl -s -D /tmp/qs_headers -o /tmp/qs_body "$ROUTER/v1/chat/completions" -H 'content-type: application/json' \
    -d "{\"model\":\"sim-model\",\"messages\":[{\"role\":\"user\",\"content\":\"question $i\"}],\"max_tokens\":4}"
  W=$(awk -F': ' 'tolower($1)=="x-vllm-sim-worker"{print $2}' /tmp/qs_headers | tr -d '\r')
  RID=$(awk -F': ' 'tolower($1)=="x-request-id"{print $2}' /tmp/qs_headers | tr -d '\r')
  echo "   request $i -> $W  (x-request-id $RID): $(python3 -c 'import json,sys; print(json.load(open("/tmp/qs_body"))["choices"][0]["message"]["content"])')"
done

echo "== curl, streaming completion (SSE chunks as they arrive)"
curl -sN "$ROUTER/v1/completions" -H 'content-type: application/json' \
  -d '{"model":"sim-model","prompt":"Once upon a time","max_tokens":4,"stream":true}' | sed 's/^/   /' | grep -v '^   $'

echo "== official openai Python client"
python3 - "$ROUTER" <<'PY'
import sys, openai
c = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", max_retries=0)
for i in range(3):
    r = c.chat.completions.create(model="sim-model", messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=3)
    print(f"   non-stream {i} -> {r.system_fingerprint}: {r.choices[0].message.content!r}")
s = c.chat.completions.create(model="sim-model", messages=[{"role": "user", "content": "stream"}], max_tokens=5, stream=True)
parts, worker = [], None
for ch in s:
    worker = ch.system_fingerprint or worker
    if ch.choices and ch.choices[0].delta.content:
        parts.append(ch.choices[0].delta.content)
print(f"   stream -> {worker}: {len(parts)} chunks {''.join(parts)!r}")
PY

echo "== router metrics (requests per worker)"
curl -s "http://127.0.0.1:$MPORT/metrics" | grep '^vllm_router_worker_requests_total' | sed 's/^/   /'
echo "== done; stopping workers and router"
