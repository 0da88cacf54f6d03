{{/*
Names and labels.
*/}}
{{- define "quill.fullname" -}}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" .Release.Name) -}}
{{- fail (printf "release name %q: Quill's Services and RayService take their names from it, which Kubernetes wants as DNS-1035 labels: lower-case letters, digits and '-', starting with a letter (e.g. quill-prod)" .Release.Name) -}}
{{- end -}}
{{- $name := ternary .Release.Name (printf "%s-%s" .Release.Name .Chart.Name) (contains .Chart.Name .Release.Name) -}}
{{- /* KubeRay names the head's Service and pods after the RayService with suffixes of its own,
and Kubernetes caps names at 63: 40 leaves them room. A longer name is cut, and a hash of the
whole name keeps two releases that differ past the cut (…-production-eu1, …-eu2) apart. */ -}}
{{- if gt (len $name) 40 -}}
{{- printf "%s-%s" ($name | trunc 33 | trimSuffix "-") ($name | sha256sum | trunc 6) -}}
{{- else -}}
{{- $name -}}
{{- end -}}
{{- end -}}

{{- define "quill.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "quill.labels" -}}
{{ include "quill.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "quill.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/*
quill.plan: the registry read once, checked, and turned into the numbers every template needs.
Defaults are the registry schema's (serve_app/config.py); tests/test_chart.py checks that the
Serve options rendered here equal serve_app.app.deployment_options for the same registry.
A registry that cannot run on this cluster fails the render with the model and field named.
Output: YAML {models: [...], gpu: {min, max}, cpu: {min, max}}.
*/}}
{{- define "quill.plan" -}}
{{- if not .Values.registry -}}
{{- fail "no registry: pass it with --set-file registry=models/registry.yaml" -}}
{{- end -}}
{{- $reg := fromYaml .Values.registry -}}
{{- if hasKey $reg "Error" -}}
{{- fail (printf "registry: not valid YAML: %s" $reg.Error) -}}
{{- end -}}
{{- $models := get $reg "models" -}}
{{- if or (not (kindIs "slice" $models)) (not $models) -}}
{{- fail "registry: models: a non-empty list of models is required" -}}
{{- end -}}
{{- /* `helm lint` logs a fail and renders on: without this its report ends in "range can't iterate". */ -}}
{{- if not (kindIs "slice" $models) -}}{{- $models = list -}}{{- end -}}
{{- $gw := .Values.gpuWorkers -}}
{{- $cw := .Values.cpuWorkers -}}
{{- $schemes := .Values.uriSchemes -}}
{{- $acc := dict "gpuMin" 0 "gpuMax" 0 "cpuMin" 0 "cpuMax" 0 "gpuModels" 0 "cpuModels" 0 -}}
{{- $out := list -}}
{{- $seen := dict -}}
{{- range $i, $m := $models -}}
{{- if not (kindIs "map" $m) -}}
{{- fail (printf "registry: model #%d: expected a mapping" (add1 $i)) -}}
{{- end -}}
{{- $name := toString (get $m "name") -}}
{{- if not (regexMatch "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$" $name) -}}
{{- fail (printf "registry: model #%d: name: %q is not a valid model name (letters, digits, . _ -; at most 64)" (add1 $i) $name) -}}
{{- end -}}
{{- if hasKey $seen $name -}}
{{- fail (printf "registry: model %q: name: duplicate model name" $name) -}}
{{- end -}}
{{- $_ := set $seen $name true -}}
{{- $where := printf "registry: model %q" $name -}}
{{- /* The registry schema's fields (serve_app/config.py ModelEntry; tests/test_chart.py keeps
them equal): a typo such as gpu_per_replica rendered as a CPU model, and failed in the cluster. */ -}}
{{- $known := list "name" "source" "adapter" "device" "dtype" "gpus_per_replica" "cpus_per_replica" "resources" "autoscaling" "engine" "defaults" "limits" -}}
{{- range $key := keys $m | sortAlpha -}}
{{- if not (has $key $known) -}}
{{- fail (printf "%s: %s: unknown field (known: %s)" $where $key (join ", " $known)) -}}
{{- end -}}
{{- end -}}
{{- range $field := list "gpus_per_replica" "cpus_per_replica" -}}
{{- $v := get $m $field -}}
{{- if and (hasKey $m $field) (not (or (kindIs "invalid" $v) (kindIs "float64" $v) (kindIs "int64" $v) (kindIs "int" $v))) -}}
{{- fail (printf "%s: %s: must be a number, got %v" $where $field $v) -}}
{{- end -}}
{{- end -}}
{{- range $field := list "source" "adapter" -}}
{{- $uri := toString (get $m $field) -}}
{{- if and (hasKey $m $field) (contains "://" $uri) -}}
{{- $scheme := regexReplaceAll "://.*$" $uri "" -}}
{{- if not (has $scheme $schemes) -}}
{{- fail (printf "%s: %s: unknown URI scheme %q in %q (known: %s)" $where $field $scheme $uri (join ", " $schemes)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if not (get $m "source") -}}
{{- fail (printf "%s: source: required field is missing" $where) -}}
{{- end -}}
{{- /* Unset (or null): no GPU, and Ray's default of one CPU (a local `quill serve` shares the
machine instead; a pod's CPUs are sized by cpusPerPod). */ -}}
{{- $gpus := 0.0 -}}
{{- if and (hasKey $m "gpus_per_replica") (not (kindIs "invalid" (get $m "gpus_per_replica"))) -}}
{{- $gpus = float64 (get $m "gpus_per_replica") -}}
{{- end -}}
{{- $cpus := 1.0 -}}
{{- if and (hasKey $m "cpus_per_replica") (not (kindIs "invalid" (get $m "cpus_per_replica"))) -}}
{{- $cpus = float64 (get $m "cpus_per_replica") -}}
{{- end -}}
{{- if lt $gpus 0.0 -}}
{{- fail (printf "%s: gpus_per_replica: must be 0 or more" $where) -}}
{{- end -}}
{{- if le $cpus 0.0 -}}
{{- fail (printf "%s: cpus_per_replica: must be more than 0" $where) -}}
{{- end -}}
{{- $a := get $m "autoscaling" | default dict -}}
{{- if not (kindIs "map" $a) -}}
{{- fail (printf "%s: autoscaling: must be a mapping (min_replicas, max_replicas, ...), got %v" $where $a) -}}
{{- end -}}
{{- /* The pods a worker group holds are computed from these, so they are checked here, not
only when the application builds on the cluster (serve_app/config.py Autoscaling; the test
keeps the list equal): a typo fell back to the default, and "two" counted as 0. */ -}}
{{- $knownScaling := list "min_replicas" "max_replicas" "target_ongoing_requests" "upscale_delay_s" "downscale_delay_s" "look_back_period_s" -}}
{{- range $key := keys $a | sortAlpha -}}
{{- if not (has $key $knownScaling) -}}
{{- fail (printf "%s: autoscaling: %s: unknown field (known: %s)" $where $key (join ", " $knownScaling)) -}}
{{- end -}}
{{- end -}}
{{- range $field := list "min_replicas" "max_replicas" -}}
{{- $v := get $a $field -}}
{{- if and (hasKey $a $field) (not (or (kindIs "int64" $v) (kindIs "int" $v) (and (kindIs "float64" $v) (eq $v (floor $v))))) -}}
{{- fail (printf "%s: autoscaling: %s: must be a whole number (an integer), got %v" $where $field $v) -}}
{{- end -}}
{{- end -}}
{{- $min := int (ternary (get $a "min_replicas") 1 (hasKey $a "min_replicas")) -}}
{{- $max := int (ternary (get $a "max_replicas") 1 (hasKey $a "max_replicas")) -}}
{{- if lt $min 0 -}}
{{- fail (printf "%s: autoscaling: min_replicas: must be greater than or equal to 0, got %d" $where $min) -}}
{{- end -}}
{{- if lt $max 1 -}}
{{- fail (printf "%s: autoscaling: max_replicas: must be greater than or equal to 1, got %d" $where $max) -}}
{{- end -}}
{{- if gt $min $max -}}
{{- fail (printf "%s: autoscaling: min_replicas (%d) is greater than max_replicas (%d)" $where $min $max) -}}
{{- end -}}
{{- $autoscaling := merge (dict "min_replicas" $min "max_replicas" $max "initial_replicas" (max 1 $min)) (omit $a "min_replicas" "max_replicas") -}}
{{- if not (hasKey $autoscaling "target_ongoing_requests") -}}
{{- $_ := set $autoscaling "target_ongoing_requests" 16 -}}
{{- end -}}
{{- $actor := dict "num_cpus" $cpus "num_gpus" $gpus -}}
{{- if get $m "resources" -}}
{{- $_ := set $actor "resources" (get $m "resources") -}}
{{- end -}}
{{- /* How many replicas of this model one worker pod holds, by GPUs and by CPUs. Ray places a
fractional GPU replica within one GPU (two 0.4 replicas per GPU, not five on two GPUs), and a
replica of more than one GPU needs whole GPUs. */ -}}
{{- $group := ternary "gpu" "cpu" (gt $gpus 0.0) -}}
{{- $podCpus := float64 (ternary $gw.cpusPerPod $cw.cpusPerPod (eq $group "gpu")) -}}
{{- $perPod := int (floor (addf (divf $podCpus $cpus) 0.000001)) -}}
{{- if lt $perPod 1 -}}
{{- fail (printf "%s: cpus_per_replica: %v CPUs fit no %s worker pod (%sWorkers.cpusPerPod is %v)" $where $cpus $group $group $podCpus) -}}
{{- end -}}
{{- if eq $group "gpu" -}}
{{- $byGpu := 0 -}}
{{- if lt $gpus 1.0 -}}
{{- $byGpu = mul (int (floor (addf (divf 1.0 $gpus) 0.000001))) (int $gw.gpusPerPod) -}}
{{- else if ne $gpus (floor $gpus) -}}
{{- fail (printf "%s: gpus_per_replica: %v is neither a fraction of one GPU nor a whole number of GPUs" $where $gpus) -}}
{{- else -}}
{{- $byGpu = int (floor (divf (float64 $gw.gpusPerPod) $gpus)) -}}
{{- end -}}
{{- if lt $byGpu 1 -}}
{{- fail (printf "%s: gpus_per_replica: %v GPUs fit no GPU worker pod (gpuWorkers.gpusPerPod is %v)" $where $gpus $gw.gpusPerPod) -}}
{{- end -}}
{{- $perPod = min $byGpu $perPod -}}
{{- end -}}
{{- $w := ternary $gw $cw (eq $group "gpu") -}}
{{- range $res, $amount := (get $m "resources" | default dict) -}}
{{- $offered := float64 (get ($w.rayResources | default dict) $res | default 0) -}}
{{- if le $offered 0.0 -}}
{{- fail (printf "%s: resources: %s is offered by no %s worker pod (set %sWorkers.rayResources)" $where $res $group $group) -}}
{{- end -}}
{{- if gt (float64 $amount) 0.0 -}}
{{- $perPod = min $perPod (int (floor (addf (divf $offered (float64 $amount)) 0.000001))) -}}
{{- end -}}
{{- if lt $perPod 1 -}}
{{- fail (printf "%s: resources: %s %v fits no %s worker pod (%sWorkers.rayResources offers %v)" $where $res $amount $group $group $offered) -}}
{{- end -}}
{{- end -}}
{{- /* Each replica takes 1/perPod of a pod; pods for the group = that summed over every
replica, rounded up, so the group holds every model at its max_replicas at once. */ -}}
{{- $_ := set $acc (printf "%sMax" $group) (addf (get $acc (printf "%sMax" $group)) (divf $max $perPod)) -}}
{{- $_ := set $acc (printf "%sMin" $group) (addf (get $acc (printf "%sMin" $group)) (divf $min $perPod)) -}}
{{- $_ := set $acc (printf "%sModels" $group) (add1 (get $acc (printf "%sModels" $group))) -}}
{{- $out = append $out (dict "name" $name "group" $group "perPod" $perPod "autoscaling_config" $autoscaling "ray_actor_options" $actor) -}}
{{- end -}}
{{- range $k := list "gpuMin" "gpuMax" "cpuMin" "cpuMax" -}}
{{- $_ := set $acc $k (int (ceil (subf (get $acc $k) 0.000001))) -}}
{{- end -}}
{{- $gpuMin := ternary $gw.minReplicas (get $acc "gpuMin") (not (kindIs "invalid" $gw.minReplicas)) -}}
{{- $gpuMax := ternary $gw.maxReplicas (get $acc "gpuMax") (not (kindIs "invalid" $gw.maxReplicas)) -}}
{{- $cpuMin := ternary $cw.minReplicas (get $acc "cpuMin") (not (kindIs "invalid" $cw.minReplicas)) -}}
{{- $cpuMax := ternary $cw.maxReplicas (get $acc "cpuMax") (not (kindIs "invalid" $cw.maxReplicas)) -}}
{{- if gt (int $gpuMin) (int $gpuMax) -}}
{{- fail (printf "gpuWorkers: minReplicas (%v) is greater than maxReplicas (%v)" $gpuMin $gpuMax) -}}
{{- end -}}
{{- if gt (int $cpuMin) (int $cpuMax) -}}
{{- fail (printf "cpuWorkers: minReplicas (%v) is greater than maxReplicas (%v)" $cpuMin $cpuMax) -}}
{{- end -}}
{{- toYaml (dict "models" $out "gpu" (dict "min" (int $gpuMin) "max" (int $gpuMax) "models" (get $acc "gpuModels")) "cpu" (dict "min" (int $cpuMin) "max" (int $cpuMax) "models" (get $acc "cpuModels"))) -}}
{{- end -}}

{{/*
Environment of every Ray container (head and workers): the ingress and the model replicas
read their settings from it. The torch settings are serve_app/config.py's TORCH_ENV (a test
checks that every one of them is here).
*/}}
{{- define "quill.env" -}}
- name: QUILL_WEIGHTS_DIR
  value: {{ .Values.weightsCache.path | quote }}
- name: OMP_WAIT_POLICY
  value: PASSIVE
- name: GOMP_SPINCOUNT
  value: "10000"
- name: THP_MEM_ALLOC_ENABLE
  value: "1"
{{- if .Values.auth.existingSecret }}
- name: QUILL_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ .Values.auth.existingSecret }}
      key: {{ .Values.auth.key }}
{{- end }}
{{- range $k, $v := .Values.env }}
- name: {{ $k }}
  {{- /* Helm reads a values file's numbers as float64: 2097152 would render as "2.097152e+06". */}}
  {{- if and (kindIs "float64" $v) (eq $v (floor $v)) }}
  value: {{ $v | int64 | toString | quote }}
  {{- else }}
  value: {{ $v | toString | quote }}
  {{- end }}
{{- end }}
{{- end -}}

{{- define "quill.volumeMounts" -}}
- name: weights-cache
  mountPath: {{ .Values.weightsCache.path }}
- name: ray-logs
  mountPath: /tmp/ray
{{- end -}}

{{- define "quill.volumes" -}}
{{- /* Helm merges a user's `weightsCache.volume` into the default, so `hostPath: {...}` would
come with the default's `emptyDir` beside it, and a volume with two sources is refused by the
API server: the default's emptyDir goes where another source is given. */ -}}
{{- $cache := deepCopy .Values.weightsCache.volume -}}
{{- if gt (len (keys $cache)) 1 -}}
{{- $_ := unset $cache "emptyDir" -}}
{{- end }}
- name: weights-cache
  {{- toYaml $cache | nindent 2 }}
- name: ray-logs
  emptyDir: {}
{{- end -}}

{{- define "quill.ports" -}}
- name: serve
  containerPort: {{ .Values.serve.port }}
- name: metrics
  containerPort: {{ .Values.metrics.port }}
{{- end -}}
