package main

import (
	"crypto/tls"
	"fmt"
	"log/slog"
	"net/http"

	"github.com/hsmbridge/hsmbridge/internal/config"
	"github.com/hsmbridge/hsmbridge/keystore/api"
)

// authSchemes loads the configured credentials: AK/SK, signed tokens, the token file.
func authSchemes(c config.Auth, m *api.Metrics) (api.Schemes, error) {
	var sc api.Schemes
	var err error
	if c.TokenFile != "" {
		if sc.Tokens, err = api.LoadTokenFile(c.TokenFile); err != nil {
			return sc, err
		}
		sc.Tokens.OnFailure = m.AuthFailure("token")
	}
	if c.AKSKFile != "" {
		if sc.AKSK, err = api.LoadAKSK(c.AKSKFile); err != nil {
			return sc, err
		}
		sc.AKSK.OnFailure = m.AuthFailure("aksk")
	}
	if c.JWT.JWKSFile != "" {
		sc.JWT, err = api.LoadJWKS(c.JWT.JWKSFile, api.JWTConfig{
			Issuer: c.JWT.Issuer, Audience: c.JWT.Audience, Algorithms: c.JWT.Algorithms, Leeway: c.JWT.Leeway.Duration,
		})
		if err != nil {
			return sc, err
		}
		sc.JWT.OnFailure = m.AuthFailure("jwt")
	}
	return sc, nil
}

// reloadAuth re-reads the credentials files (on SIGHUP). A file that fails to load leaves
// the credentials it had in force.
func reloadAuth(sc api.Schemes, log *slog.Logger) {
	if sc.AKSK != nil {
		if err := sc.AKSK.Reload(); err != nil {
			log.Error("reload AK/SK credentials: keeping the previous set", "err", err)
		} else {
			log.Info("reloaded AK/SK credentials")
		}
	}
	if sc.JWT != nil {
		if err := sc.JWT.Reload(); err != nil {
			log.Error("reload token issuer keys: keeping the previous set", "err", err)
		} else {
			log.Info("reloaded token issuer keys")
		}
	}
}

// trustedServer configures the trusted frontend's listener: peer credentials on a Unix
// socket, or mutual TLS on TCP, its certificate and key reloaded on change like the public
// listener's.
func trustedServer(c config.Trusted, srv *http.Server, log *slog.Logger) error {
	if network, _ := config.SplitListen(c.Listen); network == "unix" {
		srv.ConnContext = api.PeerCredContext
		return nil
	}
	certs, err := newCertReloader(c.CertFile, c.KeyFile, nil, log)
	if err != nil {
		return fmt.Errorf("auth.trusted: %w", err)
	}
	pool, err := loadClientCAs(c.ClientCA)
	if err != nil {
		return fmt.Errorf("auth.trusted.client_ca: %w", err)
	}
	srv.TLSConfig = &tls.Config{
		GetCertificate: certs.GetCertificate, ClientAuth: tls.RequireAndVerifyClientCert,
		ClientCAs: pool, MinVersion: tls.VersionTLS12,
	}
	return nil
}
