package hsm_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"errors"
	"testing"

	"github.com/hsmbridge/hsmbridge/hsm"
	"github.com/hsmbridge/hsmbridge/internal/devenv"
)

func TestProveIdentity(t *testing.T) {
	cl, tok := newCluster(t)
	if err := cl.ProveIdentity(t.Context()); err != nil {
		t.Fatalf("ProveIdentity: %v", err)
	}
	if got := cl.IdentityCertificate(); got == nil || !got.Equal(tok.Identity) {
		t.Errorf("IdentityCertificate is not the token's identity certificate")
	}
}

func TestProveIdentity_CertFromPEM(t *testing.T) {
	tok := newToken(t, "")
	cfg := configFor(tok)
	cfg.IdentityCertLabel = ""
	cfg.IdentityCertPEM = []byte(devenv.CertPEM(tok.Identity))
	if err := openCluster(t, cfg).ProveIdentity(t.Context()); err != nil {
		t.Fatalf("ProveIdentity: %v", err)
	}
}

// TestProveIdentity_CertOfAnotherKey: a certificate from the right CA for a key the token
// does not hold proves nothing: ErrIdentity. The PEM certificate is preferred over the one
// on the token when both are configured.
func TestProveIdentity_CertOfAnotherKey(t *testing.T) {
	tok := newToken(t, "")
	other, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := testCA.Issue(other.Public(), tok.ClusterID)
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name      string
		certLabel string
	}{{"PEMOnly", ""}, {"PEMAndLabel", tok.CertLabel}} {
		t.Run(tt.name, func(t *testing.T) {
			cfg := configFor(tok)
			cfg.IdentityCertLabel = tt.certLabel
			cfg.IdentityCertPEM = []byte(devenv.CertPEM(cert))
			err := openCluster(t, cfg).ProveIdentity(t.Context())
			if !errors.Is(err, hsm.ErrIdentity) {
				t.Fatalf("err = %v, want ErrIdentity", err)
			}
		})
	}
}

func TestProveIdentity_NoIdentityConfigured(t *testing.T) {
	cfg := configFor(newToken(t, ""))
	cfg.IdentityKeyLabel, cfg.IdentityCertLabel = "", ""
	cl := openCluster(t, cfg)
	if cl.IdentityCertificate() != nil {
		t.Error("IdentityCertificate set with no identity configured")
	}
	if err := cl.ProveIdentity(t.Context()); !errors.Is(err, hsm.ErrIdentity) {
		t.Errorf("err = %v, want ErrIdentity", err)
	}
}

func TestProveIdentity_KeyMissing(t *testing.T) {
	cfg := configFor(newToken(t, ""))
	cfg.IdentityKeyLabel = "no-such-key"
	err := openCluster(t, cfg).ProveIdentity(t.Context())
	if !errors.Is(err, hsm.ErrObjectNotFound) {
		t.Errorf("err = %v, want ErrObjectNotFound", err)
	}
}

func TestOpenCluster_BadIdentityCert(t *testing.T) {
	tok := newToken(t, "")
	tests := []struct {
		name      string
		certLabel string
		pem       []byte
		want      error
	}{
		{"LabelNotOnToken", "no-such-cert", nil, hsm.ErrObjectNotFound},
		{"NotPEM", "", []byte("not a certificate"), nil},
		{"PEMNotCertificate", "", []byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"), nil},
		{"Neither", "", nil, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := configFor(tok)
			cfg.IdentityCertLabel, cfg.IdentityCertPEM = tt.certLabel, tt.pem
			cl, err := hsm.OpenCluster(t.Context(), cfg)
			if err == nil {
				_ = cl.Close(t.Context())
				t.Fatal("OpenCluster succeeded")
			}
			if tt.want != nil && !errors.Is(err, tt.want) {
				t.Errorf("err = %v, want %v", err, tt.want)
			}
		})
	}
	// The failed opens released everything: the token opens again.
	if err := openCluster(t, configFor(tok)).ProveIdentity(t.Context()); err != nil {
		t.Fatalf("ProveIdentity after failed opens: %v", err)
	}
}
