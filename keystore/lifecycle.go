package keystore

import (
	"context"
	"encoding/json"
	"errors"
	"regexp"
	"time"

	"github.com/hsmbridge/hsmbridge/keystore/store"
)

// Keystore states on the wire.
const (
	StateEnabled  = "ENABLED"
	StateDisabled = "DISABLED"
)

// View is a keystore as show and list present it.
type View struct {
	ID         string
	DomainID   string
	Alias      string
	Type       string
	ClusterID  string
	CreatedAt  time.Time
	State      string
	Connection Connection
}

var idRE = regexp.MustCompile(`^[0-9a-z]{8}-[0-9a-z]{4}-[0-9a-z]{4}-[0-9a-z]{4}-[0-9a-z]{12}$`)

// ListKeystores returns a page of the caller's keystores, oldest first, and how many the
// caller has in all.
func (s *Service) ListKeystores(ctx context.Context, who Caller, limit, offset int) ([]View, int, error) {
	rows, total, err := s.store.ListKeystores(ctx, who.DomainID, limit, offset)
	if err != nil {
		return nil, 0, storeError("list keystores", err)
	}
	views := make([]View, len(rows))
	for i, k := range rows {
		views[i] = s.view(ctx, k)
	}
	return views, total, nil
}

// ShowKeystore returns one of the caller's keystores.
func (s *Service) ShowKeystore(ctx context.Context, who Caller, id string) (View, error) {
	k, err := s.lookup(ctx, who, id)
	if err != nil {
		return View{}, err
	}
	return s.view(ctx, k), nil
}

func (s *Service) view(ctx context.Context, k store.Keystore) View {
	return View{
		ID: k.ID, DomainID: k.DomainID, Alias: k.Alias, Type: k.Type, ClusterID: k.ClusterID,
		CreatedAt: k.CreatedAt, State: string(k.State), Connection: s.connection(ctx, k),
	}
}

// lookup returns the caller's live keystore id. Another domain's keystore, and one still
// being created or deleted, are not found: a tenant never learns another's ids exist.
func (s *Service) lookup(ctx context.Context, who Caller, id string) (store.Keystore, error) {
	if !idRE.MatchString(id) {
		return store.Keystore{}, newError(KindInvalidParameter, "keystore_id must be a UUID")
	}
	k, err := s.keystoreRow(ctx, id)
	switch {
	case errors.Is(err, store.ErrNotFound):
		return store.Keystore{}, newError(KindKeystoreNotFound, "keystore %s does not exist", id)
	case err != nil:
		return store.Keystore{}, storeError("get keystore", err)
	case k.DomainID != who.DomainID, k.State == store.StateCreating, k.State == store.StateDeleting:
		return store.Keystore{}, newError(KindKeystoreNotFound, "keystore %s does not exist", id)
	}
	return k, nil
}

// keystoreRow returns the row id from the cache, or from the store, caching live rows.
func (s *Service) keystoreRow(ctx context.Context, id string) (store.Keystore, error) {
	return s.keystores.read(id, s.now(),
		func() (store.Keystore, error) { return s.store.GetKeystore(ctx, id) },
		func(k store.Keystore) bool { return k.State == store.StateEnabled || k.State == store.StateDisabled })
}

// EnableKeystore moves a DISABLED keystore to ENABLED, after checking that its cluster
// answers and still holds the token it was bound to.
func (s *Service) EnableKeystore(ctx context.Context, who Caller, id string) (string, error) {
	k, err := s.lookup(ctx, who, id)
	if err != nil {
		return "", err
	}
	if k.State != store.StateDisabled {
		return "", newError(KindStateConflict, "keystore %s is %s; only a DISABLED keystore can be enabled", id, k.State)
	}
	if err := s.checkBinding(ctx, k); err != nil {
		return "", err
	}
	return s.transition(ctx, k, store.StateDisabled, store.StateEnabled)
}

// DisableKeystore moves an ENABLED keystore to DISABLED. It needs no HSM: a keystore whose
// cluster is down must still be disableable.
func (s *Service) DisableKeystore(ctx context.Context, who Caller, id string) (string, error) {
	k, err := s.lookup(ctx, who, id)
	if err != nil {
		return "", err
	}
	if k.State != store.StateEnabled {
		return "", newError(KindStateConflict, "keystore %s is %s; only an ENABLED keystore can be disabled", id, k.State)
	}
	return s.transition(ctx, k, store.StateEnabled, store.StateDisabled)
}

func (s *Service) transition(ctx context.Context, k store.Keystore, from, to store.State) (string, error) {
	s.keystores.drop(k.ID)
	err := s.store.SetKeystoreState(ctx, k.ID, from, to, s.now())
	s.keystores.drop(k.ID)
	switch {
	case errors.Is(err, store.ErrStateConflict):
		return "", newError(KindStateConflict, "keystore %s changed state meanwhile; read it again", k.ID)
	case errors.Is(err, store.ErrNotFound):
		return "", newError(KindKeystoreNotFound, "keystore %s does not exist", k.ID)
	case err != nil:
		return "", storeError("change keystore state", err)
	}
	return string(to), nil
}

// checkBinding verifies that the keystore's cluster answers and that its token is the one
// bound: the serial, label and identity certificate recorded at create, and the marker on
// the token. A mismatch leaves the keystore FAILED with TOKEN_MISMATCH.
func (s *Service) checkBinding(ctx context.Context, k store.Keystore) error {
	cl, ok := s.clusters[k.ClusterID]
	if !ok {
		return newError(KindClusterUnknown, "HSM cluster %q of keystore %s is not configured", k.ClusterID, k.ID)
	}
	current, err := cl.CurrentToken(ctx)
	if err != nil {
		return &Error{Kind: KindClusterUnknown, Msg: "HSM cluster " + cl.ID() + " does not answer", Err: err}
	}
	if !boundTo(k, cl, current) {
		s.setMismatched(k.ID, true)
		return newError(KindTokenMismatch, "HSM cluster %s now holds token %q (serial %s), not the token %q (serial %s) this keystore was bound to",
			cl.ID(), current.Label, current.Serial, k.TokenLabel, k.TokenSerial)
	}
	objs, err := cl.DataObjects(ctx)
	if err != nil {
		return hsmError("read the keystore marker", err)
	}
	for _, o := range objs {
		if o.Label != markerLabel(k.ID) {
			continue
		}
		var m marker
		if json.Unmarshal(o.Value, &m) == nil && m.KeystoreID == k.ID && m.TokenSerial == k.TokenSerial &&
			m.IdentityFingerprint == k.IdentityFingerprint {
			s.setMismatched(k.ID, false)
			return nil
		}
	}
	s.setMismatched(k.ID, true)
	return newError(KindTokenMismatch, "the token of HSM cluster %s does not hold this keystore's binding marker (was it re-initialised?)", cl.ID())
}

// deleteRefused answers a delete whose row could not be removed: keys still name the
// keystore (the store's foreign key says so), or the store failed. Nothing was removed, so
// the keystore goes back to DISABLED.
func (s *Service) deleteRefused(ctx context.Context, id string, err error) error {
	if berr := s.store.SetKeystoreState(ctx, id, store.StateDeleting, store.StateDisabled, s.now()); berr != nil {
		s.log.Error("delete keystore: could not return it to DISABLED; repair will", "keystore", id, "err", berr)
	}
	if !errors.Is(err, store.ErrKeystoreHasKeys) {
		return storeError("delete keystore", err)
	}
	return newError(KindStateConflict, "keystore %s still holds keys; delete them first", id)
}

// DeleteKeystore removes a DISABLED keystore: its marker from the token, then its row, so
// the cluster can be bound again. The row is DELETING in between; a crash there is finished
// at start-up, by the periodic repair, or by a delete once it is older than RepairGrace.
func (s *Service) DeleteKeystore(ctx context.Context, who Caller, id string) error {
	if !idRE.MatchString(id) {
		return newError(KindInvalidParameter, "keystore_id must be a UUID")
	}
	k, err := s.store.GetKeystore(ctx, id)
	switch {
	case errors.Is(err, store.ErrNotFound) || (err == nil && (k.DomainID != who.DomainID || k.State == store.StateCreating)):
		return newError(KindKeystoreNotFound, "keystore %s does not exist", id)
	case err != nil:
		return storeError("get keystore", err)
	case k.State == store.StateEnabled:
		return newError(KindStateConflict, "keystore %s is ENABLED; disable it before deleting it", id)
	case k.State == store.StateDeleting && s.now().Sub(k.UpdatedAt) < RepairGrace:
		// Another delete (perhaps on another daemon) is under way and answers for it; only a
		// delete left half-done long ago (a crash) is finished here.
		return newError(KindStateConflict, "keystore %s is being deleted", id)
	}
	if n, err := s.store.CountKeys(ctx, id); err != nil {
		return storeError("delete keystore", err)
	} else if n > 0 {
		return newError(KindStateConflict, "keystore %s still holds %d keys; delete them first", id, n)
	}
	if k.State == store.StateDisabled {
		if _, err := s.transition(ctx, k, store.StateDisabled, store.StateDeleting); err != nil {
			return err
		}
	}
	s.keystores.drop(id)
	err = s.store.DeleteKeystore(ctx, id)
	s.keystores.drop(id)
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		return s.deleteRefused(ctx, id, err)
	}
	// The row is gone, so the delete has happened; the marker is tidied after it. If it
	// cannot be removed now, or its token is out of reach, repair removes the orphan later.
	cl, ok := s.clusters[k.ClusterID]
	if !ok {
		s.log.Warn("delete keystore: cluster not configured, marker left on its token", "keystore", id, "cluster", k.ClusterID)
	} else if err := cl.DestroyData(ctx, markerLabel(id)); err != nil {
		s.log.Warn("delete keystore: marker left on the token; repair will remove it", "keystore", id, "cluster", cl.ID(), "err", err)
	}
	s.setMismatched(id, false)
	return nil
}
