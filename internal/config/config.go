// Package config decodes, defaults and validates the hsmbridge daemon's YAML
// configuration file.
//
// Load is the entry point. It decodes the file strictly (unknown keys,
// duplicate keys and a second YAML document are errors, reported with file
// and line), fills in defaults, resolves relative paths and then calls
// Validate, which reports every problem at once rather than the first.
//
// Relative paths (store.path, auth.token_file, auth.aksk_file, auth.jwt.jwks_file,
// auth.trusted's files, server.tls's files, clusters[].identity.cert_file, the pin
// files and unix: listen addresses) are resolved against the
// directory containing the config file, so the daemon means the same files
// whatever its working directory. PKCS#11 modules are the exception: they must
// be absolute.
//
// A cluster (and a TLS key on a token) may be named by an RFC 7512 pkcs11: URI
// instead of module, token and pin; Load expands it into those fields.
//
// The package touches the file system only to read the config file and, in
// PINSource.Read, a PIN file or systemd credential. Whether the other files
// named in the config exist is checked by the code that opens them.
package config

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	yaml "go.yaml.in/yaml/v3"
)

// Config is the daemon's whole configuration.
type Config struct {
	// Listen is a TCP "host:port" or "unix:/path/to.sock"; default "127.0.0.1:8080".
	Listen string `yaml:"listen"`
	// Region is the region id reported in API responses; default "local-1".
	Region   string    `yaml:"region"`
	Store    Store     `yaml:"store"`
	Auth     Auth      `yaml:"auth"`
	Clusters []Cluster `yaml:"clusters"`
	Log      Log       `yaml:"log"`
	Server   Server    `yaml:"server"`
}

// Store selects the metadata database.
type Store struct {
	// Driver is "sqlite" (default: one daemon, a file) or "postgres" (several daemons
	// sharing one database).
	Driver string `yaml:"driver"`
	// Path is the SQLite database file; required for sqlite.
	Path string `yaml:"path"`
	// The PostgreSQL connection string, from exactly one of: DSN itself, the environment
	// variable DSNEnv, or the file DSNFile (mode 0600: it may hold a password).
	DSN     string `yaml:"dsn"`
	DSNEnv  string `yaml:"dsn_env"`
	DSNFile string `yaml:"dsn_file"`
	// MaxConns sizes the PostgreSQL connection pool; default 8.
	MaxConns int `yaml:"max_conns"`
	// CacheTTL is how long a key or keystore row read from the store is trusted (default
	// 1s): a change made by another daemon takes effect here within it. MaxStale is how long
	// a row read earlier still serves while the store cannot be read (default 30s).
	CacheTTL Duration `yaml:"cache_ttl"`
	MaxStale Duration `yaml:"max_stale"`
}

// ReadDSN returns the PostgreSQL connection string from its source. Errors name the
// source, never the string (it may hold a password).
func (s Store) ReadDSN() (string, error) {
	switch {
	case s.DSN != "":
		return s.DSN, nil
	case s.DSNEnv != "":
		v, ok := os.LookupEnv(s.DSNEnv)
		if !ok || v == "" {
			return "", fmt.Errorf("store.dsn_env: environment variable %s is not set", s.DSNEnv)
		}
		return v, nil
	case s.DSNFile != "":
		v, err := readPINFile(s.DSNFile, true)
		if err != nil {
			return "", fmt.Errorf("store.dsn_file: %w", err)
		}
		return strings.TrimSpace(v), nil
	}
	return "", errors.New("store: no DSN source")
}

// Auth configures how callers authenticate. At least one scheme is required; each
// request is checked by the scheme its headers name.
type Auth struct {
	// TokenFile maps X-Auth-Token values (by SHA-256) to a domain and its projects: the
	// simple scheme for development and tests.
	TokenFile string `yaml:"token_file"`
	// AKSKFile holds access keys for SDK-HMAC-SHA256 request signing, the scheme the
	// official SDKs use. It must not be readable by group or others.
	AKSKFile string `yaml:"aksk_file"`
	// JWT verifies signed X-Auth-Token tokens from an issuer whose public keys we hold.
	JWT JWT `yaml:"jwt"`
	// Trusted is the sidecar listener where a trusted frontend names the tenant in headers.
	Trusted Trusted `yaml:"trusted"`
}

// JWT configures signed-token verification; it is on when JWKSFile is set.
type JWT struct {
	JWKSFile   string   `yaml:"jwks_file"`
	Issuer     string   `yaml:"issuer"`
	Audience   string   `yaml:"audience"`
	Algorithms []string `yaml:"algorithms"` // default ES256, RS256, EdDSA
	Leeway     Duration `yaml:"leeway"`     // default 30s
}

// Trusted configures the trusted-frontend listener; it is on when Listen is set. On a Unix
// socket the peer's uid must be in AllowedUIDs; on TCP the client must present a
// certificate that chains to ClientCA and whose subject is in Subjects.
type Trusted struct {
	Listen      string   `yaml:"listen"`
	AllowedUIDs []int    `yaml:"allowed_uids"`
	ClientCA    string   `yaml:"client_ca"`
	CertFile    string   `yaml:"cert_file"`
	KeyFile     string   `yaml:"key_file"`
	Subjects    []string `yaml:"subjects"` // RFC 2253 subject strings, e.g. "CN=frontend-a,O=kms"
}

// Log configures the daemon's logger.
type Log struct {
	Level  string `yaml:"level"`  // debug, info (default), warn or error
	Format string `yaml:"format"` // json (default) or text
}

// Server holds the HTTP server's timeouts. A zero value means the default,
// so a timeout cannot be disabled.
type Server struct {
	ReadHeaderTimeout Duration `yaml:"read_header_timeout"` // default 5s
	ReadTimeout       Duration `yaml:"read_timeout"`        // default 30s
	WriteTimeout      Duration `yaml:"write_timeout"`       // default 30s
	IdleTimeout       Duration `yaml:"idle_timeout"`        // default 120s
	ShutdownTimeout   Duration `yaml:"shutdown_timeout"`    // default 15s
	// RequestTimeout bounds a whole request, including the wait for a pooled
	// HSM session; default 5s. It must be shorter than WriteTimeout, or the
	// connection is cut before the timeout response can be written.
	RequestTimeout Duration `yaml:"request_timeout"`
	// KeyOperationTimeout bounds each data-plane key operation (sign, encrypt, ...),
	// including its wait for a pooled session; default 250ms.
	KeyOperationTimeout Duration `yaml:"key_operation_timeout"`
	// RouteTimeouts overrides the deadline of single routes by name ("sign",
	// "create-key", "list-keystores", ...).
	RouteTimeouts map[string]Duration `yaml:"route_timeouts"`
	// MetricsListen, if set, is a second listener serving only /healthz, /readyz and
	// /metrics, for probes and scrapers that cannot reach the API's Unix socket.
	MetricsListen string `yaml:"metrics_listen"`
	// TLS, if set, makes the API listener (listen) serve HTTPS.
	TLS TLS `yaml:"tls"`
}

// TLS configures HTTPS on the API listener; it is on when any key is set, and then
// CertFile and exactly one of KeyFile or Key are required. The certificate (and the key
// file) are re-read when they change on disk, without a restart.
type TLS struct {
	// CertFile is the server's certificate chain in PEM, leaf first.
	CertFile string `yaml:"cert_file"`
	// KeyFile is the certificate's private key in PEM (PKCS#8, PKCS#1 or SEC 1).
	KeyFile string `yaml:"key_file"`
	// Key is the certificate's private key on a PKCS#11 token instead of a file.
	Key TLSKey `yaml:"key"`
	// ClientCA, if set, is a PEM bundle of CAs: every client must then present a
	// certificate that chains to one of them.
	ClientCA string `yaml:"client_ca"`
}

// On reports whether TLS is configured at all.
func (t TLS) On() bool { return t != (TLS{}) }

// TLSKey is a private key on a PKCS#11 token, found by the label of its private key
// object: either URI, or Module, Token and PIN, plus Label (the URI's object attribute).
type TLSKey struct {
	URI    string    `yaml:"uri"`
	Module string    `yaml:"module"`
	Token  TokenSel  `yaml:"token"`
	PIN    PINSource `yaml:"pin"`
	Label  string    `yaml:"label"`
}

// On reports whether any key of the section is set.
func (k TLSKey) On() bool { return k != (TLSKey{}) }

// longFormSet reports whether any key that a URI would fill in is set.
func (k TLSKey) longFormSet() bool {
	return k.Module != "" || k.Token != (TokenSel{}) || k.PIN != (PINSource{}) || k.Label != ""
}

// Cluster types, as reported by the KMS dedicated keystore API.
const (
	ClusterTypeDHSM = "DHSM"
	ClusterTypeCDMS = "CDMS"
)

// Cluster is one PKCS#11 HSM cluster exposed as a dedicated keystore.
type Cluster struct {
	// ID names the cluster in the API; ^[a-zA-Z0-9_-]{1,64}$, unique.
	ID string `yaml:"id"`
	// Type is ClusterTypeDHSM (default) or ClusterTypeCDMS.
	Type string `yaml:"type"`
	// URI is an RFC 7512 pkcs11: URI naming the token, the module and the PIN source,
	// instead of Module, Token and PIN, e.g.
	// "pkcs11:token=c1;serial=8d14464c433b0adf?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/hsmbridge/pin".
	// Load expands it into those three fields.
	URI string `yaml:"uri"`
	// Module is the PKCS#11 module to load. It must be absolute so that
	// dlopen never searches the library path for it.
	Module   string    `yaml:"module"`
	Token    TokenSel  `yaml:"token"`
	PIN      PINSource `yaml:"pin"`
	PoolSize int       `yaml:"pool_size"` // sessions kept open; default 4, 1..256
	Identity Identity  `yaml:"identity"`
	// HealthProbe, if set, is how often the daemon proves the cluster's identity (a sign on
	// the token with the identity key, verified on the host) in the background, so the
	// cluster's state is fresh without waiting for traffic; off by default.
	HealthProbe Duration `yaml:"health_probe"`
}

// longFormSet reports whether any key that a URI would fill in is set.
func (c Cluster) longFormSet() bool {
	return c.Module != "" || c.Token != (TokenSel{}) || c.PIN != (PINSource{})
}

// TokenSel selects the cluster's token by serial number and/or label; at
// least one is required, and if both are set both must match. Slot numbers are
// deliberately not supported: SoftHSM and real HSMs renumber slots when tokens
// are added, removed or re-initialised, so a slot number can silently select
// the wrong token.
type TokenSel struct {
	Serial string `yaml:"serial"`
	Label  string `yaml:"label"`
}

// Identity names the cluster's identity key pair: a private key on the token
// and its certificate, either on the token or in a PEM file.
type Identity struct {
	KeyLabel  string `yaml:"key_label"`  // label of the private key on the token; required
	CertLabel string `yaml:"cert_label"` // label of a certificate object on the token, or
	CertFile  string `yaml:"cert_file"`  // a PEM file; exactly one of the two
}

// Duration is a time.Duration written in YAML as a Go duration string such
// as "250ms" or "30s".
type Duration struct{ time.Duration }

// UnmarshalYAML implements yaml.Unmarshaler.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode {
		return lineError(n, "want a Go duration such as \"250ms\" or \"30s\"")
	}
	v, err := time.ParseDuration(n.Value)
	if err != nil {
		return lineError(n, "invalid duration %q: want a Go duration such as \"250ms\" or \"30s\"", n.Value)
	}
	d.Duration = v
	return nil
}

// lineError reports a decoding problem at n's line in the form yaml.v3 uses
// for its own errors, so that decodeError rewrites all of them alike.
func lineError(n *yaml.Node, format string, args ...any) *yaml.TypeError {
	return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: %s", n.Line, fmt.Sprintf(format, args...))}}
}

// Load reads, decodes, defaults and validates the config file at path.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading config: %w", err)
	}
	dir, err := filepath.Abs(filepath.Dir(path))
	if err != nil {
		return nil, fmt.Errorf("reading config: %w", err)
	}
	var c Config
	if err := decode(path, data, &c); err != nil {
		return nil, err
	}
	conflicts := c.expandURIs()
	c.setDefaults()
	c.resolvePaths(dir)
	if err := errors.Join(append(conflicts, c.Validate())...); err != nil {
		return nil, fmt.Errorf("%s: invalid configuration:\n%w", path, err)
	}
	return &c, nil
}

// expandURIs fills module, token and pin (and a TLS key's label) from each uri that
// parses, and returns a problem for each uri given beside the keys it stands for. A uri
// that does not parse is left for Validate to report.
func (c *Config) expandURIs() []error {
	var errs []error
	for i := range c.Clusters {
		cl := &c.Clusters[i]
		if cl.URI == "" {
			continue
		}
		if cl.longFormSet() {
			errs = append(errs, problem(fmt.Sprintf("clusters[%d].uri", i), "set either uri or module, token and pin, not both"))
		} else if expanded, probs := cl.fromURI(); len(probs) == 0 {
			*cl = expanded
		}
	}
	if k := &c.Server.TLS.Key; k.URI != "" {
		if k.longFormSet() {
			errs = append(errs, problem("server.tls.key.uri", "set either uri or module, token, pin and label, not both"))
		} else if expanded, probs := k.fromURI(); len(probs) == 0 {
			*k = expanded
		}
	}
	return errs
}

// decode decodes exactly one YAML document from data into c, rejecting
// unknown keys. file is used only in error messages.
func decode(file string, data []byte, c *Config) error {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(c); errors.Is(err, io.EOF) {
		return fmt.Errorf("%s: file is empty", file)
	} else if err != nil {
		return decodeError(file, err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); errors.Is(err, io.EOF) {
		return nil
	} else if err != nil {
		return decodeError(file, err)
	}
	return fmt.Errorf("%s:%d: a second YAML document starts here; the config must be a single document", file, extra.Line)
}

var (
	yamlLineMsg    = regexp.MustCompile(`^(?:yaml: )?line (\d+): (.*)$`)
	yamlUnknownKey = regexp.MustCompile(`^field (\S+) not found in type (\S+)$`)
	keysByType     = yamlKeys(Config{}, Store{}, Auth{}, JWT{}, Trusted{}, Log{}, Server{}, TLS{}, TLSKey{}, Cluster{}, TokenSel{}, Identity{})
)

// yamlKeys maps each struct's Go type name, as yaml.v3 prints it, to its YAML
// keys, so that an unknown-key error can list the keys that are allowed there.
func yamlKeys(structs ...any) map[string][]string {
	m := make(map[string][]string)
	for _, s := range structs {
		t := reflect.TypeOf(s)
		for i := range t.NumField() {
			key, _, _ := strings.Cut(t.Field(i).Tag.Get("yaml"), ",")
			m[t.String()] = append(m[t.String()], key)
		}
	}
	return m
}

// decodeError rewrites yaml.v3's "line N: ..." messages into "file:N: ...",
// one error per problem, with unknown fields reported as unknown keys.
func decodeError(file string, err error) error {
	msgs := []string{err.Error()}
	if te, ok := errors.AsType[*yaml.TypeError](err); ok {
		msgs = te.Errors
	}
	errs := make([]error, len(msgs))
	for i, msg := range msgs {
		m := yamlLineMsg.FindStringSubmatch(msg)
		if m == nil {
			errs[i] = fmt.Errorf("%s: %s", file, strings.TrimPrefix(msg, "yaml: "))
			continue
		}
		line, text := m[1], m[2]
		if u := yamlUnknownKey.FindStringSubmatch(text); u != nil {
			text = fmt.Sprintf("unknown key %q", u[1])
			if keys := keysByType[u[2]]; keys != nil {
				text += " (expected one of: " + strings.Join(keys, ", ") + ")"
			}
		}
		errs[i] = fmt.Errorf("%s:%s: %s", file, line, text)
	}
	return errors.Join(errs...)
}

func (c *Config) setDefaults() {
	c.Listen = cmp.Or(c.Listen, "127.0.0.1:8080")
	c.Region = cmp.Or(c.Region, "local-1")
	c.Store.Driver = cmp.Or(c.Store.Driver, "sqlite")
	c.Store.MaxConns = cmp.Or(c.Store.MaxConns, 8)
	c.Store.CacheTTL = cmp.Or(c.Store.CacheTTL, Duration{time.Second})
	c.Store.MaxStale = cmp.Or(c.Store.MaxStale, Duration{30 * time.Second})
	c.Log.Level = cmp.Or(c.Log.Level, "info")
	c.Log.Format = cmp.Or(c.Log.Format, "json")
	s := &c.Server
	s.ReadHeaderTimeout = cmp.Or(s.ReadHeaderTimeout, Duration{5 * time.Second})
	s.ReadTimeout = cmp.Or(s.ReadTimeout, Duration{30 * time.Second})
	s.WriteTimeout = cmp.Or(s.WriteTimeout, Duration{30 * time.Second})
	s.IdleTimeout = cmp.Or(s.IdleTimeout, Duration{120 * time.Second})
	s.ShutdownTimeout = cmp.Or(s.ShutdownTimeout, Duration{15 * time.Second})
	s.RequestTimeout = cmp.Or(s.RequestTimeout, Duration{5 * time.Second})
	s.KeyOperationTimeout = cmp.Or(s.KeyOperationTimeout, Duration{250 * time.Millisecond})
	c.Auth.JWT.Leeway = cmp.Or(c.Auth.JWT.Leeway, Duration{30 * time.Second})
	for i := range c.Clusters {
		cl := &c.Clusters[i]
		cl.Type = cmp.Or(cl.Type, ClusterTypeDHSM)
		cl.PoolSize = cmp.Or(cl.PoolSize, 4)
	}
}

// resolvePaths makes relative file paths relative to dir, the config file's
// directory. Module is left alone: Validate requires it to be absolute.
func (c *Config) resolvePaths(dir string) {
	resolve := func(p *string) {
		if *p != "" && !filepath.IsAbs(*p) {
			*p = filepath.Join(dir, *p)
		}
	}
	resolveListen := func(l *string) {
		if sock, ok := strings.CutPrefix(*l, "unix:"); ok {
			resolve(&sock)
			*l = "unix:" + sock
		}
	}
	resolveListen(&c.Listen)
	resolveListen(&c.Auth.Trusted.Listen)
	resolveListen(&c.Server.MetricsListen)
	resolve(&c.Store.Path)
	resolve(&c.Store.DSNFile)
	resolve(&c.Auth.TokenFile)
	resolve(&c.Auth.AKSKFile)
	resolve(&c.Auth.JWT.JWKSFile)
	resolve(&c.Auth.Trusted.ClientCA)
	resolve(&c.Auth.Trusted.CertFile)
	resolve(&c.Auth.Trusted.KeyFile)
	resolve(&c.Server.TLS.CertFile)
	resolve(&c.Server.TLS.KeyFile)
	resolve(&c.Server.TLS.ClientCA)
	resolve(&c.Server.TLS.Key.PIN.File)
	for i := range c.Clusters {
		resolve(&c.Clusters[i].Identity.CertFile)
		resolve(&c.Clusters[i].PIN.File)
	}
}

// ListenNetwork returns the network and address to pass to net.Listen.
func (c *Config) ListenNetwork() (network, address string) { return SplitListen(c.Listen) }

// SplitListen turns a listen value ("host:port" or "unix:/path") into a network and address.
func SplitListen(listen string) (network, address string) {
	if sock, ok := strings.CutPrefix(listen, "unix:"); ok {
		return "unix", sock
	}
	return "tcp", listen
}

// Validate checks c as the daemon will use it, that is after defaults, and
// returns every problem found, joined with errors.Join, each prefixed with
// the path of the offending key. It reads no files and no PINs. A uri that Load
// has not expanded is parsed and checked as the keys it stands for.
func (c *Config) Validate() error {
	var errs []error
	errs = append(errs, validateListen("listen", c.Listen)...)
	if c.Server.MetricsListen != "" {
		errs = append(errs, validateListen("server.metrics_listen", c.Server.MetricsListen)...)
	}
	if c.Region == "" {
		errs = append(errs, problem("region", "required"))
	}
	errs = append(errs, c.Store.validate("store")...)
	errs = append(errs, c.Auth.validate("auth")...)
	errs = append(errs, c.Log.validate("log")...)
	errs = append(errs, c.Server.validate("server")...)
	errs = append(errs, validateClusters(c.Clusters)...)
	return errors.Join(errs...)
}

// problem returns a validation error for the config key at path.
func problem(path, format string, args ...any) error {
	return fmt.Errorf("%s: %s", path, fmt.Sprintf(format, args...))
}

func validateListen(key, listen string) []error {
	if sock, ok := strings.CutPrefix(listen, "unix:"); ok {
		if sock == "" {
			return []error{problem(key, "unix: needs a socket path, e.g. unix:/run/hsmbridge/api.sock")}
		}
		return nil
	}
	_, port, err := net.SplitHostPort(listen)
	if err != nil {
		return []error{problem(key, "want host:port or unix:/path: %v", err)}
	}
	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		return []error{problem(key, "port must be a number from 0 to 65535, got %q", port)}
	}
	return nil
}

func (s Store) validate(path string) []error {
	var errs []error
	if s.CacheTTL.Duration <= 0 || s.MaxStale.Duration < s.CacheTTL.Duration {
		errs = append(errs, problem(path+".cache_ttl", "must be positive and not above max_stale (%s), got %s", s.MaxStale, s.CacheTTL))
	}
	switch s.Driver {
	case "sqlite":
		if s.Path == "" {
			errs = append(errs, problem(path+".path", "required for the sqlite driver"))
		}
	case "postgres":
		n := 0
		for _, v := range []string{s.DSN, s.DSNEnv, s.DSNFile} {
			if v != "" {
				n++
			}
		}
		if n != 1 {
			errs = append(errs, problem(path, "the postgres driver needs exactly one of dsn, dsn_env, dsn_file"))
		}
		if s.DSNEnv != "" && !envName.MatchString(s.DSNEnv) {
			errs = append(errs, problem(path+".dsn_env", "not a valid environment variable name"))
		}
		if s.MaxConns < 1 || s.MaxConns > 1000 {
			errs = append(errs, problem(path+".max_conns", "must be between 1 and 1000, got %d", s.MaxConns))
		}
	default:
		errs = append(errs, problem(path+".driver", "must be sqlite or postgres, got %q", s.Driver))
	}
	return errs
}

func (a Auth) validate(path string) []error {
	var errs []error
	if a.TokenFile == "" && a.AKSKFile == "" && a.JWT.JWKSFile == "" {
		errs = append(errs, problem(path, "name at least one of token_file, aksk_file, jwt.jwks_file"))
	}
	if a.JWT.JWKSFile != "" {
		if a.JWT.Issuer == "" {
			errs = append(errs, problem(path+".jwt.issuer", "required with jwt.jwks_file"))
		}
		if a.JWT.Audience == "" {
			errs = append(errs, problem(path+".jwt.audience", "required with jwt.jwks_file"))
		}
		if a.JWT.Leeway.Duration < 0 {
			errs = append(errs, problem(path+".jwt.leeway", "must not be negative"))
		}
	}
	if t := a.Trusted; t.Listen != "" {
		p := path + ".trusted"
		if sock, ok := strings.CutPrefix(t.Listen, "unix:"); ok {
			if sock == "" {
				errs = append(errs, problem(p+".listen", "unix: needs a socket path"))
			}
			if len(t.AllowedUIDs) == 0 {
				errs = append(errs, problem(p+".allowed_uids", "required for a Unix socket listener"))
			}
		} else {
			errs = append(errs, validateListen(p+".listen", t.Listen)...)
			for _, f := range []struct{ key, v string }{{"client_ca", t.ClientCA}, {"cert_file", t.CertFile}, {"key_file", t.KeyFile}} {
				if f.v == "" {
					errs = append(errs, problem(p+"."+f.key, "required for an mTLS listener"))
				}
			}
			if len(t.Subjects) == 0 {
				errs = append(errs, problem(p+".subjects", "required for an mTLS listener"))
			}
		}
	}
	return errs
}

func (l Log) validate(path string) []error {
	var errs []error
	if !slices.Contains([]string{"debug", "info", "warn", "error"}, l.Level) {
		errs = append(errs, problem(path+".level", "must be debug, info, warn or error, got %q", l.Level))
	}
	if l.Format != "json" && l.Format != "text" {
		errs = append(errs, problem(path+".format", "must be json or text, got %q", l.Format))
	}
	return errs
}

func (s Server) validate(path string) []error {
	var errs []error
	for _, t := range []struct {
		key string
		d   Duration
	}{
		{"read_header_timeout", s.ReadHeaderTimeout},
		{"read_timeout", s.ReadTimeout},
		{"write_timeout", s.WriteTimeout},
		{"idle_timeout", s.IdleTimeout},
		{"shutdown_timeout", s.ShutdownTimeout},
		{"request_timeout", s.RequestTimeout},
		{"key_operation_timeout", s.KeyOperationTimeout},
	} {
		if t.d.Duration <= 0 {
			errs = append(errs, problem(path+"."+t.key, "must be positive, got %s", t.d))
		}
	}
	for name, d := range s.RouteTimeouts {
		if d.Duration <= 0 || d.Duration >= s.WriteTimeout.Duration {
			errs = append(errs, problem(path+".route_timeouts."+name, "must be positive and shorter than write_timeout (%s), got %s", s.WriteTimeout, d))
		}
	}
	if s.RequestTimeout.Duration > 0 && s.RequestTimeout.Duration >= s.WriteTimeout.Duration {
		errs = append(errs, problem(path+".request_timeout", "must be shorter than write_timeout (%s), got %s", s.WriteTimeout, s.RequestTimeout))
	}
	errs = append(errs, s.TLS.validate(path+".tls")...)
	return errs
}

func (t TLS) validate(path string) []error {
	if !t.On() {
		return nil
	}
	var errs []error
	if t.CertFile == "" {
		errs = append(errs, problem(path+".cert_file", "required when %s is set", path))
	}
	if t.KeyFile == "" && !t.Key.On() || t.KeyFile != "" && t.Key.On() {
		errs = append(errs, problem(path, "exactly one of key_file or key"))
	}
	if t.Key.On() {
		errs = append(errs, t.Key.validate(path+".key")...)
	}
	return errs
}

func (k TLSKey) validate(path string) []error {
	if k.URI != "" && !k.longFormSet() {
		expanded, probs := k.fromURI()
		if len(probs) > 0 {
			return problems(path+".uri", probs)
		}
		k = expanded
	}
	var errs []error
	errs = append(errs, validateModule(path+".module", k.Module)...)
	errs = append(errs, k.Token.validate(path+".token")...)
	errs = append(errs, k.PIN.validate(path+".pin")...)
	if k.Label == "" {
		errs = append(errs, problem(path+".label", "required: the label of the private key object on the token"))
	}
	return errs
}

func validateModule(path, module string) []error {
	switch {
	case module == "":
		return []error{problem(path, "required")}
	case !filepath.IsAbs(module):
		return []error{problem(path, "must be an absolute path, got %q", module)}
	}
	return nil
}

// problems returns one validation error per message, all at path.
func problems(path string, msgs []string) []error {
	errs := make([]error, len(msgs))
	for i, m := range msgs {
		errs[i] = problem(path, "%s", m)
	}
	return errs
}

func validateClusters(clusters []Cluster) []error {
	if len(clusters) == 0 {
		return []error{problem("clusters", "at least one cluster required")}
	}
	var errs []error
	ids := make(map[string]int)
	// Two clusters on one token would share its sessions and login state.
	type tokenKey struct{ module, field, value string }
	tokens := make(map[tokenKey]int)
	for i, cl := range clusters {
		path := fmt.Sprintf("clusters[%d]", i)
		errs = append(errs, cl.validate(path)...)
		if j, dup := ids[cl.ID]; dup && cl.ID != "" {
			errs = append(errs, problem(path+".id", "%q duplicates clusters[%d]", cl.ID, j))
		} else {
			ids[cl.ID] = i
		}
		for _, sel := range []struct{ field, value string }{{"serial", cl.Token.Serial}, {"label", cl.Token.Label}} {
			if cl.Module == "" || sel.value == "" {
				continue
			}
			k := tokenKey{filepath.Clean(cl.Module), sel.field, sel.value}
			if j, dup := tokens[k]; dup {
				errs = append(errs, problem(path+".token", "%s %q on module %s is already used by clusters[%d]", sel.field, sel.value, cl.Module, j))
			} else {
				tokens[k] = i
			}
		}
	}
	return errs
}

var clusterID = regexp.MustCompile(`^[a-zA-Z0-9_-]{1,64}$`)

func (c Cluster) validate(path string) []error {
	var errs []error
	switch {
	case c.ID == "":
		errs = append(errs, problem(path+".id", "required"))
	case !clusterID.MatchString(c.ID):
		errs = append(errs, problem(path+".id", "%q must match %s", c.ID, clusterID))
	}
	if c.Type != ClusterTypeDHSM && c.Type != ClusterTypeCDMS {
		errs = append(errs, problem(path+".type", "must be %s or %s, got %q", ClusterTypeDHSM, ClusterTypeCDMS, c.Type))
	}
	if c.HealthProbe.Duration < 0 {
		errs = append(errs, problem(path+".health_probe", "must not be negative, got %s", c.HealthProbe))
	}
	p11 := c
	var uriProblems []string
	if c.URI != "" && !c.longFormSet() { // not expanded by Load: check what it stands for
		p11, uriProblems = c.fromURI()
	}
	if len(uriProblems) > 0 {
		errs = append(errs, problems(path+".uri", uriProblems)...)
	} else {
		errs = append(errs, validateModule(path+".module", p11.Module)...)
		errs = append(errs, p11.Token.validate(path+".token")...)
		errs = append(errs, p11.PIN.validate(path+".pin")...)
	}
	if c.PoolSize < 1 || c.PoolSize > 256 {
		errs = append(errs, problem(path+".pool_size", "must be between 1 and 256, got %d", c.PoolSize))
	}
	errs = append(errs, c.Identity.validate(path+".identity")...)
	return errs
}

func (t TokenSel) validate(path string) []error {
	if t.Serial == "" && t.Label == "" {
		return []error{problem(path, "serial or label required")}
	}
	// CK_TOKEN_INFO holds these in fixed-size fields; a longer value can never match.
	var errs []error
	if len(t.Serial) > 16 {
		errs = append(errs, problem(path+".serial", "longer than the 16 bytes PKCS#11 allows"))
	}
	if len(t.Label) > 32 {
		errs = append(errs, problem(path+".label", "longer than the 32 bytes PKCS#11 allows"))
	}
	return errs
}

func (id Identity) validate(path string) []error {
	var errs []error
	if id.KeyLabel == "" {
		errs = append(errs, problem(path+".key_label", "required"))
	}
	if (id.CertLabel == "") == (id.CertFile == "") {
		errs = append(errs, problem(path, "exactly one of cert_label or cert_file"))
	}
	return errs
}

// PKCS11URI is what an RFC 7512 pkcs11: URI says about a token, its module, its PIN and
// an object on it, as far as hsmbridge uses them.
type PKCS11URI struct {
	Module string    // query attribute module-path; must be absolute
	Token  TokenSel  // path attributes serial and token (the token's label)
	Object string    // path attribute object: the label of an object on the token
	Type   string    // path attribute type, e.g. "private"
	PIN    PINSource // query attribute pin-source
}

// uriPathAttrs and uriQueryAttrs are the RFC 7512 attributes that hsmbridge understands.
// Every other attribute is an error: one that narrows the match (manufacturer, model,
// slot-id, ...) cannot be honoured by a token selector of serial and label only, and one
// that is silently ignored could select another token than the writer meant.
var (
	uriPathAttrs  = []string{"token", "serial", "object", "type"}
	uriQueryAttrs = []string{"module-path", "pin-source"}
)

// ParsePKCS11URI parses an RFC 7512 pkcs11: URI: path attributes token, serial, object and
// type, query attributes module-path and pin-source, values percent-decoded. Unknown
// attributes are errors that name them. pin-value is refused, since the PIN is never
// written into the config, and module-name, since the module is loaded by absolute path.
//
// pin-source is a file ("file:/etc/hsmbridge/pin", "file:///etc/hsmbridge/pin", or a
// plain path), or, as hsmbridge's own forms, "env:NAME" or "systemd_credential:NAME" —
// the forms PINSource.String prints. Error messages never quote attribute values.
func ParsePKCS11URI(s string) (PKCS11URI, error) {
	u, probs := parsePKCS11URI(s)
	if len(probs) > 0 {
		errs := make([]error, len(probs))
		for i, p := range probs {
			errs[i] = errors.New(p)
		}
		return PKCS11URI{}, errors.Join(errs...)
	}
	return u, nil
}

func parsePKCS11URI(s string) (PKCS11URI, []string) {
	var u PKCS11URI
	scheme, rest, ok := strings.Cut(s, ":")
	if !ok || !strings.EqualFold(scheme, "pkcs11") {
		return u, []string{`must start with "pkcs11:"`}
	}
	if strings.Contains(rest, "#") {
		return u, []string{"a pkcs11: URI has no fragment (#)"}
	}
	path, query, _ := strings.Cut(rest, "?")
	var probs []string
	seen := map[string]bool{}
	var unknown []string
	attrs := func(part, sep string, known []string, set func(name, value string)) {
		if part == "" {
			return
		}
		for attr := range strings.SplitSeq(part, sep) {
			name, raw, ok := strings.Cut(attr, "=")
			switch {
			case !ok || name == "":
				probs = append(probs, "an attribute is not of the form name=value")
				continue
			case name == "pin-value":
				probs = append(probs, "pin-value is not allowed: "+pinFromElsewhere+"; name it with pin-source instead")
				continue
			case name == "module-name":
				probs = append(probs, "module-name is not supported: give module-path, the absolute path of the module")
				continue
			case !slices.Contains(known, name):
				unknown = append(unknown, name)
				continue
			case seen[name]:
				probs = append(probs, fmt.Sprintf("attribute %s given twice", name))
				continue
			}
			seen[name] = true
			value, err := url.PathUnescape(raw)
			if err != nil {
				probs = append(probs, fmt.Sprintf("attribute %s: bad percent-encoding", name))
				continue
			}
			if value == "" {
				probs = append(probs, fmt.Sprintf("attribute %s is empty", name))
				continue
			}
			set(name, value)
		}
	}
	attrs(path, ";", uriPathAttrs, func(name, v string) {
		switch name {
		case "token":
			u.Token.Label = v
		case "serial":
			u.Token.Serial = v
		case "object":
			u.Object = v
		case "type":
			u.Type = v
		}
	})
	attrs(query, "&", uriQueryAttrs, func(name, v string) {
		switch name {
		case "module-path":
			u.Module = v
		case "pin-source":
			var err error
			if u.PIN, err = parsePINSource(v); err != nil {
				probs = append(probs, err.Error())
			}
		}
	})
	if len(unknown) > 0 {
		probs = append(probs, fmt.Sprintf("unknown or unsupported attribute(s) %s (known: %s; query: %s)",
			strings.Join(unknown, ", "), strings.Join(uriPathAttrs, ", "), strings.Join(uriQueryAttrs, ", ")))
	}
	if !seen["module-path"] {
		probs = append(probs, "module-path required (the absolute path of the PKCS#11 module)")
	}
	if !seen["token"] && !seen["serial"] {
		probs = append(probs, "token or serial required (never a slot)")
	}
	if !seen["pin-source"] {
		probs = append(probs, "pin-source required (file:PATH, env:NAME or systemd_credential:NAME)")
	}
	return u, probs
}

// parsePINSource reads a pin-source value; the value itself is never quoted.
func parsePINSource(v string) (PINSource, error) {
	scheme, rest, ok := strings.Cut(v, ":")
	switch {
	case strings.HasPrefix(v, "|"):
		return PINSource{}, errors.New("pin-source: a command (|...) is not supported; use a file, env or systemd_credential")
	case !ok || strings.HasPrefix(v, "/"):
		return PINSource{File: v}, nil
	case scheme == "file":
		if p, ok := strings.CutPrefix(rest, "//"); ok { // file:///abs or file://localhost/abs
			if p = strings.TrimPrefix(p, "localhost"); !strings.HasPrefix(p, "/") {
				return PINSource{}, errors.New("pin-source: a file: URI must name a local absolute path")
			}
			return PINSource{File: p}, nil
		}
		return PINSource{File: rest}, nil
	case scheme == "env":
		return PINSource{Env: rest}, nil
	case scheme == "systemd_credential":
		return PINSource{SystemdCredential: rest}, nil
	}
	return PINSource{}, errors.New("pin-source: want file:PATH, env:NAME or systemd_credential:NAME")
}

// fromURI returns c with module, token and pin from its URI, and the URI's problems.
func (c Cluster) fromURI() (Cluster, []string) {
	u, probs := parsePKCS11URI(c.URI)
	if u.Object != "" || u.Type != "" {
		probs = append(probs, "a cluster's uri names a token, not an object: drop object and type (the identity key is identity.key_label)")
	}
	if len(probs) > 0 {
		return c, probs
	}
	c.Module, c.Token, c.PIN = u.Module, u.Token, u.PIN
	return c, nil
}

// fromURI returns k with module, token, pin and label from its URI, and the URI's problems.
func (k TLSKey) fromURI() (TLSKey, []string) {
	u, probs := parsePKCS11URI(k.URI)
	if u.Object == "" {
		probs = append(probs, "object required: the label of the private key")
	}
	if u.Type != "" && u.Type != "private" {
		probs = append(probs, "type must be private")
	}
	if len(probs) > 0 {
		return k, probs
	}
	k.Module, k.Token, k.PIN, k.Label = u.Module, u.Token, u.PIN, u.Object
	return k, nil
}
