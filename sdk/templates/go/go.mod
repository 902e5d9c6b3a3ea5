module example.com/{{name}}

go 1.24

require vllm-router.dev/sdk v0.1.0

// The SDK ships inside this project (no module proxy needed).
replace vllm-router.dev/sdk => ./vllm-router/sdk-go
