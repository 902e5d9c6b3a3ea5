#!/usr/bin/env bash
# User-space instructions per request, counted exactly (valgrind's callgrind), for A/B of
# changes worth less than this machine's CPU-time noise (±10 µs per pinned run hides a
# 1 µs change; an instruction count does not move between runs of the same binary by
# more than ~1 %).
#
# Usage: bash tests/bench/instructions.sh [BIN ...]
#   BIN   a vllm-router binary (run with --policy $POLICY, default round_robin) or a
#         floor-proxy binary; default: target/release/floor-proxy target/release/vllm-router
# Each BIN runs alone under callgrind (instrumentation switched on after a 3 s warm-up)
# while wrk sends 20 s of the pinned bench's small chat completion over 8 connections
# to two simulated workers. Prints Ir (instructions) per request for each, then, against
# the first BIN, the functions whose instructions per request differ most
# (tests/bench/callgrind_diff.py). Files: target/bench/instructions/*.callgrind.
# Kernel work (system calls, TCP) is not counted: see pinned_profile.sh for that part.
# Needs: cargo build --release --workspace; installs valgrind and wrk (Debian) if missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=target/bench/instructions
mkdir -p "$OUT"
if [ $# -eq 0 ]; then set -- target/release/floor-proxy target/release/vllm-router; fi
if ! command -v valgrind >/dev/null || ! command -v wrk >/dev/null; then
  (cd tests/bench && python3 -c 'import compare_routers as c; c.apt_install(["valgrind", "wrk"])')
fi
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PIDS_STARTED=()
cleanup() { for p in "${PIDS_STARTED[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
P1=$(port); P2=$(port)
target/release/vllm-sim --port "$P1" --worker-id a --record false --cache-blocks 0 >/dev/null 2>&1 &
PIDS_STARTED+=($!)
target/release/vllm-sim --port "$P2" --worker-id b --record false --cache-blocks 0 >/dev/null 2>&1 &
PIDS_STARTED+=($!)
BODY='{"model":"sim-model","messages":[{"role":"user","content":"hello, how are you today?"}],"max_tokens":4}'
printf 'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = %s\n' "'$BODY'" > "$OUT/chat.lua"
FILES=()
for BIN in "$@"; do
  NAME=$(basename "$BIN")-$(sha256sum "$BIN" | cut -c1-8)
  F="$OUT/$NAME.callgrind"
  rm -f "$F" "$F".*
  RP=$(port)
  # MIMALLOC_ARENA_EAGER_COMMIT set: the router does not re-exec itself (valgrind would
  # lose it).
  if [ "$(basename "$BIN")" = floor-proxy ]; then
    ARGS=("$RP" "http://127.0.0.1:$P1" "http://127.0.0.1:$P2")
  else
    ARGS=(--port "$RP" --policy "${POLICY:-round_robin}" --prometheus-port "$(port)" --log-level warn \
      --engine-metrics-interval-ms 0 --worker-urls "http://127.0.0.1:$P1" "http://127.0.0.1:$P2")
  fi
  MIMALLOC_ARENA_EAGER_COMMIT=0 valgrind --tool=callgrind --instr-atstart=no \
    --callgrind-out-file="$F" "$BIN" "${ARGS[@]}" >"$OUT/$NAME.log" 2>&1 &
  R=$!
  PIDS_STARTED+=("$R")
  echo "== $BIN: starting under callgrind (slow: up to a minute)"
  up=
  for _ in $(seq 600); do
    curl -s -o /dev/null -XPOST "127.0.0.1:$RP/v1/chat/completions" -H 'content-type: application/json' \
      -d '{"model":"m","messages":[{"role":"user","content":"x"}]}' && { up=1; break; }
    sleep 0.2
  done
  [ -n "$up" ] || { echo "error: $BIN did not answer within 120 s; see $OUT/$NAME.log" >&2; exit 1; }
  wrk -t1 -c8 -d3s -s "$OUT/chat.lua" "http://127.0.0.1:$RP/v1/chat/completions" >/dev/null
  callgrind_control -i on "$R" >/dev/null
  echo "   counting: 20 s of load"
  RES=$(wrk -t1 -c8 -d20s -s "$OUT/chat.lua" "http://127.0.0.1:$RP/v1/chat/completions")
  callgrind_control -i off "$R" >/dev/null
  callgrind_control -d "$R" >/dev/null 2>&1
  kill "$R" 2>/dev/null || true
  wait "$R" 2>/dev/null || true
  FILES+=("$F.1")
  echo "   $(echo "$RES" | grep -oP '\d+(?= requests in)') requests; $(echo "$RES" | grep -i 'non-2xx\|socket errors' || echo 'no errors')"
done
python3 tests/bench/callgrind_diff.py "${FILES[@]}"
