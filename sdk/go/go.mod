module vllm-router.dev/sdk

go 1.24
