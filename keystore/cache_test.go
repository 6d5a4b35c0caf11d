package keystore

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/hsmbridge/hsmbridge/keystore/store"
)

func TestCacheBounds(t *testing.T) {
	t0 := time.Unix(1_700_000_000, 0)
	down := errors.New("store down")
	keepAll := func(string) bool { return true }
	tests := []struct {
		name    string
		age     time.Duration // since the entry was cached
		fetch   error         // what the store answers
		want    string
		wantErr error
		fetched bool
	}{
		{"fresh entries are served without the store", 500 * time.Millisecond, nil, "cached", nil, false},
		{"an old entry is read again", 2 * time.Second, nil, "stored", nil, true},
		{"an old entry serves while the store is down", 20 * time.Second, down, "cached", nil, true},
		{"past maxStale the outage reaches the caller", 31 * time.Second, down, "", down, true},
		{"a row gone from the store is not served stale", 20 * time.Second, store.ErrNotFound, "", store.ErrNotFound, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := cache[string]{ttl: DefaultCacheTTL, maxStale: DefaultMaxStale}
			c.put("id", "cached", t0)
			fetched := false
			got, err := c.read("id", t0.Add(tt.age), func() (string, error) {
				fetched = true
				if tt.fetch != nil {
					return "", tt.fetch
				}
				return "stored", nil
			}, keepAll)
			if got != tt.want || !errors.Is(err, tt.wantErr) || fetched != tt.fetched {
				t.Errorf("read = %q, %v (fetched %v); want %q, %v (fetched %v)", got, err, fetched, tt.want, tt.wantErr, tt.fetched)
			}
		})
	}
}

// TestCacheRacingWriteNotRecached: a read that fetched before a write's drop must not put
// its (old) row back.
func TestCacheRacingWriteNotRecached(t *testing.T) {
	c := cache[string]{ttl: time.Hour, maxStale: time.Hour}
	now := time.Unix(1_700_000_000, 0)
	_, err := c.read("id", now, func() (string, error) {
		c.drop("id") // a writer changed the row while this read was at the store
		return "old", nil
	}, func(string) bool { return true })
	if err != nil {
		t.Fatal(err)
	}
	if _, fresh, _ := c.lookup("id", now); fresh {
		t.Error("the row read before the write was cached")
	}
	for i := range 3 {
		got, _ := c.read("id", now, func() (string, error) { return fmt.Sprint("new", i), nil }, func(string) bool { return true })
		if got != "new0" {
			t.Errorf("read %d = %q, want the first re-read row, cached", i, got)
		}
	}
}
