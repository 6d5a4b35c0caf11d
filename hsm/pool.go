package hsm

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/pkcs11"
)

// Pool is a bounded set of worker sessions on one logged-in token. It is safe for
// concurrent use by multiple goroutines.
//
// Sessions open lazily, up to the pool size, and are reused. A session is used by one
// caller at a time (PKCS#11 sessions are not thread-safe). The login is held by the
// cluster's anchor session, not by the pool, so evicting a worker never logs the token out.
type Pool struct {
	api     PKCS11
	cluster string
	slot    uint
	size    int

	permits chan struct{} // one per session that may be in use; a full channel is a full pool
	done    chan struct{} // closed by Close: waiters give up at once
	empty   chan struct{} // closed once the pool is closed and no session is lent out
	emptied sync.Once
	waiters atomic.Int64
	onWait  func(time.Duration) // told every acquisition's wait
	// stuckAfter is how long a session may be held before its call counts as stuck.
	stuckAfter time.Duration

	mu        sync.Mutex
	idle      []pkcs11.SessionHandle
	open      int
	closed    bool
	lent      map[*Session]time.Time // sessions held by callers, since when
	waitCount uint64
	waitTotal time.Duration
	evictions [numClasses]uint64
	stuckLong uint64 // sessions given back after being held past the stuck threshold
}

// PoolStats is a snapshot of a pool, shaped like database/sql.DBStats.
type PoolStats struct {
	// Pool status.
	MaxSessions int // the cap: configured size, lowered to what the token allows
	Open        int // worker sessions open now
	InUse       int // worker sessions held by callers now
	Idle        int // worker sessions open and free now
	Waiters     int // callers waiting for a session now

	Stuck int // sessions held in a call for longer than the stuck threshold, now

	// Counters, cumulative since the pool was made (or, for the cluster's, since it opened).
	WaitCount    uint64             // acquisitions that had to wait
	WaitDuration time.Duration      // total time spent waiting
	Evictions    [numClasses]uint64 // sessions closed after an error, by Class
	StuckCalls   uint64             // calls that held a session past the stuck threshold
	Relogins     uint64             // re-logins after CKR_USER_NOT_LOGGED_IN
	BreakerOpens uint64             // times the cluster's breaker opened
}

func newPool(api PKCS11, cluster string, slot uint, size int, onWait func(time.Duration), stuckAfter time.Duration) *Pool {
	return &Pool{
		api: api, cluster: cluster, slot: slot, size: size,
		permits:    make(chan struct{}, size),
		done:       make(chan struct{}),
		empty:      make(chan struct{}),
		onWait:     onWait,
		stuckAfter: stuckAfter,
		lent:       map[*Session]time.Time{},
	}
}

// Session is one worker session, lent to a caller inside Pool.Do. It must not be kept or
// used after fn returns, nor shared between goroutines.
type Session struct {
	api     PKCS11
	cluster string
	h       pkcs11.SessionHandle
}

// Do lends fn a session and takes it back when fn returns, even if fn panics. The wait for
// a session is bounded by ctx: when it ends first, Do returns an error wrapping both
// ErrAcquireTimeout and ctx.Err(). fn's error decides the session's fate: after a
// session-class or device-class error, or a panic, the session is closed, not reused.
func (p *Pool) Do(ctx context.Context, fn func(*Session) error) (err error) {
	s, err := p.acquire(ctx)
	if err != nil {
		return err
	}
	defer func() {
		if r := recover(); r != nil {
			p.release(s, ClassSession) // an operation may be half-done on it
			panic(r)
		}
		p.release(s, Classify(err))
	}()
	return fn(s)
}

// Do is Pool.Do for a function with a result.
func Do[T any](ctx context.Context, p *Pool, fn func(*Session) (T, error)) (res T, err error) {
	err = p.Do(ctx, func(s *Session) (e error) {
		res, e = fn(s)
		return e
	})
	return res, err
}

func (p *Pool) acquire(ctx context.Context) (s *Session, err error) {
	select {
	case p.permits <- struct{}{}:
		if p.onWait != nil {
			p.onWait(0) // so the wait histogram counts every acquisition, not only the slow ones
		}
	default:
		if err := p.wait(ctx); err != nil {
			return nil, err
		}
	}
	defer func() {
		if s == nil { // take failed or panicked: give the permit back
			<-p.permits
		}
	}()
	return p.take()
}

// wait blocks for a permit until ctx ends or the pool closes.
func (p *Pool) wait(ctx context.Context) error {
	p.waiters.Add(1)
	start := time.Now()
	var err error
	select {
	case p.permits <- struct{}{}:
	case <-ctx.Done():
		err = fmt.Errorf("cluster %s: %w (pool of %d): %w", p.cluster, ErrAcquireTimeout, p.size, ctx.Err())
	case <-p.done:
		err = fmt.Errorf("cluster %s: %w", p.cluster, ErrClosed)
	}
	p.waiters.Add(-1)
	waited := time.Since(start)
	p.mu.Lock()
	p.waitCount++
	p.waitTotal += waited
	p.mu.Unlock()
	if p.onWait != nil {
		p.onWait(waited)
	}
	return err
}

// take returns an idle session or opens one; the caller holds a permit.
func (p *Pool) take() (*Session, error) {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil, fmt.Errorf("cluster %s: %w", p.cluster, ErrClosed)
	}
	if n := len(p.idle); n > 0 {
		h := p.idle[n-1]
		p.idle = p.idle[:n-1]
		s := &Session{api: p.api, cluster: p.cluster, h: h}
		p.lent[s] = time.Now()
		p.mu.Unlock()
		return s, nil
	}
	p.open++ // counted before the call so Stats never shows more in use than open
	p.mu.Unlock()
	opened := false
	defer func() {
		if !opened { // OpenSession failed or panicked
			p.mu.Lock()
			p.open--
			p.mu.Unlock()
		}
	}()
	h, err := p.api.OpenSession(p.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return nil, opErr(p.cluster, "C_OpenSession", err)
	}
	opened = true
	s := &Session{api: p.api, cluster: p.cluster, h: h}
	p.mu.Lock()
	p.lent[s] = time.Now()
	p.mu.Unlock()
	return s, nil
}

// release takes a session back. Like database/sql's putConn, the last error decides:
// a session-class or device-class failure closes it; anything else keeps it.
func (p *Pool) release(s *Session, class Class) {
	evict := class == ClassSession || class == ClassDevice
	p.mu.Lock()
	if time.Since(p.lent[s]) > p.stuckAfter {
		p.stuckLong++
	}
	drop := evict || p.closed
	if !drop {
		delete(p.lent, s)
		p.idle = append(p.idle, s.h)
	}
	p.mu.Unlock()
	if drop {
		_ = p.api.CloseSession(s.h) // best effort: the session is already unusable or unwanted
		p.mu.Lock()
		// Lent until closed: Close's caller may finalize the module once none is lent.
		delete(p.lent, s)
		p.open--
		if evict {
			p.evictions[class]++
		}
		empty := p.closed && len(p.lent) == 0
		p.mu.Unlock()
		if empty {
			p.emptied.Do(func() { close(p.empty) })
		}
	}
	<-p.permits
}

// Stats returns a consistent snapshot of the pool.
func (p *Pool) Stats() PoolStats {
	p.mu.Lock()
	defer p.mu.Unlock()
	return PoolStats{
		MaxSessions:  p.size,
		Open:         p.open,
		InUse:        p.open - len(p.idle),
		Idle:         len(p.idle),
		Waiters:      int(p.waiters.Load()),
		Stuck:        p.stuckLocked(),
		WaitCount:    p.waitCount,
		WaitDuration: p.waitTotal,
		Evictions:    p.evictions,
		StuckCalls:   p.stuckLong,
	}
}

// stuck counts the sessions held for longer than stuckAfter.
func (p *Pool) stuck() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stuckLocked()
}

func (p *Pool) stuckLocked() int {
	n := 0
	for _, since := range p.lent {
		if time.Since(since) > p.stuckAfter {
			n++
		}
	}
	return n
}

// Close stops lending sessions, waits (bounded by ctx) for the ones in use to come back
// and be closed, and closes every idle worker session. It may be called again, and waits
// again. It never calls C_Logout: the login belongs to the anchor.
func (p *Pool) Close(ctx context.Context) error {
	p.mu.Lock()
	if !p.closed {
		p.closed = true
		close(p.done)
	}
	idle := p.idle
	p.idle = nil
	p.open -= len(idle)
	empty := len(p.lent) == 0
	p.mu.Unlock()
	for _, h := range idle {
		_ = p.api.CloseSession(h)
	}
	if empty {
		p.emptied.Do(func() { close(p.empty) })
	}
	// Closing again waits again: a caller about to finalize the module must know that no
	// session is still in a call, whoever closed the pool first.
	select {
	case <-p.empty:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("cluster %s: close pool: sessions still in use: %w", p.cluster, ctx.Err())
	}
}
