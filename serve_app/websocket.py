"""WS /v1/stream: the writing-assistant channel (protocol in docs/api.md).

One socket runs at most one generation at a time. The writer keeps typing, so a new `generate`
cancels the running one (the server answers `cancelled` for it first), and so does `cancel`.
While a generation runs, the server pushes the growing suggestions every `every` tokens, then a
`done` message. A bad message gets an `error` message and the socket stays open; closing the
socket cancels the running generation down to the engine.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from fastapi import WebSocket, WebSocketDisconnect

from serve_app.deltas import Accumulator
from serve_app.drain import GOING_AWAY
from serve_app.errors import ApiError, to_api_error
from serve_app.protocol import WsCancel, WsGenerate, parse_ws_message

log = logging.getLogger("quill.websocket")


def _error(id_: str | None, type_: str, message: str, **labels) -> dict:
    return {"type": "error", "id": id_, "error": {"type": type_, "message": message, **labels}}


def _error_from(id_: str | None, exc: BaseException) -> dict:
    """The same error the HTTP routes give for this exception: type, message, and `param`,
    `code` or `error_id` where it has them (`id` is the message's, outside the error)."""
    err = to_api_error(exc)
    return _error(id_, err.type, err.message, **{k: v for k, v in err.extra.items() if k != "id"})


def error_message(id_: str | None, exc: BaseException) -> str:
    """An `error` message as sent on the socket; the front door (security.py) sends its own."""
    return json.dumps(_error_from(id_, exc), separators=(",", ":"))


class _Socket:
    def __init__(self, ws: WebSocket, service):
        self.ws, self.service = ws, service
        self.task: asyncio.Task | None = None
        self.task_id: str | None = None
        self.send_lock = asyncio.Lock()

    async def send(self, message: dict) -> None:
        async with self.send_lock:
            await self.ws.send_text(json.dumps(message, separators=(",", ":")))

    async def cancel_running(self) -> None:
        task, id_ = self.task, self.task_id
        self.task = self.task_id = None
        if task is None or task.done():
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        # Only after the task has stopped, so no suggestion for `id_` can follow this.
        await self.send({"type": "cancelled", "id": id_})

    async def run(self, msg: WsGenerate) -> None:
        try:
            stream = await self.service.open_stream(msg.model, msg.prompt, msg)
        except Exception as exc:  # never leave the client without an answer
            await self.send(_error_from(msg.id, exc))
            return
        acc, pushed_at, n = Accumulator(), 0, msg.n
        try:
            async with contextlib.aclosing(stream):
                async for batch in stream:
                    acc.add_all(batch)
                    if acc.error is not None:
                        await self.send(_error(msg.id, "generation_error", acc.error))
                        return
                    progress = max(acc.completion.values())
                    if progress - pushed_at >= msg.every and len(acc.finish) < n:
                        pushed_at = progress
                        await self.send({"type": "suggestions", "id": msg.id, "texts": acc.ordered(n)[0], "done": False})
        except Exception as exc:  # e.g. the replica died mid-stream: model_unavailable
            await self.send(_error_from(msg.id, exc))
            return
        texts, reasons = acc.ordered(n)
        await self.send({"type": "done", "id": msg.id, "texts": texts, "finish_reasons": reasons, "usage": acc.usage()})

    async def handle(self, raw: str) -> None:
        try:
            msg = parse_ws_message(raw)
        except ApiError as err:  # `id`: the bad message's own id, when it has a usable one
            await self.send(_error_from(err.extra.get("id"), err))
            return
        if isinstance(msg, WsCancel):
            if self.task is not None and (msg.id is None or msg.id == self.task_id):
                await self.cancel_running()
            return
        await self.cancel_running()
        self.task_id = msg.id
        self.task = asyncio.create_task(self.run(msg))

    async def serve(self) -> None:
        drain = self.service.drain
        if not drain.add_socket(self.ws):  # shutting down: refuse the handshake
            await self.ws.close(code=GOING_AWAY)
            return
        await self.ws.accept()
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                raw = message.get("text")
                if raw is None:  # a binary frame: answer, keep the socket
                    await self.send(_error(None, "invalid_request_error", "send JSON text messages"))
                    continue
                await self.handle(raw)
        except WebSocketDisconnect:
            pass
        finally:
            drain.remove_socket(self.ws)
            if self.task is not None and not self.task.done():
                self.task.cancel()  # the client went away: free the engine slot
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self.task


async def serve_socket(ws: WebSocket, service) -> None:
    await _Socket(ws, service).serve()
