package deploytest

// The daemon under test, built and run the way testdata/sdkclient does it: go build
// ../../cmd/hsmbridge, "dev init" into a temporary directory with a free port, "serve".

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

const (
	readyTimeout    = 20 * time.Second
	shutdownTimeout = 15 * time.Second
)

// softHSMPaths mirrors where "hsmbridge dev init" looks for the module
// (HSMBRIDGE_SOFTHSM_MODULE first).
var softHSMPaths = []string{
	"/usr/lib/softhsm/libsofthsm2.so",
	"/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
	"/usr/lib64/pkcs11/libsofthsm2.so",
	"/usr/local/lib/softhsm/libsofthsm2.so",
}

func findSoftHSM() error {
	if p := os.Getenv("HSMBRIDGE_SOFTHSM_MODULE"); p != "" {
		_, err := os.Stat(p)
		return err
	}
	for _, p := range softHSMPaths {
		if _, err := os.Stat(p); err == nil {
			return nil
		}
	}
	return fmt.Errorf("SoftHSMv2 module not found (looked in %s)", strings.Join(softHSMPaths, ", "))
}

var (
	buildOnce sync.Once
	binDir    string
	daemonBin string
	buildErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// buildDaemon builds the daemon once, for the tests that need it; HSMBRIDGE_BIN names an
// already built binary to use instead.
func buildDaemon(t *testing.T) string {
	t.Helper()
	if bin := os.Getenv("HSMBRIDGE_BIN"); bin != "" {
		return bin
	}
	buildOnce.Do(func() {
		if binDir, buildErr = os.MkdirTemp("", "hsmbridge-deploytest-bin-"); buildErr != nil {
			return
		}
		root, err := filepath.Abs(filepath.Join("..", ".."))
		if err != nil {
			buildErr = err
			return
		}
		daemonBin = filepath.Join(binDir, "hsmbridge")
		build := exec.Command("go", "build", "-o", daemonBin, "./cmd/hsmbridge")
		build.Dir = root
		if out, err := build.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build -o %s ./cmd/hsmbridge in %s: %v\n%s", daemonBin, root, err, out)
		}
	})
	if buildErr != nil {
		t.Fatalf("building the daemon: %v", buildErr)
	}
	return daemonBin
}

type daemon struct {
	api     string // http://127.0.0.1:PORT, the API listener
	metrics string // where /metrics is served: the API listener, or server.metrics_listen
	project string
	token   string
	caPEM   string
	out     *syncBuffer
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func readEnv(t *testing.T, name string) map[string]string {
	t.Helper()
	data, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	env := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		k, v, ok := strings.Cut(strings.TrimPrefix(strings.TrimSpace(sc.Text()), "export "), "=")
		if ok && k != "" && !strings.HasPrefix(k, "#") {
			env[k] = strings.Trim(v, `"'`)
		}
	}
	return env
}

// startDaemon creates a dev environment and serves it until the test ends. It asks for a
// separate metrics listener (server.metrics_listen, planned) and, if this daemon does
// not know the key yet, serves without it and scrapes the API listener instead.
func startDaemon(t *testing.T) *daemon {
	t.Helper()
	if err := findSoftHSM(); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("CI=true and %v", err)
		}
		t.Skipf("skipping the running-daemon test: %v (install softhsm2; under CI=true this fails)", err)
	}
	bin := buildDaemon(t)
	listen := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	dir := filepath.Join(t.TempDir(), "dev")
	if out, err := exec.Command(bin, "dev", "init", "--dir", dir, "--listen", listen).CombinedOutput(); err != nil {
		t.Fatalf("hsmbridge dev init: %v\n%s", err, out)
	}
	env := readEnv(t, filepath.Join(dir, "env"))
	ca, err := os.ReadFile(filepath.Join(dir, "ca.pem"))
	if err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(dir, "config.yaml")
	base, err := os.ReadFile(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(base, []byte("\nserver:")) {
		t.Fatalf("dev init's config now has a server: section; adapt startDaemon:\n%s", base)
	}
	metricsAddr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	withMetrics := append(bytes.Clone(base), fmt.Sprintf("server:\n  metrics_listen: %q\n", metricsAddr)...)

	d := &daemon{api: "http://" + listen, project: env["HSMBRIDGE_PROJECT"], token: env["HSMBRIDGE_TOKEN"], caPEM: string(ca)}
	for _, attempt := range []struct {
		config  []byte
		metrics string
	}{{withMetrics, "http://" + metricsAddr}, {base, d.api}} {
		if err := os.WriteFile(cfgPath, attempt.config, 0o600); err != nil {
			t.Fatal(err)
		}
		d.metrics, d.out = attempt.metrics, &syncBuffer{}
		exitErr, started := d.serve(t, bin, dir, cfgPath, env["SOFTHSM2_CONF"])
		if started {
			t.Logf("daemon up; metrics at %s", d.metrics)
			return d
		}
		if !strings.Contains(d.out.String(), `unknown key "metrics_listen"`) {
			t.Fatalf("daemon exited before becoming ready: %v\n%s", exitErr, d.out.String())
		}
		t.Log("this daemon has no server.metrics_listen yet: scraping the API listener")
	}
	t.Fatal("unreachable")
	return nil
}

// serve starts "hsmbridge serve" and waits for /readyz; started is false if the process
// exited first (its error is returned). Once started, the cleanup sends SIGTERM and
// requires exit status 0.
func (d *daemon) serve(t *testing.T, bin, dir, cfgPath, softhsmConf string) (exitErr error, started bool) {
	t.Helper()
	cmd := exec.Command(bin, "serve", "--config", cfgPath)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "SOFTHSM2_CONF="+softhsmConf)
	cmd.Stdout, cmd.Stderr = d.out, d.out
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting hsmbridge serve: %v", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	hc := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(readyTimeout)
	for {
		select {
		case err := <-exited:
			return err, false
		default:
		}
		if resp, err := hc.Get(d.metrics + "/readyz"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			<-exited
			t.Fatalf("daemon not ready within %v\n%s", readyTimeout, d.out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Cleanup(func() {
		if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Errorf("SIGTERM: %v", err)
		}
		select {
		case err := <-exited:
			if err != nil {
				t.Errorf("daemon did not exit cleanly after SIGTERM: %v", err)
			}
		case <-time.After(shutdownTimeout):
			_ = cmd.Process.Kill()
			<-exited
			t.Errorf("daemon did not exit within %v of SIGTERM; killed", shutdownTimeout)
		}
		if t.Failed() {
			t.Logf("daemon output:\n%s", d.out.String())
		}
	})
	return nil, true
}

// call POSTs (or GETs, with a nil body) an API request and decodes the answer into out.
func (d *daemon) call(t *testing.T, method, path string, body any, out any) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, d.api+"/v1.0/"+d.project+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("X-Auth-Token", d.token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := (&http.Client{Timeout: 15 * time.Second}).Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("%s %s: %d %s", method, path, resp.StatusCode, data)
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			t.Fatalf("%s %s: %v: %s", method, path, err, data)
		}
	}
}

// exercise creates and enables a keystore, creates an EC key in it and signs with it, so
// that every labelled series (HTTP routes, PKCS#11 functions, connection states) exists.
func (d *daemon) exercise(t *testing.T) {
	t.Helper()
	var ks struct {
		Keystore struct {
			ID string `json:"keystore_id"`
		} `json:"keystore"`
	}
	d.call(t, "POST", "/keystores", map[string]string{
		"keystore_alias": "deploytest", "hsm_cluster_id": "dhsm-cluster-1", "hsm_ca_cert": d.caPEM,
	}, &ks)
	d.call(t, "POST", "/keystores/"+ks.Keystore.ID+"/enable", nil, nil)
	var key struct {
		KeyInfo struct {
			ID string `json:"key_id"`
		} `json:"key_info"`
	}
	d.call(t, "POST", "/kms/create-key", map[string]string{
		"key_alias": "deploytest-ec", "key_spec": "EC_P256", "keystore_id": ks.Keystore.ID,
	}, &key)
	digest := sha256.Sum256([]byte("deploytest"))
	var sig struct {
		Signature string `json:"signature"`
	}
	d.call(t, "POST", "/kms/sign", map[string]string{
		"key_id": key.KeyInfo.ID, "message": base64.StdEncoding.EncodeToString(digest[:]),
		"signing_algorithm": "ECDSA_SHA_256",
	}, &sig)
	if sig.Signature == "" {
		t.Fatal("sign returned no signature")
	}
}

func (d *daemon) scrape(t *testing.T) string {
	t.Helper()
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Get(d.metrics + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s/metrics: %d %s", d.metrics, resp.StatusCode, data)
	}
	return string(data)
}

// TestConfigs_acceptedByDaemon runs "hsmbridge serve" on each example config (the unit's,
// and the one in the sidecar's ConfigMap) with the store moved to a temporary directory,
// and requires it to get past the config (decoded strictly: an unknown or misplaced key
// fails) and the store, and to stop at the first thing this machine lacks: the PIN.
func TestConfigs_acceptedByDaemon(t *testing.T) {
	_, s := loadSidecar(t)
	k8sCfg := s.configMap.Data["config.yaml"]
	unitCfg, err := os.ReadFile(filepath.Join(deployDir, "systemd", "config.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	bin := buildDaemon(t)
	for name, cfg := range map[string]string{"systemd/config.yaml": string(unitCfg), "kubernetes ConfigMap config.yaml": k8sCfg} {
		t.Run(strings.Fields(name)[0], func(t *testing.T) {
			dir := t.TempDir()
			const db = "/var/lib/hsmbridge/hsmbridge.db"
			if !strings.Contains(cfg, "path: "+db) {
				t.Fatalf("%s: store.path is not %s; adapt the test", name, db)
			}
			cfg = strings.Replace(cfg, "path: "+db, "path: "+filepath.Join(dir, "hsmbridge.db"), 1)
			p := filepath.Join(dir, "config.yaml")
			if err := os.WriteFile(p, []byte(cfg), 0o600); err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command(bin, "serve", "--config", p)
			cmd.Env = append(os.Environ(), "CREDENTIALS_DIRECTORY=")
			done := make(chan struct{})
			var out []byte
			go func() { out, _ = cmd.CombinedOutput(); close(done) }()
			select {
			case <-done:
			case <-time.After(20 * time.Second):
				_ = cmd.Process.Kill()
				<-done
				t.Fatalf("%s: hsmbridge serve did not stop at the missing PIN:\n%s", name, out)
			}
			if !strings.Contains(string(out), "reading PIN from") {
				t.Errorf("%s: hsmbridge serve should fail only for the PIN, which this machine lacks; it said:\n%s", name, out)
			}
		})
	}
}
