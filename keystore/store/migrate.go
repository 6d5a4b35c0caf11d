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
// version numbers. Queries are written in the backend's own placeholder style
// (? or $1).
type dialect struct {
	dir string
	// lock, if not empty, runs first in every migration transaction and
	// holds until it ends, serialising migrators across processes
	// (PostgreSQL: a transaction-scoped advisory lock). SQLite needs none:
	// its transactions begin with the write lock (BEGIN IMMEDIATE).
	lock string
	// createTable creates schema_migrations if it does not exist.
	createTable string
	// isApplied counts rows with version = first argument.
	isApplied string
	// maxVersion selects the highest applied version (NULL if none).
	maxVersion string
	// record inserts (version, applied_at epoch ms).
	record string
}

// migrationDB is what the runner drives: database/sql for SQLite, a pgx pool
// for PostgreSQL.
type migrationDB interface {
	begin(ctx context.Context) (migrationTx, error)
}

// migrationTx is one transaction of the runner.
type migrationTx interface {
	exec(ctx context.Context, query string, args ...any) error
	// queryInt reads the single integer column of the single row query
	// returns; ok is false if it is NULL.
	queryInt(ctx context.Context, query string, args ...any) (v int64, ok bool, err error)
	commit(ctx context.Context) error
	// rollback ends the transaction; nil if it has already ended.
	rollback(ctx context.Context) error
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
// transaction, after d.lock; backends must make that transaction exclusive
// for migrators (SQLite: BEGIN IMMEDIATE; PostgreSQL: the advisory lock) so
// two processes opening at once cannot both apply the same version.
func migrate(ctx context.Context, db migrationDB, d dialect) error {
	ms, err := loadMigrations(migrationsFS, path.Join("migrations", d.dir))
	if err != nil {
		return err
	}
	// Creating the table is serialised too: concurrent CREATE TABLE IF NOT
	// EXISTS can fail in PostgreSQL.
	var maxApplied int64
	var anyApplied bool
	err = inTx(ctx, db, d, func(tx migrationTx) error {
		if err := tx.exec(ctx, d.createTable); err != nil {
			return fmt.Errorf("create schema_migrations: %w", err)
		}
		var err error
		if maxApplied, anyApplied, err = tx.queryInt(ctx, d.maxVersion); err != nil {
			return fmt.Errorf("read schema version: %w", err)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("store: %w", err)
	}
	// A binary older than the database would run against a schema it does
	// not know; refuse rather than guess.
	if latest := ms[len(ms)-1].version; anyApplied && maxApplied > int64(latest) {
		return fmt.Errorf("store: database schema version %d is newer than this binary's %d", maxApplied, latest)
	}
	for _, m := range ms {
		err := inTx(ctx, db, d, func(tx migrationTx) error {
			n, _, err := tx.queryInt(ctx, d.isApplied, m.version)
			if err != nil {
				return fmt.Errorf("check applied: %w", err)
			}
			if n > 0 {
				return nil
			}
			if err := tx.exec(ctx, m.sql); err != nil {
				return fmt.Errorf("apply: %w", err)
			}
			if err := tx.exec(ctx, d.record, m.version, time.Now().UnixMilli()); err != nil {
				return fmt.Errorf("record: %w", err)
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("store: migration %s: %w", m.name, err)
		}
	}
	return nil
}

// inTx runs f in a transaction that first takes d.lock, committing if f
// returns nil and rolling back otherwise.
func inTx(ctx context.Context, db migrationDB, d dialect, f func(tx migrationTx) error) (err error) {
	tx, err := db.begin(ctx)
	if err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, tx.rollback(ctx))
		}
	}()
	if d.lock != "" {
		if err := tx.exec(ctx, d.lock); err != nil {
			return fmt.Errorf("lock: %w", err)
		}
	}
	if err := f(tx); err != nil {
		return err
	}
	if err := tx.commit(ctx); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	return nil
}

// sqlMigrationDB runs the migrations through database/sql.
type sqlMigrationDB struct{ db *sql.DB }

func (m sqlMigrationDB) begin(ctx context.Context) (migrationTx, error) {
	tx, err := m.db.BeginTx(ctx, nil)
	if err != nil {
		return nil, err
	}
	return sqlMigrationTx{tx}, nil
}

type sqlMigrationTx struct{ tx *sql.Tx }

func (t sqlMigrationTx) exec(ctx context.Context, query string, args ...any) error {
	_, err := t.tx.ExecContext(ctx, query, args...)
	return err
}

func (t sqlMigrationTx) queryInt(ctx context.Context, query string, args ...any) (int64, bool, error) {
	var v sql.NullInt64
	err := t.tx.QueryRowContext(ctx, query, args...).Scan(&v)
	return v.Int64, v.Valid, err
}

func (t sqlMigrationTx) commit(context.Context) error { return t.tx.Commit() }

// rollback drops the error Rollback returns after a failed Commit already
// ended the transaction.
func (t sqlMigrationTx) rollback(context.Context) error {
	if err := t.tx.Rollback(); !errors.Is(err, sql.ErrTxDone) {
		return err
	}
	return nil
}
