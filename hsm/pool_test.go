package hsm_test

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hsmbridge/hsmbridge/hsm"
	"github.com/hsmbridge/hsmbridge/hsm/hsmtest"
	"github.com/miekg/pkcs11"
)

// The pool is not reachable from outside the package (Cluster.pool is unexported and no
// method returns it), so these tests drive it through cluster methods that use one session
// each (DataObjects: C_FindObjectsInit, C_FindObjects, C_FindObjectsFinal) and read it
// through Cluster.Stats.

// TestPool_AcquireDeadline_FaultInjected: with the only session held, a caller whose
// context ends first gets ErrAcquireTimeout and the context's error, and stops waiting; a
// caller with no deadline gets the session once it comes back.
func TestPool_AcquireDeadline_FaultInjected(t *testing.T) {
	var f hsmtest.Faults
	cl, _ := newCluster(t, poolSize(1), intercept(f.Interceptor()))
	finds := f.Calls("C_FindObjectsInit") // opening looked the identity certificate up
	release := f.Block("C_FindObjectsInit")
	defer release()

	held := make(chan error, 1)
	go func() { _, err := cl.DataObjects(context.Background()); held <- err }()
	waitFor(t, "the first call to hold the session", func() bool { return f.Calls("C_FindObjectsInit") == finds+1 })

	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	_, err := cl.DataObjects(ctx)
	if !errors.Is(err, hsm.ErrAcquireTimeout) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want ErrAcquireTimeout and context.DeadlineExceeded", err)
	}
	if st := cl.Stats(); st.Waiters != 0 || st.WaitCount != 1 || st.InUse != 1 {
		t.Errorf("after the timeout: Waiters %d, WaitCount %d, InUse %d; want 0, 1, 1", st.Waiters, st.WaitCount, st.InUse)
	}

	waited := make(chan error, 1)
	go func() { _, err := cl.DataObjects(context.Background()); waited <- err }()
	waitFor(t, "a waiter", func() bool { return cl.Stats().Waiters == 1 })
	release()
	if err := <-held; err != nil {
		t.Errorf("held call: %v", err)
	}
	if err := <-waited; err != nil {
		t.Errorf("waiting call: %v", err)
	}
	if st := cl.Stats(); st.Waiters != 0 || st.InUse != 0 || st.Open != 1 || st.WaitCount != 2 {
		t.Errorf("at rest: %+v; want Waiters 0, InUse 0, Open 1, WaitCount 2", st)
	}
}

// panicOnce returns an interceptor around next that panics in the first call of fn after
// arm is set.
func panicOnce(fn string, arm *atomic.Bool, next hsm.Interceptor) hsm.Interceptor {
	return func(name string, call func() error) error {
		if name == fn && arm.CompareAndSwap(true, false) {
			panic("injected panic in " + fn)
		}
		return next(name, call)
	}
}

// callRecovering calls fn and returns what it panicked with.
func callRecovering(fn func()) (r any) {
	defer func() { r = recover() }()
	fn()
	return nil
}

// TestPool_NoLeakAfterPanic_FaultInjected: a panic while a session is lent out reaches the
// caller, the session is evicted (it may be mid-operation) and its permit comes back.
func TestPool_NoLeakAfterPanic_FaultInjected(t *testing.T) {
	var f hsmtest.Faults
	var arm atomic.Bool
	cl, _ := newCluster(t, poolSize(1), intercept(panicOnce("C_FindObjectsInit", &arm, f.Interceptor())))
	before := cl.Stats()
	opens := f.Calls("C_OpenSession")

	arm.Store(true)
	r := callRecovering(func() { _, _ = cl.DataObjects(t.Context()) })
	if r == nil {
		t.Fatal("the injected panic did not reach the caller")
	}
	st := cl.Stats()
	if st.InUse != 0 || st.Open != before.Open-1 {
		t.Errorf("after the panic: InUse %d, Open %d; want 0, %d", st.InUse, st.Open, before.Open-1)
	}
	if got, want := st.Evictions[hsm.ClassSession], before.Evictions[hsm.ClassSession]+1; got != want {
		t.Errorf("Evictions[session] = %d, want %d", got, want)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	if _, err := cl.DataObjects(ctx); err != nil {
		t.Fatalf("call after the panic: %v", err) // a leaked permit shows as ErrAcquireTimeout
	}
	if got := f.Calls("C_OpenSession"); got != opens+1 {
		t.Errorf("C_OpenSession called %d times after the panic, want 1 (a fresh session)", got-opens)
	}
}

// TestPool_NoLeakAfterPanicInOpenSession_FaultInjected: a panic while the pool opens a new
// worker session (an Interceptor's, or the module's) must not keep the pool's permit nor
// count a session that was never opened. With pool size 1, a leak blocks every later call.
func TestPool_NoLeakAfterPanicInOpenSession_FaultInjected(t *testing.T) {
	var f hsmtest.Faults
	var arm atomic.Bool
	cl, _ := newCluster(t, poolSize(1), intercept(panicOnce("C_OpenSession", &arm, f.Interceptor())))
	// Evict the idle worker left by loading the identity certificate, so the next call opens one.
	f.Fail("C_FindObjectsInit", pkcs11.CKR_SESSION_HANDLE_INVALID, 2) // the call and its one retry
	if _, err := cl.DataObjects(t.Context()); classOf(t, err) != hsm.ClassSession {
		t.Fatalf("faulted call: %v, want a session-class error", err)
	}
	if st := cl.Stats(); st.Open != 0 {
		t.Fatalf("Open = %d after the eviction, want 0", st.Open)
	}

	arm.Store(true)
	if r := callRecovering(func() { _, _ = cl.DataObjects(t.Context()) }); r == nil {
		t.Fatal("the injected panic did not reach the caller")
	}
	if st := cl.Stats(); st.Open != 0 || st.InUse != 0 {
		t.Errorf("after a panic in C_OpenSession: Open %d, InUse %d; want 0, 0", st.Open, st.InUse)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
	defer cancel()
	if _, err := cl.DataObjects(ctx); err != nil {
		// Close now, briefly: the test cleanup would wait its full bound for the leaked permit.
		ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
		defer cancel()
		_ = cl.Close(ctx)
		t.Fatalf("call after the panic: %v (the pool's only permit leaked)", err)
	}
}

// TestPool_SizeCap_FaultInjected: 100 concurrent callers on a pool of 4 all succeed, and at
// no moment are more than 4 worker sessions open or in use.
func TestPool_SizeCap_FaultInjected(t *testing.T) {
	const size, callers = 4, 100
	var (
		f                 hsmtest.Faults
		clp               atomic.Pointer[hsm.Cluster]
		live, maxLive     atomic.Int64 // worker sessions open, from C_OpenSession/C_CloseSession
		maxOpen, maxInUse atomic.Int64 // sampled from Stats in every call
		inFind, maxInFind atomic.Int64 // concurrent C_FindObjectsInit calls
		storeMax          = func(m *atomic.Int64, v int64) {
			for old := m.Load(); v > old && !m.CompareAndSwap(old, v); old = m.Load() {
			}
		}
	)
	fi := f.Interceptor()
	ic := func(fn string, call func() error) error {
		cl := clp.Load()
		if cl == nil { // opening: the anchor and the identity certificate's lookup
			return fi(fn, call)
		}
		st := cl.Stats()
		storeMax(&maxOpen, int64(st.Open))
		storeMax(&maxInUse, int64(st.InUse))
		if fn == "C_FindObjectsInit" {
			storeMax(&maxInFind, inFind.Add(1))
			defer inFind.Add(-1)
		}
		err := fi(fn, call)
		switch {
		case fn == "C_OpenSession" && err == nil:
			storeMax(&maxLive, live.Add(1))
		case fn == "C_CloseSession":
			live.Add(-1)
		}
		return err
	}
	cl, _ := newCluster(t, poolSize(size), intercept(ic))
	if st := cl.Stats(); st.MaxSessions != size {
		t.Fatalf("MaxSessions = %d, want %d", st.MaxSessions, size)
	}
	live.Store(int64(cl.Stats().Open))
	clp.Store(cl)
	f.Delay("C_FindObjectsInit", time.Millisecond, -1) // so that callers overlap

	var wg sync.WaitGroup
	errs := make(chan error, callers)
	for range callers {
		wg.Go(func() {
			if _, err := cl.DataObjects(t.Context()); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("concurrent call: %v", err)
	}
	t.Logf("max open %d, in use %d, live %d, concurrent finds %d; waits %d",
		maxOpen.Load(), maxInUse.Load(), maxLive.Load(), maxInFind.Load(), cl.Stats().WaitCount)
	for _, m := range []struct {
		name string
		v    int64
	}{{"Stats().Open", maxOpen.Load()}, {"Stats().InUse", maxInUse.Load()}, {"open worker sessions", maxLive.Load()}, {"concurrent C_FindObjectsInit", maxInFind.Load()}} {
		if m.v > size {
			t.Errorf("max %s = %d, want <= %d", m.name, m.v, size)
		}
	}
	if st := cl.Stats(); st.InUse != 0 || st.Open > size || st.Waiters != 0 {
		t.Errorf("at rest: InUse %d, Open %d, Waiters %d; want 0, <= %d, 0", st.InUse, st.Open, st.Waiters, size)
	}
}

// TestPool_ReleaseByClass_FaultInjected: the failed call's class decides the session's
// fate. Session- and device-class errors evict it (counted by class); a caller-class error
// keeps it. A session-class failure of a read is retried once on a fresh session, so the
// caller never sees it.
func TestPool_ReleaseByClass_FaultInjected(t *testing.T) {
	tests := []struct {
		name    string
		code    uint
		class   hsm.Class
		evict   bool
		retried bool
	}{
		{"EvictsAndRetriesOnSessionHandleInvalid", pkcs11.CKR_SESSION_HANDLE_INVALID, hsm.ClassSession, true, true},
		{"EvictsAndRetriesOnObjectHandleInvalid", pkcs11.CKR_OBJECT_HANDLE_INVALID, hsm.ClassSession, true, true},
		{"EvictsOnDeviceError", pkcs11.CKR_DEVICE_ERROR, hsm.ClassDevice, true, false},
		{"KeepsOnArgumentsBad", pkcs11.CKR_ARGUMENTS_BAD, hsm.ClassCaller, false, false},
		{"KeepsOnDataInvalid", pkcs11.CKR_DATA_INVALID, hsm.ClassCaller, false, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var f hsmtest.Faults
			cl, _ := newCluster(t, intercept(f.Interceptor()))
			before := cl.Stats()
			if before.Open < 1 {
				t.Fatalf("Open = %d before the fault, want an idle worker", before.Open)
			}
			opens, closes := f.Calls("C_OpenSession"), f.Calls("C_CloseSession")

			f.Fail("C_FindObjectsInit", tt.code, 1)
			_, err := cl.DataObjects(t.Context())
			switch {
			case tt.retried && err != nil:
				t.Fatalf("err = %v, want the retry on a fresh session to succeed", err)
			case !tt.retried && !errors.Is(err, pkcs11.Error(tt.code)):
				t.Fatalf("err = %v, want %v", err, pkcs11.Error(tt.code))
			case !tt.retried && classOf(t, err) != tt.class:
				t.Fatalf("class %v, want %v", classOf(t, err), tt.class)
			}
			st := cl.Stats()
			var want [len(st.Evictions)]uint64
			wantOpen := before.Open
			if tt.evict {
				want[tt.class] = 1
			}
			if tt.evict && !tt.retried {
				wantOpen--
			}
			if st.Evictions != want || st.Open != wantOpen || st.InUse != 0 {
				t.Errorf("after the fault: Evictions %v, Open %d, InUse %d; want %v, %d, 0", st.Evictions, st.Open, st.InUse, want, wantOpen)
			}
			if _, err := cl.DataObjects(t.Context()); err != nil {
				t.Fatalf("next call: %v", err)
			}
			newOpens, newCloses := f.Calls("C_OpenSession")-opens, f.Calls("C_CloseSession")-closes
			wantNew := 0
			if tt.evict {
				wantNew = 1
			}
			if newOpens != wantNew || newCloses != wantNew {
				t.Errorf("C_OpenSession %d, C_CloseSession %d times; want %d each", newOpens, newCloses, wantNew)
			}
		})
	}
}

// TestRun_RetriesSessionFaultOnce_FaultInjected: a second session-class failure in a row
// reaches the caller; the operation is not tried a third time.
func TestRun_RetriesSessionFaultOnce_FaultInjected(t *testing.T) {
	var f hsmtest.Faults
	cl, _ := newCluster(t, intercept(f.Interceptor()))
	calls := f.Calls("C_FindObjectsInit")
	f.Fail("C_FindObjectsInit", pkcs11.CKR_SESSION_HANDLE_INVALID, 2)
	_, err := cl.DataObjects(t.Context())
	if classOf(t, err) != hsm.ClassSession {
		t.Fatalf("err = %v, want the session-class error of the retry", err)
	}
	if got := f.Calls("C_FindObjectsInit") - calls; got != 2 {
		t.Errorf("C_FindObjectsInit called %d times, want 2 (the call and one retry)", got)
	}
}

// TestCluster_Close: calls after Close fail with ErrClosed, and Close is idempotent.
func TestCluster_Close(t *testing.T) {
	cl, _ := newCluster(t)
	ctx := t.Context()
	if err := cl.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := cl.Close(ctx); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	calls := map[string]func() error{
		"DataObjects":   func() error { _, err := cl.DataObjects(ctx); return err },
		"WriteData":     func() error { return cl.WriteData(ctx, "x", []byte("y")) },
		"DestroyData":   func() error { return cl.DestroyData(ctx, "x") },
		"ProveIdentity": func() error { return cl.ProveIdentity(ctx) },
	}
	for name, call := range calls {
		if err := call(); !errors.Is(err, hsm.ErrClosed) {
			t.Errorf("%s after Close: %v, want ErrClosed", name, err)
		}
	}
	if st := cl.Stats(); st.Open != 0 || st.InUse != 0 {
		t.Errorf("after Close: Open %d, InUse %d; want 0, 0", st.Open, st.InUse)
	}
}

// TestCluster_CurrentTokenAfterClose: CurrentToken is a cluster method like the others, so
// after Close it must say ErrClosed too, not pass a stale or finalized module's answer on.
func TestCluster_CurrentTokenAfterClose(t *testing.T) {
	cl, tok := newCluster(t)
	if ti, err := cl.CurrentToken(t.Context()); err != nil || ti.Serial != tok.Serial {
		t.Fatalf("CurrentToken = %+v, %v; want serial %q", ti, err, tok.Serial)
	}
	if err := cl.Close(t.Context()); err != nil {
		t.Fatal(err)
	}
	if _, err := cl.CurrentToken(t.Context()); !errors.Is(err, hsm.ErrClosed) {
		t.Errorf("CurrentToken after Close: %v, want ErrClosed", err)
	}
}

// TestCluster_CloseWakesWaitersAndWaitsForInUse_FaultInjected: Close makes waiters give up
// with ErrClosed at once, waits for the session in use, and the call using it completes.
func TestCluster_CloseWakesWaitersAndWaitsForInUse_FaultInjected(t *testing.T) {
	var f hsmtest.Faults
	cl, _ := newCluster(t, poolSize(1), intercept(f.Interceptor()))
	finds := f.Calls("C_FindObjectsInit") // opening looked the identity certificate up
	release := f.Block("C_FindObjectsInit")
	defer release()
	held := make(chan error, 1)
	go func() { _, err := cl.DataObjects(context.Background()); held <- err }()
	waitFor(t, "the first call to hold the session", func() bool { return f.Calls("C_FindObjectsInit") == finds+1 })
	waiter := make(chan error, 1)
	go func() { _, err := cl.DataObjects(context.Background()); waiter <- err }()
	waitFor(t, "a waiter", func() bool { return cl.Stats().Waiters == 1 })

	closed := make(chan error, 1)
	go func() { closed <- cl.Close(context.Background()) }()
	if err := <-waiter; !errors.Is(err, hsm.ErrClosed) {
		t.Errorf("waiter: %v, want ErrClosed", err)
	}
	select {
	case err := <-closed:
		t.Fatalf("Close returned %v while a session was in use", err)
	default:
	}
	release()
	if err := <-held; err != nil {
		t.Errorf("call in progress at Close: %v", err)
	}
	if err := <-closed; err != nil {
		t.Errorf("Close: %v", err)
	}
	if st := cl.Stats(); st.Open != 0 || st.InUse != 0 {
		t.Errorf("after Close: Open %d, InUse %d; want 0, 0", st.Open, st.InUse)
	}
}
