{{/*
Helpers of the orch-job chart. They build the same PyTorchJob as orch's own template
(templates/kubernetes/pytorchjob.yaml.j2 with orchestrator/backends/kubernetes/manifest.py); a test renders both
from one job spec and compares the objects. Every value reaches YAML through "orch-job.json"
(JSON is valid YAML), never pasted raw, so no value can add a field. Optional values are read
with `get`/`hasKey` because `helm lint --strict` renders with missingkey=error.
*/}}

{{/* Any value as JSON text that every YAML parser reads back unchanged. Go's JSON encoder leaves
     DEL, the C1 controls (NEL would even fold a line) and the BOM raw, which YAML refuses; they
     are escaped here, as orch's own `toyaml` filter does. */}}
{{- define "orch-job.json" -}}
{{- $text := toJson . -}}
{{- range $code := concat (untilStep 127 160 1) (list 65279) -}}
{{- $text = replace (printf "%c" $code) (printf "\\u%04x" $code) $text -}}
{{- end -}}
{{- $text -}}
{{- end -}}

{{/* The job's name: values.name, else the release name; must be a DNS-1035 label. */}}
{{- define "orch-job.name" -}}
{{- $name := get .Values "name" | default .Release.Name -}}
{{- if or (gt (len $name) 63) (not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name)) -}}
{{- fail (printf "name %q is not a DNS-1035 label: use 1-63 lowercase letters, digits and '-', starting with a letter (set values name)" $name) -}}
{{- end -}}
{{- $name -}}
{{- end -}}

{{/* "MIN:MAX" from nodes: 2 or "1:3". */}}
{{- define "orch-job.nodeRange" -}}
{{- $parts := splitList ":" (toString .Values.nodes) -}}
{{- $min := first $parts | trim | atoi -}}
{{- $max := last $parts | trim | atoi -}}
{{- if or (lt $min 1) (lt $max $min) (gt (len $parts) 2) -}}
{{- fail (printf "nodes %v: write a node count like 2 or an elastic range MIN:MAX like \"1:3\"" .Values.nodes) -}}
{{- end -}}
{{- printf "%d:%d" $min $max -}}
{{- end -}}

{{/* Labels of every object and pod (JSON): orch's two, then the user's kubernetes.labels. */}}
{{- define "orch-job.labels" -}}
{{- $labels := dict "app.kubernetes.io/managed-by" .Release.Service "orch.dev/job" (include "orch-job.name" .) -}}
{{- range $key, $value := .Values.kubernetes.labels }}{{ $_ := set $labels $key $value }}{{ end -}}
{{- toJson $labels -}}
{{- end -}}

{{/* Where checkpoints go inside the pods. */}}
{{- define "orch-job.checkpointDir" -}}
{{- get .Values.checkpoint "dir" | default "/orch/checkpoints" -}}
{{- end -}}

{{/* True when a ds_config is given (an empty mapping counts: orch passes it too). */}}
{{- define "orch-job.hasDsConfig" -}}
{{- if and (hasKey .Values "ds_config") (not (kindIs "invalid" .Values.ds_config)) }}true{{ end -}}
{{- end -}}

{{/* The claim mounted at the checkpoint dir, or nothing (an emptyDir then). */}}
{{- define "orch-job.checkpointClaim" -}}
{{- $claim := get .Values.kubernetes "checkpoint_pvc" -}}
{{- if and .Values.pvc.create (not $claim) }}{{ $claim = printf "%s-checkpoints" (include "orch-job.name" .) }}{{ end -}}
{{- $claim | default "" -}}
{{- end -}}

{{/* The torchrun command: per-job flags only; PET_* come from the operator. */}}
{{- define "orch-job.command" -}}
{{- $v := .Values -}}
{{- $cmd := list (get $v "python" | default "python") "-m" "torch.distributed.run" (printf "--nproc-per-node=%d" (int $v.procs_per_node)) (printf "--max-restarts=%d" (int $v.max_restarts)) -}}
{{- if or (hasSuffix ".py" $v.program) (contains "/" $v.program) -}}
{{- $cmd = append $cmd $v.program -}}
{{- else -}}
{{- $cmd = concat $cmd (list "-m" $v.program) -}}
{{- end -}}
{{- if include "orch-job.hasDsConfig" . -}}
{{- $cmd = concat $cmd (list "--deepspeed_config" "/etc/orch/ds_config.json") -}}
{{- end -}}
{{- range $v.args }}{{ $cmd = append $cmd (toString .) }}{{ end -}}
{{- toJson $cmd -}}
{{- end -}}

{{/* Container env: orch's variables in a fixed order (unless the user sets one), then the
     user's env sorted by name (the order orch renders too). */}}
{{- define "orch-job.env" -}}
{{- $v := .Values -}}
{{- $user := $v.env | default dict -}}
{{- $base := list (list "PYTHONUNBUFFERED" "1") (list "ORCH_JOB_NAME" (include "orch-job.name" .)) (list "ORCH_RUN_DIR" "/orch/run") (list "ORCH_CHECKPOINT_DIR" (include "orch-job.checkpointDir" .)) (list "ORCH_CHECKPOINT_EVERY" (toString (int $v.checkpoint.every_steps))) (list "ORCH_CHECKPOINT_KEEP" (toString (int $v.checkpoint.keep))) -}}
{{- if $v.checkpoint.async_save }}{{ $base = append $base (list "ORCH_CHECKPOINT_ASYNC" "1") }}{{ end -}}
{{- $env := list -}}
{{- range $base }}{{ if not (hasKey $user (index . 0)) }}{{ $env = append $env (dict "name" (index . 0) "value" (index . 1)) }}{{ end }}{{ end -}}
{{- range $key := keys $user | sortAlpha }}{{ $env = append $env (dict "name" $key "value" (toString (get $user $key))) }}{{ end -}}
{{- toJson $env -}}
{{- end -}}

{{/* Container resources: kubernetes.resources plus nvidia.com/gpu for gpus_per_node. */}}
{{- define "orch-job.resources" -}}
{{- $v := .Values -}}
{{- $res := dict -}}
{{- range $section, $values := ($v.kubernetes.resources | default dict) }}{{ $_ := set $res $section (deepCopy ($values | default dict)) }}{{ end -}}
{{- if gt (int $v.gpus_per_node) 0 -}}
{{- range $section := list "limits" "requests" -}}
{{- $values := get $res $section | default dict -}}
{{- if not (hasKey $values "nvidia.com/gpu") }}{{ $_ := set $values "nvidia.com/gpu" (int $v.gpus_per_node) }}{{ end -}}
{{- $_ := set $res $section $values -}}
{{- end -}}
{{- end -}}
{{- toJson $res -}}
{{- end -}}

{{/* The pod spec every replica runs (JSON). */}}
{{- define "orch-job.podSpec" -}}
{{- $v := .Values -}}
{{- $k := $v.kubernetes -}}
{{- $name := include "orch-job.name" . -}}
{{- $mounts := list (dict "name" "dshm" "mountPath" "/dev/shm") (dict "name" "checkpoints" "mountPath" (include "orch-job.checkpointDir" .)) (dict "name" "orch-config" "mountPath" "/etc/orch" "readOnly" true) -}}
{{- $checkpoints := dict "name" "checkpoints" "emptyDir" dict -}}
{{- with include "orch-job.checkpointClaim" . }}{{ $checkpoints = dict "name" "checkpoints" "persistentVolumeClaim" (dict "claimName" .) }}{{ end -}}
{{- $volumes := list (dict "name" "dshm" "emptyDir" (dict "medium" "Memory" "sizeLimit" $k.shm_size)) $checkpoints (dict "name" "orch-config" "configMap" (dict "name" (printf "%s-orch" $name))) -}}
{{- $container := dict "name" "pytorch" "image" (get $k "image" | default "ghcr.io/orch-dev/orch:latest") "imagePullPolicy" $k.image_pull_policy -}}
{{- $_ := set $container "ports" (list (dict "name" "pytorchjob-port" "containerPort" (int $v.rdzv_port) "protocol" "TCP")) -}}
{{- $_ := set $container "command" (include "orch-job.command" . | fromJsonArray) -}}
{{- $_ := set $container "env" (include "orch-job.env" . | fromJsonArray) -}}
{{- $resources := include "orch-job.resources" . | fromJson -}}
{{- if $resources }}{{ $_ := set $container "resources" $resources }}{{ end -}}
{{- $_ := set $container "volumeMounts" $mounts -}}
{{- $pod := dict "containers" (list $container) "volumes" $volumes -}}
{{- with get $k "service_account" }}{{ $_ := set $pod "serviceAccountName" . }}{{ end -}}
{{- with $k.node_selector }}{{ $_ := set $pod "nodeSelector" . }}{{ end -}}
{{- with $k.tolerations }}{{ $_ := set $pod "tolerations" . }}{{ end -}}
{{- toJson $pod -}}
{{- end -}}

{{/* One replica type: count, restart policy, pod template. Call with (dict "root" $ "count" N). */}}
{{- define "orch-job.replica" -}}
replicas: {{ .count }}
restartPolicy: OnFailure
template:
  metadata:
    labels: {{ include "orch-job.labels" .root | fromJson | include "orch-job.json" }}
  spec: {{ include "orch-job.podSpec" .root | fromJson | include "orch-job.json" }}
{{- end -}}
