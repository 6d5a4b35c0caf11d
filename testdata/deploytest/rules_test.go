package deploytest

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

// anchor is GitHub's anchor for a Markdown heading: lower case, punctuation dropped,
// spaces to hyphens.
func anchor(heading string) string {
	h := strings.ToLower(strings.TrimSpace(heading))
	h = regexp.MustCompile(`[^a-z0-9 _-]`).ReplaceAllString(h, "")
	return strings.ReplaceAll(h, " ", "-")
}

// TestRules_alertsHaveRunbooks checks that every alert has a summary, a description and a
// runbook annotation pointing at a section of deploy/README.md that exists, and that every
// alert has a promtool test case.
func TestRules_alertsHaveRunbooks(t *testing.T) {
	readme, err := os.ReadFile(filepath.Join(deployDir, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	anchors := map[string]bool{}
	for line := range strings.Lines(string(readme)) {
		if h, ok := strings.CutPrefix(line, "#"); ok {
			anchors[anchor(strings.TrimLeft(h, "#"))] = true
		}
	}
	data, err := os.ReadFile(filepath.Join(deployDir, "prometheus", "hsmbridge-rules.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var rf struct {
		Groups []struct {
			Rules []struct {
				Alert       string            `json:"alert"`
				Annotations map[string]string `json:"annotations"`
			} `json:"rules"`
		} `json:"groups"`
	}
	if err := yaml.Unmarshal(data, &rf); err != nil {
		t.Fatal(err)
	}
	testData, err := os.ReadFile(filepath.Join(deployDir, "prometheus", "hsmbridge-rules_test.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var tf struct {
		Tests []struct {
			AlertRuleTest []struct {
				Alertname string `json:"alertname"`
				ExpAlerts []any  `json:"exp_alerts"`
			} `json:"alert_rule_test"`
		} `json:"tests"`
	}
	if err := yaml.Unmarshal(testData, &tf); err != nil {
		t.Fatal(err)
	}
	fires, quiet := map[string]bool{}, map[string]bool{}
	for _, tc := range tf.Tests {
		for _, a := range tc.AlertRuleTest {
			if len(a.ExpAlerts) > 0 {
				fires[a.Alertname] = true
			} else {
				quiet[a.Alertname] = true
			}
		}
	}
	n := 0
	for _, g := range rf.Groups {
		for _, r := range g.Rules {
			if r.Alert == "" {
				continue
			}
			n++
			for _, k := range []string{"summary", "description", "runbook"} {
				if r.Annotations[k] == "" {
					t.Errorf("alert %s: no %s annotation", r.Alert, k)
				}
			}
			rb := r.Annotations["runbook"]
			file, frag, _ := strings.Cut(rb, "#")
			if file != "deploy/README.md" || !anchors[frag] {
				t.Errorf("alert %s: runbook %q is not a section of deploy/README.md", r.Alert, rb)
			}
			if !fires[r.Alert] || !quiet[r.Alert] {
				t.Errorf("alert %s: hsmbridge-rules_test.yaml needs a case where it fires and one where it does not (fires %v, quiet %v)",
					r.Alert, fires[r.Alert], quiet[r.Alert])
			}
		}
	}
	if n == 0 {
		t.Fatal("no alerts found")
	}
}
