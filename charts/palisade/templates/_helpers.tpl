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

{{- /*
Identities (ServiceAccounts, RBAC) go in Argo CD sync wave -1: applied before
the workloads, and, since Argo CD deletes an Application's resources in
reverse wave order and waits for each wave to be gone, deleted only after
the controller and agents have stopped. They need their credentials on the
way out: on SIGTERM each reads its own Deployment/DaemonSet and, when it is
being deleted, releases the policies (controller) or clears the node (agent).
*/}}
{{- define "palisade.identityWave" -}}
argocd.argoproj.io/sync-wave: "-1"
{{- end }}
