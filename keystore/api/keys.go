package api

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"net/http"
	"strconv"
	"strings"

	"github.com/hsmbridge/hsmbridge/keystore"
	"github.com/hsmbridge/hsmbridge/keystore/store"
)

// Wire types and handlers of the key calls (all POST .../kms/<call>, JSON bodies). Numbers
// and booleans are strings where the service's models have strings.

type keyInfo struct {
	KeyID    string `json:"key_id"`
	DomainID string `json:"domain_id"`
	RegionID string `json:"region_id"`
}

type keyDetails struct {
	KeyID                  string `json:"key_id"`
	DomainID               string `json:"domain_id"`
	KeyAlias               string `json:"key_alias"`
	Realm                  string `json:"realm"`
	KeySpec                string `json:"key_spec"`
	KeyUsage               string `json:"key_usage"`
	KeyDescription         string `json:"key_description"`
	CreationDate           string `json:"creation_date"`
	ScheduledDeletionDate  string `json:"scheduled_deletion_date"`
	KeyState               string `json:"key_state"`
	DefaultKeyFlag         string `json:"default_key_flag"`
	KeyType                string `json:"key_type"`
	Origin                 string `json:"origin"`
	KeyRotationEnabled     string `json:"key_rotation_enabled"`
	SysEnterpriseProjectID string `json:"sys_enterprise_project_id"`
	KeystoreID             string `json:"keystore_id"`
}

func (s *Server) keyDetails(k store.Key) keyDetails {
	deletion := ""
	if !k.DeletionAt.IsZero() {
		deletion = strconv.FormatInt(k.DeletionAt.UnixMilli(), 10)
	}
	keyType := "1" // symmetric
	if len(k.PublicKey) > 0 {
		keyType = "2"
	}
	return keyDetails{
		KeyID: k.ID, DomainID: k.DomainID, KeyAlias: k.Alias, Realm: s.region, KeySpec: k.Spec, KeyUsage: k.Usage,
		KeyDescription: k.Description, CreationDate: strconv.FormatInt(k.CreatedAt.UnixMilli(), 10),
		ScheduledDeletionDate: deletion, KeyState: keystore.KeyStateDigit(k.State), DefaultKeyFlag: "0",
		KeyType: keyType, Origin: k.Origin, KeyRotationEnabled: "false", SysEnterpriseProjectID: "0",
		KeystoreID: k.KeystoreID,
	}
}

type createKeyRequest struct {
	KeyAlias       string `json:"key_alias"`
	KeySpec        string `json:"key_spec"`
	KeyUsage       string `json:"key_usage"`
	KeyDescription string `json:"key_description"`
	Origin         string `json:"origin"`
	Sequence       string `json:"sequence"`
	KeystoreID     string `json:"keystore_id"`
}

func (r *createKeyRequest) auditIDs() (string, string) { return r.KeystoreID, "" }
func (r *keyIDRequest) auditIDs() (string, string)     { return "", r.KeyID }
func (r *cryptoRequest) auditIDs() (string, string)    { return "", r.KeyID }

func (s *Server) createKey(w http.ResponseWriter, r *http.Request, who keystore.Caller) error {
	var req createKeyRequest
	if err := decodeBody(w, r, &req); err != nil {
		return err
	}
	k, err := s.svc.CreateKey(r.Context(), who, keystore.CreateKeyRequest{
		Alias: req.KeyAlias, Spec: req.KeySpec, Usage: req.KeyUsage, Description: req.KeyDescription,
		Origin: req.Origin, KeystoreID: req.KeystoreID, Sequence: req.Sequence,
	})
	if err != nil {
		return err
	}
	noteAudit(r.Context(), "", k.ID)
	writeJSON(w, http.StatusOK, map[string]keyInfo{"key_info": {k.ID, k.DomainID, s.region}})
	return nil
}

type keyIDRequest struct {
	KeyID       string `json:"key_id"`
	PendingDays string `json:"pending_days"`
}

func (s *Server) describeKey(w http.ResponseWriter, r *http.Request, who keystore.Caller) error {
	var req keyIDRequest
	if err := decodeBody(w, r, &req); err != nil {
		return err
	}
	k, err := s.svc.DescribeKey(r.Context(), who, req.KeyID)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, map[string]keyDetails{"key_info": s.keyDetails(k)})
	return nil
}

type listKeysRequest struct {
	Limit    string `json:"limit"`
	Marker   string `json:"marker"`
	KeyState string `json:"key_state"`
	KeySpec  string `json:"key_spec"`
}

type listKeysResponse struct {
	Keys       []string     `json:"keys"`
	KeyDetails []keyDetails `json:"key_details"`
	NextMarker string       `json:"next_marker"`
	Truncated  string       `json:"truncated"`
	Total      int          `json:"total"`
}

// keyStatesByDigit maps the key_state filter of list-keys to store states.
var keyStatesByDigit = map[string]store.KeyState{"2": store.KeyEnabled, "3": store.KeyDisabled, "4": store.KeyPendingDeletion}

// listKeys pages with a marker that is the offset of the next key, as a string.
func (s *Server) listKeys(w http.ResponseWriter, r *http.Request, who keystore.Caller) error {
	var req listKeysRequest
	if err := decodeBody(w, r, &req); err != nil {
		return err
	}
	limit, offset := defaultListLimit, 0
	var err error
	if req.Limit != "" {
		if limit, err = strconv.Atoi(req.Limit); err != nil || limit < 1 || limit > maxListLimit {
			return errInvalidLimit.with("limit must be an integer from 1 to 1000")
		}
	}
	if req.Marker != "" {
		if offset, err = strconv.Atoi(req.Marker); err != nil || offset < 0 {
			return errInvalidMarker.with("marker must be a non-negative integer")
		}
	}
	var f store.KeyFilter
	if req.KeyState != "" {
		st, ok := keyStatesByDigit[req.KeyState]
		if !ok {
			return keystoreErr(keystore.KindInvalidKeyParameter, "key_state must be 2, 3 or 4")
		}
		f.State = string(st)
	}
	if req.KeySpec != "" && req.KeySpec != "ALL" {
		f.Spec = req.KeySpec
	}
	keys, total, err := s.svc.ListKeys(r.Context(), who, f, limit, offset)
	if err != nil {
		return err
	}
	resp := listKeysResponse{Keys: make([]string, len(keys)), KeyDetails: make([]keyDetails, len(keys)), Truncated: "false", Total: total}
	for i, k := range keys {
		resp.Keys[i], resp.KeyDetails[i] = k.ID, s.keyDetails(k)
	}
	if next := offset + len(keys); next < total {
		resp.NextMarker, resp.Truncated = strconv.Itoa(next), "true"
	}
	writeJSON(w, http.StatusOK, resp)
	return nil
}

func (s *Server) getPublicKey(w http.ResponseWriter, r *http.Request, who keystore.Caller) error {
	var req keyIDRequest
	if err := decodeBody(w, r, &req); err != nil {
		return err
	}
	pub, err := s.svc.PublicKey(r.Context(), who, req.KeyID)
	if err != nil {
		return err
	}
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return err
	}
	// The service's example uses \r\n line breaks; PEM parsers take either.
	text := strings.ReplaceAll(string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})), "\n", "\r\n")
	writeJSON(w, http.StatusOK, map[string]string{"key_id": req.KeyID, "public_key": text})
	return nil
}

func (s *Server) enableKey(w http.ResponseWriter, r *http.Request, who keystore.Caller) error {
	return s.keyState(w, r, who, true, func(req keyIDRequest) (store.Key, error) { return s.svc.EnableKey(r.Context(), who, req.KeyID) })
}

func (s *Server) disableKey(w http.ResponseWriter, r *http.Request, who keystore.Caller) error {
	return s.keyState(w, r, who, true, func(req keyIDRequest) (store.Key, error) { return s.svc.DisableKey(r.Context(), who, req.KeyID) })
}

func (s *Server) scheduleKeyDeletion(w http.ResponseWriter, r *http.Request, who keystore.Caller) error {
	return s.keyState(w, r, who, false, func(req keyIDRequest) (store.Key, error) {
		return s.svc.ScheduleKeyDeletion(r.Context(), who, req.KeyID, req.PendingDays)
	})
}

func (s *Server) cancelKeyDeletion(w http.ResponseWriter, r *http.Request, who keystore.Caller) error {
	return s.keyState(w, r, who, false, func(req keyIDRequest) (store.Key, error) {
		return s.svc.CancelKeyDeletion(r.Context(), who, req.KeyID)
	})
}

// keyState serves the key state changes. enable/disable wrap their answer in key_info;
// the deletion calls answer flat, as the service's models do.
func (s *Server) keyState(w http.ResponseWriter, r *http.Request, _ keystore.Caller, wrapped bool, change func(keyIDRequest) (store.Key, error)) error {
	var req keyIDRequest
	if err := decodeBody(w, r, &req); err != nil {
		return err
	}
	k, err := change(req)
	if err != nil {
		return err
	}
	body := map[string]string{"key_id": k.ID, "key_state": keystore.KeyStateDigit(k.State)}
	if wrapped {
		writeJSON(w, http.StatusOK, map[string]map[string]string{"key_info": body})
		return nil
	}
	writeJSON(w, http.StatusOK, body)
	return nil
}

// The data plane.

type cryptoRequest struct {
	KeyID               string `json:"key_id"`
	PlainText           string `json:"plain_text"`
	CipherText          string `json:"cipher_text"`
	EncryptionAlgorithm string `json:"encryption_algorithm"`
	AAD                 string `json:"additional_authenticated_data"`
	KeySpec             string `json:"key_spec"`
	DatakeyLength       string `json:"datakey_length"`
	DatakeyPlainLength  string `json:"datakey_plain_length"`
	DatakeyCipherLength string `json:"datakey_cipher_length"`
	Message             string `json:"message"`
	Signature           string `json:"signature"`
	SigningAlgorithm    string `json:"signing_algorithm"`
	MessageType         string `json:"message_type"`
	RandomDataLength    string `json:"random_data_length"`
}

// Limits of the service's fields.
const (
	maxPlainText = 4096
	maxAAD       = 128
	maxMessage   = 4096
	maxCipherB64 = 5648
)

func keystoreErr(kind keystore.Kind, msg string) error { return &keystore.Error{Kind: kind, Msg: msg} }

func (req *cryptoRequest) aad() ([]byte, error) {
	if len(req.AAD) > maxAAD {
		return nil, keystoreErr(keystore.KindInvalidData, "additional_authenticated_data must be at most 128 bytes")
	}
	return []byte(req.AAD), nil
}

func (s *Server) encryptData(w http.ResponseWriter, r *http.Request, who keystore.Caller) error {
	var req cryptoRequest
	if err := decodeBody(w, r, &req); err != nil {
		return err
	}
	if req.KeyID == "" || req.PlainText == "" {
		return keystoreErr(keystore.KindMissingParameter, "key_id and plain_text are required")
	}
	if len(req.PlainText) > maxPlainText {
		return keystoreErr(keystore.KindInvalidData, "plain_text must be 1 to 4096 bytes")
	}
	aad, err := req.aad()
	if err != nil {
		return err
	}
	ct, err := s.svc.Encrypt(r.Context(), who, req.KeyID, req.EncryptionAlgorithm, []byte(req.PlainText), aad)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, map[string]string{"key_id": req.KeyID, "cipher_text": base64.StdEncoding.EncodeToString(ct)})
	return nil
}

func (s *Server) decryptData(w http.ResponseWriter, r *http.Request, who keystore.Caller) error {
	var req cryptoRequest
	if err := decodeBody(w, r, &req); err != nil {
		return err
	}
	if req.CipherText == "" {
		return keystoreErr(keystore.KindMissingParameter, "cipher_text is required")
	}
	ct, err := base64.StdEncoding.DecodeString(req.CipherText)
	if err != nil || len(req.CipherText) > maxCipherB64 {
		return keystoreErr(keystore.KindDecryptFailed, "cipher_text must be base64, at most 5648 characters")
	}
	aad, err := req.aad()
	if err != nil {
		return err
	}
	id, pt, err := s.svc.Decrypt(r.Context(), who, req.KeyID, req.EncryptionAlgorithm, ct, aad)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, map[string]string{
		"key_id": id, "plain_text": string(pt), "plain_text_base64": base64.StdEncoding.EncodeToString(pt),
	})
	return nil
}

func (s *Server) createDatakey(w http.ResponseWriter, r *http.Request, who keystore.Caller) error {
	return s.createDatakeyAnd(w, r, who, true)
}

func (s *Server) createDatakeyWithoutPlaintext(w http.ResponseWriter, r *http.Request, who keystore.Caller) error {
	return s.createDatakeyAnd(w, r, who, false)
}

func (s *Server) createDatakeyAnd(w http.ResponseWriter, r *http.Request, who keystore.Caller, withPlain bool) error {
	var req cryptoRequest
	if err := decodeBody(w, r, &req); err != nil {
		return err
	}
	if req.KeyID == "" {
		return keystoreErr(keystore.KindMissingParameter, "key_id is required")
	}
	bits, err := keystore.DatakeyBits(req.KeySpec, req.DatakeyLength)
	if err != nil {
		return err
	}
	aad, err := req.aad()
	if err != nil {
		return err
	}
	dek, sealed, err := s.svc.CreateDatakey(r.Context(), who, req.KeyID, bits, aad)
	if err != nil {
		return err
	}
	body := map[string]string{"key_id": req.KeyID, "cipher_text": upperHex(sealed)}
	if withPlain {
		body["plain_text"] = upperHex(dek)
	}
	writeJSON(w, http.StatusOK, body)
	return nil
}

func (s *Server) encryptDatakey(w http.ResponseWriter, r *http.Request, who keystore.Caller) error {
	var req cryptoRequest
	if err := decodeBody(w, r, &req); err != nil {
		return err
	}
	plain, n, aad, err := req.datakeyFields(req.PlainText, "plain_text", req.DatakeyPlainLength, "datakey_plain_length", keystore.KindDatakeyPlainText)
	if err != nil {
		return err
	}
	sealed, err := s.svc.EncryptDatakey(r.Context(), who, req.KeyID, plain, n, aad)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, map[string]string{"key_id": req.KeyID, "cipher_text": upperHex(sealed), "datakey_length": strconv.Itoa(n)})
	return nil
}

func (s *Server) decryptDatakey(w http.ResponseWriter, r *http.Request, who keystore.Caller) error {
	var req cryptoRequest
	if err := decodeBody(w, r, &req); err != nil {
		return err
	}
	sealed, n, aad, err := req.datakeyFields(req.CipherText, "cipher_text", req.DatakeyCipherLength, "datakey_cipher_length", keystore.KindDatakeyCipherText)
	if err != nil {
		return err
	}
	dek, err := s.svc.DecryptDatakey(r.Context(), who, req.KeyID, sealed, n, aad)
	if err != nil {
		return err
	}
	sum := sha256.Sum256(dek)
	writeJSON(w, http.StatusOK, map[string]string{"data_key": upperHex(dek), "datakey_length": strconv.Itoa(len(dek)), "datakey_dgst": upperHex(sum[:])})
	return nil
}

// datakeyFields reads the fields encrypt-datakey and decrypt-datakey share: the key id, a
// hex text (badHex when it is not hex), a DEK length in bytes and the AAD.
func (req *cryptoRequest) datakeyFields(text, textName, length, lengthName string, badHex keystore.Kind) ([]byte, int, []byte, error) {
	if req.KeyID == "" || text == "" || length == "" {
		return nil, 0, nil, keystoreErr(keystore.KindMissingParameter, "key_id, "+textName+" and "+lengthName+" are required")
	}
	b, err := hex.DecodeString(text)
	if err != nil {
		return nil, 0, nil, keystoreErr(badHex, textName+" must be hex")
	}
	n, err := strconv.Atoi(length)
	if err != nil {
		return nil, 0, nil, keystoreErr(keystore.KindDatakeyLength, lengthName+" must be a number of bytes")
	}
	aad, err := req.aad()
	if err != nil {
		return nil, 0, nil, err
	}
	return b, n, aad, nil
}

func upperHex(b []byte) string { return strings.ToUpper(hex.EncodeToString(b)) }

func (req *cryptoRequest) message() ([]byte, error) {
	if req.KeyID == "" || req.Message == "" || req.SigningAlgorithm == "" {
		return nil, keystoreErr(keystore.KindMissingParameter, "key_id, message and signing_algorithm are required")
	}
	m, err := base64.StdEncoding.DecodeString(req.Message)
	if err != nil || len(m) == 0 || len(m) >= maxMessage {
		return nil, keystoreErr(keystore.KindInvalidData, "message must be base64 of 1 to 4095 bytes")
	}
	return m, nil
}

func (s *Server) sign(w http.ResponseWriter, r *http.Request, who keystore.Caller) error {
	var req cryptoRequest
	if err := decodeBody(w, r, &req); err != nil {
		return err
	}
	m, err := req.message()
	if err != nil {
		return err
	}
	sig, err := s.svc.Sign(r.Context(), who, req.KeyID, req.SigningAlgorithm, req.MessageType, m)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, map[string]string{"key_id": req.KeyID, "signature": base64.StdEncoding.EncodeToString(sig)})
	return nil
}

func (s *Server) verify(w http.ResponseWriter, r *http.Request, who keystore.Caller) error {
	var req cryptoRequest
	if err := decodeBody(w, r, &req); err != nil {
		return err
	}
	m, err := req.message()
	if err != nil {
		return err
	}
	sig, err := base64.StdEncoding.DecodeString(req.Signature)
	if err != nil || len(sig) == 0 {
		return keystoreErr(keystore.KindInvalidData, "signature must be base64")
	}
	ok, err := s.svc.Verify(r.Context(), who, req.KeyID, req.SigningAlgorithm, req.MessageType, m, sig)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, map[string]string{"key_id": req.KeyID, "signature_valid": strconv.FormatBool(ok)})
	return nil
}

func (s *Server) genRandom(w http.ResponseWriter, r *http.Request, who keystore.Caller) error {
	var req cryptoRequest
	if err := decodeBody(w, r, &req); err != nil {
		return err
	}
	bits, err := strconv.Atoi(req.RandomDataLength)
	if err != nil || bits < 8 || bits > 8192 || bits%8 != 0 {
		return keystoreErr(keystore.KindInvalidRandomLength, "random_data_length must be a multiple of 8 from 8 to 8192")
	}
	b, err := s.svc.Random(r.Context(), who, bits/8)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, map[string]string{"random_data": upperHex(b)})
	return nil
}
