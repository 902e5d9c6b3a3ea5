// {{name}}: a vllm-router policy in Go (the example policy every language template starts from).
//
// Fewest in-flight requests wins (ties: lowest id); workers whose engine queue exceeds
// max_waiting (from the config, default 8) are skipped; when every worker is over it the
// policy declines and the router's fallback decides. Logs once at init. Build: ./build.sh (writes {{name}}.wasm). Test natively: go test ./...
package main

import (
	"strconv"

	"vllm-router.dev/sdk/policy"
)

type leastInflight struct{ maxWaiting uint32 }

func newPolicy(config string) (policy.Policy, error) {
	p := &leastInflight{maxWaiting: uint32(policy.ConfigInt(config, "max_waiting", 8))}
	policy.Log(policy.Info, "{{name}} (go) ready, max_waiting="+strconv.Itoa(int(p.maxWaiting)))
	return p, nil
}

func (p *leastInflight) Select(req policy.Request, cands []policy.Candidate) policy.Decision {
	best, found := cands[0], false
	for _, c := range cands {
		if c.Engine != nil && c.Engine.Waiting > p.maxWaiting {
			continue
		}
		if !found || c.InFlight < best.InFlight {
			best, found = c, true
		}
	}
	if !found {
		return policy.Decline("every worker's queue is over max_waiting")
	}
	return policy.Pick(best.ID)
}

func init() { policy.Register(newPolicy) }

func main() {}
