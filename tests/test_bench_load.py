"""`quill bench load` for 30 seconds against a real `quill serve` it starts on a tiny random
checkpoint (#12): every request ends with done, cancelled or a clear error, none is lost, and
every kind of ending is seen, so each path (abandon, retype, a refused request) really ran.
The 10-minute runs of docs/performance.md are the same command with --duration 600."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration


def test_thirty_seconds_of_writers_lose_nothing(tmp_path, monkeypatch):
    from bench.load import main

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # inherited by the quill serve it starts
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    out, raw = tmp_path / "performance.md", tmp_path / "load.json"
    # More misbehaviour than the default mix, so that 30 s surely shows every ending.
    # With an API key (the server started with it): HTTP, the WebSocket and /metrics carry it.
    rc = main(["--start", "--start-model", "tiny", "--api-key", "load-test-key",
               "--duration", "30", "--writers", "6", "--think", "0.5-1.5",
               "--abandon", "0.15", "--retype", "0.5", "--over-limit", "0.1",
               "--out", str(out), "--section", "load-test", "--raw", str(raw)])
    report = json.loads(raw.read_text())
    total = report["summary"]["total"]
    assert rc == 0, report["summary"]
    assert total["lost"] == 0, report["summary"]["lost_examples"]
    assert total["done"] > 0 and total["cancelled"] > 0 and total["abandoned"] > 0, total
    assert total["errors"].get("invalid_request_error", 0) > 0, total  # the over-limit requests, refused clearly
    assert set(report["summary"]["channels"]) == {"sse", "native", "ws"}
    assert all(r["outcome"] for r in report["records"])
    # Abandoned and replaced requests reached the engines as cancellations (slots freed).
    assert report["server_requests"].get("cancelled", 0) > 0, report["server_requests"]
    assert total["ttft_ms"]["p50"] is not None and total["per_token_ms"]["p50"] is not None
    # The replica's memory was sampled over the run, from /proc and from /metrics.
    assert len(report["samples"]) >= 5 and any(s["rss"] for s in report["samples"])
    assert any(s.get("kv_cache") for s in report["samples"])
    assert "load-test-key" not in raw.read_text()  # the key is never written into a report
    section = out.read_text()
    assert "<!-- bench:load-test:start -->" in section and "**Nothing lost**" in section
    assert "| all |" in section and "Machine:" in section
