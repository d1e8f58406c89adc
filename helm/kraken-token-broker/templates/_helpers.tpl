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

{{/* The prefix of the replicas' key Secrets: replica N reads "<prefix>-N". */}}
{{- define "ktb.keysSecretPrefix" -}}
{{- default (printf "%s-keys" (include "ktb.fullname" .)) .Values.keysSecret.namePrefix }}
{{- end }}

{{/* The key Secret of one replica: (dict "root" $ "replica" N). */}}
{{- define "ktb.keysSecretName" -}}
{{- printf "%s-%d" (include "ktb.keysSecretPrefix" .root) (int .replica) }}
{{- end }}

{{/* The workload of one replica: (dict "root" $ "replica" N). Short enough
for a StatefulSet (its pods' controller-revision-hash label must fit 63). */}}
{{- /* At most 47 + "-" + 3 digits = 51 characters: a StatefulSet's name plus
"-" and a 10-character hash must fit the 63 of its controller-revision-hash
label. */}}
{{- define "ktb.replicaName" -}}
{{- printf "%s-%d" (include "ktb.fullname" .root | trunc 47 | trimSuffix "-") (int .replica) }}
{{- end }}

{{/* The image: repository@digest when a digest is given, else repository:tag. */}}
{{- define "ktb.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
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

{{/* The config's [listen] section: the one part the broker cannot take on a
reload (addresses, TLS on or off), so the pods carry its checksum and restart
when it changes; everything else is re-read live. */}}
{{- define "ktb.listenConfig" -}}
[listen]
api = "0.0.0.0:{{ include "ktb.apiContainerPort" . }}"
admin = "0.0.0.0:{{ include "ktb.adminContainerPort" . }}"
{{- if .Values.tls.enabled }}

[listen.tls]
cert = { file = "{{ include "ktb.tlsDir" . }}/tls.crt" }
key = { file = "{{ include "ktb.tlsDir" . }}/tls.key" }
{{- if .Values.tls.clientCaSecret }}
client_ca = { file = "{{ include "ktb.clientCaDir" . }}/ca.crt" }
{{- end }}
{{- end }}
{{- end }}
