//go:build !wasip1

// Natively (go test, tooling) the host functions are local stand-ins.

package policy

import (
	"fmt"
	"math/rand/v2"
	"os"
	"time"
)

var started = time.Now()

// Log writes the line to stderr (in the router: to its log, tagged with the policy).
func Log(level Level, msg string) {
	fmt.Fprintf(os.Stderr, "policy log [%d]: %s\n", level, msg)
}

// NowMs is milliseconds since the process started (in the router: since it started).
func NowMs() uint64 { return uint64(time.Since(started).Milliseconds()) }

// Random is 64 random bits.
func Random() uint64 { return rand.Uint64() }

// New calls the registered constructor, as the router's init does: what a native test
// uses to build the policy exactly as the router would.
func New(config string) (Policy, error) {
	if factory == nil {
		return nil, fmt.Errorf("no policy registered: call policy.Register from an init function")
	}
	return factory(config)
}
