// Package keystore is the domain of the dedicated keystore API: it validates requests,
// enforces the rules of binding a keystore to an HSM cluster, and keeps the store and the
// tokens consistent. It talks to HSM clusters through package hsm and to the database
// through keystore/store; it knows nothing of HTTP. Failures are *Error values with a Kind.
package keystore

import (
	"crypto/rand"
	"fmt"
	"log/slog"
	"time"

	"github.com/hsmbridge/hsmbridge/hsm"
	"github.com/hsmbridge/hsmbridge/keystore/store"
)

// Cluster types a keystore can be bound to.
const (
	TypeDHSM = "DHSM"
	TypeCDMS = "CDMS"
)

// Cluster is a configured HSM cluster with the type the configuration gives it.
type Cluster struct {
	Type string
	*hsm.Cluster
}

// Caller is the authenticated tenant a call is made for.
type Caller struct {
	DomainID  string
	ProjectID string
	Name      string // who, for the audit log
}

// Service runs the keystore calls. Safe for concurrent use.
type Service struct {
	store    store.Store
	clusters map[string]Cluster
	now      func() time.Time
	log      *slog.Logger
	health   health
	keys     cache[store.Key]
	// keystores caches the rows the hot path checks; dropped on every keystore write.
	keystores cache[store.Keystore]
}

// RepairGrace is how old a CREATING row must be before a repair that runs while daemons
// serve removes it: longer than any create takes (create-key's deadline is 20 s).
const RepairGrace = 2 * time.Minute

// Option configures a Service.
type Option func(*Service)

// WithClock sets the clock (tests move it).
func WithClock(now func() time.Time) Option { return func(s *Service) { s.now = now } }

// WithCacheBounds sets how long rows read from the store are trusted (ttl), and how long
// past that they still serve while the store cannot be read (maxStale); see cache.
func WithCacheBounds(ttl, maxStale time.Duration) Option {
	return func(s *Service) {
		s.keys.ttl, s.keys.maxStale = ttl, maxStale
		s.keystores.ttl, s.keystores.maxStale = ttl, maxStale
	}
}

// WithLogger sets the logger for repairs and warnings.
func WithLogger(l *slog.Logger) Option { return func(s *Service) { s.log = l } }

// New returns a Service over st and the configured clusters.
func New(st store.Store, clusters []Cluster, opts ...Option) *Service {
	s := &Service{
		store: st, clusters: make(map[string]Cluster, len(clusters)), now: time.Now, log: slog.Default(),
		health:    health{probes: map[string]probe{}, mismatched: map[string]bool{}},
		keys:      cache[store.Key]{ttl: DefaultCacheTTL, maxStale: DefaultMaxStale},
		keystores: cache[store.Keystore]{ttl: DefaultCacheTTL, maxStale: DefaultMaxStale},
	}
	for _, c := range clusters {
		s.clusters[c.ID()] = c
	}
	for _, o := range opts {
		o(s)
	}
	return s
}

// newID returns a random (version 4) UUID in its lower-case text form.
func newID() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}
