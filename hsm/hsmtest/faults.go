// Package hsmtest injects faults into the PKCS#11 calls of an hsm cluster, over the real
// module. It is for tests only: nothing outside _test.go files may import it (never cmd or
// any production package).
//
// Faults are matched by PKCS#11 function name ("C_Sign") and installed through
// hsm.ClusterConfig.Interceptor:
//
//	var f hsmtest.Faults
//	cl, err := hsm.OpenCluster(ctx, hsm.ClusterConfig{..., Interceptor: f.Interceptor()})
//	f.Fail("C_FindObjectsInit", pkcs11.CKR_SESSION_HANDLE_INVALID, 1)
package hsmtest

import (
	"sync"
	"time"

	"github.com/hsmbridge/hsmbridge/hsm"
	"github.com/miekg/pkcs11"
)

// Faults is a set of armed faults and a count of calls. The zero value has no faults and is
// ready to use. It is safe for concurrent use by multiple goroutines.
//
// Per call, in this order: a Block on the function waits for its release; a Delay sleeps;
// a Fail returns its code without making the call. Otherwise the real call runs. Arming a
// fault of a kind for a function replaces the previous fault of that kind for it.
type Faults struct {
	mu     sync.Mutex
	fails  map[string]fault
	delays map[string]delay
	blocks map[string]chan struct{}
	calls  map[string]int
}

type fault struct {
	code  uint
	times int // < 0: until Clear
}

type delay struct {
	d     time.Duration
	times int // < 0: until Clear
}

// Fail makes the next times calls of fn return pkcs11.Error(code) instead of calling the
// module; times < 0 means every call until Clear, times == 0 disarms.
func (f *Faults) Fail(fn string, code uint, times int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fails == nil {
		f.fails = map[string]fault{}
	}
	if times == 0 {
		delete(f.fails, fn)
		return
	}
	f.fails[fn] = fault{code: code, times: times}
}

// Delay makes the next times calls of fn sleep for d before the real call; times < 0 means
// every call until Clear, times == 0 disarms.
func (f *Faults) Delay(fn string, d time.Duration, times int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.delays == nil {
		f.delays = map[string]delay{}
	}
	if times == 0 {
		delete(f.delays, fn)
		return
	}
	f.delays[fn] = delay{d: d, times: times}
}

// Block makes every call of fn wait until release is called (or Clear), then run for real.
// release may be called more than once.
func (f *Faults) Block(fn string) (release func()) {
	ch := make(chan struct{})
	f.mu.Lock()
	if f.blocks == nil {
		f.blocks = map[string]chan struct{}{}
	}
	if old, ok := f.blocks[fn]; ok {
		close(old) // replaced: whoever waits on the old block goes on
	}
	f.blocks[fn] = ch
	f.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			f.mu.Lock()
			defer f.mu.Unlock()
			if f.blocks[fn] == ch {
				delete(f.blocks, fn)
				close(ch)
			}
		})
	}
}

// Clear disarms every fault and releases every blocked call. Call counts are kept.
func (f *Faults) Clear() {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, ch := range f.blocks {
		close(ch)
	}
	f.fails, f.delays, f.blocks = nil, nil, nil
}

// Calls returns how many times fn has been invoked through the interceptor, faulted or not
// (a blocked call counts from the moment it arrives).
func (f *Faults) Calls(fn string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[fn]
}

// Interceptor returns the hsm.Interceptor that applies f's faults.
func (f *Faults) Interceptor() hsm.Interceptor {
	return func(fn string, call func() error) error {
		block, d, code, fail := f.arrive(fn)
		if block != nil {
			<-block
		}
		if d > 0 {
			time.Sleep(d)
		}
		if fail {
			return pkcs11.Error(code)
		}
		return call()
	}
}

// arrive counts a call of fn and takes what is armed for it, using up one of each count.
func (f *Faults) arrive(fn string) (block <-chan struct{}, d time.Duration, code uint, fail bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.calls == nil {
		f.calls = map[string]int{}
	}
	f.calls[fn]++
	if ch, ok := f.blocks[fn]; ok {
		block = ch
	}
	if dl, ok := f.delays[fn]; ok {
		d = dl.d
		if dl.times > 0 {
			if dl.times--; dl.times == 0 {
				delete(f.delays, fn)
			} else {
				f.delays[fn] = dl
			}
		}
	}
	if ft, ok := f.fails[fn]; ok {
		code, fail = ft.code, true
		if ft.times > 0 {
			if ft.times--; ft.times == 0 {
				delete(f.fails, fn)
			} else {
				f.fails[fn] = ft
			}
		}
	}
	return block, d, code, fail
}
