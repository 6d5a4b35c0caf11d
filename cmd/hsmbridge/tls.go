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
// Context.Close would C_Finalize and dlclose the library under hsm's clusters. tokenSigner
// is the small crypto.Signer this needs, on miekg/pkcs11: it tolerates
// CKR_CRYPTOKI_ALREADY_INITIALIZED and CKR_USER_ALREADY_LOGGED_IN (PKCS#11 login state is
// per process and token, so on a cluster's token hsm's login is the one in force), never
// calls C_Finalize or C_Logout, and never unloads the library.

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/miekg/pkcs11"

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
		caPEM, err := os.ReadFile(c.ClientCA)
		if err != nil {
			return nil, nil, fmt.Errorf("client_ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(caPEM) {
			return nil, nil, fmt.Errorf("client_ca %s: no PEM certificate", c.ClientCA)
		}
		tc.ClientCAs, tc.ClientAuth = pool, tls.RequireAndVerifyClientCert
	}
	return tc, closeKey, nil
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

// p11Libraries are the PKCS#11 libraries tokenSigner loaded, by resolved path. A library is
// loaded once and never unloaded (dlclose of SoftHSM 2.6 has crashed; hsm does the same).
// dlopen of a library that hsm loaded too returns the same instance, so both share its
// initialisation and login state.
var p11Libraries = struct {
	sync.Mutex
	m map[string]*pkcs11.Ctx
}{m: map[string]*pkcs11.Ctx{}}

func loadLibrary(path string) (*pkcs11.Ctx, error) {
	if !filepath.IsAbs(path) {
		return nil, fmt.Errorf("module %q: path must be absolute", path)
	}
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return nil, fmt.Errorf("module %s: %w", path, err)
	}
	p11Libraries.Lock()
	defer p11Libraries.Unlock()
	if ctx := p11Libraries.m[real]; ctx != nil {
		return ctx, nil
	}
	ctx := pkcs11.New(real)
	if ctx == nil {
		return nil, fmt.Errorf("module %s: cannot load the PKCS#11 library", path)
	}
	p11Libraries.m[real] = ctx
	return ctx, nil
}

// tokenSigner is a crypto.Signer over a private key on a PKCS#11 token, found by label.
// Signatures are made one at a time on one session: a TLS server signs once per full
// handshake (resumed sessions sign nothing), and SoftHSM serialises short operations inside
// a process anyway. A session, login or device error makes it open a new session (and
// initialise the module and log in again if need be: hsm may have re-initialised the
// module to recover a cluster on it) and retry once; a refused PIN is never tried again.
// Safe for concurrent use.
type tokenSigner struct {
	ctx                   *pkcs11.Ctx
	module, serial, label string // the token
	keyLabel              string
	pin                   string // kept for logging in again; never printed
	pub                   crypto.PublicKey

	mu        sync.Mutex
	session   pkcs11.SessionHandle
	key       pkcs11.ObjectHandle
	connected bool
	refused   error     // the token refused the PIN: never log in again
	nextTry   time.Time // after a failed reconnect, handshakes fail fast until then
	closed    bool
}

// reconnectBackoff bounds how often a dead token is tried from the handshake path.
const reconnectBackoff = time.Second

// openTokenSigner reads the key's PIN, opens a session on its token, logs in, finds the key
// and proves that it is the key of the certificate in certFile.
func openTokenSigner(k config.TLSKey, certFile string) (*tokenSigner, error) {
	chain, err := readCertChain(certFile)
	if err != nil {
		return nil, err
	}
	pin, err := k.PIN.Read()
	if err != nil {
		return nil, fmt.Errorf("key: %w", err)
	}
	ctx, err := loadLibrary(k.Module)
	if err != nil {
		return nil, fmt.Errorf("key: %w", err)
	}
	s := &tokenSigner{
		ctx: ctx, module: k.Module, serial: k.Token.Serial, label: k.Token.Label,
		keyLabel: k.Label, pin: pin, pub: chain[0].PublicKey,
	}
	switch s.pub.(type) {
	case *ecdsa.PublicKey, *rsa.PublicKey:
	default:
		return nil, fmt.Errorf("%s: key type %T not supported on a token (ECDSA or RSA)", certFile, s.pub)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.connectLocked(); err != nil {
		return nil, fmt.Errorf("key %q on token %s: %w", s.keyLabel, s.describeToken(), err)
	}
	return s, nil
}

func (s *tokenSigner) describeToken() string {
	var parts []string
	if s.label != "" {
		parts = append(parts, fmt.Sprintf("label %q", s.label))
	}
	if s.serial != "" {
		parts = append(parts, fmt.Sprintf("serial %q", s.serial))
	}
	return strings.Join(parts, " ")
}

// Public returns the certificate's public key, which openTokenSigner proved is the token's.
func (s *tokenSigner) Public() crypto.PublicKey { return s.pub }

// connectLocked initialises the module (unless it is already), finds the token, opens a
// session, logs in (unless the process already is) and finds and proves the key.
func (s *tokenSigner) connectLocked() error {
	if s.refused != nil {
		return s.refused
	}
	if err := s.ctx.Initialize(); err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
		if errors.Is(err, pkcs11.Error(pkcs11.CKR_CANT_LOCK)) {
			return fmt.Errorf("C_Initialize: %w (a token TLS key needs a module that can use OS locking)", err)
		}
		return fmt.Errorf("C_Initialize: %w", err)
	}
	slot, err := s.findSlot()
	if err != nil {
		return err
	}
	session, err := s.ctx.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION)
	if err != nil {
		return fmt.Errorf("C_OpenSession: %w", err)
	}
	if err := s.ctx.Login(session, pkcs11.CKU_USER, s.pin); err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_USER_ALREADY_LOGGED_IN)) {
		_ = s.ctx.CloseSession(session)
		if hsm.Classify(err) == hsm.ClassCredential {
			s.refused = fmt.Errorf("the token refused the PIN (not retried): C_Login: %w", err)
			return s.refused
		}
		return fmt.Errorf("C_Login: %w", err)
	}
	key, err := s.findKey(session)
	if err != nil {
		_ = s.ctx.CloseSession(session)
		return err
	}
	s.session, s.key, s.connected = session, key, true
	if err := s.proveLocked(); err != nil {
		s.disconnectLocked()
		return err
	}
	return nil
}

// findSlot returns the slot of the one initialised token that matches serial and label.
func (s *tokenSigner) findSlot() (uint, error) {
	slots, err := s.ctx.GetSlotList(true)
	if err != nil {
		return 0, fmt.Errorf("C_GetSlotList: %w", err)
	}
	var found []uint
	for _, slot := range slots {
		ti, err := s.ctx.GetTokenInfo(slot)
		if err != nil || ti.Flags&pkcs11.CKF_TOKEN_INITIALIZED == 0 {
			continue
		}
		serial, label := strings.TrimRight(ti.SerialNumber, " \x00"), strings.TrimRight(ti.Label, " \x00")
		if (s.serial == "" || serial == s.serial) && (s.label == "" || label == s.label) {
			found = append(found, slot)
		}
	}
	switch len(found) {
	case 0:
		return 0, fmt.Errorf("%w: no initialised token with %s", hsm.ErrTokenNotFound, s.describeToken())
	case 1:
		return found[0], nil
	}
	return 0, fmt.Errorf("%w: %d tokens with %s; name the serial", hsm.ErrAmbiguous, len(found), s.describeToken())
}

// findKey returns the one private key labelled keyLabel, of the certificate's key type.
func (s *tokenSigner) findKey(session pkcs11.SessionHandle) (pkcs11.ObjectHandle, error) {
	keyType := uint(pkcs11.CKK_EC)
	if _, ok := s.pub.(*rsa.PublicKey); ok {
		keyType = pkcs11.CKK_RSA
	}
	if err := s.ctx.FindObjectsInit(session, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, keyType),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, s.keyLabel),
	}); err != nil {
		return 0, fmt.Errorf("C_FindObjectsInit: %w", err)
	}
	hs, _, err := s.ctx.FindObjects(session, 2)
	err = errors.Join(err, s.ctx.FindObjectsFinal(session))
	switch {
	case err != nil:
		return 0, fmt.Errorf("C_FindObjects: %w", err)
	case len(hs) == 0:
		return 0, fmt.Errorf("%w: no private key labelled %q of the certificate's key type", hsm.ErrObjectNotFound, s.keyLabel)
	case len(hs) > 1:
		return 0, fmt.Errorf("%w: several private keys labelled %q", hsm.ErrAmbiguous, s.keyLabel)
	}
	return hs[0], nil
}

// proveLocked signs a fresh random digest with the token key and verifies it with the
// certificate's public key: the label must name the certificate's key, not merely a key.
func (s *tokenSigner) proveLocked() error {
	challenge := make([]byte, 32)
	_, _ = rand.Read(challenge)
	digest := sha256.Sum256(challenge)
	sig, err := s.signLocked(digest[:], crypto.SHA256)
	if err != nil {
		return fmt.Errorf("proof of possession: %w", err)
	}
	var ok bool
	switch pub := s.pub.(type) {
	case *ecdsa.PublicKey:
		ok = ecdsa.VerifyASN1(pub, digest[:], sig)
	case *rsa.PublicKey:
		ok = rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig) == nil
	}
	if !ok {
		return fmt.Errorf("proof of possession: the token's key %q is not the certificate's key", s.keyLabel)
	}
	return nil
}

func (s *tokenSigner) disconnectLocked() {
	if s.connected {
		_ = s.ctx.CloseSession(s.session) // may be gone already (module re-initialised)
	}
	s.connected = false
}

// Sign implements crypto.Signer: ECDSA (ASN.1 DER), RSA PKCS #1 v1.5 and RSA-PSS over a
// digest. rand is unused: the token makes its own randomness.
func (s *tokenSigner) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	if h := opts.HashFunc(); h != 0 && len(digest) != h.Size() {
		return nil, fmt.Errorf("token key %q: digest is %d bytes, %v needs %d", s.keyLabel, len(digest), h, h.Size())
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, fmt.Errorf("token key %q: %w", s.keyLabel, hsm.ErrClosed)
	}
	if !s.connected {
		if err := s.reconnectLocked(); err != nil {
			return nil, err
		}
	}
	sig, err := s.signLocked(digest, opts)
	if err == nil {
		return sig, nil
	}
	switch hsm.Classify(err) {
	case hsm.ClassSession, hsm.ClassLogin, hsm.ClassDevice:
		s.disconnectLocked()
		if rerr := s.reconnectLocked(); rerr != nil {
			return nil, errors.Join(fmt.Errorf("token key %q: %w", s.keyLabel, err), rerr)
		}
		if sig, err = s.signLocked(digest, opts); err == nil {
			return sig, nil
		}
	}
	return nil, fmt.Errorf("token key %q: %w", s.keyLabel, err)
}

// reconnectLocked connects again, at most once per reconnectBackoff.
func (s *tokenSigner) reconnectLocked() error {
	if now := time.Now(); now.Before(s.nextTry) {
		return fmt.Errorf("token key %q: token unavailable, next try in %s", s.keyLabel, s.nextTry.Sub(now).Round(time.Millisecond))
	}
	if err := s.connectLocked(); err != nil {
		s.nextTry = time.Now().Add(reconnectBackoff)
		return fmt.Errorf("token key %q on token %s: %w", s.keyLabel, s.describeToken(), err)
	}
	return nil
}

// digestInfoPrefixes are the DER prefixes of PKCS #1 v1.5 DigestInfo (RFC 8017 §9.2).
var digestInfoPrefixes = map[crypto.Hash][]byte{
	crypto.SHA256: {0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20},
	crypto.SHA384: {0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05, 0x00, 0x04, 0x30},
	crypto.SHA512: {0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03, 0x05, 0x00, 0x04, 0x40},
}

var pssMechanisms = map[crypto.Hash][2]uint{
	crypto.SHA256: {pkcs11.CKM_SHA256, pkcs11.CKG_MGF1_SHA256},
	crypto.SHA384: {pkcs11.CKM_SHA384, pkcs11.CKG_MGF1_SHA384},
	crypto.SHA512: {pkcs11.CKM_SHA512, pkcs11.CKG_MGF1_SHA512},
}

// signLocked makes one signature on the current session.
func (s *tokenSigner) signLocked(digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	var mech *pkcs11.Mechanism
	input := digest
	hash := opts.HashFunc()
	switch s.pub.(type) {
	case *ecdsa.PublicKey:
		mech = pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil)
	case *rsa.PublicKey:
		if pss, ok := opts.(*rsa.PSSOptions); ok {
			m, ok := pssMechanisms[hash]
			if !ok {
				return nil, fmt.Errorf("RSA-PSS with %v not supported", hash)
			}
			salt := pss.SaltLength
			if salt == rsa.PSSSaltLengthEqualsHash || salt == rsa.PSSSaltLengthAuto {
				salt = hash.Size()
			}
			mech = pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_PSS, pkcs11.NewPSSParams(m[0], m[1], uint(salt)))
			break
		}
		if hash != 0 {
			prefix, ok := digestInfoPrefixes[hash]
			if !ok {
				return nil, fmt.Errorf("RSA PKCS #1 v1.5 with %v not supported", hash)
			}
			input = append(bytes.Clone(prefix), digest...)
		}
		mech = pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS, nil)
	}
	if err := s.ctx.SignInit(s.session, []*pkcs11.Mechanism{mech}, s.key); err != nil {
		return nil, fmt.Errorf("C_SignInit: %w", err)
	}
	sig, err := s.ctx.Sign(s.session, input)
	if err != nil {
		return nil, fmt.Errorf("C_Sign: %w", err)
	}
	if _, ok := s.pub.(*ecdsa.PublicKey); ok {
		return ecdsaSigDER(sig)
	}
	return sig, nil
}

// ecdsaSigDER turns PKCS #11's r‖s into an ASN.1 ECDSA-Sig-Value, as crypto.Signer returns.
func ecdsaSigDER(rs []byte) ([]byte, error) {
	if len(rs) == 0 || len(rs)%2 != 0 {
		return nil, fmt.Errorf("C_Sign: ECDSA signature of odd length %d", len(rs))
	}
	half := len(rs) / 2
	return asn1.Marshal(struct{ R, S *big.Int }{new(big.Int).SetBytes(rs[:half]), new(big.Int).SetBytes(rs[half:])})
}

// Close closes the signer's session. It neither logs out nor finalizes the module: other
// users of the module in this process (hsm's clusters) share both.
func (s *tokenSigner) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	s.disconnectLocked()
	return nil
}
