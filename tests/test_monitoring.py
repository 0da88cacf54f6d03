"""Prometheus config, recording rules and alerts, checked by the real promtool."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

PROM = Path(__file__).resolve().parents[1] / "monitoring" / "prometheus"
pytestmark = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (.ci/run installs it)")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], cwd=PROM, capture_output=True, text=True, timeout=60)


def test_scrape_config_and_rules_are_valid():
    out = promtool("check", "config", "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_alerts_fire_on_failing_and_backlogged_models():
    out = promtool("test", "rules", "rules_test.yml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_broken_rule_is_caught(tmp_path):
    bad = (PROM / "rules.yml").read_text().replace("> 0.05", "> > 0.05")
    (tmp_path / "rules.yml").write_text(bad)
    out = subprocess.run(["promtool", "check", "rules", str(tmp_path / "rules.yml")], capture_output=True, text=True)
    assert out.returncode != 0
