{{/* Chart name, truncated to the 63 characters a DNS label allows. */}}
{{- define "ktb.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name. */}}
{{- define "ktb.fullname" -}}
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

{{- define "ktb.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ktb.labels" -}}
helm.sh/chart: {{ include "ktb.chart" . }}
{{ include "ktb.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "ktb.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ktb.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "ktb.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ktb.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding the accounts' key material. */}}
{{- define "ktb.keysSecretName" -}}
{{- default (printf "%s-keys" (include "ktb.fullname" .)) .Values.keysSecret.existingSecret }}
{{- end }}

{{/* Where things live inside the container. */}}
{{- define "ktb.configDir" -}}/etc/kraken-token-broker/config{{- end }}
{{- define "ktb.keysDir" -}}/etc/kraken-token-broker/keys{{- end }}

{{/* Container ports: fixed; the Service maps its own ports onto them. */}}
{{- define "ktb.apiContainerPort" -}}8080{{- end }}
{{- define "ktb.adminContainerPort" -}}9090{{- end }}

{{/* The key files of one account, as a JSON list: api-key, api-secret, and its 2FA file. */}}
{{- define "ktb.keyFiles" -}}
{{- $files := list "api-key" "api-secret" }}
{{- if eq .otp "static" }}{{ $files = append $files "otp" }}{{ end }}
{{- if eq .otp "totp" }}{{ $files = append $files "totp-secret" }}{{ end }}
{{- toJson $files }}
{{- end }}

{{/* The Secret with the consumer API's serving certificate. */}}
{{- define "ktb.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "ktb.fullname" .)) .Values.tls.secretName }}
{{- end }}

{{- define "ktb.tlsDir" -}}/etc/kraken-token-broker/tls{{- end }}
{{- define "ktb.clientCaDir" -}}/etc/kraken-token-broker/client-ca{{- end }}
{{- define "ktb.auditDir" -}}/etc/kraken-token-broker/audit{{- end }}
