#!/usr/bin/env bash
# Offline checks of the deployment artefacts in deploy/ (no cluster, no Docker needed).
# Run from anywhere as root on Debian (it apt-installs what is missing):
#
#   DUPLEX_BIN=target/release/duplex scripts/check-deploy.sh
#
#   * promtool: alert rules (syntax + unit tests in alerts_test.yml), both Prometheus configs;
#   * kubernetes-validate (PyPI, in a venv at target/deploy-venv): every manifest in deploy/k8s
#     against the Kubernetes $KUBE_VERSION schemas, strict (unknown fields are errors); the
#     kustomization's resource list; with kubectl present also the rendered kustomize output of
#     deploy/k8s;
#   * a few consistency rules of the manifests (grace period > preStop + drain, probes, ...);
#   * haproxy -c and nginx -t on deploy/haproxy.cfg and deploy/nginx.conf;
#   * scripts/prometheus-scrape-test.sh: every dashboard query against a real Prometheus
#     scraping a real gateway (DUPLEX_BIN), which also saves the gateway's /metrics;
#   * metric names: every metric named by the dashboard, the alerts, the prometheus-adapter
#     rule and the HPA must be in that scraped /metrics (or be Prometheus' own `up`).
#
# Every check runs even when an earlier one failed; the summary lists each with PASS/FAIL and
# the exit status is 1 if any failed.
set -euo pipefail
cd "$(dirname "$0")/.."

DUPLEX_BIN=${DUPLEX_BIN:-target/release/duplex}
KUBE_VERSION=${KUBE_VERSION:-1.33.0}
VENV=${DEPLOY_VENV:-target/deploy-venv}
OUT=${DEPLOY_CHECK_DIR:-target/deploy-check}
export DUPLEX_BIN DEPLOY_VENV="$VENV" DEPLOY_CHECK_DIR="$OUT"
start_all=$(date +%s)

log() { printf '\n== %s\n' "$*"; }

# ---- what the checks need ------------------------------------------------------------------
apt_updated=false
apt_install() {
    if ! $apt_updated; then
        apt-get update -qq
        apt_updated=true
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}
need=()
command -v promtool >/dev/null || need+=(prometheus)
command -v prometheus >/dev/null || need+=(prometheus)
command -v haproxy >/dev/null || need+=(haproxy)
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || need+=(nginx)
command -v python3 >/dev/null || need+=(python3)
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then need+=(python3-venv); fi
if ((${#need[@]})); then
    log "installing ${need[*]} (apt)"
    # Debian starts a package's service on install (prometheus on :9090, nginx on :80, haproxy);
    # here they are only checkers, so a temporary policy-rc.d forbids starting them.
    policy_rc=""
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        policy_rc=/usr/sbin/policy-rc.d
    fi
    rc=0
    apt_install $(printf '%s\n' "${need[@]}" | sort -u) || rc=$?
    [[ -n $policy_rc ]] && rm -f "$policy_rc"
    ((rc == 0)) || exit "$rc"
fi
PATH=$PATH:/usr/sbin
if ! "$VENV/bin/python" -c 'import kubernetes_validate, websockets, yaml' 2>/dev/null; then
    log "creating $VENV (kubernetes-validate, websockets)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet 'kubernetes-validate>=1.33,<2' 'websockets>=12' PyYAML
fi
PY="$VENV/bin/python"
mkdir -p "$OUT"

if [[ ! -x $DUPLEX_BIN ]]; then
    if [[ $DUPLEX_BIN == target/release/duplex ]] && command -v cargo >/dev/null; then
        log "building $DUPLEX_BIN (cargo build --release)"
        cargo build --release --locked --bin duplex
    else
        echo "no gateway binary at $DUPLEX_BIN: set DUPLEX_BIN or run cargo build --release" >&2
        exit 2
    fi
fi

# ---- the checks ----------------------------------------------------------------------------
results=()
failed=0
check() { # check NAME COMMAND...: runs the command, records PASS/FAIL and its duration.
    local name=$1 t0 rc
    shift
    log "$name"
    t0=$(date +%s)
    # A subshell outside any `if`, so that `set -e` stays in force inside the check function.
    set +e
    (set -e; "$@")
    rc=$?
    set -e
    if ((rc == 0)); then
        results+=("PASS  $(($(date +%s) - t0))s  $name")
    else
        results+=("FAIL  $(($(date +%s) - t0))s  $name (exit $rc)")
        failed=1
    fi
}

versions() {
    echo "promtool:   $(promtool --version 2>&1 | head -n1)"
    echo "prometheus: $(prometheus --version 2>&1 | head -n1)"
    echo "haproxy:    $(haproxy -v 2>&1 | head -n1)"
    echo "nginx:      $(nginx -v 2>&1 | head -n1)"
    echo "kubernetes-validate $("$PY" -m pip show kubernetes-validate 2>/dev/null | awk '/^Version/ {print $2}'), schemas for Kubernetes $KUBE_VERSION"
    echo "kubectl:    $(command -v kubectl >/dev/null && kubectl version --client 2>/dev/null | head -n2 | tr '\n' ' ' || echo 'not installed (kustomize rendering skipped)')"
    echo "gateway:    $DUPLEX_BIN ($("$DUPLEX_BIN" --version 2>&1))"
}

# Prometheus' Kubernetes config: Debian's promtool/prometheus are built without Kubernetes
# service discovery. If promtool rejects kubernetes_sd_configs for that reason only, check a
# copy with each kubernetes_sd_configs swapped for a static target (relabelling, rule files and
# everything else are still checked) and say so.
check_k8s_prometheus_config() {
    local cfg=deploy/prometheus/prometheus-kubernetes.yml out
    if out=$(promtool check config "$cfg" 2>&1); then
        echo "$out"
        return 0
    fi
    if ! grep -q 'field kubernetes_sd_configs not found' <<<"$out"; then
        echo "$out"
        return 1
    fi
    echo "this promtool has no Kubernetes service discovery ($(promtool --version 2>&1 | head -n1));"
    echo "checking a copy with kubernetes_sd_configs replaced by a static target"
    "$PY" - "$cfg" deploy/prometheus/.prometheus-kubernetes.static-sd.yml <<'EOF'
import sys, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
for job in cfg["scrape_configs"]:
    if job.pop("kubernetes_sd_configs", None) is not None:
        job["static_configs"] = [{"targets": ["pod-ip.invalid:8081"]}]
yaml.safe_dump(cfg, open(sys.argv[2], "w"), sort_keys=False)
EOF
    # Written beside the original so that rule_files resolve the same way.
    local rc=0
    promtool check config deploy/prometheus/.prometheus-kubernetes.static-sd.yml || rc=$?
    rm -f deploy/prometheus/.prometheus-kubernetes.static-sd.yml
    return $rc
}

k8s_files() { find deploy/k8s -maxdepth 1 -name '*.yaml' ! -name kustomization.yaml | sort; }

validate_manifests() {
    local files
    mapfile -t files < <(k8s_files)
    "$VENV/bin/kubernetes-validate" --strict --quiet -k "$KUBE_VERSION" "${files[@]}"
    echo "validated against Kubernetes $KUBE_VERSION (strict): ${files[*]}"
}

# The kustomization lists every manifest but the example Secrets, and only existing files.
check_kustomization() {
    "$PY" - <<'EOF'
import os, sys, yaml
k = yaml.safe_load(open("deploy/k8s/kustomization.yaml"))
listed = set(k["resources"])
present = {f for f in os.listdir("deploy/k8s") if f.endswith(".yaml") and f != "kustomization.yaml"}
missing = listed - present
unlisted = present - listed - {"secrets.example.yaml"}
for f in sorted(missing):
    print(f"kustomization.yaml lists {f}, which does not exist")
for f in sorted(unlisted):
    print(f"deploy/k8s/{f} is not in kustomization.yaml")
sys.exit(1 if missing or unlisted else 0)
EOF
    echo "kustomization resources: $(grep -c '^  - .*\.yaml$' deploy/k8s/kustomization.yaml) files, all present"
}

render_kustomize() {
    if ! command -v kubectl >/dev/null; then
        echo "SKIPPED: kubectl not installed (not in Debian); the per-file validation above still ran"
        return 0
    fi
    local d
    for d in deploy/k8s; do
        kubectl kustomize "$d" >"$OUT/$(basename "$d").rendered.yaml"
        "$VENV/bin/kubernetes-validate" --strict --quiet -k "$KUBE_VERSION" "$OUT/$(basename "$d").rendered.yaml"
        echo "$d: $(grep -c '^kind:' "$OUT/$(basename "$d").rendered.yaml") objects rendered and valid"
    done
}

# Rules the schemas cannot express.
check_manifest_rules() {
    "$PY" - <<'EOF'
import re, sys, yaml
docs = [d for f in ("orchestrator.yaml", "worker.yaml", "hpa.yaml", "redis.yaml")
        for d in yaml.safe_load_all(open(f"deploy/k8s/{f}")) if d]
by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
errors = []
def flag(args, name, default=None):
    for a in args:
        m = re.fullmatch(rf"--{name}=(.*)", a)
        if m:
            return m.group(1)
    return default

o = by[("Deployment", "duplex-orchestrator")]["spec"]["template"]["spec"]
c = o["containers"][0]
drain = float(flag(c["args"], "drain-secs", 30))
pre = c["lifecycle"]["preStop"]["exec"]["command"]
pre_s = float(pre[1]) if pre[0] == "sleep" else 0
grace = o["terminationGracePeriodSeconds"]
if not grace > drain + pre_s:
    errors.append(f"orchestrator: terminationGracePeriodSeconds {grace} <= preStop {pre_s} + --drain-secs {drain}")
for probe, path in (("readinessProbe", "/readiness"), ("livenessProbe", "/liveness")):
    g = c[probe]["httpGet"]
    if g["path"] != path or g["port"] != "admin":
        errors.append(f"orchestrator: {probe} must be GET {path} on port admin, is {g}")
ports = {p["name"]: p["containerPort"] for p in c["ports"]}
admin = flag(c["args"], "admin-listen")
if ports.get("admin") != 8081 or not admin or not admin.endswith(":8081"):
    errors.append(f"orchestrator: admin port 8081 and --admin-listen disagree ({ports}, {admin})")
env = {e["name"]: e for e in c["env"]}
if "secretKeyRef" not in env.get("DUPLEX_REDIS_URL", {}).get("valueFrom", {}):
    errors.append("orchestrator: DUPLEX_REDIS_URL must come from a Secret")
if flag(c["args"], "redis") != "$(DUPLEX_REDIS_URL)":
    errors.append("orchestrator: --redis must be $(DUPLEX_REDIS_URL)")

w = by[("Deployment", "duplex-worker")]["spec"]["template"]["spec"]["containers"][0]
wenv = {e["name"]: e for e in w["env"]}
if wenv.get("POD_IP", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "status.podIP":
    errors.append("worker: POD_IP must come from status.podIP")
if flag(w["args"], "advertise") != "grpc://$(POD_IP):7001":
    errors.append(f"worker: --advertise must be grpc://$(POD_IP):7001, is {flag(w['args'], 'advertise')}")

for name in ("duplex-orchestrator", "duplex-worker", "duplex-redis"):
    s = by[("Deployment", name)]["spec"]["template"]["spec"]
    for ctr in s["containers"]:
        sc = ctr.get("securityContext", {})
        if not (s["securityContext"].get("runAsNonRoot") and sc.get("readOnlyRootFilesystem")
                and sc.get("allowPrivilegeEscalation") is False
                and sc.get("capabilities", {}).get("drop") == ["ALL"]):
            errors.append(f"{name}: must run non-root, read-only, no privilege escalation, all capabilities dropped")
        r = ctr.get("resources", {})
        if not (r.get("requests") and r.get("limits")):
            errors.append(f"{name}: resources.requests and limits must be set")

hpa = by[("HorizontalPodAutoscaler", "duplex-orchestrator")]["spec"]
kinds = [m["type"] for m in hpa["metrics"]]
if kinds[:1] != ["Pods"] or "Resource" not in kinds:
    errors.append(f"hpa: expected a Pods metric plus a CPU fallback, got {kinds}")
cap = int(flag(c["args"], "max-connections", 10000))
alerts = open("deploy/prometheus/alerts.yml").read()
if f"0.8 * {cap}" not in alerts:
    errors.append(f"alerts.yml DuplexSessionsNearCap must use --max-connections={cap}")
for e in errors:
    print("ERROR", e)
print(f"{len(errors)} rule violations (grace {grace}s > preStop {pre_s:g}s + drain {drain:g}s; cap {cap})")
sys.exit(1 if errors else 0)
EOF
}

check_nginx() {
    local prefix rc=0
    prefix=$(mktemp -d)
    nginx -t -q -c "$PWD/deploy/nginx.conf" -p "$prefix/" || rc=$?
    rm -rf "$prefix"
    ((rc == 0)) && echo "nginx -t: deploy/nginx.conf is valid"
    return $rc
}

# Metric names used by the dashboard, the alerts, the adapter rule and the HPA, against the
# names in the /metrics exposition that the scrape test saved.
check_metric_names() {
    if [[ ! -s $OUT/metrics.txt ]]; then
        echo "no $OUT/metrics.txt: the scrape test did not get /metrics from the gateway"
        return 1
    fi
    "$PY" - "$OUT/metrics.txt" <<'EOF'
import json, re, sys, yaml

# Series Prometheus itself attaches to every target; not exported by the gateway.
PROMETHEUS_OWN = {"up"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
            "unless", "bool", "offset", "inf", "nan", "atan2", "start", "end",
            # Aggregation operators: in `sum by (le) (...)` no "(" follows the name directly.
            "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
            "bottomk", "topk", "quantile", "limitk", "limit_ratio"}

def metric_names(expr):
    """Metric names in a PromQL expression (Grafana variables allowed)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)   # strings
    e = re.sub(r"\{[^}]*\}", " ", e)                                          # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)                                         # ranges, subqueries
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r" \1 ", e)
    e = re.sub(r"\$\{?\w+\}?", " ", e)                                        # Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(?!\w)(\s*\()?", e):
        name, call = m.group(1), m.group(2)
        if call or name in KEYWORDS:
            continue
        names.add(name)
    return names

# The extractor itself, on known cases.
for expr, want in [
    ('histogram_quantile(0.99, sum by (le) (rate(a_bucket{job="$job", le="0.5"}[$__rate_interval])))', {"a_bucket"}),
    ('sum(rate(x_total[5m])) / ignoring(le) sum without (instance) (y) > 1e-3', {"x_total", "y"}),
    ('absent(up{job="j"} == 1) or vector(0) and on (job) z offset 5m', {"up", "z"}),
    ('label_replace(m, "dst", "$1", "src", "(.*)")', {"m"}),
]:
    got = metric_names(expr)
    assert got == want, f"extractor self-test: {expr!r} gave {got}, want {want}"

exported = set()
for line in open(sys.argv[1]):
    m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", line)
    if m and not line.startswith("#"):
        exported.add(m.group(1))
if not exported:
    sys.exit("no samples in the scraped exposition")
known = exported | PROMETHEUS_OWN

uses = []  # (where, expr)
d = json.load(open("deploy/grafana/duplex-dashboard.json"))
def walk(panels):
    for p in panels:
        for t in p.get("targets", []):
            if "expr" in t:
                uses.append((f"dashboard panel '{p.get('title')}'", t["expr"]))
        walk(p.get("panels", []))
walk(d["panels"])
for v in d.get("templating", {}).get("list", []):
    q = v.get("query")
    q = q.get("query") if isinstance(q, dict) else q
    if v.get("type") == "query" and q:
        m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", q)
        uses.append((f"dashboard variable ${v['name']}", m.group(1) if m else q))
for g in yaml.safe_load(open("deploy/prometheus/alerts.yml"))["groups"]:
    for r in g["rules"]:
        uses.append((f"alert {r.get('alert') or r.get('record')}", r["expr"]))
for r in yaml.safe_load(open("deploy/prometheus/prometheus-adapter-rules.yaml"))["rules"]:
    uses.append(("prometheus-adapter seriesQuery", r["seriesQuery"]))
    uses.append(("prometheus-adapter metric name", r["name"]["as"]))
for doc in yaml.safe_load_all(open("deploy/k8s/hpa.yaml")):
    for m in doc["spec"]["metrics"]:
        if m["type"] == "Pods":
            uses.append(("HPA Pods metric", m["pods"]["metric"]["name"]))

bad = 0
used = set()
for where, expr in uses:
    names = metric_names(expr)
    if not names:
        print(f"UNKNOWN  {where}: names no metric: {expr}")
        bad += 1
    for n in sorted(names - known):
        print(f"UNKNOWN  {where}: {n} is not exported by the gateway")
        bad += 1
    used |= names
print(f"{len(uses)} expressions checked; metrics used: {', '.join(sorted(used))}")
print(f"exported by the gateway ({len(exported)} series names); not used anywhere: "
      f"{', '.join(sorted(n for n in exported - used if not n.endswith(('_sum',)))) or 'none'}")
sys.exit(1 if bad else 0)
EOF
}

check "versions" versions
check "promtool check rules deploy/prometheus/alerts.yml" promtool check rules deploy/prometheus/alerts.yml
check "promtool test rules deploy/prometheus/alerts_test.yml" promtool test rules deploy/prometheus/alerts_test.yml
check "promtool check config deploy/prometheus/prometheus.yml" promtool check config deploy/prometheus/prometheus.yml
check "promtool check config deploy/prometheus/prometheus-kubernetes.yml" check_k8s_prometheus_config
check "kubernetes-validate deploy/k8s/*.yaml (Kubernetes $KUBE_VERSION, strict)" validate_manifests
check "kustomization resource lists" check_kustomization
check "kustomize build + validate (deploy/k8s)" render_kustomize
check "manifest consistency rules" check_manifest_rules
check "haproxy -c -f deploy/haproxy.cfg" haproxy -c -f deploy/haproxy.cfg
check "nginx -t -c deploy/nginx.conf" check_nginx
check "dashboard queries against Prometheus + gateway (scripts/prometheus-scrape-test.sh)" scripts/prometheus-scrape-test.sh
check "metric names in dashboard/alerts/adapter/HPA are exported by the gateway" check_metric_names

printf '\n== summary (%ss in all)\n' "$(($(date +%s) - start_all))"
printf '%s\n' "${results[@]}"
exit $failed
