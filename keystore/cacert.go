package keystore

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"time"
)

// caCert is an hsm_ca_cert that passed the checks of a CA certificate on its own.
type caCert struct{ *x509.Certificate }

// parseCACert accepts exactly one PEM CERTIFICATE block that is a CA certificate (basic
// constraints CA:TRUE, certificate-signing usage) and is valid at now. Each refusal says
// which check failed, since the caller has to fix the certificate they pasted.
func parseCACert(text string, now time.Time) (*caCert, error) {
	block, rest := pem.Decode([]byte(text))
	if block == nil {
		return nil, newError(KindCACertificate, "hsm_ca_cert is not PEM: expected a -----BEGIN CERTIFICATE----- block")
	}
	if block.Type != "CERTIFICATE" {
		return nil, newError(KindCACertificate, "hsm_ca_cert holds a PEM %q block, not a CERTIFICATE", block.Type)
	}
	if len(bytes.TrimSpace(rest)) > 0 {
		return nil, newError(KindCACertificate, "hsm_ca_cert must hold exactly one certificate")
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, &Error{Kind: KindCACertificate, Msg: "hsm_ca_cert does not parse as an X.509 certificate", Err: err}
	}
	if !cert.BasicConstraintsValid || !cert.IsCA {
		return nil, newError(KindCACertificate, "hsm_ca_cert is not a CA certificate (basic constraints do not say CA:TRUE)")
	}
	if cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, newError(KindCACertificate, "hsm_ca_cert is not allowed to sign certificates (no keyCertSign usage)")
	}
	if now.Before(cert.NotBefore) {
		return nil, newError(KindCACertificate, "hsm_ca_cert is not valid before %s", cert.NotBefore.UTC().Format(time.RFC3339))
	}
	if now.After(cert.NotAfter) {
		return nil, newError(KindCACertificate, "hsm_ca_cert expired on %s", cert.NotAfter.UTC().Format(time.RFC3339))
	}
	return &caCert{cert}, nil
}

// issued checks that the CA issued the cluster's identity certificate, valid at now.
func (ca *caCert) issued(identity *x509.Certificate, now time.Time) error {
	// The identity's own validity first, so a stale cluster certificate is not blamed on
	// the caller's CA.
	if now.After(identity.NotAfter) {
		return newError(KindCACertificate, "the cluster's identity certificate expired on %s (hsm_ca_cert is not the problem)", identity.NotAfter.UTC().Format(time.RFC3339))
	}
	if now.Before(identity.NotBefore) {
		return newError(KindCACertificate, "the cluster's identity certificate is not valid before %s (hsm_ca_cert is not the problem)", identity.NotBefore.UTC().Format(time.RFC3339))
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca.Certificate)
	_, err := identity.Verify(x509.VerifyOptions{
		Roots:       roots,
		CurrentTime: now,
		KeyUsages:   []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		return &Error{Kind: KindCACertificate, Err: err,
			Msg: "hsm_ca_cert did not issue this cluster's identity certificate"}
	}
	return nil
}
