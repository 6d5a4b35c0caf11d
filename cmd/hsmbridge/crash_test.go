package main

// The crash test: the real binary, killed with SIGKILL at points a seeded random schedule
// picks while a stream of keystore creates, enables, deletes, key creations and scheduled
// deletions runs against it, and restarted each time on the same configuration. After the
// last restart the store and the tokens must agree — start-up repair leaves nothing half-made
// and loses nothing that was answered 200.
//
// HSMBRIDGE_CRASH_SEED replays a schedule; the seed used is always logged.

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hsmbridge/hsmbridge/hsm"
	"github.com/hsmbridge/hsmbridge/internal/devenv"
	"github.com/hsmbridge/hsmbridge/keystore/store"
)

const (
	crashKills   = 16
	crashWorkers = 3
)

var keyIDPattern = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)

// buildDaemon builds the hsmbridge binary into a temporary directory.
func buildDaemon(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "hsmbridge")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

func freeLoopbackPort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// proc is one run of the daemon binary.
type proc struct {
	cmd    *exec.Cmd
	out    *syncBuffer
	exited chan error
}

// startProc runs `hsmbridge serve` on env and waits until /healthz answers.
func startProc(t *testing.T, bin string, env *devenv.Env, base string) *proc {
	t.Helper()
	p := &proc{out: &syncBuffer{}, exited: make(chan error, 1)}
	p.cmd = exec.Command(bin, "serve", "--config", env.ConfigPath)
	p.cmd.Dir = env.Dir
	p.cmd.Env = os.Environ() // SOFTHSM2_CONF: this test binary's private token directory
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start daemon: %v", err)
	}
	go func() { p.exited <- p.cmd.Wait() }()
	hc := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case err := <-p.exited:
			t.Fatalf("daemon exited before serving: %v\n%s", err, p.out)
		default:
		}
		if resp, err := hc.Get(base + "/healthz"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return p
			}
		}
		if time.Now().After(deadline) {
			_ = p.cmd.Process.Kill()
			t.Fatalf("daemon not serving within 30s:\n%s", p.out)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (p *proc) kill() {
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.exited
}

// stop sends SIGTERM and requires a clean exit.
func (p *proc) stop(t *testing.T) {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Errorf("SIGTERM: %v", err)
	}
	select {
	case err := <-p.exited:
		if err != nil {
			t.Errorf("daemon exit after SIGTERM: %v\n%s", err, p.out)
		}
	case <-time.After(30 * time.Second):
		p.kill()
		t.Errorf("daemon did not exit within 30s of SIGTERM")
	}
}

// crashModel is what the client was told: only 200 answers count. A request whose answer
// never came (the daemon was killed under it) may or may not have taken effect.
type crashModel struct {
	mu        sync.Mutex
	keystores map[string]*crashKeystore // answered 200 on create
	keys      map[string]string         // key id → keystore id, answered 200 on create
	mayBeGone map[string]bool           // keystores whose delete was sent but not answered, or answered 200
	seq       int
	answered  map[string]int // "call status" → count, for the log
}

type crashKeystore struct {
	confirmed bool // its create was answered 200 (not only found listed after a restart)
	cluster   string
	enabled   bool
	keys      bool // a key create was sent to it (answered or not): never delete it
	busy      bool // a worker is changing it
}

func (m *crashModel) note(call string, status int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.answered[fmt.Sprintf("%s %d", call, status)]++
}

// crashClient sends the stream's requests.
type crashClient struct {
	base, token, project string
	hc                   *http.Client
}

// send posts (or deletes) and returns the status and body; ok is false when no answer came.
func (c *crashClient) send(method, path string, body any) (status int, resp map[string]any, ok bool) {
	var r io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		r = strings.NewReader(string(b))
	}
	req, err := http.NewRequest(method, c.base+"/v1.0/"+c.project+path, r)
	if err != nil {
		panic(err)
	}
	req.Header.Set("X-Auth-Token", c.token)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	res, err := c.hc.Do(req)
	if err != nil {
		return 0, nil, false
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		return 0, nil, false
	}
	_ = json.Unmarshal(b, &resp)
	return res.StatusCode, resp, true
}

// step runs one random operation of the stream. It returns false when the daemon did not
// answer (it is being killed).
func step(t *testing.T, rng *rand.Rand, c *crashClient, m *crashModel, env *devenv.Env) bool {
	m.mu.Lock()
	var ids []string
	for id := range m.keystores {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	m.seq++
	n := m.seq
	m.mu.Unlock()

	pick := func(cond func(*crashKeystore) bool) (string, *crashKeystore) {
		m.mu.Lock()
		defer m.mu.Unlock()
		var cands []string
		for _, id := range ids {
			if k := m.keystores[id]; k != nil && !k.busy && !m.mayBeGone[id] && cond(k) {
				cands = append(cands, id)
			}
		}
		if len(cands) == 0 {
			return "", nil
		}
		id := cands[rng.IntN(len(cands))]
		m.keystores[id].busy = true
		return id, m.keystores[id]
	}
	done := func(k *crashKeystore) { m.mu.Lock(); k.busy = false; m.mu.Unlock() }

	switch r := rng.IntN(10); {
	case r < 2: // bind a keystore to a random cluster (KMS.8005 when it is taken)
		tok := env.Tokens[rng.IntN(len(env.Tokens))]
		st, resp, ok := c.send(http.MethodPost, "/keystores", goodFields(env, tok, fmt.Sprintf("ks-%d-%s", n, devenv.RandomHex(3))))
		if !ok {
			return false
		}
		m.note("create-keystore", st)
		if st == http.StatusOK {
			ks, _ := resp["keystore"].(map[string]any)
			id, _ := ks["keystore_id"].(string)
			m.mu.Lock()
			m.keystores[id] = &crashKeystore{confirmed: true, cluster: tok.ClusterID}
			m.mu.Unlock()
		}
	case r < 4: // enable one
		id, k := pick(func(k *crashKeystore) bool { return !k.enabled })
		if k == nil {
			return true
		}
		defer done(k)
		st, _, ok := c.send(http.MethodPost, "/keystores/"+id+"/enable", nil)
		if !ok {
			return false
		}
		m.note("enable-keystore", st)
		if st == http.StatusOK {
			m.mu.Lock()
			k.enabled = true
			m.mu.Unlock()
		}
	case r < 8: // create a key in an enabled keystore, on the clusters kept for keys
		id, k := pick(func(k *crashKeystore) bool { return k.enabled && k.cluster != "c3" })
		if k == nil {
			return true
		}
		defer done(k)
		m.mu.Lock()
		k.keys = true
		m.mu.Unlock()
		spec := []string{"AES_256", "EC_P256", "AES_256", "EC_P256", "RSA_2048"}[rng.IntN(5)]
		body := map[string]any{"key_alias": fmt.Sprintf("k-%d-%s", n, devenv.RandomHex(3)), "keystore_id": id, "key_spec": spec}
		if rng.IntN(2) == 0 {
			body["sequence"] = devenv.RandomHex(18)
		}
		st, resp, ok := c.send(http.MethodPost, "/kms/create-key", body)
		if !ok {
			return false
		}
		m.note("create-key", st)
		if st == http.StatusOK {
			info, _ := resp["key_info"].(map[string]any)
			kid, _ := info["key_id"].(string)
			m.mu.Lock()
			m.keys[kid] = id
			m.mu.Unlock()
		}
	case r < 9: // schedule a known key's deletion (it stays on the token for 7 days)
		m.mu.Lock()
		var kids []string
		for kid := range m.keys {
			kids = append(kids, kid)
		}
		m.mu.Unlock()
		if len(kids) == 0 {
			return true
		}
		slices.Sort(kids)
		st, _, ok := c.send(http.MethodPost, "/kms/schedule-key-deletion", map[string]any{"key_id": kids[rng.IntN(len(kids))], "pending_days": "7"})
		if !ok {
			return false
		}
		m.note("schedule-key-deletion", st)
	default: // disable and delete a keystore that never held keys
		id, k := pick(func(k *crashKeystore) bool { return !k.keys })
		if k == nil {
			return true
		}
		defer done(k)
		if k.enabled {
			st, _, ok := c.send(http.MethodPost, "/keystores/"+id+"/disable", nil)
			if !ok {
				return false
			}
			m.note("disable-keystore", st)
			if st != http.StatusOK {
				return true
			}
			m.mu.Lock()
			k.enabled = false
			m.mu.Unlock()
		}
		m.mu.Lock()
		m.mayBeGone[id] = true // from the moment the delete is sent
		m.mu.Unlock()
		st, _, ok := c.send(http.MethodDelete, "/keystores/"+id, nil)
		if !ok {
			return false
		}
		m.note("delete-keystore", st)
		if st != http.StatusOK {
			m.mu.Lock()
			delete(m.mayBeGone, id)
			m.mu.Unlock()
		}
	}
	return true
}

// resync adopts what the daemon lists after a restart: a keystore whose create or enable
// took effect although its answer never came would otherwise hold its cluster unknown to the
// stream for good. Adopted keystores are not "answered 200": nothing is required of them.
func resync(t *testing.T, c *crashClient, m *crashModel) {
	t.Helper()
	st, resp, ok := c.send(http.MethodGet, "/keystores?limit=1000", nil)
	if !ok || st != http.StatusOK {
		t.Fatalf("list keystores after a restart: %d %v", st, resp)
	}
	list, _ := resp["keystores"].([]any)
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, v := range list {
		ks, _ := v.(map[string]any)
		id, _ := ks["keystore_id"].(string)
		cluster, _ := ks["hsm_cluster_id"].(string)
		k := m.keystores[id]
		if k == nil {
			// One on c1 or c2 may hold keys we never heard of; none is ever made on c3.
			k = &crashKeystore{cluster: cluster, keys: cluster != "c3"}
			m.keystores[id] = k
		}
		k.enabled = ks["keystore_state"] == "ENABLED"
	}
}

// TestCrashRecovery_SIGKILL kills the real daemon at random points of a stream of state
// changes and checks, after the final restart, that the store and the tokens agree.
func TestCrashRecovery_SIGKILL(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and kills the real binary")
	}
	started := time.Now()
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("HSMBRIDGE_CRASH_SEED"); s != "" {
		var err error
		if seed, err = strconv.ParseUint(s, 10, 64); err != nil {
			t.Fatalf("HSMBRIDGE_CRASH_SEED: %v", err)
		}
	}
	t.Logf("crash schedule seed %d (replay with HSMBRIDGE_CRASH_SEED=%d)", seed, seed)
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	var rngMu sync.Mutex // the workers share rng
	lockedRNG := func(fn func(*rand.Rand)) { rngMu.Lock(); defer rngMu.Unlock(); fn(rng) }

	bin := buildDaemon(t)
	env := newEnv(t, "c1", "c2", "c3") // c3 is kept for keystores without keys, so they can be deleted
	env.Listen = fmt.Sprintf("127.0.0.1:%d", freeLoopbackPort(t))
	if err := env.WriteConfig(); err != nil {
		t.Fatal(err)
	}
	base := "http://" + env.Listen
	c := &crashClient{base: base, token: env.AuthToken, project: env.ProjectID,
		hc: &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}}
	m := &crashModel{keystores: map[string]*crashKeystore{}, keys: map[string]string{}, mayBeGone: map[string]bool{}, answered: map[string]int{}}

	var logs []string
	repairs := 0 // logged by the start-ups, in all
	for kill := range crashKills {
		p := startProc(t, bin, env, base)
		resync(t, c, m)
		var afterRequests, afterMS int
		lockedRNG(func(r *rand.Rand) {
			if r.IntN(2) == 0 {
				afterMS = r.IntN(41)
			} else {
				afterRequests = 1 + r.IntN(40)
			}
		})
		var (
			wg      sync.WaitGroup
			mu      sync.Mutex
			sent    int
			stopped = make(chan struct{})
			trigger = make(chan struct{})
			once    sync.Once
		)
		for w := range crashWorkers {
			var wrng *rand.Rand
			lockedRNG(func(r *rand.Rand) { wrng = rand.New(rand.NewPCG(r.Uint64(), uint64(w))) })
			wg.Go(func() {
				for {
					select {
					case <-stopped:
						return
					default:
					}
					if !step(t, wrng, c, m, env) {
						return
					}
					mu.Lock()
					sent++
					if afterRequests > 0 && sent >= afterRequests {
						once.Do(func() { close(trigger) })
					}
					mu.Unlock()
				}
			})
		}
		if afterMS > 0 || afterRequests == 0 {
			time.Sleep(time.Duration(afterMS) * time.Millisecond)
		} else {
			select {
			case <-trigger:
			case <-time.After(20 * time.Second):
			}
		}
		p.kill()
		close(stopped)
		wg.Wait()
		mu.Lock()
		logs = append(logs, fmt.Sprintf("kill %d: after %d ms / %d requests (%d answered)", kill+1, afterMS, afterRequests, sent))
		mu.Unlock()
		repairs += strings.Count(p.out.String(), "repair: ")
		if strings.Contains(p.out.String(), "panic") {
			t.Errorf("run %d panicked:\n%s", kill+1, p.out)
		}
	}
	for _, l := range logs {
		t.Log(l)
	}

	// The final run: start-up repair, then every answered keystore and key is there.
	p := startProc(t, bin, env, base)
	ready := false
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if st, _, ok := c.send(http.MethodGet, "/keystores", nil); ok && st == http.StatusOK {
			ready = true
			break
		}
	}
	if !ready {
		t.Fatalf("the final run does not answer list-keystores:\n%s", p.out)
	}
	if resp, err := c.hc.Get(base + "/readyz"); err == nil {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("/readyz after the final restart: %d %s (an enabled keystore is not CONNECTED)", resp.StatusCode, b)
		}
	}
	for id, k := range m.keystores {
		if m.mayBeGone[id] || !k.confirmed {
			continue
		}
		if st, resp, ok := c.send(http.MethodGet, "/keystores/"+id, nil); !ok || st != http.StatusOK {
			t.Errorf("keystore %s was answered 200 and never deleted, but show answers %d %v", id, st, resp)
		}
	}
	for kid := range m.keys {
		if st, resp, ok := c.send(http.MethodPost, "/kms/describe-key", map[string]any{"key_id": kid}); !ok || st != http.StatusOK {
			t.Errorf("key %s was answered 200, but describe-key answers %d %v", kid, st, resp)
		}
	}
	p.stop(t)
	repairs += strings.Count(p.out.String(), "repair: ")
	if t.Failed() {
		t.Logf("final run's output:\n%s", p.out)
	}

	// The store against the tokens, with the daemon stopped.
	ctx := context.Background()
	st, err := store.OpenSQLite(ctx, filepath.Join(env.Dir, "hsmbridge.db"))
	if err != nil {
		t.Fatal(err)
	}
	rows, err := st.AllKeystores(ctx)
	if err != nil {
		t.Fatal(err)
	}
	keys, err := st.AllKeys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	rowByID := map[string]store.Keystore{}
	for _, r := range rows {
		rowByID[r.ID] = r
		if r.State != store.StateEnabled && r.State != store.StateDisabled {
			t.Errorf("keystore row %s left %s", r.ID, r.State)
		}
	}
	keyByID := map[string]store.Key{}
	for _, k := range keys {
		keyByID[k.ID] = k
		if k.State == store.KeyCreating {
			t.Errorf("key row %s left CREATING", k.ID)
		}
	}
	for id, k := range m.keystores {
		if _, ok := rowByID[id]; !ok && k.confirmed && !m.mayBeGone[id] {
			t.Errorf("keystore %s was answered 200 and not deleted, but has no row", id)
		}
	}
	for kid := range m.keys {
		if _, ok := keyByID[kid]; !ok {
			t.Errorf("key %s was answered 200, but has no row", kid)
		}
	}
	onToken := map[string]string{} // key id → cluster
	for _, tok := range env.Tokens {
		withToken(t, env, tok, func(ctx context.Context, cl *hsm.Cluster) {
			objs, err := cl.DataObjects(ctx)
			if err != nil {
				t.Fatal(err)
			}
			marked := map[string]bool{}
			for _, o := range objs {
				id, ok := strings.CutPrefix(o.Label, "keystore:")
				if !ok {
					continue
				}
				marked[id] = true
				if r, ok := rowByID[id]; !ok || r.ClusterID != tok.ClusterID {
					t.Errorf("token %s holds the marker of keystore %s with no row for it there", tok.Label, id)
				}
			}
			for _, r := range rows {
				if r.ClusterID == tok.ClusterID && !marked[r.ID] {
					t.Errorf("keystore %s (%s) has no marker on its token %s", r.ID, r.State, tok.Label)
				}
			}
			ids, err := cl.KeyIDs(ctx, keyIDPattern.MatchString)
			if err != nil {
				t.Fatal(err)
			}
			for _, id := range ids {
				onToken[id] = tok.ClusterID
			}
		})
	}
	for id, cluster := range onToken {
		k, ok := keyByID[id]
		if !ok {
			t.Errorf("key objects %s on %s have no row", id, cluster)
			continue
		}
		if ks := rowByID[k.KeystoreID]; ks.ClusterID != cluster {
			t.Errorf("key %s is on %s, but its keystore %s is on %q", id, cluster, k.KeystoreID, ks.ClusterID)
		}
	}
	for _, k := range keys {
		if _, ok := onToken[k.ID]; !ok {
			t.Errorf("key row %s (%s) has no objects on its token", k.ID, k.State)
		}
	}
	m.mu.Lock()
	t.Logf("answers: %v", m.answered)
	m.mu.Unlock()
	t.Logf("%d kills; at the end %d keystore rows, %d key rows, %d key ids on tokens; %d repairs logged by the start-ups; %v in all",
		crashKills, len(rows), len(keys), len(onToken), repairs, time.Since(started).Round(time.Millisecond))
}
