"""The simulated writers of `quill bench load` (bench/load.py), one kind per API channel.

Each request ends as exactly one `Record` whose `outcome` says how it ended:

    done        the server's own end of the stream (SSE: a finish_reason then [DONE]; native:
                the `done` event; WebSocket: the `done` message)
    cancelled   we cancelled it (a WebSocket `generate` that replaced a running one: "retype")
                and the server confirmed with `cancelled`
    abandoned   we disconnected mid-stream on purpose (the server must free the slot itself)
    error:TYPE  the server said why it refused or failed: an HTTP status with our JSON error,
                an SSE `error` event, a WebSocket `error` message (TYPE is error.type)
    lost        none of the above: the stream or socket ended, or went silent for the stall
                timeout, without an end the client could understand

`lost` is what `quill bench load` exists to find: every request must end in one of the others.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from dataclasses import dataclass
from typing import AsyncIterator


@dataclass
class Target:
    """The server and model under load, and what every request carries."""

    url: str
    model: str
    headers: dict[str, str]
    max_tokens: int
    n_native: int  # suggestions per native request (the WebSocket asks for the same)
    truncate_prompt_tokens: int  # the model's max_prompt_tokens: documents grow past it
    over_limit_n: int  # an n the model refuses (a client that ignores the limits)
    stall_s: float  # no event for this long: the request is lost


@dataclass
class Turn:
    """One pause in a writer's typing: what they send, and how they will behave."""

    prompt: str
    abandon_after: int | None = None  # disconnect after this many text events
    retype: str | None = None  # WebSocket: after the first suggestion, send this prompt instead
    over_limit: bool = False  # ask for more suggestions than the model allows


@dataclass
class Record:
    channel: str  # sse | native | ws
    started: float  # time.perf_counter() when sent
    n: int = 1
    outcome: str = ""
    ended: float = 0.0
    first_text: float | None = None
    last_text: float | None = None
    text_events: int = 0
    tokens: int = 0  # completion tokens of all choices, from the usage
    detail: str = ""  # what was seen, for a lost or errored request

    def text(self) -> None:
        now = time.perf_counter()
        self.first_text = self.first_text or now
        self.last_text = now
        self.text_events += 1

    def end(self, outcome: str, detail: str = "") -> Record:
        if not self.outcome:  # the first end wins: an error event is followed by [DONE]
            self.outcome, self.detail, self.ended = outcome, detail[:300], time.perf_counter()
        return self

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_text is None else self.first_text - self.started

    @property
    def per_token_s(self) -> float | None:
        """Mean gap between one choice's tokens, from the first text to the end (done only)."""
        per_choice = self.tokens / max(self.n, 1)
        if self.outcome != "done" or self.first_text is None or per_choice < 2:
            return None
        return (self.ended - self.first_text) / (per_choice - 1)


def _error_type(body: bytes | str | dict, status: int) -> str:
    try:
        data = body if isinstance(body, dict) else json.loads(body)
        return str(data["error"]["type"])
    except (ValueError, KeyError, TypeError):
        return f"http_{status}"  # not our JSON error: still a clear refusal, named by its status


def _request_fields(target: Target, turn: Turn, n: int) -> dict:
    return {"prompt": turn.prompt, "max_tokens": target.max_tokens, "n": target.over_limit_n if turn.over_limit else n,
            "truncate_prompt_tokens": target.truncate_prompt_tokens, "temperature": 0.8}


# ---- HTTP: server-sent events -----------------------------------------------------------------


async def _sse_events(response) -> AsyncIterator[tuple[str | None, str]]:
    """(event name, data) per SSE frame."""
    event = None
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            yield event, line[6:]
            event = None


async def http_stream(client, target: Target, turn: Turn, channel: str) -> Record:
    """One streamed request: `sse` on /v1/completions (the OpenAI shape), `native` on
    /v1/models/{model}/generate (named events, `done` with the whole answer)."""
    import httpx

    n = 1 if channel == "sse" else target.n_native
    rec = Record(channel, time.perf_counter(), n=n)
    body = _request_fields(target, turn, n) | {"stream": True}
    if channel == "sse":
        path = "/v1/completions"
        body |= {"model": target.model, "stream_options": {"include_usage": True}}
    else:
        path = f"/v1/models/{target.model}/generate"
    finished = False
    try:
        async with client.stream("POST", target.url + path, json=body, headers=target.headers) as response:
            if response.status_code != 200:
                return rec.end(f"error:{_error_type(await response.aread(), response.status_code)}")
            async for event, data in _sse_events(response):
                if data == "[DONE]":
                    if channel == "sse" and finished:
                        rec.end("done")
                    # a no-op when the answer already ended (done, or an error event)
                    return rec.end("lost", "[DONE] without an end of the answer")
                payload = json.loads(data)
                if event == "error":
                    rec.end(f"error:{_error_type(payload, 200)}", data)
                elif channel == "native" and event == "done":
                    rec.tokens = payload["usage"]["completion_tokens"]
                    rec.end("done")
                elif event == "delta" or (channel == "sse" and payload.get("choices")):
                    piece = payload if event == "delta" else payload["choices"][0]
                    finished |= piece.get("finish_reason") is not None
                    if piece.get("text"):
                        rec.text()
                elif channel == "sse" and payload.get("usage"):
                    rec.tokens = payload["usage"]["completion_tokens"]
                if turn.abandon_after and rec.text_events >= turn.abandon_after and not rec.outcome:
                    return rec.end("abandoned")  # leaving the block drops the connection
            return rec.end("lost", "the stream ended without [DONE]")
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        return rec.end("error:connection", repr(exc))  # no connection: nothing was sent
    except httpx.TimeoutException as exc:
        return rec.end("lost", f"no event for {target.stall_s:.0f} s ({type(exc).__name__})")
    except (httpx.HTTPError, ValueError) as exc:
        return rec.end("lost", repr(exc))


# ---- the WebSocket --------------------------------------------------------------------------


@dataclass
class WsWriter:
    """One writer's socket, kept open across turns as the writing page keeps it."""

    target: Target
    ws: object | None = None
    seq: int = 0

    async def _connect(self):
        from websockets.asyncio.client import connect

        if self.ws is None:
            url = self.target.url.replace("http://", "ws://").replace("https://", "wss://") + "/v1/stream"
            self.ws = await connect(url, additional_headers=self.target.headers, max_size=None, compression=None,
                                    open_timeout=self.target.stall_s)
        return self.ws

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
            self.ws = None

    async def _send(self, ws, prompt: str, turn: Turn, live: dict[str, Record]) -> str:
        self.seq += 1
        id_ = f"w{self.seq}"
        fields = _request_fields(self.target, Turn(prompt, over_limit=turn.over_limit), self.target.n_native)
        live[id_] = Record("ws", time.perf_counter(), n=self.target.n_native)
        await ws.send(json.dumps({"type": "generate", "id": id_, "model": self.target.model, "every": 1, **fields}))
        return id_

    async def turn(self, turn: Turn) -> list[Record]:
        """Send the turn's `generate` (and its retype) and read until each has ended."""
        from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

        try:
            ws = await self._connect()
        except InvalidStatus as exc:  # refused at the handshake (401, 403, 429): a clear answer
            kind = _error_type(exc.response.body or b"", exc.response.status_code)
            return [Record("ws", time.perf_counter()).end(f"error:{kind}", repr(exc))]
        except (OSError, asyncio.TimeoutError, WebSocketException) as exc:
            return [Record("ws", time.perf_counter()).end("error:connection", repr(exc))]
        live: dict[str, Record] = {}
        first = latest = await self._send(ws, turn.prompt, turn, live)
        records = [live[first]]
        try:
            while live:
                msg = json.loads(await asyncio.wait_for(ws.recv(), self.target.stall_s))
                kind, id_ = msg.get("type"), msg.get("id")
                if kind == "error" and id_ is None:
                    id_ = latest  # an error about the message itself (e.g. over the socket's rate)
                rec = live.get(id_)
                if rec is None:
                    continue  # a late message for a request that has already ended
                if kind == "suggestions":
                    rec.text()
                    if turn.retype and id_ == first and latest == first:
                        latest = await self._send(ws, turn.retype, turn, live)  # replaces `first`
                        records.append(live[latest])
                    elif turn.abandon_after and rec.text_events >= turn.abandon_after:
                        await self.close()  # walk away mid-stream
                        for r in live.values():
                            r.end("abandoned")
                        return records
                    continue
                del live[id_]
                if kind == "done":
                    rec.tokens = msg["usage"]["completion_tokens"]
                    rec.end("done")
                elif kind == "cancelled" and id_ == first and latest != first:
                    rec.end("cancelled")  # replaced by the retype, as we asked
                elif kind == "cancelled":
                    rec.end("lost", "cancelled without being replaced")
                elif kind == "error":
                    rec.end(f"error:{msg['error']['type']}", msg["error"]["message"])
                else:
                    rec.end("lost", f"unknown message {kind!r}")
        except asyncio.TimeoutError:
            for r in live.values():
                r.end("lost", f"no message for {self.target.stall_s:.0f} s")
            await self.close()
        except (ConnectionClosed, OSError) as exc:
            for r in live.values():
                r.end("lost", f"the socket closed: {exc!r}")
            self.ws = None
        except (ValueError, KeyError) as exc:
            for r in live.values():
                r.end("lost", f"an unreadable message: {exc!r}")
        return records


# ---- what writers type ----------------------------------------------------------------------


class Document:
    """A writer's growing document, from the project's held-out text: a few words per turn; a
    new document once this one runs out."""

    def __init__(self, pieces: list[str], rng: random.Random):
        self.pieces, self.rng = pieces, rng
        self._start()

    def _start(self) -> None:
        self.words = self.rng.choice(self.pieces).split()
        self.at = min(len(self.words), self.rng.randint(20, 60))

    def type_more(self, low: int = 3, high: int = 12) -> str:
        if self.at >= len(self.words):
            self._start()
        self.at = min(len(self.words), self.at + self.rng.randint(low, high))
        return " ".join(self.words[: self.at])


def held_out_pieces() -> list[str]:
    """Text never trained on (training/data.py's validation split), as the serve bench uses."""
    from training.data import read_documents, split_documents

    pieces = [p for genre in ("fantasy", "legal", "copywriting", "abstracts") for p in split_documents(read_documents(genre))[1]]
    return [p for p in pieces if len(p.split()) >= 80]
