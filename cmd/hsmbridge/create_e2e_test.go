package main

// End-to-end tests of "create dedicated keystore" (POST /v1.0/{project_id}/keystores): the
// real daemon over real HTTP, on real SoftHSM tokens and a real SQLite file. Every failure
// is followed by proof that nothing was stored half-way: the same cluster (and alias) can
// still be bound by a correct create, or, where the cluster itself is the problem, the store
// and the token are inspected once the daemon has stopped.

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hsmbridge/hsmbridge/internal/devenv"
	"github.com/hsmbridge/hsmbridge/keystore/api"
	"github.com/hsmbridge/hsmbridge/keystore/store"
)

var uuidV4 = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)

func keystoresURL(base string, env *devenv.Env) string {
	return base + "/v1.0/" + env.ProjectID + "/keystores"
}

// goodFields is a correct create of alias on tok's cluster.
func goodFields(env *devenv.Env, tok *devenv.Token, alias string) map[string]any {
	return map[string]any{"keystore_alias": alias, "hsm_cluster_id": tok.ClusterID, "hsm_ca_cert": env.CA.PEM()}
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// create sends a create with the env's own credential and project.
func create(t *testing.T, base string, env *devenv.Env, fields map[string]any) (int, http.Header, []byte) {
	t.Helper()
	return do(t, http.MethodPost, keystoresURL(base, env), env.AuthToken, mustJSON(t, fields))
}

// wantCreated checks a 200 answer of create and returns the keystore id.
func wantCreated(t *testing.T, env *devenv.Env, status int, hdr http.Header, body []byte) string {
	t.Helper()
	if status != http.StatusOK {
		t.Fatalf("status %d, want 200; body %s", status, body)
	}
	if hdr.Get("X-Request-Id") == "" {
		t.Errorf("no X-Request-Id header")
	}
	if ct := hdr.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		t.Errorf("Content-Type %q, want application/json", ct)
	}
	var got map[string]map[string]string
	if err := json.Unmarshal(body, &got); err != nil {
		t.Fatalf("body %s: %v", body, err)
	}
	ks, ok := got["keystore"]
	if len(got) != 1 || !ok || len(ks) != 2 {
		t.Fatalf("body %s, want exactly {\"keystore\":{\"keystore_id\",\"domain_id\"}}", body)
	}
	if !uuidV4.MatchString(ks["keystore_id"]) {
		t.Errorf("keystore_id %q is not a lower-case version 4 UUID", ks["keystore_id"])
	}
	if ks["domain_id"] != env.DomainID {
		t.Errorf("domain_id %q, want the token's domain %q", ks["domain_id"], env.DomainID)
	}
	return ks["keystore_id"]
}

// mustCreate binds alias to tok's cluster and fails the test if it cannot.
func mustCreate(t *testing.T, base string, env *devenv.Env, tok *devenv.Token, alias string) string {
	t.Helper()
	st, hdr, body := create(t, base, env, goodFields(env, tok, alias))
	return wantCreated(t, env, st, hdr, body)
}

// wantError checks an error answer in the service's format, {"error":{...}}: the status, the
// code, a non-empty message (the official SDK needs both fields) that contains each of msg.
func wantError(t *testing.T, status int, hdr http.Header, body []byte, wantStatus int, wantCode string, msg ...string) {
	t.Helper()
	if status != wantStatus {
		t.Errorf("status %d, want %d; body %s", status, wantStatus, body)
	}
	if hdr.Get("X-Request-Id") == "" {
		t.Errorf("no X-Request-Id header")
	}
	if ct := hdr.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		t.Errorf("Content-Type %q, want application/json", ct)
	}
	var got map[string]map[string]string
	if err := json.Unmarshal(body, &got); err != nil {
		t.Fatalf("error body %s: %v", body, err)
	}
	e, ok := got["error"]
	if len(got) != 1 || !ok || len(e) != 2 {
		t.Fatalf("error body %s, want exactly {\"error\":{\"error_code\",\"error_msg\"}}", body)
	}
	if e["error_code"] != wantCode {
		t.Errorf("error_code %q, want %q; body %s", e["error_code"], wantCode, body)
	}
	if e["error_msg"] == "" {
		t.Errorf("error_msg is empty; body %s", body)
	}
	for _, m := range msg {
		if !strings.Contains(e["error_msg"], m) {
			t.Errorf("error_msg %q does not say %q", e["error_msg"], m)
		}
	}
}

// wantAuthError checks the API gateway's flat 401 body.
func wantAuthError(t *testing.T, status int, hdr http.Header, body []byte) {
	t.Helper()
	if status != http.StatusUnauthorized {
		t.Errorf("status %d, want 401; body %s", status, body)
	}
	var got map[string]any
	if err := json.Unmarshal(body, &got); err != nil {
		t.Fatalf("body %s: %v", body, err)
	}
	keys := make([]string, 0, len(got))
	for k := range got {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	if want := []string{"error_code", "error_msg", "request_id"}; !slices.Equal(keys, want) {
		t.Fatalf("401 body has keys %v, want the flat %v; body %s", keys, want, body)
	}
	if got["error_code"] != "APIGW.0301" {
		t.Errorf("error_code %v, want APIGW.0301", got["error_code"])
	}
	if m, _ := got["error_msg"].(string); m == "" {
		t.Errorf("error_msg empty; body %s", body)
	}
	if id := hdr.Get("X-Request-Id"); id == "" || got["request_id"] != id {
		t.Errorf("request_id %v, want the X-Request-Id header %q", got["request_id"], id)
	}
}

func fingerprintOf(c *x509.Certificate) string {
	sum := sha256.Sum256(c.Raw)
	return hex.EncodeToString(sum[:])
}

// markers returns the keystore markers (label keystore:<id>) among objs, by id.
func markers(t *testing.T, env *devenv.Env, tok *devenv.Token) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	for _, o := range tokenData(t, env, tok) {
		if id, ok := strings.CutPrefix(o.Label, "keystore:"); ok {
			out[id] = o.Value
		}
	}
	return out
}

// selfSigned makes a self-signed certificate from tmpl (for CAs devenv cannot make).
func selfSigned(t *testing.T, tmpl *x509.Certificate) *x509.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl.SerialNumber = big.NewInt(time.Now().UnixNano())
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func newCA(t *testing.T, name string, notBefore, notAfter time.Time) *devenv.CA {
	t.Helper()
	ca, err := devenv.NewCA(name, notBefore, notAfter)
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

func TestCreateSucceeds(t *testing.T) {
	env := newEnv(t, "c1", "c2", "c3", "c4", "c5", "c6", "c7")
	base, _ := startDaemon(t, env)
	long := strings.Repeat("a", 255)
	cases := []struct {
		name   string
		fields func(tok *devenv.Token) map[string]any
	}{
		{"hsm_cluster_id only, type absent", func(tok *devenv.Token) map[string]any {
			return map[string]any{"keystore_alias": "ks-1", "hsm_cluster_id": tok.ClusterID, "hsm_ca_cert": env.CA.PEM()}
		}},
		{"cluster_id only", func(tok *devenv.Token) map[string]any {
			return map[string]any{"keystore_alias": "ks-2", "cluster_id": tok.ClusterID, "hsm_ca_cert": env.CA.PEM()}
		}},
		{"both ids, equal", func(tok *devenv.Token) map[string]any {
			return map[string]any{"keystore_alias": "ks-3", "hsm_cluster_id": tok.ClusterID, "cluster_id": tok.ClusterID, "hsm_ca_cert": env.CA.PEM()}
		}},
		{"keystore_type DHSM", func(tok *devenv.Token) map[string]any {
			return map[string]any{"keystore_alias": "ks-4", "hsm_cluster_id": tok.ClusterID, "hsm_ca_cert": env.CA.PEM(), "keystore_type": "DHSM"}
		}},
		{"keystore_type 1", func(tok *devenv.Token) map[string]any {
			return map[string]any{"keystore_alias": "ks-5", "hsm_cluster_id": tok.ClusterID, "hsm_ca_cert": env.CA.PEM(), "keystore_type": "1"}
		}},
		{"alias of 255 characters", func(tok *devenv.Token) map[string]any {
			return goodFields(env, tok, long)
		}},
		{"alias using every allowed character class, unknown fields ignored", func(tok *devenv.Token) map[string]any {
			m := goodFields(env, tok, "Az09:/_-")
			m["enterprise_project_id"] = "0"
			m["newer_field"] = map[string]any{"nested": []int{1, 2}}
			return m
		}},
	}
	ids := map[string]bool{}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			st, hdr, body := create(t, base, env, c.fields(env.Tokens[i]))
			id := wantCreated(t, env, st, hdr, body)
			if ids[id] {
				t.Errorf("keystore id %s answered twice", id)
			}
			ids[id] = true
		})
	}
}

// TestCreateBindsStoreAndToken checks what a create leaves behind: a DISABLED row recording
// the binding, and a marker object on the token naming the keystore and the token.
func TestCreateBindsStoreAndToken(t *testing.T) {
	env := newEnv(t)
	base, stop := startDaemon(t, env)
	tok := env.Tokens[0]
	id := mustCreate(t, base, env, tok, "ks-1")
	stop()

	rows := storeRows(t, env)
	if len(rows) != 1 {
		t.Fatalf("store has %d rows, want 1: %+v", len(rows), rows)
	}
	r := rows[0]
	want := store.Keystore{
		ID: id, DomainID: env.DomainID, ProjectID: env.ProjectID, Alias: "ks-1", Type: "DHSM",
		ClusterID: tok.ClusterID, State: store.StateDisabled, TokenSerial: tok.Serial, TokenLabel: tok.Label,
		CAFingerprint: fingerprintOf(env.CA.Cert), IdentityFingerprint: fingerprintOf(tok.Identity),
		CreatedAt: r.CreatedAt, UpdatedAt: r.UpdatedAt,
	}
	if r != want {
		t.Errorf("row\n got %+v\nwant %+v", r, want)
	}

	ms := markers(t, env, tok)
	if len(ms) != 1 || ms[id] == nil {
		t.Fatalf("token %s has markers %v, want exactly keystore:%s", tok.Label, ms, id)
	}
	var m map[string]any
	if err := json.Unmarshal(ms[id], &m); err != nil {
		t.Fatalf("marker value %q is not JSON: %v", ms[id], err)
	}
	for k, v := range map[string]string{"keystore_id": id, "token_serial": tok.Serial, "token_label": tok.Label,
		"cluster_id": tok.ClusterID, "domain_id": env.DomainID} {
		if m[k] != v {
			t.Errorf("marker %s = %v, want %q (marker %s)", k, m[k], v, ms[id])
		}
	}
	if other := markers(t, env, env.Tokens[1]); len(other) != 0 {
		t.Errorf("the unbound cluster's token has markers %v", other)
	}
}

type rejectCase struct {
	name   string
	method string                                    // default POST
	path   func(base string, env *devenv.Env) string // default the keystores collection
	token  func(env *devenv.Env) string              // default the env's token
	body   func(t *testing.T, env *devenv.Env) string
	status int
	code   string
	msg    []string // what error_msg must say
}

// edit is a body: a correct create of "ks-1" on the first cluster, changed by f.
func edit(f func(t *testing.T, env *devenv.Env, m map[string]any)) func(*testing.T, *devenv.Env) string {
	return func(t *testing.T, env *devenv.Env) string {
		m := goodFields(env, env.Tokens[0], "ks-1")
		f(t, env, m)
		return mustJSON(t, m)
	}
}

func set(k string, v any) func(*testing.T, *devenv.Env) string {
	return edit(func(_ *testing.T, _ *devenv.Env, m map[string]any) { m[k] = v })
}

func unset(k string) func(*testing.T, *devenv.Env) string {
	return edit(func(_ *testing.T, _ *devenv.Env, m map[string]any) { delete(m, k) })
}

func caCert(f func(t *testing.T, env *devenv.Env) string) func(*testing.T, *devenv.Env) string {
	return edit(func(t *testing.T, env *devenv.Env, m map[string]any) { m["hsm_ca_cert"] = f(t, env) })
}

var goodBody = edit(func(*testing.T, *devenv.Env, map[string]any) {})

func raw(s string) func(*testing.T, *devenv.Env) string {
	return func(*testing.T, *devenv.Env) string { return s }
}

// sized is a correct create of "ks-1" padded with an unknown field to exactly n bytes.
func sized(n int) func(*testing.T, *devenv.Env) string {
	return func(t *testing.T, env *devenv.Env) string {
		b := mustJSON(t, goodFields(env, env.Tokens[0], "ks-1"))
		head := b[:len(b)-1] + `,"pad":"`
		tail := `"}`
		pad := n - len(head) - len(tail)
		if pad < 0 {
			t.Fatalf("cannot pad to %d bytes", n)
		}
		return head + strings.Repeat("x", pad) + tail
	}
}

func rejectCases() []rejectCase {
	now := time.Now()
	return []rejectCase{
		// The request's own fields.
		{name: "alias missing", body: unset("keystore_alias"), status: 400, code: "KMS.0204", msg: []string{"keystore_alias"}},
		{name: "alias empty", body: set("keystore_alias", ""), status: 400, code: "KMS.0204", msg: []string{"keystore_alias"}},
		{name: "alias with a space", body: set("keystore_alias", "my keystore"), status: 400, code: "KMS.8001", msg: []string{"keystore_alias"}},
		{name: "alias of 256 characters", body: set("keystore_alias", strings.Repeat("a", 256)), status: 400, code: "KMS.8001", msg: []string{"keystore_alias"}},
		{name: "alias with unicode", body: set("keystore_alias", "ключ"), status: 400, code: "KMS.8001", msg: []string{"keystore_alias"}},
		{name: "alias with an accent", body: set("keystore_alias", "clé"), status: 400, code: "KMS.8001", msg: []string{"keystore_alias"}},
		{name: "alias with a dot", body: set("keystore_alias", "ks.1"), status: 400, code: "KMS.8001", msg: []string{"keystore_alias"}},
		{name: "alias with a trailing newline", body: set("keystore_alias", "ks-1\n"), status: 400, code: "KMS.8001", msg: []string{"keystore_alias"}},
		{name: "no cluster id", body: unset("hsm_cluster_id"), status: 400, code: "KMS.0204", msg: []string{"hsm_cluster_id or cluster_id"}},
		{name: "unknown cluster", body: set("hsm_cluster_id", "no-such-cluster"), status: 400, code: "KMS.8004", msg: []string{"no-such-cluster"}},
		{name: "unknown cluster in cluster_id", body: edit(func(_ *testing.T, _ *devenv.Env, m map[string]any) {
			delete(m, "hsm_cluster_id")
			m["cluster_id"] = "no-such-cluster"
		}), status: 400, code: "KMS.8004", msg: []string{"no-such-cluster"}},
		{name: "both cluster ids, different", body: edit(func(_ *testing.T, env *devenv.Env, m map[string]any) {
			m["cluster_id"] = env.Tokens[1].ClusterID
		}), status: 400, code: "KMS.8001", msg: []string{"different clusters"}},
		{name: "hsm_ca_cert missing", body: unset("hsm_ca_cert"), status: 400, code: "KMS.0204", msg: []string{"hsm_ca_cert"}},
		{name: "hsm_ca_cert empty", body: set("hsm_ca_cert", ""), status: 400, code: "KMS.0204", msg: []string{"hsm_ca_cert"}},
		{name: "keystore_type DEFAULT", body: set("keystore_type", "DEFAULT"), status: 400, code: "KMS.0340", msg: []string{"DEFAULT"}},
		{name: "keystore_type 0", body: set("keystore_type", "0"), status: 400, code: "KMS.0340", msg: []string{"DEFAULT"}},
		{name: "keystore_type CDMS on a DHSM cluster", body: set("keystore_type", "CDMS"), status: 400, code: "KMS.8001", msg: []string{"DHSM cluster", "CDMS"}},
		{name: "keystore_type 2 on a DHSM cluster", body: set("keystore_type", "2"), status: 400, code: "KMS.8001", msg: []string{"DHSM cluster", "CDMS"}},
		{name: "keystore_type bogus", body: set("keystore_type", "bogus"), status: 400, code: "KMS.8001", msg: []string{"keystore_type"}},
		{name: "keystore_type lower case", body: set("keystore_type", "dhsm"), status: 400, code: "KMS.8001", msg: []string{"keystore_type"}},

		// hsm_ca_cert: each refusal names the check that failed.
		{name: "CA garbage", body: set("hsm_ca_cert", "this is not a certificate"), status: 400, code: "KMS.8006", msg: []string{"hsm_ca_cert", "not PEM"}},
		{name: "CA PEM block not a certificate", body: set("hsm_ca_cert", string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte("key")}))),
			status: 400, code: "KMS.8006", msg: []string{"hsm_ca_cert", `"PRIVATE KEY"`, "not a CERTIFICATE"}},
		{name: "CA CERTIFICATE block of junk", body: set("hsm_ca_cert", string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte("junk")}))),
			status: 400, code: "KMS.8006", msg: []string{"hsm_ca_cert", "does not parse"}},
		{name: "CA twice", body: caCert(func(_ *testing.T, env *devenv.Env) string { return env.CA.PEM() + env.CA.PEM() }),
			status: 400, code: "KMS.8006", msg: []string{"hsm_ca_cert", "exactly one certificate"}},
		{name: "leaf certificate as CA", body: caCert(func(_ *testing.T, env *devenv.Env) string { return devenv.CertPEM(env.Tokens[0].Identity) }),
			status: 400, code: "KMS.8006", msg: []string{"hsm_ca_cert", "not a CA certificate"}},
		{name: "CA without certificate signing usage", body: caCert(func(t *testing.T, _ *devenv.Env) string {
			return devenv.CertPEM(selfSigned(t, &x509.Certificate{
				Subject: pkix.Name{CommonName: "no cert sign"}, NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
				IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageDigitalSignature,
			}))
		}), status: 400, code: "KMS.8006", msg: []string{"hsm_ca_cert", "keyCertSign"}},
		{name: "CA not yet valid", body: caCert(func(t *testing.T, _ *devenv.Env) string {
			return newCA(t, "future CA", now.Add(time.Hour), now.Add(2*time.Hour)).PEM()
		}), status: 400, code: "KMS.8006", msg: []string{"hsm_ca_cert", "not valid before"}},
		{name: "CA expired", body: caCert(func(t *testing.T, _ *devenv.Env) string {
			return newCA(t, "old CA", now.AddDate(-2, 0, 0), now.AddDate(-1, 0, 0)).PEM()
		}), status: 400, code: "KMS.8006", msg: []string{"hsm_ca_cert", "expired"}},
		{name: "CA that did not issue the cluster's certificate", body: caCert(func(t *testing.T, _ *devenv.Env) string {
			return newCA(t, "another CA", now.Add(-time.Hour), now.AddDate(1, 0, 0)).PEM()
		}), status: 400, code: "KMS.8006", msg: []string{"hsm_ca_cert", "did not issue"}},

		// The body as bytes.
		{name: "malformed JSON", body: raw(`{"keystore_alias": "ks-1",`), status: 400, code: "KMS.0202"},
		{name: "trailing garbage after JSON", body: raw(`{"keystore_alias": "ks-1"} x`), status: 400, code: "KMS.0202"},
		{name: "JSON array", body: raw(`[]`), status: 400, code: "KMS.0202"},
		{name: "empty body", body: raw(""), status: 400, code: "KMS.0202", msg: []string{"empty"}},
		{name: "blank body", body: raw(" \n\t "), status: 400, code: "KMS.0202", msg: []string{"empty"}},
		{name: "body over 64 KiB", body: sized(64<<10 + 1), status: 400, code: "KMS.0203", msg: []string{"64 KiB"}},

		// Routing.
		{name: "unknown route", path: func(base string, env *devenv.Env) string { return base + "/v1.0/" + env.ProjectID + "/no-such-thing" },
			body: goodBody, status: 400, code: "KMS.0201"},
		{name: "unknown version", path: func(base string, env *devenv.Env) string { return base + "/v9.9/" + env.ProjectID + "/keystores" },
			body: goodBody, status: 400, code: "KMS.0201"},
		{name: "PUT on keystores", method: http.MethodPut, body: goodBody, status: 405, code: "KMS.0215"},
		{name: "PATCH on keystores", method: http.MethodPatch, body: goodBody, status: 405, code: "KMS.0215"},

		// Authorisation (401s have a body of their own: TestCreateAuthentication).
		{name: "project not the token's", path: func(base string, _ *devenv.Env) string { return base + "/v1.0/" + devenv.RandomHex(16) + "/keystores" },
			body: goodBody, status: 403, code: "KMS.0321"},
		{name: "project not the token's, malformed body", path: func(base string, _ *devenv.Env) string { return base + "/v1.0/" + devenv.RandomHex(16) + "/keystores" },
			body: raw("{"), status: 403, code: "KMS.0321"},
	}
}

// TestCreateRejects runs each refused create on a fresh environment, then shows that the
// refusal stored nothing: the same alias binds the same cluster at once.
func TestCreateRejects(t *testing.T) {
	for _, c := range rejectCases() {
		t.Run(c.name, func(t *testing.T) {
			env := newEnv(t)
			base, _ := startDaemon(t, env)
			method, url, token := http.MethodPost, keystoresURL(base, env), env.AuthToken
			if c.method != "" {
				method = c.method
			}
			if c.path != nil {
				url = c.path(base, env)
			}
			if c.token != nil {
				token = c.token(env)
			}
			st, hdr, body := do(t, method, url, token, c.body(t, env))
			wantError(t, st, hdr, body, c.status, c.code, c.msg...)

			mustCreate(t, base, env, env.Tokens[0], "ks-1")
		})
	}
}

// TestCreateBodyAtLimit: a body of exactly 64 KiB is read (its unknown field ignored).
func TestCreateBodyAtLimit(t *testing.T) {
	env := newEnv(t)
	base, _ := startDaemon(t, env)
	st, hdr, body := do(t, http.MethodPost, keystoresURL(base, env), env.AuthToken, sized(64<<10)(t, env))
	wantCreated(t, env, st, hdr, body)
}

func TestCreateDuplicateAlias(t *testing.T) {
	env := newEnv(t)
	base, _ := startDaemon(t, env)
	mustCreate(t, base, env, env.Tokens[0], "ks-1")
	st, hdr, body := create(t, base, env, goodFields(env, env.Tokens[1], "ks-1"))
	wantError(t, st, hdr, body, 400, "KMS.8002", `"ks-1"`, "already exists")
	// The refused create left the second cluster unbound.
	mustCreate(t, base, env, env.Tokens[1], "ks-2")
}

func TestCreateAliasIsCaseSensitive(t *testing.T) {
	env := newEnv(t)
	base, _ := startDaemon(t, env)
	mustCreate(t, base, env, env.Tokens[0], "ks-A")
	mustCreate(t, base, env, env.Tokens[1], "ks-a")
}

func TestCreateClusterAlreadyBound(t *testing.T) {
	env := newEnv(t)
	base, _ := startDaemon(t, env)
	mustCreate(t, base, env, env.Tokens[0], "ks-1")
	st, hdr, body := create(t, base, env, goodFields(env, env.Tokens[0], "ks-2"))
	wantError(t, st, hdr, body, 400, "KMS.8005", env.Tokens[0].ClusterID, "already bound")
	// The refused create did not keep its alias.
	mustCreate(t, base, env, env.Tokens[1], "ks-2")
}

// writeCertFile writes cert as tok's identity certificate file and makes the config use it.
func writeCertFile(t *testing.T, env *devenv.Env, tok *devenv.Token, cert *x509.Certificate) {
	t.Helper()
	path := filepath.Join(env.Dir, tok.ClusterID+"-identity.pem")
	if err := os.WriteFile(path, []byte(devenv.CertPEM(cert)), 0o600); err != nil {
		t.Fatal(err)
	}
	tok.CertFile = path
	if err := env.WriteConfig(); err != nil {
		t.Fatal(err)
	}
}

// TestCreateClusterIdentityRefused covers the refusals where the cluster's own identity is
// what is wrong, so no CA can bind it: the store and the token are inspected after the
// daemon stopped, and once the identity is fixed the same cluster binds.
func TestCreateClusterIdentityRefused(t *testing.T) {
	now := time.Now()
	cases := []struct {
		name  string
		setup func(t *testing.T, env *devenv.Env, tok *devenv.Token) (caPEM string)
		msg   []string
	}{
		{
			// The env's CA issued the certificate, but for a key the token does not hold.
			name: "proof of possession fails",
			setup: func(t *testing.T, env *devenv.Env, tok *devenv.Token) string {
				other, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
				if err != nil {
					t.Fatal(err)
				}
				cert, err := env.CA.Issue(other.Public(), tok.ClusterID)
				if err != nil {
					t.Fatal(err)
				}
				writeCertFile(t, env, tok, cert)
				return env.CA.PEM()
			},
			msg: []string{"hsm_ca_cert", "possession"},
		},
		{
			// An expired CA that did issue a certificate for the token's real key.
			name: "expired CA",
			setup: func(t *testing.T, env *devenv.Env, tok *devenv.Token) string {
				ca := newCA(t, "expired CA", now.AddDate(-2, 0, 0), now.AddDate(-1, 0, 0))
				cert, err := ca.Issue(tok.PublicKey, tok.ClusterID)
				if err != nil {
					t.Fatal(err)
				}
				writeCertFile(t, env, tok, cert)
				return ca.PEM()
			},
			msg: []string{"hsm_ca_cert", "expired"},
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			env := newEnv(t)
			bad, good := env.Tokens[0], env.Tokens[1]
			caPEM := c.setup(t, env, bad)
			base, stop := startDaemon(t, env)

			st, hdr, body := create(t, base, env, map[string]any{
				"keystore_alias": "ks-1", "hsm_cluster_id": bad.ClusterID, "hsm_ca_cert": caPEM})
			wantError(t, st, hdr, body, 400, "KMS.8006", c.msg...)
			// The alias was not kept.
			id := mustCreate(t, base, env, good, "ks-1")
			stop()

			rows := storeRows(t, env)
			if len(rows) != 1 || rows[0].ID != id || rows[0].ClusterID != good.ClusterID {
				t.Errorf("store rows %+v, want only keystore %s on %s", rows, id, good.ClusterID)
			}
			if ms := markers(t, env, bad); len(ms) != 0 {
				t.Errorf("refused cluster's token has markers %v", ms)
			}
			if ms := markers(t, env, good); len(ms) != 1 || ms[id] == nil {
				t.Errorf("bound cluster's token has markers %v, want only %s", ms, id)
			}

			// With its identity put right, the refused cluster binds.
			bad.CertFile = ""
			if err := env.WriteConfig(); err != nil {
				t.Fatal(err)
			}
			base, _ = startDaemon(t, env)
			mustCreate(t, base, env, bad, "ks-2")
		})
	}
}

// TestCreateFailedBindLeavesNothing inspects the store and token after a create that was
// refused after the store row had been claimed (the CA did not issue the identity).
func TestCreateFailedBindLeavesNothing(t *testing.T) {
	env := newEnv(t)
	base, stop := startDaemon(t, env)
	other := newCA(t, "another CA", time.Now().Add(-time.Hour), time.Now().AddDate(1, 0, 0))
	m := goodFields(env, env.Tokens[0], "ks-1")
	m["hsm_ca_cert"] = other.PEM()
	st, hdr, body := create(t, base, env, m)
	wantError(t, st, hdr, body, 400, "KMS.8006", "did not issue")
	stop()
	if rows := storeRows(t, env); len(rows) != 0 {
		t.Errorf("store rows after a refused create: %+v", rows)
	}
	for _, tok := range env.Tokens {
		if ms := markers(t, env, tok); len(ms) != 0 {
			t.Errorf("token %s has markers after a refused create: %v", tok.Label, ms)
		}
	}
}

func TestCreateAuthentication(t *testing.T) {
	env := newEnv(t)
	base, _ := startDaemon(t, env)
	good := mustJSON(t, goodFields(env, env.Tokens[0], "ks-1"))
	for _, c := range []struct {
		name, token, body string
	}{
		{"no X-Auth-Token", "", good},
		{"unknown token", devenv.RandomHex(24), good},
		{"no X-Auth-Token, malformed body", "", "{"},
	} {
		t.Run(c.name, func(t *testing.T) {
			st, hdr, body := do(t, http.MethodPost, keystoresURL(base, env), c.token, c.body)
			wantAuthError(t, st, hdr, body)
		})
	}
	// Nothing was created by the refused calls.
	mustCreate(t, base, env, env.Tokens[0], "ks-1")
}

// result is one answer of a concurrent create.
type result struct {
	status int
	code   string
	id     string
}

// createConcurrently sends all bodies at once (released together) and returns the answers.
func createConcurrently(t *testing.T, base string, env *devenv.Env, bodies []map[string]any) []result {
	t.Helper()
	out := make([]result, len(bodies))
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i, b := range bodies {
		payload := mustJSON(t, b)
		wg.Go(func() {
			<-start
			req, err := http.NewRequest(http.MethodPost, keystoresURL(base, env), strings.NewReader(payload))
			if err != nil {
				t.Error(err)
				return
			}
			req.Header.Set("X-Auth-Token", env.AuthToken)
			resp, err := client.Do(req)
			if err != nil {
				t.Error(err)
				return
			}
			defer resp.Body.Close()
			var body struct {
				Keystore struct {
					ID string `json:"keystore_id"`
				} `json:"keystore"`
				Error struct {
					Code string `json:"error_code"`
				} `json:"error"`
			}
			if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
				t.Error(err)
				return
			}
			out[i] = result{resp.StatusCode, body.Error.Code, body.Keystore.ID}
		})
	}
	close(start)
	wg.Wait()
	return out
}

func TestCreateConcurrentSameCluster(t *testing.T) {
	env := newEnv(t)
	base, stop := startDaemon(t, env)
	tok := env.Tokens[0]
	rs := createConcurrently(t, base, env, []map[string]any{goodFields(env, tok, "ks-a"), goodFields(env, tok, "ks-b")})
	var winner string
	var lost int
	for _, r := range rs {
		switch {
		case r.status == 200 && winner == "":
			winner = r.id
		case r.status == 400 && r.code == "KMS.8005":
			lost++
		default:
			t.Errorf("unexpected answer %+v", r)
		}
	}
	if winner == "" || lost != 1 {
		t.Fatalf("answers %+v, want exactly one 200 and one KMS.8005", rs)
	}
	stop()
	if rows := storeRows(t, env); len(rows) != 1 || rows[0].ID != winner {
		t.Errorf("store rows %+v, want only %s", rows, winner)
	}
	if ms := markers(t, env, tok); len(ms) != 1 || ms[winner] == nil {
		t.Errorf("token markers %v, want only %s", ms, winner)
	}
}

func TestCreateConcurrentSameAlias(t *testing.T) {
	env := newEnv(t, "c1", "c2", "c3", "c4", "c5", "c6")
	base, stop := startDaemon(t, env)
	var bodies []map[string]any
	for _, tok := range env.Tokens {
		bodies = append(bodies, goodFields(env, tok, "same-alias"))
	}
	rs := createConcurrently(t, base, env, bodies)
	var winners []int
	for i, r := range rs {
		switch {
		case r.status == 200:
			winners = append(winners, i)
		case r.status == 400 && r.code == "KMS.8002":
		default:
			t.Errorf("cluster %s: unexpected answer %+v", env.Tokens[i].ClusterID, r)
		}
	}
	if len(winners) != 1 {
		t.Fatalf("answers %+v, want exactly one 200 and the rest KMS.8002", rs)
	}
	w := winners[0]
	stop()
	if rows := storeRows(t, env); len(rows) != 1 || rows[0].ID != rs[w].id || rows[0].ClusterID != env.Tokens[w].ClusterID {
		t.Errorf("store rows %+v, want only %s on %s", rows, rs[w].id, env.Tokens[w].ClusterID)
	}
	for i, tok := range env.Tokens {
		ms := markers(t, env, tok)
		if want := i == w; (len(ms) == 1 && ms[rs[w].id] != nil) != want || (!want && len(ms) != 0) {
			t.Errorf("token %s markers %v (winner %s on %s)", tok.Label, ms, rs[w].id, env.Tokens[w].Label)
		}
	}
}

// TestCreateSurvivesRestart: a keystore made by one daemon is still there for the next one
// on the same configuration, and start-up repair leaves it alone.
func TestCreateSurvivesRestart(t *testing.T) {
	env := newEnv(t)
	base, stop := startDaemon(t, env)
	id := mustCreate(t, base, env, env.Tokens[0], "ks-1")
	stop()

	base, stop, logs := startDaemonLogs(t, env)
	st, hdr, body := create(t, base, env, goodFields(env, env.Tokens[0], "ks-2"))
	wantError(t, st, hdr, body, 400, "KMS.8005")
	st, hdr, body = create(t, base, env, goodFields(env, env.Tokens[1], "ks-1"))
	wantError(t, st, hdr, body, 400, "KMS.8002")
	mustCreate(t, base, env, env.Tokens[1], "ks-3")
	stop()

	if l := logs.String(); strings.Contains(l, "repair") || strings.Contains(l, "no marker") {
		t.Errorf("the restart repaired or missed something:\n%s", l)
	}
	if ms := markers(t, env, env.Tokens[0]); len(ms) != 1 || ms[id] == nil {
		t.Errorf("token markers after restart %v, want only %s", ms, id)
	}
}

// TestCreateAuditLog: every create leaves an audit line with who, what and the result, and
// nothing the daemon logs holds the PIN or a credential.
func TestCreateAuditLog(t *testing.T) {
	env := newEnv(t)
	base, stop, logs := startDaemonLogs(t, env)
	st, okHdr, body := create(t, base, env, goodFields(env, env.Tokens[0], "ks-1"))
	wantCreated(t, env, st, okHdr, body)
	st, badHdr, body := create(t, base, env, goodFields(env, env.Tokens[0], "ks-2"))
	wantError(t, st, badHdr, body, 400, "KMS.8005")
	wrongToken := devenv.RandomHex(24)
	st, authHdr, body := do(t, http.MethodPost, keystoresURL(base, env), wrongToken, mustJSON(t, goodFields(env, env.Tokens[1], "ks-3")))
	wantAuthError(t, st, authHdr, body)
	stop() // the log is complete once the daemon has stopped

	audit := map[string]map[string]any{} // by request id
	sc := bufio.NewScanner(strings.NewReader(logs.String()))
	for sc.Scan() {
		var line map[string]any
		if err := json.Unmarshal(sc.Bytes(), &line); err != nil {
			t.Fatalf("log line %q is not JSON: %v", sc.Text(), err)
		}
		if line["msg"] == "audit" {
			audit[fmt.Sprint(line["request_id"])] = line
		}
	}
	for _, c := range []struct {
		name string
		hdr  http.Header
		want map[string]any
	}{
		{"created", okHdr, map[string]any{"route": "POST /v1.0/{project_id}/keystores", "who": "dev", "domain": env.DomainID,
			"project": env.ProjectID, "result": "ok", "error_code": ""}},
		{"refused", badHdr, map[string]any{"route": "POST /v1.0/{project_id}/keystores", "who": "dev", "domain": env.DomainID,
			"project": env.ProjectID, "result": "error", "error_code": "KMS.8005"}},
		{"unauthenticated", authHdr, map[string]any{"route": "POST /v1.0/{project_id}/keystores", "who": "",
			"project": env.ProjectID, "result": "error", "error_code": "APIGW.0301"}},
	} {
		line, ok := audit[c.hdr.Get("X-Request-Id")]
		if !ok {
			t.Errorf("%s: no audit line for request %s", c.name, c.hdr.Get("X-Request-Id"))
			continue
		}
		for k, v := range c.want {
			if line[k] != v {
				t.Errorf("%s: audit %s = %v, want %v (line %v)", c.name, k, line[k], v, line)
			}
		}
		if _, ok := line["latency_ms"].(float64); !ok {
			t.Errorf("%s: audit line has no latency_ms: %v", c.name, line)
		}
	}
	all := logs.String()
	for what, secret := range map[string]string{"the PIN": readPIN(t, env), "the auth token": env.AuthToken, "the rejected token": wrongToken} {
		if strings.Contains(all, secret) {
			t.Errorf("the log contains %s", what)
		}
	}
}

// TestCreateAsTheSDKSendsIt sends the body exactly as the official Go SDK writes it (both
// cluster ids, keystore_type DHSM, json.Encoder's trailing newline).
func TestCreateAsTheSDKSendsIt(t *testing.T) {
	env := newEnv(t)
	base, _ := startDaemon(t, env)
	tok := env.Tokens[0]
	var b strings.Builder
	if err := json.NewEncoder(&b).Encode(struct {
		Alias     string `json:"keystore_alias"`
		HSM       string `json:"hsm_cluster_id"`
		CA        string `json:"hsm_ca_cert"`
		ClusterID string `json:"cluster_id"`
		Type      string `json:"keystore_type"`
	}{"sdkprobe-e21c0f83", tok.ClusterID, env.CA.PEM(), tok.ClusterID, "DHSM"}); err != nil {
		t.Fatal(err)
	}
	st, hdr, body := do(t, http.MethodPost, keystoresURL(base, env), env.AuthToken, b.String())
	wantCreated(t, env, st, hdr, body)
}

// TestCreateAliasPerDomain: aliases are unique per domain, so another tenant may use one
// that is taken elsewhere; and neither tenant may use the other's project.
func TestCreateAliasPerDomain(t *testing.T) {
	env := newEnv(t)
	other := &devenv.Env{AuthToken: devenv.RandomHex(24), DomainID: devenv.RandomHex(16), ProjectID: devenv.RandomHex(16)}
	tokens := fmt.Sprintf("tokens:\n"+
		"  - {name: dev, token_sha256: %s, domain_id: %s, project_ids: [%s]}\n"+
		"  - {name: other, token_sha256: %s, domain_id: %s, project_ids: [%s]}\n",
		api.HashToken(env.AuthToken), env.DomainID, env.ProjectID,
		api.HashToken(other.AuthToken), other.DomainID, other.ProjectID)
	if err := os.WriteFile(filepath.Join(env.Dir, "tokens.yaml"), []byte(tokens), 0o600); err != nil {
		t.Fatal(err)
	}
	base, _ := startDaemon(t, env)
	mustCreate(t, base, env, env.Tokens[0], "ks-1")

	// The other tenant, in the dev tenant's project: refused, nothing stored.
	st, hdr, body := do(t, http.MethodPost, keystoresURL(base, env), other.AuthToken, mustJSON(t, goodFields(env, env.Tokens[1], "ks-1")))
	wantError(t, st, hdr, body, 403, "KMS.0321")

	// In its own project, the same alias is free in its domain.
	st, hdr, body = do(t, http.MethodPost, base+"/v1.0/"+other.ProjectID+"/keystores", other.AuthToken, mustJSON(t, goodFields(env, env.Tokens[1], "ks-1")))
	wantCreated(t, other, st, hdr, body)
}

// TestCreateOnCDMSCluster: the type must match the configured cluster's; absent means DHSM.
func TestCreateOnCDMSCluster(t *testing.T) {
	env := newEnv(t, "cdms-1", "cdms-2", "cdms-3")
	cfg, err := os.ReadFile(env.ConfigPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(env.ConfigPath, []byte(strings.ReplaceAll(string(cfg), "type: DHSM", "type: CDMS")), 0o600); err != nil {
		t.Fatal(err)
	}
	base, _ := startDaemon(t, env)
	for i, typ := range []string{"", "DHSM", "1"} {
		m := goodFields(env, env.Tokens[0], fmt.Sprintf("ks-dhsm-%d", i))
		if typ != "" {
			m["keystore_type"] = typ
		}
		st, hdr, body := create(t, base, env, m)
		wantError(t, st, hdr, body, 400, "KMS.8001", "CDMS cluster", "DHSM")
	}
	for i, typ := range []string{"CDMS", "2"} {
		m := goodFields(env, env.Tokens[i], "ks-cdms-"+typ)
		m["keystore_type"] = typ
		st, hdr, body := create(t, base, env, m)
		wantCreated(t, env, st, hdr, body)
	}
	// The refused aliases were not kept.
	m := goodFields(env, env.Tokens[2], "ks-dhsm-0")
	m["keystore_type"] = "CDMS"
	st, hdr, body := create(t, base, env, m)
	wantCreated(t, env, st, hdr, body)
}

// TestCreateIdentityCertificateExpired: the caller's CA is valid and did issue the cluster's
// identity certificate, but that certificate has expired. The refusal must say so: telling
// the caller their CA "did not issue" it sends them to fix the wrong certificate.
func TestCreateIdentityCertificateExpired(t *testing.T) {
	env := newEnv(t)
	tok := env.Tokens[0]
	now := time.Now()
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(now.UnixNano()), Subject: pkix.Name{CommonName: tok.ClusterID},
		NotBefore: now.Add(-2 * time.Hour), NotAfter: now.Add(-time.Hour), KeyUsage: x509.KeyUsageDigitalSignature,
	}, env.CA.Cert, tok.PublicKey, env.CA.Key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	writeCertFile(t, env, tok, cert)
	base, _ := startDaemon(t, env)
	st, hdr, body := create(t, base, env, goodFields(env, tok, "ks-1"))
	wantError(t, st, hdr, body, 400, "KMS.8006", "identity certificate", "expired")
	if strings.Contains(string(body), "did not issue") {
		t.Errorf("the refusal blames the caller's CA for an expired identity certificate: %s", body)
	}
	// Nothing kept: the alias binds the other cluster.
	mustCreate(t, base, env, env.Tokens[1], "ks-1")
}

// TestMethodNotAllowedSaysAllow: a 405 lists the methods the resource does serve
// (RFC 9110 §15.5.6: the server MUST send Allow with a 405).
func TestMethodNotAllowedSaysAllow(t *testing.T) {
	env := newEnv(t)
	base, _ := startDaemon(t, env)
	for _, method := range []string{http.MethodPut, http.MethodPatch} {
		st, hdr, body := do(t, method, keystoresURL(base, env), env.AuthToken, "{}")
		wantError(t, st, hdr, body, 405, "KMS.0215")
		var allow []string
		for _, m := range strings.Split(hdr.Get("Allow"), ",") {
			allow = append(allow, strings.TrimSpace(m))
		}
		if !slices.Contains(allow, http.MethodPost) {
			t.Errorf("%s: Allow %q, want a list that includes POST", method, hdr.Get("Allow"))
		}
	}
}
