package api

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

const (
	testProject  = "0123456789abcdef0123456789abcdef"
	testDomain   = "b168fe00ff56492495a7d22974df2d0b"
	oldAK, oldSK = "AKROTATEOLD000000001", "sk-old-Zq8mXw3vR1tY6uP0aB4cD7eF9gH2jK5l"
	newAK, newSK = "AKROTATENEW000000002", "sk-new-Lk5jH2gF9eD7cB4aP0uY6tR1vW3xM8qZ"
	offAK, offSK = "AKDISABLED0000000003", "sk-off-Qw1eR2tY3uI4oP5aS6dF7gH8jK9lZ0xC"
	vecAK, vecSK = "VECTORACCESSKEY0000001", "vector-secret-key-0001"
)

var testCreds = `credentials:
  - name: frontend-a
    domain_id: ` + testDomain + `
    project_ids: [` + testProject + `]
    enabled: true
    keys:
      - access_key: ` + oldAK + `
        secret_key: ` + oldSK + `
      - access_key: ` + newAK + `
        secret_key: ` + newSK + `
  - name: sdk-vectors
    domain_id: 0f1e2d3c4b5a69788796a5b4c3d2e1f0
    project_ids: [` + testProject + `]
    enabled: true
    keys:
      - access_key: ` + vecAK + `
        secret_key: ` + vecSK + `
      - access_key: AccessKey
        secret_key: SecretKey
  - name: switched-off
    domain_id: ` + testDomain + `
    project_ids: [` + testProject + `]
    enabled: false
    keys:
      - access_key: ` + offAK + `
        secret_key: ` + offSK + `
`

// fakeClock is a settable clock.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Set(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = t
}

func (c *fakeClock) Advance(d time.Duration) { c.Set(c.Now().Add(d)) }

// failures records the reasons passed to OnFailure.
type failures struct {
	mu      sync.Mutex
	reasons []string
}

func (f *failures) add(r string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.reasons = append(f.reasons, r)
}

func (f *failures) last() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.reasons) == 0 {
		return ""
	}
	return f.reasons[len(f.reasons)-1]
}

func writeCreds(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, 0o600); err != nil { // whatever the umask
		t.Fatal(err)
	}
}

// newTestAKSK loads content from a fresh 0600 file, with a fake clock at now.
func newTestAKSK(t *testing.T, content string, now time.Time) (*AKSK, *fakeClock, *failures, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "credentials.yaml")
	writeCreds(t, path, content)
	a, err := LoadAKSK(path)
	if err != nil {
		t.Fatalf("LoadAKSK: %v", err)
	}
	clock := &fakeClock{t: now}
	f := &failures{}
	a.Now, a.OnFailure = clock.Now, f.add
	return a, clock, f, path
}

var testNow = time.Date(2026, 5, 6, 7, 8, 9, 0, time.UTC)

// testRequest is a KMS-like call: project in the path and in X-Project-Id, a JSON body with
// the SDK's trailing newline, a query with two keys.
func testRequest(body []byte) *http.Request {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	r := httptest.NewRequest(http.MethodPost, "/v1.0/"+testProject+"/keystores?offset=0&limit=10", rd)
	r.Header.Set("User-Agent", "huaweicloud-usdk-go/3.0; test")
	r.Header.Set("Content-Type", "application/json;charset=UTF-8")
	r.Header.Set("X-Project-Id", testProject)
	r.SetPathValue("project_id", testProject)
	return r
}

var testBody = []byte(`{"keystore_alias":"ks-01","hsm_cluster_id":"c1","hsm_ca_cert":"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"}` + "\n")

// signedTestRequest returns a fresh copy of testRequest signed at now with ak/sk.
func signedTestRequest(body []byte, ak, sk string, now time.Time) *http.Request {
	r := testRequest(body)
	SignRequest(r, body, ak, sk, now)
	return r
}

func mustAuthError(t *testing.T, err error, what string) {
	t.Helper()
	if err == nil {
		t.Fatalf("%s: accepted, want refused", what)
	}
	if _, ok := errors.AsType[*authError](err); !ok {
		t.Fatalf("%s: error %v (%T), want *authError", what, err, err)
	}
}

// readWireRequest parses a raw captured request as the server would receive it.
func readWireRequest(t *testing.T, name string) *http.Request {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("..", "..", "testdata", "auth", name))
	if err != nil {
		t.Fatal(err)
	}
	r, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(data)))
	if err != nil {
		t.Fatal(err)
	}
	r.SetPathValue("project_id", testProject)
	return r
}

// The SDK's own published vectors (reference/huawei-kms-api.md §2.2) and the two captured
// from the Go SDK (reference/sdk-client.md §5, sdk-wire.txt section A): the canonical
// request is as documented, SignRequest produces the same Authorization, and Authenticate
// accepts the request.
func TestAKSK_Vectors(t *testing.T) {
	sdkDate := time.Date(2006, 1, 2, 15, 4, 5, 0, time.UTC)
	wireDate := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	vectors := []struct {
		name      string
		now       time.Time
		build     func() *http.Request // unsigned, as the client has it
		body      []byte
		ak, sk    string
		canonical string
		authz     string
		wire      string // captured request, if any
	}{
		{
			name: "published GET", now: sdkDate, ak: "AccessKey", sk: "SecretKey",
			build: func() *http.Request {
				r := httptest.NewRequest(http.MethodGet, "http://example.huaweicloud.com/path?limit=1", nil)
				r.Header["TEST_UNDERSCORE"] = []string{"TEST_VALUE"}
				return r
			},
			canonical: "GET\n/path/\nlimit=1\nx-sdk-date:20060102T150405Z\n\nx-sdk-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
			authz:     "SDK-HMAC-SHA256 Access=AccessKey, SignedHeaders=x-sdk-date, Signature=5a2ce64c865e0e6046321c6f3d5a77ba8413eeaf355c3166c03d58d02ac79624",
		},
		{
			name: "published POST", now: sdkDate, ak: "AccessKey", sk: "SecretKey",
			body: []byte(`{"Name":"test","Id":1}` + "\n"),
			build: func() *http.Request {
				r := httptest.NewRequest(http.MethodPost, "http://example.huaweicloud.com/path?key=value",
					strings.NewReader(`{"Name":"test","Id":1}`+"\n"))
				r.Header["TEST_UNDERSCORE"] = []string{"TEST_VALUE"}
				r.Header.Set("Content-Type", "application/json")
				return r
			},
			canonical: "POST\n/path/\nkey=value\nx-sdk-date:20060102T150405Z\n\nx-sdk-date\na29d7b4c5efd1a22011d69fd7b7aee76fe51e4083c609244228de258afd61289",
			authz:     "SDK-HMAC-SHA256 Access=AccessKey, SignedHeaders=x-sdk-date, Signature=cecc2af119b18ab70b4d094c0750f3b42c02f254903179a0fc2cc72fc9db4f59",
		},
		{
			name: "Go SDK create-keystore", now: wireDate, ak: vecAK, sk: vecSK, wire: "sdk-vector-create.http",
			body: []byte(`{"keystore_alias":"vector-keystore-01","hsm_cluster_id":"hsm-cluster-vector","hsm_ca_cert":"-----BEGIN CERTIFICATE-----\nMIIBVECTOR\n-----END CERTIFICATE-----\n","cluster_id":"hsm-cluster-vector","keystore_type":"DHSM"}` + "\n"),
			build: func() *http.Request {
				r := httptest.NewRequest(http.MethodPost, "http://127.0.0.1:34905/v1.0/"+testProject+"/keystores", nil)
				r.Header.Set("User-Agent", "huaweicloud-usdk-go/3.0; sdkprobe-vector")
				r.Header.Set("Content-Type", "application/json;charset=UTF-8")
				r.Header.Set("X-Project-Id", testProject)
				return r
			},
			canonical: "POST\n/v1.0/" + testProject + "/keystores/\n\nuser-agent:huaweicloud-usdk-go/3.0; sdkprobe-vector\nx-project-id:" + testProject + "\nx-sdk-date:20250102T030405Z\n\nuser-agent;x-project-id;x-sdk-date\n5b75e9e9f4029cc392d8149a85ead4f868e60b2b1329bb70240e140713501379",
			authz:     "SDK-HMAC-SHA256 Access=VECTORACCESSKEY0000001, SignedHeaders=user-agent;x-project-id;x-sdk-date, Signature=c6250aa1a073e7ce0c636fc9b0b3b364028dd3d2bca6f01ed9b26b44a911acfa",
		},
		{
			name: "Go SDK list-keystores", now: wireDate, ak: vecAK, sk: vecSK, wire: "sdk-vector-list.http",
			build: func() *http.Request {
				r := httptest.NewRequest(http.MethodGet, "http://127.0.0.1:34905/v1.0/"+testProject+"/keystores?limit=10&offset=0", nil)
				r.Header.Set("User-Agent", "huaweicloud-usdk-go/3.0; sdkprobe-vector")
				r.Header.Set("Content-Type", "application/json")
				r.Header.Set("X-Project-Id", testProject)
				return r
			},
			canonical: "GET\n/v1.0/" + testProject + "/keystores/\nlimit=10&offset=0\nuser-agent:huaweicloud-usdk-go/3.0; sdkprobe-vector\nx-project-id:" + testProject + "\nx-sdk-date:20250102T030405Z\n\nuser-agent;x-project-id;x-sdk-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
			authz:     "SDK-HMAC-SHA256 Access=VECTORACCESSKEY0000001, SignedHeaders=user-agent;x-project-id;x-sdk-date, Signature=9355ef611d1751f355a44cec10c83f7ca3ac5b77836e37c39b93ce26d3a488f2",
		},
	}
	for _, v := range vectors {
		t.Run(v.name, func(t *testing.T) {
			// The signer produces exactly the published header.
			r := v.build()
			SignRequest(r, v.body, v.ak, v.sk, v.now)
			if got := r.Header.Get("Authorization"); got != v.authz {
				t.Errorf("SignRequest:\n got  %s\n want %s", got, v.authz)
			}
			auth, bad := parseAKSKAuthorization(v.authz)
			if bad != "" {
				t.Fatalf("parse: %s", bad)
			}
			hash := emptySHA256
			if v.body != nil {
				hash = v.canonical[strings.LastIndexByte(v.canonical, '\n')+1:]
			}
			if got := canonicalRequest(r, r.URL.Query(), auth.signedHeaders, hash); got != v.canonical {
				t.Errorf("canonical request:\n got  %q\n want %q", got, v.canonical)
			}

			// The verifier accepts the request as the client built it...
			a, _, _, _ := newTestAKSK(t, testCreds, v.now)
			if v.body != nil {
				r.Body = io.NopCloser(bytes.NewReader(v.body))
			}
			r.SetPathValue("project_id", testProject)
			id, err := a.Authenticate(r)
			if err != nil {
				t.Fatalf("Authenticate: %v", err)
			}
			if id.Name != "sdk-vectors" {
				t.Errorf("identity %q, want sdk-vectors", id.Name)
			}
			// ...and as the SDK put it on the wire, byte for byte.
			if v.wire == "" {
				return
			}
			w := readWireRequest(t, v.wire)
			if got := w.Header.Get("Authorization"); got != v.authz {
				t.Fatalf("fixture Authorization %q, want %q", got, v.authz)
			}
			a2, _, _, _ := newTestAKSK(t, testCreds, v.now)
			if _, err := a2.Authenticate(w); err != nil {
				t.Fatalf("Authenticate wire request: %v", err)
			}
			got, _ := io.ReadAll(w.Body)
			if !bytes.Equal(got, v.body) {
				t.Errorf("body after Authenticate = %q, want the bytes received", got)
			}
		})
	}
}

// Every single-byte change to what is signed makes the signature fail.
func TestAKSK_SingleByteChangesFail(t *testing.T) {
	path := filepath.Join(t.TempDir(), "credentials.yaml")
	writeCreds(t, path, testCreds)
	check := func(t *testing.T, what string, mutate func(r *http.Request)) {
		t.Helper()
		a, err := LoadAKSK(path) // fresh: no replay entry, no lockout
		if err != nil {
			t.Fatal(err)
		}
		a.Now = func() time.Time { return testNow }
		r := signedTestRequest(testBody, oldAK, oldSK, testNow)
		mutate(r)
		_, err = a.Authenticate(r)
		mustAuthError(t, err, what)
	}
	flip := func(s string, i int) string {
		b := []byte(s)
		b[i] ^= 0x01
		return string(b)
	}

	// The unchanged request passes, so the failures below are the changes' doing.
	a, _, _, _ := newTestAKSK(t, testCreds, testNow)
	if _, err := a.Authenticate(signedTestRequest(testBody, oldAK, oldSK, testNow)); err != nil {
		t.Fatalf("unchanged request: %v", err)
	}

	for _, m := range []string{"GET", "PUT", "DELETE", "PATCH", "POSt", "POS", "POSTT"} {
		check(t, "method "+m, func(r *http.Request) { r.Method = m })
	}
	p := "/v1.0/" + testProject + "/keystores"
	for i := range len(p) {
		check(t, "path byte "+string(rune('0'+i%10)), func(r *http.Request) { r.URL.Path = flip(p, i) })
	}
	check(t, "path with trailing slash", func(r *http.Request) { r.URL.Path = p + "/x" })
	q := "offset=0&limit=10"
	for i := range len(q) {
		check(t, "query byte", func(r *http.Request) { r.URL.RawQuery = flip(q, i) })
	}
	check(t, "query added", func(r *http.Request) { r.URL.RawQuery = q + "&x=1" })
	check(t, "query dropped", func(r *http.Request) { r.URL.RawQuery = "" })
	for _, h := range []string{"User-Agent", "X-Project-Id", "X-Sdk-Date"} {
		v := signedTestRequest(testBody, oldAK, oldSK, testNow).Header.Get(h)
		for i := range len(v) {
			check(t, h+" byte", func(r *http.Request) { r.Header.Set(h, flip(v, i)) })
		}
		check(t, h+" removed", func(r *http.Request) { r.Header.Del(h) })
		check(t, h+" repeated", func(r *http.Request) { r.Header.Add(h, v) })
	}
	for i := range len(testBody) {
		check(t, "body byte", func(r *http.Request) {
			r.Body = io.NopCloser(strings.NewReader(flip(string(testBody), i)))
		})
	}
	check(t, "body truncated", func(r *http.Request) {
		r.Body = io.NopCloser(bytes.NewReader(testBody[:len(testBody)-1]))
	})
	check(t, "body extended", func(r *http.Request) {
		r.Body = io.NopCloser(bytes.NewReader(append(slices.Clone(testBody), ' ')))
	})
	authz := signedTestRequest(testBody, oldAK, oldSK, testNow).Header.Get("Authorization")
	sig := authz[strings.LastIndex(authz, "=")+1:]
	for i := range len(sig) {
		if c := sig[i] ^ 0x01; (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') {
			check(t, "signature digit", func(r *http.Request) {
				r.Header.Set("Authorization", strings.TrimSuffix(authz, sig)+flip(sig, i))
			})
		}
	}
}

// Headers outside SignedHeaders may change or appear freely.
func TestAKSK_UnsignedHeadersMayChange(t *testing.T) {
	for what, mutate := range map[string]func(r *http.Request){
		"content-type changed":  func(r *http.Request) { r.Header.Set("Content-Type", "text/plain") },
		"accept-encoding added": func(r *http.Request) { r.Header.Set("Accept-Encoding", "gzip") },
		"unsigned x-auth-token": func(r *http.Request) { r.Header.Set("X-Auth-Token", "IAM-TOKEN-EXAMPLE") },
		"new header":            func(r *http.Request) { r.Header.Set("X-Forwarded-For", "10.0.0.1") },
		"host changed":          func(r *http.Request) { r.Host = "kms.example:8443" },
	} {
		a, _, _, _ := newTestAKSK(t, testCreds, testNow)
		r := signedTestRequest(testBody, oldAK, oldSK, testNow)
		mutate(r)
		if _, err := a.Authenticate(r); err != nil {
			t.Errorf("%s: %v", what, err)
		}
	}
}

// A signed host is the host the request was sent to.
func TestAKSK_SignedHost(t *testing.T) {
	a, _, _, _ := newTestAKSK(t, testCreds, testNow)
	r := testRequest(testBody)
	r.Host = "kms.example:8443"
	r.Header.Set("Host", r.Host) // in the header map, so the SDK-style signer signs it
	SignRequest(r, testBody, oldAK, oldSK, testNow)
	r.Header.Del("Host") // a server sees it in r.Host only
	if !strings.Contains(r.Header.Get("Authorization"), "SignedHeaders=host;") {
		t.Fatalf("host not signed: %s", r.Header.Get("Authorization"))
	}
	if _, err := a.Authenticate(r); err != nil {
		t.Fatalf("signed host: %v", err)
	}
	r2 := testRequest(testBody)
	r2.Host = "kms.example:8443"
	r2.Header.Set("Host", r2.Host)
	SignRequest(r2, testBody, oldAK, oldSK, testNow.Add(time.Second))
	r2.Header.Del("Host")
	r2.Host = "evil.example:8443"
	_, err := a.Authenticate(r2)
	mustAuthError(t, err, "other host")
}

func TestAKSK_ClockSkewBoundary(t *testing.T) {
	for _, c := range []struct {
		skew time.Duration
		ok   bool
	}{
		{0, true},
		{15 * time.Minute, true},
		{-15 * time.Minute, true},
		{15*time.Minute + time.Second, false},
		{-15*time.Minute - time.Second, false},
		{24 * time.Hour, false},
	} {
		a, _, f, _ := newTestAKSK(t, testCreds, testNow.Add(c.skew))
		_, err := a.Authenticate(signedTestRequest(testBody, oldAK, oldSK, testNow))
		if c.ok && err != nil {
			t.Errorf("server clock %v from X-Sdk-Date: %v", c.skew, err)
		}
		if !c.ok {
			mustAuthError(t, err, "skew "+c.skew.String())
			if f.last() != reasonExpired {
				t.Errorf("skew %v: reason %q, want expired", c.skew, f.last())
			}
		}
	}
}

// guarded marks r as a call that changes state, as apiCall does for mutating routes.
func guarded(r *http.Request) *http.Request {
	return r.WithContext(context.WithValue(r.Context(), replayGuardKey{}, &replayHold{}))
}

func TestAKSK_ReplayAllowedAfterFailedCall(t *testing.T) {
	a, _, _, _ := newTestAKSK(t, testCreds, testNow)
	r := guarded(signedTestRequest(testBody, oldAK, oldSK, testNow))
	if _, err := a.Authenticate(r); err != nil {
		t.Fatal(err)
	}
	replayGuarded(r.Context()).release() // the call failed
	if _, err := a.Authenticate(guarded(signedTestRequest(testBody, oldAK, oldSK, testNow))); err != nil {
		t.Errorf("retry of a failed call: %v", err)
	}
}

func TestAKSK_ReplayRefused(t *testing.T) {
	a, clock, f, _ := newTestAKSK(t, testCreds, testNow)
	if _, err := a.Authenticate(guarded(signedTestRequest(testBody, oldAK, oldSK, testNow))); err != nil {
		t.Fatal(err)
	}
	clock.Advance(10 * time.Minute)
	_, err := a.Authenticate(guarded(signedTestRequest(testBody, oldAK, oldSK, testNow)))
	mustAuthError(t, err, "replay")
	if f.last() != reasonReplay {
		t.Errorf("reason %q, want replay", f.last())
	}
	// A new signature (a new second) is a new request.
	if _, err := a.Authenticate(guarded(signedTestRequest(testBody, oldAK, oldSK, testNow.Add(time.Second)))); err != nil {
		t.Errorf("re-signed request: %v", err)
	}
}

func TestAKSK_ReplayAllowedOnReads(t *testing.T) {
	a, _, _, _ := newTestAKSK(t, testCreds, testNow)
	for i := range 2 {
		if _, err := a.Authenticate(signedTestRequest(testBody, oldAK, oldSK, testNow)); err != nil {
			t.Fatalf("identical call %d on a route that changes nothing: %v", i+1, err)
		}
	}
}

func TestAKSK_ReplaySetBoundedAndExpires(t *testing.T) {
	var s replaySet
	sig := func(i int) (b [32]byte) {
		b[0], b[1], b[2] = byte(i), byte(i>>8), byte(i>>16)
		return b
	}
	if !s.add(sig(1), 100, 0) || s.add(sig(1), 100, 50) || s.add(sig(1), 100, 100) {
		t.Fatal("a live entry must be refused until its expiry")
	}
	if !s.add(sig(1), 300, 101) {
		t.Fatal("an expired entry must not block a new use")
	}
	for i := range akskReplayMax + 10 {
		s.add(sig(1000+i), int64(1000+i), 200)
	}
	if n := len(s.expiry); n > akskReplayMax {
		t.Fatalf("replay set holds %d, bound is %d", n, akskReplayMax)
	}
	// Once everything has expired, the next add empties the set of the old entries.
	s.add(sig(7), 10_000_000, 9_000_000)
	if n := len(s.expiry); n != 1 || len(s.byTime) != 1 {
		t.Fatalf("after expiry the set holds %d (%d in the heap), want 1", n, len(s.byTime))
	}
}

func TestAKSK_LockoutAfterFiveFailures(t *testing.T) {
	a, clock, f, _ := newTestAKSK(t, testCreds, testNow)
	for i := range 5 {
		clock.Advance(time.Second)
		_, err := a.Authenticate(signedTestRequest(testBody, oldAK, "wrong-secret", clock.Now()))
		mustAuthError(t, err, "bad signature")
		if f.last() != reasonBadSignature {
			t.Fatalf("failure %d: reason %q", i+1, f.last())
		}
	}
	clock.Advance(time.Second)
	_, err := a.Authenticate(signedTestRequest(testBody, oldAK, oldSK, clock.Now()))
	mustAuthError(t, err, "locked key with a good signature")
	if f.last() != reasonLocked {
		t.Fatalf("reason %q, want locked", f.last())
	}
	// The other key of the same identity is not locked.
	if _, err := a.Authenticate(signedTestRequest(testBody, newAK, newSK, clock.Now())); err != nil {
		t.Fatalf("other key: %v", err)
	}
	clock.Advance(4*time.Minute + 50*time.Second)
	_, err = a.Authenticate(signedTestRequest(testBody, oldAK, oldSK, clock.Now()))
	mustAuthError(t, err, "still locked")
	clock.Advance(10 * time.Second)
	if _, err := a.Authenticate(signedTestRequest(testBody, oldAK, oldSK, clock.Now())); err != nil {
		t.Fatalf("after 5 minutes: %v", err)
	}
}

func TestAKSK_SuccessResetsFailureCount(t *testing.T) {
	a, clock, _, _ := newTestAKSK(t, testCreds, testNow)
	for range 3 {
		for range 4 {
			clock.Advance(time.Second)
			_, err := a.Authenticate(signedTestRequest(testBody, oldAK, "wrong-secret", clock.Now()))
			mustAuthError(t, err, "bad signature")
		}
		clock.Advance(time.Second)
		if _, err := a.Authenticate(signedTestRequest(testBody, oldAK, oldSK, clock.Now())); err != nil {
			t.Fatalf("good signature after 4 failures: %v", err)
		}
	}
}

func TestAKSK_RotationBothKeysWork(t *testing.T) {
	a, _, _, _ := newTestAKSK(t, testCreds, testNow)
	for _, k := range [][2]string{{oldAK, oldSK}, {newAK, newSK}} {
		id, err := a.Authenticate(signedTestRequest(testBody, k[0], k[1], testNow))
		if err != nil {
			t.Fatalf("%s: %v", k[0], err)
		}
		if id.Name != "frontend-a" || id.DomainID != testDomain || !slices.Equal(id.ProjectIDs, []string{testProject}) {
			t.Errorf("%s: identity %+v", k[0], id)
		}
	}
	// One key's secret does not sign for the other.
	_, err := a.Authenticate(signedTestRequest(testBody, oldAK, newSK, testNow))
	mustAuthError(t, err, "crossed keys")
}

func TestAKSK_ReloadPicksUpNewKeyDropsOld(t *testing.T) {
	a, clock, f, path := newTestAKSK(t, testCreds, testNow)
	if _, err := a.Authenticate(signedTestRequest(testBody, oldAK, oldSK, clock.Now())); err != nil {
		t.Fatal(err)
	}
	const nextAK, nextSK = "AKROTATENEXT00000003", "sk-next-Pp9oO8iI7uU6yY5tT4rR3eE2wW1qQ0aA"
	rotated := strings.Replace(testCreds, "      - access_key: "+oldAK+"\n        secret_key: "+oldSK+"\n",
		"      - access_key: "+nextAK+"\n        secret_key: "+nextSK+"\n", 1)
	if rotated == testCreds {
		t.Fatal("test bug: the replacement did not apply")
	}
	writeCreds(t, path, rotated)
	if err := a.Reload(); err != nil {
		t.Fatalf("Reload: %v", err)
	}
	clock.Advance(time.Second)
	if _, err := a.Authenticate(signedTestRequest(testBody, nextAK, nextSK, clock.Now())); err != nil {
		t.Errorf("new key after reload: %v", err)
	}
	if _, err := a.Authenticate(signedTestRequest(testBody, newAK, newSK, clock.Now())); err != nil {
		t.Errorf("kept key after reload: %v", err)
	}
	_, err := a.Authenticate(signedTestRequest(testBody, oldAK, oldSK, clock.Now()))
	mustAuthError(t, err, "removed key")
	if f.last() != reasonUnknownKey {
		t.Errorf("reason %q, want unknown_key", f.last())
	}

	// A broken file, or one others may read, leaves the loaded set in force.
	writeCreds(t, path, "credentials: [")
	if err := a.Reload(); err == nil {
		t.Error("Reload of a broken file succeeded")
	}
	writeCreds(t, path, testCreds)
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := a.Reload(); err == nil {
		t.Error("Reload of a world-readable file succeeded")
	}
	clock.Advance(time.Second)
	if _, err := a.Authenticate(signedTestRequest(testBody, nextAK, nextSK, clock.Now())); err != nil {
		t.Errorf("after failed reloads the previous set should hold: %v", err)
	}
}

func TestAKSK_FileModeRefused(t *testing.T) {
	for _, mode := range []os.FileMode{0o640, 0o604, 0o660, 0o644, 0o610} {
		path := filepath.Join(t.TempDir(), "credentials.yaml")
		writeCreds(t, path, testCreds)
		if err := os.Chmod(path, mode); err != nil {
			t.Fatal(err)
		}
		// A group that is not ours: group read is allowed only for our own groups.
		if err := os.Chown(path, -1, 65533); err != nil {
			t.Skipf("chown to a foreign group: %v", err)
		}
		_, err := LoadAKSK(path)
		if err == nil {
			t.Errorf("mode %04o: loaded", mode)
			continue
		}
		if msg := err.Error(); !strings.Contains(msg, path) || !strings.Contains(msg, fmt.Sprintf("mode %04o", mode)) {
			t.Errorf("mode %04o: message %q should name the file and the mode", mode, msg)
		}
	}
	for _, mode := range []os.FileMode{0o600, 0o400} {
		path := filepath.Join(t.TempDir(), "credentials.yaml")
		writeCreds(t, path, testCreds)
		if err := os.Chmod(path, mode); err != nil {
			t.Fatal(err)
		}
		if _, err := LoadAKSK(path); err != nil {
			t.Errorf("mode %04o: %v", mode, err)
		}
	}
}

func TestAKSK_LoadRefusesBadFiles(t *testing.T) {
	cases := map[string]string{
		"duplicate access key across identities": strings.Replace(testCreds, "access_key: "+offAK, "access_key: "+oldAK, 1),
		"duplicate access key in one identity":   strings.Replace(testCreds, "access_key: "+newAK, "access_key: "+oldAK, 1),
		"three keys": strings.Replace(testCreds, "      - access_key: "+newAK,
			"      - access_key: AKTHIRD\n        secret_key: x\n      - access_key: "+newAK, 1),
		"unknown field":    strings.Replace(testCreds, "enabled: true", "enabled: true\n    color: blue", 1),
		"no enabled":       strings.Replace(testCreds, "    enabled: false\n", "", 1),
		"bad domain":       strings.Replace(testCreds, "domain_id: "+testDomain, "domain_id: nope", 1),
		"no projects":      strings.Replace(testCreds, "project_ids: ["+testProject+"]", "project_ids: []", 1),
		"empty secret":     strings.Replace(testCreds, "secret_key: "+offSK, `secret_key: ""`, 1),
		"duplicate name":   strings.Replace(testCreds, "name: switched-off", "name: frontend-a", 1),
		"bad access key":   strings.Replace(testCreds, "access_key: "+offAK, "access_key: 'A K'", 1),
		"secret misplaced": strings.Replace(testCreds, "enabled: false", "enabled: "+offSK, 1),
	}
	for what, content := range cases {
		path := filepath.Join(t.TempDir(), "credentials.yaml")
		writeCreds(t, path, content)
		_, err := LoadAKSK(path)
		if err == nil {
			t.Errorf("%s: loaded", what)
			continue
		}
		t.Logf("%s: %v", what, err)
		for _, sk := range []string{oldSK, newSK, offSK, vecSK} {
			if strings.Contains(err.Error(), sk) {
				t.Errorf("%s: error %q contains a secret key", what, err)
			}
		}
	}
}

// No refusal says anything about the secret key.
func TestAKSK_ErrorsNeverContainSecret(t *testing.T) {
	a, clock, _, _ := newTestAKSK(t, testCreds, testNow)
	var errs []error
	add := func(r *http.Request) {
		clock.Advance(time.Second)
		if _, err := a.Authenticate(r); err != nil {
			errs = append(errs, err)
		}
	}
	add(signedTestRequest(testBody, oldAK, newSK, clock.Now()))
	add(signedTestRequest(testBody, "AKUNKNOWN", oldSK, clock.Now()))
	add(signedTestRequest(testBody, offAK, offSK, clock.Now()))
	add(signedTestRequest(testBody, oldAK, oldSK, testNow.Add(-time.Hour)))
	for range 6 {
		add(signedTestRequest(testBody, newAK, oldSK, clock.Now()))
	}
	if len(errs) < 9 {
		t.Fatalf("only %d refusals", len(errs))
	}
	for _, err := range errs {
		for _, sk := range []string{oldSK, newSK, offSK} {
			if strings.Contains(err.Error(), sk) {
				t.Errorf("error %q contains a secret key", err)
			}
		}
	}
}

func TestAKSK_DisabledRefused(t *testing.T) {
	a, _, f, _ := newTestAKSK(t, testCreds, testNow)
	_, err := a.Authenticate(signedTestRequest(testBody, offAK, offSK, testNow))
	mustAuthError(t, err, "disabled")
	if f.last() != reasonDisabled {
		t.Errorf("reason %q, want disabled", f.last())
	}
}

func TestAKSK_SpecialHeaders(t *testing.T) {
	sign := func(mutate func(r *http.Request)) *http.Request {
		r := testRequest(testBody)
		mutate(r)
		SignRequest(r, testBody, oldAK, oldSK, testNow)
		return r
	}
	cases := []struct {
		what string
		r    func() *http.Request
		ok   bool
	}{
		{"signed security token", func() *http.Request {
			return sign(func(r *http.Request) { r.Header.Set("X-Security-Token", "STS-TOKEN-EXAMPLE") })
		}, true},
		{"unsigned security token", func() *http.Request {
			r := sign(func(*http.Request) {})
			r.Header.Set("X-Security-Token", "STS-TOKEN-EXAMPLE")
			return r
		}, false},
		{"unsigned project id", func() *http.Request {
			r := sign(func(r *http.Request) { r.Header.Del("X-Project-Id") })
			r.Header.Set("X-Project-Id", testProject)
			return r
		}, false},
		{"signed project id of another project", func() *http.Request {
			return sign(func(r *http.Request) { r.Header.Set("X-Project-Id", strings.Repeat("f", 32)) })
		}, false},
		{"no project id header", func() *http.Request {
			return sign(func(r *http.Request) { r.Header.Del("X-Project-Id") })
		}, true},
		{"unsigned payload", func() *http.Request {
			return sign(func(r *http.Request) { r.Header.Set("Content-Type", "application/octet-stream") })
		}, false},
		{"signed content hash of the body", func() *http.Request {
			return sign(func(r *http.Request) { r.Header.Set("X-Sdk-Content-Sha256", HashToken(string(testBody))) })
		}, true},
		{"signed content hash of another body", func() *http.Request {
			return sign(func(r *http.Request) { r.Header.Set("X-Sdk-Content-Sha256", HashToken("{}\n")) })
		}, false},
	}
	for _, c := range cases {
		a, _, _, _ := newTestAKSK(t, testCreds, testNow)
		_, err := a.Authenticate(c.r())
		if c.ok && err != nil {
			t.Errorf("%s: %v", c.what, err)
		}
		if !c.ok {
			mustAuthError(t, err, c.what)
		}
	}
}

func TestAKSK_MalformedAuthorization(t *testing.T) {
	good := signedTestRequest(testBody, oldAK, oldSK, testNow).Header.Get("Authorization")
	sig := good[strings.LastIndex(good, "=")+1:]
	base := "Access=" + oldAK + ", SignedHeaders=user-agent;x-project-id;x-sdk-date, Signature=" + sig
	for _, v := range []string{
		"SDK-HMAC-SHA256X " + base,
		"sdk-hmac-sha256 " + base,
		"SDK-HMAC-SHA256  " + base,
		"SDK-HMAC-SHA256," + base,
		"V11-HMAC-SHA256 " + base,
		"SDK-HMAC-SHA256 Access=" + oldAK + ", SignedHeaders=user-agent;x-project-id;x-sdk-date",
		"SDK-HMAC-SHA256 " + base + ", Signature=" + sig,
		"SDK-HMAC-SHA256 " + base + ", Extra=1",
		"SDK-HMAC-SHA256 Access=" + oldAK + ", Access=" + oldAK + ", Signature=" + sig,
		"SDK-HMAC-SHA256 access=" + oldAK + ", SignedHeaders=user-agent;x-project-id;x-sdk-date, Signature=" + sig,
		"SDK-HMAC-SHA256 Access=" + oldAK + ", SignedHeaders=user-agent;x-project-id;x-sdk-date, Signature=" + strings.ToUpper(sig),
		"SDK-HMAC-SHA256 Access=" + oldAK + ", SignedHeaders=user-agent;x-project-id;x-sdk-date, Signature=" + sig[:63],
		"SDK-HMAC-SHA256 Access=" + oldAK + ", SignedHeaders=x-project-id;user-agent;x-sdk-date, Signature=" + sig,
		"SDK-HMAC-SHA256 Access=" + oldAK + ", SignedHeaders=User-Agent;x-project-id;x-sdk-date, Signature=" + sig,
		"SDK-HMAC-SHA256 Access=" + oldAK + ", SignedHeaders=user-agent;x-project-id, Signature=" + sig,
		"SDK-HMAC-SHA256 Access=" + oldAK + ", SignedHeaders=user-agent;user-agent;x-project-id;x-sdk-date, Signature=" + sig,
		"SDK-HMAC-SHA256 Access=" + oldAK + ", SignedHeaders=user-agent;;x-project-id;x-sdk-date, Signature=" + sig,
		"SDK-HMAC-SHA256 Access=" + oldAK + ", SignedHeaders=user-agent;x-missing;x-project-id;x-sdk-date, Signature=" + sig,
		"SDK-HMAC-SHA256 Access=, SignedHeaders=user-agent;x-project-id;x-sdk-date, Signature=" + sig,
	} {
		a, _, f, _ := newTestAKSK(t, testCreds, testNow)
		r := signedTestRequest(testBody, oldAK, oldSK, testNow)
		r.Header.Set("Authorization", v)
		_, err := a.Authenticate(r)
		mustAuthError(t, err, v)
		if f.last() != reasonMalformed {
			t.Errorf("%q: reason %q, want malformed", v, f.last())
		}
	}
	// The SDK's exact spelling passes, so the cases above fail for their change alone.
	a, _, _, _ := newTestAKSK(t, testCreds, testNow)
	r := signedTestRequest(testBody, oldAK, oldSK, testNow)
	r.Header.Set("Authorization", "SDK-HMAC-SHA256 "+base)
	if _, err := a.Authenticate(r); err != nil {
		t.Fatalf("well-formed: %v", err)
	}

	// Missing altogether, and an X-Sdk-Date in another format.
	a, _, f, _ := newTestAKSK(t, testCreds, testNow)
	_, err := a.Authenticate(testRequest(testBody))
	mustAuthError(t, err, "no authorization")
	if f.last() != reasonMissing {
		t.Errorf("no authorization: reason %q, want missing", f.last())
	}
	r = signedTestRequest(testBody, oldAK, oldSK, testNow)
	r.Header.Set("X-Sdk-Date", testNow.Format(time.RFC3339))
	_, err = a.Authenticate(r)
	mustAuthError(t, err, "RFC 3339 date")
}

func TestAKSK_BodyLimitAndPutBack(t *testing.T) {
	a, _, _, _ := newTestAKSK(t, testCreds, testNow)
	big := bytes.Repeat([]byte("a"), maxBody+1)
	_, err := a.Authenticate(signedTestRequest(big, oldAK, oldSK, testNow))
	if !errors.Is(err, errBodyTooLarge) {
		t.Fatalf("body of %d bytes: %v, want errBodyTooLarge", len(big), err)
	}
	exact := bytes.Repeat([]byte("a"), maxBody)
	r := signedTestRequest(exact, oldAK, oldSK, testNow)
	if _, err := a.Authenticate(r); err != nil {
		t.Fatalf("body of exactly %d bytes: %v", maxBody, err)
	}
	got, _ := io.ReadAll(r.Body)
	if !bytes.Equal(got, exact) {
		t.Fatalf("the handler would read %d bytes, want %d", len(got), len(exact))
	}
}

func TestSignRequestVerifies(t *testing.T) {
	a, clock, _, _ := newTestAKSK(t, testCreds, testNow)
	for _, method := range []string{http.MethodGet, http.MethodDelete, http.MethodPost} {
		clock.Advance(time.Second)
		var body []byte
		if method == http.MethodPost {
			body = testBody
		}
		r := httptest.NewRequest(method, "/v1.0/"+testProject+"/keystores/abae7bf6-4c1f-4c91-849a-b78fc8725321?limit=50&offset=0&marker=a%20b&flag&k=2&k=1", nil)
		if body != nil {
			r.Body = io.NopCloser(bytes.NewReader(body))
		}
		r.Header.Set("User-Agent", "hsmbridge-test")
		r.Header.Set("X-Project-Id", testProject)
		r.Header.Set("X-Auth-Token", "IAM-TOKEN-EXAMPLE")
		r.Header.Set("Content-Type", "application/json")
		r.SetPathValue("project_id", testProject)
		SignRequest(r, body, newAK, newSK, clock.Now())
		if !strings.Contains(r.Header.Get("Authorization"), "SignedHeaders=user-agent;x-auth-token;x-project-id;x-sdk-date,") {
			t.Errorf("signed headers: %s", r.Header.Get("Authorization"))
		}
		if _, err := a.Authenticate(r); err != nil {
			t.Errorf("%s: %v", method, err)
		}
	}
}

func TestAKSK_CanonicalURIAndQuery(t *testing.T) {
	for path, want := range map[string]string{
		"":                  "/",
		"/":                 "/",
		"/v1.0/p/keystores": "/v1.0/p/keystores/",
		"/a b/c~d_e-f.g/":   "/a%20b/c~d_e-f.g/",
		"/é/%":              "/%C3%A9/%25/",
	} {
		if got := canonicalURI(path); got != want {
			t.Errorf("canonicalURI(%q) = %q, want %q", path, got, want)
		}
	}
	r := httptest.NewRequest(http.MethodGet, "/x?b=2&a=%20z&b=1&c&d=%2B", nil)
	if got, want := canonicalQuery(r.URL.Query()), "a=%20z&b=1&b=2&c=&d=%2B"; got != want {
		t.Errorf("canonicalQuery = %q, want %q", got, want)
	}
}

func TestAKSKFailureReasonsComplete(t *testing.T) {
	got := AKSKFailureReasons()
	want := []string{"missing", "malformed", "expired", "unknown_key", "disabled", "bad_signature", "replay", "locked"}
	if !slices.Equal(got, want) {
		t.Errorf("AKSKFailureReasons() = %v, want %v", got, want)
	}
}
