{{/* Names, labels and the facts about each service the chart relies on. */}}

{{- define "forfall.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "forfall.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "forfall.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "forfall.labels" -}}
helm.sh/chart: {{ include "forfall.chart" . }}
app.kubernetes.io/name: {{ include "forfall.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: forfall
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* What selects every pod of the release. */}}
{{- define "forfall.releaseSelector" -}}
app.kubernetes.io/name: {{ include "forfall.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* What selects one component's pods; called with (dict "root" $ "component" "ingest"). */}}
{{- define "forfall.selector" -}}
{{ include "forfall.releaseSelector" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "forfall.componentName" -}}
{{- printf "%s-%s" (include "forfall.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "forfall.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "forfall.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The services in their start order, and each one's port offset (fixed in its binary). */}}
{{- define "forfall.componentOrder" -}}
ingest watcher dispatch matcher handoff portal
{{- end }}

{{- define "forfall.portOffset" -}}
{{- get (dict "ingest" 1 "watcher" 2 "dispatch" 3 "matcher" 4 "handoff" 5 "portal" 6) . }}
{{- end }}

{{/* The topic whose consumer-group lag measures a component's backlog (KEDA's trigger). */}}
{{- define "forfall.lagTopic" -}}
{{- $topics := dict "ingest" "billing.invoice-events.v1" "watcher" "forfall.invoices.v1" "dispatch" "forfall.journey.actions.v1" "matcher" "payments.events.v1" "handoff" "forfall.handoff.cases.v1" "portal" "forfall.journey.events.v1" -}}
{{- $overrides := (.root.Values.config.topics | default dict) -}}
{{- $key := get (dict "ingest" "billing_invoice_events" "watcher" "invoices" "dispatch" "journey_actions" "matcher" "payments" "handoff" "handoff_cases" "portal" "journey_events") .component -}}
{{- printf "%s%s" ($overrides.prefix | default "") (get $overrides $key | default (get $topics .component)) }}
{{- end }}

{{- define "forfall.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The configuration file (JSON: Helm holds every number of its values as a float, and its
TOML would write 500.0 where a count is meant). Its checksum rolls the pods when it changes. */}}
{{- define "forfall.configFile" -}}
{{- $text := toPrettyJson (.Values.config | default dict) -}}
{{- $secret := "\"[A-Za-z0-9_.-]*(secret|password|token|api_key)\"\\s*:" -}}
{{- if regexMatch $secret $text -}}
{{- fail (printf "config holds a secret (%s): secrets come from existing Secrets through secretEnv, never from values" (regexFind $secret $text | trimSuffix ":" | trim)) -}}
{{- end -}}
{{- $text -}}
{{- end }}

{{/* Refuses settings that cannot work together, before anything is rendered. */}}
{{- define "forfall.validate" -}}
{{- range $component := splitList " " (include "forfall.componentOrder" .) }}
{{- $c := get $.Values.components $component }}
{{- if and $c.enabled $c.autoscaling.hpa.enabled $c.autoscaling.keda.enabled }}
{{- fail (printf "components.%s.autoscaling: hpa and keda are both enabled; choose one (KEDA's ScaledObject makes its own HPA, and two autoscalers fight over the replicas)" $component) }}
{{- end }}
{{- end }}
{{- range $i, $e := .Values.secretEnv }}
{{- range $e.components | default list }}
{{- if not (has . (splitList " " (include "forfall.componentOrder" $))) }}
{{- fail (printf "secretEnv[%d] (%s) names component %q; the components are %s" $i $e.name . (include "forfall.componentOrder" $)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
