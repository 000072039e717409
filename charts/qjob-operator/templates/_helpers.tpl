{{/* Chart name, overridable with nameOverride. */}}
{{- define "qjob-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name used as the prefix of every object: fullnameOverride, else the release name when it
already contains the chart name, else <release>-<chart>. Truncated to 63 characters (DNS label).
*/}}
{{- define "qjob-operator.fullname" -}}
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

{{- define "qjob-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object gets. */}}
{{- define "qjob-operator.labels" -}}
helm.sh/chart: {{ include "qjob-operator.chart" . }}
{{ include "qjob-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: qjob-operator
{{- end }}

{{/* Labels that select the operator pod (immutable in the Deployment selector). */}}
{{- define "qjob-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "qjob-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "qjob-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "qjob-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "qjob-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The report endpoint's TLS Secret: the user's (e.g. from cert-manager), else the chart's. */}}
{{- define "qjob-operator.reportTlsSecret" -}}
{{- default (printf "%s-report-tls" (include "qjob-operator.fullname" .)) .Values.reports.tlsSecret }}
{{- end }}

{{- define "qjob-operator.runnerImage" -}}
{{- printf "%s:%s" .Values.runner.image.repository (default .Chart.AppVersion .Values.runner.image.tag) }}
{{- end }}

{{/*
The operator's settings file (operator/qjob_operator/config.py, OperatorConfig), camelCase YAML.
Null architectures (removed by the user) are dropped.
*/}}
{{- define "qjob-operator.config" -}}
{{- $architectures := dict }}
{{- range $arch, $ccs := .Values.architectures }}
{{- if $ccs }}
{{- $_ := set $architectures $arch $ccs }}
{{- end }}
{{- end }}
{{- $pullSecrets := list }}
{{- range .Values.runner.imagePullSecrets }}
{{- if kindIs "map" . }}{{ $pullSecrets = append $pullSecrets .name }}{{ else }}{{ $pullSecrets = append $pullSecrets . }}{{ end }}
{{- end }}
{{- $runner := dict
  "image" (include "qjob-operator.runnerImage" .)
  "imagePullPolicy" .Values.runner.image.pullPolicy
  "imagePullSecrets" $pullSecrets
  "env" .Values.runner.env
  "tolerations" .Values.runner.tolerations
  "podLabels" .Values.runner.podLabels
  "podAnnotations" .Values.runner.podAnnotations
  "shmSize" .Values.runner.shmSize
  "scratchSize" .Values.runner.scratchSize
  "tmpSize" .Values.runner.tmpSize
  "runAsUser" .Values.runner.runAsUser
  "serviceAccountName" .Values.runner.serviceAccountName
}}
{{- if not (kindIs "invalid" .Values.runner.jobTtlSecondsAfterFinished) }}
{{- $_ := set $runner "jobTtlSecondsAfterFinished" .Values.runner.jobTtlSecondsAfterFinished }}
{{- end }}
{{- $config := dict
  "namespaces" .Values.watchNamespaces
  "nodeLabels" .Values.nodeLabels
  "architectures" $architectures
  "runner" $runner
  "policy" .Values.policy
  "modelCache" .Values.modelCache
  "metricsPort" .Values.metrics.port
  "healthPort" .Values.healthPort
  "resyncSeconds" .Values.resyncSeconds
  "statusWritesPerSecond" .Values.statusWritesPerSecond
  "statusWriteIntervalSeconds" .Values.statusWriteIntervalSeconds
  "operatorNamespace" .Release.Namespace
  "reports" (dict
    "port" .Values.reports.port
    "url" (printf "https://%s.%s.svc:%v" (include "qjob-operator.fullname" .) .Release.Namespace .Values.reports.port)
    "audience" .Values.reports.audience
    "tlsSecret" (include "qjob-operator.reportTlsSecret" .))
  "leaderElection" (dict
    "enabled" true
    "leaseName" (include "qjob-operator.fullname" .)
    "leaseDurationSeconds" .Values.leaderElection.leaseDurationSeconds
    "renewDeadlineSeconds" .Values.leaderElection.renewDeadlineSeconds
    "retryPeriodSeconds" .Values.leaderElection.retryPeriodSeconds)
}}
{{- toYaml $config }}
{{- end }}
