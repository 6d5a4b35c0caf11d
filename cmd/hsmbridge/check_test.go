package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/hsmbridge/hsmbridge/internal/config"
	"github.com/hsmbridge/hsmbridge/internal/devenv"
)

// runCheck runs `hsmbridge check --config path` and returns its output lines.
func runCheck(t *testing.T, path string) ([]string, error) {
	t.Helper()
	var out bytes.Buffer
	err := run(context.Background(), []string{"check", "--config", path}, &out, io.Discard)
	t.Logf("check output:\n%s", out.String())
	return strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n"), err
}

// lineFor returns the output line about name.
func lineFor(t *testing.T, lines []string, name string) string {
	t.Helper()
	for _, l := range lines {
		if strings.HasPrefix(l, name+" ") {
			return l
		}
	}
	t.Fatalf("no line for %s in:\n%s", name, strings.Join(lines, "\n"))
	return ""
}

// okLine is the line check prints for a good cluster on tok.
func okLine(tok *devenv.Token, width int) string {
	return fmt.Sprintf("%-*s  ok  token %q serial %s  identity CN=%s valid until %s",
		width, tok.ClusterID, tok.Label, tok.Serial, tok.ClusterID, tok.Identity.NotAfter.UTC().Format(time.DateOnly))
}

func TestCheck_GoodEnv(t *testing.T) {
	env := newEnv(t)
	lines, err := runCheck(t, env.ConfigPath)
	if err != nil {
		t.Fatalf("check: %v", err)
	}
	width := len("dhsm-cluster-1")
	for i, tok := range env.Tokens {
		if want := okLine(tok, width); lines[i] != want {
			t.Errorf("line %d:\n got %q\nwant %q", i, lines[i], want)
		}
	}
	if got := lineFor(t, lines, "auth"); !strings.Contains(got, "  ok  loaded token_file, aksk_file, jwt") {
		t.Errorf("auth line: %q", got)
	}
	if len(lines) != len(env.Tokens)+1 {
		t.Errorf("%d lines, want one per cluster and one for auth", len(lines))
	}
}

func TestCheck_WrongPIN(t *testing.T) {
	env := newEnv(t)
	// The second cluster reads a wrong PIN; the first keeps the right one.
	if err := os.WriteFile(filepath.Join(env.Dir, "bad-pin"), []byte("00000000\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(env.ConfigPath)
	if err != nil {
		t.Fatal(err)
	}
	first := strings.Index(string(data), "pin: {file: pin}") + 1
	cfg := string(data[:first]) + strings.Replace(string(data[first:]), "pin: {file: pin}", "pin: {file: bad-pin}", 1)
	if err := os.WriteFile(env.ConfigPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}

	lines, err := runCheck(t, env.ConfigPath)
	if err == nil || !strings.Contains(err.Error(), "check: 1 of 3 failed") {
		t.Fatalf("check error = %v, want 1 of 3 failed", err)
	}
	if got, want := lineFor(t, lines, env.Tokens[0].ClusterID), okLine(env.Tokens[0], len("dhsm-cluster-1")); got != want {
		t.Errorf("good cluster:\n got %q\nwant %q", got, want)
	}
	got := lineFor(t, lines, env.Tokens[1].ClusterID)
	for _, want := range []string{
		"dhsm-cluster-2  FAIL  token \"dhsm-cluster-2\" serial " + env.Tokens[1].Serial + " refused the PIN",
		"file:" + filepath.Join(env.Dir, "bad-pin"), "CKR_PIN_INCORRECT", "tried once, not retried",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("wrong-PIN line lacks %q:\n%s", want, got)
		}
	}
	if strings.Contains(got, "00000000") {
		t.Errorf("the line shows the PIN: %s", got)
	}
}

func TestCheck_IdentityCertificateForAnotherKey(t *testing.T) {
	env := newEnv(t)
	// A certificate from the right CA, with the right name, for a key the token does not hold.
	other, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tok := env.Tokens[1]
	cert, err := env.CA.Issue(other.Public(), tok.ClusterID)
	if err != nil {
		t.Fatal(err)
	}
	tok.CertFile = filepath.Join(env.Dir, "other-identity.pem")
	replaceFile(t, tok.CertFile, []byte(devenv.CertPEM(cert)))
	if err := env.WriteConfig(); err != nil {
		t.Fatal(err)
	}

	lines, err := runCheck(t, env.ConfigPath)
	if err == nil {
		t.Fatal("check succeeded, want the proof of possession to fail")
	}
	if got, want := lineFor(t, lines, env.Tokens[0].ClusterID), okLine(env.Tokens[0], len("dhsm-cluster-1")); got != want {
		t.Errorf("good cluster:\n got %q\nwant %q", got, want)
	}
	got := lineFor(t, lines, tok.ClusterID)
	for _, want := range []string{
		"dhsm-cluster-2  FAIL  token \"dhsm-cluster-2\" serial " + tok.Serial + "  identity CN=dhsm-cluster-2: proof of possession failed",
		`the token's key "hsmbridge-identity" does not match the identity certificate`,
	} {
		if !strings.Contains(got, want) {
			t.Errorf("line lacks %q:\n%s", want, got)
		}
	}
}

// writeURIConfig writes env's config with each cluster named by a pkcs11: URI.
func writeURIConfig(t *testing.T, env *devenv.Env, path string) {
	t.Helper()
	var b strings.Builder
	fmt.Fprintf(&b, "listen: %q\nstore: {path: hsmbridge.db}\n", env.Listen)
	fmt.Fprintf(&b, "auth:\n  token_file: tokens.yaml\n  aksk_file: aksk.yaml\n  jwt: {jwks_file: jwks.json, issuer: %s, audience: %s}\nclusters:\n", devenv.DevIssuer, devenv.DevAudience)
	for _, tok := range env.Tokens {
		fmt.Fprintf(&b, "  - id: %s\n    uri: \"pkcs11:token=%s;serial=%s?module-path=%s&pin-source=file:pin\"\n    pool_size: 4\n",
			tok.ClusterID, tok.Label, tok.Serial, env.Module)
		fmt.Fprintf(&b, "    identity: {key_label: %q, cert_label: %q}\n", tok.KeyLabel, tok.CertLabel)
	}
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestCheck_URIConfigEquivalentToLongForm(t *testing.T) {
	env := newEnv(t)
	uriPath := filepath.Join(env.Dir, "config-uri.yaml")
	writeURIConfig(t, env, uriPath)

	long, err := config.Load(env.ConfigPath)
	if err != nil {
		t.Fatal(err)
	}
	short, err := config.Load(uriPath)
	if err != nil {
		t.Fatal(err)
	}
	for i := range short.Clusters {
		short.Clusters[i].URI = ""
	}
	if !reflect.DeepEqual(short.Clusters, long.Clusters) {
		t.Errorf("clusters from URIs:\n got %+v\nwant %+v", short.Clusters, long.Clusters)
	}

	lines, err := runCheck(t, uriPath)
	if err != nil {
		t.Fatalf("check: %v", err)
	}
	for i, tok := range env.Tokens {
		if want := okLine(tok, len("dhsm-cluster-1")); lines[i] != want {
			t.Errorf("line %d:\n got %q\nwant %q", i, lines[i], want)
		}
	}
}

func TestCheck_InvalidConfigOpensNothing(t *testing.T) {
	path := filepath.Join(t.TempDir(), "config.yaml")
	cfg := "store: {path: db}\nauth: {token_file: t.yaml}\nclusters:\n  - id: c1\n    uri: \"pkcs11:token=c1?module-path=/nonexistent/lib.so&pin-value=1234\"\n    identity: {key_label: k, cert_label: c}\n"
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	lines, err := runCheck(t, path)
	if err == nil || !strings.Contains(err.Error(), "clusters[0].uri: pin-value is not allowed") {
		t.Fatalf("check error = %v, want the pin-value refused", err)
	}
	if strings.Contains(err.Error(), "1234") {
		t.Errorf("error shows the PIN: %v", err)
	}
	if len(lines) != 1 || lines[0] != "" {
		t.Errorf("check printed %q, want nothing before the config is valid", lines)
	}
}
