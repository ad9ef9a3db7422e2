{{/* The chart name, or nameOverride. */}}
{{- define "pushcluster.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: the prefix of every object it owns. */}}
{{- define "pushcluster.fullname" -}}
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

{{- define "pushcluster.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object of the operator. */}}
{{- define "pushcluster.labels" -}}
{{ include "pushcluster.selectorLabels" . }}
{{ include "pushcluster.releaseLabels" . }}
{{- end }}

{{/* Labels of everything this release installs. */}}
{{- define "pushcluster.releaseLabels" -}}
helm.sh/chart: {{ include "pushcluster.chart" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pushcluster
{{- end }}

{{/*
The operator pods' selector. Its name differs from the fleets' pods
(app.kubernetes.io/name: pushcluster), so a fleet's Services never select
the operator, whatever the names.
*/}}
{{- define "pushcluster.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pushcluster.name" . }}-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "pushcluster.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pushcluster.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "pushcluster.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The leader Lease's name. */}}
{{- define "pushcluster.leaseName" -}}
{{- printf "%s-leader" (include "pushcluster.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The operator's rules for running fleets; nothing more. A test keeps them
equal to the requests the operator makes.
*/}}
{{- define "pushcluster.fleetRules" -}}
# Its own resource: watched, and its status written.
- apiGroups: ["pushcluster.io"]
  resources: ["pushclusters"]
  verbs: ["list", "watch"]
- apiGroups: ["pushcluster.io"]
  resources: ["pushclusters/status"]
  verbs: ["patch"]
# The children: watched, and server-side applied (a first apply is a create).
- apiGroups: [""]
  resources: ["configmaps", "serviceaccounts", "services"]
  verbs: ["list", "watch", "create", "patch"]
# Deployments also read (get) for the live replicas autoscaling starts from.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch"]
# The push API's generated token Secret: created once, never read.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["list", "watch", "create", "patch"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["list", "watch", "create", "patch"]
# The fleet's Role grants this to comets and jobs (discovery); Kubernetes
# lets only a holder grant it.
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["get", "list", "watch"]
# spec.monitoring.serviceMonitor: applied when on, deleted when turned off.
- apiGroups: ["monitoring.coreos.com"]
  resources: ["servicemonitors"]
  verbs: ["create", "patch", "delete"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
# Autoscaling: the fleet's pods are listed (their /metrics read) and comets
# annotated with a deletion cost before a scale-down; HPAs that target a
# PushCluster are looked for (a conflict condition).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "patch"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["list"]
{{- end }}
