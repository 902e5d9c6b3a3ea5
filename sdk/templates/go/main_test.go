package main

import (
	"testing"

	"vllm-router.dev/sdk/policy"
	"vllm-router.dev/sdk/policytest"
)

func TestPicksFewestInFlightAndSkipsLongQueues(t *testing.T) {
	p, err := policy.New(`{"max_waiting": 4}`)
	if err != nil {
		t.Fatal(err)
	}
	req := &policytest.Request{Text: "hello"}
	if d := p.Select(req, policytest.Loaded(3, 1, 2)); d.Declined || d.Worker != 1 {
		t.Fatalf("fewest in-flight: %+v", d)
	}
	c := policytest.Loaded(3, 1, 2)
	c[1] = policytest.WithWaiting(c[1], 9)
	if d := p.Select(req, c); d.Worker != 2 {
		t.Fatalf("queue over max_waiting not skipped: %+v", d)
	}
	all := []policy.Candidate{policytest.WithWaiting(c[0], 5)}
	if d := p.Select(req, all); !d.Declined {
		t.Fatalf("expected a decline: %+v", d)
	}
}
