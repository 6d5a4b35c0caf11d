// Package hsm owns everything PKCS#11: loaded modules, the clusters (one token each), the
// bounded session pool of a cluster, the classification of PKCS#11 return values, the
// cluster identity proof, and the data objects hsmbridge keeps on a token.
//
// It knows nothing of HTTP, tenants, keystores or the store, and it imports no metrics
// library: callers observe it through Stats snapshots and Interceptors. Every PKCS#11 call
// goes through the PKCS11 seam, so tests can wrap the real module with faults.
package hsm

import "github.com/miekg/pkcs11"

// PKCS11 lists exactly the miekg/pkcs11 calls this package makes on a module. *pkcs11.Ctx
// implements it. It exists so that an Interceptor (metrics, or the fault injection of
// hsm/hsmtest) can stand between hsm and the real module; nothing else implements it.
type PKCS11 interface {
	GetSlotList(tokenPresent bool) ([]uint, error)
	GetTokenInfo(slotID uint) (pkcs11.TokenInfo, error)
	InitToken(slotID uint, pin string, label string) error
	OpenSession(slotID uint, flags uint) (pkcs11.SessionHandle, error)
	CloseSession(sh pkcs11.SessionHandle) error
	Login(sh pkcs11.SessionHandle, userType uint, pin string) error
	InitPIN(sh pkcs11.SessionHandle, pin string) error
	FindObjectsInit(sh pkcs11.SessionHandle, temp []*pkcs11.Attribute) error
	FindObjects(sh pkcs11.SessionHandle, max int) ([]pkcs11.ObjectHandle, bool, error)
	FindObjectsFinal(sh pkcs11.SessionHandle) error
	GetAttributeValue(sh pkcs11.SessionHandle, o pkcs11.ObjectHandle, a []*pkcs11.Attribute) ([]*pkcs11.Attribute, error)
	CreateObject(sh pkcs11.SessionHandle, temp []*pkcs11.Attribute) (pkcs11.ObjectHandle, error)
	DestroyObject(sh pkcs11.SessionHandle, oh pkcs11.ObjectHandle) error
	GenerateKey(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, temp []*pkcs11.Attribute) (pkcs11.ObjectHandle, error)
	GenerateKeyPair(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, public, private []*pkcs11.Attribute) (pkcs11.ObjectHandle, pkcs11.ObjectHandle, error)
	EncryptInit(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error
	Encrypt(sh pkcs11.SessionHandle, message []byte) ([]byte, error)
	DecryptInit(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error
	Decrypt(sh pkcs11.SessionHandle, cipher []byte) ([]byte, error)
	SignInit(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error
	Sign(sh pkcs11.SessionHandle, message []byte) ([]byte, error)
	GenerateRandom(sh pkcs11.SessionHandle, length int) ([]byte, error)
}

var _ PKCS11 = (*pkcs11.Ctx)(nil)

// An Interceptor stands around one PKCS#11 call: fn is the function's name ("C_Sign") and
// call performs it. It returns call's error, or one of its own instead of calling (a fault).
// Interceptors must be safe for concurrent use.
type Interceptor func(fn string, call func() error) error

// Intercept returns p with ic around every call. The result is what a cluster talks to.
func Intercept(p PKCS11, ic Interceptor) PKCS11 {
	if ic == nil {
		return p
	}
	return intercepted{p: p, ic: ic}
}

type intercepted struct {
	p  PKCS11
	ic Interceptor
}

func (w intercepted) GetSlotList(tokenPresent bool) (slots []uint, err error) {
	err = w.ic("C_GetSlotList", func() (e error) { slots, e = w.p.GetSlotList(tokenPresent); return })
	return
}

func (w intercepted) GetTokenInfo(slotID uint) (ti pkcs11.TokenInfo, err error) {
	err = w.ic("C_GetTokenInfo", func() (e error) { ti, e = w.p.GetTokenInfo(slotID); return })
	return
}

func (w intercepted) InitToken(slotID uint, pin string, label string) error {
	return w.ic("C_InitToken", func() error { return w.p.InitToken(slotID, pin, label) })
}

func (w intercepted) OpenSession(slotID uint, flags uint) (sh pkcs11.SessionHandle, err error) {
	err = w.ic("C_OpenSession", func() (e error) { sh, e = w.p.OpenSession(slotID, flags); return })
	return
}

func (w intercepted) CloseSession(sh pkcs11.SessionHandle) error {
	return w.ic("C_CloseSession", func() error { return w.p.CloseSession(sh) })
}

func (w intercepted) Login(sh pkcs11.SessionHandle, userType uint, pin string) error {
	return w.ic("C_Login", func() error { return w.p.Login(sh, userType, pin) })
}

func (w intercepted) InitPIN(sh pkcs11.SessionHandle, pin string) error {
	return w.ic("C_InitPIN", func() error { return w.p.InitPIN(sh, pin) })
}

func (w intercepted) FindObjectsInit(sh pkcs11.SessionHandle, temp []*pkcs11.Attribute) error {
	return w.ic("C_FindObjectsInit", func() error { return w.p.FindObjectsInit(sh, temp) })
}

func (w intercepted) FindObjects(sh pkcs11.SessionHandle, max int) (hs []pkcs11.ObjectHandle, more bool, err error) {
	err = w.ic("C_FindObjects", func() (e error) { hs, more, e = w.p.FindObjects(sh, max); return })
	return
}

func (w intercepted) FindObjectsFinal(sh pkcs11.SessionHandle) error {
	return w.ic("C_FindObjectsFinal", func() error { return w.p.FindObjectsFinal(sh) })
}

func (w intercepted) GetAttributeValue(sh pkcs11.SessionHandle, o pkcs11.ObjectHandle, a []*pkcs11.Attribute) (out []*pkcs11.Attribute, err error) {
	err = w.ic("C_GetAttributeValue", func() (e error) { out, e = w.p.GetAttributeValue(sh, o, a); return })
	return
}

func (w intercepted) CreateObject(sh pkcs11.SessionHandle, temp []*pkcs11.Attribute) (oh pkcs11.ObjectHandle, err error) {
	err = w.ic("C_CreateObject", func() (e error) { oh, e = w.p.CreateObject(sh, temp); return })
	return
}

func (w intercepted) DestroyObject(sh pkcs11.SessionHandle, oh pkcs11.ObjectHandle) error {
	return w.ic("C_DestroyObject", func() error { return w.p.DestroyObject(sh, oh) })
}

func (w intercepted) GenerateKey(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, temp []*pkcs11.Attribute) (oh pkcs11.ObjectHandle, err error) {
	err = w.ic("C_GenerateKey", func() (e error) { oh, e = w.p.GenerateKey(sh, m, temp); return })
	return
}

func (w intercepted) EncryptInit(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error {
	return w.ic("C_EncryptInit", func() error { return w.p.EncryptInit(sh, m, o) })
}

func (w intercepted) Encrypt(sh pkcs11.SessionHandle, message []byte) (out []byte, err error) {
	err = w.ic("C_Encrypt", func() (e error) { out, e = w.p.Encrypt(sh, message); return })
	return
}

func (w intercepted) DecryptInit(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error {
	return w.ic("C_DecryptInit", func() error { return w.p.DecryptInit(sh, m, o) })
}

func (w intercepted) Decrypt(sh pkcs11.SessionHandle, cipher []byte) (out []byte, err error) {
	err = w.ic("C_Decrypt", func() (e error) { out, e = w.p.Decrypt(sh, cipher); return })
	return
}

func (w intercepted) GenerateKeyPair(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, public, private []*pkcs11.Attribute) (pub, priv pkcs11.ObjectHandle, err error) {
	err = w.ic("C_GenerateKeyPair", func() (e error) { pub, priv, e = w.p.GenerateKeyPair(sh, m, public, private); return })
	return
}

func (w intercepted) SignInit(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error {
	return w.ic("C_SignInit", func() error { return w.p.SignInit(sh, m, o) })
}

func (w intercepted) Sign(sh pkcs11.SessionHandle, message []byte) (sig []byte, err error) {
	err = w.ic("C_Sign", func() (e error) { sig, e = w.p.Sign(sh, message); return })
	return
}

func (w intercepted) GenerateRandom(sh pkcs11.SessionHandle, length int) (b []byte, err error) {
	err = w.ic("C_GenerateRandom", func() (e error) { b, e = w.p.GenerateRandom(sh, length); return })
	return
}
