package store

import (
	"context"
	"errors"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

func TestSQLiteReplicas(t *testing.T) {
	testReplicaRaces(t, func(t *testing.T) (Store, Store) {
		path := filepath.Join(t.TempDir(), "hsmbridge.db")
		return openTestSQLite(t, path), openTestSQLite(t, path)
	})
}

// testReplicaRaces races the same writes through two handles on one
// database, as two daemons sharing it would: each race has exactly one
// winner, and every loser gets the error a single daemon would give.
// openPair returns two handles on one empty database, closed when t ends.
func testReplicaRaces(t *testing.T, openPair func(t *testing.T) (Store, Store)) {
	ctx := context.Background()
	const n = 20

	// race runs f(store, i) for i in [0, n) at once, alternating handles.
	race := func(a, b Store, f func(s Store, i int) error) []error {
		errs := make([]error, n)
		start := make(chan struct{})
		var wg sync.WaitGroup
		for i := range n {
			s := a
			if i%2 == 1 {
				s = b
			}
			wg.Go(func() {
				<-start
				errs[i] = f(s, i)
			})
		}
		close(start)
		wg.Wait()
		return errs
	}
	oneWins := func(t *testing.T, errs []error, want error) {
		t.Helper()
		wins := 0
		for i, err := range errs {
			switch {
			case err == nil:
				wins++
			case !errors.Is(err, want):
				t.Errorf("racer %d: %v, want %v", i, err, want)
			}
		}
		if wins != 1 {
			t.Fatalf("%d racers won, want exactly 1", wins)
		}
	}

	t.Run("CreateKeystore", func(t *testing.T) {
		for _, tc := range []struct {
			name   string
			modify func(k *Keystore)
			want   error
		}{
			{"same cluster", func(k *Keystore) { k.ClusterID = "contested" }, ErrClusterBound},
			{"same alias", func(k *Keystore) { k.Alias = "contested" }, ErrDuplicateAlias},
			{"same id", func(k *Keystore) { k.ID = "contested" }, ErrDuplicateID},
		} {
			t.Run(tc.name, func(t *testing.T) {
				a, b := openPair(t)
				oneWins(t, race(a, b, func(s Store, i int) error {
					k := newKeystore(i)
					tc.modify(&k)
					return s.CreateKeystore(ctx, k)
				}), tc.want)
				if all, err := b.AllKeystores(ctx); err != nil || len(all) != 1 {
					t.Fatalf("AllKeystores = %v, %v; want 1 row", ids(all), err)
				}
			})
		}
	})

	t.Run("KeystoreTransitions", func(t *testing.T) {
		a, b := openPair(t)
		k := newKeystore(1)
		k.State = StateCreating
		mustCreate(t, a, k)
		for _, step := range [][2]State{
			{StateCreating, StateEnabled},
			{StateEnabled, StateDisabled},
			{StateDisabled, StateEnabled},
			{StateEnabled, StateDeleting},
		} {
			oneWins(t, race(a, b, func(s Store, i int) error {
				return s.SetKeystoreState(ctx, k.ID, step[0], step[1], baseTime.Add(time.Duration(i)*time.Millisecond))
			}), ErrStateConflict)
			if got, err := a.GetKeystore(ctx, k.ID); err != nil || got.State != step[1] {
				t.Fatalf("after racing %s -> %s: state %s, %v", step[0], step[1], got.State, err)
			}
		}
		oneWins(t, race(a, b, func(s Store, _ int) error { return s.DeleteKeystore(ctx, k.ID) }), ErrNotFound)
	})

	t.Run("CreateKey", func(t *testing.T) {
		for _, tc := range []struct {
			name   string
			modify func(k *Key)
			want   error
		}{
			{"same sequence", func(k *Key) { k.Sequence = "contested" }, ErrDuplicateSequence},
			{"same alias", func(k *Key) { k.Alias = "contested" }, ErrDuplicateAlias},
			{"same id", func(k *Key) { k.ID = "contested" }, ErrDuplicateID},
		} {
			t.Run(tc.name, func(t *testing.T) {
				a, b := openPair(t)
				ks := newKeystore(1)
				mustCreate(t, a, ks)
				oneWins(t, race(a, b, func(s Store, i int) error {
					k := newKey(i, ks.ID)
					tc.modify(&k)
					return s.CreateKey(ctx, k)
				}), tc.want)
				if n, err := b.CountKeys(ctx, ks.ID); err != nil || n != 1 {
					t.Fatalf("CountKeys = %d, %v; want 1", n, err)
				}
			})
		}
	})

	t.Run("KeyTransitions", func(t *testing.T) {
		a, b := openPair(t)
		ks := newKeystore(1)
		mustCreate(t, a, ks)
		k := newKey(1, ks.ID)
		k.State = KeyCreating
		mustCreateKey(t, a, k)
		oneWins(t, race(a, b, func(s Store, i int) error {
			return s.ActivateKey(ctx, k.ID, []byte{byte(i)}, baseTime)
		}), ErrStateConflict)
		due := baseTime.Add(7 * 24 * time.Hour)
		oneWins(t, race(a, b, func(s Store, _ int) error {
			return s.SetKeyState(ctx, k.ID, KeyEnabled, KeyPendingDeletion, baseTime, due)
		}), ErrStateConflict)
		oneWins(t, race(a, b, func(s Store, _ int) error {
			return s.SetKeyState(ctx, k.ID, KeyPendingDeletion, KeyDisabled, baseTime, time.Time{})
		}), ErrStateConflict)
		oneWins(t, race(a, b, func(s Store, _ int) error { return s.DeleteKey(ctx, k.ID) }), ErrNotFound)
	})

	// Keys created while the keystore is disabled or deleted: either a key
	// got in first and pins the keystore, or the keystore went first and no
	// key names it.
	t.Run("CreateKeyVersusDisableAndDelete", func(t *testing.T) {
		for range 5 {
			a, b := openPair(t)
			ks := newKeystore(1)
			mustCreate(t, a, ks)
			var disabled, deleted bool
			errs := race(a, b, func(s Store, i int) error {
				switch i {
				case 0:
					err := s.SetKeystoreState(ctx, ks.ID, StateEnabled, StateDisabled, baseTime)
					disabled = err == nil
					if errors.Is(err, ErrNotFound) { // the delete went first
						return nil
					}
					return err
				case 1:
					// Not a transition the service makes from ENABLED, but the
					// store must keep keys and keystore consistent anyway.
					err := s.DeleteKeystore(ctx, ks.ID)
					deleted = err == nil
					if errors.Is(err, ErrKeystoreHasKeys) {
						return nil
					}
					return err
				default:
					err := s.CreateKey(ctx, newKey(i, ks.ID))
					if errors.Is(err, ErrStateConflict) || errors.Is(err, ErrNotFound) {
						return nil
					}
					return err
				}
			})
			for i, err := range errs {
				if err != nil {
					t.Fatalf("racer %d: %v", i, err)
				}
			}
			if !disabled && !deleted {
				t.Fatal("the only disable lost, and not to the delete")
			}
			created := 0
			for i := 2; i < n; i++ {
				if _, err := a.GetKey(ctx, newKey(i, ks.ID).ID); err == nil {
					created++
				}
			}
			count, err := b.CountKeys(ctx, ks.ID)
			if err != nil || count != created {
				t.Fatalf("CountKeys = %d, %v; want %d", count, err, created)
			}
			if deleted && created != 0 {
				t.Fatalf("keystore deleted but %d keys name it", created)
			}
			if _, err := a.GetKeystore(ctx, ks.ID); deleted != errors.Is(err, ErrNotFound) {
				t.Fatalf("deleted=%v but GetKeystore = %v", deleted, err)
			}
		}
	})
}
