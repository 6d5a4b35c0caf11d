package store

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// The PostgreSQL tests need a server where they may create and drop
// databases. HSMBRIDGE_TEST_POSTGRES names its admin connection; without it
// the local server is tried as root, then as postgres. An unreachable server
// skips them, unless HSMBRIDGE_REQUIRE_POSTGRES=1 (CI), which fails instead.
const (
	envPostgresDSN     = "HSMBRIDGE_TEST_POSTGRES"
	envRequirePostgres = "HSMBRIDGE_REQUIRE_POSTGRES"
)

var defaultAdminDSNs = []string{
	"postgres://root@127.0.0.1:5432/postgres?sslmode=disable",
	"postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable",
}

// pgServer is a reachable server and its admin connection.
type pgServer struct {
	adminDSN string
	admin    *pgxpool.Pool
}

// unreachable remembers why the server could not be reached, so that the
// tests after the first skip at once instead of waiting for their own timeouts.
var unreachable struct {
	sync.Mutex
	where  string
	reason error
}

// testPostgresServer connects to the test server for the duration of t, or
// skips (fails, under HSMBRIDGE_REQUIRE_POSTGRES=1) if it cannot.
func testPostgresServer(t *testing.T) *pgServer {
	t.Helper()
	unreachable.Lock()
	defer unreachable.Unlock()
	if unreachable.reason != nil {
		skipPostgres(t, unreachable.where, unreachable.reason)
	}
	candidates := defaultAdminDSNs
	where := "127.0.0.1:5432 (as root or postgres)"
	if dsn := os.Getenv(envPostgresDSN); dsn != "" {
		candidates = []string{dsn}
		where = envPostgresDSN
		if cfg, err := pgconn.ParseConfig(dsn); err == nil {
			where = fmt.Sprintf("%s:%d (%s)", cfg.Host, cfg.Port, envPostgresDSN)
		}
	}
	var errs []error
	for _, dsn := range candidates {
		pool, err := connectAdmin(dsn)
		if err == nil {
			t.Cleanup(pool.Close)
			return &pgServer{adminDSN: dsn, admin: pool}
		}
		errs = append(errs, err)
	}
	unreachable.where, unreachable.reason = where, errors.Join(errs...)
	skipPostgres(t, where, unreachable.reason)
	return nil
}

func skipPostgres(t *testing.T, where string, reason error) {
	t.Helper()
	if os.Getenv(envRequirePostgres) == "1" {
		t.Fatalf("PostgreSQL not reachable at %s, and %s=1: %v", where, envRequirePostgres, reason)
	}
	t.Skipf("PostgreSQL not reachable at %s: skipping the PostgreSQL store tests (set %s=1 to fail instead): %v",
		where, envRequirePostgres, reason)
}

// TestPostgresServer says whether the PostgreSQL tests run, and where:
// `go test -run '^TestPostgresServer$' -v` is the cheap way to find out (a
// skip is silent without -v).
func TestPostgresServer(t *testing.T) {
	srv := testPostgresServer(t)
	var version string
	if err := srv.admin.QueryRow(context.Background(), `SHOW server_version`).Scan(&version); err != nil {
		t.Fatalf("server_version: %v", err)
	}
	cfg := srv.admin.Config().ConnConfig
	t.Logf("PostgreSQL %s at %s:%d (user %s): running the PostgreSQL store tests", version, cfg.Host, cfg.Port, cfg.User)
}

func connectAdmin(dsn string) (*pgxpool.Pool, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, err
	}
	cfg.MaxConns = 2
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, err
	}
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		return nil, err
	}
	return pool, nil
}

// newDatabase creates an empty database, dropped when t ends, and returns
// its DSN. Its default collation is ICU en-US where the server has ICU, so
// that a text column missing COLLATE "C" sorts differently from SQLite and
// the ordering tests notice.
func (srv *pgServer) newDatabase(t *testing.T) string {
	t.Helper()
	ctx := context.Background()
	var b [8]byte
	_, _ = rand.Read(b[:])
	name := "hsmbridge_test_" + hex.EncodeToString(b[:])
	ident := pgx.Identifier{name}.Sanitize()
	if _, err := srv.admin.Exec(ctx, `CREATE DATABASE `+ident+` TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'`); err != nil {
		if _, err2 := srv.admin.Exec(ctx, `CREATE DATABASE `+ident); err2 != nil {
			t.Fatalf("create database %s: %v (with ICU: %v)", name, err2, err)
		}
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if _, err := srv.admin.Exec(ctx, `DROP DATABASE IF EXISTS `+ident+` WITH (FORCE)`); err != nil {
			t.Errorf("drop database %s: %v", name, err)
		}
	})
	return withDatabase(t, srv.adminDSN, name)
}

// withDatabase returns dsn naming database db instead.
func withDatabase(t *testing.T, dsn, db string) string {
	t.Helper()
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		u, err := url.Parse(dsn)
		if err != nil {
			t.Fatalf("parse %s: %v", envPostgresDSN, err)
		}
		u.Path = "/" + db
		u.RawPath = ""
		return u.String()
	}
	// keyword=value: a later keyword overrides an earlier one.
	return dsn + " dbname=" + db
}

func openTestPostgres(t *testing.T, dsn string) *Postgres {
	t.Helper()
	s, err := OpenPostgres(context.Background(), dsn, 4)
	if err != nil {
		t.Fatalf("OpenPostgres: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return s
}

func TestPostgres(t *testing.T) {
	srv := testPostgresServer(t)
	testStore(t, func(t *testing.T) Store {
		return openTestPostgres(t, srv.newDatabase(t))
	})
}

func TestPostgresReplicas(t *testing.T) {
	srv := testPostgresServer(t)
	testReplicaRaces(t, func(t *testing.T) (Store, Store) {
		dsn := srv.newDatabase(t)
		return openTestPostgres(t, dsn), openTestPostgres(t, dsn)
	})
}

// Daemons starting together on a fresh database apply each migration once.
func TestPostgresConcurrentMigrate(t *testing.T) {
	srv := testPostgresServer(t)
	ctx := context.Background()
	dsn := srv.newDatabase(t)
	const n = 5
	stores := make([]*Postgres, n)
	errs := make([]error, n)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			<-start
			stores[i], errs[i] = OpenPostgres(ctx, dsn, 2)
		})
	}
	close(start)
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("OpenPostgres %d: %v", i, err)
			continue
		}
		t.Cleanup(func() { stores[i].Close() })
	}
	if t.Failed() {
		t.FailNow()
	}
	assertMigratedOnce(t, stores[0])
	// Every opener sees the full schema.
	for i, s := range stores {
		if _, err := s.AllKeys(ctx); err != nil {
			t.Errorf("store %d: AllKeys: %v", i, err)
		}
	}
	// And a later one changes nothing.
	assertMigratedOnce(t, openTestPostgres(t, dsn))
}

func assertMigratedOnce(t *testing.T, s *Postgres) {
	t.Helper()
	rows, err := s.pool.Query(context.Background(), `SELECT version FROM schema_migrations ORDER BY version`)
	if err != nil {
		t.Fatalf("read schema_migrations: %v", err)
	}
	versions, err := pgx.CollectRows(rows, pgx.RowTo[int32])
	if err != nil {
		t.Fatalf("read schema_migrations: %v", err)
	}
	if !slices.Equal(versions, []int32{1, 2}) {
		t.Fatalf("schema_migrations versions = %v, want [1 2] (each once)", versions)
	}
}

func TestPostgresReopen(t *testing.T) {
	srv := testPostgresServer(t)
	ctx := context.Background()
	dsn := srv.newDatabase(t)
	s, err := OpenPostgres(ctx, dsn, 0)
	if err != nil {
		t.Fatalf("OpenPostgres: %v", err)
	}
	if got := s.pool.Config().MaxConns; got != DefaultPostgresMaxConns {
		t.Errorf("MaxConns = %d, want default %d", got, DefaultPostgresMaxConns)
	}
	k := newKeystore(1)
	mustCreate(t, s, k)
	key := newKey(1, k.ID)
	key.PublicKey = []byte{0x30, 0x59, 0x00, 0xff}
	key.Sequence = "seq-1"
	mustCreateKey(t, s, key)
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}

	s2 := openTestPostgres(t, dsn)
	if got := s2.pool.Config().MaxConns; got != 4 {
		t.Errorf("MaxConns = %d, want 4", got)
	}
	got, err := s2.GetKeystore(ctx, k.ID)
	if err != nil {
		t.Fatalf("GetKeystore after reopen: %v", err)
	}
	assertKeystore(t, got, stored(k))
	gotKey, err := s2.GetKey(ctx, key.ID)
	if err != nil {
		t.Fatalf("GetKey after reopen: %v", err)
	}
	assertKey(t, gotKey, storedKey(key))
	assertMigratedOnce(t, s2)
}

func TestPostgresRefusesNewerSchema(t *testing.T) {
	srv := testPostgresServer(t)
	ctx := context.Background()
	dsn := srv.newDatabase(t)
	s := openTestPostgres(t, dsn)
	if _, err := s.pool.Exec(ctx, `INSERT INTO schema_migrations (version, applied_at) VALUES (9999, 0)`); err != nil {
		t.Fatalf("insert future version: %v", err)
	}
	if s, err := OpenPostgres(ctx, dsn, 1); err == nil {
		s.Close()
		t.Fatal("OpenPostgres accepted a schema newer than the binary")
	} else if !strings.Contains(err.Error(), "newer than this binary") {
		t.Fatalf("OpenPostgres = %v, want the newer-schema refusal", err)
	}
}

func TestOpenPostgresErrors(t *testing.T) {
	ctx := context.Background()
	// A DSN that does not parse: the error must not quote the password.
	_, err := OpenPostgres(ctx, "postgres://u:s3cret@127.0.0.1:5432/db?sslmode=bogus", 1)
	if err == nil {
		t.Fatal("OpenPostgres(bad sslmode) succeeded")
	}
	if strings.Contains(err.Error(), "s3cret") {
		t.Errorf("error %q quotes the password", err)
	}
	// Nothing listens on port 1; the error names where it tried, without the password.
	_, err = OpenPostgres(ctx, "postgres://u:s3cret@127.0.0.1:1/db?sslmode=disable&connect_timeout=2", 1)
	if err == nil {
		t.Fatal("OpenPostgres(port 1) succeeded")
	}
	if strings.Contains(err.Error(), "s3cret") || !strings.Contains(err.Error(), "127.0.0.1:1/db") {
		t.Errorf("error %q: want it to name 127.0.0.1:1/db and not quote the password", err)
	}
}

func TestOpenPostgresCancelled(t *testing.T) {
	srv := testPostgresServer(t)
	dsn := srv.newDatabase(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if s, err := OpenPostgres(ctx, dsn, 1); !errors.Is(err, context.Canceled) {
		if err == nil {
			s.Close()
		}
		t.Fatalf("OpenPostgres with cancelled ctx = %v, want context.Canceled", err)
	}
}

// holdRow starts a transaction that runs stmt (locking a row) and keeps it
// open; the returned function ends it, committing if commit.
func holdRow(t *testing.T, s *Postgres, stmt string, args ...any) (end func(commit bool)) {
	t.Helper()
	ctx := context.Background()
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		t.Fatalf("begin: %v", err)
	}
	if _, err := tx.Exec(ctx, stmt, args...); err != nil {
		t.Fatalf("%s: %v", stmt, err)
	}
	done := false
	end = func(commit bool) {
		if done {
			return
		}
		done = true
		var err error
		if commit {
			err = tx.Commit(ctx)
		} else {
			err = tx.Rollback(ctx)
		}
		if err != nil {
			t.Errorf("end transaction: %v", err)
		}
	}
	t.Cleanup(func() { end(false) })
	return end
}

// A call blocked in the server (here on a row lock) returns when its context
// ends, and leaves nothing behind.
func TestPostgresContextBoundsBlockedCall(t *testing.T) {
	srv := testPostgresServer(t)
	ctx := context.Background()
	s := openTestPostgres(t, srv.newDatabase(t))
	k := newKeystore(1)
	mustCreate(t, s, k)
	end := holdRow(t, s, `UPDATE keystores SET updated_at = updated_at WHERE id = $1`, k.ID)

	short, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	err := s.SetKeystoreState(short, k.ID, StateEnabled, StateDisabled, baseTime)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("SetKeystoreState blocked past its deadline = %v, want context.DeadlineExceeded", err)
	}

	cancelled, cancel2 := context.WithCancel(ctx)
	go func() { time.Sleep(100 * time.Millisecond); cancel2() }()
	if err := s.DeleteKeystore(cancelled, k.ID); !errors.Is(err, context.Canceled) {
		t.Fatalf("DeleteKeystore cancelled while blocked = %v, want context.Canceled", err)
	}
	// pgx returns at once and asks the server to cancel asynchronously: until the server
	// has, the DELETE still waits for the lock, and releasing it now would let it run (as
	// with any database, a call whose context ended may still take effect). Wait until no
	// statement of this database waits for a lock.
	for deadline := time.Now().Add(10 * time.Second); ; {
		var waiting int
		if err := s.pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity
			WHERE datname = current_database() AND wait_event_type = 'Lock'`).Scan(&waiting); err != nil {
			t.Fatal(err)
		}
		if waiting == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the cancelled DELETE still waits on the server")
		}
		time.Sleep(10 * time.Millisecond)
	}
	end(true)
	got, err := s.GetKeystore(ctx, k.ID)
	if err != nil {
		t.Fatalf("GetKeystore: %v", err)
	}
	assertKeystore(t, got, stored(k))
}

// A key must not get into a keystore whose disable is in flight: CreateKey
// waits for the state change and then refuses; had the disable rolled back,
// it succeeds.
func TestPostgresCreateKeyWaitsForKeystoreStateChange(t *testing.T) {
	srv := testPostgresServer(t)
	ctx := context.Background()
	for _, commit := range []bool{true, false} {
		t.Run(fmt.Sprintf("commit=%v", commit), func(t *testing.T) {
			s := openTestPostgres(t, srv.newDatabase(t))
			ks := newKeystore(1)
			mustCreate(t, s, ks)
			end := holdRow(t, s, `UPDATE keystores SET state = $1 WHERE id = $2`, string(StateDisabled), ks.ID)
			done := make(chan error, 1)
			go func() { done <- s.CreateKey(ctx, newKey(1, ks.ID)) }()
			select {
			case err := <-done:
				t.Fatalf("CreateKey did not wait for the keystore's state change: %v", err)
			case <-time.After(300 * time.Millisecond):
			}
			end(commit)
			var want error
			if commit {
				want = ErrStateConflict
			}
			select {
			case err := <-done:
				if want == nil && err != nil || want != nil && !errors.Is(err, want) {
					t.Fatalf("CreateKey after the state change = %v, want %v", err, want)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("CreateKey still blocked after the state change ended")
			}
			n, err := s.CountKeys(ctx, ks.ID)
			if err != nil || (commit && n != 0) || (!commit && n != 1) {
				t.Fatalf("CountKeys = %d, %v", n, err)
			}
		})
	}
}

// The schema is the SQLite one: same tables, columns, index and constraint
// names; every text column compares bytewise.
func TestPostgresSchemaMatchesSQLite(t *testing.T) {
	srv := testPostgresServer(t)
	ctx := context.Background()
	pg := openTestPostgres(t, srv.newDatabase(t))
	lite := openTestSQLite(t, filepath.Join(t.TempDir(), "hsmbridge.db"))
	for _, table := range []string{"keystores", "keys", "schema_migrations"} {
		rows, err := lite.db.QueryContext(ctx, `SELECT name FROM pragma_table_info(?) ORDER BY cid`, table)
		if err != nil {
			t.Fatalf("sqlite columns of %s: %v", table, err)
		}
		var liteCols []string
		for rows.Next() {
			var c string
			if err := rows.Scan(&c); err != nil {
				t.Fatal(err)
			}
			liteCols = append(liteCols, c)
		}
		rows.Close()
		pgRows, err := pg.pool.Query(ctx,
			`SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position`, table)
		if err != nil {
			t.Fatalf("postgres columns of %s: %v", table, err)
		}
		pgCols, err := pgx.CollectRows(pgRows, pgx.RowTo[string])
		if err != nil {
			t.Fatal(err)
		}
		if len(liteCols) == 0 || !slices.Equal(liteCols, pgCols) {
			t.Errorf("%s columns: sqlite %v, postgres %v", table, liteCols, pgCols)
		}
	}

	rows, err := lite.db.QueryContext(ctx,
		`SELECT name FROM sqlite_master WHERE type = 'index' AND name NOT LIKE 'sqlite_autoindex%' ORDER BY name`)
	if err != nil {
		t.Fatal(err)
	}
	var liteIdx []string
	for rows.Next() {
		var c string
		if err := rows.Scan(&c); err != nil {
			t.Fatal(err)
		}
		liteIdx = append(liteIdx, c)
	}
	rows.Close()
	pgRows, err := pg.pool.Query(ctx,
		`SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() AND tablename IN ('keystores', 'keys') AND indexname NOT LIKE '%\_pkey' ORDER BY indexname COLLATE "C"`)
	if err != nil {
		t.Fatal(err)
	}
	pgIdx, err := pgx.CollectRows(pgRows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	if len(liteIdx) == 0 || !slices.Equal(liteIdx, pgIdx) {
		t.Errorf("indexes: sqlite %v, postgres %v", liteIdx, pgIdx)
	}

	pgRows, err = pg.pool.Query(ctx,
		`SELECT conname FROM pg_constraint WHERE conrelid IN ('keystores'::regclass, 'keys'::regclass) ORDER BY conname COLLATE "C"`)
	if err != nil {
		t.Fatal(err)
	}
	cons, err := pgx.CollectRows(pgRows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	wantCons := []string{"keys_deletion_check", "keys_keystore_fkey", "keys_pkey", "keys_sequence_check", "keys_state_check",
		"keystores_pkey", "keystores_state_check"}
	if !slices.Equal(cons, wantCons) {
		t.Errorf("constraints = %v, want %v", cons, wantCons)
	}

	pgRows, err = pg.pool.Query(ctx,
		`SELECT table_name || '.' || column_name FROM information_schema.columns
		WHERE table_schema = current_schema() AND table_name IN ('keystores', 'keys')
		AND data_type = 'text' AND collation_name IS DISTINCT FROM 'C'`)
	if err != nil {
		t.Fatal(err)
	}
	notC, err := pgx.CollectRows(pgRows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	if len(notC) > 0 {
		t.Errorf("text columns without COLLATE \"C\": %v", notC)
	}
}

// Violations of CHECK constraints are caller bugs, not sentinels, and the
// mapping goes by constraint name, not by the SQLSTATE alone.
func TestPgErrorMapping(t *testing.T) {
	for _, c := range uniqueConstraints {
		err := fmt.Errorf("wrapped: %w", &pgconn.PgError{Code: "23505", ConstraintName: c.index})
		if got := pgUniqueViolation(err); got != c.err {
			t.Errorf("unique violation of %s -> %v, want %v", c.index, got, c.err)
		}
	}
	for _, err := range []error{
		&pgconn.PgError{Code: "23505", ConstraintName: "schema_migrations_pkey"},
		&pgconn.PgError{Code: "23505", ConstraintName: "other_key"},
		&pgconn.PgError{Code: "23514", ConstraintName: "keystores_pkey"},
		&pgconn.PgError{Code: "23503", ConstraintName: "keys_keystore_fkey"},
		errors.New("keystores_pkey"),
	} {
		if got := pgUniqueViolation(err); got != nil {
			t.Errorf("pgUniqueViolation(%v) = %v, want nil", err, got)
		}
	}
	if !pgForeignKeyViolation(fmt.Errorf("x: %w", &pgconn.PgError{Code: "23503", ConstraintName: "keys_keystore_fkey"})) {
		t.Error("keys_keystore_fkey violation not recognised")
	}
	for _, err := range []error{
		&pgconn.PgError{Code: "23503", ConstraintName: "other_fkey"},
		&pgconn.PgError{Code: "23505", ConstraintName: "keys_keystore_fkey"},
		errors.New("23503"),
	} {
		if pgForeignKeyViolation(err) {
			t.Errorf("pgForeignKeyViolation(%v) = true", err)
		}
	}
}

func TestWithDatabase(t *testing.T) {
	for in, want := range map[string]string{
		"postgres://root@127.0.0.1:5432/postgres?sslmode=disable": "postgres://root@127.0.0.1:5432/x?sslmode=disable",
		"postgresql://u:p@h/":                      "postgresql://u:p@h/x",
		"host=127.0.0.1 user=root dbname=postgres": "host=127.0.0.1 user=root dbname=postgres dbname=x",
	} {
		if got := withDatabase(t, in, "x"); got != want {
			t.Errorf("withDatabase(%q) = %q, want %q", in, got, want)
		}
	}
}
