package deploytest

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	k8syaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

// deployDir is the repository's deploy/ directory.
var deployDir = filepath.Join("..", "..", "deploy")

// serviceMonitor is the part of monitoring.coreos.com/v1 ServiceMonitor the manifests use
// (the operator's Go types are too heavy a dependency). Decoding is strict, so a field
// outside this subset fails the test: extend the struct when the manifest needs one.
type serviceMonitor struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		Selector          metav1.LabelSelector `json:"selector"`
		NamespaceSelector *struct {
			Any        bool     `json:"any,omitempty"`
			MatchNames []string `json:"matchNames,omitempty"`
		} `json:"namespaceSelector,omitempty"`
		Endpoints []struct {
			Port          string `json:"port"`
			Path          string `json:"path"`
			Scheme        string `json:"scheme,omitempty"`
			Interval      string `json:"interval,omitempty"`
			ScrapeTimeout string `json:"scrapeTimeout,omitempty"`
		} `json:"endpoints"`
	} `json:"spec"`
}

// manifests is every object of deploy/kubernetes/*.yaml, by kind.
type manifests struct {
	configMaps      []*corev1.ConfigMap
	secrets         []*corev1.Secret
	pvcs            []*corev1.PersistentVolumeClaim
	deployments     []*appsv1.Deployment
	services        []*corev1.Service
	serviceMonitors []*serviceMonitor
}

// loadManifests decodes every YAML document of deploy/kubernetes/*.yaml strictly (unknown
// and duplicate fields are errors) into the API type its apiVersion and kind name.
func loadManifests(t *testing.T) *manifests {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(deployDir, "kubernetes", "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no deploy/kubernetes/*.yaml (err %v)", err)
	}
	m := &manifests{}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		r := k8syaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
		for n := 1; ; n++ {
			doc, err := r.Read()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("%s: document %d: %v", f, n, err)
			}
			if len(bytes.TrimSpace(stripComments(doc))) == 0 {
				continue
			}
			if err := m.add(doc); err != nil {
				t.Errorf("%s: document %d: %v", f, n, err)
			}
		}
	}
	return m
}

func stripComments(doc []byte) []byte {
	var out []byte
	for line := range bytes.Lines(doc) {
		if !bytes.HasPrefix(bytes.TrimSpace(line), []byte("#")) {
			out = append(out, line...)
		}
	}
	return out
}

func (m *manifests) add(doc []byte) error {
	var tm metav1.TypeMeta
	if err := yaml.Unmarshal(doc, &tm); err != nil {
		return err
	}
	strict := func(v any) error {
		if err := yaml.UnmarshalStrict(doc, v); err != nil {
			return fmt.Errorf("%s %s: %w", tm.APIVersion, tm.Kind, err)
		}
		return nil
	}
	switch tm.APIVersion + " " + tm.Kind {
	case "v1 ConfigMap":
		v := &corev1.ConfigMap{}
		m.configMaps = append(m.configMaps, v)
		return strict(v)
	case "v1 Secret":
		v := &corev1.Secret{}
		m.secrets = append(m.secrets, v)
		return strict(v)
	case "v1 PersistentVolumeClaim":
		v := &corev1.PersistentVolumeClaim{}
		m.pvcs = append(m.pvcs, v)
		return strict(v)
	case "apps/v1 Deployment":
		v := &appsv1.Deployment{}
		m.deployments = append(m.deployments, v)
		return strict(v)
	case "v1 Service":
		v := &corev1.Service{}
		m.services = append(m.services, v)
		return strict(v)
	case "monitoring.coreos.com/v1 ServiceMonitor":
		v := &serviceMonitor{}
		m.serviceMonitors = append(m.serviceMonitors, v)
		return strict(v)
	}
	return fmt.Errorf("unexpected apiVersion %q kind %q: add its type to the test", tm.APIVersion, tm.Kind)
}

// sidecar is the hsmbridge deployment as the checks need it.
type sidecar struct {
	dep       *appsv1.Deployment
	hsm       corev1.Container   // the hsmbridge container
	others    []corev1.Container // every other container (the frontend)
	volumes   map[string]corev1.Volume
	configMap *corev1.ConfigMap
	config    map[string]any // config.yaml, as plain YAML
}

func loadSidecar(t *testing.T) (*manifests, *sidecar) {
	t.Helper()
	m := loadManifests(t)
	if len(m.deployments) != 1 {
		t.Fatalf("want one Deployment in deploy/kubernetes, found %d", len(m.deployments))
	}
	s := &sidecar{dep: m.deployments[0], volumes: map[string]corev1.Volume{}}
	spec := s.dep.Spec.Template.Spec
	var found bool
	for _, c := range slices.Concat(spec.InitContainers, spec.Containers) {
		if c.Name == "hsmbridge" {
			s.hsm, found = c, true
		} else {
			s.others = append(s.others, c)
		}
	}
	if !found || len(s.others) == 0 {
		t.Fatalf("Deployment %s: want a container named hsmbridge and at least one other", s.dep.Name)
	}
	for _, v := range spec.Volumes {
		s.volumes[v.Name] = v
	}
	cfgPath := flagValue(s.hsm.Args, "--config")
	if cfgPath == "" {
		t.Fatalf("hsmbridge container args %q: no --config", s.hsm.Args)
	}
	vol, rest := volumeAt(t, s.hsm, s.volumes, cfgPath)
	if vol.ConfigMap == nil {
		t.Fatalf("--config %s is on volume %s, which is not a ConfigMap", cfgPath, vol.Name)
	}
	for _, cm := range m.configMaps {
		if cm.Name == vol.ConfigMap.Name {
			s.configMap = cm
		}
	}
	if s.configMap == nil {
		t.Fatalf("ConfigMap %s (volume %s) is not in the manifests", vol.ConfigMap.Name, vol.Name)
	}
	text, ok := s.configMap.Data[rest]
	if !ok {
		t.Fatalf("--config %s: ConfigMap %s has no key %q", cfgPath, s.configMap.Name, rest)
	}
	if err := yaml.Unmarshal([]byte(text), &s.config); err != nil {
		t.Fatalf("ConfigMap %s key %s: %v", s.configMap.Name, rest, err)
	}
	return m, s
}

func flagValue(args []string, name string) string {
	for i, a := range args {
		if v, ok := strings.CutPrefix(a, name+"="); ok {
			return v
		}
		if a == name && i+1 < len(args) {
			return args[i+1]
		}
	}
	return ""
}

// volumeAt returns the volume c mounts at the directory holding file p (the longest mount
// path that contains it) and p's path below the mount.
func volumeAt(t *testing.T, c corev1.Container, vols map[string]corev1.Volume, p string) (corev1.Volume, string) {
	t.Helper()
	var best *corev1.VolumeMount
	for i, vm := range c.VolumeMounts {
		if strings.HasPrefix(p, strings.TrimSuffix(vm.MountPath, "/")+"/") && (best == nil || len(vm.MountPath) > len(best.MountPath)) {
			best = &c.VolumeMounts[i]
		}
	}
	if best == nil {
		t.Fatalf("container %s mounts no volume holding %s", c.Name, p)
	}
	v, ok := vols[best.Name]
	if !ok {
		t.Fatalf("container %s mounts volume %s, which the pod does not define", c.Name, best.Name)
	}
	return v, strings.TrimPrefix(p, strings.TrimSuffix(best.MountPath, "/")+"/")
}

func mountOf(c corev1.Container, volume string) (corev1.VolumeMount, bool) {
	for _, vm := range c.VolumeMounts {
		if vm.Name == volume {
			return vm, true
		}
	}
	return corev1.VolumeMount{}, false
}

// str walks a plain YAML map by keys and returns the string there, or "".
func str(m map[string]any, keys ...string) string {
	var v any = m
	for _, k := range keys {
		mm, ok := v.(map[string]any)
		if !ok {
			return ""
		}
		v = mm[k]
	}
	s, _ := v.(string)
	return s
}

func clusters(m map[string]any) []map[string]any {
	l, _ := m["clusters"].([]any)
	var out []map[string]any
	for _, c := range l {
		if cm, ok := c.(map[string]any); ok {
			out = append(out, cm)
		}
	}
	return out
}

func TestKubernetes_socketSharedByEmptyDir(t *testing.T) {
	_, s := loadSidecar(t)
	checkSocket(t, s, "listen", str(s.config, "listen"), "HSMBRIDGE_SOCKET")
	if tl := str(s.config, "auth", "trusted", "listen"); tl != "" {
		checkSocket(t, s, "auth.trusted.listen", tl, "HSMBRIDGE_TRUSTED_SOCKET")
		// Only the frontend's uid may use the trusted socket.
		uids, _ := s.config["auth"].(map[string]any)["trusted"].(map[string]any)["allowed_uids"].([]any)
		for _, c := range s.others {
			uid := runAsUser(s.dep.Spec.Template.Spec, c)
			if uid == nil || !slices.ContainsFunc(uids, func(u any) bool { f, ok := u.(float64); return ok && int64(f) == *uid }) {
				got := "unset"
				if uid != nil {
					got = strconv.FormatInt(*uid, 10)
				}
				t.Errorf("container %s (runAsUser %s) is not in auth.trusted.allowed_uids %v", c.Name, got, uids)
			}
		}
		if uid := runAsUser(s.dep.Spec.Template.Spec, s.hsm); uid != nil && slices.ContainsFunc(uids, func(u any) bool { f, _ := u.(float64); return int64(f) == *uid }) {
			t.Errorf("auth.trusted.allowed_uids %v includes hsmbridge's own uid %d", uids, *uid)
		}
	}
}

func runAsUser(pod corev1.PodSpec, c corev1.Container) *int64 {
	if c.SecurityContext != nil && c.SecurityContext.RunAsUser != nil {
		return c.SecurityContext.RunAsUser
	}
	if pod.SecurityContext != nil {
		return pod.SecurityContext.RunAsUser
	}
	return nil
}

// checkSocket checks that the socket of config key (value listen) is in an emptyDir that
// hsmbridge and every other container mount at the same path, and that the others' env
// variable env (if set) names it.
func checkSocket(t *testing.T, s *sidecar, key, listen, env string) {
	t.Helper()
	sock, ok := strings.CutPrefix(listen, "unix:")
	if !ok || !path.IsAbs(sock) {
		t.Errorf("config %s = %q, want unix:/absolute/path.sock (the API stays off the pod network)", key, listen)
		return
	}
	dir := path.Dir(sock)
	vm, ok := mountAtDir(s.hsm, dir)
	if !ok {
		t.Errorf("hsmbridge container mounts nothing at %s, the directory of %s", dir, key)
		return
	}
	if vm.ReadOnly {
		t.Errorf("hsmbridge mounts %s read-only; it creates the socket there", dir)
	}
	if v := s.volumes[vm.Name]; v.EmptyDir == nil {
		t.Errorf("volume %s at %s is not an emptyDir", vm.Name, dir)
	}
	for _, c := range s.others {
		ovm, ok := mountOf(c, vm.Name)
		if !ok || ovm.MountPath != dir {
			t.Errorf("container %s must mount volume %s at %s (the socket's directory), has %+v", c.Name, vm.Name, dir, c.VolumeMounts)
		}
		for _, e := range c.Env {
			if e.Name == env && e.Value != sock {
				t.Errorf("container %s %s = %q, config %s is %q", c.Name, env, e.Value, key, listen)
			}
		}
	}
}

func mountAtDir(c corev1.Container, dir string) (corev1.VolumeMount, bool) {
	for _, vm := range c.VolumeMounts {
		if path.Clean(vm.MountPath) == dir {
			return vm, true
		}
	}
	return corev1.VolumeMount{}, false
}

// metricsPort is the port of server.metrics_listen (the probes' and scrapes' listener).
func metricsPort(t *testing.T, s *sidecar) int32 {
	t.Helper()
	ml := str(s.config, "server", "metrics_listen")
	_, port, err := net.SplitHostPort(ml)
	if err != nil {
		t.Fatalf("config server.metrics_listen = %q: %v", ml, err)
	}
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil || p == 0 {
		t.Fatalf("config server.metrics_listen = %q: want a fixed port", ml)
	}
	return int32(p)
}

// resolvePort turns a probe's or Service's (possibly named) port into c's port number.
func resolvePort(t *testing.T, c corev1.Container, p intstr.IntOrString) int32 {
	t.Helper()
	if p.Type == intstr.Int {
		return p.IntVal
	}
	for _, cp := range c.Ports {
		if cp.Name == p.StrVal {
			return cp.ContainerPort
		}
	}
	t.Fatalf("container %s has no port named %q", c.Name, p.StrVal)
	return 0
}

func TestKubernetes_probesOnMetricsListener(t *testing.T) {
	_, s := loadSidecar(t)
	port := metricsPort(t, s)
	for _, p := range []struct {
		name  string
		probe *corev1.Probe
		path  string
	}{
		{"livenessProbe", s.hsm.LivenessProbe, "/healthz"},
		{"readinessProbe", s.hsm.ReadinessProbe, "/readyz"},
		{"startupProbe", s.hsm.StartupProbe, "/healthz"},
	} {
		if p.probe == nil {
			t.Errorf("hsmbridge %s: missing", p.name)
			continue
		}
		g := p.probe.HTTPGet
		if g == nil {
			t.Errorf("hsmbridge %s: want httpGet", p.name)
			continue
		}
		if g.Path != p.path {
			t.Errorf("hsmbridge %s path = %q, want %q", p.name, g.Path, p.path)
		}
		if got := resolvePort(t, s.hsm, g.Port); got != port {
			t.Errorf("hsmbridge %s port = %d, want %d (server.metrics_listen)", p.name, got, port)
		}
	}
	if s.dep.Spec.Template.Spec.TerminationGracePeriodSeconds == nil {
		t.Error("terminationGracePeriodSeconds unset")
	}
}

func TestKubernetes_scrapeTargetsMetricsPort(t *testing.T) {
	m, s := loadSidecar(t)
	port := metricsPort(t, s)
	podLabels := labels.Set(s.dep.Spec.Template.Labels)
	var svc *corev1.Service
	for _, v := range m.services {
		if len(v.Spec.Selector) > 0 && labels.SelectorFromSet(v.Spec.Selector).Matches(podLabels) {
			svc = v
		}
	}
	if svc == nil {
		t.Fatalf("no Service selects the pod (labels %v)", podLabels)
	}
	var svcPort *corev1.ServicePort
	for i, p := range svc.Spec.Ports {
		if resolvePort(t, s.hsm, p.TargetPort) == port {
			svcPort = &svc.Spec.Ports[i]
		} else {
			t.Errorf("Service %s port %s reaches container port %v, not the metrics port %d: the API must not be exposed",
				svc.Name, p.Name, p.TargetPort.String(), port)
		}
	}
	if svcPort == nil || svcPort.Name == "" {
		t.Fatalf("Service %s has no named port reaching the metrics port %d", svc.Name, port)
	}
	if len(m.serviceMonitors) != 1 {
		t.Fatalf("want one ServiceMonitor, found %d", len(m.serviceMonitors))
	}
	sm := m.serviceMonitors[0]
	sel, err := metav1.LabelSelectorAsSelector(&sm.Spec.Selector)
	if err != nil || sel.Empty() {
		t.Fatalf("ServiceMonitor %s selector %+v: %v (empty selects everything)", sm.Name, sm.Spec.Selector, err)
	}
	if !sel.Matches(labels.Set(svc.Labels)) {
		t.Errorf("ServiceMonitor %s selector %s does not select Service %s (labels %v)", sm.Name, sel, svc.Name, svc.Labels)
	}
	if len(sm.Spec.Endpoints) != 1 {
		t.Fatalf("ServiceMonitor %s: want one endpoint, have %d", sm.Name, len(sm.Spec.Endpoints))
	}
	ep := sm.Spec.Endpoints[0]
	if ep.Port != svcPort.Name || ep.Path != "/metrics" {
		t.Errorf("ServiceMonitor endpoint port %q path %q, want port %q path /metrics", ep.Port, ep.Path, svcPort.Name)
	}
}

func TestKubernetes_pinSecretMatchesConfig(t *testing.T) {
	m, s := loadSidecar(t)
	cls := clusters(s.config)
	if len(cls) == 0 {
		t.Fatal("config has no clusters")
	}
	for _, cl := range cls {
		pin := str(cl, "pin", "file")
		if !path.IsAbs(pin) {
			t.Errorf("cluster %s: pin.file = %q, want an absolute path on the Secret volume", str(cl, "id"), pin)
			continue
		}
		vol, rest := volumeAt(t, s.hsm, s.volumes, pin)
		if vol.Secret == nil {
			t.Errorf("cluster %s: pin file %s is on volume %s, not a Secret", str(cl, "id"), pin, vol.Name)
			continue
		}
		if vm, _ := mountOf(s.hsm, vol.Name); !vm.ReadOnly {
			t.Errorf("Secret volume %s must be mounted readOnly", vol.Name)
		}
		if dm := vol.Secret.DefaultMode; dm == nil || *dm != 0o400 {
			got := "unset"
			if dm != nil {
				got = fmt.Sprintf("%#o", *dm)
			}
			t.Errorf("Secret volume %s defaultMode = %s, want 0400", vol.Name, got)
		}
		key := rest
		if len(vol.Secret.Items) > 0 {
			key = ""
			for _, it := range vol.Secret.Items {
				if it.Path == rest {
					key = it.Key
					if it.Mode != nil && *it.Mode != 0o400 {
						t.Errorf("Secret item %s mode %#o, want 0400", it.Key, *it.Mode)
					}
				}
			}
			if key == "" {
				t.Errorf("Secret volume %s projects no item at %s", vol.Name, rest)
				continue
			}
		}
		var sec *corev1.Secret
		for _, v := range m.secrets {
			if v.Name == vol.Secret.SecretName {
				sec = v
			}
		}
		if sec == nil {
			t.Errorf("Secret %s (volume %s) is not in the manifests", vol.Secret.SecretName, vol.Name)
			continue
		}
		_, inData := sec.Data[key]
		_, inString := sec.StringData[key]
		if !inData && !inString {
			t.Errorf("Secret %s has no key %q (pin file %s)", sec.Name, key, pin)
		}
		for _, c := range s.others {
			if _, ok := mountOf(c, vol.Name); ok {
				t.Errorf("container %s mounts the PIN secret %s; only hsmbridge may", c.Name, vol.Name)
			}
		}
	}
}

func TestKubernetes_configFilesAndStore(t *testing.T) {
	m, s := loadSidecar(t)
	tf := str(s.config, "auth", "token_file")
	if vol, rest := volumeAt(t, s.hsm, s.volumes, tf); vol.ConfigMap == nil || vol.ConfigMap.Name != s.configMap.Name {
		t.Errorf("auth.token_file %s is not on the ConfigMap %s's volume", tf, s.configMap.Name)
	} else if _, ok := s.configMap.Data[rest]; !ok {
		t.Errorf("auth.token_file %s: ConfigMap %s has no key %q", tf, s.configMap.Name, rest)
	}
	db := str(s.config, "store", "path")
	vol, _ := volumeAt(t, s.hsm, s.volumes, db)
	if vm, _ := mountOf(s.hsm, vol.Name); vm.ReadOnly {
		t.Errorf("store.path %s is on a read-only mount", db)
	}
	if vol.PersistentVolumeClaim == nil {
		t.Errorf("store.path %s is on volume %s, not a PersistentVolumeClaim: keystore bindings and key metadata must outlive the pod", db, vol.Name)
	} else if !slices.ContainsFunc(m.pvcs, func(p *corev1.PersistentVolumeClaim) bool { return p.Name == vol.PersistentVolumeClaim.ClaimName }) {
		t.Errorf("PersistentVolumeClaim %s is not in the manifests", vol.PersistentVolumeClaim.ClaimName)
	}
	if r := s.dep.Spec.Replicas; r == nil || *r != 1 || s.dep.Spec.Strategy.Type != appsv1.RecreateDeploymentStrategyType {
		t.Errorf("Deployment: want replicas 1 and strategy Recreate (one SQLite file on a ReadWriteOnce volume)")
	}
	for _, cl := range clusters(s.config) {
		if mod := str(cl, "module"); !path.IsAbs(mod) {
			t.Errorf("cluster %s: module %q must be absolute", str(cl, "id"), mod)
		}
	}
}

func TestKubernetes_containersLockedDown(t *testing.T) {
	_, s := loadSidecar(t)
	pod := s.dep.Spec.Template.Spec
	if pod.AutomountServiceAccountToken == nil || *pod.AutomountServiceAccountToken {
		t.Error("automountServiceAccountToken should be false: neither container talks to the API server")
	}
	for _, c := range append([]corev1.Container{s.hsm}, s.others...) {
		sc := c.SecurityContext
		if sc == nil {
			t.Errorf("container %s: no securityContext", c.Name)
			continue
		}
		nonRoot := (sc.RunAsNonRoot != nil && *sc.RunAsNonRoot) || (pod.SecurityContext != nil && pod.SecurityContext.RunAsNonRoot != nil && *pod.SecurityContext.RunAsNonRoot)
		if !nonRoot {
			t.Errorf("container %s: runAsNonRoot not set", c.Name)
		}
		if sc.RunAsUser != nil && *sc.RunAsUser == 0 {
			t.Errorf("container %s: runAsUser 0", c.Name)
		}
		if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
			t.Errorf("container %s: readOnlyRootFilesystem not true", c.Name)
		}
		if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
			t.Errorf("container %s: allowPrivilegeEscalation not false", c.Name)
		}
		if sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(sc.Capabilities.Add) > 0 {
			t.Errorf("container %s: capabilities must drop [ALL] and add none, got %+v", c.Name, sc.Capabilities)
		}
		seccomp := sc.SeccompProfile
		if seccomp == nil && pod.SecurityContext != nil {
			seccomp = pod.SecurityContext.SeccompProfile
		}
		if seccomp == nil || seccomp.Type != corev1.SeccompProfileTypeRuntimeDefault {
			t.Errorf("container %s: seccompProfile not RuntimeDefault", c.Name)
		}
		for _, res := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
			if _, ok := c.Resources.Requests[res]; !ok {
				t.Errorf("container %s: no %s request", c.Name, res)
			}
		}
		if _, ok := c.Resources.Limits[corev1.ResourceMemory]; !ok {
			t.Errorf("container %s: no memory limit", c.Name)
		}
	}
}
