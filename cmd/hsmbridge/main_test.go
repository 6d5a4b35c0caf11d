package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hsmbridge/hsmbridge/hsm"
	"github.com/hsmbridge/hsmbridge/internal/config"
	"github.com/hsmbridge/hsmbridge/internal/devenv"
	"github.com/hsmbridge/hsmbridge/keystore/store"
)

// softHSMDir is this test binary's private SoftHSM directory (config and token dir).
var softHSMDir string

// TestMain points SoftHSM at a private token directory before any module is opened, so the
// tests never see or touch the system's tokens. Without the module the end-to-end tests
// cannot run: under CI that is a failure, elsewhere a skip that says so.
func TestMain(m *testing.M) {
	os.Exit(testMain(m))
}

func testMain(m *testing.M) int {
	module, err := devenv.FindSoftHSM()
	if err == nil {
		if _, serr := os.Stat(module); serr != nil {
			err = fmt.Errorf("SoftHSMv2 module %s: %w", module, serr)
		}
	}
	if err != nil {
		if os.Getenv("CI") == "true" {
			fmt.Fprintf(os.Stderr, "FAIL: cmd/hsmbridge end-to-end tests need SoftHSMv2: %v\n", err)
			return 1
		}
		fmt.Printf("SKIP: cmd/hsmbridge end-to-end tests: %v\n", err)
		return 0
	}
	dir, err := os.MkdirTemp("", "hsmbridge-softhsm-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "softhsm dir:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	if _, err := devenv.UseSoftHSMDir(dir); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	softHSMDir = dir
	return m.Run()
}

func TestSoftHSMIsPrivate(t *testing.T) {
	conf := os.Getenv("SOFTHSM2_CONF")
	if softHSMDir == "" || filepath.Dir(conf) != softHSMDir {
		t.Fatalf("SOFTHSM2_CONF = %q, want a file in the private dir %q", conf, softHSMDir)
	}
	data, err := os.ReadFile(conf)
	if err != nil {
		t.Fatal(err)
	}
	if want := "directories.tokendir = " + filepath.Join(softHSMDir, "tokens") + "\n"; !strings.Contains(string(data), want) {
		t.Fatalf("%s does not say %q:\n%s", conf, want, data)
	}
}

// newEnv makes a fresh environment with a new token per cluster (default: two clusters),
// listening on a free loopback port. Its tokens are removed from the private token directory
// at cleanup, after any daemon the test started has stopped (cleanups run last-in first-out),
// so every later C_Initialize does not load the tokens of every earlier test.
func newEnv(t *testing.T, clusters ...string) *devenv.Env {
	t.Helper()
	tokenDir := filepath.Join(softHSMDir, "tokens")
	before := tokenDirs(t, tokenDir)
	env, err := devenv.Create(context.Background(), devenv.Options{Dir: t.TempDir(), Listen: "127.0.0.1:0", Clusters: clusters})
	if err != nil {
		t.Fatalf("devenv.Create: %v", err)
	}
	t.Cleanup(func() {
		for name := range tokenDirs(t, tokenDir) {
			if !before[name] {
				if err := os.RemoveAll(filepath.Join(tokenDir, name)); err != nil {
					t.Errorf("remove token: %v", err)
				}
			}
		}
	})
	return env
}

func tokenDirs(t *testing.T, dir string) map[string]bool {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	names := make(map[string]bool, len(entries))
	for _, e := range entries {
		names[e.Name()] = true
	}
	return names
}

// syncBuffer is a bytes.Buffer safe for the daemon's goroutines to write while a test reads.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// startDaemon runs the real daemon on env's configuration, as serve does, and returns its
// base URL and a stop func (also run at cleanup) that shuts it down and waits for it.
func startDaemon(t *testing.T, env *devenv.Env) (baseURL string, stop func()) {
	t.Helper()
	baseURL, stop, _ = startDaemonLogs(t, env)
	return baseURL, stop
}

// startDaemonLogs is startDaemon that also returns everything the daemon logged (JSON lines,
// debug level). The log is complete once stop has returned. A failed test prints it.
func startDaemonLogs(t *testing.T, env *devenv.Env) (baseURL string, stop func(), logs *syncBuffer) {
	t.Helper()
	logs = &syncBuffer{}
	log := slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	cfg, err := config.Load(env.ConfigPath)
	if err != nil {
		t.Fatalf("config.Load: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	d, err := openDaemon(ctx, cfg, log)
	if err != nil {
		cancel()
		t.Fatalf("openDaemon: %v\nlog:\n%s", err, logs)
	}
	ln, err := listen(cfg)
	if err != nil {
		cancel()
		t.Fatalf("listen: %v (close: %v)", err, d.close(context.Background()))
	}
	done := make(chan error, 1)
	go func() { done <- d.run(ctx, ln) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("daemon run returned: %v", err)
			}
		})
	}
	t.Cleanup(func() {
		stop()
		if t.Failed() {
			t.Logf("daemon log:\n%s", logs)
		}
	})
	return "http://" + ln.Addr().String(), stop, logs
}

// client has no deadline that a test relies on; the timeout only stops a hung test.
var client = &http.Client{Timeout: 2 * time.Minute}

// do sends one request; token "" sends no X-Auth-Token, body "" no body.
func do(t *testing.T, method, url, token, body string) (status int, header http.Header, respBody []byte) {
	t.Helper()
	var r io.Reader
	if body != "" {
		r = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, url, r)
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	if token != "" {
		req.Header.Set("X-Auth-Token", token)
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	respBody, err = io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: reading body: %v", method, url, err)
	}
	return resp.StatusCode, resp.Header, respBody
}

// readPIN returns the user PIN of env's tokens.
func readPIN(t *testing.T, env *devenv.Env) string {
	t.Helper()
	b, err := os.ReadFile(env.PINPath)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// withToken opens tok directly, as its own cluster (the daemon must be stopped), for fn.
func withToken(t *testing.T, env *devenv.Env, tok *devenv.Token, fn func(ctx context.Context, cl *hsm.Cluster)) {
	t.Helper()
	ctx := context.Background()
	cl, err := hsm.OpenCluster(ctx, hsm.ClusterConfig{
		ID: tok.ClusterID, ModulePath: env.Module, TokenSerial: tok.Serial, TokenLabel: tok.Label,
		PIN: readPIN(t, env), PoolSize: 1,
	})
	if err != nil {
		t.Fatalf("open token %s: %v", tok.Label, err)
	}
	defer func() {
		if err := cl.Close(ctx); err != nil {
			t.Errorf("close token %s: %v", tok.Label, err)
		}
	}()
	fn(ctx, cl)
}

// tokenData returns hsmbridge's data objects on tok (the daemon must be stopped).
func tokenData(t *testing.T, env *devenv.Env, tok *devenv.Token) []hsm.DataObject {
	t.Helper()
	var objs []hsm.DataObject
	withToken(t, env, tok, func(ctx context.Context, cl *hsm.Cluster) {
		var err error
		if objs, err = cl.DataObjects(ctx); err != nil {
			t.Fatalf("data objects on %s: %v", tok.Label, err)
		}
	})
	return objs
}

// storeRows opens env's database (the daemon must be stopped) and returns every row.
func storeRows(t *testing.T, env *devenv.Env) []store.Keystore {
	t.Helper()
	ctx := context.Background()
	st, err := store.OpenSQLite(ctx, filepath.Join(env.Dir, "hsmbridge.db"))
	if err != nil {
		t.Fatalf("open store: %v", err)
	}
	defer func() {
		if err := st.Close(); err != nil {
			t.Errorf("close store: %v", err)
		}
	}()
	rows, err := st.AllKeystores(ctx)
	if err != nil {
		t.Fatalf("AllKeystores: %v", err)
	}
	return rows
}
