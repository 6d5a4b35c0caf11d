package main

// TLS on the API listener (server.tls): the certificate and key from files, re-read when
// they change, or the key on a PKCS#11 token; optional client-certificate verification.
//
// Reload: every handshake stats the certificate (and key) file in GetCertificate and
// reloads when either file's identity (device and inode), size or modification time
// differs from what was loaded. Two stat calls cost a few microseconds against the
// hundreds a handshake costs (milliseconds with the key on an HSM), a rotation is in force
// from the very next handshake, and there is no goroutine or interval to own and stop. A
// poll would save nothing measurable and leave a window where the old certificate is
// served after the new one is in place. The catch, shared with any mtime check: a file
// rewritten in place within one file-system timestamp tick with the same size is not seen;
// replacing the files by rename (install, mv, cert-manager, Kubernetes secret volumes) is
// always seen. A reload that fails (unreadable file, key and certificate that do not match
// — as between the two renames of a rotation) keeps the previous pair and logs once per
// change of the files.
//
// Key on a token: crypto11 v1.6.2 cannot be used beside package hsm. Its Configure calls
// C_Initialize and fails on CKR_CRYPTOKI_ALREADY_INITIALIZED (checked: "failed to initialize
// module: ... CKR_CRYPTOKI_ALREADY_INITIALIZED" once hsm has opened the module), and its
// Context.Close would C_Finalize and dlclose the library under hsm's clusters. So the key is
// used through package hsm, like every other key: a cluster opened on the key's token and
// hsm's crypto.Signer over the labelled key (tokenSigner), with hsm's shared module, login
// checks, error classes and recovery.

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"

	"github.com/hsmbridge/hsmbridge/hsm"
	"github.com/hsmbridge/hsmbridge/internal/config"
)

// listenPublic opens the API listener; with server.tls set it serves TLS. The TLS
// material (and the token key) is opened before the socket, so a bad certificate or PIN
// never leaves a bound port behind.
func listenPublic(cfg *config.Config, log *slog.Logger) (net.Listener, error) {
	if !cfg.Server.TLS.On() {
		return listenOn(cfg.Listen)
	}
	tc, closeKey, err := publicTLS(cfg.Server.TLS, log)
	if err != nil {
		return nil, fmt.Errorf("server.tls: %w", err)
	}
	ln, err := listenOn(cfg.Listen)
	if err != nil {
		return nil, errors.Join(err, closeKey())
	}
	return &tlsListener{Listener: tls.NewListener(ln, tc), closeKey: closeKey}, nil
}

// tlsListener is a TLS listener that also releases the token key when closed.
type tlsListener struct {
	net.Listener
	closeKey func() error
	once     sync.Once
	err      error
}

// Close closes the socket, then the key's session (http.Server.Shutdown closes its
// listeners first, so this runs before the daemon closes its clusters and modules).
func (l *tlsListener) Close() error {
	l.once.Do(func() { l.err = errors.Join(l.Listener.Close(), l.closeKey()) })
	return l.err
}

// publicTLS builds the API listener's TLS configuration. The returned func releases the
// token key, if there is one; it is safe to call more than once.
func publicTLS(c config.TLS, log *slog.Logger) (_ *tls.Config, closeKey func() error, err error) {
	closeKey = func() error { return nil }
	var signer *tokenSigner
	if c.Key.On() {
		if signer, err = openTokenSigner(c.Key, c.CertFile); err != nil {
			return nil, nil, err
		}
		closeKey = signer.Close
		defer func() {
			if err != nil {
				_ = signer.Close()
			}
		}()
	}
	r, err := newCertReloader(c.CertFile, c.KeyFile, signer, log)
	if err != nil {
		return nil, nil, err
	}
	tc := &tls.Config{
		MinVersion:     tls.VersionTLS12,
		NextProtos:     []string{"http/1.1"},
		GetCertificate: r.GetCertificate,
	}
	if c.ClientCA != "" {
		if tc.ClientCAs, err = loadClientCAs(c.ClientCA); err != nil {
			return nil, nil, fmt.Errorf("client_ca: %w", err)
		}
		tc.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return tc, closeKey, nil
}

// loadClientCAs reads the PEM CAs that client certificates must chain to.
func loadClientCAs(file string) (*x509.CertPool, error) {
	caPEM, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("%s: no PEM certificate", file)
	}
	return pool, nil
}

// certReloader serves a certificate from files, reloading it when the files change. With
// a token signer only the certificate comes from a file, and it must stay the token key's.
// Safe for concurrent use.
type certReloader struct {
	certFile, keyFile string
	signer            *tokenSigner
	log               *slog.Logger

	mu      sync.Mutex
	cert    *tls.Certificate
	loaded  stamp  // the files as they were when cert was loaded
	refused stamp  // the files as they were when a reload last failed
	statErr string // the last stat failure logged
}

// stamp is what tells that a file changed: its identity, size and modification time.
type stamp struct{ cert, key os.FileInfo }

func (s stamp) equal(o stamp) bool { return sameFile(s.cert, o.cert) && sameFile(s.key, o.key) }

func sameFile(a, b os.FileInfo) bool {
	if a == nil || b == nil {
		return a == nil && b == nil
	}
	return os.SameFile(a, b) && a.Size() == b.Size() && a.ModTime().Equal(b.ModTime())
}

func newCertReloader(certFile, keyFile string, signer *tokenSigner, log *slog.Logger) (*certReloader, error) {
	r := &certReloader{certFile: certFile, keyFile: keyFile, signer: signer, log: log}
	st, err := r.stat()
	if err != nil {
		return nil, err
	}
	if r.cert, err = r.load(); err != nil {
		return nil, err
	}
	r.loaded = st
	return r, nil
}

func (r *certReloader) stat() (stamp, error) {
	var st stamp
	var err error
	if st.cert, err = os.Stat(r.certFile); err != nil {
		return st, err
	}
	if r.keyFile != "" {
		if st.key, err = os.Stat(r.keyFile); err != nil {
			return st, err
		}
	}
	return st, nil
}

// load reads the certificate chain and its key.
func (r *certReloader) load() (*tls.Certificate, error) {
	if r.signer == nil {
		cert, err := tls.LoadX509KeyPair(r.certFile, r.keyFile)
		if err != nil {
			return nil, err
		}
		return &cert, nil
	}
	chain, err := readCertChain(r.certFile)
	if err != nil {
		return nil, err
	}
	if !publicKeysEqual(chain[0].PublicKey, r.signer.Public()) {
		return nil, fmt.Errorf("%s: the certificate is not for the token key %q (to move to another key, change server.tls.key and restart)", r.certFile, r.signer.keyLabel)
	}
	cert := &tls.Certificate{PrivateKey: r.signer, Leaf: chain[0]}
	for _, c := range chain {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	return cert, nil
}

// GetCertificate is the tls.Config hook: it returns the current certificate, reloading it
// first if the files changed. It never fails once a certificate has been loaded.
func (r *certReloader) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	st, err := r.stat()
	r.mu.Lock()
	defer r.mu.Unlock()
	if err != nil {
		if msg := err.Error(); msg != r.statErr {
			r.statErr = msg
			r.log.Error("TLS certificate files: keeping the loaded certificate", "err", err)
		}
		return r.cert, nil
	}
	r.statErr = ""
	if st.equal(r.loaded) || st.equal(r.refused) {
		return r.cert, nil
	}
	cert, err := r.load()
	if err != nil {
		r.refused = st
		r.log.Error("reload TLS certificate: keeping the previous one", "cert_file", r.certFile, "err", err)
		return r.cert, nil
	}
	r.cert, r.loaded, r.refused = cert, st, stamp{}
	r.log.Info("reloaded TLS certificate", "cert_file", r.certFile, "subject", cert.Leaf.Subject.String(),
		"not_after", cert.Leaf.NotAfter.UTC().Format(time.RFC3339))
	return cert, nil
}

// readCertChain reads every CERTIFICATE block of a PEM file, leaf first.
func readCertChain(file string) ([]*x509.Certificate, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	var chain []*x509.Certificate
	for {
		var b *pem.Block
		if b, data = pem.Decode(data); b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", file, err)
		}
		chain = append(chain, c)
	}
	if len(chain) == 0 {
		return nil, fmt.Errorf("%s: no PEM CERTIFICATE block", file)
	}
	return chain, nil
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	ak, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && ak.Equal(b)
}

// tokenSigner is the TLS key on a PKCS#11 token: a cluster of package hsm opened on the
// key's token (sharing the module, its login and its recovery with the real clusters), and
// hsm's signer over the key found by label.
type tokenSigner struct {
	crypto.Signer
	keyLabel string
	cl       *hsm.Cluster
}

// openTokenSigner reads the key's PIN, opens the key's token, finds the key and proves that
// it is the key of the certificate in certFile.
func openTokenSigner(k config.TLSKey, certFile string) (_ *tokenSigner, err error) {
	chain, err := readCertChain(certFile)
	if err != nil {
		return nil, err
	}
	pin, err := k.PIN.Read()
	if err != nil {
		return nil, fmt.Errorf("key: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cl, err := hsm.OpenCluster(ctx, hsm.ClusterConfig{
		ID: "tls-key", ModulePath: k.Module, TokenSerial: k.Token.Serial, TokenLabel: k.Token.Label,
		PIN: pin, PoolSize: 2,
	})
	if err != nil {
		return nil, fmt.Errorf("key %q: %w", k.Label, err)
	}
	signer, err := cl.Signer(ctx, k.Label, chain[0].PublicKey)
	if err != nil {
		return nil, errors.Join(fmt.Errorf("key %q: %w", k.Label, err), cl.Close(ctx))
	}
	return &tokenSigner{Signer: signer, keyLabel: k.Label, cl: cl}, nil
}

// Close releases the key's token; hsm finalizes the module only if nothing else uses it.
func (s *tokenSigner) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return s.cl.Close(ctx)
}
