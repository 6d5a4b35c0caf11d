package main

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hsmbridge/hsmbridge/hsm"
	"github.com/hsmbridge/hsmbridge/internal/config"
	"github.com/hsmbridge/hsmbridge/internal/devenv"
)

// testCA makes a CA for the TLS tests, valid for a day around now.
func testCA(t *testing.T, name string) *devenv.CA {
	t.Helper()
	ca, err := devenv.NewCA(name, time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

// issueLeaf issues a certificate for pub: a server certificate for 127.0.0.1 and localhost,
// or a client certificate.
func issueLeaf(t *testing.T, ca *devenv.CA, pub crypto.PublicKey, cn string, client bool) *x509.Certificate {
	t.Helper()
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    ca.Cert.NotBefore,
		NotAfter:     ca.Cert.NotAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:     []string{"localhost"},
	}
	if client {
		tmpl.ExtKeyUsage, tmpl.IPAddresses, tmpl.DNSNames = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, nil, nil
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, pub, ca.Key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

// newLeaf makes a software ECDSA key and a certificate for it.
func newLeaf(t *testing.T, ca *devenv.CA, cn string, client bool) (*ecdsa.PrivateKey, *x509.Certificate) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return key, issueLeaf(t, ca, key.Public(), cn, client)
}

func keyPEM(t *testing.T, key crypto.Signer) []byte {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

// replaceFile puts data at path by writing a temporary file next to it and renaming it
// into place, as rotation tools do.
func replaceFile(t *testing.T, path string, data []byte) {
	t.Helper()
	tmp := path + ".new"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// writeTLSFiles rotates the key file, then the certificate file, into place.
func writeTLSFiles(t *testing.T, certFile, keyFile string, cert *x509.Certificate, key crypto.Signer) {
	t.Helper()
	if key != nil {
		replaceFile(t, keyFile, keyPEM(t, key))
	}
	replaceFile(t, certFile, []byte(devenv.CertPEM(cert)))
}

// appendConfig adds YAML to the end of env's config file (which has no server section).
func appendConfig(t *testing.T, env *devenv.Env, yaml string) {
	t.Helper()
	f, err := os.OpenFile(env.ConfigPath, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString(yaml); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// handshake makes a new TLS connection (never resumed) to addr, verifying the server
// against roots, and returns the server's leaf certificate.
func handshake(t *testing.T, addr string, roots *x509.CertPool, maxVersion uint16) tls.ConnectionState {
	t.Helper()
	conn, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: roots, MaxVersion: maxVersion})
	if err != nil {
		t.Fatalf("TLS handshake with %s: %v", addr, err)
	}
	defer conn.Close()
	return conn.ConnectionState()
}

func pool(cas ...*devenv.CA) *x509.CertPool {
	p := x509.NewCertPool()
	for _, ca := range cas {
		p.AddCert(ca.Cert)
	}
	return p
}

// httpsGet sends GET url on a new connection with the given client TLS config.
func httpsGet(url string, tc *tls.Config) (int, error) {
	c := &http.Client{Timeout: time.Minute, Transport: &http.Transport{TLSClientConfig: tc, DisableKeepAlives: true}}
	resp, err := c.Get(url)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, nil
}

func TestTLS_ReloadsRotatedCertificateFiles(t *testing.T) {
	env := newEnv(t, "dhsm-cluster-1")
	ca := testCA(t, "TLS test CA")
	certFile, keyFile := filepath.Join(env.Dir, "tls.pem"), filepath.Join(env.Dir, "tls.key")
	keyA, certA := newLeaf(t, ca, "server-a", false)
	writeTLSFiles(t, certFile, keyFile, certA, keyA)
	appendConfig(t, env, "server:\n  tls: {cert_file: tls.pem, key_file: tls.key}\n")
	base, _ := startDaemon(t, env)
	addr := strings.TrimPrefix(base, "http://")

	if got := handshake(t, addr, pool(ca), 0).PeerCertificates[0]; !got.Equal(certA) {
		t.Fatalf("served %s, want certificate A", got.Subject)
	}
	if code, err := httpsGet("https://"+addr+"/healthz", &tls.Config{RootCAs: pool(ca)}); err != nil || code != http.StatusOK {
		t.Fatalf("GET /healthz over TLS = %d, %v; want 200", code, err)
	}
	if resp, err := http.Get(base + "/healthz"); err == nil { // Go's TLS server answers 400 to plain HTTP
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			t.Error("plain HTTP to the TLS listener succeeded")
		}
	}

	// Rotate under the running server: the next new handshake gets B, no restart, no wait.
	keyB, certB := newLeaf(t, ca, "server-b", false)
	writeTLSFiles(t, certFile, keyFile, certB, keyB)
	if got := handshake(t, addr, pool(ca), 0).PeerCertificates[0]; !got.Equal(certB) {
		t.Fatalf("after rotation served %s, want certificate B", got.Subject)
	}

	// A certificate that does not match the key file is refused: B stays in force.
	_, certC := newLeaf(t, ca, "server-c", false)
	writeTLSFiles(t, certFile, keyFile, certC, nil)
	if got := handshake(t, addr, pool(ca), tls.VersionTLS12).PeerCertificates[0]; !got.Equal(certB) {
		t.Fatalf("after a mismatched rotation served %s, want certificate B still", got.Subject)
	}
}

func TestTLS_ReloadFailureKeepsCertificateAndLogsOnce(t *testing.T) {
	dir := t.TempDir()
	ca := testCA(t, "TLS test CA")
	certFile, keyFile := filepath.Join(dir, "tls.pem"), filepath.Join(dir, "tls.key")
	keyA, certA := newLeaf(t, ca, "server-a", false)
	writeTLSFiles(t, certFile, keyFile, certA, keyA)
	var logs syncBuffer
	r, err := newCertReloader(certFile, keyFile, nil, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	serves := func(want *x509.Certificate, what string) {
		t.Helper()
		c, err := r.GetCertificate(nil)
		if err != nil {
			t.Fatalf("%s: GetCertificate: %v", what, err)
		}
		if !c.Leaf.Equal(want) {
			t.Fatalf("%s: serves %s, want %s", what, c.Leaf.Subject, want.Subject)
		}
	}
	serves(certA, "unchanged")

	// The first half of a rotation: the new certificate beside the old key.
	keyB, certB := newLeaf(t, ca, "server-b", false)
	writeTLSFiles(t, certFile, keyFile, certB, nil)
	serves(certA, "certificate without its key")
	serves(certA, "certificate without its key, again")
	if n := strings.Count(logs.String(), "keeping the previous one"); n != 1 {
		t.Errorf("logged the failed reload %d times, want once:\n%s", n, logs.String())
	}
	// The second half: the key follows.
	writeTLSFiles(t, certFile, keyFile, certB, keyB)
	serves(certB, "rotation complete")
	if !strings.Contains(logs.String(), "reloaded TLS certificate") {
		t.Errorf("no reload logged:\n%s", logs.String())
	}

	// A file that vanishes keeps the certificate in force.
	if err := os.Remove(certFile); err != nil {
		t.Fatal(err)
	}
	serves(certB, "certificate file removed")
	serves(certB, "certificate file removed, again")
	if n := strings.Count(logs.String(), "keeping the loaded certificate"); n != 1 {
		t.Errorf("logged the missing file %d times, want once:\n%s", n, logs.String())
	}
}

// tokenKey generates an ECDSA key labelled label on tok (no daemon running) and returns
// its public key.
func tokenKey(t *testing.T, env *devenv.Env, tok *devenv.Token, label string) crypto.PublicKey {
	t.Helper()
	var pub crypto.PublicKey
	withToken(t, env, tok, func(ctx context.Context, cl *hsm.Cluster) {
		var err error
		if pub, err = cl.GenerateIdentityKey(ctx, label); err != nil {
			t.Fatal(err)
		}
	})
	return pub
}

func TestTLS_KeyOnToken(t *testing.T) {
	tests := []struct {
		name string
		// keyYAML configures the key on tok; the daemon's one cluster is env.Tokens[0].
		ownToken bool
		keyYAML  func(env *devenv.Env, tok *devenv.Token) string
	}{
		{
			// hsm has initialised the module and logged in to the token before the listener
			// opens: the signer gets CKR_CRYPTOKI_ALREADY_INITIALIZED and
			// CKR_USER_ALREADY_LOGGED_IN.
			name: "on the cluster's token",
			keyYAML: func(env *devenv.Env, tok *devenv.Token) string {
				return fmt.Sprintf("{module: %s, token: {label: %q}, pin: {file: pin}, label: tls-server}", env.Module, tok.Label)
			},
		},
		{
			// The module is initialised by hsm, the login is the signer's own. Named by URI.
			name:     "on a token of its own, by uri",
			ownToken: true,
			keyYAML: func(env *devenv.Env, tok *devenv.Token) string {
				return fmt.Sprintf("{uri: \"pkcs11:serial=%s;object=tls-server;type=private?module-path=%s&pin-source=file:pin\"}", tok.Serial, env.Module)
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clusters := []string{"dhsm-cluster-1"}
			if tt.ownToken {
				clusters = append(clusters, "tls-token")
			}
			env := newEnv(t, clusters...)
			tok := env.Tokens[len(env.Tokens)-1]
			if tt.ownToken { // the second token backs no cluster
				env.Tokens = env.Tokens[:1]
				if err := env.WriteConfig(); err != nil {
					t.Fatal(err)
				}
			}
			pub := tokenKey(t, env, tok, "tls-server")
			ca := testCA(t, "TLS test CA")
			leaf := issueLeaf(t, ca, pub, "hsmbridge-on-token", false)
			replaceFile(t, filepath.Join(env.Dir, "tls.pem"), []byte(devenv.CertPEM(leaf)))
			appendConfig(t, env, "server:\n  tls:\n    cert_file: tls.pem\n    key: "+tt.keyYAML(env, tok)+"\n")

			// check opens the key as serve will, and proves it is the certificate's.
			var out bytes.Buffer
			if err := run(context.Background(), []string{"check", "--config", env.ConfigPath}, &out, io.Discard); err != nil {
				t.Fatalf("check: %v\n%s", err, out.String())
			}
			tlsLine := lineFor(t, strings.Split(out.String(), "\n"), "server.tls")
			if want := "  ok  certificate CN=hsmbridge-on-token valid until"; !strings.Contains(tlsLine, want) {
				t.Errorf("check's TLS line lacks %q:\n%s", want, tlsLine)
			}
			if want := `key "tls-server" on token`; !strings.Contains(tlsLine, want) {
				t.Errorf("check's TLS line lacks %q:\n%s", want, tlsLine)
			}

			base, _ := startDaemon(t, env)
			addr := strings.TrimPrefix(base, "http://")
			for _, v := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
				st := handshake(t, addr, pool(ca), v)
				if st.Version != v {
					t.Errorf("negotiated %s, want %s", tls.VersionName(st.Version), tls.VersionName(v))
				}
				got := st.PeerCertificates[0]
				if _, err := got.Verify(x509.VerifyOptions{Roots: pool(ca), DNSName: "127.0.0.1"}); err != nil {
					t.Errorf("served chain does not verify: %v", err)
				}
				if !publicKeysEqual(got.PublicKey, pub) {
					t.Errorf("%s: the served certificate's key is not the token key", tls.VersionName(v))
				}
			}
			if code, err := httpsGet("https://"+addr+"/healthz", &tls.Config{RootCAs: pool(ca)}); err != nil || code != http.StatusOK {
				t.Fatalf("GET /healthz over TLS = %d, %v; want 200", code, err)
			}
		})
	}
}

// TestTLS_TokenSignerCoexistsWithHSM runs the signer beside hsm's clusters on one module in
// both orders, through a C_Finalize and C_Initialize by hsm under it (as hsm's recovery
// does), with ECDSA and RSA keys (PKCS #1 v1.5 and PSS).
func TestTLS_TokenSignerCoexistsWithHSM(t *testing.T) {
	env := newEnv(t, "dhsm-cluster-1")
	tok := env.Tokens[0]
	ctx := context.Background()
	pin := readPIN(t, env)
	openCl := func() *hsm.Cluster {
		t.Helper()
		cl, err := hsm.OpenCluster(ctx, hsm.ClusterConfig{
			ID: tok.ClusterID, ModulePath: env.Module, TokenSerial: tok.Serial, PIN: pin, PoolSize: 1,
			IdentityKeyLabel: tok.KeyLabel, IdentityCertLabel: tok.CertLabel,
		})
		if err != nil {
			t.Fatalf("OpenCluster: %v", err)
		}
		return cl
	}
	cl := openCl()
	ecPub, err := cl.GenerateIdentityKey(ctx, "tls-ec")
	if err != nil {
		t.Fatal(err)
	}
	rsaPub, err := cl.GenerateRSA(ctx, "tls-rsa", 2048, hsm.UsageSign) // labelled with its id
	if err != nil {
		t.Fatal(err)
	}
	ca := testCA(t, "TLS test CA")
	key := func(label string, pub crypto.PublicKey) *tokenSigner {
		t.Helper()
		certFile := filepath.Join(t.TempDir(), "cert.pem")
		replaceFile(t, certFile, []byte(devenv.CertPEM(issueLeaf(t, ca, pub, label, false))))
		s, err := openTokenSigner(config.TLSKey{
			Module: env.Module, Token: config.TokenSel{Label: tok.Label}, PIN: config.PINSource{File: env.PINPath}, Label: label,
		}, certFile)
		if err != nil {
			t.Fatalf("openTokenSigner %s: %v", label, err)
		}
		return s
	}
	ecSigner, rsaSigner := key("tls-ec", ecPub), key("tls-rsa", rsaPub)
	defer ecSigner.Close()
	defer rsaSigner.Close()

	signs := func(what string) {
		t.Helper()
		digest := sha256.Sum256([]byte(what))
		sig, err := ecSigner.Sign(rand.Reader, digest[:], crypto.SHA256)
		if err != nil || !ecdsa.VerifyASN1(ecPub.(*ecdsa.PublicKey), digest[:], sig) {
			t.Fatalf("%s: ECDSA sign: %v (or the signature does not verify)", what, err)
		}
		sig, err = rsaSigner.Sign(rand.Reader, digest[:], crypto.SHA256)
		if err == nil {
			err = rsa.VerifyPKCS1v15(rsaPub, crypto.SHA256, digest[:], sig)
		}
		if err != nil {
			t.Fatalf("%s: RSA PKCS #1 v1.5: %v", what, err)
		}
		pss := &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: crypto.SHA256}
		sig, err = rsaSigner.Sign(rand.Reader, digest[:], pss)
		if err == nil {
			err = rsa.VerifyPSS(rsaPub, crypto.SHA256, digest[:], sig, pss)
		}
		if err != nil {
			t.Fatalf("%s: RSA-PSS: %v", what, err)
		}
		if err := cl.ProveIdentity(ctx); err != nil {
			t.Fatalf("%s: the cluster beside the signer: %v", what, err)
		}
	}
	signs("hsm initialised first")

	// hsm's last cluster on the module closes: C_Finalize under the signer's session.
	if err := cl.Close(ctx); err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("alone"))
	if _, err := ecSigner.Sign(rand.Reader, digest[:], crypto.SHA256); err != nil {
		t.Fatalf("sign after hsm finalized the module: %v", err)
	}
	// Now the signer initialised the module and logged in; hsm comes second.
	cl = openCl()
	defer cl.Close(ctx)
	signs("signer initialised first")

	// Both handshakes through a plain tls server on the RSA signer (PSS in 1.3, and 1.2).
	leaf := issueLeaf(t, ca, rsaPub, "rsa-on-token", false)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{leaf.Raw}, PrivateKey: rsaSigner, Leaf: leaf}}})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_ = c.(*tls.Conn).Handshake()
			_ = c.Close()
		}
	}()
	for _, v := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
		if got := handshake(t, ln.Addr().String(), pool(ca), v).PeerCertificates[0]; !got.Equal(leaf) {
			t.Errorf("%s: wrong certificate", tls.VersionName(v))
		}
	}
}

func TestTLS_ClientCertificateRequired(t *testing.T) {
	env := newEnv(t, "dhsm-cluster-1")
	serverCA, clientCA, otherCA := testCA(t, "server CA"), testCA(t, "client CA"), testCA(t, "other CA")
	key, cert := newLeaf(t, serverCA, "server", false)
	writeTLSFiles(t, filepath.Join(env.Dir, "tls.pem"), filepath.Join(env.Dir, "tls.key"), cert, key)
	replaceFile(t, filepath.Join(env.Dir, "clients.pem"), []byte(clientCA.PEM()))
	appendConfig(t, env, "server:\n  tls: {cert_file: tls.pem, key_file: tls.key, client_ca: clients.pem}\n")
	base, _ := startDaemon(t, env)
	url := "https://" + strings.TrimPrefix(base, "http://") + "/healthz"

	clientCert := func(ca *devenv.CA) []tls.Certificate {
		k, c := newLeaf(t, ca, "frontend", true)
		return []tls.Certificate{{Certificate: [][]byte{c.Raw}, PrivateKey: k, Leaf: c}}
	}
	for _, tt := range []struct {
		name  string
		certs []tls.Certificate
		ok    bool
	}{
		{name: "no client certificate"},
		{name: "certificate from another CA", certs: clientCert(otherCA)},
		{name: "certificate from client_ca", certs: clientCert(clientCA), ok: true},
	} {
		for _, v := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
			tc := &tls.Config{RootCAs: pool(serverCA), MaxVersion: v}
			if tt.certs != nil {
				// Sent whatever the server's acceptable CAs are (Go's client would otherwise
				// withhold a certificate the server cannot verify).
				tc.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &tt.certs[0], nil }
			}
			code, err := httpsGet(url, tc)
			switch {
			case tt.ok && (err != nil || code != http.StatusOK):
				t.Errorf("%s, %s: GET = %d, %v; want 200", tt.name, tls.VersionName(v), code, err)
			case !tt.ok && err == nil:
				t.Errorf("%s, %s: GET = %d; want the handshake refused", tt.name, tls.VersionName(v), code)
			case !tt.ok:
				t.Logf("%s, %s: refused: %v", tt.name, tls.VersionName(v), err)
			}
		}
	}
}
