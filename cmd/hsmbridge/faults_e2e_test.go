package main

// Real faults on SoftHSM, with no fault-injecting wrapper: the token directory of a bound
// token taken away and put back under a running daemon, another process logging the token
// out, and (the load test) key operations on two clusters while one of them fails and
// recovers. The daemon must answer with a 5xx KMS error while a token is unusable — never
// crash, never answer a panic's bare 500 — report it on /readyz, and serve again after.

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http/httptest"
	"os/exec"
	"sync/atomic"

	"github.com/miekg/pkcs11"
	"github.com/prometheus/client_golang/prometheus"

	"encoding/json"
	"github.com/hsmbridge/hsmbridge/hsm"
	"github.com/hsmbridge/hsmbridge/hsm/hsmtest"
	"github.com/hsmbridge/hsmbridge/internal/config"
	"github.com/hsmbridge/hsmbridge/keystore"
	"github.com/hsmbridge/hsmbridge/keystore/api"
	"github.com/hsmbridge/hsmbridge/keystore/store"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hsmbridge/hsmbridge/internal/devenv"
)

// tokenDirOf returns the directory in the private SoftHSM token directory that holds tok:
// SoftHSM names it by a UUID of its own, and its token.object records the serial.
func tokenDirOf(t *testing.T, tok *devenv.Token) string {
	t.Helper()
	root := filepath.Join(softHSMDir, "tokens")
	entries, err := os.ReadDir(root)
	if err != nil {
		t.Fatal(err)
	}
	var found []string
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(root, e.Name(), "token.object"))
		if err == nil && bytes.Contains(b, []byte(tok.Serial)) {
			found = append(found, filepath.Join(root, e.Name()))
		}
	}
	if len(found) != 1 {
		t.Fatalf("token %s (serial %s): %d directories in %s record it, want 1", tok.Label, tok.Serial, len(found), root)
	}
	return found[0]
}

// removeTokenDir moves tok's directory out of the token directory (same file system) and
// returns a func that puts it back; the test's cleanup puts it back too, if still away.
func removeTokenDir(t *testing.T, tok *devenv.Token) (restore func()) {
	t.Helper()
	dir := tokenDirOf(t, tok)
	away := filepath.Join(softHSMDir, "away-"+filepath.Base(dir))
	if err := os.Rename(dir, away); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	restore = func() {
		once.Do(func() {
			if err := os.Rename(away, dir); err != nil {
				t.Errorf("restore token directory: %v", err)
			}
		})
	}
	t.Cleanup(restore)
	return restore
}

// kmsAnswer is one answer of a /kms/ call.
type kmsAnswer struct {
	status int
	code   string // error_code of an error answer
	body   string
}

func (c *kmsClient) try(call string, body map[string]any) kmsAnswer {
	c.t.Helper()
	st, _, b := c.post(call, body)
	a := kmsAnswer{status: st, body: string(bytes.TrimSpace(b))}
	var e struct {
		Error struct {
			Code string `json:"error_code"`
		} `json:"error"`
	}
	if json.Unmarshal(b, &e) == nil {
		a.code = e.Error.Code
	}
	return a
}

// wantServerError checks that a is a 5xx in the service's error format with a KMS code: the
// daemon noticed the HSM failing and said so, rather than panicking or answering 200.
func wantServerError(t *testing.T, what string, a kmsAnswer) {
	t.Helper()
	if a.status < 500 || !strings.HasPrefix(a.code, "KMS.") {
		t.Errorf("%s: %d %s, want a 5xx with a KMS.* error code", what, a.status, a.body)
	}
}

// readyzStatus returns /readyz's status and the connection state it gives cluster.
func readyzStatus(t *testing.T, base, cluster string) (int, string) {
	t.Helper()
	st, _, body := do(t, http.MethodGet, base+"/readyz", "", "")
	var r readyz
	if err := json.Unmarshal(body, &r); err != nil {
		t.Fatalf("/readyz body %s: %v", body, err)
	}
	c := r.Clusters[cluster]
	return st, c.ConnectionState + "/" + c.ConnectionErrorCode
}

// keysBroken runs key calls that need no device-class failure to fail (encrypt, decrypt and
// gen-random: SoftHSM answers them without a device error while the directory is away) and
// checks each failure is a 5xx KMS error. It returns how many failed.
func keysBroken(t *testing.T, c *kmsClient, what string, enc map[string]any, ct string) int {
	t.Helper()
	failed := 0
	for _, op := range []struct {
		call string
		body map[string]any
	}{
		{"encrypt-data", enc},
		{"decrypt-data", map[string]any{"cipher_text": ct}},
		{"gen-random", map[string]any{"random_data_length": "256"}},
	} {
		a := c.try(op.call, op.body)
		t.Logf("%s: %s → %d %s", what, op.call, a.status, a.body)
		if a.status != http.StatusOK {
			failed++
			wantServerError(t, op.call+" "+what, a)
		}
	}
	return failed
}

// TestTokenDirectoryRemovedAndRestored_RealFault: the directory of a bound, enabled token is
// moved away under the running daemon and put back. What SoftHSM does meanwhile is logged:
// key objects are no longer found, C_GenerateKey and C_GetTokenInfo answer
// CKR_GENERAL_ERROR. Key calls fail with a 5xx KMS error, never a crash; the device faults
// must open the breaker, and then /readyz says the cluster is DISCONNECTED; once the
// directory is back, the breaker's recovery (which re-initialises the module: this daemon is
// its only user) brings the keys back. SoftHSM itself never reads the directory again
// until C_Finalize.
func TestTokenDirectoryRemovedAndRestored_RealFault(t *testing.T) {
	env := newEnv(t, "c1")
	c, ksID, _ := keysDaemon(t, env)
	aes := c.createKey(ksID, "aes", "", "")
	enc := map[string]any{"key_id": aes, "plain_text": "p"}
	ct := str(t, c.ok("encrypt-data", enc), "cipher_text")
	lcReadyz(t, c.base, http.StatusOK)

	restore := removeTokenDir(t, env.Tokens[0])
	failed := keysBroken(t, c, "directory away", enc, ct)
	st, conn := readyzStatus(t, c.base, "c1")
	t.Logf("directory away, before any device error: %d key calls of 3 failed; /readyz %d, c1 %s", failed, st, conn)
	if failed == 0 {
		t.Errorf("every key call worked with the token directory away")
	}
	if (st == http.StatusOK) != (conn == "CONNECTED/") {
		t.Errorf("/readyz %d while it shows c1 %s", st, conn)
	}

	for i := range 2 * hsm.DefaultBreakerThreshold {
		a := c.try("create-key", map[string]any{"key_alias": fmt.Sprintf("during-%d", i), "keystore_id": ksID})
		t.Logf("directory away: create-key %d → %d %s", i, a.status, a.body)
		wantServerError(t, "create-key with the token directory away", a)
	}
	// SoftHSM answers C_GenerateKey and C_GetTokenInfo (the readiness probe) with
	// CKR_GENERAL_ERROR, a device fault: the breaker must open, soon (/readyz probes again
	// every few seconds).
	opened := false
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		readyzStatus(t, c.base, "c1")
		if a := c.try("encrypt-data", enc); a.status == http.StatusServiceUnavailable && a.code == "KMS.0104" {
			opened = true
			break
		}
	}
	if !opened {
		t.Fatalf("the breaker never opened on a token whose every key creation and probe fails with CKR_GENERAL_ERROR")
	}
	r := lcReadyz(t, c.base, http.StatusServiceUnavailable)
	if cr := r.Clusters["c1"]; cr.ConnectionState != "DISCONNECTED" || cr.ConnectionErrorCode != "NETWORK_ERRORS" {
		t.Errorf("/readyz c1 %+v with the breaker open, want DISCONNECTED/NETWORK_ERRORS", cr)
	}
	if a := c.try("encrypt-data", enc); a.status != http.StatusServiceUnavailable || a.code != "KMS.0104" {
		t.Errorf("encrypt-data with the breaker open: %d %s, want 503 KMS.0104", a.status, a.body)
	}
	if st, _, _ := do(t, http.MethodGet, c.base+"/healthz", "", ""); st != http.StatusOK {
		t.Errorf("/healthz %d with the token directory away, want 200 (the process is alive)", st)
	}

	restore()
	waitReady(t, c.base)
	c.ok("encrypt-data", enc)
	c.ok("decrypt-data", map[string]any{"cipher_text": ct})
	c.createKey(ksID, "after", "", "")
}

// TestTokenDirectoryRestored_KeyOperationsComeBack_RealFault: the same fault, but only key
// operations meanwhile (no key creation, so no device-class error). SoftHSM's answer while
// the directory is away — the key's object is not found — is one the daemon also gets for a
// key destroyed behind its back, so the breaker never opens and /readyz stays CONNECTED.
// Once the directory is back, the keys must work again; a restart proves the token intact.
func TestTokenDirectoryRestored_KeyOperationsComeBack_RealFault(t *testing.T) {
	env := newEnv(t, "c1")
	c, ksID, stop := keysDaemon(t, env)
	aes := c.createKey(ksID, "aes", "", "")
	enc := map[string]any{"key_id": aes, "plain_text": "p"}
	ct := str(t, c.ok("encrypt-data", enc), "cipher_text")

	restore := removeTokenDir(t, env.Tokens[0])
	keysBroken(t, c, "directory away", enc, ct)
	st, conn := readyzStatus(t, c.base, "c1")
	t.Logf("directory away: /readyz %d, c1 %s", st, conn)
	restore()

	var last kmsAnswer
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if last = c.try("encrypt-data", enc); last.status == http.StatusOK {
			break
		}
	}
	st, conn = readyzStatus(t, c.base, "c1")
	t.Logf("directory back: encrypt-data %d %s; /readyz %d, c1 %s", last.status, last.body, st, conn)
	if last.status != http.StatusOK {
		t.Errorf("encrypt-data still fails after the token directory came back (%d %s), with /readyz %d and c1 %s: "+
			"SoftHSM keeps a token whose directory vanished invalid until C_Finalize, and nothing makes the cluster recover", last.status, last.body, st, conn)
	}
	stop()
	base, _ := startDaemon(t, env)
	c = tenantOf(t, base, env)
	c.ok("encrypt-data", enc)
	c.ok("decrypt-data", map[string]any{"cipher_text": ct})
}

// The helper process of TestOtherProcessLogsOut_RealFault: run as this test binary with
// HSMBRIDGE_HELPER_LOGOUT set, it logs the token in and out from a process of its own.
func TestHelperProcessLogout(t *testing.T) {
	if os.Getenv("HSMBRIDGE_HELPER_LOGOUT") == "" {
		t.Skip("the helper process of TestOtherProcessLogsOut_RealFault")
	}
	// TestMain pointed SoftHSM at a fresh directory of this process; use the parent's. No
	// module has been opened in this process yet, and SoftHSM reads this at C_Initialize.
	if err := os.Setenv("SOFTHSM2_CONF", os.Getenv("HSMBRIDGE_HELPER_CONF")); err != nil {
		t.Fatal(err)
	}
	p := pkcs11.New(os.Getenv("HSMBRIDGE_HELPER_MODULE"))
	if p == nil {
		t.Fatal("cannot load the module")
	}
	if err := p.Initialize(); err != nil {
		t.Fatalf("C_Initialize: %v", err)
	}
	defer func() {
		if err := p.Finalize(); err != nil {
			t.Errorf("C_Finalize: %v", err)
		}
	}()
	slots, err := p.GetSlotList(true)
	if err != nil {
		t.Fatal(err)
	}
	serial := os.Getenv("HSMBRIDGE_HELPER_SERIAL")
	for _, s := range slots {
		ti, err := p.GetTokenInfo(s)
		if err != nil || strings.TrimRight(ti.SerialNumber, " \x00") != serial {
			continue
		}
		sh, err := p.OpenSession(s, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
		if err != nil {
			t.Fatalf("C_OpenSession: %v", err)
		}
		if err := p.Login(sh, pkcs11.CKU_USER, os.Getenv("HSMBRIDGE_HELPER_PIN")); err != nil {
			t.Fatalf("C_Login: %v", err)
		}
		if err := p.Logout(sh); err != nil {
			t.Fatalf("C_Logout: %v", err)
		}
		if err := p.CloseAllSessions(s); err != nil {
			t.Fatalf("C_CloseAllSessions: %v", err)
		}
		fmt.Println("HELPER: logged in, logged out and closed all sessions on", serial)
		return
	}
	t.Fatalf("no token with serial %s", serial)
}

// TestOtherProcessLogsOut_RealFault: another process logs the daemon's token in, out, and
// closes all its sessions on it. PKCS#11 login state and sessions are per process in
// SoftHSM, so the daemon must not notice: it keeps serving, and stays ready.
func TestOtherProcessLogsOut_RealFault(t *testing.T) {
	env := newEnv(t, "c1")
	c, ksID, _ := keysDaemon(t, env)
	aes := c.createKey(ksID, "aes", "", "")
	enc := map[string]any{"key_id": aes, "plain_text": "p"}
	ct := str(t, c.ok("encrypt-data", enc), "cipher_text")

	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcessLogout$", "-test.v")
	cmd.Env = append(os.Environ(), "HSMBRIDGE_HELPER_LOGOUT=1",
		"HSMBRIDGE_HELPER_CONF="+os.Getenv("SOFTHSM2_CONF"), "HSMBRIDGE_HELPER_MODULE="+env.Module,
		"HSMBRIDGE_HELPER_SERIAL="+env.Tokens[0].Serial, "HSMBRIDGE_HELPER_PIN="+readPIN(t, env))
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "HELPER: logged in, logged out") {
		t.Fatalf("helper process: %v\n%s", err, out)
	}

	for range 3 {
		c.ok("encrypt-data", enc)
		c.ok("decrypt-data", map[string]any{"cipher_text": ct})
	}
	c.createKey(ksID, "after-logout", "", "")
	lcReadyz(t, c.base, http.StatusOK)
}

// TestLoadOneClusterFailsAndRecovers_FaultInjected: key operations on two clusters of one
// in-process daemon while one cluster's device fails (faults injected into it alone: the
// daemon's configuration has no hook for them, so the service is built here as serve builds
// it) and then recovers. The healthy cluster answers every call; the failing one answers 5xx
// KMS errors, then serves again. Bounded in count and time; loopback only.
func TestLoadOneClusterFailsAndRecovers_FaultInjected(t *testing.T) {
	const workers, maxRequests = 4, 20000
	env := newEnv(t, "c1", "c2")
	cfg, err := config.Load(env.ConfigPath)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	st, err := store.OpenSQLite(ctx, cfg.Store.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	var f hsmtest.Faults
	var bound []keystore.Cluster
	var failing *hsm.Cluster
	for i, tok := range env.Tokens {
		hc := hsm.ClusterConfig{
			ID: tok.ClusterID, ModulePath: env.Module, TokenSerial: tok.Serial, TokenLabel: tok.Label,
			PIN: readPIN(t, env), PoolSize: 4, IdentityKeyLabel: tok.KeyLabel, IdentityCertLabel: tok.CertLabel,
		}
		if i == 0 {
			hc.Interceptor = f.Interceptor()
		}
		cl, err := hsm.OpenCluster(ctx, hc)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			cctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := cl.Close(cctx); err != nil {
				t.Errorf("close %s: %v", cl.ID(), err)
			}
		})
		if i == 0 {
			failing = cl
		}
		bound = append(bound, keystore.Cluster{Type: keystore.TypeDHSM, Cluster: cl})
	}
	svc := keystore.New(st, bound, keystore.WithLogger(slog.New(slog.DiscardHandler)))
	if err := svc.Reconcile(ctx, 0); err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	metrics := api.NewMetrics(reg, reg, version)
	auth, err := authSchemes(cfg.Auth, metrics)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(api.NewServer(api.Config{
		Service: svc, Auth: auth, Metrics: metrics, Log: slog.New(slog.DiscardHandler), Region: cfg.Region,
		RequestTimeout: cfg.Server.RequestTimeout.Duration, KeyOperationTimeout: cfg.Server.KeyOperationTimeout.Duration,
	}))
	t.Cleanup(srv.Close)

	c := tenantOf(t, srv.URL, env)
	keyOf := map[string]string{}
	for _, tok := range env.Tokens {
		ks := mustCreate(t, srv.URL, env, tok, "ks-"+tok.ClusterID)
		enableKeystore(t, srv.URL, env, ks)
		keyOf[tok.ClusterID] = c.createKey(ks, "aes-"+tok.ClusterID, "", "")
	}

	type tally struct{ ok, failed, sent atomic.Int64 }
	var (
		counts  = map[string]*tally{"c1": {}, "c2": {}}
		phase   atomic.Int32 // 0 before the fault, 1 during, 2 after it is cleared
		okAfter atomic.Int64 // c1's successes once the fault is cleared and it recovered
		bad     sync.Map     // unexpected answers, by "cluster status code"
		total   atomic.Int64
		stop    = make(chan struct{})
	)
	hc := &http.Client{Timeout: 30 * time.Second}
	call := func(cluster string) {
		body := fmt.Sprintf(`{"key_id":%q,"plain_text":"load"}`, keyOf[cluster])
		req, _ := http.NewRequest(http.MethodPost, srv.URL+"/v1.0/"+env.ProjectID+"/kms/encrypt-data", strings.NewReader(body))
		req.Header.Set("X-Auth-Token", env.AuthToken)
		req.Header.Set("Content-Type", "application/json")
		tl := counts[cluster]
		tl.sent.Add(1)
		resp, err := hc.Do(req)
		if err != nil {
			bad.Store(cluster+" transport "+err.Error(), true)
			tl.failed.Add(1)
			return
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			tl.ok.Add(1)
			if cluster == "c1" && phase.Load() == 2 && failing.Health().State == hsm.StateHealthy {
				okAfter.Add(1)
			}
			return
		}
		tl.failed.Add(1)
		var e struct {
			Error struct {
				Code string `json:"error_code"`
			} `json:"error"`
		}
		_ = json.Unmarshal(b, &e)
		if cluster != "c1" || resp.StatusCode < 500 || !strings.HasPrefix(e.Error.Code, "KMS.") {
			bad.Store(fmt.Sprintf("%s %d %s", cluster, resp.StatusCode, b), true)
		}
	}
	var wg sync.WaitGroup
	for w := range 2 * workers {
		cluster := []string{"c1", "c2"}[w%2]
		wg.Go(func() {
			for total.Add(1) <= maxRequests {
				select {
				case <-stop:
					return
				default:
				}
				call(cluster)
			}
		})
	}
	deadline := time.Now().Add(30 * time.Second)
	waitUntil := func(what string, cond func() bool) bool {
		for !cond() {
			if time.Now().After(deadline) || total.Load() > maxRequests {
				t.Errorf("load test bound reached waiting for %s", what)
				return false
			}
			time.Sleep(time.Millisecond)
		}
		return true
	}
	ok := waitUntil("traffic on both clusters", func() bool { return counts["c1"].ok.Load() >= 50 && counts["c2"].ok.Load() >= 50 })
	if ok {
		// The device fails, recovery included (it lists the slots first), until cleared.
		f.Fail("C_GetSlotList", pkcs11.CKR_DEVICE_ERROR, -1)
		f.Fail("C_Encrypt", pkcs11.CKR_DEVICE_ERROR, -1)
		phase.Store(1)
		c2Before := counts["c2"].ok.Load()
		ok = waitUntil("c1's breaker to open", func() bool { return failing.Health().State == hsm.StateUnavailable }) &&
			waitUntil("c1 failing while c2 serves", func() bool { return counts["c1"].failed.Load() >= 50 && counts["c2"].ok.Load() >= c2Before+50 })
	}
	if ok {
		f.Clear()
		phase.Store(2)
		if !waitUntil("c1 to recover and serve", func() bool { return okAfter.Load() >= 50 }) {
			t.Error("c1 did not recover and serve again")
		}
	}
	close(stop)
	wg.Wait()

	st1 := failing.Stats()
	t.Logf("c1: %d ok, %d failed; c2: %d ok, %d failed; c1 breaker opened %d times; %d requests",
		counts["c1"].ok.Load(), counts["c1"].failed.Load(), counts["c2"].ok.Load(), counts["c2"].failed.Load(), st1.BreakerOpens, total.Load())
	if n := counts["c2"].failed.Load(); n != 0 {
		t.Errorf("the healthy cluster c2 failed %d calls of %d, want 0", n, counts["c2"].sent.Load())
	}
	bad.Range(func(k, _ any) bool { t.Errorf("unexpected answer: %v", k); return true })
	if h := failing.Health(); h.State != hsm.StateHealthy {
		t.Errorf("c1 at the end: %+v, want healthy", h)
	}
	if st1.BreakerOpens < 1 {
		t.Errorf("c1's breaker never opened")
	}
}

// waitReady polls /readyz until it answers 200, with a generous bound.
func waitReady(t *testing.T, base string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		st, _, body := do(t, http.MethodGet, base+"/readyz", "", "")
		if st == http.StatusOK {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("/readyz still %d: %s", st, body)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
