package hsm_test

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/hsmbridge/hsmbridge/hsm"
)

// countCalls returns an interceptor that counts the calls of fn.
func countCalls(fn string, n *atomic.Int64) hsm.Interceptor {
	return func(name string, call func() error) error {
		if name == fn {
			n.Add(1)
		}
		return call()
	}
}

// TestOpenCluster_WrongPIN_TriedOnce: a refused PIN is ErrCredential, named by cluster,
// never printed, and tried exactly once; the right PIN then works.
func TestOpenCluster_WrongPIN_TriedOnce(t *testing.T) {
	tok := newToken(t, "")
	const wrongPIN = "wrong-pin-8c1f"
	var logins atomic.Int64
	cfg := configFor(tok)
	cfg.PIN = wrongPIN
	cfg.Interceptor = countCalls("C_Login", &logins)
	cl, err := hsm.OpenCluster(t.Context(), cfg)
	if err == nil {
		_ = cl.Close(t.Context())
		t.Fatal("OpenCluster succeeded with a wrong PIN")
	}
	if !errors.Is(err, hsm.ErrCredential) {
		t.Errorf("err = %v, want ErrCredential", err)
	}
	if got := hsm.Classify(err); got != hsm.ClassCredential {
		t.Errorf("Classify = %v, want credential", got)
	}
	if msg := err.Error(); !strings.Contains(msg, cfg.ID) || strings.Contains(msg, wrongPIN) {
		t.Errorf("message %q: want the cluster id %q in it and the PIN not", msg, cfg.ID)
	}
	if n := logins.Load(); n != 1 {
		t.Errorf("C_Login called %d times, want 1", n)
	}

	cl = openCluster(t, configFor(tok))
	if err := cl.ProveIdentity(t.Context()); err != nil {
		t.Fatalf("ProveIdentity with the right PIN: %v", err)
	}
}

// TestOpenCluster_WrongPIN_WhileTokenLoggedIn: the login state of a token is shared by the
// whole process, so C_Login answers CKR_USER_ALREADY_LOGGED_IN, without checking the PIN,
// when another cluster on the same token is open. A wrong PIN must still be refused, or
// whether it works depends on which cluster happened to open first.
func TestOpenCluster_WrongPIN_WhileTokenLoggedIn(t *testing.T) {
	tok := newToken(t, "")
	openCluster(t, configFor(tok))
	cfg := configFor(tok)
	cfg.ID += "-second"
	cfg.PIN = "wrong-pin-8c1f"
	cl, err := hsm.OpenCluster(t.Context(), cfg)
	if err == nil {
		_ = cl.Close(t.Context())
		t.Fatal("OpenCluster accepted a wrong PIN because the token was already logged in")
	}
	if !errors.Is(err, hsm.ErrCredential) {
		t.Errorf("err = %v, want ErrCredential", err)
	}
}

func TestOpenCluster_TokenSelection(t *testing.T) {
	tok := newToken(t, "")
	tests := []struct {
		name          string
		serial, label string
		want          error // nil: opens on tok
	}{
		{"SerialOnly", tok.Serial, "", nil},
		{"LabelOnly", "", tok.Label, nil},
		{"SerialAndLabel", tok.Serial, tok.Label, nil},
		{"WrongSerial", "0000000000000000", "", hsm.ErrTokenNotFound},
		{"WrongSerialRightLabel", "0000000000000000", tok.Label, hsm.ErrTokenNotFound},
		{"RightSerialWrongLabel", tok.Serial, "no-such-label", hsm.ErrTokenNotFound},
		{"WrongLabel", "", "no-such-label", hsm.ErrTokenNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := configFor(tok)
			cfg.TokenSerial, cfg.TokenLabel = tt.serial, tt.label
			if tt.want != nil {
				cl, err := hsm.OpenCluster(t.Context(), cfg)
				if err == nil {
					_ = cl.Close(t.Context())
				}
				if !errors.Is(err, tt.want) {
					t.Fatalf("err = %v, want %v", err, tt.want)
				}
				if !strings.Contains(err.Error(), cfg.ID) {
					t.Errorf("message %q does not name the cluster %q", err, cfg.ID)
				}
				return
			}
			cl := openCluster(t, cfg)
			if got := cl.Token(); got.Serial != tok.Serial || got.Label != tok.Label {
				t.Errorf("Token() = %+v, want serial %q label %q", got, tok.Serial, tok.Label)
			}
			if err := cl.ProveIdentity(t.Context()); err != nil {
				t.Errorf("ProveIdentity: %v", err)
			}
		})
	}
}

func TestOpenCluster_NoSelector(t *testing.T) {
	cfg := configFor(newToken(t, ""))
	cfg.TokenSerial, cfg.TokenLabel = "", ""
	if cl, err := hsm.OpenCluster(t.Context(), cfg); err == nil {
		_ = cl.Close(t.Context())
		t.Fatal("OpenCluster with neither serial nor label succeeded")
	}
}

// TestOpenCluster_AmbiguousLabel: two tokens with one label are told apart by serial only;
// a label alone is refused rather than guessed.
func TestOpenCluster_AmbiguousLabel(t *testing.T) {
	label := tokenLabel(t)
	a, b := newToken(t, label), newToken(t, label)
	if a.Serial == b.Serial {
		t.Fatalf("two tokens with serial %q", a.Serial)
	}
	cfg := configFor(a)
	cfg.TokenSerial = ""
	cl, err := hsm.OpenCluster(t.Context(), cfg)
	if err == nil {
		_ = cl.Close(t.Context())
	}
	if !errors.Is(err, hsm.ErrAmbiguous) {
		t.Fatalf("label only: err = %v, want ErrAmbiguous", err)
	}
	for _, tok := range []struct {
		name   string
		serial string
	}{{"a", a.Serial}, {"b", b.Serial}} {
		cfg := configFor(a)
		cfg.TokenSerial = tok.serial
		if got := openCluster(t, cfg).Token().Serial; got != tok.serial {
			t.Errorf("token %s: opened serial %q, want %q", tok.name, got, tok.serial)
		}
	}
}

func TestOpenCluster_RelativeModulePathRefused(t *testing.T) {
	cfg := configFor(newToken(t, ""))
	cfg.ModulePath = filepath.Base(module)
	if cl, err := hsm.OpenCluster(t.Context(), cfg); err == nil {
		_ = cl.Close(t.Context())
		t.Fatalf("OpenCluster loaded %q by dlopen search", cfg.ModulePath)
	}
}

// TestModule_SharedBetweenClusters: clusters on one module share it; closing one does not
// finalize it under the other. The second cluster names the module through its resolved
// path, so this also proves two spellings of one file share one context (two contexts
// would each C_Finalize the same library).
func TestModule_SharedBetweenClusters(t *testing.T) {
	real, err := filepath.EvalSymlinks(module)
	if err != nil {
		t.Fatal(err)
	}
	tokA, tokB := newToken(t, ""), newToken(t, "")
	a := openCluster(t, configFor(tokA))
	cfgB := configFor(tokB)
	cfgB.ModulePath = real
	b := openCluster(t, cfgB)
	t.Logf("module %s, resolved %s", module, real)

	if err := a.Close(t.Context()); err != nil {
		t.Fatalf("close a: %v", err)
	}
	if err := b.ProveIdentity(t.Context()); err != nil {
		t.Errorf("b.ProveIdentity after a closed: %v", err)
	}
	if _, err := b.DataObjects(t.Context()); err != nil {
		t.Errorf("b.DataObjects after a closed: %v", err)
	}
	if ti, err := b.CurrentToken(t.Context()); err != nil || ti.Serial != tokB.Serial {
		t.Errorf("b.CurrentToken after a closed = %+v, %v; want serial %q", ti, err, tokB.Serial)
	}

	// Closing the last cluster finalizes the module; opening again initialises it again.
	if err := b.Close(t.Context()); err != nil {
		t.Fatalf("close b: %v", err)
	}
	c := openCluster(t, configFor(tokA))
	if err := c.ProveIdentity(t.Context()); err != nil {
		t.Errorf("ProveIdentity after reopening: %v", err)
	}
}

// TestOpenCluster_ContextDone: a context already ended stops OpenCluster before it logs in.
func TestOpenCluster_ContextDone(t *testing.T) {
	cfg := configFor(newToken(t, ""))
	var logins atomic.Int64
	cfg.Interceptor = countCalls("C_Login", &logins)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	cl, err := hsm.OpenCluster(ctx, cfg)
	if err == nil {
		_ = cl.Close(t.Context())
	}
	if !errors.Is(err, context.Canceled) {
		t.Errorf("err = %v, want context.Canceled", err)
	}
	if n := logins.Load(); n != 0 {
		t.Errorf("C_Login called %d times, want 0", n)
	}
}
