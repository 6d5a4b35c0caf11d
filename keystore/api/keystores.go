package api

import (
	"net/http"

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
	writeJSON(w, http.StatusOK, createKeystoreResponse{keystoreInfo{created.KeystoreID, created.DomainID}})
	return nil
}
