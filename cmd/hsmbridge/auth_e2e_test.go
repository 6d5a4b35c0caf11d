package main

// End-to-end tests of authentication and authorisation: the real daemon over real HTTP, a
// real Unix socket and real mutual TLS, with AK/SK-signed requests, signed tokens, roles,
// the trusted frontend's identity headers and the separate ops listener.

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	yaml "go.yaml.in/yaml/v3"

	"github.com/hsmbridge/hsmbridge/internal/config"
	"github.com/hsmbridge/hsmbridge/internal/devenv"
	"github.com/hsmbridge/hsmbridge/keystore/api"
)

// auSigned builds a request carrying sent, signed over signed (normally the same bytes)
// with ak/sk at now. A nil body sends none.
func auSigned(t *testing.T, method, url string, signed, sent []byte, ak, sk string, now time.Time) *http.Request {
	t.Helper()
	var r io.Reader
	if sent != nil {
		r = bytes.NewReader(sent)
	}
	req, err := http.NewRequest(method, url, r)
	if err != nil {
		t.Fatal(err)
	}
	if sent != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	api.SignRequest(req, signed, ak, sk, now)
	return req
}

// auSend sends req with c and returns the answer.
func auSend(t *testing.T, c *http.Client, req *http.Request) (int, http.Header, []byte) {
	t.Helper()
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", req.Method, req.URL, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: reading body: %v", req.Method, req.URL, err)
	}
	return resp.StatusCode, resp.Header, body
}

// auAKSK sends one request signed now with the env's own access key.
func auAKSK(t *testing.T, env *devenv.Env, method, url string, body []byte) (int, http.Header, []byte) {
	t.Helper()
	return auSend(t, client, auSigned(t, method, url, body, body, env.AccessKey, env.SecretKey, time.Now()))
}

// auAuthMsg checks a flat 401 and returns its error_msg.
func auAuthMsg(t *testing.T, status int, hdr http.Header, body []byte) string {
	t.Helper()
	wantAuthError(t, status, hdr, body)
	var got map[string]any
	_ = json.Unmarshal(body, &got)
	m, _ := got["error_msg"].(string)
	return m
}

// auWantAuthFail checks a flat 401 whose error_msg says each of why.
func auWantAuthFail(t *testing.T, status int, hdr http.Header, body []byte, why ...string) {
	t.Helper()
	msg := auAuthMsg(t, status, hdr, body)
	for _, w := range why {
		if !strings.Contains(msg, w) {
			t.Errorf("error_msg %q does not say %q", msg, w)
		}
	}
}

// auList decodes a 200 list of keystores and returns their ids.
func auList(t *testing.T, status int, body []byte) []string {
	t.Helper()
	if status != http.StatusOK {
		t.Fatalf("list: status %d, want 200; body %s", status, body)
	}
	var got struct {
		Total     int `json:"total"`
		Keystores []struct {
			KeystoreID string `json:"keystore_id"`
			DomainID   string `json:"domain_id"`
		} `json:"keystores"`
	}
	if err := json.Unmarshal(body, &got); err != nil {
		t.Fatalf("list body %s: %v", body, err)
	}
	ids := []string{}
	for _, k := range got.Keystores {
		ids = append(ids, k.KeystoreID)
	}
	if got.Total != len(ids) {
		t.Errorf("list: total %d but %d keystores; body %s", got.Total, len(ids), body)
	}
	return ids
}

// auMetric reads the value of the sample name{labels} from base's /metrics (0 if absent).
func auMetric(t *testing.T, base, name string, labels map[string]string) float64 {
	t.Helper()
	st, _, body := do(t, http.MethodGet, base+"/metrics", "", "")
	if st != http.StatusOK {
		t.Fatalf("/metrics: status %d", st)
	}
next:
	for line := range strings.Lines(string(body)) {
		rest, ok := strings.CutPrefix(strings.TrimSpace(line), name+"{")
		if !ok {
			continue
		}
		lbls, value, ok := strings.Cut(rest, "} ")
		if !ok {
			continue
		}
		have := map[string]string{}
		for kv := range strings.SplitSeq(lbls, ",") {
			k, v, _ := strings.Cut(kv, "=")
			have[k] = strings.Trim(v, `"`)
		}
		for k, v := range labels {
			if have[k] != v {
				continue next
			}
		}
		f, err := strconv.ParseFloat(strings.TrimSpace(value), 64)
		if err != nil {
			t.Fatalf("metric line %q: %v", line, err)
		}
		return f
	}
	return 0
}

func auFailures(t *testing.T, base, scheme, reason string) float64 {
	t.Helper()
	return auMetric(t, base, "hsmbridge_auth_failures_total", map[string]string{"scheme": scheme, "reason": reason})
}

func auWantFailures(t *testing.T, base, scheme, reason string, want float64) {
	t.Helper()
	if got := auFailures(t, base, scheme, reason); got != want {
		t.Errorf(`hsmbridge_auth_failures_total{scheme=%q,reason=%q} = %v, want %v`, scheme, reason, got, want)
	}
}

// auToken issues a token from the env's dev issuer for its tenant, valid for an hour.
func auToken(t *testing.T, env *devenv.Env, edit func(*api.TokenClaims)) string {
	t.Helper()
	return auTokenBy(t, env.IssuerKey, env.IssuerKID, env, edit, time.Hour)
}

func auTokenBy(t *testing.T, key crypto.Signer, kid string, env *devenv.Env, edit func(*api.TokenClaims), ttl time.Duration) string {
	t.Helper()
	c := api.TokenClaims{
		Issuer: devenv.DevIssuer, Audience: []string{devenv.DevAudience}, Subject: "e2e",
		DomainID: env.DomainID, ProjectIDs: []string{env.ProjectID},
	}
	if edit != nil {
		edit(&c)
	}
	tok, err := api.IssueToken(key, kid, c, ttl)
	if err != nil {
		t.Fatalf("IssueToken: %v", err)
	}
	return tok
}

// auEditConfig rewrites env's config file through edit, which gets the decoded document.
func auEditConfig(t *testing.T, env *devenv.Env, edit func(doc map[string]any)) {
	t.Helper()
	data, err := os.ReadFile(env.ConfigPath)
	if err != nil {
		t.Fatal(err)
	}
	var doc map[string]any
	if err := yaml.Unmarshal(data, &doc); err != nil {
		t.Fatalf("%s: %v", env.ConfigPath, err)
	}
	edit(doc)
	out, err := yaml.Marshal(doc)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(env.ConfigPath, out, 0o600); err != nil {
		t.Fatal(err)
	}
}

// auSection returns doc[key] as a map, adding an empty one if it is missing.
func auSection(doc map[string]any, key string) map[string]any {
	m, ok := doc[key].(map[string]any)
	if !ok {
		m = map[string]any{}
		doc[key] = m
	}
	return m
}

// auSetTrusted sets auth.trusted in env's config.
func auSetTrusted(t *testing.T, env *devenv.Env, trusted map[string]any) {
	t.Helper()
	auEditConfig(t, env, func(doc map[string]any) { auSection(doc, "auth")["trusted"] = trusted })
}

// auFreeAddr returns a loopback address with a port that was free a moment ago.
func auFreeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	if err := ln.Close(); err != nil {
		t.Fatal(err)
	}
	return addr
}

// auNewClient returns a client on tr whose idle connections close at cleanup.
func auNewClient(t *testing.T, tr *http.Transport) *http.Client {
	t.Helper()
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 2 * time.Minute}
}

// auStartDaemon is startDaemon that returns only once the daemon has told $NOTIFY_SOCKET it
// is ready. run opens the trusted and ops listeners itself, after startDaemon has returned,
// and sends READY=1 only once they are open, so a test of those listeners must wait for it.
func auStartDaemon(t *testing.T, env *devenv.Env) (baseURL string, stop func()) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() }) // after the daemon has stopped: cleanups run last-in first-out
	t.Setenv("NOTIFY_SOCKET", path)
	cfg, err := config.Load(env.ConfigPath)
	if err != nil {
		t.Fatalf("config.Load: %v", err)
	}
	logs := &syncBuffer{}
	ctx, cancel := context.WithCancel(context.Background())
	d, err := openDaemon(ctx, cfg, slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
	if err != nil {
		cancel()
		t.Fatalf("openDaemon: %v\nlog:\n%s", err, logs)
	}
	ln, err := listen(cfg)
	if err != nil {
		cancel()
		t.Fatalf("listen: %v (close: %v)", err, d.close(context.Background()))
	}
	done := make(chan error, 1)
	go func() { done <- d.run(ctx, ln) }()
	ready := make(chan error, 1)
	go func() {
		buf := make([]byte, 512)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				ready <- err
				return
			}
			if string(buf[:n]) == "READY=1" {
				ready <- nil
				return
			}
		}
	}()
	var runErr error
	exited := false
	select {
	case err := <-ready:
		if err != nil {
			cancel()
			t.Fatalf("waiting for READY=1: %v", err)
		}
	case runErr = <-done:
		exited = true
	}
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if !exited {
				runErr = <-done
			}
			if runErr != nil {
				t.Errorf("daemon run returned: %v", runErr)
			}
		})
	}
	t.Cleanup(func() {
		stop()
		if t.Failed() {
			t.Logf("daemon log:\n%s", logs)
		}
	})
	if exited {
		t.FailNow()
	}
	return "http://" + ln.Addr().String(), stop
}

// auTrustedReq builds a request for the trusted listener naming domain and project in the
// identity headers ("" leaves a header out).
func auTrustedReq(t *testing.T, method, url, domain, project string, body []byte) *http.Request {
	t.Helper()
	var r io.Reader
	if body != nil {
		r = bytes.NewReader(body)
	}
	req, err := http.NewRequest(method, url, r)
	if err != nil {
		t.Fatal(err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if domain != "" {
		req.Header.Set("X-Hsmbridge-Domain-Id", domain)
	}
	if project != "" {
		req.Header.Set("X-Hsmbridge-Project-Id", project)
	}
	return req
}

func TestAKSKEndToEnd(t *testing.T) {
	env := newEnv(t)
	base, stop, logs := startDaemonLogs(t, env)
	url := keystoresURL(base, env)

	st, _, resp := auAKSK(t, env, http.MethodGet, url, nil)
	if ids := auList(t, st, resp); len(ids) != 0 {
		t.Fatalf("fresh env lists %v", ids)
	}

	// A signed create succeeds; the identical request again is a replay.
	body := []byte(mustJSON(t, goodFields(env, env.Tokens[0], "aksk-one")))
	req := auSigned(t, http.MethodPost, url, body, body, env.AccessKey, env.SecretKey, time.Now())
	replay, err := http.NewRequest(http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	replay.Header = req.Header.Clone()
	st, hdr, resp := auSend(t, client, req)
	id := wantCreated(t, env, st, hdr, resp)
	st, hdr, resp = auSend(t, client, replay)
	auWantAuthFail(t, st, hdr, resp, "replay")
	auWantFailures(t, base, "aksk", "replay", 1)

	// A state-changing call that failed does not use up its signature: its retry is
	// answered on its merits again, not as a replay.
	bad := []byte(mustJSON(t, map[string]any{"keystore_alias": "aksk-bad", "hsm_cluster_id": env.Tokens[1].ClusterID}))
	req = auSigned(t, http.MethodPost, url, bad, bad, env.AccessKey, env.SecretKey, time.Now())
	retry, err := http.NewRequest(http.MethodPost, url, bytes.NewReader(bad))
	if err != nil {
		t.Fatal(err)
	}
	retry.Header = req.Header.Clone()
	st1, _, resp1 := auSend(t, client, req)
	st2, _, resp2 := auSend(t, client, retry)
	if st1 != http.StatusBadRequest || st2 != http.StatusBadRequest {
		t.Errorf("failed create and its retry: status %d then %d, want 400 both; bodies %s / %s", st1, st2, resp1, resp2)
	}

	// Wrong secret key: 401 that says why, never with either key in it.
	wrongSK := devenv.RandomHex(20)
	st, hdr, resp = auSend(t, client, auSigned(t, http.MethodGet, url, nil, nil, env.AccessKey, wrongSK, time.Now()))
	auWantAuthFail(t, st, hdr, resp, "signature")
	for _, secret := range []string{env.SecretKey, wrongSK} {
		if bytes.Contains(resp, []byte(secret)) {
			t.Errorf("401 body %s holds a secret key", resp)
		}
	}

	// A body changed after signing.
	signed := []byte(mustJSON(t, goodFields(env, env.Tokens[1], "aksk-signed")))
	sent := []byte(mustJSON(t, goodFields(env, env.Tokens[1], "aksk-tampr")))
	st, hdr, resp = auSend(t, client, auSigned(t, http.MethodPost, url, signed, sent, env.AccessKey, env.SecretKey, time.Now()))
	auWantAuthFail(t, st, hdr, resp, "signature")

	// Signed 20 minutes ago.
	st, hdr, resp = auSend(t, client, auSigned(t, http.MethodGet, url, nil, nil, env.AccessKey, env.SecretKey, time.Now().Add(-20*time.Minute)))
	auWantAuthFail(t, st, hdr, resp, "x-sdk-date")

	// An access key nobody issued.
	st, hdr, resp = auSend(t, client, auSigned(t, http.MethodGet, url, nil, nil, "NOSUCHKEY", env.SecretKey, time.Now()))
	auWantAuthFail(t, st, hdr, resp, "access key")

	// Only the first create took effect.
	st, _, resp = auAKSK(t, env, http.MethodGet, url, nil)
	if ids := auList(t, st, resp); len(ids) != 1 || ids[0] != id {
		t.Errorf("keystores %v, want only %s", ids, id)
	}

	auWantFailures(t, base, "aksk", "bad_signature", 2)
	auWantFailures(t, base, "aksk", "expired", 1)
	auWantFailures(t, base, "aksk", "unknown_key", 1)
	auWantFailures(t, base, "aksk", "locked", 0)

	stop()
	if l := logs.String(); strings.Contains(l, env.SecretKey) || strings.Contains(l, wrongSK) {
		t.Errorf("the daemon log holds a secret key")
	}
}

func TestAKSKLockout(t *testing.T) {
	env := newEnv(t, "lockout-1")
	base, _ := startDaemon(t, env)
	url := keystoresURL(base, env)
	list := func() (int, http.Header, []byte) { return auAKSK(t, env, http.MethodGet, url, nil) }
	badSig := func() (int, http.Header, []byte) {
		return auSend(t, client, auSigned(t, http.MethodGet, url, nil, nil, env.AccessKey, "not-"+env.SecretKey, time.Now()))
	}

	// Failures must be consecutive: a good signature in between starts the count anew.
	for range 4 {
		st, hdr, resp := badSig()
		if msg := auAuthMsg(t, st, hdr, resp); strings.Contains(msg, "locked") {
			t.Fatalf("locked after fewer than 5 failures: %s", msg)
		}
	}
	if st, _, resp := list(); st != http.StatusOK {
		t.Fatalf("good signature after 4 failures: status %d, want 200; %s", st, resp)
	}

	for i := range 5 {
		st, hdr, resp := badSig()
		msg := auAuthMsg(t, st, hdr, resp)
		if locked := strings.Contains(msg, "locked"); locked != (i == 4) {
			t.Errorf("bad signature %d of 5: error_msg %q; want a lock only on the 5th", i+1, msg)
		}
	}
	st, hdr, resp := list()
	auWantAuthFail(t, st, hdr, resp, "locked")
	// The lock is on the access key, not the tenant: a token still works.
	if st, _, resp := do(t, http.MethodGet, url, env.AuthToken, ""); st != http.StatusOK {
		t.Errorf("token while the access key is locked: status %d, want 200; %s", st, resp)
	}

	auWantFailures(t, base, "aksk", "bad_signature", 9)
	auWantFailures(t, base, "aksk", "locked", 1)
}

func TestSignedTokens(t *testing.T) {
	env := newEnv(t, "jwt-1")
	base, _ := startDaemon(t, env)
	url := keystoresURL(base, env)

	tok := auToken(t, env, nil)
	if st, _, resp := do(t, http.MethodGet, url, tok, ""); st != http.StatusOK {
		t.Fatalf("list with a signed token: status %d; %s", st, resp)
	}
	st, hdr, resp := do(t, http.MethodPost, url, tok, mustJSON(t, goodFields(env, env.Tokens[0], "jwt-one")))
	id := wantCreated(t, env, st, hdr, resp)
	st, _, resp = do(t, http.MethodGet, url, tok, "")
	if ids := auList(t, st, resp); len(ids) != 1 || ids[0] != id {
		t.Errorf("keystores %v, want %s", ids, id)
	}

	otherKey, _, otherKID, err := api.GenerateIssuerKey()
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, token, why, reason string
	}{
		{"expired", auTokenBy(t, env.IssuerKey, env.IssuerKID, env, func(c *api.TokenClaims) { c.IssuedAt = time.Now().Add(-2 * time.Hour) }, time.Hour), "expired", "expired"},
		{"wrong audience", auToken(t, env, func(c *api.TokenClaims) { c.Audience = []string{"someone-else"} }), "aud", "audience"},
		{"wrong issuer", auToken(t, env, func(c *api.TokenClaims) { c.Issuer = "impostor" }), "issuer", "issuer"},
		{"another issuer key", auTokenBy(t, otherKey, otherKID, env, nil, time.Hour), "kid", "unknown_key"},
		{"another key under our kid", auTokenBy(t, otherKey, env.IssuerKID, env, nil, time.Hour), "signature", "bad_signature"},
		{"tampered", tok[:len(tok)-4] + "AAAA", "signature", "bad_signature"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := auFailures(t, base, "jwt", tc.reason)
			st, hdr, resp := do(t, http.MethodGet, url, tc.token, "")
			auWantAuthFail(t, st, hdr, resp, tc.why)
			if after := auFailures(t, base, "jwt", tc.reason); after != before+1 {
				t.Errorf("jwt failures for %s: %v then %v, want one more", tc.reason, before, after)
			}
		})
	}
}

func TestTokenIssueCommand(t *testing.T) {
	env := newEnv(t, "tokcmd-1")
	base, _ := startDaemon(t, env)
	url := keystoresURL(base, env)
	issue := func(args ...string) string {
		t.Helper()
		var out, errOut bytes.Buffer
		if err := run(context.Background(), append([]string{"token", "issue", "--dir", env.Dir}, args...), &out, &errOut); err != nil {
			t.Fatalf("token issue %v: %v; stderr %s", args, err, errOut.String())
		}
		tok := strings.TrimSpace(out.String())
		if strings.Count(tok, ".") != 2 || strings.ContainsAny(tok, " \n") {
			t.Fatalf("token issue printed %q, want one compact JWS", out.String())
		}
		return tok
	}

	if st, _, resp := do(t, http.MethodGet, url, issue(), ""); st != http.StatusOK {
		t.Errorf("list with the issued token: status %d; %s", st, resp)
	}
	limited := issue("--roles", "kms:keystore:list")
	if st, _, resp := do(t, http.MethodGet, url, limited, ""); st != http.StatusOK {
		t.Errorf("list with a kms:keystore:list token: status %d; %s", st, resp)
	}
	st, hdr, resp := do(t, http.MethodPost, url, limited, mustJSON(t, goodFields(env, env.Tokens[0], "tokcmd")))
	wantError(t, st, hdr, resp, http.StatusForbidden, "KMS.0306", "kms:keystore:create")
}

func TestRoles(t *testing.T) {
	env := newEnv(t)
	base, _ := startDaemon(t, env)
	url := keystoresURL(base, env)
	withRoles := func(roles ...string) string {
		return auToken(t, env, func(c *api.TokenClaims) { c.Roles = roles })
	}

	lister := withRoles("kms:keystore:list")
	if st, _, resp := do(t, http.MethodGet, url, lister, ""); st != http.StatusOK {
		t.Errorf("list with kms:keystore:list: status %d; %s", st, resp)
	}
	st, hdr, resp := do(t, http.MethodPost, url, lister, mustJSON(t, goodFields(env, env.Tokens[0], "roles-denied")))
	wantError(t, st, hdr, resp, http.StatusForbidden, "KMS.0306", "kms:keystore:create")
	st, hdr, resp = do(t, http.MethodGet, url, withRoles("kms:cmk:*"), "")
	wantError(t, st, hdr, resp, http.StatusForbidden, "KMS.0306", "kms:keystore:list")
	// A prefix without the ':*' is not a wildcard.
	st, hdr, resp = do(t, http.MethodGet, url, withRoles("kms:keystore:li*"), "")
	wantError(t, st, hdr, resp, http.StatusForbidden, "KMS.0306")

	admin := withRoles("kms:keystore:*")
	st, hdr, resp = do(t, http.MethodPost, url, admin, mustJSON(t, goodFields(env, env.Tokens[0], "roles-ok")))
	id := wantCreated(t, env, st, hdr, resp)
	st, _, resp = do(t, http.MethodGet, url, lister, "")
	if ids := auList(t, st, resp); len(ids) != 1 || ids[0] != id {
		t.Errorf("keystores %v, want only %s: the refused create must have stored nothing", ids, id)
	}
	st, hdr, resp = do(t, http.MethodPost, url, withRoles("*"), mustJSON(t, goodFields(env, env.Tokens[1], "roles-all")))
	wantCreated(t, env, st, hdr, resp)

	// A project the credential does not hold, with every scheme.
	other := base + "/v1.0/" + devenv.RandomHex(16) + "/keystores"
	for name, send := range map[string]func() (int, http.Header, []byte){
		"token file": func() (int, http.Header, []byte) { return do(t, http.MethodGet, other, env.AuthToken, "") },
		"jwt":        func() (int, http.Header, []byte) { return do(t, http.MethodGet, other, admin, "") },
		"aksk":       func() (int, http.Header, []byte) { return auAKSK(t, env, http.MethodGet, other, nil) },
	} {
		st, hdr, resp := send()
		if st != http.StatusForbidden {
			t.Errorf("%s: other project: status %d, want 403", name, st)
		}
		wantError(t, st, hdr, resp, http.StatusForbidden, "KMS.0321")
	}
}

func TestAuthIdentityHeadersRefusedOnPublicListener(t *testing.T) {
	env := newEnv(t, "hdr-1")
	base, _ := startDaemon(t, env)
	url := keystoresURL(base, env)
	jwtTok := auToken(t, env, nil)

	for _, h := range []map[string]string{
		{"X-Hsmbridge-Domain-Id": env.DomainID, "X-Hsmbridge-Project-Id": env.ProjectID},
		{"X-Hsmbridge-Domain-Id": env.DomainID},
		{"X-Hsmbridge-Project-Id": env.ProjectID},
	} {
		for scheme, tok := range map[string]string{"token file": env.AuthToken, "jwt": jwtTok, "aksk": ""} {
			req, err := http.NewRequest(http.MethodGet, url, nil)
			if err != nil {
				t.Fatal(err)
			}
			for k, v := range h {
				req.Header.Set(k, v)
			}
			if tok != "" {
				req.Header.Set("X-Auth-Token", tok)
			} else {
				api.SignRequest(req, nil, env.AccessKey, env.SecretKey, time.Now()) // signs the headers too
			}
			st, hdr, resp := auSend(t, client, req)
			if st != http.StatusUnauthorized {
				t.Errorf("%s with %v: status %d, want 401", scheme, h, st)
				continue
			}
			auWantAuthFail(t, st, hdr, resp, "trusted frontend")
		}
	}
	// The same credentials without the headers work.
	if st, _, resp := do(t, http.MethodGet, url, jwtTok, ""); st != http.StatusOK {
		t.Errorf("control: status %d; %s", st, resp)
	}
}

func TestTrustedUnixSocket(t *testing.T) {
	env := newEnv(t, "trusted-unix-1")
	sock := filepath.Join(env.Dir, "trusted.sock")
	uid := os.Getuid()
	auSetTrusted(t, env, map[string]any{"listen": "unix:" + sock, "allowed_uids": []int{uid}})
	base, stop := auStartDaemon(t, env)

	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o660 {
		t.Errorf("trusted socket mode %v, want a socket with 0660", fi.Mode())
	}

	uc := auNewClient(t, &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}})
	turl := "http://trusted/v1.0/" + env.ProjectID + "/keystores"

	// The frontend names the tenant; the call runs as that tenant.
	body := []byte(mustJSON(t, goodFields(env, env.Tokens[0], "via-frontend")))
	st, hdr, resp := auSend(t, uc, auTrustedReq(t, http.MethodPost, turl, env.DomainID, env.ProjectID, body))
	id := wantCreated(t, env, st, hdr, resp)
	st, _, resp = auAKSK(t, env, http.MethodGet, keystoresURL(base, env), nil)
	if ids := auList(t, st, resp); len(ids) != 1 || ids[0] != id {
		t.Errorf("public AK/SK list: keystores %v, want the frontend's %s", ids, id)
	}
	st, _, resp = auSend(t, uc, auTrustedReq(t, http.MethodGet, turl, env.DomainID, env.ProjectID, nil))
	if ids := auList(t, st, resp); len(ids) != 1 || ids[0] != id {
		t.Errorf("trusted list: keystores %v, want %s", ids, id)
	}
	// Another tenant named by the frontend sees none of it.
	otherProject := devenv.RandomHex(16)
	st, _, resp = auSend(t, uc, auTrustedReq(t, http.MethodGet, "http://trusted/v1.0/"+otherProject+"/keystores", devenv.RandomHex(16), otherProject, nil))
	if ids := auList(t, st, resp); len(ids) != 0 {
		t.Errorf("another tenant lists %v", ids)
	}

	for _, tc := range []struct{ name, domain, project string }{
		{"no headers", "", ""},
		{"no project header", env.DomainID, ""},
		{"no domain header", "", env.ProjectID},
		{"malformed domain", strings.ToUpper(env.DomainID), env.ProjectID},
		{"short domain", env.DomainID[:31], env.ProjectID},
		{"malformed project", env.DomainID, env.ProjectID + "0"},
	} {
		st, hdr, resp := auSend(t, uc, auTrustedReq(t, http.MethodGet, turl, tc.domain, tc.project, nil))
		if st != http.StatusUnauthorized {
			t.Errorf("%s: status %d, want 401; %s", tc.name, st, resp)
			continue
		}
		auWantAuthFail(t, st, hdr, resp, "X-Hsmbridge-Domain-Id")
	}
	// A credential is no substitute for the headers on this listener.
	req := auTrustedReq(t, http.MethodGet, turl, "", "", nil)
	req.Header.Set("X-Auth-Token", env.AuthToken)
	st, hdr, resp = auSend(t, uc, req)
	wantAuthError(t, st, hdr, resp)
	// The project header is the frontend's project: another one in the URL is refused.
	st, hdr, resp = auSend(t, uc, auTrustedReq(t, http.MethodGet, "http://trusted/v1.0/"+otherProject+"/keystores", env.DomainID, env.ProjectID, nil))
	wantError(t, st, hdr, resp, http.StatusForbidden, "KMS.0321")

	// A second configuration that does not allow our uid.
	stop()
	uc.CloseIdleConnections()
	auSetTrusted(t, env, map[string]any{"listen": "unix:" + sock, "allowed_uids": []int{uid + 4242}})
	auStartDaemon(t, env)
	st, hdr, resp = auSend(t, uc, auTrustedReq(t, http.MethodGet, turl, env.DomainID, env.ProjectID, nil))
	auWantAuthFail(t, st, hdr, resp, "uid "+strconv.Itoa(uid), "not an allowed frontend")
}

// auPKI is a throw-away CA for the mTLS test.
type auPKI struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func auNewPKI(t *testing.T, name string) *auPKI {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &auPKI{cert, key}
}

// issue returns a leaf for subject (a server for ip if set, else a client) as a tls pair.
func (p *auPKI) issue(t *testing.T, subject pkix.Name, ip net.IP) (tls.Certificate, []byte, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 64))
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial, Subject: subject,
		NotBefore: p.cert.NotBefore, NotAfter: p.cert.NotAfter,
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if ip != nil {
		tmpl.IPAddresses, tmpl.ExtKeyUsage = []net.IP{ip}, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.cert, &key.PublicKey, p.key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return pair, certPEM, keyPEM
}

func TestTrustedMTLS(t *testing.T) {
	env := newEnv(t, "trusted-tls-1")
	ca := auNewPKI(t, "frontend CA")
	_, serverPEM, serverKey := ca.issue(t, pkix.Name{CommonName: "hsmbridge"}, net.IPv4(127, 0, 0, 1))
	for name, data := range map[string][]byte{
		"ca.pem":         pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.cert.Raw}),
		"server.pem":     serverPEM,
		"server-key.pem": serverKey,
	} {
		if err := os.WriteFile(filepath.Join(env.Dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	addr := auFreeAddr(t)
	// Relative file names: they are resolved against the config file's directory.
	auSetTrusted(t, env, map[string]any{
		"listen": addr, "client_ca": "ca.pem", "cert_file": "server.pem", "key_file": "server-key.pem",
		"subjects": []string{"CN=frontend-a,O=kms"},
	})
	auStartDaemon(t, env)

	roots := x509.NewCertPool()
	roots.AddCert(ca.cert)
	tlsClient := func(certs ...tls.Certificate) *http.Client {
		return auNewClient(t, &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, Certificates: certs}})
	}
	frontendA, _, _ := ca.issue(t, pkix.Name{CommonName: "frontend-a", Organization: []string{"kms"}}, nil)
	frontendB, _, _ := ca.issue(t, pkix.Name{CommonName: "frontend-b", Organization: []string{"kms"}}, nil)
	forged, _, _ := auNewPKI(t, "frontend CA").issue(t, pkix.Name{CommonName: "frontend-a", Organization: []string{"kms"}}, nil)
	turl := "https://" + addr + "/v1.0/" + env.ProjectID + "/keystores"

	good := tlsClient(frontendA)
	body := []byte(mustJSON(t, goodFields(env, env.Tokens[0], "via-mtls")))
	st, hdr, resp := auSend(t, good, auTrustedReq(t, http.MethodPost, turl, env.DomainID, env.ProjectID, body))
	id := wantCreated(t, env, st, hdr, resp)
	st, _, resp = auSend(t, good, auTrustedReq(t, http.MethodGet, turl, env.DomainID, env.ProjectID, nil))
	if ids := auList(t, st, resp); len(ids) != 1 || ids[0] != id {
		t.Errorf("keystores %v, want %s", ids, id)
	}
	st, hdr, resp = auSend(t, good, auTrustedReq(t, http.MethodGet, turl, "", "", nil))
	auWantAuthFail(t, st, hdr, resp, "X-Hsmbridge-Domain-Id")

	// A certificate of the same CA with a subject not on the list.
	st, hdr, resp = auSend(t, tlsClient(frontendB), auTrustedReq(t, http.MethodGet, turl, env.DomainID, env.ProjectID, nil))
	auWantAuthFail(t, st, hdr, resp, "subject")

	// A certificate from another CA, or none, fails the handshake. Under TLS 1.2 the server
	// checks the client's certificate before it finishes the handshake, so the client's
	// Handshake itself fails; under TLS 1.3 (the default) the request fails.
	for name, certs := range map[string][]tls.Certificate{"another CA": {forged}, "no certificate": nil} {
		conn, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: roots, Certificates: certs, MaxVersion: tls.VersionTLS12})
		if err == nil {
			conn.Close()
			t.Errorf("%s: TLS 1.2 handshake succeeded, want a failure", name)
		} else {
			t.Logf("%s: TLS 1.2 handshake: %v", name, err)
		}
		resp, err := tlsClient(certs...).Do(auTrustedReq(t, http.MethodGet, turl, env.DomainID, env.ProjectID, nil))
		if err == nil {
			resp.Body.Close()
			t.Errorf("%s: request succeeded with status %d, want a TLS failure", name, resp.StatusCode)
		} else {
			t.Logf("%s: TLS 1.3 request: %v", name, err)
		}
	}
}

func TestMetricsListener(t *testing.T) {
	env := newEnv(t, "ops-1")
	ops := auFreeAddr(t)
	auEditConfig(t, env, func(doc map[string]any) { auSection(doc, "server")["metrics_listen"] = ops })
	base, _ := auStartDaemon(t, env)
	opsBase := "http://" + ops

	for _, path := range []string{"/healthz", "/readyz", "/metrics"} {
		st, _, resp := do(t, http.MethodGet, opsBase+path, "", "")
		if st != http.StatusOK {
			t.Errorf("ops %s: status %d, want 200; %s", path, st, resp)
		}
		if path == "/metrics" && !bytes.Contains(resp, []byte("hsmbridge_auth_failures_total")) {
			t.Errorf("ops /metrics has no hsmbridge_auth_failures_total")
		}
	}
	// Not the API, even with a good credential.
	for _, method := range []string{http.MethodGet, http.MethodPost} {
		body := ""
		if method == http.MethodPost {
			body = mustJSON(t, goodFields(env, env.Tokens[0], "via-ops"))
		}
		if st, _, resp := do(t, method, keystoresURL(opsBase, env), env.AuthToken, body); st != http.StatusNotFound {
			t.Errorf("ops %s keystores: status %d, want 404; %s", method, st, resp)
		}
	}
	st, _, resp := do(t, http.MethodGet, keystoresURL(base, env), env.AuthToken, "")
	if ids := auList(t, st, resp); len(ids) != 0 {
		t.Errorf("keystores %v after the refused create on the ops listener", ids)
	}
}
