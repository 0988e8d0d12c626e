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

{{/* The claim every pod shares (checkpoint_pvc, or the one pvc.create makes), or nothing. */}}
{{- define "orch-job.checkpointClaim" -}}
{{- $claim := get .Values.kubernetes "checkpoint_pvc" -}}
{{- if and .Values.pvc.create (not $claim) }}{{ $claim = printf "%s-checkpoints" (include "orch-job.name" .) }}{{ end -}}
{{- $claim | default "" -}}
{{- end -}}

{{/* The volume every pod shares (JSON): the claim above as "orch-shared", or the entry of
     kubernetes.volumes that kubernetes.shared_volume names; empty when there is none. */}}
{{- define "orch-job.sharedVolume" -}}
{{- $k := .Values.kubernetes -}}
{{- $claim := include "orch-job.checkpointClaim" . -}}
{{- $wanted := get $k "shared_volume" | default "" -}}
{{- if $claim -}}
{{- toJson (dict "name" "orch-shared" "persistentVolumeClaim" (dict "claimName" $claim)) -}}
{{- else if $wanted -}}
{{- $found := "" -}}
{{- range (get $k "volumes" | default list) }}{{ if eq (get . "name") $wanted }}{{ $found = toJson . }}{{ end }}{{ end -}}
{{- if not $found }}{{ fail (printf "kubernetes.shared_volume: %q is not one of kubernetes.volumes" $wanted) }}{{ end -}}
{{- $found -}}
{{- end -}}
{{- end -}}

{{/* Volumes and the pytorch container's mounts (JSON {"volumes": [...], "mounts": [...]}): shm,
     the shared volume's <name>/checkpoints and <name>/run (or, for one node only, a per-pod
     emptyDir for checkpoints), the ConfigMap, then the user's volumes and mounts. */}}
{{- define "orch-job.volumes" -}}
{{- $k := .Values.kubernetes -}}
{{- $name := include "orch-job.name" . -}}
{{- $ckpt := include "orch-job.checkpointDir" . -}}
{{- $max := index (splitList ":" (include "orch-job.nodeRange" .)) 1 | atoi -}}
{{- $volumes := list (dict "name" "dshm" "emptyDir" (dict "medium" "Memory" "sizeLimit" $k.shm_size)) -}}
{{- $mounts := list (dict "name" "dshm" "mountPath" "/dev/shm") -}}
{{- with include "orch-job.sharedVolume" . -}}
{{- $shared := fromJson . -}}
{{- if include "orch-job.checkpointClaim" $ }}{{ $volumes = append $volumes $shared }}{{ end -}}
{{- $mounts = append $mounts (dict "name" $shared.name "mountPath" $ckpt "subPath" (printf "%s/checkpoints" $name)) -}}
{{- $mounts = append $mounts (dict "name" $shared.name "mountPath" "/orch/run" "subPath" (printf "%s/run" $name)) -}}
{{- else -}}
{{- if gt $max 1 -}}
{{- fail (printf "a job of %v nodes writes one sharded checkpoint from every pod into %s, which would be a per-pod emptyDir: set kubernetes.checkpoint_pvc to a ReadWriteMany PersistentVolumeClaim (or pvc.create=true), or kubernetes.shared_volume to the name of one of kubernetes.volumes that every pod shares" $.Values.nodes $ckpt) -}}
{{- end -}}
{{- $volumes = append $volumes (dict "name" "checkpoints" "emptyDir" dict) -}}
{{- $mounts = append $mounts (dict "name" "checkpoints" "mountPath" $ckpt) -}}
{{- end -}}
{{- $volumes = append $volumes (dict "name" "orch-config" "configMap" (dict "name" (printf "%s-orch" $name))) -}}
{{- $mounts = append $mounts (dict "name" "orch-config" "mountPath" "/etc/orch" "readOnly" true) -}}
{{- $volumes = concat $volumes (get $k "volumes" | default list) -}}
{{- $mounts = concat $mounts (get $k "volume_mounts" | default list) -}}
{{- toJson (dict "volumes" $volumes "mounts" $mounts) -}}
{{- end -}}

{{/* The torchrun command: per-job flags only; PET_* come from the operator. --local-addr is the
     pod's IP (ORCH_POD_IP, from the downward API): a unique rendezvous node name per pod (and per
     container start, with the pod's shared PID namespace). --log-dir keeps each pod's torchrun
     attempts on the run volume (ORCH_POD_NAME), where orch counts restarts. Only the bundled
     trainer gets --deepspeed_config; {ds_config}, {checkpoint_dir}, {run_dir} in args become the
     pod's paths (as orch renders them). */}}
{{- define "orch-job.command" -}}
{{- $v := .Values -}}
{{- $cmd := list (get $v "python" | default "python") "-m" "torch.distributed.run" (printf "--nproc-per-node=%d" (int $v.procs_per_node)) (printf "--max-restarts=%d" (int $v.max_restarts)) "--local-addr=$(ORCH_POD_IP)" "--log-dir=/orch/run/torchelastic/$(ORCH_POD_NAME)" -}}
{{- if or (hasSuffix ".py" $v.program) (contains "/" $v.program) -}}
{{- $cmd = append $cmd $v.program -}}
{{- else -}}
{{- $cmd = concat $cmd (list "-m" $v.program) -}}
{{- end -}}
{{- if and (include "orch-job.hasDsConfig" .) (eq $v.program "engine.train") -}}
{{- $cmd = concat $cmd (list "--deepspeed_config" "/etc/orch/ds_config.json") -}}
{{- end -}}
{{- $ckpt := include "orch-job.checkpointDir" . -}}
{{- range $v.args }}{{ $cmd = append $cmd (toString . | replace "{ds_config}" "/etc/orch/ds_config.json" | replace "{checkpoint_dir}" $ckpt | replace "{run_dir}" "/orch/run") }}{{ end -}}
{{- toJson $cmd -}}
{{- end -}}

{{/* Container env: orch's variables in a fixed order (unless the user sets one), then the
     user's env sorted by name (the order orch renders too). TORCH_DISABLE_SHARE_RDZV_TCP_STORE:
     a restarted container's agent could not join a running job otherwise (see orch's
     orchestrator/backends/kubernetes/manifest.py, container_env). */}}
{{- define "orch-job.env" -}}
{{- $v := .Values -}}
{{- $user := $v.env | default dict -}}
{{- $base := list (list "PYTHONUNBUFFERED" "1") (list "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" "1") (list "ORCH_JOB_NAME" (include "orch-job.name" .)) (list "ORCH_RUN_DIR" "/orch/run") (list "ORCH_CHECKPOINT_DIR" (include "orch-job.checkpointDir" .)) (list "ORCH_CHECKPOINT_EVERY" (toString (int $v.checkpoint.every_steps))) (list "ORCH_CHECKPOINT_KEEP" (toString (int $v.checkpoint.keep))) -}}
{{- if include "orch-job.hasDsConfig" . }}{{ $base = append $base (list "ORCH_DS_CONFIG" "/etc/orch/ds_config.json") }}{{ end -}}
{{- if $v.checkpoint.async_save }}{{ $base = append $base (list "ORCH_CHECKPOINT_ASYNC" "1") }}{{ end -}}
{{- $env := list -}}
{{- range $base }}{{ if not (hasKey $user (index . 0)) }}{{ $env = append $env (dict "name" (index . 0) "value" (index . 1)) }}{{ end }}{{ end -}}
{{- range $key := keys $user | sortAlpha }}{{ $env = append $env (dict "name" $key "value" (toString (get $user $key))) }}{{ end -}}
{{- $env = append $env (dict "name" "ORCH_POD_IP" "valueFrom" (dict "fieldRef" (dict "fieldPath" "status.podIP"))) -}}
{{- $env = append $env (dict "name" "ORCH_POD_NAME" "valueFrom" (dict "fieldRef" (dict "fieldPath" "metadata.name"))) -}}
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
{{- $storage := include "orch-job.volumes" . | fromJson -}}
{{- $mounts := $storage.mounts -}}
{{- $volumes := $storage.volumes -}}
{{- $container := dict "name" "pytorch" "image" (get $k "image" | default "ghcr.io/orch-dev/orch:latest") "imagePullPolicy" $k.image_pull_policy -}}
{{- $_ := set $container "ports" (list (dict "name" "pytorchjob-port" "containerPort" (int $v.rdzv_port) "protocol" "TCP")) -}}
{{- $_ := set $container "command" (include "orch-job.command" . | fromJsonArray) -}}
{{- $_ := set $container "env" (include "orch-job.env" . | fromJsonArray) -}}
{{- $resources := include "orch-job.resources" . | fromJson -}}
{{- if $resources }}{{ $_ := set $container "resources" $resources }}{{ end -}}
{{- $_ := set $container "volumeMounts" $mounts -}}
{{- $pod := dict "shareProcessNamespace" true "containers" (list $container) "volumes" $volumes -}}
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
