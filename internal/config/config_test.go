package config

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func dur(d time.Duration) Duration { return Duration{d} }

// defaultServer is the server section as defaulted, with metricsListen.
func defaultServer(metricsListen string) Server {
	return Server{
		ReadHeaderTimeout:   dur(5 * time.Second),
		ReadTimeout:         dur(30 * time.Second),
		WriteTimeout:        dur(30 * time.Second),
		IdleTimeout:         dur(120 * time.Second),
		ShutdownTimeout:     dur(15 * time.Second),
		RequestTimeout:      dur(5 * time.Second),
		KeyOperationTimeout: dur(250 * time.Millisecond),
		MetricsListen:       metricsListen,
	}
}

// chgrp gives file the group gid (the tests run as root on CI; elsewhere only to one's
// own groups, so a test that needs a foreign group is skipped).
func chgrp(t *testing.T, file string, gid int) string {
	t.Helper()
	if err := os.Chown(file, -1, gid); err != nil {
		t.Skipf("chown %s to group %d: %v", file, gid, err)
	}
	return file
}

func TestStoreReadDSN(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "dsn")
	if err := os.WriteFile(file, []byte("postgres://u:secret@h/db\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	loose := filepath.Join(dir, "loose")
	if err := os.WriteFile(loose, []byte("postgres://u:secret@h/db"), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Setenv("HSMB_TEST_DSN", "postgres://env/db")
	for _, tt := range []struct {
		s       Store
		want    string
		wantErr string
	}{
		{Store{DSN: "postgres://inline/db"}, "postgres://inline/db", ""},
		{Store{DSNEnv: "HSMB_TEST_DSN"}, "postgres://env/db", ""},
		{Store{DSNEnv: "HSMB_TEST_UNSET"}, "", "HSMB_TEST_UNSET is not set"},
		{Store{DSNFile: file}, "postgres://u:secret@h/db", ""},
		{Store{DSNFile: loose}, "", "readable by group or others"},
	} {
		got, err := tt.s.ReadDSN()
		if got != tt.want || (tt.wantErr == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tt.wantErr)) {
			t.Errorf("%+v: ReadDSN = %q, %v; want %q, %q", tt.s, got, err, tt.want, tt.wantErr)
		}
		if err != nil && strings.Contains(err.Error(), "secret") {
			t.Errorf("error quotes the DSN: %v", err)
		}
	}
}

func TestLoadValid(t *testing.T) {
	dir, err := filepath.Abs("testdata")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		file string
		want Config
	}{
		{
			file: "full.yaml",
			want: Config{
				Listen: "unix:" + filepath.Join(dir, "run/hsmbridge.sock"),
				Region: "cn-north-4",
				Store:  Store{Driver: "sqlite", Path: filepath.Join(dir, "data/hsmbridge.db"), MaxConns: 8, CacheTTL: dur(time.Second), MaxStale: dur(30 * time.Second)},
				Auth:   Auth{TokenFile: filepath.Join(dir, "tokens.yaml"), JWT: JWT{Leeway: dur(30 * time.Second)}},
				Log:    Log{Level: "debug", Format: "text"},
				Server: Server{
					ReadHeaderTimeout:   dur(2 * time.Second),
					ReadTimeout:         dur(10 * time.Second),
					WriteTimeout:        dur(20 * time.Second),
					IdleTimeout:         dur(time.Minute),
					ShutdownTimeout:     dur(3 * time.Second),
					RequestTimeout:      dur(2500 * time.Millisecond),
					KeyOperationTimeout: dur(250 * time.Millisecond),
				},
				Clusters: []Cluster{
					{
						ID:       "dev-1",
						Type:     "CDMS",
						Module:   "/usr/lib/softhsm/libsofthsm2.so",
						Token:    TokenSel{Serial: "5e3c9a1b2f4d6e70", Label: "hsmbridge-dev"},
						PIN:      PINSource{File: filepath.Join(dir, "secrets/pin")},
						PoolSize: 8,
						Identity: Identity{KeyLabel: "identity", CertFile: filepath.Join(dir, "certs/identity.pem")},
					},
					{
						ID:       "dev_2",
						Type:     "DHSM",
						Module:   "/usr/lib/softhsm/libsofthsm2.so",
						Token:    TokenSel{Label: "hsmbridge-dev2"},
						PIN:      PINSource{SystemdCredential: "dev2-pin"},
						PoolSize: 1,
						Identity: Identity{KeyLabel: "identity", CertLabel: "identity-cert"},
					},
				},
			},
		},
		{
			file: "minimal.yaml",
			want: Config{
				Listen: "127.0.0.1:8080",
				Region: "local-1",
				Store:  Store{Driver: "sqlite", Path: "/var/lib/hsmbridge/hsmbridge.db", MaxConns: 8, CacheTTL: dur(time.Second), MaxStale: dur(30 * time.Second)},
				Auth:   Auth{TokenFile: "/etc/hsmbridge/tokens.yaml", JWT: JWT{Leeway: dur(30 * time.Second)}},
				Log:    Log{Level: "info", Format: "json"},
				Server: Server{
					ReadHeaderTimeout:   dur(5 * time.Second),
					ReadTimeout:         dur(30 * time.Second),
					WriteTimeout:        dur(30 * time.Second),
					IdleTimeout:         dur(120 * time.Second),
					ShutdownTimeout:     dur(15 * time.Second),
					RequestTimeout:      dur(5 * time.Second),
					KeyOperationTimeout: dur(250 * time.Millisecond),
				},
				Clusters: []Cluster{{
					ID:       "c1",
					Type:     "DHSM",
					Module:   "/usr/lib/softhsm/libsofthsm2.so",
					Token:    TokenSel{Label: "c1"},
					PIN:      PINSource{Env: "HSMBRIDGE_C1_PIN"},
					PoolSize: 4,
					Identity: Identity{KeyLabel: "identity", CertLabel: "identity-cert"},
				}},
			},
		},
		{
			file: "auth_full.yaml",
			want: Config{
				Listen: "127.0.0.1:8080",
				Region: "local-1",
				Store:  Store{Driver: "sqlite", Path: filepath.Join(dir, "hsmbridge.db"), MaxConns: 8, CacheTTL: dur(time.Second), MaxStale: dur(30 * time.Second)},
				Auth: Auth{
					TokenFile: filepath.Join(dir, "tokens.yaml"),
					AKSKFile:  filepath.Join(dir, "secrets/aksk.yaml"),
					JWT: JWT{
						JWKSFile: filepath.Join(dir, "jwks.json"), Issuer: "https://iam.example", Audience: "hsmbridge",
						Algorithms: []string{"ES256", "EdDSA"}, Leeway: dur(10 * time.Second),
					},
					Trusted: Trusted{
						Listen:   "127.0.0.1:8443",
						ClientCA: filepath.Join(dir, "tls/frontend-ca.pem"),
						CertFile: filepath.Join(dir, "tls/server.pem"),
						KeyFile:  "/etc/hsmbridge/tls/server-key.pem",
						Subjects: []string{"CN=frontend-a,O=kms", "CN=frontend-b,O=kms"},
					},
				},
				Log:    Log{Level: "info", Format: "json"},
				Server: defaultServer("127.0.0.1:9090"),
				Clusters: []Cluster{{
					ID: "c1", Type: "DHSM", Module: "/usr/lib/softhsm/libsofthsm2.so", Token: TokenSel{Label: "c1"},
					PIN: PINSource{Env: "HSMBRIDGE_C1_PIN"}, PoolSize: 4, Identity: Identity{KeyLabel: "identity", CertLabel: "identity-cert"},
				}},
			},
		},
		{
			file: "auth_unix.yaml",
			want: Config{
				Listen: "127.0.0.1:8080",
				Region: "local-1",
				Store:  Store{Driver: "sqlite", Path: "/var/lib/hsmbridge/hsmbridge.db", MaxConns: 8, CacheTTL: dur(time.Second), MaxStale: dur(30 * time.Second)},
				Auth: Auth{
					AKSKFile: "/etc/hsmbridge/aksk.yaml",
					JWT:      JWT{Leeway: dur(30 * time.Second)},
					Trusted:  Trusted{Listen: "unix:" + filepath.Join(dir, "run/trusted.sock"), AllowedUIDs: []int{0, 998}},
				},
				Log:    Log{Level: "info", Format: "json"},
				Server: defaultServer(""),
				Clusters: []Cluster{{
					ID: "c1", Type: "DHSM", Module: "/usr/lib/softhsm/libsofthsm2.so", Token: TokenSel{Label: "c1"},
					PIN: PINSource{Env: "HSMBRIDGE_C1_PIN"}, PoolSize: 4, Identity: Identity{KeyLabel: "identity", CertLabel: "identity-cert"},
				}},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			got, err := Load(filepath.Join("testdata", tt.file))
			if err != nil {
				t.Fatalf("Load: %v", err)
			}
			if !reflect.DeepEqual(*got, tt.want) {
				t.Errorf("Load:\n got %+v\nwant %+v", *got, tt.want)
			}
		})
	}
}

func TestLoadErrors(t *testing.T) {
	tests := []struct {
		file    string
		want    []string // substrings that must all appear
		notWant []string // substrings that must not appear
	}{
		{file: "missing.yaml", want: []string{"reading config", "missing.yaml"}},
		{file: "empty.yaml", want: []string{"empty.yaml: file is empty"}},
		{file: "comments_only.yaml", want: []string{"comments_only.yaml: file is empty"}},
		{file: "two_docs.yaml", want: []string{"two_docs.yaml:3: a second YAML document"}},
		{file: "syntax.yaml", want: []string{"syntax.yaml:2: did not find expected key"}, notWant: []string{"yaml: line"}},
		{file: "duplicate_key.yaml", want: []string{`duplicate_key.yaml:4: mapping key "region" already defined at line 1`}},
		{
			file:    "unknown_top.yaml",
			want:    []string{`unknown_top.yaml:3: unknown key "regoin" (expected one of: listen, region, store,`},
			notWant: []string{"not found in type"},
		},
		{
			// Both typos are reported, each at its own line.
			file: "unknown_nested.yaml",
			want: []string{
				`unknown_nested.yaml:12: unknown key "pool_sise" (expected one of: id, type, uri, module, token, pin, pool_size, identity, health_probe)`,
				`unknown_nested.yaml:15: unknown key "cert_lable" (expected one of: key_label, cert_label, cert_file)`,
			},
		},
		{
			file:    "pin_scalar.yaml",
			want:    []string{"pin_scalar.yaml:10: pin: the PIN must come from a file, env var or systemd credential"},
			notWant: []string{"918273"},
		},
		{
			file:    "pin_value.yaml",
			want:    []string{`pin_value.yaml:11: pin: key "value" not allowed: the PIN must come from a file, env var or systemd credential`},
			notWant: []string{"918273"},
		},
		{
			file:    "pin_flow_key.yaml",
			want:    []string{"pin_flow_key.yaml:3: pin: unknown key"},
			notWant: []string{"918273"},
		},
		{
			file: "bad_duration.yaml",
			want: []string{`bad_duration.yaml:5: invalid duration "30 seconds"`},
		},
		{
			file: "many_problems.yaml",
			want: []string{
				"many_problems.yaml: invalid configuration:",
				"listen: want host:port or unix:/path",
				`store.driver: must be sqlite or postgres, got "mysql"`,
				"auth: name at least one of token_file, aksk_file, jwt.jwks_file",
				`log.level: must be debug, info, warn or error, got "verbose"`,
				`clusters[0].module: must be an absolute path, got "libsofthsm2.so"`,
				"clusters[0].token: serial or label required",
				"clusters[0].pin: exactly one of file, env, systemd_credential",
				"clusters[0].pool_size: must be between 1 and 256, got 300",
				"clusters[0].identity.key_label: required",
				"clusters[0].identity: exactly one of cert_label or cert_file",
				`clusters[1].id: "c1" duplicates clusters[0]`,
				`clusters[1].type: must be DHSM or CDMS, got "dhsm"`,
				"clusters[1].pin: exactly one of file, env, systemd_credential",
				`clusters[2].id: "bad id" must match`,
				"clusters[2].pin.env: not a valid environment variable name",
				`clusters[2].token: label "shared" on module /usr/lib/softhsm/libsofthsm2.so is already used by clusters[1]`,
			},
			notWant: []string{"1234"},
		},
		{
			file: "auth_problems.yaml",
			want: []string{
				"auth_problems.yaml: invalid configuration:",
				"auth.jwt.issuer: required with jwt.jwks_file",
				"auth.jwt.audience: required with jwt.jwks_file",
				"auth.jwt.leeway: must not be negative",
				"auth.trusted.client_ca: required for an mTLS listener",
				"auth.trusted.cert_file: required for an mTLS listener",
				"auth.trusted.key_file: required for an mTLS listener",
				"auth.trusted.subjects: required for an mTLS listener",
				"server.metrics_listen: want host:port or unix:/path",
			},
			// jwt.jwks_file is a scheme; allowed_uids is not required on TCP.
			notWant: []string{"name at least one of", "allowed_uids"},
		},
		{
			file: "auth_none.yaml",
			want: []string{
				"auth: name at least one of token_file, aksk_file, jwt.jwks_file",
				"auth.trusted.allowed_uids: required for a Unix socket listener",
			},
			// Without jwks_file the jwt section is off, so its keys are not required.
			notWant: []string{"auth.jwt."},
		},
		{
			file: "uri_problems.yaml",
			want: []string{
				"server.tls.cert_file: required when server.tls is set",
				"server.tls.key.uri: object required: the label of the private key",
				"clusters[0].uri: unknown or unsupported attribute(s) slot-id, manufacturer, pin-timeout (known: token, serial, object, type; query: module-path, pin-source)",
				"clusters[1].uri: pin-value is not allowed",
				"clusters[1].uri: pin-source required",
				"clusters[2].uri: set either uri or module, token and pin, not both",
				`clusters[3].module: must be an absolute path, got "libsofthsm2.so"`,
				"clusters[4].uri: attribute token: bad percent-encoding",
				"clusters[4].uri: module-name is not supported",
				"clusters[4].uri: a cluster's uri names a token, not an object",
				"clusters[4].uri: module-path required",
				`clusters[5].uri: must start with "pkcs11:"`,
			},
			// No noise for the keys a broken uri stands for, and never the PIN.
			notWant: []string{"918273", "clusters[0].module", "clusters[0].token", "clusters[0].pin", "clusters[4].pin", "clusters[5].token"},
		},
		{
			file: "tls_problems.yaml",
			want: []string{
				"server.tls.cert_file: required when server.tls is set",
				"server.tls: exactly one of key_file or key",
				`server.tls.key.module: must be an absolute path, got "softhsm2.so"`,
				"server.tls.key.token: serial or label required",
				"server.tls.key.pin.env: not a valid environment variable name",
				"server.tls.key.label: required",
			},
		},
		{
			file: "tls_unknown_key.yaml",
			want: []string{`tls_unknown_key.yaml:9: unknown key "lable" (expected one of: uri, module, token, pin, label)`},
		},
		{
			file: "auth_unknown_key.yaml",
			want: []string{
				`auth_unknown_key.yaml:7: unknown key "audiance"`,
				`auth_unknown_key.yaml:10: unknown key "allowed_uid"`,
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			_, err := Load(filepath.Join("testdata", tt.file))
			if err == nil {
				t.Fatal("Load succeeded, want error")
			}
			for _, s := range tt.want {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error does not contain %q:\n%v", s, err)
				}
			}
			for _, s := range tt.notWant {
				if strings.Contains(err.Error(), s) {
					t.Errorf("error contains %q:\n%v", s, err)
				}
			}
		})
	}
}

// validConfig returns a config that passes Validate, for tests to break.
func validConfig() Config {
	return Config{
		Listen: "127.0.0.1:8080",
		Region: "local-1",
		Store:  Store{Driver: "sqlite", Path: "/var/lib/hsmbridge/db", MaxConns: 8, CacheTTL: dur(time.Second), MaxStale: dur(30 * time.Second)},
		Auth:   Auth{TokenFile: "/etc/hsmbridge/tokens.yaml"},
		Log:    Log{Level: "info", Format: "json"},
		Server: Server{
			ReadHeaderTimeout:   dur(5 * time.Second),
			ReadTimeout:         dur(30 * time.Second),
			WriteTimeout:        dur(30 * time.Second),
			IdleTimeout:         dur(120 * time.Second),
			ShutdownTimeout:     dur(15 * time.Second),
			RequestTimeout:      dur(5 * time.Second),
			KeyOperationTimeout: dur(250 * time.Millisecond),
		},
		Clusters: []Cluster{
			{
				ID: "c0", Type: "DHSM", Module: "/usr/lib/softhsm/libsofthsm2.so",
				Token: TokenSel{Serial: "s0"}, PIN: PINSource{Env: "PIN0"}, PoolSize: 4,
				Identity: Identity{KeyLabel: "k", CertLabel: "c"},
			},
			{
				ID: "c1", Type: "CDMS", Module: "/usr/lib/softhsm/libsofthsm2.so",
				Token: TokenSel{Label: "l1"}, PIN: PINSource{File: "/etc/hsmbridge/pin1"}, PoolSize: 4,
				Identity: Identity{KeyLabel: "k", CertFile: "/etc/hsmbridge/c1.pem"},
			},
		},
	}
}

// withJWT turns on signed tokens with every required key set.
func withJWT(c *Config) {
	c.Auth.JWT = JWT{JWKSFile: "/etc/hsmbridge/jwks.json", Issuer: "iss", Audience: "aud"}
}

// withTrustedUnix turns on a valid trusted frontend on a Unix socket.
func withTrustedUnix(c *Config) {
	c.Auth.Trusted = Trusted{Listen: "unix:/run/hsmbridge/trusted.sock", AllowedUIDs: []int{998}}
}

// withTrustedTLS turns on a valid trusted frontend over mTLS.
func withTrustedTLS(c *Config) {
	c.Auth.Trusted = Trusted{
		Listen: "127.0.0.1:8443", ClientCA: "/etc/hsmbridge/ca.pem", CertFile: "/etc/hsmbridge/server.pem",
		KeyFile: "/etc/hsmbridge/server-key.pem", Subjects: []string{"CN=frontend-a,O=kms"},
	}
}

// withTLSFile turns on TLS on the API listener with the key in a file.
func withTLSFile(c *Config) {
	c.Server.TLS = TLS{CertFile: "/etc/hsmbridge/server.pem", KeyFile: "/etc/hsmbridge/server.key"}
}

// withTLSToken turns on TLS on the API listener with the key on a token.
func withTLSToken(c *Config) {
	c.Server.TLS = TLS{CertFile: "/etc/hsmbridge/server.pem", Key: TLSKey{
		Module: "/usr/lib/softhsm/libsofthsm2.so", Token: TokenSel{Label: "tls"}, PIN: PINSource{Env: "TLS_PIN"}, Label: "tls-key",
	}}
}

func TestValidate(t *testing.T) {
	tests := []struct {
		name    string
		modify  func(*Config)
		want    []string // empty: must be valid
		notWant []string
	}{
		{name: "valid", modify: func(*Config) {}},
		{name: "postgres with a dsn", modify: func(c *Config) { c.Store.Driver, c.Store.DSN = "postgres", "postgres://h/db" }},
		{name: "postgres with a dsn file", modify: func(c *Config) { c.Store.Driver, c.Store.DSNFile = "postgres", "/etc/hsmbridge/dsn" }},
		{
			name:   "postgres without a dsn",
			modify: func(c *Config) { c.Store.Driver = "postgres" },
			want:   []string{"store: the postgres driver needs exactly one of dsn, dsn_env, dsn_file"},
		},
		{
			name: "postgres with two dsn sources and a bad pool",
			modify: func(c *Config) {
				c.Store = Store{Driver: "postgres", DSN: "x", DSNEnv: "1BAD", MaxConns: 0, CacheTTL: dur(time.Minute), MaxStale: dur(time.Second)}
			},
			want: []string{"store: the postgres driver needs exactly one", "store.dsn_env: not a valid environment variable name",
				"store.max_conns: must be between 1 and 1000, got 0", "store.cache_ttl: must be positive and not above max_stale"},
		},
		{name: "no auth scheme", modify: func(c *Config) { c.Auth = Auth{} }, want: []string{"auth: name at least one of token_file, aksk_file, jwt.jwks_file"}},
		{
			name:   "jwt settings without jwks_file are no scheme",
			modify: func(c *Config) { c.Auth = Auth{JWT: JWT{Issuer: "iss", Audience: "aud"}} },
			want:   []string{"auth: name at least one of token_file, aksk_file, jwt.jwks_file"},
		},
		{name: "aksk only", modify: func(c *Config) { c.Auth = Auth{AKSKFile: "/etc/hsmbridge/aksk.yaml"} }},
		{name: "jwt only", modify: func(c *Config) { c.Auth = Auth{}; withJWT(c) }},
		{
			name:    "jwt without issuer and audience",
			modify:  func(c *Config) { c.Auth.JWT = JWT{JWKSFile: "/etc/hsmbridge/jwks.json"} },
			want:    []string{"auth.jwt.issuer: required with jwt.jwks_file", "auth.jwt.audience: required with jwt.jwks_file"},
			notWant: []string{"auth.jwt.leeway"},
		},
		{
			name:    "jwt without audience",
			modify:  func(c *Config) { withJWT(c); c.Auth.JWT.Audience = "" },
			want:    []string{"auth.jwt.audience: required with jwt.jwks_file"},
			notWant: []string{"auth.jwt.issuer"},
		},
		{
			name:   "jwt negative leeway",
			modify: func(c *Config) { withJWT(c); c.Auth.JWT.Leeway = dur(-time.Second) },
			want:   []string{"auth.jwt.leeway: must not be negative"},
		},
		{name: "trusted unix", modify: withTrustedUnix},
		{
			name:    "trusted unix without allowed_uids",
			modify:  func(c *Config) { withTrustedUnix(c); c.Auth.Trusted.AllowedUIDs = nil },
			want:    []string{"auth.trusted.allowed_uids: required for a Unix socket listener"},
			notWant: []string{"client_ca", "cert_file", "key_file", "subjects"},
		},
		{
			name:   "trusted unix without path",
			modify: func(c *Config) { withTrustedUnix(c); c.Auth.Trusted.Listen = "unix:" },
			want:   []string{"auth.trusted.listen: unix: needs a socket path"},
		},
		{name: "trusted tcp", modify: withTrustedTLS},
		{
			name:   "trusted tcp without tls files and subjects",
			modify: func(c *Config) { c.Auth.Trusted = Trusted{Listen: "127.0.0.1:8443", AllowedUIDs: []int{0}} },
			want: []string{
				"auth.trusted.client_ca: required for an mTLS listener",
				"auth.trusted.cert_file: required for an mTLS listener",
				"auth.trusted.key_file: required for an mTLS listener",
				"auth.trusted.subjects: required for an mTLS listener",
			},
			notWant: []string{"allowed_uids"},
		},
		{
			name:    "trusted tcp without client_ca",
			modify:  func(c *Config) { withTrustedTLS(c); c.Auth.Trusted.ClientCA = "" },
			want:    []string{"auth.trusted.client_ca: required for an mTLS listener"},
			notWant: []string{"cert_file", "key_file", "subjects"},
		},
		{
			name:    "trusted tcp without cert_file",
			modify:  func(c *Config) { withTrustedTLS(c); c.Auth.Trusted.CertFile = "" },
			want:    []string{"auth.trusted.cert_file: required for an mTLS listener"},
			notWant: []string{"client_ca", "key_file", "subjects"},
		},
		{
			name:    "trusted tcp without key_file",
			modify:  func(c *Config) { withTrustedTLS(c); c.Auth.Trusted.KeyFile = "" },
			want:    []string{"auth.trusted.key_file: required for an mTLS listener"},
			notWant: []string{"client_ca", "cert_file", "subjects"},
		},
		{
			name:    "trusted tcp without subjects",
			modify:  func(c *Config) { withTrustedTLS(c); c.Auth.Trusted.Subjects = nil },
			want:    []string{"auth.trusted.subjects: required for an mTLS listener"},
			notWant: []string{"client_ca", "cert_file", "key_file"},
		},
		{
			name:   "trusted tcp bad address",
			modify: func(c *Config) { withTrustedTLS(c); c.Auth.Trusted.Listen = "127.0.0.1" },
			want:   []string{"auth.trusted.listen: want host:port or unix:/path"},
		},
		{
			name:   "trusted tcp bad port",
			modify: func(c *Config) { withTrustedTLS(c); c.Auth.Trusted.Listen = "127.0.0.1:70000" },
			want:   []string{`auth.trusted.listen: port must be a number from 0 to 65535, got "70000"`},
		},
		{name: "metrics_listen tcp", modify: func(c *Config) { c.Server.MetricsListen = "127.0.0.1:9090" }},
		{name: "metrics_listen unix", modify: func(c *Config) { c.Server.MetricsListen = "unix:/run/hsmbridge/ops.sock" }},
		{name: "metrics_listen without port", modify: func(c *Config) { c.Server.MetricsListen = "localhost" }, want: []string{"server.metrics_listen: want host:port or unix:/path"}},
		{name: "metrics_listen bad port", modify: func(c *Config) { c.Server.MetricsListen = "127.0.0.1:http" }, want: []string{`server.metrics_listen: port must be a number from 0 to 65535, got "http"`}},
		{name: "metrics_listen unix without path", modify: func(c *Config) { c.Server.MetricsListen = "unix:" }, want: []string{"server.metrics_listen: unix: needs a socket path"}},
		{name: "tcp any host", modify: func(c *Config) { c.Listen = ":8080" }},
		{name: "unix", modify: func(c *Config) { c.Listen = "unix:/run/hsmbridge.sock" }},
		{name: "unix without path", modify: func(c *Config) { c.Listen = "unix:" }, want: []string{"listen: unix: needs a socket path"}},
		{name: "missing port", modify: func(c *Config) { c.Listen = "127.0.0.1" }, want: []string{"listen: want host:port or unix:/path"}},
		{name: "bad port", modify: func(c *Config) { c.Listen = "127.0.0.1:80800" }, want: []string{`listen: port must be a number from 0 to 65535, got "80800"`}},
		{name: "no region", modify: func(c *Config) { c.Region = "" }, want: []string{"region: required"}},
		{name: "no store path", modify: func(c *Config) { c.Store.Path = "" }, want: []string{"store.path: required"}},
		{name: "log format", modify: func(c *Config) { c.Log.Format = "xml" }, want: []string{`log.format: must be json or text, got "xml"`}},
		{
			name:   "timeouts",
			modify: func(c *Config) { c.Server.IdleTimeout = dur(-time.Second); c.Server.RequestTimeout = dur(time.Minute) },
			want:   []string{"server.idle_timeout: must be positive, got -1s", "server.request_timeout: must be shorter than write_timeout (30s), got 1m0s"},
		},
		{name: "no clusters", modify: func(c *Config) { c.Clusters = nil }, want: []string{"clusters: at least one cluster required"}},
		{name: "pool size zero", modify: func(c *Config) { c.Clusters[0].PoolSize = 0 }, want: []string{"clusters[0].pool_size: must be between 1 and 256, got 0"}},
		{name: "pool size max", modify: func(c *Config) { c.Clusters[0].PoolSize = 256 }},
		{name: "no token selector", modify: func(c *Config) { c.Clusters[1].Token = TokenSel{} }, want: []string{"clusters[1].token: serial or label required"}},
		{
			name: "token fields too long",
			modify: func(c *Config) {
				c.Clusters[0].Token = TokenSel{Serial: strings.Repeat("s", 17), Label: strings.Repeat("l", 33)}
			},
			want: []string{"clusters[0].token.serial: longer than the 16 bytes", "clusters[0].token.label: longer than the 32 bytes"},
		},
		{name: "id too long", modify: func(c *Config) { c.Clusters[0].ID = strings.Repeat("a", 65) }, want: []string{"clusters[0].id: "}},
		{name: "no id", modify: func(c *Config) { c.Clusters[0].ID = "" }, want: []string{"clusters[0].id: required"}},
		{name: "duplicate id", modify: func(c *Config) { c.Clusters[1].ID = "c0" }, want: []string{`clusters[1].id: "c0" duplicates clusters[0]`}},
		{name: "no module", modify: func(c *Config) { c.Clusters[0].Module = "" }, want: []string{"clusters[0].module: required"}},
		{
			name:   "same serial on same module",
			modify: func(c *Config) { c.Clusters[1].Token.Serial = "s0" },
			want:   []string{`clusters[1].token: serial "s0" on module /usr/lib/softhsm/libsofthsm2.so is already used by clusters[0]`},
		},
		{
			name: "same label on same module, spelled differently",
			modify: func(c *Config) {
				c.Clusters[0].Token.Label = "l1"
				c.Clusters[1].Module = "/usr/lib/softhsm//libsofthsm2.so"
			},
			want: []string{`clusters[1].token: label "l1" on module`},
		},
		{
			name:   "same serial on different modules",
			modify: func(c *Config) { c.Clusters[1].Token.Serial = "s0"; c.Clusters[1].Module = "/opt/hsm/libpkcs11.so" },
		},
		{name: "no pin", modify: func(c *Config) { c.Clusters[0].PIN = PINSource{} }, want: []string{"clusters[0].pin: exactly one of file, env, systemd_credential"}},
		{
			name:   "two pins",
			modify: func(c *Config) { c.Clusters[0].PIN.SystemdCredential = "x" },
			want:   []string{"clusters[0].pin: exactly one of file, env, systemd_credential"},
		},
		{
			name:   "credential path",
			modify: func(c *Config) { c.Clusters[0].PIN = PINSource{SystemdCredential: "../pin"} },
			want:   []string{"clusters[0].pin.systemd_credential: must be a credential name, not a path"},
		},
		{
			name:   "no cert",
			modify: func(c *Config) { c.Clusters[0].Identity.CertLabel = "" },
			want:   []string{"clusters[0].identity: exactly one of cert_label or cert_file"},
		},
		{
			// Validate on a config that Load did not expand checks what the uri stands for.
			name: "cluster uri not expanded",
			modify: func(c *Config) {
				c.Clusters[0].Module, c.Clusters[0].Token, c.Clusters[0].PIN = "", TokenSel{}, PINSource{}
				c.Clusters[0].URI = "pkcs11:serial=s0?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=env:PIN0"
			},
		},
		{
			name: "cluster uri not expanded, relative module",
			modify: func(c *Config) {
				c.Clusters[0].Module, c.Clusters[0].Token, c.Clusters[0].PIN = "", TokenSel{}, PINSource{}
				c.Clusters[0].URI = "pkcs11:serial=s0?module-path=libsofthsm2.so&pin-source=env:PIN0"
			},
			want: []string{`clusters[0].module: must be an absolute path, got "libsofthsm2.so"`},
		},
		{name: "tls with key file", modify: withTLSFile},
		{name: "tls with key on a token", modify: withTLSToken},
		{name: "tls with client ca", modify: func(c *Config) { withTLSFile(c); c.Server.TLS.ClientCA = "/etc/hsmbridge/clients.pem" }},
		{
			name: "tls key uri not expanded",
			modify: func(c *Config) {
				withTLSToken(c)
				c.Server.TLS.Key = TLSKey{URI: "pkcs11:token=t;object=k?module-path=/m.so&pin-source=file:/p"}
			},
		},
		{
			name:   "tls without cert",
			modify: func(c *Config) { withTLSFile(c); c.Server.TLS.CertFile = "" },
			want:   []string{"server.tls.cert_file: required when server.tls is set"},
		},
		{
			name:   "tls client ca alone",
			modify: func(c *Config) { c.Server.TLS.ClientCA = "/etc/hsmbridge/clients.pem" },
			want:   []string{"server.tls.cert_file: required", "server.tls: exactly one of key_file or key"},
		},
		{
			name:    "tls with key file and token key",
			modify:  func(c *Config) { withTLSToken(c); c.Server.TLS.KeyFile = "/etc/hsmbridge/server.key" },
			want:    []string{"server.tls: exactly one of key_file or key"},
			notWant: []string{"server.tls.key."},
		},
		{
			name:   "tls token key incomplete",
			modify: func(c *Config) { withTLSToken(c); c.Server.TLS.Key.Label = ""; c.Server.TLS.Key.Token = TokenSel{} },
			want:   []string{"server.tls.key.label: required", "server.tls.key.token: serial or label required"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := validConfig()
			tt.modify(&c)
			err := c.Validate()
			if len(tt.want) == 0 {
				if err != nil {
					t.Fatalf("Validate: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatal("Validate succeeded, want error")
			}
			for _, s := range tt.want {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error does not contain %q:\n%v", s, err)
				}
			}
			for _, s := range tt.notWant {
				if strings.Contains(err.Error(), s) {
					t.Errorf("error contains %q:\n%v", s, err)
				}
			}
		})
	}
}

func TestListenNetwork(t *testing.T) {
	tests := []struct{ listen, network, address string }{
		{"127.0.0.1:8080", "tcp", "127.0.0.1:8080"},
		{"[::1]:8443", "tcp", "[::1]:8443"},
		{"unix:/run/hsmbridge.sock", "unix", "/run/hsmbridge.sock"},
	}
	for _, tt := range tests {
		c := Config{Listen: tt.listen}
		if network, address := c.ListenNetwork(); network != tt.network || address != tt.address {
			t.Errorf("ListenNetwork(%q) = %q, %q; want %q, %q", tt.listen, network, address, tt.network, tt.address)
		}
	}
}

const secretPIN = "s3cr3t-918273"

func writePINFile(t *testing.T, content string, mode os.FileMode) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "pin")
	if err := os.WriteFile(path, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	// WriteFile's mode is subject to the umask.
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestPINRead(t *testing.T) {
	credDir := t.TempDir()
	for name, content := range map[string]string{"hsm-pin": secretPIN + "\n", "empty": ""} {
		if err := os.WriteFile(filepath.Join(credDir, name), []byte(content), 0o400); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv("CREDENTIALS_DIRECTORY", credDir)
	t.Setenv("TEST_HSM_PIN", secretPIN)
	t.Setenv("TEST_EMPTY_PIN", "")

	tests := []struct {
		name    string
		src     PINSource
		want    string
		wantErr []string
	}{
		{name: "file 0600, newline trimmed", src: PINSource{File: writePINFile(t, secretPIN+"\n", 0o600)}, want: secretPIN},
		{name: "file 0400, CRLF trimmed", src: PINSource{File: writePINFile(t, secretPIN+"\r\n", 0o400)}, want: secretPIN},
		{name: "only one newline trimmed", src: PINSource{File: writePINFile(t, secretPIN+" \n\n", 0o600)}, want: secretPIN + " \n"},
		{name: "file 0644 refused", src: PINSource{File: writePINFile(t, secretPIN, 0o644)}, wantErr: []string{"has mode 0644", "chmod 600"}},
		{name: "file 0640 of another group refused", src: PINSource{File: chgrp(t, writePINFile(t, secretPIN, 0o640), 65533)}, wantErr: []string{"has mode 0640", "chmod 600"}},
		{name: "file 0440 of our own group read (a Kubernetes Secret with fsGroup)", src: PINSource{File: chgrp(t, writePINFile(t, secretPIN, 0o440), os.Getgid())}, want: secretPIN},
		{name: "file 0660 refused: the group may write it", src: PINSource{File: writePINFile(t, secretPIN, 0o660)}, wantErr: []string{"has mode 0660"}},
		{name: "empty file", src: PINSource{File: writePINFile(t, "\n", 0o600)}, wantErr: []string{"PIN is empty"}},
		{name: "huge file", src: PINSource{File: writePINFile(t, strings.Repeat("1", maxPINSize+1), 0o600)}, wantErr: []string{"too large"}},
		{name: "missing file", src: PINSource{File: "/nonexistent/pin"}, wantErr: []string{"reading PIN from file:/nonexistent/pin"}},
		{name: "env", src: PINSource{Env: "TEST_HSM_PIN"}, want: secretPIN},
		{name: "env unset", src: PINSource{Env: "TEST_UNSET_PIN"}, wantErr: []string{"env:TEST_UNSET_PIN", "not set"}},
		{name: "env empty", src: PINSource{Env: "TEST_EMPTY_PIN"}, wantErr: []string{"PIN is empty"}},
		{name: "systemd credential", src: PINSource{SystemdCredential: "hsm-pin"}, want: secretPIN},
		{name: "systemd credential empty", src: PINSource{SystemdCredential: "empty"}, wantErr: []string{"systemd_credential:empty", "PIN is empty"}},
		{name: "unset", src: PINSource{}, wantErr: []string{"exactly one"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.src.Read()
			if len(tt.wantErr) == 0 {
				if err != nil {
					t.Fatalf("Read: %v", err)
				}
				if got != tt.want {
					t.Errorf("Read = %q, want %q", got, tt.want)
				}
				return
			}
			if err == nil {
				t.Fatal("Read succeeded, want error")
			}
			for _, s := range tt.wantErr {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error does not contain %q: %v", s, err)
				}
			}
			if strings.Contains(err.Error(), secretPIN) {
				t.Errorf("error contains the PIN: %v", err)
			}
		})
	}
}

func TestPINReadCredentialsDirectoryUnset(t *testing.T) {
	t.Setenv("CREDENTIALS_DIRECTORY", "")
	_, err := PINSource{SystemdCredential: "hsm-pin"}.Read()
	if err == nil || !strings.Contains(err.Error(), "CREDENTIALS_DIRECTORY is not set") {
		t.Errorf("Read error = %v, want CREDENTIALS_DIRECTORY is not set", err)
	}
}

func TestPINSourceNeverShowsPIN(t *testing.T) {
	t.Setenv("TEST_HSM_PIN", secretPIN)
	tests := []struct {
		src  PINSource
		want string
	}{
		{PINSource{File: writePINFile(t, secretPIN, 0o600)}, "file:"},
		{PINSource{Env: "TEST_HSM_PIN"}, "env:TEST_HSM_PIN"},
		{PINSource{SystemdCredential: "hsm-pin"}, "systemd_credential:hsm-pin"},
		{PINSource{}, "unset"},
	}
	for _, tt := range tests {
		var buf bytes.Buffer
		slog.New(slog.NewTextHandler(&buf, nil)).Info("cluster", "pin", tt.src)
		slog.New(slog.NewJSONHandler(&buf, nil)).Info("cluster", "pin", tt.src)
		for what, s := range map[string]string{"String": tt.src.String(), "LogValue": tt.src.LogValue().String(), "log output": buf.String()} {
			if !strings.Contains(s, tt.want) {
				t.Errorf("%s = %q, want it to contain %q", what, s, tt.want)
			}
			if strings.Contains(s, secretPIN) {
				t.Errorf("%s = %q contains the PIN", what, s)
			}
		}
	}
}

func TestURIEquivalentToLongForm(t *testing.T) {
	long, err := Load(filepath.Join("testdata", "uri_long.yaml"))
	if err != nil {
		t.Fatalf("Load long form: %v", err)
	}
	short, err := Load(filepath.Join("testdata", "uri_short.yaml"))
	if err != nil {
		t.Fatalf("Load uri form: %v", err)
	}
	for i := range short.Clusters {
		if short.Clusters[i].URI == "" {
			t.Errorf("clusters[%d].uri was dropped", i)
		}
		short.Clusters[i].URI = ""
	}
	if short.Server.TLS.Key.URI == "" {
		t.Error("server.tls.key.uri was dropped")
	}
	short.Server.TLS.Key.URI = ""
	if !reflect.DeepEqual(short, long) {
		t.Errorf("uri form:\n got %+v\nwant %+v", *short, *long)
	}
	dir, _ := filepath.Abs("testdata")
	if got, want := short.Clusters[0].PIN.File, filepath.Join(dir, "secrets/pin"); got != want {
		t.Errorf("relative pin-source file = %q, want %q (resolved against the config's directory)", got, want)
	}
}

func TestParsePKCS11URI(t *testing.T) {
	const mod = "?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source="
	tests := []struct {
		uri     string
		want    PKCS11URI
		wantErr []string
	}{
		{uri: "pkcs11:token=a" + mod + "file:/etc/hsmbridge/pin", want: PKCS11URI{Token: TokenSel{Label: "a"}, PIN: PINSource{File: "/etc/hsmbridge/pin"}}},
		{uri: "pkcs11:token=a" + mod + "file:///etc/hsmbridge/pin", want: PKCS11URI{Token: TokenSel{Label: "a"}, PIN: PINSource{File: "/etc/hsmbridge/pin"}}},
		{uri: "pkcs11:token=a" + mod + "file://localhost/etc/pin", want: PKCS11URI{Token: TokenSel{Label: "a"}, PIN: PINSource{File: "/etc/pin"}}},
		{uri: "pkcs11:token=a" + mod + "/etc/pin", want: PKCS11URI{Token: TokenSel{Label: "a"}, PIN: PINSource{File: "/etc/pin"}}},
		{uri: "pkcs11:token=a" + mod + "%2Fetc%2Fmy%20pin", want: PKCS11URI{Token: TokenSel{Label: "a"}, PIN: PINSource{File: "/etc/my pin"}}},
		{uri: "pkcs11:serial=0a1b" + mod + "env:HSM_PIN", want: PKCS11URI{Token: TokenSel{Serial: "0a1b"}, PIN: PINSource{Env: "HSM_PIN"}}},
		{uri: "pkcs11:token=a%3Bb;object=k%26y;type=private" + mod + "systemd_credential:hsm-pin",
			want: PKCS11URI{Token: TokenSel{Label: "a;b"}, Object: "k&y", Type: "private", PIN: PINSource{SystemdCredential: "hsm-pin"}}},
		{uri: "pkcs11:token=a" + mod + "|/usr/bin/get-pin", wantErr: []string{"a command (|...) is not supported"}},
		{uri: "pkcs11:token=a" + mod + "https://vault/pin", wantErr: []string{"pin-source: want file:PATH, env:NAME or systemd_credential:NAME"}},
		{uri: "pkcs11:token=a" + mod + "file://host/etc/pin", wantErr: []string{"must name a local absolute path"}},
		{uri: "pkcs11:token=a;token=b" + mod + "env:P", wantErr: []string{"attribute token given twice"}},
		{uri: "pkcs11:token=" + mod + "env:P", wantErr: []string{"attribute token is empty"}},
		{uri: "pkcs11:token" + mod + "env:P", wantErr: []string{"not of the form name=value"}},
		{uri: "pkcs11:token=a" + mod + "env:P#frag", wantErr: []string{"no fragment"}},
		{uri: "pkcs11:token=a?pin-value=918273&module-path=/m.so", wantErr: []string{"pin-value is not allowed", "pin-source required"}},
		{uri: "pkcs11:slot-id=1;token=a?module-path=/m.so&pin-source=env:P", wantErr: []string{"unknown or unsupported attribute(s) slot-id"}},
		{uri: "pkcs11:", wantErr: []string{"module-path required", "token or serial required", "pin-source required"}},
	}
	for _, tt := range tests {
		t.Run(tt.uri, func(t *testing.T) {
			got, err := ParsePKCS11URI(tt.uri)
			if len(tt.wantErr) == 0 {
				if err != nil {
					t.Fatalf("ParsePKCS11URI: %v", err)
				}
				tt.want.Module = "/usr/lib/softhsm/libsofthsm2.so"
				if got != tt.want {
					t.Errorf("ParsePKCS11URI =\n %+v, want\n %+v", got, tt.want)
				}
				return
			}
			if err == nil {
				t.Fatalf("ParsePKCS11URI = %+v, want an error", got)
			}
			for _, s := range tt.wantErr {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error does not contain %q:\n%v", s, err)
				}
			}
			if strings.Contains(err.Error(), "918273") {
				t.Errorf("error shows the PIN: %v", err)
			}
		})
	}
}
