package api

import (
	"net/http"
)

// healthz answers while the process serves at all.
func (s *Server) healthz(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}

// readyz answers 200 when the daemon should get traffic: not draining, and every cluster
// answers a cheap PKCS#11 call (C_GetTokenInfo) on the token it was opened on.
func (s *Server) readyz(w http.ResponseWriter, r *http.Request) {
	status := http.StatusOK
	clusters := make(map[string]string, len(s.clusters))
	for _, c := range s.clusters {
		t, err := c.CurrentToken(r.Context())
		switch {
		case err != nil:
			clusters[c.ID()] = "unreachable"
			status = http.StatusServiceUnavailable
		case t.Serial != c.Token().Serial:
			clusters[c.ID()] = "token changed"
			status = http.StatusServiceUnavailable
		default:
			clusters[c.ID()] = "ok"
		}
	}
	state := "ready"
	if s.draining.Load() {
		state, status = "draining", http.StatusServiceUnavailable
	} else if status != http.StatusOK {
		state = "not ready"
	}
	writeJSON(w, status, map[string]any{"status": state, "clusters": clusters})
}
