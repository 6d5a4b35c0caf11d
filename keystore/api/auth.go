package api

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"
	"os"
	"regexp"
	"slices"
	"strings"

	"go.yaml.in/yaml/v3"
)

// Identity is an authenticated caller: a tenant domain, the projects it may use and, if
// it is limited, the actions it may take.
type Identity struct {
	Name       string
	DomainID   string
	ProjectIDs []string
	// Roles limits the identity to these actions ("kms:keystore:list", "kms:cmk:*", "*");
	// nil means no limit.
	Roles []string
}

// MayUseProject reports whether the identity may act in project.
func (id Identity) MayUseProject(project string) bool { return slices.Contains(id.ProjectIDs, project) }

// MayDo reports whether the identity's roles allow action. A role ending in ":*" allows
// every action under its prefix; "*" allows all.
func (id Identity) MayDo(action string) bool {
	if id.Roles == nil {
		return true
	}
	for _, r := range id.Roles {
		if r == "*" || r == action {
			return true
		}
		if prefix, ok := strings.CutSuffix(r, "*"); ok && strings.HasSuffix(prefix, ":") && strings.HasPrefix(action, prefix) {
			return true
		}
	}
	return false
}

// Schemes picks the authenticator a request's headers ask for: SDK-HMAC-SHA256 signing
// when an Authorization header is present, else X-Auth-Token — a signed token (three
// dot-separated parts) to JWT, any other to the token file. A scheme left nil is refused.
type Schemes struct {
	AKSK   *AKSK
	JWT    *JWTVerifier
	Tokens *TokenFile
}

// Authenticate implements Authenticator.
func (sc Schemes) Authenticate(r *http.Request) (Identity, error) {
	if r.Header.Get("Authorization") != "" {
		if sc.AKSK == nil {
			return Identity{}, &authError{"AK/SK signing is not enabled on this service"}
		}
		return sc.AKSK.Authenticate(r)
	}
	tok := r.Header.Get("X-Auth-Token")
	switch {
	case strings.Count(tok, ".") == 2 && sc.JWT != nil:
		return sc.JWT.Authenticate(r)
	case sc.Tokens != nil: // also counts a missing credential
		return sc.Tokens.Authenticate(r)
	case sc.JWT != nil:
		return sc.JWT.Authenticate(r)
	case tok == "":
		return Identity{}, &authError{"x-auth-token not found"}
	}
	return Identity{}, &authError{"the token is not valid"}
}

// Authenticator checks a request's credential. A missing or rejected credential is an
// error answered with 401; it must not echo the credential.
type Authenticator interface {
	Authenticate(r *http.Request) (Identity, error)
}

// TokenFile authenticates X-Auth-Token against a file of known tokens. The file holds each
// token's SHA-256, not the token, so reading the file does not give away a credential:
//
//	tokens:
//	  - name: dev
//	    token_sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
//	    domain_id: b168fe00ff56492495a7d22974df2d0b
//	    project_ids: [0123456789abcdef0123456789abcdef]
type TokenFile struct {
	// OnFailure, if set, is called for every refused token with one of
	// TokenFailureReasons. Set it before the first Authenticate.
	OnFailure func(reason string)

	byHash map[string]Identity
}

// TokenFailureReasons lists the reasons TokenFile reports to OnFailure.
func TokenFailureReasons() []string { return []string{"missing", "unknown_token"} }

func (tf *TokenFile) fail(reason, msg string) error {
	if tf.OnFailure != nil {
		tf.OnFailure(reason)
	}
	return &authError{msg}
}

type tokenFileYAML struct {
	Tokens []struct {
		Name        string   `yaml:"name"`
		TokenSHA256 string   `yaml:"token_sha256"`
		DomainID    string   `yaml:"domain_id"`
		ProjectIDs  []string `yaml:"project_ids"`
	} `yaml:"tokens"`
}

var (
	hex32RE  = regexp.MustCompile(`^[0-9a-f]{32}$`)
	sha256RE = regexp.MustCompile(`^[0-9a-f]{64}$`)
)

// LoadTokenFile reads and checks a token file.
func LoadTokenFile(path string) (*TokenFile, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("token file: %w", err)
	}
	var doc tokenFileYAML
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&doc); err != nil {
		return nil, fmt.Errorf("token file %s: %w", path, err)
	}
	tf := &TokenFile{byHash: map[string]Identity{}}
	for i, t := range doc.Tokens {
		switch {
		case !sha256RE.MatchString(t.TokenSHA256):
			return nil, fmt.Errorf("token file %s: tokens[%d].token_sha256: want 64 lower-case hex digits", path, i)
		case !hex32RE.MatchString(t.DomainID):
			return nil, fmt.Errorf("token file %s: tokens[%d].domain_id: want 32 lower-case hex digits", path, i)
		case len(t.ProjectIDs) == 0:
			return nil, fmt.Errorf("token file %s: tokens[%d].project_ids: at least one project required", path, i)
		}
		if _, dup := tf.byHash[t.TokenSHA256]; dup {
			return nil, fmt.Errorf("token file %s: tokens[%d]: the same token is listed twice", path, i)
		}
		tf.byHash[t.TokenSHA256] = Identity{Name: t.Name, DomainID: t.DomainID, ProjectIDs: t.ProjectIDs}
	}
	return tf, nil
}

// HashToken returns what a token file stores for token.
func HashToken(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])
}

// Authenticate implements Authenticator. Looking up the token's hash, not the token, keeps
// the comparison's timing independent of how much of a guessed token is right.
func (tf *TokenFile) Authenticate(r *http.Request) (Identity, error) {
	tok := r.Header.Get("X-Auth-Token")
	if tok == "" {
		return Identity{}, tf.fail("missing", "x-auth-token not found")
	}
	id, ok := tf.byHash[HashToken(tok)]
	if !ok {
		return Identity{}, tf.fail("unknown_token", "the token is not valid")
	}
	return id, nil
}
