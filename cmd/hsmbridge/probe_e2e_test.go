package main

import (
	"io"
	"net/http"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestHealthProbeRunsWithoutTraffic: with health_probe set, the daemon signs with each
// cluster's identity key on its own, which /metrics shows as C_Sign calls nobody asked for.
func TestHealthProbeRunsWithoutTraffic(t *testing.T) {
	env := newEnv(t, "c1")
	data, err := os.ReadFile(env.ConfigPath)
	if err != nil {
		t.Fatal(err)
	}
	text := strings.Replace(string(data), "    pool_size: 4\n", "    pool_size: 4\n    health_probe: 20ms\n", 1)
	if err := os.WriteFile(env.ConfigPath, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	base, stop := startDaemon(t, env)
	defer stop()
	signs := regexp.MustCompile(`hsmbridge_hsm_call_duration_seconds_count\{cluster="c1",function="C_Sign",result="ok"\} (\d+)`)
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := http.Get(base + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if m := signs.FindSubmatch(body); m != nil {
			if n, _ := strconv.Atoi(string(m[1])); n >= 3 {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no background identity proofs within 10s; metrics:\n%s", signs.Find(body))
		}
		time.Sleep(20 * time.Millisecond) // polling for a state, bounded by the deadline
	}
}

// TestTokenFileFailuresCounted: refusals of the static token file are counted like those of
// the other schemes, by reason.
func TestTokenFileFailuresCounted(t *testing.T) {
	env := newEnv(t, "c1")
	base, stop := startDaemon(t, env)
	defer stop()
	url := base + "/v1.0/" + env.ProjectID + "/keystores"
	do(t, http.MethodGet, url, "", "")
	do(t, http.MethodGet, url, "not-a-known-token", "")
	do(t, http.MethodGet, url, "not-a-known-token", "")
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for series, want := range map[string]string{
		`hsmbridge_auth_failures_total{reason="missing",scheme="token"}`:       "1",
		`hsmbridge_auth_failures_total{reason="unknown_token",scheme="token"}`: "2",
	} {
		m := regexp.MustCompile(regexp.QuoteMeta(series) + ` (\d+)`).FindSubmatch(body)
		if m == nil || string(m[1]) != want {
			t.Errorf("%s = %q, want %s", series, m, want)
		}
	}
}
