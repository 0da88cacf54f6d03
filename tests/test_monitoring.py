"""monitoring/: the scrape configs, rules and alerts checked by the real promtool; the dashboard's
shape; a replica's own memory gauges. (The live checks, with Prometheus scraping `quill serve` and
the exporter, are in test_monitoring_integration.py.)"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

MONITORING = Path(__file__).resolve().parents[1] / "monitoring"
PROM = MONITORING / "prometheus"
DASHBOARD = MONITORING / "grafana" / "quill.json"
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (.ci/run installs it)")


def promtool(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def rules() -> list[dict]:
    return [r for g in yaml.safe_load((PROM / "rules.yml").read_text())["groups"] for r in g["rules"]]


@needs_promtool
@pytest.mark.parametrize("config", ["prometheus.yml", "cluster.yml"])
def test_scrape_configs_and_their_rules_are_valid(config):
    out = promtool("check", "config", config)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_the_rules_file_is_valid():
    out = promtool("check", "rules", "rules.yml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_cluster_config_strips_ray_prefix_from_quill_series_only():
    jobs = {j["job_name"]: j for j in yaml.safe_load((PROM / "cluster.yml").read_text())["scrape_configs"]}
    (relabel,) = jobs["quill-ray-metrics"]["metric_relabel_configs"]
    pattern = re.compile(f"^(?:{relabel['regex']})$")  # Prometheus anchors relabel regexes
    assert pattern.sub(relabel["replacement"].replace("$1", r"\1"), "ray_quill_requests_total") == "quill_requests_total"
    assert not pattern.match("ray_serve_deployment_replica_healthy")


def test_every_rule_has_a_unit_test_on_both_paths():
    records = {r["record"] for r in rules() if "record" in r}
    alerts = {r["alert"] for r in rules() if "alert" in r}
    groups = {t["name"]: t for t in yaml.safe_load((PROM / "rules_test.yml").read_text())["tests"]}
    assert {"local", "cluster"} <= set(groups)
    for name, group in ((n, groups[n]) for n in ("local", "cluster")):
        tested = set()
        for t in group["promql_expr_test"]:
            if t["exp_samples"]:  # a test that expects nothing cannot fail on a missing rule
                tested |= set(re.findall(r"quill:[a-z0-9_]+:[a-z0-9_]+", t["expr"]))
        assert records - tested == set(), f"{name}: recording rules without a test"
        fired = {t["alertname"] for t in group["alert_rule_test"] if t.get("exp_alerts")}
        assert alerts - fired == set(), f"{name}: alerts never shown firing"


@needs_promtool
def test_the_rules_pass_their_unit_tests():
    out = promtool("test", "rules", "rules_test.yml")
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
@pytest.mark.parametrize("change", [
    ("quill:request_errors:ratio5m > 0.05", "quill:request_errors:ratio5m > 0.5"),  # a threshold
    ('status=~"error|overloaded"', 'status="error"'),  # a selector
    ("model-(.+)", "model-(.)"),  # the deployment -> model mapping
    ("max by (namespace, model)", "max by (model)"),  # one release's failed model behind another's
])
def test_a_wrong_rule_fails_the_unit_tests(tmp_path, change):
    text = (PROM / "rules.yml").read_text()
    assert change[0] in text
    (tmp_path / "rules.yml").write_text(text.replace(change[0], change[1]))
    shutil.copy(PROM / "rules_test.yml", tmp_path)
    out = promtool("test", "rules", "rules_test.yml", cwd=tmp_path)
    assert out.returncode != 0 and "FAILED" in out.stdout + out.stderr


# ---- the dashboard (its queries run against a live Prometheus in test_monitoring_integration.py)

def dashboard_targets() -> list[tuple[str, str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["expr"]) for p in panels for t in p.get("targets", [])]


def test_the_dashboard_covers_models_and_gpus():
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "quill" and board["title"]
    titles = " | ".join(p["title"] for p in board["panels"]).lower()
    for topic in ("tokens", "time to first token", "per output token", "queue", "replicas", "errors",
                  "gpu memory", "gpu utilisation", "nvml"):
        assert topic in titles, topic
    # Grafana's sidecar provisions it anywhere: the data source is a variable, not a fixed uid.
    assert {"prometheus"} == {v["query"] for v in board["templating"]["list"] if v["type"] == "datasource"}
    for title, expr in dashboard_targets():
        assert expr.strip(), title


def test_dashboard_panel_ids_are_unique():
    ids = [p["id"] for p in json.loads(DASHBOARD.read_text())["panels"]]
    assert len(ids) == len(set(ids))


# ---- a replica's own memory view

def test_a_replica_reports_the_bytes_of_its_weights_and_kv_cache(tiny_checkpoints):
    from prometheus_client.parser import text_string_to_metric_families
    from transformers import GPT2LMHeadModel

    from serve_app.engine import Engine
    from serve_app.engine.config import EngineConfig
    from serve_app.engine.types import GenerationRequest, SamplingParams
    from serve_app.metrics import MemoryMetrics, render_local

    def gauges() -> dict[str, float]:
        return {s.name: s.value for f in text_string_to_metric_families(render_local().decode()) for s in f.samples
                if s.labels.get("model") == "mem-test"}

    path = tiny_checkpoints["tiny-a"]
    engine = Engine(EngineConfig(source=str(path), max_batch_size=8, max_seq_len=256))
    memory = MemoryMetrics()
    memory.record(engine, "mem-test")
    params = sum(p.numel() * p.element_size() for p in GPT2LMHeadModel.from_pretrained(path).parameters())
    before = gauges()
    # At least the parameters; at most twice (on a CPU the output layer is packed once more for
    # oneDNN, a second resident copy of the tied embedding).
    assert params <= before["quill_model_weights_bytes"] <= 2 * params
    cfg = GPT2LMHeadModel.config_class.from_pretrained(path)
    # Keys and values for 8 slots x 256 positions of every layer, float32, resident from the start.
    kv_bytes = 2 * cfg.n_layer * 8 * 256 * cfg.n_embd * 4
    assert before["quill_model_kv_cache_bytes"] == kv_bytes
    assert "quill_model_cuda_allocated_bytes" not in before  # a CPU replica has no GPU view

    engine.add(GenerationRequest("The court held that", SamplingParams(max_tokens=4, n=2)))
    while engine.has_work:
        engine.step()
    memory.record(engine, "mem-test")
    assert gauges()["quill_model_kv_cache_bytes"] == kv_bytes  # serving touches no new memory
