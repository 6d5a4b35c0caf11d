package hsm_test

// The error-class table of DESIGN.md, row by row, through the fault-injecting PKCS#11
// wrapper (hsm/hsmtest) over the real SoftHSM module: which failures are retried and how
// often, the serialised re-login, a refused credential tried exactly once, the breaker's
// transitions and its background recovery, and clusters whose sessions are stuck. The
// session-class retry of a read (DataObjects) and its single retry are in pool_test.go.
//
// Nothing here asserts a duration: a test that needs time to pass (recovery backoff, the
// stuck threshold) polls for the state it waits for, with a generous bound.

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/sha256"
	"errors"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/hsmbridge/hsmbridge/hsm"
	"github.com/hsmbridge/hsmbridge/hsm/hsmtest"
)

// healthLog records what OnHealthChange was told.
type healthLog struct {
	mu sync.Mutex
	hs []hsm.Health
}

func (l *healthLog) add(h hsm.Health) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.hs = append(l.hs, h)
}

func (l *healthLog) states() []hsm.State {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]hsm.State, len(l.hs))
	for i, h := range l.hs {
		out[i] = h.State
	}
	return out
}

// recoverErrors records what OnRecoverError was told.
type recoverErrors struct {
	mu   sync.Mutex
	errs []error
}

func (r *recoverErrors) add(err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.errs = append(r.errs, err)
}

func (r *recoverErrors) get() []error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.errs)
}

func watchHealth(l *healthLog) func(*hsm.ClusterConfig) {
	return func(c *hsm.ClusterConfig) { c.OnHealthChange = l.add }
}

func watchRecovery(r *recoverErrors) func(*hsm.ClusterConfig) {
	return func(c *hsm.ClusterConfig) { c.OnRecoverError = r.add }
}

func breakerThreshold(n int) func(*hsm.ClusterConfig) {
	return func(c *hsm.ClusterConfig) { c.BreakerThreshold = n }
}

func stuckAfter(d time.Duration) func(*hsm.ClusterConfig) {
	return func(c *hsm.ClusterConfig) { c.StuckAfter = d }
}

// callCounter counts every PKCS#11 call by function, around next.
type callCounter struct {
	mu sync.Mutex
	n  map[string]int
}

func (cc *callCounter) wrap(next hsm.Interceptor) hsm.Interceptor {
	return func(fn string, call func() error) error {
		cc.mu.Lock()
		if cc.n == nil {
			cc.n = map[string]int{}
		}
		cc.n[fn]++
		cc.mu.Unlock()
		return next(fn, call)
	}
}

// snapshot returns the counts so far.
func (cc *callCounter) snapshot() map[string]int {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	out := make(map[string]int, len(cc.n))
	for k, v := range cc.n {
		out[k] = v
	}
	return out
}

// callsSince returns the functions called since before (with how often), leaving out those in skip.
func callsSince(before, now map[string]int, skip ...string) map[string]int {
	out := map[string]int{}
	for fn, n := range now {
		if d := n - before[fn]; d > 0 && !slices.Contains(skip, fn) {
			out[fn] = d
		}
	}
	return out
}

// failFast are calls of every kind a cluster serves, each of which must be refused with
// ErrUnavailable while the cluster is not healthy. keyID names an EC signing key on the token.
func failFast(ctx context.Context, cl *hsm.Cluster, keyID string) map[string]func() error {
	digest := sha256.Sum256([]byte("m"))
	return map[string]func() error{
		"ProveIdentity": func() error { return cl.ProveIdentity(ctx) },
		"DataObjects":   func() error { _, err := cl.DataObjects(ctx); return err },
		"WriteData":     func() error { return cl.WriteData(ctx, "fail-fast", []byte("v")) },
		"DestroyData":   func() error { return cl.DestroyData(ctx, "fail-fast") },
		"GenerateAES":   func() error { return cl.GenerateAES(ctx, "fail-fast-aes", 256) },
		"GenerateEC": func() error {
			_, err := cl.GenerateEC(ctx, "fail-fast-ec", elliptic.P256(), hsm.UsageSign)
			return err
		},
		"SignDigest": func() error {
			_, err := cl.SignDigest(ctx, keyID, hsm.SchemeECDSA, crypto.SHA256, digest[:])
			return err
		},
		"Random":  func() error { _, err := cl.Random(ctx, 16); return err },
		"KeyIDs":  func() error { _, err := cl.KeyIDs(ctx, func(string) bool { return true }); return err },
		"Destroy": func() error { return cl.DestroyKey(ctx, "fail-fast-aes") },
	}
}

// wantFailFast checks that every call of failFast is refused with ErrUnavailable and that
// none of them reached the token: no PKCS#11 call at all, apart from those in allowed (made
// by a recovery attempt running meanwhile).
func wantFailFast(t *testing.T, cl *hsm.Cluster, cc *callCounter, keyID string, allowed ...string) {
	t.Helper()
	before := cc.snapshot()
	for name, call := range failFast(t.Context(), cl, keyID) {
		if err := call(); !errors.Is(err, hsm.ErrUnavailable) {
			t.Errorf("%s while %v: %v, want ErrUnavailable", name, cl.Health().State, err)
		}
	}
	if got := callsSince(before, cc.snapshot(), allowed...); len(got) != 0 {
		t.Errorf("calls refused with ErrUnavailable still reached the token: %v", got)
	}
}

// newECKey makes an EC P-256 signing key on cl and returns its id.
func newECKey(t *testing.T, cl *hsm.Cluster, id string) *ecdsa.PublicKey {
	t.Helper()
	pub, err := cl.GenerateEC(t.Context(), id, elliptic.P256(), hsm.UsageSign)
	if err != nil {
		t.Fatalf("GenerateEC %s: %v", id, err)
	}
	return pub
}

// TestRun_NonIdempotentNotRetried_FaultInjected: a session-class failure of an operation
// that creates an object is not retried — the token may have made the object before the
// session broke, and a retry could leave two under one name. The caller sees the error, the
// session is evicted, nothing was created, and the next call works.
func TestRun_NonIdempotentNotRetried_FaultInjected(t *testing.T) {
	tests := []struct {
		name string
		fn   string // the faulted PKCS#11 function
		call func(context.Context, *hsm.Cluster, string) error
		// made reports whether the call's object exists on the token.
		made func(context.Context, *testing.T, *hsm.Cluster, string) bool
	}{
		{"WriteData", "C_CreateObject",
			func(ctx context.Context, cl *hsm.Cluster, id string) error { return cl.WriteData(ctx, id, []byte("v")) },
			func(ctx context.Context, t *testing.T, cl *hsm.Cluster, id string) bool {
				objs, err := cl.DataObjects(ctx)
				if err != nil {
					t.Fatal(err)
				}
				return slices.ContainsFunc(objs, func(o hsm.DataObject) bool { return o.Label == id })
			}},
		{"GenerateAES", "C_GenerateKey",
			func(ctx context.Context, cl *hsm.Cluster, id string) error { return cl.GenerateAES(ctx, id, 256) },
			keyMade},
		{"GenerateEC", "C_GenerateKeyPair",
			func(ctx context.Context, cl *hsm.Cluster, id string) error {
				_, err := cl.GenerateEC(ctx, id, elliptic.P256(), hsm.UsageSign)
				return err
			},
			keyMade},
	}
	for _, tt := range tests {
		for _, code := range []uint{pkcs11.CKR_SESSION_HANDLE_INVALID, pkcs11.CKR_SESSION_CLOSED} {
			t.Run(tt.name+"/"+pkcs11.Error(code).Error()[len("pkcs11: 0x00: "):], func(t *testing.T) {
				var f hsmtest.Faults
				cl, _ := newCluster(t, intercept(f.Interceptor()))
				ctx := t.Context()
				before := cl.Stats()
				calls := f.Calls(tt.fn)
				f.Fail(tt.fn, code, 1)
				err := tt.call(ctx, cl, "first")
				if !errors.Is(err, pkcs11.Error(code)) || classOf(t, err) != hsm.ClassSession {
					t.Fatalf("err = %v, want the session-class %v, not retried", err, pkcs11.Error(code))
				}
				if got := f.Calls(tt.fn) - calls; got != 1 {
					t.Errorf("%s called %d times, want 1 (no retry)", tt.fn, got)
				}
				if got, want := cl.Stats().Evictions[hsm.ClassSession], before.Evictions[hsm.ClassSession]+1; got != want {
					t.Errorf("Evictions[session] = %d, want %d", got, want)
				}
				if h := cl.Health(); h.State != hsm.StateHealthy {
					t.Errorf("health %+v after a session fault, want healthy", h)
				}
				if tt.made(ctx, t, cl, "first") {
					t.Errorf("the faulted call left its object on the token")
				}
				if err := tt.call(ctx, cl, "second"); err != nil {
					t.Fatalf("the next call: %v", err)
				}
				if !tt.made(ctx, t, cl, "second") {
					t.Errorf("the next call's object is not on the token")
				}
			})
		}
	}
}

func keyMade(ctx context.Context, t *testing.T, cl *hsm.Cluster, id string) bool {
	ids, err := cl.KeyIDs(ctx, func(string) bool { return true })
	if err != nil {
		t.Fatal(err)
	}
	return slices.Contains(ids, id)
}

// TestRun_StaleHandleDroppedAndRetried_FaultInjected: a cached key handle the token no
// longer knows (CKR_OBJECT_HANDLE_INVALID on C_SignInit) is dropped and the sign retried once
// on a fresh session, which looks the key up again; the caller gets a valid signature.
func TestRun_StaleHandleDroppedAndRetried_FaultInjected(t *testing.T) {
	var f hsmtest.Faults
	cl, _ := newCluster(t, intercept(f.Interceptor()))
	ctx := t.Context()
	pub := newECKey(t, cl, "ec-1")
	digest := sha256.Sum256([]byte("stale handle"))
	if _, err := cl.SignDigest(ctx, "ec-1", hsm.SchemeECDSA, crypto.SHA256, digest[:]); err != nil {
		t.Fatal(err) // caches the handle
	}
	finds := f.Calls("C_FindObjectsInit")
	if _, err := cl.SignDigest(ctx, "ec-1", hsm.SchemeECDSA, crypto.SHA256, digest[:]); err != nil {
		t.Fatal(err)
	}
	if got := f.Calls("C_FindObjectsInit") - finds; got != 0 {
		t.Fatalf("a sign with a cached handle searched the token %d times, want 0", got)
	}

	finds, inits := f.Calls("C_FindObjectsInit"), f.Calls("C_SignInit")
	f.Fail("C_SignInit", pkcs11.CKR_OBJECT_HANDLE_INVALID, 1)
	sig, err := cl.SignDigest(ctx, "ec-1", hsm.SchemeECDSA, crypto.SHA256, digest[:])
	if err != nil {
		t.Fatalf("sign after a stale handle: %v, want the retry to succeed", err)
	}
	if !ecdsa.VerifyASN1(pub, digest[:], sig) {
		t.Errorf("the retried signature does not verify")
	}
	if got := f.Calls("C_SignInit") - inits; got != 2 {
		t.Errorf("C_SignInit called %d times, want 2 (the call and one retry)", got)
	}
	if got := f.Calls("C_FindObjectsInit") - finds; got != 1 {
		t.Errorf("C_FindObjectsInit called %d times, want 1 (the dropped handle looked up again)", got)
	}
	if ev := cl.Stats().Evictions[hsm.ClassSession]; ev != 1 {
		t.Errorf("Evictions[session] = %d, want 1", ev)
	}
}

// TestRelogin_Once_FaultInjected: CKR_USER_NOT_LOGGED_IN makes the cluster log in again,
// exactly once, and retry the operation once: the caller never sees it. A second
// CKR_USER_NOT_LOGGED_IN in a row reaches the caller, after still only one C_Login. An
// operation that creates an object is not retried after the re-login, but the next works.
func TestRelogin_Once_FaultInjected(t *testing.T) {
	t.Run("RetriedAfterOneLogin", func(t *testing.T) {
		var f hsmtest.Faults
		cl, _ := newCluster(t, intercept(f.Interceptor()))
		logins, inits := f.Calls("C_Login"), f.Calls("C_SignInit")
		f.Fail("C_SignInit", pkcs11.CKR_USER_NOT_LOGGED_IN, 1)
		if err := cl.ProveIdentity(t.Context()); err != nil {
			t.Fatalf("ProveIdentity: %v, want the retry after the re-login to succeed", err)
		}
		if got := f.Calls("C_Login") - logins; got != 1 {
			t.Errorf("C_Login called %d times, want exactly 1", got)
		}
		if got := f.Calls("C_SignInit") - inits; got != 2 {
			t.Errorf("C_SignInit called %d times, want 2", got)
		}
		if st := cl.Stats(); st.Relogins != 1 {
			t.Errorf("Stats().Relogins = %d, want 1", st.Relogins)
		}
		if h := cl.Health(); h.State != hsm.StateHealthy {
			t.Errorf("health %+v, want healthy", h)
		}
	})
	t.Run("SecondFailureReachesCaller", func(t *testing.T) {
		var f hsmtest.Faults
		cl, _ := newCluster(t, intercept(f.Interceptor()))
		logins, inits := f.Calls("C_Login"), f.Calls("C_SignInit")
		f.Fail("C_SignInit", pkcs11.CKR_USER_NOT_LOGGED_IN, 2)
		err := cl.ProveIdentity(t.Context())
		if classOf(t, err) != hsm.ClassLogin {
			t.Fatalf("err = %v, want the login-class error of the retry", err)
		}
		if got := f.Calls("C_Login") - logins; got != 1 {
			t.Errorf("C_Login called %d times, want 1", got)
		}
		if got := f.Calls("C_SignInit") - inits; got != 2 {
			t.Errorf("C_SignInit called %d times, want 2 (the call and one retry)", got)
		}
		if err := cl.ProveIdentity(t.Context()); err != nil {
			t.Errorf("the next call: %v", err)
		}
	})
	t.Run("NonIdempotentNotRetried", func(t *testing.T) {
		var f hsmtest.Faults
		cl, _ := newCluster(t, intercept(f.Interceptor()))
		logins, gens := f.Calls("C_Login"), f.Calls("C_GenerateKey")
		f.Fail("C_GenerateKey", pkcs11.CKR_USER_NOT_LOGGED_IN, 1)
		err := cl.GenerateAES(t.Context(), "aes-1", 256)
		if classOf(t, err) != hsm.ClassLogin {
			t.Fatalf("err = %v, want the login-class error, not retried", err)
		}
		if got := f.Calls("C_GenerateKey") - gens; got != 1 {
			t.Errorf("C_GenerateKey called %d times, want 1", got)
		}
		if got := f.Calls("C_Login") - logins; got != 1 {
			t.Errorf("C_Login called %d times, want 1 (the re-login happens all the same)", got)
		}
		if err := cl.GenerateAES(t.Context(), "aes-2", 256); err != nil {
			t.Errorf("the next GenerateAES: %v", err)
		}
	})
}

// TestRelogin_ConcurrentSerialised_FaultInjected: ten calls that all fail with
// CKR_USER_NOT_LOGGED_IN at once re-log in one at a time (no two C_Login overlap), at most
// once per failure, and all ten then succeed on their retry.
func TestRelogin_ConcurrentSerialised_FaultInjected(t *testing.T) {
	const callers = 10
	var f hsmtest.Faults
	var inLogin, maxInLogin atomic.Int64
	fi := f.Interceptor()
	ic := func(fn string, call func() error) error {
		if fn == "C_Login" {
			n := inLogin.Add(1)
			defer inLogin.Add(-1)
			for old := maxInLogin.Load(); n > old && !maxInLogin.CompareAndSwap(old, n); old = maxInLogin.Load() {
			}
		}
		return fi(fn, call)
	}
	cl, _ := newCluster(t, poolSize(callers), intercept(ic))
	logins, inits := f.Calls("C_Login"), f.Calls("C_SignInit")

	// Every first attempt takes one of the armed failures on arrival, then waits at the block,
	// so all ten fail together and none of the failures is left for a retry.
	f.Fail("C_SignInit", pkcs11.CKR_USER_NOT_LOGGED_IN, callers)
	release := f.Block("C_SignInit")
	defer release()
	errs := make(chan error, callers)
	for range callers {
		go func() { errs <- cl.ProveIdentity(context.Background()) }()
	}
	waitFor(t, "every caller in C_SignInit", func() bool { return f.Calls("C_SignInit")-inits == callers })
	release()
	for range callers {
		if err := <-errs; err != nil {
			t.Errorf("ProveIdentity: %v", err)
		}
	}
	n := f.Calls("C_Login") - logins
	t.Logf("%d concurrent CKR_USER_NOT_LOGGED_IN failures led to %d C_Login calls (Stats().Relogins %d)", callers, n, cl.Stats().Relogins)
	if n < 1 || n > callers {
		t.Errorf("C_Login called %d times, want 1 to %d", n, callers)
	}
	if m := maxInLogin.Load(); m != 1 {
		t.Errorf("%d C_Login calls overlapped, want them serialised", m)
	}
	if got := f.Calls("C_SignInit") - inits; got != 2*callers {
		t.Errorf("C_SignInit called %d times, want %d (each call and its one retry)", got, 2*callers)
	}
}

// TestRelogin_CredentialRefused_FaultInjected: when the re-login's PIN is refused, the PIN is
// tried exactly once, the cluster is FAILED with the reason, and every later call is
// refused with ErrUnavailable without touching the token — no C_Login ever again.
func TestRelogin_CredentialRefused_FaultInjected(t *testing.T) {
	tests := []struct {
		code   uint
		reason string
	}{
		{pkcs11.CKR_PIN_INCORRECT, "INVALID_CREDENTIALS"},
		{pkcs11.CKR_PIN_LOCKED, "USER_LOCKED_OUT"},
		{pkcs11.CKR_PIN_EXPIRED, "INVALID_CREDENTIALS"},
	}
	for _, tt := range tests {
		t.Run(tt.reason+"/"+pkcs11.Error(tt.code).Error(), func(t *testing.T) {
			var f hsmtest.Faults
			var cc callCounter
			var hl healthLog
			cl, _ := newCluster(t, intercept(cc.wrap(f.Interceptor())), watchHealth(&hl))
			newECKey(t, cl, "ec-1")
			logins := f.Calls("C_Login")
			f.Fail("C_SignInit", pkcs11.CKR_USER_NOT_LOGGED_IN, 1)
			f.Fail("C_Login", tt.code, -1)

			err := cl.ProveIdentity(t.Context())
			if !errors.Is(err, pkcs11.Error(tt.code)) || hsm.Classify(err) != hsm.ClassCredential {
				t.Fatalf("err = %v, want the credential-class %v", err, pkcs11.Error(tt.code))
			}
			if got := f.Calls("C_Login") - logins; got != 1 {
				t.Errorf("C_Login called %d times, want exactly 1", got)
			}
			h := cl.Health()
			if h.State != hsm.StateFailed || h.Reason != tt.reason {
				t.Errorf("health %+v, want failed with reason %s", h, tt.reason)
			}
			if got := hl.states(); !slices.Equal(got, []hsm.State{hsm.StateFailed}) {
				t.Errorf("OnHealthChange saw %v, want [failed]", got)
			}

			wantFailFast(t, cl, &cc, "ec-1")
			if got := f.Calls("C_Login") - logins; got != 1 {
				t.Errorf("C_Login called %d times in all, want 1", got)
			}
			f.Clear() // even with the token willing, a failed cluster stays failed
			wantFailFast(t, cl, &cc, "ec-1")
			if h := cl.Health(); h.State != hsm.StateFailed {
				t.Errorf("health %+v, want still failed", h)
			}
		})
	}
}

// TestRecover_CredentialRefused_FaultInjected: a recovery whose log-in is refused fails the
// cluster and stops: the PIN is tried once, and never again.
func TestRecover_CredentialRefused_FaultInjected(t *testing.T) {
	var f hsmtest.Faults
	var hl healthLog
	var re recoverErrors
	cl, _ := newCluster(t, intercept(f.Interceptor()), breakerThreshold(1), watchHealth(&hl), watchRecovery(&re))
	logins := f.Calls("C_Login")
	f.Fail("C_Login", pkcs11.CKR_PIN_INCORRECT, -1)
	f.Fail("C_FindObjectsInit", pkcs11.CKR_DEVICE_ERROR, 1)
	if _, err := cl.DataObjects(t.Context()); classOf(t, err) != hsm.ClassDevice {
		t.Fatalf("err = %v, want a device-class error", err)
	}
	waitFor(t, "the recovery's refused log-in to fail the cluster", func() bool { return cl.Health().State == hsm.StateFailed })
	if h := cl.Health(); h.Reason != "INVALID_CREDENTIALS" {
		t.Errorf("health %+v, want reason INVALID_CREDENTIALS", h)
	}
	if got := hl.states(); !slices.Equal(got, []hsm.State{hsm.StateUnavailable, hsm.StateFailed}) {
		t.Errorf("OnHealthChange saw %v, want [unavailable failed]", got)
	}
	if got := f.Calls("C_Login") - logins; got != 1 {
		t.Errorf("C_Login called %d times, want exactly 1", got)
	}
	if err := cl.ProveIdentity(t.Context()); !errors.Is(err, hsm.ErrUnavailable) {
		t.Errorf("ProveIdentity on the failed cluster: %v, want ErrUnavailable", err)
	}
	if got := f.Calls("C_Login") - logins; got != 1 {
		t.Errorf("C_Login called %d times in all, want 1", got)
	}
}

// TestBreaker_FaultInjected: BreakerThreshold device-class failures in a row open the breaker
// (a caller-class error or a success in between starts the count again); while it is open
// every call fails fast without touching the token and the background recovery keeps trying
// (and failing, while the fault lasts); once the fault is gone it brings the cluster back.
func TestBreaker_FaultInjected(t *testing.T) {
	tests := []struct {
		name string
		// recoveryFault is the call the fault that outlasts the breaker's opening hits in recovery.
		recoveryFault string
		code          uint
		// allowed are the calls a recovery attempt makes before it fails.
		allowed []string
	}{
		{"SlotListFails", "C_GetSlotList", pkcs11.CKR_DEVICE_ERROR, []string{"C_CloseSession", "C_GetSlotList"}},
		{"LoginFails", "C_Login", pkcs11.CKR_DEVICE_REMOVED,
			[]string{"C_CloseSession", "C_GetSlotList", "C_GetTokenInfo", "C_OpenSession", "C_Login"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var f hsmtest.Faults
			var cc callCounter
			var hl healthLog
			var re recoverErrors
			cl, _ := newCluster(t, intercept(cc.wrap(f.Interceptor())), breakerThreshold(2), watchHealth(&hl), watchRecovery(&re))
			ctx := t.Context()
			newECKey(t, cl, "ec-1")
			healthy := func(when string) {
				t.Helper()
				if h := cl.Health(); h.State != hsm.StateHealthy {
					t.Fatalf("%s: health %+v, want healthy", when, h)
				}
			}
			device := func() {
				t.Helper()
				f.Fail("C_FindObjectsInit", pkcs11.CKR_DEVICE_ERROR, 1)
				if _, err := cl.DataObjects(ctx); classOf(t, err) != hsm.ClassDevice {
					t.Fatalf("err = %v, want a device-class error", err)
				}
			}
			// Recovery, once the breaker opens, meets this fault until it is cleared.
			f.Fail(tt.recoveryFault, tt.code, -1)

			device()
			healthy("after 1 device fault")
			if _, err := cl.DataObjects(ctx); err != nil {
				t.Fatal(err)
			}
			device()
			healthy("after device, success, device")
			if got := cl.Stats().BreakerOpens; got != 0 {
				t.Fatalf("BreakerOpens = %d before the threshold, want 0", got)
			}

			device() // the second in a row
			h := cl.Health()
			if h.State != hsm.StateUnavailable {
				t.Fatalf("health %+v after 2 device faults in a row, want unavailable", h)
			}
			if h.Reason != "CKR_DEVICE_ERROR" {
				t.Errorf("health reason %q, want the CKR_* code that opened the breaker, CKR_DEVICE_ERROR", h.Reason)
			}
			if got := cl.Stats().BreakerOpens; got != 1 {
				t.Errorf("BreakerOpens = %d, want 1", got)
			}
			wantFailFast(t, cl, &cc, "ec-1", tt.allowed...)
			if _, err := cl.DataObjects(ctx); err == nil || !strings.Contains(err.Error(), "unavailable") {
				t.Errorf("DataObjects while open: %v, want it to say the cluster is unavailable", err)
			}

			waitFor(t, "two failed recovery attempts", func() bool { return len(re.get()) >= 2 })
			for _, err := range re.get() {
				if !errors.Is(err, pkcs11.Error(tt.code)) {
					t.Errorf("recovery error %v, want %v", err, pkcs11.Error(tt.code))
				}
			}
			if h := cl.Health(); h.State != hsm.StateUnavailable {
				t.Errorf("health %+v while the fault lasts, want unavailable", h)
			}
			wantFailFast(t, cl, &cc, "ec-1", tt.allowed...)

			f.Clear()
			waitFor(t, "recovery", func() bool { return cl.Health().State == hsm.StateHealthy })
			if got := hl.states(); !slices.Equal(got, []hsm.State{hsm.StateUnavailable, hsm.StateHealthy}) {
				t.Errorf("OnHealthChange saw %v, want [unavailable healthy]", got)
			}
			if got := cl.Stats().BreakerOpens; got != 1 {
				t.Errorf("BreakerOpens = %d after recovery, want 1", got)
			}
			if err := cl.ProveIdentity(ctx); err != nil {
				t.Errorf("ProveIdentity after recovery: %v", err)
			}
			digest := sha256.Sum256([]byte("m"))
			if _, err := cl.SignDigest(ctx, "ec-1", hsm.SchemeECDSA, crypto.SHA256, digest[:]); err != nil {
				t.Errorf("sign with a key made before the breaker opened: %v", err)
			}
			if err := cl.WriteData(ctx, "after", []byte("v")); err != nil {
				t.Errorf("WriteData after recovery: %v", err)
			}
			// One device fault after recovery does not reopen it: the count started again.
			device()
			healthy("after 1 device fault past recovery")
		})
	}
}

// TestStuck_FaultInjected: with every session (pool size 1) held in a call that has not
// returned for longer than StuckAfter, the next call is refused at once with ErrUnavailable,
// the cluster says STUCK, and Stats counts the stuck session; once the call returns, the
// cluster recovers and works, and the session the stuck call held does not disturb the pool
// recovery made.
func TestStuck_FaultInjected(t *testing.T) {
	var f hsmtest.Faults
	var hl healthLog
	cl, _ := newCluster(t, poolSize(1), stuckAfter(50*time.Millisecond), intercept(f.Interceptor()), watchHealth(&hl))
	ctx := t.Context()
	finds := f.Calls("C_FindObjectsInit")
	release := f.Block("C_FindObjectsInit")
	defer release()
	held := make(chan error, 1)
	go func() { _, err := cl.DataObjects(context.Background()); held <- err }()
	waitFor(t, "the call to hold the only session", func() bool { return f.Calls("C_FindObjectsInit") == finds+1 })
	waitFor(t, "the held session to count as stuck", func() bool { return cl.Stats().Stuck == 1 })

	opens := f.Calls("C_OpenSession")
	_, err := cl.DataObjects(ctx)
	if !errors.Is(err, hsm.ErrUnavailable) || !strings.Contains(err.Error(), "stuck") {
		t.Fatalf("call with every session stuck: %v, want ErrUnavailable saying stuck", err)
	}
	if st := cl.Stats(); st.Stuck != 1 {
		t.Errorf("Stats().Stuck = %d, want 1", st.Stuck)
	}
	if h := cl.Health(); h.State != hsm.StateUnavailable || h.Reason != "STUCK" {
		t.Errorf("health %+v, want unavailable, STUCK", h)
	}
	if got := f.Calls("C_FindObjectsInit") - finds; got != 1 {
		t.Errorf("the refused call reached the token (%d C_FindObjectsInit)", got-1)
	}
	if got := f.Calls("C_OpenSession"); got != opens {
		t.Errorf("the refused call opened a session")
	}

	release()
	if err := <-held; err != nil {
		t.Logf("the call that was stuck returned: %v", err)
	}
	waitFor(t, "recovery", func() bool { return cl.Health().State == hsm.StateHealthy })
	if got := hl.states(); !slices.Equal(got, []hsm.State{hsm.StateUnavailable, hsm.StateHealthy}) {
		t.Errorf("OnHealthChange saw %v, want [unavailable healthy]", got)
	}
	// Every kind of call works on the recovered pool, the non-idempotent ones too: no session
	// of it was closed under it by the stuck call's late return.
	for i := range 3 {
		if _, err := cl.DataObjects(ctx); err != nil {
			t.Errorf("DataObjects %d after recovery: %v", i, err)
		}
		if err := cl.WriteData(ctx, "after-"+string(rune('a'+i)), []byte("v")); err != nil {
			t.Errorf("WriteData %d after recovery: %v", i, err)
		}
	}
	if st := cl.Stats(); st.Evictions != [len(st.Evictions)]uint64{} || st.Stuck != 0 {
		t.Errorf("after recovery: Evictions %v, Stuck %d; want none", st.Evictions, st.Stuck)
	}
}

// TestRecover_CloseWhileRecoveryFails_FaultInjected: a cluster closed while its recovery
// keeps failing closes cleanly. A failed attempt has already closed the old anchor session;
// Close must not close it again (CKR_SESSION_HANDLE_INVALID, or, on a module that reuses
// handle numbers, someone else's session).
func TestRecover_CloseWhileRecoveryFails_FaultInjected(t *testing.T) {
	var f hsmtest.Faults
	var re recoverErrors
	tok := newToken(t, "")
	cfg := configFor(tok)
	cfg.Interceptor, cfg.BreakerThreshold, cfg.OnRecoverError = f.Interceptor(), 1, re.add
	cl, err := hsm.OpenCluster(t.Context(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	f.Fail("C_GetSlotList", pkcs11.CKR_DEVICE_ERROR, -1)
	f.Fail("C_FindObjectsInit", pkcs11.CKR_DEVICE_ERROR, 1)
	if _, err := cl.DataObjects(t.Context()); classOf(t, err) != hsm.ClassDevice {
		t.Fatalf("err = %v, want a device-class error", err)
	}
	waitFor(t, "a failed recovery attempt", func() bool { return len(re.get()) >= 1 })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := cl.Close(ctx); err != nil {
		t.Errorf("Close while recovery fails: %v, want nil", err)
	}
}

// TestBreaker_ProbeDeviceFault_FaultInjected: CurrentToken is the cheap call /readyz and
// enable make to ask whether the token is there. Its device-class failures are the cluster's
// device failing like any other call's: BreakerThreshold of them in a row open the breaker,
// whose recovery can then re-initialise the module. (SoftHSM answers C_GetTokenInfo with
// CKR_GENERAL_ERROR for a token whose directory vanished, and only a re-initialisation
// brings it back.)
func TestBreaker_ProbeDeviceFault_FaultInjected(t *testing.T) {
	var f hsmtest.Faults
	cl, _ := newCluster(t, intercept(f.Interceptor()), breakerThreshold(2))
	f.Fail("C_GetTokenInfo", pkcs11.CKR_GENERAL_ERROR, 2)
	for range 2 {
		if _, err := cl.CurrentToken(t.Context()); classOf(t, err) != hsm.ClassDevice {
			t.Fatalf("CurrentToken: %v, want a device-class error", err)
		}
	}
	if h := cl.Health(); h.State != hsm.StateUnavailable {
		t.Errorf("health %+v after 2 device-class probe failures in a row, want unavailable", h)
	}
	waitFor(t, "recovery", func() bool { return cl.Health().State == hsm.StateHealthy })
}

// TestBreaker_CallerErrorsDoNotResetTheCount_FaultInjected: only a success shows the device
// works; caller-class failures (say, tampered ciphertexts) between device faults must not
// keep a dying device's breaker closed.
func TestBreaker_CallerErrorsDoNotResetTheCount_FaultInjected(t *testing.T) {
	var f hsmtest.Faults
	cl, _ := newCluster(t, intercept(f.Interceptor()), func(c *hsm.ClusterConfig) { c.BreakerThreshold = 2 })
	ctx := t.Context()
	f.Fail("C_GetSlotList", pkcs11.CKR_DEVICE_ERROR, -1) // keep recovery from closing it again
	for i, code := range []uint{pkcs11.CKR_DEVICE_ERROR, pkcs11.CKR_ARGUMENTS_BAD, pkcs11.CKR_DEVICE_ERROR} {
		f.Fail("C_FindObjectsInit", code, 1)
		if _, err := cl.DataObjects(ctx); err == nil {
			t.Fatalf("call %d succeeded, want the injected %#x", i, code)
		}
	}
	if h := cl.Health(); h.State != hsm.StateUnavailable {
		t.Errorf("after device, caller, device: %+v, want the breaker open", h)
	}
}
