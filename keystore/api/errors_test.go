package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/hsmbridge/hsmbridge/keystore"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/wire")

// wireDir holds the golden wire bodies, at the repository root.
const wireDir = "../../testdata/wire"

var codeRE = regexp.MustCompile(`^KMS\.\d{4}$`)

// TestKindTableComplete: every Kind the domain can fail with has a row on the wire, and
// the row is a real error answer.
func TestKindTableComplete(t *testing.T) {
	for _, k := range keystore.Kinds() {
		row, ok := kindErrors[k]
		switch {
		case !ok:
			t.Errorf("keystore.Kind %d has no row in kindErrors", k)
		case !codeRE.MatchString(row.Code):
			t.Errorf("keystore.Kind %d: code %q is not KMS.dddd", k, row.Code)
		case row.Status < 400 || row.Status > 599:
			t.Errorf("keystore.Kind %d (%s): status %d is not an error status", k, row.Code, row.Status)
		case row.Msg == "":
			t.Errorf("keystore.Kind %d (%s): no default message", k, row.Code)
		}
	}
	if len(kindErrors) != len(keystore.Kinds()) {
		t.Errorf("kindErrors has %d rows for %d kinds: a row for a Kind that does not exist", len(kindErrors), len(keystore.Kinds()))
	}
}

// A cause that must never reach the caller of a 5xx.
const secretCause = "SQLITE_IOERR at /var/lib/hsmbridge/hsmbridge.db; CKR_DEVICE_ERROR on slot 1559241 token serial 6d3c9a1f"

// wireCases are rendered by writeError and compared with testdata/wire/<name>.json.
var wireCases = []struct {
	name string
	err  error
}{
	{"missing_parameter", &keystore.Error{Kind: keystore.KindMissingParameter, Msg: "keystore_alias is required"}},
	{"invalid_parameter", &keystore.Error{Kind: keystore.KindInvalidParameter, Msg: "keystore_alias must match ^[a-zA-Z0-9:/_-]{1,255}$"}},
	{"duplicate_alias", &keystore.Error{Kind: keystore.KindDuplicateAlias, Msg: `keystore alias "ks-1" already exists`}},
	{"cluster_unknown", &keystore.Error{Kind: keystore.KindClusterUnknown, Msg: `HSM cluster "dhsm-x" does not exist`}},
	{"cluster_bound", &keystore.Error{Kind: keystore.KindClusterBound, Msg: `HSM cluster "dhsm-cluster-1" is already bound to a keystore`}},
	{"ca_certificate_with_cause", &keystore.Error{Kind: keystore.KindCACertificate,
		Msg: "hsm_ca_cert did not issue this cluster's identity certificate", Err: errors.New("x509: " + secretCause)}},
	{"unsupported_type", &keystore.Error{Kind: keystore.KindUnsupportedType, Msg: "keystore_type DEFAULT is not supported"}},
	{"no_message_uses_row", &keystore.Error{Kind: keystore.KindKeystoreNotFound}},
	{"wrapped_domain_error", fmt.Errorf("handler: %w", &keystore.Error{Kind: keystore.KindDuplicateAlias, Msg: `keystore alias "ks-1" already exists`})},
	{"internal_with_cause", &keystore.Error{Kind: keystore.KindInternal, Msg: "create keystore: store failed", Err: errors.New(secretCause)}},
	{"internal_no_message", &keystore.Error{Kind: keystore.KindInternal, Err: errors.New(secretCause)}},
	{"hsm_unavailable", &keystore.Error{Kind: keystore.KindHSMUnavailable, Msg: "prove the cluster's identity: the HSM cluster is unavailable", Err: errors.New(secretCause)}},
	{"hsm_timeout", &keystore.Error{Kind: keystore.KindHSMTimeout, Msg: "write the keystore marker on the token: the HSM cluster did not answer in time", Err: fmt.Errorf("%s: %w", secretCause, context.DeadlineExceeded)}},
	{"plain_error", errors.New(secretCause)},
	{"malformed_json", errMalformedJSON},
	{"malformed_json_detail", errMalformedJSON.with("request body is empty; a JSON object is required")},
	{"body_too_large", errBodyTooLarge.with("request body exceeds 64 KiB")},
	{"unknown_route", errUnknownRoute},
	{"method", errMethod},
	{"project_denied", errProjectDenied},
	{"auth_missing", &authError{"x-auth-token not found"}},
	{"auth_rejected", fmt.Errorf("authenticate: %w", &authError{"the token is not valid"})},
}

const goldenRequestID = "0123456789abcdef0123456789abcdef"

// render answers err as a request with a fixed request id would be answered.
func render(t *testing.T, err error) (*httptest.ResponseRecorder, string) {
	t.Helper()
	var logs bytes.Buffer
	log := slog.New(slog.NewJSONHandler(&logs, nil))
	r := httptest.NewRequest(http.MethodPost, "/v1.0/0123456789abcdef0123456789abcdef/keystores", nil)
	r = r.WithContext(context.WithValue(r.Context(), requestIDKey{}, goldenRequestID))
	w := httptest.NewRecorder()
	writeError(w, r, log, err)
	return w, logs.String()
}

// golden is the file form: the status, then the body exactly as sent (less its newline).
func golden(status int, body []byte) []byte {
	return fmt.Appendf(nil, "{\n  \"status\": %d,\n  \"body\": %s\n}\n", status, bytes.TrimSuffix(body, []byte("\n")))
}

func TestWireGolden(t *testing.T) {
	if *update {
		if err := os.MkdirAll(wireDir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range wireCases {
		t.Run(c.name, func(t *testing.T) {
			w, _ := render(t, c.err)
			got := golden(w.Code, w.Body.Bytes())
			path := filepath.Join(wireDir, c.name+".json")
			if *update {
				if err := os.WriteFile(path, got, 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run go test ./keystore/api -run TestWireGolden -update to write it)", err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("%s differs from the golden file (rerun with -update if the change is meant):\n got %s\nwant %s", path, got, want)
			}
			// The golden file is itself valid JSON, so it reads as a fixture too.
			var g struct {
				Status int             `json:"status"`
				Body   json.RawMessage `json:"body"`
			}
			if err := json.Unmarshal(want, &g); err != nil {
				t.Errorf("%s is not JSON: %v", path, err)
			}
		})
	}
}

// TestWireShape checks every rendered error against the rules the official SDK needs:
// JSON, a status ≥ 400, both error_code and error_msg non-empty; the gateway's flat shape
// (with the request id) for authentication failures, {"error":{...}} for everything else.
func TestWireShape(t *testing.T) {
	for _, c := range wireCases {
		t.Run(c.name, func(t *testing.T) {
			w, _ := render(t, c.err)
			if w.Code < 400 {
				t.Errorf("status %d", w.Code)
			}
			if ct := w.Header().Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
				t.Errorf("Content-Type %q", ct)
			}
			var flat map[string]any
			if err := json.Unmarshal(w.Body.Bytes(), &flat); err != nil {
				t.Fatalf("body %s: %v", w.Body, err)
			}
			fields := flat
			if _, isAuth := errors.AsType[*authError](c.err); isAuth {
				if w.Code != http.StatusUnauthorized || flat["request_id"] != goldenRequestID || len(flat) != 3 {
					t.Errorf("auth failure: status %d body %s, want 401 and the flat body with request_id", w.Code, w.Body)
				}
			} else {
				inner, ok := flat["error"].(map[string]any)
				if !ok || len(flat) != 1 || len(inner) != 2 {
					t.Fatalf("body %s, want exactly {\"error\":{\"error_code\",\"error_msg\"}}", w.Body)
				}
				fields = inner
			}
			for _, k := range []string{"error_code", "error_msg"} {
				if s, _ := fields[k].(string); s == "" {
					t.Errorf("%s empty or missing in %s", k, w.Body)
				}
			}
		})
	}
}

// TestCauseNeverOnTheWire: the cause of a failure (Err) is for the log; a 5xx answers with
// the safe message only and logs the cause with the request id, so the two can be joined.
func TestCauseNeverOnTheWire(t *testing.T) {
	for _, c := range wireCases {
		t.Run(c.name, func(t *testing.T) {
			w, logs := render(t, c.err)
			if strings.Contains(w.Body.String(), secretCause) || strings.Contains(w.Body.String(), "CKR_") || strings.Contains(w.Body.String(), "SQLITE") {
				t.Errorf("the cause reached the caller: %s", w.Body)
			}
			if w.Code >= 500 {
				if !strings.Contains(logs, goldenRequestID) || !strings.Contains(logs, secretCause) {
					t.Errorf("a %d must log its cause with the request id; log: %s", w.Code, logs)
				}
			}
		})
	}
}

// TestUnknownKindIsInternal: a Kind with no row (a bug) is answered as an internal error.
func TestUnknownKindIsInternal(t *testing.T) {
	w, _ := render(t, &keystore.Error{Kind: keystore.Kind(1 << 20), Msg: "something new", Err: errors.New(secretCause)})
	if w.Code != http.StatusInternalServerError || !strings.Contains(w.Body.String(), `"KMS.0101"`) {
		t.Errorf("status %d body %s, want 500 KMS.0101", w.Code, w.Body)
	}
	if strings.Contains(w.Body.String(), secretCause) {
		t.Errorf("the cause reached the caller: %s", w.Body)
	}
}
