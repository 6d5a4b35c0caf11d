package deploytest

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

// An expression as the dashboard or a rule file has it, and where it is.
type expression struct {
	where string // file and panel / rule
	expr  string
}

// dashboardExprs returns every PromQL query of deploy/grafana/*.json: panel targets' expr
// and template variables' queries (label_values(...) included).
func dashboardExprs(t *testing.T) []expression {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(deployDir, "grafana", "*.json"))
	if len(files) == 0 {
		t.Fatal("no deploy/grafana/*.json")
	}
	var out []expression
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var v any
		if err := json.Unmarshal(data, &v); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		var walk func(v any, where string)
		walk = func(v any, where string) {
			switch x := v.(type) {
			case map[string]any:
				if title, ok := x["title"].(string); ok {
					where = filepath.Base(f) + ": " + title
				} else if name, ok := x["name"].(string); ok {
					where = filepath.Base(f) + ": $" + name
				}
				for k, e := range x {
					if s, ok := e.(string); ok && (k == "expr" || k == "query" || k == "definition") {
						out = append(out, expression{where, s})
						continue
					}
					walk(e, where)
				}
			case []any:
				for _, e := range x {
					walk(e, where)
				}
			}
		}
		walk(v, filepath.Base(f))
	}
	return out
}

// ruleExprs returns every rule's expr in deploy/prometheus/*rules.yaml (not the tests).
func ruleExprs(t *testing.T) []expression {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(deployDir, "prometheus", "*rules.yaml"))
	if len(files) == 0 {
		t.Fatal("no deploy/prometheus/*rules.yaml")
	}
	var out []expression
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var rf struct {
			Groups []struct {
				Name  string `json:"name"`
				Rules []struct {
					Record string `json:"record"`
					Alert  string `json:"alert"`
					Expr   string `json:"expr"`
				} `json:"rules"`
			} `json:"groups"`
		}
		if err := yaml.Unmarshal(data, &rf); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		for _, g := range rf.Groups {
			for _, r := range g.Rules {
				out = append(out, expression{filepath.Base(f) + ": " + r.Record + r.Alert, r.Expr})
			}
		}
	}
	return out
}

var (
	// A metric-name-like token; names with a colon are recording-rule outputs.
	nameToken = regexp.MustCompile(`[a-zA-Z_:][a-zA-Z0-9_:]*`)
	// A selector: name{matchers}. Label values may hold braces (route patterns), so the
	// matcher list is read as label op "quoted string" pairs.
	selector = regexp.MustCompile(`(hsmbridge_[a-z_]+)\{((?:\s*[a-zA-Z_][a-zA-Z0-9_]*\s*(?:=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"\s*,?)*)\}`)
	matcher  = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"`)
	// Label lists of by/without/on/ignoring/group_left/group_right, and label_values' label.
	grouping    = regexp.MustCompile(`\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)`)
	labelValues = regexp.MustCompile(`label_values\(\s*(hsmbridge_[a-z_]+)[^,]*,\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)`)
	// Strings in an expression, blanked before looking for names in it.
	quoted = regexp.MustCompile(`"(?:[^"\\]|\\.)*"`)
)

// metricUse is one metric name an expression reads, with the labels it filters on.
type metricUse struct {
	name   string // as written: a family or a histogram's _bucket/_count/_sum series
	labels []string
	where  string
}

// usedMetrics returns every hsmbridge_ metric the expressions name (recording-rule
// outputs, which contain colons, excepted) and, per expression, the grouping labels.
func usedMetrics(exprs []expression) (uses []metricUse, groupings []metricUse) {
	for _, e := range exprs {
		bare := quoted.ReplaceAllString(e.expr, `""`)
		var names []string
		for _, tok := range nameToken.FindAllString(bare, -1) {
			if strings.HasPrefix(tok, "hsmbridge_") && !strings.Contains(tok, ":") {
				names = append(names, tok)
			}
		}
		seen := map[string]bool{}
		for _, sel := range selector.FindAllStringSubmatch(e.expr, -1) {
			var ls []string
			for _, m := range matcher.FindAllStringSubmatch(sel[2], -1) {
				ls = append(ls, m[1])
			}
			uses = append(uses, metricUse{sel[1], ls, e.where})
			seen[sel[1]] = true
		}
		for _, n := range names {
			if !seen[n] {
				uses = append(uses, metricUse{n, nil, e.where})
				seen[n] = true
			}
		}
		var gl []string
		for _, g := range grouping.FindAllStringSubmatch(bare, -1) {
			for l := range strings.SplitSeq(g[1], ",") {
				if l = strings.TrimSpace(l); l != "" {
					gl = append(gl, l)
				}
			}
		}
		for _, lv := range labelValues.FindAllStringSubmatch(e.expr, -1) {
			uses = append(uses, metricUse{lv[1], []string{lv[2]}, e.where})
		}
		if len(gl) > 0 && len(names) > 0 {
			groupings = append(groupings, metricUse{strings.Join(names, " "), gl, e.where})
		}
	}
	return uses, groupings
}

// TestMetrics_extracted guards the extraction itself: if the regexes stopped matching,
// the daemon test below would pass on nothing.
func TestMetrics_extracted(t *testing.T) {
	for _, src := range []struct {
		name  string
		exprs []expression
		want  []string
	}{
		{"dashboard", dashboardExprs(t), []string{
			"hsmbridge_pool_sessions", "hsmbridge_pool_max_sessions", "hsmbridge_pool_waiters",
			"hsmbridge_pool_acquire_wait_seconds_bucket", "hsmbridge_hsm_call_duration_seconds_bucket",
			"hsmbridge_http_request_duration_seconds_count", "hsmbridge_keystore_connection_state",
		}},
		{"rules", ruleExprs(t), []string{
			"hsmbridge_pool_sessions", "hsmbridge_pool_waiters", "hsmbridge_pool_acquire_wait_seconds_bucket",
			"hsmbridge_keystore_connection_state", "hsmbridge_hsm_call_duration_seconds_count",
			"hsmbridge_http_request_duration_seconds_bucket",
		}},
	} {
		uses, _ := usedMetrics(src.exprs)
		var got []string
		for _, u := range uses {
			got = append(got, u.name)
		}
		for _, w := range src.want {
			if !slices.Contains(got, w) {
				t.Errorf("%s: %s not found among the metrics extracted (%v)", src.name, w, got)
			}
		}
		for _, u := range uses {
			if strings.Contains(u.name, ":") {
				t.Errorf("%s: recording-rule output %s extracted as a metric", src.name, u.name)
			}
		}
	}
}

// scraped is one /metrics scrape: family name → type, and the label names seen on each
// family's samples.
type scraped struct {
	types  map[string]string
	labels map[string]map[string]bool
}

func parseExposition(text string) (*scraped, error) {
	s := &scraped{types: map[string]string{}, labels: map[string]map[string]bool{}}
	for line := range strings.Lines(text) {
		line = strings.TrimSpace(line)
		if f, ok := strings.CutPrefix(line, "# TYPE "); ok {
			parts := strings.Fields(f)
			if len(parts) != 2 {
				return nil, fmt.Errorf("bad TYPE line %q", line)
			}
			s.types[parts[0]] = parts[1]
			continue
		}
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		name, rest, _ := strings.Cut(line, "{")
		if i := strings.IndexAny(name, " \t"); i >= 0 {
			name, rest = name[:i], ""
		}
		fam := s.family(name)
		if s.labels[fam] == nil {
			s.labels[fam] = map[string]bool{}
		}
		for _, m := range matcher.FindAllStringSubmatch(labelPart(rest), -1) {
			s.labels[fam][m[1]] = true
		}
	}
	return s, nil
}

// labelPart returns the label list at the start of rest (what follows "{"), up to the
// closing brace outside quotes.
func labelPart(rest string) string {
	inQuote, esc := false, false
	for i, r := range rest {
		switch {
		case esc:
			esc = false
		case r == '\\':
			esc = true
		case r == '"':
			inQuote = !inQuote
		case r == '}' && !inQuote:
			return rest[:i]
		}
	}
	return rest
}

// family maps a series name to its family: a histogram's or summary's _bucket, _count
// and _sum series belong to the family without the suffix.
func (s *scraped) family(name string) string {
	if _, ok := s.types[name]; ok {
		return name
	}
	for _, suf := range []string{"_bucket", "_count", "_sum"} {
		if base, ok := strings.CutSuffix(name, suf); ok {
			if typ := s.types[base]; typ == "histogram" || (typ == "summary" && suf != "_bucket") {
				return base
			}
		}
	}
	return name
}

// Labels Prometheus attaches at scrape time, and le on buckets.
var targetLabels = []string{"job", "instance", "namespace", "pod", "service", "endpoint", "container"}

// TestMetrics_existOnRunningDaemon scrapes a daemon that has served a keystore, a key and
// a signature (so every labelled series exists) and fails for any metric, or any label it
// is filtered or grouped on, that the dashboard or the rules name and the daemon does
// not export.
func TestMetrics_existOnRunningDaemon(t *testing.T) {
	d := startDaemon(t)
	d.exercise(t)
	s, err := parseExposition(d.scrape(t))
	if err != nil {
		t.Fatal(err)
	}
	uses, groupings := usedMetrics(slices.Concat(dashboardExprs(t), ruleExprs(t)))
	missing := map[string][]string{}
	for _, u := range uses {
		fam := s.family(u.name)
		if _, ok := s.types[fam]; !ok {
			missing[u.name] = append(missing[u.name], u.where)
			continue
		}
		for _, l := range u.labels {
			if s.labels[fam][l] || slices.Contains(targetLabels, l) || (l == "le" && strings.HasSuffix(u.name, "_bucket")) {
				continue
			}
			t.Errorf("%s: %s has no label %q (it has %v)", u.where, u.name, l, keys(s.labels[fam]))
		}
	}
	for _, g := range groupings {
		have := map[string]bool{}
		for n := range strings.FieldsSeq(g.name) {
			for l := range s.labels[s.family(n)] {
				have[l] = true
			}
		}
		for _, l := range g.labels {
			if !have[l] && !slices.Contains(targetLabels, l) && l != "le" {
				t.Errorf("%s: groups on label %q, which none of %s has", g.where, l, g.name)
			}
		}
	}
	names := keys(missing)
	for _, n := range names {
		t.Errorf("metric %s is not exported by the daemon; used in:\n\t%s", n, strings.Join(missing[n], "\n\t"))
	}
	if len(uses) < 10 {
		t.Errorf("only %d metric uses extracted; the extraction is broken", len(uses))
	}
	t.Logf("%d metric uses checked against %d exported families", len(uses), len(s.types))
}

func keys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
