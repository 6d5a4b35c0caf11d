package bench

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/hsmbridge/hsmbridge/hsm"
)

type opKind int

const (
	opECDSA opKind = iota // ECDSA P-256 sign of a SHA-256 digest
	opRSA                 // RSA-2048 PKCS#1 v1.5 sign of a SHA-256 digest
	opAES                 // AES-256-GCM encrypt of 256 bytes, fresh 96-bit IV, 128-bit tag
)

func (o opKind) String() string { return [...]string{"ECDSA-P256", "RSA-2048", "AES-GCM-256B"}[o] }

type pathKind int

const (
	pathRaw  pathKind = iota // miekg/pkcs11 on the token, one session per worker: the ceiling
	pathHSM                  // package hsm in process
	pathHTTP                 // the daemon over HTTP keep-alive
	pathBare                 // a bare HTTP handler of encrypt-data's response size, no HSM
)

func (p pathKind) String() string { return [...]string{"raw", "hsm", "http", "bare-http"}[p] }

// worker is one closed-loop client: op performs one operation, on state of its own.
type worker struct {
	op func() error
}

// workers makes n workers of path p for op o, each having done one operation already
// (sessions opened, connections made), and a func that releases them.
func (f *fixture) workers(p pathKind, o opKind, n int) ([]worker, func(), error) {
	var ws []worker
	var cleanups []func()
	done := func() {
		for _, c := range slices.Backward(cleanups) {
			c()
		}
	}
	var mk func() (worker, func(), error)
	switch p {
	case pathRaw:
		mk = func() (worker, func(), error) { return f.raw.worker(o, f.digest, f.plain) }
	case pathHSM:
		mk = func() (worker, func(), error) { return f.hsmWorker(o), func() {}, nil }
	case pathHTTP, pathBare:
		var url string
		var body []byte
		if p == pathHTTP {
			d, err := f.startDaemon()
			if err != nil {
				return nil, nil, err
			}
			url, body = d.request(o)
		} else {
			b, err := f.startBare()
			if err != nil {
				return nil, nil, err
			}
			url, body = b.url, b.reqBody
		}
		client := newClient(n)
		cleanups = append(cleanups, client.CloseIdleConnections)
		mk = func() (worker, func(), error) {
			return httpWorker(client, url, f.env.AuthToken, body), func() {}, nil
		}
	}
	for range n {
		w, c, err := mk()
		if err != nil {
			done()
			return nil, nil, err
		}
		cleanups = append(cleanups, c)
		ws = append(ws, w)
	}
	for _, w := range ws { // one operation each, outside any timing: proves the path works
		if err := w.op(); err != nil {
			done()
			return nil, nil, fmt.Errorf("%s %s: first operation: %w", p, o, err)
		}
	}
	return ws, done, nil
}

// rawToken is the token straight through miekg/pkcs11, in this process: its own Ctx on the
// module hsm also loaded (dlopen hands back the same library, whose C_Initialize then says
// CKR_CRYPTOKI_ALREADY_INITIALIZED). It is never finalized: the hsm cluster's close does that.
type rawToken struct {
	ctx          *pkcs11.Ctx
	slot         uint
	anchor       pkcs11.SessionHandle // holds the login (shared with hsm's: one per application)
	ec, rsa, aes pkcs11.ObjectHandle
}

func openRaw(module, serial, pin string) (*rawToken, error) {
	ctx := pkcs11.New(module)
	if ctx == nil {
		return nil, fmt.Errorf("cannot load %s", module)
	}
	if err := ctx.Initialize(); err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
		return nil, fmt.Errorf("C_Initialize: %w", err)
	}
	r := &rawToken{ctx: ctx}
	slots, err := ctx.GetSlotList(true)
	if err != nil {
		return nil, err
	}
	found := false
	for _, s := range slots {
		ti, err := ctx.GetTokenInfo(s)
		if err == nil && strings.TrimRight(ti.SerialNumber, " \x00") == serial {
			r.slot, found = s, true
			break
		}
	}
	if !found {
		return nil, fmt.Errorf("no token with serial %q", serial)
	}
	if r.anchor, err = ctx.OpenSession(r.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION); err != nil {
		return nil, err
	}
	if err := ctx.Login(r.anchor, pkcs11.CKU_USER, pin); err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_USER_ALREADY_LOGGED_IN)) {
		return nil, fmt.Errorf("C_Login: %w", err)
	}
	for _, k := range []struct {
		h     *pkcs11.ObjectHandle
		id    string
		class uint
	}{{&r.ec, ecID, pkcs11.CKO_PRIVATE_KEY}, {&r.rsa, rsaID, pkcs11.CKO_PRIVATE_KEY}, {&r.aes, aesID, pkcs11.CKO_SECRET_KEY}} {
		if *k.h, err = r.find(k.id, k.class); err != nil {
			return nil, err
		}
	}
	return r, nil
}

// find looks a key up by CKA_ID and class, once at set-up.
func (r *rawToken) find(id string, class uint) (pkcs11.ObjectHandle, error) {
	if err := r.ctx.FindObjectsInit(r.anchor, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, class),
		pkcs11.NewAttribute(pkcs11.CKA_ID, []byte(id)),
	}); err != nil {
		return 0, err
	}
	hs, _, err := r.ctx.FindObjects(r.anchor, 2)
	if ferr := r.ctx.FindObjectsFinal(r.anchor); err == nil {
		err = ferr
	}
	if err != nil {
		return 0, err
	}
	if len(hs) != 1 {
		return 0, fmt.Errorf("key %s: %d objects of class %d", id, len(hs), class)
	}
	return hs[0], nil
}

func (r *rawToken) close() { _ = r.ctx.CloseSession(r.anchor) }

// worker opens the worker's own session; one operation is C_*Init plus the single-part call.
func (r *rawToken) worker(o opKind, digest, plain []byte) (worker, func(), error) {
	s, err := r.ctx.OpenSession(r.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return worker{}, nil, fmt.Errorf("raw C_OpenSession: %w", err)
	}
	done := func() { _ = r.ctx.CloseSession(s) }
	sign := func(mech []*pkcs11.Mechanism, key pkcs11.ObjectHandle, in []byte) func() error {
		return func() error {
			if err := r.ctx.SignInit(s, mech, key); err != nil {
				return fmt.Errorf("C_SignInit: %w", err)
			}
			_, err := r.ctx.Sign(s, in)
			return err
		}
	}
	switch o {
	case opECDSA:
		return worker{sign([]*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil)}, r.ec, digest)}, done, nil
	case opRSA:
		return worker{sign([]*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS, nil)}, r.rsa,
			slices.Concat(sha256DigestInfo, digest))}, done, nil
	default:
		iv := make([]byte, 12)
		return worker{func() error {
			_, _ = rand.Read(iv) // unique per operation, as GCM needs
			params := pkcs11.NewGCMParams(iv, nil, 128)
			defer params.Free() // C memory
			if err := r.ctx.EncryptInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}, r.aes); err != nil {
				return fmt.Errorf("C_EncryptInit: %w", err)
			}
			_, err := r.ctx.Encrypt(s, plain)
			return err
		}}, done, nil
	}
}

// hsmWorker calls the cluster as the daemon's service layer does.
func (f *fixture) hsmWorker(o opKind) worker {
	ctx := context.Background()
	switch o {
	case opECDSA:
		return worker{func() error {
			_, err := f.cl.SignDigest(ctx, ecID, hsm.SchemeECDSA, crypto.SHA256, f.digest)
			return err
		}}
	case opRSA:
		return worker{func() error {
			_, err := f.cl.SignDigest(ctx, rsaID, hsm.SchemePKCS1v15, crypto.SHA256, f.digest)
			return err
		}}
	default:
		iv := make([]byte, 12)
		return worker{func() error {
			_, _ = rand.Read(iv)
			_, err := f.cl.EncryptGCM(ctx, aesID, iv, nil, f.plain)
			return err
		}}
	}
}

// newClient is one keep-alive client for n workers: at most n connections, all kept idle.
func newClient(n int) *http.Client {
	return &http.Client{
		Timeout: 30 * time.Second,
		Transport: &http.Transport{
			Proxy:               nil,
			MaxIdleConns:        n * 2,
			MaxIdleConnsPerHost: n * 2,
			MaxConnsPerHost:     n,
			IdleConnTimeout:     time.Minute,
			DisableCompression:  true,
		},
	}
}

// httpWorker POSTs body to url and reads the whole answer, which must be a 200.
func httpWorker(client *http.Client, url, token string, body []byte) worker {
	return worker{func() error {
		req, err := http.NewRequest(http.MethodPost, url, bytes.NewReader(body))
		if err != nil {
			return err
		}
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("X-Auth-Token", token)
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		var b []byte
		if resp.StatusCode != http.StatusOK {
			b, _ = io.ReadAll(io.LimitReader(resp.Body, 1024))
		} else {
			_, err = io.Copy(io.Discard, resp.Body)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("POST %s: status %d: %s", url, resp.StatusCode, b)
		}
		return err
	}}
}
