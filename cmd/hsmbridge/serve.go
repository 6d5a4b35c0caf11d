package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/hsmbridge/hsmbridge/hsm"
	"github.com/hsmbridge/hsmbridge/internal/config"
	"github.com/hsmbridge/hsmbridge/keystore"
	"github.com/hsmbridge/hsmbridge/keystore/api"
	"github.com/hsmbridge/hsmbridge/keystore/store"
)

// serve loads the configuration, starts the daemon and runs it until ctx ends.
func serve(ctx context.Context, configPath string, stderr io.Writer) error {
	cfg, err := config.Load(configPath)
	if err != nil {
		return err
	}
	log := newLogger(cfg.Log, stderr)
	d, err := openDaemon(ctx, cfg, log)
	if err != nil {
		return err
	}
	ln, err := listenPublic(cfg, log)
	if err != nil {
		return errors.Join(err, d.close(context.Background()))
	}
	log.Info("serving", "listen", cfg.Listen, "clusters", len(d.clusters), "version", version)
	return d.run(ctx, ln)
}

func newLogger(c config.Log, w io.Writer) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(c.Level)) // validated by config
	opts := &slog.HandlerOptions{Level: level}
	if c.Format == "text" {
		return slog.New(slog.NewTextHandler(w, opts))
	}
	return slog.New(slog.NewJSONHandler(w, opts))
}

// daemon is everything serve opened, in the order it opened it.
type daemon struct {
	cfg      *config.Config
	log      *slog.Logger
	store    store.Store
	clusters []*hsm.Cluster
	svc      *keystore.Service
	auth     api.Schemes
	server   *api.Server
	trusted  *api.Server // the trusted frontend's listener, if configured
}

// openDaemon opens the store, then each cluster in turn (serially, so a bad PIN is tried
// once and start-up stops at it), repairs what a crash left, and builds the API.
func openDaemon(ctx context.Context, cfg *config.Config, log *slog.Logger) (_ *daemon, err error) {
	d := &daemon{cfg: cfg, log: log}
	defer func() {
		if err != nil {
			err = errors.Join(err, d.close(context.Background()))
		}
	}()
	if d.store, err = openStore(ctx, cfg.Store); err != nil {
		return nil, err
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	metrics := api.NewMetrics(reg, reg, version)
	var bound []keystore.Cluster
	tokens := map[string]string{} // resolved module + serial → cluster id
	for i, cc := range cfg.Clusters {
		cl, err := openCluster(ctx, cc, metrics, log)
		if err != nil {
			return nil, fmt.Errorf("clusters[%d]: %w", i, err)
		}
		// Two ids for one token (a serial here, a label there; a module spelled through a
		// symlink) would let each cluster's repair take the other's markers for orphans.
		module, _ := filepath.EvalSymlinks(cc.Module)
		tok := module + "\x00" + cl.Token().Serial
		if other, dup := tokens[tok]; dup {
			return nil, errors.Join(fmt.Errorf("clusters[%d] (%s) selects the same token as cluster %s (serial %s)", i, cc.ID, other, cl.Token().Serial), cl.Close(ctx))
		}
		tokens[tok] = cc.ID
		d.clusters = append(d.clusters, cl)
		bound = append(bound, keystore.Cluster{Type: cc.Type, Cluster: cl})
		log.Info("cluster ready", "cluster", cc.ID, "token_label", cl.Token().Label, "token_serial", cl.Token().Serial,
			"pool_size", cl.Stats().MaxSessions, "pin", cc.PIN)
	}
	svc := keystore.New(d.store, bound, keystore.WithLogger(log),
		keystore.WithCacheBounds(cfg.Store.CacheTTL.Duration, cfg.Store.MaxStale.Duration))
	d.svc = svc
	reg.MustRegister(api.NewPoolCollector(d.clusters), api.NewConnectionCollector(svc))
	// Alone on its SQLite file, the daemon repairs everything at start-up; on PostgreSQL
	// other daemons may be creating right now, so young CREATING rows are left to them.
	grace := time.Duration(0)
	if cfg.Store.Driver == "postgres" {
		grace = keystore.RepairGrace
	}
	if err := svc.Reconcile(ctx, grace); err != nil {
		return nil, err
	}
	if d.auth, err = authSchemes(cfg.Auth, metrics); err != nil {
		return nil, err
	}
	routeTimeouts, err := routeTimeouts(cfg.Server.RouteTimeouts)
	if err != nil {
		return nil, err
	}
	apiCfg := api.Config{
		Service: svc, Auth: d.auth, Metrics: metrics, Log: log, Region: cfg.Region,
		RequestTimeout:      cfg.Server.RequestTimeout.Duration,
		KeyOperationTimeout: cfg.Server.KeyOperationTimeout.Duration,
		RouteTimeouts:       routeTimeouts,
	}
	d.server = api.NewServer(apiCfg)
	if t := cfg.Auth.Trusted; t.Listen != "" {
		apiCfg.Auth, apiCfg.Trusted = &api.TrustedFrontend{AllowedUIDs: t.AllowedUIDs, Subjects: t.Subjects}, true
		d.trusted = api.NewServer(apiCfg)
	}
	return d, nil
}

// routeTimeouts checks the configured per-route deadlines against the API's route names.
func routeTimeouts(in map[string]config.Duration) (map[string]time.Duration, error) {
	known := api.RouteNames()
	out := make(map[string]time.Duration, len(in))
	for name, d := range in {
		if !slices.Contains(known, name) {
			return nil, fmt.Errorf("server.route_timeouts: unknown route %q (known: %s)", name, strings.Join(known, ", "))
		}
		out[name] = d.Duration
	}
	return out, nil
}

func openCluster(ctx context.Context, cc config.Cluster, m *api.Metrics, log *slog.Logger) (*hsm.Cluster, error) {
	pin, err := cc.PIN.Read()
	if err != nil {
		return nil, fmt.Errorf("cluster %s: %w", cc.ID, err)
	}
	hc := hsm.ClusterConfig{
		ID: cc.ID, ModulePath: cc.Module, TokenSerial: cc.Token.Serial, TokenLabel: cc.Token.Label,
		PIN: pin, PoolSize: cc.PoolSize,
		IdentityKeyLabel: cc.Identity.KeyLabel, IdentityCertLabel: cc.Identity.CertLabel,
		Interceptor: m.HSMCalls(cc.ID), OnAcquireWait: m.AcquireWait(cc.ID),
		OnHealthChange: func(h hsm.Health) {
			log.Warn("cluster health changed", "cluster", cc.ID, "state", h.State.String(), "reason", h.Reason)
		},
		OnRecoverError: func(err error) { log.Warn("cluster recovery attempt failed", "cluster", cc.ID, "err", err) },
	}
	if cc.Identity.CertFile != "" {
		if hc.IdentityCertPEM, err = os.ReadFile(cc.Identity.CertFile); err != nil {
			return nil, fmt.Errorf("cluster %s: identity certificate: %w", cc.ID, err)
		}
	}
	return hsm.OpenCluster(ctx, hc)
}

// listen opens the API's configured TCP address or Unix socket, with TLS if server.tls is
// set (see listenPublic, which serve calls with the daemon's logger).
func listen(cfg *config.Config) (net.Listener, error) { return listenPublic(cfg, slog.Default()) }

// listenOn opens a TCP address or a Unix socket (mode 0660, for the frontend's group).
func listenOn(listen string) (net.Listener, error) {
	network, addr := config.SplitListen(listen)
	if network == "unix" {
		if fi, err := os.Lstat(addr); err == nil && fi.Mode()&os.ModeSocket != 0 {
			_ = os.Remove(addr) // a stale socket of an earlier run
		}
	}
	ln, err := net.Listen(network, addr)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", listen, err)
	}
	if network == "unix" {
		if err := os.Chmod(addr, 0o660); err != nil {
			return nil, errors.Join(fmt.Errorf("listen %s: %w", listen, err), ln.Close())
		}
	}
	return ln, nil
}

// run serves the API on ln, and the trusted-frontend and ops listeners if configured, until
// ctx ends; then it shuts down in reverse order of start-up: /readyz fails, HTTP drains
// (bounded), pools and modules close, the store closes. SIGHUP reloads the credentials.
func (d *daemon) run(ctx context.Context, ln net.Listener) error {
	servers := []served{{d.newHTTPServer(d.server), ln, false}}
	extra, err := d.extraListeners()
	if err != nil {
		return errors.Join(err, ln.Close(), d.close(context.Background()))
	}
	servers = append(servers, extra...)
	errs := make(chan error, len(servers))
	for _, s := range servers {
		go func() {
			var err error
			if s.tls {
				err = s.srv.ServeTLS(s.ln, "", "")
			} else {
				err = s.srv.Serve(s.ln)
			}
			errs <- err
		}()
	}
	sweepCtx, stopSweep := context.WithCancel(context.Background())
	var background sync.WaitGroup
	background.Go(func() { d.sweepDeletions(sweepCtx) })
	for i, cc := range d.cfg.Clusters {
		if cc.HealthProbe.Duration > 0 {
			background.Go(func() { d.probe(sweepCtx, d.clusters[i], cc.HealthProbe.Duration) })
		}
	}
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)

	notifyReady(d.log)
	stopWatchdog := startWatchdog(d.log)
	var runErr error
	for waiting := true; waiting; {
		select {
		case <-hup:
			reloadAuth(d.auth, d.log)
		case runErr = <-errs: // a listener failed: stop everything
			waiting = false
		case <-ctx.Done():
			waiting = false
		}
	}
	stopWatchdog()
	notifyStopping()
	grace := d.cfg.Server.ShutdownTimeout.Duration
	d.log.Info("shutting down", "grace", grace.String())
	d.server.SetDraining()
	if d.trusted != nil {
		d.trusted.SetDraining()
	}
	sctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	var shutdownErrs []error
	for _, s := range servers {
		if err := s.srv.Shutdown(sctx); err != nil {
			shutdownErrs = append(shutdownErrs, err)
		}
	}
	stopSweep()
	background.Wait()
	if errors.Is(runErr, http.ErrServerClosed) {
		runErr = nil
	}
	cctx, cancelClose := context.WithTimeout(context.Background(), grace)
	defer cancelClose()
	return errors.Join(runErr, errors.Join(shutdownErrs...), d.close(cctx))
}

// served is one HTTP server on its listener.
type served struct {
	srv *http.Server
	ln  net.Listener
	tls bool
}

func (d *daemon) newHTTPServer(h http.Handler) *http.Server {
	s := d.cfg.Server
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: s.ReadHeaderTimeout.Duration,
		ReadTimeout:       s.ReadTimeout.Duration,
		WriteTimeout:      s.WriteTimeout.Duration,
		IdleTimeout:       s.IdleTimeout.Duration,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(d.log.Handler(), slog.LevelWarn),
		// Requests must not inherit the signal context: SIGTERM would cancel them instead
		// of letting them drain.
		BaseContext: func(net.Listener) context.Context { return context.Background() },
	}
}

// extraListeners opens the trusted-frontend and ops listeners that the config names.
func (d *daemon) extraListeners() ([]served, error) {
	var out []served
	if d.trusted != nil {
		srv := d.newHTTPServer(d.trusted)
		if err := trustedServer(d.cfg.Auth.Trusted, srv, d.log); err != nil {
			return nil, err
		}
		ln, err := listenOn(d.cfg.Auth.Trusted.Listen)
		if err != nil {
			return nil, err
		}
		out = append(out, served{srv, ln, srv.TLSConfig != nil})
		d.log.Info("serving trusted frontends", "listen", d.cfg.Auth.Trusted.Listen)
	}
	if addr := d.cfg.Server.MetricsListen; addr != "" {
		ln, err := listenOn(addr)
		if err != nil {
			for _, s := range out {
				_ = s.ln.Close()
			}
			return nil, err
		}
		out = append(out, served{d.newHTTPServer(d.server.OpsHandler()), ln, false})
		d.log.Info("serving health and metrics", "listen", addr)
	}
	return out, nil
}

// deletionSweep is how often keys whose pending deletion has come are destroyed, and
// half-done work is repaired. Pending periods are days long, so a minute late is immaterial.
const deletionSweep = time.Minute

// sweepDeletions destroys due keys, and repairs what a request left half-done (a failed
// undo) without a restart once it is old enough not to be a create still in flight.
func (d *daemon) sweepDeletions(ctx context.Context) {
	every(ctx, deletionSweep, func() {
		if _, err := d.svc.DestroyDueKeys(ctx); err != nil && ctx.Err() == nil {
			d.log.Error("destroying keys due for deletion", "err", err)
		}
		if err := d.svc.Reconcile(ctx, keystore.RepairGrace); err != nil && ctx.Err() == nil {
			d.log.Error("periodic repair", "err", err)
		}
	})
}

// probe proves cl's identity every interval. The proof runs through the cluster's error
// rules like any call, so a dead device opens its breaker (and /readyz says so) before a
// customer's request finds out; it uses the identity key, never a customer key, so key
// audit trails stay clean.
func (d *daemon) probe(ctx context.Context, cl *hsm.Cluster, interval time.Duration) {
	every(ctx, interval, func() {
		pctx, cancel := context.WithTimeout(ctx, min(interval, 5*time.Second))
		defer cancel()
		if err := cl.ProveIdentity(pctx); err != nil && ctx.Err() == nil {
			d.log.Warn("cluster health probe failed", "cluster", cl.ID(), "err", err)
		}
	})
}

// every runs fn each interval until ctx ends.
func every(ctx context.Context, interval time.Duration, fn func()) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			fn()
		}
	}
}

// close releases what openDaemon opened, in reverse order.
func (d *daemon) close(ctx context.Context) error {
	var errs []error
	for i := len(d.clusters) - 1; i >= 0; i-- {
		errs = append(errs, d.clusters[i].Close(ctx))
	}
	d.clusters = nil
	if d.store != nil {
		errs = append(errs, d.store.Close())
		d.store = nil
	}
	return errors.Join(errs...)
}
