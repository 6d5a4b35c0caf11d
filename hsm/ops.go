package hsm

import (
	"context"
	"crypto"
	"encoding/asn1"
	"fmt"
	"math/big"

	"github.com/miekg/pkcs11"
)

// The key operations of the hot path. Each takes one pooled session and one cached handle.

// SignScheme is how a digest is signed.
type SignScheme uint8

const (
	SchemeECDSA    SignScheme = iota // CKM_ECDSA over the digest; the result is ASN.1 DER
	SchemePKCS1v15                   // CKM_RSA_PKCS over DigestInfo ‖ digest
	SchemeRSAPSS                     // CKM_RSA_PKCS_PSS, MGF1 with the same hash, salt = hash length
)

// digestInfoPrefix is the DER prefix of a PKCS#1 v1.5 DigestInfo for each hash (RFC 8017 §9.2).
var digestInfoPrefix = map[crypto.Hash][]byte{
	crypto.SHA256: {0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20},
	crypto.SHA384: {0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05, 0x00, 0x04, 0x30},
	crypto.SHA512: {0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03, 0x05, 0x00, 0x04, 0x40},
}

var pssHash = map[crypto.Hash][2]uint{
	crypto.SHA256: {pkcs11.CKM_SHA256, pkcs11.CKG_MGF1_SHA256},
	crypto.SHA384: {pkcs11.CKM_SHA384, pkcs11.CKG_MGF1_SHA384},
	crypto.SHA512: {pkcs11.CKM_SHA512, pkcs11.CKG_MGF1_SHA512},
}

// SignDigest signs digest (of hash) with private key id by scheme. ECDSA signatures come
// back in ASN.1 DER, as the wire and Go's crypto/ecdsa expect, not PKCS#11's r‖s.
func (c *Cluster) SignDigest(ctx context.Context, id string, scheme SignScheme, hash crypto.Hash, digest []byte) ([]byte, error) {
	return c.signDigest(ctx, privateKey(id, pkcs11.CKO_PRIVATE_KEY), scheme, hash, digest)
}

func (c *Cluster) signDigest(ctx context.Context, key handleKey, scheme SignScheme, hash crypto.Hash, digest []byte) ([]byte, error) {
	if len(digest) != hash.Size() {
		return nil, fmt.Errorf("sign: digest is %d bytes, %v needs %d", len(digest), hash, hash.Size())
	}
	var mech *pkcs11.Mechanism
	input := digest
	switch scheme {
	case SchemeECDSA:
		mech = pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil)
	case SchemePKCS1v15:
		prefix, ok := digestInfoPrefix[hash]
		if !ok {
			return nil, fmt.Errorf("sign: hash %v not supported", hash)
		}
		input = append(append(make([]byte, 0, len(prefix)+len(digest)), prefix...), digest...)
		mech = pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS, nil)
	case SchemeRSAPSS:
		h, ok := pssHash[hash]
		if !ok {
			return nil, fmt.Errorf("sign: hash %v not supported", hash)
		}
		mech = pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_PSS, pkcs11.NewPSSParams(h[0], h[1], uint(hash.Size())))
	default:
		return nil, fmt.Errorf("sign: unknown scheme %d", scheme)
	}
	sig, err := withKey(ctx, c, key, func(s *Session, h pkcs11.ObjectHandle) ([]byte, error) {
		if err := s.api.SignInit(s.h, []*pkcs11.Mechanism{mech}, h); err != nil {
			return nil, opErr(c.id, "C_SignInit", err)
		}
		sig, err := s.api.Sign(s.h, input)
		return sig, opErr(c.id, "C_Sign", err)
	})
	if err != nil {
		return nil, fmt.Errorf("cluster %s: sign with key %s: %w", c.id, key.id, err)
	}
	if scheme == SchemeECDSA {
		return ecdsaDER(sig)
	}
	return sig, nil
}

// ecdsaDER turns PKCS#11's r‖s into an ASN.1 ECDSA-Sig-Value.
func ecdsaDER(rs []byte) ([]byte, error) {
	if len(rs) == 0 || len(rs)%2 != 0 {
		return nil, fmt.Errorf("sign: ECDSA signature of %d bytes is not r‖s", len(rs))
	}
	n := len(rs) / 2
	return asn1.Marshal(struct{ R, S *big.Int }{new(big.Int).SetBytes(rs[:n]), new(big.Int).SetBytes(rs[n:])})
}

// EncryptGCM encrypts plaintext with AES key id in GCM mode with the caller's 96-bit iv and
// aad, and returns ciphertext ‖ 128-bit tag. The caller makes the IV: SoftHSM cannot.
func (c *Cluster) EncryptGCM(ctx context.Context, id string, iv, aad, plaintext []byte) ([]byte, error) {
	return c.gcm(ctx, "encrypt", id, iv, aad, plaintext)
}

// DecryptGCM reverses EncryptGCM. A wrong tag or AAD is a caller-class error.
func (c *Cluster) DecryptGCM(ctx context.Context, id string, iv, aad, ciphertext []byte) ([]byte, error) {
	return c.gcm(ctx, "decrypt", id, iv, aad, ciphertext)
}

func (c *Cluster) gcm(ctx context.Context, dir, id string, iv, aad, in []byte) ([]byte, error) {
	out, err := withKey(ctx, c, privateKey(id, pkcs11.CKO_SECRET_KEY), func(s *Session, key pkcs11.ObjectHandle) ([]byte, error) {
		params := pkcs11.NewGCMParams(iv, aad, 128)
		defer params.Free() // miekg allocates the parameters in C memory
		mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}
		if dir == "encrypt" {
			if err := s.api.EncryptInit(s.h, mech, key); err != nil {
				return nil, opErr(c.id, "C_EncryptInit", err)
			}
			out, err := s.api.Encrypt(s.h, in)
			return out, opErr(c.id, "C_Encrypt", err)
		}
		if err := s.api.DecryptInit(s.h, mech, key); err != nil {
			return nil, opErr(c.id, "C_DecryptInit", err)
		}
		out, err := s.api.Decrypt(s.h, in)
		return out, opErr(c.id, "C_Decrypt", err)
	})
	if err != nil {
		return nil, fmt.Errorf("cluster %s: %s with key %s: %w", c.id, dir, id, err)
	}
	return out, nil
}

// DecryptOAEP decrypts an RSAES-OAEP ciphertext (SHA-256, MGF1-SHA-256, no label) with RSA
// private key id. Encryption needs only the public key and happens on the host.
//
// Tokens that offer OAEP only with SHA-1 (SoftHSM 2.6 refuses SHA-256 parameters with
// CKR_ARGUMENTS_BAD) get raw RSA on the token (CKM_RSA_X_509) and the OAEP decoding, in
// constant time, on the host; the cluster remembers that and skips the refused attempt.
func (c *Cluster) DecryptOAEP(ctx context.Context, id string, ciphertext []byte) ([]byte, error) {
	out, err := withKey(ctx, c, privateKey(id, pkcs11.CKO_PRIVATE_KEY), func(s *Session, key pkcs11.ObjectHandle) ([]byte, error) {
		if !c.oaepOnHost.Load() {
			mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_OAEP,
				pkcs11.NewOAEPParams(pkcs11.CKM_SHA256, pkcs11.CKG_MGF1_SHA256, pkcs11.CKZ_DATA_SPECIFIED, nil))}
			err := s.api.DecryptInit(s.h, mech, key)
			if err == nil {
				out, err := s.api.Decrypt(s.h, ciphertext)
				return out, opErr(c.id, "C_Decrypt", err)
			}
			if code, ok := Code(err); !ok || (code != pkcs11.CKR_ARGUMENTS_BAD && code != pkcs11.CKR_MECHANISM_PARAM_INVALID && code != pkcs11.CKR_MECHANISM_INVALID) {
				return nil, opErr(c.id, "C_DecryptInit", err)
			}
			c.oaepOnHost.Store(true)
		}
		if err := s.api.DecryptInit(s.h, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_X_509, nil)}, key); err != nil {
			return nil, opErr(c.id, "C_DecryptInit", err)
		}
		em, err := s.api.Decrypt(s.h, ciphertext)
		if err != nil {
			return nil, opErr(c.id, "C_Decrypt", err)
		}
		pt, err := oaepSHA256Decode(em, len(ciphertext))
		if err != nil {
			return nil, &OpError{Cluster: c.id, Func: "C_Decrypt", Class: ClassCaller, Err: err}
		}
		return pt, nil
	})
	if err != nil {
		return nil, fmt.Errorf("cluster %s: decrypt with key %s: %w", c.id, id, err)
	}
	return out, nil
}

// Random returns n bytes from the token's random number generator.
func (c *Cluster) Random(ctx context.Context, n int) ([]byte, error) {
	b, err := run(ctx, c, true, func(s *Session) ([]byte, error) { return s.GenerateRandom(n) })
	if err != nil {
		return nil, fmt.Errorf("cluster %s: random: %w", c.id, err)
	}
	return b, nil
}
