// Package deploytest checks the files under deploy/: the Kubernetes manifests decode
// strictly into their API types and agree with each other and with the embedded hsmbridge
// config, and every metric the Grafana dashboard and the Prometheus rules name is one a
// running daemon exports. It is a module of its own so that k8s.io/api stays out of the
// daemon's go.mod.
package deploytest
