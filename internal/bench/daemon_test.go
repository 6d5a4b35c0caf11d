package bench

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"encoding/json"
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
	"syscall"
	"time"
)

// daemon is the real hsmbridge binary serving the fixture's environment, in its own process
// on the same token, with a keystore and three keys of its own made over HTTP.
type daemon struct {
	cmd     *exec.Cmd
	exited  chan error
	logPath string
	base    string // http://127.0.0.1:port
	project string

	keys          [3]string // by opKind
	digest, plain []byte
	// encryptResp is one real encrypt-data answer, which the bare handler imitates.
	encryptResp []byte
	requestID   string
}

// startDaemon builds and starts the daemon once; later calls return the same one.
func (f *fixture) startDaemon() (*daemon, error) {
	f.daemonOnce.Do(func() {
		f.daemon, f.daemonErr = f.launchDaemon()
		if f.daemonErr != nil && f.daemon != nil {
			f.daemonErr = errors.Join(f.daemonErr, f.daemon.stop(), fmt.Errorf("daemon log:\n%s", f.daemon.logTail()))
			f.daemon = nil
		}
	})
	return f.daemon, f.daemonErr
}

func goTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	return "go" // not on PATH: let exec report it
}

func (f *fixture) launchDaemon() (*daemon, error) {
	root, err := filepath.Abs(filepath.Join("..", "..")) // tests run in internal/bench
	if err != nil {
		return nil, err
	}
	bin := filepath.Join(f.dir, "hsmbridge")
	build := exec.Command(goTool(), "build", "-o", bin, "./cmd/hsmbridge")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("go build ./cmd/hsmbridge: %w\n%s", err, out)
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	f.env.Listen = "127.0.0.1:" + strconv.Itoa(port)
	if err := f.env.WriteConfig(); err != nil {
		return nil, err
	}
	d := &daemon{logPath: filepath.Join(f.dir, "daemon.log"), base: "http://" + f.env.Listen, project: f.env.ProjectID,
		exited: make(chan error, 1), digest: f.digest, plain: f.plain}
	logFile, err := os.Create(d.logPath)
	if err != nil {
		return nil, err
	}
	defer logFile.Close() // the child has its own descriptor
	d.cmd = exec.Command(bin, "serve", "--config", f.env.ConfigPath)
	d.cmd.Dir = f.dir
	d.cmd.Env = append(os.Environ(), "SOFTHSM2_CONF="+f.conf)
	// For experiments, e.g. HSMBRIDGE_BENCH_DAEMON_ENV="GOMAXPROCS=1 GOGC=400".
	d.cmd.Env = append(d.cmd.Env, strings.Fields(os.Getenv("HSMBRIDGE_BENCH_DAEMON_ENV"))...)
	d.cmd.Stdout, d.cmd.Stderr = logFile, logFile // the audit log goes to a file, as in production
	dieWithParent(d.cmd)
	if err := d.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start daemon: %w", err)
	}
	go func() { d.exited <- d.cmd.Wait() }()
	if err := d.waitHealthy(60 * time.Second); err != nil {
		return d, err
	}
	return d, d.provision(f)
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

func (d *daemon) waitHealthy(limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		select {
		case err := <-d.exited:
			d.exited <- err
			return fmt.Errorf("daemon exited during start-up: %v", err)
		default:
		}
		resp, err := http.Get(d.base + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("daemon not healthy after %s: %v", limit, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// call sends one set-up request and decodes a 200 answer into out.
func (d *daemon) call(token, path string, in, out any) ([]byte, http.Header, error) {
	body, err := json.Marshal(in)
	if err != nil {
		return nil, nil, err
	}
	req, err := http.NewRequest(http.MethodPost, d.base+"/v1.0/"+d.project+path, bytes.NewReader(body))
	if err != nil {
		return nil, nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("X-Auth-Token", token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, nil, fmt.Errorf("POST %s: status %d: %s", path, resp.StatusCode, b)
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			return nil, nil, fmt.Errorf("POST %s: %w: %s", path, err, b)
		}
	}
	return b, resp.Header, nil
}

// provision makes and enables a keystore on the cluster, creates the three keys, and checks
// that sign and encrypt-data answer.
func (d *daemon) provision(f *fixture) error {
	tok := f.env.AuthToken
	var ks struct {
		Keystore struct {
			KeystoreID string `json:"keystore_id"`
		} `json:"keystore"`
	}
	if _, _, err := d.call(tok, "/keystores", map[string]string{
		"keystore_alias": "bench", "hsm_cluster_id": f.tok.ClusterID, "hsm_ca_cert": f.env.CA.PEM(),
	}, &ks); err != nil {
		return err
	}
	if _, _, err := d.call(tok, "/keystores/"+ks.Keystore.KeystoreID+"/enable", map[string]string{}, nil); err != nil {
		return err
	}
	specs := [3][2]string{opECDSA: {"EC_P256", "SIGN_VERIFY"}, opRSA: {"RSA_2048", "SIGN_VERIFY"}, opAES: {"AES_256", "ENCRYPT_DECRYPT"}}
	for o, sp := range specs {
		var k struct {
			KeyInfo struct {
				KeyID string `json:"key_id"`
			} `json:"key_info"`
		}
		if _, _, err := d.call(tok, "/kms/create-key", map[string]string{
			"key_alias": "bench-" + strings.ToLower(sp[0]), "key_spec": sp[0], "key_usage": sp[1], "keystore_id": ks.Keystore.KeystoreID,
		}, &k); err != nil {
			return err
		}
		d.keys[o] = k.KeyInfo.KeyID
	}
	for _, o := range []opKind{opECDSA, opRSA} {
		var sig struct {
			Signature string `json:"signature"`
		}
		url, body := d.request(o)
		var in map[string]string
		_ = json.Unmarshal(body, &in)
		if _, _, err := d.call(tok, strings.TrimPrefix(url, d.base+"/v1.0/"+d.project), in, &sig); err != nil {
			return err
		}
		if b, err := base64.StdEncoding.DecodeString(sig.Signature); err != nil || len(b) == 0 {
			return fmt.Errorf("%s over HTTP: no signature in the answer", o)
		}
	}
	var enc struct {
		CipherText string `json:"cipher_text"`
	}
	_, body := d.request(opAES)
	var in map[string]string
	_ = json.Unmarshal(body, &in)
	resp, hdr, err := d.call(tok, "/kms/encrypt-data", in, &enc)
	if err != nil {
		return err
	}
	if b, err := base64.StdEncoding.DecodeString(enc.CipherText); err != nil || len(b) < len(f.plain)+16 {
		return fmt.Errorf("encrypt-data over HTTP: cipher_text too short or not base64")
	}
	d.encryptResp, d.requestID = resp, hdr.Get("X-Request-Id")
	return nil
}

// request returns the URL and the body of op o's API call.
func (d *daemon) request(o opKind) (string, []byte) {
	var in map[string]string
	path := "/kms/sign"
	switch o {
	case opECDSA:
		in = map[string]string{"key_id": d.keys[o], "message": base64.StdEncoding.EncodeToString(d.digest), "signing_algorithm": "ECDSA_SHA_256", "message_type": "DIGEST"}
	case opRSA:
		in = map[string]string{"key_id": d.keys[o], "message": base64.StdEncoding.EncodeToString(d.digest), "signing_algorithm": "RSASSA_PKCS1_V1_5_SHA_256", "message_type": "DIGEST"}
	default:
		path = "/kms/encrypt-data"
		in = map[string]string{"key_id": d.keys[o], "plain_text": string(d.plain), "encryption_algorithm": "SYMMETRIC_DEFAULT"}
	}
	b, _ := json.Marshal(in)
	return d.base + "/v1.0/" + d.project + path, b
}

func (d *daemon) pid() int { return d.cmd.Process.Pid }

// stop sends SIGTERM and waits for the daemon's graceful shutdown, killing it after 15 s.
func (d *daemon) stop() error {
	if d.cmd.Process == nil {
		return nil
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-d.exited:
		d.exited <- err
		var ee *exec.ExitError
		if errors.As(err, &ee) && ee.ExitCode() == -1 {
			return nil // already gone by signal
		}
		return err
	case <-time.After(15 * time.Second):
		_ = d.cmd.Process.Kill()
		return errors.New("daemon did not stop within 15 s; killed")
	}
}

func (d *daemon) logTail() string {
	b, _ := os.ReadFile(d.logPath)
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}

// The bare HTTP server is this test binary run again with bareEnv set: a process of its own,
// like the daemon, so the comparison with the daemon is process to process.
const (
	bareEnv      = "HSMBRIDGE_BENCH_BARE"         // file holding the response body
	bareRIDLen   = "HSMBRIDGE_BENCH_BARE_RID_LEN" // length of the X-Request-Id header to send
	bareListenOn = "listening "
)

type bareServer struct {
	cmd     *exec.Cmd
	stdin   io.Closer
	exited  chan error
	url     string
	reqBody []byte
}

// startBare starts the bare server once, answering with the daemon's encrypt-data response.
func (f *fixture) startBare() (*bareServer, error) {
	f.bareOnce.Do(func() {
		d, err := f.startDaemon()
		if err != nil {
			f.bareErr = err
			return
		}
		f.bare, f.bareErr = launchBare(f.dir, d)
	})
	return f.bare, f.bareErr
}

func launchBare(dir string, d *daemon) (*bareServer, error) {
	bodyPath := filepath.Join(dir, "bare-response.json")
	if err := os.WriteFile(bodyPath, d.encryptResp, 0o600); err != nil {
		return nil, err
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	b := &bareServer{exited: make(chan error, 1)}
	_, b.reqBody = d.request(opAES)
	b.cmd = exec.Command(exe)
	b.cmd.Env = append(os.Environ(), bareEnv+"="+bodyPath, bareRIDLen+"="+strconv.Itoa(len(d.requestID)))
	b.cmd.Stderr = os.Stderr
	stdin, err := b.cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	b.stdin = stdin
	stdout, err := b.cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	dieWithParent(b.cmd)
	if err := b.cmd.Start(); err != nil {
		return nil, err
	}
	line, err := bufio.NewReader(stdout).ReadString('\n')
	addr, ok := strings.CutPrefix(strings.TrimSpace(line), bareListenOn)
	if err != nil || !ok {
		b.stop()
		return nil, fmt.Errorf("bare server did not start: %q %v", line, err)
	}
	go func() { b.exited <- b.cmd.Wait() }()
	b.url = "http://" + addr + "/bare"
	return b, nil
}

func (b *bareServer) pid() int { return b.cmd.Process.Pid }

func (b *bareServer) stop() {
	_ = b.stdin.Close() // the server exits when its stdin closes
	select {
	case <-b.exited:
	case <-time.After(5 * time.Second):
		_ = b.cmd.Process.Kill()
	}
}

// serveBare is the bare server's main: it answers every request with the body in file,
// after reading the request body, with the daemon's Content-Type and a request id of the
// daemon's length, so the response is the same size. It never touches the HSM.
func serveBare(file string) int {
	body, err := os.ReadFile(file)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bare:", err)
		return 1
	}
	n, _ := strconv.Atoi(os.Getenv(bareRIDLen))
	rid := strings.Repeat("0", n)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, "bare:", err)
		return 1
	}
	go func() { _, _ = io.Copy(io.Discard, os.Stdin); os.Exit(0) }()
	fmt.Printf("%s%s\n", bareListenOn, ln.Addr())
	err = http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		h := w.Header()
		h.Set("Content-Type", "application/json;charset=UTF-8")
		h.Set("X-Request-Id", rid)
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write(body)
	}))
	fmt.Fprintln(os.Stderr, "bare:", err)
	return 1
}
