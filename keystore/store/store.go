// Package store is the persistence of hsmbridge keystores and their keys.
//
// It holds the bindings between Huawei Cloud KMS dedicated keystores and the
// configured HSM clusters, and the customer master keys that live in those
// keystores. It touches only the database: it never talks to an HSM and never
// serves HTTP; the keystore package owns those concerns and uses Store to
// record what it did.
//
// Uniqueness (one alias per domain, one keystore per cluster, one row per id,
// one key per create sequence) and the link from a key to its keystore are
// enforced by constraints in the database, not by application checks, so
// concurrent writers cannot both win. Violations surface as the sentinel
// errors below.
//
// Two implementations share the schema, the migrations' version numbers and
// the behavioural test suite: SQLite (OpenSQLite), one file for one daemon,
// and Postgres (OpenPostgres), one database shared by several daemons, where
// the same constraints keep replicas from both winning a race.
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

// KeyState of a key row. The wire's key_state digits are the keystore package's business.
type KeyState string

const (
	KeyCreating        KeyState = "CREATING" // row written, token object not yet confirmed
	KeyEnabled         KeyState = "ENABLED"
	KeyDisabled        KeyState = "DISABLED"
	KeyPendingDeletion KeyState = "PENDING_DELETION"
)

// Key is one customer master key row.
type Key struct {
	ID          string // UUID
	DomainID    string
	ProjectID   string
	KeystoreID  string // the keystore (and so the cluster) the key lives in
	Alias       string
	Spec        string // "AES_256", "RSA_2048", "EC_P256", ...
	Usage       string // "ENCRYPT_DECRYPT" or "SIGN_VERIFY"
	Description string
	Origin      string // "kms"
	State       KeyState
	// PublicKey is the SubjectPublicKeyInfo DER of an asymmetric key; nil for
	// symmetric. An empty slice is stored as absent and reads back as nil.
	PublicKey []byte
	// Sequence is the create request's `sequence`, "" if none (idempotent
	// retries). "" is stored as NULL, so keys without one never collide.
	Sequence  string
	CreatedAt time.Time // ms precision, UTC, like keystores
	UpdatedAt time.Time
	// DeletionAt is when a KeyPendingDeletion key is due; zero otherwise.
	// The database rejects a row where one is set without the other.
	DeletionAt time.Time
}

// KeyFilter narrows ListKeys.
type KeyFilter struct {
	State string // "" = any, else a KeyState
	Spec  string // "" = any
}

// Sentinel errors; callers branch with errors.Is.
var (
	ErrNotFound          = errors.New("store: not found")
	ErrDuplicateAlias    = errors.New("store: alias already in use in this domain")
	ErrClusterBound      = errors.New("store: cluster already bound to a keystore")
	ErrStateConflict     = errors.New("store: state changed concurrently")
	ErrDuplicateID       = errors.New("store: id already exists")
	ErrDuplicateSequence = errors.New("store: sequence already used")
	ErrKeystoreHasKeys   = errors.New("store: keystore still holds keys")
)

// Store is the persistence of keystores and keys. Safe for concurrent use. Every method honours ctx.
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
	// DeleteKeystore removes the row. ErrNotFound if absent; ErrKeystoreHasKeys if any
	// key row (in any state) still names it, enforced by a foreign key in the database.
	DeleteKeystore(ctx context.Context, id string) error

	// CreateKey inserts k. ErrDuplicateAlias if (DomainID, Alias) is taken by another key
	// (key aliases are their own namespace, separate from keystore aliases); ErrNotFound if
	// KeystoreID names no keystore; ErrStateConflict if the keystore is not ENABLED (checked
	// atomically with the insert); ErrDuplicateID if ID is taken; ErrDuplicateSequence if
	// (DomainID, Sequence) is taken when Sequence != "".
	CreateKey(ctx context.Context, k Key) error
	// GetKey returns the key with id, or ErrNotFound.
	GetKey(ctx context.Context, id string) (Key, error)
	// KeyBySequence returns the domain's key created with sequence, or ErrNotFound
	// (always for sequence "").
	KeyBySequence(ctx context.Context, domainID, sequence string) (Key, error)
	// ListKeys returns the domain's keys (not CREATING) matching f, ordered by CreatedAt then ID,
	// skipping offset and returning at most limit, plus the total matching f.
	ListKeys(ctx context.Context, domainID string, f KeyFilter, limit, offset int) ([]Key, int, error)
	// SetKeyState moves id from `from` to `to` as a compare-and-set, setting UpdatedAt = at and
	// DeletionAt = deletionAt (pass the zero time to clear it). ErrNotFound / ErrStateConflict.
	// deletionAt must be non-zero exactly when `to` is KeyPendingDeletion.
	SetKeyState(ctx context.Context, id string, from, to KeyState, at, deletionAt time.Time) error
	// ActivateKey confirms a created key: it moves id from KeyCreating to KeyEnabled as a
	// compare-and-set, storing publicKey (nil for symmetric) and setting UpdatedAt = at.
	// ErrNotFound / ErrStateConflict.
	ActivateKey(ctx context.Context, id string, publicKey []byte, at time.Time) error
	// DeleteKey removes the row; ErrNotFound if absent.
	DeleteKey(ctx context.Context, id string) error
	// DeleteDueKey removes the row only if it is PENDING_DELETION and due at now, as one
	// compare-and-delete, so a deletion cancelled meanwhile wins; ErrStateConflict else.
	DeleteDueKey(ctx context.Context, id string, now time.Time) error
	// CountKeys returns how many keys (any state) live in the keystore.
	CountKeys(ctx context.Context, keystoreID string) (int, error)
	// DueDeletions returns PENDING_DELETION keys whose DeletionAt is at or before now,
	// ordered by DeletionAt, then ID.
	DueDeletions(ctx context.Context, now time.Time) ([]Key, error)
	// AllKeys returns every key row in every state, ordered by CreatedAt, ID (start-up repair).
	AllKeys(ctx context.Context) ([]Key, error)

	Close() error
}
