package bench

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"flag"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/hsmbridge/hsmbridge/hsm"
	"github.com/hsmbridge/hsmbridge/internal/devenv"
)

// fix is the benchmark fixture; nil unless TestMain set it up (-bench or HSMBRIDGE_BENCH=1).
var fix *fixture

// TestMain sets up the throwaway token only when something will measure: with neither -bench
// nor HSMBRIDGE_BENCH=1 the package's tests skip, so `make test` pays nothing for it. Run as
// HSMBRIDGE_BENCH_BARE=<file> the test binary is the bare HTTP server instead (see bare.go).
func TestMain(m *testing.M) {
	if body := os.Getenv(bareEnv); body != "" {
		os.Exit(serveBare(body))
	}
	flag.Parse()
	os.Exit(testMain(m))
}

func testMain(m *testing.M) int {
	if !measuring() {
		return m.Run()
	}
	f, err := setup(context.Background())
	if f != nil {
		defer f.close()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench setup:", err)
		return 1
	}
	fix = f
	return m.Run()
}

func measuring() bool {
	if os.Getenv("HSMBRIDGE_BENCH") == "1" {
		return true
	}
	fl := flag.Lookup("test.bench")
	return fl != nil && fl.Value.String() != ""
}

// Key ids of the keys the test process makes for the raw and hsm paths. They are not UUIDs,
// so the daemon's start-up repair (which removes UUID-named orphans) leaves them alone.
const (
	ecID  = "bench-ecdsa-p256"
	rsaID = "bench-rsa-2048"
	aesID = "bench-aes-256"
)

// sha256DigestInfo is the DER DigestInfo prefix for SHA-256 (RFC 8017 §9.2), as hsm sends it.
var sha256DigestInfo = []byte{0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20}

// fixture is one token, its keys, the raw and hsm views of it, and (lazily) the daemon and the
// bare HTTP server.
type fixture struct {
	dir  string
	conf string // SOFTHSM2_CONF
	env  *devenv.Env
	tok  *devenv.Token
	cl   *hsm.Cluster
	raw  *rawToken

	ecPub  *ecdsa.PublicKey
	rsaPub *rsa.PublicKey
	digest []byte // what every sign signs (a SHA-256 digest)
	plain  []byte // what every encrypt encrypts: 256 bytes

	daemonOnce sync.Once
	daemon     *daemon
	daemonErr  error

	bareOnce sync.Once
	bare     *bareServer
	bareErr  error
}

func setup(ctx context.Context) (*fixture, error) {
	dir, err := os.MkdirTemp("", "hsmbridge-bench-")
	if err != nil {
		return nil, err
	}
	f := &fixture{dir: dir}
	if f.conf, err = devenv.UseSoftHSMDir(dir); err != nil {
		return f, err
	}
	// Listen is set when the daemon starts (a free port then); one cluster is enough.
	f.env, err = devenv.Create(ctx, devenv.Options{Dir: filepath.Join(dir, "env"), Clusters: []string{"bench-cluster"}, Listen: "127.0.0.1:0"})
	if err != nil {
		return f, fmt.Errorf("devenv: %w", err)
	}
	f.tok = f.env.Tokens[0]
	pin, err := os.ReadFile(f.env.PINPath)
	if err != nil {
		return f, err
	}
	f.cl, err = hsm.OpenCluster(ctx, hsm.ClusterConfig{
		ID: f.tok.ClusterID, ModulePath: f.env.Module, TokenSerial: f.tok.Serial, TokenLabel: f.tok.Label,
		PIN: strings.TrimSpace(string(pin)), PoolSize: 4,
	})
	if err != nil {
		return f, err
	}
	if f.ecPub, err = f.cl.GenerateEC(ctx, ecID, elliptic.P256(), hsm.UsageSign); err != nil {
		return f, err
	}
	if f.rsaPub, err = f.cl.GenerateRSA(ctx, rsaID, 2048, hsm.UsageSign); err != nil {
		return f, err
	}
	if err = f.cl.GenerateAES(ctx, aesID, 256); err != nil {
		return f, err
	}
	sum := sha256.Sum256([]byte("hsmbridge bench " + devenv.RandomHex(8)))
	f.digest = sum[:]
	f.plain = []byte(devenv.RandomHex(128)) // 256 ASCII bytes: plain_text is a JSON string
	if f.raw, err = openRaw(f.env.Module, f.tok.Serial, strings.TrimSpace(string(pin))); err != nil {
		return f, fmt.Errorf("raw PKCS#11: %w", err)
	}
	if err = f.checkInProcess(ctx); err != nil {
		return f, err
	}
	return f, nil
}

// checkInProcess proves once that the raw and hsm paths produce valid output, so the timed
// loops measure real operations.
func (f *fixture) checkInProcess(ctx context.Context) error {
	s, err := f.raw.ctx.OpenSession(f.raw.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return err
	}
	defer f.raw.ctx.CloseSession(s)
	if err := f.raw.ctx.SignInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil)}, f.raw.ec); err != nil {
		return fmt.Errorf("raw ECDSA: %w", err)
	}
	rs, err := f.raw.ctx.Sign(s, f.digest)
	if err != nil || len(rs) != 64 || !ecdsa.Verify(f.ecPub, f.digest, new(big.Int).SetBytes(rs[:32]), new(big.Int).SetBytes(rs[32:])) {
		return fmt.Errorf("raw ECDSA signature does not verify (err %v)", err)
	}
	if err := f.raw.ctx.SignInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS, nil)}, f.raw.rsa); err != nil {
		return fmt.Errorf("raw RSA: %w", err)
	}
	sig, err := f.raw.ctx.Sign(s, slices.Concat(sha256DigestInfo, f.digest))
	if err != nil || rsa.VerifyPKCS1v15(f.rsaPub, crypto.SHA256, f.digest, sig) != nil {
		return fmt.Errorf("raw RSA signature does not verify (err %v)", err)
	}
	iv := make([]byte, 12)
	_, _ = rand.Read(iv)
	params := pkcs11.NewGCMParams(iv, nil, 128)
	defer params.Free()
	if err := f.raw.ctx.EncryptInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}, f.raw.aes); err != nil {
		return fmt.Errorf("raw AES-GCM: %w", err)
	}
	ct, err := f.raw.ctx.Encrypt(s, f.plain)
	if err != nil {
		return fmt.Errorf("raw AES-GCM: %w", err)
	}
	if pt, err := f.cl.DecryptGCM(ctx, aesID, iv, nil, ct); err != nil || string(pt) != string(f.plain) {
		return fmt.Errorf("raw AES-GCM ciphertext does not decrypt (err %v)", err)
	}

	der, err := f.cl.SignDigest(ctx, ecID, hsm.SchemeECDSA, crypto.SHA256, f.digest)
	if err != nil || !ecdsa.VerifyASN1(f.ecPub, f.digest, der) {
		return fmt.Errorf("hsm ECDSA signature does not verify (err %v)", err)
	}
	sig, err = f.cl.SignDigest(ctx, rsaID, hsm.SchemePKCS1v15, crypto.SHA256, f.digest)
	if err != nil || rsa.VerifyPKCS1v15(f.rsaPub, crypto.SHA256, f.digest, sig) != nil {
		return fmt.Errorf("hsm RSA signature does not verify (err %v)", err)
	}
	_, _ = rand.Read(iv)
	ct, err = f.cl.EncryptGCM(ctx, aesID, iv, nil, f.plain)
	if err != nil {
		return fmt.Errorf("hsm AES-GCM: %w", err)
	}
	if pt, err := f.cl.DecryptGCM(ctx, aesID, iv, nil, ct); err != nil || string(pt) != string(f.plain) {
		return fmt.Errorf("hsm AES-GCM ciphertext does not decrypt (err %v)", err)
	}
	return nil
}

// close stops the server processes, then closes the raw sessions and the cluster (whose
// C_Finalize ends every session of the process), then removes the directory.
func (f *fixture) close() {
	if f.daemon != nil {
		if err := f.daemon.stop(); err != nil {
			fmt.Fprintln(os.Stderr, "bench: daemon:", err)
		}
	}
	if f.bare != nil {
		f.bare.stop()
	}
	if f.raw != nil {
		f.raw.close()
	}
	if f.cl != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		if err := f.cl.Close(ctx); err != nil {
			fmt.Fprintln(os.Stderr, "bench: close cluster:", err)
		}
		cancel()
	}
	if os.Getenv("HSMBRIDGE_BENCH_KEEP") == "1" {
		fmt.Fprintln(os.Stderr, "bench: kept", f.dir)
		return
	}
	_ = os.RemoveAll(f.dir)
}

// needFixture returns the fixture, or skips when TestMain did not make one.
func needFixture(tb testing.TB) *fixture {
	tb.Helper()
	if fix == nil {
		tb.Skip("no bench fixture (run with -bench or HSMBRIDGE_BENCH=1)")
	}
	return fix
}

// concurrencies are the worker counts of every measurement.
var concurrencies = []int{1, 2, 4}

// The Go benchmarks: one sub-benchmark per concurrency (conc=1, conc=2, conc=4), each with
// exactly that many workers in a closed loop sharing b.N. Select one with e.g.
// -bench 'HTTPECDSA/conc=4'. The worker count is explicit rather than derived from -cpu or
// RunParallel, because those change GOMAXPROCS or oversubscribe it, which on 2 vCPUs changes
// what the ceiling is; -cpu still sets GOMAXPROCS of the test process if given.
func BenchmarkRawECDSA(b *testing.B)    { benchPath(b, pathRaw, opECDSA) }
func BenchmarkHSMECDSA(b *testing.B)    { benchPath(b, pathHSM, opECDSA) }
func BenchmarkHTTPECDSA(b *testing.B)   { benchPath(b, pathHTTP, opECDSA) }
func BenchmarkRawRSA2048(b *testing.B)  { benchPath(b, pathRaw, opRSA) }
func BenchmarkHSMRSA2048(b *testing.B)  { benchPath(b, pathHSM, opRSA) }
func BenchmarkHTTPRSA2048(b *testing.B) { benchPath(b, pathHTTP, opRSA) }
func BenchmarkRawAESGCM(b *testing.B)   { benchPath(b, pathRaw, opAES) }
func BenchmarkHSMAESGCM(b *testing.B)   { benchPath(b, pathHSM, opAES) }
func BenchmarkHTTPAESGCM(b *testing.B)  { benchPath(b, pathHTTP, opAES) }

// BenchmarkBareHTTP is the bare handler: a POST answered with a body of encrypt-data's size.
func BenchmarkBareHTTP(b *testing.B) { benchPath(b, pathBare, opAES) }

func benchPath(b *testing.B, p pathKind, o opKind) {
	f := needFixture(b)
	for _, c := range concurrencies {
		b.Run(fmt.Sprintf("conc=%d", c), func(b *testing.B) {
			ws, done, err := f.workers(p, o, c)
			if err != nil {
				b.Fatal(err)
			}
			defer done()
			var next atomic.Int64
			var failed atomic.Pointer[error]
			lats := make([][]time.Duration, c)
			b.ReportAllocs()
			b.ResetTimer()
			var wg sync.WaitGroup
			for i, w := range ws {
				wg.Go(func() {
					l := make([]time.Duration, 0, b.N/c+1)
					for next.Add(1) <= int64(b.N) {
						t0 := time.Now()
						if err := w.op(); err != nil {
							failed.CompareAndSwap(nil, &err)
							return
						}
						l = append(l, time.Since(t0))
					}
					lats[i] = l
				})
			}
			wg.Wait()
			b.StopTimer()
			if e := failed.Load(); e != nil {
				b.Fatalf("%s %s: %v", p, o, *e)
			}
			all := slices.Concat(lats...)
			p50, p99 := percentiles(all)
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "ops/s")
			b.ReportMetric(us(p50), "p50-µs")
			b.ReportMetric(us(p99), "p99-µs")
		})
	}
}

// percentiles sorts lat and returns its p50 and p99.
func percentiles(lat []time.Duration) (p50, p99 time.Duration) {
	if len(lat) == 0 {
		return 0, 0
	}
	slices.Sort(lat)
	return lat[len(lat)*50/100], lat[min(len(lat)-1, len(lat)*99/100)]
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
