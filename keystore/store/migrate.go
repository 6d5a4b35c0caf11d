package store

import (
	"context"
	"database/sql"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"sort"
	"strconv"
	"strings"
	"time"
)

//go:embed migrations
var migrationsFS embed.FS

// dialect is what the migration runner needs to know about one SQL backend.
// Each backend keeps its own migrations under migrations/<dir>/ named
// NNNN_description.sql, so schemas can differ in types while keeping the same
// version numbers.
type dialect struct {
	dir string
	// createTable creates schema_migrations if it does not exist.
	createTable string
	// isApplied counts rows with version = first argument.
	isApplied string
	// maxVersion selects the highest applied version (NULL if none).
	maxVersion string
	// record inserts (version, applied_at epoch ms).
	record string
}

type migration struct {
	version int
	name    string
	sql     string
}

// loadMigrations reads dir's migrations in version order.
func loadMigrations(fsys fs.FS, dir string) ([]migration, error) {
	names, err := fs.Glob(fsys, path.Join(dir, "*.sql"))
	if err != nil {
		return nil, fmt.Errorf("store: list migrations in %s: %w", dir, err)
	}
	ms := make([]migration, 0, len(names))
	seen := make(map[int]string, len(names))
	for _, name := range names {
		base := path.Base(name)
		prefix, _, ok := strings.Cut(base, "_")
		v, err := strconv.Atoi(prefix)
		if !ok || err != nil || v <= 0 {
			return nil, fmt.Errorf("store: migration %s: name must be NNNN_description.sql", name)
		}
		if prev, dup := seen[v]; dup {
			return nil, fmt.Errorf("store: migrations %s and %s share version %d", prev, name, v)
		}
		seen[v] = name
		body, err := fs.ReadFile(fsys, name)
		if err != nil {
			return nil, fmt.Errorf("store: read migration %s: %w", name, err)
		}
		ms = append(ms, migration{version: v, name: base, sql: string(body)})
	}
	if len(ms) == 0 {
		return nil, fmt.Errorf("store: no migrations in %s", dir)
	}
	sort.Slice(ms, func(i, j int) bool { return ms[i].version < ms[j].version })
	return ms, nil
}

// migrate applies every migration of d not yet recorded in schema_migrations,
// each in its own transaction together with its record, so a failure leaves
// the schema at the last complete version. The applied check runs inside the
// transaction; backends must make that transaction exclusive for writers
// (SQLite: BEGIN IMMEDIATE) so two processes opening at once cannot both
// apply the same version.
func migrate(ctx context.Context, db *sql.DB, d dialect) error {
	ms, err := loadMigrations(migrationsFS, path.Join("migrations", d.dir))
	if err != nil {
		return err
	}
	if _, err := db.ExecContext(ctx, d.createTable); err != nil {
		return fmt.Errorf("store: create schema_migrations: %w", err)
	}
	// A binary older than the database would run against a schema it does
	// not know; refuse rather than guess.
	var maxApplied sql.NullInt64
	if err := db.QueryRowContext(ctx, d.maxVersion).Scan(&maxApplied); err != nil {
		return fmt.Errorf("store: read schema version: %w", err)
	}
	if latest := ms[len(ms)-1].version; maxApplied.Valid && maxApplied.Int64 > int64(latest) {
		return fmt.Errorf("store: database schema version %d is newer than this binary's %d", maxApplied.Int64, latest)
	}
	for _, m := range ms {
		if err := applyMigration(ctx, db, d, m); err != nil {
			return fmt.Errorf("store: migration %s: %w", m.name, err)
		}
	}
	return nil
}

func applyMigration(ctx context.Context, db *sql.DB, d dialect, m migration) (err error) {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, ignoreDone(tx.Rollback()))
		}
	}()
	var n int
	if err := tx.QueryRowContext(ctx, d.isApplied, m.version).Scan(&n); err != nil {
		return fmt.Errorf("check applied: %w", err)
	}
	if n > 0 {
		return tx.Rollback()
	}
	if _, err := tx.ExecContext(ctx, m.sql); err != nil {
		return fmt.Errorf("apply: %w", err)
	}
	if _, err := tx.ExecContext(ctx, d.record, m.version, time.Now().UnixMilli()); err != nil {
		return fmt.Errorf("record: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	return nil
}

// ignoreDone drops the error Rollback returns after a failed Commit already
// ended the transaction.
func ignoreDone(err error) error {
	if errors.Is(err, sql.ErrTxDone) {
		return nil
	}
	return err
}
