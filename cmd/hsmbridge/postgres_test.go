package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/hsmbridge/hsmbridge/internal/devenv"
)

// newPostgresDB creates a database for one test on the machine's PostgreSQL and returns
// its DSN; it is dropped when the test ends. Without a server the test is skipped, unless
// HSMBRIDGE_REQUIRE_POSTGRES=1 (CI), which fails it.
func newPostgresDB(t *testing.T) string {
	t.Helper()
	admin := os.Getenv("HSMBRIDGE_TEST_POSTGRES")
	if admin == "" {
		admin = "postgres://root@127.0.0.1:5432/postgres?sslmode=disable"
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, admin)
	if err != nil {
		if os.Getenv("HSMBRIDGE_REQUIRE_POSTGRES") == "1" {
			t.Fatalf("PostgreSQL not reachable (HSMBRIDGE_REQUIRE_POSTGRES=1): %v", err)
		}
		t.Skipf("PostgreSQL not reachable: skipping (set HSMBRIDGE_REQUIRE_POSTGRES=1 to fail instead): %v", err)
	}
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	name := "hsmbridge_cmd_" + hex.EncodeToString(b)
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		t.Fatalf("create database: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := conn.Exec(ctx, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)"); err != nil {
			t.Errorf("drop database %s: %v", name, err)
		}
		_ = conn.Close(ctx)
	})
	cfg := conn.Config()
	return "postgres://" + cfg.User + "@" + cfg.Host + ":5432/" + name + "?sslmode=disable"
}

// usePostgres points env's config at dsn (through a DSN file, as an operator would).
func usePostgres(t *testing.T, env *devenv.Env, dsn string) {
	t.Helper()
	if err := os.WriteFile(env.Dir+"/dsn", []byte(dsn+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(env.ConfigPath)
	if err != nil {
		t.Fatal(err)
	}
	text := strings.Replace(string(data), "store:\n  driver: sqlite\n  path: hsmbridge.db\n",
		"store:\n  driver: postgres\n  dsn_file: dsn\n  max_conns: 4\n", 1)
	if text == string(data) {
		t.Fatal("the env's config has no sqlite store block to replace")
	}
	if err := os.WriteFile(env.ConfigPath, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestMigrateSQLiteToPostgres moves a deployment from its SQLite file to PostgreSQL with
// `store export` and `store import`: every keystore and key arrives, and every key still
// decrypts what it encrypted before.
func TestMigrateSQLiteToPostgres(t *testing.T) {
	dsn := newPostgresDB(t)
	env := newEnv(t, "c1", "c2")
	c, ksID, stop := keysDaemon(t, env)
	aes := c.createKey(ksID, "mig-aes", "AES_256", "")
	rsa := c.createKey(ksID, "mig-rsa", "RSA_2048", "ENCRYPT_DECRYPT")
	ct := str(t, c.ok("encrypt-data", map[string]any{"key_id": aes, "plain_text": "before the move"}), "cipher_text")
	rsaCT := str(t, c.ok("encrypt-data", map[string]any{"key_id": rsa, "plain_text": "rsa before", "encryption_algorithm": "RSAES_OAEP_SHA_256"}), "cipher_text")
	c.ok("disable-key", map[string]any{"key_id": rsa})
	stop()

	dump := env.Dir + "/dump.json"
	var out, errOut strings.Builder
	if err := run(t.Context(), []string{"store", "export", "--config", env.ConfigPath, "--file", dump}, &out, &errOut); err != nil {
		t.Fatalf("store export: %v\n%s", err, errOut.String())
	}
	usePostgres(t, env, dsn)
	if err := run(t.Context(), []string{"migrate", "--config", env.ConfigPath}, &out, &errOut); err != nil {
		t.Fatalf("migrate: %v\n%s", err, errOut.String())
	}
	if err := run(t.Context(), []string{"store", "import", "--config", env.ConfigPath, "--file", dump}, &out, &errOut); err != nil {
		t.Fatalf("store import: %v\n%s", err, errOut.String())
	}
	if !strings.Contains(out.String(), "imported 1 keystores and 2 keys") {
		t.Errorf("import said %q", out.String())
	}
	if err := run(t.Context(), []string{"store", "import", "--config", env.ConfigPath, "--file", dump}, &out, &errOut); err == nil {
		t.Error("a second import into the now non-empty store succeeded")
	}

	base, stop := startDaemon(t, env)
	defer stop()
	c = tenantOf(t, base, env)
	got := c.ok("decrypt-data", map[string]any{"cipher_text": ct})
	if str(t, got, "plain_text") != "before the move" {
		t.Errorf("decrypt after the move = %v", got)
	}
	if st := c.keyState(rsa); st != "3" {
		t.Errorf("the disabled RSA key arrived in state %s, want 3", st)
	}
	c.ok("enable-key", map[string]any{"key_id": rsa})
	got = c.ok("decrypt-data", map[string]any{"key_id": rsa, "cipher_text": rsaCT, "encryption_algorithm": "RSAES_OAEP_SHA_256"})
	if str(t, got, "plain_text") != "rsa before" {
		t.Errorf("RSA decrypt after the move = %v", got)
	}
	// The keystore kept its binding: its cluster is still bound, the other still free.
	st, hdr, body := create(t, base, env, goodFields(env, env.Tokens[0], "again"))
	wantError(t, st, hdr, body, 400, "KMS.8005")
	mustCreate(t, base, env, env.Tokens[1], "again")
}
