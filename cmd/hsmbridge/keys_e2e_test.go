package main

// End-to-end tests of the key calls (POST /v1.0/{project_id}/kms/<call>): the real daemon
// over real HTTP, on real SoftHSM tokens and a real SQLite file. Where the wire cannot show
// it (key material that must not leave the token, objects destroyed on the token) the token
// is read with raw PKCS#11 and the store is opened directly.

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/hsmbridge/hsmbridge/hsm"
	"github.com/hsmbridge/hsmbridge/internal/devenv"
	"github.com/hsmbridge/hsmbridge/keystore"
	"github.com/hsmbridge/hsmbridge/keystore/api"
	"github.com/hsmbridge/hsmbridge/keystore/store"
)

// kmsClient calls the /kms/ API as one tenant.
type kmsClient struct {
	t       *testing.T
	base    string
	token   string
	project string
	domain  string
}

func tenantOf(t *testing.T, base string, env *devenv.Env) *kmsClient {
	return &kmsClient{t: t, base: base, token: env.AuthToken, project: env.ProjectID, domain: env.DomainID}
}

func (c *kmsClient) post(call string, body map[string]any) (int, http.Header, []byte) {
	c.t.Helper()
	return do(c.t, http.MethodPost, c.base+"/v1.0/"+c.project+"/kms/"+call, c.token, mustJSON(c.t, body))
}

// ok sends call and returns its 200 answer, decoded.
func (c *kmsClient) ok(call string, body map[string]any) map[string]any {
	c.t.Helper()
	st, _, b := c.post(call, body)
	if st != http.StatusOK {
		c.t.Fatalf("%s %s: status %d, want 200; body %s", call, mustJSON(c.t, body), st, b)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		c.t.Fatalf("%s: body %s: %v", call, b, err)
	}
	return m
}

// fails sends call and checks its error answer.
func (c *kmsClient) fails(call string, body map[string]any, status int, code string, msg ...string) {
	c.t.Helper()
	st, hdr, b := c.post(call, body)
	wantError(c.t, st, hdr, b, status, code, msg...)
}

// str returns m[k], which must be a JSON string.
func str(t *testing.T, m map[string]any, k string) string {
	t.Helper()
	v, ok := m[k].(string)
	if !ok {
		t.Fatalf("field %q is %T (%v), want a string; in %v", k, m[k], m[k], m)
	}
	return v
}

func obj(t *testing.T, m map[string]any, k string) map[string]any {
	t.Helper()
	v, ok := m[k].(map[string]any)
	if !ok {
		t.Fatalf("field %q is %T, want an object; in %v", k, m[k], m)
	}
	return v
}

func wantFields(t *testing.T, what string, m map[string]any, want ...string) {
	t.Helper()
	got := make([]string, 0, len(m))
	for k := range m {
		got = append(got, k)
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("%s has fields %v, want exactly %v", what, got, want)
	}
}

// createKey creates a key and checks the {"key_info":{"key_id","domain_id","region_id"}} answer.
func (c *kmsClient) createKey(ksID, alias, spec, usage string) string {
	c.t.Helper()
	body := map[string]any{"key_alias": alias, "keystore_id": ksID}
	if spec != "" {
		body["key_spec"] = spec
	}
	if usage != "" {
		body["key_usage"] = usage
	}
	resp := c.ok("create-key", body)
	wantFields(c.t, "create-key answer", resp, "key_info")
	info := obj(c.t, resp, "key_info")
	wantFields(c.t, "key_info", info, "key_id", "domain_id", "region_id")
	id := str(c.t, info, "key_id")
	if !uuidV4.MatchString(id) {
		c.t.Errorf("key_id %q is not a lower-case version 4 UUID", id)
	}
	if d := str(c.t, info, "domain_id"); d != c.domain {
		c.t.Errorf("domain_id %q, want %q", d, c.domain)
	}
	if r := str(c.t, info, "region_id"); r != "local-1" {
		c.t.Errorf("region_id %q, want the configured region local-1", r)
	}
	return id
}

func (c *kmsClient) describe(id string) map[string]any {
	c.t.Helper()
	return obj(c.t, c.ok("describe-key", map[string]any{"key_id": id}), "key_info")
}

func (c *kmsClient) keyState(id string) string {
	c.t.Helper()
	return str(c.t, c.describe(id), "key_state")
}

// publicKey fetches and parses get-publickey's PEM SubjectPublicKeyInfo.
func (c *kmsClient) publicKey(id string) crypto.PublicKey {
	c.t.Helper()
	resp := c.ok("get-publickey", map[string]any{"key_id": id})
	wantFields(c.t, "get-publickey answer", resp, "key_id", "public_key")
	if got := str(c.t, resp, "key_id"); got != id {
		c.t.Errorf("key_id %q, want %q", got, id)
	}
	text := str(c.t, resp, "public_key")
	block, rest := pem.Decode([]byte(text))
	if block == nil || block.Type != "PUBLIC KEY" || len(bytes.TrimSpace(rest)) != 0 {
		c.t.Fatalf("public_key %q is not one PEM PUBLIC KEY block", text)
	}
	pub, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		c.t.Fatalf("public_key is not SubjectPublicKeyInfo: %v", err)
	}
	return pub
}

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

func unb64(t *testing.T, s string) []byte {
	t.Helper()
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		t.Fatalf("%q is not base64: %v", s, err)
	}
	return b
}

func unhex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatalf("%q is not hex: %v", s, err)
	}
	return b
}

var upperHexRE = regexp.MustCompile(`^[0-9A-F]+$`)

// enableKeystore and disableKeystore change a keystore's state over the API.
func enableKeystore(t *testing.T, base string, env *devenv.Env, id string) {
	t.Helper()
	if st, _, b := do(t, http.MethodPost, keystoresURL(base, env)+"/"+id+"/enable", env.AuthToken, ""); st != http.StatusOK {
		t.Fatalf("enable keystore %s: status %d; body %s", id, st, b)
	}
}

func disableKeystore(t *testing.T, base string, env *devenv.Env, id string) {
	t.Helper()
	if st, _, b := do(t, http.MethodPost, keystoresURL(base, env)+"/"+id+"/disable", env.AuthToken, ""); st != http.StatusOK {
		t.Fatalf("disable keystore %s: status %d; body %s", id, st, b)
	}
}

// keysDaemon starts the daemon on env and binds an enabled keystore to its first cluster.
func keysDaemon(t *testing.T, env *devenv.Env) (c *kmsClient, ksID string, stop func()) {
	t.Helper()
	base, stop := startDaemon(t, env)
	ksID = mustCreate(t, base, env, env.Tokens[0], "keys-ks")
	enableKeystore(t, base, env, ksID)
	return tenantOf(t, base, env), ksID, stop
}

// addTenant gives env's tokens file a second tenant, in a domain and project of its own
// (before the daemon starts: the file is read at start-up).
func addTenant(t *testing.T, env *devenv.Env) *devenv.Env {
	t.Helper()
	other := &devenv.Env{AuthToken: devenv.RandomHex(24), DomainID: devenv.RandomHex(16), ProjectID: devenv.RandomHex(16)}
	tokens := fmt.Sprintf("tokens:\n"+
		"  - {name: dev, token_sha256: %s, domain_id: %s, project_ids: [%s]}\n"+
		"  - {name: other, token_sha256: %s, domain_id: %s, project_ids: [%s]}\n",
		api.HashToken(env.AuthToken), env.DomainID, env.ProjectID,
		api.HashToken(other.AuthToken), other.DomainID, other.ProjectID)
	if err := os.WriteFile(filepath.Join(env.Dir, "tokens.yaml"), []byte(tokens), 0o600); err != nil {
		t.Fatal(err)
	}
	return other
}

// Raw PKCS#11, for what package hsm deliberately does not offer (attribute reads, destroying
// objects behind the daemon's back). One context on the module for the whole process; it is
// never finalized or destroyed, because the daemon and other tests share the library.
var rawP11 struct {
	once sync.Once
	ctx  *pkcs11.Ctx
}

// withRawSession runs fn on a raw read-write session on tok, logged in as the user. A
// cluster handle on tok is held open meanwhile, so the module stays initialised whether or
// not a daemon is running.
func withRawSession(t *testing.T, env *devenv.Env, tok *devenv.Token, fn func(p *pkcs11.Ctx, sh pkcs11.SessionHandle)) {
	t.Helper()
	withToken(t, env, tok, func(context.Context, *hsm.Cluster) {
		rawP11.once.Do(func() { rawP11.ctx = pkcs11.New(env.Module) })
		p := rawP11.ctx
		if p == nil {
			t.Fatalf("cannot load %s", env.Module)
		}
		if err := p.Initialize(); err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
			t.Fatalf("C_Initialize: %v", err)
		}
		slots, err := p.GetSlotList(true)
		if err != nil {
			t.Fatalf("C_GetSlotList: %v", err)
		}
		slot, found := uint(0), false
		for _, s := range slots {
			ti, err := p.GetTokenInfo(s)
			if err == nil && strings.TrimRight(ti.SerialNumber, " \x00") == tok.Serial {
				slot, found = s, true
			}
		}
		if !found {
			t.Fatalf("no slot holds token serial %s", tok.Serial)
		}
		sh, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
		if err != nil {
			t.Fatalf("C_OpenSession: %v", err)
		}
		defer func() {
			if err := p.CloseSession(sh); err != nil {
				t.Errorf("C_CloseSession: %v", err)
			}
		}()
		if err := p.Login(sh, pkcs11.CKU_USER, readPIN(t, env)); err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_USER_ALREADY_LOGGED_IN)) {
			t.Fatalf("C_Login: %v", err)
		}
		fn(p, sh)
	})
}

// objectsByID returns the handles of every object whose CKA_ID is id.
func objectsByID(t *testing.T, p *pkcs11.Ctx, sh pkcs11.SessionHandle, id string) []pkcs11.ObjectHandle {
	t.Helper()
	if err := p.FindObjectsInit(sh, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_ID, []byte(id))}); err != nil {
		t.Fatalf("C_FindObjectsInit: %v", err)
	}
	hs, _, err := p.FindObjects(sh, 100)
	if ferr := p.FindObjectsFinal(sh); ferr != nil {
		t.Errorf("C_FindObjectsFinal: %v", ferr)
	}
	if err != nil {
		t.Fatalf("C_FindObjects: %v", err)
	}
	return hs
}

func objectClass(t *testing.T, p *pkcs11.Ctx, sh pkcs11.SessionHandle, h pkcs11.ObjectHandle) uint {
	t.Helper()
	attrs, err := p.GetAttributeValue(sh, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, nil)})
	if err != nil {
		t.Fatalf("read CKA_CLASS: %v", err)
	}
	return uint(bytesToUint(attrs[0].Value))
}

func bytesToUint(b []byte) uint64 { // CK_ULONG in host (little-endian) order
	var v uint64
	for i := len(b) - 1; i >= 0; i-- {
		v = v<<8 | uint64(b[i])
	}
	return v
}

func boolAttr(t *testing.T, p *pkcs11.Ctx, sh pkcs11.SessionHandle, h pkcs11.ObjectHandle, typ uint) bool {
	t.Helper()
	attrs, err := p.GetAttributeValue(sh, h, []*pkcs11.Attribute{pkcs11.NewAttribute(typ, nil)})
	if err != nil {
		t.Fatalf("read attribute %#x: %v", typ, err)
	}
	return len(attrs[0].Value) == 1 && attrs[0].Value[0] != 0
}

// TestKeyCreateRefusals: each bad create-key is refused with the service's code, and none
// leaves a key behind.
func TestKeyCreateRefusals(t *testing.T) {
	env := newEnv(t)
	c, ksID, _ := keysDaemon(t, env)
	base := c.base
	taken := c.createKey(ksID, "taken", "", "")
	// A second keystore, left disabled.
	disabledKS := mustCreate(t, base, env, env.Tokens[1], "disabled-ks")

	with := func(kv ...any) map[string]any {
		m := map[string]any{"key_alias": "k-new", "keystore_id": ksID}
		for i := 0; i < len(kv); i += 2 {
			if kv[i+1] == nil {
				delete(m, kv[i].(string))
			} else {
				m[kv[i].(string)] = kv[i+1]
			}
		}
		return m
	}
	cases := []struct {
		name string
		body map[string]any
		code string
		msg  []string
	}{
		{"disabled keystore", with("keystore_id", disabledKS), "KMS.8007", nil},
		{"unknown keystore", with("keystore_id", "0d0466b0-e727-4d9c-b35d-f84bb474a37f"), "KMS.8003", nil},
		{"keystore id not a UUID", with("keystore_id", "no-such-keystore"), "KMS.8001", nil},
		{"SM2", with("key_spec", "SM2"), "KMS.1110", []string{"SM2", "not supported by this HSM cluster"}},
		{"SM4", with("key_spec", "SM4"), "KMS.1110", []string{"SM4", "not supported by this HSM cluster"}},
		{"SECP256K1", with("key_spec", "SECP256K1"), "KMS.1110", []string{"SECP256K1", "not supported by this HSM cluster"}},
		{"bogus spec", with("key_spec", "AES_512"), "KMS.1110", nil},
		{"lower-case spec", with("key_spec", "aes_256"), "KMS.1110", nil},
		{"origin external", with("origin", "external"), "KMS.0339", nil},
		{"bogus origin", with("origin", "hsm"), "KMS.0308", nil},
		{"duplicate alias", with("key_alias", "taken"), "KMS.1104", nil},
		{"alias with a space", with("key_alias", "bad alias"), "KMS.1101", nil},
		{"alias too long", with("key_alias", strings.Repeat("a", 256)), "KMS.1101", nil},
		{"default alias", with("key_alias", "kms/default"), "KMS.1101", nil},
		{"description too long", with("key_description", strings.Repeat("d", 256)), "KMS.1103", nil},
		{"AES SIGN_VERIFY", with("key_spec", "AES_256", "key_usage", "SIGN_VERIFY"), "KMS.1115", nil},
		{"EC P256 ENCRYPT_DECRYPT", with("key_spec", "EC_P256", "key_usage", "ENCRYPT_DECRYPT"), "KMS.1114", nil},
		{"EC P384 ENCRYPT_DECRYPT", with("key_spec", "EC_P384", "key_usage", "ENCRYPT_DECRYPT"), "KMS.1114", nil},
		{"bogus usage", with("key_usage", "WRAP"), "KMS.0308", nil},
		{"missing alias", with("key_alias", nil), "KMS.0204", []string{"key_alias"}},
		{"empty alias", with("key_alias", ""), "KMS.0204", []string{"key_alias"}},
		{"missing keystore_id", with("keystore_id", nil), "KMS.0204", []string{"keystore_id"}},
		{"keystore_id 0", with("keystore_id", "0"), "KMS.0340", nil},
		{"keystore_id 1", with("keystore_id", "1"), "KMS.0340", nil},
		{"keystore_id 2", with("keystore_id", "2"), "KMS.0340", nil},
		{"short sequence", with("sequence", "123"), "KMS.0206", nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := *c
			c.t = t
			c.fails("create-key", tc.body, http.StatusBadRequest, tc.code, tc.msg...)
		})
	}
	st, hdr, b := do(t, http.MethodPost, base+"/v1.0/"+env.ProjectID+"/kms/create-key", env.AuthToken, "{not json")
	wantError(t, st, hdr, b, http.StatusBadRequest, "KMS.0202")

	// Nothing was made: the one key is the one created before, and the alias is free.
	list := c.ok("list-keys", map[string]any{})
	if total, ok := list["total"].(float64); !ok || total != 1 {
		t.Errorf("after the refusals list-keys total %v, want 1 (only %s)", list["total"], taken)
	}
	c.createKey(ksID, "k-new", "", "")
}

// TestKeySequenceIsIdempotent: a create retried with the same sequence returns the same key.
func TestKeySequenceIsIdempotent(t *testing.T) {
	env := newEnv(t, "c1")
	c, ksID, _ := keysDaemon(t, env)
	seq := "8c0e6b2a-1f4d-4e59-9a37-0c9d2b1e7f35"
	body := map[string]any{"key_alias": "seq-key", "keystore_id": ksID, "sequence": seq}
	first := str(t, obj(t, c.ok("create-key", body), "key_info"), "key_id")
	again := str(t, obj(t, c.ok("create-key", body), "key_info"), "key_id")
	if first != again {
		t.Errorf("a retried create-key made key %s, then %s; want the same key", first, again)
	}
}

// TestKeyTokenObjectsNonExtractable: the key objects on the token are token objects,
// private, sensitive and not extractable, and their secret values cannot be read.
func TestKeyTokenObjectsNonExtractable(t *testing.T) {
	env := newEnv(t, "c1")
	c, ksID, stop := keysDaemon(t, env)
	type want struct {
		objects int
		secret  uint // CKA_VALUE for secret and EC private keys, CKA_PRIVATE_EXPONENT for RSA
		sign    bool
		decrypt bool
	}
	keys := map[string]want{
		c.createKey(ksID, "aes", "AES_256", ""):                     {1, pkcs11.CKA_VALUE, false, true},
		c.createKey(ksID, "rsa-sign", "RSA_2048", "SIGN_VERIFY"):    {2, pkcs11.CKA_PRIVATE_EXPONENT, true, false},
		c.createKey(ksID, "rsa-enc", "RSA_2048", "ENCRYPT_DECRYPT"): {2, pkcs11.CKA_PRIVATE_EXPONENT, false, true},
		c.createKey(ksID, "ec", "EC_P256", ""):                      {2, pkcs11.CKA_VALUE, true, false},
	}
	stop()

	withRawSession(t, env, env.Tokens[0], func(p *pkcs11.Ctx, sh pkcs11.SessionHandle) {
		for id, w := range keys {
			hs := objectsByID(t, p, sh, id)
			if len(hs) != w.objects {
				t.Errorf("key %s: %d objects with its CKA_ID, want %d", id, len(hs), w.objects)
			}
			secrets := 0
			for _, h := range hs {
				class := objectClass(t, p, sh, h)
				if !boolAttr(t, p, sh, h, pkcs11.CKA_TOKEN) {
					t.Errorf("key %s object class %d: CKA_TOKEN false", id, class)
				}
				if class == pkcs11.CKO_PUBLIC_KEY {
					continue
				}
				secrets++
				for attr, name := range map[uint]string{
					pkcs11.CKA_PRIVATE: "CKA_PRIVATE", pkcs11.CKA_SENSITIVE: "CKA_SENSITIVE",
					pkcs11.CKA_ALWAYS_SENSITIVE: "CKA_ALWAYS_SENSITIVE", pkcs11.CKA_NEVER_EXTRACTABLE: "CKA_NEVER_EXTRACTABLE",
				} {
					if !boolAttr(t, p, sh, h, attr) {
						t.Errorf("key %s: %s false, want true", id, name)
					}
				}
				if boolAttr(t, p, sh, h, pkcs11.CKA_EXTRACTABLE) {
					t.Errorf("key %s: CKA_EXTRACTABLE true, want false", id)
				}
				if got := boolAttr(t, p, sh, h, pkcs11.CKA_DECRYPT); got != w.decrypt {
					t.Errorf("key %s: CKA_DECRYPT %v, want %v", id, got, w.decrypt)
				}
				if got := boolAttr(t, p, sh, h, pkcs11.CKA_SIGN); class == pkcs11.CKO_PRIVATE_KEY && got != w.sign {
					t.Errorf("key %s: CKA_SIGN %v, want %v", id, got, w.sign)
				}
				_, err := p.GetAttributeValue(sh, h, []*pkcs11.Attribute{pkcs11.NewAttribute(w.secret, nil)})
				if !errors.Is(err, pkcs11.Error(pkcs11.CKR_ATTRIBUTE_SENSITIVE)) {
					t.Errorf("key %s: reading its secret attribute %#x gave %v, want CKR_ATTRIBUTE_SENSITIVE", id, w.secret, err)
				}
			}
			if secrets != 1 {
				t.Errorf("key %s: %d secret or private objects, want 1", id, secrets)
			}
		}
	})
}

// TestKeyTokenObjectsLeastPrivilege: a key's objects may do on the token only what its
// key_usage asks for. Left unset, SoftHSM's defaults let an AES key sign (CMAC), wrap and
// unwrap, and a private key unwrap and sign-recover (a raw RSA private-key operation, so a
// SIGN_VERIFY key could decrypt through C_UnwrapKey and an ENCRYPT_DECRYPT key could sign
// through C_SignRecover): the templates must say false.
func TestKeyTokenObjectsLeastPrivilege(t *testing.T) {
	env := newEnv(t, "c1")
	c, ksID, stop := keysDaemon(t, env)
	T, F := true, false
	type attrs map[uint]bool
	type want struct {
		secret, private, public attrs
	}
	notMAC := attrs{pkcs11.CKA_SIGN: F, pkcs11.CKA_VERIFY: F, pkcs11.CKA_WRAP: F, pkcs11.CKA_UNWRAP: F, pkcs11.CKA_DERIVE: F}
	keys := map[string]want{
		c.createKey(ksID, "aes", "AES_256", ""): {secret: merge(notMAC, attrs{pkcs11.CKA_ENCRYPT: T, pkcs11.CKA_DECRYPT: T})},
		c.createKey(ksID, "rsa-sign", "RSA_2048", "SIGN_VERIFY"): {
			private: attrs{pkcs11.CKA_SIGN: T, pkcs11.CKA_DECRYPT: F, pkcs11.CKA_UNWRAP: F, pkcs11.CKA_SIGN_RECOVER: F, pkcs11.CKA_DERIVE: F},
			public:  attrs{pkcs11.CKA_VERIFY: T, pkcs11.CKA_ENCRYPT: F, pkcs11.CKA_WRAP: F, pkcs11.CKA_VERIFY_RECOVER: F, pkcs11.CKA_DERIVE: F},
		},
		c.createKey(ksID, "rsa-enc", "RSA_2048", "ENCRYPT_DECRYPT"): {
			private: attrs{pkcs11.CKA_DECRYPT: T, pkcs11.CKA_SIGN: F, pkcs11.CKA_UNWRAP: F, pkcs11.CKA_SIGN_RECOVER: F, pkcs11.CKA_DERIVE: F},
			public:  attrs{pkcs11.CKA_ENCRYPT: T, pkcs11.CKA_VERIFY: F, pkcs11.CKA_WRAP: F, pkcs11.CKA_VERIFY_RECOVER: F, pkcs11.CKA_DERIVE: F},
		},
		c.createKey(ksID, "ec", "EC_P384", ""): {
			private: attrs{pkcs11.CKA_SIGN: T, pkcs11.CKA_DECRYPT: F, pkcs11.CKA_UNWRAP: F, pkcs11.CKA_SIGN_RECOVER: F, pkcs11.CKA_DERIVE: F},
			public:  attrs{pkcs11.CKA_VERIFY: T, pkcs11.CKA_ENCRYPT: F, pkcs11.CKA_WRAP: F, pkcs11.CKA_VERIFY_RECOVER: F, pkcs11.CKA_DERIVE: F},
		},
	}
	stop()
	names := map[uint]string{
		pkcs11.CKA_SIGN: "CKA_SIGN", pkcs11.CKA_VERIFY: "CKA_VERIFY", pkcs11.CKA_WRAP: "CKA_WRAP", pkcs11.CKA_UNWRAP: "CKA_UNWRAP",
		pkcs11.CKA_DERIVE: "CKA_DERIVE", pkcs11.CKA_ENCRYPT: "CKA_ENCRYPT", pkcs11.CKA_DECRYPT: "CKA_DECRYPT",
		pkcs11.CKA_SIGN_RECOVER: "CKA_SIGN_RECOVER", pkcs11.CKA_VERIFY_RECOVER: "CKA_VERIFY_RECOVER",
	}
	withRawSession(t, env, env.Tokens[0], func(p *pkcs11.Ctx, sh pkcs11.SessionHandle) {
		for id, w := range keys {
			for _, h := range objectsByID(t, p, sh, id) {
				class := objectClass(t, p, sh, h)
				want := map[uint]attrs{pkcs11.CKO_SECRET_KEY: w.secret, pkcs11.CKO_PRIVATE_KEY: w.private, pkcs11.CKO_PUBLIC_KEY: w.public}[class]
				for attr, v := range want {
					if got := boolAttr(t, p, sh, h, attr); got != v {
						t.Errorf("key %s, object class %d: %s %v, want %v", id, class, names[attr], got, v)
					}
				}
			}
		}
	})
}

func merge[M ~map[K]V, K comparable, V any](ms ...M) M {
	out := M{}
	for _, m := range ms {
		for k, v := range m {
			out[k] = v
		}
	}
	return out
}

// TestKeyDescribeAndList: describe-key shows every field; list-keys pages with a marker and
// filters; another tenant sees none of it.
func TestKeyDescribeAndList(t *testing.T) {
	env := newEnv(t)
	otherEnv := addTenant(t, env)
	c, ksID, _ := keysDaemon(t, env)
	other := tenantOf(t, c.base, otherEnv)
	st, hdr, b := do(t, http.MethodPost, c.base+"/v1.0/"+otherEnv.ProjectID+"/keystores", otherEnv.AuthToken,
		mustJSON(t, goodFields(env, env.Tokens[1], "other-ks")))
	otherKS := wantCreated(t, otherEnv, st, hdr, b)
	enableKeystore(t, c.base, otherEnv, otherKS)
	otherKey := other.createKey(otherKS, "aes-1", "", "") // the same alias as ours: aliases are per domain

	before := time.Now().UnixMilli()
	aes := c.ok("create-key", map[string]any{"key_alias": "aes-1", "keystore_id": ksID, "key_description": "the first key"})
	after := time.Now().UnixMilli()
	aesID := str(t, obj(t, aes, "key_info"), "key_id")

	d := c.describe(aesID)
	wantFields(t, "key_info", d, "key_id", "domain_id", "key_alias", "realm", "key_spec", "key_usage", "key_description",
		"creation_date", "scheduled_deletion_date", "key_state", "default_key_flag", "key_type", "origin",
		"key_rotation_enabled", "sys_enterprise_project_id", "keystore_id")
	for k, v := range map[string]string{
		"key_id": aesID, "domain_id": env.DomainID, "key_alias": "aes-1", "realm": "local-1", "key_spec": "AES_256",
		"key_usage": "ENCRYPT_DECRYPT", "key_description": "the first key", "scheduled_deletion_date": "",
		"key_state": "2", "default_key_flag": "0", "key_type": "1", "origin": "kms", "key_rotation_enabled": "false",
		"sys_enterprise_project_id": "0", "keystore_id": ksID,
	} {
		if got := str(t, d, k); got != v {
			t.Errorf("describe-key %s = %q, want %q", k, got, v)
		}
	}
	created, err := strconv.ParseInt(str(t, d, "creation_date"), 10, 64)
	if err != nil || created < before || created > after {
		t.Errorf("creation_date %q, want epoch milliseconds in [%d, %d]", d["creation_date"], before, after)
	}
	// An asymmetric key defaults to SIGN_VERIFY.
	ec := c.describe(c.createKey(ksID, "ec-1", "EC_P256", ""))
	if str(t, ec, "key_usage") != "SIGN_VERIFY" || str(t, ec, "key_spec") != "EC_P256" || str(t, ec, "key_type") == "1" {
		t.Errorf("EC key described as %v", ec)
	}

	// Another domain's key is not found, in either direction; malformed ids are refused.
	c.fails("describe-key", map[string]any{"key_id": otherKey}, http.StatusNotFound, "KMS.0207")
	other.fails("describe-key", map[string]any{"key_id": aesID}, http.StatusNotFound, "KMS.0207")
	c.fails("describe-key", map[string]any{"key_id": "0d0466b0-e727-4d9c-b35d-f84bb474a37f"}, http.StatusNotFound, "KMS.0207")
	for _, bad := range []string{"not-a-key", strings.ToUpper(aesID), aesID + "0", "0d0466b0e7274d9cb35df84bb474a37f"} {
		c.fails("describe-key", map[string]any{"key_id": bad}, http.StatusBadRequest, "KMS.0205")
	}
	c.fails("describe-key", map[string]any{}, http.StatusBadRequest, "KMS.0204")
	other.fails("get-publickey", map[string]any{"key_id": str(t, ec, "key_id")}, http.StatusNotFound, "KMS.0207")
	other.fails("disable-key", map[string]any{"key_id": aesID}, http.StatusNotFound, "KMS.0207")

	// Five keys in all: page through them two at a time.
	ids := []string{aesID, str(t, ec, "key_id"), c.createKey(ksID, "aes-2", "", ""), c.createKey(ksID, "ec-2", "EC_P256", ""), c.createKey(ksID, "ec-3", "EC_P384", "")}
	var seen []string
	marker := ""
	for page := 0; ; page++ {
		if page > 5 {
			t.Fatal("list-keys never stopped paging")
		}
		req := map[string]any{"limit": "2"}
		if marker != "" {
			req["marker"] = marker
		}
		st, _, b := c.post("list-keys", req)
		if st != http.StatusOK {
			t.Fatalf("list-keys: %d %s", st, b)
		}
		var raw map[string]json.RawMessage
		if err := json.Unmarshal(b, &raw); err != nil {
			t.Fatal(err)
		}
		if string(raw["total"]) != "5" {
			t.Errorf("total %s, want the number 5", raw["total"])
		}
		var resp struct {
			Keys       []string         `json:"keys"`
			KeyDetails []map[string]any `json:"key_details"`
			NextMarker string           `json:"next_marker"`
			Truncated  string           `json:"truncated"`
		}
		if err := json.Unmarshal(b, &resp); err != nil {
			t.Fatalf("list-keys body %s: %v", b, err)
		}
		if len(resp.Keys) != len(resp.KeyDetails) || len(resp.Keys) > 2 {
			t.Fatalf("page %d: %d keys and %d details, want the same, at most 2", page, len(resp.Keys), len(resp.KeyDetails))
		}
		for i, id := range resp.Keys {
			if resp.KeyDetails[i]["key_id"] != id {
				t.Errorf("keys[%d] %s but key_details[%d] is %v", i, id, i, resp.KeyDetails[i]["key_id"])
			}
		}
		seen = append(seen, resp.Keys...)
		if resp.Truncated == "false" {
			if resp.NextMarker != "" {
				t.Errorf("last page next_marker %q, want empty", resp.NextMarker)
			}
			break
		}
		if resp.Truncated != "true" || resp.NextMarker == "" {
			t.Fatalf("page %d: truncated %q next_marker %q", page, resp.Truncated, resp.NextMarker)
		}
		marker = resp.NextMarker
	}
	if got, want := slices.Sorted(slices.Values(seen)), slices.Sorted(slices.Values(ids)); !slices.Equal(got, want) {
		t.Errorf("paged through %v, want each of %v once", seen, ids)
	}

	countOf := func(c *kmsClient, f map[string]any) (n int, keys []string) {
		t.Helper()
		resp := c.ok("list-keys", f)
		for _, k := range resp["keys"].([]any) {
			keys = append(keys, k.(string))
		}
		total, ok := resp["total"].(float64)
		if !ok || int(total) != len(keys) {
			t.Errorf("list-keys %v: total %v for %d keys", f, resp["total"], len(keys))
		}
		return len(keys), keys
	}
	if n, _ := countOf(c, map[string]any{"key_spec": "EC_P256"}); n != 2 {
		t.Errorf("key_spec EC_P256 lists %d keys, want 2", n)
	}
	if n, _ := countOf(c, map[string]any{"key_spec": "ALL"}); n != 5 {
		t.Errorf("key_spec ALL lists %d keys, want 5", n)
	}
	if n, _ := countOf(c, map[string]any{"key_spec": "RSA_2048"}); n != 0 {
		t.Errorf("key_spec RSA_2048 lists %d keys, want 0", n)
	}
	c.ok("disable-key", map[string]any{"key_id": ids[2]})
	if n, keys := countOf(c, map[string]any{"key_state": "3"}); n != 1 || keys[0] != ids[2] {
		t.Errorf("key_state 3 lists %v, want [%s]", keys, ids[2])
	}
	if n, _ := countOf(c, map[string]any{"key_state": "2"}); n != 4 {
		t.Errorf("key_state 2 lists %d keys, want 4", n)
	}
	if n, _ := countOf(c, map[string]any{"key_state": "2", "key_spec": "AES_256"}); n != 1 {
		t.Errorf("key_state 2 and AES_256 list %d keys, want 1", n)
	}
	if n, keys := countOf(other, map[string]any{}); n != 1 || keys[0] != otherKey {
		t.Errorf("the other tenant lists %v, want only its own %s", keys, otherKey)
	}
	c.fails("list-keys", map[string]any{"limit": "0"}, http.StatusBadRequest, "KMS.1601")
	c.fails("list-keys", map[string]any{"marker": "-1"}, http.StatusBadRequest, "KMS.1602")
	c.fails("list-keys", map[string]any{"key_state": "9"}, http.StatusBadRequest, "KMS.0308")
}

// TestKeyLifecycle: enable, disable, schedule and cancel deletion, each with its refusals;
// the destruction when the day comes (through the keystore package with a moved clock, as
// the daemon's own clock is not reachable); and the keystore that may be deleted only once
// its keys are gone.
func TestKeyLifecycle(t *testing.T) {
	env := newEnv(t, "c1")
	c, ksID, stop := keysDaemon(t, env)
	aes := c.createKey(ksID, "aes", "", "")
	rsaKey := c.createKey(ksID, "rsa", "RSA_2048", "SIGN_VERIFY")
	digest := sha256.Sum256([]byte("lifecycle"))
	signBody := map[string]any{"key_id": rsaKey, "message": b64(digest[:]), "signing_algorithm": "RSASSA_PSS_SHA_256"}
	encBody := map[string]any{"key_id": aes, "plain_text": "hello"}
	ct := str(t, c.ok("encrypt-data", encBody), "cipher_text")

	state := func(call, id string, wrapped bool) string {
		t.Helper()
		resp := c.ok(call, map[string]any{"key_id": id, "pending_days": "7"})
		if wrapped {
			wantFields(t, call+" answer", resp, "key_info")
			resp = obj(t, resp, "key_info")
		}
		wantFields(t, call+" answer", resp, "key_id", "key_state")
		if got := str(t, resp, "key_id"); got != id {
			t.Errorf("%s key_id %q, want %q", call, got, id)
		}
		return str(t, resp, "key_state")
	}

	c.fails("enable-key", map[string]any{"key_id": aes}, http.StatusBadRequest, "KMS.1201")
	if s := state("disable-key", aes, true); s != "3" {
		t.Errorf("disable-key state %q, want 3", s)
	}
	if s := c.keyState(aes); s != "3" {
		t.Errorf("describe-key after disable: key_state %q, want 3", s)
	}
	c.fails("disable-key", map[string]any{"key_id": aes}, http.StatusBadRequest, "KMS.1301")
	c.fails("encrypt-data", encBody, http.StatusBadRequest, "KMS.0209")
	c.fails("decrypt-data", map[string]any{"cipher_text": ct}, http.StatusBadRequest, "KMS.0209")
	c.fails("create-datakey", map[string]any{"key_id": aes}, http.StatusBadRequest, "KMS.0209")
	if s := state("enable-key", aes, true); s != "2" {
		t.Errorf("enable-key state %q, want 2", s)
	}
	c.ok("decrypt-data", map[string]any{"cipher_text": ct})

	c.ok("disable-key", map[string]any{"key_id": rsaKey})
	c.fails("sign", signBody, http.StatusBadRequest, "KMS.0209")
	c.fails("verify", map[string]any{"key_id": rsaKey, "message": b64(digest[:]), "signing_algorithm": "RSASSA_PSS_SHA_256", "signature": b64([]byte("x"))},
		http.StatusBadRequest, "KMS.0209")
	c.ok("enable-key", map[string]any{"key_id": rsaKey})
	c.ok("sign", signBody)

	// Schedule deletion: the period is bounded, then the key is unusable until cancelled.
	for _, days := range []string{"6", "1097", "0", "-7", "seven", ""} {
		c.fails("schedule-key-deletion", map[string]any{"key_id": aes, "pending_days": days}, http.StatusBadRequest, "KMS.1401")
	}
	before := time.Now()
	if s := state("schedule-key-deletion", aes, false); s != "4" {
		t.Errorf("schedule-key-deletion state %q, want 4", s)
	}
	d := c.describe(aes)
	if s := str(t, d, "key_state"); s != "4" {
		t.Errorf("describe-key after schedule: key_state %q, want 4", s)
	}
	due, err := strconv.ParseInt(str(t, d, "scheduled_deletion_date"), 10, 64)
	if lo, hi := before.AddDate(0, 0, 7).UnixMilli(), time.Now().AddDate(0, 0, 7).UnixMilli(); err != nil || due < lo || due > hi {
		t.Errorf("scheduled_deletion_date %q, want epoch ms 7 days from now, in [%d, %d]", d["scheduled_deletion_date"], lo, hi)
	}
	c.fails("schedule-key-deletion", map[string]any{"key_id": aes, "pending_days": "7"}, http.StatusBadRequest, "KMS.1402")
	c.fails("encrypt-data", encBody, http.StatusBadRequest, "KMS.0210")
	c.fails("decrypt-data", map[string]any{"cipher_text": ct}, http.StatusBadRequest, "KMS.0210")
	c.fails("enable-key", map[string]any{"key_id": aes}, http.StatusBadRequest, "KMS.1201")
	c.fails("disable-key", map[string]any{"key_id": aes}, http.StatusBadRequest, "KMS.1301")
	if n := c.ok("list-keys", map[string]any{"key_state": "4"})["total"]; n != 1.0 {
		t.Errorf("key_state 4 lists %v keys, want 1", n)
	}
	if s := state("cancel-key-deletion", aes, false); s != "3" {
		t.Errorf("cancel-key-deletion state %q, want 3 (disabled, as the service does)", s)
	}
	if d := c.describe(aes); str(t, d, "key_state") != "3" || str(t, d, "scheduled_deletion_date") != "" {
		t.Errorf("after cancel: key_state %v, scheduled_deletion_date %v; want 3 and empty", d["key_state"], d["scheduled_deletion_date"])
	}
	c.fails("cancel-key-deletion", map[string]any{"key_id": aes}, http.StatusBadRequest, "KMS.1501")
	c.fails("encrypt-data", encBody, http.StatusBadRequest, "KMS.0209")
	c.ok("enable-key", map[string]any{"key_id": aes})
	c.ok("decrypt-data", map[string]any{"cipher_text": ct})

	// Schedule both keys (an enabled one and a disabled one).
	c.ok("disable-key", map[string]any{"key_id": rsaKey})
	for _, id := range []string{aes, rsaKey} {
		if s := state("schedule-key-deletion", id, false); s != "4" {
			t.Errorf("schedule-key-deletion of %s: state %q, want 4", id, s)
		}
	}
	c.fails("sign", signBody, http.StatusBadRequest, "KMS.0210")

	// A keystore holding keys cannot be deleted, enabled or not, even if they are all pending deletion.
	ksURL := keystoresURL(c.base, env) + "/" + ksID
	st, hdr, b := do(t, http.MethodDelete, ksURL, env.AuthToken, "")
	wantError(t, st, hdr, b, http.StatusBadRequest, "KMS.8008")
	disableKeystore(t, c.base, env, ksID)
	st, hdr, b = do(t, http.MethodDelete, ksURL, env.AuthToken, "")
	wantError(t, st, hdr, b, http.StatusBadRequest, "KMS.8008", "holds")
	stop()

	// The day comes: destroy through the service, as the daemon's sweep does, with the clock moved.
	tok := env.Tokens[0]
	now := time.Now()
	withRawSession(t, env, tok, func(p *pkcs11.Ctx, sh pkcs11.SessionHandle) {
		for id, n := range map[string]int{aes: 1, rsaKey: 2} {
			if got := len(objectsByID(t, p, sh, id)); got != n {
				t.Errorf("before destruction key %s has %d objects, want %d", id, got, n)
			}
		}
	})
	func() {
		ctx := context.Background()
		st, err := store.OpenSQLite(ctx, filepath.Join(env.Dir, "hsmbridge.db"))
		if err != nil {
			t.Fatal(err)
		}
		defer func() {
			if err := st.Close(); err != nil {
				t.Errorf("close store: %v", err)
			}
		}()
		cl, err := hsm.OpenCluster(ctx, hsm.ClusterConfig{
			ID: tok.ClusterID, ModulePath: env.Module, TokenSerial: tok.Serial, TokenLabel: tok.Label,
			PIN: readPIN(t, env), PoolSize: 2, IdentityKeyLabel: tok.KeyLabel, IdentityCertLabel: tok.CertLabel,
		})
		if err != nil {
			t.Fatal(err)
		}
		defer func() {
			if err := cl.Close(ctx); err != nil {
				t.Errorf("close cluster: %v", err)
			}
		}()
		var mu sync.Mutex
		clock := now
		svc := keystore.New(st, []keystore.Cluster{{Type: keystore.TypeDHSM, Cluster: cl}},
			keystore.WithClock(func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }))
		setClock := func(t time.Time) { mu.Lock(); clock = t; mu.Unlock() }

		for _, at := range []time.Time{now, now.AddDate(0, 0, 6)} {
			setClock(at)
			if n, err := svc.DestroyDueKeys(ctx); err != nil || n != 0 {
				t.Errorf("DestroyDueKeys at %v: %d, %v; want none due yet", at, n, err)
			}
		}
		setClock(now.AddDate(0, 0, 7).Add(time.Minute))
		if n, err := svc.DestroyDueKeys(ctx); err != nil || n != 2 {
			t.Errorf("DestroyDueKeys 7 days on: %d, %v; want the 2 keys", n, err)
		}
		if n, err := svc.DestroyDueKeys(ctx); err != nil || n != 0 {
			t.Errorf("DestroyDueKeys again: %d, %v; want 0", n, err)
		}
		for _, id := range []string{aes, rsaKey} {
			if _, err := st.GetKey(ctx, id); !errors.Is(err, store.ErrNotFound) {
				t.Errorf("key row %s after destruction: %v, want ErrNotFound", id, err)
			}
		}
		if n, err := st.CountKeys(ctx, ksID); err != nil || n != 0 {
			t.Errorf("keystore %s still counts %d keys (%v)", ksID, n, err)
		}
	}()
	withRawSession(t, env, tok, func(p *pkcs11.Ctx, sh pkcs11.SessionHandle) {
		for _, id := range []string{aes, rsaKey} {
			if hs := objectsByID(t, p, sh, id); len(hs) != 0 {
				t.Errorf("key %s still has %d objects on the token", id, len(hs))
			}
		}
	})

	// Restarted, the daemon knows the keys are gone, and the emptied keystore can go.
	base, _ := startDaemon(t, env)
	c = tenantOf(t, base, env)
	c.fails("describe-key", map[string]any{"key_id": aes}, http.StatusNotFound, "KMS.0207")
	st, _, b = do(t, http.MethodDelete, keystoresURL(base, env)+"/"+ksID, env.AuthToken, "")
	if st != http.StatusOK {
		t.Fatalf("delete of the emptied disabled keystore: %d %s", st, b)
	}
	st, hdr, b = do(t, http.MethodGet, keystoresURL(base, env)+"/"+ksID, env.AuthToken, "")
	wantError(t, st, hdr, b, http.StatusBadRequest, "KMS.8003")
}

// TestEncryptDecryptData: AES-GCM and RSA-OAEP round trips, and every way a ciphertext or a
// key can be wrong is a 4xx, not a 500.
func TestEncryptDecryptData(t *testing.T) {
	env := newEnv(t, "c1")
	c, ksID, _ := keysDaemon(t, env)
	aes := c.createKey(ksID, "aes", "", "")
	aes2 := c.createKey(ksID, "aes-2", "AES_256", "ENCRYPT_DECRYPT")
	rsaEnc := c.createKey(ksID, "rsa-enc", "RSA_2048", "ENCRYPT_DECRYPT")
	rsaSign := c.createKey(ksID, "rsa-sign", "RSA_2048", "SIGN_VERIFY")
	ec := c.createKey(ksID, "ec", "EC_P256", "")

	plain := "12345678 – ünïcødé and more"
	for _, aad := range []string{"", "context: tenant=a; object=42"} {
		body := map[string]any{"key_id": aes, "plain_text": plain}
		if aad != "" {
			body["additional_authenticated_data"] = aad
		}
		enc := c.ok("encrypt-data", body)
		wantFields(t, "encrypt-data answer", enc, "key_id", "cipher_text")
		if str(t, enc, "key_id") != aes {
			t.Errorf("encrypt-data key_id %v, want %s", enc["key_id"], aes)
		}
		ct := str(t, enc, "cipher_text")
		if len(ct) < 128 || len(ct) > 5648 {
			t.Errorf("cipher_text is %d characters; decrypt-data accepts 128 to 5648", len(ct))
		}
		blob := unb64(t, ct)
		if !bytes.Contains(blob, []byte(aes)) {
			t.Errorf("the blob does not name its key %s", aes)
		}
		// No key_id: the blob names it. With the right key_id too.
		for _, withID := range []bool{false, true} {
			req := map[string]any{"cipher_text": ct}
			if aad != "" {
				req["additional_authenticated_data"] = aad
			}
			if withID {
				req["key_id"] = aes
			}
			dec := c.ok("decrypt-data", req)
			wantFields(t, "decrypt-data answer", dec, "key_id", "plain_text", "plain_text_base64")
			if str(t, dec, "key_id") != aes || str(t, dec, "plain_text") != plain || str(t, dec, "plain_text_base64") != b64([]byte(plain)) {
				t.Errorf("decrypt-data gave %v, want key %s and %q", dec, aes, plain)
			}
		}
		// Two encryptions of one plaintext differ (fresh IVs).
		if ct2 := str(t, c.ok("encrypt-data", body), "cipher_text"); ct2 == ct {
			t.Error("two encryptions gave the same cipher_text")
		}

		wrongAAD := map[string]any{"cipher_text": ct, "additional_authenticated_data": aad + "x"}
		c.fails("decrypt-data", wrongAAD, http.StatusBadRequest, "KMS.0308")
		if aad != "" {
			c.fails("decrypt-data", map[string]any{"cipher_text": ct}, http.StatusBadRequest, "KMS.0308")
		}
		// Altered anywhere past the key id: the IV, the ciphertext, the tag.
		for _, pos := range []int{37, 40, 49, len(blob) / 2, len(blob) - 1} {
			bad := bytes.Clone(blob)
			bad[pos] ^= 0x01
			req := map[string]any{"cipher_text": b64(bad), "additional_authenticated_data": aad}
			c.fails("decrypt-data", req, http.StatusBadRequest, "KMS.0308")
		}
		// The version byte altered.
		bad := bytes.Clone(blob)
		bad[0] ^= 0x7f
		c.fails("decrypt-data", map[string]any{"cipher_text": b64(bad), "additional_authenticated_data": aad}, http.StatusBadRequest, "KMS.0308")
		// Moved under another AES key of the same domain.
		moved := bytes.Replace(blob, []byte(aes), []byte(aes2), 1)
		c.fails("decrypt-data", map[string]any{"cipher_text": b64(moved), "additional_authenticated_data": aad}, http.StatusBadRequest, "KMS.0308")
		// A key_id that is not the blob's.
		c.fails("decrypt-data", map[string]any{"cipher_text": ct, "key_id": aes2, "additional_authenticated_data": aad}, http.StatusBadRequest, "KMS.0308")
		// Named under a key id that does not exist.
		ghost := bytes.Replace(blob, []byte(aes), []byte("0d0466b0-e727-4d9c-b35d-f84bb474a37f"), 1)
		st, _, b := c.post("decrypt-data", map[string]any{"cipher_text": b64(ghost), "additional_authenticated_data": aad})
		if st >= 500 || st < 400 {
			t.Errorf("decrypt-data of a blob naming a missing key: %d %s, want a 4xx", st, b)
		}
	}
	c.fails("decrypt-data", map[string]any{"cipher_text": "not base64!"}, http.StatusBadRequest, "KMS.0308")
	c.fails("decrypt-data", map[string]any{"cipher_text": b64(make([]byte, 120))}, http.StatusBadRequest, "KMS.0308")
	c.fails("decrypt-data", map[string]any{}, http.StatusBadRequest, "KMS.0204")
	c.fails("encrypt-data", map[string]any{"key_id": aes}, http.StatusBadRequest, "KMS.0204")
	c.fails("encrypt-data", map[string]any{"key_id": aes, "plain_text": strings.Repeat("p", 4097)}, http.StatusBadRequest, "KMS.0308")
	c.ok("encrypt-data", map[string]any{"key_id": aes, "plain_text": strings.Repeat("p", 4096)})
	c.fails("encrypt-data", map[string]any{"key_id": aes, "plain_text": "x", "additional_authenticated_data": strings.Repeat("a", 129)}, http.StatusBadRequest, "KMS.0308")
	c.fails("encrypt-data", map[string]any{"key_id": aes, "plain_text": "x", "encryption_algorithm": "RSAES_OAEP_SHA_256"}, http.StatusBadRequest, "KMS.0332")

	rsaCT := str(t, c.ok("encrypt-data", map[string]any{"key_id": rsaEnc, "plain_text": plain, "encryption_algorithm": "RSAES_OAEP_SHA_256"}), "cipher_text")

	// Keys used for what they are not for.
	digest := sha256.Sum256([]byte("m"))
	sign := func(id, alg string) map[string]any {
		return map[string]any{"key_id": id, "message": b64(digest[:]), "signing_algorithm": alg}
	}
	c.fails("sign", sign(rsaEnc, "RSASSA_PSS_SHA_256"), http.StatusBadRequest, "KMS.0334")
	c.fails("verify", map[string]any{"key_id": rsaEnc, "message": b64(digest[:]), "signing_algorithm": "RSASSA_PSS_SHA_256", "signature": b64([]byte("s"))}, http.StatusBadRequest, "KMS.0334")
	c.fails("encrypt-data", map[string]any{"key_id": rsaSign, "plain_text": "x", "encryption_algorithm": "RSAES_OAEP_SHA_256"}, http.StatusBadRequest, "KMS.0335")
	c.fails("decrypt-data", map[string]any{"key_id": rsaSign, "cipher_text": rsaCT, "encryption_algorithm": "RSAES_OAEP_SHA_256"}, http.StatusBadRequest, "KMS.0335")
	c.fails("sign", sign(aes, "RSASSA_PSS_SHA_256"), http.StatusBadRequest, "KMS.1115")
	c.fails("encrypt-data", map[string]any{"key_id": ec, "plain_text": "x"}, http.StatusBadRequest, "KMS.1114")
	c.fails("create-datakey", map[string]any{"key_id": ec}, http.StatusBadRequest, "KMS.1114")
	c.fails("create-datakey", map[string]any{"key_id": rsaEnc}, http.StatusBadRequest, "KMS.0332")
	c.fails("get-publickey", map[string]any{"key_id": aes}, http.StatusBadRequest, "KMS.0331")
	c.fails("encrypt-data", map[string]any{"key_id": "0d0466b0-e727-4d9c-b35d-f84bb474a37f", "plain_text": "x"}, http.StatusNotFound, "KMS.0207")
}

// TestEncryptRSAOAEP: RSA-2048 ENCRYPT_DECRYPT with RSAES_OAEP_SHA_256. The daemon's
// ciphertext decrypts on the daemon, and so does one made on the host with the published
// public key (so it is real OAEP with SHA-256 and MGF1-SHA-256, no label).
func TestEncryptRSAOAEP(t *testing.T) {
	env := newEnv(t, "c1")
	c, ksID, _ := keysDaemon(t, env)
	aes := c.createKey(ksID, "aes", "", "")
	rsaEnc := c.createKey(ksID, "rsa-enc", "RSA_2048", "ENCRYPT_DECRYPT")
	plain := "12345678 – ünïcødé and more"

	// RSA-2048 ENCRYPT_DECRYPT: the daemon's ciphertext decrypts on the daemon; a ciphertext
	// made on the host with the published public key decrypts too.
	pub := c.publicKey(rsaEnc).(*rsa.PublicKey)
	if pub.N.BitLen() != 2048 {
		t.Errorf("RSA_2048 public key has %d bits", pub.N.BitLen())
	}
	enc := c.ok("encrypt-data", map[string]any{"key_id": rsaEnc, "plain_text": plain, "encryption_algorithm": "RSAES_OAEP_SHA_256"})
	rsaCT := str(t, enc, "cipher_text")
	if n := len(unb64(t, rsaCT)); n != 256 {
		t.Errorf("RSA-2048 ciphertext is %d bytes, want 256", n)
	}
	hostCT, err := rsa.EncryptOAEP(sha256.New(), rand.Reader, pub, []byte("from the host"), nil)
	if err != nil {
		t.Fatal(err)
	}
	for ct, want := range map[string]string{rsaCT: plain, b64(hostCT): "from the host"} {
		st, _, b := c.post("decrypt-data", map[string]any{"key_id": rsaEnc, "cipher_text": ct, "encryption_algorithm": "RSAES_OAEP_SHA_256"})
		if st != http.StatusOK {
			t.Errorf("decrypt-data of an RSAES_OAEP_SHA_256 ciphertext: %d %s, want 200", st, b)
			continue
		}
		var dec map[string]any
		if err := json.Unmarshal(b, &dec); err != nil {
			t.Fatal(err)
		}
		if str(t, dec, "plain_text") != want || str(t, dec, "key_id") != rsaEnc || str(t, dec, "plain_text_base64") != b64([]byte(want)) {
			t.Errorf("RSA decrypt gave %v, want %q", dec, want)
		}
	}
	c.fails("decrypt-data", map[string]any{"cipher_text": rsaCT, "encryption_algorithm": "RSAES_OAEP_SHA_256"}, http.StatusBadRequest, "KMS.0204")
	c.fails("encrypt-data", map[string]any{"key_id": rsaEnc, "plain_text": plain}, http.StatusBadRequest, "KMS.0332")
	tampered := unb64(t, rsaCT)
	tampered[100] ^= 0x01
	c.fails("decrypt-data", map[string]any{"key_id": rsaEnc, "cipher_text": b64(tampered), "encryption_algorithm": "RSAES_OAEP_SHA_256"}, http.StatusBadRequest, "KMS.0308")
	c.fails("decrypt-data", map[string]any{"key_id": aes, "cipher_text": rsaCT, "encryption_algorithm": "RSAES_OAEP_SHA_256"}, http.StatusBadRequest, "KMS.0332")
	c.fails("encrypt-data", map[string]any{"key_id": rsaEnc, "plain_text": strings.Repeat("p", 200), "encryption_algorithm": "RSAES_OAEP_SHA_256"}, http.StatusBadRequest, "KMS.2108")
}

// TestDatakeys: create-datakey, create-datakey-without-plaintext, encrypt-datakey and
// decrypt-datakey, in hex, with their length and digest checks.
func TestDatakeys(t *testing.T) {
	env := newEnv(t, "c1")
	c, ksID, _ := keysDaemon(t, env)
	aes := c.createKey(ksID, "aes", "", "")
	aes2 := c.createKey(ksID, "aes-2", "", "")

	decrypt := func(ct, length string, aad string) map[string]any {
		t.Helper()
		req := map[string]any{"key_id": aes, "cipher_text": ct, "datakey_cipher_length": length}
		if aad != "" {
			req["additional_authenticated_data"] = aad
		}
		resp := c.ok("decrypt-datakey", req)
		wantFields(t, "decrypt-datakey answer", resp, "data_key", "datakey_length", "datakey_dgst")
		dek := unhex(t, str(t, resp, "data_key"))
		sum := sha256.Sum256(dek)
		if got := str(t, resp, "datakey_dgst"); got != strings.ToUpper(hex.EncodeToString(sum[:])) {
			t.Errorf("datakey_dgst %q, want the upper-case hex SHA-256 of the DEK", got)
		}
		if got := str(t, resp, "datakey_length"); got != strconv.Itoa(len(dek)) {
			t.Errorf("datakey_length %q for a %d-byte DEK", got, len(dek))
		}
		return resp
	}

	for _, tc := range []struct {
		name  string
		req   map[string]any
		bytes int
	}{
		{"default", map[string]any{}, 32},
		{"AES_128", map[string]any{"key_spec": "AES_128"}, 16},
		{"AES_256", map[string]any{"key_spec": "AES_256"}, 32},
		{"512 bits", map[string]any{"datakey_length": "512"}, 64},
		{"length wins over spec", map[string]any{"key_spec": "AES_128", "datakey_length": "8"}, 1},
		{"8192 bits", map[string]any{"datakey_length": "8192"}, 1024},
		{"with AAD", map[string]any{"additional_authenticated_data": "dek-context"}, 32},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req := maps(tc.req, "key_id", aes)
			resp := c.ok("create-datakey", req)
			wantFields(t, "create-datakey answer", resp, "key_id", "plain_text", "cipher_text")
			pt, ct := str(t, resp, "plain_text"), str(t, resp, "cipher_text")
			if len(pt) != 2*tc.bytes || !upperHexRE.MatchString(pt) {
				t.Errorf("plain_text %q, want %d upper-case hex characters", pt, 2*tc.bytes)
			}
			if !upperHexRE.MatchString(ct) {
				t.Errorf("cipher_text %q is not upper-case hex", ct)
			}
			aad, _ := tc.req["additional_authenticated_data"].(string)
			got := decrypt(ct, strconv.Itoa(tc.bytes), aad)
			if str(t, got, "data_key") != pt {
				t.Errorf("decrypt-datakey gave %v, want the DEK %s", got["data_key"], pt)
			}
			if aad != "" {
				c.fails("decrypt-datakey", map[string]any{"key_id": aes, "cipher_text": ct, "datakey_cipher_length": strconv.Itoa(tc.bytes)}, http.StatusBadRequest, "KMS.0308")
			}
		})
	}
	first := c.ok("create-datakey", map[string]any{"key_id": aes})
	if second := c.ok("create-datakey", map[string]any{"key_id": aes}); second["plain_text"] == first["plain_text"] {
		t.Error("two create-datakey calls gave the same DEK")
	}
	ct := str(t, first, "cipher_text")
	c.fails("decrypt-datakey", map[string]any{"key_id": aes, "cipher_text": ct, "datakey_cipher_length": "16"}, http.StatusBadRequest, "KMS.2104")
	c.fails("decrypt-datakey", map[string]any{"key_id": aes2, "cipher_text": ct, "datakey_cipher_length": "32"}, http.StatusBadRequest, "KMS.2201")
	c.fails("decrypt-datakey", map[string]any{"key_id": aes, "cipher_text": "XYZ", "datakey_cipher_length": "32"}, http.StatusBadRequest, "KMS.2201")
	c.fails("decrypt-datakey", map[string]any{"key_id": aes, "cipher_text": ct}, http.StatusBadRequest, "KMS.0204")
	tampered := unhex(t, ct)
	tampered[len(tampered)-1] ^= 1
	c.fails("decrypt-datakey", map[string]any{"key_id": aes, "cipher_text": hex.EncodeToString(tampered), "datakey_cipher_length": "32"}, http.StatusBadRequest, "KMS.0308")
	for length, code := range map[string]string{"0": "KMS.1901", "8200": "KMS.1901", "12": "KMS.1903", "x": "KMS.1901"} {
		c.fails("create-datakey", map[string]any{"key_id": aes, "datakey_length": length}, http.StatusBadRequest, code)
	}
	c.fails("create-datakey", map[string]any{"key_id": aes, "key_spec": "HMAC_256"}, http.StatusBadRequest, "KMS.1902")
	c.fails("create-datakey", map[string]any{}, http.StatusBadRequest, "KMS.0204")

	without := c.ok("create-datakey-without-plaintext", map[string]any{"key_id": aes})
	wantFields(t, "create-datakey-without-plaintext answer", without, "key_id", "cipher_text")
	if got := decrypt(str(t, without, "cipher_text"), "32", ""); len(str(t, got, "data_key")) != 64 {
		t.Errorf("the DEK made without plaintext is %v", got["data_key"])
	}

	// encrypt-datakey: the caller's DEK, followed by its SHA-256.
	dek := make([]byte, 32)
	if _, err := rand.Read(dek); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(dek)
	plain := hex.EncodeToString(append(bytes.Clone(dek), sum[:]...))
	enc := c.ok("encrypt-datakey", map[string]any{"key_id": aes, "plain_text": plain, "datakey_plain_length": "32"})
	wantFields(t, "encrypt-datakey answer", enc, "key_id", "cipher_text", "datakey_length")
	if str(t, enc, "datakey_length") != "32" || !upperHexRE.MatchString(str(t, enc, "cipher_text")) {
		t.Errorf("encrypt-datakey answered %v", enc)
	}
	if got := decrypt(str(t, enc, "cipher_text"), "32", ""); str(t, got, "data_key") != strings.ToUpper(hex.EncodeToString(dek)) {
		t.Errorf("decrypt-datakey gave %v, want the DEK that was sealed", got["data_key"])
	}
	badSum := bytes.Clone(sum[:])
	badSum[0] ^= 1
	c.fails("encrypt-datakey", map[string]any{"key_id": aes, "plain_text": hex.EncodeToString(append(bytes.Clone(dek), badSum...)), "datakey_plain_length": "32"},
		http.StatusBadRequest, "KMS.2103")
	c.fails("encrypt-datakey", map[string]any{"key_id": aes, "plain_text": plain, "datakey_plain_length": "16"}, http.StatusBadRequest, "KMS.2104")
	c.fails("encrypt-datakey", map[string]any{"key_id": aes, "plain_text": plain, "datakey_plain_length": "64"}, http.StatusBadRequest, "KMS.2104")
	c.fails("encrypt-datakey", map[string]any{"key_id": aes, "plain_text": "not hex", "datakey_plain_length": "32"}, http.StatusBadRequest, "KMS.2101")
	c.fails("encrypt-datakey", map[string]any{"key_id": aes, "plain_text": plain}, http.StatusBadRequest, "KMS.0204")
}

// maps returns a copy of m with the extra key-value pairs set.
func maps(m map[string]any, kv ...any) map[string]any {
	out := make(map[string]any, len(m)+len(kv)/2)
	for k, v := range m {
		out[k] = v
	}
	for i := 0; i < len(kv); i += 2 {
		out[kv[i].(string)] = kv[i+1]
	}
	return out
}

var signHashes = map[string]crypto.Hash{"SHA_256": crypto.SHA256, "SHA_384": crypto.SHA384, "SHA_512": crypto.SHA512}

func hashOfAlg(alg string) crypto.Hash { return signHashes[alg[len(alg)-7:]] }

// TestSignVerifyEveryAlgorithm signs with every algorithm of the reference that fits the
// keys (RSA 2048/3072/4096, EC P-256/P-384), of a digest and of a raw message; checks each
// signature independently with Go's crypto against the published public key, and with the
// daemon's verify, which also says "false" for an altered signature.
func TestSignVerifyEveryAlgorithm(t *testing.T) {
	env := newEnv(t, "c1")
	c, ksID, _ := keysDaemon(t, env)
	rsaAlgs := []string{"RSASSA_PSS_SHA_256", "RSASSA_PSS_SHA_384", "RSASSA_PSS_SHA_512",
		"RSASSA_PKCS1_V1_5_SHA_256", "RSASSA_PKCS1_V1_5_SHA_384", "RSASSA_PKCS1_V1_5_SHA_512"}
	ecAlgs := []string{"ECDSA_SHA_256", "ECDSA_SHA_384", "ECDSA_SHA_512"}
	type signKey struct {
		spec  string
		id    string
		algs  []string
		bits  int
		curve elliptic.Curve
	}
	keys := []*signKey{
		{spec: "RSA_2048", algs: rsaAlgs, bits: 2048},
		{spec: "RSA_3072", algs: rsaAlgs, bits: 3072},
		{spec: "RSA_4096", algs: rsaAlgs, bits: 4096}, // slow on SoftHSM: made once, here
		{spec: "EC_P256", algs: ecAlgs, curve: elliptic.P256()},
		{spec: "EC_P384", algs: ecAlgs, curve: elliptic.P384()},
	}
	for _, k := range keys {
		k.id = c.createKey(ksID, strings.ToLower(k.spec), k.spec, "SIGN_VERIFY")
	}
	for _, k := range keys {
		t.Run(k.spec, func(t *testing.T) {
			c := *c
			c.t = t
			d := c.describe(k.id)
			if str(t, d, "key_spec") != k.spec || str(t, d, "key_usage") != "SIGN_VERIFY" {
				t.Errorf("described as %v", d)
			}
			pub := c.publicKey(k.id)
			switch p := pub.(type) {
			case *rsa.PublicKey:
				if k.bits == 0 || p.N.BitLen() != k.bits || p.E != 65537 {
					t.Fatalf("public key RSA %d bits e=%d, want %s", p.N.BitLen(), p.E, k.spec)
				}
			case *ecdsa.PublicKey:
				if p.Curve != k.curve {
					t.Fatalf("public key on %s, want %s", p.Curve.Params().Name, k.spec)
				}
			default:
				t.Fatalf("public key %T", pub)
			}
			for _, alg := range k.algs {
				hash := hashOfAlg(alg)
				for _, mt := range []string{"DIGEST", "RAW", ""} {
					msg := []byte("message signed with " + alg + " as " + mt + " by " + k.spec)
					h := hash.New()
					h.Write(msg)
					digest := h.Sum(nil)
					sent := digest
					if mt == "RAW" {
						sent = msg
					}
					req := map[string]any{"key_id": k.id, "message": b64(sent), "signing_algorithm": alg}
					if mt != "" {
						req["message_type"] = mt
					}
					resp := c.ok("sign", req)
					wantFields(t, "sign answer", resp, "key_id", "signature")
					sig := unb64(t, str(t, resp, "signature"))
					var err error
					switch p := pub.(type) {
					case *rsa.PublicKey:
						if strings.Contains(alg, "PSS") {
							err = rsa.VerifyPSS(p, hash, digest, sig, &rsa.PSSOptions{SaltLength: hash.Size(), Hash: hash})
						} else {
							err = rsa.VerifyPKCS1v15(p, hash, digest, sig)
						}
					case *ecdsa.PublicKey:
						if !ecdsa.VerifyASN1(p, digest, sig) {
							err = errors.New("ecdsa.VerifyASN1 says no (is the signature ASN.1 DER?)")
						}
					}
					if err != nil {
						t.Errorf("%s %s: the signature does not verify with Go's crypto: %v", alg, mt, err)
					}
					verify := maps(req, "signature", b64(sig))
					v := c.ok("verify", verify)
					wantFields(t, "verify answer", v, "key_id", "signature_valid")
					if got := str(t, v, "signature_valid"); got != "true" {
						t.Errorf("%s %s: verify says %q, want \"true\"", alg, mt, got)
					}
					bad := bytes.Clone(sig)
					bad[len(bad)/2] ^= 0x01
					if got := str(t, c.ok("verify", maps(req, "signature", b64(bad))), "signature_valid"); got != "false" {
						t.Errorf("%s %s: verify of an altered signature says %q, want \"false\"", alg, mt, got)
					}
					// The signature of one message does not verify another.
					other := bytes.Clone(sent)
					other[0] ^= 0x01
					if got := str(t, c.ok("verify", maps(req, "message", b64(other), "signature", b64(sig))), "signature_valid"); got != "false" {
						t.Errorf("%s %s: verify of another message says %q, want \"false\"", alg, mt, got)
					}
				}
				// A digest of the wrong size for the hash.
				for _, n := range []int{hash.Size() - 1, hash.Size() + 1, 20} {
					c.fails("sign", map[string]any{"key_id": k.id, "message": b64(make([]byte, n)), "signing_algorithm": alg, "message_type": "DIGEST"},
						http.StatusBadRequest, "KMS.0329")
				}
				c.fails("verify", map[string]any{"key_id": k.id, "message": b64(make([]byte, 20)), "signing_algorithm": alg, "signature": b64([]byte("s"))},
					http.StatusBadRequest, "KMS.0329")
			}
			wrong := "ECDSA_SHA_256"
			if k.curve != nil {
				wrong = "RSASSA_PSS_SHA_256"
			}
			digest := sha256.Sum256([]byte("m"))
			c.fails("sign", map[string]any{"key_id": k.id, "message": b64(digest[:]), "signing_algorithm": wrong}, http.StatusBadRequest, "KMS.0332")
			c.fails("sign", map[string]any{"key_id": k.id, "message": b64(digest[:]), "signing_algorithm": "SM2DSA_SM3"}, http.StatusBadRequest, "KMS.0332")
			c.fails("sign", map[string]any{"key_id": k.id, "message": b64(digest[:]), "signing_algorithm": k.algs[0], "message_type": "HASHED"}, http.StatusBadRequest, "KMS.0308")
			c.fails("sign", map[string]any{"key_id": k.id, "message": b64(digest[:])}, http.StatusBadRequest, "KMS.0204")
			c.fails("sign", map[string]any{"key_id": k.id, "message": b64(make([]byte, 4096)), "signing_algorithm": k.algs[0], "message_type": "RAW"}, http.StatusBadRequest, "KMS.0308")
			c.ok("sign", map[string]any{"key_id": k.id, "message": b64(make([]byte, 4095)), "signing_algorithm": k.algs[0], "message_type": "RAW"})
		})
	}
}

// TestGenRandom: random bytes from the HSM of an enabled keystore, in bounds.
func TestGenRandom(t *testing.T) {
	env := newEnv(t, "c1")
	base, _ := startDaemon(t, env)
	c := tenantOf(t, base, env)
	c.fails("gen-random", map[string]any{"random_data_length": "512"}, http.StatusBadRequest, "KMS.8007")
	ksID := mustCreate(t, base, env, env.Tokens[0], "rnd")
	c.fails("gen-random", map[string]any{"random_data_length": "512"}, http.StatusBadRequest, "KMS.8007")
	enableKeystore(t, base, env, ksID)

	seen := map[string]bool{}
	for range 3 {
		resp := c.ok("gen-random", map[string]any{"random_data_length": "512"})
		wantFields(t, "gen-random answer", resp, "random_data")
		r := str(t, resp, "random_data")
		if len(r) != 128 || !upperHexRE.MatchString(r) {
			t.Errorf("random_data %q, want 128 upper-case hex characters", r)
		}
		if seen[r] {
			t.Errorf("gen-random repeated %s", r)
		}
		seen[r] = true
	}
	for bits, chars := range map[string]int{"8": 2, "8192": 2048, "256": 64} {
		if r := str(t, c.ok("gen-random", map[string]any{"random_data_length": bits}), "random_data"); len(r) != chars {
			t.Errorf("random_data_length %s gave %d hex characters, want %d", bits, len(r), chars)
		}
	}
	for _, bad := range []string{"7", "0", "8200", "-8", "12", "x", ""} {
		st, hdr, b := c.post("gen-random", map[string]any{"random_data_length": bad})
		wantError(t, st, hdr, b, http.StatusBadRequest, "KMS.1802")
	}
}

// TestKeystoreDisabledBlocksKeyOperations: a disabled keystore refuses every use of its keys
// with KMS.8007, and they work again once it is enabled.
func TestKeystoreDisabledBlocksKeyOperations(t *testing.T) {
	env := newEnv(t, "c1")
	c, ksID, _ := keysDaemon(t, env)
	aes := c.createKey(ksID, "aes", "", "")
	ec := c.createKey(ksID, "ec", "EC_P384", "")
	rsaEnc := c.createKey(ksID, "rsa", "RSA_2048", "ENCRYPT_DECRYPT")
	digest := make([]byte, 48)
	signReq := map[string]any{"key_id": ec, "message": b64(digest), "signing_algorithm": "ECDSA_SHA_384"}
	sig := str(t, c.ok("sign", signReq), "signature")
	ct := str(t, c.ok("encrypt-data", map[string]any{"key_id": aes, "plain_text": "p"}), "cipher_text")
	rsaCT := str(t, c.ok("encrypt-data", map[string]any{"key_id": rsaEnc, "plain_text": "p", "encryption_algorithm": "RSAES_OAEP_SHA_256"}), "cipher_text")
	dk := str(t, c.ok("create-datakey", map[string]any{"key_id": aes}), "cipher_text")

	ops := []struct {
		call string
		body map[string]any
	}{
		{"sign", signReq},
		{"verify", maps(signReq, "signature", sig)},
		{"encrypt-data", map[string]any{"key_id": aes, "plain_text": "p"}},
		{"decrypt-data", map[string]any{"cipher_text": ct}},
		{"encrypt-data", map[string]any{"key_id": rsaEnc, "plain_text": "p", "encryption_algorithm": "RSAES_OAEP_SHA_256"}},
		{"create-datakey", map[string]any{"key_id": aes}},
		{"create-datakey-without-plaintext", map[string]any{"key_id": aes}},
		{"decrypt-datakey", map[string]any{"key_id": aes, "cipher_text": dk, "datakey_cipher_length": "32"}},
		{"gen-random", map[string]any{"random_data_length": "64"}},
	}
	disableKeystore(t, c.base, env, ksID)
	for _, op := range ops {
		c.fails(op.call, op.body, http.StatusBadRequest, "KMS.8007")
	}
	c.fails("decrypt-data", map[string]any{"key_id": rsaEnc, "cipher_text": rsaCT, "encryption_algorithm": "RSAES_OAEP_SHA_256"}, http.StatusBadRequest, "KMS.8007")
	c.fails("create-key", map[string]any{"key_alias": "new", "keystore_id": ksID}, http.StatusBadRequest, "KMS.8007")
	c.describe(aes) // the control plane still reads the key
	enableKeystore(t, c.base, env, ksID)
	for _, op := range ops {
		c.ok(op.call, op.body)
	}
	if dec := c.ok("decrypt-data", map[string]any{"cipher_text": ct}); dec["plain_text"] != "p" {
		t.Errorf("decrypt after re-enable gave %v", dec)
	}
}

// TestKeyMaterialDestroyedBehindTheDaemon: key objects destroyed on the token while the
// daemon runs (its handle cache still holds them) give a clean error naming the missing
// material, not a crash and not "cluster unavailable"; the stale handle is evicted, so a
// second call gives the same answer; other keys on the cluster keep working.
func TestKeyMaterialDestroyedBehindTheDaemon(t *testing.T) {
	env := newEnv(t, "c1")
	c, ksID, _ := keysDaemon(t, env)
	aes := c.createKey(ksID, "aes", "", "")
	ec := c.createKey(ksID, "ec", "EC_P256", "")
	rsaEnc := c.createKey(ksID, "rsa", "RSA_2048", "ENCRYPT_DECRYPT")
	survivor := c.createKey(ksID, "survivor", "", "")
	digest := sha256.Sum256([]byte("m"))
	signReq := map[string]any{"key_id": ec, "message": b64(digest[:]), "signing_algorithm": "ECDSA_SHA_256"}
	encReq := map[string]any{"key_id": aes, "plain_text": "p"}
	ct := str(t, c.ok("encrypt-data", encReq), "cipher_text") // caches the handles
	c.ok("sign", signReq)
	rsaCT := str(t, c.ok("encrypt-data", map[string]any{"key_id": rsaEnc, "plain_text": "p", "encryption_algorithm": "RSAES_OAEP_SHA_256"}), "cipher_text")
	rsaDec := map[string]any{"key_id": rsaEnc, "cipher_text": rsaCT, "encryption_algorithm": "RSAES_OAEP_SHA_256"}
	c.ok("encrypt-data", map[string]any{"key_id": survivor, "plain_text": "p"})

	withRawSession(t, env, env.Tokens[0], func(p *pkcs11.Ctx, sh pkcs11.SessionHandle) {
		for _, id := range []string{aes, ec, rsaEnc} {
			hs := objectsByID(t, p, sh, id)
			if len(hs) == 0 {
				t.Fatalf("key %s has no objects on the token", id)
			}
			for _, h := range hs {
				if err := p.DestroyObject(sh, h); err != nil {
					t.Fatalf("C_DestroyObject: %v", err)
				}
			}
		}
	})

	for _, op := range []struct {
		call string
		body map[string]any
	}{
		{"encrypt-data", encReq},
		{"decrypt-data", map[string]any{"cipher_text": ct}},
		{"sign", signReq},
		{"decrypt-data", rsaDec},
	} {
		for attempt := 1; attempt <= 2; attempt++ {
			st, hdr, b := c.post(op.call, op.body)
			t.Logf("%s attempt %d: %d %s", op.call, attempt, st, bytes.TrimSpace(b))
			wantError(t, st, hdr, b, http.StatusInternalServerError, "KMS.0101", "material is missing")
		}
	}
	// Verification and RSA encryption need only the public key, kept on the host.
	pubOnly := map[string]any{"key_id": rsaEnc, "plain_text": "p", "encryption_algorithm": "RSAES_OAEP_SHA_256"}
	c.ok("encrypt-data", pubOnly)
	// The cluster is healthy: other keys work, new keys can be made.
	c.ok("encrypt-data", map[string]any{"key_id": survivor, "plain_text": "p"})
	c.ok("sign", maps(signReq, "key_id", c.createKey(ksID, "ec-2", "EC_P256", "")))
	ks := func() map[string]any {
		st, _, b := do(t, http.MethodGet, keystoresURL(c.base, env)+"/"+ksID, env.AuthToken, "")
		if st != http.StatusOK {
			t.Fatalf("show keystore: %d %s", st, b)
		}
		var m map[string]map[string]any
		if err := json.Unmarshal(b, &m); err != nil {
			t.Fatal(err)
		}
		return m["keystore"]
	}()
	if ks["connection_state"] != "CONNECTED" {
		t.Errorf("keystore connection_state %v after missing key material, want CONNECTED", ks["connection_state"])
	}
}

// TestKeyOperationMetrics: PKCS#11 calls and the pool show on /metrics.
func TestKeyOperationMetrics(t *testing.T) {
	env := newEnv(t, "c1")
	c, ksID, _ := keysDaemon(t, env)
	ec := c.createKey(ksID, "ec", "EC_P256", "")
	aes := c.createKey(ksID, "aes", "", "")
	digest := sha256.Sum256([]byte("m"))
	for range 3 {
		c.ok("sign", map[string]any{"key_id": ec, "message": b64(digest[:]), "signing_algorithm": "ECDSA_SHA_256"})
		c.ok("encrypt-data", map[string]any{"key_id": aes, "plain_text": "p"})
	}
	st, _, b := do(t, http.MethodGet, c.base+"/metrics", "", "")
	if st != http.StatusOK {
		t.Fatalf("/metrics: %d %s", st, b)
	}
	cluster := env.Tokens[0].ClusterID
	for _, want := range []struct {
		re  string
		min float64
	}{
		{`hsmbridge_hsm_call_duration_seconds_count\{cluster="` + cluster + `",function="C_Sign",result="ok"\} (\S+)`, 3},
		{`hsmbridge_hsm_call_duration_seconds_count\{cluster="` + cluster + `",function="C_Encrypt",result="ok"\} (\S+)`, 3},
		{`hsmbridge_hsm_call_duration_seconds_count\{cluster="` + cluster + `",function="C_GenerateKeyPair",result="ok"\} (\S+)`, 1},
		{`hsmbridge_pool_sessions\{cluster="` + cluster + `",state="idle"\} (\S+)`, 1},
		{`hsmbridge_pool_sessions\{cluster="` + cluster + `",state="in_use"\} (\S+)`, 0},
		{`hsmbridge_http_request_duration_seconds_count\{code="200",route="POST /v1.0/\{project_id\}/kms/sign"\} (\S+)`, 3},
	} {
		m := regexp.MustCompile(`(?m)^` + want.re + `$`).FindSubmatch(b)
		if m == nil {
			t.Errorf("/metrics has no line matching %s", want.re)
			continue
		}
		if v, err := strconv.ParseFloat(string(m[1]), 64); err != nil || v < want.min {
			t.Errorf("%s: %s, want at least %v", want.re, m[1], want.min)
		}
	}
	if t.Failed() {
		t.Logf("/metrics:\n%s", b)
	}
}
