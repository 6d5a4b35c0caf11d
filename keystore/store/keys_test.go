package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"sort"
	"sync"
	"testing"
	"time"
)

// newKey returns a valid symmetric ENABLED key in keystoreID whose unique
// fields derive from n.
func newKey(n int, keystoreID string) Key {
	return Key{
		ID:          fmt.Sprintf("10000000-0000-4000-8000-%012d", n),
		DomainID:    "domain-a",
		ProjectID:   "project-1",
		KeystoreID:  keystoreID,
		Alias:       fmt.Sprintf("key-alias-%d", n),
		Spec:        "AES_256",
		Usage:       "ENCRYPT_DECRYPT",
		Description: fmt.Sprintf("key %d", n),
		Origin:      "kms",
		State:       KeyEnabled,
		CreatedAt:   baseTime,
		UpdatedAt:   baseTime.Add(time.Second),
	}
}

// storedKey is k as it reads back: times at millisecond precision, in UTC,
// an empty PublicKey as nil.
func storedKey(k Key) Key {
	k.CreatedAt = k.CreatedAt.Truncate(time.Millisecond).UTC()
	k.UpdatedAt = k.UpdatedAt.Truncate(time.Millisecond).UTC()
	if !k.DeletionAt.IsZero() {
		k.DeletionAt = k.DeletionAt.Truncate(time.Millisecond).UTC()
	}
	if len(k.PublicKey) == 0 {
		k.PublicKey = nil
	}
	return k
}

func assertKey(t *testing.T, got, want Key) {
	t.Helper()
	for _, tm := range []time.Time{got.CreatedAt, got.UpdatedAt} {
		if tm.Location() != time.UTC {
			t.Errorf("key %s: time %v not in UTC", got.ID, tm)
		}
	}
	if got.DeletionAt.IsZero() != want.DeletionAt.IsZero() ||
		!got.DeletionAt.IsZero() && (!got.DeletionAt.Equal(want.DeletionAt) || got.DeletionAt.Location() != time.UTC) {
		t.Errorf("key %s: DeletionAt = %v, want %v (UTC)", got.ID, got.DeletionAt, want.DeletionAt)
	}
	if !got.CreatedAt.Equal(want.CreatedAt) || !got.UpdatedAt.Equal(want.UpdatedAt) {
		t.Errorf("key %s: times = %v, %v; want %v, %v", got.ID, got.CreatedAt, got.UpdatedAt, want.CreatedAt, want.UpdatedAt)
	}
	if (got.PublicKey == nil) != (want.PublicKey == nil) || !bytes.Equal(got.PublicKey, want.PublicKey) {
		t.Errorf("key %s: PublicKey = %#v, want %#v", got.ID, got.PublicKey, want.PublicKey)
	}
	for _, k := range []*Key{&got, &want} {
		k.CreatedAt, k.UpdatedAt, k.DeletionAt, k.PublicKey = time.Time{}, time.Time{}, time.Time{}, nil
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("key =\n%+v\nwant\n%+v", got, want)
	}
}

func mustCreateKey(t *testing.T, s Store, ks ...Key) {
	t.Helper()
	for _, k := range ks {
		if err := s.CreateKey(context.Background(), k); err != nil {
			t.Fatalf("CreateKey(%s): %v", k.ID, err)
		}
	}
}

func keyIDs(ks []Key) []string {
	out := make([]string, len(ks))
	for i, k := range ks {
		out[i] = k.ID
	}
	return out
}

func sortKeys(ks []Key) {
	sort.Slice(ks, func(i, j int) bool {
		a, b := ks[i], ks[j]
		if !a.CreatedAt.Equal(b.CreatedAt) {
			return a.CreatedAt.Before(b.CreatedAt)
		}
		return a.ID < b.ID
	})
}

var keySentinels = []error{ErrDuplicateAlias, ErrDuplicateID, ErrDuplicateSequence, ErrNotFound, ErrClusterBound}

// errIsOnly fails unless err is want (nil meaning success) and no other
// sentinel.
func errIsOnly(t *testing.T, what string, err, want error) {
	t.Helper()
	if want == nil && err != nil || want != nil && !errors.Is(err, want) {
		t.Fatalf("%s = %v, want %v", what, err, want)
	}
	for _, other := range keySentinels {
		if other != want && errors.Is(err, other) {
			t.Errorf("%s = %v, also matches %v", what, err, other)
		}
	}
}

// testStoreKeys is the key half of testStore.
func testStoreKeys(t *testing.T, open func(t *testing.T) Store) {
	ctx := context.Background()

	// withKeystores opens a store holding keystores newKeystore(1..n).
	withKeystores := func(t *testing.T, n int) (Store, []Keystore) {
		s := open(t)
		var kss []Keystore
		for i := 1; i <= n; i++ {
			kss = append(kss, newKeystore(i))
		}
		mustCreate(t, s, kss...)
		return s, kss
	}

	t.Run("KeyRoundTrip", func(t *testing.T) {
		s, kss := withKeystores(t, 1)
		symmetric := newKey(1, kss[0].ID)
		symmetric.State = KeyCreating
		asymmetric := newKey(2, kss[0].ID)
		asymmetric.Spec, asymmetric.Usage = "EC_P256", "SIGN_VERIFY"
		asymmetric.PublicKey = []byte{0x30, 0x59, 0x30, 0x13, 0x00, 0xff, 0x00}
		asymmetric.Sequence = "req-0001"
		asymmetric.ProjectID = "project-2"
		asymmetric.State = KeyPendingDeletion
		asymmetric.DeletionAt = baseTime.Add(7*24*time.Hour + 456*time.Microsecond)
		emptyPub := newKey(3, kss[0].ID)
		emptyPub.PublicKey = []byte{}
		emptyPub.State = KeyDisabled
		mustCreateKey(t, s, symmetric, asymmetric, emptyPub)
		for _, k := range []Key{symmetric, asymmetric, emptyPub} {
			got, err := s.GetKey(ctx, k.ID)
			if err != nil {
				t.Fatalf("GetKey(%s): %v", k.ID, err)
			}
			assertKey(t, got, storedKey(k))
		}
		if _, err := s.GetKey(ctx, "missing"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("GetKey(missing) = %v, want ErrNotFound", err)
		}
	})

	t.Run("KeyConstraints", func(t *testing.T) {
		tests := []struct {
			name   string
			modify func(k *Key) // applied to a copy of the existing key
			want   error
		}{
			{"same alias same domain", func(k *Key) { k.ID, k.Sequence = "other-id", "" }, ErrDuplicateAlias},
			{"same alias other keystore", func(k *Key) { k.ID, k.Sequence, k.KeystoreID = "other-id", "", newKeystore(2).ID }, ErrDuplicateAlias},
			{"same alias other domain", func(k *Key) { k.ID, k.DomainID = "other-id", "domain-b" }, nil},
			{"alias of a keystore", func(k *Key) { k.ID, k.Sequence, k.Alias = "other-id", "", newKeystore(1).Alias }, nil},
			{"same id", func(k *Key) { k.Alias, k.Sequence = "other-alias", "" }, ErrDuplicateID},
			{"same id other domain", func(k *Key) { k.Alias, k.Sequence, k.DomainID = "other-alias", "", "domain-b" }, ErrDuplicateID},
			{"same sequence same domain", func(k *Key) { k.ID, k.Alias = "other-id", "other-alias" }, ErrDuplicateSequence},
			{"same sequence other domain", func(k *Key) { k.ID, k.Alias, k.DomainID = "other-id", "other-alias", "domain-b" }, nil},
			{"unknown keystore", func(k *Key) {
				k.ID, k.Alias, k.Sequence, k.KeystoreID = "other-id", "other-alias", "", "no-such-keystore"
			}, ErrNotFound},
			{"nothing shared", func(k *Key) { k.ID, k.Alias, k.Sequence = "other-id", "other-alias", "other-seq" }, nil},
		}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				s, kss := withKeystores(t, 2)
				existing := newKey(1, kss[0].ID)
				existing.Sequence = "seq-1"
				existing.State = KeyCreating // constraints hold in every state
				mustCreateKey(t, s, existing)
				k := existing
				tc.modify(&k)
				errIsOnly(t, "CreateKey", s.CreateKey(ctx, k), tc.want)
				want := 1
				if tc.want == nil {
					want = 2
				}
				if all, err := s.AllKeys(ctx); err != nil || len(all) != want {
					t.Fatalf("AllKeys = %v, %v; want %d rows", keyIDs(all), err, want)
				}
			})
		}
	})

	t.Run("KeyEmptySequencesNeverCollide", func(t *testing.T) {
		s, kss := withKeystores(t, 1)
		for i := range 3 {
			k := newKey(i, kss[0].ID)
			k.Sequence = ""
			mustCreateKey(t, s, k)
		}
		if _, err := s.KeyBySequence(ctx, "domain-a", ""); !errors.Is(err, ErrNotFound) {
			t.Fatalf("KeyBySequence(\"\") = %v, want ErrNotFound", err)
		}
	})

	t.Run("KeyBySequence", func(t *testing.T) {
		s, kss := withKeystores(t, 1)
		a := newKey(1, kss[0].ID)
		a.Sequence = "seq"
		b := newKey(2, kss[0].ID)
		b.Sequence, b.DomainID = "seq", "domain-b"
		c := newKey(3, kss[0].ID) // no sequence
		c.State = KeyCreating
		mustCreateKey(t, s, a, b, c)
		for _, want := range []Key{a, b} {
			got, err := s.KeyBySequence(ctx, want.DomainID, want.Sequence)
			if err != nil {
				t.Fatalf("KeyBySequence(%s, %s): %v", want.DomainID, want.Sequence, err)
			}
			assertKey(t, got, storedKey(want))
		}
		// A CREATING key is found too: a retry must see the half-done create.
		c2 := newKey(4, kss[0].ID)
		c2.Sequence, c2.State = "seq-creating", KeyCreating
		mustCreateKey(t, s, c2)
		if got, err := s.KeyBySequence(ctx, "domain-a", "seq-creating"); err != nil || got.ID != c2.ID {
			t.Fatalf("KeyBySequence(CREATING) = %s, %v; want %s", got.ID, err, c2.ID)
		}
		for _, q := range [][2]string{{"domain-c", "seq"}, {"domain-a", "other"}, {"domain-a", ""}} {
			if _, err := s.KeyBySequence(ctx, q[0], q[1]); !errors.Is(err, ErrNotFound) {
				t.Errorf("KeyBySequence(%s, %q) = %v, want ErrNotFound", q[0], q[1], err)
			}
		}
	})

	t.Run("ListKeys", func(t *testing.T) {
		s, kss := withKeystores(t, 2)
		states := []KeyState{KeyEnabled, KeyDisabled, KeyPendingDeletion}
		specs := []string{"AES_256", "RSA_2048", "EC_P256", "SM4"}
		var listed []Key
		for i := range 30 {
			k := newKey(i, kss[i%2].ID)
			// Reverse id order against insertion, three rows per millisecond.
			k.ID = fmt.Sprintf("key-%02d", 29-i)
			k.CreatedAt = baseTime.Add(time.Duration(i/3) * time.Millisecond)
			k.State = states[i%len(states)]
			if k.State == KeyPendingDeletion {
				k.DeletionAt = baseTime.Add(time.Hour)
			}
			k.Spec = specs[i%len(specs)]
			mustCreateKey(t, s, k)
			listed = append(listed, storedKey(k))
		}
		sortKeys(listed)
		// Keys that are never listed in domain-a.
		hidden := []Key{newKey(100, kss[0].ID), newKey(101, kss[0].ID)}
		hidden[0].State = KeyCreating
		hidden[1].DomainID = "domain-b"
		mustCreateKey(t, s, hidden...)

		filters := []KeyFilter{
			{},
			{State: string(KeyEnabled)},
			{State: string(KeyDisabled)},
			{State: string(KeyPendingDeletion)},
			{Spec: "RSA_2048"},
			{State: string(KeyEnabled), Spec: "AES_256"},
			{State: string(KeyDisabled), Spec: "AES_256"}, // no such combination
			{State: string(KeyCreating)},                  // CREATING is never listed
			{Spec: "NO_SUCH_SPEC"},
		}
		for _, f := range filters {
			t.Run(fmt.Sprintf("state=%q spec=%q", f.State, f.Spec), func(t *testing.T) {
				var want []Key
				for _, k := range listed {
					if (f.State == "" || string(k.State) == f.State) && (f.Spec == "" || k.Spec == f.Spec) {
						want = append(want, k)
					}
				}
				var got []Key
				for offset := 0; ; {
					page, total, err := s.ListKeys(ctx, "domain-a", f, 4, offset)
					if err != nil {
						t.Fatalf("ListKeys(offset %d): %v", offset, err)
					}
					if total != len(want) {
						t.Fatalf("ListKeys(offset %d) total = %d, want %d", offset, total, len(want))
					}
					if page == nil || len(page) > 4 {
						t.Fatalf("ListKeys(offset %d) returned %#v, want non-nil, at most 4", offset, keyIDs(page))
					}
					if len(page) == 0 {
						break
					}
					got = append(got, page...)
					offset += len(page)
				}
				if len(got) != len(want) {
					t.Fatalf("paged %v, want %v", keyIDs(got), keyIDs(want))
				}
				for i := range want {
					assertKey(t, got[i], want[i])
				}
			})
		}

		other, total, err := s.ListKeys(ctx, "domain-b", KeyFilter{}, 10, 0)
		if err != nil || total != 1 || len(other) != 1 || other[0].ID != hidden[1].ID {
			t.Fatalf("ListKeys(domain-b) = %v, %d, %v; want [%s], 1", keyIDs(other), total, err, hidden[1].ID)
		}
		_, total, err = s.ListKeys(ctx, "domain-a", KeyFilter{}, 0, 0)
		if err != nil || total != len(listed) {
			t.Fatalf("ListKeys(limit 0) total = %d, %v; want %d", total, err, len(listed))
		}
		for _, lo := range [][2]int{{-1, 0}, {10, -1}} {
			if _, _, err := s.ListKeys(ctx, "domain-a", KeyFilter{}, lo[0], lo[1]); err == nil {
				t.Errorf("ListKeys(limit %d, offset %d) = nil error", lo[0], lo[1])
			}
		}
		all, err := s.AllKeys(ctx)
		if err != nil || len(all) != len(listed)+len(hidden) {
			t.Fatalf("AllKeys = %d rows, %v; want %d (every state, every domain)", len(all), err, len(listed)+len(hidden))
		}
		wantAll := append(slices.Clone(listed), storedKey(hidden[0]), storedKey(hidden[1]))
		sortKeys(wantAll)
		if !slices.Equal(keyIDs(all), keyIDs(wantAll)) {
			t.Fatalf("AllKeys order = %v, want %v", keyIDs(all), keyIDs(wantAll))
		}
	})

	t.Run("SetKeyState", func(t *testing.T) {
		s, kss := withKeystores(t, 1)
		k := newKey(1, kss[0].ID)
		k.State = KeyCreating
		mustCreateKey(t, s, k)
		at := baseTime.Add(time.Hour + 123*time.Microsecond)
		due := baseTime.Add(7*24*time.Hour + 999*time.Microsecond)

		steps := []struct {
			name     string
			id       string
			from, to KeyState
			deletion time.Time
			want     error
		}{
			{"confirm", k.ID, KeyCreating, KeyEnabled, time.Time{}, nil},
			{"wrong from", k.ID, KeyCreating, KeyDisabled, time.Time{}, ErrStateConflict},
			{"unknown id", "missing", KeyEnabled, KeyDisabled, time.Time{}, ErrNotFound},
			{"schedule deletion", k.ID, KeyEnabled, KeyPendingDeletion, due, nil},
			{"schedule again", k.ID, KeyEnabled, KeyPendingDeletion, due, ErrStateConflict},
			{"cancel deletion", k.ID, KeyPendingDeletion, KeyDisabled, time.Time{}, nil},
		}
		for i, st := range steps {
			err := s.SetKeyState(ctx, st.id, st.from, st.to, at.Add(time.Duration(i)*time.Second), st.deletion)
			errIsOnly(t, "SetKeyState "+st.name, err, st.want)
			if st.want != nil {
				continue
			}
			got, err := s.GetKey(ctx, k.ID)
			if err != nil {
				t.Fatalf("GetKey after %s: %v", st.name, err)
			}
			want := storedKey(k)
			want.State = st.to
			want.UpdatedAt = at.Add(time.Duration(i) * time.Second).Truncate(time.Millisecond).UTC()
			want.DeletionAt = st.deletion
			assertKey(t, got, storedKey(want))
		}
	})

	t.Run("ActivateKey", func(t *testing.T) {
		s, kss := withKeystores(t, 1)
		asym := newKey(1, kss[0].ID)
		asym.State, asym.Spec, asym.Usage = KeyCreating, "RSA_2048", "SIGN_VERIFY"
		sym := newKey(2, kss[0].ID)
		sym.State = KeyCreating
		mustCreateKey(t, s, asym, sym)
		at := baseTime.Add(time.Minute + 77*time.Microsecond)
		pub := []byte{0x30, 0x82, 0x01, 0x22, 0x00}

		errIsOnly(t, "ActivateKey(asymmetric)", s.ActivateKey(ctx, asym.ID, pub, at), nil)
		errIsOnly(t, "ActivateKey(symmetric)", s.ActivateKey(ctx, sym.ID, nil, at), nil)
		errIsOnly(t, "ActivateKey(again)", s.ActivateKey(ctx, asym.ID, []byte{1}, at.Add(time.Hour)), ErrStateConflict)
		errIsOnly(t, "ActivateKey(missing)", s.ActivateKey(ctx, "missing", nil, at), ErrNotFound)
		for _, k := range []Key{asym, sym} {
			want := k
			want.State, want.UpdatedAt = KeyEnabled, at
			if k.ID == asym.ID {
				want.PublicKey = pub
			}
			got, err := s.GetKey(ctx, k.ID)
			if err != nil {
				t.Fatalf("GetKey(%s): %v", k.ID, err)
			}
			assertKey(t, got, storedKey(want))
		}
	})

	t.Run("PendingDeletionNeedsDeletionAt", func(t *testing.T) {
		s, kss := withKeystores(t, 1)
		k := newKey(1, kss[0].ID)
		mustCreateKey(t, s, k)
		// A PENDING_DELETION key without a due time would never come due,
		// and a due time on any other state is meaningless.
		if err := s.SetKeyState(ctx, k.ID, KeyEnabled, KeyPendingDeletion, baseTime, time.Time{}); err == nil {
			t.Error("SetKeyState to PENDING_DELETION without DeletionAt succeeded")
		}
		if err := s.SetKeyState(ctx, k.ID, KeyEnabled, KeyDisabled, baseTime, baseTime); err == nil {
			t.Error("SetKeyState to DISABLED with DeletionAt succeeded")
		}
		bad := newKey(2, kss[0].ID)
		bad.State = KeyPendingDeletion
		if err := s.CreateKey(ctx, bad); err == nil {
			t.Error("CreateKey PENDING_DELETION without DeletionAt succeeded")
		}
		got, err := s.GetKey(ctx, k.ID)
		if err != nil {
			t.Fatalf("GetKey: %v", err)
		}
		assertKey(t, got, storedKey(k))
	})

	t.Run("DueDeletions", func(t *testing.T) {
		s, kss := withKeystores(t, 1)
		now := baseTime.Add(30 * 24 * time.Hour).Truncate(time.Millisecond)
		pending := func(n int, due time.Time) Key {
			k := newKey(n, kss[0].ID)
			k.State, k.DeletionAt = KeyPendingDeletion, due
			return k
		}
		early := pending(1, now.Add(-time.Hour))
		exact := pending(2, now)
		late := pending(3, now.Add(time.Millisecond))
		enabled := newKey(4, kss[0].ID)
		otherDomain := pending(5, now.Add(-time.Minute))
		otherDomain.DomainID = "domain-b"
		mustCreateKey(t, s, late, exact, enabled, otherDomain, early)

		got, err := s.DueDeletions(ctx, now)
		if err != nil {
			t.Fatalf("DueDeletions: %v", err)
		}
		want := []Key{early, otherDomain, exact}
		if !slices.Equal(keyIDs(got), keyIDs(want)) {
			t.Fatalf("DueDeletions(now) = %v, want %v (ordered by DeletionAt)", keyIDs(got), keyIDs(want))
		}
		for i := range want {
			assertKey(t, got[i], storedKey(want[i]))
		}
		// Sub-millisecond parts of now do not hide a key due in that millisecond.
		if got, err := s.DueDeletions(ctx, now.Add(time.Millisecond+500*time.Microsecond)); err != nil || len(got) != 4 {
			t.Fatalf("DueDeletions(now+1.5ms) = %v, %v; want 4 keys", keyIDs(got), err)
		}
		if got, err := s.DueDeletions(ctx, now.Add(-2*time.Hour)); err != nil || got == nil || len(got) != 0 {
			t.Fatalf("DueDeletions(before all) = %#v, %v; want empty", keyIDs(got), err)
		}
		// Cancelling a deletion takes the key out.
		if err := s.SetKeyState(ctx, exact.ID, KeyPendingDeletion, KeyDisabled, now, time.Time{}); err != nil {
			t.Fatalf("SetKeyState: %v", err)
		}
		if got, err := s.DueDeletions(ctx, now); err != nil || !slices.Equal(keyIDs(got), []string{early.ID, otherDomain.ID}) {
			t.Fatalf("DueDeletions after cancel = %v, %v; want [%s %s]", keyIDs(got), err, early.ID, otherDomain.ID)
		}
	})

	t.Run("DeleteDueKey", func(t *testing.T) {
		s, kss := withKeystores(t, 1)
		now := baseTime.Add(30 * 24 * time.Hour).Truncate(time.Millisecond)
		due := newKey(1, kss[0].ID)
		due.State, due.DeletionAt = KeyPendingDeletion, now.Add(-time.Minute)
		notYet := newKey(2, kss[0].ID)
		notYet.State, notYet.DeletionAt = KeyPendingDeletion, now.Add(time.Minute)
		cancelled := newKey(3, kss[0].ID)
		cancelled.State, cancelled.DeletionAt = KeyPendingDeletion, now.Add(-time.Minute)
		mustCreateKey(t, s, due, notYet, cancelled)
		if err := s.SetKeyState(ctx, cancelled.ID, KeyPendingDeletion, KeyDisabled, now, time.Time{}); err != nil {
			t.Fatal(err)
		}
		if err := s.DeleteDueKey(ctx, due.ID, now); err != nil {
			t.Fatalf("DeleteDueKey(due): %v", err)
		}
		if _, err := s.GetKey(ctx, due.ID); !errors.Is(err, ErrNotFound) {
			t.Errorf("the due key is still there: %v", err)
		}
		for _, k := range []Key{notYet, cancelled, due} {
			if err := s.DeleteDueKey(ctx, k.ID, now); !errors.Is(err, ErrStateConflict) {
				t.Errorf("DeleteDueKey(%s) = %v, want ErrStateConflict", k.ID, err)
			}
		}
		for _, k := range []Key{notYet, cancelled} {
			if _, err := s.GetKey(ctx, k.ID); err != nil {
				t.Errorf("key %s removed: %v", k.ID, err)
			}
		}
	})

	t.Run("CountKeys", func(t *testing.T) {
		s, kss := withKeystores(t, 3)
		for i, st := range []KeyState{KeyCreating, KeyEnabled, KeyDisabled, KeyPendingDeletion, KeyEnabled} {
			k := newKey(i, kss[i%2].ID)
			k.State = st
			if st == KeyPendingDeletion {
				k.DeletionAt = baseTime
			}
			mustCreateKey(t, s, k)
		}
		for ks, want := range map[string]int{kss[0].ID: 3, kss[1].ID: 2, kss[2].ID: 0, "missing": 0} {
			if n, err := s.CountKeys(ctx, ks); err != nil || n != want {
				t.Errorf("CountKeys(%s) = %d, %v; want %d", ks, n, err, want)
			}
		}
	})

	t.Run("DeleteKeystoreWithKeys", func(t *testing.T) {
		s, kss := withKeystores(t, 2)
		a := newKey(1, kss[0].ID)
		b := newKey(2, kss[0].ID)
		b.State = KeyCreating // a half-created key still pins its keystore
		mustCreateKey(t, s, a, b)
		for _, k := range []Key{a, b} {
			if err := s.DeleteKeystore(ctx, kss[0].ID); !errors.Is(err, ErrKeystoreHasKeys) || errors.Is(err, ErrNotFound) {
				t.Fatalf("DeleteKeystore with keys = %v, want ErrKeystoreHasKeys", err)
			}
			if _, err := s.GetKeystore(ctx, kss[0].ID); err != nil {
				t.Fatalf("GetKeystore after refused delete: %v", err)
			}
			if err := s.DeleteKey(ctx, k.ID); err != nil {
				t.Fatalf("DeleteKey(%s): %v", k.ID, err)
			}
			if _, err := s.GetKey(ctx, k.ID); !errors.Is(err, ErrNotFound) {
				t.Fatalf("GetKey after delete = %v, want ErrNotFound", err)
			}
		}
		if err := s.DeleteKeystore(ctx, kss[0].ID); err != nil {
			t.Fatalf("DeleteKeystore without keys: %v", err)
		}
		// Keys can no longer name it.
		if err := s.CreateKey(ctx, a); !errors.Is(err, ErrNotFound) {
			t.Fatalf("CreateKey in deleted keystore = %v, want ErrNotFound", err)
		}
		if err := s.DeleteKeystore(ctx, kss[1].ID); err != nil {
			t.Fatalf("DeleteKeystore(never had keys): %v", err)
		}
		if err := s.DeleteKey(ctx, a.ID); !errors.Is(err, ErrNotFound) {
			t.Fatalf("DeleteKey(deleted) = %v, want ErrNotFound", err)
		}
	})

	t.Run("KeyAliasAndSequenceReusableAfterDelete", func(t *testing.T) {
		s, kss := withKeystores(t, 1)
		first := newKey(1, kss[0].ID)
		first.Sequence = "seq"
		mustCreateKey(t, s, first)
		if err := s.DeleteKey(ctx, first.ID); err != nil {
			t.Fatalf("DeleteKey: %v", err)
		}
		second := newKey(2, kss[0].ID)
		second.Alias, second.Sequence = first.Alias, first.Sequence
		mustCreateKey(t, s, second)
	})

	t.Run("ConcurrentCreateKey", func(t *testing.T) {
		tests := []struct {
			name   string
			modify func(k *Key)
			want   error
		}{
			{"same alias", func(k *Key) { k.Alias = "contested" }, ErrDuplicateAlias},
			{"same sequence", func(k *Key) { k.Sequence = "contested" }, ErrDuplicateSequence},
		}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				s, kss := withKeystores(t, 1)
				const n = 20
				errs := make([]error, n)
				start := make(chan struct{})
				var wg sync.WaitGroup
				for i := range n {
					k := newKey(i, kss[0].ID)
					tc.modify(&k)
					wg.Go(func() {
						<-start
						errs[i] = s.CreateKey(ctx, k)
					})
				}
				close(start)
				wg.Wait()
				wins := 0
				for i, err := range errs {
					switch {
					case err == nil:
						wins++
					case !errors.Is(err, tc.want):
						t.Errorf("goroutine %d: %v, want %v", i, err, tc.want)
					}
				}
				if wins != 1 {
					t.Fatalf("%d creates succeeded, want exactly 1", wins)
				}
				if all, err := s.AllKeys(ctx); err != nil || len(all) != 1 {
					t.Fatalf("AllKeys = %d rows, %v; want 1", len(all), err)
				}
			})
		}
	})

	// Violations of the keys CHECK constraints are caller bugs, not sentinels.
	t.Run("KeyCheckConstraintsNotMapped", func(t *testing.T) {
		s, kss := withKeystores(t, 1)
		bogus := newKey(1, kss[0].ID)
		bogus.State = "BOGUS"
		pending := newKey(2, kss[0].ID)
		pending.State = KeyPendingDeletion // without DeletionAt
		for _, k := range []Key{bogus, pending} {
			err := s.CreateKey(ctx, k)
			if err == nil {
				t.Fatalf("CreateKey(%s, state %s) succeeded", k.ID, k.State)
			}
			for _, sentinel := range append(keySentinels, ErrKeystoreHasKeys, ErrStateConflict) {
				if errors.Is(err, sentinel) {
					t.Fatalf("CreateKey = %v, mapped to %v", err, sentinel)
				}
			}
		}
	})

	t.Run("KeyListOrderingIsBytewise", func(t *testing.T) {
		s, kss := withKeystores(t, 1)
		want := []string{"B", "Z", "_", "a", "b", "~a", "é"}
		for i, id := range []string{"é", "b", "_", "~a", "Z", "a", "B"} {
			k := newKey(i, kss[0].ID)
			k.ID = id
			mustCreateKey(t, s, k)
		}
		for i, alias := range []string{"Case", "case", "CASE"} {
			k := newKey(10+i, kss[0].ID)
			k.Alias = alias
			k.DomainID = "domain-b"
			mustCreateKey(t, s, k)
		}
		got, total, err := s.ListKeys(ctx, "domain-a", KeyFilter{}, 100, 0)
		if err != nil || total != len(want) || !slices.Equal(keyIDs(got), want) {
			t.Fatalf("ListKeys = %q, %d, %v; want %q, %d", keyIDs(got), total, err, want, len(want))
		}
		all, err := s.AllKeys(ctx)
		wantAll := append(slices.Clone(want), newKey(10, "").ID, newKey(11, "").ID, newKey(12, "").ID)
		slices.Sort(wantAll)
		if err != nil || !slices.Equal(keyIDs(all), wantAll) {
			t.Fatalf("AllKeys = %q, %v; want %q", keyIDs(all), err, wantAll)
		}
	})

	t.Run("KeysCancelledContext", func(t *testing.T) {
		s, kss := withKeystores(t, 2)
		k := newKey(1, kss[0].ID)
		k.Sequence = "seq"
		mustCreateKey(t, s, k)
		cancelled, cancel := context.WithCancel(ctx)
		cancel()
		tests := []struct {
			name string
			call func() error
		}{
			{"CreateKey", func() error { return s.CreateKey(cancelled, newKey(2, kss[0].ID)) }},
			{"GetKey", func() error { _, err := s.GetKey(cancelled, k.ID); return err }},
			{"KeyBySequence", func() error { _, err := s.KeyBySequence(cancelled, k.DomainID, k.Sequence); return err }},
			{"ListKeys", func() error { _, _, err := s.ListKeys(cancelled, k.DomainID, KeyFilter{}, 10, 0); return err }},
			{"SetKeyState", func() error {
				return s.SetKeyState(cancelled, k.ID, KeyEnabled, KeyDisabled, baseTime, time.Time{})
			}},
			{"ActivateKey", func() error { return s.ActivateKey(cancelled, k.ID, nil, baseTime) }},
			{"DeleteKey", func() error { return s.DeleteKey(cancelled, k.ID) }},
			{"CountKeys", func() error { _, err := s.CountKeys(cancelled, kss[0].ID); return err }},
			{"DueDeletions", func() error { _, err := s.DueDeletions(cancelled, baseTime); return err }},
			{"AllKeys", func() error { _, err := s.AllKeys(cancelled); return err }},
			{"DeleteKeystore", func() error { return s.DeleteKeystore(cancelled, kss[1].ID) }},
		}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				if err := tc.call(); !errors.Is(err, context.Canceled) {
					t.Fatalf("%s with cancelled ctx = %v, want context.Canceled", tc.name, err)
				}
			})
		}
		got, err := s.GetKey(ctx, k.ID)
		if err != nil {
			t.Fatalf("GetKey: %v", err)
		}
		assertKey(t, got, storedKey(k))
		if all, err := s.AllKeys(ctx); err != nil || len(all) != 1 {
			t.Fatalf("AllKeys = %v, %v; want only %s", keyIDs(all), err, k.ID)
		}
	})
}
