package main

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hsmbridge/hsmbridge/hsm"
	"github.com/hsmbridge/hsmbridge/internal/devenv"
	"github.com/hsmbridge/hsmbridge/keystore/store"
)

// TestStartupRepairsInterruptedCreates leaves the three states a crash during create can
// leave (a CREATING row with its marker, a CREATING row without one, a marker with no row)
// and shows that the daemon's start-up repair removes each, so the clusters and the alias
// bind again, and nothing half-made survives on the tokens.
func TestStartupRepairsInterruptedCreates(t *testing.T) {
	env := newEnv(t, "c1", "c2", "c3")
	withMarker, withoutMarker, orphan := env.Tokens[0], env.Tokens[1], env.Tokens[2]
	ids := map[*devenv.Token]string{withMarker: devenv.RandomHex(16), withoutMarker: devenv.RandomHex(16), orphan: devenv.RandomHex(16)}

	// Prepare the crash left-overs with the daemon not running.
	ctx := context.Background()
	st, err := store.OpenSQLite(ctx, filepath.Join(env.Dir, "hsmbridge.db"))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	for i, tok := range []*devenv.Token{withMarker, withoutMarker} {
		err := st.CreateKeystore(ctx, store.Keystore{
			ID: ids[tok], DomainID: env.DomainID, ProjectID: env.ProjectID, Alias: []string{"ks-1", "ks-2"}[i],
			Type: "DHSM", ClusterID: tok.ClusterID, State: store.StateCreating, TokenSerial: tok.Serial, TokenLabel: tok.Label,
			CAFingerprint: fingerprintOf(env.CA.Cert), IdentityFingerprint: fingerprintOf(tok.Identity), CreatedAt: now, UpdatedAt: now,
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	for _, tok := range []*devenv.Token{withMarker, orphan} {
		withToken(t, env, tok, func(ctx context.Context, cl *hsm.Cluster) {
			if err := cl.WriteData(ctx, "keystore:"+ids[tok], []byte(`{"keystore_id":"`+ids[tok]+`"}`)); err != nil {
				t.Fatal(err)
			}
		})
	}

	base, stop, logs := startDaemonLogs(t, env)
	created := map[*devenv.Token]string{}
	for i, tok := range env.Tokens {
		created[tok] = mustCreate(t, base, env, tok, []string{"ks-1", "ks-2", "ks-3"}[i])
	}
	stop()

	if n := strings.Count(logs.String(), "repair: "); n != 3 {
		t.Errorf("%d repairs logged, want 3:\n%s", n, logs)
	}
	rows := storeRows(t, env)
	if len(rows) != 3 {
		t.Errorf("store rows %+v, want the 3 new keystores only", rows)
	}
	for _, r := range rows {
		if r.State != store.StateDisabled {
			t.Errorf("row %s in state %s", r.ID, r.State)
		}
	}
	for _, tok := range env.Tokens {
		if ms := markers(t, env, tok); len(ms) != 1 || ms[created[tok]] == nil {
			t.Errorf("token %s markers %v, want only the new keystore %s", tok.Label, ms, created[tok])
		}
	}
}
