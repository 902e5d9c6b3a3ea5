#!/usr/bin/env bash
# Run every fuzz target for a bounded time: bash fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
# Needs cargo-fuzz (installed here if missing). It builds with the project's stable
# toolchain and RUSTC_BOOTSTRAP=1 for the few unstable flags libFuzzer builds use (a
# nightly toolchain would also need the wasm32-wasip2 target for the built-in policies
# the host embeds). Crashes land in
# fuzz/artifacts/TARGET/; reproduce one with
#   cargo fuzz run TARGET fuzz/artifacts/TARGET/crash-...
# and turn it into a unit test next to the parser before fixing it; keep the input in
# fuzz/regressions/TARGET/ (replayed by every run).
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-60}"; shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(request_body pd_body_rewrite zmq_heartbeat vllm_metrics client_keys_file kv_events)
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
tc=()
export RUSTC_BOOTSTRAP=1
# No AddressSanitizer: the code under test is safe Rust; coverage-guided search is what
# finds panics. The seeds in corpus/ are real request bodies, heartbeats and metrics.
echo "== building the fuzz targets (first time: several minutes, wasmtime included)"
cargo "${tc[@]}" fuzz build -O --sanitizer none
status=0
summary=()
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  echo "== $t: ${secs}s"
  log="artifacts/$t/last-run.log"
  dirs=("corpus/$t" "seeds/$t")
  # Inputs that once crashed (kept in git, replayed first, now unit tests too).
  [ -d "regressions/$t" ] && dirs+=("regressions/$t")
  if cargo "${tc[@]}" fuzz run -O --sanitizer none "$t" "${dirs[@]}" -- \
      -max_total_time="$secs" -max_len=16384 -print_final_stats=1 >"$log" 2>&1; then
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || echo "?")
    summary+=("$t: ok, $execs runs, coverage $cov")
  else
    status=1
    summary+=("$t: CRASH, see $log and artifacts/$t/")
    grep -m5 -E "panicked|ERROR|Test unit written" "$log" || true
  fi
done
echo
echo "== fuzz summary (${secs}s per target)"
printf '  %s\n' "${summary[@]}"
exit $status
