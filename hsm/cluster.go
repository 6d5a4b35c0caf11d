package hsm

import (
	"cmp"
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/pkcs11"
)

// ClusterConfig is what OpenCluster needs. The caller reads the PIN from its source; the
// cluster keeps it only for the one log-in it performs and never prints it.
type ClusterConfig struct {
	ID         string
	ModulePath string
	// The token is found by serial and/or label, never by slot number: slot ids change
	// when a token is initialised or the module re-initialised.
	TokenSerial string
	TokenLabel  string
	PIN         string
	PoolSize    int

	// IdentityKeyLabel names the private key that proves the cluster's identity. Empty
	// means the cluster has no identity yet (while dev init provisions it).
	IdentityKeyLabel string
	// The identity certificate: a certificate object on the token, or PEM bytes.
	IdentityCertLabel string
	IdentityCertPEM   []byte

	// Interceptor, if set, stands around every PKCS#11 call of this cluster.
	Interceptor Interceptor
	// OnAcquireWait, if set, is told how long each acquisition waited.
	OnAcquireWait func(time.Duration)

	// BreakerThreshold is how many device-class failures in a row open the breaker
	// (default DefaultBreakerThreshold).
	BreakerThreshold int
	// StuckAfter is how long a call may hold a session before it counts as stuck
	// (default DefaultStuckAfter). PKCS#11 calls cannot be cancelled; stuck ones are
	// counted, and a cluster whose sessions are all stuck refuses work.
	StuckAfter time.Duration
	// OnHealthChange, if set, is told each change of the cluster's health, once.
	OnHealthChange func(Health)
	// OnRecoverError, if set, is told why an attempt to recover failed.
	OnRecoverError func(error)
}

// TokenInfo identifies the token a cluster is on.
type TokenInfo struct {
	Serial       string
	Label        string
	Manufacturer string
	Model        string
}

// Cluster is one configured HSM cluster: a token on a module, logged in once through an
// anchor session, with a pool of worker sessions. Safe for concurrent use.
type Cluster struct {
	id    string
	mod   *module
	api   PKCS11
	token TokenInfo

	// What recovery needs to find and log in to the token again. The PIN stays in memory
	// for that and for re-login; it is never printed.
	serial, label, pin string

	mu     sync.RWMutex // guards slot, anchor and pool, which recovery replaces
	slot   uint
	anchor pkcs11.SessionHandle
	pool   *Pool

	keyLabel   string
	cert       *x509.Certificate
	handles    handleCache
	oaepOnHost atomic.Bool // the token refuses OAEP with SHA-256: decode on the host

	health           health
	breakerThreshold int
	stuckAfter       time.Duration
	onHealth         func(Health)
	onRecoverError   func(error)

	done      chan struct{} // closed by Close: recovery stops
	closed    atomic.Bool
	closeOnce sync.Once
	closeErr  error
}

// OpenCluster loads the module (shared with other clusters on the same path), finds the
// token, logs in once and prepares the pool. A refused PIN fails here with ErrCredential and
// is never tried again.
func OpenCluster(ctx context.Context, cfg ClusterConfig) (_ *Cluster, err error) {
	if cfg.TokenSerial == "" && cfg.TokenLabel == "" {
		return nil, fmt.Errorf("cluster %s: token serial or label required", cfg.ID)
	}
	mod, err := openModule(cfg.ModulePath)
	if err != nil {
		return nil, fmt.Errorf("cluster %s: %w", cfg.ID, err)
	}
	c := &Cluster{
		id: cfg.ID, mod: mod, api: Intercept(mod.api(), cfg.Interceptor), keyLabel: cfg.IdentityKeyLabel,
		serial: cfg.TokenSerial, label: cfg.TokenLabel, pin: cfg.PIN,
		breakerThreshold: cmp.Or(cfg.BreakerThreshold, DefaultBreakerThreshold),
		stuckAfter:       cmp.Or(cfg.StuckAfter, DefaultStuckAfter),
		onHealth:         cfg.OnHealthChange, onRecoverError: cfg.OnRecoverError,
		done: make(chan struct{}),
	}
	c.health.h = Health{State: StateHealthy, Since: time.Now()}
	defer func() {
		if err != nil {
			err = errors.Join(err, mod.drop())
		}
	}()
	slot, ti, err := findToken(c.api, cfg.TokenSerial, cfg.TokenLabel)
	if err != nil {
		return nil, fmt.Errorf("cluster %s: %w", cfg.ID, err)
	}
	c.slot, c.token = slot, tokenInfo(ti)
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("cluster %s: %w", cfg.ID, err)
	}
	if c.anchor, err = c.login(c.slot, cfg.PIN); err != nil {
		return nil, err
	}
	c.pool = newPool(c.api, c.id, c.slot, poolCap(cfg.PoolSize, ti.MaxRwSessionCount), cfg.OnAcquireWait, c.stuckAfter)
	if cfg.IdentityKeyLabel != "" {
		if c.cert, err = c.loadIdentityCert(ctx, cfg); err != nil {
			_ = c.pool.Close(ctx)
			_ = c.api.CloseSession(c.anchor)
			c.mod.logout(c.token.Serial)
			return nil, err
		}
	}
	return c, nil
}

// poolCap lowers the configured size to what the token allows, keeping one session for the
// anchor. SoftHSM reports 0 (CK_EFFECTIVELY_INFINITE), which means no cap from the token.
func poolCap(size int, tokenMax uint) int {
	if size < 1 {
		size = 1
	}
	if tokenMax == pkcs11.CK_EFFECTIVELY_INFINITE || tokenMax == pkcs11.CK_UNAVAILABLE_INFORMATION || tokenMax < 2 {
		return size
	}
	return min(size, int(tokenMax)-1)
}

// findToken returns the one initialised token matching serial and label (each if given).
func findToken(api PKCS11, serial, label string) (uint, pkcs11.TokenInfo, error) {
	slots, err := api.GetSlotList(true)
	if err != nil {
		return 0, pkcs11.TokenInfo{}, opErr("", "C_GetSlotList", err)
	}
	var found []uint
	var info pkcs11.TokenInfo
	for _, slot := range slots {
		ti, err := api.GetTokenInfo(slot)
		if err != nil || ti.Flags&pkcs11.CKF_TOKEN_INITIALIZED == 0 {
			continue // a slot that vanished between the calls, or SoftHSM's free slot
		}
		t := tokenInfo(ti)
		if (serial == "" || t.Serial == serial) && (label == "" || t.Label == label) {
			found = append(found, slot)
			info = ti
		}
	}
	sel := describeSelector(serial, label)
	switch len(found) {
	case 0:
		return 0, pkcs11.TokenInfo{}, fmt.Errorf("%w: no initialised token with %s", ErrTokenNotFound, sel)
	case 1:
		return found[0], info, nil
	default:
		return 0, pkcs11.TokenInfo{}, fmt.Errorf("%w: %d tokens with %s; name the serial", ErrAmbiguous, len(found), sel)
	}
}

func tokenInfo(ti pkcs11.TokenInfo) TokenInfo {
	trim := func(s string) string { return strings.TrimRight(s, " \x00") }
	return TokenInfo{Serial: trim(ti.SerialNumber), Label: trim(ti.Label), Manufacturer: trim(ti.ManufacturerID), Model: trim(ti.Model)}
}

func describeSelector(serial, label string) string {
	switch {
	case serial != "" && label != "":
		return fmt.Sprintf("serial %q and label %q", serial, label)
	case serial != "":
		return fmt.Sprintf("serial %q", serial)
	default:
		return fmt.Sprintf("label %q", label)
	}
}

// login opens the anchor session and logs the user in, once.
func (c *Cluster) login(slot uint, pin string) (pkcs11.SessionHandle, error) {
	h, err := c.api.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION)
	if err != nil {
		return 0, opErr(c.id, "C_OpenSession", err)
	}
	err = c.mod.login(c.token.Serial, pin, func() error { return c.api.Login(h, pkcs11.CKU_USER, pin) })
	if err == nil {
		return h, nil
	}
	_ = c.api.CloseSession(h)
	err = opErr(c.id, "C_Login", err)
	if Classify(err) == ClassCredential {
		return 0, fmt.Errorf("cluster %s: token %q refused the PIN (not retried): %w: %w", c.id, c.token.Label, ErrCredential, err)
	}
	return 0, err
}

func (c *Cluster) loadIdentityCert(ctx context.Context, cfg ClusterConfig) (*x509.Certificate, error) {
	var der []byte
	switch {
	case len(cfg.IdentityCertPEM) > 0:
		b, _ := pem.Decode(cfg.IdentityCertPEM)
		if b == nil || b.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("cluster %s: identity certificate: no PEM CERTIFICATE block", c.id)
		}
		der = b.Bytes
	case cfg.IdentityCertLabel != "":
		var err error
		der, err = Do(ctx, c.pool, func(s *Session) ([]byte, error) {
			h, err := s.findOne([]*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_CERTIFICATE),
				pkcs11.NewAttribute(pkcs11.CKA_LABEL, cfg.IdentityCertLabel),
			})
			if err != nil {
				return nil, err
			}
			v, err := s.attributes(h, pkcs11.CKA_VALUE)
			if err != nil {
				return nil, err
			}
			return v[0], nil
		})
		if err != nil {
			return nil, fmt.Errorf("cluster %s: identity certificate %q on the token: %w", c.id, cfg.IdentityCertLabel, err)
		}
	default:
		return nil, fmt.Errorf("cluster %s: identity certificate: neither a label nor a PEM file given", c.id)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("cluster %s: identity certificate: %w", c.id, err)
	}
	return cert, nil
}

// ID returns the configured cluster id.
func (c *Cluster) ID() string { return c.id }

// Token returns what identified the token when the cluster was opened.
func (c *Cluster) Token() TokenInfo { return c.token }

// IdentityCertificate returns the cluster's identity certificate, or nil if it has none.
func (c *Cluster) IdentityCertificate() *x509.Certificate { return c.cert }

// Stats returns a snapshot of the cluster's session pool, with the cluster's re-login and
// breaker counters.
func (c *Cluster) Stats() PoolStats {
	st := c.currentPool().Stats()
	c.health.mu.Lock()
	st.Relogins, st.BreakerOpens = c.health.relogins, c.health.opened
	c.health.mu.Unlock()
	return st
}

// CurrentToken reads the token in the cluster's slot again: a cheap call that tells whether
// the cluster answers and whether the token is still the one it was opened on.
func (c *Cluster) CurrentToken(ctx context.Context) (TokenInfo, error) {
	if err := ctx.Err(); err != nil {
		return TokenInfo{}, err
	}
	if c.closed.Load() {
		return TokenInfo{}, fmt.Errorf("cluster %s: %w", c.id, ErrClosed)
	}
	c.mu.RLock()
	slot := c.slot
	c.mu.RUnlock()
	ti, err := c.api.GetTokenInfo(slot)
	if err != nil {
		err = opErr(c.id, "C_GetTokenInfo", err)
		// A token whose info cannot be read is gone, whatever else still answers (SoftHSM
		// keeps serving random numbers and empty searches after its directory vanished):
		// open the breaker at once, so recovery re-initialises the module.
		if Classify(err) == ClassDevice {
			c.open(deviceReason(err))
		}
		return TokenInfo{}, err
	}
	return tokenInfo(ti), nil
}

// Close closes the pool (waiting, bounded by ctx, for sessions in use), then the anchor
// session, then drops the module, finalizing it if no other cluster uses it.
func (c *Cluster) Close(ctx context.Context) error {
	c.closeOnce.Do(func() {
		c.closed.Store(true)
		close(c.done)
		c.mu.Lock() // a recovery that finishes after this sees closed and keeps nothing
		pool, anchor := c.pool, c.anchor
		c.mu.Unlock()
		perr := pool.Close(ctx)
		if perr != nil {
			// Sessions are still lent out: finalizing now would pull the module from under
			// them. Leave the module loaded; the process is on its way out.
			c.closeErr = perr
			return
		}
		var aerr error
		if anchor != 0 { // 0: a failed recovery left no anchor
			aerr = opErr(c.id, "C_CloseSession", c.api.CloseSession(anchor))
			c.mod.logout(c.token.Serial)
		}
		c.closeErr = errors.Join(aerr, c.mod.drop())
	})
	return c.closeErr
}
