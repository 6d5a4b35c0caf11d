package api

import (
	"context"
	"net/http"
	"runtime"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/hsmbridge/hsmbridge/hsm"
	"github.com/hsmbridge/hsmbridge/keystore"
)

// Buckets start near our 60 µs added-latency budget and double: 25 µs … ~13 s.
var latencyBuckets = prometheus.ExponentialBuckets(25e-6, 2, 20)

// Metrics holds what hsmbridge observes itself: HTTP requests, PKCS#11 calls and pool waits.
// Pool gauges are read from the pools at scrape time by PoolCollector instead.
type Metrics struct {
	gatherer prometheus.Gatherer
	http     *prometheus.HistogramVec
	hsmCalls *prometheus.HistogramVec
	wait     *prometheus.HistogramVec
	authFail *prometheus.CounterVec
}

// NewMetrics registers hsmbridge's metrics, and build info, on reg (a registry of our own,
// never the global default), and serves g at /metrics.
func NewMetrics(reg prometheus.Registerer, g prometheus.Gatherer, version string) *Metrics {
	m := &Metrics{
		gatherer: g,
		http: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "hsmbridge_http_request_duration_seconds",
			Help:    "Time to answer an HTTP request, by route pattern and status code.",
			Buckets: latencyBuckets,
		}, []string{"route", "code"}),
		hsmCalls: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "hsmbridge_hsm_call_duration_seconds",
			Help:    "Time spent in one PKCS#11 call, by cluster, function and result (ok or the error class).",
			Buckets: latencyBuckets,
		}, []string{"cluster", "function", "result"}),
		wait: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "hsmbridge_pool_acquire_wait_seconds",
			Help:    "Time a caller waited for a free HSM session, by cluster.",
			Buckets: latencyBuckets,
		}, []string{"cluster"}),
	}
	m.authFail = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "hsmbridge_auth_failures_total",
		Help: "Requests refused for their credential, by scheme (aksk, jwt, token) and reason.",
	}, []string{"scheme", "reason"})
	for _, r := range AKSKFailureReasons() {
		m.authFail.WithLabelValues("aksk", r)
	}
	for _, r := range JWTFailureReasons() {
		m.authFail.WithLabelValues("jwt", r)
	}
	for _, r := range TokenFailureReasons() {
		m.authFail.WithLabelValues("token", r)
	}
	build := prometheus.NewGauge(prometheus.GaugeOpts{
		Name:        "hsmbridge_build_info",
		Help:        "Always 1; the labels say which build is running.",
		ConstLabels: prometheus.Labels{"version": version, "goversion": runtime.Version()},
	})
	build.Set(1)
	reg.MustRegister(m.http, m.hsmCalls, m.wait, m.authFail, build)
	return m
}

func (m *Metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.gatherer, promhttp.HandlerOpts{})
}

func (m *Metrics) observeHTTP(route string, status int, d time.Duration) {
	m.http.WithLabelValues(route, strconv.Itoa(status)).Observe(d.Seconds())
}

// HSMCalls returns the Interceptor that times every PKCS#11 call of cluster.
func (m *Metrics) HSMCalls(cluster string) hsm.Interceptor {
	calls := m.hsmCalls.MustCurryWith(prometheus.Labels{"cluster": cluster})
	return func(fn string, call func() error) error {
		start := time.Now()
		err := call()
		result := "ok"
		if err != nil {
			result = hsm.ClassifyCall(fn, err).String()
		}
		calls.WithLabelValues(fn, result).Observe(time.Since(start).Seconds())
		return err
	}
}

// AuthFailure returns the counter of scheme's refusals, for AKSK.OnFailure and
// JWTVerifier.OnFailure.
func (m *Metrics) AuthFailure(scheme string) func(reason string) {
	c := m.authFail.MustCurryWith(prometheus.Labels{"scheme": scheme})
	return func(reason string) { c.WithLabelValues(reason).Inc() }
}

// AcquireWait returns the observer of cluster's pool waits.
func (m *Metrics) AcquireWait(cluster string) func(time.Duration) {
	o := m.wait.WithLabelValues(cluster)
	return func(d time.Duration) { o.Observe(d.Seconds()) }
}

// PoolCollector reports every cluster's pool at scrape time from one Stats snapshot per
// cluster, so the gauges of one cluster always agree with each other.
type PoolCollector struct {
	clusters []*hsm.Cluster
}

var (
	descSessions  = prometheus.NewDesc("hsmbridge_pool_sessions", "Worker sessions open, by state (idle or in_use).", []string{"cluster", "state"}, nil)
	descMax       = prometheus.NewDesc("hsmbridge_pool_max_sessions", "The most worker sessions the pool will open.", []string{"cluster"}, nil)
	descWaiters   = prometheus.NewDesc("hsmbridge_pool_waiters", "Callers waiting for a session now.", []string{"cluster"}, nil)
	descWaits     = prometheus.NewDesc("hsmbridge_pool_waits_total", "Acquisitions that had to wait for a session.", []string{"cluster"}, nil)
	descWaitTime  = prometheus.NewDesc("hsmbridge_pool_wait_seconds_total", "Total time callers waited for a session.", []string{"cluster"}, nil)
	descEvictions = prometheus.NewDesc("hsmbridge_pool_evictions_total", "Sessions closed after an error, by error class.", []string{"cluster", "class"}, nil)
	descStuck     = prometheus.NewDesc("hsmbridge_pool_stuck_sessions", "Sessions held in a PKCS#11 call for longer than the stuck threshold, now.", []string{"cluster"}, nil)
	descStuckAll  = prometheus.NewDesc("hsmbridge_pool_stuck_calls_total", "Calls that held a session past the stuck threshold.", []string{"cluster"}, nil)
	descRelogins  = prometheus.NewDesc("hsmbridge_pool_relogins_total", "Re-logins after the token forgot our login.", []string{"cluster"}, nil)
	descBreaker   = prometheus.NewDesc("hsmbridge_cluster_breaker_open", "1 while the cluster refuses work (breaker open, or failed on its credential).", []string{"cluster"}, nil)
	descOpens     = prometheus.NewDesc("hsmbridge_cluster_breaker_opens_total", "Times the cluster's breaker opened.", []string{"cluster"}, nil)
)

// NewPoolCollector returns a collector over clusters.
func NewPoolCollector(clusters []*hsm.Cluster) *PoolCollector {
	return &PoolCollector{clusters: clusters}
}

// Describe implements prometheus.Collector.
func (c *PoolCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descSessions, descMax, descWaiters, descWaits, descWaitTime, descEvictions,
		descStuck, descStuckAll, descRelogins, descBreaker, descOpens} {
		ch <- d
	}
}

// Collect implements prometheus.Collector. It reads memory only, never the HSM.
func (c *PoolCollector) Collect(ch chan<- prometheus.Metric) {
	for _, cl := range c.clusters {
		id, st := cl.ID(), cl.Stats()
		ch <- prometheus.MustNewConstMetric(descSessions, prometheus.GaugeValue, float64(st.Idle), id, "idle")
		ch <- prometheus.MustNewConstMetric(descSessions, prometheus.GaugeValue, float64(st.InUse), id, "in_use")
		ch <- prometheus.MustNewConstMetric(descMax, prometheus.GaugeValue, float64(st.MaxSessions), id)
		ch <- prometheus.MustNewConstMetric(descWaiters, prometheus.GaugeValue, float64(st.Waiters), id)
		ch <- prometheus.MustNewConstMetric(descWaits, prometheus.CounterValue, float64(st.WaitCount), id)
		ch <- prometheus.MustNewConstMetric(descWaitTime, prometheus.CounterValue, st.WaitDuration.Seconds(), id)
		for class, n := range st.Evictions {
			ch <- prometheus.MustNewConstMetric(descEvictions, prometheus.CounterValue, float64(n), id, hsm.Class(class).String())
		}
		ch <- prometheus.MustNewConstMetric(descStuck, prometheus.GaugeValue, float64(st.Stuck), id)
		ch <- prometheus.MustNewConstMetric(descStuckAll, prometheus.CounterValue, float64(st.StuckCalls), id)
		ch <- prometheus.MustNewConstMetric(descRelogins, prometheus.CounterValue, float64(st.Relogins), id)
		open := 0.0
		if cl.Health().State != hsm.StateHealthy {
			open = 1
		}
		ch <- prometheus.MustNewConstMetric(descBreaker, prometheus.GaugeValue, open, id)
		ch <- prometheus.MustNewConstMetric(descOpens, prometheus.CounterValue, float64(st.BreakerOpens), id)
	}
}

var descConnection = prometheus.NewDesc("hsmbridge_keystore_connection_state",
	"1 for the connection state the keystore bound to the cluster is in, 0 for the others.",
	[]string{"cluster", "state"}, nil)

// ConnectionCollector reports the connection state of every live keystore, by its cluster
// (one keystore per cluster, so the cluster label bounds the series without keystore ids).
type ConnectionCollector struct {
	svc *keystore.Service
}

// NewConnectionCollector returns a collector over svc's keystores.
func NewConnectionCollector(svc *keystore.Service) *ConnectionCollector {
	return &ConnectionCollector{svc: svc}
}

// Describe implements prometheus.Collector.
func (c *ConnectionCollector) Describe(ch chan<- *prometheus.Desc) { ch <- descConnection }

// Collect implements prometheus.Collector. It reads the store and the cached cluster probes.
func (c *ConnectionCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	rs, err := c.svc.Readiness(ctx)
	if err != nil {
		ch <- prometheus.NewInvalidMetric(descConnection, err)
		return
	}
	for _, r := range rs {
		for _, state := range []string{keystore.Connected, keystore.Disconnected, keystore.Failed} {
			v := 0.0
			if r.State == state {
				v = 1
			}
			ch <- prometheus.MustNewConstMetric(descConnection, prometheus.GaugeValue, v, r.ClusterID, state)
		}
	}
}
