package api

import (
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"

	"github.com/hsmbridge/hsmbridge/keystore"
)

// wireError is one row of the error table: what the caller sees.
type wireError struct {
	Status int
	Code   string
	// Msg is the message when the failure carries none of its own.
	Msg string
}

// kindErrors maps every keystore.Kind to the wire. It is the one place where domain
// failures become statuses and KMS codes; TestKindTableComplete fails if a Kind lacks a row.
var kindErrors = map[keystore.Kind]wireError{
	keystore.KindInternal:         {http.StatusInternalServerError, "KMS.0101", "internal error"},
	keystore.KindMissingParameter: {http.StatusBadRequest, "KMS.0204", "parameters missing in the request"},
	keystore.KindInvalidParameter: {http.StatusBadRequest, "KMS.8001", "invalid keystore parameter"},
	keystore.KindDuplicateAlias:   {http.StatusBadRequest, "KMS.8002", "keystore alias already exists"},
	keystore.KindKeystoreNotFound: {http.StatusBadRequest, "KMS.8003", "the keystore does not exist"},
	keystore.KindClusterUnknown:   {http.StatusBadRequest, "KMS.8004", "the HSM cluster does not exist or is unreachable"},
	keystore.KindClusterBound:     {http.StatusBadRequest, "KMS.8005", "the HSM cluster is already bound to a keystore"},
	keystore.KindTokenMismatch:    {http.StatusBadRequest, "KMS.8004", "the HSM cluster's token is not the one the keystore is bound to"},
	keystore.KindCACertificate:    {http.StatusBadRequest, "KMS.8006", "the CA certificate is invalid or not the cluster's"},
	keystore.KindKeystoreDisabled: {http.StatusBadRequest, "KMS.8007", "the keystore is disabled"},
	keystore.KindStateConflict:    {http.StatusBadRequest, "KMS.8008", "the keystore's state does not allow this"},
	keystore.KindUnsupportedType:  {http.StatusBadRequest, "KMS.0340", "the keystore type is not supported"},
	keystore.KindHSMUnavailable:   {http.StatusBadGateway, "KMS.0102", "the HSM cluster is unavailable"},
	keystore.KindHSMTimeout:       {http.StatusGatewayTimeout, "KMS.0103", "the HSM cluster did not answer in time"},
	keystore.KindHSMFailure:       {http.StatusInternalServerError, "KMS.0101", "the HSM cluster failed"},
}

// Failures that arise in the HTTP layer itself, before the domain is reached.
var (
	errUnknownRoute    = &apiError{wireError{http.StatusBadRequest, "KMS.0201", "invalid request URL"}, ""}
	errMethod          = &apiError{wireError{http.StatusMethodNotAllowed, "KMS.0215", "request method not supported"}, ""}
	errMalformedJSON   = &apiError{wireError{http.StatusBadRequest, "KMS.0202", "invalid JSON format of the request body"}, ""}
	errBodyTooLarge    = &apiError{wireError{http.StatusBadRequest, "KMS.0203", "request body too large"}, ""}
	errInvalidLimit    = &apiError{wireError{http.StatusBadRequest, "KMS.1601", "invalid limit"}, ""}
	errInvalidOffset   = &apiError{wireError{http.StatusBadRequest, "KMS.1603", "invalid offset"}, ""}
	errProjectDenied   = &apiError{wireError{http.StatusForbidden, "KMS.0321", "the project in the URL is not one this credential may use"}, ""}
	errUnauthenticated = wireError{http.StatusUnauthorized, "APIGW.0301", "Incorrect IAM authentication information"}
)

// apiError is a failure of the HTTP layer: a row, and optionally a more precise message.
type apiError struct {
	wireError
	detail string
}

func (e *apiError) Error() string {
	if e.detail != "" {
		return e.Code + ": " + e.detail
	}
	return e.Code + ": " + e.Msg
}

func (e *apiError) with(detail string) *apiError { return &apiError{e.wireError, detail} }

// authError is a missing or rejected credential: answered with the gateway's flat body.
type authError struct{ reason string }

func (e *authError) Error() string { return "authentication failed: " + e.reason }

// resolve finds the row and message for err.
func resolve(err error) (wireError, string) {
	if ae, ok := errors.AsType[*apiError](err); ok {
		msg := ae.Msg
		if ae.detail != "" {
			msg = ae.detail
		}
		return ae.wireError, msg
	}
	if ke, ok := errors.AsType[*keystore.Error](err); ok {
		row, ok := kindErrors[ke.Kind]
		if !ok {
			row = kindErrors[keystore.KindInternal]
		}
		msg := ke.Msg
		if msg == "" {
			msg = row.Msg
		}
		return row, msg
	}
	return kindErrors[keystore.KindInternal], kindErrors[keystore.KindInternal].Msg
}

// writeError answers err in the service's error format; an internal failure's cause goes to
// the log with the request id, never to the caller.
func writeError(w http.ResponseWriter, r *http.Request, log *slog.Logger, err error) {
	if ae, ok := errors.AsType[*authError](err); ok {
		writeJSON(w, errUnauthenticated.Status, map[string]string{
			"error_code": errUnauthenticated.Code,
			"error_msg":  errUnauthenticated.Msg + ": " + ae.reason,
			"request_id": requestID(r.Context()),
		})
		return
	}
	row, msg := resolve(err)
	if row.Status >= 500 {
		log.ErrorContext(r.Context(), "request failed", "request_id", requestID(r.Context()), "code", row.Code, "err", err)
	}
	writeJSON(w, row.Status, map[string]any{"error": map[string]string{"error_code": row.Code, "error_msg": msg}})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json;charset=UTF-8")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v) // the client is gone if this fails
}
