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
	keystore.KindHSMBreakerOpen:   {http.StatusServiceUnavailable, "KMS.0104", "the HSM cluster is unavailable"},
	keystore.KindStoreUnavailable: {http.StatusServiceUnavailable, "KMS.0104", "the metadata store is unavailable"},
	keystore.KindHSMFailure:       {http.StatusInternalServerError, "KMS.0101", "the HSM cluster failed"},

	keystore.KindInvalidKeyID:           {http.StatusBadRequest, "KMS.0205", "invalid key ID"},
	keystore.KindKeyNotFound:            {http.StatusNotFound, "KMS.0207", "the key does not exist"},
	keystore.KindInvalidKeyAlias:        {http.StatusBadRequest, "KMS.1101", "invalid key_alias"},
	keystore.KindDuplicateKeyAlias:      {http.StatusBadRequest, "KMS.1104", "duplicate key alias"},
	keystore.KindInvalidDescription:     {http.StatusBadRequest, "KMS.1103", "invalid key_description"},
	keystore.KindInvalidKeySpec:         {http.StatusBadRequest, "KMS.1110", "invalid key_spec"},
	keystore.KindInvalidKeyParameter:    {http.StatusBadRequest, "KMS.0308", "invalid parameter"},
	keystore.KindInvalidSequence:        {http.StatusBadRequest, "KMS.0206", "invalid sequence number"},
	keystore.KindImportUnsupported:      {http.StatusBadRequest, "KMS.0339", "the dedicated keystore does not support importing keys"},
	keystore.KindSymmetricSign:          {http.StatusBadRequest, "KMS.1115", "symmetric keys do not support sign/verify"},
	keystore.KindECEncrypt:              {http.StatusBadRequest, "KMS.1114", "EC keys do not support encrypt/decrypt"},
	keystore.KindKeyDisabled:            {http.StatusBadRequest, "KMS.0209", "the key has been disabled"},
	keystore.KindKeyPendingDeletion:     {http.StatusBadRequest, "KMS.0210", "the key is pending deletion and cannot be used"},
	keystore.KindKeyNotDisabled:         {http.StatusBadRequest, "KMS.1201", "the key is not disabled"},
	keystore.KindKeyNotEnabled:          {http.StatusBadRequest, "KMS.1301", "the key is not enabled"},
	keystore.KindInvalidPendingDays:     {http.StatusBadRequest, "KMS.1401", "set the pending deletion period to 7-1096 days"},
	keystore.KindAlreadyPendingDeletion: {http.StatusBadRequest, "KMS.1402", "the key is already pending deletion"},
	keystore.KindKeyNotPendingDeletion:  {http.StatusBadRequest, "KMS.1501", "the key is not pending deletion"},
	keystore.KindKeyStateConflict:       {http.StatusBadRequest, "KMS.0308", "the key changed state concurrently"},
	keystore.KindKeyForEncryption:       {http.StatusBadRequest, "KMS.0334", "the CMK is used to encrypt and decrypt"},
	keystore.KindKeyForSigning:          {http.StatusBadRequest, "KMS.0335", "the CMK is used to sign and verify"},
	keystore.KindAlgorithmMismatch:      {http.StatusBadRequest, "KMS.0332", "the key does not support this algorithm"},
	keystore.KindDigestLength:           {http.StatusBadRequest, "KMS.0329", "the hash algorithm does not match the digest length"},
	keystore.KindInvalidData:            {http.StatusBadRequest, "KMS.0308", "invalid parameter"},
	keystore.KindPlaintextTooLong:       {http.StatusBadRequest, "KMS.2108", "the plaintext is too long for this RSA key"},
	keystore.KindDecryptFailed:          {http.StatusBadRequest, "KMS.0308", "the ciphertext could not be decrypted"},
	keystore.KindDatakeyPlainText:       {http.StatusBadRequest, "KMS.2101", "invalid plain_text"},
	keystore.KindDatakeyDigest:          {http.StatusBadRequest, "KMS.2103", "the data key digest check failed"},
	keystore.KindDatakeyLength:          {http.StatusBadRequest, "KMS.2104", "the data key length does not match"},
	keystore.KindDatakeyLengthRange:     {http.StatusBadRequest, "KMS.1901", "datakey_length must be from 8 to 8192"},
	keystore.KindDatakeyMultiple:        {http.StatusBadRequest, "KMS.1903", "datakey_length must be a multiple of 8"},
	keystore.KindDatakeySpec:            {http.StatusBadRequest, "KMS.1902", "key_spec must be AES_128 or AES_256"},
	keystore.KindDatakeyCipherText:      {http.StatusBadRequest, "KMS.2201", "invalid cipher_text"},
	keystore.KindInvalidRandomLength:    {http.StatusBadRequest, "KMS.1802", "random_data_length must be a multiple of 8 from 8 to 8192"},
	keystore.KindKeyMaterialMissing:     {http.StatusInternalServerError, "KMS.0101", "the key's material is missing from its HSM cluster"},
	keystore.KindSymmetricPublicKey:     {http.StatusBadRequest, "KMS.0331", "the symmetric key does not support this operation"},
}

// Failures that arise in the HTTP layer itself, before the domain is reached.
var (
	errUnknownRoute    = &apiError{wireError{http.StatusBadRequest, "KMS.0201", "invalid request URL"}, ""}
	errMethod          = &apiError{wireError{http.StatusMethodNotAllowed, "KMS.0215", "request method not supported"}, ""}
	errMalformedJSON   = &apiError{wireError{http.StatusBadRequest, "KMS.0202", "invalid JSON format of the request body"}, ""}
	errBodyTooLarge    = &apiError{wireError{http.StatusBadRequest, "KMS.0203", "request body too large"}, ""}
	errInvalidLimit    = &apiError{wireError{http.StatusBadRequest, "KMS.1601", "invalid limit"}, ""}
	errInvalidMarker   = &apiError{wireError{http.StatusBadRequest, "KMS.1602", "marker must be a non-negative integer"}, ""}
	errInvalidOffset   = &apiError{wireError{http.StatusBadRequest, "KMS.1603", "invalid offset"}, ""}
	errActionDenied    = &apiError{wireError{http.StatusForbidden, "KMS.0306", "no access permissions"}, ""}
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
