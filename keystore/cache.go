package keystore

import (
	"sync"
	"time"
)

// cache holds key and keystore rows for the hot path, so a key operation reads no store.
//
// Its bounds are what replicas and outages see:
//   - an entry is fresh for ttl after it was read; a change made by another daemon on the
//     same database takes effect here within ttl (default 1 s);
//   - when the store cannot be read, an entry read less than maxStale ago (default 30 s)
//     is used anyway, so keys already known keep working through a short database outage;
//     past that the operation fails with 503. A disabled keystore or key is therefore never
//     used more than maxStale after the change on another replica, and never after it on
//     this one.
//
// This daemon's own writes drop the entry before and after the store write; a reader that
// missed caches what it read only if no drop happened since it looked (version: one
// counter for the whole cache, so it never grows; a drop of another row merely costs a
// racing reader its cache fill), so a read that raced a write never re-caches the old row. A short-lived cache rather than LISTEN/
// NOTIFY: it needs no extra connection, no reconnect logic, and works the same on SQLite;
// its bound holds even when notifications would be lost.
type cache[V any] struct {
	ttl, maxStale time.Duration

	mu  sync.RWMutex
	m   map[string]entry[V]
	gen uint64 // drops so far
}

type entry[V any] struct {
	v  V
	at time.Time
}

// Defaults of the cache bounds.
const (
	DefaultCacheTTL = time.Second
	DefaultMaxStale = 30 * time.Second
)

// lookup returns id's entry if it is fresh at now. stale is set to an entry too old to
// serve normally but young enough to serve while the store is down.
func (c *cache[V]) lookup(id string, now time.Time) (v V, fresh bool, stale *V) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	e, ok := c.m[id]
	if !ok {
		return v, false, nil
	}
	age := now.Sub(e.at)
	switch {
	case age < c.ttl:
		return e.v, true, nil
	case age < c.maxStale:
		return v, false, &e.v
	}
	return v, false, nil
}

// version returns the drop count, to pass to putIf after reading the store.
func (c *cache[V]) version() uint64 {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.gen
}

// put caches v for id, read at now, unconditionally: for the writer of the row.
func (c *cache[V]) put(id string, v V, now time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.putLocked(id, v, now)
}

// putIf caches v for id if nothing was dropped since version returned ver.
func (c *cache[V]) putIf(id string, v V, now time.Time, ver uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.gen == ver {
		c.putLocked(id, v, now)
	}
}

func (c *cache[V]) putLocked(id string, v V, now time.Time) {
	if c.m == nil {
		c.m = map[string]entry[V]{}
	}
	c.m[id] = entry[V]{v, now}
}

func (c *cache[V]) drop(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.m, id)
	c.gen++
}

// read returns id's row: fresh from the cache, else from fetch (caching rows keep says
// may be cached), else, when fetch fails, a stale entry within maxStale.
func (c *cache[V]) read(id string, now time.Time, fetch func() (V, error), keep func(V) bool) (V, error) {
	v, fresh, stale := c.lookup(id, now)
	if fresh {
		return v, nil
	}
	ver := c.version()
	v, err := fetch()
	if err == nil {
		if keep(v) {
			c.putIf(id, v, now, ver)
		}
		return v, nil
	}
	if stale != nil && !isNotFound(err) {
		return *stale, nil
	}
	return v, err
}
