#!/usr/bin/env bash
# CI: the observability artefacts, checked offline with promtool.
#   deploy/prometheus/alerts.yml            plain Prometheus alert rules (the source of truth)
#   deploy/prometheus/alerts.test.yml       their unit tests (promtool test rules)
#   deploy/prometheus/prometheusrule.yaml   the same rules as a PrometheusRule, rendered by
#                                           deploy/prometheus/render-prometheusrule.py
#   deploy/grafana/tally.json               the Grafana dashboard
# alerts.yml and tally.json are symlinks into the Helm chart (helm/tally/files/), whose
# PrometheusRule and dashboard ConfigMap embed the same files; .ci/helm.sh checks those.
# Besides promtool's own checks, every alert and every dashboard query is held to the
# metric contract (the names and label values Tally exports, listed below), so a typo
# that would leave a panel empty or an alert forever silent fails here.
# Grafana itself is not installable here: the dashboard's structure is asserted and every
# query is parsed by promtool as a recording rule.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n==> %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }

tmp=$(mktemp -d)
policy_rc_d=""
cleanup() {
  rm -rf "$tmp"
  if [ -n "$policy_rc_d" ]; then rm -f "$policy_rc_d"; fi
}
trap cleanup EXIT

step "promtool"
if ! command -v promtool >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  # Debian's prometheus package ships promtool. Its maintainer scripts would start a
  # Prometheus server on :9090 where systemd runs (Tally's default metrics port): forbid
  # service starts while installing, unless the machine already has a policy.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy_rc_d=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' >"$policy_rc_d"
    chmod +x "$policy_rc_d"
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  if [ -n "$policy_rc_d" ]; then rm -f "$policy_rc_d"; policy_rc_d=""; fi
fi
promtool --version 2>&1 | head -n 1

step "python3 with PyYAML"
py=""
for candidate in python3 /usr/bin/python3; do
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import yaml' 2>/dev/null; then
    py=$candidate
    break
  fi
done
if [ -z "$py" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends python3-yaml >/dev/null
  py=/usr/bin/python3
fi
"$py" -c 'import sys, yaml; print("python", sys.version.split()[0], "PyYAML", yaml.__version__)'

# The checks that need more than promtool, in one helper: rules, edges, spec, dashboard.
cat >"$tmp/obs.py" <<'PYTHON'
"""Observability checks for .ci/observability.sh (run with a python3 that has PyYAML)."""
import copy
import json
import os
import re
import subprocess
import sys
import tempfile

import yaml

# ---------------------------------------------------------------- the metric contract
# Names and labels are final (DESIGN.md "Prometheus metrics" and the metrics brief).
# A label whose values are listed may only be matched against those values.
SCRAPE_LABELS = {"instance", "job", "namespace", "pod", "container", "service", "endpoint"}
HISTOGRAMS = {
    "delivery_task_duration_seconds": {},
    "delivery_batch_duration_seconds": {},
    "tally_pickup_latency_seconds": {},
    "tally_recovery_seconds": {},
    "tally_claim_batch_size": {},
    "tally_claim_duration_seconds": {},
    "tally_order_completion_seconds": {},
    "tally_http_request_duration_seconds": {"route": None},
}
METRICS = {
    # per process
    "delivery_tasks_total": {"status": {"COMPLETED", "FAILED_RETRYING", "FAILED_PERMANENT"}},
    "delivery_retries_total": {},
    "delivery_orphans_recovered_total": {},
    "delivery_units_total": {"outcome": {"delivered", "failed"}},
    "tally_attempts_total": {
        "kind": None,
        "outcome": {"delivered", "partial", "retry", "dead_lettered", "handed_back", "fenced"},
    },
    "tally_invariant_checks_total": {"result": {"passed", "failed"}},
    "tally_leader": {"role": {"sweeper"}},
    "tally_http_requests_total": {"route": None, "method": None, "status": None},
    "tally_callbacks_total": {"outcome": {"delivered", "retry", "failed"}},
    "tally_db_pool_connections": {"state": {"in_use", "idle"}},
    "tally_db_pool_max_connections": {},
    "tally_build_info": {"version": None},
    # cluster-wide, exported by the sweeper leader only
    "delivery_tasks_pending": {},
    "delivery_tasks_executing": {},
    "delivery_dead_letter_queue": {},
    "delivery_worker_active": {},
    "tally_tasks_executing_over_5m": {},
    "tally_orders_open": {"status": {"PENDING", "PROCESSING"}},
    "tally_orders_needing_attention": {},
    "tally_oldest_processing_order_age_seconds": {},
    "tally_paused": {},
    "tally_fault_injection_enabled": {},
    # Prometheus' own
    "up": {},
}
for base, labels in HISTOGRAMS.items():
    METRICS[base + "_bucket"] = dict(labels, le=None)
    METRICS[base + "_sum"] = dict(labels)
    METRICS[base + "_count"] = dict(labels)

KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
            "group_left", "group_right", "inf", "nan", "start", "end"}
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*(\x00\d+\x00)')
WORDS = re.compile(r'^[\w+-]+(\|[\w+-]+)*$')

errors = []


def fail(message):
    errors.append(message)


def finish(summary):
    if errors:
        for e in errors:
            print("  FAILED:", e)
        sys.exit(f"{len(errors)} problem(s)")
    print(summary)


def unquote(literal):
    body = literal[1:-1]
    return body if literal[0] == "`" else body.encode().decode("unicode_escape")


def selectors(expr):
    """(metric name, [(label, op, value)]) for every series selector in a PromQL expr."""
    strings = []

    def stash(m):
        strings.append(unquote(m.group(0)))
        return f"\x00{len(strings) - 1}\x00"

    text = STRING.sub(stash, expr)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges, subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    found = []

    def block(m):
        name, inside = m.group(1), m.group(2)
        matchers = [(lbl, op, strings[int(v.strip("\x00"))]) for lbl, op, v in MATCHER.findall(inside)]
        leftover = MATCHER.sub("", inside).replace(",", "").strip()
        if leftover:
            fail(f"cannot parse matchers {{{inside}}} in: {expr}")
        if not name:
            fail(f"selector without a metric name in: {expr}")
        else:
            found.append((name, matchers))
        return " "

    text = re.sub(r"(?<![\w:])([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}", block, text)
    text = re.sub(r"\x00\d+\x00", " ", text)
    for m in re.finditer(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(?![\w:])", text):
        name = m.group(1)
        if name.lower() in KEYWORDS:
            continue
        if text[m.end():].lstrip().startswith("("):
            continue  # a function or an aggregation
        found.append((name, []))
    return found


def check_contract(expr, where):
    """Every series an expression selects exists in the contract, with valid matchers."""
    for name, matchers in selectors(expr):
        if name.startswith("process_"):
            allowed = {}
        elif name in METRICS:
            allowed = METRICS[name]
        else:
            fail(f"{where}: {name} is not a metric Tally exports")
            continue
        for label, op, value in matchers:
            if label in SCRAPE_LABELS:
                continue
            if label not in allowed:
                fail(f"{where}: {name} has no label {label!r}")
                continue
            values = allowed[label]
            if values is None:
                continue
            if op in ("=", "!="):
                if value not in values:
                    fail(f"{where}: {name}{{{label}{op}{value!r}}}: {label} is one of {sorted(values)}")
            elif WORDS.match(value):
                for alternative in value.split("|"):
                    if alternative not in values:
                        fail(f"{where}: {name}{{{label}{op}{value!r}}}: {alternative!r} is not a {label}")
            elif not any(re.fullmatch(value, v) for v in values):
                fail(f"{where}: {name}{{{label}{op}{value!r}}} matches no {label}")
    return len(selectors(expr))


# ---------------------------------------------------------------- alert rules
SEVERITIES = {"page", "p1", "p2", "warning"}
RUNBOOK = "https://github.com/tally/tally/blob/main/docs/RUNBOOK.md#"


def load_alerts(path):
    doc = yaml.safe_load(open(path, encoding="utf-8"))
    return doc, [(g["name"], r) for g in doc["groups"] for r in g["rules"]]


def cmd_rules(alerts_path, tests_path):
    doc, rules = load_alerts(alerts_path)
    raw = open(alerts_path, encoding="utf-8").read()
    names = [r.get("alert") for _, r in rules]
    if len(set(names)) != len(names):
        fail("alert names are not unique")
    selector_count = 0
    for group, r in rules:
        name = r.get("alert")
        if not name:
            fail(f"group {group}: a rule that is not an alert ({r.get('record')})")
            continue
        if "for" not in r:
            fail(f"{name}: no explicit `for:`")
        block = raw.split(f"- alert: {name}\n", 1)[1].split("- alert:", 1)[0]
        if not re.search(rf"^\s*# for {re.escape(str(r.get('for')))}\b", block, re.M):
            fail(f"{name}: no comment explaining its `for: {r.get('for')}` (a line starting `# for {r.get('for')}`)")
        severity = r.get("labels", {}).get("severity")
        if severity not in SEVERITIES:
            fail(f"{name}: severity {severity!r} is not one of {sorted(SEVERITIES)}")
        ann = r.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            if not str(ann.get(key, "")).strip():
                fail(f"{name}: no {key} annotation")
        if "$value" not in str(ann.get("description", "")):
            fail(f"{name}: the description does not show {{{{ $value }}}}")
        if ann.get("runbook_url") != RUNBOOK + name.lower():
            fail(f"{name}: runbook_url should be {RUNBOOK + name.lower()}")
        selector_count += check_contract(r["expr"], name)

    tests = yaml.safe_load(open(tests_path, encoding="utf-8"))
    firing, quiet = {}, {}
    cases = 0
    for group in tests["tests"]:
        for case in group.get("alert_rule_test", []):
            cases += 1
            name = case["alertname"]
            if name not in names:
                fail(f"test {group.get('name')!r}: unknown alert {name}")
            (firing if case.get("exp_alerts") else quiet).setdefault(name, 0)
            (firing if case.get("exp_alerts") else quiet)[name] += 1
        for series in group.get("input_series", []):
            labels = re.findall(r'(\w+)="', series["series"].split("{", 1)[1]) if "{" in series["series"] else []
            if not {"instance", "job"} <= set(labels):
                fail(f"test {group.get('name')!r}: series without instance/job labels: {series['series']}")
            check_contract(series["series"], f"test {group.get('name')!r}")
    for name in names:
        if not firing.get(name):
            fail(f"{name}: no test case where it fires")
        if not quiet.get(name):
            fail(f"{name}: no test case where it stays quiet")
    finish(
        f"{len(names)} alerts in {len(doc['groups'])} groups: severity, summary, description with "
        f"$value, runbook anchor and a commented `for:` each; {selector_count} series selectors "
        f"match the metric contract; {len(tests['tests'])} test groups with {cases} evaluations: "
        f"every alert has a firing case ({sum(firing.values())} in all) and a quiet case "
        f"({sum(quiet.values())} in all)"
    )


# A strict comparison against a number: `> 50`, `< 0.95`.
STRICT = re.compile(r"(?<![<>=!])([<>])(?!=)(\s*)(?=-?[\d.])")


def cmd_edges(alerts_path, tests_path):
    """Each quiet case must sit on the threshold: turning `>` into `>=` (and `<` into `<=`)
    in an alert must make one of its tests fail."""
    doc, _ = load_alerts(alerts_path)
    tests = yaml.safe_load(open(tests_path, encoding="utf-8"))
    mutated, skipped = 0, []
    for gi, group in enumerate(doc["groups"]):
        for ri, rule in enumerate(group["rules"]):
            name = rule["alert"]
            if not STRICT.search(rule["expr"]):
                skipped.append(name)
                continue
            inclusive = STRICT.sub(r"\1=\2", rule["expr"])
            mutant = copy.deepcopy(doc)
            mutant["groups"][gi]["rules"][ri]["expr"] = inclusive
            own = [g for g in tests["tests"]
                   if any(c["alertname"] == name for c in g.get("alert_rule_test", []))]
            suite = dict(tests, tests=own)
            with tempfile.TemporaryDirectory() as d:
                rules_file = os.path.join(d, "alerts.yml")
                yaml.safe_dump(mutant, open(rules_file, "w"), sort_keys=False)
                suite["rule_files"] = [rules_file]
                test_file = os.path.join(d, "alerts.test.yml")
                yaml.safe_dump(suite, open(test_file, "w"), sort_keys=False)
                result = subprocess.run(["promtool", "test", "rules", test_file],
                                        capture_output=True, text=True)
            mutated += 1
            if result.returncode == 0:
                fail(f"{name}: its tests still pass with the threshold made inclusive "
                     f"({inclusive.strip()}); add a quiet case exactly at the threshold")
    finish(f"{mutated} alerts with a numeric threshold: each one's tests catch an inclusive "
           f"threshold; {len(skipped)} without one ({', '.join(skipped)})")


# ---------------------------------------------------------------- PrometheusRule
def cmd_spec(rule_path, alerts_path, tests_path, out_path, out_tests_path):
    doc = yaml.safe_load(open(rule_path, encoding="utf-8"))
    if doc.get("apiVersion") != "monitoring.coreos.com/v1" or doc.get("kind") != "PrometheusRule":
        fail("not a monitoring.coreos.com/v1 PrometheusRule")
    meta = doc.get("metadata", {})
    if meta.get("name") != "tally":
        fail(f"metadata.name is {meta.get('name')!r}, not 'tally'")
    if meta.get("labels", {}).get("app.kubernetes.io/name") != "tally":
        fail("metadata.labels lacks app.kubernetes.io/name: tally")
    spec = doc.get("spec") or {}
    plain = yaml.safe_load(open(alerts_path, encoding="utf-8"))
    if spec != plain:
        fail("spec differs from alerts.yml")
    with open(out_path, "w", encoding="utf-8") as f:
        yaml.safe_dump(spec, f, sort_keys=False, allow_unicode=True, width=1000)
    # The unit tests, pointed at the extracted spec instead of alerts.yml.
    tests = yaml.safe_load(open(tests_path, encoding="utf-8"))
    tests["rule_files"] = [os.path.abspath(out_path)]
    with open(out_tests_path, "w", encoding="utf-8") as f:
        yaml.safe_dump(tests, f, sort_keys=False, allow_unicode=True, width=1000)
    rules = sum(len(g["rules"]) for g in spec.get("groups", []))
    finish(f"PrometheusRule tally: {len(spec.get('groups', []))} groups, {rules} rules, equal to "
           f"alerts.yml; spec and the unit tests pointed at it written for promtool")


# ---------------------------------------------------------------- Grafana dashboard
MACROS = {"__rate_interval": "5m", "__interval": "5m", "__range": "5m", "kind": ".*"}


def cmd_dashboard(path, out_path):
    d = json.load(open(path, encoding="utf-8"))
    if d.get("uid") != "tally":
        fail(f"uid is {d.get('uid')!r}, not 'tally'")
    if d.get("title") != "Tally":
        fail(f"title is {d.get('title')!r}, not 'Tally'")
    if not isinstance(d.get("schemaVersion"), int) or d["schemaVersion"] < 36:
        fail(f"schemaVersion {d.get('schemaVersion')!r} is older than 36")
    variables = {v.get("name"): v for v in d.get("templating", {}).get("list", [])}
    ds = variables.get("datasource", {})
    if ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        fail("no `datasource` variable of type datasource with query prometheus")
    kind = variables.get("kind", {})
    kind_query = kind.get("query")
    kind_query = kind_query.get("query") if isinstance(kind_query, dict) else kind_query
    if kind.get("type") != "query" or kind_query != "label_values(tally_attempts_total, kind)":
        fail("no `kind` variable from label_values(tally_attempts_total, kind)")

    def is_ds(value):
        return value == "${datasource}" or (isinstance(value, dict) and value.get("uid") == "${datasource}")

    panels, rows, exprs, ids = [], 0, [], []

    def walk(items, where):
        nonlocal rows
        for p in items:
            ids.append(p.get("id"))
            title = f"{where}{p.get('title', '?')!r}"
            if p.get("type") == "row":
                rows += 1
                walk(p.get("panels", []), f"row {p.get('title')!r} > ")
                continue
            panels.append(p)
            if "gridPos" not in p:
                fail(f"panel {title}: no gridPos")
            if not is_ds(p.get("datasource")):
                fail(f"panel {title}: datasource is {p.get('datasource')!r}, not ${{datasource}}")
            targets = p.get("targets") or []
            if not targets:
                fail(f"panel {title}: no targets")
            for t in targets:
                if "datasource" in t and not is_ds(t["datasource"]):
                    fail(f"panel {title} target {t.get('refId')}: datasource is not ${{datasource}}")
                expr = str(t.get("expr", "")).strip()
                if not expr:
                    fail(f"panel {title} target {t.get('refId')}: empty expr")
                    continue
                exprs.append((p.get("id"), t.get("refId", "A"), title, expr))

    walk(d.get("panels", []), "")
    if len(set(ids)) != len(ids):
        fail("panel ids are not unique")
    rules = []
    selector_count = 0
    for pid, ref, title, expr in exprs:
        concrete = re.sub(r"\$\{(\w+)\}|\$(\w+)",
                          lambda m: MACROS.get(m.group(1) or m.group(2), m.group(0)), expr)
        if "$" in concrete:
            fail(f"panel {title}: unknown variable in {expr}")
        selector_count += check_contract(concrete, f"panel {title}")
        rules.append({"record": f"dashboard:panel_{pid}_{ref}", "expr": concrete})
    with open(out_path, "w", encoding="utf-8") as f:
        yaml.safe_dump({"groups": [{"name": "tally-dashboard", "rules": rules}]}, f,
                       sort_keys=False, allow_unicode=True, width=1000)
    finish(f"dashboard uid=tally title=Tally schemaVersion={d.get('schemaVersion')}: "
           f"{rows} rows, {len(panels)} panels, each with datasource ${{datasource}} and targets; "
           f"{len(exprs)} queries ({selector_count} series selectors) match the metric contract; "
           f"written as recording rules for promtool")


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    {"rules": cmd_rules, "edges": cmd_edges, "spec": cmd_spec, "dashboard": cmd_dashboard}[command](*args)
PYTHON

rules=deploy/prometheus/alerts.yml
tests=deploy/prometheus/alerts.test.yml
prometheusrule=deploy/prometheus/prometheusrule.yaml
dashboard=deploy/grafana/tally.json

step "one file, two paths: deploy/ symlinks into the Helm chart"
for f in "$rules:helm/tally/files/alerts.yml" "$dashboard:helm/tally/files/tally.json"; do
  link=${f%%:*} target=${f#*:}
  if [ ! -L "$link" ] || [ "$(readlink -f "$link")" != "$(readlink -f "$target")" ]; then
    echo "$link must be a symlink to $target (the chart embeds that file; see its header)"
    exit 1
  fi
  echo "$link -> $(readlink "$link")"
done

step "promtool check rules $rules"
promtool check rules --lint-fatal "$rules"

step "promtool test rules $tests"
promtool test rules "$tests"

step "alert conventions, test coverage and the metric contract"
"$py" "$tmp/obs.py" rules "$rules" "$tests"

step "threshold edges: an inclusive threshold must break each alert's tests"
"$py" "$tmp/obs.py" edges "$rules" "$tests"

step "PrometheusRule drift: re-render from alerts.yml and diff"
python3 deploy/prometheus/render-prometheusrule.py --stdout >"$tmp/prometheusrule.yaml"
diff -u "$prometheusrule" "$tmp/prometheusrule.yaml" \
  || { echo "$prometheusrule is stale: run python3 deploy/prometheus/render-prometheusrule.py"; exit 1; }
echo "$prometheusrule matches a fresh rendering of $rules"

step "PrometheusRule spec: promtool check rules, and the unit tests against it"
"$py" "$tmp/obs.py" spec "$prometheusrule" "$rules" "$tests" \
  "$tmp/prometheusrule-spec.yml" "$tmp/prometheusrule-spec.test.yml"
promtool check rules --lint-fatal "$tmp/prometheusrule-spec.yml"
promtool test rules "$tmp/prometheusrule-spec.test.yml"

step "Grafana dashboard $dashboard"
"$py" "$tmp/obs.py" dashboard "$dashboard" "$tmp/dashboard-rules.yml"
promtool check rules "$tmp/dashboard-rules.yml"

step "observability checks passed"
