package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/hsmbridge/hsmbridge/internal/devenv"
)

// devInit makes a SoftHSM development environment in dir, which must not exist yet, so a
// second run never re-initialises tokens that a keystore may be bound to.
func devInit(ctx context.Context, dir, listen string, stdout io.Writer) error {
	if _, err := os.Stat(dir); err == nil {
		return fmt.Errorf("dev init: %s already exists; remove it to start again", dir)
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	if _, err := devenv.UseSoftHSMDir(abs); err != nil {
		return fmt.Errorf("dev init: %w", err)
	}
	env, err := devenv.Create(ctx, devenv.Options{Dir: abs, Listen: listen})
	if err != nil {
		return fmt.Errorf("dev init: %w", err)
	}
	fmt.Fprintf(stdout, "dev environment in %s\n", abs)
	for _, t := range env.Tokens {
		fmt.Fprintf(stdout, "  cluster %s: token %q serial %s\n", t.ClusterID, t.Label, t.Serial)
	}
	fmt.Fprintf(stdout, "  config %s\n  CA certificate %s\n  shell variables: . %s\n",
		env.ConfigPath, filepath.Join(abs, "ca.pem"), filepath.Join(abs, "env"))
	return nil
}
