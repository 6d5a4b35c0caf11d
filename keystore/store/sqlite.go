package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"
)

// SQLite is the embedded Store: one database file in WAL mode.
type SQLite struct {
	db *sql.DB
}

var _ Store = (*SQLite)(nil)

var sqliteDialect = dialect{
	dir: "sqlite",
	createTable: `CREATE TABLE IF NOT EXISTS schema_migrations (
		version    INTEGER PRIMARY KEY,
		applied_at INTEGER NOT NULL
	)`,
	isApplied:  `SELECT COUNT(*) FROM schema_migrations WHERE version = ?`,
	maxVersion: `SELECT MAX(version) FROM schema_migrations`,
	record:     `INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)`,
}

// OpenSQLite opens (creating if missing) the database file at path and
// brings its schema up to date. The parent directory must exist.
func OpenSQLite(ctx context.Context, path string) (*SQLite, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("store: open sqlite %s: %w", path, err)
	}
	// Checked here because SQLite's own error ("unable to open database
	// file") does not say which part of the path is wrong.
	if fi, err := os.Stat(filepath.Dir(abs)); err != nil {
		return nil, fmt.Errorf("store: open sqlite %s: parent directory: %w", path, err)
	} else if !fi.IsDir() {
		return nil, fmt.Errorf("store: open sqlite %s: parent %s is not a directory", path, filepath.Dir(abs))
	}

	// Pragmas go in the DSN so that every pooled connection gets them, not
	// just the first one.
	//   - busy_timeout: writers queue for the lock instead of failing at once.
	//   - journal_mode(WAL): readers do not block the writer.
	//   - synchronous(FULL): fsync on every commit. A KMS must not lose a
	//     keystore-to-cluster binding on power loss; NORMAL could in WAL mode.
	//   - _txlock=immediate: transactions take the write lock at BEGIN, so a
	//     read-then-write transaction (the migration runner) cannot fail with
	//     SQLITE_BUSY when upgrading its lock.
	// The path is URI-escaped because the file: form treats '?' and '#' in it
	// as delimiters.
	q := url.Values{}
	q.Add("_pragma", "busy_timeout(5000)")
	q.Add("_pragma", "journal_mode(WAL)")
	q.Add("_pragma", "foreign_keys(ON)")
	q.Add("_pragma", "synchronous(FULL)")
	q.Set("_txlock", "immediate")
	dsn := (&url.URL{Scheme: "file", Path: abs, RawQuery: q.Encode()}).String()

	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("store: open sqlite %s: %w", path, err)
	}
	if err := migrate(ctx, sqlMigrationDB{db}, sqliteDialect); err != nil {
		return nil, errors.Join(fmt.Errorf("store: open sqlite %s: %w", path, err), db.Close())
	}
	return &SQLite{db: db}, nil
}

const keystoreColumns = `id, domain_id, project_id, alias, type, cluster_id, state,
	token_serial, token_label, ca_fingerprint, identity_fingerprint, created_at, updated_at`

// CreateKeystore implements Store. When k collides on more than one unique
// constraint, SQLite reports only one of them, so only one sentinel is
// returned; which one is not specified.
func (s *SQLite) CreateKeystore(ctx context.Context, k Keystore) error {
	_, err := s.db.ExecContext(ctx,
		`INSERT INTO keystores (`+keystoreColumns+`) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		k.ID, k.DomainID, k.ProjectID, k.Alias, k.Type, k.ClusterID, string(k.State),
		k.TokenSerial, k.TokenLabel, k.CAFingerprint, k.IdentityFingerprint,
		k.CreatedAt.UnixMilli(), k.UpdatedAt.UnixMilli())
	if err != nil {
		if sentinel := sqliteUniqueViolation(err); sentinel != nil {
			return fmt.Errorf("store: create keystore %s: %w", k.ID, sentinel)
		}
		return fmt.Errorf("store: create keystore %s: %w", k.ID, err)
	}
	return nil
}

// GetKeystore implements Store.
func (s *SQLite) GetKeystore(ctx context.Context, id string) (Keystore, error) {
	row := s.db.QueryRowContext(ctx, `SELECT `+keystoreColumns+` FROM keystores WHERE id = ?`, id)
	k, err := scanKeystore(row.Scan)
	if errors.Is(err, sql.ErrNoRows) {
		return Keystore{}, fmt.Errorf("store: get keystore %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return Keystore{}, fmt.Errorf("store: get keystore %s: %w", id, err)
	}
	return k, nil
}

// ListKeystores implements Store. limit and offset must not be negative;
// limit 0 returns no rows but still the total.
func (s *SQLite) ListKeystores(ctx context.Context, domainID string, limit, offset int) ([]Keystore, int, error) {
	if limit < 0 || offset < 0 {
		return nil, 0, fmt.Errorf("store: list keystores of domain %s: negative limit %d or offset %d", domainID, limit, offset)
	}
	// The window count makes page and total one snapshot. It is absent when
	// the page is empty, and only then is a separate count needed.
	rows, err := s.db.QueryContext(ctx,
		`SELECT `+keystoreColumns+`, COUNT(*) OVER ()
		FROM keystores
		WHERE domain_id = ? AND state IN (?, ?)
		ORDER BY created_at, id
		LIMIT ? OFFSET ?`,
		domainID, string(StateDisabled), string(StateEnabled), limit, offset)
	if err != nil {
		return nil, 0, fmt.Errorf("store: list keystores of domain %s: %w", domainID, err)
	}
	defer rows.Close()
	ks := []Keystore{}
	total := 0
	for rows.Next() {
		k, err := scanKeystore(func(dest ...any) error {
			return rows.Scan(append(dest, &total)...)
		})
		if err != nil {
			return nil, 0, fmt.Errorf("store: list keystores of domain %s: %w", domainID, err)
		}
		ks = append(ks, k)
	}
	if err := rows.Err(); err != nil {
		return nil, 0, fmt.Errorf("store: list keystores of domain %s: %w", domainID, err)
	}
	if len(ks) == 0 {
		err := s.db.QueryRowContext(ctx,
			`SELECT COUNT(*) FROM keystores WHERE domain_id = ? AND state IN (?, ?)`,
			domainID, string(StateDisabled), string(StateEnabled)).Scan(&total)
		if err != nil {
			return nil, 0, fmt.Errorf("store: count keystores of domain %s: %w", domainID, err)
		}
	}
	return ks, total, nil
}

// AllKeystores implements Store.
func (s *SQLite) AllKeystores(ctx context.Context) ([]Keystore, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT `+keystoreColumns+` FROM keystores ORDER BY created_at, id`)
	if err != nil {
		return nil, fmt.Errorf("store: all keystores: %w", err)
	}
	defer rows.Close()
	ks := []Keystore{}
	for rows.Next() {
		k, err := scanKeystore(rows.Scan)
		if err != nil {
			return nil, fmt.Errorf("store: all keystores: %w", err)
		}
		ks = append(ks, k)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("store: all keystores: %w", err)
	}
	return ks, nil
}

// SetKeystoreState implements Store.
func (s *SQLite) SetKeystoreState(ctx context.Context, id string, from, to State, at time.Time) error {
	res, err := s.db.ExecContext(ctx,
		`UPDATE keystores SET state = ?, updated_at = ? WHERE id = ? AND state = ?`,
		string(to), at.UnixMilli(), id, string(from))
	if err != nil {
		return fmt.Errorf("store: set keystore %s state %s -> %s: %w", id, from, to, err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return fmt.Errorf("store: set keystore %s state %s -> %s: %w", id, from, to, err)
	}
	if n == 1 {
		return nil
	}
	// Nothing matched: tell a missing row from one in another state. A
	// delete racing in between reports ErrNotFound, which is then true.
	var exists int
	err = s.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM keystores WHERE id = ?`, id).Scan(&exists)
	switch {
	case err != nil:
		return fmt.Errorf("store: set keystore %s state %s -> %s: %w", id, from, to, err)
	case exists == 0:
		return fmt.Errorf("store: set keystore %s state %s -> %s: %w", id, from, to, ErrNotFound)
	default:
		return fmt.Errorf("store: set keystore %s state %s -> %s: %w", id, from, to, ErrStateConflict)
	}
}

// DeleteKeystore implements Store.
func (s *SQLite) DeleteKeystore(ctx context.Context, id string) error {
	res, err := s.db.ExecContext(ctx, `DELETE FROM keystores WHERE id = ?`, id)
	if err != nil {
		// The only foreign key naming keystores is keys_keystore_fkey.
		if sqliteForeignKeyViolation(err) {
			return fmt.Errorf("store: delete keystore %s: %w", id, ErrKeystoreHasKeys)
		}
		return fmt.Errorf("store: delete keystore %s: %w", id, err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return fmt.Errorf("store: delete keystore %s: %w", id, err)
	}
	if n == 0 {
		return fmt.Errorf("store: delete keystore %s: %w", id, ErrNotFound)
	}
	return nil
}

// Close implements Store.
func (s *SQLite) Close() error {
	if err := s.db.Close(); err != nil {
		return fmt.Errorf("store: close sqlite: %w", err)
	}
	return nil
}

const keyColumns = `id, domain_id, project_id, keystore_id, alias, spec, usage, description,
	origin, state, public_key, sequence, created_at, updated_at, deletion_at`

// CreateKey implements Store. As with CreateKeystore, only one sentinel is
// returned when k breaks more than one constraint.
func (s *SQLite) CreateKey(ctx context.Context, k Key) error {
	// The insert happens only while the keystore is ENABLED, in the same statement, so a
	// keystore being disabled or deleted meanwhile can never gain a key.
	res, err := s.db.ExecContext(ctx,
		`INSERT INTO keys (`+keyColumns+`) SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?
		 WHERE NOT EXISTS (SELECT 1 FROM keystores WHERE id = ? AND state <> ?)`,
		k.ID, k.DomainID, k.ProjectID, k.KeystoreID, k.Alias, k.Spec, k.Usage, k.Description,
		k.Origin, string(k.State), nullBytes(k.PublicKey), nullString(k.Sequence),
		k.CreatedAt.UnixMilli(), k.UpdatedAt.UnixMilli(), nullMilli(k.DeletionAt),
		k.KeystoreID, string(StateEnabled))
	if err == nil {
		if n, rerr := res.RowsAffected(); rerr == nil && n == 0 {
			return fmt.Errorf("store: create key %s: keystore %s is not enabled: %w", k.ID, k.KeystoreID, ErrStateConflict)
		}
	}
	if err != nil {
		if sentinel := sqliteUniqueViolation(err); sentinel != nil {
			return fmt.Errorf("store: create key %s: %w", k.ID, sentinel)
		}
		// The only foreign key of keys is keys_keystore_fkey.
		if sqliteForeignKeyViolation(err) {
			return fmt.Errorf("store: create key %s: keystore %s: %w", k.ID, k.KeystoreID, ErrNotFound)
		}
		return fmt.Errorf("store: create key %s: %w", k.ID, err)
	}
	return nil
}

// DeleteDueKey implements Store.
func (s *SQLite) DeleteDueKey(ctx context.Context, id string, now time.Time) error {
	res, err := s.db.ExecContext(ctx, `DELETE FROM keys WHERE id = ? AND state = ? AND deletion_at <= ?`,
		id, string(KeyPendingDeletion), now.UnixMilli())
	if err != nil {
		return fmt.Errorf("store: delete due key %s: %w", id, err)
	}
	if n, err := res.RowsAffected(); err != nil {
		return fmt.Errorf("store: delete due key %s: %w", id, err)
	} else if n == 0 {
		return fmt.Errorf("store: delete due key %s: %w", id, ErrStateConflict)
	}
	return nil
}

// GetKey implements Store.
func (s *SQLite) GetKey(ctx context.Context, id string) (Key, error) {
	row := s.db.QueryRowContext(ctx, `SELECT `+keyColumns+` FROM keys WHERE id = ?`, id)
	k, err := scanKey(row.Scan)
	if errors.Is(err, sql.ErrNoRows) {
		return Key{}, fmt.Errorf("store: get key %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return Key{}, fmt.Errorf("store: get key %s: %w", id, err)
	}
	return k, nil
}

// KeyBySequence implements Store. The empty sequence is stored as NULL and
// so matches no row.
func (s *SQLite) KeyBySequence(ctx context.Context, domainID, sequence string) (Key, error) {
	row := s.db.QueryRowContext(ctx,
		`SELECT `+keyColumns+` FROM keys WHERE domain_id = ? AND sequence = ?`, domainID, sequence)
	k, err := scanKey(row.Scan)
	if errors.Is(err, sql.ErrNoRows) {
		return Key{}, fmt.Errorf("store: key of domain %s with sequence %q: %w", domainID, sequence, ErrNotFound)
	}
	if err != nil {
		return Key{}, fmt.Errorf("store: key of domain %s with sequence %q: %w", domainID, sequence, err)
	}
	return k, nil
}

// ListKeys implements Store. limit and offset must not be negative; limit 0
// returns no rows but still the total. A f.State that is not a listed state
// (KeyCreating or an unknown value) matches nothing.
func (s *SQLite) ListKeys(ctx context.Context, domainID string, f KeyFilter, limit, offset int) ([]Key, int, error) {
	if limit < 0 || offset < 0 {
		return nil, 0, fmt.Errorf("store: list keys of domain %s: negative limit %d or offset %d", domainID, limit, offset)
	}
	const where = `WHERE domain_id = ? AND state <> ? AND (? = '' OR state = ?) AND (? = '' OR spec = ?)`
	args := []any{domainID, string(KeyCreating), f.State, f.State, f.Spec, f.Spec}
	// As in ListKeystores, the window count makes page and total one snapshot.
	rows, err := s.db.QueryContext(ctx,
		`SELECT `+keyColumns+`, COUNT(*) OVER ()
		FROM keys `+where+`
		ORDER BY created_at, id
		LIMIT ? OFFSET ?`,
		append(args, limit, offset)...)
	if err != nil {
		return nil, 0, fmt.Errorf("store: list keys of domain %s: %w", domainID, err)
	}
	defer rows.Close()
	ks := []Key{}
	total := 0
	for rows.Next() {
		k, err := scanKey(func(dest ...any) error {
			return rows.Scan(append(dest, &total)...)
		})
		if err != nil {
			return nil, 0, fmt.Errorf("store: list keys of domain %s: %w", domainID, err)
		}
		ks = append(ks, k)
	}
	if err := rows.Err(); err != nil {
		return nil, 0, fmt.Errorf("store: list keys of domain %s: %w", domainID, err)
	}
	if len(ks) == 0 {
		if err := s.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM keys `+where, args...).Scan(&total); err != nil {
			return nil, 0, fmt.Errorf("store: count keys of domain %s: %w", domainID, err)
		}
	}
	return ks, total, nil
}

// SetKeyState implements Store.
func (s *SQLite) SetKeyState(ctx context.Context, id string, from, to KeyState, at, deletionAt time.Time) error {
	res, err := s.db.ExecContext(ctx,
		`UPDATE keys SET state = ?, updated_at = ?, deletion_at = ? WHERE id = ? AND state = ?`,
		string(to), at.UnixMilli(), nullMilli(deletionAt), id, string(from))
	if err := s.keyCAS(ctx, id, res, err); err != nil {
		return fmt.Errorf("store: set key %s state %s -> %s: %w", id, from, to, err)
	}
	return nil
}

// ActivateKey implements Store.
func (s *SQLite) ActivateKey(ctx context.Context, id string, publicKey []byte, at time.Time) error {
	res, err := s.db.ExecContext(ctx,
		`UPDATE keys SET state = ?, public_key = ?, updated_at = ? WHERE id = ? AND state = ?`,
		string(KeyEnabled), nullBytes(publicKey), at.UnixMilli(), id, string(KeyCreating))
	if err := s.keyCAS(ctx, id, res, err); err != nil {
		return fmt.Errorf("store: activate key %s: %w", id, err)
	}
	return nil
}

// keyCAS interprets the outcome of a compare-and-set UPDATE of key id: nil if
// it changed the row, else the statement's error, ErrNotFound or
// ErrStateConflict.
func (s *SQLite) keyCAS(ctx context.Context, id string, res sql.Result, err error) error {
	if err != nil {
		return err
	}
	n, err := res.RowsAffected()
	if err != nil {
		return err
	}
	if n == 1 {
		return nil
	}
	// As in SetKeystoreState: tell a missing row from one in another state.
	var exists int
	if err := s.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM keys WHERE id = ?`, id).Scan(&exists); err != nil {
		return err
	}
	if exists == 0 {
		return ErrNotFound
	}
	return ErrStateConflict
}

// DeleteKey implements Store.
func (s *SQLite) DeleteKey(ctx context.Context, id string) error {
	res, err := s.db.ExecContext(ctx, `DELETE FROM keys WHERE id = ?`, id)
	if err != nil {
		return fmt.Errorf("store: delete key %s: %w", id, err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return fmt.Errorf("store: delete key %s: %w", id, err)
	}
	if n == 0 {
		return fmt.Errorf("store: delete key %s: %w", id, ErrNotFound)
	}
	return nil
}

// CountKeys implements Store. An unknown keystore holds 0 keys.
func (s *SQLite) CountKeys(ctx context.Context, keystoreID string) (int, error) {
	var n int
	if err := s.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM keys WHERE keystore_id = ?`, keystoreID).Scan(&n); err != nil {
		return 0, fmt.Errorf("store: count keys of keystore %s: %w", keystoreID, err)
	}
	return n, nil
}

// DueDeletions implements Store. now is compared at millisecond precision.
func (s *SQLite) DueDeletions(ctx context.Context, now time.Time) ([]Key, error) {
	return s.queryKeys(ctx, "due deletions",
		`SELECT `+keyColumns+` FROM keys WHERE state = ? AND deletion_at <= ? ORDER BY deletion_at, id`,
		string(KeyPendingDeletion), now.UnixMilli())
}

// AllKeys implements Store.
func (s *SQLite) AllKeys(ctx context.Context) ([]Key, error) {
	return s.queryKeys(ctx, "all keys", `SELECT `+keyColumns+` FROM keys ORDER BY created_at, id`)
}

// queryKeys runs query, which selects keyColumns, and reads every row.
func (s *SQLite) queryKeys(ctx context.Context, what, query string, args ...any) ([]Key, error) {
	rows, err := s.db.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, fmt.Errorf("store: %s: %w", what, err)
	}
	defer rows.Close()
	ks := []Key{}
	for rows.Next() {
		k, err := scanKey(rows.Scan)
		if err != nil {
			return nil, fmt.Errorf("store: %s: %w", what, err)
		}
		ks = append(ks, k)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("store: %s: %w", what, err)
	}
	return ks, nil
}

// scanKey reads keyColumns, in order, through scan.
func scanKey(scan func(dest ...any) error) (Key, error) {
	var (
		k                Key
		state            string
		sequence         sql.NullString
		created, updated int64
		deletion         sql.NullInt64
	)
	err := scan(&k.ID, &k.DomainID, &k.ProjectID, &k.KeystoreID, &k.Alias, &k.Spec, &k.Usage, &k.Description,
		&k.Origin, &state, &k.PublicKey, &sequence, &created, &updated, &deletion)
	if err != nil {
		return Key{}, err
	}
	if len(k.PublicKey) == 0 {
		k.PublicKey = nil
	}
	k.State = KeyState(state)
	k.Sequence = sequence.String
	k.CreatedAt = time.UnixMilli(created).UTC()
	k.UpdatedAt = time.UnixMilli(updated).UTC()
	if deletion.Valid {
		k.DeletionAt = time.UnixMilli(deletion.Int64).UTC()
	}
	return k, nil
}

// nullString binds "" as NULL.
func nullString(v string) any {
	if v == "" {
		return nil
	}
	return v
}

// nullBytes binds an empty slice as NULL.
func nullBytes(v []byte) any {
	if len(v) == 0 {
		return nil
	}
	return v
}

// nullMilli binds the zero time as NULL, any other as epoch milliseconds.
func nullMilli(t time.Time) any {
	if t.IsZero() {
		return nil
	}
	return t.UnixMilli()
}

// scanKeystore reads keystoreColumns, in order, through scan.
func scanKeystore(scan func(dest ...any) error) (Keystore, error) {
	var (
		k                Keystore
		state            string
		created, updated int64
	)
	err := scan(&k.ID, &k.DomainID, &k.ProjectID, &k.Alias, &k.Type, &k.ClusterID, &state,
		&k.TokenSerial, &k.TokenLabel, &k.CAFingerprint, &k.IdentityFingerprint, &created, &updated)
	if err != nil {
		return Keystore{}, err
	}
	k.State = State(state)
	k.CreatedAt = time.UnixMilli(created).UTC()
	k.UpdatedAt = time.UnixMilli(updated).UTC()
	return k, nil
}

// uniqueConstraints maps each unique constraint of keystores and keys to its
// sentinel. SQLite names the columns in its message ("UNIQUE constraint
// failed: keystores.domain_id, keystores.alias"); the index name is kept for
// messages that name the index instead (SQLite does so for indexes on
// expressions, should one ever replace a column index).
var uniqueConstraints = []struct {
	index   string
	columns []string // sorted
	err     error
}{
	{"keystores_pkey", []string{"keystores.id"}, ErrDuplicateID},
	{"keystores_domain_alias_key", []string{"keystores.alias", "keystores.domain_id"}, ErrDuplicateAlias},
	{"keystores_cluster_key", []string{"keystores.cluster_id"}, ErrClusterBound},
	{"keys_pkey", []string{"keys.id"}, ErrDuplicateID},
	{"keys_domain_alias_key", []string{"keys.alias", "keys.domain_id"}, ErrDuplicateAlias},
	{"keys_domain_sequence_key", []string{"keys.domain_id", "keys.sequence"}, ErrDuplicateSequence},
}

// sqliteUniqueViolation returns the sentinel for a unique or primary-key
// violation on keystores or keys, or nil if err is anything else.
func sqliteUniqueViolation(err error) error {
	var se *sqlite.Error
	if !errors.As(err, &se) {
		return nil
	}
	switch se.Code() {
	case sqlite3.SQLITE_CONSTRAINT_UNIQUE, sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY:
		return uniqueViolationFromMessage(se.Error())
	}
	return nil
}

// sqliteForeignKeyViolation reports whether err is a foreign-key failure.
// SQLite does not say which foreign key failed, so callers map it by the
// statement they ran; each statement here can break at most one.
//
// A missing parent is SQLITE_CONSTRAINT_FOREIGNKEY, but an ON DELETE
// RESTRICT action is run as an internal trigger program and fails with
// SQLITE_CONSTRAINT_TRIGGER; the message tells it from a user trigger's
// RAISE (the schema has none).
func sqliteForeignKeyViolation(err error) bool {
	var se *sqlite.Error
	if !errors.As(err, &se) {
		return false
	}
	switch se.Code() {
	case sqlite3.SQLITE_CONSTRAINT_FOREIGNKEY:
		return true
	case sqlite3.SQLITE_CONSTRAINT_TRIGGER:
		return strings.Contains(se.Error(), "FOREIGN KEY constraint failed")
	}
	return false
}

// uniqueViolationFromMessage picks the constraint a SQLite unique-failure
// message names. It matches the whole column set, so a future constraint
// over a superset of columns cannot be mistaken for an existing one.
func uniqueViolationFromMessage(msg string) error {
	const marker = "UNIQUE constraint failed: "
	i := strings.LastIndex(msg, marker)
	if i < 0 {
		return nil
	}
	detail := msg[i+len(marker):]
	// modernc appends " (code)" after SQLite's message.
	if j := strings.LastIndex(detail, " ("); j >= 0 {
		detail = detail[:j]
	}
	detail = strings.TrimSpace(detail)
	if name, ok := strings.CutPrefix(detail, "index '"); ok {
		name = strings.TrimSuffix(name, "'")
		for _, c := range uniqueConstraints {
			if c.index == name {
				return c.err
			}
		}
		return nil
	}
	cols := strings.Split(detail, ",")
	for i := range cols {
		cols[i] = strings.TrimSpace(cols[i])
	}
	slices.Sort(cols)
	for _, c := range uniqueConstraints {
		if slices.Equal(c.columns, cols) {
			return c.err
		}
	}
	return nil
}
