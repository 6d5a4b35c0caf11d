package main

// Replicas and outages of the PostgreSQL store (issue 7).
//
// TestReplicas runs three real daemon processes on one PostgreSQL database and one set of
// SoftHSM tokens, as a deployment of several replicas does, and races them: creates of one
// alias, creates on one cluster, and enable, disable and delete of one keystore. The
// database decides each race, so exactly one request wins everywhere. A key made on one
// replica is usable on the others at once, and a keystore disabled on one is refused by the
// others within the cache bound (store.cache_ttl).
//
// TestPostgresOutage stops and restarts a private PostgreSQL server under a load of signs:
// nothing answers wrongly, cached keys keep signing through the outage, control-plane calls
// fail with 503 KMS.0104 meanwhile, and the daemon comes back by itself.

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hsmbridge/hsmbridge/internal/devenv"
	"github.com/hsmbridge/hsmbridge/keystore/store"
)

// replicaCacheTTL is store.cache_ttl in the tests' configs: short, to keep them fast.
const replicaCacheTTL = 200 * time.Millisecond

// answer is one HTTP answer, or the transport error that stood for it.
type answer struct {
	status int
	code   string // error_code of an error answer
	body   []byte
	err    error
}

func (a answer) String() string {
	if a.err != nil {
		return "transport error: " + a.err.Error()
	}
	return fmt.Sprintf("%d %s", a.status, bytes.TrimSpace(a.body))
}

// is reports whether a is an error answer with status and code.
func (a answer) is(status int, code string) bool {
	return a.err == nil && a.status == status && a.code == code
}

// json decodes a 200 answer's body into a map (nil if it is not one).
func (a answer) json() map[string]any {
	var m map[string]any
	if a.err != nil || json.Unmarshal(a.body, &m) != nil {
		return nil
	}
	return m
}

// replicaClient has a deadline only so a hung daemon cannot hang the test; no assertion
// relies on it. Safe for concurrent use (unlike do, it never calls t.Fatal).
var replicaClient = &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 32}}

// send sends one request as env's tenant; body nil sends none.
func send(env *devenv.Env, method, url string, body any) answer {
	var r io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return answer{err: err}
		}
		r = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, url, r)
	if err != nil {
		return answer{err: err}
	}
	req.Header.Set("X-Auth-Token", env.AuthToken)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := replicaClient.Do(req)
	if err != nil {
		return answer{err: err}
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return answer{err: err}
	}
	a := answer{status: resp.StatusCode, body: b}
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

// kms sends a /kms/ call to base as env's tenant.
func kms(env *devenv.Env, base, call string, body map[string]any) answer {
	return send(env, http.MethodPost, base+"/v1.0/"+env.ProjectID+"/kms/"+call, body)
}

// request is one request of a burst.
type request struct {
	method, url string
	body        any
}

// burst sends every request at once (each on its own goroutine, released together) and
// returns the answers in order.
func burst(env *devenv.Env, reqs []request) []answer {
	out := make([]answer, len(reqs))
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i, r := range reqs {
		wg.Go(func() {
			<-start
			out[i] = send(env, r.method, r.url, r.body)
		})
	}
	close(start)
	wg.Wait()
	return out
}

// tally counts a burst's answers by "status code" and returns the indexes of the 200s.
func tally(as []answer) (counts map[string]int, won []int) {
	counts = map[string]int{}
	for i, a := range as {
		if a.err != nil {
			counts["transport error"]++
			continue
		}
		counts[fmt.Sprintf("%d %s", a.status, a.code)]++
		if a.status == http.StatusOK {
			won = append(won, i)
		}
	}
	return counts, won
}

// wantOneWinner checks that exactly one answer of a burst is 200 and every other is 400
// with one of losers; it returns the (first) winner's index.
func wantOneWinner(t *testing.T, what string, as []answer, losers ...string) int {
	t.Helper()
	counts, won := tally(as)
	t.Logf("%s: %v", what, counts)
	for i, a := range as {
		if a.status == http.StatusOK {
			continue
		}
		if a.err != nil || a.status != http.StatusBadRequest || !slices.Contains(losers, a.code) {
			t.Errorf("%s: request %d answered %s, want 200 or 400 %v", what, i, a, losers)
		}
	}
	switch {
	case len(won) == 0:
		t.Fatalf("%s: no request answered 200 (%v), want exactly one", what, counts)
	case len(won) > 1: // the state is still what one winner made: go on, to see the rest
		t.Errorf("%s: %d requests answered 200 (%v), want exactly one", what, len(won), counts)
	}
	return won[0]
}

// replica is one daemon process of TestReplicas.
type replica struct {
	name, base string
	p          *proc
	once       sync.Once
}

// stop sends SIGTERM and requires a clean exit within the shutdown timeout.
func (r *replica) stop(t *testing.T) {
	t.Helper()
	r.once.Do(func() { r.p.stop(t) })
}

// writeReplicaConfig writes a copy of env's config (already on PostgreSQL, see usePostgres)
// for one replica: its own listen address, the short cache TTL.
func writeReplicaConfig(t *testing.T, env *devenv.Env, name, listen string) string {
	t.Helper()
	data, err := os.ReadFile(env.ConfigPath)
	if err != nil {
		t.Fatal(err)
	}
	text := string(data)
	for _, r := range []struct{ old, new string }{
		{fmt.Sprintf("listen: %q\n", env.Listen), fmt.Sprintf("listen: %q\n", listen)},
		{"  max_conns: 4\n", fmt.Sprintf("  max_conns: 4\n  cache_ttl: %s\n", replicaCacheTTL)},
	} {
		if !strings.Contains(text, r.old) {
			t.Fatalf("the env's config has no %q to replace:\n%s", r.old, text)
		}
		text = strings.Replace(text, r.old, r.new, 1)
	}
	path := filepath.Join(env.Dir, "config-"+name+".yaml")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// softHSMConf is the SoftHSM configuration of this test binary's private token directory,
// where newEnv made the tokens.
func softHSMConf() string { return filepath.Join(softHSMDir, "softhsm2.conf") }

// startReplica runs `bin serve` on configPath and waits until its /readyz answers 200. It is
// killed at cleanup if the test did not stop it.
func startReplica(t *testing.T, bin string, env *devenv.Env, name, configPath, base string) *replica {
	t.Helper()
	p := &proc{out: &syncBuffer{}, exited: make(chan error, 1)}
	p.cmd = exec.Command(bin, "serve", "--config", configPath)
	p.cmd.Dir = env.Dir
	p.cmd.Env = append(os.Environ(), "SOFTHSM2_CONF="+softHSMConf())
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start replica %s: %v", name, err)
	}
	go func() { p.exited <- p.cmd.Wait() }()
	r := &replica{name: name, base: base, p: p}
	t.Cleanup(func() {
		r.once.Do(func() {
			_ = p.cmd.Process.Signal(syscall.SIGKILL)
			<-p.exited
		})
		if t.Failed() {
			t.Logf("replica %s output:\n%s", name, p.out)
		}
	})
	hc := &http.Client{Timeout: time.Second}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		select {
		case err := <-p.exited:
			p.exited <- err // for the cleanup
			t.Fatalf("replica %s exited before it was ready: %v\n%s", name, err, p.out)
		default:
		}
		if resp, err := hc.Get(base + "/readyz"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return r
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("replica %s not ready within 30s:\n%s", name, p.out)
		}
	}
}

// signDigest is a sign request body for an EC P-256 key over msg's SHA-256.
func signDigest(keyID string, msg []byte) (body map[string]any, digest []byte) {
	d := sha256.Sum256(msg)
	return map[string]any{"key_id": keyID, "message": b64(d[:]), "signing_algorithm": "ECDSA_SHA_256", "message_type": "DIGEST"}, d[:]
}

// verifies reports whether a is a 200 sign answer whose signature verifies under pub.
func verifies(a answer, pub *ecdsa.PublicKey, digest []byte) bool {
	m := a.json()
	if a.status != http.StatusOK || m == nil {
		return false
	}
	s, _ := m["signature"].(string)
	sig, err := base64.StdEncoding.DecodeString(s)
	return err == nil && ecdsa.VerifyASN1(pub, digest, sig)
}

// ecPublicKey fetches key id's public key from base and parses it.
func ecPublicKey(t *testing.T, env *devenv.Env, base, id string) *ecdsa.PublicKey {
	t.Helper()
	a := kms(env, base, "get-publickey", map[string]any{"key_id": id})
	m := a.json()
	if a.status != http.StatusOK || m == nil {
		t.Fatalf("get-publickey %s: %s", id, a)
	}
	text, _ := m["public_key"].(string)
	block, _ := pem.Decode([]byte(text))
	if block == nil {
		t.Fatalf("get-publickey %s: no PEM block in %q", id, text)
	}
	pub, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		t.Fatalf("get-publickey %s: %v", id, err)
	}
	ec, ok := pub.(*ecdsa.PublicKey)
	if !ok {
		t.Fatalf("get-publickey %s: %T, want an EC key", id, pub)
	}
	return ec
}

// mustKMS sends a /kms/ call that must answer 200 and returns the decoded answer.
func mustKMS(t *testing.T, env *devenv.Env, r *replica, call string, body map[string]any) map[string]any {
	t.Helper()
	a := kms(env, r.base, call, body)
	m := a.json()
	if a.status != http.StatusOK || m == nil {
		t.Fatalf("%s on %s: %s", call, r.name, a)
	}
	return m
}

// TestReplicas: three daemons on one database and one set of tokens.
func TestReplicas(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs three daemon processes")
	}
	started := time.Now()
	dsn := newPostgresDB(t)
	const aliasClusters = 9 // c1..c9 take the same-alias race; c10 the same-cluster race and the lifecycle races
	var ids []string
	for i := range aliasClusters + 1 {
		ids = append(ids, fmt.Sprintf("c%d", i+1))
	}
	env := newEnv(t, ids...)
	usePostgres(t, env, dsn)
	bin := buildDaemon(t)
	built := time.Now()

	// One after another, each ready before the next logs in to the shared tokens
	// (SoftHSMv2 #757: concurrent logins from several processes can fail).
	var rs []*replica
	for _, name := range []string{"a", "b", "c"} {
		listen := fmt.Sprintf("127.0.0.1:%d", freeLoopbackPort(t))
		rs = append(rs, startReplica(t, bin, env, name, writeReplicaConfig(t, env, name, listen), "http://"+listen))
	}
	a, b, c := rs[0], rs[1], rs[2]
	t.Logf("built in %v, three replicas ready in %v", built.Sub(started).Round(time.Millisecond), time.Since(built).Round(time.Millisecond))
	on := func(i int) *replica { return rs[i%len(rs)] }
	ksURL := func(r *replica, id, suffix string) string { return lcURL(r.base, env, id, suffix) }

	// The same alias on nine free clusters, three requests through each replica: the alias's
	// unique index lets one in.
	var reqs []request
	for i := range aliasClusters {
		reqs = append(reqs, request{http.MethodPost, ksURL(on(i), "", ""), goodFields(env, env.Tokens[i], "replica-dup")})
	}
	as := burst(env, reqs)
	w := wantOneWinner(t, "same alias on 9 clusters through 3 replicas", as, "KMS.8002")
	aliasWinner, _ := as[w].json()["keystore"].(map[string]any)["keystore_id"].(string)
	aliasCluster := env.Tokens[w]
	t.Logf("alias race won on %s through replica %s", aliasCluster.ClusterID, on(w).name)

	// Nine aliases on one cluster: the cluster's unique index lets one in.
	c10 := env.Tokens[aliasClusters]
	reqs = nil
	for i := range 9 {
		reqs = append(reqs, request{http.MethodPost, ksURL(on(i), "", ""), goodFields(env, c10, fmt.Sprintf("replica-c10-%d", i))})
	}
	as = burst(env, reqs)
	w = wantOneWinner(t, "9 aliases on one cluster through 3 replicas", as, "KMS.8005")
	lifeID, _ := as[w].json()["keystore"].(map[string]any)["keystore_id"].(string)

	// Every replica lists the same two keystores.
	for _, r := range rs {
		a := send(env, http.MethodGet, ksURL(r, "", "?limit=100"), nil)
		var got struct {
			Total     int `json:"total"`
			Keystores []struct {
				ID string `json:"keystore_id"`
			} `json:"keystores"`
		}
		if a.status != http.StatusOK || json.Unmarshal(a.body, &got) != nil {
			t.Fatalf("list on %s: %s", r.name, a)
		}
		var listed []string
		for _, k := range got.Keystores {
			listed = append(listed, k.ID)
		}
		slices.Sort(listed)
		want := []string{aliasWinner, lifeID}
		slices.Sort(want)
		if got.Total != 2 || !slices.Equal(listed, want) {
			t.Errorf("replica %s lists %d keystores %v, want %v", r.name, got.Total, listed, want)
		}
	}

	// Lifecycle races on c10's keystore, two requests through each replica at once; then the
	// cluster, freed by the delete, is bound again for the next round.
	const rounds = 3
	for round := range rounds {
		if round > 0 {
			st, hdr, body := create(t, on(round).base, env, goodFields(env, c10, fmt.Sprintf("replica-life-%d", round)))
			lifeID = wantCreated(t, env, st, hdr, body)
		}
		race := func(method, suffix string) []answer {
			var reqs []request
			for i := range 6 {
				reqs = append(reqs, request{method, ksURL(on(i), lifeID, suffix), nil})
			}
			return burst(env, reqs)
		}
		for _, step := range []struct{ action, state string }{{"enable", "ENABLED"}, {"disable", "DISABLED"}} {
			as := race(http.MethodPost, "/"+step.action)
			w := wantOneWinner(t, fmt.Sprintf("round %d: 6 %ss of one keystore", round+1, step.action), as, "KMS.8008")
			lcWantState(t, as[w].status, as[w].body, lifeID, step.state)
		}
		as := race(http.MethodDelete, "")
		// A delete that comes after the row is gone finds no keystore (KMS.8003).
		w := wantOneWinner(t, fmt.Sprintf("round %d: 6 deletes of one keystore", round+1), as, "KMS.8008", "KMS.8003")
		if len(as[w].body) != 0 {
			t.Errorf("round %d: delete answered 200 with body %q, want an empty body", round+1, as[w].body)
		}
		// Gone everywhere, within the cache bound (a replica whose request found no row at
		// all did not drop what it had cached).
		for _, r := range rs {
			deadline := time.Now().Add(5 * time.Second)
			for {
				a := send(env, http.MethodGet, ksURL(r, lifeID, ""), nil)
				if a.is(http.StatusBadRequest, "KMS.8003") {
					break
				}
				if a.status != http.StatusOK || time.Now().After(deadline) {
					t.Fatalf("round %d: show on %s after the delete: %s, want 400 KMS.8003", round+1, r.name, a)
				}
				time.Sleep(20 * time.Millisecond)
			}
		}
	}

	// A key made on a is usable on b and c at once: the row is in the shared database, the
	// objects on the shared token.
	if st, _, body := lcChange(t, a.base, env, aliasWinner, "enable"); st != http.StatusOK {
		t.Fatalf("enable %s on a: %d %s", aliasWinner, st, body)
	}
	ecID := str(t, obj(t, mustKMS(t, env, a, "create-key", map[string]any{"key_alias": "replica-ec", "keystore_id": aliasWinner, "key_spec": "EC_P256"}), "key_info"), "key_id")
	body, digest := signDigest(ecID, []byte("signed on b"))
	signed := kms(env, b.base, "sign", body)
	pub := ecPublicKey(t, env, c.base, ecID)
	if !verifies(signed, pub, digest) {
		t.Fatalf("sign on b of a key made on a: %s (or it does not verify under the public key c gives)", signed)
	}
	sig, _ := signed.json()["signature"].(string)
	if got := mustKMS(t, env, c, "verify", merge(body, map[string]any{"signature": sig}))["signature_valid"]; got != "true" {
		t.Errorf("verify on c of b's signature: signature_valid %v", got)
	}
	aesID := str(t, obj(t, mustKMS(t, env, a, "create-key", map[string]any{"key_alias": "replica-aes", "keystore_id": aliasWinner}), "key_info"), "key_id")
	for _, hop := range [][2]*replica{{a, c}, {c, b}, {b, a}} {
		plain := "from " + hop[0].name + " to " + hop[1].name
		ct := str(t, mustKMS(t, env, hop[0], "encrypt-data", map[string]any{"key_id": aesID, "plain_text": plain}), "cipher_text")
		if got := str(t, mustKMS(t, env, hop[1], "decrypt-data", map[string]any{"cipher_text": ct}), "plain_text"); got != plain {
			t.Errorf("encrypt on %s, decrypt on %s: %q, want %q", hop[0].name, hop[1].name, got, plain)
		}
	}

	// Disabled on a, the keystore is refused by a at once and by b and c within the cache
	// bound, which the poll's deadline only bounds from above.
	ct := str(t, mustKMS(t, env, c, "encrypt-data", map[string]any{"key_id": aesID, "plain_text": "before"}), "cipher_text")
	mustKMS(t, env, b, "sign", body) // both now hold the key and the keystore in their caches
	mustKMS(t, env, c, "decrypt-data", map[string]any{"cipher_text": ct})
	if st, _, resp := lcChange(t, a.base, env, aliasWinner, "disable"); st != http.StatusOK {
		t.Fatalf("disable %s on a: %d %s", aliasWinner, st, resp)
	}
	disabledAt := time.Now()
	if got := kms(env, a.base, "sign", body); !got.is(http.StatusBadRequest, "KMS.8007") {
		t.Errorf("sign on a right after a disabled the keystore: %s, want 400 KMS.8007", got)
	}
	for _, probe := range []struct {
		r    *replica
		call string
		body map[string]any
	}{{b, "sign", body}, {c, "decrypt-data", map[string]any{"cipher_text": ct}}} {
		deadline := disabledAt.Add(5 * time.Second)
		for {
			got := kms(env, probe.r.base, probe.call, probe.body)
			if got.is(http.StatusBadRequest, "KMS.8007") {
				t.Logf("%s on %s refused %v after the disable on a (cache_ttl %v)", probe.call, probe.r.name,
					time.Since(disabledAt).Round(time.Millisecond), replicaCacheTTL)
				break
			}
			if got.status != http.StatusOK || (probe.call == "sign" && !verifies(got, pub, digest)) {
				t.Fatalf("%s on %s after the disable on a: %s, want 200 (still cached) or 400 KMS.8007", probe.call, probe.r.name, got)
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s on %s still works %v after the keystore was disabled on a", probe.call, probe.r.name, time.Since(disabledAt))
			}
			time.Sleep(10 * time.Millisecond)
		}
	}

	// Stopped, the daemons leave the store and the tokens agreeing: the winners' markers and
	// nothing of the losers.
	for _, r := range rs {
		r.stop(t)
		out := r.p.out.String()
		if strings.Contains(out, "panic") {
			t.Errorf("replica %s panicked:\n%s", r.name, out)
		}
		if strings.Contains(out, "CKR_USER_PIN_NOT_INITIALIZED") {
			t.Logf("replica %s met CKR_USER_PIN_NOT_INITIALIZED (SoftHSMv2 #757)", r.name)
		}
		if n := strings.Count(out, "repair: "); n > 0 {
			t.Errorf("replica %s logged %d repairs: a race left something half-done:\n%s", r.name, n, out)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := store.OpenPostgres(ctx, dsn, 1)
	if err != nil {
		t.Fatal(err)
	}
	rows, err := st.AllKeystores(ctx)
	if err != nil {
		t.Fatal(err)
	}
	keys, err := st.AllKeys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	_ = st.Close()
	if len(rows) != 1 || rows[0].ID != aliasWinner || rows[0].ClusterID != aliasCluster.ClusterID || rows[0].State != store.StateDisabled {
		t.Errorf("keystore rows %+v, want only %s on %s, DISABLED", rows, aliasWinner, aliasCluster.ClusterID)
	}
	if len(keys) != 2 {
		t.Errorf("%d key rows, want the 2 made", len(keys))
	}
	for _, k := range keys {
		if k.State != store.KeyEnabled || k.KeystoreID != aliasWinner {
			t.Errorf("key row %s is %s in %s, want ENABLED in %s", k.ID, k.State, k.KeystoreID, aliasWinner)
		}
	}
	for _, tok := range env.Tokens {
		ms := markers(t, env, tok)
		var got []string
		for id := range ms {
			got = append(got, id)
		}
		want := []string(nil)
		if tok == aliasCluster {
			want = []string{aliasWinner}
		}
		if !slices.Equal(got, want) {
			t.Errorf("token %s holds the markers %v, want %v", tok.Label, got, want)
		}
	}
	t.Logf("%v in all", time.Since(started).Round(time.Millisecond))
}

// privatePostgres is a PostgreSQL server of the test's own, on a free loopback port, that the
// test may stop and start.
type privatePostgres struct {
	dir, data string
	bin       string // the server's bin directory
	port      int
	asPG      bool // run the server's tools as the postgres user (the test runs as root)
}

// newPrivatePostgres makes, starts and at cleanup stops and removes a private server. It
// skips the test when the server binaries or the postgres user are missing, unless
// HSMBRIDGE_REQUIRE_POSTGRES=1.
func newPrivatePostgres(t *testing.T) *privatePostgres {
	t.Helper()
	skip := func(format string, args ...any) {
		t.Helper()
		if os.Getenv("HSMBRIDGE_REQUIRE_POSTGRES") == "1" {
			t.Fatalf("private PostgreSQL server (HSMBRIDGE_REQUIRE_POSTGRES=1): "+format, args...)
		}
		t.Skipf("private PostgreSQL server unavailable: "+format, args...)
	}
	binDir := os.Getenv("HSMBRIDGE_TEST_PG_BIN")
	if binDir == "" {
		binDir = "/usr/lib/postgresql/15/bin"
	}
	for _, tool := range []string{"initdb", "pg_ctl", "postgres"} {
		if _, err := os.Stat(filepath.Join(binDir, tool)); err != nil {
			skip("%v (set HSMBRIDGE_TEST_PG_BIN to the server's bin directory)", err)
		}
	}
	pg := &privatePostgres{bin: binDir, port: freeLoopbackPort(t), asPG: os.Geteuid() == 0}
	var err error
	if pg.dir, err = os.MkdirTemp("", "hsmbridge-pg-"); err != nil {
		t.Fatal(err)
	}
	pg.data = filepath.Join(pg.dir, "data")
	t.Cleanup(func() {
		if _, err := os.Stat(filepath.Join(pg.data, "postmaster.pid")); err == nil {
			if out, err := pg.ctl("-m", "immediate", "stop"); err != nil {
				t.Errorf("stop the private server: %v\n%s", err, out)
			}
		}
		if err := os.RemoveAll(pg.dir); err != nil {
			t.Errorf("remove the private server's directory: %v", err)
		}
	})
	if pg.asPG { // initdb refuses to run as root
		u, err := user.Lookup("postgres")
		if err != nil {
			skip("running as root and no postgres user to run initdb as: %v", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		if err := os.Chown(pg.dir, uid, gid); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := pg.run(filepath.Join(binDir, "initdb"), "-D", pg.data, "-A", "trust", "-U", "hsmbridge",
		"-E", "UTF8", "--locale=C", "--no-sync"); err != nil {
		skip("initdb: %v\n%s", err, out)
	}
	if out, err := pg.start(); err != nil {
		t.Fatalf("start the private server: %v\n%s", err, out)
	}
	return pg
}

// run runs a server tool, as the postgres user when the test runs as root.
func (pg *privatePostgres) run(tool string, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var cmd *exec.Cmd
	if pg.asPG {
		cmd = exec.CommandContext(ctx, "runuser", append([]string{"-u", "postgres", "--", tool}, args...)...)
	} else {
		cmd = exec.CommandContext(ctx, tool, args...)
	}
	cmd.Dir = pg.dir
	return cmd.CombinedOutput()
}

func (pg *privatePostgres) ctl(args ...string) ([]byte, error) {
	return pg.run(filepath.Join(pg.bin, "pg_ctl"), append([]string{"-D", pg.data, "-w", "-t", "30"}, args...)...)
}

func (pg *privatePostgres) start() ([]byte, error) {
	return pg.ctl("-l", filepath.Join(pg.dir, "server.log"),
		"-o", fmt.Sprintf("-p %d -k %s -c listen_addresses=127.0.0.1 -c fsync=off", pg.port, pg.dir), "start")
}

// stop shuts the server down as an operator would for a restart: fast, rolling back open
// transactions and closing every connection.
func (pg *privatePostgres) stop() ([]byte, error) { return pg.ctl("-m", "fast", "stop") }

func (pg *privatePostgres) dsn() string {
	return fmt.Sprintf("postgres://hsmbridge@127.0.0.1:%d/postgres?sslmode=disable", pg.port)
}

// outcome is one answer of TestPostgresOutage's load, with when it was sent and answered.
type outcome struct {
	sent, got time.Time
	a         answer
	valid     bool // a 200 sign whose signature verifies
}

// TestPostgresOutage stops the database under a load of signs and starts it again.
func TestPostgresOutage(t *testing.T) {
	if testing.Short() {
		t.Skip("runs a private PostgreSQL server")
	}
	started := time.Now()
	pg := newPrivatePostgres(t)
	env := newEnv(t, "c1")
	usePostgres(t, env, pg.dsn())
	data, err := os.ReadFile(env.ConfigPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(env.ConfigPath, bytes.Replace(data, []byte("  max_conns: 4\n"),
		fmt.Appendf(nil, "  max_conns: 4\n  cache_ttl: %s\n", replicaCacheTTL), 1), 0o600); err != nil {
		t.Fatal(err)
	}
	base, _, logs := startDaemonLogs(t, env)
	ksID := mustCreate(t, base, env, env.Tokens[0], "outage")
	enableKeystore(t, base, env, ksID)
	kc := tenantOf(t, base, env)
	keyID := kc.createKey(ksID, "outage-ec", "EC_P256", "")
	pub := ecPublicKey(t, env, base, keyID)

	var (
		mu      sync.Mutex
		signs   []outcome
		control []outcome
		stop    = make(chan struct{})
		wg      sync.WaitGroup
	)
	const workers, perWorker = 4, 4000 // the cap only bounds a runaway loop
	for w := range workers {
		wg.Go(func() {
			for i := 0; i < perWorker; i++ {
				select {
				case <-stop:
					return
				default:
				}
				msg := make([]byte, 16)
				_, _ = rand.Read(msg)
				body, digest := signDigest(keyID, append(msg, byte(w)))
				o := outcome{sent: time.Now()}
				o.a = kms(env, base, "sign", body)
				o.got = time.Now()
				o.valid = verifies(o.a, pub, digest)
				mu.Lock()
				signs = append(signs, o)
				mu.Unlock()
				time.Sleep(2 * time.Millisecond)
			}
		})
	}
	wg.Go(func() { // the control plane: list keystores, which always reads the store
		for {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			o := outcome{sent: time.Now()}
			o.a = send(env, http.MethodGet, lcURL(base, env, "", ""), nil)
			o.got = time.Now()
			mu.Lock()
			control = append(control, o)
			mu.Unlock()
		}
	})
	halt := func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		wg.Wait()
	}
	t.Cleanup(halt)

	time.Sleep(2 * time.Second)
	if out, err := pg.stop(); err != nil {
		halt()
		t.Fatalf("stop the server: %v\n%s", err, out)
	}
	down := time.Now() // from here until up, nothing listens on the port
	time.Sleep(2 * time.Second)
	up := time.Now()
	if out, err := pg.start(); err != nil {
		halt()
		t.Fatalf("start the server again: %v\n%s", err, out)
	}
	restarted := time.Now()

	// The service returns by itself: a store read answers within a bounded time.
	var back time.Duration
	for deadline := restarted.Add(15 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		a := send(env, http.MethodGet, lcURL(base, env, "", ""), nil)
		if a.status == http.StatusOK {
			back = time.Since(restarted)
			break
		}
		if time.Now().After(deadline) {
			halt()
			t.Fatalf("list keystores still fails 15s after the server came back: %s\n%s", a, logs)
		}
	}
	time.Sleep(2 * time.Second)
	halt()

	// Writes work again too, and the daemon is ready.
	kc.createKey(ksID, "after-outage", "AES_256", "")
	waitReady(t, base)

	// No wrong answers: each sign is a verified 200 or a 5xx with a KMS code; each
	// control-plane answer is a 200 or 503 KMS.0104.
	var signOK, signFail, signDownOK, signDown, ctlDown, ctlDown503 int
	for _, o := range signs {
		inDown := o.sent.After(down) && o.got.Before(up)
		if inDown {
			signDown++
		}
		switch {
		case o.valid:
			signOK++
			if inDown {
				signDownOK++
			}
		case o.a.err == nil && o.a.status >= 500 && strings.HasPrefix(o.a.code, "KMS."):
			signFail++
		default:
			t.Errorf("sign sent %v into the test answered %s: a wrong answer", o.sent.Sub(started).Round(time.Millisecond), o.a)
		}
	}
	for _, o := range control {
		inDown := o.sent.After(down) && o.got.Before(up)
		switch {
		case o.a.status == http.StatusOK:
		case o.a.is(http.StatusServiceUnavailable, "KMS.0104"):
			if inDown {
				ctlDown503++
			}
		default:
			t.Errorf("list keystores sent %v into the test answered %s, want 200 or 503 KMS.0104", o.sent.Sub(started).Round(time.Millisecond), o.a)
		}
		if inDown {
			ctlDown++
		}
	}
	t.Logf("signs: %d verified, %d 5xx; while the server was down: %d of %d verified", signOK, signFail, signDownOK, signDown)
	t.Logf("list keystores while the server was down: %d of %d answered 503 KMS.0104", ctlDown503, ctlDown)
	t.Logf("server down for %v; store reads back %v after the restart; %v in all",
		up.Sub(down).Round(time.Millisecond), back.Round(time.Millisecond), time.Since(started).Round(time.Millisecond))
	if signDown == 0 || ctlDown == 0 {
		t.Fatalf("no request ran entirely while the server was down (%d signs, %d lists)", signDown, ctlDown)
	}
	// The key and its keystore were cached well within max_stale (30s): signs keep working.
	if signDownOK != signDown {
		t.Errorf("%d of %d signs while the server was down failed; the cached key should serve for max_stale", signDown-signDownOK, signDown)
	}
	if ctlDown503 != ctlDown {
		t.Errorf("%d of %d list-keystores while the server was down answered 200: from what store?", ctlDown-ctlDown503, ctlDown)
	}
}
