"""The shipped monitoring, live: one `quill serve` (two tiny models), two GPU exporters and two
real Prometheus servers (Debian's package), each loading monitoring/prometheus/rules.yml.

- "local" runs prometheus.yml as shipped, targets pointed at this test's ports: the app's
  /metrics (quill_*, ray_serve_*) and the exporters.
- "cluster" runs cluster.yml's jobs, their DNS discovery swapped for this machine's addresses:
  Ray's own metrics export of the `quill serve` node (series named ray_quill_* there, stripped to
  quill_* by the shipped metric relabelling) and the exporters.

The exporters: the real `quill gpu-exporter` process on this GPU-less machine (nvml_up 0), and the
same exporter code over a FAKE NVML with two GPUs (tests/fake_nvml.py), so the GPU rules and panels
meet real quill_gpu_* series. The dashboard's queries run on the local Prometheus.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from monitoring.gpu_exporter import GpuExporter, serve
from serve_app.metrics import GPU_ONLY
from tests.fake_nvml import FakeNvml, two_gpus
from tests.processes import REPO, free_port, kill_group, registry_entry, start_quill_serve, write_registry

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed (.ci/run installs it)"),
]

PROM = REPO / "monitoring" / "prometheus"
MODELS = ("tiny-a", "tiny-b")


def start_prometheus(config: dict, workdir: Path, name: str) -> tuple[str, subprocess.Popen]:
    # Fast, but not so fast that the app's /metrics (a fan-out to Ray's agents) times out on a
    # busy 2-core box: the scrape timeout cannot exceed the interval.
    config["global"].update(scrape_interval="2s", evaluation_interval="2s")
    config["rule_files"] = [str(PROM / "rules.yml")]
    (workdir / f"{name}.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={workdir / f'{name}.yml'}", f"--storage.tsdb.path={workdir / name}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=open(workdir / f"{name}.log", "w"), start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                return url, proc
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_group(proc, grace=5)
            pytest.fail(f"prometheus {name} did not start:\n{(workdir / f'{name}.log').read_text()[-2000:]}")
        time.sleep(0.2)


def local_config(app: str, exporters: list[str]) -> dict:
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    jobs["quill"]["static_configs"] = [{"targets": [app]}]
    jobs["quill-gpu-exporter"]["static_configs"] = [{"targets": exporters}]
    return config


def cluster_config(ray_export: str, exporters: list[str]) -> dict:
    config = yaml.safe_load((PROM / "cluster.yml").read_text())
    for job in config["scrape_configs"]:
        job.pop("dns_sd_configs")  # no cluster DNS here: the same jobs, this machine's targets
        targets = [ray_export] if job["job_name"] == "quill-ray-metrics" else exporters
        job["static_configs"] = [{"targets": targets}]
    return config


def query(prom: str, expr: str) -> list[dict]:
    body = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def by_label(result: list[dict], label: str) -> dict[str, float]:
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in result}


def wait_for(prom: str, expr: str, ok, timeout: float = 90) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        result = query(prom, expr)
        if ok(result) or time.monotonic() > deadline:
            return result
        time.sleep(1)


def send_traffic(url: str, rounds: int = 3) -> None:
    def one(model: str, i: int) -> None:
        # One shared opening (over a 16-token block): later rounds hit the prefix cache, so its
        # counter is exported and the prefix-cache rule and panel name a live series.
        prompt = f"Every writer resends the same long opening of their document to the model, over and over again; then {i} says"
        body = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0}
        if i % 2:  # streamed too: the same series must count it
            with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=120) as r:
                assert r.status_code == 200
                r.read()
        else:
            assert httpx.post(f"{url}/v1/completions", json=body, timeout=120).status_code == 200

    for i in range(rounds):
        workers = [threading.Thread(target=one, args=(m, i * 10 + j)) for m in MODELS for j in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        # A counter's first sample is not an increase: let Prometheus see each round separately
        # (2 s to Ray's export, 2 s between scrapes).
        time.sleep(5)
    assert httpx.post(f"{url}/v1/completions", json={"model": "no-such-model", "prompt": "x"}, timeout=30).status_code == 404


@pytest.fixture(scope="module")
def stack(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("monitoring")
    registry = write_registry(root / "registry.yaml", [registry_entry(n, tiny_checkpoints[n]) for n in MODELS])
    ray_port = free_port()
    procs: list[subprocess.Popen] = []
    fake_server = None
    try:
        exporter_port = free_port()
        quill = Path(sys.executable).with_name("quill")
        procs.append(subprocess.Popen(
            [str(quill), "gpu-exporter", "--host", "127.0.0.1", "--port", str(exporter_port), "--interval", "1"],
            stdout=subprocess.DEVNULL, stderr=open(root / "exporter.log", "w"), start_new_session=True, cwd=REPO))
        fake_port = free_port()
        fake = GpuExporter(FakeNvml(two_gpus()))
        fake.poll()
        fake_server = serve(fake, "127.0.0.1", fake_port)
        server = start_quill_serve(registry, root, "--metrics-export-port", str(ray_port))
        procs.append(server.proc)
        exporters = [f"127.0.0.1:{exporter_port}", f"127.0.0.1:{fake_port}"]
        local, p1 = start_prometheus(local_config(server.url.removeprefix("http://"), exporters), root, "local")
        procs.append(p1)
        cluster, p2 = start_prometheus(cluster_config(f"127.0.0.1:{ray_port}", exporters), root, "cluster")
        procs.append(p2)
        # Both have scraped the app before the first request, so every increase is seen.
        for prom in (local, cluster):
            wait_for(prom, "up", lambda r: len(r) == 3 and all(x["value"][1] == "1" for x in r), timeout=60)
        send_traffic(server.url)
        yield {"local": local, "cluster": cluster, "app": server.url,
               "exporter": exporters[0], "fake_exporter": exporters[1]}
    finally:
        if fake_server is not None:
            fake_server.shutdown()
        for proc in reversed(procs):
            kill_group(proc, grace=0)  # a clean Serve shutdown is test_api_serve's concern


@pytest.mark.parametrize("path", ["local", "cluster"])
def test_recording_rules_give_tokens_per_second_and_latency_per_model(stack, path):
    prom = stack[path]
    tokens = wait_for(prom, "quill:generated_tokens:rate1m", lambda r: set(by_label(r, "model")) >= set(MODELS))
    assert set(by_label(tokens, "model")) == set(MODELS)
    assert all(v > 0 for v in by_label(tokens, "model").values()), tokens
    for rule in ("quill:time_to_first_token_seconds:p50_5m", "quill:time_to_first_token_seconds:p99_5m",
                 "quill:time_per_output_token_seconds:p50_5m", "quill:time_per_output_token_seconds:p99_5m"):
        values = by_label(wait_for(prom, rule, lambda r: len(r) == 2), "model")
        assert set(values) == set(MODELS), (rule, values)
        assert all(0 < v < 60 and not math.isnan(v) for v in values.values()), (rule, values)
    # Ray Serve's own series reach both paths under the same names.
    replicas = by_label(wait_for(prom, "quill:replicas:healthy", lambda r: len(r) == 2), "model")
    assert replicas == {"tiny-a": 1, "tiny-b": 1}
    assert by_label(query(prom, "quill:replicas:target"), "model") == {"tiny-a": 1, "tiny-b": 1}


def test_both_paths_count_the_same_tokens_and_keep_no_ray_prefix(stack):
    expr = "sum by (model) (quill_generated_tokens_total)"
    local = by_label(query(stack["local"], expr), "model")
    cluster = by_label(wait_for(stack["cluster"], expr, lambda r: by_label(r, "model") == local), "model")
    assert cluster == local and all(v > 0 for v in local.values())
    # On the cluster path the stored names are quill_*: the relabel left no ray_quill_* behind.
    assert query(stack["cluster"], 'count({__name__=~"ray_quill_.+"})') == []
    assert query(stack["cluster"], 'count({__name__=~"ray_serve_.+"})')  # Ray Serve's keep their prefix


@pytest.mark.parametrize("path", ["local", "cluster"])
def test_the_exporters_nvml_up_and_gpu_headroom(stack, path):
    prom = stack[path]
    up = by_label(wait_for(prom, "quill_gpu_exporter_nvml_up", lambda r: len(r) == 2), "instance")
    assert up == {stack["exporter"]: 0, stack["fake_exporter"]: 1}  # no GPU here; the fake has two
    headroom = by_label(query(prom, "quill:gpu_memory_headroom:ratio"), "gpu")
    assert headroom == {"0": 0.25, "1": 0.975}


@pytest.mark.parametrize("path", ["local", "cluster"])
def test_every_rule_evaluates_cleanly_and_the_nvml_alert_is_pending(stack, path):
    prom = stack[path]
    wait_for(prom, "quill:generated_tokens:rate1m", lambda r: len(r) == 2)
    groups = httpx.get(f"{prom}/api/v1/rules", timeout=10).json()["data"]["groups"]
    assert {g["name"] for g in groups} == {"quill.recording", "quill.alerts"}
    broken = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r["health"] != "ok"]
    assert broken == []
    alerts = httpx.get(f"{prom}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    active = {(a["labels"]["alertname"], a["labels"].get("instance") or a["labels"].get("model")): a["state"]
              for a in alerts}
    # This GPU-less machine's exporter says nvml_up 0: the alert waits out its 5 minutes. (Latency
    # alerts may go pending on a busy box; the healthy parts must not.)
    assert active.get(("QuillGpuNvmlDown", stack["exporter"])) == "pending", active
    assert ("QuillGpuNvmlDown", stack["fake_exporter"]) not in active
    for quiet in ("QuillDown", "QuillModelNotReady", "QuillGpuExporterDown", "QuillGpuMemoryHigh", "QuillRequestsFailing",
                  "QuillReplicaRestarts"):
        assert quiet not in {name for name, _ in active}, active


def test_replicas_report_their_memory(stack):
    weights = by_label(wait_for(stack["local"], "sum by (model) (quill_model_weights_bytes)", lambda r: len(r) == 2), "model")
    assert set(weights) == set(MODELS) and all(v > 1e6 for v in weights.values())
    kv = by_label(query(stack["local"], "sum by (model) (quill_model_kv_cache_bytes)"), "model")
    assert all(v > 0 for v in kv.values()) and set(kv) == set(MODELS)  # traffic used cache slots


# ---- the dashboard and the rules name only series that someone really exports

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
                "and", "or", "unless", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (what is neither a function, a keyword, a
    label, a string nor a duration)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", e):
        if e[m.end():].lstrip().startswith("(") or m.group(0).lower() in PROMQL_WORDS:
            continue
        names.add(m.group(0))
    return names


def test_metric_names_finds_selectors_only():
    expr = 'sum by (model, le) (rate(a_bucket{x="y(z)"}[5m] offset 1h)) / on (model) group_left b:c:d > 1e-9 and up'
    assert metric_names(expr) == {"a_bucket", "b:c:d", "up"}


def dashboard_exprs() -> list[tuple[str, str]]:
    board = json.loads((REPO / "monitoring" / "grafana" / "quill.json").read_text())
    return [(p["title"], t["expr"]) for p in board["panels"] for t in p["targets"]]


def test_every_dashboard_query_parses_and_names_only_exported_series(stack):
    local = stack["local"]
    wait_for(local, "quill:generated_tokens:rate1m", lambda r: len(r) == 2)
    live = set()
    for prom in (local, stack["cluster"]):
        live |= set(httpx.get(f"{prom}/api/v1/label/__name__/values", timeout=10).json()["data"])
    rules = [r["expr"] for g in yaml.safe_load((PROM / "rules.yml").read_text())["groups"] for r in g["rules"]]
    unknown = {}
    for title, expr in dashboard_exprs():
        query(local, expr.replace("$namespace", "").replace("$model", ".+"))  # asserts that Prometheus parsed and ran it
        for name in metric_names(expr) - live - GPU_ONLY:
            unknown.setdefault(name, []).append(title)
    for expr in rules:
        for name in metric_names(expr) - live:
            unknown.setdefault(name, []).append("rules.yml")
    # GPU_ONLY (serve_app/metrics.py): torch's allocator gauges, which only a replica on a GPU sets.
    assert unknown == {}, f"series no scrape here exports: {unknown}"


def dashboard_variable(name: str) -> dict:
    board = json.loads((REPO / "monitoring" / "grafana" / "quill.json").read_text())
    return next(v for v in board["templating"]["list"] if v["name"] == name)


def label_values(prom: str, definition: str) -> list[str]:
    """What Grafana's `label_values(series, label)` variable lists: the series API's label values."""
    series, label = re.fullmatch(r"label_values\((.+), (\w+)\)", definition).groups()
    body = httpx.get(f"{prom}/api/v1/label/{label}/values", params={"match[]": series}, timeout=10).json()
    return body["data"]


@pytest.mark.parametrize("path, namespaces", [("local", []), ("cluster", ["quill"])])
def test_the_dashboards_namespace_picker_shows_one_release(stack, path, namespaces):
    """A cluster's series carry their release's namespace; the picker lists it and every panel
    filters on it, so two releases' same-named models are not summed. A local server's series have
    none: the picker is empty (Grafana's value is then "") and the panels still show them."""
    prom = stack[path]
    wait_for(prom, "quill:generated_tokens:rate1m", lambda r: len(r) == 2)
    assert label_values(prom, dashboard_variable("namespace")["definition"]) == namespaces
    chosen = namespaces[0] if namespaces else ""
    models = dashboard_variable("model")["definition"].replace("$namespace", chosen)
    assert sorted(label_values(prom, models)) == sorted(MODELS)
    tokens = dict(dashboard_exprs())["Tokens generated per second"]
    assert set(by_label(query(prom, tokens.replace("$namespace", chosen).replace("$model", ".*")), "model")) == set(MODELS)
    assert query(prom, tokens.replace("$namespace", "another-release").replace("$model", ".*")) == []
