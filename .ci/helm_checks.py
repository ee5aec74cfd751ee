"""Checks of the Helm chart's renderings for .ci/helm.sh (run with a python3 that has PyYAML).

    helm_checks.py schema CHART_DIR CONFIG_RS
        values.schema.json rejects unknown keys at every object level, and every TALLY_*
        setting of src/config.rs is either accepted under `config` or set by the chart.
    helm_checks.py render NAME RENDER.yaml CHART_DIR VALUES.yaml CONFIG_RS
        one rendering (helm template, tests included): Pod Security "restricted" for every
        workload, Tally's own rules, the custom resources' structure, the PrometheusRule
        and dashboard against the repository's files, cross-references, and what the
        value set asks for. Prints one summary line.
"""
import copy
import json
import re
import sys

import yaml

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"}

# Settings the chart sets itself from dedicated values (never through `config`).
CHART_MANAGED = {
    "TALLY_DATABASE_URL", "TALLY_ADMIN_API_KEY", "TALLY_CALLBACK_SIGNING_SECRET",
    "TALLY_ROLES", "TALLY_WORKER_ENABLED", "TALLY_API_ADDR", "TALLY_METRICS_ADDR",
    "TALLY_KINDS_FILE", "TALLY_SHUTDOWN_GRACE_SEC", "TALLY_DB_POOL_SIZE",
    "TALLY_LEADER_ELECTION", "TALLY_LEADER_LEASE_NAME", "TALLY_LEADER_LEASE_NAMESPACE",
}
# Settings of the CLI and of `tally demo`/`bench`, not of `serve`.
NOT_SERVE = {"TALLY_API_URL", "TALLY_API_KEY", "TALLY_PG_BINDIR"}
# Schema objects that may stay open: Kubernetes types the API server checks.
OPEN_OBJECTS = {
    "definitions.affinity.nodeAffinity",
    "definitions.affinity.podAffinity",
    "definitions.affinity.podAntiAffinity",
    "global",
}

errors = []


def fail(message):
    errors.append(message)


def finish(summary):
    if errors:
        for e in errors:
            print("  FAILED:", e)
        sys.exit(f"{len(errors)} problem(s)")
    print(summary)


def settings_of(config_rs):
    text = open(config_rs, encoding="utf-8").read()
    return set(re.findall(r'env\s*=\s*"(TALLY_[A-Z0-9_]+)"', text))


# ---------------------------------------------------------------- schema
def cmd_schema(chart, config_rs):
    schema = json.load(open(f"{chart}/values.schema.json", encoding="utf-8"))
    objects = 0

    def walk(node, path):
        nonlocal objects
        if isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{path}[{i}]")
            return
        if not isinstance(node, dict):
            return
        is_object = node.get("type") == "object" or "properties" in node
        if is_object:
            objects += 1
            extra = node.get("additionalProperties", True)
            if extra is True and path not in OPEN_OBJECTS:
                fail(f"schema {path}: an object without additionalProperties: false "
                     "(or a typed additionalProperties for maps)")
        for key, value in node.items():
            if key in ("properties", "definitions"):
                prefix = "definitions." if key == "definitions" else (f"{path}." if path else "")
                for name, sub in value.items():
                    walk(sub, prefix + name)
            elif key in ("items", "additionalProperties", "oneOf", "anyOf", "allOf"):
                walk(value, f"{path}.{key}" if key != "items" else f"{path}[]")

    walk(schema, "")
    config = set(schema["definitions"]["config"]["properties"])
    known = settings_of(config_rs)
    for name in sorted(known - config - CHART_MANAGED - NOT_SERVE):
        fail(f"{name} (src/config.rs) is neither accepted under `config` in values.schema.json "
             "nor set by the chart")
    for name in sorted(n for n in config if n.startswith("TALLY_") and n not in known):
        fail(f"values.schema.json accepts config.{name}, which src/config.rs does not define")
    for name in sorted(config & CHART_MANAGED):
        fail(f"config.{name} is set by the chart and must not be accepted under `config`")
    finish(f"values.schema.json: {objects} object levels, each closed to unknown keys (open: "
           f"{', '.join(sorted(OPEN_OBJECTS))}); {len(known)} TALLY_ settings in src/config.rs: "
           f"{len(config & known)} under `config`, {len(CHART_MANAGED & known)} set by the chart, "
           f"{len(NOT_SERVE & known)} CLI-only")


# ---------------------------------------------------------------- values
def merged_values(chart, values_file):
    """values.yaml overridden by the value set, as Helm coalesces them (null deletes)."""

    def merge(base, over):
        for k, v in over.items():
            if v is None:
                base.pop(k, None)
            elif isinstance(v, dict) and isinstance(base.get(k), dict):
                merge(base[k], v)
            else:
                base[k] = copy.deepcopy(v)
        return base

    base = yaml.safe_load(open(f"{chart}/values.yaml", encoding="utf-8"))
    over = yaml.safe_load(open(values_file, encoding="utf-8")) or {}
    return merge(base, over)


# ---------------------------------------------------------------- Pod Security "restricted"
ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                   "persistentVolumeClaim", "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range",
                "net.ipv4.ip_unprivileged_port_start", "net.ipv4.tcp_syncookies",
                "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout",
                "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def pod_spec_of(doc):
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind == "Pod":
        return spec
    if kind == "CronJob":
        return spec["jobTemplate"]["spec"]["template"]["spec"]
    return spec["template"]["spec"]


def containers_of(pod):
    return ([("initContainers", c) for c in pod.get("initContainers", [])]
            + [("containers", c) for c in pod.get("containers", [])]
            + [("ephemeralContainers", c) for c in pod.get("ephemeralContainers", [])])


def check_restricted(where, pod):
    """The Pod Security Standards' baseline and restricted profiles (kubernetes.io/docs/
    concepts/security/pod-security-standards/), control by control."""
    psc = pod.get("securityContext", {}) or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            fail(f"{where}: {field} is true")
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        fail(f"{where}: windowsOptions.hostProcess")
    for v in pod.get("volumes", []) or []:
        types = set(v) - {"name"}
        if "hostPath" in types:
            fail(f"{where}: hostPath volume {v['name']}")
        if not types <= ALLOWED_VOLUMES:
            fail(f"{where}: volume {v['name']} of type {sorted(types - ALLOWED_VOLUMES)}")
    for s in psc.get("sysctls", []) or []:
        if s.get("name") not in SAFE_SYSCTLS:
            fail(f"{where}: unsafe sysctl {s.get('name')}")

    def seccomp_ok(sc):
        return (sc.get("seccompProfile") or {}).get("type") in ("RuntimeDefault", "Localhost")

    def check_common(w, sc):
        selinux = sc.get("seLinuxOptions") or {}
        if selinux.get("type", "") not in SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
            fail(f"{w}: seLinuxOptions {selinux}")
        apparmor = (sc.get("appArmorProfile") or {}).get("type")
        if apparmor not in (None, "RuntimeDefault", "Localhost"):
            fail(f"{w}: appArmorProfile {apparmor}")
        if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
            fail(f"{w}: seccompProfile Unconfined")
        if sc.get("runAsUser") == 0:
            fail(f"{w}: runAsUser 0")

    check_common(where, psc)
    for field, c in containers_of(pod):
        w = f"{where} {field}/{c['name']}"
        sc = c.get("securityContext", {}) or {}
        check_common(w, sc)
        if sc.get("privileged"):
            fail(f"{w}: privileged")
        if sc.get("procMount", "Default") != "Default":
            fail(f"{w}: procMount {sc['procMount']}")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            fail(f"{w}: windowsOptions.hostProcess")
        for p in c.get("ports", []) or []:
            if p.get("hostPort"):
                fail(f"{w}: hostPort {p['hostPort']}")
        if sc.get("allowPrivilegeEscalation") is not False:
            fail(f"{w}: allowPrivilegeEscalation is not false")
        if sc.get("runAsNonRoot") is False or not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
            fail(f"{w}: runAsNonRoot is not true (pod or container)")
        if not (seccomp_ok(sc) or (seccomp_ok(psc) and "seccompProfile" not in sc)):
            fail(f"{w}: seccompProfile is not RuntimeDefault or Localhost (pod or container)")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            fail(f"{w}: capabilities do not drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            fail(f"{w}: capabilities add {caps['add']}")
        # Tally's own: nothing is written to the image's filesystem.
        if sc.get("readOnlyRootFilesystem") is not True:
            fail(f"{w}: readOnlyRootFilesystem is not true")


# ---------------------------------------------------------------- Tally's own rules
def env_of(container):
    return {e["name"]: e for e in container.get("env", []) or []}


def env_value(container, name):
    e = env_of(container).get(name)
    return None if e is None else e.get("value")


def check_tally_rules(where, doc, pod, known_settings):
    long_running = doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet")
    for field, c in containers_of(pod):
        w = f"{where} {field}/{c['name']}"
        res = c.get("resources") or {}
        for part in ("requests", "limits"):
            if not res.get(part):
                fail(f"{w}: no resources.{part}")
        for part, needed in (("requests", ("cpu", "memory")), ("limits", ("memory",))):
            for r in needed:
                if r not in (res.get(part) or {}):
                    fail(f"{w}: no resources.{part}.{r}")
        for name in env_of(c):
            if name.startswith("TALLY_") and name not in known_settings:
                fail(f"{w}: env {name} is not a setting of src/config.rs")
        if not long_running:
            continue
        live, ready = c.get("livenessProbe"), c.get("readinessProbe")
        if not live or not ready:
            fail(f"{w}: a long-running container without liveness and readiness probes")
            continue
        if (live.get("httpGet") or {}).get("path") != "/livez":
            fail(f"{w}: liveness must be /livez (never the database), got {live}")
        if (ready.get("httpGet") or {}).get("path") != "/readyz":
            fail(f"{w}: readiness must be /readyz, got {ready}")
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        for probe in (live, ready, c.get("startupProbe")):
            if probe and probe["httpGet"]["port"] not in ports:
                fail(f"{w}: a probe on port {probe['httpGet']['port']}, which the container does not name")
        if "tally" in c.get("image", "") and c.get("args") == ["serve"]:
            grace = float(env_value(c, "TALLY_SHUTDOWN_GRACE_SEC") or 25)
            pre_stop = (((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds", 0)
            tgps = pod.get("terminationGracePeriodSeconds", 30)
            if not tgps > grace + pre_stop:
                fail(f"{w}: terminationGracePeriodSeconds {tgps} is not greater than "
                     f"TALLY_SHUTDOWN_GRACE_SEC {grace} + preStop {pre_stop}")
            if env_value(c, "TALLY_METRICS_ADDR") != "0.0.0.0:9090" or ports.get("metrics") != 9090:
                fail(f"{w}: metrics must listen on 0.0.0.0:9090 as port `metrics`")
            roles = (env_value(c, "TALLY_ROLES") or "").split(",")
            if "api" in roles and (env_value(c, "TALLY_API_ADDR") != "0.0.0.0:8080" or ports.get("http") != 8080):
                fail(f"{w}: the api role must listen on 0.0.0.0:8080 as port `http`")
            if "api" in roles and pre_stop <= 0:
                fail(f"{w}: an API pod without a preStop pause")


# ---------------------------------------------------------------- the rendering
def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def load_docs(render):
    return [d for d in yaml.safe_load_all(open(render, encoding="utf-8")) if d]


def cmd_render(name, render, chart, values_file, config_rs):
    docs = load_docs(render)
    checked = check_docs(docs, merged_values(chart, values_file), chart, settings_of(config_rs))
    kinds = {}
    for d in docs:
        kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
    workloads = sum(1 for d in docs if d["kind"] in WORKLOADS)
    finish(f"{name}: {len(docs)} objects ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))}); "
           f"{workloads} workloads restricted-compliant with probes, resources and drain time"
           + (f"; checked {', '.join(checked)}" if checked else ""))


def check_docs(docs, v, chart, known):
    """Records every problem of one rendering with `fail`; returns what it checked beyond
    the workloads (custom resources, the dashboard)."""
    checked = []
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
        if not d.get("metadata", {}).get("name"):
            fail(f"a {d['kind']} without a name")
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}

    def one(kind, obj_name):
        return next((d for d in by_kind.get(kind, []) if d["metadata"]["name"] == obj_name), None)

    hooks = lambda d: (d["metadata"].get("annotations") or {}).get("helm.sh/hook", "")
    workloads = [d for d in docs if d["kind"] in WORKLOADS]
    for d in workloads:
        where = f"{d['kind']}/{d['metadata']['name']}"
        pod = pod_spec_of(d)
        check_restricted(where, pod)
        check_tally_rules(where, d, pod, known)
        # Only the sweeper pods of the kubernetes backend mount a token.
        c0 = pod["containers"][0]
        roles = (env_value(c0, "TALLY_ROLES") or "").split(",")
        wants_token = "sweeper" in roles and v["leaderElection"]["backend"] == "kubernetes"
        if pod.get("automountServiceAccountToken") is not wants_token:
            fail(f"{where}: automountServiceAccountToken should be {wants_token}")
        sa = pod.get("serviceAccountName", "default")
        if sa != "default" and ("ServiceAccount", sa) not in names and v["serviceAccount"]["create"]:
            fail(f"{where}: ServiceAccount {sa} is not rendered")
        for vol in pod.get("volumes", []) or []:
            if "configMap" in vol and ("ConfigMap", vol["configMap"]["name"]) not in names:
                fail(f"{where}: ConfigMap {vol['configMap']['name']} is not rendered")
        for c in pod["containers"]:
            for e in c.get("env", []) or []:
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if not ref or e["name"] not in ("TALLY_DATABASE_URL", "TALLY_ADMIN_API_KEY", "TALLY_CALLBACK_SIGNING_SECRET"):
                    continue
                if v["secrets"]["existingSecret"]:
                    if ref["name"] != v["secrets"]["existingSecret"]:
                        fail(f"{where}: {e['name']} reads Secret {ref['name']}, not existingSecret")
                else:
                    secret = one("Secret", ref["name"])
                    if secret is None or ref["key"] not in secret.get("data", {}):
                        fail(f"{where}: {e['name']} reads {ref['name']}/{ref['key']}, which is not rendered")
                    elif d["kind"] == "Job" and hooks(d) and hooks(secret) != hooks(d):
                        fail(f"{where}: a hook Job reading Secret {ref['name']}, which is not a hook of the same phases")
                    elif d["kind"] == "Job" and hooks(d):
                        w_secret = int(secret["metadata"]["annotations"].get("helm.sh/hook-weight", "0"))
                        w_job = int(d["metadata"]["annotations"].get("helm.sh/hook-weight", "0"))
                        if not w_secret < w_job:
                            fail(f"{where}: its Secret's hook weight {w_secret} does not come before the Job's {w_job}")

    # Deployments and roles for the mode.
    deployments = {d["metadata"]["name"]: d for d in by_kind.get("Deployment", [])}
    roles = {n: env_value(pod_spec_of(d)["containers"][0], "TALLY_ROLES") for n, d in deployments.items()}
    fullname = "tally"
    if v["mode"] == "split":
        expected = {f"{fullname}-api": "api", f"{fullname}-worker": "worker", f"{fullname}-control": "generator,sweeper"}
    else:
        expected = {fullname: "api,generator,worker,sweeper"}
    if roles != expected:
        fail(f"Deployments and roles {roles}, expected {expected}")
    for n, d in deployments.items():
        key = {"api": "api", "worker": "worker", "control": "control"}.get(n.rsplit("-", 1)[-1], "allInOne")
        autoscaled = key == "worker" and (v["worker"]["autoscaling"]["enabled"] or v["worker"]["keda"]["enabled"])
        if autoscaled and "replicas" in d["spec"]:
            fail(f"Deployment/{n}: replicas set although an autoscaler owns them")
        if not autoscaled and d["spec"].get("replicas") != v[key]["replicas"]:
            fail(f"Deployment/{n}: replicas {d['spec'].get('replicas')}, values say {v[key]['replicas']}")
        c = pod_spec_of(d)["containers"][0]
        if env_value(c, "TALLY_DB_POOL_SIZE") != str(v[key]["dbPoolSize"]):
            fail(f"Deployment/{n}: TALLY_DB_POOL_SIZE {env_value(c, 'TALLY_DB_POOL_SIZE')}, values say {v[key]['dbPoolSize']}")
        if key == "control" and v["control"]["replicas"] < 2:
            fail(f"Deployment/{n}: fewer than 2 control replicas, no leader failover")
        anns = d["spec"]["template"]["metadata"].get("annotations", {})
        if "checksum/config" not in anns:
            fail(f"Deployment/{n}: no checksum/config annotation")
        if ("checksum/secret" in anns) == bool(v["secrets"]["existingSecret"]):
            fail(f"Deployment/{n}: checksum/secret belongs exactly to chart-created Secrets")
        spread = {t["topologyKey"] for t in pod_spec_of(d).get("topologySpreadConstraints", [])}
        if v["topologySpread"]["enabled"] and spread != {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}:
            fail(f"Deployment/{n}: topology spread over {spread}")

    # Every Deployment has a PDB; Services and PDBs select pods that exist.
    pod_labels = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in deployments.items()}
    for pdb in by_kind.get("PodDisruptionBudget", []):
        sel = pdb["spec"]["selector"]["matchLabels"]
        if not any(selects(sel, labels) for labels in pod_labels.values()):
            fail(f"PodDisruptionBudget/{pdb['metadata']['name']} selects no Deployment's pods")
        if ("minAvailable" in pdb["spec"]) == ("maxUnavailable" in pdb["spec"]):
            fail(f"PodDisruptionBudget/{pdb['metadata']['name']}: exactly one of minAvailable, maxUnavailable")
    for n in deployments:
        if not any(selects(p["spec"]["selector"]["matchLabels"], pod_labels[n]) for p in by_kind.get("PodDisruptionBudget", [])):
            fail(f"Deployment/{n} has no PodDisruptionBudget")
    for svc in by_kind.get("Service", []):
        sel = svc["spec"].get("selector", {})
        targets = [n for n, labels in pod_labels.items() if selects(sel, labels)]
        if not targets:
            fail(f"Service/{svc['metadata']['name']} selects no Deployment's pods")
        for port in svc["spec"]["ports"]:
            for t in targets:
                cports = {p["name"] for p in pod_spec_of(deployments[t])["containers"][0].get("ports", [])}
                if svc["metadata"]["name"] != f"{fullname}-metrics" and port["targetPort"] not in cports:
                    fail(f"Service/{svc['metadata']['name']}: Deployment/{t} has no port {port['targetPort']}")
    api_svc = one("Service", fullname)
    if api_svc is None or api_svc["spec"]["type"] != v["api"]["service"]["type"]:
        fail(f"no API Service {fullname} of type {v['api']['service']['type']}")
    metrics_svc = one("Service", f"{fullname}-metrics")
    if metrics_svc is None or sorted(n for n, l in pod_labels.items() if selects(metrics_svc["spec"]["selector"], l)) != sorted(deployments):
        fail("the metrics Service does not select every Deployment's pods")

    # The migration Job.
    jobs = by_kind.get("Job", [])
    if v["migration"]["enabled"]:
        job = one("Job", f"{fullname}-migrate")
        if job is None:
            fail("no migration Job")
        else:
            c = pod_spec_of(job)["containers"][0]
            if c.get("args") != ["migrate"]:
                fail(f"Job/{fullname}-migrate runs {c.get('args')}, not migrate")
            h = hooks(job)
            if v["migration"]["hook"] and set(h.split(",")) != {"pre-install", "pre-upgrade"}:
                fail(f"Job/{fullname}-migrate: hooks {h!r}, expected pre-install,pre-upgrade")
            if not v["migration"]["hook"] and h:
                fail(f"Job/{fullname}-migrate: migration.hook=false but annotated {h!r}")
            if pod_spec_of(job).get("serviceAccountName"):
                fail("the migration Job names a ServiceAccount that a pre-install hook cannot rely on")
    elif jobs:
        fail("migration disabled, yet a Job is rendered")

    # Secrets: only chart-created ones, never with an existingSecret.
    secrets = by_kind.get("Secret", [])
    if v["secrets"]["existingSecret"]:
        if secrets:
            fail(f"existingSecret given, yet the chart renders Secrets {[s['metadata']['name'] for s in secrets]}")
    else:
        main = one("Secret", fullname)
        hook = one("Secret", f"{fullname}-migrate")
        if main is None:
            fail("no chart-created Secret")
        if v["migration"]["enabled"] and v["migration"]["hook"]:
            if hook is None or set(hook.get("data", {})) != {v["secrets"]["keys"]["databaseUrl"]}:
                fail("the migration hook Secret is missing or holds more than the database URL")
            elif main and hook["data"] != {k: main["data"][k] for k in hook["data"]}:
                fail("the migration hook Secret differs from the chart's Secret")
            elif "hook-succeeded" not in hook["metadata"]["annotations"].get("helm.sh/hook-delete-policy", ""):
                fail("the migration hook Secret outlives a successful migration")

    # Optional objects: present exactly when enabled.
    split = v["mode"] == "split"
    want = {
        "HorizontalPodAutoscaler": split and v["worker"]["autoscaling"]["enabled"],
        "ScaledObject": split and v["worker"]["keda"]["enabled"],
        "TriggerAuthentication": split and v["worker"]["keda"]["enabled"],
        "NetworkPolicy": v["networkPolicy"]["enabled"],
        "ServiceMonitor": v["monitoring"]["serviceMonitor"]["enabled"],
        "PrometheusRule": v["monitoring"]["prometheusRule"]["enabled"],
        "Role": v["leaderElection"]["backend"] == "kubernetes",
        "RoleBinding": v["leaderElection"]["backend"] == "kubernetes",
        "ServiceAccount": v["serviceAccount"]["create"],
    }
    for kind, enabled in want.items():
        if bool(by_kind.get(kind)) != bool(enabled):
            fail(f"{kind}: {'missing' if enabled else 'rendered although not enabled'}")
    dashboards = [d for d in by_kind.get("ConfigMap", []) if "tally.json" in d.get("data", {})]
    if bool(dashboards) != v["monitoring"]["grafanaDashboard"]["enabled"]:
        fail("the dashboard ConfigMap is rendered exactly when grafanaDashboard.enabled")
    kinds_cm = one("ConfigMap", f"{fullname}-kinds")
    if bool(kinds_cm) != bool(v.get("kinds")):
        fail("the kinds ConfigMap is rendered exactly when kinds are given")
    elif kinds_cm and json.loads(kinds_cm["data"]["kinds.json"]) != v["kinds"]:
        fail("kinds.json differs from the kinds in values")
    tests = [d for d in docs if hooks(d) == "test"]
    if bool(tests) != v["tests"]["enabled"]:
        fail("the helm test pod is rendered exactly when tests.enabled")

    # HPA.
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        if hpa["spec"]["scaleTargetRef"]["name"] not in deployments:
            fail(f"HorizontalPodAutoscaler/{hpa['metadata']['name']} targets no rendered Deployment")
    # KEDA.
    for so in by_kind.get("ScaledObject", []):
        checked.append("ScaledObject")
        where = f"ScaledObject/{so['metadata']['name']}"
        if so.get("apiVersion") != "keda.sh/v1alpha1":
            fail(f"{where}: apiVersion {so.get('apiVersion')}")
        spec = so.get("spec", {})
        if spec.get("scaleTargetRef", {}).get("name") != f"{fullname}-worker":
            fail(f"{where}: does not target the worker Deployment")
        if not spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100):
            fail(f"{where}: minReplicaCount above maxReplicaCount")
        triggers = spec.get("triggers") or []
        if len(triggers) != 1 or triggers[0].get("type") != "postgresql":
            fail(f"{where}: expected one postgresql trigger")
            continue
        meta = triggers[0].get("metadata", {})
        for key in ("query", "targetQueryValue"):
            if not isinstance(meta.get(key), str) or not meta.get(key):
                fail(f"{where}: trigger metadata.{key} must be a non-empty string")
        if any(not isinstance(x, str) for x in meta.values()):
            fail(f"{where}: KEDA trigger metadata values must all be strings")
        q = meta.get("query", "")
        if "order_tasks" not in q or "PENDING" not in q or "FAILED_RETRYING" not in q or "retry_after" not in q:
            fail(f"{where}: the query does not count claimable order_tasks")
        auth = (triggers[0].get("authenticationRef") or {}).get("name")
        ta = one("TriggerAuthentication", auth)
        if ta is None:
            fail(f"{where}: authenticationRef {auth} is not rendered")
    for ta in by_kind.get("TriggerAuthentication", []):
        checked.append("TriggerAuthentication")
        refs = ta.get("spec", {}).get("secretTargetRef") or []
        secret = v["secrets"]["existingSecret"] or fullname
        if refs != [{"parameter": "connection", "name": secret, "key": v["secrets"]["keys"]["databaseUrl"]}]:
            fail(f"TriggerAuthentication/{ta['metadata']['name']}: secretTargetRef {refs}")
    alerts = yaml.safe_load(open(f"{chart}/files/alerts.yml", encoding="utf-8"))
    # ServiceMonitor.
    for sm in by_kind.get("ServiceMonitor", []):
        checked.append("ServiceMonitor")
        where = f"ServiceMonitor/{sm['metadata']['name']}"
        spec = sm.get("spec", {})
        if sm.get("apiVersion") != "monitoring.coreos.com/v1":
            fail(f"{where}: apiVersion {sm.get('apiVersion')}")
        sel = (spec.get("selector") or {}).get("matchLabels")
        matched = [s for s in by_kind.get("Service", []) if selects(sel, s["metadata"].get("labels", {}))]
        if [s["metadata"]["name"] for s in matched] != [f"{fullname}-metrics"]:
            fail(f"{where}: selects Services {[s['metadata']['name'] for s in matched]}, not exactly the metrics Service")
        endpoints = spec.get("endpoints") or []
        if not endpoints:
            fail(f"{where}: no endpoints")
        for ep in endpoints:
            if matched and ep.get("port") not in {p["name"] for p in matched[0]["spec"]["ports"]}:
                fail(f"{where}: endpoint port {ep.get('port')} is not a port of the metrics Service")
            if ep.get("path", "/metrics") != "/metrics":
                fail(f"{where}: path {ep.get('path')}")
            # The rules select the scrape job by name: the relabelled job must be that one.
            jobs = {r.get("replacement") for r in ep.get("relabelings", []) if r.get("targetLabel") == "job"}
            exprs = " ".join(r.get("expr", "") for g in alerts["groups"] for r in g["rules"])
            wanted = set(re.findall(r'\bup\{job="([^"]+)"\}', exprs))
            if not wanted or jobs != wanted:
                fail(f"{where}: scrape job {jobs or 'named after the Service'}, the alert rules select {wanted}")
        for k, val in (v["monitoring"]["serviceMonitor"].get("labels") or {}).items():
            if sm["metadata"]["labels"].get(k) != val:
                fail(f"{where}: label {k} missing")
    # PrometheusRule: its spec is alerts.yml.
    for pr in by_kind.get("PrometheusRule", []):
        checked.append("PrometheusRule spec = alerts.yml")
        where = f"PrometheusRule/{pr['metadata']['name']}"
        if pr.get("apiVersion") != "monitoring.coreos.com/v1":
            fail(f"{where}: apiVersion {pr.get('apiVersion')}")
        if pr.get("spec") != alerts:
            fail(f"{where}: spec differs from files/alerts.yml (deploy/prometheus/alerts.yml)")
        groups = pr.get("spec", {}).get("groups") or []
        if not groups or any(not g.get("name") or not g.get("rules") for g in groups):
            fail(f"{where}: every group needs a name and rules")
        for g in groups:
            for r in g.get("rules", []):
                if not r.get("expr") or not (r.get("alert") or r.get("record")):
                    fail(f"{where}: a rule without alert/record and expr in group {g.get('name')}")
    # Grafana dashboard: the ConfigMap holds tally.json.
    dashboard = json.load(open(f"{chart}/files/tally.json", encoding="utf-8"))
    for cm in dashboards:
        checked.append("dashboard = tally.json")
        where = f"ConfigMap/{cm['metadata']['name']}"
        if json.loads(cm["data"]["tally.json"]) != dashboard:
            fail(f"{where}: tally.json differs from files/tally.json (deploy/grafana/tally.json)")
        for k, val in v["monitoring"]["grafanaDashboard"]["labels"].items():
            if cm["metadata"]["labels"].get(k) != val:
                fail(f"{where}: label {k}={val!r} missing (Grafana's sidecar finds dashboards by it)")
        ns = v["monitoring"]["grafanaDashboard"].get("namespace") or "tally"
        if cm["metadata"].get("namespace") != ns:
            fail(f"{where}: namespace {cm['metadata'].get('namespace')}, expected {ns}")
    # Leader election RBAC: leases only, get/update limited to the lease name.
    for role in by_kind.get("Role", []):
        lease = v["leaderElection"]["leaseName"]
        ns = v["leaderElection"].get("leaseNamespace") or "tally"
        if role["metadata"].get("namespace") != ns:
            fail(f"Role/{role['metadata']['name']}: namespace {role['metadata'].get('namespace')}, the lease is in {ns}")
        granted = set()
        for rule in role["rules"]:
            if rule.get("apiGroups") != ["coordination.k8s.io"] or rule.get("resources") != ["leases"]:
                fail(f"Role/{role['metadata']['name']}: a rule beyond coordination.k8s.io leases: {rule}")
            for verb in rule["verbs"]:
                granted.add(verb)
                if verb != "create" and rule.get("resourceNames") != [lease]:
                    fail(f"Role/{role['metadata']['name']}: {verb} not limited to the lease {lease}")
        if granted != {"get", "create", "update"}:
            fail(f"Role/{role['metadata']['name']}: verbs {sorted(granted)}, expected create, get, update")
        for d in deployments.values():
            c = pod_spec_of(d)["containers"][0]
            if "sweeper" in (env_value(c, "TALLY_ROLES") or ""):
                if env_value(c, "TALLY_LEADER_ELECTION") != "kubernetes" or env_value(c, "TALLY_LEADER_LEASE_NAME") != lease \
                        or env_value(c, "TALLY_LEADER_LEASE_NAMESPACE") != ns:
                    fail(f"Deployment/{d['metadata']['name']}: leader-election env does not match the Role")
    for rb in by_kind.get("RoleBinding", []):
        if ("Role", rb["roleRef"]["name"]) not in names:
            fail(f"RoleBinding/{rb['metadata']['name']}: Role {rb['roleRef']['name']} is not rendered")
        subjects = [(s["kind"], s["name"], s.get("namespace")) for s in rb["subjects"]]
        sa = v["serviceAccount"].get("name") or fullname
        if subjects != [("ServiceAccount", sa, "tally")]:
            fail(f"RoleBinding/{rb['metadata']['name']}: subjects {subjects}")
    # NetworkPolicy: every Tally pod is selected; API/metrics ports only.
    if by_kind.get("NetworkPolicy"):
        for n, labels in pod_labels.items():
            if not any(selects(p["spec"]["podSelector"]["matchLabels"], labels) for p in by_kind["NetworkPolicy"]):
                fail(f"Deployment/{n}: no NetworkPolicy selects its pods")
        for p in by_kind["NetworkPolicy"]:
            ports = {pt["port"] for rule in p["spec"].get("ingress", []) for pt in rule.get("ports", [])}
            if not ports <= {8080, 9090}:
                fail(f"NetworkPolicy/{p['metadata']['name']}: ingress ports {ports}")
            if ("Egress" in p["spec"]["policyTypes"]) != v["networkPolicy"]["egress"]["enabled"]:
                fail(f"NetworkPolicy/{p['metadata']['name']}: policyTypes {p['spec']['policyTypes']}")

    return checked


# ---------------------------------------------------------------- self-test
def cmd_selftest(render, chart, values_file, config_rs):
    """The checks must catch what they are for: each mutation of a good rendering (the
    everything-enabled one) must be reported."""
    good = load_docs(render)
    v = merged_values(chart, values_file)
    known = settings_of(config_rs)

    def pod_of(docs, kind, name_part):
        d = next(d for d in docs if d["kind"] == kind and name_part in d["metadata"]["name"])
        return pod_spec_of(d)

    def first(docs, kind):
        return next(d for d in docs if d["kind"] == kind)

    def set_env(pod, name, value):
        for e in pod["containers"][0]["env"]:
            if e["name"] == name:
                e["value"] = value

    mutations = {
        "hostNetwork": lambda ds: pod_of(ds, "Deployment", "worker").__setitem__("hostNetwork", True),
        "privileged": lambda ds: pod_of(ds, "Job", "migrate")["containers"][0]["securityContext"].__setitem__("privileged", True),
        "privilege escalation": lambda ds: pod_of(ds, "Pod", "test")["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
        "root user": lambda ds: pod_of(ds, "Deployment", "api")["securityContext"].__setitem__("runAsUser", 0),
        "runAsNonRoot false": lambda ds: pod_of(ds, "Deployment", "api")["containers"][0]["securityContext"].__setitem__("runAsNonRoot", False),
        "capability added": lambda ds: pod_of(ds, "Deployment", "control")["containers"][0]["securityContext"]["capabilities"].__setitem__("add", ["NET_ADMIN"]),
        "no drop ALL": lambda ds: pod_of(ds, "Deployment", "control")["containers"][0]["securityContext"].pop("capabilities"),
        "seccomp Unconfined": lambda ds: pod_of(ds, "Deployment", "worker")["securityContext"].__setitem__("seccompProfile", {"type": "Unconfined"}),
        "hostPath volume": lambda ds: pod_of(ds, "Deployment", "worker").setdefault("volumes", []).append({"name": "h", "hostPath": {"path": "/"}}),
        "hostPort": lambda ds: pod_of(ds, "Deployment", "api")["containers"][0]["ports"][0].__setitem__("hostPort", 8080),
        "writable root": lambda ds: pod_of(ds, "Deployment", "api")["containers"][0]["securityContext"].__setitem__("readOnlyRootFilesystem", False),
        "no limits": lambda ds: pod_of(ds, "Deployment", "worker")["containers"][0]["resources"].pop("limits"),
        "no readiness": lambda ds: pod_of(ds, "Deployment", "worker")["containers"][0].pop("readinessProbe"),
        "liveness on /readyz": lambda ds: pod_of(ds, "Deployment", "worker")["containers"][0]["livenessProbe"]["httpGet"].__setitem__("path", "/readyz"),
        "short termination grace": lambda ds: pod_of(ds, "Deployment", "api").__setitem__("terminationGracePeriodSeconds", 30),
        "unknown TALLY_ setting": lambda ds: pod_of(ds, "Deployment", "api")["containers"][0]["env"].append({"name": "TALLY_NO_SUCH_SETTING", "value": "1"}),
        "token on a worker": lambda ds: pod_of(ds, "Deployment", "worker").__setitem__("automountServiceAccountToken", True),
        "alert rule drift": lambda ds: first(ds, "PrometheusRule")["spec"]["groups"][0]["rules"][0].__setitem__("for", "1m"),
        "dashboard drift": lambda ds: next(d for d in ds if d["kind"] == "ConfigMap" and "tally.json" in d["data"])["data"].__setitem__("tally.json", "{}"),
        "KEDA query": lambda ds: first(ds, "ScaledObject")["spec"]["triggers"][0]["metadata"].__setitem__("query", "SELECT 1"),
        "ServiceMonitor port": lambda ds: first(ds, "ServiceMonitor")["spec"]["endpoints"][0].__setitem__("port", "web"),
        "scrape job name": lambda ds: first(ds, "ServiceMonitor")["spec"]["endpoints"][0].pop("relabelings"),
        "lease Role verbs": lambda ds: first(ds, "Role")["rules"].append({"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["delete"]}),
        "PDB selector": lambda ds: first(ds, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].__setitem__("app.kubernetes.io/component", "nothing"),
        "pool size": lambda ds: set_env(pod_of(ds, "Deployment", "worker"), "TALLY_DB_POOL_SIZE", "99"),
    }
    missed = []
    for label, mutate in mutations.items():
        docs = copy.deepcopy(good)
        mutate(docs)
        errors.clear()
        check_docs(docs, v, chart, known)
        if not errors:
            missed.append(label)
    errors.clear()
    check_docs(copy.deepcopy(good), v, chart, known)
    if errors:
        return finish("")
    for label in missed:
        fail(f"the checks did not notice: {label}")
    finish(f"self-test: all {len(mutations)} deliberate faults in a good rendering were caught "
           f"({', '.join(mutations)})")


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    {"schema": cmd_schema, "render": cmd_render, "selftest": cmd_selftest}[command](*args)
