#!/usr/bin/env bash
# The test command: builds everything (router, simulator, built-in and example policy
# components), then runs the Rust unit and end-to-end tests and the Python client tests.
# Needs: rustup target wasm32-wasip2; Python packages from tests/python/requirements.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
echo "== build: router, simulator, example policy component"
cargo build --release --workspace --locked
# Example and test-only components (pick_first/pick_last for hot-swap tests, hostile
# policies for the sandbox tests, a component of another world).
cargo build --locked --target wasm32-wasip2 --profile policy --target-dir target/policy-wasm \
  -p least-inflight-policy -p test-policy-pick-first -p test-policy-pick-last \
  -p test-policy-hostile -p test-other-world -p test-policy-probe
echo "== cargo test"
cargo test --release --workspace --locked
echo "== python client tests (official openai client against the router)"
python3 -m pytest -q tests/python
