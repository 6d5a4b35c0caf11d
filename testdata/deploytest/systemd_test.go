package deploytest

import (
	"bufio"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

// unitFile parses a systemd unit into section → key → values (in order; a key may repeat).
func unitFile(t *testing.T, name string) map[string]map[string][]string {
	t.Helper()
	f, err := os.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	u := map[string]map[string][]string{}
	section := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
		case strings.HasPrefix(line, "["):
			section = strings.Trim(line, "[]")
			u[section] = map[string][]string{}
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" {
				t.Fatalf("%s: not a key=value line in a section: %q", name, line)
			}
			u[section][k] = append(u[section][k], v)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return u
}

// TestSystemd_unitMatchesConfig checks the settings the daemon relies on, and that the
// example config's socket, store and PIN credential are where the unit puts them.
func TestSystemd_unitMatchesConfig(t *testing.T) {
	unit := unitFile(t, filepath.Join(deployDir, "systemd", "hsmbridge.service"))
	svc := unit["Service"]
	last := func(k string) string {
		if v := svc[k]; len(v) > 0 {
			return v[len(v)-1]
		}
		return ""
	}
	for k, want := range map[string]string{
		"Type": "notify", "NotifyAccess": "main", "WatchdogSec": "30s", "Restart": "on-failure",
		"ExecStart":        "/usr/local/bin/hsmbridge serve --config /etc/hsmbridge/config.yaml",
		"ExecReload":       "/bin/kill -HUP $MAINPID",
		"User":             "hsmbridge",
		"StateDirectory":   "hsmbridge",
		"RuntimeDirectory": "hsmbridge",
		"NoNewPrivileges":  "yes", "CapabilityBoundingSet": "", "AmbientCapabilities": "",
		"ProtectSystem": "strict", "PrivateDevices": "yes", "DevicePolicy": "closed",
		"MemoryDenyWriteExecute": "yes", "SystemCallArchitectures": "native", "UMask": "0077",
		"RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
	} {
		if _, ok := svc[k]; !ok {
			t.Errorf("[Service] %s= missing (want %q)", k, want)
		} else if got := last(k); got != want {
			t.Errorf("[Service] %s=%s, want %q", k, got, want)
		}
	}
	if slices.Contains(svc["DynamicUser"], "yes") {
		t.Error("DynamicUser=yes: token files must belong to a stable service user")
	}

	cfgPath := filepath.Join(deployDir, "systemd", "config.yaml")
	data, err := os.ReadFile(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	var cfg map[string]any
	if err := yaml.Unmarshal(data, &cfg); err != nil {
		t.Fatalf("%s: %v", cfgPath, err)
	}
	if dst := "/etc/hsmbridge/" + filepath.Base(cfgPath); !strings.HasSuffix(last("ExecStart"), "--config "+dst) {
		t.Errorf("ExecStart does not read %s, where deploy/README.md installs %s", dst, cfgPath)
	}
	sock, ok := strings.CutPrefix(str(cfg, "listen"), "unix:")
	if !ok || path.Dir(sock) != "/run/"+last("RuntimeDirectory") {
		t.Errorf("config listen %q: want a socket in /run/%s (RuntimeDirectory)", str(cfg, "listen"), last("RuntimeDirectory"))
	}
	if db := str(cfg, "store", "path"); path.Dir(db) != "/var/lib/"+last("StateDirectory") {
		t.Errorf("config store.path %q: want it in /var/lib/%s (StateDirectory)", db, last("StateDirectory"))
	}
	creds := map[string]bool{}
	for _, lc := range svc["LoadCredential"] {
		name, _, _ := strings.Cut(lc, ":")
		creds[name] = true
	}
	for _, cl := range clusters(cfg) {
		if c := str(cl, "pin", "systemd_credential"); !creds[c] {
			t.Errorf("cluster %s: pin.systemd_credential %q is not a LoadCredential= of the unit (%v)", str(cl, "id"), c, svc["LoadCredential"])
		}
	}
}
