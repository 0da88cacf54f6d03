"""An asyncio façade over `Engine`: one thread runs the step loop, callers stream their deltas.

The model's forward pass blocks for milliseconds to seconds, so it must not run on the event
loop that serves HTTP. A dedicated thread steps the engine while there is work and sleeps when
there is none; each request's deltas reach its caller's event loop through an asyncio queue.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from serve_app.engine.engine import Engine
from serve_app.engine.types import Delta, GenerationRequest, RequestRejected

log = logging.getLogger("quill.engine")
MAX_HOLD_S = 1.0  # however many requests stream, each hears from the replica at least this often


class AsyncEngine:
    def __init__(self, engine: Engine | Callable[[], Engine]):
        """`engine`, or a function that builds it: then it is built on the step thread (below).

        Why build there: libgomp gives each thread that runs torch ops a pool of OpenMP workers
        of its own, and once a process holds more of them than it has CPUs, a worker waiting for
        the next op sleeps at once, whatever GOMP_SPINCOUNT says, so every op of a step pays a
        futex wake-up. Loading and warming the model on one thread and stepping it on another
        made that so: a gpt2-small bf16 burst of 32 x 64 tokens with GOMP_SPINCOUNT=10000, 2
        threads, ran at 573-577 tokens/s instead of 616-649 (9,000 sleeps of the worker against
        840). Built here, the short spin `quill serve` sets (serve_app/config.py `OPENMP_ENV`), or
        an operator's own GOMP_SPINCOUNT, takes effect in a replica as it does in-process."""
        # request id -> (the caller's loop, its queue, its number of choices)
        self._routes: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[list[Delta]], int]] = {}
        self._wake = threading.Event()
        self._tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quill-tokenize")
        self._stopping = False
        self._built = threading.Event()
        self._build_error: BaseException | None = None
        self.engine = engine if isinstance(engine, Engine) else None
        self._thread = threading.Thread(target=self._run, args=(engine,), name="quill-engine", daemon=True)
        self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            raise self._build_error

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream one request's deltas; raises RequestRejected/EngineOverloaded before the first.

        Leaving the loop early (a client that went away) cancels the request in the engine.
        """
        async with contextlib.aclosing(self.generate_steps(request)) as steps:
            async for step in steps:
                for delta in step:
                    yield delta

    async def generate_steps(self, request: GenerationRequest) -> AsyncIterator[list[Delta]]:
        """Like `generate`, but one list per engine step: the `n` choices of a step together,
        so a caller that forwards them (over Ray, a socket) sends one message per step."""
        if self._stopping:
            raise RequestRejected("the engine is shutting down")
        loop = asyncio.get_running_loop()
        # Tokenizing runs on one thread of its own: a 20 MB prompt took 18.8 s on the replica's
        # event loop, and stalled every other stream of that model meanwhile. One thread,
        # because a fast tokenizer may refuse two calls at once ("Already borrowed").
        prompt_ids = await loop.run_in_executor(self._tokenizing, self.engine.prepare, request)
        if request.request_id in self._routes:  # before touching routes: the live one keeps its own
            raise RequestRejected(f"request id {request.request_id!r} is already running")
        queue: asyncio.Queue[list[Delta]] = asyncio.Queue()
        self._routes[request.request_id] = (loop, queue, request.params.n)
        try:
            self.engine.add(request, prompt_ids)
        except Exception:
            del self._routes[request.request_id]
            raise
        self._wake.set()
        remaining = request.params.n
        budget = self.engine.config.stream_messages_per_s
        sent_at: float | None = None  # the first delta goes out at once: time to first token
        try:
            while remaining > 0:
                step = await queue.get()
                if budget and sent_at is not None and not _ends(step, remaining):
                    # Hold the tokens until this caller's share of the message budget allows
                    # the next message, then send what has come by then together. The more
                    # requests stream, the more steps a message carries.
                    interval = min(len(self._routes) / budget, MAX_HOLD_S)
                    step = await self._hold(queue, step, remaining, sent_at + interval - time.monotonic())
                # Fell behind, or held: what is here goes out together (with, at most, the empty
                # deadline of a hold that the end cut short).
                while not queue.empty():
                    step = step + queue.get_nowait()
                remaining -= sum(d.finished for d in step)
                sent_at = time.monotonic()
                yield step
        finally:
            self._routes.pop(request.request_id, None)
            if remaining:
                self.engine.cancel(request.request_id)
                self._wake.set()

    @staticmethod
    async def _hold(queue: asyncio.Queue[list[Delta]], step: list[Delta], remaining: int,
                    delay: float) -> list[Delta]:
        """`step` plus the steps that arrive within `delay` seconds, or until one ends the
        request: its end is never held back. (A plain sleep here held the end of every request
        of a 32-writer burst for up to 0.5 s: that long on the burst's wall time.)"""
        if delay <= 0:
            return step
        # The deadline arrives through the queue as an empty step: one timer per message,
        # not a task per step.
        timer = asyncio.get_running_loop().call_later(delay, queue.put_nowait, [])
        try:
            while True:
                more = await queue.get()
                if not more:
                    return step
                step = step + more
                if _ends(step, remaining):
                    return step
        finally:
            timer.cancel()

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)
        self._tokenizing.shutdown(wait=False, cancel_futures=True)
        self._fail_all("the model server is shutting down")

    def _fail_all(self, message: str) -> None:
        """End every caller's stream with an error delta per choice, and drop the requests from
        the engine, so nobody waits for a step that will not come."""
        for request_id, (loop, queue, n) in list(self._routes.items()):
            errors = [Delta(request_id, i, "", (), "error", error=message) for i in range(n)]
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody waits
                loop.call_soon_threadsafe(queue.put_nowait, errors)
            self.engine.cancel(request_id)

    def _run(self, engine: Engine | Callable[[], Engine]) -> None:
        try:
            if self.engine is None:
                self.engine = engine()
        except BaseException as exc:  # the constructor re-raises it to whoever built us
            self._build_error = exc
            return
        finally:
            self._built.set()
        self._loop()

    def _loop(self) -> None:
        while not self._stopping:
            if not self.engine.has_work:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                deltas = self.engine.step()
            except Exception:
                # The engine fails the requests of a pass that raises itself; an error outside a
                # pass is a bug whose requests cannot be told apart. Fail them all rather than
                # leave their callers waiting, and pause so a step that keeps failing cannot spin.
                log.exception("engine step failed; failing every request in flight")
                self._fail_all("generation failed inside the engine")
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            self._deliver(deltas)

    def _deliver(self, deltas: list[Delta]) -> None:
        """Hand a step's deltas to their callers: one call into each caller loop per step."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, list[Delta]]]] = {}
        by_request: dict[str, list[Delta]] = {}
        for delta in deltas:
            by_request.setdefault(delta.request_id, []).append(delta)
        for request_id, step in by_request.items():
            route = self._routes.get(request_id)
            if route is not None:
                loop, queue, _ = route
                by_loop.setdefault(loop, []).append((queue, step))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
                loop.call_soon_threadsafe(_put_all, items)


def _ends(step: list[Delta], remaining: int) -> bool:
    return sum(d.finished for d in step) >= remaining


def _put_all(items: list[tuple[asyncio.Queue, list[Delta]]]) -> None:
    for queue, step in items:
        queue.put_nowait(step)
