"""`quill bench serve --workload burst --quick`: a real `quill serve` on a tiny model, driven
over SSE and the WebSocket, then the same burst in-process and through transformers. Checks
the run is whole (every phase served every request, ratios computed, the section written), not
its speed: speed lives in the benchmark's own output."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench import burst
from tests.conftest import save_tiny_gpt2
from tests.processes import registry_entry, write_registry

REPO = Path(__file__).resolve().parents[1]


def test_burst_bench_measures_every_phase_and_writes_its_section(tmp_path):
    out = tmp_path / "perf.md"
    # One round: how rounds fold into rows and ratios is checked on recorded rounds below.
    proc = subprocess.run([sys.executable, "-m", "bench.serve", "--workload", "burst", "--quick", "--bursts", "1",
                           "--out", str(out), "--section", "burst-smoke-test"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((REPO / "bench" / "results" / "burst-smoke-test.json").read_text())
    (REPO / "bench" / "results" / "burst-smoke-test.json").unlink()
    phases = [r["phase"] for r in report["rows"]]
    assert any("SSE" in p for p in phases) and any("WebSocket" in p for p in phases)
    assert sum("capacity" in p for p in phases) == 2  # the two rates below capacity
    for row in report["rows"]:
        assert not row.get("errors") and not row.get("error"), row
        assert row["output_tokens"] == report["args"]["writers"] * report["args"]["max_tokens"] or "capacity" in row["phase"]
        assert row["tok_s"] > 0
    assert all(v is not None for v in report["ratios"].values())
    saturated = [r for r in report["rows"] if "capacity" not in r["phase"]]
    assert len(saturated) >= 5 and len(report["rounds"]) == 1
    assert [r["phase"] for r in report["rounds"][0]] == [r["phase"] for r in saturated]
    # Its rows and ratios are its own round folded (fold_rounds, checked on made-up rounds below).
    folded = burst.fold_rounds(report["rounds"], [r for r in report["rows"] if "capacity" in r["phase"]])
    assert report["ratios"] == folded["ratios"] and report["rows"] == folded["rows"]
    # A round: the server's bursts, the engine beside that server while it idles, then the peers.
    order = [r["phase"] for r in report["rounds"][0]]
    assert order[:4] == [burst.SSE, burst.WEBSOCKET, burst.BESIDE_IDLE, burst.ENGINE], order
    # The replica got what a registry that says nothing about CPUs gets on this machine.
    assert report["replica"]["threads"] >= 1 and report["replica"]["cpus_per_replica"] > 0
    # ... and no dtype (auto): the peers ran in the dtype the server chose, and transformers
    # also in its own float32 wherever that differs.
    assert report["replica"]["registry_dtype"] == "auto"
    assert (report["replica"]["dtype"] == "float32") == (not any("float32" in p for p in phases))
    text = out.read_text()
    assert "<!-- bench:burst-smoke-test:start -->" in text and "quill serve` / static batch" in text
    assert "the engine beside an idle server" in text


def test_each_ratio_pairs_systems_of_one_round_and_each_row_is_its_systems_median_round():
    """Rounds as `quill bench serve --workload burst` records them (made up here): the box
    drifts between rounds, so a ratio is taken within each round and then its median; a system's
    row is its own median round (the lower middle of an even count), every round's tokens/s beside."""
    def round_of(sse, engine, static, beside):
        return [{"phase": burst.SSE, "tok_s": sse}, {"phase": burst.WEBSOCKET, "tok_s": sse - 1},
                {"phase": burst.BESIDE_IDLE, "tok_s": beside}, {"phase": burst.ENGINE, "tok_s": engine},
                {"phase": burst.STATIC_BATCH, "tok_s": static}]

    # A slow round in the middle: every system in it is slow, and the ratios do not see it.
    rounds = [round_of(300, 330, 150, 310), round_of(150, 160, 80, 155), round_of(280, 300, 140, 290)]
    rates = [{"phase": "quill serve, 1 req/s (30% of capacity), SSE", "tok_s": 40}]
    folded = burst.fold_rounds(rounds, rates)
    assert folded["round_ratios"]["serve_over_engine"] == [0.91, 0.94, 0.93]
    assert folded["ratios"]["serve_over_engine"] == 0.93
    assert folded["round_ratios"]["serve_over_static"] == [2.0, 1.88, 2.0]
    assert folded["ratios"]["serve_over_static"] == 2.0
    assert folded["round_ratios"]["serve_over_engine_beside_idle_server"] == [0.97, 0.97, 0.97]
    assert folded["round_ratios"]["engine_beside_idle_server_over_engine"] == [0.94, 0.97, 0.97]
    assert "serve_over_static_float32" not in folded["ratios"]  # no float32 peer ran
    rows = folded["rows"]
    assert [r["phase"] for r in rows] == [burst.SSE, burst.WEBSOCKET, rates[0]["phase"], burst.BESIDE_IDLE,
                                          burst.ENGINE, burst.STATIC_BATCH]
    assert rows[0]["tok_s"] == 280 and rows[0]["bursts_tok_s"] == [300, 150, 280]
    assert rows[4]["tok_s"] == 300 and rows[5]["tok_s"] == 140
    # Two rounds: the lower one; a round whose system failed makes its ratio unknown.
    two = burst.fold_rounds(rounds[:2], [])
    assert two["rows"][0]["tok_s"] == 150 and two["ratios"]["serve_over_engine"] == 0.91
    failed = rounds[:1] + [round_of(150, 160, 80, 155)]
    failed[1][3] = {"phase": burst.ENGINE, "error": "timed out"}
    assert burst.fold_rounds(failed, [])["ratios"]["serve_over_engine"] is None


def test_idle_bench_reports_cpu_and_wakeups_for_every_process_of_a_users_registry(tmp_path):
    out = tmp_path / "perf.md"
    registry = write_registry(tmp_path / "registry.yaml", [registry_entry("tiny", save_tiny_gpt2(tmp_path / "tiny"))])
    proc = subprocess.run([sys.executable, "-m", "bench.idle", "--quick", "--registry", str(registry), "--out", str(out),
                           "--section", "idle-smoke-test"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((REPO / "bench" / "results" / "idle-smoke-test.json").read_text())
    (REPO / "bench" / "results" / "idle-smoke-test.json").unlink()
    names = [r["process"] for r in report["processes"]]
    # The server's own Ray, found through its session: the C++ daemons and Serve's actors.
    assert {"raylet", "gcs_server"} <= set(names), names
    assert any(n.startswith("ray::ServeReplica:quill:model-tiny") for n in names), names  # the registry's model
    assert any(n.startswith("ray::ServeReplica:quill:Ingress") for n in names), names
    assert any(n.startswith("ray::ServeController") for n in names), names
    assert report["total"]["wakeups_per_s"] > 0 and report["total"]["processes"] == len(names)
    assert abs(report["total"]["wakeups_per_s"] - sum(r["wakeups_per_s"] for r in report["processes"])) < 1
    assert all(r["cpu_pct"] >= 0 and r["wakeups_per_s"] >= 0 for r in report["processes"])
    text = out.read_text()
    assert "<!-- bench:idle-smoke-test:start -->" in text and "| raylet |" in text
