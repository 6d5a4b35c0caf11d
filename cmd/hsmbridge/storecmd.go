package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/hsmbridge/hsmbridge/internal/config"
	"github.com/hsmbridge/hsmbridge/keystore/store"
)

// openStore opens the configured store, running its migrations (once, under a lock, when
// several daemons start together on PostgreSQL).
func openStore(ctx context.Context, c config.Store) (store.Store, error) {
	// Each case returns the interface only when open: a nil *SQLite in it would not be nil.
	if c.Driver == "postgres" {
		dsn, err := c.ReadDSN()
		if err != nil {
			return nil, err
		}
		st, err := store.OpenPostgres(ctx, dsn, c.MaxConns)
		if err != nil {
			return nil, err
		}
		return st, nil
	}
	st, err := store.OpenSQLite(ctx, c.Path)
	if err != nil {
		return nil, err
	}
	return st, nil
}

// dump is the export format: every live keystore and key, as the store holds them.
type dump struct {
	Format    string           `json:"format"`
	Keystores []store.Keystore `json:"keystores"`
	Keys      []store.Key      `json:"keys"`
}

const dumpFormat = "hsmbridge-store-v1"

// storeCommand serves `hsmbridge migrate` and `hsmbridge store export|import`, which move a
// deployment from one store to another (SQLite to PostgreSQL): the keys themselves stay on
// the tokens, so the rows are all there is to move.
func storeCommand(ctx context.Context, cmd string, args []string, stdin io.Reader, stdout io.Writer, stderr io.Writer) error {
	fs := flag.NewFlagSet(cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	configPath := fs.String("config", "", "configuration file naming the store")
	file := fs.String("file", "", "dump file (default: standard output for export, standard input for import)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *configPath == "" {
		return fmt.Errorf("%s: --config is required", cmd)
	}
	cfg, err := config.Load(*configPath)
	if err != nil {
		return err
	}
	st, err := openStore(ctx, cfg.Store)
	if err != nil {
		return err
	}
	defer st.Close()
	switch cmd {
	case "migrate":
		fmt.Fprintf(stdout, "%s store: schema up to date\n", cfg.Store.Driver)
		return nil
	case "export":
		w := stdout
		if *file != "" {
			f, err := os.OpenFile(*file, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
			if err != nil {
				return fmt.Errorf("export: %w", err)
			}
			defer f.Close()
			w = f
		}
		return exportStore(ctx, st, w)
	case "import":
		r := stdin
		if *file != "" {
			f, err := os.Open(*file)
			if err != nil {
				return fmt.Errorf("import: %w", err)
			}
			defer f.Close()
			r = f
		}
		n, m, err := importStore(ctx, st, r)
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "imported %d keystores and %d keys\n", n, m)
		return nil
	}
	return fmt.Errorf("unknown store command %q", cmd)
}

// exportStore writes the live rows. Half-done ones (CREATING, DELETING) are left out: the
// source's start-up repair would remove them anyway.
func exportStore(ctx context.Context, st store.Store, w io.Writer) error {
	kss, err := st.AllKeystores(ctx)
	if err != nil {
		return fmt.Errorf("export: %w", err)
	}
	keys, err := st.AllKeys(ctx)
	if err != nil {
		return fmt.Errorf("export: %w", err)
	}
	d := dump{Format: dumpFormat, Keystores: []store.Keystore{}, Keys: []store.Key{}}
	for _, k := range kss {
		if k.State == store.StateEnabled || k.State == store.StateDisabled {
			d.Keystores = append(d.Keystores, k)
		}
	}
	for _, k := range keys {
		if k.State != store.KeyCreating {
			d.Keys = append(d.Keys, k)
		}
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(d); err != nil {
		return fmt.Errorf("export: %w", err)
	}
	return nil
}

// importStore writes a dump into an empty store. A key can only be inserted into an
// ENABLED keystore, so keystores go in enabled, then their keys, then each keystore takes
// its exported state.
func importStore(ctx context.Context, st store.Store, r io.Reader) (keystores, keys int, err error) {
	var d dump
	dec := json.NewDecoder(r)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&d); err != nil {
		return 0, 0, fmt.Errorf("import: %w", err)
	}
	if d.Format != dumpFormat {
		return 0, 0, fmt.Errorf("import: format %q, want %q", d.Format, dumpFormat)
	}
	existing, err := st.AllKeystores(ctx)
	if err != nil {
		return 0, 0, fmt.Errorf("import: %w", err)
	}
	if len(existing) > 0 {
		return 0, 0, errors.New("import: the target store is not empty; import into a fresh database")
	}
	for _, k := range d.Keystores {
		k.State = store.StateEnabled // a copy: d keeps the exported state for the last step
		if err := st.CreateKeystore(ctx, k); err != nil {
			return 0, 0, fmt.Errorf("import keystore %s: %w", k.ID, err)
		}
	}
	for _, k := range d.Keys {
		if err := st.CreateKey(ctx, k); err != nil {
			return 0, 0, fmt.Errorf("import key %s: %w", k.ID, err)
		}
	}
	for _, k := range d.Keystores {
		if k.State != store.StateEnabled {
			if err := st.SetKeystoreState(ctx, k.ID, store.StateEnabled, k.State, k.UpdatedAt); err != nil {
				return 0, 0, fmt.Errorf("import keystore %s: %w", k.ID, err)
			}
		}
	}
	return len(d.Keystores), len(d.Keys), nil
}
