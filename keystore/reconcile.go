package keystore

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/hsmbridge/hsmbridge/keystore/store"
)

// Reconcile repairs what a crash left half-done, matching store rows against the markers on
// the configured clusters' tokens, and logs each repair:
//   - a CREATING row never answered its caller: its marker (if any) and its row go;
//   - a DELETING row was already refused to its users: its marker and its row go;
//   - a marker with no row behind it is an orphan of an interrupted create: it goes;
//   - a live row whose marker is missing is left alone, reported, and shown as TOKEN_MISMATCH.
//
// It runs at start-up, before the API serves.
func (s *Service) Reconcile(ctx context.Context) error {
	rows, err := s.store.AllKeystores(ctx)
	if err != nil {
		return fmt.Errorf("reconcile: %w", err)
	}
	byID := make(map[string]store.Keystore, len(rows))
	for _, r := range rows {
		byID[r.ID] = r
	}
	for _, cl := range s.clusters {
		objs, err := cl.DataObjects(ctx)
		if err != nil {
			return fmt.Errorf("reconcile: %w", err)
		}
		markers := map[string]bool{}
		for _, o := range objs {
			id, ok := strings.CutPrefix(o.Label, markerLabel(""))
			if !ok {
				continue
			}
			markers[id] = true
			if r, ok := byID[id]; !ok || r.ClusterID != cl.ID() {
				if err := cl.DestroyData(ctx, o.Label); err != nil {
					return fmt.Errorf("reconcile: %w", err)
				}
				s.log.Warn("repair: removed a keystore marker with no store row", "cluster", cl.ID(), "keystore", id)
			}
		}
		for _, r := range rows {
			if r.ClusterID != cl.ID() {
				continue
			}
			switch r.State {
			case store.StateCreating, store.StateDeleting:
				if err := s.unbind(ctx, cl, r.ID); err != nil {
					if r.State != store.StateDeleting || !errors.Is(err, store.ErrKeystoreHasKeys) {
						return fmt.Errorf("reconcile keystore %s: %w", r.ID, err)
					}
					// Keys still name it: the delete was refused in the end, so it stays.
					if err := s.store.SetKeystoreState(ctx, r.ID, store.StateDeleting, store.StateDisabled, s.now()); err != nil {
						return fmt.Errorf("reconcile keystore %s: %w", r.ID, err)
					}
					s.log.Warn("repair: a keystore left DELETING still holds keys; it is DISABLED again", "cluster", cl.ID(), "keystore", r.ID)
					continue
				}
				s.log.Warn("repair: removed a half-done keystore", "cluster", cl.ID(), "keystore", r.ID, "state", string(r.State))
			default:
				if !markers[r.ID] {
					s.setMismatched(r.ID, true)
					s.log.Error("keystore has no marker on its token: connection FAILED, TOKEN_MISMATCH",
						"cluster", cl.ID(), "keystore", r.ID, "token_serial", r.TokenSerial)
				}
			}
		}
	}
	for _, r := range rows {
		if _, ok := s.clusters[r.ClusterID]; !ok {
			s.log.Warn("keystore is bound to a cluster that is not configured", "keystore", r.ID, "cluster", r.ClusterID)
		}
	}
	return s.reconcileKeys(ctx, byID)
}

// reconcileKeys repairs keys: a CREATING row never answered its caller, so its token
// objects (if any) and its row go; key objects on a token with no row behind them are
// orphans of an interrupted create, and go; a live row whose objects are missing is reported.
func (s *Service) reconcileKeys(ctx context.Context, keystores map[string]store.Keystore) error {
	keys, err := s.store.AllKeys(ctx)
	if err != nil {
		return fmt.Errorf("reconcile keys: %w", err)
	}
	rows := make(map[string]store.Key, len(keys))
	for _, k := range keys {
		rows[k.ID] = k
	}
	for _, cl := range s.clusters {
		onToken, err := cl.KeyIDs(ctx, keyIDRE.MatchString)
		if err != nil {
			return fmt.Errorf("reconcile keys: %w", err)
		}
		present := make(map[string]bool, len(onToken))
		for _, id := range onToken {
			present[id] = true
			k, ok := rows[id]
			if ok && k.State != store.KeyCreating && keystores[k.KeystoreID].ClusterID == cl.ID() {
				continue
			}
			if err := s.removeKey(ctx, cl, id); err != nil {
				return fmt.Errorf("reconcile key %s: %w", id, err)
			}
			s.log.Warn("repair: removed a key left half-made", "cluster", cl.ID(), "key", id, "had_row", ok)
		}
		for _, k := range keys {
			if keystores[k.KeystoreID].ClusterID != cl.ID() {
				continue
			}
			switch {
			case k.State == store.KeyCreating && !present[k.ID]:
				if err := s.store.DeleteKey(ctx, k.ID); err != nil && !errors.Is(err, store.ErrNotFound) {
					return fmt.Errorf("reconcile key %s: %w", k.ID, err)
				}
				s.log.Warn("repair: removed a key row left half-made", "cluster", cl.ID(), "key", k.ID)
			case k.State != store.KeyCreating && !present[k.ID]:
				s.log.Error("key has no objects on its token", "cluster", cl.ID(), "key", k.ID)
			}
		}
	}
	return nil
}
