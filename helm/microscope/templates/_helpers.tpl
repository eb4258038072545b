{{/* ---------------------------------------------------------------------------------------
Names and labels
--------------------------------------------------------------------------------------- */}}

{{- define "microscope.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "microscope.fullname" -}}
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

{{/* <fullname>-<component>, for objects of one component. Call with (list $ "component"). */}}
{{- define "microscope.componentName" -}}
{{- $ctx := index . 0 -}}
{{- printf "%s-%s" (include "microscope.fullname" $ctx | trunc 45 | trimSuffix "-") (index . 1) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "microscope.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels. Call with (list $ "component"). */}}
{{- define "microscope.selectorLabels" -}}
{{- $ctx := index . 0 -}}
app.kubernetes.io/name: {{ include "microscope.name" $ctx }}
app.kubernetes.io/instance: {{ $ctx.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* Standard labels. Call with (list $ "component"). */}}
{{- define "microscope.labels" -}}
{{- $ctx := index . 0 -}}
helm.sh/chart: {{ include "microscope.chart" $ctx }}
{{ include "microscope.selectorLabels" . }}
app.kubernetes.io/version: {{ $ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $ctx.Release.Service }}
app.kubernetes.io/part-of: microscope
{{- with $ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* ---------------------------------------------------------------------------------------
Images
--------------------------------------------------------------------------------------- */}}

{{- define "microscope.cpuImage" -}}
{{- $base := .Values.image.tag | default .Chart.AppVersion -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.cpuTag | default (printf "%s-cpu" $base)) -}}
{{- end -}}

{{- define "microscope.gpuImage" -}}
{{- $base := .Values.image.tag | default .Chart.AppVersion -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.gpuTag | default (printf "%s-cuda" $base)) -}}
{{- end -}}

{{- define "microscope.prefectServerImage" -}}
{{- $img := .Values.prefect.server.image -}}
{{- if $img.repository -}}
{{- printf "%s:%s" $img.repository (required "prefect.server.image.tag is required with prefect.server.image.repository" $img.tag) -}}
{{- else -}}
{{- include "microscope.cpuImage" . -}}
{{- end -}}
{{- end -}}

{{/* "repository:tag" of a third-party image block. */}}
{{- define "microscope.image" -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}

{{- define "microscope.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* ---------------------------------------------------------------------------------------
Security contexts. Pod level: call with (dict "uid" 10001) (also used as gid and fsGroup).
--------------------------------------------------------------------------------------- */}}

{{- define "microscope.podSecurityContext" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: {{ .uid }}
  runAsGroup: {{ .uid }}
  fsGroup: {{ .uid }}
  fsGroupChangePolicy: OnRootMismatch
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{- define "microscope.containerSecurityContext" -}}
securityContext:
  runAsNonRoot: true
  allowPrivilegeEscalation: false
  capabilities:
    drop: ["ALL"]
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{/* nodeSelector / tolerations / affinity of a component values block. */}}
{{- define "microscope.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* ---------------------------------------------------------------------------------------
Which bundled parts are on
--------------------------------------------------------------------------------------- */}}

{{/* MinIO runs only when enabled and no external bucket is given. Returns "true" or "". */}}
{{- define "microscope.minio.enabled" -}}
{{- if and .Values.minio.enabled (not .Values.s3.external.bucket) -}}true{{- end -}}
{{- end -}}

{{/* Postgres is needed by the Prefect server and MLflow. */}}
{{- define "microscope.postgres.needed" -}}
{{- if or .Values.prefect.server.enabled .Values.mlflow.enabled -}}true{{- end -}}
{{- end -}}

{{/* ---------------------------------------------------------------------------------------
Service addresses
--------------------------------------------------------------------------------------- */}}

{{- define "microscope.prefect.apiUrl" -}}
{{- if .Values.prefect.server.enabled -}}
{{- printf "http://%s:%v/api" (include "microscope.componentName" (list . "prefect-server")) .Values.prefect.server.service.port -}}
{{- else -}}
{{- required "prefect.externalApiUrl is required when prefect.server.enabled is false" .Values.prefect.externalApiUrl -}}
{{- end -}}
{{- end -}}

{{- define "microscope.prefect.uiApiUrl" -}}
{{- if .Values.prefect.server.uiApiUrl -}}
{{- .Values.prefect.server.uiApiUrl -}}
{{- else if and .Values.ingress.enabled .Values.ingress.prefect.enabled -}}
{{- printf "%s://%s/api" (ternary "https" "http" .Values.ingress.tls.enabled) .Values.ingress.prefect.host -}}
{{- else -}}
{{- printf "http://localhost:%v/api" .Values.prefect.server.service.port -}}
{{- end -}}
{{- end -}}

{{- define "microscope.postgres.host" -}}
{{- if .Values.postgres.enabled -}}
{{- include "microscope.componentName" (list . "postgres") -}}
{{- else -}}
{{- required "postgres.external.host is required when postgres.enabled is false" .Values.postgres.external.host -}}
{{- end -}}
{{- end -}}

{{- define "microscope.postgres.port" -}}
{{- if .Values.postgres.enabled -}}5432{{- else -}}{{ .Values.postgres.external.port }}{{- end -}}
{{- end -}}

{{- define "microscope.postgres.secretName" -}}
{{- if .Values.postgres.auth.existingSecret -}}
{{- .Values.postgres.auth.existingSecret -}}
{{- else if .Values.postgres.enabled -}}
{{- include "microscope.componentName" (list . "postgres") -}}
{{- else -}}
{{- fail "postgres.auth.existingSecret is required with an external Postgres (postgres.enabled: false)" -}}
{{- end -}}
{{- end -}}

{{- define "microscope.postgres.passwordKey" -}}
{{- if .Values.postgres.auth.existingSecret -}}{{ .Values.postgres.auth.passwordKey }}{{- else -}}password{{- end -}}
{{- end -}}

{{- define "microscope.redis.host" -}}
{{- if .Values.redis.enabled -}}
{{- include "microscope.componentName" (list . "redis") -}}
{{- else -}}
{{- required "redis.external.host is required when redis.enabled is false" .Values.redis.external.host -}}
{{- end -}}
{{- end -}}

{{- define "microscope.redis.port" -}}
{{- if .Values.redis.enabled -}}6379{{- else -}}{{ .Values.redis.external.port }}{{- end -}}
{{- end -}}

{{/* Redis needs a password: bundled with auth on, or external with an existing Secret. */}}
{{- define "microscope.redis.auth" -}}
{{- if .Values.redis.enabled -}}
{{- if .Values.redis.auth.enabled -}}true{{- end -}}
{{- else if and .Values.redis.auth.enabled .Values.redis.auth.existingSecret -}}true{{- end -}}
{{- end -}}

{{- define "microscope.redis.secretName" -}}
{{- .Values.redis.auth.existingSecret | default (include "microscope.componentName" (list . "redis")) -}}
{{- end -}}

{{- define "microscope.redis.passwordKey" -}}
{{- if .Values.redis.auth.existingSecret -}}{{ .Values.redis.auth.passwordKey }}{{- else -}}redis-password{{- end -}}
{{- end -}}

{{- define "microscope.mlflow.url" -}}
{{- if .Values.mlflow.enabled -}}
{{- printf "http://%s:%v" (include "microscope.componentName" (list . "mlflow")) .Values.mlflow.service.port -}}
{{- else -}}
{{- .Values.mlflow.externalTrackingUri -}}
{{- end -}}
{{- end -}}

{{- define "microscope.qdrant.url" -}}
{{- if .Values.qdrant.enabled -}}
{{- printf "http://%s:6333" (include "microscope.componentName" (list . "qdrant")) -}}
{{- else -}}
{{- .Values.qdrant.externalUrl -}}
{{- end -}}
{{- end -}}

{{- define "microscope.qdrant.secretName" -}}
{{- .Values.qdrant.auth.existingSecret | default (include "microscope.componentName" (list . "qdrant")) -}}
{{- end -}}

{{- define "microscope.qdrant.apiKeyKey" -}}
{{- if .Values.qdrant.auth.existingSecret -}}{{ .Values.qdrant.auth.apiKeyKey }}{{- else -}}api-key{{- end -}}
{{- end -}}

{{- define "microscope.minio.url" -}}
{{- printf "http://%s.%s.svc:9000" (include "microscope.componentName" (list . "minio")) .Release.Namespace -}}
{{- end -}}

{{- define "microscope.minio.secretName" -}}
{{- .Values.minio.auth.existingSecret | default (include "microscope.componentName" (list . "minio")) -}}
{{- end -}}

{{- define "microscope.minio.rootUserKey" -}}
{{- if .Values.minio.auth.existingSecret -}}{{ .Values.minio.auth.rootUserKey }}{{- else -}}root-user{{- end -}}
{{- end -}}

{{- define "microscope.minio.rootPasswordKey" -}}
{{- if .Values.minio.auth.existingSecret -}}{{ .Values.minio.auth.rootPasswordKey }}{{- else -}}root-password{{- end -}}
{{- end -}}

{{- define "microscope.s3.bucket" -}}
{{- if .Values.s3.external.bucket -}}
{{- .Values.s3.external.bucket -}}
{{- else if include "microscope.minio.enabled" . -}}
{{- .Values.minio.bucket -}}
{{- else -}}
{{- fail "set s3.external.bucket, or turn minio.enabled on" -}}
{{- end -}}
{{- end -}}

{{- define "microscope.s3.endpointUrl" -}}
{{- if include "microscope.minio.enabled" . -}}
{{- include "microscope.minio.url" . -}}
{{- else -}}
{{- .Values.s3.external.endpointUrl -}}
{{- end -}}
{{- end -}}

{{/* Env entries with the S3 access keys for our containers that do not read the credentials
Secret (MLflow). Empty with ambient credentials. */}}
{{- define "microscope.s3.keyEnv" -}}
{{- if include "microscope.minio.enabled" . }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "microscope.minio.secretName" . }}
      key: {{ include "microscope.minio.rootUserKey" . }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "microscope.minio.secretName" . }}
      key: {{ include "microscope.minio.rootPasswordKey" . }}
{{- else if .Values.s3.external.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .Values.s3.external.existingSecret }}
      key: {{ .Values.s3.external.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.s3.external.existingSecret }}
      key: {{ .Values.s3.external.secretAccessKeyKey }}
{{- end }}
{{- end -}}

{{- define "microscope.webhook.secretName" -}}
{{- .Values.webhook.auth.existingSecret | default (include "microscope.componentName" (list . "webhook")) -}}
{{- end -}}

{{- define "microscope.webhook.secretKey" -}}
{{- if .Values.webhook.auth.existingSecret -}}{{ .Values.webhook.auth.secretKey }}{{- else -}}webhook-secret{{- end -}}
{{- end -}}

{{- define "microscope.credentials.secretName" -}}
{{- .Values.credentials.existingSecret | default (include "microscope.componentName" (list . "credentials")) -}}
{{- end -}}

{{- define "microscope.worker.serviceAccountName" -}}
{{- if .Values.workers.serviceAccount.create -}}
{{- .Values.workers.serviceAccount.name | default (include "microscope.componentName" (list . "worker")) -}}
{{- else -}}
{{- .Values.workers.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{/* ---------------------------------------------------------------------------------------
Shared env blocks
--------------------------------------------------------------------------------------- */}}

{{/* PREFECT_API_URL (+ PREFECT_API_KEY from a Secret for an external API). */}}
{{- define "microscope.prefect.clientEnv" -}}
- name: PREFECT_API_URL
  value: {{ include "microscope.prefect.apiUrl" . | quote }}
{{- if .Values.prefect.apiKey.existingSecret }}
- name: PREFECT_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.prefect.apiKey.existingSecret }}
      key: {{ .Values.prefect.apiKey.key }}
{{- end }}
- name: PREFECT_SERVER_ANALYTICS_ENABLED
  value: "false"
{{- end -}}

{{/* DATABASE_USER / DATABASE_PASSWORD for $(VAR) interpolation into connection URLs. */}}
{{- define "microscope.postgres.credentialEnv" -}}
- name: DATABASE_USER
  value: {{ .Values.postgres.auth.username | quote }}
- name: DATABASE_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "microscope.postgres.secretName" . }}
      key: {{ include "microscope.postgres.passwordKey" . }}
{{- end -}}

{{/* An init container that waits until an HTTP URL answers. Call with (dict "ctx" $ "url" "..."). */}}
{{- define "microscope.waitForHttp" -}}
- name: wait-for-api
  image: {{ include "microscope.cpuImage" .ctx }}
  imagePullPolicy: {{ .ctx.Values.image.pullPolicy }}
  command:
    - python
    - -c
    - |
      import sys, time, urllib.request
      url, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
      while True:
          try:
              urllib.request.urlopen(url, timeout=5)
              break
          except Exception as exc:
              if time.monotonic() > deadline:
                  sys.exit(f"{url} did not answer: {exc}")
              print(f"waiting for {url}: {exc}", flush=True)
              time.sleep(5)
    - {{ .url | quote }}
    - {{ .ctx.Values.register.waitTimeoutSeconds | quote }}
  resources:
    requests: {cpu: 50m, memory: 64Mi}
    limits: {cpu: 200m, memory: 128Mi}
  {{- include "microscope.containerSecurityContext" . | nindent 2 }}
{{- end -}}

{{/* ---------------------------------------------------------------------------------------
Checks that cannot be expressed in the values schema
--------------------------------------------------------------------------------------- */}}
{{- define "microscope.validate" -}}
{{- if not .Values.credentials.existingSecret -}}
{{- $why := list -}}
{{- if and (include "microscope.redis.auth" .) .Values.redis.auth.existingSecret -}}{{- $why = append $why "redis.auth.existingSecret" -}}{{- end -}}
{{- if and .Values.qdrant.enabled .Values.qdrant.auth.existingSecret -}}{{- $why = append $why "qdrant.auth.existingSecret" -}}{{- end -}}
{{- if and (not .Values.qdrant.enabled) .Values.qdrant.auth.existingSecret -}}{{- $why = append $why "qdrant.auth.existingSecret (external Qdrant)" -}}{{- end -}}
{{- if and (include "microscope.minio.enabled" .) .Values.minio.auth.existingSecret -}}{{- $why = append $why "minio.auth.existingSecret" -}}{{- end -}}
{{- if and (not (include "microscope.minio.enabled" .)) .Values.s3.external.existingSecret -}}{{- $why = append $why "s3.external.existingSecret" -}}{{- end -}}
{{- if $why -}}
{{- fail (printf "credentials.existingSecret is required when %s is set: audit pods read every setting from one Secret and the chart cannot copy values out of your Secrets" (join ", " $why)) -}}
{{- end -}}
{{- end -}}
{{- if and (not .Values.qdrant.enabled) (not .Values.qdrant.externalUrl) (not .Values.credentials.existingSecret) -}}
{{- fail "qdrant.externalUrl is required when qdrant.enabled is false" -}}
{{- end -}}
{{- end -}}

{{/* The viewer's authentication: with the default `oauth2-proxy`, fail with one message naming
every missing value and the alternative. */}}
{{- define "microscope.viewer.validateAuth" -}}
{{- $a := .Values.viewer.auth -}}
{{- if and .Values.viewer.enabled (eq $a.mode "oauth2-proxy") -}}
{{- $missing := list -}}
{{- if not $a.oidcIssuerUrl -}}{{- $missing = append $missing "viewer.auth.oidcIssuerUrl" -}}{{- end -}}
{{- if not $a.clientId -}}{{- $missing = append $missing "viewer.auth.clientId" -}}{{- end -}}
{{- if not $a.existingSecret -}}{{- $missing = append $missing "viewer.auth.existingSecret" -}}{{- end -}}
{{- if $missing -}}
{{- fail (printf "the viewer can delete audits and launch work, so by default (viewer.auth.mode=oauth2-proxy) it sits behind an oauth2-proxy OIDC sign-in: set %s (the Secret holds keys %q and %q; see the chart README, \"The viewer behind authentication\"), or set viewer.auth.mode=none to serve the viewer without authentication, only behind your own authenticating proxy" (join ", " $missing) $a.clientSecretKey $a.cookieSecretKey) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The viewer's OIDC redirect URL when its ingress is on (else oauth2-proxy derives it from the
request, e.g. http://localhost:8501/oauth2/callback through `kubectl port-forward`). */}}
{{- define "microscope.viewer.redirectUrl" -}}
{{- $ing := .Values.ingress -}}
{{- if and $ing.enabled $ing.viewer.enabled -}}
{{- printf "%s://%s/oauth2/callback" (ternary "https" "http" $ing.tls.enabled) $ing.viewer.host -}}
{{- end -}}
{{- end -}}

{{/* The current value of key `key` in Secret `name` when it exists in the cluster (so upgrades
keep generated passwords), else a fresh random string. Offline rendering (`helm template`) has no
cluster and always generates. Call once per password and keep the result in a variable. */}}
{{- define "microscope.lookupOrGenerate" -}}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace .name -}}
{{- if and $existing $existing.data (hasKey $existing.data .key) -}}
{{- index $existing.data .key | b64dec -}}
{{- else -}}
{{- randAlphaNum (.length | default 32) -}}
{{- end -}}
{{- end -}}

{{/* One line of NOTES.txt: how to reach a UI. Call with (list $ label part service port path). */}}
{{- define "microscope.notes.ui" }}
{{- $ctx := index . 0 }}{{ $label := index . 1 }}{{ $part := index . 2 }}{{ $svc := index . 3 }}{{ $port := index . 4 }}{{ $path := index . 5 }}
{{- $ing := $ctx.Values.ingress }}
{{- if and $ing.enabled (index $ing $part).enabled }}
  {{ $label }}: {{ ternary "https" "http" $ing.tls.enabled }}://{{ (index $ing $part).host }}{{ $path }}
{{- else }}
  {{ $label }}: kubectl -n {{ $ctx.Release.Namespace }} port-forward svc/{{ include "microscope.componentName" (list $ctx $svc) }} {{ $port }}:{{ $port }}
      then open http://localhost:{{ $port }}{{ $path }}
{{- end }}
{{- end }}
