#!/usr/bin/env bash
# One pinned load run against the router (or nginx), optionally profiled: the quick loop
# behind the numbers in docs/performance.md. The proxy runs alone on core 0; two
# simulated workers and wrk (-t1 -c64, 6 s) share core 1.
#
# Usage: bash tests/bench/pinned_profile.sh WORKLOAD [TOOL] [SYSTEM]
#   WORKLOAD  c64 (small chat completion) | s64 (16-chunk SSE stream)
#   TOOL      none (default) | perf (perf record -g, 5 s -> target/bench/perf.data;
#               PERF_CALLGRAPH="--call-graph dwarf,16384" for inclusive costs by function)
#             | strace (strace -c, 5 s -> target/bench/strace.txt)
#             | ctx (context switches per thread, before/after)
#   SYSTEM    router (default: $ROUTER_BIN or target/release/vllm-router, round_robin) | nginx
#             | floor (target/release/floor-proxy: hyper + Tokio and nothing else, the
#               floor of our stack; see tests/src/bin/floor-proxy.rs)
# Prints requests, req/s and CPU µs per request, and its kernel part (utime + stime of the proxy's processes
# over the run). Needs: cargo build --release, wrk (and nginx/perf/strace when asked;
# `python3 tests/bench/compare_routers.py` installs wrk, nginx and haproxy).
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${1:?usage: pinned_profile.sh c64|s64 [none|perf|strace|ctx] [router|nginx|floor]}
TOOL=${2:-none}
SYSTEM=${3:-router}
OUT=target/bench
mkdir -p "$OUT"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
P1=$(port); P2=$(port); RP=$(port)
PIDS_STARTED=()
cleanup() { for p in "${PIDS_STARTED[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
taskset -c 1 target/release/vllm-sim --port "$P1" --worker-id a --record false --cache-blocks 0 >/dev/null 2>&1 &
PIDS_STARTED+=($!)
taskset -c 1 target/release/vllm-sim --port "$P2" --worker-id b --record false --cache-blocks 0 >/dev/null 2>&1 &
PIDS_STARTED+=($!)
if [ "$SYSTEM" = nginx ]; then
  D=$OUT/proxy-conf/pinned-nginx; mkdir -p "$D"/{body,proxy,fastcgi,uwsgi,scgi}
  cat > "$D/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $PWD/$D/nginx.pid;
error_log stderr crit;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $PWD/$D/body; proxy_temp_path $PWD/$D/proxy;
  fastcgi_temp_path $PWD/$D/fastcgi; uwsgi_temp_path $PWD/$D/uwsgi; scgi_temp_path $PWD/$D/scgi;
  upstream workers { server 127.0.0.1:$P1; server 127.0.0.1:$P2; keepalive 256; }
  server {
    listen 127.0.0.1:$RP;
    location / { proxy_pass http://workers; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; }
  }
}
EOF
  taskset -c 0 "$(command -v nginx || echo /usr/sbin/nginx)" -e stderr -p "$PWD/$D" -c "$PWD/$D/nginx.conf" >/dev/null 2>&1 &
elif [ "$SYSTEM" = floor ]; then
  taskset -c 0 target/release/floor-proxy "$RP" "http://127.0.0.1:$P1" "http://127.0.0.1:$P2" >/dev/null 2>&1 &
else
  taskset -c 0 "${ROUTER_BIN:-target/release/vllm-router}" --port "$RP" --policy round_robin --prometheus-port "$(port)" \
    --log-level warn --engine-metrics-interval-ms 0 \
    --worker-urls "http://127.0.0.1:$P1" "http://127.0.0.1:$P2" >/dev/null 2>&1 &
fi
R=$!
PIDS_STARTED+=("$R")
for _ in $(seq 100); do
  curl -s -o /dev/null -XPOST "127.0.0.1:$RP/v1/chat/completions" -H 'content-type: application/json' \
    -d '{"model":"m","messages":[{"role":"user","content":"x"}]}' && break
  sleep 0.1
done
if [ "$W" = s64 ]; then
  BODY='{"model":"sim-model","messages":[{"role":"user","content":"hello, how are you today?"}],"max_tokens":16,"stream":true}'
else
  BODY='{"model":"sim-model","messages":[{"role":"user","content":"hello, how are you today?"}],"max_tokens":4}'
fi
printf 'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = %s\n' "'$BODY'" > "$OUT/pinned.lua"
PIDS="$R $(pgrep -P "$R" || true)"
cpu() { for p in $PIDS; do awk '{print $14+$15}' "/proc/$p/stat"; done | paste -sd+ | bc; }
sys() { for p in $PIDS; do awk '{print $15}' "/proc/$p/stat"; done | paste -sd+ | bc; }
ctx() { for t in /proc/"$R"/task/*; do echo "$(cat "$t/comm") $(grep -h ctxt_switches "$t/status" | awk '{print $2}' | paste -sd/)"; done; }
TP=
case "$TOOL" in
  perf) perf record -F 1999 ${PERF_CALLGRAPH:--g} -p "$R" -o "$OUT/perf.data" -- sleep 5 >/dev/null 2>&1 & TP=$! ;;
  strace) timeout 5 strace -c -f -p "$( [ "$SYSTEM" = nginx ] && pgrep -P "$R" | head -1 || echo "$R")" -o "$OUT/strace.txt" >/dev/null 2>&1 & TP=$! ;;
  ctx) ctx > "$OUT/ctx.before" ;;
esac
C0=$(cpu); S0=$(sys)
RES=$(taskset -c 1 wrk -t1 -c64 -d6s -s "$OUT/pinned.lua" "http://127.0.0.1:$RP/v1/chat/completions")
C1=$(cpu); S1=$(sys)
[ -n "$TP" ] && wait "$TP" || true
N=$(echo "$RES" | grep -oP '\d+(?= requests in)')
RPS=$(echo "$RES" | grep -oP 'Requests/sec:\s+\K[\d.]+')
echo "$SYSTEM $W: $N requests, $RPS req/s, $(python3 -c "print(round(($C1-$C0)*1e6/$(getconf CLK_TCK)/$N,1))") µs CPU per request ($(python3 -c "print(round(($S1-$S0)*1e6/$(getconf CLK_TCK)/$N,1))") µs in the kernel) $(echo "$RES" | grep -i 'non-2xx\|socket errors' || true)"
case "$TOOL" in
  perf) echo "profile: perf report -i $OUT/perf.data --no-children --sort sym -g none" ;;
  strace) head -12 "$OUT/strace.txt" ;;
  ctx) ctx > "$OUT/ctx.after"; echo "thread voluntary/involuntary switches, before -> after:"; paste "$OUT/ctx.before" "$OUT/ctx.after" ;;
esac
