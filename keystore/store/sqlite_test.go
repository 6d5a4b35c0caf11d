package store

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"testing/fstest"
	"time"
)

func TestSQLite(t *testing.T) {
	testStore(t, func(t *testing.T) Store {
		return openTestSQLite(t, filepath.Join(t.TempDir(), "hsmbridge.db"))
	})
}

func openTestSQLite(t *testing.T, path string) *SQLite {
	t.Helper()
	s, err := OpenSQLite(context.Background(), path)
	if err != nil {
		t.Fatalf("OpenSQLite: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return s
}

var baseTime = time.Date(2025, 3, 4, 5, 6, 7, 891_234_567, time.FixedZone("UTC+1", 3600))

// newKeystore returns a valid row whose unique fields derive from n.
func newKeystore(n int) Keystore {
	return Keystore{
		ID:                  fmt.Sprintf("00000000-0000-4000-8000-%012d", n),
		DomainID:            "domain-a",
		ProjectID:           "project-1",
		Alias:               fmt.Sprintf("alias-%d", n),
		Type:                "DHSM",
		ClusterID:           fmt.Sprintf("cluster-%d", n),
		State:               StateEnabled,
		TokenSerial:         fmt.Sprintf("serial-%d", n),
		TokenLabel:          fmt.Sprintf("label-%d", n),
		CAFingerprint:       "aa" + fmt.Sprintf("%062d", n),
		IdentityFingerprint: "bb" + fmt.Sprintf("%062d", n),
		CreatedAt:           baseTime,
		UpdatedAt:           baseTime.Add(time.Second),
	}
}

// stored is k as it reads back: times at millisecond precision, in UTC.
func stored(k Keystore) Keystore {
	k.CreatedAt = k.CreatedAt.Truncate(time.Millisecond).UTC()
	k.UpdatedAt = k.UpdatedAt.Truncate(time.Millisecond).UTC()
	return k
}

func assertKeystore(t *testing.T, got, want Keystore) {
	t.Helper()
	for _, tm := range []time.Time{got.CreatedAt, got.UpdatedAt} {
		if tm.Location() != time.UTC {
			t.Errorf("time %v not in UTC", tm)
		}
	}
	if !got.CreatedAt.Equal(want.CreatedAt) || !got.UpdatedAt.Equal(want.UpdatedAt) {
		t.Errorf("times = %v, %v; want %v, %v", got.CreatedAt, got.UpdatedAt, want.CreatedAt, want.UpdatedAt)
	}
	got.CreatedAt, got.UpdatedAt, want.CreatedAt, want.UpdatedAt = time.Time{}, time.Time{}, time.Time{}, time.Time{}
	if got != want {
		t.Errorf("keystore =\n%+v\nwant\n%+v", got, want)
	}
}

func mustCreate(t *testing.T, s Store, ks ...Keystore) {
	t.Helper()
	for _, k := range ks {
		if err := s.CreateKeystore(context.Background(), k); err != nil {
			t.Fatalf("CreateKeystore(%s): %v", k.ID, err)
		}
	}
}

func ids(ks []Keystore) []string {
	out := make([]string, len(ks))
	for i, k := range ks {
		out[i] = k.ID
	}
	return out
}

// testStore is the behaviour every Store must have. open returns an empty
// store that is closed when t ends.
func testStore(t *testing.T, open func(t *testing.T) Store) {
	ctx := context.Background()

	t.Run("CreateGetRoundTrip", func(t *testing.T) {
		s := open(t)
		k := newKeystore(1)
		k.Type = "CDMS"
		k.State = StateCreating
		mustCreate(t, s, k)
		got, err := s.GetKeystore(ctx, k.ID)
		if err != nil {
			t.Fatalf("GetKeystore: %v", err)
		}
		assertKeystore(t, got, stored(k))
	})

	t.Run("GetUnknown", func(t *testing.T) {
		s := open(t)
		if _, err := s.GetKeystore(ctx, "missing"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("GetKeystore(missing) = %v, want ErrNotFound", err)
		}
	})

	t.Run("UniqueConstraints", func(t *testing.T) {
		tests := []struct {
			name   string
			modify func(k *Keystore) // applied to a copy of the existing row
			want   error
		}{
			{"same alias same domain", func(k *Keystore) { k.ID, k.ClusterID = "other-id", "other-cluster" }, ErrDuplicateAlias},
			{"same alias other domain", func(k *Keystore) { k.ID, k.ClusterID, k.DomainID = "other-id", "other-cluster", "domain-b" }, nil},
			{"same cluster", func(k *Keystore) { k.ID, k.Alias = "other-id", "other-alias" }, ErrClusterBound},
			{"same cluster other domain", func(k *Keystore) { k.ID, k.Alias, k.DomainID = "other-id", "other-alias", "domain-b" }, ErrClusterBound},
			{"same id", func(k *Keystore) { k.Alias, k.ClusterID = "other-alias", "other-cluster" }, ErrDuplicateID},
			{"nothing shared", func(k *Keystore) { k.ID, k.Alias, k.ClusterID = "other-id", "other-alias", "other-cluster" }, nil},
		}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				s := open(t)
				existing := newKeystore(1)
				existing.State = StateDeleting // constraints hold in every state
				mustCreate(t, s, existing)
				k := existing
				tc.modify(&k)
				err := s.CreateKeystore(ctx, k)
				if tc.want == nil && err != nil || tc.want != nil && !errors.Is(err, tc.want) {
					t.Fatalf("CreateKeystore = %v, want %v", err, tc.want)
				}
				for _, other := range []error{ErrDuplicateAlias, ErrClusterBound, ErrDuplicateID} {
					if other != tc.want && errors.Is(err, other) {
						t.Errorf("CreateKeystore = %v, also matches %v", err, other)
					}
				}
			})
		}
	})

	t.Run("AliasAndClusterReusableAfterDelete", func(t *testing.T) {
		s := open(t)
		first := newKeystore(1)
		mustCreate(t, s, first)
		if err := s.DeleteKeystore(ctx, first.ID); err != nil {
			t.Fatalf("DeleteKeystore: %v", err)
		}
		if _, err := s.GetKeystore(ctx, first.ID); !errors.Is(err, ErrNotFound) {
			t.Fatalf("GetKeystore after delete = %v, want ErrNotFound", err)
		}
		second := newKeystore(2)
		second.Alias, second.ClusterID = first.Alias, first.ClusterID
		mustCreate(t, s, second)
		// The id is free again too.
		if err := s.DeleteKeystore(ctx, second.ID); err != nil {
			t.Fatalf("DeleteKeystore: %v", err)
		}
		mustCreate(t, s, first)
	})

	t.Run("DeleteUnknown", func(t *testing.T) {
		s := open(t)
		if err := s.DeleteKeystore(ctx, "missing"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("DeleteKeystore(missing) = %v, want ErrNotFound", err)
		}
	})

	t.Run("ListOrdering", func(t *testing.T) {
		s := open(t)
		at := func(n int, id string, ms int) Keystore {
			k := newKeystore(n)
			k.ID = id
			k.CreatedAt = baseTime.Add(time.Duration(ms) * time.Millisecond)
			return k
		}
		// Insertion order differs from both id order and time order; ties
		// on CreatedAt are broken by ID.
		mustCreate(t, s, at(1, "c", 5), at(2, "b", 5), at(3, "z", 1), at(4, "a", 9), at(5, "d", 5))
		got, total, err := s.ListKeystores(ctx, "domain-a", 100, 0)
		if err != nil {
			t.Fatalf("ListKeystores: %v", err)
		}
		want := []string{"z", "b", "c", "d", "a"}
		if !slices.Equal(ids(got), want) || total != len(want) {
			t.Fatalf("ListKeystores = %v, %d; want %v, %d", ids(got), total, want, len(want))
		}
		all, err := s.AllKeystores(ctx)
		if err != nil {
			t.Fatalf("AllKeystores: %v", err)
		}
		if !slices.Equal(ids(all), want) {
			t.Fatalf("AllKeystores = %v, want %v", ids(all), want)
		}
	})

	t.Run("ListPagingAndVisibility", func(t *testing.T) {
		s := open(t)
		var want []Keystore
		for i := range 25 {
			k := newKeystore(i)
			// Reverse id order against insertion, three rows per millisecond.
			k.ID = fmt.Sprintf("id-%02d", 24-i)
			k.CreatedAt = baseTime.Add(time.Duration(i/3) * time.Millisecond)
			if i%2 == 0 {
				k.State = StateDisabled
			}
			mustCreate(t, s, k)
			want = append(want, stored(k))
		}
		sort.Slice(want, func(i, j int) bool {
			a, b := want[i], want[j]
			if !a.CreatedAt.Equal(b.CreatedAt) {
				return a.CreatedAt.Before(b.CreatedAt)
			}
			return a.ID < b.ID
		})
		// Rows that must not be listed or counted.
		hidden := []Keystore{newKeystore(100), newKeystore(101), newKeystore(102)}
		hidden[0].State = StateCreating
		hidden[1].State = StateDeleting
		hidden[2].DomainID = "domain-b"
		mustCreate(t, s, hidden...)

		var got []Keystore
		for offset := 0; ; {
			page, total, err := s.ListKeystores(ctx, "domain-a", 10, offset)
			if err != nil {
				t.Fatalf("ListKeystores(offset %d): %v", offset, err)
			}
			if total != 25 {
				t.Fatalf("ListKeystores(offset %d) total = %d, want 25", offset, total)
			}
			if len(page) > 10 {
				t.Fatalf("ListKeystores(offset %d) returned %d rows, limit 10", offset, len(page))
			}
			if len(page) == 0 {
				break
			}
			got = append(got, page...)
			offset += len(page)
		}
		if len(got) != len(want) {
			t.Fatalf("paged %d rows %v, want %d", len(got), ids(got), len(want))
		}
		for i := range want {
			assertKeystore(t, got[i], want[i])
		}

		other, total, err := s.ListKeystores(ctx, "domain-b", 10, 0)
		if err != nil || total != 1 || len(other) != 1 || other[0].ID != hidden[2].ID {
			t.Fatalf("ListKeystores(domain-b) = %v, %d, %v; want [%s], 1", ids(other), total, err, hidden[2].ID)
		}
		none, total, err := s.ListKeystores(ctx, "domain-none", 10, 0)
		if err != nil || total != 0 || none == nil || len(none) != 0 {
			t.Fatalf("ListKeystores(domain-none) = %#v, %d, %v; want empty, 0", none, total, err)
		}
		all, err := s.AllKeystores(ctx)
		if err != nil || len(all) != 28 {
			t.Fatalf("AllKeystores = %d rows, %v; want 28 (every state, every domain)", len(all), err)
		}
	})

	t.Run("ListRejectsNegative", func(t *testing.T) {
		s := open(t)
		for _, lo := range [][2]int{{-1, 0}, {10, -1}} {
			if _, _, err := s.ListKeystores(ctx, "domain-a", lo[0], lo[1]); err == nil {
				t.Errorf("ListKeystores(limit %d, offset %d) = nil error", lo[0], lo[1])
			}
		}
	})

	t.Run("SetKeystoreState", func(t *testing.T) {
		s := open(t)
		k := newKeystore(1)
		k.State = StateCreating
		mustCreate(t, s, k)
		at := baseTime.Add(time.Hour + 123*time.Microsecond)

		tests := []struct {
			name     string
			id       string
			from, to State
			want     error
		}{
			{"success", k.ID, StateCreating, StateEnabled, nil},
			{"wrong from", k.ID, StateCreating, StateDisabled, ErrStateConflict},
			{"unknown id", "missing", StateEnabled, StateDisabled, ErrNotFound},
		}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				err := s.SetKeystoreState(ctx, tc.id, tc.from, tc.to, at)
				if tc.want == nil && err != nil || tc.want != nil && !errors.Is(err, tc.want) {
					t.Fatalf("SetKeystoreState = %v, want %v", err, tc.want)
				}
			})
		}
		// Only the successful move took effect.
		got, err := s.GetKeystore(ctx, k.ID)
		if err != nil {
			t.Fatalf("GetKeystore: %v", err)
		}
		want := stored(k)
		want.State = StateEnabled
		want.UpdatedAt = at.Truncate(time.Millisecond).UTC()
		assertKeystore(t, got, want)
	})

	t.Run("ConcurrentCreate", func(t *testing.T) {
		tests := []struct {
			name   string
			modify func(k *Keystore) // what makes goroutine i's row collide
			want   error
		}{
			{"same alias", func(k *Keystore) { k.Alias = "contested" }, ErrDuplicateAlias},
			{"same cluster", func(k *Keystore) { k.ClusterID = "contested" }, ErrClusterBound},
		}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				s := open(t)
				const n = 20
				errs := make([]error, n)
				start := make(chan struct{})
				var wg sync.WaitGroup
				for i := range n {
					k := newKeystore(i)
					tc.modify(&k)
					wg.Go(func() {
						<-start
						errs[i] = s.CreateKeystore(ctx, k)
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
				all, err := s.AllKeystores(ctx)
				if err != nil || len(all) != 1 {
					t.Fatalf("AllKeystores = %d rows, %v; want 1", len(all), err)
				}
			})
		}
	})

	t.Run("CancelledContext", func(t *testing.T) {
		s := open(t)
		k := newKeystore(1)
		mustCreate(t, s, k)
		cancelled, cancel := context.WithCancel(ctx)
		cancel()
		tests := []struct {
			name string
			call func() error
		}{
			{"CreateKeystore", func() error { return s.CreateKeystore(cancelled, newKeystore(2)) }},
			{"GetKeystore", func() error { _, err := s.GetKeystore(cancelled, k.ID); return err }},
			{"ListKeystores", func() error { _, _, err := s.ListKeystores(cancelled, k.DomainID, 10, 0); return err }},
			{"AllKeystores", func() error { _, err := s.AllKeystores(cancelled); return err }},
			{"SetKeystoreState", func() error {
				return s.SetKeystoreState(cancelled, k.ID, StateEnabled, StateDisabled, baseTime)
			}},
			{"DeleteKeystore", func() error { return s.DeleteKeystore(cancelled, k.ID) }},
		}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				if err := tc.call(); !errors.Is(err, context.Canceled) {
					t.Fatalf("%s with cancelled ctx = %v, want context.Canceled", tc.name, err)
				}
			})
		}
		// Nothing changed.
		got, err := s.GetKeystore(ctx, k.ID)
		if err != nil {
			t.Fatalf("GetKeystore: %v", err)
		}
		assertKeystore(t, got, stored(k))
		if _, err := s.GetKeystore(ctx, newKeystore(2).ID); !errors.Is(err, ErrNotFound) {
			t.Fatalf("GetKeystore(cancelled create) = %v, want ErrNotFound", err)
		}
	})

	// Text compares bytewise in every backend, as Go strings do: ids order
	// by bytes and aliases differing only in case are distinct.
	t.Run("ListOrderingIsBytewise", func(t *testing.T) {
		s := open(t)
		want := []string{"B", "Z", "_", "a", "b", "~a", "é"}
		for i, id := range []string{"é", "b", "_", "~a", "Z", "a", "B"} {
			k := newKeystore(i)
			k.ID = id
			mustCreate(t, s, k)
		}
		for i, alias := range []string{"Case", "case", "CASE"} {
			k := newKeystore(10 + i)
			k.Alias = alias
			k.State = StateCreating // not listed
			mustCreate(t, s, k)
		}
		if !slices.IsSorted(want) {
			t.Fatalf("test bug: %q not in Go string order", want)
		}
		got, total, err := s.ListKeystores(ctx, "domain-a", 100, 0)
		if err != nil || total != len(want) || !slices.Equal(ids(got), want) {
			t.Fatalf("ListKeystores = %q, %d, %v; want %q, %d", ids(got), total, err, want, len(want))
		}
		page, _, err := s.ListKeystores(ctx, "domain-a", 2, 2)
		if err != nil || !slices.Equal(ids(page), want[2:4]) {
			t.Fatalf("ListKeystores(limit 2, offset 2) = %q, %v; want %q", ids(page), err, want[2:4])
		}
	})

	// A violation of a constraint other than the unique ones is a caller
	// bug, not a sentinel.
	t.Run("CheckConstraintNotMapped", func(t *testing.T) {
		s := open(t)
		k := newKeystore(1)
		k.State = "BOGUS"
		err := s.CreateKeystore(ctx, k)
		if err == nil {
			t.Fatal("CreateKeystore with invalid state succeeded")
		}
		for _, sentinel := range []error{ErrDuplicateAlias, ErrClusterBound, ErrDuplicateID, ErrNotFound, ErrStateConflict} {
			if errors.Is(err, sentinel) {
				t.Fatalf("CreateKeystore = %v, mapped to %v", err, sentinel)
			}
		}
	})

	testStoreKeys(t, open)
}

func TestSQLiteReopen(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "hsmbridge.db")
	s, err := OpenSQLite(ctx, path)
	if err != nil {
		t.Fatalf("OpenSQLite: %v", err)
	}
	k := newKeystore(1)
	mustCreate(t, s, k)
	key := newKey(1, k.ID)
	key.PublicKey = []byte{0x30, 0x59, 0x00, 0xff}
	key.Sequence = "seq-1"
	mustCreateKey(t, s, key)
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}

	s2 := openTestSQLite(t, path)
	got, err := s2.GetKeystore(ctx, k.ID)
	if err != nil {
		t.Fatalf("GetKeystore after reopen: %v", err)
	}
	assertKeystore(t, got, stored(k))
	gotKey, err := s2.GetKey(ctx, key.ID)
	if err != nil {
		t.Fatalf("GetKey after reopen: %v", err)
	}
	assertKey(t, gotKey, storedKey(key))
	var versions, distinct, appliedAt int64
	if err := s2.db.QueryRowContext(ctx,
		`SELECT COUNT(*), COUNT(DISTINCT version), MAX(applied_at) FROM schema_migrations`).Scan(&versions, &distinct, &appliedAt); err != nil {
		t.Fatalf("read schema_migrations: %v", err)
	}
	if versions != 2 || distinct != 2 {
		t.Fatalf("schema_migrations has %d rows (%d versions), want 2 (0001, 0002 once each)", versions, distinct)
	}
	var mode string
	if err := s2.db.QueryRowContext(ctx, `PRAGMA journal_mode`).Scan(&mode); err != nil || mode != "wal" {
		t.Fatalf("journal_mode = %q, %v; want wal", mode, err)
	}
}

func TestSQLitePragmasOnEveryConnection(t *testing.T) {
	ctx := context.Background()
	s := openTestSQLite(t, filepath.Join(t.TempDir(), "hsmbridge.db"))
	// Hold several connections at once so the pool must open new ones.
	var conns []interface{ Close() error }
	for range 3 {
		c, err := s.db.Conn(ctx)
		if err != nil {
			t.Fatalf("Conn: %v", err)
		}
		conns = append(conns, c)
		var busy, fk, sync int
		if err := c.QueryRowContext(ctx, `PRAGMA busy_timeout`).Scan(&busy); err != nil {
			t.Fatalf("busy_timeout: %v", err)
		}
		if err := c.QueryRowContext(ctx, `PRAGMA foreign_keys`).Scan(&fk); err != nil {
			t.Fatalf("foreign_keys: %v", err)
		}
		if err := c.QueryRowContext(ctx, `PRAGMA synchronous`).Scan(&sync); err != nil {
			t.Fatalf("synchronous: %v", err)
		}
		if busy != 5000 || fk != 1 || sync != 2 {
			t.Errorf("busy_timeout=%d foreign_keys=%d synchronous=%d; want 5000 1 2 (FULL)", busy, fk, sync)
		}
	}
	for _, c := range conns {
		if err := c.Close(); err != nil {
			t.Errorf("Conn.Close: %v", err)
		}
	}
}

func TestOpenSQLitePaths(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "no-such-dir", "hsmbridge.db")
	_, err := OpenSQLite(context.Background(), missing)
	if !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("OpenSQLite(%s) = %v, want not-exist error", missing, err)
	}
	if err != nil && !strings.Contains(err.Error(), missing) {
		t.Errorf("error %q does not name the path", err)
	}

	// Characters that are URI delimiters must still name a plain file.
	odd := filepath.Join(dir, "a?b#c%20d.db")
	openTestSQLite(t, odd)
	if _, err := os.Stat(odd); err != nil {
		t.Fatalf("database file not created at %s: %v", odd, err)
	}
}

func TestOpenSQLiteCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := OpenSQLite(ctx, filepath.Join(t.TempDir(), "hsmbridge.db")); !errors.Is(err, context.Canceled) {
		t.Fatalf("OpenSQLite with cancelled ctx = %v, want context.Canceled", err)
	}
}

// The mapping must pick the constraint by its full column set and ignore
// anything that is not a keystores unique failure.
func TestUniqueViolationFromMessage(t *testing.T) {
	tests := []struct {
		msg  string
		want error
	}{
		{"constraint failed: UNIQUE constraint failed: keystores.domain_id, keystores.alias (2067)", ErrDuplicateAlias},
		{"UNIQUE constraint failed: keystores.alias, keystores.domain_id", ErrDuplicateAlias},
		{"constraint failed: UNIQUE constraint failed: keystores.cluster_id (2067)", ErrClusterBound},
		{"constraint failed: UNIQUE constraint failed: keystores.id (1555)", ErrDuplicateID},
		{"constraint failed: UNIQUE constraint failed: index 'keystores_cluster_key' (2067)", ErrClusterBound},
		{"constraint failed: UNIQUE constraint failed: index 'other_key' (2067)", nil},
		{"constraint failed: UNIQUE constraint failed: keystores.alias (2067)", nil},
		{"constraint failed: UNIQUE constraint failed: keystores.domain_id, keystores.alias, keystores.type (2067)", nil},
		{"constraint failed: UNIQUE constraint failed: schema_migrations.version (1555)", nil},
		{"constraint failed: CHECK constraint failed: keystores_state_check (275)", nil},
		{"constraint failed: UNIQUE constraint failed: keys.domain_id, keys.alias (2067)", ErrDuplicateAlias},
		{"constraint failed: UNIQUE constraint failed: keys.domain_id, keys.sequence (2067)", ErrDuplicateSequence},
		{"constraint failed: UNIQUE constraint failed: keys.id (1555)", ErrDuplicateID},
		{"constraint failed: UNIQUE constraint failed: index 'keys_domain_sequence_key' (2067)", ErrDuplicateSequence},
		{"constraint failed: UNIQUE constraint failed: keys.sequence (2067)", nil},
		{"constraint failed: UNIQUE constraint failed: keys.domain_id, keystores.alias (2067)", nil},
		{"constraint failed: FOREIGN KEY constraint failed (787)", nil},
		{"database is locked (5) (SQLITE_BUSY)", nil},
	}
	for _, tc := range tests {
		if got := uniqueViolationFromMessage(tc.msg); got != tc.want {
			t.Errorf("uniqueViolationFromMessage(%q) = %v, want %v", tc.msg, got, tc.want)
		}
	}
}

func TestSQLiteRefusesNewerSchema(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "hsmbridge.db")
	s, err := OpenSQLite(ctx, path)
	if err != nil {
		t.Fatalf("OpenSQLite: %v", err)
	}
	if _, err := s.db.ExecContext(ctx, `INSERT INTO schema_migrations (version, applied_at) VALUES (9999, 0)`); err != nil {
		t.Fatalf("insert future version: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if s, err := OpenSQLite(ctx, path); err == nil {
		s.Close()
		t.Fatal("OpenSQLite accepted a schema newer than the binary")
	}
}

func TestLoadMigrations(t *testing.T) {
	ok := fstest.MapFS{
		"m/0002_b.sql": {Data: []byte("B")},
		"m/0010_c.sql": {Data: []byte("C")},
		"m/0001_a.sql": {Data: []byte("A")},
		"m/README":     {Data: []byte("ignored")},
	}
	ms, err := loadMigrations(ok, "m")
	if err != nil {
		t.Fatalf("loadMigrations: %v", err)
	}
	var got []int
	for _, m := range ms {
		got = append(got, m.version)
	}
	if !slices.Equal(got, []int{1, 2, 10}) || ms[0].sql != "A" {
		t.Fatalf("versions = %v, first sql %q; want [1 2 10], A", got, ms[0].sql)
	}

	bad := map[string]fstest.MapFS{
		"duplicate": {"m/0001_a.sql": {}, "m/1_b.sql": {}},
		"no number": {"m/init.sql": {}},
		"zero":      {"m/0000_a.sql": {}},
		"empty":     {},
	}
	for name, fsys := range bad {
		if _, err := loadMigrations(fsys, "m"); err == nil {
			t.Errorf("%s: loadMigrations succeeded", name)
		}
	}
}
