package hsm

import (
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"fmt"

	"github.com/miekg/pkcs11"
)

// ProveIdentity checks that the token holds the private key of the cluster's identity
// certificate: it signs a fresh random challenge on the token with the identity key and
// verifies the signature with the certificate's public key. A certificate that merely chains
// to the right CA proves nothing about the slot; this does.
func (c *Cluster) ProveIdentity(ctx context.Context) error {
	return c.proveIdentity(ctx, func(fn func(*Session) ([]byte, error)) ([]byte, error) {
		return run(ctx, c, true, fn)
	})
}

// proveIdentity signs through do: run for callers, the new pool directly for recovery,
// while the breaker still refuses other work.
func (c *Cluster) proveIdentity(ctx context.Context, do func(func(*Session) ([]byte, error)) ([]byte, error)) error {
	if c.cert == nil {
		return fmt.Errorf("cluster %s: %w: no identity configured", c.id, ErrIdentity)
	}
	challenge := make([]byte, 32)
	if _, err := rand.Read(challenge); err != nil {
		return fmt.Errorf("cluster %s: challenge: %w", c.id, err)
	}
	digest := sha256.Sum256(challenge)
	var mech uint
	var input []byte
	switch c.cert.PublicKey.(type) {
	case *ecdsa.PublicKey:
		mech, input = pkcs11.CKM_ECDSA, digest[:]
	case *rsa.PublicKey:
		mech, input = pkcs11.CKM_SHA256_RSA_PKCS, challenge
	default:
		return fmt.Errorf("cluster %s: %w: identity key type %T not supported", c.id, ErrIdentity, c.cert.PublicKey)
	}
	sig, err := do(func(s *Session) ([]byte, error) {
		key, err := s.findOne([]*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, c.keyLabel),
		})
		if err != nil {
			return nil, fmt.Errorf("identity key %q: %w", c.keyLabel, err)
		}
		return s.sign(key, mech, input)
	})
	if err != nil {
		return fmt.Errorf("cluster %s: prove identity: %w", c.id, err)
	}
	if mech == pkcs11.CKM_ECDSA {
		if sig, err = ecdsaDER(sig); err != nil {
			return fmt.Errorf("cluster %s: %w: %w", c.id, ErrIdentity, err)
		}
	}
	if !verifyDER(c.cert.PublicKey, digest[:], sig) {
		return fmt.Errorf("cluster %s: %w: the token's key %q does not match the identity certificate", c.id, ErrIdentity, c.keyLabel)
	}
	return nil
}
