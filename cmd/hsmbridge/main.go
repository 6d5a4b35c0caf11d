// Command hsmbridge serves the dedicated keystore API of a cloud KMS on PKCS#11 HSM clusters.
//
//	hsmbridge serve --config FILE      run the daemon
//	hsmbridge check --config FILE      validate the config and dry-open every cluster
//	hsmbridge dev init --dir DIR       make a SoftHSM development environment in DIR
//	hsmbridge token issue --dir DIR    print a signed X-Auth-Token from DIR's dev issuer
//	hsmbridge migrate --config FILE    bring the configured store's schema up to date
//	hsmbridge store export|import      move keystores and keys between stores (SQLite → PostgreSQL)
//	hsmbridge version                  print the version
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "hsmbridge:", err)
		}
		os.Exit(1)
	}
}

const usage = `usage:
  hsmbridge serve --config FILE
  hsmbridge check --config FILE
  hsmbridge dev init --dir DIR [--listen ADDR]
  hsmbridge token issue --dir DIR [--roles R1,R2] [--ttl 1h] [--sub NAME]
  hsmbridge migrate --config FILE
  hsmbridge store export --config FILE [--file DUMP]
  hsmbridge store import --config FILE [--file DUMP]
  hsmbridge version`

// run is the whole program; only main exits. ctx ends on SIGTERM or SIGINT.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprintln(stderr, usage)
		return errors.New("no command given")
	}
	switch cmd, rest := args[0], args[1:]; cmd {
	case "serve":
		fs := flag.NewFlagSet("serve", flag.ContinueOnError)
		fs.SetOutput(stderr)
		configPath := fs.String("config", "", "configuration file (YAML)")
		if err := fs.Parse(rest); err != nil {
			return err
		}
		if *configPath == "" {
			return errors.New("serve: --config is required")
		}
		return serve(ctx, *configPath, stderr)
	case "check":
		fs := flag.NewFlagSet("check", flag.ContinueOnError)
		fs.SetOutput(stderr)
		configPath := fs.String("config", "", "configuration file (YAML)")
		if err := fs.Parse(rest); err != nil {
			return err
		}
		if *configPath == "" {
			return errors.New("check: --config is required")
		}
		return check(ctx, *configPath, stdout)
	case "dev":
		if len(rest) == 0 || rest[0] != "init" {
			return errors.New("dev: the only subcommand is 'dev init'")
		}
		fs := flag.NewFlagSet("dev init", flag.ContinueOnError)
		fs.SetOutput(stderr)
		dir := fs.String("dir", "", "directory to create the environment in (must not exist)")
		listen := fs.String("listen", "127.0.0.1:8080", "listen address written into the config")
		if err := fs.Parse(rest[1:]); err != nil {
			return err
		}
		if *dir == "" {
			return errors.New("dev init: --dir is required")
		}
		return devInit(ctx, *dir, *listen, stdout)
	case "token":
		if len(rest) == 0 || rest[0] != "issue" {
			return errors.New("token: the only subcommand is 'token issue'")
		}
		return tokenIssue(rest[1:], stdout, stderr)
	case "migrate":
		return storeCommand(ctx, "migrate", rest, os.Stdin, stdout, stderr)
	case "store":
		if len(rest) == 0 || (rest[0] != "export" && rest[0] != "import") {
			return errors.New("store: the subcommands are 'store export' and 'store import'")
		}
		return storeCommand(ctx, rest[0], rest[1:], os.Stdin, stdout, stderr)
	case "version":
		fmt.Fprintln(stdout, "hsmbridge", version)
		return nil
	case "help", "-h", "--help":
		fmt.Fprintln(stdout, usage)
		return nil
	default:
		fmt.Fprintln(stderr, usage)
		return fmt.Errorf("unknown command %q", cmd)
	}
}
