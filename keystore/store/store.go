// Package store is the persistence of hsmbridge keystores.
//
// It holds the bindings between Huawei Cloud KMS dedicated keystores and the
// configured HSM clusters. It touches only the database: it never talks to an
// HSM and never serves HTTP; the keystore package owns those concerns and uses
// Store to record what it did.
//
// Uniqueness (one alias per domain, one keystore per cluster, one row per id)
// is enforced by unique constraints in the database, not by application
// checks, so concurrent creates cannot both win. Violations surface as the
// sentinel errors below.
package store

import (
	"context"
	"errors"
	"time"
)

// State of a keystore row.
type State string

const (
	StateCreating State = "CREATING" // row written, token marker not yet confirmed
	StateDisabled State = "DISABLED"
	StateEnabled  State = "ENABLED"
	StateDeleting State = "DELETING" // delete started; marker removal pending
)

// Keystore is one row.
type Keystore struct {
	ID                  string // UUID
	DomainID            string
	ProjectID           string // project that created it
	Alias               string
	Type                string // "DHSM" or "CDMS"
	ClusterID           string // the configured cluster id it is bound to
	State               State
	TokenSerial         string
	TokenLabel          string
	CAFingerprint       string    // hex SHA-256 of the CA certificate DER
	IdentityFingerprint string    // hex SHA-256 of the cluster identity certificate DER
	CreatedAt           time.Time // stored as epoch milliseconds; round-trips at ms precision (UTC)
	UpdatedAt           time.Time
}

// Sentinel errors; callers branch with errors.Is.
var (
	ErrNotFound       = errors.New("store: not found")
	ErrDuplicateAlias = errors.New("store: alias already in use in this domain")
	ErrClusterBound   = errors.New("store: cluster already bound to a keystore")
	ErrStateConflict  = errors.New("store: state changed concurrently")
	ErrDuplicateID    = errors.New("store: id already exists")
)

// Store is the persistence of keystores. Safe for concurrent use. Every method honours ctx.
type Store interface {
	// CreateKeystore inserts k. Returns ErrDuplicateAlias if (DomainID, Alias) is taken,
	// ErrClusterBound if ClusterID is taken, ErrDuplicateID if ID is taken.
	CreateKeystore(ctx context.Context, k Keystore) error
	// GetKeystore returns the row with id, or ErrNotFound.
	GetKeystore(ctx context.Context, id string) (Keystore, error)
	// ListKeystores returns the domain's keystores ordered by CreatedAt, then ID, skipping
	// offset rows and returning at most limit, plus the domain's total count.
	// Rows in StateCreating or StateDeleting are NOT listed and not counted.
	ListKeystores(ctx context.Context, domainID string, limit, offset int) ([]Keystore, int, error)
	// AllKeystores returns every row in every state (for start-up reconciliation), ordered by CreatedAt, ID.
	AllKeystores(ctx context.Context) ([]Keystore, error)
	// SetKeystoreState moves id from `from` to `to` as a compare-and-set
	// (UPDATE ... WHERE id=? AND state=?), also setting UpdatedAt to `at`.
	// ErrNotFound if no row has id; ErrStateConflict if the row exists but is not in `from`.
	SetKeystoreState(ctx context.Context, id string, from, to State, at time.Time) error
	// DeleteKeystore removes the row. ErrNotFound if absent.
	DeleteKeystore(ctx context.Context, id string) error
	Close() error
}
