package keystore

import (
	"context"
	"crypto"
	"crypto/elliptic"
	"crypto/x509"
	"errors"
	"regexp"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/hsmbridge/hsmbridge/hsm"
	"github.com/hsmbridge/hsmbridge/keystore/store"
)

// Key specs and usages on the wire.
const (
	SpecAES256  = "AES_256"
	SpecRSA2048 = "RSA_2048"
	SpecRSA3072 = "RSA_3072"
	SpecRSA4096 = "RSA_4096"
	SpecECP256  = "EC_P256"
	SpecECP384  = "EC_P384"

	UsageEncryptDecrypt = "ENCRYPT_DECRYPT"
	UsageSignVerify     = "SIGN_VERIFY"
)

// keySpec is what a spec means on the token.
type keySpec struct {
	symmetric bool
	rsaBits   int
	curve     elliptic.Curve
}

var keySpecs = map[string]keySpec{
	SpecAES256:  {symmetric: true},
	SpecRSA2048: {rsaBits: 2048},
	SpecRSA3072: {rsaBits: 3072},
	SpecRSA4096: {rsaBits: 4096},
	SpecECP256:  {curve: elliptic.P256()},
	SpecECP384:  {curve: elliptic.P384()},
}

// Specs the service knows but a PKCS#11 cluster offers only with vendor mechanisms.
var vendorSpecs = map[string]bool{"SM2": true, "SM4": true, "SECP256K1": true}

// key_state digits of the service.
var keyStateDigits = map[store.KeyState]string{
	store.KeyEnabled:         "2",
	store.KeyDisabled:        "3",
	store.KeyPendingDeletion: "4",
}

// KeyStateDigit returns the wire key_state of s ("2" enabled, "3" disabled, "4" pending deletion).
func KeyStateDigit(s store.KeyState) string { return keyStateDigits[s] }

var (
	keyAliasRE = regexp.MustCompile(`^[a-zA-Z0-9:/_-]{1,255}$`)
	keyIDRE    = regexp.MustCompile(`^[0-9a-z]{8}-[0-9a-z]{4}-[0-9a-z]{4}-[0-9a-z]{4}-[0-9a-z]{12}$`)
)

// CreateKeyRequest is the body of create-key.
type CreateKeyRequest struct {
	Alias       string
	Spec        string
	Usage       string
	Description string
	Origin      string
	KeystoreID  string
	Sequence    string
}

// KeyView is a key as describe-key and list-keys present it.
type KeyView struct {
	store.Key
	Region string
}

// CreateKey generates a key inside the keystore's cluster. The row is written first
// (CREATING, claiming the alias and the sequence), then the key is generated on the token,
// then the row becomes ENABLED with the public key. A retried request with the same
// sequence returns the first key instead of making a second.
func (s *Service) CreateKey(ctx context.Context, who Caller, req CreateKeyRequest) (store.Key, error) {
	spec, usage, err := validateCreateKey(&req)
	if err != nil {
		return store.Key{}, err
	}
	if req.Sequence != "" {
		if k, err := s.store.KeyBySequence(ctx, who.DomainID, req.Sequence); err == nil {
			return sequencedKey(k, req)
		}
	}
	ks, cl, err := s.enabledKeystore(ctx, who, req.KeystoreID)
	if err != nil {
		return store.Key{}, err
	}
	now := s.now()
	k := store.Key{
		ID: newID(), DomainID: who.DomainID, ProjectID: who.ProjectID, KeystoreID: ks.ID,
		Alias: req.Alias, Spec: req.Spec, Usage: req.Usage, Description: req.Description, Origin: "kms",
		State: store.KeyCreating, Sequence: req.Sequence, CreatedAt: now, UpdatedAt: now,
	}
	if err := s.store.CreateKey(ctx, k); err != nil {
		switch {
		case errors.Is(err, store.ErrDuplicateAlias):
			return store.Key{}, newError(KindDuplicateKeyAlias, "key alias %q already exists", req.Alias)
		case errors.Is(err, store.ErrDuplicateSequence):
			if k, err := s.store.KeyBySequence(ctx, who.DomainID, req.Sequence); err == nil {
				return sequencedKey(k, req) // a concurrent retry won the race
			}
			return store.Key{}, newError(KindInvalidSequence, "sequence %q is already in use", req.Sequence)
		case errors.Is(err, store.ErrNotFound):
			return store.Key{}, newError(KindKeystoreNotFound, "keystore %s does not exist", req.KeystoreID)
		case errors.Is(err, store.ErrStateConflict):
			return store.Key{}, newError(KindKeystoreDisabled, "keystore %s is disabled", req.KeystoreID)
		}
		return store.Key{}, storeError("create key", err)
	}
	pubDER, err := s.generate(ctx, cl, k.ID, spec, usage)
	if err == nil {
		// The key exists on the token now; record it even if the request's deadline
		// passed during a slow generation, rather than throw the key away.
		saveCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		k.PublicKey, k.State = pubDER, store.KeyEnabled
		err = s.store.ActivateKey(saveCtx, k.ID, pubDER, s.now())
		if err != nil {
			err = storeError("create key", err)
		}
	}
	if err != nil {
		undo, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		if uerr := s.removeKey(undo, cl, k.ID); uerr != nil {
			s.log.Error("create key: undo failed; start-up repair will finish it", "key", k.ID, "err", uerr)
		}
		return store.Key{}, err
	}
	s.keys.put(k.ID, k, s.now())
	return k, nil
}

// sequencedKey answers a create-key retried with the sequence of key k: k itself, if it is
// made and the request is the one that made it.
func sequencedKey(k store.Key, req CreateKeyRequest) (store.Key, error) {
	switch {
	case k.State == store.KeyCreating:
		return store.Key{}, newError(KindInvalidSequence, "the key of sequence %q is still being created; retry shortly", req.Sequence)
	case k.Alias != req.Alias || k.Spec != req.Spec || k.Usage != req.Usage || k.KeystoreID != req.KeystoreID:
		return store.Key{}, newError(KindInvalidSequence, "sequence %q was already used for a different key", req.Sequence)
	}
	return k, nil
}

// generate makes the key on the token and returns its public key (SPKI DER), nil for AES.
func (s *Service) generate(ctx context.Context, cl Cluster, id string, spec keySpec, usage hsm.Usage) ([]byte, error) {
	var pub crypto.PublicKey
	var err error
	switch {
	case spec.symmetric:
		err = cl.GenerateAES(ctx, id, 256)
	case spec.rsaBits > 0:
		pub, err = cl.GenerateRSA(ctx, id, spec.rsaBits, usage)
	default:
		pub, err = cl.GenerateEC(ctx, id, spec.curve, usage)
	}
	if err != nil {
		return nil, hsmError("generate the key on the HSM", err)
	}
	if pub == nil {
		return nil, nil
	}
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, &Error{Kind: KindInternal, Msg: "create key: encode public key", Err: err}
	}
	return der, nil
}

// removeKey destroys key id's objects on the token, then its row.
func (s *Service) removeKey(ctx context.Context, cl Cluster, id string) error {
	s.keys.drop(id)
	if err := cl.DestroyKey(ctx, id); err != nil {
		return err
	}
	err := s.store.DeleteKey(ctx, id)
	s.keys.drop(id)
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		return err
	}
	return nil
}

func validateCreateKey(req *CreateKeyRequest) (keySpec, hsm.Usage, error) {
	switch {
	case req.Alias == "":
		return keySpec{}, 0, newError(KindMissingParameter, "key_alias is required")
	case !keyAliasRE.MatchString(req.Alias), strings.HasSuffix(req.Alias, "/default"):
		return keySpec{}, 0, newError(KindInvalidKeyAlias, "key_alias must match ^[a-zA-Z0-9:/_-]{1,255}$ and not end in /default")
	case utf8.RuneCountInString(req.Description) > 255:
		return keySpec{}, 0, newError(KindInvalidDescription, "key_description must be at most 255 characters")
	case req.Origin != "" && req.Origin != "kms" && req.Origin != "external":
		return keySpec{}, 0, newError(KindInvalidKeyParameter, "origin must be kms or external")
	case req.Origin == "external":
		return keySpec{}, 0, newError(KindImportUnsupported, "keys in a dedicated keystore cannot be imported (origin external)")
	case req.KeystoreID == "":
		return keySpec{}, 0, newError(KindMissingParameter, "keystore_id is required: this service holds keys only in dedicated keystores")
	case req.KeystoreID == "0" || req.KeystoreID == "1" || req.KeystoreID == "2":
		return keySpec{}, 0, newError(KindUnsupportedType, "keystore_id %s names a built-in KMS keystore, which this service does not serve", req.KeystoreID)
	case req.Sequence != "" && len(req.Sequence) != 36:
		return keySpec{}, 0, newError(KindInvalidSequence, "sequence must be 36 characters")
	}
	if req.Spec == "" {
		req.Spec = SpecAES256
	}
	spec, ok := keySpecs[req.Spec]
	if !ok {
		if vendorSpecs[req.Spec] {
			return keySpec{}, 0, newError(KindInvalidKeySpec, "key_spec %s is not supported by this HSM cluster (no PKCS#11 mechanism for it)", req.Spec)
		}
		return keySpec{}, 0, newError(KindInvalidKeySpec, "key_spec %q is not a key spec", req.Spec)
	}
	if req.Usage == "" {
		req.Usage = UsageSignVerify
		if spec.symmetric {
			req.Usage = UsageEncryptDecrypt
		}
	}
	switch {
	case req.Usage != UsageEncryptDecrypt && req.Usage != UsageSignVerify:
		return keySpec{}, 0, newError(KindInvalidKeyParameter, "key_usage must be ENCRYPT_DECRYPT or SIGN_VERIFY")
	case spec.symmetric && req.Usage == UsageSignVerify:
		return keySpec{}, 0, newError(KindSymmetricSign, "symmetric keys do not support SIGN_VERIFY")
	case spec.curve != nil && req.Usage == UsageEncryptDecrypt:
		return keySpec{}, 0, newError(KindECEncrypt, "EC keys do not support ENCRYPT_DECRYPT")
	}
	usage := hsm.UsageSign
	if req.Usage == UsageEncryptDecrypt {
		usage = hsm.UsageDecrypt
	}
	return spec, usage, nil
}

// enabledKeystore returns the caller's keystore id and its cluster, if the keystore is
// ENABLED and its cluster configured.
func (s *Service) enabledKeystore(ctx context.Context, who Caller, id string) (store.Keystore, Cluster, error) {
	ks, err := s.lookup(ctx, who, id)
	if err != nil {
		return store.Keystore{}, Cluster{}, err
	}
	if ks.State != store.StateEnabled {
		return store.Keystore{}, Cluster{}, newError(KindKeystoreDisabled, "keystore %s is disabled", id)
	}
	cl, ok := s.clusters[ks.ClusterID]
	if !ok {
		return store.Keystore{}, Cluster{}, newError(KindClusterUnknown, "HSM cluster %q of keystore %s is not configured", ks.ClusterID, id)
	}
	return ks, cl, nil
}

// pendingDays bounds schedule-key-deletion.
const minPendingDays, maxPendingDays = 7, 1096

// DescribeKey returns one of the caller's keys.
func (s *Service) DescribeKey(ctx context.Context, who Caller, id string) (store.Key, error) {
	return s.callerKey(ctx, who, id)
}

// callerKey returns the caller's key id, from the cache or the store. Another domain's key is
// not found, as a missing one.
func (s *Service) callerKey(ctx context.Context, who Caller, id string) (store.Key, error) {
	if id == "" {
		return store.Key{}, newError(KindMissingParameter, "key_id is required")
	}
	if !keyIDRE.MatchString(id) {
		return store.Key{}, newError(KindInvalidKeyID, "key_id must be a UUID")
	}
	k, err := s.keys.read(id, s.now(),
		func() (store.Key, error) { return s.store.GetKey(ctx, id) },
		func(k store.Key) bool { return k.State != store.KeyCreating })
	switch {
	case isNotFound(err):
		return store.Key{}, newError(KindKeyNotFound, "key %s does not exist", id)
	case err != nil:
		return store.Key{}, storeError("get key", err)
	}
	if k.DomainID != who.DomainID || k.State == store.KeyCreating {
		return store.Key{}, newError(KindKeyNotFound, "key %s does not exist", id)
	}
	return k, nil
}

// ListKeys returns a page of the caller's keys.
func (s *Service) ListKeys(ctx context.Context, who Caller, f store.KeyFilter, limit, offset int) ([]store.Key, int, error) {
	keys, total, err := s.store.ListKeys(ctx, who.DomainID, f, limit, offset)
	if err != nil {
		return nil, 0, storeError("list keys", err)
	}
	return keys, total, nil
}

// EnableKey moves a DISABLED key to ENABLED.
func (s *Service) EnableKey(ctx context.Context, who Caller, id string) (store.Key, error) {
	return s.keyTransition(ctx, who, id, store.KeyDisabled, store.KeyEnabled, time.Time{},
		newError(KindKeyNotDisabled, "key %s is not disabled", id))
}

// DisableKey moves an ENABLED key to DISABLED.
func (s *Service) DisableKey(ctx context.Context, who Caller, id string) (store.Key, error) {
	return s.keyTransition(ctx, who, id, store.KeyEnabled, store.KeyDisabled, time.Time{},
		newError(KindKeyNotEnabled, "key %s is not enabled", id))
}

// ScheduleKeyDeletion puts a key in PENDING_DELETION for days (7–1096); its token objects
// are destroyed when the day comes (DestroyDueKeys).
func (s *Service) ScheduleKeyDeletion(ctx context.Context, who Caller, id, days string) (store.Key, error) {
	n, err := strconv.Atoi(days)
	if err != nil || n < minPendingDays || n > maxPendingDays {
		return store.Key{}, newError(KindInvalidPendingDays, "pending_days must be from 7 to 1096")
	}
	k, err := s.callerKey(ctx, who, id)
	if err != nil {
		return store.Key{}, err
	}
	if k.State == store.KeyPendingDeletion {
		return store.Key{}, newError(KindAlreadyPendingDeletion, "key %s is already pending deletion", id)
	}
	return s.keyTransition(ctx, who, id, k.State, store.KeyPendingDeletion, s.now().AddDate(0, 0, n), nil)
}

// CancelKeyDeletion returns a PENDING_DELETION key to DISABLED, as the service does.
func (s *Service) CancelKeyDeletion(ctx context.Context, who Caller, id string) (store.Key, error) {
	return s.keyTransition(ctx, who, id, store.KeyPendingDeletion, store.KeyDisabled, time.Time{},
		newError(KindKeyNotPendingDeletion, "key %s is not pending deletion", id))
}

// keyTransition moves the caller's key from `from` to `to`; wrongState is the error when
// the key is elsewhere (nil: from is the key's current state).
func (s *Service) keyTransition(ctx context.Context, who Caller, id string, from, to store.KeyState, deletionAt time.Time, wrongState error) (store.Key, error) {
	k, err := s.callerKey(ctx, who, id)
	if err != nil {
		return store.Key{}, err
	}
	if k.State != from {
		return store.Key{}, wrongState
	}
	now := s.now()
	s.keys.drop(id)
	err = s.store.SetKeyState(ctx, id, from, to, now, deletionAt)
	s.keys.drop(id)
	switch {
	case errors.Is(err, store.ErrStateConflict):
		return store.Key{}, newError(KindKeyStateConflict, "key %s changed state meanwhile; read it again", id)
	case err != nil:
		return store.Key{}, storeError("change key state", err)
	}
	k.State, k.UpdatedAt, k.DeletionAt = to, now, deletionAt
	return k, nil
}

// DestroyDueKeys destroys the keys whose pending deletion has come, and returns how many
// went. Each key's row goes first, as a compare-and-delete that a cancellation made
// meanwhile wins; then its objects on the token. A crash between the two leaves objects
// with no row, which repair removes. One key's failure does not hold up the others. The
// daemon calls it periodically; tests call it after moving the clock.
func (s *Service) DestroyDueKeys(ctx context.Context) (int, error) {
	now := s.now()
	due, err := s.store.DueDeletions(ctx, now)
	if err != nil {
		return 0, err
	}
	n := 0
	var errs []error
	for _, k := range due {
		ks, err := s.store.GetKeystore(ctx, k.KeystoreID)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		cl, ok := s.clusters[ks.ClusterID]
		if !ok {
			continue // its token is out of reach; try again when the cluster is configured
		}
		s.keys.drop(k.ID)
		err = s.store.DeleteDueKey(ctx, k.ID, now)
		s.keys.drop(k.ID)
		switch {
		case errors.Is(err, store.ErrStateConflict):
			continue // cancelled (or already gone) since the snapshot
		case err != nil:
			errs = append(errs, err)
			continue
		}
		if err := cl.DestroyKey(ctx, k.ID); err != nil {
			s.log.Error("key row deleted, its objects not yet; repair will remove them", "key", k.ID, "cluster", cl.ID(), "err", err)
			errs = append(errs, err)
			continue
		}
		s.log.Info("key destroyed after its pending deletion", "key", k.ID, "keystore", k.KeystoreID, "cluster", cl.ID())
		n++
	}
	return n, errors.Join(errs...)
}
