package api

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

const (
	testIssuer   = "https://issuer.hsmbridge.test"
	testAudience = "hsmbridge"
)

// issuer is one signing key and its public JWK.
type issuer struct {
	priv crypto.Signer
	kid  string
	jwk  jose.JSONWebKey
}

func newECIssuer(t *testing.T) issuer {
	t.Helper()
	priv, jwks, kid, err := GenerateIssuerKey()
	if err != nil {
		t.Fatal(err)
	}
	var set jose.JSONWebKeySet
	if err := json.Unmarshal(jwks, &set); err != nil {
		t.Fatal(err)
	}
	if len(set.Keys) != 1 || set.Keys[0].KeyID != kid || !set.Keys[0].IsPublic() {
		t.Fatalf("GenerateIssuerKey: bad JWKS %s", jwks)
	}
	return issuer{priv, kid, set.Keys[0]}
}

func newIssuerFrom(priv crypto.Signer, kid string) issuer {
	return issuer{priv, kid, jose.JSONWebKey{Key: priv.Public(), KeyID: kid, Use: "sig"}}
}

func writeJWKS(t *testing.T, path string, iss ...issuer) {
	t.Helper()
	set := jose.JSONWebKeySet{}
	for _, i := range iss {
		set.Keys = append(set.Keys, i.jwk)
	}
	data, err := json.Marshal(set)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

// newTestVerifier writes a JWKS of iss and loads it with a fake clock at testNow.
func newTestVerifier(t *testing.T, iss ...issuer) (*JWTVerifier, *fakeClock, *failures, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "jwks.json")
	writeJWKS(t, path, iss...)
	clock := &fakeClock{t: testNow}
	v, err := LoadJWKS(path, JWTConfig{Issuer: testIssuer, Audience: testAudience, Now: clock.Now})
	if err != nil {
		t.Fatalf("LoadJWKS: %v", err)
	}
	f := &failures{}
	v.OnFailure = f.add
	return v, clock, f, path
}

func goodClaims() TokenClaims {
	return TokenClaims{
		Issuer: testIssuer, Audience: []string{"other", testAudience}, Subject: "svc-frontend",
		DomainID: testDomain, ProjectIDs: []string{testProject}, Roles: []string{"kms:keystore:admin"},
		IssuedAt: testNow.Add(-time.Minute),
	}
}

func issue(t *testing.T, iss issuer, c TokenClaims, ttl time.Duration) string {
	t.Helper()
	tok, err := IssueToken(iss.priv, iss.kid, c, ttl)
	if err != nil {
		t.Fatalf("IssueToken: %v", err)
	}
	return tok
}

// signClaims signs arbitrary claims, for tokens IssueToken would not make.
func signClaims(t *testing.T, iss issuer, claims map[string]any) string {
	t.Helper()
	alg := jose.ES256
	if _, ok := iss.priv.(ed25519.PrivateKey); ok {
		alg = jose.EdDSA
	}
	s, err := jose.NewSigner(jose.SigningKey{Algorithm: alg, Key: iss.priv},
		(&jose.SignerOptions{}).WithType("JWT").WithHeader("kid", iss.kid))
	if err != nil {
		t.Fatal(err)
	}
	tok, err := jwt.Signed(s).Claims(claims).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func goodClaimsMap() map[string]any {
	return map[string]any{
		"iss": testIssuer, "aud": testAudience, "sub": "svc-frontend",
		"exp": testNow.Add(time.Hour).Unix(), "iat": testNow.Add(-time.Minute).Unix(),
		"domain_id": testDomain, "project_ids": []string{testProject},
	}
}

// handToken builds header.payload.signature from raw parts.
func handToken(header, claims map[string]any, sign func(input []byte) []byte) string {
	enc := func(v any) string {
		b, _ := json.Marshal(v)
		return base64.RawURLEncoding.EncodeToString(b)
	}
	input := enc(header) + "." + enc(claims)
	return input + "." + base64.RawURLEncoding.EncodeToString(sign([]byte(input)))
}

func tokenRequest(tok string) *http.Request {
	r := httptest.NewRequest(http.MethodGet, "/v1.0/"+testProject+"/keystores", nil)
	r.Header.Set("X-Auth-Token", tok)
	return r
}

func wantRefused(t *testing.T, v *JWTVerifier, f *failures, tok, reason, what string) {
	t.Helper()
	_, err := v.Authenticate(tokenRequest(tok))
	mustAuthError(t, err, what)
	if f.last() != reason {
		t.Errorf("%s: reason %q (%v), want %q", what, f.last(), err, reason)
	}
}

func TestJWT_ValidTokenAccepted(t *testing.T) {
	iss := newECIssuer(t)
	v, _, _, _ := newTestVerifier(t, iss)
	id, err := v.Authenticate(tokenRequest(issue(t, iss, goodClaims(), 10*time.Minute)))
	if err != nil {
		t.Fatalf("Authenticate: %v", err)
	}
	want := Identity{Name: "svc-frontend", DomainID: testDomain, ProjectIDs: []string{testProject}}
	if id.Name != want.Name || id.DomainID != want.DomainID || !slices.Equal(id.ProjectIDs, want.ProjectIDs) {
		t.Errorf("identity %+v, want %+v", id, want)
	}

	// A single project_id works as well as project_ids.
	c := goodClaimsMap()
	delete(c, "project_ids")
	c["project_id"] = testProject
	id, err = v.Authenticate(tokenRequest(signClaims(t, iss, c)))
	if err != nil || !slices.Equal(id.ProjectIDs, []string{testProject}) {
		t.Errorf("project_id: %+v, %v", id, err)
	}
}

func TestJWT_OtherKeyTypes(t *testing.T) {
	_, edPriv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	rsaPriv, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	ed, rs := newIssuerFrom(edPriv, "ed-1"), newIssuerFrom(rsaPriv, "rsa-1")
	v, _, _, _ := newTestVerifier(t, ed, rs)
	for _, iss := range []issuer{ed, rs} {
		if _, err := v.Authenticate(tokenRequest(issue(t, iss, goodClaims(), time.Minute))); err != nil {
			t.Errorf("%s: %v", iss.kid, err)
		}
	}
}

func TestJWT_TimeClaims(t *testing.T) {
	iss := newECIssuer(t)
	v, _, f, _ := newTestVerifier(t, iss)

	c := goodClaims()
	c.IssuedAt = testNow.Add(-time.Hour)
	wantRefused(t, v, f, issue(t, iss, c, 10*time.Minute), reasonExpired, "expired")

	c.IssuedAt = testNow.Add(-10*time.Minute - 20*time.Second) // expired 20s ago: within leeway
	if _, err := v.Authenticate(tokenRequest(issue(t, iss, c, 10*time.Minute))); err != nil {
		t.Errorf("expired within the 30s leeway: %v", err)
	}
	c.IssuedAt = testNow.Add(-10*time.Minute - 31*time.Second)
	wantRefused(t, v, f, issue(t, iss, c, 10*time.Minute), reasonExpired, "expired beyond the leeway")

	c.IssuedAt = testNow.Add(5 * time.Minute) // nbf and iat in the future
	wantRefused(t, v, f, issue(t, iss, c, 10*time.Minute), reasonJWTNotYetValid, "not yet valid")
	c.IssuedAt = testNow.Add(20 * time.Second)
	if _, err := v.Authenticate(tokenRequest(issue(t, iss, c, 10*time.Minute))); err != nil {
		t.Errorf("nbf 20s ahead, within leeway: %v", err)
	}

	m := goodClaimsMap()
	delete(m, "exp")
	wantRefused(t, v, f, signClaims(t, iss, m), reasonJWTClaims, "no exp")
}

func TestJWT_IssuerAndAudience(t *testing.T) {
	iss := newECIssuer(t)
	v, _, f, _ := newTestVerifier(t, iss)
	c := goodClaims()
	c.Issuer = "https://evil.test"
	wantRefused(t, v, f, issue(t, iss, c, time.Minute), reasonJWTIssuer, "wrong issuer")
	c = goodClaims()
	c.Audience = []string{"some-other-service"}
	wantRefused(t, v, f, issue(t, iss, c, time.Minute), reasonJWTAudience, "wrong audience")
	c.Audience = nil
	wantRefused(t, v, f, issue(t, iss, c, time.Minute), reasonJWTAudience, "no audience")
}

func TestJWT_AlgNoneRefused(t *testing.T) {
	iss := newECIssuer(t)
	v, _, f, _ := newTestVerifier(t, iss)
	for _, alg := range []string{"none", "None", "NONE"} {
		tok := handToken(map[string]any{"alg": alg, "kid": iss.kid, "typ": "JWT"}, goodClaimsMap(),
			func([]byte) []byte { return nil })
		wantRefused(t, v, f, tok, reasonJWTAlgorithm, "alg "+alg)
	}
}

// The classic confusion attack: HS256 with the issuer's public key as the HMAC secret, in
// every form an attacker could take it from.
func TestJWT_HS256WithPublicKeyRefused(t *testing.T) {
	iss := newECIssuer(t)
	v, _, f, path := newTestVerifier(t, iss)
	jwksBytes, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	spki, err := x509.MarshalPKIXPublicKey(iss.priv.Public())
	if err != nil {
		t.Fatal(err)
	}
	jwkJSON, _ := json.Marshal(iss.jwk)
	ecPub := iss.priv.Public().(*ecdsa.PublicKey)
	point, _ := ecPub.Bytes()
	secrets := map[string][]byte{
		"jwks file": jwksBytes,
		"jwk":       jwkJSON,
		"pem":       pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: spki}),
		"der":       spki,
		"point":     point,
	}
	for name, secret := range secrets {
		for _, alg := range []string{"HS256", "HS384", "HS512"} {
			tok := handToken(map[string]any{"alg": alg, "kid": iss.kid, "typ": "JWT"}, goodClaimsMap(),
				func(in []byte) []byte {
					m := hmac.New(sha256.New, secret)
					m.Write(in)
					return m.Sum(nil)
				})
			wantRefused(t, v, f, tok, reasonJWTAlgorithm, alg+" keyed with the "+name)
		}
	}
	// Nor can the allow-list be widened to HMAC or none.
	for _, algs := range [][]string{{"HS256"}, {"ES256", "none"}, {"XS256"}} {
		if _, err := LoadJWKS(path, JWTConfig{Issuer: testIssuer, Audience: testAudience, Algorithms: algs}); err == nil {
			t.Errorf("LoadJWKS with algorithms %v succeeded", algs)
		}
	}
}

func TestJWT_AlgorithmMustFitKey(t *testing.T) {
	ec := newECIssuer(t)
	_, edPriv, _ := ed25519.GenerateKey(rand.Reader)
	ed := newIssuerFrom(edPriv, "ed-1")
	v, _, f, _ := newTestVerifier(t, ec, ed)
	// Signed by the EC key, but naming the Ed25519 key.
	tok := signClaims(t, issuer{ec.priv, ed.kid, ec.jwk}, goodClaimsMap())
	wantRefused(t, v, f, tok, reasonJWTAlgorithm, "ES256 token naming an EdDSA key")

	// An algorithm outside the configured allow-list.
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	v2, _, f2, _ := newTestVerifier(t, newIssuerFrom(p384, "p384"))
	wantRefused(t, v2, f2, issue(t, newIssuerFrom(p384, "p384"), goodClaims(), time.Minute), reasonJWTAlgorithm, "ES384 not allowed by default")
}

func TestJWT_UnknownKidAndBadSignature(t *testing.T) {
	iss, other := newECIssuer(t), newECIssuer(t)
	v, _, f, _ := newTestVerifier(t, iss)
	wantRefused(t, v, f, issue(t, other, goodClaims(), time.Minute), reasonUnknownKey, "unknown kid")
	// The right kid, the wrong key.
	wantRefused(t, v, f, issue(t, issuer{other.priv, iss.kid, other.jwk}, goodClaims(), time.Minute), reasonBadSignature, "forged with the known kid")
	noKid := handToken(map[string]any{"alg": "ES256", "typ": "JWT"}, goodClaimsMap(), func([]byte) []byte { return make([]byte, 64) })
	wantRefused(t, v, f, noKid, reasonUnknownKey, "no kid")
	// A flipped payload byte.
	tok := issue(t, iss, goodClaims(), time.Minute)
	parts := strings.Split(tok, ".")
	claims, _ := base64.RawURLEncoding.DecodeString(parts[1])
	claims = []byte(strings.Replace(string(claims), testDomain, strings.Repeat("f", 32), 1))
	parts[1] = base64.RawURLEncoding.EncodeToString(claims)
	wantRefused(t, v, f, strings.Join(parts, "."), reasonBadSignature, "payload changed")
}

func TestJWT_RotatedKeys(t *testing.T) {
	oldIss, newIss := newECIssuer(t), newECIssuer(t)
	v, _, f, path := newTestVerifier(t, oldIss, newIss)
	oldTok := issue(t, oldIss, goodClaims(), time.Hour)
	newTok := issue(t, newIss, goodClaims(), time.Hour)
	for name, tok := range map[string]string{"old": oldTok, "new": newTok} {
		if _, err := v.Authenticate(tokenRequest(tok)); err != nil {
			t.Errorf("%s key before reload: %v", name, err)
		}
	}
	writeJWKS(t, path, newIss)
	if err := v.Reload(); err != nil {
		t.Fatalf("Reload: %v", err)
	}
	if _, err := v.Authenticate(tokenRequest(newTok)); err != nil {
		t.Errorf("new key after reload: %v", err)
	}
	wantRefused(t, v, f, oldTok, reasonUnknownKey, "old key after reload")

	// A broken file leaves the loaded keys in force.
	if err := os.WriteFile(path, []byte(`{"keys": [`), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := v.Reload(); err == nil {
		t.Error("Reload of a broken file succeeded")
	}
	if _, err := v.Authenticate(tokenRequest(newTok)); err != nil {
		t.Errorf("after a failed reload: %v", err)
	}
}

func TestJWT_CustomClaims(t *testing.T) {
	iss := newECIssuer(t)
	v, _, f, _ := newTestVerifier(t, iss)
	for what, mutate := range map[string]func(m map[string]any){
		"missing domain_id":          func(m map[string]any) { delete(m, "domain_id") },
		"short domain_id":            func(m map[string]any) { m["domain_id"] = "b168fe00" },
		"no project":                 func(m map[string]any) { delete(m, "project_ids") },
		"empty project_ids":          func(m map[string]any) { m["project_ids"] = []string{} },
		"project_ids not a list":     func(m map[string]any) { m["project_ids"] = testProject },
		"project_id and project_ids": func(m map[string]any) { m["project_id"] = testProject },
		"bad project id":             func(m map[string]any) { m["project_ids"] = []string{"../etc"} },
		"roles not a list":           func(m map[string]any) { m["roles"] = "admin" },
		"no sub":                     func(m map[string]any) { delete(m, "sub") },
	} {
		m := goodClaimsMap()
		mutate(m)
		wantRefused(t, v, f, signClaims(t, iss, m), reasonJWTClaims, what)
	}
}

func TestJWT_MissingAndMalformed(t *testing.T) {
	iss := newECIssuer(t)
	v, _, f, _ := newTestVerifier(t, iss)
	r := httptest.NewRequest(http.MethodGet, "/", nil)
	_, err := v.Authenticate(r)
	mustAuthError(t, err, "no token")
	if f.last() != reasonMissing {
		t.Errorf("no token: reason %q", f.last())
	}
	for _, tok := range []string{"garbage", "a.b.c", "a.b", strings.Repeat("a", maxTokenLen+1)} {
		wantRefused(t, v, f, tok, reasonMalformed, "token "+tok[:min(len(tok), 10)])
	}
	r = tokenRequest(issue(t, iss, goodClaims(), time.Minute))
	r.Header.Add("X-Auth-Token", "second")
	_, err = v.Authenticate(r)
	mustAuthError(t, err, "two tokens")
}

func TestJWT_LoadRefusesBadJWKS(t *testing.T) {
	ecPriv, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	smallRSA, _ := rsa.GenerateKey(rand.Reader, 1024)
	cases := map[string]any{
		"private key":   jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: ecPriv, KeyID: "k"}}},
		"symmetric key": jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: []byte("0123456789abcdef0123456789abcdef"), KeyID: "k"}}},
		"no kid":        jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: &ecPriv.PublicKey}}},
		"duplicate kid": jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: &ecPriv.PublicKey, KeyID: "k"}, {Key: &ecPriv.PublicKey, KeyID: "k"}}},
		"alg mismatch":  jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: &ecPriv.PublicKey, KeyID: "k", Algorithm: "RS256"}}},
		"small RSA":     jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: &smallRSA.PublicKey, KeyID: "k"}}},
		"empty":         jose.JSONWebKeySet{},
	}
	for what, set := range cases {
		data, err := json.Marshal(set)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		path := filepath.Join(t.TempDir(), "jwks.json")
		if err := os.WriteFile(path, data, 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := LoadJWKS(path, JWTConfig{Issuer: testIssuer, Audience: testAudience}); err == nil {
			t.Errorf("%s: loaded", what)
		}
	}
	iss := newECIssuer(t)
	_, _, _, path := newTestVerifier(t, iss)
	for what, cfg := range map[string]JWTConfig{
		"no issuer":       {Audience: testAudience},
		"no audience":     {Issuer: testIssuer},
		"negative leeway": {Issuer: testIssuer, Audience: testAudience, Leeway: -time.Second},
	} {
		if _, err := LoadJWKS(path, cfg); err == nil {
			t.Errorf("%s: loaded", what)
		}
	}
}

func TestJWTFailureReasonsComplete(t *testing.T) {
	if got := JWTFailureReasons(); len(got) != 10 || slices.Contains(got, "") {
		t.Errorf("JWTFailureReasons() = %v", got)
	}
}
