package main

// End-to-end tests of the keystore lifecycle: list, show, enable, disable and delete
// (GET/POST/DELETE /v1.0/{project_id}/keystores[/{id}[/enable|/disable]]), the connection
// state they report, /readyz, the connection metric and the audit line. The real daemon over
// real HTTP, on real SoftHSM tokens and a real SQLite file; what a call leaves behind on the
// token and in the store is inspected once the daemon has stopped.

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hsmbridge/hsmbridge/hsm"
	"github.com/hsmbridge/hsmbridge/internal/devenv"
	"github.com/hsmbridge/hsmbridge/keystore/api"
	"github.com/hsmbridge/hsmbridge/keystore/store"
)

// keystoreFields are exactly the fields show and list give a keystore.
var keystoreFields = []string{"cluster_id", "connection_error_code", "connection_state", "create_time", "domain_id",
	"hsm_cluster_id", "keystore_alias", "keystore_id", "keystore_state", "keystore_type"}

// lcURL is the URL of keystore id (or the collection, id "") in tenant's project, plus suffix.
func lcURL(base string, tenant *devenv.Env, id, suffix string) string {
	u := base + "/v1.0/" + tenant.ProjectID + "/keystores"
	if id != "" {
		u += "/" + id
	}
	return u + suffix
}

// lcKeystore checks one keystore object of show or list: exactly the documented fields, each
// a JSON string, and returns it.
func lcKeystore(t *testing.T, raw json.RawMessage) map[string]string {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatalf("keystore %s: %v", raw, err)
	}
	keys := make([]string, 0, len(m))
	out := make(map[string]string, len(m))
	for k, v := range m {
		keys = append(keys, k)
		s, ok := v.(string)
		if !ok {
			t.Errorf("keystore field %s = %v (%T), want a JSON string", k, v, v)
		}
		out[k] = s
	}
	slices.Sort(keys)
	if !slices.Equal(keys, keystoreFields) {
		t.Errorf("keystore has fields %v, want %v; %s", keys, keystoreFields, raw)
	}
	return out
}

// lcShow shows id as tenant and fails the test unless it answers 200.
func lcShow(t *testing.T, base string, tenant *devenv.Env, id string) map[string]string {
	t.Helper()
	st, hdr, body := do(t, http.MethodGet, lcURL(base, tenant, id, ""), tenant.AuthToken, "")
	if st != http.StatusOK {
		t.Fatalf("show %s: status %d, want 200; body %s", id, st, body)
	}
	if ct := hdr.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		t.Errorf("show: Content-Type %q, want application/json", ct)
	}
	var got map[string]json.RawMessage
	if err := json.Unmarshal(body, &got); err != nil {
		t.Fatalf("show body %s: %v", body, err)
	}
	if len(got) != 1 || got["keystore"] == nil {
		t.Fatalf("show body %s, want exactly {\"keystore\":{...}}", body)
	}
	return lcKeystore(t, got["keystore"])
}

// lcWantShown checks that id shows with the given state, connection state and code.
func lcWantShown(t *testing.T, base string, tenant *devenv.Env, id, state, conn, code string) {
	t.Helper()
	ks := lcShow(t, base, tenant, id)
	if ks["keystore_state"] != state || ks["connection_state"] != conn || ks["connection_error_code"] != code {
		t.Errorf("keystore %s is %s/%s/%q, want %s/%s/%q", id, ks["keystore_state"], ks["connection_state"],
			ks["connection_error_code"], state, conn, code)
	}
}

// lcList lists tenant's keystores with the query (e.g. "?limit=10") and checks a 200 answer.
func lcList(t *testing.T, base string, tenant *devenv.Env, query string) (total int, keystores []map[string]string) {
	t.Helper()
	st, _, body := do(t, http.MethodGet, lcURL(base, tenant, "", query), tenant.AuthToken, "")
	if st != http.StatusOK {
		t.Fatalf("list %s: status %d, want 200; body %s", query, st, body)
	}
	var got map[string]json.RawMessage
	if err := json.Unmarshal(body, &got); err != nil {
		t.Fatalf("list body %s: %v", body, err)
	}
	if len(got) != 2 || got["total"] == nil || got["keystores"] == nil {
		t.Fatalf("list body %s, want exactly {\"total\":n,\"keystores\":[...]}", body)
	}
	if err := json.Unmarshal(got["total"], &total); err != nil {
		t.Fatalf("list total %s is not a JSON number: %v", got["total"], err)
	}
	var raws []json.RawMessage
	if err := json.Unmarshal(got["keystores"], &raws); err != nil || raws == nil {
		t.Fatalf("list keystores %s is not a JSON array (%v)", got["keystores"], err)
	}
	for _, r := range raws {
		keystores = append(keystores, lcKeystore(t, r))
	}
	return total, keystores
}

// lcDo sends one request with exactly the Content-Type given ("" sends none) and body.
func lcDo(t *testing.T, method, url, token, contentType, body string) (int, http.Header, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	req.Header.Set("X-Auth-Token", token)
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	var b strings.Builder
	if _, err := bufio.NewReader(resp.Body).WriteTo(&b); err != nil {
		t.Fatalf("%s %s: reading body: %v", method, url, err)
	}
	return resp.StatusCode, resp.Header, []byte(b.String())
}

// lcChange posts action ("enable" or "disable") on id as tenant, with no body and no
// Content-Type, as Terraform does.
func lcChange(t *testing.T, base string, tenant *devenv.Env, id, action string) (int, http.Header, []byte) {
	t.Helper()
	return do(t, http.MethodPost, lcURL(base, tenant, id, "/"+action), tenant.AuthToken, "")
}

// lcWantState checks a 200 answer of enable or disable: exactly {"keystore":{id, state}}.
func lcWantState(t *testing.T, status int, body []byte, id, state string) {
	t.Helper()
	if status != http.StatusOK {
		t.Fatalf("status %d, want 200; body %s", status, body)
	}
	var got map[string]map[string]string
	if err := json.Unmarshal(body, &got); err != nil {
		t.Fatalf("body %s: %v", body, err)
	}
	want := map[string]map[string]string{"keystore": {"keystore_id": id, "keystore_state": state}}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("body %s, want {\"keystore\":{\"keystore_id\":%q,\"keystore_state\":%q}}", body, id, state)
	}
}

// lcMustChange enables or disables id and checks the answer names the new state.
func lcMustChange(t *testing.T, base string, tenant *devenv.Env, id, action string) {
	t.Helper()
	st, _, body := lcChange(t, base, tenant, id, action)
	lcWantState(t, st, body, id, map[string]string{"enable": "ENABLED", "disable": "DISABLED"}[action])
}

// lcDelete deletes id as tenant.
func lcDelete(t *testing.T, base string, tenant *devenv.Env, id string) (int, http.Header, []byte) {
	t.Helper()
	return do(t, http.MethodDelete, lcURL(base, tenant, id, ""), tenant.AuthToken, "")
}

// lcMustDelete deletes id and checks the answer: 200 with an empty body.
func lcMustDelete(t *testing.T, base string, tenant *devenv.Env, id string) {
	t.Helper()
	st, _, body := lcDelete(t, base, tenant, id)
	if st != http.StatusOK || len(body) != 0 {
		t.Fatalf("delete %s: status %d body %q, want 200 and an empty body", id, st, body)
	}
}

// lcWantGone checks that every lifecycle call on id answers 400 KMS.8003 to tenant.
func lcWantGone(t *testing.T, base string, tenant *devenv.Env, id string) {
	t.Helper()
	st, hdr, body := do(t, http.MethodGet, lcURL(base, tenant, id, ""), tenant.AuthToken, "")
	wantError(t, st, hdr, body, 400, "KMS.8003", id)
	for _, action := range []string{"enable", "disable"} {
		st, hdr, body = lcChange(t, base, tenant, id, action)
		wantError(t, st, hdr, body, 400, "KMS.8003", id)
	}
	st, hdr, body = lcDelete(t, base, tenant, id)
	wantError(t, st, hdr, body, 400, "KMS.8003", id)
}

// lcSecondTenant adds a second tenant (its own domain and project) to env's tokens.yaml.
// Start the daemon after it.
func lcSecondTenant(t *testing.T, env *devenv.Env) *devenv.Env {
	t.Helper()
	other := &devenv.Env{AuthToken: devenv.RandomHex(24), DomainID: devenv.RandomHex(16), ProjectID: devenv.RandomHex(16)}
	path := filepath.Join(env.Dir, "tokens.yaml")
	f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err = fmt.Fprintf(f, "  - name: other\n    token_sha256: %s\n    domain_id: %s\n    project_ids: [%s]\n",
		api.HashToken(other.AuthToken), other.DomainID, other.ProjectID)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	return other
}

// lcMetric returns the value of the series line (name{labels}) at /metrics, and whether it is there.
func lcMetric(t *testing.T, base, series string) (string, bool) {
	t.Helper()
	st, _, body := do(t, http.MethodGet, base+"/metrics", "", "")
	if st != http.StatusOK {
		t.Fatalf("/metrics: status %d; body %s", st, body)
	}
	for line := range strings.SplitSeq(string(body), "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			return v, true
		}
	}
	return "", false
}

// lcWantConnectionMetric checks hsmbridge_keystore_connection_state of cluster: 1 for state,
// 0 for the other two.
func lcWantConnectionMetric(t *testing.T, base, cluster, state string) {
	t.Helper()
	for _, s := range []string{"CONNECTED", "DISCONNECTED", "FAILED"} {
		series := fmt.Sprintf("hsmbridge_keystore_connection_state{cluster=%q,state=%q}", cluster, s)
		want := "0"
		if s == state {
			want = "1"
		}
		if v, ok := lcMetric(t, base, series); !ok || v != want {
			t.Errorf("%s = %q (present %v), want %s", series, v, ok, want)
		}
	}
}

// readyz is /readyz's answer.
type readyz struct {
	Status   string `json:"status"`
	Clusters map[string]struct {
		KeystoreEnabled     bool   `json:"keystore_enabled"`
		ConnectionState     string `json:"connection_state"`
		ConnectionErrorCode string `json:"connection_error_code"`
	} `json:"clusters"`
}

func lcReadyz(t *testing.T, base string, wantStatus int) readyz {
	t.Helper()
	st, _, body := do(t, http.MethodGet, base+"/readyz", "", "")
	if st != wantStatus {
		t.Errorf("/readyz status %d, want %d; body %s", st, wantStatus, body)
	}
	var r readyz
	if err := json.Unmarshal(body, &r); err != nil {
		t.Fatalf("/readyz body %s: %v", body, err)
	}
	if strings.Contains(string(body), "keystore_id") {
		t.Errorf("/readyz answers anyone, so it must name no keystore: %s", body)
	}
	return r
}

// TestKeystoreLifecycle walks one keystore through its whole life and checks what each step
// answers, and that deleting it leaves neither a marker on the token nor a row in the store,
// so the cluster (and the alias) can be bound again.
func TestKeystoreLifecycle(t *testing.T) {
	env := newEnv(t, "c1", "c2")
	tok := env.Tokens[0]
	base, stop := startDaemon(t, env)

	before := time.Now().UnixMilli()
	id := mustCreate(t, base, env, tok, "ks-life")
	after := time.Now().UnixMilli()

	ks := lcShow(t, base, env, id)
	for k, v := range map[string]string{"keystore_id": id, "domain_id": env.DomainID, "keystore_alias": "ks-life",
		"keystore_type": "DHSM", "hsm_cluster_id": "c1", "cluster_id": "c1", "keystore_state": "DISABLED",
		"connection_state": "CONNECTED", "connection_error_code": ""} {
		if ks[k] != v {
			t.Errorf("show: %s = %q, want %q", k, ks[k], v)
		}
	}
	if ct, err := strconv.ParseInt(ks["create_time"], 10, 64); err != nil || ct < before || ct > after {
		t.Errorf("show: create_time %q, want epoch milliseconds from %d to %d", ks["create_time"], before, after)
	}

	total, list := lcList(t, base, env, "")
	if total != 1 || len(list) != 1 || fmt.Sprint(list[0]) != fmt.Sprint(ks) {
		t.Errorf("list: total %d %v, want 1 and exactly %v", total, list, ks)
	}

	lcMustChange(t, base, env, id, "enable")
	lcWantShown(t, base, env, id, "ENABLED", "CONNECTED", "")

	st, hdr, body := lcChange(t, base, env, id, "enable")
	wantError(t, st, hdr, body, 400, "KMS.8008", "ENABLED")
	st, hdr, body = lcDelete(t, base, env, id)
	wantError(t, st, hdr, body, 400, "KMS.8008", "disable")
	lcWantShown(t, base, env, id, "ENABLED", "CONNECTED", "")

	lcMustChange(t, base, env, id, "disable")
	st, hdr, body = lcChange(t, base, env, id, "disable")
	wantError(t, st, hdr, body, 400, "KMS.8008", "DISABLED")
	lcWantShown(t, base, env, id, "DISABLED", "CONNECTED", "")

	lcMustDelete(t, base, env, id)
	lcWantGone(t, base, env, id)
	if total, list := lcList(t, base, env, ""); total != 0 || len(list) != 0 {
		t.Errorf("list after delete: total %d %v, want none", total, list)
	}
	stop()

	if ms := markers(t, env, tok); len(ms) != 0 {
		t.Errorf("token %s still has markers %v after delete", tok.Label, ms)
	}
	if rows := storeRows(t, env); len(rows) != 0 {
		t.Errorf("store still has rows %+v after delete", rows)
	}

	// A new daemon on the same files binds the cluster, and the alias, again.
	base, stop, logs := startDaemonLogs(t, env)
	id2 := mustCreate(t, base, env, tok, "ks-life")
	if id2 == id {
		t.Errorf("re-create answered the deleted id %s", id)
	}
	lcWantShown(t, base, env, id2, "DISABLED", "CONNECTED", "")
	stop()
	if l := logs.String(); strings.Contains(l, "repair") || strings.Contains(l, "no marker") {
		t.Errorf("the restart after a clean delete repaired something:\n%s", l)
	}
	if ms := markers(t, env, tok); len(ms) != 1 || ms[id2] == nil {
		t.Errorf("token markers %v, want only the new keystore %s", ms, id2)
	}
}

// TestKeystoreEnableDisableBodies: enable and disable take an empty body with or without a
// JSON Content-Type (the SDK sends the header, Terraform neither), and ignore a body of {}.
func TestKeystoreEnableDisableBodies(t *testing.T) {
	env := newEnv(t, "c1")
	base, _ := startDaemon(t, env)
	id := mustCreate(t, base, env, env.Tokens[0], "ks-1")
	for _, c := range []struct{ name, contentType, body string }{
		{"no Content-Type, no body", "", ""},
		{"JSON Content-Type, empty body", "application/json", ""},
		{"JSON Content-Type with charset, empty body", "application/json;charset=UTF-8", ""},
		{"body {}", "application/json", "{}"},
		{"body {} and no Content-Type", "", "{}"},
	} {
		t.Run(c.name, func(t *testing.T) {
			for _, step := range []struct{ action, state string }{{"enable", "ENABLED"}, {"disable", "DISABLED"}} {
				st, _, body := lcDo(t, http.MethodPost, lcURL(base, env, id, "/"+step.action), env.AuthToken, c.contentType, c.body)
				lcWantState(t, st, body, id, step.state)
				lcWantShown(t, base, env, id, step.state, "CONNECTED", "")
			}
		})
	}
}

// TestKeystorePaging lists 25 keystores (one per cluster) ten at a time: each page holds what
// it should, the total is 25 on every page, every keystore appears exactly once, in creation
// order then id; and bad limits and offsets are refused with their own codes.
func TestKeystorePaging(t *testing.T) {
	clusters := make([]string, 25)
	for i := range clusters {
		clusters[i] = fmt.Sprintf("p%02d", i+1)
	}
	env := newEnv(t, clusters...)
	other := lcSecondTenant(t, env)
	base, _ := startDaemon(t, env)
	created := map[string]bool{}
	for i, tok := range env.Tokens {
		created[mustCreate(t, base, env, tok, fmt.Sprintf("ks-%02d", i+1))] = true
	}

	var all []map[string]string
	for i, want := range []int{10, 10, 5} {
		offset := 10 * i
		total, page := lcList(t, base, env, fmt.Sprintf("?limit=10&offset=%d", offset))
		if total != 25 || len(page) != want {
			t.Errorf("offset %d: total %d, %d keystores; want 25 and %d", offset, total, len(page), want)
		}
		all = append(all, page...)
	}
	seen := map[string]int{}
	for _, ks := range all {
		seen[ks["keystore_id"]]++
		if ks["domain_id"] != env.DomainID {
			t.Errorf("keystore %s of domain %s listed", ks["keystore_id"], ks["domain_id"])
		}
	}
	for id := range created {
		if seen[id] != 1 {
			t.Errorf("keystore %s listed %d times over the pages, want once", id, seen[id])
		}
	}
	if len(seen) != len(created) {
		t.Errorf("pages list %d distinct keystores, want the %d created", len(seen), len(created))
	}
	ordered := slices.IsSortedFunc(all, func(a, b map[string]string) int {
		ta, _ := strconv.ParseInt(a["create_time"], 10, 64)
		tb, _ := strconv.ParseInt(b["create_time"], 10, 64)
		if ta != tb {
			return int(ta - tb)
		}
		return strings.Compare(a["keystore_id"], b["keystore_id"])
	})
	if !ordered {
		for _, ks := range all {
			t.Logf("%s %s", ks["create_time"], ks["keystore_id"])
		}
		t.Errorf("pages are not in creation-time, then id, order")
	}

	ids := func(ks []map[string]string) []string {
		out := make([]string, len(ks))
		for i, k := range ks {
			out[i] = k["keystore_id"]
		}
		return out
	}
	for _, c := range []struct {
		query string
		want  []map[string]string
	}{
		{"", all[:10]},                   // default limit 10
		{"?offset=20", all[20:]},         // default limit, with an offset
		{"?limit=1000", all},             // the cap itself
		{"?limit=1&offset=24", all[24:]}, // the last one
		{"?limit=10&offset=25", nil},     // past the end: empty, still counted
		{"?limit=10&offset=1000", nil},
	} {
		total, page := lcList(t, base, env, c.query)
		if total != 25 || !slices.Equal(ids(page), ids(c.want)) {
			t.Errorf("list %q: total %d ids %v, want 25 and %v", c.query, total, ids(page), ids(c.want))
		}
	}

	// Another domain sees none of them, and its total counts only its own.
	if total, page := lcList(t, base, other, "?limit=1000"); total != 0 || len(page) != 0 {
		t.Errorf("other tenant: total %d %v, want none", total, page)
	}

	for _, c := range []struct{ query, code string }{
		{"?limit=0", "KMS.1601"},
		{"?limit=-1", "KMS.1601"},
		{"?limit=1001", "KMS.1601"},
		{"?limit=abc", "KMS.1601"},
		{"?limit=1.5", "KMS.1601"},
		{"?offset=-1", "KMS.1603"},
		{"?offset=x", "KMS.1603"},
		{"?limit=10&offset=-1", "KMS.1603"},
	} {
		st, hdr, body := do(t, http.MethodGet, lcURL(base, env, "", c.query), env.AuthToken, "")
		wantError(t, st, hdr, body, 400, c.code)
	}
}

// TestTenantIsolation: a second domain sees none of the first's keystores and gets
// KMS.8003, exactly as for an id that does not exist, for each of them on every call; none of
// its attempts changes them.
func TestTenantIsolation(t *testing.T) {
	env := newEnv(t, "c1", "c2", "c3")
	other := lcSecondTenant(t, env)
	base, stop := startDaemon(t, env)
	enabled := mustCreate(t, base, env, env.Tokens[0], "ks-enabled")
	lcMustChange(t, base, env, enabled, "enable")
	disabled := mustCreate(t, base, env, env.Tokens[1], "ks-disabled")

	if total, page := lcList(t, base, other, ""); total != 0 || len(page) != 0 {
		t.Errorf("other tenant lists total %d %v, want none", total, page)
	}
	unknown := "0b6a8f8e-4f7c-4b0a-9d2e-1c3b5a7d9e0f"
	_, _, unknownBody := do(t, http.MethodGet, lcURL(base, other, unknown, ""), other.AuthToken, "")
	for _, id := range []string{enabled, disabled} {
		lcWantGone(t, base, other, id)
		// Not an oracle: the answer is the one for an id that does not exist.
		_, _, body := do(t, http.MethodGet, lcURL(base, other, id, ""), other.AuthToken, "")
		if got, want := strings.ReplaceAll(string(body), id, "ID"), strings.ReplaceAll(string(unknownBody), unknown, "ID"); got != want {
			t.Errorf("another domain's keystore answers %s, an unknown one %s", got, want)
		}
		// In the first tenant's project, the other is refused before the keystore is looked at.
		st, hdr, body := do(t, http.MethodGet, lcURL(base, env, id, ""), other.AuthToken, "")
		wantError(t, st, hdr, body, 403, "KMS.0321")
		st, hdr, body = do(t, http.MethodDelete, lcURL(base, env, id, ""), other.AuthToken, "")
		wantError(t, st, hdr, body, 403, "KMS.0321")
		st, hdr, body = do(t, http.MethodPost, lcURL(base, env, id, "/disable"), other.AuthToken, "")
		wantError(t, st, hdr, body, 403, "KMS.0321")
	}

	// The first tenant's keystores are as they were.
	lcWantShown(t, base, env, enabled, "ENABLED", "CONNECTED", "")
	lcWantShown(t, base, env, disabled, "DISABLED", "CONNECTED", "")
	if total, _ := lcList(t, base, env, ""); total != 2 {
		t.Errorf("first tenant lists %d keystores, want 2", total)
	}

	// The other tenant's own keystore is its alone.
	st, hdr, body := do(t, http.MethodPost, base+"/v1.0/"+other.ProjectID+"/keystores", other.AuthToken,
		mustJSON(t, goodFields(env, env.Tokens[2], "ks-enabled")))
	mine := wantCreated(t, other, st, hdr, body)
	if total, page := lcList(t, base, other, ""); total != 1 || len(page) != 1 || page[0]["keystore_id"] != mine {
		t.Errorf("other tenant lists total %d %v, want only %s", total, page, mine)
	}
	lcWantGone(t, base, env, mine)
	if total, _ := lcList(t, base, env, ""); total != 2 {
		t.Errorf("first tenant lists %d keystores, want 2", total)
	}
	stop()

	for i, id := range []string{enabled, disabled, mine} {
		if ms := markers(t, env, env.Tokens[i]); len(ms) != 1 || ms[id] == nil {
			t.Errorf("token %s markers %v, want only %s", env.Tokens[i].Label, ms, id)
		}
	}
	states := map[string]store.State{}
	for _, r := range storeRows(t, env) {
		states[r.ID] = r.State
	}
	want := map[string]store.State{enabled: store.StateEnabled, disabled: store.StateDisabled, mine: store.StateDisabled}
	if fmt.Sprint(states) != fmt.Sprint(want) {
		t.Errorf("store states %v, want %v", states, want)
	}
}

// TestKeystoreStateConflicts: every call a keystore's state does not allow is refused with
// KMS.8008 and changes nothing; malformed ids are KMS.8001 and unknown ones KMS.8003.
func TestKeystoreStateConflicts(t *testing.T) {
	env := newEnv(t, "c1", "c2")
	base, stop := startDaemon(t, env)
	disabled := mustCreate(t, base, env, env.Tokens[0], "ks-disabled")
	enabled := mustCreate(t, base, env, env.Tokens[1], "ks-enabled")
	lcMustChange(t, base, env, enabled, "enable")

	for _, c := range []struct {
		name, method, id, suffix, state string
	}{
		{"enable an ENABLED keystore", http.MethodPost, enabled, "/enable", "ENABLED"},
		{"delete an ENABLED keystore", http.MethodDelete, enabled, "", "ENABLED"},
		{"disable a DISABLED keystore", http.MethodPost, disabled, "/disable", "DISABLED"},
	} {
		st, hdr, body := do(t, c.method, lcURL(base, env, c.id, c.suffix), env.AuthToken, "")
		wantError(t, st, hdr, body, 400, "KMS.8008", c.id)
		lcWantShown(t, base, env, c.id, c.state, "CONNECTED", "")
	}

	// A keystore that holds a key cannot be deleted, even disabled.
	st, _, body := do(t, http.MethodPost, base+"/v1.0/"+env.ProjectID+"/kms/create-key", env.AuthToken,
		mustJSON(t, map[string]string{"key_alias": "k-1", "key_spec": "AES_256", "keystore_id": enabled}))
	if st != http.StatusOK {
		t.Fatalf("create-key: status %d; body %s", st, body)
	}
	lcMustChange(t, base, env, enabled, "disable")
	st, hdr, body := lcDelete(t, base, env, enabled)
	wantError(t, st, hdr, body, 400, "KMS.8008", "key")
	lcWantShown(t, base, env, enabled, "DISABLED", "CONNECTED", "")
	if total, _ := lcList(t, base, env, ""); total != 2 {
		t.Errorf("list total %d after refused deletes, want 2", total)
	}

	for _, bad := range []string{"not-a-uuid", strings.ToUpper(disabled), disabled + "0", "1"} {
		st, hdr, body := do(t, http.MethodGet, lcURL(base, env, bad, ""), env.AuthToken, "")
		wantError(t, st, hdr, body, 400, "KMS.8001")
		for _, action := range []string{"enable", "disable"} {
			st, hdr, body = lcChange(t, base, env, bad, action)
			wantError(t, st, hdr, body, 400, "KMS.8001")
		}
		st, hdr, body = lcDelete(t, base, env, bad)
		wantError(t, st, hdr, body, 400, "KMS.8001")
	}
	lcWantGone(t, base, env, "0b6a8f8e-4f7c-4b0a-9d2e-1c3b5a7d9e0f")
	stop()

	states := map[string]store.State{}
	for _, r := range storeRows(t, env) {
		states[r.ID] = r.State
	}
	if want := map[string]store.State{disabled: store.StateDisabled, enabled: store.StateDisabled}; fmt.Sprint(states) != fmt.Sprint(want) {
		t.Errorf("store states %v, want %v", states, want)
	}
}

// lcSwapToken re-initialises the token of env.Tokens[i]'s cluster: a new token with the same
// label (and so a new serial), which the configuration then names. The daemon must be stopped.
func lcSwapToken(t *testing.T, env *devenv.Env, i int) *devenv.Token {
	t.Helper()
	soPIN, err := os.ReadFile(filepath.Join(env.Dir, "so-pin"))
	if err != nil {
		t.Fatal(err)
	}
	old := env.Tokens[i]
	tok, err := devenv.NewToken(context.Background(), env.Module, old.ClusterID, old.Label,
		strings.TrimSpace(string(soPIN)), readPIN(t, env), env.CA)
	if err != nil {
		t.Fatalf("new token: %v", err)
	}
	if tok.Serial == old.Serial {
		t.Fatalf("the new token has the old serial %s", old.Serial)
	}
	env.Tokens[i] = tok
	if err := env.WriteConfig(); err != nil {
		t.Fatal(err)
	}
	return tok
}

// TestTokenReinitialisedUnderDisabledKeystore: a token re-initialised under a keystore is
// noticed at start-up and on enable, which refuses; the keystore stays DISABLED and, as it is
// not enabled, readiness is unaffected. Deleting the keystore frees the cluster for the new token.
func TestTokenReinitialisedUnderDisabledKeystore(t *testing.T) {
	env := newEnv(t, "c1", "c2")
	base, stop := startDaemon(t, env)
	id := mustCreate(t, base, env, env.Tokens[0], "ks-1")
	stop()
	oldSerial := env.Tokens[0].Serial
	tok := lcSwapToken(t, env, 0)

	base, stop, logs := startDaemonLogs(t, env)
	lcWantShown(t, base, env, id, "DISABLED", "FAILED", "TOKEN_MISMATCH")
	st, hdr, body := lcChange(t, base, env, id, "enable")
	wantError(t, st, hdr, body, 400, "KMS.8004", "c1", tok.Serial, oldSerial)
	lcWantShown(t, base, env, id, "DISABLED", "FAILED", "TOKEN_MISMATCH")
	if _, list := lcList(t, base, env, ""); len(list) != 1 || list[0]["connection_state"] != "FAILED" ||
		list[0]["connection_error_code"] != "TOKEN_MISMATCH" {
		t.Errorf("list %v, want the keystore FAILED/TOKEN_MISMATCH", list)
	}
	r := lcReadyz(t, base, http.StatusOK)
	if c := r.Clusters["c1"]; c.KeystoreEnabled || c.ConnectionState != "FAILED" || c.ConnectionErrorCode != "TOKEN_MISMATCH" {
		t.Errorf("/readyz c1 %+v, want keystore %s, not enabled, FAILED/TOKEN_MISMATCH", c, id)
	}
	lcWantConnectionMetric(t, base, "c1", "FAILED")

	// Delete needs no marker; the new token can then be bound.
	lcMustDelete(t, base, env, id)
	id2 := mustCreate(t, base, env, tok, "ks-1")
	lcWantShown(t, base, env, id2, "DISABLED", "CONNECTED", "")
	lcMustChange(t, base, env, id2, "enable")
	lcReadyz(t, base, http.StatusOK)
	lcWantConnectionMetric(t, base, "c1", "CONNECTED")
	stop()
	if !strings.Contains(logs.String(), "no marker") {
		t.Errorf("start-up did not report the missing marker:\n%s", logs)
	}
}

// TestTokenReinitialisedUnderEnabledKeystore: the same under an ENABLED keystore makes the
// daemon not ready, naming the cluster, and the metric says FAILED; disabling it (which needs
// no HSM) makes the daemon ready again.
func TestTokenReinitialisedUnderEnabledKeystore(t *testing.T) {
	env := newEnv(t, "c1", "c2")
	base, stop := startDaemon(t, env)
	id := mustCreate(t, base, env, env.Tokens[0], "ks-1")
	lcMustChange(t, base, env, id, "enable")
	other := mustCreate(t, base, env, env.Tokens[1], "ks-2")
	lcMustChange(t, base, env, other, "enable")
	stop()
	lcSwapToken(t, env, 0)

	base, _ = startDaemon(t, env)
	r := lcReadyz(t, base, http.StatusServiceUnavailable)
	if c := r.Clusters["c1"]; r.Status != "not ready" || !c.KeystoreEnabled ||
		c.ConnectionState != "FAILED" || c.ConnectionErrorCode != "TOKEN_MISMATCH" {
		t.Errorf("/readyz %+v, want not ready with c1 = keystore %s, enabled, FAILED/TOKEN_MISMATCH", r, id)
	}
	if c := r.Clusters["c2"]; c.ConnectionState != "CONNECTED" || c.ConnectionErrorCode != "" {
		t.Errorf("/readyz c2 %+v, want keystore %s CONNECTED", c, other)
	}
	lcWantConnectionMetric(t, base, "c1", "FAILED")
	lcWantConnectionMetric(t, base, "c2", "CONNECTED")
	lcWantShown(t, base, env, id, "ENABLED", "FAILED", "TOKEN_MISMATCH")

	lcMustChange(t, base, env, id, "disable")
	st, hdr, body := lcChange(t, base, env, id, "enable")
	wantError(t, st, hdr, body, 400, "KMS.8004")
	lcWantShown(t, base, env, id, "DISABLED", "FAILED", "TOKEN_MISMATCH")
	lcReadyz(t, base, http.StatusOK)
}

// TestTokenMarkerRemoved: the same token, but the keystore's marker gone from it (as if the
// token were cleaned by hand), is found at start-up and refused on enable.
func TestTokenMarkerRemoved(t *testing.T) {
	env := newEnv(t, "c1")
	tok := env.Tokens[0]
	base, stop := startDaemon(t, env)
	id := mustCreate(t, base, env, tok, "ks-1")
	stop()
	withToken(t, env, tok, func(ctx context.Context, cl *hsm.Cluster) {
		if err := cl.DestroyData(ctx, "keystore:"+id); err != nil {
			t.Fatal(err)
		}
	})

	base, _ = startDaemon(t, env)
	lcWantShown(t, base, env, id, "DISABLED", "FAILED", "TOKEN_MISMATCH")
	st, hdr, body := lcChange(t, base, env, id, "enable")
	wantError(t, st, hdr, body, 400, "KMS.8004", "marker")
	lcWantShown(t, base, env, id, "DISABLED", "FAILED", "TOKEN_MISMATCH")
	lcWantConnectionMetric(t, base, "c1", "FAILED")
}

// TestKeystoreDeleteCrashRepair: a delete cut short is finished at start-up, at either point
// it can be cut: a row left DELETING (with its marker), or the row gone and the marker left.
// Either way the cluster binds again, and nothing of the old keystore remains.
func TestKeystoreDeleteCrashRepair(t *testing.T) {
	env := newEnv(t, "c1", "c2")
	base, stop := startDaemon(t, env)
	deleting := mustCreate(t, base, env, env.Tokens[0], "ks-1")
	markerOnly := mustCreate(t, base, env, env.Tokens[1], "ks-2")
	stop()

	ctx := context.Background()
	st, err := store.OpenSQLite(ctx, filepath.Join(env.Dir, "hsmbridge.db"))
	if err != nil {
		t.Fatal(err)
	}
	if err := st.SetKeystoreState(ctx, deleting, store.StateDisabled, store.StateDeleting, time.Now()); err != nil {
		t.Fatal(err)
	}
	if err := st.DeleteKeystore(ctx, markerOnly); err != nil {
		t.Fatal(err)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	for i, id := range []string{deleting, markerOnly} {
		if ms := markers(t, env, env.Tokens[i]); ms[id] == nil {
			t.Fatalf("setup: token %s has markers %v, want %s", env.Tokens[i].Label, ms, id)
		}
	}

	base, stop, logs := startDaemonLogs(t, env)
	lcWantGone(t, base, env, deleting)
	lcWantGone(t, base, env, markerOnly)
	if total, _ := lcList(t, base, env, ""); total != 0 {
		t.Errorf("list total %d after repair, want 0", total)
	}
	again := []string{mustCreate(t, base, env, env.Tokens[0], "ks-1"), mustCreate(t, base, env, env.Tokens[1], "ks-2")}
	stop()

	if n := strings.Count(logs.String(), "repair: "); n != 2 {
		t.Errorf("%d repairs logged, want 2:\n%s", n, logs)
	}
	rows := storeRows(t, env)
	if len(rows) != 2 {
		t.Errorf("store rows %+v, want only the 2 new keystores", rows)
	}
	for i, id := range again {
		if ms := markers(t, env, env.Tokens[i]); len(ms) != 1 || ms[id] == nil {
			t.Errorf("token %s markers %v, want only the new keystore %s", env.Tokens[i].Label, ms, id)
		}
	}
}

// TestReadyWithEnabledKeystore: ready with no keystores, and with an enabled keystore whose
// cluster is connected; the metric reports it CONNECTED; an unbound cluster has no series.
func TestReadyWithEnabledKeystore(t *testing.T) {
	env := newEnv(t, "c1", "c2")
	base, _ := startDaemon(t, env)
	if r := lcReadyz(t, base, http.StatusOK); r.Status != "ready" || len(r.Clusters) != 0 {
		t.Errorf("/readyz with no keystores %+v, want ready and no clusters", r)
	}
	id := mustCreate(t, base, env, env.Tokens[0], "ks-1")
	lcMustChange(t, base, env, id, "enable")
	r := lcReadyz(t, base, http.StatusOK)
	if c := r.Clusters["c1"]; r.Status != "ready" || len(r.Clusters) != 1 || !c.KeystoreEnabled ||
		c.ConnectionState != "CONNECTED" || c.ConnectionErrorCode != "" {
		t.Errorf("/readyz %+v, want ready, c1 = keystore %s enabled CONNECTED", r, id)
	}
	lcWantConnectionMetric(t, base, "c1", "CONNECTED")
	if v, ok := lcMetric(t, base, `hsmbridge_keystore_connection_state{cluster="c2",state="CONNECTED"}`); ok {
		t.Errorf("the unbound cluster c2 has a connection series (%s)", v)
	}

	lcMustChange(t, base, env, id, "disable")
	lcMustDelete(t, base, env, id)
	if r := lcReadyz(t, base, http.StatusOK); len(r.Clusters) != 0 {
		t.Errorf("/readyz after delete %+v, want no clusters", r)
	}
	if v, ok := lcMetric(t, base, `hsmbridge_keystore_connection_state{cluster="c1",state="CONNECTED"}`); ok {
		t.Errorf("the deleted keystore's cluster still has a connection series (%s)", v)
	}
}

// TestKeystoreLifecycleAudit: every lifecycle call, whatever its outcome, writes exactly one
// audit line naming the caller, the project, the keystore, the route, the result and the code.
func TestKeystoreLifecycleAudit(t *testing.T) {
	env := newEnv(t, "c1")
	base, stop, logs := startDaemonLogs(t, env)
	st, hdr, body := create(t, base, env, goodFields(env, env.Tokens[0], "ks-1"))
	id := wantCreated(t, env, st, hdr, body)

	const (
		routeKeystores = "GET /v1.0/{project_id}/keystores"
		routeShow      = "GET /v1.0/{project_id}/keystores/{keystore_id}"
		routeDelete    = "DELETE /v1.0/{project_id}/keystores/{keystore_id}"
		routeEnable    = "POST /v1.0/{project_id}/keystores/{keystore_id}/enable"
		routeDisable   = "POST /v1.0/{project_id}/keystores/{keystore_id}/disable"
	)
	type call struct {
		method, url, route, keystore, code string
		hdr                                http.Header
	}
	calls := []call{
		{http.MethodPost, "", "POST /v1.0/{project_id}/keystores", id, "", hdr},
		{http.MethodGet, lcURL(base, env, id, ""), routeShow, id, "", nil},
		{http.MethodGet, lcURL(base, env, "", "?limit=5"), routeKeystores, "", "", nil},
		{http.MethodGet, lcURL(base, env, "", "?limit=0"), routeKeystores, "", "KMS.1601", nil},
		{http.MethodPost, lcURL(base, env, id, "/enable"), routeEnable, id, "", nil},
		{http.MethodPost, lcURL(base, env, id, "/enable"), routeEnable, id, "KMS.8008", nil},
		{http.MethodDelete, lcURL(base, env, id, ""), routeDelete, id, "KMS.8008", nil},
		{http.MethodPost, lcURL(base, env, id, "/disable"), routeDisable, id, "", nil},
		{http.MethodPost, lcURL(base, env, id, "/disable"), routeDisable, id, "KMS.8008", nil},
		{http.MethodDelete, lcURL(base, env, id, ""), routeDelete, id, "", nil},
		{http.MethodGet, lcURL(base, env, id, ""), routeShow, id, "KMS.8003", nil},
		{http.MethodPost, lcURL(base, env, "bad-id", "/enable"), routeEnable, "bad-id", "KMS.8001", nil},
	}
	for i := range calls {
		if calls[i].hdr == nil {
			_, calls[i].hdr, _ = do(t, calls[i].method, calls[i].url, env.AuthToken, "")
		}
	}
	stop()

	byRequest := map[string][]map[string]any{}
	audits := 0
	sc := bufio.NewScanner(strings.NewReader(logs.String()))
	for sc.Scan() {
		var line map[string]any
		if err := json.Unmarshal(sc.Bytes(), &line); err != nil {
			t.Fatalf("log line %q is not JSON: %v", sc.Text(), err)
		}
		if line["msg"] == "audit" {
			audits++
			id := fmt.Sprint(line["request_id"])
			byRequest[id] = append(byRequest[id], line)
		}
	}
	if audits != len(calls) {
		t.Errorf("%d audit lines for %d calls", audits, len(calls))
	}
	for _, c := range calls {
		name := c.route + " " + c.code
		lines := byRequest[c.hdr.Get("X-Request-Id")]
		if len(lines) != 1 {
			t.Errorf("%s: %d audit lines for request %s, want 1", name, len(lines), c.hdr.Get("X-Request-Id"))
			continue
		}
		line := lines[0]
		result := "ok"
		if c.code != "" {
			result = "error"
		}
		for k, v := range map[string]any{"route": c.route, "who": "dev", "domain": env.DomainID, "project": env.ProjectID,
			"keystore": c.keystore, "result": result, "error_code": c.code} {
			if line[k] != v {
				t.Errorf("%s: audit %s = %v, want %v (line %v)", name, k, line[k], v, line)
			}
		}
		if _, ok := line["latency_ms"].(float64); !ok {
			t.Errorf("%s: audit line has no numeric latency_ms: %v", name, line)
		}
	}
}

// TestKeystoreClusterRemovedFromConfig: a keystore whose cluster is no longer configured
// shows FAILED/CLUSTER_NOT_FOUND, cannot be enabled, and can still be disabled and deleted;
// when the cluster is configured again, start-up removes the marker the delete had to leave,
// and the cluster binds again.
func TestKeystoreClusterRemovedFromConfig(t *testing.T) {
	env := newEnv(t, "c1", "c2")
	base, stop := startDaemon(t, env)
	id := mustCreate(t, base, env, env.Tokens[1], "ks-1")
	lcMustChange(t, base, env, id, "enable")
	stop()
	removed := env.Tokens[1]
	env.Tokens = env.Tokens[:1]
	if err := env.WriteConfig(); err != nil {
		t.Fatal(err)
	}

	base, stop = startDaemon(t, env)
	lcWantShown(t, base, env, id, "ENABLED", "FAILED", "CLUSTER_NOT_FOUND")
	if r := lcReadyz(t, base, http.StatusServiceUnavailable); r.Clusters["c2"].ConnectionErrorCode != "CLUSTER_NOT_FOUND" {
		t.Errorf("/readyz %+v, want c2 FAILED/CLUSTER_NOT_FOUND", r)
	}
	lcWantConnectionMetric(t, base, "c2", "FAILED")
	lcMustChange(t, base, env, id, "disable")
	st, hdr, body := lcChange(t, base, env, id, "enable")
	wantError(t, st, hdr, body, 400, "KMS.8004", "c2")
	lcWantShown(t, base, env, id, "DISABLED", "FAILED", "CLUSTER_NOT_FOUND")
	lcReadyz(t, base, http.StatusOK)
	lcMustDelete(t, base, env, id)
	lcWantGone(t, base, env, id)
	stop()
	if rows := storeRows(t, env); len(rows) != 0 {
		t.Errorf("store rows %+v after delete, want none", rows)
	}

	env.Tokens = append(env.Tokens, removed)
	if err := env.WriteConfig(); err != nil {
		t.Fatal(err)
	}
	base, stop, logs := startDaemonLogs(t, env)
	again := mustCreate(t, base, env, removed, "ks-1")
	stop()
	if !strings.Contains(logs.String(), "repair: removed a keystore marker with no store row") {
		t.Errorf("start-up did not remove the marker the delete left:\n%s", logs)
	}
	if ms := markers(t, env, removed); len(ms) != 1 || ms[again] == nil {
		t.Errorf("token %s markers %v, want only the new keystore %s", removed.Label, ms, again)
	}
}

// TestKeystoreDeleteRepairKeepsKeys: a row left DELETING while keys still name it (a
// create-key racing the delete: it passed its ENABLED check before the disable, and wrote its
// row after delete's CountKeys) must not stop the daemon from starting, and must not lose the
// keystore its keys live in: start-up puts it back to DISABLED, where delete refuses it.
func TestKeystoreDeleteRepairKeepsKeys(t *testing.T) {
	env := newEnv(t, "c1", "c2")
	base, stop := startDaemon(t, env)
	id := mustCreate(t, base, env, env.Tokens[0], "ks-1")
	lcMustChange(t, base, env, id, "enable")
	st, _, body := do(t, http.MethodPost, base+"/v1.0/"+env.ProjectID+"/kms/create-key", env.AuthToken,
		mustJSON(t, map[string]string{"key_alias": "k-1", "key_spec": "AES_256", "keystore_id": id}))
	if st != http.StatusOK {
		t.Fatalf("create-key: status %d; body %s", st, body)
	}
	lcMustChange(t, base, env, id, "disable")
	stop()

	ctx := context.Background()
	s, err := store.OpenSQLite(ctx, filepath.Join(env.Dir, "hsmbridge.db"))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.SetKeystoreState(ctx, id, store.StateDisabled, store.StateDeleting, time.Now()); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	base, _ = startDaemon(t, env) // fails the test if start-up repair fails
	mustCreate(t, base, env, env.Tokens[1], "ks-2")
	lcWantShown(t, base, env, id, "DISABLED", "CONNECTED", "")
	st, hdr, body := lcDelete(t, base, env, id)
	wantError(t, st, hdr, body, 400, "KMS.8008", "key")
}
