package policy

import "testing"

func TestDecodeCandidatesMatchesTheContract(t *testing.T) {
	eng := uint64(1)<<63 | uint64(700)<<48 | uint64(5)<<24 | 3
	c := DecodeCandidates([]uint64{uint64(7) | uint64(2)<<32, 9}, []uint64{eng, 0})
	if c[0].ID != 7 || c[0].InFlight != 2 || c[0].Engine == nil {
		t.Fatalf("first: %+v", c[0])
	}
	if e := *c[0].Engine; e.Running != 3 || e.Waiting != 5 || e.KVCachePermille != 700 {
		t.Fatalf("engine: %+v", e)
	}
	if c[1].ID != 9 || c[1].Engine != nil {
		t.Fatalf("second: %+v", c[1])
	}
	if c[0].Load() != 7 {
		t.Fatalf("load %d", c[0].Load())
	}
}

func TestConfigHelpersReadTopLevelFieldsOnly(t *testing.T) {
	cfg := `{"nested": {"max_waiting": 1}, "name": "max_waiting", "max_waiting" : 12, "label": "a\"b"}`
	if got := ConfigInt(cfg, "max_waiting", 4); got != 12 {
		t.Fatalf("max_waiting = %d", got)
	}
	if got := ConfigInt(`{}`, "max_waiting", 4); got != 4 {
		t.Fatalf("default = %d", got)
	}
	if got := ConfigInt(`{"max_waiting": "x"}`, "max_waiting", 4); got != 4 {
		t.Fatalf("non-integer = %d", got)
	}
	if got := ConfigString(cfg, "label", ""); got != `a"b` {
		t.Fatalf("label = %q", got)
	}
}
