{{/* Chart name, at most 63 characters. */}}
{{- define "shardguard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Name of the operator's objects: <release>-shardguard, or the release name when it
already contains the chart name. 52 characters leave room for suffixes. */}}
{{- define "shardguard.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "shardguard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of the operator pods; the Deployment and Service select on these. */}}
{{- define "shardguard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shardguard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "shardguard.labels" -}}
helm.sh/chart: {{ include "shardguard.chart" . }}
{{ include "shardguard.selectorLabels" . }}
app.kubernetes.io/part-of: shardguard
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "shardguard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "shardguard.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository:tag, the tag defaulting to the chart's appVersion. */}}
{{- define "shardguard.image" -}}
{{- $tag := default .root.Chart.AppVersion .image.tag -}}
{{- if hasPrefix "sha256:" $tag -}}
{{- printf "%s@%s" .image.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* Leader election is on with more than one replica or when asked for. */}}
{{- define "shardguard.leaderElect" -}}
{{- if or .Values.leaderElection.enabled (gt (int .Values.replicas) 1) -}}true{{- end -}}
{{- end -}}

{{/* Namespaces the shard pods run in (PodMonitor): podMonitor.namespaces, else
watchNamespaces; empty means any. */}}
{{- define "shardguard.shardNamespaces" -}}
{{- $ns := .Values.podMonitor.namespaces | default .Values.watchNamespaces -}}
{{- toJson ($ns | default list) -}}
{{- end -}}

{{/*
The rules of what the operator calls on the jobs' namespaces — the same as
deploy/operator.yaml (operator/src/controller.cpp, operator/kube/src/informer.cpp):
informers list+watch jobs and the Pods, Secrets, ConfigMaps and Services they own;
reconcile creates, updates (PUT with resourceVersion) and deletes those, gets the job
before it creates pods (is the cached copy current?) and a Secret the cache does not
hold, writes the job's finalizer and status, deletes a job whose
ttlSecondsAfterFinished ran out, and records Events. Nothing reads Nodes, nothing patches.
*/}}
{{- define "shardguard.rules" -}}
# Job informer (list, watch); get the current job before creating pods; finalizer
# (PUT); delete a finished job after ttlSecondsAfterFinished.
- apiGroups: ["shardguard.io"]
  resources: ["shardedtrainingjobs"]
  verbs: ["get", "list", "watch", "update", "delete"]
# Status is written with PUT .../status only.
- apiGroups: ["shardguard.io"]
  resources: ["shardedtrainingjobs/status"]
  verbs: ["update"]
# ownerReferences with blockOwnerDeletion: true need update on the owner's finalizers
# where the OwnerReferencesPermissionEnforcement admission plugin is on.
- apiGroups: ["shardguard.io"]
  resources: ["shardedtrainingjobs/finalizers"]
  verbs: ["update"]
# Shard pods are created and deleted, never updated.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch", "create", "delete"]
# The CA and per-shard PKI; get: a Secret the cache does not hold yet is read before
# new PKI is made, so that a job never gets a second CA.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "update", "delete"]
# Per-shard policy ConfigMaps and the headless Service, updated when they drift.
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["list", "watch", "create", "update", "delete"]
# Events about jobs (core/v1, POST only).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}
