#!/usr/bin/env bash
# deploy/check.sh (make deploy-check): checks every file under deploy/.
#   - promtool: the rules parse, their unit tests pass, and every dashboard query parses;
#   - systemd-analyze: the unit verifies, and its exposure stays at or under 2.0 ("OK");
#   - python3: the dashboard is valid JSON;
#   - testdata/deploytest: manifests decode strictly and agree with each other, the unit
#     agrees with its config, and every metric the dashboard and rules use is exported by a
#     running daemon.
# A missing tool is skipped with a message, except under CI=true, where it fails.
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

missing() {
	if [ "${CI:-}" = true ]; then
		echo "$1 not installed: CI=true, failing ($2)" >&2
		exit 1
	fi
	echo "$1 not installed: skipping $3 ($2)"
}

if command -v promtool >/dev/null; then
	promtool check rules deploy/prometheus/hsmbridge-rules.yaml
	(cd deploy/prometheus && promtool test rules hsmbridge-rules_test.yaml)
	if command -v python3 >/dev/null; then
		# Every query of the dashboard, with its variables filled in, as a rule file.
		python3 - deploy/grafana/*.json >"$tmp/dashboard-rules.yaml" <<-'EOF'
			import json, sys
			exprs = []
			def walk(v):
			    if isinstance(v, dict):
			        for k, x in v.items():
			            if k == "expr" and isinstance(x, str):
			                exprs.append(x)
			            else:
			                walk(x)
			    elif isinstance(v, list):
			        for x in v:
			            walk(x)
			for f in sys.argv[1:]:
			    walk(json.load(open(f)))
			print("groups:\n  - name: dashboard\n    rules:")
			for i, e in enumerate(exprs):
			    for var, val in (("$__rate_interval", "5m"), ("$cluster", ".*"), ("$instance", ".*")):
			        e = e.replace(var, val)
			    print(f"      - record: dashboard:query{i}:check\n        expr: {json.dumps(e)}")
		EOF
		echo "dashboard queries:"
		promtool check rules "$tmp/dashboard-rules.yaml"
	fi
else
	missing promtool "apt-get install prometheus" "rule tests"
fi

if command -v systemd-analyze >/dev/null; then
	# verify and security need the ExecStart binary to exist: check a copy that runs /bin/true.
	mkdir -p "$tmp/unit"
	sed 's#^ExecStart=/usr/local/bin/hsmbridge #ExecStart=/bin/true #' deploy/systemd/hsmbridge.service >"$tmp/unit/hsmbridge.service"
	systemd-analyze verify "$tmp/unit/hsmbridge.service"
	# --threshold is in tenths: fail above an exposure of 2.0.
	systemd-analyze security --offline=yes --threshold=20 "$tmp/unit/hsmbridge.service" | tail -n 1
	echo "systemd unit: verified"
else
	missing systemd-analyze "apt-get install systemd" "the systemd unit checks"
fi

if command -v python3 >/dev/null; then
	for f in deploy/grafana/*.json; do
		python3 -m json.tool "$f" >/dev/null
		echo "$f: valid JSON"
	done
else
	missing python3 "apt-get install python3" "the dashboard JSON check"
fi

cd testdata/deploytest
$GO vet ./...
$GO test -count=1 ./...
