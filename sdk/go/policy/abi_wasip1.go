//go:build wasip1

// The canonical-ABI glue for the vllm:router-policy@0.1.0 world, by hand (the world is
// small; see wit/policy.wit for the layouts quoted here). Rules it keeps:
//   - the borrowed request handle is dropped before select returns (the component model
//     traps with "borrow handles still remain at the end of the call" otherwise);
//   - memory the router writes into (cabi_realloc) stays reachable until the export that
//     receives it returns (pins), then is left to the GC;
//   - results live in package-level buffers (Go's GC never moves memory).

package policy

import (
	"unsafe"
)

//go:wasmimport vllm:router-policy/host@0.1.0 log
func hostLog(level uint32, ptr unsafe.Pointer, n uint32)

//go:wasmimport vllm:router-policy/host@0.1.0 now-ms
func hostNowMs() uint64

//go:wasmimport vllm:router-policy/host@0.1.0 random
func hostRandom() uint64

//go:wasmimport vllm:router-policy/types@0.1.0 [method]request.path
func reqPath(self uint32, ret unsafe.Pointer)

//go:wasmimport vllm:router-policy/types@0.1.0 [method]request.model
func reqModel(self uint32, ret unsafe.Pointer)

//go:wasmimport vllm:router-policy/types@0.1.0 [method]request.header
func reqHeader(self uint32, name unsafe.Pointer, n uint32, ret unsafe.Pointer)

//go:wasmimport vllm:router-policy/types@0.1.0 [method]request.body-field
func reqBodyField(self uint32, path unsafe.Pointer, n uint32, ret unsafe.Pointer)

//go:wasmimport vllm:router-policy/types@0.1.0 [method]request.routing-text
func reqRoutingText(self uint32, ret unsafe.Pointer)

//go:wasmimport vllm:router-policy/types@0.1.0 [method]request.body-length
func reqBodyLength(self uint32) uint64

//go:wasmimport vllm:router-policy/types@0.1.0 [method]request.request-id
func reqRequestID(self uint32, ret unsafe.Pointer)

//go:wasmimport vllm:router-policy/types@0.1.0 [method]request.stage
func reqStage(self uint32) uint32

//go:wasmimport vllm:router-policy/types@0.1.0 [resource-drop]request
func reqDrop(self uint32)

// Log writes a line to the router's log, tagged with the policy's slot and version.
// Rate-limited by the router (20 lines/s); for rare events, not per request.
func Log(level Level, msg string) {
	hostLog(uint32(level), unsafe.Pointer(unsafe.StringData(msg)), uint32(len(msg)))
}

// NowMs is milliseconds since the router started (monotonic). Use it, not time.Now:
// inside a policy Go's own clock is virtual (see the adapter).
func NowMs() uint64 { return hostNowMs() }

// Random is 64 random bits from the router's generator (not for cryptography).
func Random() uint64 { return hostRandom() }

// pins keeps buffers the router wrote into alive until the current export returns.
var pins []unsafe.Pointer

//go:wasmexport cabi_realloc
func cabiRealloc(old unsafe.Pointer, oldSize, align, newSize uint32) unsafe.Pointer {
	if newSize == 0 {
		return unsafe.Pointer(uintptr(align))
	}
	buf := make([]uint64, (newSize+7)/8) // 8-byte aligned, the contract's largest
	p := unsafe.Pointer(&buf[0])
	if old != nil && oldSize > 0 {
		copy(unsafe.Slice((*byte)(p), newSize), unsafe.Slice((*byte)(old), min(oldSize, newSize)))
	}
	pins = append(pins, p)
	return p
}

// ret is the return area of the exports and of imports that return more than one word.
var ret [4]uint64

// kept holds bytes returned to the router until the next export call.
var kept []byte

func retBytes() *[32]byte { return (*[32]byte)(unsafe.Pointer(&ret)) }

func u32At(p unsafe.Pointer, off uintptr) uint32 { return *(*uint32)(unsafe.Add(p, off)) }

func strAt(p unsafe.Pointer, off uintptr) string {
	ptr := *(*uint32)(unsafe.Add(p, off))
	n := *(*uint32)(unsafe.Add(p, off+4))
	if n == 0 {
		return ""
	}
	return unsafe.String((*byte)(unsafe.Pointer(uintptr(ptr))), n)
}

// callRet runs an import that writes (ptr, len) to a return area and copies the string.
func callStr(f func(ret unsafe.Pointer)) string {
	var area [2]uint32
	f(unsafe.Pointer(&area))
	return strAt(unsafe.Pointer(&area), 0)
}

func callOptStr(f func(ret unsafe.Pointer)) (string, bool) {
	var area [3]uint32
	f(unsafe.Pointer(&area))
	if *(*uint8)(unsafe.Pointer(&area)) == 0 {
		return "", false
	}
	return strAt(unsafe.Pointer(&area), 4), true
}

// wasmRequest is the borrowed request of one select call.
type wasmRequest struct{ h uint32 }

func (r wasmRequest) Path() string { return callStr(func(p unsafe.Pointer) { reqPath(r.h, p) }) }
func (r wasmRequest) Model() (string, bool) {
	return callOptStr(func(p unsafe.Pointer) { reqModel(r.h, p) })
}
func (r wasmRequest) Header(name string) (string, bool) {
	return callOptStr(func(p unsafe.Pointer) {
		reqHeader(r.h, unsafe.Pointer(unsafe.StringData(name)), uint32(len(name)), p)
	})
}
func (r wasmRequest) BodyField(path string) (string, bool) {
	return callOptStr(func(p unsafe.Pointer) {
		reqBodyField(r.h, unsafe.Pointer(unsafe.StringData(path)), uint32(len(path)), p)
	})
}
func (r wasmRequest) RoutingText() string {
	return callStr(func(p unsafe.Pointer) { reqRoutingText(r.h, p) })
}
func (r wasmRequest) BodyLength() uint64 { return reqBodyLength(r.h) }
func (r wasmRequest) RequestID() string {
	return callStr(func(p unsafe.Pointer) { reqRequestID(r.h, p) })
}
func (r wasmRequest) Stage() Stage { return Stage(reqStage(r.h)) }

var current Policy

func setResult(err error) unsafe.Pointer {
	b := retBytes()
	if err == nil {
		b[0] = 0
	} else {
		kept = []byte(err.Error())
		b[0] = 1
		*(*uint32)(unsafe.Pointer(&b[4])) = uint32(uintptr(unsafe.Pointer(unsafe.SliceData(kept))))
		*(*uint32)(unsafe.Pointer(&b[8])) = uint32(len(kept))
	}
	return unsafe.Pointer(b)
}

type initError string

func (e initError) Error() string { return string(e) }

//go:wasmexport vllm:router-policy/balancer@0.1.0#init
func exportInit(ptr unsafe.Pointer, n uint32) unsafe.Pointer {
	defer func() { pins = pins[:0] }()
	config := string(unsafe.Slice((*byte)(ptr), n))
	if factory == nil {
		return setResult(initError("no policy registered: call policy.Register from an init function"))
	}
	p, err := factory(config)
	if err == nil && p == nil {
		err = initError("the constructor returned no policy")
	}
	if err != nil {
		return setResult(err)
	}
	current = p
	return setResult(nil)
}

//go:wasmexport vllm:router-policy/balancer@0.1.0#workers-changed
func exportWorkersChanged(ptr unsafe.Pointer, n uint32) {
	defer func() { pins = pins[:0] }()
	ws := make([]Worker, n)
	for i := range ws {
		rec := unsafe.Add(ptr, uintptr(i)*32)
		w := Worker{
			ID:   u32At(rec, 0),
			URL:  strings(strAt(rec, 4)),
			Role: Role(*(*uint8)(unsafe.Add(rec, 12))),
		}
		if *(*uint8)(unsafe.Add(rec, 16)) != 0 {
			r := u32At(rec, 20)
			w.DPRank = &r
		}
		lp, ln := unsafe.Pointer(uintptr(u32At(rec, 24))), u32At(rec, 28)
		for j := uint32(0); j < ln; j++ {
			t := unsafe.Add(lp, uintptr(j)*16)
			w.Labels = append(w.Labels, [2]string{strings(strAt(t, 0)), strings(strAt(t, 8))})
		}
		ws[i] = w
	}
	if o, ok := current.(WorkersObserver); ok {
		o.WorkersChanged(ws)
	}
}

// strings copies s out of router-written memory (kept beyond the call).
func strings(s string) string { return string([]byte(s)) }

//go:wasmexport vllm:router-policy/balancer@0.1.0#select
func exportSelect(req uint32, cp unsafe.Pointer, cn uint32, ep unsafe.Pointer, en uint32) unsafe.Pointer {
	defer func() { pins = pins[:0] }()
	words := unsafe.Slice((*uint64)(cp), cn)
	var engine []uint64
	if en > 0 {
		engine = unsafe.Slice((*uint64)(ep), en)
	}
	cands := DecodeCandidates(words, engine)
	d := current.Select(wasmRequest{req}, cands)
	reqDrop(req)
	b := retBytes()
	if d.Declined {
		kept = []byte(d.Reason)
		b[0] = 1
		*(*uint32)(unsafe.Pointer(&b[4])) = uint32(uintptr(unsafe.Pointer(unsafe.SliceData(kept))))
		*(*uint32)(unsafe.Pointer(&b[8])) = uint32(len(kept))
	} else {
		b[0] = 0
		*(*uint32)(unsafe.Pointer(&b[4])) = d.Worker
	}
	return unsafe.Pointer(b)
}

//go:wasmexport vllm:router-policy/balancer@0.1.0#on-complete
func exportOnComplete(worker, status, latency, hasFirst, first, stage uint32) {
	o, ok := current.(CompletionObserver)
	if !ok {
		return
	}
	c := Completion{Worker: worker, Status: uint16(status), LatencyMs: latency, Stage: Stage(stage)}
	if hasFirst != 0 {
		c.FirstByteMs = &first
	}
	o.OnComplete(c)
}

//go:wasmexport vllm:router-policy/balancer@0.1.0#export-state
func exportExportState() unsafe.Pointer {
	kept = nil
	if s, ok := current.(StateKeeper); ok {
		kept = s.ExportState()
	}
	area := (*[2]uint32)(unsafe.Pointer(&ret))
	area[0] = uint32(uintptr(unsafe.Pointer(unsafe.SliceData(kept))))
	area[1] = uint32(len(kept))
	return unsafe.Pointer(area)
}

//go:wasmexport vllm:router-policy/balancer@0.1.0#import-state
func exportImportState(ptr unsafe.Pointer, n uint32) unsafe.Pointer {
	defer func() { pins = pins[:0] }()
	s, ok := current.(StateKeeper)
	if !ok {
		return setResult(initError("this policy keeps no state"))
	}
	return setResult(s.ImportState([]byte(unsafe.String((*byte)(ptr), n))))
}
