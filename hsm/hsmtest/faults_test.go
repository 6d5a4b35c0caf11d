package hsmtest_test

import (
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/hsmbridge/hsmbridge/hsm/hsmtest"
	"github.com/miekg/pkcs11"
)

var errReal = errors.New("real call")

// realCall returns a call that counts how often it ran and returns errReal.
func realCall(n *int) func() error {
	return func() error { *n++; return errReal }
}

func TestFail(t *testing.T) {
	tests := []struct {
		name  string
		times int
		calls int
		fails int // how many of calls are faulted
	}{
		{"once", 1, 3, 1},
		{"twice", 2, 3, 2},
		{"until clear", -1, 5, 5},
		{"disarmed", 0, 2, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var f hsmtest.Faults
			ic := f.Interceptor()
			f.Fail("C_Sign", pkcs11.CKR_DEVICE_ERROR, tt.times)
			ran := 0
			for i := range tt.calls {
				err := ic("C_Sign", realCall(&ran))
				if i < tt.fails {
					if !errors.Is(err, pkcs11.Error(pkcs11.CKR_DEVICE_ERROR)) {
						t.Fatalf("call %d: err = %v, want CKR_DEVICE_ERROR", i, err)
					}
				} else if !errors.Is(err, errReal) {
					t.Fatalf("call %d: err = %v, want the real call's", i, err)
				}
			}
			if want := tt.calls - tt.fails; ran != want {
				t.Errorf("real call ran %d times, want %d", ran, want)
			}
			if got := f.Calls("C_Sign"); got != tt.calls {
				t.Errorf("Calls = %d, want %d", got, tt.calls)
			}
		})
	}
}

func TestFail_OtherFunctionUntouched(t *testing.T) {
	var f hsmtest.Faults
	ic := f.Interceptor()
	f.Fail("C_Sign", pkcs11.CKR_DEVICE_ERROR, -1)
	ran := 0
	if err := ic("C_SignInit", realCall(&ran)); !errors.Is(err, errReal) || ran != 1 {
		t.Fatalf("C_SignInit: err = %v, ran %d; want the real call", err, ran)
	}
	if f.Calls("C_Sign") != 0 || f.Calls("C_SignInit") != 1 {
		t.Errorf("Calls: C_Sign %d, C_SignInit %d; want 0, 1", f.Calls("C_Sign"), f.Calls("C_SignInit"))
	}
}

func TestClear(t *testing.T) {
	var f hsmtest.Faults
	ic := f.Interceptor()
	f.Fail("C_Sign", pkcs11.CKR_DEVICE_ERROR, -1)
	f.Delay("C_Sign", time.Hour, -1)
	f.Clear()
	ran := 0
	if err := ic("C_Sign", realCall(&ran)); !errors.Is(err, errReal) || ran != 1 {
		t.Fatalf("after Clear: err = %v, ran %d; want the real call", err, ran)
	}
	if got := f.Calls("C_Sign"); got != 1 {
		t.Errorf("Calls = %d, want 1 (Clear keeps counts)", got)
	}
}

func TestDelay(t *testing.T) {
	var f hsmtest.Faults
	ic := f.Interceptor()
	const d = 20 * time.Millisecond
	f.Delay("C_Sign", d, 1)
	ran := 0
	start := time.Now()
	if err := ic("C_Sign", realCall(&ran)); !errors.Is(err, errReal) || ran != 1 {
		t.Fatalf("delayed call: err = %v, ran %d; want the real call", err, ran)
	}
	// A lower bound only: time.Sleep never returns early. No upper bound on a shared machine.
	if el := time.Since(start); el < d {
		t.Errorf("delayed call took %v, want at least %v", el, d)
	}
	if err := ic("C_Sign", realCall(&ran)); !errors.Is(err, errReal) || ran != 2 {
		t.Fatalf("second call: err = %v, ran %d; want the real call", err, ran)
	}
}

func TestDelayThenFail(t *testing.T) {
	var f hsmtest.Faults
	ic := f.Interceptor()
	f.Delay("C_Sign", time.Millisecond, 1)
	f.Fail("C_Sign", pkcs11.CKR_GENERAL_ERROR, 1)
	ran := 0
	if err := ic("C_Sign", realCall(&ran)); !errors.Is(err, pkcs11.Error(pkcs11.CKR_GENERAL_ERROR)) || ran != 0 {
		t.Fatalf("err = %v, ran %d; want CKR_GENERAL_ERROR without the real call", err, ran)
	}
}

func TestBlock(t *testing.T) {
	var f hsmtest.Faults
	ic := f.Interceptor()
	release := f.Block("C_FindObjectsInit")
	errc := make(chan error, 1)
	started := make(chan struct{})
	go func() {
		errc <- ic("C_FindObjectsInit", func() error { close(started); return errReal })
	}()
	for f.Calls("C_FindObjectsInit") == 0 {
		time.Sleep(time.Millisecond)
	}
	select {
	case <-started:
		t.Fatal("blocked call ran before release")
	case err := <-errc:
		t.Fatalf("blocked call returned %v before release", err)
	default:
	}
	release()
	release() // idempotent
	if err := <-errc; !errors.Is(err, errReal) {
		t.Fatalf("released call: err = %v, want the real call's", err)
	}
	// The block is gone: the next call runs at once.
	n := 0
	if err := ic("C_FindObjectsInit", realCall(&n)); !errors.Is(err, errReal) || n != 1 {
		t.Fatalf("after release: err = %v, ran %d", err, n)
	}
}

func TestBlock_ReleasedByClear(t *testing.T) {
	var f hsmtest.Faults
	ic := f.Interceptor()
	release := f.Block("C_Sign")
	defer release() // after Clear: a no-op, must not panic
	errc := make(chan error, 1)
	go func() { errc <- ic("C_Sign", func() error { return errReal }) }()
	for f.Calls("C_Sign") == 0 {
		time.Sleep(time.Millisecond)
	}
	f.Clear()
	if err := <-errc; !errors.Is(err, errReal) {
		t.Fatalf("err = %v, want the real call's", err)
	}
}

func TestBlock_Replaced(t *testing.T) {
	var f hsmtest.Faults
	ic := f.Interceptor()
	first := f.Block("C_Sign")
	errc := make(chan error, 1)
	go func() { errc <- ic("C_Sign", func() error { return errReal }) }()
	for f.Calls("C_Sign") == 0 {
		time.Sleep(time.Millisecond)
	}
	second := f.Block("C_Sign") // replacing a block lets the old block's waiters go
	if err := <-errc; !errors.Is(err, errReal) {
		t.Fatalf("err = %v, want the real call's", err)
	}
	first() // stale release: must not lift the new block
	go func() { errc <- ic("C_Sign", func() error { return errReal }) }()
	for f.Calls("C_Sign") < 2 {
		time.Sleep(time.Millisecond)
	}
	select {
	case err := <-errc:
		t.Fatalf("call under the new block returned %v", err)
	default:
	}
	second()
	if err := <-errc; !errors.Is(err, errReal) {
		t.Fatalf("err = %v, want the real call's", err)
	}
}

// TestConcurrent is for the race detector: counts and faults from many goroutines.
func TestConcurrent(t *testing.T) {
	var f hsmtest.Faults
	ic := f.Interceptor()
	const n, fails = 200, 50
	f.Fail("C_Sign", pkcs11.CKR_DEVICE_ERROR, fails)
	var wg sync.WaitGroup
	var mu sync.Mutex
	faulted := 0
	for range n {
		wg.Go(func() {
			if err := ic("C_Sign", func() error { return nil }); err != nil {
				mu.Lock()
				faulted++
				mu.Unlock()
			}
			_ = f.Calls("C_Sign")
		})
	}
	wg.Wait()
	if faulted != fails {
		t.Errorf("%d calls faulted, want %d", faulted, fails)
	}
	if got := f.Calls("C_Sign"); got != n {
		t.Errorf("Calls = %d, want %d", got, n)
	}
}
