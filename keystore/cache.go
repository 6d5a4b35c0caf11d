package keystore

import "sync"

// cache is a map safe for concurrent use: the hot path reads key metadata from it instead
// of the store. Every write of ours to a cached row drops the entry first, so one daemon
// never serves a stale state.
type cache[V any] struct {
	mu sync.RWMutex
	m  map[string]V
}

func (c *cache[V]) get(id string) (V, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	v, ok := c.m[id]
	return v, ok
}

func (c *cache[V]) put(id string, v V) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = map[string]V{}
	}
	c.m[id] = v
}

func (c *cache[V]) drop(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.m, id)
}
