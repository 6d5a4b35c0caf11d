package hsm

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/miekg/pkcs11"
)

// Signer returns a crypto.Signer over the private key labelled label on the cluster's
// token, whose public key must be pub: it is proved at once by signing a fresh challenge.
// Signatures run through the cluster's pool and error rules like every key operation. It is
// how a TLS key on a token is used (crypto11 cannot share a module with this package: it
// insists on being the one to C_Initialize and C_Finalize it).
func (c *Cluster) Signer(ctx context.Context, label string, pub crypto.PublicKey) (crypto.Signer, error) {
	s := &labelSigner{c: c, key: handleKey{id: label, class: pkcs11.CKO_PRIVATE_KEY, byLabel: true}, pub: pub}
	challenge := make([]byte, sha256.Size)
	_, _ = rand.Read(challenge)
	sig, err := s.sign(ctx, challenge, crypto.SHA256)
	if err != nil {
		return nil, fmt.Errorf("cluster %s: key %q: %w", c.id, label, err)
	}
	if !verifyDER(pub, challenge, sig) {
		return nil, fmt.Errorf("cluster %s: %w: the token's key %q does not match the certificate", c.id, ErrIdentity, label)
	}
	return s, nil
}

type labelSigner struct {
	c   *Cluster
	key handleKey
	pub crypto.PublicKey
}

func (s *labelSigner) Public() crypto.PublicKey { return s.pub }

// signTimeout bounds a signature: crypto.Signer has no context.
const signTimeout = 5 * time.Second

// Sign implements crypto.Signer: ECDSA (ASN.1 DER), RSA PKCS #1 v1.5, and RSA-PSS with
// the salt as long as the hash, which is what TLS uses.
func (s *labelSigner) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), signTimeout)
	defer cancel()
	if pss, ok := opts.(*rsa.PSSOptions); ok {
		if pss.SaltLength != rsa.PSSSaltLengthEqualsHash && pss.SaltLength != opts.HashFunc().Size() {
			return nil, errors.New("sign: RSA-PSS only with the salt as long as the hash")
		}
		return s.c.signDigest(ctx, s.key, SchemeRSAPSS, opts.HashFunc(), digest)
	}
	return s.sign(ctx, digest, opts.HashFunc())
}

func (s *labelSigner) sign(ctx context.Context, digest []byte, hash crypto.Hash) ([]byte, error) {
	switch s.pub.(type) {
	case *ecdsa.PublicKey:
		return s.c.signDigest(ctx, s.key, SchemeECDSA, hash, digest)
	case *rsa.PublicKey:
		return s.c.signDigest(ctx, s.key, SchemePKCS1v15, hash, digest)
	}
	return nil, fmt.Errorf("sign: key type %T not supported", s.pub)
}

// verifyDER checks a SHA-256 signature as Sign makes them (ECDSA in ASN.1 DER).
func verifyDER(pub crypto.PublicKey, digest, sig []byte) bool {
	switch pub := pub.(type) {
	case *ecdsa.PublicKey:
		return ecdsa.VerifyASN1(pub, digest, sig)
	case *rsa.PublicKey:
		return rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest, sig) == nil
	}
	return false
}
