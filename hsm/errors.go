package hsm

import (
	"errors"
	"fmt"

	"github.com/miekg/pkcs11"
)

// Class says what a failed PKCS#11 call means for the session, the login and the cluster.
// Return values are classified here, once; callers branch on the Class, never on CKR_* codes.
type Class uint8

const (
	// ClassOther is an error that is not a PKCS#11 return value, or one with no rule.
	ClassOther Class = iota
	// ClassCaller is bad input (data, ciphertext, signature, mechanism): answer 4xx, keep the session.
	ClassCaller
	// ClassSession means the session or an object handle is gone: evict the session, drop handles.
	ClassSession
	// ClassLogin means the token forgot our login: log in again, serialised.
	ClassLogin
	// ClassCredential is a wrong, locked or expired PIN: never retry, or the token locks.
	ClassCredential
	// ClassDevice is the module or token failing: the cluster is unhealthy.
	ClassDevice

	numClasses = int(ClassDevice) + 1
)

var classNames = [numClasses]string{"other", "caller", "session", "login", "credential", "device"}

func (c Class) String() string {
	if int(c) < numClasses {
		return classNames[c]
	}
	return fmt.Sprintf("class(%d)", c)
}

var codeClasses = map[pkcs11.Error]Class{
	pkcs11.CKR_ARGUMENTS_BAD:                ClassCaller,
	pkcs11.CKR_DATA_INVALID:                 ClassCaller,
	pkcs11.CKR_DATA_LEN_RANGE:               ClassCaller,
	pkcs11.CKR_ENCRYPTED_DATA_INVALID:       ClassCaller,
	pkcs11.CKR_ENCRYPTED_DATA_LEN_RANGE:     ClassCaller,
	pkcs11.CKR_SIGNATURE_INVALID:            ClassCaller,
	pkcs11.CKR_SIGNATURE_LEN_RANGE:          ClassCaller,
	pkcs11.CKR_MECHANISM_INVALID:            ClassCaller,
	pkcs11.CKR_MECHANISM_PARAM_INVALID:      ClassCaller,
	pkcs11.CKR_KEY_FUNCTION_NOT_PERMITTED:   ClassCaller,
	pkcs11.CKR_KEY_TYPE_INCONSISTENT:        ClassCaller,
	pkcs11.CKR_KEY_SIZE_RANGE:               ClassCaller,
	pkcs11.CKR_ATTRIBUTE_SENSITIVE:          ClassCaller,
	pkcs11.CKR_ATTRIBUTE_VALUE_INVALID:      ClassCaller,
	pkcs11.CKR_ATTRIBUTE_TYPE_INVALID:       ClassCaller,
	pkcs11.CKR_TEMPLATE_INCOMPLETE:          ClassCaller,
	pkcs11.CKR_TEMPLATE_INCONSISTENT:        ClassCaller,
	pkcs11.CKR_BUFFER_TOO_SMALL:             ClassCaller,
	pkcs11.CKR_SESSION_HANDLE_INVALID:       ClassSession,
	pkcs11.CKR_SESSION_CLOSED:               ClassSession,
	pkcs11.CKR_OBJECT_HANDLE_INVALID:        ClassSession,
	pkcs11.CKR_KEY_HANDLE_INVALID:           ClassSession,
	pkcs11.CKR_OPERATION_ACTIVE:             ClassSession,
	pkcs11.CKR_OPERATION_NOT_INITIALIZED:    ClassSession,
	pkcs11.CKR_USER_NOT_LOGGED_IN:           ClassLogin,
	pkcs11.CKR_PIN_INCORRECT:                ClassCredential,
	pkcs11.CKR_PIN_INVALID:                  ClassCredential,
	pkcs11.CKR_PIN_LEN_RANGE:                ClassCredential,
	pkcs11.CKR_PIN_LOCKED:                   ClassCredential,
	pkcs11.CKR_PIN_EXPIRED:                  ClassCredential,
	pkcs11.CKR_USER_PIN_NOT_INITIALIZED:     ClassCredential,
	pkcs11.CKR_DEVICE_ERROR:                 ClassDevice,
	pkcs11.CKR_DEVICE_MEMORY:                ClassDevice,
	pkcs11.CKR_DEVICE_REMOVED:               ClassDevice,
	pkcs11.CKR_TOKEN_NOT_PRESENT:            ClassDevice,
	pkcs11.CKR_TOKEN_NOT_RECOGNIZED:         ClassDevice,
	pkcs11.CKR_GENERAL_ERROR:                ClassDevice,
	pkcs11.CKR_FUNCTION_FAILED:              ClassDevice,
	pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED:     ClassDevice,
	pkcs11.CKR_SLOT_ID_INVALID:              ClassDevice,
	pkcs11.CKR_HOST_MEMORY:                  ClassDevice,
	pkcs11.CKR_SESSION_COUNT:                ClassDevice,
	pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED: ClassOther,
}

// classify maps one call's return value to its class. The call matters as well as the code:
// SoftHSM (and nShield, as CKR_FUNCTION_FAILED) reports a bad GCM tag from C_Decrypt as a
// generic failure while the session stays usable, so for C_Decrypt those are the caller's
// data, not a device fault — or one tampered ciphertext would take the cluster down.
func classify(fn string, code pkcs11.Error) Class {
	if fn == "C_Decrypt" && (code == pkcs11.CKR_GENERAL_ERROR || code == pkcs11.CKR_FUNCTION_FAILED) {
		return ClassCaller
	}
	if c, ok := codeClasses[code]; ok {
		return c
	}
	return ClassOther
}

// Classify returns the class of err: the one recorded in an *OpError, else that of a bare
// pkcs11.Error anywhere in the chain, else ClassOther.
func Classify(err error) Class {
	if err == nil {
		return ClassOther
	}
	if oe, ok := errors.AsType[*OpError](err); ok {
		return oe.Class
	}
	if code, ok := errors.AsType[pkcs11.Error](err); ok {
		return classify("", code)
	}
	return ClassOther
}

// ClassifyCall returns the class of err as the return value of the PKCS#11 function fn:
// for what sees calls one by one, such as an Interceptor.
func ClassifyCall(fn string, err error) Class {
	if code, ok := errors.AsType[pkcs11.Error](err); ok {
		return classify(fn, code)
	}
	return Classify(err)
}

// OpError is a failed PKCS#11 call on a cluster. It reads like
// "cluster c1: C_Sign: CKR_DEVICE_ERROR" and unwraps to the pkcs11.Error.
type OpError struct {
	Cluster string
	Func    string
	Class   Class
	Err     error
}

func (e *OpError) Error() string { return fmt.Sprintf("cluster %s: %s: %v", e.Cluster, e.Func, e.Err) }
func (e *OpError) Unwrap() error { return e.Err }

// opErr wraps a call's error with its cluster, function and class; nil stays nil.
func opErr(cluster, fn string, err error) error {
	if err == nil {
		return nil
	}
	class := ClassOther
	if code, ok := errors.AsType[pkcs11.Error](err); ok {
		class = classify(fn, code)
	}
	return &OpError{Cluster: cluster, Func: fn, Class: class, Err: err}
}

// Code returns the CKR_* value inside err, if there is one (for logs and metric labels).
func Code(err error) (pkcs11.Error, bool) {
	return errors.AsType[pkcs11.Error](err)
}

var (
	// ErrAcquireTimeout is returned when no session came free before the context ended.
	ErrAcquireTimeout = errors.New("hsm: timed out waiting for a session")
	// ErrClosed is returned by a pool or cluster after Close.
	ErrClosed = errors.New("hsm: closed")
	// ErrCredential is returned when the token refuses the PIN at log-in. The PIN is not
	// tried again: retrying a wrong PIN locks the token.
	ErrCredential = errors.New("hsm: token refused the PIN")
	// ErrTokenNotFound is returned when no slot holds a token matching the selector.
	ErrTokenNotFound = errors.New("hsm: token not found")
	// ErrObjectNotFound is returned when a looked-up object is not on the token.
	ErrObjectNotFound = errors.New("hsm: object not found")
	// ErrAmbiguous is returned when a lookup that must find one object or token finds several.
	ErrAmbiguous = errors.New("hsm: more than one match")
	// ErrIdentity is returned when the token fails to prove it holds the identity key.
	ErrIdentity = errors.New("hsm: identity proof failed")
)
