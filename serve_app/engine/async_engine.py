"""An asyncio façade over `Engine`: one thread runs the step loop, callers stream their deltas.

The model's forward pass blocks for milliseconds to seconds, so it must not run on the event
loop that serves HTTP. A dedicated thread steps the engine while there is work and sleeps when
there is none. Each request's deltas wait in its `_Stream` until its next message is due (the
message budget, `EngineConfig.stream_messages_per_s`) or it ends; only then does the step thread
wake the caller's coroutine, so a held stream costs its event loop nothing per step.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from serve_app.engine.engine import Engine
from serve_app.engine.types import Delta, GenerationRequest, RequestRejected

log = logging.getLogger("quill.engine")
MAX_HOLD_S = 1.0  # however many requests stream, each hears from the replica this often (plus a step)


@dataclass(eq=False)
class _Stream:
    """One caller's request between the step thread, which fills `pending`, and the caller's
    event loop, which takes it. Both sides change it under `AsyncEngine._lock`."""
    loop: asyncio.AbstractEventLoop
    ready: asyncio.Event  # of the caller's loop: set (from the step thread) when a message is due
    open_choices: set[int]  # choices whose last delta has not come yet
    pending: list[Delta] = field(default_factory=list)
    due: float = 0.0  # when the next message may go (monotonic); the first goes at once
    signalled: bool = False  # a wake-up is on its way to the caller's loop


class AsyncEngine:
    def __init__(self, engine: Engine | Callable[[], Engine]):
        """`engine`, or a function that builds it: then it is built on the step thread (below).

        Why build there: libgomp gives each thread that runs torch ops a pool of OpenMP workers
        of its own, and once a process holds more of them than it has CPUs, a worker waiting for
        the next op sleeps at once, whatever GOMP_SPINCOUNT says, so every op of a step pays a
        futex wake-up. Loading and warming the model on one thread and stepping it on another
        made that so: a gpt2-small bf16 burst of 32 x 64 tokens with GOMP_SPINCOUNT=10000, 2
        threads, ran at 573-577 tokens/s instead of 616-649 (9,000 sleeps of the worker against
        840). Built here, the short spin `quill serve` sets (serve_app/config.py `TORCH_ENV`), or
        an operator's own GOMP_SPINCOUNT, takes effect in a replica as it does in-process."""
        self._streams: dict[str, _Stream] = {}  # by request id
        self._lock = threading.Lock()
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
        """Like `generate`, but one list per message: the steps that came since the last one,
        the `n` choices of a step together, so a caller that forwards them (over Ray, a socket)
        sends one message for all of them.

        With a message budget (`stream_messages_per_s`), a caller hears at most its share of it:
        the first delta goes out at once (time to first token), later ones wait until the end of
        the first step past `streams / budget` seconds (at most MAX_HOLD_S) and go out together,
        and the end of the request is never held. Without a budget every step is a message."""
        if self._stopping:
            raise RequestRejected("the engine is shutting down")
        loop = asyncio.get_running_loop()
        # Tokenizing runs on one thread of its own: a 20 MB prompt took 18.8 s on the replica's
        # event loop, and stalled every other stream of that model meanwhile. One thread,
        # because a fast tokenizer may refuse two calls at once ("Already borrowed").
        prompt_ids = await loop.run_in_executor(self._tokenizing, self.engine.prepare, request)
        if request.request_id in self._streams:  # before touching streams: the live one keeps its own
            raise RequestRejected(f"request id {request.request_id!r} is already running")
        stream = _Stream(loop, asyncio.Event(), open_choices=set(range(request.params.n)))
        self._streams[request.request_id] = stream
        try:
            self.engine.add(request, prompt_ids)
        except Exception:
            del self._streams[request.request_id]
            raise
        self._wake.set()
        budget = self.engine.config.stream_messages_per_s
        ended = False
        try:
            while not ended:
                await stream.ready.wait()
                stream.ready.clear()
                with self._lock:
                    step, stream.pending = stream.pending, []
                    stream.signalled = False
                    ended = not stream.open_choices
                    if budget:  # the more requests stream, the more steps a message carries
                        stream.due = time.monotonic() + min(len(self._streams) / budget, MAX_HOLD_S)
                if step:  # empty: a wake-up that a take before it had answered already
                    yield step
        finally:
            self._streams.pop(request.request_id, None)
            if not ended:
                self.engine.cancel(request.request_id)
                self._wake.set()

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)
        self._tokenizing.shutdown(wait=False, cancel_futures=True)
        self._fail_all("the model server is shutting down")

    def _fail_all(self, message: str) -> None:
        """End every caller's stream with an error delta per choice still open (a choice that
        has ended keeps its own end), and drop the requests from the engine, so nobody waits for
        a step that will not come."""
        due: list[_Stream] = []
        with self._lock:
            for request_id, stream in list(self._streams.items()):
                stream.pending.extend(Delta(request_id, i, "", (), "error", error=message)
                                      for i in sorted(stream.open_choices))
                stream.open_choices.clear()
                due.append(stream)
                self.engine.cancel(request_id)
        self._signal(due)

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
        """File a step's deltas with their streams, and wake the callers whose message is due:
        one call into each caller loop per step, none for a loop whose streams are all held."""
        now = time.monotonic()
        due: list[_Stream] = []
        with self._lock:
            for delta in deltas:
                stream = self._streams.get(delta.request_id)
                if stream is None:  # its caller left
                    continue
                stream.pending.append(delta)
                if delta.finished:
                    stream.open_choices.discard(delta.index)
                if not stream.signalled and (not stream.open_choices or now >= stream.due):
                    stream.signalled = True
                    due.append(stream)
        self._signal(due)

    @staticmethod
    def _signal(streams: list[_Stream]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Stream]] = {}
        for stream in streams:
            by_loop.setdefault(stream.loop, []).append(stream)
        for loop, ready in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
                loop.call_soon_threadsafe(_set_all, ready)


def _set_all(streams: list[_Stream]) -> None:
    for stream in streams:
        stream.ready.set()
