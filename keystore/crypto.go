package keystore

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"

	"github.com/hsmbridge/hsmbridge/hsm"
	"github.com/hsmbridge/hsmbridge/keystore/store"
)

// The data plane: every operation checks the key and its keystore from memory (no store
// read when cached), then makes one HSM call through the cluster's pool. Verification and
// RSA encryption need only the public key, so they run on the host.

// usableKey returns the caller's key id ready for an operation of usage, with its cluster.
func (s *Service) usableKey(ctx context.Context, who Caller, id, usage string) (store.Key, Cluster, error) {
	k, err := s.callerKey(ctx, who, id)
	if err != nil {
		return store.Key{}, Cluster{}, err
	}
	switch k.State {
	case store.KeyDisabled:
		return store.Key{}, Cluster{}, newError(KindKeyDisabled, "key %s is disabled", id)
	case store.KeyPendingDeletion:
		return store.Key{}, Cluster{}, newError(KindKeyPendingDeletion, "key %s is pending deletion and cannot be used", id)
	}
	spec := keySpecs[k.Spec]
	switch {
	case usage == UsageSignVerify && spec.symmetric:
		return store.Key{}, Cluster{}, newError(KindSymmetricSign, "key %s is symmetric: it cannot sign or verify", id)
	case usage == UsageEncryptDecrypt && spec.curve != nil:
		return store.Key{}, Cluster{}, newError(KindECEncrypt, "key %s is an EC key: it cannot encrypt or decrypt", id)
	case usage == UsageSignVerify && k.Usage != UsageSignVerify:
		return store.Key{}, Cluster{}, newError(KindKeyForEncryption, "key %s is for ENCRYPT_DECRYPT", id)
	case usage == UsageEncryptDecrypt && k.Usage != UsageEncryptDecrypt:
		return store.Key{}, Cluster{}, newError(KindKeyForSigning, "key %s is for SIGN_VERIFY", id)
	}
	ks, err := s.keystoreRow(ctx, k.KeystoreID)
	if err != nil {
		return store.Key{}, Cluster{}, storeError("key operation: keystore of the key", err)
	}
	if ks.State != store.StateEnabled {
		return store.Key{}, Cluster{}, newError(KindKeystoreDisabled, "keystore %s of key %s is disabled", ks.ID, id)
	}
	cl, ok := s.clusters[ks.ClusterID]
	if !ok {
		return store.Key{}, Cluster{}, newError(KindClusterUnknown, "HSM cluster %q of key %s is not configured", ks.ClusterID, id)
	}
	return k, cl, nil
}

// badCiphertext reports whether a decryption failed on the ciphertext itself: a caller-class
// error of C_Decrypt. A refusal earlier (the mechanism, its parameters) is not the caller's
// ciphertext and must not be reported as one.
func badCiphertext(err error) bool {
	oe, ok := errors.AsType[*hsm.OpError](err)
	return ok && oe.Func == "C_Decrypt" && oe.Class == hsm.ClassCaller
}

// keyOpError turns a failed key operation into an *Error: a missing key object is reported
// as such, the rest by class.
func keyOpError(what string, err error) *Error {
	if errors.Is(err, hsm.ErrObjectNotFound) {
		return &Error{Kind: KindKeyMaterialMissing, Msg: what + ": the key's material is missing from its HSM cluster", Err: err}
	}
	return hsmError(what, err)
}

// Encryption algorithms on the wire.
const (
	AlgSymmetricDefault = "SYMMETRIC_DEFAULT"
	AlgRSAOAEPSHA256    = "RSAES_OAEP_SHA_256"
)

// Encrypt encrypts plaintext with key id: AES-256-GCM on the HSM into a blob that names the
// key, or RSAES-OAEP-SHA-256 with the public key on the host.
func (s *Service) Encrypt(ctx context.Context, who Caller, id, alg string, plaintext, aad []byte) ([]byte, error) {
	k, cl, err := s.usableKey(ctx, who, id, UsageEncryptDecrypt)
	if err != nil {
		return nil, err
	}
	if keySpecs[k.Spec].symmetric {
		if alg != "" && alg != AlgSymmetricDefault {
			return nil, newError(KindAlgorithmMismatch, "encryption_algorithm %s does not fit a symmetric key", alg)
		}
		return s.sealBlob(ctx, cl, k.ID, plaintext, aad)
	}
	if alg != AlgRSAOAEPSHA256 {
		return nil, newError(KindAlgorithmMismatch, "an RSA key needs encryption_algorithm RSAES_OAEP_SHA_256")
	}
	pub, err := publicKey(k)
	if err != nil {
		return nil, err
	}
	ct, err := rsa.EncryptOAEP(sha256.New(), rand.Reader, pub.(*rsa.PublicKey), plaintext, nil)
	if err != nil {
		return nil, newError(KindPlaintextTooLong, "plain_text is too long for RSA-OAEP with key %s", id)
	}
	return ct, nil
}

// sealBlob encrypts plaintext under AES key id with a fresh random 96-bit IV. Random IVs
// keep the collision chance negligible for far more than any key's lifetime of calls
// (NIST SP 800-38D §8.2.2 bounds random IVs at 2^32 invocations per key).
func (s *Service) sealBlob(ctx context.Context, cl Cluster, id string, plaintext, aad []byte) ([]byte, error) {
	iv := make([]byte, ivSize)
	_, _ = rand.Read(iv)
	head := blobHeader(id)
	ct, err := cl.EncryptGCM(ctx, id, iv, blobAAD(head, aad), plaintext)
	if err != nil {
		return nil, keyOpError("encrypt", err)
	}
	return append(append(head, iv...), ct...), nil
}

// Decrypt decrypts ciphertext. A symmetric blob names its key, so id may be empty (if
// given, it must be the blob's); an RSA ciphertext needs id and RSAES_OAEP_SHA_256.
func (s *Service) Decrypt(ctx context.Context, who Caller, id, alg string, ciphertext, aad []byte) (keyID string, plaintext []byte, err error) {
	switch alg {
	case "", AlgSymmetricDefault:
		blobKey, ok := blobKeyID(ciphertext)
		switch {
		case !ok:
			return "", nil, newError(KindDecryptFailed, "cipher_text is not a symmetric ciphertext of this service (for RSA give key_id and encryption_algorithm RSAES_OAEP_SHA_256)")
		case id != "" && id != blobKey:
			return "", nil, newError(KindDecryptFailed, "cipher_text was not made with key %s", id)
		}
		return s.openBlob(ctx, who, blobKey, ciphertext, aad)
	case AlgRSAOAEPSHA256:
	default:
		return "", nil, newError(KindAlgorithmMismatch, "encryption_algorithm %q is not supported", alg)
	}
	if id == "" {
		return "", nil, newError(KindMissingParameter, "key_id is required to decrypt an RSA ciphertext")
	}
	k, cl, err := s.usableKey(ctx, who, id, UsageEncryptDecrypt)
	if err != nil {
		return "", nil, err
	}
	if keySpecs[k.Spec].symmetric {
		return "", nil, newError(KindAlgorithmMismatch, "RSAES_OAEP_SHA_256 does not fit symmetric key %s", id)
	}
	pt, err := cl.DecryptOAEP(ctx, k.ID, ciphertext)
	if err != nil {
		if badCiphertext(err) {
			return "", nil, &Error{Kind: KindDecryptFailed, Msg: "cipher_text could not be decrypted with this key", Err: err}
		}
		return "", nil, keyOpError("decrypt", err)
	}
	return k.ID, pt, nil
}

func (s *Service) openBlob(ctx context.Context, who Caller, id string, blob, aad []byte) (string, []byte, error) {
	k, cl, err := s.usableKey(ctx, who, id, UsageEncryptDecrypt)
	if err != nil {
		return "", nil, err
	}
	if !keySpecs[k.Spec].symmetric {
		return "", nil, newError(KindDecryptFailed, "cipher_text names a key that is not symmetric")
	}
	head, iv, ct := blob[:headerSize], blob[headerSize:headerSize+ivSize], blob[headerSize+ivSize:]
	pt, err := cl.DecryptGCM(ctx, id, iv, blobAAD(head, aad), ct)
	if err != nil {
		if badCiphertext(err) {
			return "", nil, &Error{Kind: KindDecryptFailed, Err: err,
				Msg: "cipher_text could not be decrypted: it was altered, or additional_authenticated_data differs"}
		}
		return "", nil, keyOpError("decrypt", err)
	}
	return id, pt, nil
}

// Symmetric ciphertext blob: version ‖ key id (36 ASCII) ‖ IV (12) ‖ ciphertext ‖ tag (16).
// The header is authenticated as AAD, so a blob moved under another key id fails.
const (
	blobVersion = 0x01
	keyIDSize   = 36
	headerSize  = 1 + keyIDSize
	ivSize      = 12
	tagSize     = 16
)

func blobHeader(id string) []byte {
	h := make([]byte, 0, headerSize+ivSize)
	return append(append(h, blobVersion), id...)
}

func blobAAD(head, aad []byte) []byte {
	return append(append(make([]byte, 0, len(head)+len(aad)), head...), aad...)
}

// blobKeyID returns the key id a blob names, if b is shaped like one of our blobs.
func blobKeyID(b []byte) (string, bool) {
	if len(b) < headerSize+ivSize+tagSize || b[0] != blobVersion {
		return "", false
	}
	id := string(b[1:headerSize])
	return id, keyIDRE.MatchString(id)
}

// publicKey parses the key's cached public key.
func publicKey(k store.Key) (crypto.PublicKey, error) {
	pub, err := x509.ParsePKIXPublicKey(k.PublicKey)
	if err != nil {
		return nil, &Error{Kind: KindInternal, Msg: "public key of key " + k.ID, Err: err}
	}
	return pub, nil
}

// PublicKey returns the key's public key (asymmetric keys only).
func (s *Service) PublicKey(ctx context.Context, who Caller, id string) (crypto.PublicKey, error) {
	k, err := s.callerKey(ctx, who, id)
	if err != nil {
		return nil, err
	}
	if keySpecs[k.Spec].symmetric {
		return nil, newError(KindSymmetricPublicKey, "key %s is symmetric: it has no public key", id)
	}
	return publicKey(k)
}

// Signing algorithms on the wire, and how each signs.
type signAlg struct {
	scheme hsm.SignScheme
	hash   crypto.Hash
	rsa    bool
}

var signAlgs = map[string]signAlg{
	"RSASSA_PSS_SHA_256":        {hsm.SchemeRSAPSS, crypto.SHA256, true},
	"RSASSA_PSS_SHA_384":        {hsm.SchemeRSAPSS, crypto.SHA384, true},
	"RSASSA_PSS_SHA_512":        {hsm.SchemeRSAPSS, crypto.SHA512, true},
	"RSASSA_PKCS1_V1_5_SHA_256": {hsm.SchemePKCS1v15, crypto.SHA256, true},
	"RSASSA_PKCS1_V1_5_SHA_384": {hsm.SchemePKCS1v15, crypto.SHA384, true},
	"RSASSA_PKCS1_V1_5_SHA_512": {hsm.SchemePKCS1v15, crypto.SHA512, true},
	"ECDSA_SHA_256":             {hsm.SchemeECDSA, crypto.SHA256, false},
	"ECDSA_SHA_384":             {hsm.SchemeECDSA, crypto.SHA384, false},
	"ECDSA_SHA_512":             {hsm.SchemeECDSA, crypto.SHA512, false},
}

// Message types on the wire.
const (
	MessageDigest = "DIGEST"
	MessageRaw    = "RAW"
)

// digestFor checks the algorithm against the key and returns what is signed: the message
// itself when it is a digest (its length must fit the hash), else its hash.
func digestFor(k store.Key, algName, messageType string, message []byte) (signAlg, []byte, error) {
	alg, ok := signAlgs[algName]
	if !ok {
		return signAlg{}, nil, newError(KindAlgorithmMismatch, "signing_algorithm %q is not supported by this cluster", algName)
	}
	if alg.rsa != (keySpecs[k.Spec].rsaBits > 0) {
		return signAlg{}, nil, newError(KindAlgorithmMismatch, "signing_algorithm %s does not fit a %s key", algName, k.Spec)
	}
	switch messageType {
	case "", MessageDigest:
		if len(message) != alg.hash.Size() {
			return signAlg{}, nil, newError(KindDigestLength, "message is %d bytes; a %v digest is %d", len(message), alg.hash, alg.hash.Size())
		}
		return alg, message, nil
	case MessageRaw:
		h := alg.hash.New()
		h.Write(message)
		return alg, h.Sum(nil), nil
	}
	return signAlg{}, nil, newError(KindInvalidKeyParameter, "message_type must be DIGEST or RAW")
}

// Sign signs message with key id on the HSM.
func (s *Service) Sign(ctx context.Context, who Caller, id, algName, messageType string, message []byte) ([]byte, error) {
	k, cl, err := s.usableKey(ctx, who, id, UsageSignVerify)
	if err != nil {
		return nil, err
	}
	alg, digest, err := digestFor(k, algName, messageType, message)
	if err != nil {
		return nil, err
	}
	sig, err := cl.SignDigest(ctx, k.ID, alg.scheme, alg.hash, digest)
	if err != nil {
		return nil, keyOpError("sign", err)
	}
	return sig, nil
}

// Verify checks signature with the key's public key, on the host: no HSM call.
func (s *Service) Verify(ctx context.Context, who Caller, id, algName, messageType string, message, signature []byte) (bool, error) {
	k, _, err := s.usableKey(ctx, who, id, UsageSignVerify)
	if err != nil {
		return false, err
	}
	alg, digest, err := digestFor(k, algName, messageType, message)
	if err != nil {
		return false, err
	}
	pub, err := publicKey(k)
	if err != nil {
		return false, err
	}
	switch pub := pub.(type) {
	case *ecdsa.PublicKey:
		return ecdsa.VerifyASN1(pub, digest, signature), nil
	case *rsa.PublicKey:
		if alg.scheme == hsm.SchemeRSAPSS {
			return rsa.VerifyPSS(pub, alg.hash, digest, signature, &rsa.PSSOptions{SaltLength: alg.hash.Size()}) == nil, nil
		}
		return rsa.VerifyPKCS1v15(pub, alg.hash, digest, signature) == nil, nil
	}
	return false, &Error{Kind: KindInternal, Msg: fmt.Sprintf("verify: public key type %T", pub)}
}

// Random returns n random bytes from an HSM. gen-random names no key, so the bytes come
// from the cluster of the caller's first enabled keystore.
func (s *Service) Random(ctx context.Context, who Caller, n int) ([]byte, error) {
	if n < 1 || n > 1024 {
		return nil, newError(KindInvalidRandomLength, "random_data_length must be a multiple of 8 from 8 to 8192 bits")
	}
	rows, _, err := s.store.ListKeystores(ctx, who.DomainID, maxKeystoresScanned, 0)
	if err != nil {
		return nil, storeError("gen-random", err)
	}
	for _, ks := range rows {
		if cl, ok := s.clusters[ks.ClusterID]; ok && ks.State == store.StateEnabled {
			b, err := cl.Random(ctx, n)
			if err != nil {
				return nil, hsmError("gen-random", err)
			}
			return b, nil
		}
	}
	return nil, newError(KindKeystoreDisabled, "gen-random needs an enabled keystore: the random data comes from its HSM cluster")
}

// maxKeystoresScanned bounds the keystores gen-random looks through (one per cluster).
const maxKeystoresScanned = 1000
