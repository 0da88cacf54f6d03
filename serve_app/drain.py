"""Graceful shutdown of the ingress: stop taking requests, let open ones finish for a grace
period, then end the rest the way a client can read.

Ray Serve cannot do this itself: `serve.shutdown()` kills the HTTP proxy actor at once, which
cuts every open connection at the TCP level (no SSE error event, no `[DONE]`, WebSockets closed
with 1006), whatever `graceful_shutdown_timeout_s` the replicas have. So `quill serve`, on
SIGTERM and before it shuts Serve down, asks the ingress replica to drain (`Ingress.drain`):

1. `draining`: every new generation is refused with 503 `shutting_down` (on every channel:
   they all open their stream through `Service.open_stream`) and /readyz answers 503, so a
   load balancer stops sending;
2. open generations run on for up to `grace_s` (QUILL_DRAIN_SECONDS);
3. those still open then end with a 503 `shutting_down` error: an SSE stream gets the error
   event and `[DONE]`, a non-streaming request the 503, a WebSocket its `error` message, and
   every WebSocket is closed with 1001 (going away).

Ending one: a stream's consumer task waits in `track` for the next deltas; it is cancelled
there, and the cancellation becomes the ApiError (cancelling the wait also cancels the call on
the model's replica, as a client leaving does). One that is not waiting (writing a frame) gets
the error at its next wait.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import AsyncIterator, TypeVar

from serve_app.errors import ApiError

log = logging.getLogger("quill.drain")
T = TypeVar("T")
DEFAULT_GRACE_S = 10.0
GOING_AWAY = 1001  # WebSocket close code: the server is going down


def grace_seconds() -> float:
    return float(os.environ.get("QUILL_DRAIN_SECONDS", DEFAULT_GRACE_S))


def shutting_down() -> ApiError:
    return ApiError(503, "shutting_down", "the server is shutting down; retry")


class _Open:
    """One generation being consumed: the task consuming it, and whether it is waiting."""

    def __init__(self, task: asyncio.Task | None):
        self.task, self.waiting, self.ended = task, False, False


class Drain:
    def __init__(self) -> None:
        self.draining = False
        self.ending = False
        self._open: set[_Open] = set()
        self._sockets: set = set()

    def refuse_if_draining(self) -> None:
        if self.draining:
            raise shutting_down()

    async def track(self, stream: AsyncIterator[T]) -> AsyncIterator[T]:
        """`stream`, ended with `shutting_down()` when the grace period is over."""
        me = _Open(asyncio.current_task())
        self._open.add(me)
        try:
            async with contextlib.aclosing(stream):
                while True:
                    if self.ending:
                        raise shutting_down()
                    me.waiting = True
                    try:
                        item = await anext(stream)
                    except StopAsyncIteration:
                        return
                    except asyncio.CancelledError:
                        if not me.ended:
                            raise
                        me.task.uncancel()  # our own cancellation: it ends the stream, not the task
                        raise shutting_down() from None
                    finally:
                        me.waiting = False
                    yield item
        finally:
            self._open.discard(me)

    def add_socket(self, ws) -> bool:
        """Register an open WebSocket, to be closed with 1001 at the end; False while draining."""
        if self.draining:
            return False
        self._sockets.add(ws)
        return True

    def remove_socket(self, ws) -> None:
        self._sockets.discard(ws)

    async def drain(self, grace_s: float) -> dict:
        """Steps 1-3 of the module docstring; returns what it did, for the log."""
        t0 = time.monotonic()
        self.draining = True
        open_at_start = len(self._open)
        while self._open and time.monotonic() - t0 < grace_s:
            await asyncio.sleep(0.1)
        finished, ended = open_at_start - len(self._open), len(self._open)
        self.ending = True  # a stream not waiting now ends at its next wait
        for s in list(self._open):
            if s.waiting and s.task is not None and not s.ended:
                s.ended = True
                s.task.cancel()
        # Let the ended streams write their error frames before the sockets and proxy go.
        deadline = time.monotonic() + 2.0
        while self._open and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        sockets = list(self._sockets)
        for ws in sockets:
            with contextlib.suppress(Exception):
                await ws.close(code=GOING_AWAY, reason="server shutting down")
        result = {"open": open_at_start, "finished": finished, "ended": ended,
                  "websockets_closed": len(sockets), "seconds": round(time.monotonic() - t0, 2)}
        log.warning("drained: %s", result)
        return result
