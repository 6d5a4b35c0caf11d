package api

import (
	"context"
	"fmt"
	"math"
	"net/http"
	"strconv"

	"github.com/hsmbridge/hsmbridge/keystore"
)

// Wire types of the keystore calls. Field names and string-typed values follow the
// official SDK's models exactly: it refuses a number where it expects a string.

type createKeystoreRequest struct {
	KeystoreAlias string `json:"keystore_alias"`
	HSMClusterID  string `json:"hsm_cluster_id"`
	HSMCACert     string `json:"hsm_ca_cert"`
	ClusterID     string `json:"cluster_id"`
	KeystoreType  string `json:"keystore_type"`
}

type keystoreInfo struct {
	KeystoreID string `json:"keystore_id"`
	DomainID   string `json:"domain_id"`
}

type createKeystoreResponse struct {
	Keystore keystoreInfo `json:"keystore"`
}

func (s *Server) createKeystore(w http.ResponseWriter, r *http.Request, who keystore.Caller) error {
	var req createKeystoreRequest
	if err := decodeBody(w, r, &req); err != nil {
		return err
	}
	created, err := s.svc.CreateKeystore(r.Context(), who, keystore.CreateRequest{
		Alias: req.KeystoreAlias, HSMClusterID: req.HSMClusterID, ClusterID: req.ClusterID,
		CACertPEM: req.HSMCACert, Type: req.KeystoreType,
	})
	if err != nil {
		return err
	}
	noteAudit(r.Context(), created.KeystoreID, "")
	writeJSON(w, http.StatusOK, createKeystoreResponse{keystoreInfo{created.KeystoreID, created.DomainID}})
	return nil
}

type keystoreDetails struct {
	KeystoreID          string `json:"keystore_id"`
	DomainID            string `json:"domain_id"`
	KeystoreAlias       string `json:"keystore_alias"`
	KeystoreType        string `json:"keystore_type"`
	HSMClusterID        string `json:"hsm_cluster_id"`
	ClusterID           string `json:"cluster_id"`
	CreateTime          string `json:"create_time"` // epoch milliseconds, as a string
	KeystoreState       string `json:"keystore_state"`
	ConnectionState     string `json:"connection_state"`
	ConnectionErrorCode string `json:"connection_error_code"`
}

func details(v keystore.View) keystoreDetails {
	return keystoreDetails{
		KeystoreID: v.ID, DomainID: v.DomainID, KeystoreAlias: v.Alias, KeystoreType: v.Type,
		HSMClusterID: v.ClusterID, ClusterID: v.ClusterID,
		CreateTime:    strconv.FormatInt(v.CreatedAt.UnixMilli(), 10),
		KeystoreState: v.State, ConnectionState: v.Connection.State, ConnectionErrorCode: v.Connection.Code,
	}
}

type listKeystoresResponse struct {
	Total     int               `json:"total"`
	Keystores []keystoreDetails `json:"keystores"`
}

type showKeystoreResponse struct {
	Keystore keystoreDetails `json:"keystore"`
}

type keystoreStateInfo struct {
	KeystoreID    string `json:"keystore_id"`
	KeystoreState string `json:"keystore_state"`
}

type keystoreStateResponse struct {
	Keystore keystoreStateInfo `json:"keystore"`
}

const (
	defaultListLimit = 10
	maxListLimit     = 1000
)

func (s *Server) listKeystores(w http.ResponseWriter, r *http.Request, who keystore.Caller) error {
	limit, err := queryInt(r, "limit", defaultListLimit, 1, maxListLimit)
	if err != nil {
		return errInvalidLimit.with("limit must be an integer from 1 to 1000")
	}
	offset, err := queryInt(r, "offset", 0, 0, math.MaxInt32)
	if err != nil {
		return errInvalidOffset.with("offset must be a non-negative integer")
	}
	views, total, err := s.svc.ListKeystores(r.Context(), who, limit, offset)
	if err != nil {
		return err
	}
	resp := listKeystoresResponse{Total: total, Keystores: make([]keystoreDetails, len(views))}
	for i, v := range views {
		resp.Keystores[i] = details(v)
	}
	writeJSON(w, http.StatusOK, resp)
	return nil
}

// queryInt reads an optional integer query parameter within [lo, hi].
func queryInt(r *http.Request, name string, def, lo, hi int) (int, error) {
	q := r.URL.Query()
	if !q.Has(name) {
		return def, nil
	}
	n, err := strconv.Atoi(q.Get(name))
	if err != nil || n < lo || n > hi {
		return 0, fmt.Errorf("%s out of range", name)
	}
	return n, nil
}

func (s *Server) showKeystore(w http.ResponseWriter, r *http.Request, who keystore.Caller) error {
	v, err := s.svc.ShowKeystore(r.Context(), who, r.PathValue("keystore_id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, showKeystoreResponse{details(v)})
	return nil
}

func (s *Server) enableKeystore(w http.ResponseWriter, r *http.Request, who keystore.Caller) error {
	return s.changeState(w, r, who, s.svc.EnableKeystore)
}

func (s *Server) disableKeystore(w http.ResponseWriter, r *http.Request, who keystore.Caller) error {
	return s.changeState(w, r, who, s.svc.DisableKeystore)
}

// changeState serves enable and disable. Their body is empty or ignored: the SDK sends
// none, with a JSON Content-Type; Terraform sends neither.
func (s *Server) changeState(w http.ResponseWriter, r *http.Request, who keystore.Caller,
	change func(context.Context, keystore.Caller, string) (string, error)) error {
	id := r.PathValue("keystore_id")
	state, err := change(r.Context(), who, id)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, keystoreStateResponse{keystoreStateInfo{id, state}})
	return nil
}

func (s *Server) deleteKeystore(w http.ResponseWriter, r *http.Request, who keystore.Caller) error {
	if err := s.svc.DeleteKeystore(r.Context(), who, r.PathValue("keystore_id")); err != nil {
		return err
	}
	w.WriteHeader(http.StatusOK) // the service answers 200 with no body
	return nil
}
