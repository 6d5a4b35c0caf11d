package api

import (
	"context"
	"net"
	"net/http"
	"slices"
	"strconv"
	"syscall"
)

// Identity headers a trusted frontend uses to name the tenant. Every other listener
// refuses requests that carry them, so a caller cannot pick its tenant by adding a header.
const (
	headerDomain  = "X-Hsmbridge-Domain-Id"
	headerProject = "X-Hsmbridge-Project-Id"
)

// TrustedFrontend authenticates the sidecar's frontend by its connection, not by a
// credential in the request: the peer uid of a Unix socket must be allowed, or the TLS
// client certificate (verified against the listener's client CA by crypto/tls) must carry
// an allowed subject. The frontend then names the tenant in the identity headers.
type TrustedFrontend struct {
	AllowedUIDs []int
	Subjects    []string
}

type peerUIDKey struct{}

// PeerCredContext is an http.Server ConnContext that records a Unix socket peer's uid
// (SO_PEERCRED), for TrustedFrontend.
func PeerCredContext(ctx context.Context, c net.Conn) context.Context {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return ctx
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return ctx
	}
	var cred *syscall.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	}); err != nil || credErr != nil {
		return ctx
	}
	return context.WithValue(ctx, peerUIDKey{}, int(cred.Uid))
}

// Authenticate implements Authenticator.
func (t *TrustedFrontend) Authenticate(r *http.Request) (Identity, error) {
	name, err := t.peer(r)
	if err != nil {
		return Identity{}, err
	}
	domain, project := r.Header.Get(headerDomain), r.Header.Get(headerProject)
	if !hex32RE.MatchString(domain) || !hex32RE.MatchString(project) {
		return Identity{}, &authError{"a trusted frontend must name the tenant in " + headerDomain + " and " + headerProject + " (32 lower-case hex digits each)"}
	}
	return Identity{Name: name, DomainID: domain, ProjectIDs: []string{project}}, nil
}

func (t *TrustedFrontend) peer(r *http.Request) (string, error) {
	if uid, ok := r.Context().Value(peerUIDKey{}).(int); ok {
		if !slices.Contains(t.AllowedUIDs, uid) {
			return "", &authError{"the socket peer (uid " + strconv.Itoa(uid) + ") is not an allowed frontend"}
		}
		return "frontend uid " + strconv.Itoa(uid), nil
	}
	if cs := r.TLS; cs != nil && len(cs.VerifiedChains) > 0 {
		subject := cs.VerifiedChains[0][0].Subject.String()
		if !slices.Contains(t.Subjects, subject) {
			return "", &authError{"the client certificate's subject is not an allowed frontend"}
		}
		return "frontend " + subject, nil
	}
	return "", &authError{"the connection does not identify a trusted frontend"}
}
