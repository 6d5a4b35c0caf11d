package hsm

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/miekg/pkcs11"
)

// How a cluster survives its HSM: every operation runs through run, which applies the
// error-class rules once, in one place:
//   - session class: the session was evicted by the pool; an operation the token cannot
//     have performed is retried once on a fresh session;
//   - login class: the anchor logs in again (one at a time), then the operation is retried
//     once;
//   - credential class: never retried (a retry locks the token); the cluster is FAILED;
//   - device class: counted; BreakerThreshold in a row open the breaker, and while it is
//     open calls fail at once with ErrUnavailable instead of queueing on a dead device. A
//     background loop tries to recover with backoff: re-initialise the module if no other
//     cluster uses it, find the token again by serial and label, log in, re-check the
//     identity, open a fresh pool.
// A cluster whose sessions are all stuck in calls that do not return also refuses work.

// State is a cluster's health.
type State uint8

const (
	StateHealthy     State = iota
	StateUnavailable       // the breaker is open: device faults, or every session stuck
	StateFailed            // the token refused our credential; nothing is tried until restart
)

func (s State) String() string {
	switch s {
	case StateHealthy:
		return "healthy"
	case StateUnavailable:
		return "unavailable"
	case StateFailed:
		return "failed"
	}
	return fmt.Sprintf("state(%d)", s)
}

// Health is a cluster's state, why, and since when.
type Health struct {
	State State
	// Reason names the cause: INVALID_CREDENTIALS or USER_LOCKED_OUT when failed, the
	// CKR_* code that opened the breaker, or STUCK.
	Reason string
	Since  time.Time
}

// ErrUnavailable is returned at once while a cluster's breaker is open or it has failed.
var ErrUnavailable = errors.New("hsm: cluster unavailable")

// Defaults of the resilience settings (ClusterConfig fields left zero).
const (
	DefaultBreakerThreshold = 3
	DefaultStuckAfter       = 10 * time.Second
	recoverMinBackoff       = 250 * time.Millisecond
	recoverMaxBackoff       = 30 * time.Second
)

// health is the cluster's breaker and failure state.
type health struct {
	mu          sync.Mutex
	h           Health
	consecutive int // device faults in a row
	relogins    uint64
	opened      uint64 // times the breaker opened
	reloginMu   sync.Mutex
}

// run performs fn on a pooled session with the error-class rules above. retry says
// whether fn may run twice: true for operations the token cannot have completed when it
// fails (sign, encrypt, decrypt, find, read), false for ones that create objects.
func run[T any](ctx context.Context, c *Cluster, retry bool, fn func(*Session) (T, error)) (T, error) {
	var zero T
	if err := c.admit(); err != nil {
		return zero, err
	}
	logins := c.reloginCount()
	res, err := Do(ctx, c.currentPool(), fn)
	switch Classify(err) {
	case ClassSession:
		if retry {
			res, err = Do(ctx, c.currentPool(), fn)
		}
	case ClassLogin:
		if lerr := c.relogin(logins); lerr != nil {
			err = lerr
		} else if retry {
			res, err = Do(ctx, c.currentPool(), fn)
		}
	}
	c.record(err)
	return res, err
}

// exec is run for operations without a result.
func exec(ctx context.Context, c *Cluster, retry bool, fn func(*Session) error) error {
	_, err := run(ctx, c, retry, func(s *Session) (struct{}, error) { return struct{}{}, fn(s) })
	return err
}

// admit refuses work while the cluster is not healthy, or all its sessions are stuck.
func (c *Cluster) admit() error {
	c.health.mu.Lock()
	h := c.health.h
	c.health.mu.Unlock()
	if h.State != StateHealthy {
		return fmt.Errorf("cluster %s: %w: %s since %s (%s)", c.id, ErrUnavailable, h.State, h.Since.UTC().Format(time.RFC3339), h.Reason)
	}
	if p := c.currentPool(); p.stuck() >= p.size {
		c.open("STUCK")
		return fmt.Errorf("cluster %s: %w: all %d sessions are stuck in calls that have not returned", c.id, ErrUnavailable, p.size)
	}
	return nil
}

// record updates the health from an operation's outcome.
func (c *Cluster) record(err error) {
	switch Classify(err) {
	case ClassDevice:
		c.health.mu.Lock()
		c.health.consecutive++
		trip := c.health.consecutive >= c.breakerThreshold && c.health.h.State == StateHealthy
		c.health.mu.Unlock()
		if trip {
			c.open(deviceReason(err))
		}
	case ClassCredential:
		c.fail(err)
	default:
		// Only a success shows the device works: a caller-class failure (a tampered
		// ciphertext) must not keep a dying device's breaker from opening.
		if err == nil {
			c.health.mu.Lock()
			c.health.consecutive = 0
			c.health.mu.Unlock()
		}
	}
}

// deviceReason names a device fault by its CKR_* code.
func deviceReason(err error) string {
	if code, ok := Code(err); ok {
		s := code.Error() // "pkcs11: 0x30: CKR_DEVICE_ERROR"
		return s[strings.LastIndexByte(s, ' ')+1:]
	}
	return "DEVICE_ERROR"
}

// Health returns the cluster's health.
func (c *Cluster) Health() Health {
	c.health.mu.Lock()
	defer c.health.mu.Unlock()
	return c.health.h
}

func (c *Cluster) setHealth(h Health) {
	c.health.mu.Lock()
	changed := c.health.h.State != h.State
	c.health.h = h
	if h.State == StateHealthy {
		c.health.consecutive = 0
	}
	c.health.mu.Unlock()
	if changed && c.onHealth != nil {
		c.onHealth(h)
	}
}

// open opens the breaker and starts recovery, once: of callers racing here, only the one
// that makes the transition starts a recovery loop.
func (c *Cluster) open(reason string) {
	h := Health{State: StateUnavailable, Reason: reason, Since: time.Now()}
	c.health.mu.Lock()
	if c.health.h.State != StateHealthy {
		c.health.mu.Unlock()
		return
	}
	c.health.h = h
	c.health.opened++
	c.health.mu.Unlock()
	if c.onHealth != nil {
		c.onHealth(h)
	}
	go c.recoverLoop()
}

// fail marks the cluster FAILED for a refused credential. It stays failed: the PIN in the
// configuration is wrong or locked, which only an operator can fix.
func (c *Cluster) fail(err error) {
	reason := "INVALID_CREDENTIALS"
	if code, ok := Code(err); ok && code == pkcs11.CKR_PIN_LOCKED {
		reason = "USER_LOCKED_OUT"
	}
	if c.Health().State != StateFailed {
		c.setHealth(Health{State: StateFailed, Reason: reason, Since: time.Now()})
	}
}

func (c *Cluster) reloginCount() uint64 {
	c.health.mu.Lock()
	defer c.health.mu.Unlock()
	return c.health.relogins
}

// relogin logs the anchor in again after CKR_USER_NOT_LOGGED_IN. Callers that failed
// together share one C_Login: seen is the re-login count before the caller's operation,
// and a re-login made since then is taken as this caller's. A credential refusal fails the
// cluster.
func (c *Cluster) relogin(seen uint64) error {
	c.health.reloginMu.Lock()
	defer c.health.reloginMu.Unlock()
	if c.reloginCount() != seen {
		return nil
	}
	c.mu.RLock()
	anchor := c.anchor
	c.mu.RUnlock()
	err := c.api.Login(anchor, pkcs11.CKU_USER, c.pin)
	if errors.Is(err, pkcs11.Error(pkcs11.CKR_USER_ALREADY_LOGGED_IN)) {
		err = nil // another caller's re-login came first
	}
	c.health.mu.Lock()
	c.health.relogins++
	c.health.mu.Unlock()
	if err != nil {
		err = opErr(c.id, "C_Login", err)
		if Classify(err) == ClassCredential {
			c.fail(err)
		}
		return err
	}
	return nil
}

// recoverLoop retries recovery with doubling backoff until it succeeds, the cluster fails,
// or the cluster is closed.
func (c *Cluster) recoverLoop() {
	backoff := recoverMinBackoff
	for {
		select {
		case <-c.done:
			return
		case <-time.After(backoff):
		}
		err := c.recover()
		if err == nil {
			c.setHealth(Health{State: StateHealthy, Since: time.Now()})
			return
		}
		if c.Health().State == StateFailed {
			return
		}
		if c.onRecoverError != nil {
			c.onRecoverError(err)
		}
		backoff = min(2*backoff, recoverMaxBackoff)
	}
}

// recover rebuilds the cluster's connection to its token. The slow part (module, token,
// login) runs without the cluster's lock, so Stats, /readyz and Close never wait on a
// device that hangs; the new pool is swapped in at the end. In-flight calls on the old
// pool finish there; their sessions are closed as they come back.
func (c *Cluster) recover() error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c.mu.Lock()
	old, oldAnchor := c.pool, c.anchor
	c.anchor = 0 // an attempt that fails leaves none; Close then closes none
	c.mu.Unlock()
	// The old pool must be empty before the module may be re-initialised: C_Finalize under
	// a call still in flight (or stuck) would pull the module from under it.
	closeCtx, cancelClose := context.WithTimeout(ctx, 2*time.Second)
	drained := old.Close(closeCtx) == nil
	cancelClose()
	if oldAnchor != 0 {
		_ = c.api.CloseSession(oldAnchor)
		c.mod.logout(c.token.Serial)
	}
	c.handles.clear()
	if drained {
		if err := c.mod.reinitializeIfSole(); err != nil {
			return fmt.Errorf("cluster %s: recover: %w", c.id, err)
		}
	}
	slot, ti, err := findToken(c.api, c.serial, c.label)
	if err == nil && (tokenInfo(ti).Serial != c.token.Serial || tokenInfo(ti).Label != c.token.Label) {
		err = fmt.Errorf("%w: the token found is not the one the cluster was opened on", ErrTokenNotFound)
	}
	if err != nil {
		return fmt.Errorf("cluster %s: recover: %w", c.id, err)
	}
	anchor, err := c.login(slot, c.pin)
	if err != nil {
		if errors.Is(err, ErrCredential) {
			c.fail(err)
		}
		return fmt.Errorf("cluster %s: recover: %w", c.id, err)
	}
	pool := newPool(c.api, c.id, slot, old.size, old.onWait, c.stuckAfter)
	c.mu.Lock()
	if c.closed.Load() { // closed meanwhile: what was just opened is nobody's
		c.mu.Unlock()
		_ = c.api.CloseSession(anchor)
		c.mod.logout(c.token.Serial)
		return fmt.Errorf("cluster %s: recover: %w", c.id, ErrClosed)
	}
	c.slot, c.anchor, c.pool = slot, anchor, pool
	c.mu.Unlock()
	if c.cert != nil {
		if err := c.proveIdentity(ctx, func(fn func(*Session) ([]byte, error)) ([]byte, error) { return Do(ctx, pool, fn) }); err != nil {
			return fmt.Errorf("cluster %s: recover: %w", c.id, err)
		}
	}
	return nil
}

func (c *Cluster) currentPool() *Pool {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.pool
}
