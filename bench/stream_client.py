"""Light streaming clients for the benchmarks: the load generator must not steal the server's CPU.

On a 2-core box the client shares the cores with the server it measures, so these read the
bytes themselves: plain HTTP/1.1 over asyncio streams with a chunked-body reader, and only the
events' arrival times kept (the last `data:` frame is parsed for the usage). httpx spent about as
much CPU per event as the server's own SSE path. The WebSocket client is the `websockets`
library's, which is already light.

Every call returns one record: `ttft_s`, `times` (seconds since the request was sent, one per
event that carried text), `tokens` (completion tokens, from the usage), `error`.
"""
from __future__ import annotations

import asyncio
import json
import time
from urllib.parse import urlsplit


async def _read_chunked(reader: asyncio.StreamReader):
    """The pieces of a `Transfer-Encoding: chunked` body, as they arrive."""
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return
        yield await reader.readexactly(size)
        await reader.readexactly(2)  # the CRLF after each chunk


async def sse_request(url: str, path: str, body: dict) -> dict:
    """POST a streaming request; time each `data:` event that carries text."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    payload = json.dumps(body).encode()
    t0 = time.perf_counter()
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload
    )
    times: list[float] = []
    last_data = b""
    try:
        status = int((await reader.readline()).split()[1])
        chunked = False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            chunked |= line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower()
        pieces = _read_chunked(reader) if chunked else _read_all(reader)
        if status != 200:
            text = b"".join([p async for p in pieces]).decode(errors="replace")
            return {"error": f"HTTP {status}: {text[:200]}", "times": [], "tokens": 0}
        buffer = b""
        async for piece in pieces:
            now = time.perf_counter() - t0
            buffer += piece
            *frames, buffer = buffer.split(b"\n\n")
            for frame in frames:
                if frame.startswith(b"event: error"):
                    return {"error": frame.decode(errors="replace")[:300], "times": times, "tokens": 0}
                if frame == b"data: [DONE]":
                    continue
                last_data = frame
                # A frame with text: `"text":"` followed by anything but the closing quote.
                if b'"text":"' in frame and b'"text":""' not in frame:
                    times.append(now)
    finally:
        writer.close()
    usage = json.loads(last_data.removeprefix(b"data: ")).get("usage") or {} if last_data else {}
    return {"ttft_s": times[0] if times else None, "times": times, "tokens": usage.get("completion_tokens", 0)}


async def _read_all(reader: asyncio.StreamReader):
    while piece := await reader.read(65536):
        yield piece


async def ws_request(url: str, message: dict) -> dict:
    """One generation over WS /v1/stream with `every: 1`: a `suggestions` message per token."""
    from websockets.asyncio.client import connect

    ws_url = url.replace("http://", "ws://").replace("https://", "wss://") + "/v1/stream"
    times: list[float] = []
    async with connect(ws_url, max_size=None, compression=None) as ws:
        t0 = time.perf_counter()
        await ws.send(json.dumps({"type": "generate", "id": "b", "every": 1, **message}))
        async for raw in ws:
            now = time.perf_counter() - t0
            msg = json.loads(raw)
            if msg["type"] == "suggestions":
                times.append(now)
            elif msg["type"] == "done":
                times.append(now)
                return {"ttft_s": times[0], "times": times, "tokens": msg["usage"]["completion_tokens"]}
            else:
                return {"error": json.dumps(msg)[:300], "times": times, "tokens": 0}
    return {"error": "the socket closed before done", "times": times, "tokens": 0}
