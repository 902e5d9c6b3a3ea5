#!/usr/bin/env bash
# Deploy vllm-router with an overlay: bash deploy.sh [regular|pd] [POLICY]
#   POLICY: a built-in name (written out with --export-policy) or a .wasm file.
# Needs kubectl pointing at a cluster and the image `vllm-router:latest` available to it
# (docker build -t vllm-router:latest . at the repository root, then push or load it).
set -euo pipefail
cd "$(dirname "$0")"
OVERLAY="${1:-regular}"
POLICY="${2:-cache_aware}"
NS="${NAMESPACE:-default}"
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
if [ -f "$POLICY" ]; then
  cp "$POLICY" "$WORK/policy.wasm"
else
  BIN="${VLLM_ROUTER_BIN:-$(command -v vllm-router || echo ../../target/release/vllm-router)}"
  "$BIN" --export-policy "$POLICY=$WORK/policy.wasm"
fi
# The policy file as a ConfigMap; re-running this with another policy is a hot swap.
kubectl -n "$NS" create configmap vllm-router-policies --from-file=policy.wasm="$WORK/policy.wasm" \
  --dry-run=client -o yaml | kubectl -n "$NS" apply -f -
kubectl -n "$NS" apply -k "overlays/$OVERLAY"
kubectl -n "$NS" rollout status deployment/vllm-router --timeout=300s
echo "router: kubectl -n $NS port-forward svc/vllm-router 30000:30000 29000:29000"
