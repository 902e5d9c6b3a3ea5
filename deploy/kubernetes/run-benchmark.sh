#!/usr/bin/env bash
# Benchmark the deployed router with vLLM's own tool (needs `pip install vllm` where it
# runs): bash run-benchmark.sh MODEL [URL]
#   URL defaults to a port-forward: kubectl port-forward svc/vllm-router 30000:30000
set -euo pipefail
MODEL="${1:?usage: run-benchmark.sh MODEL [URL]}"
URL="${2:-http://127.0.0.1:30000}"
vllm bench serve --backend openai-chat --base-url "$URL" --endpoint /v1/chat/completions \
  --model "$MODEL" --dataset-name random --random-input-len 1024 --random-output-len 128 \
  --num-prompts 500 --request-rate 10 --percentile-metrics ttft,tpot,itl,e2el
