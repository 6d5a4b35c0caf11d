package main

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/hsmbridge/hsmbridge/hsm"
	"github.com/hsmbridge/hsmbridge/internal/config"
	"github.com/hsmbridge/hsmbridge/keystore/api"
)

// checkLine is one line of check's report: a cluster, or another part of the config.
type checkLine struct {
	name   string
	ok     bool
	detail string
}

// check validates the config and opens what serve would, without serving or touching the
// store: each cluster in turn (its PIN read from its source and tried once, as at start-up),
// its token, its identity certificate and the token's proof of possession of the identity
// key; the credentials files; the API listener's TLS certificate and key. It prints one line
// per item and fails if any item failed. An invalid config fails before anything is opened.
func check(ctx context.Context, configPath string, stdout io.Writer) (err error) {
	cfg, err := config.Load(configPath)
	if err != nil {
		return err
	}
	log := slog.New(slog.DiscardHandler)
	reg := prometheus.NewRegistry()
	metrics := api.NewMetrics(reg, reg, version)
	var lines []checkLine
	// Clusters stay open until the end, as in serve, where the TLS key is opened after them.
	var opened []*hsm.Cluster
	defer func() {
		var errs []error
		for i := len(opened) - 1; i >= 0; i-- {
			errs = append(errs, opened[i].Close(context.Background()))
		}
		err = errors.Join(err, errors.Join(errs...))
	}()
	for _, cc := range cfg.Clusters {
		line, cl := checkCluster(ctx, cc, metrics, log)
		if cl != nil {
			opened = append(opened, cl)
		}
		lines = append(lines, line)
	}
	lines = append(lines, checkAuth(cfg.Auth, metrics))
	if _, err := routeTimeouts(cfg.Server.RouteTimeouts); err != nil {
		lines = append(lines, checkLine{name: "server.route_timeouts", detail: err.Error()})
	}
	if cfg.Server.TLS.On() {
		lines = append(lines, checkTLS(cfg.Server.TLS, log))
	}
	width, failed := 0, 0
	for _, l := range lines {
		width = max(width, len(l.name))
		if !l.ok {
			failed++
		}
	}
	for _, l := range lines {
		status := "ok"
		if !l.ok {
			status = "FAIL"
		}
		fmt.Fprintf(stdout, "%-*s  %s  %s\n", width, l.name, status, oneLine(l.detail))
	}
	if failed > 0 {
		return fmt.Errorf("check: %d of %d failed", failed, len(lines))
	}
	return nil
}

// checkCluster opens one cluster as serve does and proves its identity. The cluster is
// returned open (nil if it did not open) for the caller to close.
func checkCluster(ctx context.Context, cc config.Cluster, m *api.Metrics, log *slog.Logger) (checkLine, *hsm.Cluster) {
	line := checkLine{name: cc.ID}
	cl, err := openCluster(ctx, cc, m, log)
	if err != nil {
		line.detail = describeClusterError(cc, err)
		return line, nil
	}
	ti, cert := cl.Token(), cl.IdentityCertificate()
	token := fmt.Sprintf("token %q serial %s", ti.Label, ti.Serial)
	identity := "identity " + certName(cert)
	if err := cl.ProveIdentity(ctx); err != nil {
		line.detail = fmt.Sprintf("%s  %s: proof of possession failed: %s", token, identity, stripCluster(cc.ID, err))
		return line, cl
	}
	if problem := validity(cert, time.Now()); problem != "" {
		line.detail = fmt.Sprintf("%s  %s %s", token, identity, problem)
		return line, cl
	}
	line.ok = true
	line.detail = fmt.Sprintf("%s  %s valid until %s", token, identity, cert.NotAfter.UTC().Format(time.DateOnly))
	return line, cl
}

// describeClusterError says what stopped a cluster from opening, in an operator's words.
func describeClusterError(cc config.Cluster, err error) string {
	switch {
	case errors.Is(err, hsm.ErrCredential):
		code, _ := hsm.Code(err)
		return fmt.Sprintf("token %s refused the PIN from %s (%v; C_Login tried once, not retried)", selector(cc.Token), cc.PIN, code)
	case errors.Is(err, hsm.ErrTokenNotFound), errors.Is(err, hsm.ErrAmbiguous):
		return fmt.Sprintf("module %s: %s", cc.Module, stripCluster(cc.ID, err))
	}
	return stripCluster(cc.ID, err)
}

func selector(t config.TokenSel) string {
	switch {
	case t.Label != "" && t.Serial != "":
		return fmt.Sprintf("%q serial %s", t.Label, t.Serial)
	case t.Label != "":
		return fmt.Sprintf("%q", t.Label)
	}
	return "serial " + t.Serial
}

// stripCluster drops the "cluster ID: " prefixes that every layer adds: the line names it.
func stripCluster(id string, err error) string {
	return strings.ReplaceAll(err.Error(), "cluster "+id+": ", "")
}

func certName(c *x509.Certificate) string {
	if c == nil {
		return "(none)"
	}
	if c.Subject.CommonName != "" {
		return "CN=" + c.Subject.CommonName
	}
	return c.Subject.String()
}

// validity returns what is wrong with c's validity period at now, or "".
func validity(c *x509.Certificate, now time.Time) string {
	switch {
	case now.After(c.NotAfter):
		return "expired on " + c.NotAfter.UTC().Format(time.DateOnly)
	case now.Before(c.NotBefore):
		return "not valid before " + c.NotBefore.UTC().Format(time.RFC3339)
	}
	return ""
}

// checkAuth loads the credentials files as serve does.
func checkAuth(c config.Auth, m *api.Metrics) checkLine {
	line := checkLine{name: "auth"}
	if _, err := authSchemes(c, m); err != nil {
		line.detail = err.Error()
		return line
	}
	var schemes []string
	for _, s := range []struct{ name, file string }{{"token_file", c.TokenFile}, {"aksk_file", c.AKSKFile}, {"jwt", c.JWT.JWKSFile}} {
		if s.file != "" {
			schemes = append(schemes, s.name)
		}
	}
	line.ok, line.detail = true, "loaded "+strings.Join(schemes, ", ")
	if c.Trusted.Listen != "" {
		line.detail += "; trusted frontend on " + c.Trusted.Listen + " (its TLS files are read by serve)"
	}
	return line
}

// checkTLS loads the API listener's certificate and key as serve does; a key on a token is
// found, logged in to and proven to be the certificate's, then released.
func checkTLS(c config.TLS, log *slog.Logger) checkLine {
	line := checkLine{name: "server.tls"}
	tc, closeKey, err := publicTLS(c, log)
	if err != nil {
		line.detail = err.Error()
		return line
	}
	defer func() { _ = closeKey() }()
	cert, _ := tc.GetCertificate(nil)
	key := "key in " + c.KeyFile
	if c.Key.On() {
		key = fmt.Sprintf("key %q on token %s", c.Key.Label, selector(c.Key.Token))
	}
	clients := "no client certificates"
	if c.ClientCA != "" {
		clients = "client certificates verified against " + c.ClientCA
	}
	if problem := validity(cert.Leaf, time.Now()); problem != "" {
		line.detail = fmt.Sprintf("certificate %s %s", certName(cert.Leaf), problem)
		return line
	}
	line.ok = true
	line.detail = fmt.Sprintf("certificate %s valid until %s, %s, %s", certName(cert.Leaf),
		cert.Leaf.NotAfter.UTC().Format(time.DateOnly), key, clients)
	return line
}

func oneLine(s string) string { return strings.ReplaceAll(s, "\n", "; ") }
