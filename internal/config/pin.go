package config

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	yaml "go.yaml.in/yaml/v3"

	"github.com/hsmbridge/hsmbridge/internal/secretfile"
)

// PINSource says where a cluster's PKCS#11 user PIN comes from; exactly one
// field is set. The PIN itself is never accepted in the config, so the config
// file can be shared, logged and kept in version control. In YAML:
//
//	pin: {file: /etc/hsmbridge/pin}
//	pin: {env: HSMBRIDGE_PIN}
//	pin: {systemd_credential: hsm-pin}
type PINSource struct {
	// File is a file holding the PIN. It must not be group- or
	// world-readable. A relative path is resolved against the config file's
	// directory.
	File string
	// Env is the name of an environment variable holding the PIN.
	Env string
	// SystemdCredential is the name of a credential passed by systemd
	// (LoadCredential= or SetCredential=), read from
	// $CREDENTIALS_DIRECTORY/<name>.
	SystemdCredential string
}

const pinFromElsewhere = "the PIN must come from a file, env var or systemd credential " +
	"(pin: {file: ...}, pin: {env: ...} or pin: {systemd_credential: ...}), never from the config itself"

// UnmarshalYAML implements yaml.Unmarshaler. It decodes the node by hand
// because yaml.v3's own errors would quote a scalar PIN, and it never quotes
// anything from the node except the three known keys.
func (p *PINSource) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.MappingNode {
		return lineError(n, "pin: %s", pinFromElsewhere)
	}
	var out PINSource
	var errs []string
	seen := make(map[string]bool)
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		var dst *string
		switch k.Value {
		case "file":
			dst = &out.File
		case "env":
			dst = &out.Env
		case "systemd_credential":
			dst = &out.SystemdCredential
		case "value", "pin", "secret", "password":
			errs = append(errs, lineError(k, "pin: key %q not allowed: %s", k.Value, pinFromElsewhere).Errors...)
			continue
		default:
			// The key is not quoted: a flow mapping like {1234} has the PIN as its key.
			errs = append(errs, lineError(k, "pin: unknown key (not shown in case it is the PIN); expected file, env or systemd_credential").Errors...)
			continue
		}
		if seen[k.Value] {
			errs = append(errs, lineError(k, "pin: duplicate key %q", k.Value).Errors...)
			continue
		}
		seen[k.Value] = true
		if v.Kind == yaml.AliasNode {
			v = v.Alias
		}
		switch {
		case v.Kind != yaml.ScalarNode:
			errs = append(errs, lineError(v, "pin.%s: must be a string", k.Value).Errors...)
		case v.ShortTag() != "!!null":
			*dst = v.Value
		}
	}
	if len(errs) > 0 {
		return &yaml.TypeError{Errors: errs}
	}
	*p = out
	return nil
}

// setCount is how many sources are set; anything but 1 is invalid.
func (p PINSource) setCount() int {
	n := 0
	for _, s := range []string{p.File, p.Env, p.SystemdCredential} {
		if s != "" {
			n++
		}
	}
	return n
}

var envName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// validate checks the source's form only; it reads nothing. Values are not
// quoted in errors in case a PIN was put where a name belongs.
func (p PINSource) validate(path string) []error {
	if p.setCount() != 1 {
		return []error{problem(path, "exactly one of file, env, systemd_credential")}
	}
	switch {
	case p.Env != "" && !envName.MatchString(p.Env):
		return []error{problem(path+".env", "not a valid environment variable name")}
	case p.SystemdCredential != "" && (strings.ContainsRune(p.SystemdCredential, '/') || p.SystemdCredential == "." || p.SystemdCredential == ".."):
		return []error{problem(path+".systemd_credential", "must be a credential name, not a path")}
	}
	return nil
}

// maxPINSize is far above any HSM's PIN length limit; it stops a mistyped
// path from reading a huge file into memory.
const maxPINSize = 4096

// Read returns the PIN. One trailing newline (LF or CRLF) is removed, since
// editors and echo add one; any other whitespace is kept as part of the PIN.
// An empty PIN is an error. Errors name the source, never the PIN.
func (p PINSource) Read() (string, error) {
	var pin string
	var err error
	switch {
	case p.setCount() != 1:
		return "", errors.New("pin: exactly one of file, env, systemd_credential must be set")
	case p.File != "":
		pin, err = readPINFile(p.File, true)
	case p.Env != "":
		var ok bool
		if pin, ok = os.LookupEnv(p.Env); !ok {
			err = errors.New("environment variable is not set")
		}
	default:
		dir := os.Getenv("CREDENTIALS_DIRECTORY")
		if dir == "" {
			err = errors.New("CREDENTIALS_DIRECTORY is not set; is the daemon started by systemd with LoadCredential= or SetCredential=?")
			break
		}
		// systemd already restricts credentials to the service's user, and
		// may do so with ACLs that leave group bits set, so the mode is not checked.
		pin, err = readPINFile(filepath.Join(dir, p.SystemdCredential), false)
	}
	if err != nil {
		return "", fmt.Errorf("reading PIN from %s: %w", p, err)
	}
	if s, ok := strings.CutSuffix(pin, "\n"); ok {
		pin = strings.TrimSuffix(s, "\r")
	}
	if pin == "" {
		return "", fmt.Errorf("reading PIN from %s: PIN is empty", p)
	}
	return pin, nil
}

func readPINFile(name string, checkMode bool) (string, error) {
	if checkMode {
		b, err := secretfile.Read(name, maxPINSize)
		return string(b), err
	}
	f, err := os.Open(name)
	if err != nil {
		return "", err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxPINSize+1))
	if err != nil {
		return "", err
	}
	if len(b) > maxPINSize {
		return "", fmt.Errorf("%s is larger than %d bytes, too large to be a PIN", name, maxPINSize)
	}
	return string(b), nil
}

// String describes where the PIN comes from, e.g. "file:/etc/hsmbridge/pin";
// it never reads or shows the PIN.
func (p PINSource) String() string {
	switch {
	case p.File != "":
		return "file:" + p.File
	case p.Env != "":
		return "env:" + p.Env
	case p.SystemdCredential != "":
		return "systemd_credential:" + p.SystemdCredential
	}
	return "unset"
}

// LogValue implements slog.LogValuer so that logging a PINSource shows only
// its source, even through handlers that would otherwise print struct fields.
func (p PINSource) LogValue() slog.Value {
	return slog.StringValue(p.String())
}
