package hsm_test

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/hsmbridge/hsmbridge/hsm"
	"github.com/hsmbridge/hsmbridge/hsm/hsmtest"
	"github.com/miekg/pkcs11"
)

// TestClassify covers every row of the DESIGN "Session pool" table.
func TestClassify(t *testing.T) {
	tests := []struct {
		code uint
		want hsm.Class
	}{
		{pkcs11.CKR_DATA_INVALID, hsm.ClassCaller},
		{pkcs11.CKR_DATA_LEN_RANGE, hsm.ClassCaller},
		{pkcs11.CKR_ENCRYPTED_DATA_INVALID, hsm.ClassCaller},
		{pkcs11.CKR_ENCRYPTED_DATA_LEN_RANGE, hsm.ClassCaller},
		{pkcs11.CKR_SIGNATURE_INVALID, hsm.ClassCaller},
		{pkcs11.CKR_MECHANISM_INVALID, hsm.ClassCaller},

		{pkcs11.CKR_SESSION_HANDLE_INVALID, hsm.ClassSession},
		{pkcs11.CKR_SESSION_CLOSED, hsm.ClassSession},
		{pkcs11.CKR_OBJECT_HANDLE_INVALID, hsm.ClassSession},

		{pkcs11.CKR_USER_NOT_LOGGED_IN, hsm.ClassLogin},

		{pkcs11.CKR_PIN_INCORRECT, hsm.ClassCredential},
		{pkcs11.CKR_PIN_LOCKED, hsm.ClassCredential},
		{pkcs11.CKR_PIN_EXPIRED, hsm.ClassCredential},

		{pkcs11.CKR_DEVICE_ERROR, hsm.ClassDevice},
		{pkcs11.CKR_DEVICE_REMOVED, hsm.ClassDevice},
		{pkcs11.CKR_TOKEN_NOT_PRESENT, hsm.ClassDevice},
		{pkcs11.CKR_GENERAL_ERROR, hsm.ClassDevice},
	}
	for _, tt := range tests {
		code := pkcs11.Error(tt.code)
		t.Run(code.Error(), func(t *testing.T) {
			if got := hsm.Classify(code); got != tt.want {
				t.Errorf("Classify(%v) = %v, want %v", code, got, tt.want)
			}
			wrapped := fmt.Errorf("x: %w", code)
			if got := hsm.Classify(wrapped); got != tt.want {
				t.Errorf("Classify(wrapped %v) = %v, want %v", code, got, tt.want)
			}
			joined := fmt.Errorf("y: %w", errors.Join(errors.New("other"), wrapped))
			if got := hsm.Classify(joined); got != tt.want {
				t.Errorf("Classify(joined %v) = %v, want %v", code, got, tt.want)
			}
		})
	}
}

func TestClassify_NotPKCS11(t *testing.T) {
	for _, err := range []error{nil, errors.New("boom"), fmt.Errorf("x: %w", hsm.ErrAmbiguous)} {
		if got := hsm.Classify(err); got != hsm.ClassOther {
			t.Errorf("Classify(%v) = %v, want %v", err, got, hsm.ClassOther)
		}
	}
}

// An *OpError's recorded class wins over its code: that is how a call-specific rule (the
// C_Decrypt one) survives wrapping.
func TestClassify_OpErrorClassWins(t *testing.T) {
	oe := &hsm.OpError{Cluster: "c1", Func: "C_Decrypt", Class: hsm.ClassCaller, Err: pkcs11.Error(pkcs11.CKR_GENERAL_ERROR)}
	if got := hsm.Classify(fmt.Errorf("decrypt: %w", oe)); got != hsm.ClassCaller {
		t.Errorf("Classify = %v, want %v", got, hsm.ClassCaller)
	}
}

func TestOpError(t *testing.T) {
	oe := &hsm.OpError{Cluster: "c1", Func: "C_Sign", Class: hsm.ClassDevice, Err: pkcs11.Error(pkcs11.CKR_DEVICE_ERROR)}
	msg := oe.Error()
	if !strings.HasPrefix(msg, "cluster c1: C_Sign: ") || !strings.Contains(msg, "CKR_DEVICE_ERROR") {
		t.Errorf("message %q, want it like %q", msg, "cluster c1: C_Sign: CKR_DEVICE_ERROR")
	}
	err := fmt.Errorf("sign: %w", oe)
	if !errors.Is(err, pkcs11.Error(pkcs11.CKR_DEVICE_ERROR)) {
		t.Error("errors.Is(wrapped OpError, CKR_DEVICE_ERROR) = false")
	}
	if code, ok := hsm.Code(err); !ok || code != pkcs11.CKR_DEVICE_ERROR {
		t.Errorf("Code = %v, %v; want CKR_DEVICE_ERROR", code, ok)
	}
}

func TestClassString(t *testing.T) {
	want := map[hsm.Class]string{
		hsm.ClassOther: "other", hsm.ClassCaller: "caller", hsm.ClassSession: "session",
		hsm.ClassLogin: "login", hsm.ClassCredential: "credential", hsm.ClassDevice: "device",
	}
	for c, s := range want {
		if c.String() != s {
			t.Errorf("Class(%d).String() = %q, want %q", c, c.String(), s)
		}
	}
	if s := hsm.Class(200).String(); s != "class(200)" {
		t.Errorf("Class(200).String() = %q", s)
	}
}

// TestClassify_ThroughCluster_FaultInjected checks that a real call path wraps a failure as
// an *OpError naming the cluster and function, with the class of its code: C_Sign +
// CKR_GENERAL_ERROR is a device fault, and the session it happened on is not reused.
//
// The C_Decrypt + CKR_GENERAL_ERROR → caller rule (SoftHSM's bad GCM tag) is not reachable
// from outside the package yet: no exported method calls C_Decrypt.
func TestClassify_ThroughCluster_FaultInjected(t *testing.T) {
	var f hsmtest.Faults
	cl, tok := newCluster(t, intercept(f.Interceptor()))
	f.Fail("C_Sign", pkcs11.CKR_GENERAL_ERROR, 1)
	err := cl.ProveIdentity(t.Context())
	if err == nil {
		t.Fatal("ProveIdentity succeeded through a faulted C_Sign")
	}
	oe, ok := errors.AsType[*hsm.OpError](err)
	if !ok {
		t.Fatalf("no *hsm.OpError in %v", err)
	}
	if oe.Cluster != tok.ClusterID || oe.Func != "C_Sign" || oe.Class != hsm.ClassDevice {
		t.Errorf("OpError{Cluster %q, Func %q, Class %v}, want {%q, C_Sign, device}", oe.Cluster, oe.Func, oe.Class, tok.ClusterID)
	}
	if want := "cluster " + tok.ClusterID + ": C_Sign: "; !strings.Contains(err.Error(), want) {
		t.Errorf("message %q does not contain %q", err, want)
	}
	if got := hsm.Classify(err); got != hsm.ClassDevice {
		t.Errorf("Classify = %v, want device", got)
	}
	if ev := cl.Stats().Evictions[hsm.ClassDevice]; ev != 1 {
		t.Errorf("Evictions[device] = %d, want 1", ev)
	}
	if err := cl.ProveIdentity(t.Context()); err != nil {
		t.Fatalf("ProveIdentity after the fault: %v", err)
	}
}
