package sdkclient

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/huaweicloud/huaweicloud-sdk-go-v3/core/auth/basic"
	"github.com/huaweicloud/huaweicloud-sdk-go-v3/core/config"
	"github.com/huaweicloud/huaweicloud-sdk-go-v3/core/sdkerr"
	kms "github.com/huaweicloud/huaweicloud-sdk-go-v3/services/kms/v2"
	"github.com/huaweicloud/huaweicloud-sdk-go-v3/services/kms/v2/model"
)

const (
	cluster1 = "dhsm-cluster-1"
	cluster2 = "dhsm-cluster-2"

	readyTimeout    = 20 * time.Second
	readyPoll       = 50 * time.Millisecond
	shutdownTimeout = 15 * time.Second
)

// softHSMPaths mirrors where "hsmbridge dev init" looks for the module
// (HSMBRIDGE_SOFTHSM_MODULE first). Kept as a copy: this module is black box.
var softHSMPaths = []string{
	"/usr/lib/softhsm/libsofthsm2.so",
	"/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
	"/usr/lib64/pkcs11/libsofthsm2.so",
	"/usr/local/lib/softhsm/libsofthsm2.so",
}

var (
	// daemonBin is the hsmbridge binary built by TestMain.
	daemonBin string
	// skipReason is set when the environment cannot run the daemon (no SoftHSM)
	// and we are not under CI.
	skipReason string
)

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	if _, err := findSoftHSM(); err != nil {
		if os.Getenv("CI") == "true" {
			fmt.Fprintf(os.Stderr, "FAIL: CI=true and %v\n", err)
			return 1
		}
		skipReason = fmt.Sprintf("skipping SDK end-to-end tests: %v (install softhsm2; under CI=true this is a failure)", err)
		return m.Run()
	}

	tmp, err := os.MkdirTemp("", "hsmbridge-sdktest-bin-")
	if err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: %v\n", err)
		return 1
	}
	defer os.RemoveAll(tmp)

	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: %v\n", err)
		return 1
	}
	daemonBin = filepath.Join(tmp, "hsmbridge")
	build := exec.Command("go", "build", "-o", daemonBin, "./cmd/hsmbridge")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: building the daemon (go build -o %s ./cmd/hsmbridge in %s): %v\n%s\n",
			daemonBin, root, err, out)
		return 1
	}
	return m.Run()
}

func findSoftHSM() (string, error) {
	if p := os.Getenv("HSMBRIDGE_SOFTHSM_MODULE"); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("SoftHSMv2 module HSMBRIDGE_SOFTHSM_MODULE=%s: %v", p, err)
		}
		return p, nil
	}
	for _, p := range softHSMPaths {
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("SoftHSMv2 module not found (looked in %s)", strings.Join(softHSMPaths, ", "))
}

// ---------------------------------------------------------------------------
// The daemon under test.

// daemon is one running "hsmbridge serve" with its own dev environment.
type daemon struct {
	endpoint string // http://127.0.0.1:PORT
	dir      string // the dev init directory
	project  string
	token    string
	ak, sk   string // the dev AK/SK credential
	domain   string
	caPEM    string
	stderr   *syncBuffer
}

// syncBuffer is a bytes.Buffer safe for the exec copy goroutine and the test.
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

func freeLoopbackPort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("picking a free port: %v", err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	if err := l.Close(); err != nil {
		t.Fatalf("closing the port probe: %v", err)
	}
	return port
}

// readEnvFile parses the "export K=V" lines of DIR/env.
func readEnvFile(t *testing.T, path string) map[string]string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("reading %s: %v", path, err)
	}
	env := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		line = strings.TrimPrefix(line, "export ")
		k, v, ok := strings.Cut(line, "=")
		if !ok || k == "" || strings.HasPrefix(k, "#") {
			continue
		}
		env[k] = strings.Trim(v, `"'`)
	}
	return env
}

// readDomainID takes domain_id from DIR/tokens.yaml (the first one; dev init
// writes a single token).
func readDomainID(t *testing.T, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("reading %s: %v", path, err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(line), "- "))
		if v, ok := strings.CutPrefix(line, "domain_id:"); ok {
			return strings.Trim(strings.TrimSpace(v), `"'`)
		}
	}
	t.Fatalf("no domain_id in %s:\n%s", path, data)
	return ""
}

// startDaemon creates a fresh dev environment and serves it; the cleanup sends
// SIGTERM and requires exit status 0. On any failure of the test the daemon's
// stderr is printed.
func startDaemon(t *testing.T) *daemon {
	t.Helper()
	if skipReason != "" {
		t.Skip(skipReason)
	}
	port := freeLoopbackPort(t)
	listen := fmt.Sprintf("127.0.0.1:%d", port)
	dir := filepath.Join(t.TempDir(), "dev") // must not exist yet

	initCmd := exec.Command(daemonBin, "dev", "init", "--dir", dir, "--listen", listen)
	if out, err := initCmd.CombinedOutput(); err != nil {
		t.Fatalf("hsmbridge dev init --dir %s --listen %s: %v\n%s", dir, listen, err, out)
	}

	env := readEnvFile(t, filepath.Join(dir, "env"))
	for _, k := range []string{"SOFTHSM2_CONF", "HSMBRIDGE_TOKEN", "HSMBRIDGE_PROJECT", "HSMBRIDGE_AK", "HSMBRIDGE_SK"} {
		if env[k] == "" {
			t.Fatalf("%s/env has no %s: %v", dir, k, env)
		}
	}
	ca, err := os.ReadFile(filepath.Join(dir, "ca.pem"))
	if err != nil {
		t.Fatalf("reading ca.pem: %v", err)
	}
	d := &daemon{
		endpoint: "http://" + listen,
		dir:      dir,
		project:  env["HSMBRIDGE_PROJECT"],
		token:    env["HSMBRIDGE_TOKEN"],
		ak:       env["HSMBRIDGE_AK"],
		sk:       env["HSMBRIDGE_SK"],
		domain:   readDomainID(t, filepath.Join(dir, "tokens.yaml")),
		caPEM:    string(ca),
		stderr:   &syncBuffer{},
	}
	if tok, err := os.ReadFile(filepath.Join(dir, "auth-token")); err == nil {
		if s := strings.TrimSpace(string(tok)); s != d.token {
			t.Fatalf("auth-token file (%q) and HSMBRIDGE_TOKEN in env (%q) differ", s, d.token)
		}
	}

	cmd := exec.Command(daemonBin, "serve", "--config", filepath.Join(dir, "config.yaml"))
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "SOFTHSM2_CONF="+env["SOFTHSM2_CONF"])
	cmd.Stdout = d.stderr
	cmd.Stderr = d.stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting hsmbridge serve: %v", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Errorf("sending SIGTERM to the daemon: %v", err)
		}
		select {
		case err := <-exited:
			if err != nil {
				t.Errorf("daemon did not exit cleanly after SIGTERM: %v (want exit status 0)", err)
			}
		case <-time.After(shutdownTimeout):
			_ = cmd.Process.Kill()
			<-exited
			t.Errorf("daemon did not exit within %v of SIGTERM; killed", shutdownTimeout)
		}
	}
	t.Cleanup(func() {
		stop()
		if t.Failed() {
			t.Logf("daemon output (%s):\n%s", dir, d.stderr.String())
		}
	})

	// Wait for /readyz.
	hc := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(readyTimeout)
	var last string
	for {
		select {
		case err := <-exited:
			stopped = true
			t.Fatalf("daemon exited before becoming ready: %v\n%s", err, d.stderr.String())
		default:
		}
		resp, err := hc.Get(d.endpoint + "/readyz")
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
			last = fmt.Sprintf("status %d: %s", resp.StatusCode, body)
		} else {
			last = err.Error()
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon not ready within %v (last /readyz: %s)", readyTimeout, last)
		}
		time.Sleep(readyPoll)
	}
	return d
}

// ---------------------------------------------------------------------------
// The SDK client.

// exchange is the last HTTP exchange a client made, for diagnostics.
type exchange struct {
	method, url string
	status      int
	requestID   string
	body        string
}

// tokenRoundTripper adds X-Auth-Token after the SDK signed the request
// (sdk-client.md §6: a RoundTripper's header is unsigned) and records the
// last response body so a decode failure can show what the daemon sent.
type tokenRoundTripper struct {
	token string
	next  http.RoundTripper

	mu   sync.Mutex
	last exchange
}

func (rt *tokenRoundTripper) RoundTrip(req *http.Request) (*http.Response, error) {
	r := req.Clone(req.Context())
	if rt.token != "" { // token-only: the request is authenticated by the token alone
		r.Header.Set("X-Auth-Token", rt.token)
		r.Header.Del("Authorization")
	}
	resp, err := rt.next.RoundTrip(r)
	if err != nil {
		return resp, err
	}
	body, rerr := io.ReadAll(resp.Body)
	resp.Body.Close()
	resp.Body = io.NopCloser(bytes.NewReader(body))
	rt.mu.Lock()
	rt.last = exchange{
		method:    r.Method,
		url:       r.URL.String(),
		status:    resp.StatusCode,
		requestID: resp.Header.Get("X-Request-Id"),
		body:      string(body),
	}
	rt.mu.Unlock()
	return resp, rerr
}

func (rt *tokenRoundTripper) lastExchange() string {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	e := rt.last
	return fmt.Sprintf("%s %s -> %d (X-Request-Id %q) body: %s", e.method, e.url, e.status, e.requestID, e.body)
}

type sdkClient struct {
	*kms.KmsClient
	rt *tokenRoundTripper
}

// newClient builds the client exactly as sdk-client.md §2 describes, with the
// token added unsigned by a RoundTripper, and dummy AK/SK that sign nothing the daemon
// checks (an X-Auth-Token request carries no Authorization header after the RoundTripper
// strips it).
func newClient(t *testing.T, d *daemon, token string) *sdkClient {
	return buildClient(t, d, "dummy-ak-0000000000", "dummy-sk", token)
}

// newAKSKClient is the SDK as its users run it: an endpoint, an AK/SK and a project id,
// nothing injected.
func newAKSKClient(t *testing.T, d *daemon, ak, sk string) *sdkClient {
	return buildClient(t, d, ak, sk, "")
}

func buildClient(t *testing.T, d *daemon, ak, sk, token string) *sdkClient {
	t.Helper()
	cred, err := basic.NewCredentialsBuilder().
		WithAk(ak).
		WithSk(sk).
		WithProjectId(d.project).
		SafeBuild()
	if err != nil {
		t.Fatalf("building credentials: %v", err)
	}
	rt := &tokenRoundTripper{token: token, next: http.DefaultTransport.(*http.Transport).Clone()}
	hc := config.DefaultHttpConfig().
		WithTimeout(15 * time.Second).
		WithUserAgent("hsmbridge-sdktest/1").
		WithHttpRoundTripper(rt)
	hcc, err := kms.KmsClientBuilder().
		WithEndpoints([]string{d.endpoint}).
		WithCredential(cred).
		WithHttpConfig(hc).
		SafeBuild()
	if err != nil {
		t.Fatalf("building the KMS client: %v", err)
	}
	return &sdkClient{KmsClient: kms.NewKmsClient(hcc), rt: rt}
}

// describeErr renders an SDK error with every ServiceResponseError field and
// the raw response the daemon sent.
func (c *sdkClient) describeErr(err error) string {
	var sre *sdkerr.ServiceResponseError
	if errors.As(err, &sre) {
		hint := ""
		if sre.StatusCode < 400 {
			hint = " (status < 400: the SDK could not decode the body into its model; a JSON type mismatch)"
		}
		return fmt.Sprintf("ServiceResponseError{StatusCode:%d ErrorCode:%q ErrorMessage:%q RequestId:%q}%s\n  last exchange: %s",
			sre.StatusCode, sre.ErrorCode, sre.ErrorMessage, sre.RequestId, hint, c.rt.lastExchange())
	}
	return fmt.Sprintf("%T: %v\n  last exchange: %s", err, err, c.rt.lastExchange())
}

// ok fails the test if a success-path call returned an error.
func (c *sdkClient) ok(t *testing.T, op string, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: want success, got %s", op, c.describeErr(err))
	}
}

// wantError checks that err is a ServiceResponseError with the given status
// and error code and a request id.
func (c *sdkClient) wantError(t *testing.T, op string, err error, status int, code string) {
	t.Helper()
	if err == nil {
		t.Fatalf("%s: want %d %s, got success\n  last exchange: %s", op, status, code, c.rt.lastExchange())
	}
	var sre *sdkerr.ServiceResponseError
	if !errors.As(err, &sre) {
		t.Fatalf("%s: want *sdkerr.ServiceResponseError, got %s", op, c.describeErr(err))
	}
	if sre.StatusCode != status || sre.ErrorCode != code {
		t.Fatalf("%s: want %d %s, got %s", op, status, code, c.describeErr(err))
	}
	if sre.RequestId == "" {
		t.Errorf("%s: ServiceResponseError.RequestId is empty (X-Request-Id missing)\n  last exchange: %s", op, c.rt.lastExchange())
	}
	if sre.ErrorMessage == "" {
		t.Errorf("%s: ServiceResponseError.ErrorMessage is empty", op)
	}
}

func str(p *string) string {
	if p == nil {
		return "<nil>"
	}
	return *p
}

func ptr[T any](v T) *T { return &v }

func createReq(alias, cluster, ca string) *model.CreateKeyStoreRequest {
	dhsm := model.GetCreateKeyStoreRequestBodyKeystoreTypeEnum().DHSM
	return &model.CreateKeyStoreRequest{Body: &model.CreateKeyStoreRequestBody{
		KeystoreAlias: alias,
		HsmClusterId:  ptr(cluster),
		HsmCaCert:     ptr(ca),
		ClusterId:     ptr(cluster),
		KeystoreType:  &dhsm,
	}}
}

// create makes a keystore and checks the response shape; it returns the id.
func (c *sdkClient) create(t *testing.T, d *daemon, alias, cluster string) string {
	t.Helper()
	resp, err := c.CreateKeyStore(createReq(alias, cluster, d.caPEM))
	c.ok(t, "CreateKeyStore("+alias+", "+cluster+")", err)
	if resp.Keystore == nil || resp.Keystore.KeystoreId == nil || *resp.Keystore.KeystoreId == "" {
		t.Fatalf("CreateKeyStore: no keystore.keystore_id in %s\n  last exchange: %s", resp, c.rt.lastExchange())
	}
	if got := str(resp.Keystore.DomainId); got != d.domain {
		t.Errorf("CreateKeyStore: domain_id = %q, want %q (tokens.yaml)", got, d.domain)
	}
	return *resp.Keystore.KeystoreId
}

// ---------------------------------------------------------------------------
// Tests.

func TestKeystoreLifecycle_SDK(t *testing.T) {
	d := startDaemon(t)
	c := newAKSKClient(t, d, d.ak, d.sk)
	const alias = "sdk-lifecycle-01"

	start := time.Now()
	id := c.create(t, d, alias, cluster1)

	// Show: every field decodes and has the expected value.
	show, err := c.ShowKeyStore(&model.ShowKeyStoreRequest{KeystoreId: id})
	c.ok(t, "ShowKeyStore", err)
	if show.Keystore == nil {
		t.Fatalf("ShowKeyStore: no keystore object\n  last exchange: %s", c.rt.lastExchange())
	}
	ks := show.Keystore
	checks := []struct{ field, got, want string }{
		{"keystore_id", str(ks.KeystoreId), id},
		{"domain_id", str(ks.DomainId), d.domain},
		{"keystore_alias", str(ks.KeystoreAlias), alias},
		{"keystore_type", str(ks.KeystoreType), "DHSM"},
		{"hsm_cluster_id", str(ks.HsmClusterId), cluster1},
		{"cluster_id", str(ks.ClusterId), cluster1},
	}
	for _, ch := range checks {
		if ch.got != ch.want {
			t.Errorf("ShowKeyStore: %s = %q, want %q", ch.field, ch.got, ch.want)
		}
	}
	if ks.CreateTime == nil {
		t.Errorf("ShowKeyStore: create_time missing")
	} else if ms, err := strconv.ParseInt(*ks.CreateTime, 10, 64); err != nil {
		t.Errorf("ShowKeyStore: create_time %q is not an integer (epoch ms): %v", *ks.CreateTime, err)
	} else if ct := time.UnixMilli(ms); ct.Before(start.Add(-time.Minute)) || ct.After(time.Now().Add(time.Minute)) {
		t.Errorf("ShowKeyStore: create_time %q = %v, not within a minute of now (%v)", *ks.CreateTime, ct.UTC(), start.UTC())
	}
	if t.Failed() {
		t.Logf("last exchange: %s", c.rt.lastExchange())
	}

	// List.
	list, err := c.ListKeyStores(&model.ListKeyStoresRequest{Limit: ptr(int32(10)), Offset: ptr(int32(0))})
	c.ok(t, "ListKeyStores", err)
	if list.Total == nil || *list.Total != 1 {
		t.Errorf("ListKeyStores: total = %v, want 1\n  last exchange: %s", list.Total, c.rt.lastExchange())
	}
	if list.Keystores == nil || len(*list.Keystores) != 1 || str((*list.Keystores)[0].KeystoreId) != id {
		t.Errorf("ListKeyStores: want exactly keystore %s, got %s", id, list)
	} else if got := (*list.Keystores)[0]; str(got.KeystoreAlias) != alias || str(got.HsmClusterId) != cluster1 || got.CreateTime == nil {
		t.Errorf("ListKeyStores: entry %s does not match the keystore", got)
	}

	// Enable.
	en, err := c.EnableKeyStore(&model.EnableKeyStoreRequest{KeystoreId: id})
	c.ok(t, "EnableKeyStore", err)
	if en.Keystore == nil || str(en.Keystore.KeystoreState) != "ENABLED" || str(en.Keystore.KeystoreId) != id {
		t.Errorf("EnableKeyStore: want {keystore_id:%s keystore_state:ENABLED}, got %s", id, en)
	}

	// Delete while enabled is refused.
	_, err = c.DeleteKeyStore(&model.DeleteKeyStoreRequest{KeystoreId: id})
	c.wantError(t, "DeleteKeyStore (enabled)", err, 400, "KMS.8008")

	// Disable.
	dis, err := c.DisableKeyStore(&model.DisableKeyStoreRequest{KeystoreId: id})
	c.ok(t, "DisableKeyStore", err)
	if dis.Keystore == nil || str(dis.Keystore.KeystoreState) != "DISABLED" || str(dis.Keystore.KeystoreId) != id {
		t.Errorf("DisableKeyStore: want {keystore_id:%s keystore_state:DISABLED}, got %s", id, dis)
	}

	// Delete.
	del, err := c.DeleteKeyStore(&model.DeleteKeyStoreRequest{KeystoreId: id})
	c.ok(t, "DeleteKeyStore", err)
	if del.HttpStatusCode != http.StatusOK {
		t.Errorf("DeleteKeyStore: HTTP %d, want 200", del.HttpStatusCode)
	}

	// Gone.
	_, err = c.ShowKeyStore(&model.ShowKeyStoreRequest{KeystoreId: id})
	c.wantError(t, "ShowKeyStore (deleted)", err, 400, "KMS.8003")

	list, err = c.ListKeyStores(&model.ListKeyStoresRequest{Limit: ptr(int32(10)), Offset: ptr(int32(0))})
	c.ok(t, "ListKeyStores (after delete)", err)
	if list.Total == nil || *list.Total != 0 {
		t.Errorf("ListKeyStores after delete: total = %v, want 0\n  last exchange: %s", list.Total, c.rt.lastExchange())
	}

	// The cluster is free again; the alias too. A byte-identical create within the second
	// of the first would be refused as a replay of a call that succeeded (the SDK's
	// X-Sdk-Date has one-second resolution), so this one differs in its keystore_type.
	req := createReq(alias, cluster1, d.caPEM)
	req.Body.KeystoreType = nil
	resp, err := c.CreateKeyStore(req)
	c.ok(t, "CreateKeyStore (again)", err)
	id2 := str(resp.Keystore.KeystoreId)
	if id2 == id {
		t.Errorf("re-created keystore reuses the deleted id %s", id)
	}
	show, err = c.ShowKeyStore(&model.ShowKeyStoreRequest{KeystoreId: id2})
	c.ok(t, "ShowKeyStore (re-created)", err)
	if show.Keystore == nil || str(show.Keystore.HsmClusterId) != cluster1 {
		t.Errorf("ShowKeyStore (re-created): got %s", show)
	}
}

func TestKeystoreErrors_SDK(t *testing.T) {
	d := startDaemon(t)
	c := newClient(t, d, d.token)

	c.create(t, d, "sdk-errors-01", cluster2)

	t.Run("cluster already bound", func(t *testing.T) {
		_, err := c.CreateKeyStore(createReq("sdk-errors-02", cluster2, d.caPEM))
		c.wantError(t, "CreateKeyStore (cluster 2 again)", err, 400, "KMS.8005")
	})

	t.Run("duplicate alias", func(t *testing.T) {
		// cluster 1 is free, so only the alias conflicts.
		_, err := c.CreateKeyStore(createReq("sdk-errors-01", cluster1, d.caPEM))
		c.wantError(t, "CreateKeyStore (duplicate alias)", err, 400, "KMS.8002")
	})

	t.Run("unknown keystore", func(t *testing.T) {
		_, err := c.ShowKeyStore(&model.ShowKeyStoreRequest{KeystoreId: "00000000-0000-0000-0000-000000000000"})
		c.wantError(t, "ShowKeyStore (unknown id)", err, 400, "KMS.8003")
	})

	t.Run("wrong secret key", func(t *testing.T) {
		bad := newAKSKClient(t, d, d.ak, "not-the-secret-key")
		_, err := bad.ListKeyStores(&model.ListKeyStoresRequest{Limit: ptr(int32(10)), Offset: ptr(int32(0))})
		bad.wantError(t, "ListKeyStores (wrong SK)", err, 401, "APIGW.0301")
	})

	t.Run("token instead of AK/SK", func(t *testing.T) {
		tc := newClient(t, d, d.token)
		_, err := tc.ListKeyStores(&model.ListKeyStoresRequest{Limit: ptr(int32(10)), Offset: ptr(int32(0))})
		tc.ok(t, "ListKeyStores (X-Auth-Token)", err)
	})

	t.Run("wrong token", func(t *testing.T) {
		bad := newClient(t, d, "not-the-token-"+strings.Repeat("0", 34))
		_, err := bad.ListKeyStores(&model.ListKeyStoresRequest{Limit: ptr(int32(10)), Offset: ptr(int32(0))})
		bad.wantError(t, "ListKeyStores (wrong token)", err, 401, "APIGW.0301")
		_, err = bad.CreateKeyStore(createReq("sdk-errors-03", cluster1, d.caPEM))
		bad.wantError(t, "CreateKeyStore (wrong token)", err, 401, "APIGW.0301")
	})

	// Nothing above changed the state: one keystore, on cluster 2.
	list, err := c.ListKeyStores(&model.ListKeyStoresRequest{Limit: ptr(int32(10)), Offset: ptr(int32(0))})
	c.ok(t, "ListKeyStores", err)
	if list.Total == nil || *list.Total != 1 || list.Keystores == nil || len(*list.Keystores) != 1 ||
		str((*list.Keystores)[0].HsmClusterId) != cluster2 {
		t.Errorf("ListKeyStores: want exactly the cluster-2 keystore, got %s", list)
	}
}
