#!/usr/bin/env bash
# Idle CPU of the router: one simulated worker, no traffic; CPU clock ticks (utime +
# stime from /proc/PID/stat) over N seconds, printed as a percentage of one core.
#   bash tests/bench/idle_cpu.sh [SECONDS] [extra router flags...]
#   BIN=/path/to/other/build bash tests/bench/idle_cpu.sh 10    # compare another binary
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-target/release}
N=${1:-10}
SIMBIN=${SIMBIN:-target/release}
OUT=$(mktemp)
"$SIMBIN/vllm-sim" --port 0 --worker-id idle >"$OUT" & SP=$!
trap 'kill $SP ${RP:-} 2>/dev/null || true; rm -f "$OUT"' EXIT
for _ in $(seq 50); do grep -q LISTENING "$OUT" && break; sleep 0.1; done
P=$(awk '/LISTENING/{print $2}' "$OUT")
"$BIN/vllm-router" --worker-urls "http://127.0.0.1:$P" --port 0 --prometheus-port 0 --log-level warn "${@:2}" & RP=$!
sleep 2   # start-up (policy compilation) is not idle time
t0=$(awk '{print $14+$15}' /proc/$RP/stat)
echo "measuring $N s of idle..." >&2
sleep "$N"
t1=$(awk '{print $14+$15}' /proc/$RP/stat)
HZ=$(getconf CLK_TCK)
python3 -c "t=$t1-$t0; print(f'idle router: {t} clock ticks in $N s = {100*t/$HZ/$N:.2f} % of a core')"
