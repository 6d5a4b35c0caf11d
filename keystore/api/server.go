// Package api serves the dedicated keystore API over HTTP: routing, authentication, the
// JSON wire types, the error table, health endpoints and the HTTP and HSM metrics. It calls
// package keystore for every decision; its own state is metrics, the AK/SK replay and
// lockout memory, and the answers remembered for `sequence` retries.
package api

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync/atomic"
	"time"

	"github.com/hsmbridge/hsmbridge/keystore"
)

// maxBody is the largest request body accepted (KMS.0203 beyond it).
const maxBody = 64 << 10

// Server is the HTTP face of a keystore.Service. Safe for concurrent use.
type Server struct {
	svc       *keystore.Service
	auth      Authenticator
	metrics   *Metrics
	log       *slog.Logger
	region    string
	trusted   bool
	sequences sequences
	draining  atomic.Bool
	mux       *http.ServeMux
}

// Config is what a Server needs.
type Config struct {
	Service *keystore.Service
	Auth    Authenticator
	Metrics *Metrics // nil: no metrics
	Log     *slog.Logger
	Region  string // reported as region_id and realm
	// Trusted marks the trusted frontend's listener, the only one that accepts identity
	// headers (with a TrustedFrontend as Auth).
	Trusted bool
	// RequestTimeout bounds each control-plane request, including its wait for an HSM
	// session; KeyOperationTimeout bounds each data-plane key operation (a PKCS#11 call
	// cannot be cancelled, so this bounds the wait for a session, the part that queues);
	// RouteTimeouts overrides either by route name ("sign", "create-key", ...).
	RequestTimeout      time.Duration
	KeyOperationTimeout time.Duration
	RouteTimeouts       map[string]time.Duration
}

// handler serves one authenticated API call; a returned error is answered by writeError.
type handler func(s *Server, w http.ResponseWriter, r *http.Request, who keystore.Caller) error

// route is one API call: its name (the key of server.route_timeouts), its pattern, whether
// it is a data-plane key operation (the short key_operation_timeout applies), the IAM-style
// action a role must allow, and whether it changes state (then an AK/SK signature may be
// used only once).
type route struct {
	name      string
	pattern   string
	dataPlane bool
	action    string
	mutating  bool
	h         handler
}

// routes lists every API call. Keystore actions are the service's IAM actions; key actions
// follow its kms:cmk:* and kms:dek:* naming.
var routes = []route{
	{"create-keystore", "POST /v1.0/{project_id}/keystores", false, "kms:keystore:create", true, (*Server).createKeystore},
	{"list-keystores", "GET /v1.0/{project_id}/keystores", false, "kms:keystore:list", false, (*Server).listKeystores},
	{"show-keystore", "GET /v1.0/{project_id}/keystores/{keystore_id}", false, "kms:keystore:get", false, (*Server).showKeystore},
	{"delete-keystore", "DELETE /v1.0/{project_id}/keystores/{keystore_id}", false, "kms:keystore:delete", true, (*Server).deleteKeystore},
	{"enable-keystore", "POST /v1.0/{project_id}/keystores/{keystore_id}/enable", false, "kms:keystore:enable", true, (*Server).enableKeystore},
	{"disable-keystore", "POST /v1.0/{project_id}/keystores/{keystore_id}/disable", false, "kms:keystore:disable", true, (*Server).disableKeystore},
	{"create-key", "POST /v1.0/{project_id}/kms/create-key", false, "kms:cmk:create", true, (*Server).createKey},
	{"describe-key", "POST /v1.0/{project_id}/kms/describe-key", false, "kms:cmk:get", false, (*Server).describeKey},
	{"list-keys", "POST /v1.0/{project_id}/kms/list-keys", false, "kms:cmk:list", false, (*Server).listKeys},
	{"get-publickey", "POST /v1.0/{project_id}/kms/get-publickey", false, "kms:cmk:getPublicKey", false, (*Server).getPublicKey},
	{"enable-key", "POST /v1.0/{project_id}/kms/enable-key", false, "kms:cmk:enable", true, (*Server).enableKey},
	{"disable-key", "POST /v1.0/{project_id}/kms/disable-key", false, "kms:cmk:disable", true, (*Server).disableKey},
	{"schedule-key-deletion", "POST /v1.0/{project_id}/kms/schedule-key-deletion", false, "kms:cmk:update", true, (*Server).scheduleKeyDeletion},
	{"cancel-key-deletion", "POST /v1.0/{project_id}/kms/cancel-key-deletion", false, "kms:cmk:update", true, (*Server).cancelKeyDeletion},
	{"encrypt-data", "POST /v1.0/{project_id}/kms/encrypt-data", true, "kms:cmk:encrypt", false, (*Server).encryptData},
	{"decrypt-data", "POST /v1.0/{project_id}/kms/decrypt-data", true, "kms:cmk:decrypt", false, (*Server).decryptData},
	{"create-datakey", "POST /v1.0/{project_id}/kms/create-datakey", true, "kms:dek:create", false, (*Server).createDatakey},
	{"create-datakey-without-plaintext", "POST /v1.0/{project_id}/kms/create-datakey-without-plaintext", true, "kms:dek:create", false, (*Server).createDatakeyWithoutPlaintext},
	{"encrypt-datakey", "POST /v1.0/{project_id}/kms/encrypt-datakey", true, "kms:dek:crypto", false, (*Server).encryptDatakey},
	{"decrypt-datakey", "POST /v1.0/{project_id}/kms/decrypt-datakey", true, "kms:dek:crypto", false, (*Server).decryptDatakey},
	{"sign", "POST /v1.0/{project_id}/kms/sign", true, "kms:cmk:sign", false, (*Server).sign},
	{"verify", "POST /v1.0/{project_id}/kms/verify", true, "kms:cmk:verify", false, (*Server).verify},
	{"gen-random", "POST /v1.0/{project_id}/kms/gen-random", true, "kms:cmk:generate", false, (*Server).genRandom},
}

// NewServer builds the routes.
func NewServer(cfg Config) *Server {
	s := &Server{
		svc: cfg.Service, auth: cfg.Auth, metrics: cfg.Metrics,
		log: cfg.Log, region: cfg.Region, trusted: cfg.Trusted, mux: http.NewServeMux(),
	}
	if s.log == nil {
		s.log = slog.Default()
	}
	for _, rt := range routes {
		s.mux.Handle(rt.pattern, s.apiCall(rt, cfg.timeout(rt)))
	}
	s.mux.HandleFunc("GET /healthz", s.healthz)
	s.mux.HandleFunc("GET /readyz", s.readyz)
	if s.metrics != nil {
		s.mux.Handle("GET /metrics", s.metrics.handler())
	}
	s.mux.HandleFunc("/", s.unmatched)
	return s
}

// OpsHandler serves only /healthz, /readyz and /metrics: the handler of a separate listener
// for probes and scrapers that cannot reach the API's socket.
func (s *Server) OpsHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", s.healthz)
	mux.HandleFunc("GET /readyz", s.readyz)
	if s.metrics != nil {
		mux.Handle("GET /metrics", s.metrics.handler())
	}
	return mux
}

// ServeHTTP gives every response a request id, and records it in the metrics and the log.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	id := newRequestID()
	w.Header().Set("X-Request-Id", id)
	r = r.WithContext(context.WithValue(r.Context(), requestIDKey{}, id))
	rec := &statusRecorder{ResponseWriter: w, status: http.StatusOK}
	s.mux.ServeHTTP(rec, r)
	route := r.Pattern
	if route == "" || route == "/" {
		route = "unmatched"
	}
	if s.metrics != nil {
		s.metrics.observeHTTP(route, rec.status, time.Since(start))
	}
}

// SetDraining makes /readyz fail, so load balancers stop sending work before shutdown.
func (s *Server) SetDraining() { s.draining.Store(true) }

// Default deadlines, where the configuration gives none.
const (
	defaultRequestTimeout      = 5 * time.Second
	defaultKeyOperationTimeout = 250 * time.Millisecond
	// Key generation of RSA-4096 takes seconds on a software token.
	defaultCreateKeyTimeout = 20 * time.Second
)

// timeout is the deadline of rt's requests.
func (c Config) timeout(rt route) time.Duration {
	if d, ok := c.RouteTimeouts[rt.name]; ok && d > 0 {
		return d
	}
	switch {
	case rt.dataPlane:
		return cmp.Or(c.KeyOperationTimeout, defaultKeyOperationTimeout)
	case rt.name == "create-key":
		return max(cmp.Or(c.RequestTimeout, defaultRequestTimeout), defaultCreateKeyTimeout)
	}
	return cmp.Or(c.RequestTimeout, defaultRequestTimeout)
}

// RouteNames lists the route names RouteTimeouts may use.
func RouteNames() []string {
	names := make([]string, len(routes))
	for i, rt := range routes {
		names[i] = rt.name
	}
	return names
}

// apiCall wraps an API handler: deadline, authentication, authorisation, audit line, errors.
func (s *Server) apiCall(rt route, timeout time.Duration) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		note := &auditNote{keystore: r.PathValue("keystore_id")}
		ctx := context.WithValue(r.Context(), auditKey{}, note)
		var hold *replayHold
		if rt.mutating {
			hold = &replayHold{}
			ctx = context.WithValue(ctx, replayGuardKey{}, hold)
		}
		ctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		r = r.WithContext(ctx)
		who, err := s.authorize(r, rt.action)
		if err == nil {
			err = s.withSequence(w, r, who, rt, rt.h)
		}
		code, detail := "", ""
		if err != nil {
			writeError(w, r, s.log, err)
			code = errorCode(err)
			if ae, ok := errors.AsType[*authError](err); ok {
				detail = ae.reason // which check refused the credential; never the credential
			}
			if hold != nil && hold.release != nil {
				hold.release()
			}
		}
		s.log.InfoContext(ctx, "audit", "request_id", requestID(ctx), "route", r.Pattern,
			"who", who.Name, "domain", who.DomainID, "project", r.PathValue("project_id"),
			"keystore", note.keystore, "key", note.key, "result", resultOf(code), "error_code", code, "auth_failure", detail,
			"latency_ms", float64(time.Since(start).Microseconds())/1000)
	})
}

func resultOf(code string) string {
	if code == "" {
		return "ok"
	}
	return "error"
}

func errorCode(err error) string {
	if _, ok := errors.AsType[*authError](err); ok {
		return errUnauthenticated.Code
	}
	row, _ := resolve(err)
	return row.Code
}

// authorize authenticates the caller, checks the path's project is one they may use, and
// that their roles allow action. Identity headers are refused unless this is the trusted
// frontend's listener.
func (s *Server) authorize(r *http.Request, action string) (keystore.Caller, error) {
	if !s.trusted && (len(r.Header.Values(headerDomain)) > 0 || len(r.Header.Values(headerProject)) > 0) {
		return keystore.Caller{}, &authError{"identity headers are accepted only from a trusted frontend"}
	}
	id, err := s.auth.Authenticate(r)
	if err != nil {
		return keystore.Caller{}, err
	}
	project := r.PathValue("project_id")
	who := keystore.Caller{DomainID: id.DomainID, ProjectID: project, Name: id.Name}
	if !id.MayUseProject(project) {
		return who, errProjectDenied
	}
	if !id.MayDo(action) {
		return who, errActionDenied.with("the credential's roles do not allow " + action)
	}
	return who, nil
}

type replayGuardKey struct{}

// replayHold is set on requests whose route changes state: their signature may be used for
// one successful call. The authenticator that reserved the signature leaves release, which
// apiCall runs when the call fails.
type replayHold struct{ release func() }

// replayGuarded returns the request's hold, or nil on routes that change nothing.
func replayGuarded(ctx context.Context) *replayHold {
	h, _ := ctx.Value(replayGuardKey{}).(*replayHold)
	return h
}

// unmatched answers paths no route serves: 405 with Allow if other methods would, else
// KMS.0201.
func (s *Server) unmatched(w http.ResponseWriter, r *http.Request) {
	var allowed []string
	for _, m := range []string{http.MethodGet, http.MethodPost, http.MethodPut, http.MethodDelete, http.MethodPatch} {
		if m == r.Method {
			continue
		}
		probe := r.Clone(r.Context())
		probe.Method = m
		if _, pattern := s.mux.Handler(probe); pattern != "" && pattern != "/" {
			allowed = append(allowed, m)
		}
	}
	if len(allowed) > 0 {
		w.Header().Set("Allow", strings.Join(allowed, ", "))
		writeError(w, r, s.log, errMethod)
		return
	}
	writeError(w, r, s.log, errUnknownRoute)
}

// decodeBody reads a JSON body of at most maxBody bytes into v. Unknown fields are
// ignored: clients send fields newer than ours.
func decodeBody(w http.ResponseWriter, r *http.Request, v any) error {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	if err != nil {
		if _, ok := errors.AsType[*http.MaxBytesError](err); ok {
			return errBodyTooLarge.with("request body exceeds 64 KiB")
		}
		return errMalformedJSON.with("request body could not be read")
	}
	if len(strings.TrimSpace(string(body))) == 0 {
		return errMalformedJSON.with("request body is empty; a JSON object is required")
	}
	if err := json.Unmarshal(body, v); err != nil {
		return errMalformedJSON.with(describeJSONError(err))
	}
	if a, ok := v.(audited); ok {
		ks, key := a.auditIDs()
		noteAudit(r.Context(), ks, key)
	}
	return nil
}

// auditNote collects what the audit line names beyond the route: the keystore and key a
// call acted on, noted by the handler once it knows them.
type auditNote struct{ keystore, key string }

type auditKey struct{}

// audited is a request body that names the keystore or key it acts on.
type audited interface{ auditIDs() (keystore, key string) }

// noteAudit records ids for the request's audit line; empty ids leave the note as it is.
func noteAudit(ctx context.Context, keystoreID, keyID string) {
	n, _ := ctx.Value(auditKey{}).(*auditNote)
	if n == nil {
		return
	}
	if keystoreID != "" {
		n.keystore = keystoreID
	}
	if keyID != "" {
		n.key = keyID
	}
}

// describeJSONError says what is wrong with a body without naming our Go types.
func describeJSONError(err error) string {
	if se, ok := errors.AsType[*json.SyntaxError](err); ok {
		return fmt.Sprintf("the request body is not valid JSON (at byte %d)", se.Offset)
	}
	if te, ok := errors.AsType[*json.UnmarshalTypeError](err); ok {
		if te.Field == "" {
			return "the request body must be a JSON object"
		}
		return fmt.Sprintf("field %s must be a %s, not a %s", te.Field, te.Type.Kind(), te.Value)
	}
	return "the request body is not valid JSON"
}

type requestIDKey struct{}

func requestID(ctx context.Context) string {
	id, _ := ctx.Value(requestIDKey{}).(string)
	return id
}

func newRequestID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (r *statusRecorder) WriteHeader(code int) {
	r.status = code
	r.ResponseWriter.WriteHeader(code)
}

func (r *statusRecorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }
