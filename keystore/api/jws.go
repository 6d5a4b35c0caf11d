package api

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/cryptosigner"
	"github.com/go-jose/go-jose/v4/jwt"
)

const (
	// maxTokenLen bounds X-Auth-Token before any parsing.
	maxTokenLen = 8 << 10
	// minRSABits is the smallest RSA issuer key accepted.
	minRSABits = 2048
)

// Reasons a token check fails, as passed to JWTVerifier.OnFailure.
const (
	reasonJWTAlgorithm   = "algorithm"
	reasonJWTIssuer      = "issuer"
	reasonJWTAudience    = "audience"
	reasonJWTNotYetValid = "not_yet_valid"
	reasonJWTClaims      = "claims"
)

// JWTFailureReasons lists every reason JWTVerifier.OnFailure can be called with.
func JWTFailureReasons() []string {
	return []string{reasonMissing, reasonMalformed, reasonJWTAlgorithm, reasonUnknownKey,
		reasonBadSignature, reasonExpired, reasonJWTNotYetValid, reasonJWTIssuer,
		reasonJWTAudience, reasonJWTClaims}
}

// asymmetricAlgs are the only algorithms a JWTConfig may allow: a verifier that holds
// public keys must never accept an HMAC ("HS*") or unsigned ("none") token.
var asymmetricAlgs = []jose.SignatureAlgorithm{
	jose.ES256, jose.ES384, jose.ES512, jose.RS256, jose.RS384, jose.RS512,
	jose.PS256, jose.PS384, jose.PS512, jose.EdDSA,
}

// JWTConfig says which tokens a JWTVerifier accepts.
type JWTConfig struct {
	// Issuer must equal the token's "iss". Required.
	Issuer string
	// Audience must be one of the token's "aud". Required.
	Audience string
	// Algorithms allowed in the token's "alg"; empty means ES256, RS256 and EdDSA. Only
	// asymmetric algorithms may be listed.
	Algorithms []string
	// Leeway for exp, nbf and iat; zero means 30s.
	Leeway time.Duration
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// JWTVerifier authenticates X-Auth-Token as a compact JWS signed by an issuer whose public
// keys it holds in a JWKS file (several, each with a "kid", so the issuer can rotate).
//
// The main defence against algorithm confusion is that the accepted algorithms are pinned
// when the token is parsed (jwt.ParseSigned with the allow-list), so "none" and "HS256"
// are refused before any key is touched; the allow-list may hold asymmetric algorithms
// only. On top of that the "alg" must fit the type (and curve) of the key its "kid" names,
// and the "alg" the JWK itself declares, if any. Then "iss", "aud", "exp" (required),
// "nbf" and "iat" are checked, with leeway, and the custom claims: "sub" (the name),
// "domain_id" (32 hex), "project_ids" (or a single "project_id") and "roles".
//
// A JWTVerifier is safe for concurrent use. Make one with LoadJWKS; set OnFailure before the
// first Authenticate.
type JWTVerifier struct {
	// OnFailure, if set, is called once for every rejected request with one of
	// JWTFailureReasons. It must be cheap and safe for concurrent use.
	OnFailure func(reason string)

	path     string
	cfg      JWTConfig
	algs     []jose.SignatureAlgorithm
	keys     atomic.Pointer[map[string]jose.JSONWebKey] // by kid
	reloadMu sync.Mutex
}

// LoadJWKS reads the issuer's public keys and checks cfg.
func LoadJWKS(path string, cfg JWTConfig) (*JWTVerifier, error) {
	if cfg.Issuer == "" {
		return nil, errors.New("jwt: issuer required")
	}
	if cfg.Audience == "" {
		return nil, errors.New("jwt: audience required")
	}
	if cfg.Leeway < 0 {
		return nil, errors.New("jwt: leeway must not be negative")
	}
	if cfg.Leeway == 0 {
		cfg.Leeway = 30 * time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	names := cfg.Algorithms
	if len(names) == 0 {
		names = []string{string(jose.ES256), string(jose.RS256), string(jose.EdDSA)}
	}
	v := &JWTVerifier{path: path}
	for _, n := range names {
		alg := jose.SignatureAlgorithm(n)
		if !slices.Contains(asymmetricAlgs, alg) {
			return nil, fmt.Errorf("jwt: algorithm %q not allowed; use one of ES256, ES384, ES512, RS256, RS384, RS512, PS256, PS384, PS512, EdDSA", n)
		}
		v.algs = append(v.algs, alg)
	}
	cfg.Algorithms = names
	v.cfg = cfg
	keys, err := loadJWKSFile(path)
	if err != nil {
		return nil, err
	}
	v.keys.Store(&keys)
	return v, nil
}

// Reload re-reads the JWKS file and, if it is valid, replaces the keys in one step. On
// error the old keys stay in force. The daemon calls it on SIGHUP.
func (v *JWTVerifier) Reload() error {
	v.reloadMu.Lock()
	defer v.reloadMu.Unlock()
	keys, err := loadJWKSFile(v.path)
	if err != nil {
		return err
	}
	v.keys.Store(&keys)
	return nil
}

func loadJWKSFile(path string) (map[string]jose.JSONWebKey, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("jwks file: %w", err)
	}
	var doc struct {
		Keys []json.RawMessage `json:"keys"`
	}
	if err := json.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("jwks file %s: %w", path, err)
	}
	if len(doc.Keys) == 0 {
		return nil, fmt.Errorf("jwks file %s: no keys", path)
	}
	keys := map[string]jose.JSONWebKey{}
	for i, raw := range doc.Keys {
		at := fmt.Sprintf("jwks file %s: keys[%d]", path, i)
		var k jose.JSONWebKey
		if err := k.UnmarshalJSON(raw); err != nil {
			return nil, fmt.Errorf("%s: %w", at, err)
		}
		switch {
		case k.KeyID == "":
			return nil, fmt.Errorf("%s: kid required", at)
		case !k.IsPublic():
			return nil, fmt.Errorf("%s (kid %q): holds private or symmetric key material; a JWKS for verification must hold public keys only", at, k.KeyID)
		case k.Use != "" && k.Use != "sig":
			return nil, fmt.Errorf("%s (kid %q): use %q, want sig", at, k.KeyID, k.Use)
		}
		if _, dup := keys[k.KeyID]; dup {
			return nil, fmt.Errorf("%s: kid %q is used twice", at, k.KeyID)
		}
		switch pub := k.Key.(type) {
		case *ecdsa.PublicKey, ed25519.PublicKey:
		case *rsa.PublicKey:
			if pub.N.BitLen() < minRSABits {
				return nil, fmt.Errorf("%s (kid %q): RSA key of %d bits, want at least %d", at, k.KeyID, pub.N.BitLen(), minRSABits)
			}
		default:
			return nil, fmt.Errorf("%s (kid %q): unsupported key type %T", at, k.KeyID, k.Key)
		}
		if k.Algorithm != "" && !keyFitsAlg(k.Key, jose.SignatureAlgorithm(k.Algorithm)) {
			return nil, fmt.Errorf("%s (kid %q): alg %q does not fit the key", at, k.KeyID, k.Algorithm)
		}
		keys[k.KeyID] = k
	}
	return keys, nil
}

// keyFitsAlg reports whether alg is a signature algorithm for key's type and curve.
func keyFitsAlg(key any, alg jose.SignatureAlgorithm) bool {
	switch k := key.(type) {
	case *ecdsa.PublicKey:
		switch alg {
		case jose.ES256:
			return k.Curve == elliptic.P256()
		case jose.ES384:
			return k.Curve == elliptic.P384()
		case jose.ES512:
			return k.Curve == elliptic.P521()
		}
	case *rsa.PublicKey:
		switch alg {
		case jose.RS256, jose.RS384, jose.RS512, jose.PS256, jose.PS384, jose.PS512:
			return true
		}
	case ed25519.PublicKey:
		return alg == jose.EdDSA
	}
	return false
}

// tokenClaims are the claims beyond the registered ones.
type tokenClaims struct {
	DomainID   string          `json:"domain_id"`
	ProjectIDs json.RawMessage `json:"project_ids"`
	ProjectID  json.RawMessage `json:"project_id"`
	Roles      []string        `json:"roles"`
}

// Authenticate implements Authenticator for X-Auth-Token.
func (v *JWTVerifier) Authenticate(r *http.Request) (Identity, error) {
	toks := r.Header.Values("X-Auth-Token")
	switch {
	case len(toks) == 0 || toks[0] == "":
		return Identity{}, v.fail(reasonMissing, "x-auth-token not found")
	case len(toks) > 1:
		return Identity{}, v.fail(reasonMalformed, "more than one x-auth-token header")
	case len(toks[0]) > maxTokenLen:
		return Identity{}, v.fail(reasonMalformed, "the token is too long")
	}
	tok, err := jwt.ParseSigned(toks[0], v.algs)
	if err != nil {
		if _, ok := errors.AsType[*jose.ErrUnexpectedSignatureAlgorithm](err); ok {
			return Identity{}, v.fail(reasonJWTAlgorithm, "the token's signature algorithm is not accepted")
		}
		return Identity{}, v.fail(reasonMalformed, "the token is not a compact JWS")
	}
	if len(tok.Headers) != 1 {
		return Identity{}, v.fail(reasonMalformed, "the token must have exactly one signature")
	}
	hdr := tok.Headers[0]
	if hdr.KeyID == "" {
		return Identity{}, v.fail(reasonUnknownKey, "the token names no key (kid)")
	}
	key, ok := (*v.keys.Load())[hdr.KeyID]
	if !ok {
		return Identity{}, v.fail(reasonUnknownKey, "the token's signing key (kid) is not known")
	}
	alg := jose.SignatureAlgorithm(hdr.Algorithm)
	if !keyFitsAlg(key.Key, alg) || (key.Algorithm != "" && key.Algorithm != hdr.Algorithm) {
		return Identity{}, v.fail(reasonJWTAlgorithm, "the token's signature algorithm does not fit its key")
	}
	var std jwt.Claims
	var extra tokenClaims
	if err := tok.Claims(key.Key, &std, &extra); err != nil {
		if errors.Is(err, jose.ErrCryptoFailure) {
			return Identity{}, v.fail(reasonBadSignature, "the token's signature is not valid")
		}
		return Identity{}, v.fail(reasonJWTClaims, "the token's signature or claims could not be read")
	}
	if std.Expiry == nil {
		return Identity{}, v.fail(reasonJWTClaims, "the token has no exp")
	}
	err = std.ValidateWithLeeway(jwt.Expected{
		Issuer:      v.cfg.Issuer,
		AnyAudience: jwt.Audience{v.cfg.Audience},
		Time:        v.cfg.Now(),
	}, v.cfg.Leeway)
	switch {
	case err == nil:
	case errors.Is(err, jwt.ErrExpired):
		return Identity{}, v.fail(reasonExpired, "the token has expired")
	case errors.Is(err, jwt.ErrNotValidYet), errors.Is(err, jwt.ErrIssuedInTheFuture):
		return Identity{}, v.fail(reasonJWTNotYetValid, "the token is not valid yet")
	case errors.Is(err, jwt.ErrInvalidIssuer):
		return Identity{}, v.fail(reasonJWTIssuer, "the token's issuer is not the configured one")
	case errors.Is(err, jwt.ErrInvalidAudience):
		return Identity{}, v.fail(reasonJWTAudience, "the token is not meant for this service (aud)")
	default:
		return Identity{}, v.fail(reasonJWTClaims, "the token's claims are not valid")
	}
	if std.Subject == "" {
		return Identity{}, v.fail(reasonJWTClaims, "the token has no sub")
	}
	if !hex32RE.MatchString(extra.DomainID) {
		return Identity{}, v.fail(reasonJWTClaims, "the token's domain_id must be 32 lower-case hex digits")
	}
	projects, bad := tokenProjects(extra)
	if bad != "" {
		return Identity{}, v.fail(reasonJWTClaims, bad)
	}
	return Identity{Name: std.Subject, DomainID: extra.DomainID, ProjectIDs: projects, Roles: extra.Roles}, nil
}

// tokenProjects takes project_ids (a list) or project_id (one string), not both.
func tokenProjects(c tokenClaims) ([]string, string) {
	var ids []string
	switch {
	case c.ProjectIDs != nil && c.ProjectID != nil:
		return nil, "the token has both project_ids and project_id"
	case c.ProjectIDs != nil:
		if err := json.Unmarshal(c.ProjectIDs, &ids); err != nil {
			return nil, "the token's project_ids must be a list of strings"
		}
	case c.ProjectID != nil:
		var id string
		if err := json.Unmarshal(c.ProjectID, &id); err != nil {
			return nil, "the token's project_id must be a string"
		}
		ids = []string{id}
	}
	if len(ids) == 0 {
		return nil, "the token names no project (project_ids)"
	}
	for _, id := range ids {
		if !hex32RE.MatchString(id) {
			return nil, "the token's project ids must be 32 lower-case hex digits"
		}
	}
	return ids, ""
}

func (v *JWTVerifier) fail(reason, msg string) error {
	if v.OnFailure != nil {
		v.OnFailure(reason)
	}
	return &authError{msg}
}

var _ Authenticator = (*JWTVerifier)(nil)

// TokenClaims is what IssueToken puts in a token.
type TokenClaims struct {
	Issuer     string
	Audience   []string
	Subject    string // the caller's name
	DomainID   string
	ProjectIDs []string
	Roles      []string
	// IssuedAt sets iat and nbf, and exp = IssuedAt + ttl; zero means now.
	IssuedAt time.Time
}

// IssueToken signs claims as a compact JWS (typ JWT) valid for ttl, with the algorithm that
// fits signer's key: ES256/ES384/ES512 by curve, RS256, or EdDSA. signer may be any
// crypto.Signer, an HSM key included. Each token gets a random jti.
func IssueToken(signer crypto.Signer, kid string, claims TokenClaims, ttl time.Duration) (string, error) {
	if ttl <= 0 {
		return "", errors.New("issue token: ttl must be positive")
	}
	if kid == "" {
		return "", errors.New("issue token: kid required")
	}
	var alg jose.SignatureAlgorithm
	switch pub := signer.Public().(type) {
	case *ecdsa.PublicKey:
		switch pub.Curve {
		case elliptic.P256():
			alg = jose.ES256
		case elliptic.P384():
			alg = jose.ES384
		case elliptic.P521():
			alg = jose.ES512
		}
	case *rsa.PublicKey:
		alg = jose.RS256
	case ed25519.PublicKey:
		alg = jose.EdDSA
	}
	if alg == "" {
		return "", fmt.Errorf("issue token: unsupported key type %T", signer.Public())
	}
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: alg, Key: cryptosigner.Opaque(signer)},
		(&jose.SignerOptions{}).WithType("JWT").WithHeader(jose.HeaderKey("kid"), kid))
	if err != nil {
		return "", fmt.Errorf("issue token: %w", err)
	}
	iat := claims.IssuedAt
	if iat.IsZero() {
		iat = time.Now()
	}
	var jti [16]byte
	_, _ = rand.Read(jti[:])
	std := jwt.Claims{
		Issuer:    claims.Issuer,
		Subject:   claims.Subject,
		Audience:  jwt.Audience(claims.Audience),
		IssuedAt:  jwt.NewNumericDate(iat),
		NotBefore: jwt.NewNumericDate(iat),
		Expiry:    jwt.NewNumericDate(iat.Add(ttl)),
		ID:        base64.RawURLEncoding.EncodeToString(jti[:]),
	}
	extra := struct {
		DomainID   string   `json:"domain_id"`
		ProjectIDs []string `json:"project_ids"`
		Roles      []string `json:"roles,omitempty"`
	}{claims.DomainID, claims.ProjectIDs, claims.Roles}
	tok, err := jwt.Signed(sig).Claims(std).Claims(extra).Serialize()
	if err != nil {
		return "", fmt.Errorf("issue token: %w", err)
	}
	return tok, nil
}

// GenerateIssuerKey makes a new ECDSA P-256 issuer key. jwks is a JWKS document holding its
// public half (alg ES256, use sig), and kid is the RFC 7638 thumbprint of that key. priv is
// an *ecdsa.PrivateKey, so x509.MarshalPKCS8PrivateKey can store it.
func GenerateIssuerKey() (priv crypto.Signer, jwks []byte, kid string, err error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, "", fmt.Errorf("generate issuer key: %w", err)
	}
	pub := jose.JSONWebKey{Key: &k.PublicKey, Algorithm: string(jose.ES256), Use: "sig"}
	tp, err := pub.Thumbprint(crypto.SHA256)
	if err != nil {
		return nil, nil, "", fmt.Errorf("generate issuer key: %w", err)
	}
	pub.KeyID = base64.RawURLEncoding.EncodeToString(tp)
	jwks, err = json.MarshalIndent(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{pub}}, "", "  ")
	if err != nil {
		return nil, nil, "", fmt.Errorf("generate issuer key: %w", err)
	}
	return k, append(jwks, '\n'), pub.KeyID, nil
}
