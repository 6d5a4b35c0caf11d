package keystore

import (
	"context"
	"errors"
	"fmt"

	"github.com/hsmbridge/hsmbridge/hsm"
	"github.com/hsmbridge/hsmbridge/keystore/store"
)

// Kind is what went wrong, in the API's terms. keystore/api maps each Kind to an HTTP status
// and a KMS error code in one table; this package knows no status numbers.
type Kind int

const (
	KindInternal         Kind = iota // a bug or an unclassified failure
	KindMissingParameter             // a required field is absent
	KindInvalidParameter             // a keystore field fails its rule
	KindDuplicateAlias               // the alias is taken in the domain
	KindKeystoreNotFound             // no such keystore visible to the caller
	KindClusterUnknown               // the cluster is not configured, or does not answer
	KindClusterBound                 // the cluster already backs a keystore
	KindTokenMismatch                // the cluster's token is not the one the keystore is bound to
	KindCACertificate                // hsm_ca_cert is invalid or is not the cluster's
	KindKeystoreDisabled             // the keystore is disabled
	KindStateConflict                // the keystore is not in a state that allows this
	KindUnsupportedType              // a keystore type this daemon does not serve
	KindHSMUnavailable               // the cluster failed (device, session, login or credential)
	KindHSMTimeout                   // no HSM session came free in time
	KindHSMBreakerOpen               // the cluster refuses work until it recovers (fails fast)
	KindStoreUnavailable             // the metadata store failed or cannot be reached
	KindHSMFailure                   // the HSM refused in a way we did not expect

	// Keys.
	KindInvalidKeyID           // key_id is not a UUID
	KindKeyNotFound            // no such key visible to the caller
	KindInvalidKeyAlias        // key_alias fails its rule
	KindDuplicateKeyAlias      // the key alias is taken in the domain
	KindInvalidDescription     // key_description too long
	KindInvalidKeySpec         // key_spec unknown or not offered by the cluster
	KindInvalidKeyParameter    // another key field is invalid
	KindInvalidSequence        // sequence is malformed
	KindImportUnsupported      // origin external in a dedicated keystore
	KindSymmetricSign          // sign/verify asked of a symmetric key
	KindECEncrypt              // encrypt/decrypt asked of an EC key
	KindKeyDisabled            // the key is disabled
	KindKeyPendingDeletion     // the key is pending deletion
	KindKeyNotDisabled         // enable-key on a key that is not disabled
	KindKeyNotEnabled          // disable-key on a key that is not enabled
	KindInvalidPendingDays     // pending_days outside 7–1096
	KindAlreadyPendingDeletion // schedule-key-deletion twice
	KindKeyNotPendingDeletion  // cancel-key-deletion of a key not pending deletion
	KindKeyStateConflict       // the key changed state concurrently
	KindKeyForEncryption       // sign/verify on an ENCRYPT_DECRYPT key
	KindKeyForSigning          // encrypt/decrypt on a SIGN_VERIFY key
	KindAlgorithmMismatch      // the algorithm does not fit the key
	KindDigestLength           // the digest's length does not fit the hash
	KindInvalidData            // a data field (plain_text, message, signature, lengths) is invalid
	KindPlaintextTooLong       // too long for RSA-OAEP with this key
	KindDecryptFailed          // the ciphertext was altered, or the AAD differs
	KindDatakeyPlainText       // encrypt-datakey: plain_text is not hex
	KindDatakeyDigest          // encrypt-datakey: the DEK's SHA-256 does not match
	KindDatakeyLength          // datakey lengths do not match
	KindDatakeyLengthRange     // datakey_length outside 8–8192 bits
	KindDatakeyMultiple        // datakey_length not a multiple of 8
	KindDatakeySpec            // datakey key_spec not AES_128/AES_256
	KindDatakeyCipherText      // decrypt-datakey: cipher_text is not a sealed data key
	KindInvalidRandomLength    // gen-random length not a multiple of 8 in range
	KindKeyMaterialMissing     // the key's object is gone from its token
	KindSymmetricPublicKey     // get-publickey of a symmetric key

	numKinds
)

// Kinds lists every Kind, so the API's table can be checked for completeness.
func Kinds() []Kind {
	ks := make([]Kind, numKinds)
	for i := range ks {
		ks[i] = Kind(i)
	}
	return ks
}

// Error is a failure with a Kind. Msg is safe to show to the caller; Err is the cause, for
// logs only (it may name clusters, tokens and PKCS#11 codes, never secrets).
type Error struct {
	Kind Kind
	Msg  string
	Err  error
}

func (e *Error) Error() string {
	if e.Err == nil {
		return e.Msg
	}
	return e.Msg + ": " + e.Err.Error()
}

func (e *Error) Unwrap() error { return e.Err }

func newError(kind Kind, format string, args ...any) *Error {
	return &Error{Kind: kind, Msg: fmt.Sprintf(format, args...)}
}

// KindOf returns the Kind of err: that of the *Error in its chain, else KindInternal.
func KindOf(err error) Kind {
	if e, ok := errors.AsType[*Error](err); ok {
		return e.Kind
	}
	return KindInternal
}

func isNotFound(err error) bool { return errors.Is(err, store.ErrNotFound) }

// storeError is a failed store call: the database is down or unreachable, as far as the
// caller can tell, so the call may be retried.
func storeError(what string, err error) *Error {
	return &Error{Kind: KindStoreUnavailable, Msg: what + ": the metadata store is unavailable; retry later", Err: err}
}

// hsmError turns a failed HSM call into an *Error, by the class hsm gave it.
func hsmError(what string, err error) *Error {
	switch {
	case errors.Is(err, hsm.ErrUnavailable):
		return &Error{Kind: KindHSMBreakerOpen, Msg: what + ": the HSM cluster is unavailable until it recovers; retry later", Err: err}
	case errors.Is(err, hsm.ErrAcquireTimeout), errors.Is(err, context.DeadlineExceeded):
		return &Error{Kind: KindHSMTimeout, Msg: what + ": the HSM cluster did not answer in time", Err: err}
	}
	switch hsm.Classify(err) {
	case hsm.ClassDevice, hsm.ClassSession, hsm.ClassLogin, hsm.ClassCredential:
		return &Error{Kind: KindHSMUnavailable, Msg: what + ": the HSM cluster is unavailable", Err: err}
	}
	return &Error{Kind: KindHSMFailure, Msg: what + ": the HSM cluster failed", Err: err}
}
