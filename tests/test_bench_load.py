"""`quill bench load` for 20 seconds against a real `quill serve` it starts on a tiny random
checkpoint (#12): every request ends with done, cancelled or a clear error, none is lost, and
every kind of ending is seen, so each path (abandon, retype, a refused request) really ran.
The 10-minute runs of docs/performance.md are the same command with --duration 600."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration


def test_twenty_seconds_of_writers_lose_nothing(tmp_path, monkeypatch):
    from bench.load import main

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # inherited by the quill serve it starts
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    out, raw = tmp_path / "performance.md", tmp_path / "load.json"
    # More misbehaviour than the default mix, so that 20 s surely shows every ending (about 120
    # requests: none abandoned would be a 0.85**120 chance), and memory sampled every 2 s.
    # With an API key (the server started with it): HTTP, the WebSocket and /metrics carry it.
    rc = main(["--start", "--start-model", "tiny", "--api-key", "load-test-key",
               "--duration", "20", "--memory-every", "2", "--writers", "6", "--think", "0.5-1.5",
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


# ---- the outcomes are read right: a fake server that misbehaves on purpose -------------------


def _fake_quill():
    """An app shaped like Quill's API whose answers depend on the prompt: a proper end, an error
    event, a stream cut without [DONE], a stream that goes silent, a socket closed mid-answer."""
    import asyncio

    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route, WebSocketRoute

    def chunk(text, finish=None):
        return "data: " + json.dumps({"choices": [{"text": text, "index": 0, "finish_reason": finish}]}) + "\n\n"

    async def completions(request):
        prompt = (await request.json())["prompt"]

        async def events():
            yield chunk("Once")
            if prompt == "done":
                yield chunk(" upon", "length")
                yield "data: " + json.dumps({"choices": [], "usage": {"completion_tokens": 2}}) + "\n\n"
            elif prompt == "error":
                yield "event: error\ndata: " + json.dumps({"error": {"type": "model_unavailable", "message": "x"}}) + "\n\n"
            elif prompt == "silent":
                await asyncio.sleep(30)
            if prompt != "cut":
                yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def stream(ws):
        await ws.accept()
        msg = json.loads(await ws.receive_text())
        await ws.send_text(json.dumps({"type": "suggestions", "id": msg["id"], "texts": ["Once"], "done": False}))
        if msg["prompt"] == "done":
            await ws.send_text(json.dumps({"type": "done", "id": msg["id"], "texts": ["Once"],
                                           "usage": {"completion_tokens": 1}}))
            await ws.receive_text()
        await ws.close(1011)

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                             WebSocketRoute("/v1/stream", stream)])


def test_an_unfinished_stream_or_socket_is_counted_lost():
    import asyncio

    import httpx

    from bench.load_writers import Target, Turn, WsWriter, http_stream
    from tests.test_page import Uvicorn

    server = Uvicorn(_fake_quill()).start()
    target = Target(url=server.url, model="m", headers={}, max_tokens=4, n_native=1, truncate_prompt_tokens=64,
                    over_limit_n=5, stall_s=1.0)

    async def outcomes():
        async with httpx.AsyncClient(timeout=httpx.Timeout(1.0)) as client:
            sse = [(await http_stream(client, target, Turn(p), "sse")).outcome for p in ("done", "error", "cut", "silent")]
        ws = [(await WsWriter(target).turn(Turn(p)))[0].outcome for p in ("done", "close")]
        return sse, ws

    try:
        sse, ws = asyncio.run(outcomes())
    finally:
        server.stop()
    assert sse == ["done", "error:model_unavailable", "lost", "lost"]
    assert ws == ["done", "lost"]
