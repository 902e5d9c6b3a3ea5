#!/usr/bin/env bash
# Quickstart: build vllm-router, start three simulated vLLM workers and the router with a
# policy loaded from a .wasm FILE (the product's own usage: `--policy-wasm ./lb.wasm`),
# send real OpenAI-style requests (curl and the official `openai` Python client, stream
# and non-stream), then replace the policy file while traffic flows and show which policy
# version served each request. Stops everything it started.
#
#   bash examples/quickstart.sh [FIRST [SECOND]]   # built-in names or .wasm paths;
#                                                  # default: round_robin, then cache_aware
set -euo pipefail
cd "$(dirname "$0")/.."
FIRST="${1:-round_robin}"
SECOND="${2:-cache_aware}"

echo "== installing what is missing (wasm32-wasip2 target, openai client)"
rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2 >/dev/null
python3 -c 'import openai' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check "openai>=1.40"
echo "== building (first build compiles wasmtime: ~8-10 min on 2 cores)"
cargo build --release --locked --workspace 2>&1 | grep -E "^(error|warning: unused)|Finished" || true
BIN=target/release
[ -x "$BIN/vllm-router" ] || { echo "build failed"; exit 1; }

PIDS=()
WORK=$(mktemp -d)
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT INT TERM

# A policy file: a built-in written out with --export-policy, or a .wasm you built.
policy_file() {  # NAME_OR_PATH DEST
  if [ -f "$1" ]; then cp "$1" "$2"; else "$BIN/vllm-router" --export-policy "$1=$2" >/dev/null; fi
}

URLS=()
for i in 1 2 3; do
  LOG="$WORK/sim$i.log"
  "$BIN/vllm-sim" --port 0 --worker-id "worker-$i" --token-delay-ms 20 >"$LOG" &
  PIDS+=($!)
  for _ in $(seq 50); do grep -q LISTENING "$LOG" && break; sleep 0.1; done
  PORT=$(awk '/LISTENING/{print $2}' "$LOG")
  URLS+=("http://127.0.0.1:$PORT")
  echo "   simulated vLLM worker-$i on http://127.0.0.1:$PORT"
done

POLICY="$WORK/lb.wasm"
policy_file "$FIRST" "$POLICY"
KEY="quickstart-admin-key-$RANDOM$RANDOM"
MPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
echo "== vllm-router --policy-wasm $POLICY  ($FIRST)"
"$BIN/vllm-router" --worker-urls "${URLS[@]}" --policy-wasm "$POLICY" --port 0 --prometheus-port "$MPORT" \
  --admin-api-key "$KEY" --watch-debounce-ms 50 --log-level warn,vllm_router::app=info,vllm_router::policy=info >"$WORK/router.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 300); do grep -q "listening on" "$WORK/router.log" && break; sleep 0.05; done
ROUTER=$(grep -o 'listening on http://[0-9.:]*' "$WORK/router.log" | awk '{print $3}')
[ -n "$ROUTER" ] || { cat "$WORK/router.log"; echo "router did not start"; exit 1; }
echo "== router on $ROUTER: $(curl -s "$ROUTER/readiness")"

serving_version() {
  curl -s -H "Authorization: Bearer $KEY" "$ROUTER/admin/policies" |
    python3 -c 'import json,sys; s=json.load(sys.stdin)["slots"][0]; print(s["policy"]+"@"+s["version"])'
}

echo "== curl, non-streaming chat completions"
for i in 1 2 3 4 5 6; do
  curl -s -D "$WORK/h" -o "$WORK/b" "$ROUTER/v1/chat/completions" -H 'content-type: application/json' \
    -d "{\"model\":\"sim-model\",\"messages\":[{\"role\":\"user\",\"content\":\"question $i\"}],\"max_tokens\":4}"
  W=$(awk -F': ' 'tolower($1)=="x-vllm-sim-worker"{print $2}' "$WORK/h" | tr -d '\r')
  RID=$(awk -F': ' 'tolower($1)=="x-request-id"{print $2}' "$WORK/h" | tr -d '\r')
  echo "   request $i -> $W  (x-request-id $RID): $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["choices"][0]["message"]["content"])' "$WORK/b")"
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

echo "== live swap: replace $POLICY with $SECOND while requests flow"
policy_file "$SECOND" "$WORK/next.wasm"
FAILED=0
for i in $(seq 1 16); do
  if [ "$i" = 6 ]; then
    mv "$WORK/next.wasm" "$POLICY"   # atomic rename; `cp` over the file works too
    echo "   -- policy file replaced"
  fi
  CODE=$(curl -s -o /dev/null -w '%{http_code}' -D "$WORK/h" "$ROUTER/v1/chat/completions" -H 'content-type: application/json' \
    -d "{\"model\":\"sim-model\",\"messages\":[{\"role\":\"system\",\"content\":\"You are terse.\"},{\"role\":\"user\",\"content\":\"turn $i\"}],\"max_tokens\":2}")
  [ "$CODE" = 200 ] || FAILED=$((FAILED + 1))
  W=$(awk -F': ' 'tolower($1)=="x-vllm-sim-worker"{print $2}' "$WORK/h" | tr -d '\r')
  echo "   request $i -> $W ($CODE), serving version now: $(serving_version)"
  sleep 0.05
done
grep -o 'policy swapped.*' "$WORK/router.log" | sed 's/^/   log: /' || true
echo "   failed requests during the swap: $FAILED"

echo "== router metrics"
curl -s "http://127.0.0.1:$MPORT/metrics" | grep -E '^vllm_router_(worker_requests_total|policy_reloads_total)' | sed 's/^/   /'
echo "== fleet vLLM metrics on the serving port (summed over the workers)"
curl -s "$ROUTER/metrics" | grep -E '^(# vllm-router|vllm:request_success_total)' | sed 's/^/   /'
echo "== done; stopping workers and router"
[ "$FAILED" = 0 ]
