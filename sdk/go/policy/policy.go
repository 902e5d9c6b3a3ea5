// Package policy is the Go SDK for vllm-router load-balancing policies.
//
// A policy implements [Policy] (and, optionally, [WorkersObserver],
// [CompletionObserver], [StateKeeper]) and registers a constructor from an init
// function:
//
//	func init() { policy.Register(New) }
//	func main() {}
//
// Built with mainline Go (`GOOS=wasip1 GOARCH=wasm go build -buildmode=c-shared`) and
// turned into a component with the SDK's adapter (see `sdk/go/README.md` or
// `vllm-router policy new NAME --lang go`), the policy imports no WASI at all: the
// adapter answers the Go runtime's WASI calls itself (no arguments, no environment, no
// files; stdout/stderr go to the router's log; clocks never call out, so the garbage
// collector may run inside cabi_realloc, see wasmtime#14318).
//
// The bindings for the `vllm:router-policy@0.1.0` world are written by hand in this
// package (abi_wasip1.go): no wit-bindgen, no module proxy, nothing TinyGo cannot build.
// Natively (go test) the same types work with fake requests from package policytest.
package policy

import "strconv"

// WorkerID is the router's dense id for a worker (stable for the worker's lifetime).
type WorkerID = uint32

// Role of a worker in a vLLM deployment.
type Role uint8

const (
	Regular Role = iota // serves whole requests
	Prefill             // prefill instance of a PD deployment
	Decode              // decode instance of a PD deployment
)

// Stage of a request a decision or completion is for.
type Stage uint8

const (
	StageRegular Stage = iota // a whole request
	StagePrefill              // the prefill stage of a PD request
	StageDecode               // the decode stage of a PD request
)

// Level of a log line.
type Level uint8

const (
	Debug Level = iota
	Info
	Warn
	Error
)

// Worker is the static description of a worker, sent by WorkersChanged.
type Worker struct {
	ID     WorkerID
	URL    string // e.g. http://10.0.1.2:8000, without the data-parallel suffix
	Role   Role
	DPRank *uint32 // data-parallel rank when the URL serves several, else nil
	Labels [][2]string
}

// EngineLoad is what the router scraped from the worker's vLLM /metrics.
type EngineLoad struct {
	Running         uint32 // vllm:num_requests_running
	Waiting         uint32 // vllm:num_requests_waiting
	KVCachePermille uint16 // vllm:kv_cache_usage_perc, 0..=1000
}

// Candidate is one worker a request may go to (healthy, circuit breaker admitting).
type Candidate struct {
	ID       WorkerID
	InFlight uint32      // requests this router dispatched to it and not finished
	Engine   *EngineLoad // nil when the router has no fresh engine sample
}

// Load is router in-flight plus, when known, the engine's waiting queue (requests).
func (c Candidate) Load() uint64 {
	l := uint64(c.InFlight)
	if c.Engine != nil {
		l += uint64(c.Engine.Waiting)
	}
	return l
}

// Request is the client request being routed. Every accessor copies only what it
// returns from the router: read only what the policy needs.
type Request interface {
	Path() string                          // URL path, e.g. /v1/chat/completions
	Model() (string, bool)                 // the body's model field
	Header(name string) (string, bool)     // a header the client sent (case-insensitive)
	BodyField(path string) (string, bool)  // a scalar body field by dotted path (user, a.b)
	RoutingText() string                   // the prompt's text, for prefix-cache affinity
	BodyLength() uint64                    // body size in bytes
	RequestID() string                     // the router's request id
	Stage() Stage                          // the stage this decision is for
}

// Decision is Select's answer: Pick(id) or Decline(reason).
type Decision struct {
	Worker   WorkerID
	Declined bool
	Reason   string
}

// Pick sends the request to worker id (must be one of the candidates).
func Pick(id WorkerID) Decision { return Decision{Worker: id} }

// Decline lets the router's fallback (fewest in-flight) decide; not a fault.
func Decline(reason string) Decision { return Decision{Declined: true, Reason: reason} }

// Completion is feedback after a request stage this policy routed ended.
type Completion struct {
	Worker      WorkerID
	Status      uint16  // HTTP status, 0 when no response arrived
	LatencyMs   uint32  // dispatch to end of body, ms
	FirstByteMs *uint32 // dispatch to first body byte, ms
	Stage       Stage
}

// Policy chooses a worker for each request.
type Policy interface {
	Select(req Request, candidates []Candidate) Decision
}

// WorkersObserver receives the full worker set after init and whenever it changes.
type WorkersObserver interface{ WorkersChanged(workers []Worker) }

// CompletionObserver receives feedback once per request stage the policy decided.
type CompletionObserver interface{ OnComplete(done Completion) }

// StateKeeper carries state across a hot swap (export from the old version, import
// into the new one; an error means "start cold").
type StateKeeper interface {
	ExportState() []byte
	ImportState(state []byte) error
}

var factory func(config string) (Policy, error)

// Register sets the constructor the router calls with the policy's JSON config (an
// object, "{}" when none). Call it from an init function. An error refuses the load.
func Register(f func(config string) (Policy, error)) { factory = f }

// DecodeCandidates turns the packed words of the contract (id | in-flight<<32; engine:
// running 24 bits, waiting 24, KV per-mille 11, bit 63 = present) into candidates.
// engine is empty when the router has no engine metrics.
func DecodeCandidates(words, engine []uint64) []Candidate {
	out := make([]Candidate, len(words))
	for i, w := range words {
		out[i] = Candidate{ID: uint32(w), InFlight: uint32(w >> 32)}
		if i < len(engine) && engine[i]>>63 == 1 {
			e := engine[i]
			out[i].Engine = &EngineLoad{
				Running:         uint32(e & 0xFFFFFF),
				Waiting:         uint32((e >> 24) & 0xFFFFFF),
				KVCachePermille: uint16((e >> 48) & 0x7FF),
			}
		}
	}
	return out
}

// ConfigInt reads a top-level integer field of a flat JSON object config (as given to
// the constructor) without encoding/json (which adds ~1 MB to a component). Returns
// def when the key is absent or not an integer.
func ConfigInt(config, key string, def int64) int64 {
	v, ok := configRaw(config, key)
	if !ok {
		return def
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		return def
	}
	return n
}

// ConfigString reads a top-level string field (no escapes other than \" and \\).
func ConfigString(config, key, def string) string {
	v, ok := configRaw(config, key)
	if !ok || len(v) < 2 || v[0] != '"' {
		return def
	}
	out := make([]byte, 0, len(v))
	for i := 1; i < len(v)-1; i++ {
		if v[i] == '\\' && i+1 < len(v)-1 {
			i++
		}
		out = append(out, v[i])
	}
	return string(out)
}

// configRaw finds `"key": value` at the top level of a JSON object and returns the raw
// value text (a quoted string, or a scalar up to the next ',' or '}').
func configRaw(config, key string) (string, bool) {
	depth, i := 0, 0
	for i < len(config) {
		c := config[i]
		switch {
		case c == '{' || c == '[':
			depth++
			i++
		case c == '}' || c == ']':
			depth--
			i++
		case c == '"':
			end := skipString(config, i)
			j := end
			for j < len(config) && (config[j] == ' ' || config[j] == '\n' || config[j] == '\t' || config[j] == '\r') {
				j++
			}
			isKey := j < len(config) && config[j] == ':'
			if isKey && depth == 1 && config[i+1:end-1] == key {
				j++
				for j < len(config) && (config[j] == ' ' || config[j] == '\n' || config[j] == '\t' || config[j] == '\r') {
					j++
				}
				if j < len(config) && config[j] == '"' {
					return config[j:skipString(config, j)], true
				}
				k := j
				for k < len(config) && config[k] != ',' && config[k] != '}' && config[k] != ' ' && config[k] != '\n' {
					k++
				}
				return config[j:k], k > j
			}
			i = end
		default:
			i++
		}
	}
	return "", false
}

// skipString returns the index just past the JSON string starting at config[i] == '"'.
func skipString(config string, i int) int {
	for j := i + 1; j < len(config); j++ {
		if config[j] == '\\' {
			j++
		} else if config[j] == '"' {
			return j + 1
		}
	}
	return len(config)
}
