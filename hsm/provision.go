package hsm

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"encoding/asn1"
	"errors"
	"fmt"
	"sync"

	"github.com/miekg/pkcs11"
)

// Provisioning: what `hsmbridge dev init` and the tests use to make a token ready for a
// cluster, with PKCS#11 calls alone (no softhsm2-util). Production tokens are provisioned
// with the vendor's tools; nothing here runs in `serve`.

// initMu serialises InitToken: two calls must not pick the same free slot.
var initMu sync.Mutex

// InitToken initialises the module's first uninitialised token as a new token with label,
// sets its SO and user PINs, and returns its serial number. Safe for concurrent use.
func InitToken(modulePath, label, soPIN, userPIN string) (serial string, err error) {
	initMu.Lock()
	defer initMu.Unlock()
	mod, err := openModule(modulePath)
	if err != nil {
		return "", err
	}
	defer func() { err = errors.Join(err, mod.drop()) }()
	api := mod.api()
	slots, err := api.GetSlotList(true)
	if err != nil {
		return "", opErr("", "C_GetSlotList", err)
	}
	for _, slot := range slots {
		ti, err := api.GetTokenInfo(slot)
		if err != nil || ti.Flags&pkcs11.CKF_TOKEN_INITIALIZED != 0 {
			continue
		}
		return initToken(api, slot, label, soPIN, userPIN)
	}
	return "", fmt.Errorf("module %s: no uninitialised token to initialise", modulePath)
}

func initToken(api PKCS11, slot uint, label, soPIN, userPIN string) (string, error) {
	if err := api.InitToken(slot, soPIN, label); err != nil {
		return "", opErr("", "C_InitToken", err)
	}
	h, err := api.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return "", opErr("", "C_OpenSession", err)
	}
	defer func() { _ = api.CloseSession(h) }() // closing the last session logs the SO out
	if err := api.Login(h, pkcs11.CKU_SO, soPIN); err != nil {
		return "", opErr("", "C_Login", err)
	}
	if err := api.InitPIN(h, userPIN); err != nil {
		return "", opErr("", "C_InitPIN", err)
	}
	ti, err := api.GetTokenInfo(slot)
	if err != nil {
		return "", opErr("", "C_GetTokenInfo", err)
	}
	return tokenInfo(ti).Serial, nil
}

// oidP256 is the DER of the named curve P-256, the CKA_EC_PARAMS of our identity keys.
var oidP256 = []byte{0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07}

// GenerateIdentityKey makes an ECDSA P-256 key pair on the token under label, the private
// half sensitive and not extractable, and returns the public key.
func (c *Cluster) GenerateIdentityKey(ctx context.Context, label string) (crypto.PublicKey, error) {
	pub, err := run(ctx, c, false, func(s *Session) (*ecdsa.PublicKey, error) {
		pubH, _, err := s.api.GenerateKeyPair(s.h,
			[]*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_EC_KEY_PAIR_GEN, nil)},
			[]*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
				pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true),
				pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, oidP256),
				pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
			},
			[]*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
				pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
				pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
				pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
				pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
				pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
			})
		if err != nil {
			return nil, opErr(c.id, "C_GenerateKeyPair", err)
		}
		v, err := s.attributes(pubH, pkcs11.CKA_EC_POINT)
		if err != nil {
			return nil, err
		}
		var point []byte // CKA_EC_POINT is a DER OCTET STRING around the uncompressed point
		if _, err := asn1.Unmarshal(v[0], &point); err != nil {
			return nil, fmt.Errorf("CKA_EC_POINT: %w", err)
		}
		return ecdsa.ParseUncompressedPublicKey(elliptic.P256(), point)
	})
	if err != nil {
		return nil, fmt.Errorf("cluster %s: generate identity key %q: %w", c.id, label, err)
	}
	return pub, nil
}

// StoreCertificate writes a public X.509 certificate object under label.
func (c *Cluster) StoreCertificate(ctx context.Context, label string, cert *x509.Certificate) error {
	err := exec(ctx, c, false, func(s *Session) error {
		_, err := s.createObject([]*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_CERTIFICATE),
			pkcs11.NewAttribute(pkcs11.CKA_CERTIFICATE_TYPE, pkcs11.CKC_X_509),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, false),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
			pkcs11.NewAttribute(pkcs11.CKA_SUBJECT, cert.RawSubject), // required by SoftHSM
			pkcs11.NewAttribute(pkcs11.CKA_ISSUER, cert.RawIssuer),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE, cert.Raw),
		})
		return err
	})
	if err != nil {
		return fmt.Errorf("cluster %s: store certificate %q: %w", c.id, label, err)
	}
	return nil
}
