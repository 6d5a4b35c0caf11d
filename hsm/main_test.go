package hsm_test

// The hsm tests run against a real SoftHSMv2 module, with a token directory of their own.
// They are an external test package because internal/devenv imports hsm.

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hsmbridge/hsmbridge/hsm"
	"github.com/hsmbridge/hsmbridge/internal/devenv"
)

const (
	testPIN   = "1234-user"
	testSOPIN = "5678-so"
)

var (
	module string     // the SoftHSM module path, set by TestMain
	testCA *devenv.CA // issues every test token's identity certificate
)

func TestMain(m *testing.M) { os.Exit(run(m)) }

func run(m *testing.M) int {
	path, err := devenv.FindSoftHSM()
	if err == nil {
		_, err = os.Stat(path) // $HSMBRIDGE_SOFTHSM_MODULE is taken on trust by FindSoftHSM
	}
	if err != nil {
		if os.Getenv("CI") == "true" {
			fmt.Fprintf(os.Stderr, "FAIL: hsm tests need SoftHSMv2 under CI=true: %v\n", err)
			return 1
		}
		fmt.Fprintf(os.Stderr, "SKIP: hsm tests not run: %v\n", err)
		return 0
	}
	module = path
	dir, err := os.MkdirTemp("", "hsmbridge-hsm-test-")
	if err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: %v\n", err)
		return 1
	}
	defer os.RemoveAll(dir)
	// Before any module is opened in this process: SoftHSM reads its configuration at
	// C_Initialize. The system token directory is never touched.
	if _, err := devenv.UseSoftHSMDir(dir); err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: %v\n", err)
		return 1
	}
	now := time.Now()
	if testCA, err = devenv.NewCA("hsm test CA", now.Add(-time.Hour), now.Add(24*time.Hour)); err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: %v\n", err)
		return 1
	}
	return m.Run()
}

// tokenMu serialises token creation: hsm.InitToken takes "the first uninitialised token",
// and two goroutines doing that at once could both pick the same free slot.
var (
	tokenMu  sync.Mutex
	tokenSeq atomic.Int64
)

// tokenLabel returns a label unique to this test and call, at most 32 characters.
func tokenLabel(t testing.TB) string {
	sum := sha256.Sum256([]byte(t.Name()))
	return fmt.Sprintf("t-%s-%d", hex.EncodeToString(sum[:6]), tokenSeq.Add(1))
}

// newToken makes a fresh token with an identity key and certificate, labelled label, or a
// label unique to the test if label is empty.
func newToken(t testing.TB, label string) *devenv.Token {
	t.Helper()
	if label == "" {
		label = tokenLabel(t)
	}
	tokenMu.Lock()
	defer tokenMu.Unlock()
	tok, err := devenv.NewToken(t.Context(), module, "c-"+label, label, testSOPIN, testPIN, testCA)
	if err != nil {
		t.Fatalf("new token %q: %v", label, err)
	}
	return tok
}

// configFor is the cluster configuration of tok, as the daemon would build it.
func configFor(tok *devenv.Token) hsm.ClusterConfig {
	return hsm.ClusterConfig{
		ID:                tok.ClusterID,
		ModulePath:        module,
		TokenSerial:       tok.Serial,
		TokenLabel:        tok.Label,
		PIN:               testPIN,
		PoolSize:          4,
		IdentityKeyLabel:  tok.KeyLabel,
		IdentityCertLabel: tok.CertLabel,
	}
}

// newCluster opens a cluster on a fresh token; opts adjust the configuration first. The
// cluster is closed when the test ends.
func newCluster(t testing.TB, opts ...func(*hsm.ClusterConfig)) (*hsm.Cluster, *devenv.Token) {
	t.Helper()
	tok := newToken(t, "")
	cfg := configFor(tok)
	for _, o := range opts {
		o(&cfg)
	}
	return openCluster(t, cfg), tok
}

// openCluster opens cfg and closes the cluster when the test ends.
func openCluster(t testing.TB, cfg hsm.ClusterConfig) *hsm.Cluster {
	t.Helper()
	cl, err := hsm.OpenCluster(t.Context(), cfg)
	if err != nil {
		t.Fatalf("open cluster %s: %v", cfg.ID, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := cl.Close(ctx); err != nil {
			t.Errorf("close cluster %s: %v", cfg.ID, err)
		}
	})
	return cl
}

func poolSize(n int) func(*hsm.ClusterConfig) {
	return func(c *hsm.ClusterConfig) { c.PoolSize = n }
}

func intercept(ic hsm.Interceptor) func(*hsm.ClusterConfig) {
	return func(c *hsm.ClusterConfig) { c.Interceptor = ic }
}

// waitFor polls cond until it holds, failing the test if it does not within a generous
// bound. It orders goroutines; it asserts nothing about time.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// classOf is hsm.Classify, with the *hsm.OpError required to be in the chain.
func classOf(t testing.TB, err error) hsm.Class {
	t.Helper()
	if _, ok := errors.AsType[*hsm.OpError](err); !ok {
		t.Fatalf("no *hsm.OpError in %v", err)
	}
	return hsm.Classify(err)
}
