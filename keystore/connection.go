package keystore

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/hsmbridge/hsmbridge/hsm"
	"github.com/hsmbridge/hsmbridge/keystore/store"
)

// Connection states of a keystore, after AWS's custom key stores.
const (
	Connected    = "CONNECTED"
	Disconnected = "DISCONNECTED" // the cluster does not answer
	Failed       = "FAILED"       // it answers, but cannot serve this keystore; see the code
)

// Connection error codes that come with Failed (and Disconnected).
const (
	CodeInvalidCredentials = "INVALID_CREDENTIALS"
	CodeUserLockedOut      = "USER_LOCKED_OUT"
	CodeTokenMismatch      = "TOKEN_MISMATCH"
	CodeClusterNotFound    = "CLUSTER_NOT_FOUND"
	CodeNetworkErrors      = "NETWORK_ERRORS"
)

// Connection is a keystore's connection state and, unless connected, why.
type Connection struct {
	State string
	Code  string
}

// healthTTL is how long a cluster probe is trusted. A probe is one C_GetTokenInfo
// (microseconds on SoftHSM), so list and show stay flat in cost however often they come.
const healthTTL = 2 * time.Second

// health caches what the last probe of each cluster found.
type health struct {
	mu     sync.Mutex
	probes map[string]probe
	// mismatched holds keystores found not to be on their token (marker missing), until a
	// later check finds them whole again.
	mismatched map[string]bool
}

type probe struct {
	at    time.Time
	token hsm.TokenInfo
	err   error
}

// clusterProbe returns the cluster's current token, probing it when the cached result is old.
func (s *Service) clusterProbe(ctx context.Context, cl Cluster) probe {
	now := s.now()
	s.health.mu.Lock()
	p, ok := s.health.probes[cl.ID()]
	s.health.mu.Unlock()
	if ok && now.Sub(p.at) < healthTTL {
		return p
	}
	t, err := cl.CurrentToken(ctx)
	p = probe{at: now, token: t, err: err}
	s.health.mu.Lock()
	s.health.probes[cl.ID()] = p
	s.health.mu.Unlock()
	return p
}

func (s *Service) setMismatched(id string, bad bool) {
	s.health.mu.Lock()
	defer s.health.mu.Unlock()
	if bad {
		s.health.mismatched[id] = true
	} else {
		delete(s.health.mismatched, id)
	}
}

// connection works out a keystore's connection state from its cluster's health and binding.
func (s *Service) connection(ctx context.Context, k store.Keystore) Connection {
	cl, ok := s.clusters[k.ClusterID]
	if !ok {
		return Connection{Failed, CodeClusterNotFound}
	}
	switch h := cl.Health(); h.State {
	case hsm.StateFailed:
		return Connection{Failed, h.Reason}
	case hsm.StateUnavailable:
		return Connection{Disconnected, CodeNetworkErrors}
	}
	p := s.clusterProbe(ctx, cl)
	if p.err != nil {
		return connectionOfError(p.err)
	}
	s.health.mu.Lock()
	mismatched := s.health.mismatched[k.ID]
	s.health.mu.Unlock()
	if mismatched || !boundTo(k, cl, p.token) {
		return Connection{Failed, CodeTokenMismatch}
	}
	return Connection{Connected, ""}
}

// boundTo reports whether the keystore's binding names this token and identity.
func boundTo(k store.Keystore, cl Cluster, t hsm.TokenInfo) bool {
	id := cl.IdentityCertificate()
	return t.Serial == k.TokenSerial && t.Label == k.TokenLabel && id != nil && fingerprint(id.Raw) == k.IdentityFingerprint
}

func connectionOfError(err error) Connection {
	if hsm.Classify(err) == hsm.ClassCredential {
		if code, ok := hsm.Code(err); ok && code == pkcs11.CKR_PIN_LOCKED {
			return Connection{Failed, CodeUserLockedOut}
		}
		return Connection{Failed, CodeInvalidCredentials}
	}
	if errors.Is(err, hsm.ErrTokenNotFound) {
		return Connection{Failed, CodeTokenMismatch}
	}
	return Connection{Disconnected, CodeNetworkErrors}
}

// ClusterReadiness is one bound cluster as /readyz and the metrics report it.
type ClusterReadiness struct {
	ClusterID  string
	KeystoreID string
	Enabled    bool
	Connection
}

// Readiness reports the connection of every live keystore's cluster.
func (s *Service) Readiness(ctx context.Context) ([]ClusterReadiness, error) {
	rows, err := s.store.AllKeystores(ctx)
	if err != nil {
		return nil, storeError("readiness", err)
	}
	var out []ClusterReadiness
	for _, k := range rows {
		if k.State != store.StateEnabled && k.State != store.StateDisabled {
			continue
		}
		out = append(out, ClusterReadiness{
			ClusterID: k.ClusterID, KeystoreID: k.ID, Enabled: k.State == store.StateEnabled,
			Connection: s.connection(ctx, k),
		})
	}
	return out, nil
}
