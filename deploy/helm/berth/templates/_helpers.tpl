{{/* Name of an object: <namePrefix>-<suffix>. */}}
{{- define "berth.name" -}}
{{- printf "%s-%s" .root.Values.namePrefix .suffix | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels common to every object. */}}
{{- define "berth.labels" -}}
app.kubernetes.io/name: berth
app.kubernetes.io/part-of: berth
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The berth image reference. A tag helm took for a number: from --set
(image.tag=42, an int64) it is exactly those digits; from a values file
(a float64) it may not be (1.10 reads as 1.1, 010 as 8), so that is
refused. */}}
{{- define "berth.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if kindIs "int64" $tag }}{{ $tag = printf "%d" $tag }}{{ end -}}
{{- if not (kindIs "string" $tag) -}}
{{- fail (printf "image.tag must be a quoted string such as \"0.1.0\": %v is a number in YAML, which may not be the tag meant (1.10 reads as 1.1)" $tag) -}}
{{- end -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{/* True (non-empty) when the node-local driver is deployed. */}}
{{- define "berth.localEnabled" -}}
{{- if or .Values.kinds.local .Values.kinds.block }}true{{ end -}}
{{- end -}}

{{/* --kinds of the berth-local container. */}}
{{- define "berth.localKinds" -}}
{{- $k := list -}}
{{- if .Values.kinds.local }}{{ $k = append $k "local" }}{{ end -}}
{{- if .Values.kinds.block }}{{ $k = append $k "block" }}{{ end -}}
{{- join "," $k -}}
{{- end -}}

{{/* Flags shared by every berth container. */}}
{{- define "berth.commonArgs" -}}
- --log-format={{ .Values.logFormat }}
- --log-level={{ .Values.logLevel }}
{{- end -}}

{{/* Downward-API env var NAME from fieldPath. */}}
{{- define "berth.fieldEnv" -}}
- name: {{ .name }}
  valueFrom:
    fieldRef:
      fieldPath: {{ .path }}
{{- end -}}
