// Package policytest runs a vllm-router policy natively under `go test`: fake requests
// and candidates, and the constructor called the way the router calls it.
//
//	p, err := policy.New(`{"max_waiting": 4}`)          // the registered constructor
//	d := p.Select(&policytest.Request{Text: "hi"}, policytest.Idle(3))
package policytest

import (
	"strings"

	"vllm-router.dev/sdk/policy"
)

// Request is a fake client request; zero fields read as absent or empty.
type Request struct {
	URLPath  string            // default /v1/chat/completions
	ModelID  string            // "" = no model field
	Headers  map[string]string // names are matched case-insensitively
	Fields   map[string]string // body fields by dotted path
	Text     string            // routing text
	Length   uint64
	ID       string
	ForStage policy.Stage
}

func (r *Request) Path() string {
	if r.URLPath == "" {
		return "/v1/chat/completions"
	}
	return r.URLPath
}
func (r *Request) Model() (string, bool) { return r.ModelID, r.ModelID != "" }
func (r *Request) Header(name string) (string, bool) {
	for k, v := range r.Headers {
		if strings.EqualFold(k, name) {
			return v, true
		}
	}
	return "", false
}
func (r *Request) BodyField(path string) (string, bool) { v, ok := r.Fields[path]; return v, ok }
func (r *Request) RoutingText() string                  { return r.Text }
func (r *Request) BodyLength() uint64                   { return r.Length }
func (r *Request) RequestID() string {
	if r.ID == "" {
		return "test-request"
	}
	return r.ID
}
func (r *Request) Stage() policy.Stage { return r.ForStage }

// Idle returns n candidates with ids 0..n-1, nothing in flight, no engine sample.
func Idle(n int) []policy.Candidate {
	out := make([]policy.Candidate, n)
	for i := range out {
		out[i].ID = uint32(i)
	}
	return out
}

// Loaded returns one candidate per in-flight count, ids 0..n-1.
func Loaded(inFlight ...uint32) []policy.Candidate {
	out := Idle(len(inFlight))
	for i, f := range inFlight {
		out[i].InFlight = f
	}
	return out
}

// WithWaiting attaches an engine sample with `waiting` queued requests to c.
func WithWaiting(c policy.Candidate, waiting uint32) policy.Candidate {
	c.Engine = &policy.EngineLoad{Waiting: waiting}
	return c
}
