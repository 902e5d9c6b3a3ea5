#!/usr/bin/env bash
# Remove what deploy.sh created: bash cleanup.sh [regular|pd]
set -euo pipefail
cd "$(dirname "$0")"
NS="${NAMESPACE:-default}"
kubectl -n "$NS" delete -k "overlays/${1:-regular}" --ignore-not-found
kubectl -n "$NS" delete configmap vllm-router-policies --ignore-not-found
