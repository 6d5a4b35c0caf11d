// Package devenv makes a development environment for hsmbridge on SoftHSMv2: a SoftHSM
// configuration and token directory, initialised tokens (one per cluster) each holding an
// identity key pair and its certificate, the dev CA that issued them, a PIN file, an
// X-Auth-Token file and a daemon configuration. `hsmbridge dev init` and the end-to-end
// tests use the same code. Tokens are made with PKCS#11 calls alone, through package hsm.
//
// Nothing here is for production: the CA key is written to disk.
package devenv

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/hsmbridge/hsmbridge/hsm"
	"github.com/hsmbridge/hsmbridge/keystore/api"
)

// softHSMPaths are where Debian and other distributions install the module.
var softHSMPaths = []string{
	"/usr/lib/softhsm/libsofthsm2.so",
	"/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
	"/usr/lib64/pkcs11/libsofthsm2.so",
	"/usr/local/lib/softhsm/libsofthsm2.so",
}

// FindSoftHSM returns the path of the SoftHSMv2 module: $HSMBRIDGE_SOFTHSM_MODULE if set,
// else the first that exists of the usual places.
func FindSoftHSM() (string, error) {
	if p := os.Getenv("HSMBRIDGE_SOFTHSM_MODULE"); p != "" {
		return p, nil
	}
	for _, p := range softHSMPaths {
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", errors.New("SoftHSMv2 module not found (install the softhsm2 package, or set HSMBRIDGE_SOFTHSM_MODULE)")
}

// UseSoftHSMDir writes dir/softhsm2.conf with its token directory dir/tokens and points
// SOFTHSM2_CONF of this process at it. SoftHSM reads it at C_Initialize, so call it before
// the module is first opened in the process. It never touches the system token directory.
func UseSoftHSMDir(dir string) (confPath string, err error) {
	tokens := filepath.Join(dir, "tokens")
	if err := os.MkdirAll(tokens, 0o700); err != nil {
		return "", fmt.Errorf("softhsm token directory: %w", err)
	}
	confPath = filepath.Join(dir, "softhsm2.conf")
	conf := fmt.Sprintf("directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n", tokens)
	if err := os.WriteFile(confPath, []byte(conf), 0o600); err != nil {
		return "", fmt.Errorf("softhsm config: %w", err)
	}
	if err := os.Setenv("SOFTHSM2_CONF", confPath); err != nil {
		return "", err
	}
	return confPath, nil
}

// CA is a certificate authority held in memory.
type CA struct {
	Cert *x509.Certificate
	Key  crypto.Signer
}

// NewCA makes a self-signed ECDSA P-256 CA valid from notBefore to notAfter.
func NewCA(name string, notBefore, notAfter time.Time) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          randomSerial(),
		Subject:               pkix.Name{CommonName: name, Organization: []string{"hsmbridge dev"}},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("dev CA: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &CA{Cert: cert, Key: key}, nil
}

// Issue returns a cluster identity certificate for pub, valid as long as the CA.
func (ca *CA) Issue(pub crypto.PublicKey, commonName string) (*x509.Certificate, error) {
	tmpl := &x509.Certificate{
		SerialNumber: randomSerial(),
		Subject:      pkix.Name{CommonName: commonName, Organization: []string{"hsmbridge dev"}},
		NotBefore:    ca.Cert.NotBefore,
		NotAfter:     ca.Cert.NotAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, pub, ca.Key)
	if err != nil {
		return nil, fmt.Errorf("issue %s: %w", commonName, err)
	}
	return x509.ParseCertificate(der)
}

// PEM returns the CA certificate in PEM, as a caller passes it in hsm_ca_cert.
func (ca *CA) PEM() string { return CertPEM(ca.Cert) }

// CertPEM encodes a certificate in PEM.
func CertPEM(c *x509.Certificate) string {
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}))
}

func randomSerial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 126))
	return n
}

// RandomHex returns n random bytes in lower-case hex.
func RandomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// Token is an initialised token made ready to back a cluster.
type Token struct {
	ClusterID string
	Label     string
	Serial    string
	KeyLabel  string // the identity private key
	CertLabel string // the identity certificate object on the token
	// CertFile, when set, makes the config name this PEM file as the identity certificate
	// instead of the object on the token.
	CertFile  string
	PublicKey crypto.PublicKey
	Identity  *x509.Certificate
}

// Identity object labels on dev tokens.
const (
	IdentityKeyLabel  = "hsmbridge-identity"
	IdentityCertLabel = "hsmbridge-identity"
)

// NewToken initialises a token labelled label on module with the given PINs, generates the
// identity key pair on it and stores the identity certificate that ca issues for it.
func NewToken(ctx context.Context, module, clusterID, label, soPIN, pin string, ca *CA) (*Token, error) {
	serial, err := hsm.InitToken(module, label, soPIN, pin)
	if err != nil {
		return nil, fmt.Errorf("token %s: %w", label, err)
	}
	t := &Token{ClusterID: clusterID, Label: label, Serial: serial, KeyLabel: IdentityKeyLabel, CertLabel: IdentityCertLabel}
	cl, err := hsm.OpenCluster(ctx, hsm.ClusterConfig{ID: clusterID, ModulePath: module, TokenSerial: serial, TokenLabel: label, PIN: pin, PoolSize: 1})
	if err != nil {
		return nil, err
	}
	defer func() { err = errors.Join(err, cl.Close(ctx)) }()
	if t.PublicKey, err = cl.GenerateIdentityKey(ctx, t.KeyLabel); err != nil {
		return nil, err
	}
	if t.Identity, err = ca.Issue(t.PublicKey, clusterID); err != nil {
		return nil, err
	}
	if err = cl.StoreCertificate(ctx, t.CertLabel, t.Identity); err != nil {
		return nil, err
	}
	return t, nil
}

// Env is a complete development environment in one directory.
type Env struct {
	Dir        string
	Module     string
	ConfigPath string
	PINPath    string
	CA         *CA
	Tokens     []*Token

	// The tenant the dev credentials authenticate as.
	AuthToken string // X-Auth-Token of the token file
	AccessKey string // AK/SK of the credentials file
	SecretKey string
	DomainID  string
	ProjectID string

	// The dev token issuer: its signing key (kept in issuer-key.pem) and key id; its public
	// key is in jwks.json.
	IssuerKey crypto.Signer
	IssuerKID string

	// Listen is the daemon's listen address in the config.
	Listen string
}

// Options for Create.
type Options struct {
	Dir      string
	Module   string   // default: FindSoftHSM
	Clusters []string // cluster ids, default dhsm-cluster-1 and dhsm-cluster-2
	Listen   string   // default 127.0.0.1:8080
}

// Create makes the environment: a token per cluster in the SoftHSM token directory this
// process uses (see UseSoftHSMDir), the dev CA, and the files the daemon reads.
func Create(ctx context.Context, o Options) (*Env, error) {
	if o.Module == "" {
		m, err := FindSoftHSM()
		if err != nil {
			return nil, err
		}
		o.Module = m
	}
	if len(o.Clusters) == 0 {
		o.Clusters = []string{"dhsm-cluster-1", "dhsm-cluster-2"}
	}
	if o.Listen == "" {
		o.Listen = "127.0.0.1:8080"
	}
	if err := os.MkdirAll(o.Dir, 0o700); err != nil {
		return nil, err
	}
	now := time.Now()
	ca, err := NewCA("hsmbridge dev CA", now.Add(-time.Hour), now.AddDate(5, 0, 0))
	if err != nil {
		return nil, err
	}
	e := &Env{
		Dir: o.Dir, Module: o.Module, CA: ca, Listen: o.Listen,
		ConfigPath: filepath.Join(o.Dir, "config.yaml"), PINPath: filepath.Join(o.Dir, "pin"),
		AuthToken: RandomHex(24), DomainID: RandomHex(16), ProjectID: RandomHex(16),
		AccessKey: strings.ToUpper(RandomHex(10)), SecretKey: RandomHex(20),
	}
	issuer, jwks, kid, err := api.GenerateIssuerKey()
	if err != nil {
		return nil, err
	}
	e.IssuerKey, e.IssuerKID = issuer, kid
	issuerDER, err := x509.MarshalPKCS8PrivateKey(issuer)
	if err != nil {
		return nil, err
	}
	pin, soPIN := RandomHex(8), RandomHex(8)
	for _, id := range o.Clusters {
		t, err := NewToken(ctx, o.Module, id, id, soPIN, pin, ca)
		if err != nil {
			return nil, err
		}
		e.Tokens = append(e.Tokens, t)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(ca.Key)
	if err != nil {
		return nil, err
	}
	files := []struct {
		name string
		data string
	}{
		{"pin", pin + "\n"},
		{"so-pin", soPIN + "\n"},
		{"ca.pem", ca.PEM()},
		{"ca.key", string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}))},
		{"auth-token", e.AuthToken + "\n"},
		{"tokens.yaml", e.tokenFile()},
		{"aksk.yaml", e.akskFile()},
		{"jwks.json", string(jwks)},
		{"issuer-key.pem", string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: issuerDER}))},
		{"issuer-kid", kid + "\n"},
		{"env", e.shellEnv()},
	}
	for _, f := range files {
		if err := os.WriteFile(filepath.Join(o.Dir, f.name), []byte(f.data), 0o600); err != nil {
			return nil, err
		}
	}
	return e, e.WriteConfig()
}

func (e *Env) tokenFile() string {
	sum := api.HashToken(e.AuthToken)
	return fmt.Sprintf("tokens:\n  - name: dev\n    token_sha256: %s\n    domain_id: %s\n    project_ids: [%s]\n", sum, e.DomainID, e.ProjectID)
}

func (e *Env) akskFile() string {
	return fmt.Sprintf("credentials:\n  - name: dev\n    domain_id: %s\n    project_ids: [%s]\n    enabled: true\n    keys:\n      - access_key: %s\n        secret_key: %s\n",
		e.DomainID, e.ProjectID, e.AccessKey, e.SecretKey)
}

func (e *Env) shellEnv() string {
	conf := os.Getenv("SOFTHSM2_CONF")
	return fmt.Sprintf("export SOFTHSM2_CONF=%s\nexport HSMBRIDGE_TOKEN=%s\nexport HSMBRIDGE_DOMAIN=%s\nexport HSMBRIDGE_PROJECT=%s\nexport HSMBRIDGE_AK=%s\nexport HSMBRIDGE_SK=%s\n",
		conf, e.AuthToken, e.DomainID, e.ProjectID, e.AccessKey, e.SecretKey)
}

// Dev token issuer names, in the config and in tokens that `hsmbridge token issue` makes.
const (
	DevIssuer   = "hsmbridge-dev"
	DevAudience = "hsmbridge"
)

// WriteConfig (re)writes the daemon configuration from the environment's fields.
func (e *Env) WriteConfig() error {
	var b strings.Builder
	fmt.Fprintf(&b, "listen: %q\nregion: local-1\nstore:\n  driver: sqlite\n  path: hsmbridge.db\n", e.Listen)
	fmt.Fprintf(&b, "auth:\n  token_file: tokens.yaml\n  aksk_file: aksk.yaml\n  jwt: {jwks_file: jwks.json, issuer: %s, audience: %s}\nclusters:\n", DevIssuer, DevAudience)
	for _, t := range e.Tokens {
		fmt.Fprintf(&b, "  - id: %s\n    type: DHSM\n    module: %s\n    token: {serial: %q, label: %q}\n    pin: {file: pin}\n    pool_size: 4\n", t.ClusterID, e.Module, t.Serial, t.Label)
		if t.CertFile != "" {
			fmt.Fprintf(&b, "    identity: {key_label: %q, cert_file: %q}\n", t.KeyLabel, t.CertFile)
		} else {
			fmt.Fprintf(&b, "    identity: {key_label: %q, cert_label: %q}\n", t.KeyLabel, t.CertLabel)
		}
	}
	return os.WriteFile(e.ConfigPath, []byte(b.String()), 0o600)
}
