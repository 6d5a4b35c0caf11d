package keystore

import "sync"

// cache is a map safe for concurrent use: the hot path reads key and keystore rows from it
// instead of the store. A writer drops the entry before and after its store write; a reader
// that missed caches what it read only if no drop happened since it looked (version), so a
// read that raced a write never re-caches the old row.
type cache[V any] struct {
	mu  sync.RWMutex
	m   map[string]V
	gen map[string]uint64
}

func (c *cache[V]) get(id string) (V, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	v, ok := c.m[id]
	return v, ok
}

// version returns id's drop count, to pass to putIf after reading the store.
func (c *cache[V]) version(id string) uint64 {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.gen[id]
}

// put caches v for id unconditionally: for the writer of the row.
func (c *cache[V]) put(id string, v V) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = map[string]V{}
	}
	c.m[id] = v
}

// putIf caches v for id if id was not dropped since version returned ver.
func (c *cache[V]) putIf(id string, v V, ver uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.gen[id] != ver {
		return
	}
	if c.m == nil {
		c.m = map[string]V{}
	}
	c.m[id] = v
}

func (c *cache[V]) drop(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.m, id)
	if c.gen == nil {
		c.gen = map[string]uint64{}
	}
	c.gen[id]++
}
