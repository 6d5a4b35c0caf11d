package store

import (
	"context"
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// DefaultPostgresMaxConns is the pool size OpenPostgres uses when given none.
const DefaultPostgresMaxConns = 8

// Postgres is the Store shared by several daemons: one PostgreSQL database
// reached through a connection pool. The rules that must hold across replicas
// (unique aliases, ids and sequences, one keystore per cluster, state
// transitions as compare-and-set, no key in a keystore that is not ENABLED or
// is being deleted) are enforced by the database, so two replicas racing can
// never both win, and the loser gets the sentinel a single daemon would give.
type Postgres struct {
	pool *pgxpool.Pool
}

var _ Store = (*Postgres)(nil)

// migrationLockKey is the pg_advisory_xact_lock key that serialises
// migrators. Advisory locks are per database, so only daemons sharing this
// database contend for it. The value is "hsmbridg" in ASCII.
const migrationLockKey int64 = 0x68736d6272696467

var postgresDialect = dialect{
	dir:  "postgres",
	lock: fmt.Sprintf(`SELECT pg_advisory_xact_lock(%d)`, migrationLockKey),
	createTable: `CREATE TABLE IF NOT EXISTS schema_migrations (
		version    INTEGER PRIMARY KEY,
		applied_at BIGINT NOT NULL
	)`,
	isApplied:  `SELECT COUNT(*) FROM schema_migrations WHERE version = $1`,
	maxVersion: `SELECT MAX(version) FROM schema_migrations`,
	record:     `INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)`,
}

// OpenPostgres connects to the database dsn names (a postgres:// URL or
// keyword=value string, as libpq and pgx accept them) with a pool of at most
// maxConns connections (DefaultPostgresMaxConns if maxConns <= 0; it
// overrides any pool_max_conns in dsn), and brings the schema up to date.
// Daemons opening the same database at once migrate it once: each migration
// runs under a transaction-scoped advisory lock. Errors never quote dsn, which
// may hold a password.
func OpenPostgres(ctx context.Context, dsn string, maxConns int) (*Postgres, error) {
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		// pgconn's ParseConfigError redacts the password it quotes.
		return nil, fmt.Errorf("store: open postgres: %w", err)
	}
	if maxConns <= 0 {
		maxConns = DefaultPostgresMaxConns
	}
	if maxConns > math.MaxInt32 {
		return nil, fmt.Errorf("store: open postgres: max_conns %d too large", maxConns)
	}
	cfg.MaxConns = int32(maxConns)
	if cfg.MinConns > cfg.MaxConns {
		cfg.MinConns = cfg.MaxConns
	}
	if cfg.MinIdleConns > cfg.MaxConns {
		cfg.MinIdleConns = cfg.MaxConns
	}
	if _, ok := cfg.ConnConfig.RuntimeParams["application_name"]; !ok {
		cfg.ConnConfig.RuntimeParams["application_name"] = "hsmbridge"
	}
	where := fmt.Sprintf("%s:%d/%s", cfg.ConnConfig.Host, cfg.ConnConfig.Port, cfg.ConnConfig.Database)

	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("store: open postgres %s: %w", where, err)
	}
	if err := migrate(ctx, pgMigrationDB{pool}, postgresDialect); err != nil {
		pool.Close()
		return nil, fmt.Errorf("store: open postgres %s: %w", where, ctxErr(ctx, err))
	}
	return &Postgres{pool: pool}, nil
}

// CreateKeystore implements Store. When k collides on more than one unique
// constraint, PostgreSQL reports the first it checks, so only one sentinel is
// returned; which one is not specified.
func (s *Postgres) CreateKeystore(ctx context.Context, k Keystore) error {
	_, err := s.pool.Exec(ctx,
		`INSERT INTO keystores (`+keystoreColumns+`) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)`,
		k.ID, k.DomainID, k.ProjectID, k.Alias, k.Type, k.ClusterID, string(k.State),
		k.TokenSerial, k.TokenLabel, k.CAFingerprint, k.IdentityFingerprint,
		k.CreatedAt.UnixMilli(), k.UpdatedAt.UnixMilli())
	if err != nil {
		if sentinel := pgUniqueViolation(err); sentinel != nil {
			return fmt.Errorf("store: create keystore %s: %w", k.ID, sentinel)
		}
		return fmt.Errorf("store: create keystore %s: %w", k.ID, ctxErr(ctx, err))
	}
	return nil
}

// GetKeystore implements Store.
func (s *Postgres) GetKeystore(ctx context.Context, id string) (Keystore, error) {
	row := s.pool.QueryRow(ctx, `SELECT `+keystoreColumns+` FROM keystores WHERE id = $1`, id)
	k, err := scanKeystore(row.Scan)
	if errors.Is(err, pgx.ErrNoRows) {
		return Keystore{}, fmt.Errorf("store: get keystore %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return Keystore{}, fmt.Errorf("store: get keystore %s: %w", id, ctxErr(ctx, err))
	}
	return k, nil
}

// ListKeystores implements Store. limit and offset must not be negative;
// limit 0 returns no rows but still the total.
func (s *Postgres) ListKeystores(ctx context.Context, domainID string, limit, offset int) ([]Keystore, int, error) {
	if limit < 0 || offset < 0 {
		return nil, 0, fmt.Errorf("store: list keystores of domain %s: negative limit %d or offset %d", domainID, limit, offset)
	}
	const where = `WHERE domain_id = $1 AND state IN ($2, $3)`
	args := []any{domainID, string(StateDisabled), string(StateEnabled)}
	// The window count makes page and total one snapshot. It is absent when
	// the page is empty, and only then is a separate count needed.
	rows, err := s.pool.Query(ctx,
		`SELECT `+keystoreColumns+`, COUNT(*) OVER ()
		FROM keystores `+where+`
		ORDER BY created_at, id
		LIMIT $4 OFFSET $5`,
		append(args, limit, offset)...)
	if err != nil {
		return nil, 0, fmt.Errorf("store: list keystores of domain %s: %w", domainID, ctxErr(ctx, err))
	}
	defer rows.Close()
	ks := []Keystore{}
	total := 0
	for rows.Next() {
		k, err := scanKeystore(func(dest ...any) error {
			return rows.Scan(append(dest, &total)...)
		})
		if err != nil {
			return nil, 0, fmt.Errorf("store: list keystores of domain %s: %w", domainID, ctxErr(ctx, err))
		}
		ks = append(ks, k)
	}
	if err := rows.Err(); err != nil {
		return nil, 0, fmt.Errorf("store: list keystores of domain %s: %w", domainID, ctxErr(ctx, err))
	}
	if len(ks) == 0 {
		if err := s.pool.QueryRow(ctx, `SELECT COUNT(*) FROM keystores `+where, args...).Scan(&total); err != nil {
			return nil, 0, fmt.Errorf("store: count keystores of domain %s: %w", domainID, ctxErr(ctx, err))
		}
	}
	return ks, total, nil
}

// AllKeystores implements Store.
func (s *Postgres) AllKeystores(ctx context.Context) ([]Keystore, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+keystoreColumns+` FROM keystores ORDER BY created_at, id`)
	if err != nil {
		return nil, fmt.Errorf("store: all keystores: %w", ctxErr(ctx, err))
	}
	defer rows.Close()
	ks := []Keystore{}
	for rows.Next() {
		k, err := scanKeystore(rows.Scan)
		if err != nil {
			return nil, fmt.Errorf("store: all keystores: %w", ctxErr(ctx, err))
		}
		ks = append(ks, k)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("store: all keystores: %w", ctxErr(ctx, err))
	}
	return ks, nil
}

// SetKeystoreState implements Store. Under READ COMMITTED, an UPDATE that
// finds its row changed by a concurrent transaction waits for it and then
// re-checks the WHERE on the new version, so of two racing moves from the
// same state exactly one matches.
func (s *Postgres) SetKeystoreState(ctx context.Context, id string, from, to State, at time.Time) error {
	tag, err := s.pool.Exec(ctx,
		`UPDATE keystores SET state = $1, updated_at = $2 WHERE id = $3 AND state = $4`,
		string(to), at.UnixMilli(), id, string(from))
	if err := s.cas(ctx, "keystores", id, tag, err); err != nil {
		return fmt.Errorf("store: set keystore %s state %s -> %s: %w", id, from, to, err)
	}
	return nil
}

// DeleteKeystore implements Store. A key being created in the keystore
// meanwhile holds the keystore row (see CreateKey), so the delete waits for it
// and then fails on the foreign key.
func (s *Postgres) DeleteKeystore(ctx context.Context, id string) error {
	tag, err := s.pool.Exec(ctx, `DELETE FROM keystores WHERE id = $1`, id)
	if err != nil {
		if pgForeignKeyViolation(err) {
			return fmt.Errorf("store: delete keystore %s: %w", id, ErrKeystoreHasKeys)
		}
		return fmt.Errorf("store: delete keystore %s: %w", id, ctxErr(ctx, err))
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("store: delete keystore %s: %w", id, ErrNotFound)
	}
	return nil
}

// Close implements Store. It waits for connections in use to be released.
func (s *Postgres) Close() error {
	s.pool.Close()
	return nil
}

// CreateKey implements Store. As with CreateKeystore, only one sentinel is
// returned when k breaks more than one constraint.
//
// The insert happens only while the keystore is ENABLED, in the same
// statement. Unlike SQLite, PostgreSQL runs writers concurrently, and the
// snapshot check alone would let a key in while a concurrent disable commits
// (the foreign key's FOR KEY SHARE lock does not conflict with a state
// update). So the keystore row is read FOR SHARE: a state change or delete in
// flight is waited for and the check sees its outcome, and one that starts
// later waits for this insert. A missing keystore leaves the check true and
// the foreign key reports it.
func (s *Postgres) CreateKey(ctx context.Context, k Key) error {
	tag, err := s.pool.Exec(ctx,
		`WITH ks AS MATERIALIZED (SELECT state FROM keystores WHERE id = $4 FOR SHARE)
		INSERT INTO keys (`+keyColumns+`)
		SELECT $1::text, $2::text, $3::text, $4::text, $5::text, $6::text, $7::text, $8::text,
			$9::text, $10::text, $11::bytea, $12::text, $13::bigint, $14::bigint, $15::bigint
		WHERE NOT EXISTS (SELECT 1 FROM ks WHERE state <> $16)`,
		k.ID, k.DomainID, k.ProjectID, k.KeystoreID, k.Alias, k.Spec, k.Usage, k.Description,
		k.Origin, string(k.State), nullBytes(k.PublicKey), nullString(k.Sequence),
		k.CreatedAt.UnixMilli(), k.UpdatedAt.UnixMilli(), nullMilli(k.DeletionAt),
		string(StateEnabled))
	if err != nil {
		if sentinel := pgUniqueViolation(err); sentinel != nil {
			return fmt.Errorf("store: create key %s: %w", k.ID, sentinel)
		}
		if pgForeignKeyViolation(err) {
			return fmt.Errorf("store: create key %s: keystore %s: %w", k.ID, k.KeystoreID, ErrNotFound)
		}
		return fmt.Errorf("store: create key %s: %w", k.ID, ctxErr(ctx, err))
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("store: create key %s: keystore %s is not enabled: %w", k.ID, k.KeystoreID, ErrStateConflict)
	}
	return nil
}

// GetKey implements Store.
func (s *Postgres) GetKey(ctx context.Context, id string) (Key, error) {
	row := s.pool.QueryRow(ctx, `SELECT `+keyColumns+` FROM keys WHERE id = $1`, id)
	k, err := scanKey(row.Scan)
	if errors.Is(err, pgx.ErrNoRows) {
		return Key{}, fmt.Errorf("store: get key %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return Key{}, fmt.Errorf("store: get key %s: %w", id, ctxErr(ctx, err))
	}
	return k, nil
}

// KeyBySequence implements Store. The empty sequence is stored as NULL and
// so matches no row.
func (s *Postgres) KeyBySequence(ctx context.Context, domainID, sequence string) (Key, error) {
	row := s.pool.QueryRow(ctx,
		`SELECT `+keyColumns+` FROM keys WHERE domain_id = $1 AND sequence = $2`, domainID, sequence)
	k, err := scanKey(row.Scan)
	if errors.Is(err, pgx.ErrNoRows) {
		return Key{}, fmt.Errorf("store: key of domain %s with sequence %q: %w", domainID, sequence, ErrNotFound)
	}
	if err != nil {
		return Key{}, fmt.Errorf("store: key of domain %s with sequence %q: %w", domainID, sequence, ctxErr(ctx, err))
	}
	return k, nil
}

// ListKeys implements Store. limit and offset must not be negative; limit 0
// returns no rows but still the total. A f.State that is not a listed state
// (KeyCreating or an unknown value) matches nothing.
func (s *Postgres) ListKeys(ctx context.Context, domainID string, f KeyFilter, limit, offset int) ([]Key, int, error) {
	if limit < 0 || offset < 0 {
		return nil, 0, fmt.Errorf("store: list keys of domain %s: negative limit %d or offset %d", domainID, limit, offset)
	}
	const where = `WHERE domain_id = $1 AND state <> $2 AND ($3::text = '' OR state = $3) AND ($4::text = '' OR spec = $4)`
	args := []any{domainID, string(KeyCreating), f.State, f.Spec}
	// As in ListKeystores, the window count makes page and total one snapshot.
	rows, err := s.pool.Query(ctx,
		`SELECT `+keyColumns+`, COUNT(*) OVER ()
		FROM keys `+where+`
		ORDER BY created_at, id
		LIMIT $5 OFFSET $6`,
		append(args, limit, offset)...)
	if err != nil {
		return nil, 0, fmt.Errorf("store: list keys of domain %s: %w", domainID, ctxErr(ctx, err))
	}
	defer rows.Close()
	ks := []Key{}
	total := 0
	for rows.Next() {
		k, err := scanKey(func(dest ...any) error {
			return rows.Scan(append(dest, &total)...)
		})
		if err != nil {
			return nil, 0, fmt.Errorf("store: list keys of domain %s: %w", domainID, ctxErr(ctx, err))
		}
		ks = append(ks, k)
	}
	if err := rows.Err(); err != nil {
		return nil, 0, fmt.Errorf("store: list keys of domain %s: %w", domainID, ctxErr(ctx, err))
	}
	if len(ks) == 0 {
		if err := s.pool.QueryRow(ctx, `SELECT COUNT(*) FROM keys `+where, args...).Scan(&total); err != nil {
			return nil, 0, fmt.Errorf("store: count keys of domain %s: %w", domainID, ctxErr(ctx, err))
		}
	}
	return ks, total, nil
}

// SetKeyState implements Store; a compare-and-set as in SetKeystoreState.
func (s *Postgres) SetKeyState(ctx context.Context, id string, from, to KeyState, at, deletionAt time.Time) error {
	tag, err := s.pool.Exec(ctx,
		`UPDATE keys SET state = $1, updated_at = $2, deletion_at = $3 WHERE id = $4 AND state = $5`,
		string(to), at.UnixMilli(), nullMilli(deletionAt), id, string(from))
	if err := s.cas(ctx, "keys", id, tag, err); err != nil {
		return fmt.Errorf("store: set key %s state %s -> %s: %w", id, from, to, err)
	}
	return nil
}

// ActivateKey implements Store.
func (s *Postgres) ActivateKey(ctx context.Context, id string, publicKey []byte, at time.Time) error {
	tag, err := s.pool.Exec(ctx,
		`UPDATE keys SET state = $1, public_key = $2, updated_at = $3 WHERE id = $4 AND state = $5`,
		string(KeyEnabled), nullBytes(publicKey), at.UnixMilli(), id, string(KeyCreating))
	if err := s.cas(ctx, "keys", id, tag, err); err != nil {
		return fmt.Errorf("store: activate key %s: %w", id, err)
	}
	return nil
}

// cas interprets the outcome of a compare-and-set UPDATE of row id in table
// (a constant): nil if it changed the row, else the statement's error,
// ErrNotFound or ErrStateConflict. A delete racing in between reports
// ErrNotFound, which is then true.
func (s *Postgres) cas(ctx context.Context, table, id string, tag pgconn.CommandTag, err error) error {
	if err != nil {
		return ctxErr(ctx, err)
	}
	if tag.RowsAffected() == 1 {
		return nil
	}
	var exists bool
	if err := s.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM `+table+` WHERE id = $1)`, id).Scan(&exists); err != nil {
		return ctxErr(ctx, err)
	}
	if !exists {
		return ErrNotFound
	}
	return ErrStateConflict
}

// DeleteKey implements Store.
func (s *Postgres) DeleteKey(ctx context.Context, id string) error {
	tag, err := s.pool.Exec(ctx, `DELETE FROM keys WHERE id = $1`, id)
	if err != nil {
		return fmt.Errorf("store: delete key %s: %w", id, ctxErr(ctx, err))
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("store: delete key %s: %w", id, ErrNotFound)
	}
	return nil
}

// DeleteDueKey implements Store.
func (s *Postgres) DeleteDueKey(ctx context.Context, id string, now time.Time) error {
	tag, err := s.pool.Exec(ctx, `DELETE FROM keys WHERE id = $1 AND state = $2 AND deletion_at <= $3`,
		id, string(KeyPendingDeletion), now.UnixMilli())
	if err != nil {
		return fmt.Errorf("store: delete due key %s: %w", id, ctxErr(ctx, err))
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("store: delete due key %s: %w", id, ErrStateConflict)
	}
	return nil
}

// CountKeys implements Store. An unknown keystore holds 0 keys.
func (s *Postgres) CountKeys(ctx context.Context, keystoreID string) (int, error) {
	var n int
	if err := s.pool.QueryRow(ctx, `SELECT COUNT(*) FROM keys WHERE keystore_id = $1`, keystoreID).Scan(&n); err != nil {
		return 0, fmt.Errorf("store: count keys of keystore %s: %w", keystoreID, ctxErr(ctx, err))
	}
	return n, nil
}

// DueDeletions implements Store. now is compared at millisecond precision.
func (s *Postgres) DueDeletions(ctx context.Context, now time.Time) ([]Key, error) {
	return s.queryKeys(ctx, "due deletions",
		`SELECT `+keyColumns+` FROM keys WHERE state = $1 AND deletion_at <= $2 ORDER BY deletion_at, id`,
		string(KeyPendingDeletion), now.UnixMilli())
}

// AllKeys implements Store.
func (s *Postgres) AllKeys(ctx context.Context) ([]Key, error) {
	return s.queryKeys(ctx, "all keys", `SELECT `+keyColumns+` FROM keys ORDER BY created_at, id`)
}

// queryKeys runs query, which selects keyColumns, and reads every row.
func (s *Postgres) queryKeys(ctx context.Context, what, query string, args ...any) ([]Key, error) {
	rows, err := s.pool.Query(ctx, query, args...)
	if err != nil {
		return nil, fmt.Errorf("store: %s: %w", what, ctxErr(ctx, err))
	}
	defer rows.Close()
	ks := []Key{}
	for rows.Next() {
		k, err := scanKey(rows.Scan)
		if err != nil {
			return nil, fmt.Errorf("store: %s: %w", what, ctxErr(ctx, err))
		}
		ks = append(ks, k)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("store: %s: %w", what, ctxErr(ctx, err))
	}
	return ks, nil
}

// pgUniqueViolation returns the sentinel for a unique or primary-key
// violation on keystores or keys, by the constraint (index) name PostgreSQL
// reports, or nil if err is anything else.
func pgUniqueViolation(err error) error {
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "23505" {
		return nil
	}
	for _, c := range uniqueConstraints {
		if c.index == pe.ConstraintName {
			return c.err
		}
	}
	return nil
}

// pgForeignKeyViolation reports whether err is a violation of
// keys_keystore_fkey, the only foreign key: on a keys insert the keystore is
// missing, on a keystores delete it still has keys.
func pgForeignKeyViolation(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && pe.Code == "23503" && pe.ConstraintName == "keys_keystore_fkey"
}

// ctxErr makes sure an error caused by ctx ending says so to errors.Is: pgx
// reports some interruptions (a connection closed under a cancelled query, a
// server-side statement cancel) without wrapping ctx's error.
func ctxErr(ctx context.Context, err error) error {
	if cerr := ctx.Err(); cerr != nil && !errors.Is(err, cerr) {
		return fmt.Errorf("%w (%w)", cerr, err)
	}
	return err
}

// pgMigrationDB runs the migrations through the pool. Each transaction holds
// one connection, so its advisory lock is released when it ends, or when the
// connection dies.
type pgMigrationDB struct{ pool *pgxpool.Pool }

func (m pgMigrationDB) begin(ctx context.Context) (migrationTx, error) {
	tx, err := m.pool.Begin(ctx)
	if err != nil {
		return nil, err
	}
	return pgMigrationTx{tx}, nil
}

type pgMigrationTx struct{ tx pgx.Tx }

func (t pgMigrationTx) exec(ctx context.Context, query string, args ...any) error {
	_, err := t.tx.Exec(ctx, query, args...)
	return err
}

func (t pgMigrationTx) queryInt(ctx context.Context, query string, args ...any) (int64, bool, error) {
	var v *int64
	if err := t.tx.QueryRow(ctx, query, args...).Scan(&v); err != nil || v == nil {
		return 0, false, err
	}
	return *v, true, nil
}

func (t pgMigrationTx) commit(ctx context.Context) error { return t.tx.Commit(ctx) }

func (t pgMigrationTx) rollback(ctx context.Context) error {
	// A rollback cut short by ctx closes the connection, which ends the
	// transaction all the same; ctx's error is already reported.
	if err := t.tx.Rollback(ctx); err != nil && !errors.Is(err, pgx.ErrTxClosed) && ctx.Err() == nil {
		return err
	}
	return nil
}
