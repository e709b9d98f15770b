{{- define "palisade.name" -}}palisade{{- end }}

{{- define "palisade.labels" -}}
app.kubernetes.io/name: {{ include "palisade.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: palisade
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end }}

{{- define "palisade.selector" -}}
app.kubernetes.io/name: {{ include "palisade.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "palisade.controller.serviceAccount" -}}
{{- default (printf "%s-controller" .Release.Name) .Values.controller.serviceAccount.name }}
{{- end }}

{{- define "palisade.agent.serviceAccount" -}}
{{- default (printf "%s-agent" .Release.Name) .Values.agent.serviceAccount.name }}
{{- end }}

{{- /* registry/repository@digest when a digest is set, else :tag (default appVersion). */}}
{{- define "palisade.image" -}}
{{- $root := index . 0 }}{{- $img := index . 1 -}}
{{- if $img.digest -}}
{{ $root.Values.image.registry }}/{{ $img.repository }}@{{ $img.digest }}
{{- else -}}
{{ $root.Values.image.registry }}/{{ $img.repository }}:{{ default $root.Chart.AppVersion $img.tag }}
{{- end }}
{{- end }}
