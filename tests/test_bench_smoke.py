"""`quill bench engine --quick` end to end on a tiny model: every system gets a row, the numbers
are real, and the ratios come from the rows rather than from anywhere else."""
from __future__ import annotations

import json
import re

import pytest

from bench import engine as bench_engine
from bench.systems import OURS, SYSTEMS


def _table_rows(markdown: str) -> dict[str, list[str]]:
    rows = {}
    for line in markdown.splitlines():
        m = re.match(r"\| `([\w-]+)` \|(.*)\|$", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in m.group(2).split("|")]
    return rows


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    doc, raw = out / "performance.md", out / "engine.json"
    # inline: the systems run in this process, so the test does not pay for four interpreters
    # starting (about 10 s each on a busy 2-core box); the spawned path is the default.
    rc = bench_engine.main(["--quick", "--models", "tiny", "--threads", "1", "--isolation", "inline",
                            "--out", str(doc), "--json", str(raw)])
    return rc, doc.read_text(), json.loads(raw.read_text())


def test_every_system_has_a_row_with_tokens(quick_run):
    rc, doc, report = quick_run
    assert rc == 0
    rows = report["models"]["tiny"]["rows"]
    assert [r["system"] for r in rows] == list(SYSTEMS)
    for r in rows:
        assert "error" not in r, r
        assert r["completed"] == r["requests"] == 8
        assert r["tok_s"] > 0 and r["output_tokens"] > 0
        assert r["ttft_p50_s"] is not None and r["ttft_p50_s"] >= 0
    table = _table_rows(doc)
    assert set(table) == set(SYSTEMS)
    assert "<!-- bench:engine:cpu:quick:start -->" in doc and "<!-- bench:engine:cpu:quick:end -->" in doc


def test_ratios_are_computed_from_the_rows(quick_run):
    _, doc, report = quick_run
    rows = {r["system"]: r for r in report["models"]["tiny"]["rows"]}
    ours = rows[OURS]
    table = _table_rows(doc)
    for name, r in rows.items():
        expected = round(ours["tok_s"] / r["tok_s"], 2)
        assert r["quill_speedup"] == expected
        assert r["ttft_p50_vs_quill"] == round(r["ttft_p50_s"] / ours["ttft_p50_s"], 2)
        # the table shows the same ratio (its last two columns), and tokens/s from the same row
        assert float(table[name][-2]) == pytest.approx(expected, abs=0.006)
        assert float(table[name][2]) == pytest.approx(r["tok_s"], abs=0.06)
    assert rows[OURS]["quill_speedup"] == 1.0


def test_our_engine_reports_its_steps_against_the_best_a_pass_could_do(quick_run):
    """Where the engine stands against the machine: its steps, the rows a pass carried, and the
    fraction of the fastest pass of that size that the measured copy and matmul rates allow."""
    _, doc, report = quick_run
    mr = report["models"]["tiny"]
    ours = next(r for r in mr["rows"] if r["system"] == OURS)
    rows = ours["output_tokens"] + ours["prompt_tokens"] - ours["completed"]
    assert ours["steps"] > 0 and ours["rows_per_step"] == pytest.approx(rows / ours["steps"], abs=0.06)
    # The decode rows' reads of the cache count too: every request here decodes past its prompt.
    kv_ms = ours["kv_bytes_per_step"] / (report["limits"]["copy_gbs_read_plus_write"] * 1e9) * 1e3
    assert ours["kv_bytes_per_step"] > 0
    assert mr["roofline_step_ms"] >= mr["floors"]["batch1_floor_ms"] + kv_ms - 0.01
    assert 0 < mr["quill_fraction_of_roofline"] == round(mr["roofline_step_ms"] / ours["mean_step_ms"], 3)
    assert f"Quill's steps: {ours['steps']}, {ours['rows_per_step']} rows a pass" in doc
    assert f"({ours['kv_bytes_per_step'] / 1e6:.0f} MB a step on average)" in doc
    assert not any("steps" in r for r in mr["rows"] if r["system"] != OURS)  # transformers' have none


def test_a_rerun_replaces_its_section(tmp_path):
    doc = tmp_path / "performance.md"
    bench_engine.write_section(doc, "engine:cpu", "first")
    bench_engine.write_section(doc, "other", "kept")
    bench_engine.write_section(doc, "engine:cpu", "second")
    text = doc.read_text()
    assert "second" in text and "first" not in text and "kept" in text
    assert text.count("<!-- bench:engine:cpu:start -->") == 1


def test_workload_is_seeded_and_bounded():
    a = bench_engine.make_workload(64, 2.0, (16, 256), (16, 128), seed=3)
    b = bench_engine.make_workload(64, 4.0, (16, 256), (16, 128), seed=3)
    assert [w["prompt"] for w in a] == [w["prompt"] for w in b]  # the rate only scales time
    assert a[0]["arrival_s"] == 0 and a[-1]["arrival_s"] == pytest.approx(2 * b[-1]["arrival_s"], abs=1e-3)
    assert all(16 <= len(w["prompt"]) <= 256 and 16 <= w["max_tokens"] <= 128 for w in a)
    assert bench_engine.percentile([1, 2, 3, 4], 50) == 2.5
