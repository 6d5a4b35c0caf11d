package api

import (
	"net/http"

	"github.com/hsmbridge/hsmbridge/keystore"
)

// healthz answers while the process serves at all.
func (s *Server) healthz(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}

// clusterReadiness names no keystore: /readyz answers anyone, and keystore ids are a
// tenant's own.
type clusterReadiness struct {
	KeystoreEnabled     bool   `json:"keystore_enabled"`
	ConnectionState     string `json:"connection_state"`
	ConnectionErrorCode string `json:"connection_error_code,omitempty"`
}

// readyz answers 200 when the daemon should get traffic: it is not draining, the store
// answers, and the cluster of every enabled keystore is CONNECTED. The body names each bound
// cluster and its state, so an operator sees which one holds readiness back.
func (s *Server) readyz(w http.ResponseWriter, r *http.Request) {
	status := http.StatusOK
	body := map[string]any{"status": "ready"}
	rs, err := s.svc.Readiness(r.Context())
	if err != nil {
		status, body["status"], body["reason"] = http.StatusServiceUnavailable, "not ready", "store unavailable"
	}
	clusters := make(map[string]clusterReadiness, len(rs))
	for _, c := range rs {
		clusters[c.ClusterID] = clusterReadiness{c.Enabled, c.State, c.Code}
		if c.Enabled && c.State != keystore.Connected {
			status, body["status"] = http.StatusServiceUnavailable, "not ready"
		}
	}
	body["clusters"] = clusters
	if s.draining.Load() {
		status, body["status"] = http.StatusServiceUnavailable, "draining"
	}
	writeJSON(w, status, body)
}
