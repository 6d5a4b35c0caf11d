package main

import (
	"bufio"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/hsmbridge/hsmbridge/internal/devenv"
	"github.com/hsmbridge/hsmbridge/keystore/api"
)

// tokenIssue prints a signed X-Auth-Token from the dev issuer that `dev init` made in --dir:
// for development and tests, never for production tenants.
func tokenIssue(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("token issue", flag.ContinueOnError)
	fs.SetOutput(stderr)
	dir := fs.String("dir", "", "the dev environment directory (from dev init)")
	sub := fs.String("sub", "dev", "the caller's name (sub)")
	domain := fs.String("domain", "", "domain_id (default: the dev environment's)")
	project := fs.String("project", "", "project_id (default: the dev environment's)")
	roles := fs.String("roles", "", "comma-separated roles, e.g. kms:keystore:list,kms:cmk:* (default: no limit)")
	ttl := fs.Duration("ttl", time.Hour, "how long the token is valid")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *dir == "" {
		return errors.New("token issue: --dir is required")
	}
	env, err := readEnvFile(filepath.Join(*dir, "env"))
	if err != nil {
		return fmt.Errorf("token issue: %w", err)
	}
	key, err := readSigner(filepath.Join(*dir, "issuer-key.pem"))
	if err != nil {
		return fmt.Errorf("token issue: %w", err)
	}
	kid, err := os.ReadFile(filepath.Join(*dir, "issuer-kid"))
	if err != nil {
		return fmt.Errorf("token issue: %w", err)
	}
	claims := api.TokenClaims{
		Issuer: devenv.DevIssuer, Audience: []string{devenv.DevAudience}, Subject: *sub,
		DomainID:   cmpOr(*domain, env["HSMBRIDGE_DOMAIN"]),
		ProjectIDs: []string{cmpOr(*project, env["HSMBRIDGE_PROJECT"])},
	}
	if *roles != "" {
		claims.Roles = strings.Split(*roles, ",")
	}
	tok, err := api.IssueToken(key, strings.TrimSpace(string(kid)), claims, *ttl)
	if err != nil {
		return fmt.Errorf("token issue: %w", err)
	}
	fmt.Fprintln(stdout, tok)
	return nil
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// readEnvFile reads the "export K=V" lines dev init writes.
func readEnvFile(path string) (map[string]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	out := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(strings.TrimPrefix(sc.Text(), "export "), "="); ok {
			out[k] = v
		}
	}
	return out, sc.Err()
}

func readSigner(path string) (crypto.Signer, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	b, _ := pem.Decode(data)
	if b == nil {
		return nil, fmt.Errorf("%s: no PEM block", path)
	}
	k, err := x509.ParsePKCS8PrivateKey(b.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	s, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("%s: not a signing key", path)
	}
	return s, nil
}
