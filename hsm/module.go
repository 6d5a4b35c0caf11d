package hsm

import (
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"path/filepath"
	"sync"

	"github.com/miekg/pkcs11"
)

// A module is one PKCS#11 library, initialised while at least one cluster uses it.
//
// Libraries are loaded once per process and never unloaded: miekg/pkcs11 advises against
// loading one twice, and dlclose of SoftHSM 2.6 has crashed in Ctx.Destroy
// (containers/ocicrypt#96). C_Initialize runs on the first reference and C_Finalize after
// the last is dropped, which is after every session of every pool on it is closed.
type module struct {
	path string
	ctx  *pkcs11.Ctx
	// serialise is set when the library refused OS locking: calls must then not overlap.
	serialise bool
	callMu    sync.Mutex // held around each call when serialise is set
	refs      int

	loginMu sync.Mutex
	logins  map[string]*tokenLogin // by token serial: the login our anchors share
}

// tokenLogin is a token's user login, shared by every cluster of the process on the token
// (PKCS#11 login state is per application and token). Only the PIN's SHA-256 is kept.
type tokenLogin struct {
	pin  [sha256.Size]byte
	refs int
}

// login logs the token in with pin through do, unless a cluster of ours already has: then
// the PIN must be the one that did, or the token would be used without its PIN.
func (m *module) login(serial, pin string, do func() error) error {
	sum := sha256.Sum256([]byte(pin))
	m.loginMu.Lock()
	defer m.loginMu.Unlock()
	if l := m.logins[serial]; l != nil {
		if subtle.ConstantTimeCompare(l.pin[:], sum[:]) != 1 {
			return pkcs11.Error(pkcs11.CKR_PIN_INCORRECT)
		}
		l.refs++
		return nil
	}
	err := do()
	if errors.Is(err, pkcs11.Error(pkcs11.CKR_USER_ALREADY_LOGGED_IN)) {
		err = nil // logged in by something of ours that is not a cluster
	}
	if err != nil {
		return err
	}
	if m.logins == nil {
		m.logins = map[string]*tokenLogin{}
	}
	m.logins[serial] = &tokenLogin{pin: sum, refs: 1}
	return nil
}

// logout forgets one cluster's share of the token's login.
func (m *module) logout(serial string) {
	m.loginMu.Lock()
	defer m.loginMu.Unlock()
	if l := m.logins[serial]; l != nil {
		if l.refs--; l.refs <= 0 {
			delete(m.logins, serial)
		}
	}
}

var modules = struct {
	sync.Mutex
	loaded map[string]*module // by resolved path
}{loaded: map[string]*module{}}

// openModule returns the module at path, initialised, with one more reference. The path
// must be absolute (no dlopen search path) and is resolved through symlinks, so two
// spellings of one file share one context.
func openModule(path string) (*module, error) {
	if !filepath.IsAbs(path) {
		return nil, fmt.Errorf("module %q: path must be absolute", path)
	}
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return nil, fmt.Errorf("module %s: %w", path, err)
	}
	modules.Lock()
	defer modules.Unlock()
	m := modules.loaded[real]
	if m == nil {
		ctx := pkcs11.New(real)
		if ctx == nil {
			return nil, fmt.Errorf("module %s: cannot load the PKCS#11 library", path)
		}
		m = &module{path: real, ctx: ctx}
		modules.loaded[real] = m
	}
	if m.refs == 0 {
		if err := m.initialize(); err != nil {
			return nil, fmt.Errorf("module %s: %w", path, err)
		}
	}
	m.refs++
	return m, nil
}

func (m *module) initialize() error {
	err := m.ctx.Initialize()
	if errors.Is(err, pkcs11.Error(pkcs11.CKR_CANT_LOCK)) {
		// The library cannot use OS locks: initialise without locking arguments and keep
		// our own calls from overlapping instead.
		err = m.ctx.Initialize(pkcs11.InitializeWithFlags(0))
		m.serialise = err == nil
	}
	if errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
		err = nil
	}
	if err != nil {
		return fmt.Errorf("C_Initialize: %w", err)
	}
	return nil
}

// api returns what clusters on this module call: the context, serialised if it must be.
func (m *module) api() PKCS11 {
	if !m.serialise {
		return m.ctx
	}
	return Intercept(m.ctx, func(_ string, call func() error) error {
		m.callMu.Lock()
		defer m.callMu.Unlock()
		return call()
	})
}

// reinitializeIfSole runs C_Finalize and C_Initialize when the caller's cluster is the
// module's only user: a device that went away may need it, but finalizing would pull the
// module from under every other cluster on it, so shared modules are left alone.
func (m *module) reinitializeIfSole() error {
	modules.Lock()
	defer modules.Unlock()
	if m.refs != 1 {
		return nil
	}
	_ = m.ctx.Finalize() // a dead device may refuse; initialising again is what matters
	m.loginMu.Lock()
	clear(m.logins)
	m.loginMu.Unlock()
	return m.initialize()
}

// drop releases one reference; the last one finalizes the library. Callers must have closed
// every session they opened on it first.
func (m *module) drop() error {
	modules.Lock()
	defer modules.Unlock()
	if m.refs <= 0 {
		return fmt.Errorf("module %s: released more often than opened", m.path)
	}
	m.refs--
	if m.refs > 0 {
		return nil
	}
	if err := m.ctx.Finalize(); err != nil {
		return fmt.Errorf("module %s: C_Finalize: %w", m.path, err)
	}
	return nil
}
