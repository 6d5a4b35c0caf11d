package hsm

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"encoding/asn1"
	"errors"
	"fmt"
	"math/big"
	"sync"

	"github.com/miekg/pkcs11"
)

// Keys on a token. A key is named by its id (CKA_ID and CKA_LABEL); its material is
// generated on the token (CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE true, CKA_EXTRACTABLE false)
// and never leaves it. Operations find the key's object handle in a per-cluster cache, not
// with C_FindObjects, which is linear in the token's object count.

// Usage says what a generated asymmetric key may do.
type Usage uint8

const (
	UsageSign Usage = 1 << iota
	UsageDecrypt
)

// handleCache maps (key id, object class) to an object handle. Handles of token objects stay
// valid across sessions of this process until the object is destroyed or the module is
// re-initialised; a stale one shows as CKR_OBJECT_HANDLE_INVALID or CKR_KEY_HANDLE_INVALID.
type handleCache struct {
	mu sync.RWMutex
	m  map[handleKey]pkcs11.ObjectHandle
}

// handleKey names a key's object: by CKA_ID (our keys) or, with byLabel, by CKA_LABEL (a
// key provisioned by someone else, such as a TLS key).
type handleKey struct {
	id      string
	class   uint
	byLabel bool
}

func (hc *handleCache) get(k handleKey) (pkcs11.ObjectHandle, bool) {
	hc.mu.RLock()
	defer hc.mu.RUnlock()
	h, ok := hc.m[k]
	return h, ok
}

func (hc *handleCache) put(k handleKey, h pkcs11.ObjectHandle) {
	hc.mu.Lock()
	defer hc.mu.Unlock()
	if hc.m == nil {
		hc.m = map[handleKey]pkcs11.ObjectHandle{}
	}
	hc.m[k] = h
}

// clear forgets every handle: after the module is re-initialised none is valid.
func (hc *handleCache) clear() {
	hc.mu.Lock()
	defer hc.mu.Unlock()
	clear(hc.m)
}

func (hc *handleCache) drop(id string) {
	hc.mu.Lock()
	defer hc.mu.Unlock()
	for k := range hc.m {
		if k.id == id {
			delete(hc.m, k)
		}
	}
}

// keyHandle returns the handle of k's object, from the cache or the token.
func (c *Cluster) keyHandle(s *Session, k handleKey) (pkcs11.ObjectHandle, error) {
	if h, ok := c.handles.get(k); ok {
		return h, nil
	}
	name := pkcs11.NewAttribute(pkcs11.CKA_ID, []byte(k.id))
	if k.byLabel {
		name = pkcs11.NewAttribute(pkcs11.CKA_LABEL, k.id)
	}
	h, err := s.findOne([]*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, k.class), name})
	if err != nil {
		return 0, fmt.Errorf("key %s: %w", k.id, err)
	}
	c.handles.put(k, h)
	return h, nil
}

// privateKey names our key id's private (or secret) object.
func privateKey(id string, class uint) handleKey { return handleKey{id: id, class: class} }

// withKey runs op on a pooled session with k's handle. When the handle turns out stale it
// is dropped from the cache, so the retry (run retries a session-class error once) looks
// the key up afresh.
func withKey[T any](ctx context.Context, c *Cluster, k handleKey, op func(*Session, pkcs11.ObjectHandle) (T, error)) (T, error) {
	return run(ctx, c, true, func(s *Session) (T, error) {
		var zero T
		h, err := c.keyHandle(s, k)
		if err != nil {
			return zero, err
		}
		res, err := op(s, h)
		if code, ok := Code(err); ok && (code == pkcs11.CKR_OBJECT_HANDLE_INVALID || code == pkcs11.CKR_KEY_HANDLE_INVALID) {
			c.handles.drop(k.id)
		}
		return res, err
	})
}

func keyTemplate(id string, extra ...*pkcs11.Attribute) []*pkcs11.Attribute {
	return append([]*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_ID, []byte(id)),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, id),
	}, extra...)
}

// privateTemplate is the template of secret and private keys. Every capability is set
// explicitly: SoftHSM's defaults allow unwrap and derive, through which a key could be used
// for what its usage forbids.
func privateTemplate(id string, extra ...*pkcs11.Attribute) []*pkcs11.Attribute {
	return keyTemplate(id, append([]*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
	}, extra...)...)
}

// GenerateAES makes an AES key of bits on the token for encryption and decryption.
// Key generation is never retried: a retry could leave two keys with one id.
func (c *Cluster) GenerateAES(ctx context.Context, id string, bits int) error {
	err := exec(ctx, c, false, func(s *Session) error {
		_, err := s.api.GenerateKey(s.h, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)},
			privateTemplate(id,
				pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
				pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
				pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, bits/8),
				pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
				pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
				pkcs11.NewAttribute(pkcs11.CKA_SIGN, false),
				pkcs11.NewAttribute(pkcs11.CKA_VERIFY, false),
				pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
			))
		return opErr(c.id, "C_GenerateKey", err)
	})
	if err != nil {
		return fmt.Errorf("cluster %s: generate AES-%d key %s: %w", c.id, bits, id, err)
	}
	return nil
}

// GenerateRSA makes an RSA key pair of bits on the token and returns its public key.
func (c *Cluster) GenerateRSA(ctx context.Context, id string, bits int, usage Usage) (*rsa.PublicKey, error) {
	pub, err := c.generatePair(ctx, id, pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, usage,
		[]*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_MODULUS_BITS, bits),
			pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, []byte{1, 0, 1}),
		}, readRSAPublic)
	if err != nil {
		return nil, fmt.Errorf("cluster %s: generate RSA-%d key %s: %w", c.id, bits, id, err)
	}
	return pub.(*rsa.PublicKey), nil
}

// Curves the token is asked for, by their DER-encoded named-curve OIDs.
var curveParams = map[elliptic.Curve][]byte{
	elliptic.P256(): oidP256,
	elliptic.P384(): {0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22},
}

// GenerateEC makes an ECDSA key pair on curve (P-256 or P-384) and returns its public key.
func (c *Cluster) GenerateEC(ctx context.Context, id string, curve elliptic.Curve, usage Usage) (*ecdsa.PublicKey, error) {
	params, ok := curveParams[curve]
	if !ok {
		return nil, fmt.Errorf("cluster %s: curve %s not supported", c.id, curve.Params().Name)
	}
	pub, err := c.generatePair(ctx, id, pkcs11.CKM_EC_KEY_PAIR_GEN, usage,
		[]*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, params)},
		func(s *Session, h pkcs11.ObjectHandle) (crypto.PublicKey, error) { return readECPublic(s, h, curve) })
	if err != nil {
		return nil, fmt.Errorf("cluster %s: generate EC %s key %s: %w", c.id, curve.Params().Name, id, err)
	}
	return pub.(*ecdsa.PublicKey), nil
}

func (c *Cluster) generatePair(ctx context.Context, id string, mech uint, usage Usage, pubAttrs []*pkcs11.Attribute,
	readPublic func(*Session, pkcs11.ObjectHandle) (crypto.PublicKey, error)) (crypto.PublicKey, error) {
	sign, decrypt := usage&UsageSign != 0, usage&UsageDecrypt != 0
	return run(ctx, c, false, func(s *Session) (crypto.PublicKey, error) {
		pubH, _, err := s.api.GenerateKeyPair(s.h, []*pkcs11.Mechanism{pkcs11.NewMechanism(mech, nil)},
			keyTemplate(id, append(pubAttrs,
				pkcs11.NewAttribute(pkcs11.CKA_VERIFY, sign),
				pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, decrypt),
				pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
				pkcs11.NewAttribute(pkcs11.CKA_VERIFY_RECOVER, false),
				pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false))...),
			privateTemplate(id,
				pkcs11.NewAttribute(pkcs11.CKA_SIGN, sign),
				pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, decrypt),
				pkcs11.NewAttribute(pkcs11.CKA_SIGN_RECOVER, false)))
		if err != nil {
			return nil, opErr(c.id, "C_GenerateKeyPair", err)
		}
		return readPublic(s, pubH)
	})
}

func readRSAPublic(s *Session, h pkcs11.ObjectHandle) (crypto.PublicKey, error) {
	v, err := s.attributes(h, pkcs11.CKA_MODULUS, pkcs11.CKA_PUBLIC_EXPONENT)
	if err != nil {
		return nil, err
	}
	e := new(big.Int).SetBytes(v[1])
	if !e.IsInt64() || e.Int64() > 1<<31 {
		return nil, errors.New("RSA public exponent out of range")
	}
	return &rsa.PublicKey{N: new(big.Int).SetBytes(v[0]), E: int(e.Int64())}, nil
}

func readECPublic(s *Session, h pkcs11.ObjectHandle, curve elliptic.Curve) (crypto.PublicKey, error) {
	v, err := s.attributes(h, pkcs11.CKA_EC_POINT)
	if err != nil {
		return nil, err
	}
	var point []byte // CKA_EC_POINT is a DER OCTET STRING around the uncompressed point
	if _, err := asn1.Unmarshal(v[0], &point); err != nil {
		return nil, fmt.Errorf("CKA_EC_POINT: %w", err)
	}
	return ecdsa.ParseUncompressedPublicKey(curve, point)
}

// DestroyKey removes every object of key id from the token. Removing a key that is not
// there is not an error: deletion may be repeated after a crash.
func (c *Cluster) DestroyKey(ctx context.Context, id string) error {
	c.handles.drop(id)
	err := exec(ctx, c, true, func(s *Session) error {
		return s.destroyAll([]*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_ID, []byte(id))})
	})
	if err != nil {
		return fmt.Errorf("cluster %s: destroy key %s: %w", c.id, id, err)
	}
	return nil
}

// KeyIDs returns the ids of the keys on the token: every object whose CKA_ID is
// a key id as accepted by isKeyID. Start-up repair uses it to find orphans; it is linear in
// the token's objects, so nothing on the request path calls it.
func (c *Cluster) KeyIDs(ctx context.Context, isKeyID func(string) bool) ([]string, error) {
	ids, err := run(ctx, c, true, func(s *Session) ([]string, error) {
		var ids []string
		seen := map[string]bool{}
		for _, class := range []uint{pkcs11.CKO_SECRET_KEY, pkcs11.CKO_PRIVATE_KEY, pkcs11.CKO_PUBLIC_KEY} {
			hs, err := s.find([]*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, class)}, 0)
			if err != nil {
				return nil, err
			}
			for _, h := range hs {
				v, err := s.attributes(h, pkcs11.CKA_ID)
				if err != nil {
					return nil, err
				}
				if id := string(v[0]); isKeyID(id) && !seen[id] {
					seen[id] = true
					ids = append(ids, id)
				}
			}
		}
		return ids, nil
	})
	if err != nil {
		return nil, fmt.Errorf("cluster %s: list keys: %w", c.id, err)
	}
	return ids, nil
}
