{{/* vim: set filetype=mustache: */}}

{{- define "tally.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-tally, or the release name alone when it already contains the chart name. */}}
{{- define "tally.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "tally.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tally.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tally.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tally.labels" -}}
helm.sh/chart: {{ include "tally.chart" . }}
{{ include "tally.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tally
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels of one component: (dict "root" $ "component" "worker"). */}}
{{- define "tally.componentLabels" -}}
{{ include "tally.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "tally.componentSelectorLabels" -}}
{{ include "tally.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "tally.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "tally.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tally.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret the pods read: yours (existingSecret) or the chart's. */}}
{{- define "tally.secretName" -}}
{{- default (include "tally.fullname" .) .Values.secrets.existingSecret -}}
{{- end -}}

{{/* The Secret the migration Job reads (see values.yaml, secrets.databaseUrl). */}}
{{- define "tally.migrationSecretName" -}}
{{- if and (not .Values.secrets.existingSecret) .Values.migration.hook -}}
{{- printf "%s-migrate" (include "tally.fullname" .) -}}
{{- else -}}
{{- include "tally.secretName" . -}}
{{- end -}}
{{- end -}}

{{- define "tally.leaseNamespace" -}}
{{- default .Release.Namespace .Values.leaderElection.leaseNamespace -}}
{{- end -}}

{{- define "tally.kindsEnabled" -}}
{{- if or .Values.kinds .Values.kindsSecret.name }}true{{ end -}}
{{- end -}}

{{/*
The Deployments of the chosen mode, as YAML: key (the values block), name (the
component label), suffix (of the Deployment's name), roles (TALLY_ROLES) and what they run.
*/}}
{{- define "tally.components" -}}
{{- if eq .Values.mode "all-in-one" }}
components:
  - {key: allInOne, name: all-in-one, suffix: "", roles: "api,generator,worker,sweeper", api: true, worker: true, sweeper: true}
{{- else }}
components:
  - {key: api, name: api, suffix: "-api", roles: "api", api: true, worker: false, sweeper: false}
  - {key: worker, name: worker, suffix: "-worker", roles: "worker", api: false, worker: true, sweeper: false}
  - {key: control, name: control, suffix: "-control", roles: "generator,sweeper", api: false, worker: false, sweeper: true}
{{- end }}
{{- end -}}

{{/* Whether a component's pods mount a service-account token (kubernetes leader election). */}}
{{- define "tally.needsToken" -}}
{{- if and .c.sweeper (eq .root.Values.leaderElection.backend "kubernetes") }}true{{ end -}}
{{- end -}}

{{/* preStop pause of a component: only pods that serve the API. */}}
{{- define "tally.preStop" -}}
{{- if .c.api }}{{ int .root.Values.shutdown.preStopSleepSeconds }}{{ else }}0{{ end -}}
{{- end -}}

{{/*
terminationGracePeriodSeconds of a component: graceSeconds (rounded up) + preStop + 10,
or the value given, which must exceed graceSeconds + preStop.
*/}}
{{- define "tally.terminationGrace" -}}
{{- $grace := .root.Values.shutdown.graceSeconds | float64 -}}
{{- $preStop := include "tally.preStop" . | int -}}
{{- $drain := addf $grace $preStop -}}
{{- $given := .root.Values.shutdown.terminationGracePeriodSeconds -}}
{{- if kindIs "invalid" $given -}}
{{- add (ceil $grace | int) $preStop 10 -}}
{{- else if le ($given | float64) $drain -}}
{{- fail (printf "shutdown.terminationGracePeriodSeconds (%v) must be greater than shutdown.graceSeconds + the preStop pause (%v + %d = %v s for the %s pods): Kubernetes would kill Tally before it hands unfinished tasks back" $given $grace $preStop $drain .c.name) -}}
{{- else -}}
{{- $given | int -}}
{{- end -}}
{{- end -}}

{{/* An environment value: integers without exponent, booleans and strings as they are. */}}
{{- define "tally.envValue" -}}
{{- if kindIs "float64" . -}}
{{- if eq . (floor .) -}}{{ int64 . }}{{- else -}}{{ . }}{{- end -}}
{{- else -}}
{{- . -}}
{{- end -}}
{{- end -}}

{{/* A secretKeyRef EnvVar: (dict "name" N "secret" S "key" K "optional" B). */}}
{{- define "tally.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: {{ .key }}
      {{- if .optional }}
      optional: true
      {{- end }}
{{- end -}}

{{/*
Environment of a component's container: (dict "root" $ "c" <component>). The global and
per-component `config`, the settings the chart owns, the secrets, then extraEnv; a name
given twice fails the render.
*/}}
{{- define "tally.env" -}}
{{- $root := .root -}}
{{- $c := .c -}}
{{- $v := index $root.Values $c.key -}}
{{- $config := merge (deepCopy (default dict $v.config)) (deepCopy (default dict $root.Values.config)) -}}
{{- $env := list -}}
{{- range $k := keys $config | sortAlpha -}}
{{- $env = append $env (dict "name" $k "value" (include "tally.envValue" (get $config $k))) -}}
{{- end -}}
{{- $env = append $env (dict "name" "TALLY_ROLES" "value" $c.roles) -}}
{{- $env = append $env (dict "name" "TALLY_METRICS_ADDR" "value" "0.0.0.0:9090") -}}
{{- if $c.api -}}
{{- $env = append $env (dict "name" "TALLY_API_ADDR" "value" "0.0.0.0:8080") -}}
{{- end -}}
{{- $env = append $env (dict "name" "TALLY_DB_POOL_SIZE" "value" (include "tally.envValue" $v.dbPoolSize)) -}}
{{- $env = append $env (dict "name" "TALLY_SHUTDOWN_GRACE_SEC" "value" (include "tally.envValue" $root.Values.shutdown.graceSeconds)) -}}
{{- if include "tally.kindsEnabled" $root -}}
{{- $env = append $env (dict "name" "TALLY_KINDS_FILE" "value" "/etc/tally/kinds/kinds.json") -}}
{{- end -}}
{{- if $c.sweeper -}}
{{- $env = append $env (dict "name" "TALLY_LEADER_ELECTION" "value" $root.Values.leaderElection.backend) -}}
{{- if eq $root.Values.leaderElection.backend "kubernetes" -}}
{{- $env = append $env (dict "name" "TALLY_LEADER_LEASE_NAME" "value" $root.Values.leaderElection.leaseName) -}}
{{- $env = append $env (dict "name" "TALLY_LEADER_LEASE_NAMESPACE" "value" (include "tally.leaseNamespace" $root)) -}}
{{- end -}}
{{- end -}}
{{- $secret := include "tally.secretName" $root -}}
{{- $existing := $root.Values.secrets.existingSecret -}}
{{- $keys := $root.Values.secrets.keys -}}
{{- $secretEnv := list (dict "name" "TALLY_DATABASE_URL" "secret" $secret "key" $keys.databaseUrl "optional" false) -}}
{{- if and $c.api (or $existing $root.Values.secrets.adminApiKey) -}}
{{- $secretEnv = append $secretEnv (dict "name" "TALLY_ADMIN_API_KEY" "secret" $secret "key" $keys.adminApiKey "optional" (not (empty $existing))) -}}
{{- end -}}
{{- if and $c.worker (or $existing $root.Values.secrets.callbackSigningSecret) -}}
{{- $secretEnv = append $secretEnv (dict "name" "TALLY_CALLBACK_SIGNING_SECRET" "secret" $secret "key" $keys.callbackSigningSecret "optional" (not (empty $existing))) -}}
{{- end -}}
{{- $extra := concat (default list $root.Values.extraEnv) (default list $v.extraEnv) -}}
{{- $seen := dict -}}
{{- range $e := concat $env $secretEnv $extra -}}
{{- if hasKey $seen $e.name -}}
{{- fail (printf "environment variable %s is given twice for the %s pods (extraEnv cannot override what the chart sets; use the dedicated value, see values.yaml)" $e.name $c.name) -}}
{{- end -}}
{{- $_ := set $seen $e.name true -}}
{{- end -}}
{{- with $env }}
{{ toYaml . }}
{{- end }}
{{- range $secretEnv }}
{{ include "tally.secretEnv" . }}
{{- end }}
{{- with $extra }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Restricted pod and container security contexts. */}}
{{- define "tally.podSecurityContext" -}}
runAsNonRoot: true
{{- with .Values.podSecurity.runAsUser }}
runAsUser: {{ . }}
{{- end }}
{{- with .Values.podSecurity.runAsGroup }}
runAsGroup: {{ . }}
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "tally.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* topologySpreadConstraints for one component: (dict "root" $ "component" name). */}}
{{- define "tally.topologySpread" -}}
{{- if .root.Values.topologySpread.enabled }}
{{- range $key := list "topology.kubernetes.io/zone" "kubernetes.io/hostname" }}
- maxSkew: {{ $.root.Values.topologySpread.maxSkew }}
  topologyKey: {{ $key }}
  whenUnsatisfiable: ScheduleAnyway
  labelSelector:
    matchLabels:
      {{- include "tally.componentSelectorLabels" $ | nindent 6 }}
  matchLabelKeys:
    - pod-template-hash
{{- end }}
{{- end }}
{{- end -}}

{{/*
Render-time checks of what the schema cannot express. Included once, by deployment.yaml.
*/}}
{{- define "tally.validate" -}}
{{- $v := .Values -}}
{{- if not (has $v.mode (list "split" "all-in-one")) -}}
{{- fail (printf "mode must be split or all-in-one, got %q" (toString $v.mode)) -}}
{{- end -}}
{{- if and (not $v.secrets.existingSecret) (not $v.secrets.databaseUrl) -}}
{{- fail "no database URL: set secrets.existingSecret to a Secret holding it (key secrets.keys.databaseUrl, default database-url), or secrets.databaseUrl for a chart-created Secret" -}}
{{- end -}}
{{- if $v.secrets.existingSecret -}}
{{- if or $v.secrets.databaseUrl $v.secrets.adminApiKey $v.secrets.callbackSigningSecret -}}
{{- fail "secrets.existingSecret is set: leave secrets.databaseUrl, secrets.adminApiKey and secrets.callbackSigningSecret empty (they would be ignored)" -}}
{{- end -}}
{{- else -}}
{{- if not (regexMatch "^postgres(ql)?://" $v.secrets.databaseUrl) -}}
{{- fail "secrets.databaseUrl must start with postgres:// or postgresql://" -}}
{{- end -}}
{{- end -}}
{{- if and $v.kinds $v.kindsSecret.name -}}
{{- fail "give kinds either inline (kinds) or from a Secret (kindsSecret.name), not both" -}}
{{- end -}}
{{- if and $v.worker.autoscaling.enabled $v.worker.keda.enabled -}}
{{- fail "worker.autoscaling (HPA) and worker.keda (KEDA ScaledObject) are mutually exclusive: KEDA manages its own HPA" -}}
{{- end -}}
{{- if and (eq $v.mode "all-in-one") (or $v.worker.autoscaling.enabled $v.worker.keda.enabled) -}}
{{- fail "worker.autoscaling and worker.keda scale the worker Deployment of mode split; mode all-in-one has none" -}}
{{- end -}}
{{- if and $v.worker.autoscaling.enabled (gt (int $v.worker.autoscaling.minReplicas) (int $v.worker.autoscaling.maxReplicas)) -}}
{{- fail "worker.autoscaling.minReplicas must not exceed worker.autoscaling.maxReplicas" -}}
{{- end -}}
{{- if and $v.worker.keda.enabled (gt (int $v.worker.keda.minReplicaCount) (int $v.worker.keda.maxReplicaCount)) -}}
{{- fail "worker.keda.minReplicaCount must not exceed worker.keda.maxReplicaCount" -}}
{{- end -}}
{{- if and (eq $v.mode "split") (lt (int $v.control.replicas) 1) -}}
{{- fail "control.replicas must be at least 1: the generator and the sweeper run there (2 or more, so that leadership fails over)" -}}
{{- end -}}
{{- if and (eq $v.leaderElection.backend "kubernetes") (not $v.serviceAccount.create) (not $v.serviceAccount.name) -}}
{{- fail "leaderElection.backend kubernetes needs a ServiceAccount: keep serviceAccount.create true or name one that the chart's RoleBinding can bind" -}}
{{- end -}}
{{- range $key := list "api" "worker" "control" "allInOne" -}}
{{- $pdb := index $v $key "pdb" -}}
{{- if and $pdb.enabled (hasKey $pdb "minAvailable") (hasKey $pdb "maxUnavailable") -}}
{{- fail (printf "%s.pdb: set minAvailable or maxUnavailable, not both (set the other to null)" $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}
